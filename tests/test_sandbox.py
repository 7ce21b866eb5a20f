"""Functional tests of the sandbox: runs, data in and out, libraries, categories, layer report."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import sys
import textwrap
from collections.abc import Iterator

import pytest

from confide.enclave.errors import SandboxError
from confide.enclave.sandbox import (
    CATEGORIES,
    LAYER_NAMES,
    RunResult,
    SandboxLimits,
    Zygote,
    bench_child_start,
    make_input_memfd,
)
from confide.enclave.sandbox.api import DETAIL_CAP
from confide.enclave.sandbox.memfd import SEALS
from confide.enclave.sandbox.privileges import first_unreadable_by_nobody

LIMITS = SandboxLimits(wall_seconds=20.0, cpu_seconds=15)


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.data += data
        self.writes += 1


@pytest.fixture(scope="module")
def zygote() -> Iterator[Zygote]:
    z = Zygote.start()  # strict: fails here if any layer is missing on this machine
    yield z
    z.close()


def run(
    z: Zygote,
    source: str,
    *,
    params: dict | None = None,
    inputs: dict[str, bytes] | None = None,
    outputs: tuple[str, ...] = (),
    limits: SandboxLimits = LIMITS,
) -> tuple[RunResult, dict[str, bytes]]:
    fds = {name: make_input_memfd(data) for name, data in (inputs or {}).items()}
    sinks = {name: Sink() for name in outputs}
    try:
        result = z.run(textwrap.dedent(source), params=params or {}, inputs=fds, outputs=sinks, limits=limits)
    finally:
        for fd in fds.values():
            os.close(fd)
    assert result.category in CATEGORIES
    return result, {name: bytes(s.data) for name, s in sinks.items()}


def test_layer_report_lists_every_layer_ok(zygote: Zygote) -> None:
    layers = zygote.layers
    assert list(layers) == list(LAYER_NAMES)
    for name, text in layers.items():
        assert text.startswith("ok: "), f"{name}: {text}"
    assert "verified" in layers["seccomp"] and "verified" in layers["landlock-fs"]
    assert not zygote.weak


def test_inputs_and_outputs_round_trip(zygote: Zygote) -> None:
    big = os.urandom(3 * 2**20 + 17)  # larger than a pipe buffer: outputs must stream
    result, out = run(
        zygote,
        """
        import hashlib
        def run(ctx):
            data = ctx.inputs["big"].read()
            ctx.outputs["copy"].write(data[::-1])
            text = ctx.inputs["text"].read().decode()
            ctx.outputs["digest"].write(hashlib.sha256(data).hexdigest().encode() + text.upper().encode())
    """,
        inputs={"big": big, "text": b"hello"},
        outputs=("copy", "digest"),
    )
    assert result.ok, result.detail
    assert result.category == "ok" and result.exit_code == 0 and result.signal is None
    assert out["copy"] == big[::-1]
    assert out["digest"] == hashlib.sha256(big).hexdigest().encode() + b"HELLO"
    assert result.output_sizes == {"copy": len(big), "digest": 64 + 5}


def test_params_arrive(zygote: Zygote) -> None:
    params = {"k": 3, "name": "zürich", "nested": {"xs": [1, 2.5, None, True]}}
    result, out = run(
        zygote,
        """
        import json
        def run(ctx):
            ctx.outputs["p"].write(json.dumps(ctx.params).encode())
    """,
        params=params,
        outputs=("p",),
    )
    assert result.ok, result.detail
    assert json.loads(out["p"]) == params


def test_params_must_be_json(zygote: Zygote) -> None:
    with pytest.raises(SandboxError, match="JSON"):
        zygote.run("def run(ctx): pass", params={"x": object()}, inputs={}, outputs={}, limits=LIMITS)


def test_input_offset_independent_and_seekable(zygote: Zygote) -> None:
    fd = make_input_memfd(b"0123456789")
    os.lseek(fd, 7, os.SEEK_SET)
    try:
        result = zygote.run(
            textwrap.dedent("""
            def run(ctx):
                f = ctx.inputs["d"]
                first = f.read(3)
                f.seek(5)
                ctx.outputs["o"].write(first + f.read())
        """),
            params={},
            inputs={"d": fd},
            outputs={"o": (sink := Sink())},
            limits=LIMITS,
        )
        assert result.ok, result.detail
        assert bytes(sink.data) == b"01256789"
        assert os.lseek(fd, 0, os.SEEK_CUR) == 7  # the child had its own open file description
    finally:
        os.close(fd)


def test_numpy_pandas_xgboost_work(zygote: Zygote) -> None:
    rows = ["x1,x2,label"] + [f"{i % 7},{(i * 13) % 11},{int(i % 7 > 3)}" for i in range(200)]
    result, out = run(
        zygote,
        """
        import json
        import numpy as np
        import pandas as pd
        import xgboost as xgb
        def run(ctx):
            df = pd.read_csv(ctx.inputs["data"])
            X, y = df[["x1", "x2"]], df["label"]
            dm = xgb.DMatrix(X, label=y, nthread=1)
            booster = xgb.train({"objective": "binary:logistic", "nthread": 1, "max_depth": 3}, dm, 20)
            pred = booster.predict(dm)
            acc = float(np.mean((pred > 0.5) == y.to_numpy()))
            ctx.outputs["r"].write(json.dumps({"n": len(df), "acc": acc, "mean_x1": float(np.mean(X["x1"]))}).encode())
    """,
        inputs={"data": "\n".join(rows).encode()},
        outputs=("r",),
    )
    assert result.ok, result.detail
    report = json.loads(out["r"])
    assert report["n"] == 200
    assert report["acc"] == 1.0  # label is a function of x1: the model must learn it
    assert report["mean_x1"] == pytest.approx(sum(i % 7 for i in range(200)) / 200)


def test_xgboost_sklearn_api(zygote: Zygote) -> None:
    pytest.importorskip(
        "sklearn", reason="xgboost.XGBClassifier needs scikit-learn, not installed in this venv"
    )
    result, out = run(
        zygote,
        """
        import pandas as pd
        import xgboost as xgb
        def run(ctx):
            X = pd.DataFrame({"a": [1, 2, 3, 4] * 10, "b": [0.1, 0.5, 0.3, 0.9] * 10})
            y = [0, 1, 0, 1] * 10
            model = xgb.XGBClassifier(n_estimators=5, n_jobs=1).fit(X, y)
            ctx.outputs["p"].write(bytes(int(v) for v in model.predict(X)[:4]))
    """,
        outputs=("p",),
    )
    assert result.ok, result.detail
    assert out["p"] == bytes([0, 1, 0, 1])


def test_exception_gives_category_and_traceback(zygote: Zygote) -> None:
    result, _ = run(
        zygote,
        """
        def helper(x):
            raise ValueError(f"boom {x}")

        def run(ctx):
            helper(42)
    """,
    )
    assert not result.ok
    assert result.category == "exception"
    assert result.exit_code == 1
    assert "ValueError: boom 42" in result.detail
    assert 'File "<function>", line 3, in helper' in result.detail
    assert 'raise ValueError(f"boom {x}")' in result.detail  # source lines are shown
    assert "child.py" not in result.detail  # the runtime's own frames are left out


def test_syntax_error_and_missing_run_are_exceptions(zygote: Zygote) -> None:
    result, _ = run(zygote, "def run(ctx)\n    pass\n")
    assert result.category == "exception" and "SyntaxError" in result.detail
    result, _ = run(zygote, "x = 1\n")
    assert result.category == "exception" and "must define run(ctx)" in result.detail


def test_sys_exit_and_os_exit(zygote: Zygote) -> None:
    result, _ = run(zygote, "import sys\ndef run(ctx):\n    sys.exit(3)\n")
    assert result.category == "exception" and "SystemExit" in result.detail
    result, _ = run(zygote, "import os\ndef run(ctx):\n    os._exit(5)\n")
    assert result.category == "crashed" and result.exit_code == 5
    result, _ = run(zygote, "import os\ndef run(ctx):\n    os.abort()\n")
    # The child is pid 1 of its own pid namespace, which ignores its own default-action SIGABRT:
    # abort() then ends on its fallback fault instruction (SIGSEGV).
    assert result.category == "crashed" and result.signal in (6, 11)


def test_stdout_and_stderr_go_to_detail_capped(zygote: Zygote) -> None:
    result, _ = run(
        zygote,
        """
        import sys
        def run(ctx):
            print("to stdout")
            print("to stderr", file=sys.stderr)
    """,
    )
    assert result.ok
    assert "to stdout" in result.detail and "to stderr" in result.detail
    result, _ = run(
        zygote,
        """
        def run(ctx):
            print("y" * 2_000_000)
            raise RuntimeError("x" * 1_000_000)
    """,
    )
    assert result.category == "exception"
    assert len(result.detail.encode()) <= DETAIL_CAP


def test_output_limit_kills_the_child(zygote: Zygote) -> None:
    limits = SandboxLimits(wall_seconds=20.0, max_output_bytes=100_000)
    result, out = run(
        zygote,
        """
        def run(ctx):
            while True:  # would never end by itself
                ctx.outputs["o"].write(b"x" * 65536)
    """,
        outputs=("o",),
        limits=limits,
    )
    assert result.category == "output-limit"
    assert not result.ok
    assert result.output_sizes["o"] == len(out["o"]) == 100_000
    assert result.duration_s < 10


def test_output_exactly_at_limit_is_ok(zygote: Zygote) -> None:
    limits = SandboxLimits(wall_seconds=20.0, max_output_bytes=100_000)
    result, out = run(
        zygote, 'def run(ctx):\n    ctx.outputs["o"].write(b"z" * 100_000)\n', outputs=("o",), limits=limits
    )
    assert result.ok, result.detail
    assert len(out["o"]) == 100_000


def test_environment_is_scrubbed(zygote: Zygote) -> None:
    os.environ["CONFIDE_TEST_SECRET"] = "hunter2"  # set in the caller: must never be visible
    try:
        result, out = run(
            zygote,
            """
            import json, os
            def run(ctx):
                ctx.outputs["env"].write(json.dumps(dict(os.environ)).encode())
        """,
            outputs=("env",),
        )
    finally:
        del os.environ["CONFIDE_TEST_SECRET"]
    assert result.ok, result.detail
    env = json.loads(out["env"])
    assert "CONFIDE_TEST_SECRET" not in env
    assert env["OMP_NUM_THREADS"] == "1" and env["OPENBLAS_NUM_THREADS"] == "1"
    assert set(env) <= {
        "PATH",
        "LANG",
        "LC_ALL",
        "HOME",
        "TZ",
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
        "NUMEXPR_NUM_THREADS",
        "VECLIB_MAXIMUM_THREADS",
        "BLIS_NUM_THREADS",
        "GOTO_NUM_THREADS",
        "ARROW_DEFAULT_MEMORY_POOL",  # Arrow's allocator without jemalloc's background thread
        "JE_ARROW_MALLOC_CONF",
        # set by scikit-learn at import (xgboost imports it when installed)
        "KMP_DUPLICATE_LIB_OK",
        "KMP_INIT_AT_FORK",
    }


def test_make_input_memfd_is_sealed(tmp_path) -> None:
    fd = make_input_memfd(b"secret data")
    try:
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS
        with pytest.raises(OSError) as info:
            os.write(fd, b"x")
        assert info.value.errno == errno.EPERM
        assert os.read(fd, 100) == b"secret data"
    finally:
        os.close(fd)
    path = tmp_path / "f.bin"
    path.write_bytes(b"from a file" * 1000)
    with open(path, "rb") as f:
        fd = make_input_memfd(f)
    try:
        assert os.read(fd, 20000) == b"from a file" * 1000
    finally:
        os.close(fd)


def test_writable_unsealed_input_is_refused(zygote: Zygote, tmp_path) -> None:
    fd = os.open(tmp_path / "rw.bin", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(SandboxError, match="not sealed"):
            zygote.run("def run(ctx): pass", params={}, inputs={"x": fd}, outputs={}, limits=LIMITS)
    finally:
        os.close(fd)


def test_bench_child_start_returns_samples(zygote: Zygote) -> None:
    samples = bench_child_start(zygote, 5)
    assert len(samples) == 5
    assert all(0 < s < 10 for s in samples)


def test_close_stops_the_zygote() -> None:
    z = Zygote.start(preimport=())
    pid = z.pid
    assert z.alive()
    result = z.run("def run(ctx): pass", params={}, inputs={}, outputs={}, limits=LIMITS)
    assert result.ok, result.detail
    z.close()
    assert not z.alive()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(SandboxError, match="not running"):
        z.run("def run(ctx): pass", params={}, inputs={}, outputs={}, limits=LIMITS)


def test_unknown_disabled_layer_is_rejected() -> None:
    with pytest.raises(SandboxError, match="unknown layer"):
        Zygote.start(preimport=(), _disable_layers=("no-such-layer",))


DISABLEABLE = [name for name in LAYER_NAMES if name != "fresh-process"]


@pytest.mark.parametrize("layer", DISABLEABLE)
def test_missing_layer_strict_refuses_weak_reports(layer: str) -> None:
    """Simulate a kernel/host without one layer: the probe must notice it by behaviour."""
    with pytest.raises(SandboxError) as info:
        Zygote.start(preimport=(), _disable_layers=(layer,))
    assert layer in str(info.value)
    assert "refusing" in str(info.value)

    with Zygote.start(strict=False, preimport=(), _disable_layers=(layer,)) as weak:
        layers = weak.layers
        assert weak.weak
        assert layers[layer].startswith("MISSING"), layers[layer]
        others = {k: v for k, v in layers.items() if k != layer and not v.startswith("ok")}
        assert not others, others
        result, out = run(weak, 'def run(ctx):\n    ctx.outputs["o"].write(b"still runs")\n', outputs=("o",))
        assert result.ok, result.detail
        assert out["o"] == b"still runs"


def test_first_unreadable_by_nobody(tmp_path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    os.chmod(private, 0o700)
    assert first_unreadable_by_nobody(["/usr/lib"]) is None
    assert first_unreadable_by_nobody(["/usr/lib", str(private)]) == str(private)


def test_first_unreadable_by_nobody_in_the_minimal_root(tmp_path) -> None:
    """A 0700 directory above a world-readable tree stops uid 65534 on the host, not in a minimal root
    that binds the tree (the child's view); a 0700 tree itself stays unreadable there too."""
    private = tmp_path / "home"
    tree = private / "interpreter"
    tree.mkdir(parents=True)
    os.chmod(private, 0o700)
    os.chmod(tree, 0o755)
    (tree / "lib.py").write_text("x = 1\n")
    os.chmod(tree / "lib.py", 0o644)
    assert first_unreadable_by_nobody([str(tree / "lib.py")]) == str(tree / "lib.py")
    assert first_unreadable_by_nobody([str(tree / "lib.py")], minimal_root=(str(tree),)) is None
    os.chmod(tree, 0o700)
    assert first_unreadable_by_nobody([str(tree)], minimal_root=(str(tree),)) == str(tree)


def test_uid_layer_is_honest_about_the_interpreter(zygote: Zygote) -> None:
    text = zygote.layers["uid"]
    trees = (sys.base_prefix, sys.prefix)
    unreadable = first_unreadable_by_nobody(list(trees), minimal_root=trees)
    if unreadable is None:
        assert text.startswith("ok: uid/gid 65534"), text
    else:
        assert text.startswith("ok: uid 0 without capabilities"), text
        assert f"{unreadable} unreadable by uid 65534" in text


def test_children_as_uid_65534() -> None:
    """The uid-65534 branch (the default where the interpreter is world-readable)."""
    with Zygote.start(strict=False, preimport=(), _force_nobody=True) as z:
        layers = z.layers
        assert layers["uid"].startswith("ok: uid/gid 65534"), layers["uid"]
        stdlib = os.path.dirname(os.__file__)
        if first_unreadable_by_nobody([stdlib], minimal_root=(sys.base_prefix,)) is not None:
            # exactly why Zygote.start does not pick 65534 here: the stdlib becomes unreadable
            assert layers["landlock-fs"].startswith("MISSING"), layers["landlock-fs"]
            assert "standard library became unreadable" in layers["landlock-fs"]
        result, out = run(
            z,
            """
            import os
            def run(ctx):
                ctx.outputs["ids"].write(repr((os.getresuid(), os.getresgid(), os.getgroups())).encode())
        """,
            outputs=("ids",),
        )
        assert result.ok, result.detail
        assert out["ids"] == b"((65534, 65534, 65534), (65534, 65534, 65534), [])"


def _zygote_memory_contains(pid: int, needles: list[bytes]) -> set[bytes]:
    found: set[bytes] = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or (len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]")):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except OSError:
                continue
            found |= {n for n in needles if n in chunk}
    return found


def test_zygote_memory_never_holds_run_data() -> None:
    """Source, params and inputs go to the child only: a later child forked from the zygote cannot
    find an earlier run's data in the memory it inherits."""
    tokens = {kind: f"confide-{kind}-{os.urandom(8).hex()}".encode() for kind in ("source", "param", "input")}
    with Zygote.start(preimport=()) as z:
        try:
            _zygote_memory_contains(z.pid, [b"x"])
        except PermissionError:
            pytest.skip("cannot read the zygote's memory from here (no CAP_SYS_PTRACE)")
        result, out = run(
            z,
            f"""
            TOKEN = {tokens["source"].decode()!r}
            def run(ctx):
                ctx.outputs["o"].write(ctx.inputs["i"].read() + ctx.params["p"].encode() + TOKEN.encode())
        """,
            params={"p": tokens["param"].decode()},
            inputs={"i": tokens["input"]},
            outputs=("o",),
        )
        assert result.ok, result.detail
        assert out["o"] == tokens["input"] + tokens["param"] + tokens["source"]  # the child did see them
        assert _zygote_memory_contains(z.pid, list(tokens.values())) == set()


def test_caller_descriptors_do_not_reach_the_zygote(tmp_path) -> None:
    path = tmp_path / "caller-secret"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.set_inheritable(fd, True)  # even an inheritable fd must not be passed on
    try:
        with Zygote.start(preimport=()) as z:
            fds = {int(n): os.readlink(f"/proc/{z.pid}/fd/{n}") for n in os.listdir(f"/proc/{z.pid}/fd")}
    finally:
        os.close(fd)
    # stdin and its own /dev/null, the caller's stderr (the zygote's crash reports; children never get
    # it), and the control socket: nothing else.
    assert fds.pop(2) == os.readlink("/proc/self/fd/2")
    assert str(path) not in fds.values()
    kinds = sorted("socket" if t.startswith("socket:") else t for t in fds.values())
    assert kinds == ["/dev/null", "/dev/null", "/dev/null", "socket"], fds  # stdin, stdout, children's stdin


def test_zygote_started_from_a_thread_outlives_the_thread() -> None:
    import threading

    holder: list[Zygote] = []
    thread = threading.Thread(target=lambda: holder.append(Zygote.start(preimport=())))
    thread.start()
    thread.join()
    with holder[0] as z:
        result = z.run("def run(ctx): pass", params={}, inputs={}, outputs={}, limits=LIMITS)
        assert result.ok, result.detail


def test_sink_error_propagates_and_the_zygote_survives(zygote: Zygote) -> None:
    class Broken:
        def write(self, data: bytes) -> None:
            raise OSError(errno.ENOSPC, "caller's disk is full")

    with pytest.raises(OSError, match="disk is full"):
        zygote.run(
            'def run(ctx):\n    while True:\n        ctx.outputs["o"].write(b"x" * 4096)\n',
            params={},
            inputs={},
            outputs={"o": Broken()},
            limits=LIMITS,
        )
    result, out = run(zygote, 'def run(ctx):\n    ctx.outputs["o"].write(b"fine")\n', outputs=("o",))
    assert result.ok and out["o"] == b"fine"


def test_dead_zygote_gives_sandbox_error() -> None:
    import signal as _signal

    z = Zygote.start(preimport=())
    os.kill(z.pid, _signal.SIGKILL)
    with pytest.raises(SandboxError):
        z.run("def run(ctx): pass", params={}, inputs={}, outputs={}, limits=LIMITS)
    z.close()
