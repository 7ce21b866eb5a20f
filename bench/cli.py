"""CLI benchmarks, whole processes as a user runs them; results in bench/results/cli.json.

- start-up: `confide --help`, `confide verify` on real SGX evidence, `confide keygen`, a party
  command against a platform on loopback (`confide party list`-style `audit` call), and the bare
  interpreter (`python -c pass`) for reference; median of repeated runs (target: <= 150 ms of the
  command's own, i.e. whole-process time minus the platform's answer for client commands);
- `confide decrypt` of a 512 MiB sealed file on tmpfs against a plain AES-256-GCM decrypt script
  (same chunking, no header, no key wrapping) over a file of the same size, each a whole process
  (target: throughput ratio >= 0.85).

Usage: python bench/cli.py [--size-mib 512] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import machine

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VECTORS = ROOT.parent / "shared" / "testvectors"
BIN = Path(sys.executable).parent
CHUNK = 1 << 20

PLAIN_DECRYPT = r"""
import struct, sys
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
key, src, dst, chunk = bytes.fromhex(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
aead = AESGCM(key)
inbuf, outbuf = bytearray(chunk + 16), bytearray(chunk)
with open(src, "rb", buffering=0) as fi, open(dst, "wb", buffering=0) as fo:
    i = 0
    while n := fi.readinto(inbuf):
        out = memoryview(outbuf)[: n - 16]
        aead.decrypt_into(struct.pack(">Q4x", i), memoryview(inbuf)[:n], None, out)
        fo.write(out)
        i += 1
"""

PLAIN_ENCRYPT = r"""
import struct, sys
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
key, src, dst, chunk = bytes.fromhex(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
aead = AESGCM(key)
with open(src, "rb") as fi, open(dst, "wb") as fo:
    i = 0
    while data := fi.read(chunk):
        fo.write(aead.encrypt(struct.pack(">Q4x", i), data, None))
        i += 1
"""


def _timed(
    argv: list[str], env: dict[str, str], *, cwd: Path | None = None, ok: tuple[int, ...] = (0,)
) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - t0
    if done.returncode not in ok:
        raise SystemExit(f"bench: {argv[:3]} exited {done.returncode}: {done.stderr.decode()[-500:]}")
    return seconds


def _median_ms(
    argv: list[str] | Callable[[int], list[str]],
    env: dict[str, str],
    repeats: int,
    *,
    cwd: Path | None = None,
    ok: tuple[int, ...] = (0,),
) -> dict[str, Any]:
    """Median whole-process time; `argv` may be a function of the run number (for commands that
    must not repeat their output path)."""

    def make(i: int) -> list[str]:
        return argv(i) if callable(argv) else argv

    _timed(make(-1), env, cwd=cwd, ok=ok)  # warm the page cache
    samples = [_timed(make(i), env, cwd=cwd, ok=ok) for i in range(repeats)]
    return {
        "median_ms": round(statistics.median(samples) * 1000, 1),
        "min_ms": round(min(samples) * 1000, 1),
        "n": repeats,
    }


def bench_startup(repeats: int, work: Path) -> dict[str, Any]:
    env = {**os.environ, "CONFIDE_HOME": str(work / "home")}
    confide = str(BIN / "confide")
    sgx = VECTORS / "sgx"
    out: dict[str, Any] = {
        "python -c pass": _median_ms([sys.executable, "-c", "pass"], env, repeats),
        "confide --help": _median_ms([confide, "--help"], env, repeats),
        "confide task --help": _median_ms([confide, "task", "--help"], env, repeats),
        "confide keygen": _median_ms(
            lambda i: [confide, "keygen", "bench", "--out-dir", str(work / f"keys{i}")], env, repeats
        ),
        "confide verify (SGX quote)": _median_ms(
            [
                confide,
                "verify",
                str(sgx / "sgx_quote.bin"),
                "--collateral",
                str(sgx / "sgx_quote_collateral.json"),
                "--at",
                "1750377600",
            ],
            env,
            repeats,
            ok=(1,),  # fully verified, then refused by the built-in production policy (no pins)
        ),
    }
    out.update(_bench_client_command(repeats, work, env))
    return out


def _bench_client_command(repeats: int, work: Path, env: dict[str, str]) -> dict[str, Any]:
    """A party command against a real platform on loopback, and the platform's own answer time."""
    sys.path.insert(0, str(ROOT / "tests"))
    from confide.client.identity_file import save_identity
    from platform_support import Party, ServerProcess, this_build_dev_policy

    server = ServerProcess(work / "srv", workers=1).start()
    try:
        party = Party(server.url, "bench").register()
        key = work / "bench-party.key"
        save_identity(party.identity, key)
        policy = work / "dev-policy.toml"
        policy.write_text(this_build_dev_policy().to_toml())
        cenv = {
            **env,
            "CONFIDE_URL": server.url,
            "CONFIDE_IDENTITY": str(key),
            "CONFIDE_POLICY": str(policy),
            "CONFIDE_SIM_ROOT": str(server.data_dir / "platform" / "vendor_root.crt"),
        }
        command = [str(BIN / "confide"), "audit"]
        whole = _median_ms(command, cenv, repeats)
        # the calls `confide audit` makes (attestation cached: the key check, the platform id, the
        # events with their chain, the party names), answered to an in-process client
        calls = ["/v1/service", "/v1/platform", "/v1/audit?chain=true&audit_from=1", "/v1/parties"]
        answers = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for path in calls:
                party.call("GET", path).raise_for_status()
            answers.append(time.perf_counter() - t0)
        server_ms = statistics.median(answers) * 1000
        party.close()
    finally:
        server.stop()
    return {
        "confide audit (client command, platform on loopback)": whole,
        "platform answers to the same 4 calls (in-process httpx)": {"median_ms": round(server_ms, 1)},
        "confide audit, own time (whole minus the platform's answers)": {
            "median_ms": round(whole["median_ms"] - server_ms, 1)
        },
    }


def bench_decrypt(size_mib: int, repeats: int) -> dict[str, Any]:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from confide.client.identity_file import save_identity
    from confide.client.sealing import encrypt_file
    from confide.enclave.keys import Identity

    shm = Path(tempfile.mkdtemp(prefix="confide-bench-", dir="/dev/shm"))
    try:
        plain = shm / "plain.bin"
        with open(plain, "wb") as fh:
            block = os.urandom(CHUNK)
            for i in range(size_mib):
                fh.write(block[i % 7 :] + block[: i % 7])
        ident = Identity.generate("bench")
        key_file = shm / "bench.key"
        save_identity(ident, key_file)
        encrypt_file(plain, shm / "file.sealed", recipients=[ident.public])
        raw_key = AESGCM.generate_key(256).hex()
        subprocess.run(
            [sys.executable, "-c", PLAIN_ENCRYPT, raw_key, str(plain), str(shm / "raw.enc"), str(CHUNK)],
            check=True,
        )
        plain.unlink()
        env = dict(os.environ)
        confide_runs, plain_runs = [], []
        print(f"decrypt: {size_mib} MiB on tmpfs x {repeats}, alternating", file=sys.stderr)
        for _ in range(repeats):
            (shm / "out.bin").unlink(missing_ok=True)
            plain_runs.append(
                _timed(
                    [
                        sys.executable,
                        "-c",
                        PLAIN_DECRYPT,
                        raw_key,
                        str(shm / "raw.enc"),
                        str(shm / "out.bin"),
                        str(CHUNK),
                    ],
                    env,
                )
            )
            (shm / "out.bin").unlink(missing_ok=True)
            confide_runs.append(
                _timed(
                    [
                        str(BIN / "confide"),
                        "decrypt",
                        str(shm / "file.sealed"),
                        "--identity",
                        str(key_file),
                        "--out",
                        str(shm / "out.bin"),
                        "--no-progress",
                    ],
                    env,
                )
            )
        best_c, best_p = min(confide_runs), min(plain_runs)
        return {
            "file_mib": size_mib,
            "repeats": repeats,
            "confide_decrypt_best_s": round(best_c, 4),
            "plain_aes_gcm_script_best_s": round(best_p, 4),
            "confide_mib_s": round(size_mib / best_c, 1),
            "plain_mib_s": round(size_mib / best_p, 1),
            "ratio_confide_over_plain": round(best_p / best_c, 3),
            "target_ratio_min": 0.85,
            "baseline_note": "plain = a Python script with AESGCM.decrypt_into over 1 MiB chunks of a file "
            "of the same size, whole process (interpreter start, imports, I/O) like `confide decrypt`",
        }
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "cli.json")
    args = ap.parse_args()
    # measure the CLI as installed: with its bytecode written (an edited source without it would be
    # compiled on every run where PYTHONDONTWRITEBYTECODE is set)
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(ROOT / "src")], check=True, stdout=subprocess.DEVNULL
    )
    with tempfile.TemporaryDirectory(prefix="confide-bench-cli-") as tmp:
        work = Path(tmp)
        result = {
            "machine": machine(),
            "startup": bench_startup(args.repeats, work),
            "target_startup_ms_max": 150,
            "decrypt": bench_decrypt(args.size_mib, max(3, args.repeats // 2)),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, row in result["startup"].items():
        print(f"{name:<62} {row['median_ms']:>8.1f} ms")
    d = result["decrypt"]
    print(
        f"decrypt {d['file_mib']} MiB: confide {d['confide_mib_s']} MiB/s, plain {d['plain_mib_s']} MiB/s, "
        f"ratio {d['ratio_confide_over_plain']}"
    )


if __name__ == "__main__":
    main()
