"""confide.enclave.function_desc: a hostile manifest's outputs for the analytics built-ins (members_<input>
sealed to someone else, outputs for inputs the task lacks), confidential sources that were swapped,
corrupted or are not text, and descriptors of unknown kinds or built-ins."""

from __future__ import annotations

import pytest

from confide.client.function_seal import seal_function_source
from confide.enclave import hpke_box
from confide.enclave.errors import FormatError, IntegrityError
from confide.enclave.function_desc import (
    FUNCTION_SOURCE_PURPOSE,
    MAX_SOURCE_BYTES,
    builtin_descriptor,
    builtin_source,
    check_function_source,
    check_task_outputs,
    function_descriptor,
    open_function_source,
    parse_function_descriptor,
    source_binding,
)
from confide.enclave.keys import Identity

ALICE, BOB, SERVICE = Identity.generate("alice"), Identity.generate("bob"), Identity.generate("service")
INPUTS = {"a": ALICE.public.fingerprint, "b": BOB.public.fingerprint}
SOURCE = "def run(ctx):\n    ctx.outputs['out'].write(b'x')\n"


def test_psi_outputs_may_be_any_subset_with_members_to_their_owner() -> None:
    psi = builtin_descriptor("psi")
    check_task_outputs(psi, INPUTS, {"size": ["x", "y"]}, "manifest")
    check_task_outputs(psi, INPUTS, {"members_a": [INPUTS["a"]], "intersection": ["z"]}, "manifest")


@pytest.mark.parametrize(
    ("outputs", "error", "message"),
    [
        ({"members_a": [INPUTS["b"]]}, IntegrityError, "may be sealed only to that input's owner"),
        (
            {"members_a": [INPUTS["a"], INPUTS["b"]]},
            IntegrityError,
            "may be sealed only to that input's owner",
        ),
        ({"members_c": [INPUTS["a"]]}, FormatError, "is for input 'c', which the task does not have"),
        ({"everything": ["x"]}, FormatError, "output 'everything' is not one the function 'psi' writes"),
    ],
)
def test_hostile_psi_outputs_are_refused(
    outputs: dict[str, list[str]], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        check_task_outputs(builtin_descriptor("psi"), INPUTS, outputs, "manifest outputs")
    assert message in str(info.value) and "manifest outputs" in str(info.value)


def test_fixed_outputs_must_match_exactly() -> None:
    ja = builtin_descriptor("join-aggregate")
    check_task_outputs(ja, INPUTS, {"result": ["x"], "report": ["x"]}, "m")
    with pytest.raises(FormatError, match="differ from the outputs function 'join-aggregate' writes"):
        check_task_outputs(ja, INPUTS, {"result": ["x"]}, "m")


def test_unknown_builtins_are_refused() -> None:
    with pytest.raises(FormatError, match="unknown built-in function 'rm -rf'"):
        builtin_source("rm -rf")
    with pytest.raises(FormatError, match="unknown built-in function"):
        builtin_descriptor("nope")


def _desc(owner: Identity | None = ALICE) -> object:
    return function_descriptor(
        name="upper", source=SOURCE, owner=owner.public if owner else "", description="d", outputs=("out",)
    )


def test_a_confidential_source_round_trips_to_the_service() -> None:
    d = _desc()
    sealed = seal_function_source(SOURCE, descriptor=d, service=SERVICE.public)  # type: ignore[arg-type]
    assert open_function_source(sealed, descriptor=d, service=SERVICE) == SOURCE  # type: ignore[arg-type]


def test_a_source_other_than_the_approved_one_is_refused() -> None:
    d = _desc()
    with pytest.raises(IntegrityError, match="but the approved descriptor says"):
        seal_function_source(SOURCE + "#", descriptor=d, service=SERVICE.public)  # type: ignore[arg-type]
    with pytest.raises(FormatError, match=f"source longer than {MAX_SOURCE_BYTES} bytes"):
        check_function_source(d, "#" * (MAX_SOURCE_BYTES + 1))  # type: ignore[arg-type]


def test_a_function_without_owner_cannot_be_sealed() -> None:
    with pytest.raises(FormatError, match="a confidential function needs an owner"):
        seal_function_source(SOURCE, descriptor=_desc(None), service=SERVICE.public)  # type: ignore[arg-type]


def test_the_enclave_refuses_swapped_corrupted_oversized_and_non_text_sources() -> None:
    d = _desc()
    other = function_descriptor(
        name="upper", source=SOURCE + "\n", owner=ALICE.public, description="d", outputs=("out",)
    )
    sealed = seal_function_source(SOURCE, descriptor=d, service=SERVICE.public)  # type: ignore[arg-type]
    with pytest.raises(IntegrityError):  # bound to the other descriptor's digest: does not open
        open_function_source(sealed, descriptor=other, service=SERVICE)
    with pytest.raises(IntegrityError):  # sealed to this service only
        open_function_source(sealed, descriptor=d, service=BOB)  # type: ignore[arg-type]
    flipped = bytearray(sealed)
    flipped[-1] ^= 1
    with pytest.raises(IntegrityError):
        open_function_source(bytes(flipped), descriptor=d, service=SERVICE)  # type: ignore[arg-type]
    with pytest.raises(FormatError, match=f"longer than {MAX_SOURCE_BYTES} bytes"):
        open_function_source(b"\0" * (MAX_SOURCE_BYTES + 65), descriptor=d, service=SERVICE)  # type: ignore[arg-type]
    binary = hpke_box.seal(
        b"\xff\xfe not text",
        SERVICE.public.kem_key,
        FUNCTION_SOURCE_PURPOSE,
        **source_binding(d, SERVICE.public.fingerprint),  # type: ignore[arg-type]
    )
    with pytest.raises(FormatError, match="source is not UTF-8 text"):
        open_function_source(binary, descriptor=d, service=SERVICE)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "confide-function-v0"}, "unknown descriptor format"),
        ({"kind": "shell"}, "kind must be one of"),
    ],
)
def test_descriptors_of_unknown_format_or_kind_are_refused(change: dict[str, str], message: str) -> None:
    obj = {**_desc().to_json(), **change}  # type: ignore[attr-defined]
    with pytest.raises(FormatError, match=message):
        parse_function_descriptor(obj)
