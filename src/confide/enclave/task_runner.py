"""The multi-party ``task`` call (PROTOCOL.md sections 5-6): consent enforced in the enclave.

Before any dataset key is unwrapped, in this order (each failure ends the call with a receipt
signed by the service key, ``status: error`` and ``error.check`` naming the step):

1. ``manifest``  the manifest parses (names, sizes, participants, function digest);
2. ``approval``  every approval passed is by a participant, over this manifest's digest and task
                 id, and its signature verifies under the key recomputed from the manifest;
3. ``manifest``  the manifest is for this service;
4. ``function``  the source is the built-in of this build, or clear source, or sealed source opened
                 with the service key, and it hashes to the descriptor's ``source_sha256``;
5. ``input``     one key envelope and one file per input; each envelope is for this service and
                 names the manifest's dataset, owner and ciphertext (``output``: one path per output);
6. ``approval``  an approval by the task's creator (they vouch for the manifest they built), by
                 the owner of each input (the owner bound in its envelope) and by the function's
                 owner, if it has one;
7. ``input``     each blob's SHA-256 is the approved one; only then the data keys are unwrapped;
8. ``cohort``    an input whose owner sealed a ``min_k`` in its header (cohort.py) is read only by
                 a built-in whose cohort threshold is at least that (the strictest input wins);
9. ``runs``      this worker counts the run (sealed, run_ledger) and refuses it past the smallest
                 ``max_runs`` of the approvals; the receipt carries ``run`` and ``max_runs``;
10. ``privacy``  a built-in with ``params.dp`` (dp_params): its epsilon is charged to each input
                 dataset's budget (sealed, privacy_budget), refused when one would pass the total its
                 owner approved in the manifest.

Then each input is decrypted into a sealed memfd while its bytes are hashed again (a blob swapped
after step 7 is caught; the model of an ``infer`` task in mode ``split`` is hashed again with a
digest kept per chunk, and only its graph decrypted: model_stream.py serves its weights to the
child chunk by chunk), the function runs in the sandbox, and the outputs, sealed to exactly the
manifest's recipients, are published under the host's paths only on success. A failed function
gives an ``ok: false`` receipt with the sandbox's category; its own error text is sealed to the
creator and every recipient as the ``_error`` output, if the host gave a path for it, cut to the
manifest's ``error_max_bytes`` (default 4 KiB) and padded to exactly that size. An output approved
with ``pad`` is padded to its bucket before sealing (the receipt's ``size`` is the bucket). The
receipt signs the audit head the host passed (``audit_head``), or null when it passed none.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import cohort
from .accelerator_link import AcceleratorLink, needs_accelerator
from .backend import TeeBackend
from .config import EnclaveConfig
from .dp_params import DP_BUILTINS, parse_dp
from .encoding import b64d, b64e
from .errors import ConfideError, EnclaveError, FormatError, IntegrityError
from .keys import Identity
from .manifest import (
    ERROR_OUTPUT,
    DatasetKeyEnvelope,
    Manifest,
    builtin_descriptor,
    builtin_source,
    check_dataset_key,
    check_function_source,
    make_task_receipt,
    open_dataset_key,
    open_function_source,
    parse_approval,
    parse_audit_head,
    parse_dataset_key,
    parse_manifest,
    verify_approval,
)
from .memory import MemoryBudget
from .model_layout import parse_layout
from .model_stream import PinnedModel, WeightServer
from .pipeline import (
    ENCLAVE_PARAM,
    MIN_WORKING_MEMORY,
    OutputFile,
    input_metadata,
    input_sha256,
    open_input,
    run_sandboxed,
    write_error_output,
)
from .privacy_budget import PrivacyBudget
from .run_ledger import RunLedger
from .sandbox import SandboxLimits, Zygote, make_input_memfd
from .service import ServiceState


class TaskRefused(EnclaveError):
    """A check failed: the task does not run, and the receipt names the check."""

    def __init__(self, check: str, message: str) -> None:
        super().__init__(message)
        self.check = check


@contextmanager
def _step(check: str) -> Iterator[None]:
    """Any Confide error inside the block fails the task with this check's name."""
    try:
        yield
    except TaskRefused:
        raise
    except ConfideError as exc:
        raise TaskRefused(check, str(exc)) from None


def _input_where(m: Manifest, name: str) -> str:
    inp = m.input(name)
    return f"input {name!r} (dataset {inp.dataset_id} of {m.name_of(inp.owner)})"


class TaskRunner:
    def __init__(
        self,
        *,
        backend: TeeBackend,
        service: ServiceState,
        zygote: Zygote,
        budget: MemoryBudget,
        config: EnclaveConfig,
        accelerator: AcceleratorLink | None = None,
    ) -> None:
        self.backend = backend
        self.accelerator = accelerator  # the host's accelerator, if it offers one (accelerator_link)
        self.service = service
        self.zygote = zygote
        self.budget = budget
        self.config = config
        self._audit_head: dict[str, Any] | None = None
        self.ledger = RunLedger(backend, service.path.parent)  # the worker's state directory
        self.privacy = PrivacyBudget(backend, service.path.parent)
        self._run = 0  # this call's run number (0 until counted) and the approvals' limit
        self._max_runs = 0
        self._flow_jobs: dict[str, Any] = {}  # flow tasks started on the host's engine (flow_finish)

    def run(self, args: dict[str, Any]) -> dict[str, Any]:
        service = self.service.require()  # without a service key there is nobody to sign a receipt
        started = int(time.time())
        manifest: Manifest | None = None
        self._run = self._max_runs = 0
        # the platform's audit head as the host states it: signed into the receipt, so a chain the
        # platform later shows without this event proves a rewrite (PROTOCOL.md section 7)
        head = args.get("audit_head")
        self._audit_head = None if head is None else parse_audit_head(head, "task call: audit_head")
        try:
            with _step("manifest"):
                manifest = parse_manifest(args["manifest"])
                if "flow_agents" in args and not _is_flow(manifest):
                    raise FormatError(
                        "the host passed flow_agents for a task that is not a dataflow job", where="task call"
                    )
            source, keys = self._check(manifest, args, service)
            return self._execute(manifest, source, keys, args, service, started)
        except TaskRefused as exc:
            receipt = self._receipt(
                service,
                manifest,
                args["manifest"],
                started,
                outputs=[],
                error={"check": exc.check, "message": exc.message},
            )
            return {"ok": False, "category": "refused", "receipt": b64e(receipt), "outputs": {}}

    # -- checks before any key is unwrapped -------------------------------------------------------
    def _check(self, m: Manifest, args: dict[str, Any], service: Identity) -> tuple[str, dict[str, bytes]]:
        task = f"task {m.task_id}"
        with _step("approval"):
            approved: set[str] = set()
            limits: list[int] = []
            for i, raw in enumerate(args["approvals"]):
                a = verify_approval(parse_approval(raw, where=f"approval #{i + 1}"), m)
                approved.add(a.party)
                limits.append(a.max_runs)
            self._max_runs = min(limits, default=0)
        with _step("manifest"):
            if m.service != service.fingerprint:
                raise IntegrityError(
                    f"manifest is for service {m.service}, not this service {service.fingerprint}",
                    where=f"manifest of {task}",
                )
        with _step("function"):
            source = self._function_source(m, args.get("function_source"), service)
        with _step("input"):
            envelopes = self._envelopes(m, args, service)
        with _step("output"):
            names = {o.name for o in m.outputs}
            given = set(args["outputs"]) - {ERROR_OUTPUT}
            if given != names:
                raise FormatError(
                    f"host's outputs {sorted(given)} differ from the manifest's {sorted(names)}", where=task
                )
        with _step("approval"):
            if m.creator not in approved:
                raise IntegrityError(
                    f"no approval by {m.name_of(m.creator)}, the creator of the task: the enclave runs "
                    "only a manifest its creator signed",
                    where=task,
                )
            for inp in m.inputs:
                owner = envelopes[inp.name].owner  # == the manifest's owner (checked above)
                if owner not in approved:
                    raise IntegrityError(
                        f"no approval by {m.name_of(owner)}, the owner of input {inp.name!r} "
                        f"(dataset {inp.dataset_id})",
                        where=task,
                    )
            fn = m.function
            if fn.owner and fn.owner not in approved:
                raise IntegrityError(
                    f"no approval by {m.name_of(fn.owner)}, the owner of function {fn.name!r}", where=task
                )
        with _step("input"):
            for inp in m.inputs:
                where = _input_where(m, inp.name)
                got = input_sha256(args["inputs"][inp.name], where=where)
                if got != inp.ciphertext_sha256:
                    raise IntegrityError(
                        f"ciphertext has SHA-256 {got}, not the approved {inp.ciphertext_sha256} "
                        "(corrupted or swapped blob)",
                        where=where,
                    )
            keys = {
                inp.name: open_dataset_key(
                    envelopes[inp.name],
                    service,
                    expect=inp,
                    where=f"key envelope of {_input_where(m, inp.name)}",
                )
                for inp in m.inputs
            }
        return source, keys

    def _function_source(self, m: Manifest, given: Any, service: Identity) -> str:
        fn = m.function
        where = f"function {fn.name!r} ({m.function_digest})"
        if fn.kind == "builtin":
            if given is not None:
                raise FormatError("the host passed a source for a built-in function", where=where)
            if fn != builtin_descriptor(fn.name):
                raise IntegrityError(
                    f"built-in {fn.name!r} version {fn.version} is not this enclave build's "
                    "(its descriptor differs: another release?)",
                    where=where,
                )
            return builtin_source(fn.name)
        if not isinstance(given, dict) or len(given) != 1 or not set(given) <= {"clear", "sealed"}:
            raise FormatError(
                'the host must pass function_source as {"clear": source} or {"sealed": base64}', where=where
            )
        if "sealed" in given:
            sealed = b64d(given["sealed"], field="function_source.sealed", where=where)
            return open_function_source(sealed, descriptor=fn, service=service)
        if m.confidential:
            raise IntegrityError(
                "the function is confidential: its source must come sealed to the service", where=where
            )
        clear = given["clear"]
        if not isinstance(clear, str):
            raise FormatError("function_source.clear must be text", where=where)
        check_function_source(fn, clear)
        return clear

    def _envelopes(
        self, m: Manifest, args: Mapping[str, Any], service: Identity
    ) -> dict[str, DatasetKeyEnvelope]:
        names = {i.name for i in m.inputs}
        task = f"task {m.task_id}"
        for table in ("dataset_keys", "inputs"):
            if set(args[table]) != names:
                raise FormatError(
                    f"host's {table} {sorted(args[table])} differ from the manifest's inputs {sorted(names)}",
                    where=task,
                )
        envelopes = {}
        for inp in m.inputs:
            where = f"key envelope of {_input_where(m, inp.name)}"
            env = parse_dataset_key(args["dataset_keys"][inp.name], where=where)
            check_dataset_key(env, inp, service.fingerprint, where=where)
            envelopes[inp.name] = env
        return envelopes

    # -- the run ----------------------------------------------------------------------------------
    def _execute(
        self,
        m: Manifest,
        source: str,
        keys: dict[str, bytes],
        args: dict[str, Any],
        service: Identity,
        started: int,
    ) -> dict[str, Any]:
        reserved = 0
        fds: dict[str, int] = {}
        outputs: dict[str, OutputFile] = {}
        with _step("cohort"):  # the owners' standing cohort rules (cohort.py), from the headers
            cohort.check(m, self._cohort_rules(m, args))
        if m.function.kind == "builtin" and m.function.name == "flow":
            return self._execute_flow(m, keys, args, service, started)
        outsourced = needs_accelerator(m.function.kind, m.function.name, m.params)
        if outsourced and self.accelerator is None:
            raise TaskRefused(
                "run",
                f"mode {m.params.get('mode')} needs an accelerator and this host offers none (the "
                "operator starts one with `confide serve --accelerator numpy|cuda|auto`); nothing ran",
            )
        infer = m.function.kind == "builtin" and m.function.name == "infer"
        if infer and ENCLAVE_PARAM in m.params:
            raise TaskRefused(
                "manifest",
                f"params.{ENCLAVE_PARAM} is the enclave's own (it fills it in at run time); a manifest "
                "may not set it",
            )
        split = infer and m.params.get("mode") == "split"  # the model is never decrypted whole
        # what the enclave tells the infer built-in: its memory allowance and the model's layout
        enclave_params: dict[str, Any] | None = {"model_layout": None} if infer else None
        pinned: PinnedModel | None = None
        server: WeightServer | None = None
        stream: tuple[int, int] | None = None
        try:
            with _step("runs"):  # counted (and sealed) before any input is decrypted
                self._run = self.ledger.next_run(m.task_id, self._max_runs)
            with _step("privacy"):  # charged (and sealed) before any input is decrypted
                self._charge_privacy(m)
            with _step("input"):
                for inp in m.inputs:
                    where = _input_where(m, inp.name)
                    if split and inp.name == "model":  # the graph only; the weights on request
                        pinned = PinnedModel(
                            args["inputs"][inp.name],
                            data_key=keys[inp.name],
                            ciphertext_sha256=inp.ciphertext_sha256,
                            where=where,
                        )
                        reserved += self.budget.reserve(
                            pinned.layout.graph_bytes + pinned.buffer_bytes,
                            "input 'model' (its graph and the weight stream's buffers)",
                        )
                        fds[inp.name] = make_input_memfd(pinned.graph_chunks(), name="confide-input-model")
                        assert enclave_params is not None
                        enclave_params["model_layout"] = pinned.layout.to_json()
                        continue
                    header: dict[str, Any] = {}
                    fds[inp.name], n = open_input(
                        args["inputs"][inp.name],
                        inp.name,
                        data_key=keys[inp.name],
                        budget=self.budget,
                        ciphertext_sha256=inp.ciphertext_sha256,
                        where=where,
                        metadata=header,
                    )
                    reserved += n
                    if enclave_params is not None and inp.name == "model":
                        layout = parse_layout(header, where=f"{where}: header metadata")
                        enclave_params["model_layout"] = layout.to_json() if layout else None
            metadata = {"task_id": m.task_id, "manifest_sha256": m.digest}
            with _step("output"):
                for o in m.outputs:
                    outputs[o.name] = OutputFile(
                        Path(args["outputs"][o.name]),
                        [m.participant(r).identity for r in o.recipients],
                        {**metadata, "output": o.name},
                        max_bytes=o.max_bytes,
                        pad=o.pad,
                    )
            with _step("run"):
                if outsourced:
                    assert self.accelerator is not None
                    stream = self.accelerator.open_stream()
                elif pinned is not None:  # the child sees it as ctx.accelerator
                    server = WeightServer(pinned)
                    stream = server.child_fds
                result = run_sandboxed(
                    self.zygote,
                    self.budget,
                    self.config,
                    source=source,
                    params=m.params,
                    inputs=fds,
                    outputs=outputs,
                    max_output_bytes=max(o.max_bytes for o in m.outputs),
                    stream=stream,
                    enclave_params=enclave_params,
                )
            published: list[dict[str, Any]] = []
            error: dict[str, str] | None = None
            if result.ok:
                with _step("output"):
                    for o in m.outputs:
                        out = outputs.pop(o.name)
                        published.append({"name": o.name, "sha256": out.publish(), "size": out.size})
            else:
                error = {"check": "run", "message": f"the function failed ({result.category})"}
                path = args["outputs"].get(ERROR_OUTPUT)
                if path:
                    with _step("output"):
                        recipients = [m.participant(fp).identity for fp in m.error_recipients()]
                        sha, size = write_error_output(
                            Path(path),
                            recipients,
                            {**metadata, "output": ERROR_OUTPUT},
                            result,
                            max_bytes=m.error_cap,
                        )
                    published.append({"name": ERROR_OUTPUT, "sha256": sha, "size": size})
            receipt = self._receipt(service, m, args["manifest"], started, outputs=published, error=error)
            return {
                "ok": result.ok,
                "category": result.category,
                "receipt": b64e(receipt),
                "outputs": {p["name"]: {"sha256": p["sha256"], "size": p["size"]} for p in published},
            }
        finally:
            for out in outputs.values():
                out.discard()
            for fd in (*fds.values(), *(stream or ())):
                os.close(fd)
            if server is not None:  # after the child's ends are closed: its thread sees the end
                server.stop()
            if pinned is not None:
                pinned.close()
            self.budget.release(reserved)

    @staticmethod
    def _cohort_rules(m: Manifest, args: dict[str, Any]) -> dict[str, int]:
        rules = {}
        for inp in m.inputs:
            where = _input_where(m, inp.name)
            k = cohort.owner_min_k(input_metadata(args["inputs"][inp.name], where=where), where=where)
            if k is not None:
                rules[inp.name] = k
        return rules

    def _charge_privacy(self, m: Manifest) -> None:
        if m.function.kind != "builtin" or m.function.name not in DP_BUILTINS:
            return
        dp = parse_dp(m.params, [i.name for i in m.inputs], m.function.name)
        if dp is not None:
            totals = {i.dataset_id: (dp.budget[i.name], _input_where(m, i.name)) for i in m.inputs}
            self.privacy.charge(dp.epsilon, totals)

    def _execute_flow(
        self, m: Manifest, keys: dict[str, bytes], args: dict[str, Any], service: Identity, started: int
    ) -> dict[str, Any]:
        """The `flow` built-in: the approved dataflow job, run whole in this enclave (flow/in_enclave.py)
        or, when the host names node agents (`flow_agents`), started here for the host's engine and
        finished by `flow_finish`; each of its outputs sealed to the task output's recipients; the
        verified per-stage counts signed in the receipt."""
        import shutil
        import tempfile

        from .flow import FlowIntegrityError, FlowTaskError
        from .flow import in_enclave as fl
        from .flow.plan import parse_plan

        job = m.params.get("job")
        with _step("output"):
            sinks = fl.sink_names(job)
            if sorted(sinks) != sorted(o.name for o in m.outputs):
                raise FormatError(
                    f"the job writes outputs {sorted(sinks)}, the manifest declares {sorted(o.name for o in m.outputs)}",
                    where="params.job",
                )
        with _step("runs"):
            self._run = self.ledger.next_run(m.task_id, self._max_runs)
        paths = {i.name: str(args["inputs"][i.name]) for i in m.inputs}
        with _step("input"):
            for inp in m.inputs:
                if input_sha256(paths[inp.name], where=_input_where(m, inp.name)) != inp.ciphertext_sha256:
                    raise IntegrityError(
                        "the file is not the ciphertext the manifest pins", where=_input_where(m, inp.name)
                    )
        with _step("manifest"):
            description = fl.description_for(
                job, task_id=m.task_id, input_paths=paths, data_keys=keys, service=service
            )
            parse_plan(description)  # refused here, as the approved job, before anything runs
        limits = SandboxLimits(
            memory_bytes=max(MIN_WORKING_MEMORY, self.budget.free),
            cpu_seconds=self.config.cpu_seconds,
            wall_seconds=float(self.config.wall_seconds),
        )
        if "flow_agents" in args:
            with _step("run"):  # an agent whose evidence does not check out gets no key: refused
                agents = fl.parse_agents(args["flow_agents"])
                enclave, ticket, graph = fl.open_job(
                    description,
                    paths,
                    service=service,
                    zygote=self.zygote,
                    backend=self.backend,
                    limits=limits,
                    memory_budget=None,  # this coordinator runs no task: the agents do
                    spill_dir=None,
                )
                grants = fl.grant_agents(enclave, ticket, agents)
            context = _FlowRun(m, args["manifest"], dict(args["outputs"]), started, self._run, self._max_runs)
            context.audit_head = self._audit_head
            fl.remember(self._flow_jobs, m.task_id, fl.EngineJob(enclave, ticket, description, context))
            return {
                "ok": True,
                "category": "flow-started",
                "flow": {"task_id": m.task_id, "ticket": b64e(ticket), "graph": graph, "grants": grants},
            }
        results: dict[str, tuple[str, list[Any]]] = {}
        error: dict[str, str] | None = None
        counts: list[dict[str, Any]] | None = None
        work = Path(tempfile.mkdtemp(prefix="confide-flow-task-"))
        try:
            try:
                results, summary = fl.run_job(
                    description,
                    paths,
                    work,
                    service=service,
                    zygote=self.zygote,
                    backend=self.backend,
                    limits=limits,
                    memory_budget=self.budget.free // 2,
                )
                counts = list(summary["counts"])
            except (FlowTaskError, FlowIntegrityError, FormatError) as exc:
                error = _flow_error(exc)
            return self._flow_outputs(
                m, args["manifest"], args["outputs"], results, counts, error, service, started
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def finish_flow(self, args: dict[str, Any]) -> dict[str, Any]:
        """`flow_finish`: a flow task whose stages the host ran on its engine. The job started by this
        worker's task call for `task_id` (refused if none waits: never started, finished already, or
        the worker restarted) is taken back whatever happens next; the host's task reports go through
        the same completeness verification as a local run, then the results are opened through their
        sealed manifest and sealed as the task's outputs. A failure the host reports (`engine_error`)
        or a verification that fails gives a signed receipt with status error and no output."""
        from .flow import in_enclave as fl

        service = self.service.require()
        job = fl.take(self._flow_jobs, args["task_id"])
        ctx: _FlowRun = job.context
        self._run, self._max_runs, self._audit_head = ctx.run, ctx.max_runs, ctx.audit_head
        results: dict[str, tuple[str, list[Any]]] = {}
        counts: list[dict[str, Any]] | None = None
        error: dict[str, str] | None = None
        try:
            if "engine_error" in args:
                error = {"check": "run", "message": fl.engine_failure(args["engine_error"])}
            else:
                try:
                    reports = fl.read_reports(args["reports"])
                    results, summary = fl.finish(
                        job.enclave, job.ticket, job.description, reports, args["out_dir"], service
                    )
                    counts = list(summary["counts"])
                except ConfideError as exc:
                    error = _flow_error(exc)
                except OSError as exc:  # a part file or manifest the verification needs is not there
                    error = {
                        "check": "run",
                        "message": f"the dataflow job failed: {exc.strerror} (a result file)",
                    }
            return self._flow_outputs(
                ctx.manifest, ctx.text, ctx.outputs, results, counts, error, service, ctx.started
            )
        except TaskRefused as exc:
            receipt = self._receipt(
                service,
                ctx.manifest,
                ctx.text,
                ctx.started,
                outputs=[],
                error={"check": exc.check, "message": exc.message},
            )
            return {"ok": False, "category": "refused", "receipt": b64e(receipt), "outputs": {}}

    def _flow_outputs(
        self,
        m: Manifest,
        manifest_text: str,
        paths: Mapping[str, Any],
        results: dict[str, tuple[str, list[Any]]],
        counts: list[dict[str, Any]] | None,
        error: dict[str, str] | None,
        service: Identity,
        started: int,
    ) -> dict[str, Any]:
        """A flow task's end, local run or engine's: each sink's records sealed as the task output of
        its name (JSON lines of the flow record encoding, or text lines), and the signed receipt."""
        from .flow.driver import enc

        outputs: dict[str, OutputFile] = {}
        metadata = {"task_id": m.task_id, "manifest_sha256": m.digest}
        published: list[dict[str, Any]] = []
        try:
            if error is None:
                with _step("output"):
                    for o in m.outputs:
                        fmt, records = results[o.name]
                        out = outputs[o.name] = OutputFile(
                            Path(paths[o.name]),
                            [m.participant(r).identity for r in o.recipients],
                            {**metadata, "output": o.name},
                            max_bytes=o.max_bytes,
                            pad=o.pad,
                        )
                        for rec in records:
                            line = rec if fmt == "text" else _json_line(enc(rec))
                            out.write((line + "\n").encode("utf-8"))
                        published.append({"name": o.name, "sha256": out.publish(), "size": out.size})
                        del outputs[o.name]
            receipt = self._receipt(
                service, m, manifest_text, started, outputs=published, error=error, flow=counts
            )
            return {
                "ok": error is None,
                "category": "ok" if error is None else "exception",
                "receipt": b64e(receipt),
                "outputs": {p["name"]: {"sha256": p["sha256"], "size": p["size"]} for p in published},
            }
        finally:
            for out in outputs.values():
                out.discard()

    def _receipt(
        self,
        service: Identity,
        m: Manifest | None,
        manifest_text: str,
        started: int,
        *,
        outputs: list[dict[str, Any]],
        error: dict[str, str] | None,
        flow: list[dict[str, Any]] | None = None,
    ) -> bytes:
        ident = self.backend.identity
        return make_task_receipt(
            service,
            task_id=m.task_id if m else "",
            manifest_sha256=m.digest
            if m
            else hashlib.sha256(manifest_text.encode("utf-8", "replace")).hexdigest(),
            function_digest=m.function_digest if m else "",
            inputs=[i.to_json() for i in m.inputs] if m else [],
            outputs=outputs,
            measurement=ident.measurement,
            backend=ident.backend,
            simulated=self.backend.simulated,
            evidence_sha256=self.service.evidence_sha256,
            started_at=started,
            ended_at=int(time.time()),
            run=self._run,
            max_runs=self._max_runs,
            error=error,
            audit_head=self._audit_head,
            flow=flow,
        )


def _json_line(value: Any) -> str:
    import json

    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _is_flow(m: Manifest) -> bool:
    return m.function.kind == "builtin" and m.function.name == "flow"


class _FlowRun:
    """What a flow task's run keeps between its start and flow_finish (its receipt's fields)."""

    def __init__(
        self, m: Manifest, text: str, outputs: dict[str, Any], started: int, run: int, max_runs: int
    ) -> None:
        self.manifest, self.text, self.outputs = m, text, outputs
        self.started, self.run, self.max_runs = started, run, max_runs
        self.audit_head: dict[str, Any] | None = None


def _flow_error(exc: ConfideError) -> dict[str, str]:
    failure = f"{exc.message} ({exc.where})" if exc.where else exc.message
    return {"check": "run", "message": f"the dataflow job failed: {failure}"[:512]}
