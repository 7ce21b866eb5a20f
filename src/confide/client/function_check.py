"""Local checks of a function's source before it is registered (`confide function register`).

Every data owner approves a function by its digest, so a typo found after registration costs each of
them a new approval round. The owner's machine therefore compiles the source first and checks that it
defines what the enclave calls: a top-level `def run(ctx)` taking one parameter. A syntax error is
named by file, line and column. Nothing here runs the code (see `confide function register --try`
for a dry run in the local sandbox).
"""

from __future__ import annotations

import ast
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confide.enclave.errors import ConfideError

if TYPE_CHECKING:
    from confide.client.home import Home
    from confide.enclave.keys import Identity


class FunctionSourceError(ConfideError):
    """The source does not compile, or does not define `run(ctx)`."""


def check_function_source(source: str, *, filename: str) -> None:
    """Raise FunctionSourceError naming `filename:line` if `source` does not compile (as the enclave
    compiles it) or has no top-level `def run(ctx)` with exactly one parameter."""
    try:
        tree = ast.parse(source, filename=filename)
        compile(tree, filename, "exec", dont_inherit=True)  # errors ast.parse leaves to the compiler
    except SyntaxError as exc:
        where = f"{filename}:{exc.lineno}" if exc.lineno else filename
        if exc.lineno and exc.offset:
            where += f":{exc.offset}"
        text = (exc.text or "").strip()
        detail = f": {text}" if text else ""
        raise FunctionSourceError(f"syntax error: {exc.msg}{detail}", where=where) from None
    except ValueError as exc:  # e.g. a NUL byte in the source
        raise FunctionSourceError(f"cannot compile ({exc})", where=filename) from None
    runs = [
        node
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "run"
    ]
    if not runs:
        nested = next(
            (
                n
                for n in ast.walk(tree)
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "run"
            ),
            None,
        )
        if nested is not None:
            raise FunctionSourceError(
                "run is defined, but not at the top level of the file: the enclave calls a top-level run(ctx)",
                where=f"{filename}:{nested.lineno}",
            )
        raise FunctionSourceError("no top-level `def run(ctx)`: the enclave calls run(ctx)", where=filename)
    fn = runs[-1]  # the last definition is the one the module ends with
    where = f"{filename}:{fn.lineno}"
    if isinstance(fn, ast.AsyncFunctionDef):
        raise FunctionSourceError("run must be a plain function, not `async def`", where=where)
    a = fn.args
    positional = [*a.posonlyargs, *a.args]
    required_kw = [
        arg.arg for arg, default in zip(a.kwonlyargs, a.kw_defaults, strict=True) if default is None
    ]
    required_pos = positional[: len(positional) - len(a.defaults)]
    takes_one = (
        len(required_pos) == 1 or (not required_pos and (positional or a.vararg))
    ) and not required_kw
    if not takes_one:
        names = [p.arg for p in positional] + ([f"*{a.vararg.arg}"] if a.vararg else []) + required_kw
        shown = ", ".join(names) or "no parameters"
        raise FunctionSourceError(
            f"run takes ({shown}); the enclave calls run(ctx) with one argument", where=where
        )


@dataclass(frozen=True)
class DryRun:
    ok: bool
    category: str  # "ok", or the sandbox's failure category ("exception", "cpu-limit", ...)
    outputs: dict[str, int]  # output name -> bytes written (on success)
    error_text: str  # the function's own error text, traceback included (on failure)
    duration_s: float


def dry_run(
    source: str,
    *,
    samples: Mapping[str, Path],
    outputs: Sequence[str],
    params: Mapping[str, Any],
    identity: Identity,
    home: Home,
    config: Path | None = None,
) -> DryRun:
    """Run `source` on sample files in a local enclave of this installation: the same enclave runtime
    and sandbox (no network, no file system, seccomp, rlimits) that runs it on the platform, on the
    simulated backend. Each sample is sealed to `identity` first and handed in like a dataset; the
    outputs and the error report are sealed to `identity` and opened here. Nothing is sent anywhere."""
    from confide.client.local import run_function
    from confide.client.policy import Policy
    from confide.client.sealing import decrypt_file, encrypt_file
    from confide.enclave.config import EnclaveConfig
    from confide.enclave.measurement import measure

    for name, path in samples.items():
        if not Path(path).is_file():
            raise ConfideError("no such file", where=f"--try {name}={path}")
    # The enclave is this machine's own simulated one, started just for the dry run: accept exactly
    # the measurement of the installed runtime (the party's policy is for the platform's service).
    local = Policy(
        backends=("sim",),
        measurements=(measure(EnclaveConfig.load(config)).value,),
        allow_simulation=True,
        source="dry run: this machine's own simulated enclave",
    )
    with tempfile.TemporaryDirectory(prefix="confide-dry-run-") as tmp:
        root = Path(tmp)
        sealed: dict[str, Path] = {}
        for i, (name, path) in enumerate(samples.items()):
            sealed[name] = root / f"in{i}.sealed"
            encrypt_file(Path(path), sealed[name], recipients=[identity.public])
        out_paths = {name: root / f"out{i}.sealed" for i, name in enumerate(outputs)}
        error_path = root / "error.sealed"
        with home.start_enclave(config) as enclave:
            outcome = run_function(
                enclave,
                source=source,
                inputs=sealed,
                outputs=out_paths,
                recipients=[identity.public],
                params=dict(params),
                identity=identity,
                policy=local,
                anchors=home.anchors(),
                error_report=error_path,
            )
        if not outcome.ok:
            text = ""
            if error_path.exists():
                decrypt_file(error_path, root / "error.txt", identity=identity)
                text = (root / "error.txt").read_text(encoding="utf-8", errors="replace")
            return DryRun(False, outcome.category, {}, text, outcome.duration_s)
        sizes = {}
        for name, path in out_paths.items():
            reader = decrypt_file(path, root / f"{path.stem}.plain", identity=identity)
            sizes[name] = reader.plaintext_size
        return DryRun(True, "ok", sizes, "", outcome.duration_s)
