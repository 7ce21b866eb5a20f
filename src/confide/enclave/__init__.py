"""The enclave's trusted computing base (TCB): the only Confide package that runs inside the TEE.

Everything here is measured (see measurement.py). It may import only the Python standard library,
its own modules, and the third-party distributions listed in ``measurement.TCB_DISTRIBUTIONS``
(tests/test_tcb_imports.py enforces this). Every message from the host is parsed as hostile.
"""
