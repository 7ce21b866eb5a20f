"""`make coverage`: how much of the TCB (the package `confide.enclave`) the enclave tests execute.

Runs the enclave, sandbox, task, manifest and measurement tests under coverage.py, measuring
`confide.enclave` only, in the test process, in every enclave process and sandbox zygote they start
(coverage's `patch = ["subprocess", "_exit"]`) and in every sandboxed child those zygotes fork.

The sandboxed child cannot write a data file (seccomp, Landlock, RLIMIT_FSIZE 0, a minimal root), so
its lines come home through a channel it already holds, its status pipe: bench/tcb_coverage_hooks.py,
copied for this run only into a temporary directory on PYTHONPATH (a `sitecustomize` there, a `-p`
pytest plugin, and one line added to the zygote's boot code by the enclave-side hook), makes the
child's os._exit write one extra `confide-coverage:` line after its status record, and the pipe's
readers (the zygote for the probe child, the enclave side's classify for a run) strip it before the
pipe is parsed and save it as one more data file. Chosen over a memfd handed in by the zygote or a
COVERAGE mode in the TCB because it changes no file of `confide.enclave` and relaxes no layer: in a
normal run the hooks are not on any path, so there is nothing a task's inputs could switch on; and over
running the sandbox's child-side modules unsandboxed because the figures are then those of the real
children (the probe child's checks and every layer applied for real). What is still not recorded: a child killed by a signal (SIGKILL at a limit, SIGSYS from
seccomp) never reaches os._exit, so its lines are lost; lines the function runs after closing or
replacing its status descriptor are lost too. The built-ins and the dataflow driver are sent to the
child as source text and compiled there as "<function>", which no coverage tool maps to a file: their
lines count through tests that call their run(ctx) in the test process
(tests/test_tcb_coverage_builtins.py, _gbdt, _onnx_infer, _flow_driver); psi, join-aggregate and the
driver are also checked to give the same bytes as the sandboxed run of the same source.

Writes bench/results/tcb_coverage.json: percent, lines, missed, and per file lines, missed and the
missed line numbers; `outside_sandbox_child` gives the figure without the child-side modules as well.
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
    "tests/test_flow_batch.py",
    "tests/test_flow_tamper.py",
    "tests/test_output_channels.py",
    "tests/test_bytecode.py",
    "tests/test_infer_field.py",
    "tests/test_infer_slalom.py",
    "tests/test_infer_onnx.py",
    "tests/test_infer_tcb.py",
    "tests/test_flow_attest.py",  # flow: attested key release, spill, the platform's in-enclave jobs
    "tests/test_flow_spill.py",
    "tests/test_flow_padding.py",
    "tests/test_flow_sort.py",  # range sort: sampling, boundaries, routing
    "tests/test_flow_sort_spill.py",  # the external merge sort and the streamed routing task
    "tests/test_builtin_infer_outsourced.py",  # the accelerator link, deadlines, hostile streams
    "tests/test_cli_run_infer.py",  # confide run's accelerator stream
    "tests/test_join_aggregate_engines.py",  # join-aggregate's DuckDB path in-process
    "tests/test_real_models.py",  # the executor's 57 operators on MiniLM and PP-OCR, in process
    "tests/test_flow_platform.py",
    "tests/test_builtin_infer.py",
    "tests/test_infer_split.py",  # split mode: the weight stream in process, the planner, hostile reads
    "tests/test_builtin_sql.py",
    "tests/test_builtin_describe.py",
    "tests/test_builtin_ordered_join.py",  # ordered-set-join, password-check, sign: run(ctx) in-process too
    "tests/test_builtin_custody.py",
    "tests/test_builtin_ml.py",
    "tests/test_parquet_pme.py",
    "tests/test_builtin_dp.py",  # join-aggregate's dp path and dp_noise in-process too; the sealed budget
    # tests written for the TCB's coverage gaps (each asserts behaviour, mostly hostile input)
    *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("test_tcb_coverage_*.py")),
]
# Modules whose code runs (almost) only in a sandboxed child: the child's entry, the layers it
# applies to itself, the probe child's checks, and the functions run as run(ctx) (built-ins, the
# dataflow driver). Their lines are recorded through the status pipe (see above); the report gives
# the figure without them too, for comparison with the runs before that channel existed.
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
    import confide_cov_hooks
    confide_cov_hooks.install_enclave()
"""
HOOKS = Path(__file__).resolve().parent / "tcb_coverage_hooks.py"


def main() -> int:
    py = sys.executable
    with tempfile.TemporaryDirectory(prefix="confide-cov-") as tmp:
        os.chmod(tmp, 0o755)  # the zygote imports the hooks from here, whatever uid it runs as
        (Path(tmp) / "sitecustomize.py").write_text(SITECUSTOMIZE)
        (Path(tmp) / "confide_cov_hooks.py").write_text(HOOKS.read_text())
        data = Path(tmp) / "data" / ".coverage"
        data.parent.mkdir(mode=0o777)
        os.chmod(data.parent, 0o777)  # a zygote that dropped to uid 65534 may still save its data
        path = os.pathsep.join(p for p in (tmp, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path, "COVERAGE_FILE": str(data)}
        cov = [py, "-m", "coverage"]
        rcfile = f"--rcfile={ROOT / 'pyproject.toml'}"
        tests = subprocess.run(
            [
                *cov,
                "run",
                rcfile,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-p",
                "confide_cov_hooks",
                *sys.argv[1:],
                *TESTS,
            ],
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
        "process, the enclave processes, the sandbox zygotes and the sandboxed children (whose lines "
        "come back over their status pipe; a child killed by a signal sends none)",
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
