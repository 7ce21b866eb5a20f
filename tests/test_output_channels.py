"""Channels from confidential code to the host (issue 12, item 3), played against a real enclave worker.

The host sees the files it is handed back and the receipt: the `_error` output must not carry more
than the error cap the owners approved (whatever the function puts into its exception), and a padded
output must look the same size for every true size within one bucket, while its recipients still
get the exact bytes.
"""

from __future__ import annotations

import pytest

from confide.client.manifest_build import build_manifest, sign_approval
from confide.enclave import manifest as mf
from confide.enclave.errors import FormatError, IntegrityError
from confide.enclave.keys import Identity
from confide.enclave.padding import TRAILER, pad_bytes, padded_size, unpad_bytes

LAB = Identity.generate("lab")
OWNER = Identity.generate("owner")
ALGO = Identity.generate("algo")
PARTIES = {"lab": LAB.public, "owner": OWNER.public, "algo": ALGO.public}

LEAK_IN_ERROR = """
def run(ctx):
    data = ctx.inputs["data"].read()
    raise ValueError((data * (51200 // len(data) + 1))[:51200].decode())  # 50 KiB of records
"""
WRITE_N = """
def run(ctx):
    n = int(ctx.params["n"])
    ctx.outputs["out"].write(ctx.inputs["data"].read()[:1] * n)
"""
RECORDS = b"name,secret\nann,4711\nbob,1234\n"


@pytest.fixture(scope="module")
def kit(service_worker):
    kit, _ = service_worker
    return kit, kit.dataset(OWNER, RECORDS)


def _manifest(kit, data, source: str, *, max_bytes: int, pad=None, params=None, **over) -> mf.Manifest:
    desc = mf.function_descriptor(
        name="fn", source=source, owner=ALGO.public, description="test", inputs=["data"], outputs=["out"]
    )
    return build_manifest(
        service=kit.service,
        creator=LAB.public,
        function=desc,
        params=params or {},
        inputs=[kit.task_input("data", data)],
        outputs=[mf.TaskOutput("out", (LAB.fingerprint,), max_bytes, pad)],
        participants=PARTIES,
        **over,
    )


def _run(kit, data, m: mf.Manifest, source: str):
    approvals = [sign_approval(p, m) for p in (LAB, OWNER, ALGO)]
    return kit.run(m, approvals, {"data": data}, function_source={"clear": source})


def test_error_text_is_cut_to_the_default_cap_whatever_the_output_cap(kit) -> None:
    kit, data = kit
    m = _manifest(kit, data, LEAK_IN_ERROR, max_bytes=16)
    assert m.error_cap == mf.DEFAULT_ERROR_MAX_BYTES == 4096
    result, body, outs = _run(kit, data, m, LEAK_IN_ERROR)
    assert result["category"] == "exception", body
    sizes = {o["name"]: o["size"] for o in body["outputs"]}
    assert sizes == {"_error": 4096}  # what the host sees: exactly the approved cap
    assert result["outputs"]["_error"]["size"] == 4096
    sealed = outs["_error"].stat().st_size
    assert sealed < 4096 + 1024  # the ciphertext: the cap plus a fixed header and tags, not 50 KiB
    text = unpad_bytes(kit.read(outs["_error"], LAB), where="test")
    assert len(text) <= 4096 - TRAILER
    assert b"ann,4711" in text and b"error text cut to the approved" in text


def test_error_cap_named_in_the_manifest_applies(kit) -> None:
    kit, data = kit
    m = _manifest(kit, data, LEAK_IN_ERROR, max_bytes=16, error_max_bytes=256)
    _result, body, outs = _run(kit, data, m, LEAK_IN_ERROR)
    assert {o["name"]: o["size"] for o in body["outputs"]} == {"_error": 256}
    assert len(unpad_bytes(kit.read(outs["_error"], LAB), where="test")) <= 256 - TRAILER


def test_two_true_sizes_within_one_bucket_look_the_same_to_the_host(kit) -> None:
    kit, data = kit
    seen = []
    for n in (20, 40):  # both fit the 64-byte bucket (with the 16-byte trailer)
        m = _manifest(kit, data, WRITE_N, max_bytes=1024, pad="pow2", params={"n": n})
        result, body, outs = _run(kit, data, m, WRITE_N)
        assert result["ok"], body
        seen.append(
            (body["outputs"][0]["size"], result["outputs"]["out"]["size"], outs["out"].stat().st_size)
        )
        assert unpad_bytes(kit.read(outs["out"], LAB), where="test") == b"n" * n  # exact bytes back
    assert seen[0] == seen[1] and seen[0][0] == 64
    m = _manifest(kit, data, WRITE_N, max_bytes=1024, pad=100, params={"n": 150})  # a bucket size
    result, body, outs = _run(kit, data, m, WRITE_N)
    assert body["outputs"][0]["size"] == 200
    assert unpad_bytes(kit.read(outs["out"], LAB), where="test") == b"n" * 150


def test_padding_is_approved_in_the_manifest() -> None:
    m = {"name": "out", "recipients": [LAB.fingerprint], "max_bytes": 10}
    with pytest.raises(FormatError, match="pad must be"):
        mf.parse_manifest(
            {
                **_manifest_json(),
                "outputs": [{**m, "pad": "pow3"}],
            }
        )


def _manifest_json() -> dict:
    desc = mf.function_descriptor(name="fn", source="x", owner=ALGO.public, description="t", outputs=["out"])
    return build_manifest(
        service=LAB.public,
        creator=LAB.public,
        function=desc,
        inputs=[],
        outputs=[mf.TaskOutput("out", (LAB.fingerprint,), 10)],
        participants=PARTIES,
    ).to_json()


def test_unpad_refuses_a_bad_trailer() -> None:
    good = pad_bytes(b"abc", padded_size(3, "pow2"))
    assert len(good) == 64 and unpad_bytes(good, where="t") == b"abc"
    with pytest.raises(IntegrityError):
        unpad_bytes(good[:-1] + b"z", where="t")
    with pytest.raises(IntegrityError):
        unpad_bytes(b"abc" + b"\1" + good[4:], where="t")  # non-zero padding
