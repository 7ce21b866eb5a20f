"""confide.enclave.sandbox.landlock: asking for a wall the kernel's Landlock ABI cannot build fails
with EOPNOTSUPP naming what is missing (the layer then reports MISSING), before anything is applied."""

from __future__ import annotations

import errno

import pytest

from confide.enclave.sandbox.landlock import abi_version, restrict


@pytest.mark.parametrize(
    ("abi", "net", "scope", "message"),
    [
        (0, False, False, "Landlock is not supported by this kernel"),
        (3, True, False, "Landlock ABI 3 has no network rules (needs 4)"),
        (5, False, True, "Landlock ABI 5 has no scopes (needs 6)"),
    ],
)
def test_walls_the_abi_cannot_build_are_refused(abi: int, net: bool, scope: bool, message: str) -> None:
    with pytest.raises(OSError) as info:
        restrict(abi, ("/usr",), fs=True, net=net, scope=scope)
    assert info.value.errno == errno.EOPNOTSUPP and message in str(info.value)


def test_the_abi_version_is_a_number() -> None:
    assert isinstance(abi_version(), int) and abi_version() >= 0
