"""The simulated TEE platform: what a CPU vendor and a real CPU would provide, simulated in files.

A per-installation directory holds a simulated vendor root (like Intel's root CA), a platform
attestation key certified by it (like SGX's quoting enclave key), and a platform secret from which
sealing keys are derived (like the CPU's fused key). Anyone who can read this directory - the host
included - can forge evidence and unseal data: the simulation protects NOTHING against the host.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from .errors import ConfideError

ROOT_CN = "Confide SIMULATED Vendor Root (not a real TEE)"
PAK_CN = "Confide SIMULATED Platform Attestation Key"
SECRET_LEN = 32
_FILES = ("vendor_root.key", "vendor_root.crt", "pak.key", "pak.crt", "platform_secret")


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Confide simulation"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _cert(
    subject: str, issuer: str, pub: object, signer: Ed25519PrivateKey, *, ca: bool, years: int
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(pub)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365 * years))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(signer, None)
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


@dataclass(frozen=True)
class SimPlatform:
    directory: Path
    root_cert: x509.Certificate
    pak_cert: x509.Certificate
    pak_key: Ed25519PrivateKey
    secret: bytes

    @property
    def root_der(self) -> bytes:
        return self.root_cert.public_bytes(serialization.Encoding.DER)

    @property
    def pak_der(self) -> bytes:
        return self.pak_cert.public_bytes(serialization.Encoding.DER)

    @classmethod
    def create(cls, directory: Path) -> SimPlatform:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if any((directory / f).exists() for f in _FILES):
            raise ConfideError("a simulated platform already exists here", where=str(directory))
        root_key = Ed25519PrivateKey.generate()
        pak_key = Ed25519PrivateKey.generate()
        root = _cert(ROOT_CN, ROOT_CN, root_key.public_key(), root_key, ca=True, years=20)
        pak = _cert(PAK_CN, ROOT_CN, pak_key.public_key(), root_key, ca=False, years=10)
        pem = serialization.PrivateFormat.PKCS8
        enc = serialization.NoEncryption()
        _write_private(
            directory / "vendor_root.key", root_key.private_bytes(serialization.Encoding.PEM, pem, enc)
        )
        _write_private(directory / "pak.key", pak_key.private_bytes(serialization.Encoding.PEM, pem, enc))
        _write_private(directory / "platform_secret", os.urandom(SECRET_LEN))
        (directory / "vendor_root.crt").write_bytes(root.public_bytes(serialization.Encoding.PEM))
        (directory / "pak.crt").write_bytes(pak.public_bytes(serialization.Encoding.PEM))
        return cls.load(directory)

    @classmethod
    def load(cls, directory: Path) -> SimPlatform:
        directory = Path(directory)
        try:
            root = x509.load_pem_x509_certificate((directory / "vendor_root.crt").read_bytes())
            pak = x509.load_pem_x509_certificate((directory / "pak.crt").read_bytes())
            key = serialization.load_pem_private_key((directory / "pak.key").read_bytes(), None)
            secret = (directory / "platform_secret").read_bytes()
        except FileNotFoundError as exc:
            raise ConfideError(
                f"no simulated platform here (missing {Path(str(exc.filename)).name}); "
                "run `confide platform init`",
                where=str(directory),
            ) from None
        except (OSError, ValueError) as exc:
            raise ConfideError(f"cannot load simulated platform ({exc})", where=str(directory)) from None
        if not isinstance(key, Ed25519PrivateKey) or len(secret) != SECRET_LEN:
            raise ConfideError("simulated platform files are damaged", where=str(directory))
        return cls(directory, root, pak, key, secret)

    @classmethod
    def load_or_create(cls, directory: Path) -> SimPlatform:
        if (Path(directory) / "pak.crt").exists():
            return cls.load(directory)
        return cls.create(directory)
