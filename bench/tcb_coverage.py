"""`make coverage`: how much of the TCB (the package `confide.enclave`) the enclave tests execute.

Runs the enclave, sandbox, task, manifest and measurement tests under coverage.py, measuring
`confide.enclave` only, in the test process and in every enclave process and sandbox zygote they
start (coverage's `patch = ["subprocess", "_exit"]`; the zygote gets an environment of its own, so
a `sitecustomize` on PYTHONPATH, for this run only, hands it coverage's configuration). What runs
only inside a sandboxed child (forked from the zygote) is executed but cannot be recorded: the child
may not open a file for writing (seccomp, Landlock, RLIMIT_FSIZE 0), so its data is lost.
Writes bench/results/tcb_coverage.json: percent, lines, missed, and per file lines, missed and the
missed line numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "tcb_coverage.json"
TESTS = [
    "tests/test_enclave.py",
    "tests/test_sandbox.py",
    "tests/test_sandbox_escape.py",
    "tests/test_task_enclave.py",
    "tests/test_service_provision.py",
    "tests/test_builtins.py",
    "tests/test_manifest.py",
    "tests/test_measure.py",
    "tests/test_measure_reproducible.py",
    "tests/test_sealed_file.py",
    "tests/test_keys.py",
    "tests/test_evidence_sim.py",
    "tests/test_providers.py",
    "tests/test_fuzz_parsers.py",
    "tests/test_tcb_imports.py",
    "tests/test_flow_ops.py",
]
# Modules whose code runs (almost) only in a sandboxed child: the child's entry, the layers it
# applies to itself, the probe child's checks, and the functions run as run(ctx) (built-ins, the
# dataflow driver). Their lines cannot be recorded; the report gives the figure without them too.
CHILD_ONLY = (
    "confide/enclave/sandbox/child.py",
    "confide/enclave/sandbox/layers.py",
    "confide/enclave/sandbox/probe.py",
    "confide/enclave/sandbox/landlock.py",
    "confide/enclave/sandbox/seccomp_filter.py",
    "confide/enclave/sandbox/rlimits.py",
    "confide/enclave/sandbox/namespaces.py",
    "confide/enclave/sandbox/privileges.py",
    "confide/enclave/builtins/gbdt_train.py",
    "confide/enclave/builtins/gbdt_predict.py",
    "confide/enclave/flow/driver.py",
)
# Imported at start by every interpreter of this run that reads PYTHONPATH (the test process and
# the enclave processes; the zygote runs with -I): the zygote's environment carries coverage's
# configuration and data file too.
SITECUSTOMIZE = """\
import os
if os.environ.get("COVERAGE_PROCESS_CONFIG"):
    from confide.enclave.sandbox import zygote as _z
    _real = _z.zygote_environment
    _keep = {k: os.environ[k] for k in ("COVERAGE_PROCESS_CONFIG", "COVERAGE_FILE") if k in os.environ}
    _z.zygote_environment = lambda: {**_real(), **_keep}
"""


def main() -> int:
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="confide-cov-") as tmp:
        (Path(tmp) / "sitecustomize.py").write_text(SITECUSTOMIZE)
        data = Path(tmp) / "data" / ".coverage"
        data.parent.mkdir(mode=0o777)
        os.chmod(data.parent, 0o777)  # a zygote that dropped to uid 65534 may still save its data
        path = os.pathsep.join(p for p in (tmp, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path, "COVERAGE_FILE": str(data)}
        cov = [py, "-m", "coverage"]
        rcfile = f"--rcfile={ROOT / 'pyproject.toml'}"
        tests = subprocess.run(
            [*cov, "run", rcfile, "-m", "pytest", "-q", "-p", "no:cacheprovider", *sys.argv[1:], *TESTS],
            cwd=ROOT,
            env=env,
        )
        subprocess.run([*cov, "combine", rcfile, "-q"], cwd=ROOT, env=env, check=True)
        report = Path(tmp) / "report.json"
        subprocess.run([*cov, "json", rcfile, "-q", "-o", str(report)], cwd=ROOT, env=env, check=True)
        subprocess.run([*cov, "report", rcfile], cwd=ROOT, env=env, check=True)
        doc = json.loads(report.read_text())
    files = {}
    for name, f in sorted(doc["files"].items()):
        rel = Path(name).resolve().relative_to(ROOT).as_posix() if Path(name).is_absolute() else name
        rel = rel.removeprefix("src/")
        s = f["summary"]
        files[rel] = {
            "lines": s["num_statements"],
            "missed": s["missing_lines"],
            "percent": round(s["percent_covered"], 1),
            "missed_lines": f["missing_lines"],
        }
    t = doc["totals"]
    rest = [f for name, f in files.items() if name not in CHILD_ONLY]
    rest_lines, rest_missed = sum(f["lines"] for f in rest), sum(f["missed"] for f in rest)
    result = {
        "what": "lines (statements) of confide.enclave executed by the enclave tests, in the test "
        "process, the enclave processes and the sandbox zygotes; lines run only in sandboxed "
        "children are not recorded (they cannot write files)",
        "tests": TESTS,
        "tests_exit_code": tests.returncode,
        "coverage_py": doc["meta"]["version"],
        "percent": round(t["percent_covered"], 1),
        "lines": t["num_statements"],
        "covered": t["covered_lines"],
        "missed": t["missing_lines"],
        "outside_sandbox_child": {
            "what": "the same, leaving out CHILD_ONLY (modules that run only in a sandboxed child)",
            "child_only": list(CHILD_ONLY),
            "percent": round(100 * (rest_lines - rest_missed) / max(rest_lines, 1), 1),
            "lines": rest_lines,
            "missed": rest_missed,
        },
        "files": files,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    out = result["outside_sandbox_child"]
    print(
        f"TCB coverage {result['percent']}% ({result['covered']}/{result['lines']} lines); "
        f"outside the sandbox child's modules {out['percent']}% ({out['lines'] - out['missed']}/{out['lines']}) -> {OUT}"
    )
    return tests.returncode


if __name__ == "__main__":
    sys.exit(main())
