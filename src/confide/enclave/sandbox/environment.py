"""The zygote's whole environment, and so every sandboxed child's: nothing is inherited from the
enclave process, and the numeric libraries (and Arrow's allocator) are pinned to one thread so the zygote stays
single-threaded (safe to fork) and children do not start thread pools they were not asked for."""

from __future__ import annotations

THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "VECLIB_MAXIMUM_THREADS": "1",
    "BLIS_NUM_THREADS": "1",
    "GOTO_NUM_THREADS": "1",
    # Arrow (pandas imports pyarrow when it is installed): its bundled jemalloc starts a background
    # thread at import; use the system allocator (it also respects RLIMIT_AS) and no such thread.
    "ARROW_DEFAULT_MEMORY_POOL": "system",
    "JE_ARROW_MALLOC_CONF": "background_thread:false",
}


def zygote_environment() -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": "/nonexistent",
        "TZ": "UTC",
        **THREAD_ENV,
    }
