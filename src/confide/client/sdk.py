"""`confide.Client`: one party's view of a Confide platform.

The client is the only part a party trusts besides the attested enclave. Before it sends anything
secret it verifies the enclave service's evidence against the party's policy (fresh nonce); it
wraps data keys only to that attested service key; it builds and signs manifests itself and shows
exactly what an approval covers; it checks every receipt's signature and every downloaded blob's
digest; and it decrypts results locally. The platform it talks to is untrusted throughout.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confide.client import analytics, custody, inference, ordered_join
from confide.client.audit_pins import AuditRewritten as AuditRewritten
from confide.client.audit_pins import AuditVerifier, PinStore
from confide.client.audit_pins import check_audit_chain as check_audit_chain
from confide.client.dataset_keys import new_dataset_id, wrap_dataset_key
from confide.client.dataset_ref import PREFIX as REF_PREFIX
from confide.client.dataset_ref import DatasetPin, is_bare_id, make_ref, parse_ref
from confide.client.function_seal import seal_function_source
from confide.client.manifest_build import build_manifest, sign_approval
from confide.client.policy import Policy
from confide.client.progress import byte_progress
from confide.client.receipts import verify_task_receipt
from confide.client.task_store import TaskStore
from confide.client.transport import ApiError, Transport, Unreachable
from confide.enclave import manifest as mf
from confide.enclave.encoding import b64d, b64e, canonical_json
from confide.enclave.errors import ConfideError, IntegrityError, PolicyError
from confide.enclave.keys import Identity, PublicIdentity, check_pin

if TYPE_CHECKING:  # imported where used: a client command starts without the verifiers' imports
    from confide.attest import Claims, TrustAnchors
    from confide.client.attest_cache import AttestationCache

TERMINAL_STATES = ("succeeded", "failed", "cancelled")
DEFAULT_URL = "http://127.0.0.1:8470"
DEFAULT_MAX_OUTPUT = 64 << 20
LONG_POLL_S = 20.0
RETRY_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)  # waiting out a platform restart, then every 8 s
RETRY_STATUSES = (502, 503, 504)
Say = Callable[[str], None]


@dataclass(frozen=True)
class ServiceKey:
    """The enclave service's key, as vouched for by evidence that passed our policy."""

    public: PublicIdentity
    claims: Claims
    attested_at: int

    @property
    def fingerprint(self) -> str:
        return self.public.fingerprint


@dataclass(frozen=True)
class DatasetRef:
    dataset_id: str
    name: str
    owner: str
    ciphertext_sha256: str
    size: int
    rows: int | None
    columns: tuple[str, ...]

    @property
    def ref(self) -> str:
        """The reference to hand to task creators (``cds1:id:owner:ciphertext``): it pins the
        owner's full fingerprint and the ciphertext, so the platform cannot substitute a dataset."""
        return make_ref(self.dataset_id, self.owner, self.ciphertext_sha256)


@dataclass(frozen=True)
class TaskResult:
    task_id: str
    state: str
    receipt: dict[str, Any]
    outputs: dict[str, Path]


class Client:
    """A party's session with one platform. `say` receives progress lines (default: silent)."""

    # the built-ins' task builders, as methods: client.psi(inputs=..., column=...) and so on
    psi = analytics.psi
    join_aggregate = analytics.join_aggregate
    sql = analytics.sql
    infer = inference.infer
    ordered_set_join = ordered_join.ordered_set_join
    password_check = custody.password_check
    sign_message = custody.sign_message
    upload_password = custody.upload_password
    upload_key = custody.upload_key

    def __init__(
        self,
        url: str,
        identity: Identity | str | os.PathLike[str],
        *,
        policy: Policy | str | os.PathLike[str] | None = None,
        anchors: TrustAnchors | None = None,
        sim_root: str | os.PathLike[str] | None = None,
        home: str | os.PathLike[str] | None = None,
        say: Say | None = None,
        timeout: float = 60.0,
        cache_attestation: bool = False,
    ) -> None:
        """`identity`: an `Identity` or the path of your key file (`confide keygen`). `policy`: a
        `Policy`, a policy file, or None for `$CONFIDE_HOME/policy.toml` (the production defaults when
        there is none). `anchors`: trust anchors (default: the vendor roots shipped with Confide and
        this home's simulated root), plus `sim_root`, a simulated platform's `vendor_root.crt` to trust
        (development only). `home`: the Confide directory (default `$CONFIDE_HOME` or ~/.confide)."""
        from confide.client.home import Home

        here = Home.from_env(home)
        self.home = here
        self.records = TaskStore(here.root / "client.db")  # manifests created/approved, refs, receipts
        self.identity = identity if isinstance(identity, Identity) else Identity.load(Path(identity))
        self.policy = policy if isinstance(policy, Policy) else here.policy(Path(policy) if policy else None)
        self._given_anchors = anchors
        self._anchors: TrustAnchors | None = None  # loaded on first use: parsing certificates costs start-up
        self._sim_root = Path(sim_root) if sim_root is not None else None
        self.say: Say = say or (lambda _msg: None)
        self.api = Transport(url, self.identity, timeout=timeout)
        self._service: ServiceKey | None = None
        self._parties: dict[str, tuple[str, PublicIdentity]] = {}
        # `cache_attestation`: reuse verified evidence for the policy's max_age_seconds (see attest_cache)
        self._attest_cache: AttestationCache | None = None
        if cache_attestation:
            from confide.client.attest_cache import AttestationCache

            self._attest_cache = AttestationCache(
                here.root, url, self.policy, self.identity, self._anchors_digest()
            )

    @classmethod
    def from_env(
        cls,
        *,
        identity: Identity | str | os.PathLike[str] | None = None,
        say: Say | None = None,
        timeout: float = 60.0,
    ) -> Client:
        """A client configured like the CLI: CONFIDE_URL (default http://127.0.0.1:8470),
        CONFIDE_IDENTITY (or `identity`), CONFIDE_POLICY, CONFIDE_SIM_ROOT, CONFIDE_HOME."""
        identity = identity or os.environ.get("CONFIDE_IDENTITY")
        if not identity:
            raise ConfideError(
                "no identity: set CONFIDE_IDENTITY to your key file (confide keygen NAME)",
                where="CONFIDE_IDENTITY",
            )
        return cls(
            os.environ.get("CONFIDE_URL") or DEFAULT_URL,
            identity,
            policy=os.environ.get("CONFIDE_POLICY") or None,
            sim_root=os.environ.get("CONFIDE_SIM_ROOT") or None,
            say=say,
            timeout=timeout,
        )

    def close(self) -> None:
        self.api.close()
        self.records.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def fingerprint(self) -> str:
        return self.identity.fingerprint

    @property
    def anchors(self) -> TrustAnchors:
        """The trust anchors evidence is checked against: those given, else the vendor roots shipped
        with Confide and this home's simulated root; plus `sim_root` when given."""
        if self._anchors is None:
            if self._given_anchors is None:
                self._anchors = self.home.anchors(self._sim_root)
            else:
                from confide.attest.anchors import load_trust_anchors, merge_anchors

                extra = load_trust_anchors(sim=[self._sim_root] if self._sim_root else [])
                self._anchors = merge_anchors(self._given_anchors, extra)
        return self._anchors

    def _anchors_digest(self) -> str:
        """A digest of what `anchors` is made of, read without parsing a certificate: the anchors
        given, else the vendor roots shipped with this build and this home's simulated root; plus
        `sim_root`. Cached attestation verdicts are tied to it."""
        h = hashlib.sha256(b"confide-anchor-sources-v1\0")
        if self._given_anchors is not None:
            h.update(b"given\0" + self._given_anchors.digest().encode())
            sources = []
        else:
            import confide

            packaged = Path(confide.__file__).parent / "attest" / "roots"
            sources = sorted(packaged.glob("*"))
            sources.append(self.home.sim_root_path)
        if self._sim_root is not None:
            sources.append(self._sim_root)
        for path in sources:
            try:
                data = path.read_bytes()
            except OSError:
                data = b"(absent)"
            h.update(f"{path.name}:{len(data)}\0".encode() + data)
        return h.hexdigest()

    # ---- parties --------------------------------------------------------------------------------
    def register(self, name: str) -> None:
        """Register this party's public keys under `name` (idempotent for the same keys)."""
        from confide.client.api_auth import sign_registration

        line = self.identity.public.to_line()
        self._parties[self.fingerprint] = (name, self.identity.public)
        self.api.call(
            "POST",
            "/v1/parties",
            {"name": name, "identity": line, "signature": sign_registration(self.identity, name)},
            signed=False,
        )

    def party(self, fingerprint: str) -> tuple[str, PublicIdentity]:
        """A party's name and public keys, fetched from the platform and checked against the full
        128-bit fingerprint (a digest of the keys, so the platform cannot substitute other keys; a
        shorter pin is refused)."""
        fingerprint = check_pin(fingerprint, where=f"party {fingerprint}")
        known = self._parties.get(fingerprint)
        if known is not None:
            return known
        info = self.api.call("GET", f"/v1/parties/{fingerprint}")
        pub = PublicIdentity.from_line(str(info.get("identity", "")), where=f"party {fingerprint}")
        if pub.fingerprint != fingerprint:
            raise IntegrityError(
                f"the platform returned keys with fingerprint {pub.fingerprint}", where=f"party {fingerprint}"
            )
        self._parties[fingerprint] = (str(info.get("name") or fingerprint), pub)
        return self._parties[fingerprint]

    # ---- the enclave service ----------------------------------------------------------------------
    def attest(self) -> ServiceKey:
        """Verify the service's evidence (fresh nonce) against our policy; pin the key it binds."""
        nonce = os.urandom(32)
        reply = self.api.call("POST", "/v1/service/evidence", {"nonce": nonce.hex()}, signed=False)
        evidence = b64d(reply.get("evidence"), field="evidence", where="platform: service evidence")
        line = reply.get("service")
        from confide.client.local import check_attestation

        att = check_attestation(
            evidence, nonce, self.policy, self.anchors, keys_line=line if isinstance(line, str) else None
        )
        if self._service is not None and att.enclave.fingerprint != self._service.fingerprint:
            raise PolicyError(
                f"the service key changed from {self._service.fingerprint} to {att.enclave.fingerprint}",
                where="service evidence",
            )
        self._service = ServiceKey(att.enclave, att.claims, int(time.time()))
        if self._attest_cache is not None:
            self._attest_cache.store(att.enclave, att.claims, nonce, self._service.attested_at)
        c = att.claims
        kind = "SIMULATED (no protection against the host)" if c.simulated else c.backend
        self.say(
            f"attested enclave service {att.enclave.fingerprint}: {kind}, measurement {c.measurement[:16]}…"
        )
        return self._service

    @property
    def service(self) -> ServiceKey:
        """The attested service key: attested on first use, or (with `cache_attestation`) taken from
        evidence verified earlier that still passes the policy now, if the platform names the same key."""
        if self._service is None:
            self._service = self._cached_service() or self.attest()
        return self._service

    def _cached_service(self) -> ServiceKey | None:
        cache = self._attest_cache
        hit = cache.load() if cache is not None else None
        if cache is None or hit is None:
            return None
        cached = hit.enclave
        try:  # the key the platform uses now (unauthenticated, cheap: no enclave call)
            now_line = self.api.call("GET", "/v1/service", signed=False).get("service")
        except ConfideError:
            now_line = None  # unreachable or refusing: the command's own next call says so
        if isinstance(now_line, str):
            try:
                current = PublicIdentity.from_line(now_line, where="GET /v1/service").fingerprint
            except ConfideError:
                current = None
            if current != cached.fingerprint:
                self.say(
                    f"the platform names service key {current}, not {cached.fingerprint} attested "
                    f"{hit.age_s} s ago: attesting again"
                )
                cache.forget()
                return None
        return ServiceKey(cached, hit.claims, hit.attested_at)

    # ---- datasets ---------------------------------------------------------------------------------
    def upload_dataset(
        self,
        path: Path,
        *,
        name: str | None = None,
        master_keys: Mapping[str, bytes] | None = None,
        key_material: Path | None = None,
        min_k: int | None = None,
    ) -> DatasetRef:
        """Encrypt a file with a fresh data key, wrap the key to the attested service (bound to the
        dataset id and our fingerprint), and upload both. Only columns and row count are visible.

        `min_k`: a standing rule sealed in the file's header (confide.enclave.cohort): the enclave
        lets only a cohort-thresholded built-in (join-aggregate, sql, describe) with a threshold of
        at least `min_k` read this dataset, whatever is approved later. It is shown in the record.

        A Parquet file with modular encryption needs its `master_keys` (id -> AES key) and, when
        parquet-mr kept it outside the file, its `key_material` file (default: the
        ``_KEY_MATERIAL_FOR_<name>.json`` beside it): they are sealed together with the file
        (confide.client.pme_dataset), after the file was opened here with them."""
        from confide.client import pme_dataset

        path = Path(path)
        policy: dict[str, Any] = {}
        if min_k is not None:
            if isinstance(min_k, bool) or not isinstance(min_k, int) or not 2 <= min_k <= 10**9:
                raise ConfideError(f"min_k must be an integer in 2..10^9, got {min_k!r}", where="min_k")
            policy = {"policy": {"min_k": min_k}}
        if master_keys is None:
            columns, rows = (
                pme_dataset.parquet_shape(path) if pme_dataset.is_parquet(path) else _csv_shape(path)
            )
            schema = {"columns": list(columns), **policy}
            return self._upload(path, name or path.stem, schema, rows, policy, "dataset")
        material_path = key_material or pme_dataset.key_material_beside(path)
        try:
            data = path.read_bytes()
            material = material_path.read_bytes() if material_path is not None else None
        except OSError as exc:
            raise ConfideError(f"cannot read {exc.filename} ({exc.strerror})", where=str(path)) from None
        bundle = pme_dataset.pack(data, dict(master_keys), material)
        columns, rows = pme_dataset.check(bundle, name=path.name)
        with _tempdir(prefix="confide-pme-") as tmp:
            packed = Path(tmp) / path.name
            packed.write_bytes(bundle)
            schema = {"columns": list(columns), "format": "parquet-pme", **policy}
            meta = {"format": "parquet-pme", **policy}
            return self._upload(packed, name or path.stem, schema, rows, meta, "dataset")

    def upload_model(self, path: Path, *, name: str | None = None, layout: str = "auto") -> DatasetRef:
        """Upload an ONNX model like a dataset (sealed here, its key wrapped to the attested service),
        checked first; its visible metadata (input and output names and shapes, parameter count,
        FLOPs, size: confide.infer.model_meta) is in the sealed header and the platform's record.
        `layout`: "inline" (sealed whole), "external" (ONNX's external-data layout, weights apart
        from the graph: what the infer built-in's split mode needs, for a model larger than the
        enclave's memory budget; every mode takes it) or "auto" (external above 64 MiB)."""
        try:
            from confide.infer.model_meta import upload_parts
        except ImportError as exc:
            raise ConfideError(
                f"uploading a model needs the inference extra ({exc.name} is missing): "
                "pip install 'confide[inference]'",
                where=str(path),
            ) from None

        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfideError(f"cannot read model ({exc.strerror})", where=str(path)) from None
        plaintext, metadata = upload_parts(data, layout=layout, where=str(path))
        schema = {"columns": [], **metadata}
        if plaintext is data:
            return self._upload(path, name or path.stem, schema, None, metadata, "model")
        with _tempdir(prefix="confide-model-") as tmp:  # the external layout, sealed from a file
            converted = Path(tmp) / path.name
            converted.write_bytes(plaintext)
            del plaintext
            return self._upload(converted, name or path.stem, schema, None, metadata, "model")

    def _upload(
        self,
        path: Path,
        name: str,
        schema: dict[str, Any],
        rows: int | None,
        metadata: dict[str, Any],
        what: str,
    ) -> DatasetRef:
        from confide.client.sealing import encrypt_stream
        from confide.enclave.sealed_file import write_atomically

        service = self.service
        dataset_id = new_dataset_id()
        data_key = os.urandom(32)  # AES-256-GCM data key
        size = _size_of(path)
        with _tempdir(prefix="confide-upload-") as tmp:
            sealed = Path(tmp) / "dataset.cnf"
            with open(path, "rb") as src, byte_progress(f"encrypting {path.name}", size) as advance:
                write_atomically(
                    sealed,
                    lambda dst: encrypt_stream(
                        src,
                        dst,
                        recipients=[self.identity.public],
                        data_key=data_key,
                        metadata={"dataset_id": dataset_id, "name": name, **metadata},
                        progress=advance,
                    ),
                )
            blob = self.api.put_blob(sealed)
        digest = str(blob["sha256"])
        envelope = wrap_dataset_key(
            data_key,
            service=service.public,
            dataset_id=dataset_id,
            owner=self.identity.public,
            ciphertext_sha256=digest,
        )
        body = {
            "dataset_id": dataset_id,
            "name": name,
            "schema": schema,
            "rows": rows,
            "ciphertext_sha256": digest,
            "key_envelope": envelope,
        }
        self.api.call("POST", "/v1/datasets", body)
        columns = tuple(schema.get("columns") or ())
        ref = DatasetRef(dataset_id, name, self.fingerprint, digest, int(blob["size"]), rows, columns)
        self.records.remember_dataset(dataset_id, ref.ref)
        shown = f"{rows} rows" if rows is not None else f"{size} bytes"
        self.say(f"uploaded {what} {name!r} ({dataset_id}): {shown}, key wrapped to the service")
        self.say(f"share this reference with task creators: {ref.ref}")
        return ref

    def dataset(self, dataset: str) -> DatasetRef:
        """A dataset's record on the platform, by reference (``cds1:...``: the record must agree
        with it) or by bare id (unchecked: for display only)."""
        pin = parse_ref(dataset) if dataset.startswith(f"{REF_PREFIX}:") else None
        dataset_id = pin.dataset_id if pin else dataset
        d = self.api.call("GET", f"/v1/datasets/{dataset_id}")
        schema = d.get("schema") or {}
        got = DatasetRef(
            str(d.get("dataset_id")),
            str(d.get("name")),
            str(d.get("owner")),
            str(d.get("ciphertext_sha256")),
            int(d.get("size") or 0),
            d.get("rows"),
            tuple(schema.get("columns") or ()),
        )
        if pin is not None:
            _check_pin(got, pin)
        return got

    def _dataset_pin(self, value: str, where: str) -> DatasetPin:
        """The reference an input names: a ``cds1:`` reference, or a bare id this home uploaded."""
        if isinstance(value, str) and is_bare_id(value):
            known = self.records.dataset_ref(value)
            if known is None:
                raise PolicyError(
                    f"{value} is a bare dataset id, which lets the platform substitute another "
                    "dataset: use the owner's reference (cds1:<id>:<owner>:<ciphertext>, printed "
                    "by their upload)",
                    where=where,
                )
            value = known
        return parse_ref(value, where=where)

    # ---- functions --------------------------------------------------------------------------------
    def register_function(
        self,
        source: str,
        *,
        name: str,
        outputs: Sequence[str],
        version: str = "1",
        description: str = "",
        requirements: Sequence[str] = (),
        inputs: Sequence[str] = ("*",),
        confidential: bool = False,
    ) -> str:
        """Register a `run(ctx)` function; returns its digest. With `confidential`, the source is
        sealed to the attested service: neither the platform nor the data owners can read it."""
        descriptor = mf.function_descriptor(
            name=name,
            version=version,
            owner=self.identity.public,
            source=source,
            requirements=list(requirements),
            description=description,
            inputs=list(inputs),
            outputs=list(outputs),
        )
        digest = descriptor.digest
        body: dict[str, Any] = {"descriptor": descriptor.to_json()}
        if confidential:
            sealed = seal_function_source(source, descriptor=descriptor, service=self.service.public)
            body["sealed_source"] = b64e(sealed)
        else:
            body["source"] = source
        self.api.call("POST", "/v1/functions", body)
        kind = "confidential" if confidential else "clear"
        self.say(f"registered function {name!r} v{version} ({kind}): {digest[:16]}…")
        return digest

    def function(self, ref: str) -> tuple[mf.FunctionDescriptor, bool]:
        """(descriptor, confidential) of a built-in by name or a registered function by digest."""
        if ref in mf.BUILTINS:
            return mf.builtin_descriptor(ref), False
        info = self.api.call("GET", f"/v1/functions/{ref}")
        descriptor = mf.parse_function_descriptor(info.get("descriptor") or {})
        if descriptor.digest != ref:
            raise IntegrityError(
                "the platform returned a function whose digest differs", where=f"function {ref}"
            )
        return descriptor, bool(info.get("confidential"))

    # ---- tasks ------------------------------------------------------------------------------------
    def create_task(
        self,
        *,
        function: str,
        inputs: Mapping[str, str],
        outputs: Mapping[str, Sequence[str]],
        params: Mapping[str, Any] | None = None,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT,
        max_output: Mapping[str, int] | None = None,
        max_runs: int = mf.DEFAULT_MAX_RUNS,
        pad: Mapping[str, str | int] | None = None,
        error_max_bytes: int | None = None,
    ) -> str:
        """Build and submit a task manifest, record its digest in this home and sign the creator's
        approval of it (the enclave runs only manifests their creator approved, at most `max_runs`
        times per worker); returns the task id.

        `function`: a built-in name or a registered function's digest. `inputs`: input name →
        dataset reference (``cds1:...``, as the owner's upload printed; a bare id only for a dataset
        uploaded from this home). `outputs`: output name → recipient fingerprints (full 128 bits).
        `max_output`: output name → byte cap written in the manifest (default `max_output_bytes`).
        `pad`: output name → ``"pow2"`` or a bucket size in bytes: the enclave pads that output so the
        host sees only the bucket. `error_max_bytes`: the cap on the function's sealed error text
        (default 4 KiB); approvers see both."""
        caps = dict(max_output or {})
        pads = dict(pad or {})
        for what, given in (("max_output", caps), ("pad", pads)):
            unknown = sorted(set(given) - set(outputs))
            if unknown:
                raise ConfideError(f"no output named {', '.join(map(repr, unknown))}", where=what)
        descriptor, confidential = self.function(function)
        service = self.service
        pins = {n: self._dataset_pin(d, f"input {n!r}") for n, d in inputs.items()}
        for pin in pins.values():
            self.dataset(str(pin))  # the platform's record must agree with the reference
        outputs = {
            n: [check_pin(r, where=f"recipient of output {n!r}") for r in rs] for n, rs in outputs.items()
        }
        fps = {self.fingerprint, *(p.owner for p in pins.values())}
        for recips in outputs.values():
            fps.update(recips)
        if descriptor.owner:
            fps.add(descriptor.owner)
        participants = dict(self.party(fp) for fp in sorted(fps))
        if len(participants) != len(fps):
            raise ConfideError("two participants are registered under the same name", where="create task")
        manifest = build_manifest(
            service=service.public,
            creator=self.identity.public,
            function=descriptor,
            confidential=confidential,
            params=dict(params or {}),
            inputs=[(n, p.dataset_id, p.owner, p.ciphertext_sha256) for n, p in pins.items()],
            outputs=[
                mf.TaskOutput(n, tuple(rs), caps.get(n, max_output_bytes), pads.get(n))
                for n, rs in outputs.items()
            ],
            participants=participants,
            error_max_bytes=error_max_bytes,
        )
        task_id = manifest.task_id
        self.records.remember_manifest(self.fingerprint, task_id, manifest.digest, "created")
        approval = sign_approval(self.identity, manifest, max_runs=max_runs)
        self.api.call("POST", "/v1/tasks", {"manifest": manifest.to_json(), "approval": approval})
        self.records.remember_manifest(self.fingerprint, task_id, manifest.digest, "approved", max_runs)
        self.say(f"created task {task_id} ({descriptor.name}), manifest {manifest.digest}")
        return task_id

    def task(self, task_id: str, *, audit_from: int | None = None) -> dict[str, Any]:
        """The task as the platform shows it; with `audit_from`, also its audit head and links from
        that event on (what `check_receipt_audit` needs, in the same call)."""
        query = f"?audit_from={audit_from}" if audit_from is not None else ""
        return dict(self.api.call("GET", f"/v1/tasks/{task_id}{query}"))

    def manifest(self, task_id: str) -> mf.Manifest:
        """The task's manifest, parsed and checked as the enclave will check it."""
        info = self.task(task_id)
        manifest = mf.parse_manifest(canonical_json(info["manifest"]), where=f"task {task_id}")
        if manifest.task_id != task_id:
            raise IntegrityError(
                f"platform returned the manifest of task {manifest.task_id}", where=f"task {task_id}"
            )
        return manifest

    def describe(self, task_id: str) -> str:
        from confide.client.approval import describe_manifest

        return describe_manifest(self.manifest(task_id))

    def approve(
        self, task_id: str, *, expect_digest: str | None = None, max_runs: int = mf.DEFAULT_MAX_RUNS
    ) -> str:
        """Sign our approval of the task's manifest, for at most `max_runs` runs (counted by each
        enclave worker). With `expect_digest`, refuse unless the manifest is exactly the one reviewed
        (protects against a manifest swapped between review and signing); a manifest other than one
        this party created or approved before under the same task id is refused. The digest is
        recorded in this home: results are accepted only for it. Returns the manifest digest."""
        manifest = self.manifest(task_id)
        if expect_digest is not None and manifest.digest != expect_digest:
            raise PolicyError(
                f"manifest digest is {manifest.digest}, not the reviewed {expect_digest}",
                where=f"task {task_id}",
            )
        known = self.records.manifest(self.fingerprint, task_id)
        if known is not None and known.manifest_sha256 != manifest.digest:
            raise IntegrityError(
                f"the platform shows manifest {manifest.digest}, but this party {known.role} "
                f"manifest {known.manifest_sha256} of this task",
                where=f"task {task_id}",
            )
        if manifest.service != self.service.fingerprint:
            raise PolicyError(
                f"task is for service {manifest.service}, not the attested {self.service.fingerprint}",
                where=f"task {task_id}",
            )
        approval = sign_approval(self.identity, manifest, max_runs=max_runs)
        self.records.remember_manifest(self.fingerprint, task_id, manifest.digest, "approved", max_runs)
        self.api.call("POST", f"/v1/tasks/{task_id}/approvals", {"approval": approval})
        self.say(f"approved task {task_id} (manifest {manifest.digest[:16]}…, at most {max_runs} run(s))")
        return manifest.digest

    def run(self, task_id: str) -> None:
        self.api.call("POST", f"/v1/tasks/{task_id}/run", {})

    def reject_task(self, task_id: str, *, reason: str | None = None) -> dict[str, Any]:
        """Refuse a task we are named in (e.g. one naming our dataset that we never asked for): it
        can no longer run, our approval (if any) is withdrawn, and its participants get no access
        to our datasets' ciphertext through it. Final. Returns the task as the platform now shows it."""
        body = {"reason": reason} if reason is not None else {}
        info = dict(self.api.call("POST", f"/v1/tasks/{task_id}/reject", body))
        self.say(f"rejected task {task_id}" + (f": {reason}" if reason else ""))
        return info

    def wait(
        self,
        task_id: str,
        *,
        timeout: float = 600.0,
        on_state: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Follow the task until it succeeds or fails (long polls: the platform answers as soon as
        the state changes); `on_state` sees every state it passes through."""
        deadline = time.monotonic() + timeout
        info = self._retrying(lambda: self.task(task_id), deadline, where=f"task {task_id}")
        seen: tuple[Any, Any] | None = None
        while True:
            if on_state is not None and (info.get("state"), info.get("attempts")) != seen:
                seen = (info.get("state"), info.get("attempts"))
                on_state(info)
            state = str(info.get("state"))
            if state in TERMINAL_STATES:
                return info
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ConfideError(f"task still {state} after {timeout:.0f} s", where=f"task {task_id}")
            wait = min(LONG_POLL_S, max(remaining, 0.1))
            path = f"/v1/tasks/{task_id}?wait={wait:.1f}&state={state}"
            info = self._retrying(partial(self._get, path), deadline, where=f"task {task_id}")

    def _get(self, path: str) -> dict[str, Any]:
        return dict(self.api.call("GET", path))

    def _retrying(self, call: Callable[[], dict[str, Any]], deadline: float, *, where: str) -> dict[str, Any]:
        """`call`, again with backoff while the platform is unreachable or unavailable (a restart, a
        503) until `deadline`; said once when it goes away and once when it is back."""
        delays = iter(RETRY_BACKOFF_S)
        delay = 0.0
        lost = False
        while True:
            try:
                result = call()
            except (Unreachable, ApiError) as exc:
                if isinstance(exc, ApiError) and exc.status not in RETRY_STATUSES:
                    raise
                delay = next(delays, RETRY_BACKOFF_S[-1])
                if time.monotonic() + delay > deadline:
                    raise
                if not lost:
                    self.say(f"platform unavailable ({exc.message}); retrying until it is back")
                    lost = True
                time.sleep(delay)
                continue
            if lost:
                self.say(f"platform is back; following {where}")
            return result

    def expected_manifest(self, task_id: str, expect_manifest: str | None = None) -> str:
        """The manifest digest this party accepts results of: `expect_manifest` (for scripts that
        run where the task was not created or approved), else the one this home recorded when the
        party created or approved the task; refused when neither is known or they differ."""
        where = f"task {task_id}"
        known = self.records.manifest(self.fingerprint, task_id)
        if expect_manifest is not None:
            expect = expect_manifest.strip().lower()
            if not mf.HEX64_RE.fullmatch(expect):
                raise PolicyError(f"expected manifest {expect_manifest[:80]!r} is not a SHA-256", where=where)
            if known is not None and known.manifest_sha256 != expect:
                raise PolicyError(
                    f"expected manifest {expect}, but this party {known.role} manifest "
                    f"{known.manifest_sha256} of this task",
                    where=where,
                )
            return expect
        if known is None:
            raise PolicyError(
                f"this party neither created nor approved task {task_id} from this home "
                f"({self.records.path}): review it and pass expect_manifest=DIGEST (CLI --expect-manifest)",
                where=where,
            )
        return known.manifest_sha256

    def receipt(
        self, task_id: str, info: dict[str, Any] | None = None, *, expect_manifest: str | None = None
    ) -> dict[str, Any]:
        """The task's latest receipt: the service signature checked, and its manifest the one this
        party created or approved (or `expect_manifest`); a successful run must lie within the run
        limit this party approved, and must not contradict a receipt seen before for the same run."""
        where = f"receipt of task {task_id}"
        expected = self.expected_manifest(task_id, expect_manifest)
        info = info or self.task(task_id)
        raw = info.get("receipt")
        if not raw:
            raise ConfideError("task has no receipt yet", where=f"task {task_id}")
        data = b64d(raw, field="receipt", where=f"task {task_id}")
        body = verify_task_receipt(data, self.service.public, where=where)
        if body.get("task_id") != task_id:
            raise IntegrityError(f"receipt is for task {body.get('task_id')!r}", where=where)
        if body.get("manifest_sha256") != expected:
            raise IntegrityError(
                f"receipt is for manifest {body.get('manifest_sha256')}, not manifest {expected} that "
                "this party created or approved (the platform ran another manifest under this task id)",
                where=where,
            )
        manifest = mf.parse_manifest(canonical_json(info["manifest"]), where=f"task {task_id}")
        if manifest.digest != expected:
            raise IntegrityError(
                f"the platform shows manifest {manifest.digest}, not manifest {expected} that this "
                "party created or approved",
                where=f"task {task_id}",
            )
        if body["status"] == "ok":
            known = self.records.manifest(self.fingerprint, task_id)
            limit = known.max_runs if known is not None else None
            if limit is not None and (body["run"] > limit or body["max_runs"] > limit):
                raise IntegrityError(
                    f"receipt of run {body['run']} (limit {body['max_runs']}) exceeds the {limit} "
                    "run(s) this party approved",
                    where=where,
                )
            self.records.check_receipt(
                self.fingerprint,
                task_id,
                str(body["evidence_sha256"]),
                int(body["run"]),
                hashlib.sha256(data).hexdigest(),
            )
        return body

    def error_report(
        self, task_id: str, info: dict[str, Any] | None = None, *, expect_manifest: str | None = None
    ) -> str | None:
        """The failed function's own error text (its traceback), sealed by the enclave to the task's
        creator and output recipients as the `_error` output: fetched, checked against the signed
        receipt, decrypted here. None when the task did not fail in its function (or has no receipt
        yet); an error when it did but the report is not addressed to us."""
        info = info or self.task(task_id)
        if not info.get("receipt"):
            return None
        body = self.receipt(task_id, info, expect_manifest=expect_manifest)
        entry = next((o for o in body.get("outputs", []) if o.get("name") == mf.ERROR_OUTPUT), None)
        if body.get("status") == "ok" or entry is None:
            return None
        manifest = mf.parse_manifest(canonical_json(info["manifest"]), where=f"task {task_id}")
        if self.fingerprint not in manifest.error_recipients():
            raise ConfideError(
                "the function's error text is sealed to the task's creator and output recipients only",
                where=f"task {task_id}",
            )
        with _tempdir(prefix="confide-error-") as tmp:
            path = self._fetch_output(str(entry["sha256"]), Path(tmp) / "error.txt")
            return path.read_text(encoding="utf-8", errors="replace")

    def results(self, task_id: str, out_dir: Path, *, expect_manifest: str | None = None) -> TaskResult:
        """Download the outputs addressed to us, check each against the signed receipt, decrypt.
        Only results of the manifest this party created or approved (or `expect_manifest`)."""
        pinned = self._audit_verifier().pinned_seq()
        info = self.task(task_id, audit_from=pinned)
        body = self.receipt(task_id, info, expect_manifest=expect_manifest)
        if body.get("status") != "ok":
            err = body.get("error") or {}
            raise ConfideError(
                f"task failed in the enclave ({err.get('check', '?')}): {err.get('message', '')}",
                where=f"task {task_id}",
            )
        manifest = mf.parse_manifest(canonical_json(info["manifest"]), where=f"task {task_id}")
        mine = {o.name for o in manifest.outputs if self.fingerprint in o.recipients}
        out_dir = Path(out_dir)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfideError(
                f"cannot create the output directory ({exc.strerror or exc})", where=str(out_dir)
            ) from None
        self.check_receipt_audit(task_id, body, prefetched=info.get("audit"))
        written: dict[str, Path] = {}
        for out in body.get("outputs", []):
            name = str(out["name"])
            if name not in mine:
                continue
            padded = manifest.output(name).pad is not None
            written[name] = self._fetch_output(str(out["sha256"]), out_dir / name, padded=padded)
        self.say(f"task {task_id}: {len(written)} output(s) verified against the receipt and decrypted")
        return TaskResult(task_id, str(info.get("state")), body, written)

    def _fetch_output(self, sha256: str, dst: Path, *, padded: bool = False) -> Path:
        """Download, decrypt; strip the enclave's size padding when the sealed header (authenticated
        under the data key) says it is padded. `padded`: the manifest says it must be."""
        from confide.client.sealing import open_reader
        from confide.enclave.padding import PAD_FORMAT, unpad_file
        from confide.enclave.sealed_file import write_atomically

        with _tempdir(prefix="confide-fetch-") as tmp:
            sealed = Path(tmp) / "output.cnf"
            with open(sealed, "wb") as fh:
                self.api.get_blob(sha256, fh)
            fh2, reader = open_reader(sealed)
            with fh2:
                reader.unlock(identity=self.identity)
                is_padded = reader.header.metadata.get("pad") == PAD_FORMAT
                if padded and not is_padded:
                    raise IntegrityError(
                        "output approved with padding is not padded", where=f"output {dst.name}"
                    )
                with byte_progress(f"decrypting {dst.name}", reader.plaintext_size) as advance:
                    write_atomically(dst, lambda out: reader.decrypt_to(out, advance))
            if is_padded:
                try:
                    unpad_file(dst, where=f"output {dst.name}")
                except BaseException:
                    dst.unlink(missing_ok=True)
                    raise
        return dst

    # ---- audit ------------------------------------------------------------------------------------
    def audit(self, task_id: str | None = None) -> list[dict[str, Any]]:
        """Audit events we may see, each checked to be in the platform's one chain, and that chain
        to extend what this party verified before (pinned in $CONFIDE_HOME/audit-pins.json): a
        removed or altered event, or a truncated log, raises `AuditRewritten` naming the event."""
        path = f"/v1/tasks/{task_id}/audit" if task_id else "/v1/audit"
        pinned = self._audit_verifier().pinned_seq()
        query = "?chain=true" + (f"&audit_from={pinned}" if pinned is not None else "")
        reply = self.api.call("GET", path + query)  # the events, with the head and links to check them
        events = list(reply.get("events", []))
        given = reply.get("audit") if isinstance(reply.get("audit"), Mapping) else {}
        head, links = given.get("head"), given.get("links")
        if not isinstance(head, Mapping) or not isinstance(links, list):
            head, links = self.api.call("GET", "/v1/audit/head"), []
        self._audit_verifier(prefetched=(head, links)).verify(events, head, where=path)
        return events

    def check_receipt_audit(self, task_id: str, body: Mapping[str, Any], *, prefetched: Any = None) -> None:
        """The audit head the enclave signed in this receipt must be in the platform's chain (and
        stays pinned): a chain without it proves the platform rewrote its log. `prefetched`: the
        head and links the platform sent with the task view (checked exactly like fetched ones)."""
        signed = body.get("audit_head")
        if signed is None:
            raise IntegrityError(
                "the receipt signs no audit head (the host passed none to the enclave)",
                where=f"receipt of task {task_id}",
            )
        given = prefetched if isinstance(prefetched, Mapping) else None
        head = given.get("head") if given is not None else None
        links = given.get("links") if given is not None else None
        if not isinstance(head, Mapping) or not isinstance(links, list):
            head, links = self.api.call("GET", "/v1/audit/head"), []
        self._audit_verifier(prefetched=(head, links)).verify(
            [], head, receipts=[(task_id, signed)], where=f"receipt of task {task_id}"
        )

    def _audit_verifier(self, *, prefetched: tuple[Any, Sequence[Any]] | None = None) -> AuditVerifier:
        home = getattr(self, "home", None)
        root = (
            Path(home.root)
            if home is not None
            else Path(os.environ.get("CONFIDE_HOME") or "~/.confide").expanduser()
        )
        store = PinStore(root / "audit-pins.json")

        given_head, given_links = prefetched if prefetched is not None else (None, ())
        have = {x["seq"]: x for x in given_links if isinstance(x, Mapping) and isinstance(x.get("seq"), int)}

        def fetch(first: int, last: int) -> Mapping[str, Any]:
            if have and all(s in have for s in range(first, last + 1)):  # sent with the task view
                return {"links": [have[s] for s in range(first, last + 1)], "head": given_head}
            return dict(self.api.call("GET", f"/v1/audit/links?first={first}&last={last}"))

        return AuditVerifier(store, self.service.fingerprint, fetch)

    # ---- the everyday verbs: directories, names, lists, cancel, withdraw, delete ----------------------
    def whoami(self) -> dict[str, Any]:
        """This party as the platform knows it: fingerprint and registered name."""
        info = self.api.call("GET", f"/v1/parties/{self.fingerprint}")
        return {"fingerprint": self.fingerprint, "name": info.get("name")}

    def rename(self, name: str) -> dict[str, Any]:
        """Change this party's display name (a signed call). Manifests already written keep the
        name they were written with; every manifest pins fingerprints, not names."""
        from confide.client.api_auth import check_party_name
        from confide.enclave.task_fields import party_name

        check_party_name(name)
        party_name(name, "name")
        reply = dict(self.api.call("PATCH", f"/v1/parties/{self.fingerprint}", {"name": name}))
        self._parties.pop(self.fingerprint, None)
        return reply

    def parties(self, name: str | None = None) -> list[dict[str, Any]]:
        """Registered parties (fingerprint, name), optionally only those with exactly this name."""
        from urllib.parse import quote

        path = "/v1/parties" + (f"?name={quote(name, safe='')}" if name is not None else "")
        return [dict(p) for p in self.api.call("GET", path).get("parties", [])]

    def party_names(self) -> dict[str, str]:
        """fingerprint -> registered name, for showing names beside fingerprints."""
        return {str(p["fingerprint"]): str(p.get("name") or "") for p in self.parties()}

    def resolve_party(self, ref: str, *, where: str = "recipient") -> str:
        """A fingerprint from a fingerprint, a `.pub` file (or public line), or a registered party
        name. A name several parties registered is an error listing them (names are not unique)."""
        from confide.enclave.keys import FINGERPRINT_RE, PUBLIC_PREFIX, load_public

        ref = ref.strip()
        if FINGERPRINT_RE.fullmatch(ref):
            return ref
        if ref.startswith(PUBLIC_PREFIX) or ref.endswith(".pub") or os.sep in ref:
            public = load_public(ref)
            self.party(public.fingerprint)  # registered (keys checked against the fingerprint)
            return public.fingerprint
        found = self.parties(name=ref)
        if not found:
            folded = [p for p in self.parties() if str(p.get("name", "")).casefold() == ref.casefold()]
            found = folded
        if not found:
            raise ConfideError(
                f"no party named {ref!r} (see `confide party list`; or give a fingerprint or .pub file)",
                where=where,
            )
        if len(found) > 1:
            listed = ", ".join(f"{p['name']} {p['fingerprint']}" for p in found)
            raise ConfideError(
                f"{len(found)} parties are named {ref!r}: {listed}; give the fingerprint or .pub file",
                where=where,
            )
        return str(found[0]["fingerprint"])

    def datasets(self) -> list[dict[str, Any]]:
        """Datasets you own or that tasks you take part in read (metadata only)."""
        out = []
        for d in self.api.call("GET", "/v1/datasets").get("datasets", []):
            d = dict(d)
            d.pop("key_envelope", None)
            out.append(d)
        return out

    def delete_dataset(self, dataset_id: str) -> dict[str, Any]:
        """Remove your dataset: its row and key envelope, and its ciphertext from the blob store.
        Outputs of tasks that already read it are not recalled; see `confide dataset delete --help`."""
        if dataset_id.startswith(f"{REF_PREFIX}:"):
            dataset_id = parse_ref(dataset_id, where="dataset").dataset_id
        return dict(self.api.call("DELETE", f"/v1/datasets/{dataset_id}"))

    def functions(self) -> list[dict[str, Any]]:
        """Built-ins, functions you own or registered, and those of tasks you take part in."""
        return [dict(f) for f in self.api.call("GET", "/v1/functions").get("functions", [])]

    def resolve_function(self, ref: str, *, own: bool = True, where: str = "--function") -> str:
        """A built-in name or a digest from `NAME[@VERSION]`, a built-in name or a digest. With
        `own`, names are looked up among your own functions only (another party could register a
        function under any name). Several matches are an error listing them."""
        from confide.enclave.task_fields import HEX64_RE

        ref = ref.strip()
        if ref in mf.BUILTINS or HEX64_RE.fullmatch(ref):
            return ref
        name, _, version = ref.partition("@")
        candidates = [
            f
            for f in self.functions()
            if f.get("kind") != "builtin"
            and f.get("name") == name
            and (not version or f.get("version") == version)
            and (not own or f.get("owner") == self.fingerprint)
        ]
        if not candidates:
            whose = "of yours " if own else ""
            raise ConfideError(
                f"no function {whose}named {ref!r} (see `confide function list`; or give its digest)",
                where=where,
            )
        if len(candidates) > 1:
            listed = ", ".join(f"{f['name']}@{f['version']} {f['digest']}" for f in candidates)
            raise ConfideError(
                f"{len(candidates)} functions match {ref!r}: {listed}; add @VERSION or give the digest",
                where=where,
            )
        return str(candidates[0]["digest"])

    def function_source(self, ref: str) -> tuple[mf.FunctionDescriptor, bool, str | None]:
        """(descriptor, confidential, source): the source only of a clear function, checked against
        the digest its descriptor pins (the platform cannot show other code than the task runs)."""
        if ref in mf.BUILTINS:
            return mf.builtin_descriptor(ref), False, mf.builtin_source(ref)
        info = self.api.call("GET", f"/v1/functions/{ref}")
        descriptor = mf.parse_function_descriptor(info.get("descriptor") or {})
        if descriptor.digest != ref:
            raise IntegrityError(
                "the platform returned a function whose digest differs", where=f"function {ref}"
            )
        if info.get("confidential"):
            return descriptor, True, None
        source = info.get("source")
        if not isinstance(source, str):
            raise IntegrityError(
                "the platform returned no source for a clear function", where=f"function {ref}"
            )
        if descriptor.kind == "builtin":
            source = mf.builtin_source(descriptor.name)  # ours: the enclave runs its own copy
        mf.check_function_source(descriptor, source)
        return descriptor, False, source

    def tasks(self, *, pending: bool = False) -> list[dict[str, Any]]:
        """Tasks you take part in; with `pending`, those waiting for your approval."""
        path = "/v1/approvals/pending" if pending else "/v1/tasks"
        return [dict(t) for t in self.api.call("GET", path).get("tasks", [])]

    def cancel(self, task_id: str) -> dict[str, Any]:
        """As the task's creator, cancel a task not yet running or done: the platform never queues
        or claims it again. A hostile platform still holds the approvals; withdraw those to have the
        enclave itself refuse."""
        return dict(self.api.call("POST", f"/v1/tasks/{task_id}/cancel", {}))

    def withdraw(self, task_id: str) -> dict[str, Any]:
        """Delete your approval of a task that has not run: the enclave, which checks every
        required approval, then refuses it. It cannot undo a run that already happened, and a
        hostile platform could have kept a copy of the signed approval."""
        return dict(self.api.call("DELETE", f"/v1/tasks/{task_id}/approvals"))


def _check_pin(got: DatasetRef, pin: DatasetPin) -> None:
    """The platform's record of a dataset must be the one the reference names."""
    for field in ("dataset_id", "owner", "ciphertext_sha256"):
        if getattr(got, field) != getattr(pin, field):
            raise IntegrityError(
                f"the platform returned a dataset with {field} {getattr(got, field)}, not the "
                f"{getattr(pin, field)} of reference {pin} (another dataset substituted)",
                where=f"dataset {pin.dataset_id}",
            )


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise ConfideError(f"cannot read dataset ({exc.strerror})", where=str(path)) from None


def _csv_shape(path: Path) -> tuple[tuple[str, ...], int | None]:
    """Header columns and row count of a CSV (the metadata a data owner chooses to reveal);
    ((), None) for a file that is not a CSV."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            head = fh.readline()
            if "," not in head:
                return (), None
            import csv
            import io

            columns = tuple(next(csv.reader(io.StringIO(head))))
            rows = sum(1 for line in fh if line.strip())
            return columns, rows
    except UnicodeDecodeError:
        return (), None
    except OSError as exc:
        raise ConfideError(f"cannot read dataset ({exc.strerror})", where=str(path)) from None


def _tempdir(prefix: str) -> Any:
    import tempfile  # here: ~8 ms of every command's start-up, and most commands need none

    return tempfile.TemporaryDirectory(prefix=prefix)
