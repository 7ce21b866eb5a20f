"""confide.enclave.measurement: a TCB distribution that is not installed stops the measurement (it
would otherwise measure less than runs), while a requirement whose marker does not apply is skipped."""

from __future__ import annotations

from pathlib import Path

import pytest

from confide.enclave.errors import ConfideError
from confide.enclave.measurement import dependency_closure


def test_a_missing_tcb_distribution_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfideError, match="TCB dependency 'confide-no-such-dist' is not installed"):
        dependency_closure(["confide_no_such_dist"])
    with pytest.raises(ConfideError, match="is not installed"):
        dependency_closure(["cryptography"], path=[str(tmp_path)])  # looked up on an empty path


def test_the_closure_of_cryptography_holds_its_requirements() -> None:
    closure = dependency_closure(["cryptography"])
    assert "cryptography" in closure and "cffi" in closure
