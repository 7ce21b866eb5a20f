"""DuckDB as the built-ins run it in the sandbox child (sql, join-aggregate): in memory, one thread, no
async I/O threads, no file or network access, no extension loading or installing, no temp directory
(nothing spills to disk in clear), no Python replacement scans (a query cannot reach a Python
variable by name), a memory limit, and the configuration locked against SET.

Pre-imported by the zygote (a child cannot import Confide's modules); duckdb itself is imported by
the caller, in the child, never in the zygote or the enclave process.
"""

from typing import Any


def connect(duckdb: Any, memory_mib: int) -> Any:
    """A locked, single-threaded in-memory DuckDB connection with `memory_mib` MiB of memory."""
    return duckdb.connect(
        ":memory:",
        config={
            "threads": 1,
            "async_threads": 0,
            "enable_external_access": False,
            "autoload_known_extensions": False,
            "autoinstall_known_extensions": False,
            "allow_community_extensions": False,
            "python_enable_replacements": False,
            "temp_directory": "",
            "memory_limit": f"{memory_mib}MiB",
            "lock_configuration": True,
        },
    )
