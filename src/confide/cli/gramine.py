"""`confide gramine ...`: run the enclave runtime as an Intel SGX enclave under Gramine.

`confide gramine manifest` writes a Gramine manifest template for the enclave runtime
(`python -m confide.enclave --backend gramine-sgx`): the interpreter, its standard library, the
TCB package and every file of the distributions it imports are trusted files (hashed into MRENCLAVE
by gramine-sgx-sign), the sealed state directory is the only untrusted host path, sgx.debug is false,
remote attestation is DCAP, and the enclave size covers the configured memory budget. Process it with
`gramine-manifest`, sign it with `gramine-sgx-sign` (which prints MRENCLAVE: the value verifiers pin),
then start `gramine-sgx`. See docs/backends/sgx.md.
"""

from __future__ import annotations

import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import click

from confide.cli.common import friendly, write_new
from confide.enclave import measurement as measurement_module
from confide.enclave.config import EnclaveConfig

INTERPRETER_OVERHEAD_MIB = 1024  # CPython + numpy/pandas/xgboost + the zygote, measured on x86-64
DEFAULT_STATE_DIR = Path("/var/lib/confide/enclave-state")


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _pow2_mib(mib: int) -> int:
    size = 1
    while size < mib:
        size <<= 1
    return size


def enclave_size_mib(config: EnclaveConfig) -> int:
    """SGX enclave size: the memory budget plus the interpreter, rounded up to a power of two."""
    return _pow2_mib(config.memory_budget_mib + INTERPRETER_OVERHEAD_MIB)


def _distribution_paths() -> list[Path]:
    """Top-level files and directories of every distribution the TCB imports (and what they need)."""
    out: set[Path] = set()
    for name in measurement_module.dependency_closure():
        dist = metadata.distribution(name)
        base = Path(str(dist.locate_file("")))
        for f in dist.files or []:
            if not f.parts or f.parts[0] in ("..", "__pycache__") or f.parts[0].endswith(".pth"):
                continue
            out.add(base / f.parts[0])
    return sorted(out)


def _uri(path: Path) -> str:
    return f"file:{path}{'/' if path.is_dir() else ''}"


def render_manifest(config: EnclaveConfig, *, config_path: Path | None, state_dir: Path, threads: int) -> str:
    """The Gramine manifest template (TOML with gramine-manifest's Jinja variables) for this install."""
    python = Path(sys.executable).resolve()
    multiarch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    libdir = Path(sysconfig.get_config_var("LIBDIR") or stdlib.parent)
    ldlibrary = sysconfig.get_config_var("LDLIBRARY") or ""
    package_root = Path(measurement_module.TCB_ROOT).parent  # .../confide
    source_root = package_root.parent  # what goes on PYTHONPATH
    dists = _distribution_paths()
    site_dirs = sorted({p.parent for p in dists})

    trusted: list[str] = [
        "file:{{ gramine.libos }}",
        "file:{{ gramine.runtimedir() }}/",
        f"file:/lib/{multiarch}/",
        f"file:/usr/lib/{multiarch}/",
        _uri(python),
        _uri(stdlib),
    ]
    if ldlibrary.endswith(".so") or ".so." in ldlibrary:
        lib = libdir / ldlibrary
        if lib.exists():
            trusted.append(_uri(lib))
    trusted += [_uri(package_root / "__init__.py"), _uri(Path(measurement_module.TCB_ROOT))]
    trusted += [_uri(p) for p in dists]
    if config_path is not None:
        trusted.append(_uri(config_path.resolve()))

    mounts = [
        ("/lib", "file:{{ gramine.runtimedir() }}"),
        (f"/lib/{multiarch}", f"file:/lib/{multiarch}"),
        (f"/usr/lib/{multiarch}", f"file:/usr/lib/{multiarch}"),
        (str(python.parent), f"file:{python.parent}"),
        (str(stdlib), f"file:{stdlib}"),
        (str(source_root), f"file:{source_root}"),
        *((str(d), f"file:{d}") for d in site_dirs if d != source_root),
        (str(state_dir), f"file:{state_dir}"),
    ]
    if ldlibrary and (libdir / ldlibrary).exists() and libdir not in (python.parent, stdlib):
        mounts.append((str(libdir), f"file:{libdir}"))
    if config_path is not None:
        cfg = config_path.resolve()
        mounts.append((str(cfg), f"file:{cfg}"))

    argv = ["python3", "-m", "confide.enclave", "--fd", "0", "--backend", "gramine-sgx"]
    argv += ["--platform", "/nonexistent", "--state", str(state_dir)]
    if config_path is not None:
        argv += ["--config", str(config_path.resolve())]
    pythonpath = ":".join(dict.fromkeys([str(source_root), *(str(d) for d in site_dirs)]))
    lines = [
        "# Gramine manifest template for the Confide enclave runtime (written by `confide gramine manifest`).",
        "# gramine-manifest confide.manifest.template confide.manifest",
        "# gramine-sgx-sign --manifest confide.manifest --output confide.manifest.sgx   # prints MRENCLAVE",
        "# Trusted files are hashed into MRENCLAVE: any change to the runtime or a dependency changes it.",
        "",
        'loader.entrypoint.uri = "file:{{ gramine.libos }}"',
        f"libos.entrypoint = {_q(str(python))}",
        'loader.log_level = "error"',
        "loader.argv = [" + ", ".join(_q(a) for a in argv) + "]",
        f"loader.env.LD_LIBRARY_PATH = {_q(f'/lib:/lib/{multiarch}:/usr/lib/{multiarch}')}",
        f"loader.env.PYTHONPATH = {_q(pythonpath)}",
        'loader.env.PYTHONNOUSERSITE = "1"',
        'loader.env.PYTHONDONTWRITEBYTECODE = "1"',
        'loader.env.OMP_NUM_THREADS = "1"',
        'loader.env.OPENBLAS_NUM_THREADS = "1"',
        'loader.env.MKL_NUM_THREADS = "1"',
        "",
        "fs.mounts = [",
        *(f"  {{ path = {_q(p)}, uri = {_q(u)} }}," for p, u in mounts),
        '  { type = "tmpfs", path = "/tmp" },',
        "]",
        "",
        "sys.enable_sigterm_injection = true",
        'sys.stack.size = "2M"',
        "",
        f"sgx.debug = {str(config.debug).lower()}",
        'sgx.remote_attestation = "dcap"',
        f'sgx.enclave_size = "{enclave_size_mib(config)}M"  # memory budget {config.memory_budget_mib} MiB + interpreter',
        f"sgx.max_threads = {threads}",
        "sgx.edmm_enable = false",
        f"sgx.isvprodid = {config.product_id}",
        f"sgx.isvsvn = {config.security_version}",
        "",
        "sgx.trusted_files = [",
        *(f"  {_q(t)}," for t in trusted),
        "]",
        "",
        "# Sealed enclave state: the runtime encrypts it with a key derived from the SGX sealing key, so the",
        "# host may keep it; it is not part of MRENCLAVE.",
        "sgx.allowed_files = [",
        f"  {_q(_uri(state_dir) if state_dir.is_dir() else f'file:{state_dir}/')},",
        "]",
        "",
    ]
    return "\n".join(lines)


@click.group(name="gramine")
def gramine() -> None:
    """Run the enclave runtime as an Intel SGX enclave under Gramine."""


@gramine.command(name="manifest")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("confide.manifest.template"),
    show_default=True,
)
@click.option(
    "--config", type=click.Path(dir_okay=False, path_type=Path), default=None, help="enclave config (TOML)"
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_STATE_DIR,
    show_default=True,
    help="where the enclave keeps its sealed state",
)
@click.option(
    "--threads", type=click.IntRange(4, 1024), default=32, show_default=True, help="sgx.max_threads"
)
@friendly
def manifest(out: Path, config: Path | None, state_dir: Path, threads: int) -> None:
    """Write a Gramine manifest template for the enclave runtime (trusted files, sgx.debug = false,
    DCAP remote attestation, enclave size from the memory budget)."""
    cfg = EnclaveConfig.load(config)
    text = render_manifest(cfg, config_path=config, state_dir=state_dir.absolute(), threads=threads)
    write_new(out, text.encode())
    click.echo(f"Gramine manifest template written to {out}")
    click.echo(
        f"  enclave size {enclave_size_mib(cfg)} MiB, sgx.debug = {str(cfg.debug).lower()}, DCAP attestation"
    )
    if cfg.debug:
        click.echo("  WARNING: debug = true: a debug enclave's memory is readable by the host", err=True)
    if cfg.sandbox == "strict":
        click.echo(
            '  NOTE: Gramine\'s LibOS has no seccomp, Landlock or namespaces: with sandbox = "strict" the '
            "enclave refuses to start; see docs/backends/sgx.md",
            err=True,
        )
    click.echo(
        "next: gramine-manifest, then gramine-sgx-sign (it prints MRENCLAVE for the verifiers' policy)"
    )
