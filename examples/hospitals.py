"""The main Confide scenario, end to end, against a real platform server on loopback.

Two hospitals each hold part of scikit-learn's breast-cancer dataset; their populations differ
(hospital A sees mostly small tumours, hospital B mostly large ones). A research lab wants a model
trained on both, but neither hospital will hand its records to the lab or to the cloud. With Confide:

  1. the platform (untrusted) runs an enclave service; every party verifies its evidence first;
  2. each hospital encrypts its data on its own machine and wraps the key to the attested service;
  3. the lab creates a task (built-in gbdt-train on both datasets, model to the lab only);
  4. a run before both hospitals approved is refused *by the enclave* (signed error receipt);
  5. both approve exactly that manifest; the task runs; the lab gets the model and a signed receipt;
  6. the lab compares held-out AUC of models trained on A, on B and on A+B.

Everything here runs with the SIMULATED TEE backend: it shows the protocol, not hardware protection.
Usage: python examples/hospitals.py WORKDIR
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import xgboost as xgb
from sklearn.datasets import load_breast_cancer
from sklearn.metrics import roc_auc_score

from confide.attest.anchors import load_trust_anchors
from confide.client import Client
from confide.client.identity_file import save_identity
from confide.client.policy import Policy
from confide.enclave.config import EnclaveConfig
from confide.enclave.errors import ConfideError
from confide.enclave.keys import Identity
from confide.enclave.measurement import measure

SEED = 1
TRAIN_PARAMS = {"label": "malignant", "rounds": 60, "max_depth": 3, "eta": 0.1, "seed": 0}


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def make_data(work: Path) -> tuple[Path, Path, pd.DataFrame]:
    """Split the dataset: a held-out set for the lab, and two skewed hospital populations."""
    data = load_breast_cancer(as_frame=True)
    frame = data.frame.rename(columns={"target": "benign"})
    frame["malignant"] = 1 - frame.pop("benign")
    frame.columns = [c.replace(" ", "_") for c in frame.columns]
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(frame))
    held_out, rest = order[:170], order[170:]
    radius = frame["mean_radius"].to_numpy()[rest]
    small, large = rest[radius < np.median(radius)], rest[radius >= np.median(radius)]
    a = np.concatenate([small[: int(len(small) * 0.95)], large[: int(len(large) * 0.05)]])
    b = np.setdiff1d(rest, a)
    paths = []
    for name, rows in (("hospital_a", a), ("hospital_b", b)):
        path = work / f"{name}.csv"
        frame.iloc[rows].to_csv(path, index=False)
        paths.append(path)
        share = float(frame.iloc[rows]["malignant"].mean())
        print(f"  {name}: {len(rows)} patients, {share:.0%} malignant (kept on the hospital's machine)")
    print(f"  lab: {len(held_out)} held-out patients for evaluation")
    return paths[0], paths[1], frame.iloc[held_out]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(work: Path, port: int) -> subprocess.Popen[bytes]:
    log = open(work / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
    server = subprocess.Popen(
        [sys.executable, "-m", "confide.cli.main", "serve", "--data", str(work / "server"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"platform exited early; see {work / 'server.log'}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/service", timeout=1).json().get("fingerprint"):
                return server
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit(f"platform did not become ready; see {work / 'server.log'}")


def auc_of(model_path: Path, test: pd.DataFrame) -> float:
    booster = xgb.Booster()
    booster.load_model(bytearray(model_path.read_bytes()))
    features = test.drop(columns=["malignant"])
    scores = booster.predict(xgb.DMatrix(features))
    return float(roc_auc_score(test["malignant"], scores))


# what step 10 prints of /metrics: the same figures the status page shows, no party data in either
METRICS_SHOWN = ("confide_workers{", "confide_queue_depth", "confide_tasks{", "confide_task_failures_recent{")


def main(work: Path) -> int:
    work.mkdir(parents=True, exist_ok=True)
    step("1. Data stays home: two hospitals, two different patient populations")
    path_a, path_b, test = make_data(work)

    step("2. The platform starts (untrusted host, SQLite, 2 SIMULATED enclave workers)")
    port = free_port()
    server = start_server(work, port)
    url = f"http://127.0.0.1:{port}"
    print(f"  operator's status page: {url}/status (open it while the demo runs; figures at {url}/metrics)")
    try:
        # Every party trusts only the enclave build it reviewed: a policy pinned to its measurement.
        # (Development policy: accepts the SIMULATED backend, which protects nothing against the host.)
        policy = Policy(
            backends=("sim",), measurements=(measure(EnclaveConfig()).value,), allow_simulation=True,
            source="demo development policy",
        )  # fmt: skip
        anchors = load_trust_anchors(sim=[work / "server" / "platform" / "vendor_root.crt"])

        def party(name: str) -> Client:
            ident = Identity.generate(name)
            save_identity(ident, work / f"{name}.key")
            client = Client(
                url, ident, policy=policy, anchors=anchors, say=lambda m: print(f"  [{name}] {m}")
            )
            client.register(name)
            return client

        hospital_a, hospital_b, lab = party("hospital_a"), party("hospital_b"), party("lab")
        print(f"  production policy on the same evidence: {refused_by_production(lab)}")

        step("3. Each hospital verifies the enclave, encrypts its data and wraps the key to it")
        ds_a = hospital_a.upload_dataset(path_a)
        ds_b = hospital_b.upload_dataset(path_b)

        step("4. The lab asks for gbdt-train on both datasets, model to the lab only")
        both = lab.create_task(
            function="gbdt-train",
            inputs={"hospital_a": ds_a.ref, "hospital_b": ds_b.ref},  # references pin owner + ciphertext
            outputs={"model": [lab.fingerprint], "report": [lab.fingerprint]},
            params=TRAIN_PARAMS,
        )

        step("5. The lab runs it before the hospitals approved: the ENCLAVE refuses")
        lab.run(both)
        info = lab.wait(both)
        refusal = lab.receipt(both, info)
        print(f"  state: {info['state']}; signed receipt says: {refusal['error']['message']}")
        if refusal["status"] != "error" or refusal["error"]["check"] != "approval":
            print("demo failed: the enclave ran a task its data owners had not approved", file=sys.stderr)
            return 1

        step("6. Each hospital reviews exactly what it approves, then signs")
        print(indent(hospital_a.describe(both)))
        for hospital in (hospital_a, hospital_b):
            hospital.approve(both)

        step("7. Run again: both approvals verified inside the enclave, model sealed to the lab")
        lab.run(both)
        info = lab.wait(both, on_state=lambda i: print(f"  task {both[:8]}…: {i['state']}"))
        result = lab.results(both, work / "lab-both")
        receipt = result.receipt
        print(f"  receipt: status {receipt['status']}, measurement {receipt['measurement'][:16]}…, "
              f"inputs {[i['dataset_id'][:8] for i in receipt['inputs']]}, signature verified")  # fmt: skip

        step("8. For comparison, the same training on each hospital alone (each approves its own)")
        aucs = {"A + B (Confide)": auc_of(result.outputs["model"], test)}
        for label, owner, ds in (("A only", hospital_a, ds_a), ("B only", hospital_b, ds_b)):
            task = lab.create_task(
                function="gbdt-train", inputs={"data": ds.ref},
                outputs={"model": [lab.fingerprint], "report": [lab.fingerprint]}, params=TRAIN_PARAMS,
            )  # fmt: skip
            owner.approve(task)
            lab.run(task)
            lab.wait(task)
            aucs[label] = auc_of(lab.results(task, work / f"lab-{label[0]}").outputs["model"], test)
        for label, auc in aucs.items():
            print(f"  held-out AUC, trained on {label:<16} {auc:.4f}")
        if not aucs["A + B (Confide)"] > max(aucs["A only"], aucs["B only"]):
            print("demo failed: the joint model did not beat the single-hospital models", file=sys.stderr)
            return 1

        step("9. The audit log: every state change, hash-chained, checked by the lab")
        events = lab.audit(both)
        names = {
            c.fingerprint: name
            for name, c in (("hospital_a", hospital_a), ("hospital_b", hospital_b), ("lab", lab))
        }
        for ev in events:
            actor = names.get(ev.get("actor", ""), ev.get("actor", ""))
            detail = ev.get("detail") or {}
            shown = {k: v for k, v in detail.items() if k in ("category", "run", "attempt")}
            print(
                f"  #{ev['seq']:<4} {ev['kind']:<16} by {actor:<28} {shown or ''}  hash {ev['sha256'][:12]}…"
            )
        step(f"10. The operator's view: the figures of {url}/metrics (also on {url}/status)")
        for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
            if line.startswith(METRICS_SHOWN) and not line.endswith(" 0.0"):
                print(f"  {line}")
        print(f"\nDone: joint model AUC {aucs['A + B (Confide)']:.4f} vs "
              f"{aucs['A only']:.4f} (A) and {aucs['B only']:.4f} (B); neither hospital's records left it "
              "unencrypted except inside the (simulated) enclave.")  # fmt: skip
        for client in (hospital_a, hospital_b, lab):
            client.close()
        return 0
    except ConfideError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def refused_by_production(client: Client) -> str:
    strict = Client(client.api.url, client.identity, policy=Policy(), anchors=client.anchors)
    try:
        strict.attest()
    except Exception as exc:  # the production policy must refuse simulated evidence
        return f"refused ({str(exc)[:90]}…)"
    finally:
        strict.close()
    raise SystemExit("demo failed: the production policy accepted simulated evidence")


def indent(text: str) -> str:
    return io.StringIO("".join(f"    {line}\n" for line in text.splitlines())).getvalue()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-work")))
