"""Parquet with modular encryption (PME) as a dataset of the platform (issue 10, data formats): the
owner's client opens the file with its master keys, seals file, key material and keys together; the
built-in decrypts it in the enclave's sandbox child. Tested with parquet-mr's file (../shared/
testvectors/parquet, double wrapping, external key material) through `confide dataset upload
--pme-keys` and a real server; a wrong key is refused on the owner's machine before any upload, and
in the enclave when a hostile client packs one anyway; the packed layout is parsed as hostile."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pandas as pd
import pytest

from confide.client import pme_dataset
from confide.enclave import parquet_keys as pk
from confide.enclave.errors import ConfideError, FormatError
from confide.enclave.keys import Identity
from platform_support import CliParties

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "testvectors" / "parquet"
JAVA_FILE = VECTORS / "external_key_material_java.parquet.encrypted"
JAVA_KEY_MATERIAL = VECTORS / "_KEY_MATERIAL_FOR_external_key_material_java.parquet.encrypted.json"
MASTER_KEYS = {"kf": b"0123456789012345", "kc1": b"1234567890123450", "kc2": b"1234567890123451"}
# join partner: ids 50..149, so ids 50..99 of the file's `integers` are common (sum 3725)
PARTNER = ("id,w\n" + "".join(f"{i},{i % 7}\n" for i in range(50, 150))).encode()
PARAMS = {
    "key": {"owner": "integers", "partner": "id"},
    "k": 2,
    "aggregates": [{"op": "count"}, {"op": "sum", "column": "integers"}, {"op": "sum", "column": "w"}],
}
LAB = Identity.generate("lab")
OWNER = Identity.generate("owner")
PARTNER_ID = Identity.generate("partner")

pytestmark = pytest.mark.skipif(not JAVA_FILE.exists(), reason="../shared/testvectors/parquet is missing")


def keys_file(tmp: Path, keys: dict[str, bytes]) -> Path:
    path = tmp / "keys.json"
    path.write_text(json.dumps({k: base64.b64encode(v).decode() for k, v in keys.items()}))
    return path


def bundle(keys: dict[str, bytes] = MASTER_KEYS) -> bytes:
    return pme_dataset.pack(JAVA_FILE.read_bytes(), keys, JAVA_KEY_MATERIAL.read_bytes())


def expected() -> dict[str, str]:
    common = [i for i in range(100) if 50 <= i < 150]
    return {
        "count": str(len(common)),
        "sum(integers)": str(sum(common)),
        "sum(w)": str(sum(i % 7 for i in common)),
    }


# ---- the packed layout, parsed as hostile ------------------------------------------------------------


def test_a_packed_dataset_opens_to_the_documented_contents() -> None:
    table = pk.read_dataset(bundle(), name="java")
    assert table.column("integers").to_pylist() == list(range(100))
    assert pme_dataset.check(bundle(), name="java") == (("integers", "strings"), 100)


def header(obj: object) -> bytes:
    raw = json.dumps(obj).encode()
    return pk.BUNDLE_MAGIC + len(raw).to_bytes(4, "big") + raw + b"PAR1"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (pk.BUNDLE_MAGIC + b"\x00\x00", "is not a Confide PME dataset"),
        (pk.BUNDLE_MAGIC + b"\x7f\xff\xff\xff{}", "does not fit the dataset"),
        (pk.BUNDLE_MAGIC + b"\x00\x00\x00\x03{x}", "header is not JSON"),
        (header({"master_keys": {"kf": "AAAA"}}), "header must hold exactly"),
        (header({"master_keys": {}, "key_material": None}), "master_keys must be a non-empty object"),
        (header({"master_keys": {"kf": "not base64!"}, "key_material": None}), "is not base64"),
        (
            header({"master_keys": {"kf": 7}, "key_material": None}),
            "every master key must be a base64 string",
        ),
        (
            header({"master_keys": {"kf": "AAAA"}, "key_material": None}),
            "master key 'kf' must be 16, 24 or 32",
        ),
    ],
)
def test_a_malformed_packed_dataset_is_refused_naming_what(raw: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message) as err:
        pk.read_dataset(raw, name="ds")
    assert err.value.where == "parquet dataset 'ds'"


def test_every_truncation_of_the_header_fails_closed() -> None:
    raw = bundle()
    head = len(pk.BUNDLE_MAGIC) + 4 + int.from_bytes(raw[8:12], "big")
    for cut in range(0, head + 64, 7):
        with pytest.raises(ConfideError):
            pk.read_dataset(raw[:cut], name="ds")


# ---- in a task: the enclave's sandbox decrypts it -------------------------------------------------------


@pytest.fixture(scope="module")
def kit(service_worker):
    return service_worker[0]


def run(kit, owner_data: bytes):
    return kit.run_builtin(
        "join-aggregate",
        {"owner": owner_data, "partner": PARTNER},
        PARAMS,
        owners={"owner": OWNER, "partner": PARTNER_ID},
        creator=LAB,
        outputs=("result", "report"),
        participants={"lab": LAB.public, "owner": OWNER.public, "partner": PARTNER_ID.public},
    )


def test_join_aggregate_over_parquet_mrs_file_in_the_sandbox(kit) -> None:
    result, _, outs = run(kit, bundle())
    assert result["ok"], kit.read(outs["_error"], LAB).replace(b"\x00", b"").decode()[:3000]
    rows = pd.read_csv(io.BytesIO(kit.read(outs["result"], LAB)), dtype=str).to_dict("records")
    assert rows == [expected()]


def test_a_hostile_client_packing_a_wrong_key_gets_a_failed_run_naming_the_key(kit) -> None:
    result, _, outs = run(kit, bundle({**MASTER_KEYS, "kc2": b"7" * 16}))
    assert result["ok"] is False and result["category"] == "exception"
    error = kit.read(outs["_error"], LAB).decode()
    assert "parquet file 'owner'" in error and "'kc2'" in error, error[-2000:]
    assert not outs["result"].exists()


# ---- the owner's CLI, against a real server -----------------------------------------------------------


def test_confide_dataset_upload_pme_keys_end_to_end(server, tmp_path: Path) -> None:
    parties = CliParties(server, tmp_path, ("owner", "partner", "lab"))

    cli = parties
    # the file as parquet-mr left it: its key material beside it
    data = tmp_path / JAVA_FILE.name
    data.write_bytes(JAVA_FILE.read_bytes())
    (tmp_path / JAVA_KEY_MATERIAL.name).write_bytes(JAVA_KEY_MATERIAL.read_bytes())
    wrong = keys_file(tmp_path, {**MASTER_KEYS, "kc1": b"9" * 16})
    r = cli("owner", "dataset", "upload", str(data), "--pme-keys", str(wrong))
    assert r.exit_code == 1 and "'kc1'" in r.output and "Traceback" not in r.output, r.output
    listed = cli("owner", "dataset", "list", "--mine", "--json")
    assert json.loads(listed.stdout) == []  # nothing was uploaded
    r = cli("owner", "dataset", "upload", str(data))
    assert r.exit_code == 1 and "give its master keys with --pme-keys" in r.output, r.output
    keys = str(keys_file(tmp_path, MASTER_KEYS))
    owner_ref = cli.ok("owner", "dataset", "upload", str(data), "--pme-keys", keys)
    shown = json.loads(cli("owner", "dataset", "show", owner_ref).stdout)
    assert shown["columns"] == ["integers", "strings"] and shown["rows"] == 100
    partner_ref = cli.upload("partner", "partner", PARTNER)
    lab = cli.fps["lab"]
    task = cli.ok(
        "lab", "task", "create", "--function", "join-aggregate",
        "--input", f"owner={owner_ref}", "--input", f"partner={partner_ref}",
        "--output", f"result={lab}", "--output", f"report={lab}", "--params-json", json.dumps(PARAMS),
    )  # fmt: skip
    for who in ("owner", "partner"):
        assert cli(who, "task", "approve", task, "--yes").exit_code == 0
    cli.ok("lab", "task", "run", task)
    cli.ok("lab", "task", "results", task, "--out", str(tmp_path / "out"))
    rows = pd.read_csv(tmp_path / "out" / "result", dtype=str).to_dict("records")
    assert rows == [expected()]
