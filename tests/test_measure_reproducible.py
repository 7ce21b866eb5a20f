"""Two installs of one commit measure the same; any change to what runs measures differently; and
the enclave and its zygote run what was measured, never cached bytecode.

Two installs are built as copies of this install's measured trees, each laid out like a fresh
virtual environment (`make install` in another clone): same files, but its own bytecode (compiled
at other source mtimes, so the .pyc headers differ), its own RECORD (listing those .pyc hashes), its
own INSTALLER and direct_url.json, a console script whose shebang names its own environment, and
other mtimes everywhere. The measurement function runs over each copy (`measure(tcb_root=, path=)`).
The distributions measured are a small closure (cffi with pycparser, and pyseccomp) so that the
copies stay cheap; the code path is the one every distribution of the TCB goes through.
"""

from __future__ import annotations

import base64
import compileall
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest

from confide.client.home import Home
from confide.enclave import bytecode
from confide.enclave import measurement as m
from confide.enclave.config import EnclaveConfig
from confide.host.enclave_process import EnclaveProcess

ROOTS = ("cffi", "pyseccomp")  # closure: cffi, pycparser, pyseccomp; cffi installs bin/cffi-gen-src
SITE = Path("lib") / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
CONFIG = EnclaveConfig()


@dataclass(frozen=True)
class Install:
    root: Path  # the virtual environment
    tcb: Path  # .../src/confide/enclave
    site: Path

    def measure(self) -> str:
        return m.measure(CONFIG, tcb_root=self.tcb, path=[str(self.site)], roots=ROOTS).value


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _touch_all(root: Path, stamp: int) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            os.utime(p, (stamp, stamp))


def make_install(root: Path, *, stamp: int, installer: str) -> Install:
    """A fresh install of this commit's measured trees at `root` (see the module docstring)."""
    site = root / SITE
    # the TCB, as an editable install's source tree
    tcb = root / "src" / "confide" / "enclave"
    shutil.copytree(m.TCB_ROOT, tcb, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(m.PACKAGE_INIT, tcb.parent / "__init__.py")
    # the distributions, as pip lays them out (files outside site-packages relative to it)
    for name in m.dependency_closure(ROOTS):
        dist = metadata.distribution(name)
        info: Path | None = None
        for f in dist.files or []:
            if "__pycache__" in f.parts or f.name in {"RECORD", "INSTALLER", "direct_url.json"}:
                continue  # written below, as this install's own
            src, dst = Path(str(dist.locate_file(f))), Path(os.path.normpath(site / f))
            dst.parent.mkdir(parents=True, exist_ok=True)
            data = src.read_bytes()
            if f.parts[0] == ".." and data.startswith(b"#!"):  # console script: names its venv
                data = f"#!{root}/bin/python3.11".encode() + data[data.index(b"\n") :]
            dst.write_bytes(data)
            if f.parts[0].endswith(".dist-info"):
                info = site / f.parts[0]
        assert info is not None, name
        (info / "INSTALLER").write_text(installer + "\n")
        (info / "direct_url.json").write_text(f'{{"url": "file://{root}/wheels/{name}.whl"}}\n')
    # other mtimes, then bytecode compiled from them (each .pyc header carries its source's mtime)
    _touch_all(root, stamp)
    for tree in (site, tcb.parent):
        assert compileall.compile_dir(tree, quiet=2, workers=1)
    # RECORD: every file of the distribution, bytecode included, with its hash
    for name in m.dependency_closure(ROOTS):
        dist = metadata.distribution(name)
        info = next(site / f.parts[0] for f in dist.files or [] if f.parts[0].endswith(".dist-info"))
        rows = []
        for f in dist.files or []:
            if f.name == "RECORD" or "__pycache__" in f.parts:
                continue
            p = Path(os.path.normpath(site / f))
            rows.append(f"{f},{_record_hash(p.read_bytes())},{p.stat().st_size}")
            if p.suffix == ".py":
                pyc = Path(importlib.util.cache_from_source(str(p)))
                if pyc.exists():
                    rel = os.path.relpath(pyc, site)
                    rows.append(f"{rel},{_record_hash(pyc.read_bytes())},{pyc.stat().st_size}")
        rows.append(f"{info.name}/RECORD,,")
        (info / "RECORD").write_text("\n".join(rows) + "\n")
    return Install(root, tcb, site)


@pytest.fixture(scope="module")
def installs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Install, Install]:
    a = make_install(tmp_path_factory.mktemp("venv-a"), stamp=1_600_000_000, installer="pip")
    b = make_install(tmp_path_factory.mktemp("venv-b"), stamp=1_700_000_000, installer="uv")
    return a, b


def _copy(inst: Install, dest: Path) -> Install:
    shutil.copytree(inst.root, dest, symlinks=True)
    return Install(dest, dest / inst.tcb.relative_to(inst.root), dest / inst.site.relative_to(inst.root))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


# ---- two installs, one measurement ----------------------------------------------------------------


def test_two_installs_of_one_commit_measure_the_same(installs: tuple[Install, Install]) -> None:
    a, b = installs
    # the trees really differ where installs differ: bytecode headers, RECORD, the script's shebang
    pyc = Path(importlib.util.cache_from_source(str(a.site / "cffi" / "api.py"))).relative_to(a.root)
    assert (a.root / pyc).read_bytes() != (b.root / pyc).read_bytes()
    record = next(a.site.glob("cffi-*.dist-info")).relative_to(a.root) / "RECORD"
    assert (a.root / record).read_bytes() != (b.root / record).read_bytes()
    assert (a.root / "bin/cffi-gen-src").read_bytes() != (b.root / "bin/cffi-gen-src").read_bytes()
    assert (a.tcb / "keys.py").stat().st_mtime != (b.tcb / "keys.py").stat().st_mtime
    # ... and each measures every distribution of the closure, from its own tree
    ma = m.measure(CONFIG, tcb_root=a.tcb, path=[str(a.site)], roots=ROOTS)
    assert sorted(ma.manifest["dependencies"]) == ["cffi", "pycparser", "pyseccomp"]
    assert all(d["files"] > 0 for d in ma.manifest["dependencies"].values())
    assert all(p.is_relative_to(a.site) for _, p in m.dist_files("cffi", [str(a.site)]))
    assert ma.value == b.measure()


def test_the_measurement_reports_the_size_of_the_tcb(installs: tuple[Install, Install]) -> None:
    a, _ = installs
    tcb = m.measure(CONFIG, tcb_root=a.tcb, path=[str(a.site)], roots=ROOTS).manifest["tcb"]
    py = sorted(a.tcb.rglob("*.py"))
    assert tcb["package"] == "confide.enclave"
    assert tcb["python_files"] == len(py) > 10
    assert tcb["python_lines"] == sum(len(p.read_text().splitlines()) for p in py) > 1000
    assert tcb["files"] >= tcb["python_files"]


# ---- what runs changes the measurement --------------------------------------------------------------

CHANGED_FILES = {
    "tcb module": "src/confide/enclave/keys.py",
    "tcb sandbox module": "src/confide/enclave/sandbox/zygote.py",
    "confide/__init__.py (runs first)": "src/confide/__init__.py",
    "dependency module": f"{SITE}/cffi/api.py",
    "dependency extension": f"{SITE}/_cffi_backend.cpython-311-x86_64-linux-gnu.so",
    "dependency metadata": None,  # pycparser's METADATA (its requirements decide the closure)
    "top-level module": f"{SITE}/pyseccomp.py",
}


@pytest.mark.parametrize("what", sorted(CHANGED_FILES))
def test_a_changed_byte_in_a_measured_file_changes_the_measurement(
    installs: tuple[Install, Install], tmp_path: Path, what: str
) -> None:
    c = _copy(installs[0], tmp_path / "venv")
    before = c.measure()
    rel = CHANGED_FILES[what]
    target = next(c.site.glob("pycparser-*.dist-info")) / "METADATA" if rel is None else c.root / rel
    if not target.exists():  # the extension's name depends on the platform
        target = next(c.site.glob("_cffi_backend.*.so"))
    _flip_byte(target)
    assert c.measure() != before


PLANTED = {
    "a module beside a dependency's modules": f"{SITE}/cffi/planted.py",
    "an extension shadowing a dependency's module": f"{SITE}/pycparser/c_ast.cpython-311-x86_64-linux-gnu.so",
    "a sourceless .pyc in the TCB (importable as confide.enclave.planted)": "src/confide/enclave/planted.pyc",
    "a sourceless .pyc in a dependency": f"{SITE}/cffi/planted.pyc",
}


@pytest.mark.parametrize("what", sorted(PLANTED))
def test_a_planted_importable_file_changes_the_measurement(
    installs: tuple[Install, Install], tmp_path: Path, what: str
) -> None:
    """The host adds a file that RECORD does not list but the import system would load."""
    c = _copy(installs[0], tmp_path / "venv")
    before = c.measure()
    (c.root / PLANTED[what]).write_bytes(b"import os\nos.system('id')\n")
    assert c.measure() != before


def test_bytecode_and_mtimes_do_not_change_the_measurement(
    installs: tuple[Install, Install], tmp_path: Path
) -> None:
    c = _copy(installs[0], tmp_path / "venv")
    before = c.measure()
    # recompile every .pyc with another mtime in its header, add stale ones, touch everything
    _touch_all(c.root, 1_650_000_000)
    assert compileall.compile_dir(c.root, quiet=2, force=True, workers=1)
    (c.tcb / "__pycache__" / "gone.cpython-311.pyc").write_bytes(b"stale bytecode of a removed module")
    assert c.measure() == before


# ---- what runs is what was measured -----------------------------------------------------------------


def _plant_pyc(pkg: Path) -> None:
    """mod.py says "measured"; its cached bytecode (valid header: the source's mtime and size) says
    "planted". CPython trusts such a .pyc without reading the source."""
    src = pkg / "mod.py"
    src.write_text('VALUE = "measured"\n')
    st = src.stat()
    code = compile('VALUE = "planted"\n', str(src), "exec")
    from importlib._bootstrap_external import _code_to_timestamp_pyc  # type: ignore[attr-defined]

    pyc = Path(importlib.util.cache_from_source(str(src)))
    pyc.parent.mkdir()
    pyc.write_bytes(bytes(_code_to_timestamp_pyc(code, int(st.st_mtime), st.st_size)))
    os.utime(src, (st.st_atime, st.st_mtime))


def _import_value(flags: tuple[str, ...], where: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-I", *flags, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import probe.mod as m;"
         " print(m.VALUE)", str(where)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return out.stdout.strip()


def test_planted_bytecode_does_not_run_under_the_enclave_flags(tmp_path: Path) -> None:
    pkg = tmp_path / "probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    _plant_pyc(pkg)
    assert _import_value(bytecode.NO_CACHE_ARGS, tmp_path) == "measured"
    # with Confide's checked-hash cache too: bytecode beside the source is never looked at
    assert _import_value(bytecode.args_for(str(tmp_path / "cache")), tmp_path) == "measured"
    # and nothing was written: no bytecode for the package's __init__ appeared
    assert sorted(p.name for p in (pkg / "__pycache__").iterdir()) == ["mod.cpython-311.pyc"]
    assert _import_value((), tmp_path) == "planted"  # the attack, on a plain interpreter


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _argv(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def test_the_enclave_and_its_zygote_run_without_cached_bytecode(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.platform()
    enclave = EnclaveProcess(platform_dir=home.platform_dir, state_dir=home.state_dir)
    try:
        argv = _argv(enclave.proc.pid)
        zygotes = [
            p for p in _children(enclave.proc.pid) if "confide.enclave.sandbox.server" in " ".join(_argv(p))
        ]
        assert len(zygotes) == 1, _children(enclave.proc.pid)
        zygote_argv = _argv(zygotes[0])
    finally:
        enclave.close()
    flags = list(bytecode.interpreter_args())
    assert "--check-hash-based-pycs" in flags  # make install built the checked-hash cache
    assert argv[1 : 1 + len(flags)] == flags and argv[1 + len(flags) : 3 + len(flags)] == [
        "-m",
        "confide.enclave",
    ]
    assert zygote_argv[1:2] == ["-I"] and zygote_argv[2 : 2 + len(flags)] == flags
