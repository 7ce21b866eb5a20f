"""Built-in functions of the enclave (PROTOCOL.md section 4: ``kind: builtin``).

Each module here is a ``run(ctx)`` function like any party's: the enclave never imports it. It
reads the module's source as text (``manifest.builtin_source``), so the source is measured with the
rest of the TCB, and runs it in the sandbox like untrusted code (defence in depth). The modules
get numpy, pandas and xgboost from the sandbox zygote, which pre-imports them; they import them
inside ``run``, which only ever executes in the sandbox child (tests/test_tcb_imports.py allows
these libraries in this folder only).
"""
