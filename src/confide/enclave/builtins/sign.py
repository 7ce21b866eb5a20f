"""Built-in sign v1 (key custody): sign a message with a private key that only the enclave sees.

Inputs: ``key`` (an unencrypted PKCS#8 private key, PEM ``-----BEGIN PRIVATE KEY-----`` or DER: RSA
of at least 2048 bits or Ed25519; its owner uploads it sealed like any dataset, so no other party
and no host ever sees it) and ``message`` (the bytes to sign, as they are). Params: ``algorithm``
(required: ``ed25519``; ``rsa-pss-sha256``, RSASSA-PSS with SHA-256, MGF1-SHA-256 and a 32-byte salt;
or ``rsa-pkcs1v15-sha256``, RSASSA-PKCS1-v1_5 with SHA-256), which must match the key's type.

Outputs, whichever of these the manifest names: ``signature`` (the raw signature bytes: 64 for
Ed25519, the modulus' length for RSA) and ``public_key`` (the key's public half, PEM
SubjectPublicKeyInfo). Nothing of the private key leaves: an encrypted, garbled, short or
mismatched key is refused with an error naming what is wrong (the key's type and size at most),
never quoting key bytes or the crypto library's own error text. Runs in the sandbox with pyca/
cryptography (the TCB's own crypto library); Ed25519 reads the message whole (at most 64 MiB), RSA
hashes it as it streams.
"""

from typing import Any, NoReturn

NAME = "sign"
ALGORITHMS = ("ed25519", "rsa-pss-sha256", "rsa-pkcs1v15-sha256")
MIN_RSA_BITS = 2048
MAX_KEY_BYTES = 1 << 16
MAX_ED25519_MESSAGE = 1 << 26
PEM_BEGIN = b"-----BEGIN "
PKCS8_LABEL = b"-----BEGIN PRIVATE KEY-----"


def _fail(message: str) -> NoReturn:
    raise ValueError(f"{NAME}: {message}")


def _der_is_pkcs8(der: bytes) -> bool:
    """PrivateKeyInfo / OneAsymmetricKey: SEQUENCE { INTEGER 0|1, SEQUENCE AlgorithmIdentifier, ..."""
    if len(der) < 8 or der[0] != 0x30:
        return False
    i = 2 + (der[1] & 0x7F if der[1] & 0x80 else 0)
    return der[i : i + 3] in (b"\x02\x01\x00", b"\x02\x01\x01") and der[i + 3 : i + 4] == b"\x30"


def load_key(raw: bytes) -> Any:
    """The private key of input `key`; every refusal names the problem, never the key's bytes."""
    from cryptography.hazmat.primitives import serialization

    if len(raw) > MAX_KEY_BYTES:
        _fail(f"input 'key' is longer than {MAX_KEY_BYTES} bytes: not a private key")
    pem = raw.lstrip().startswith(PEM_BEGIN)
    if pem:
        first = raw.lstrip().split(b"\n", 1)[0].strip()
        if b"ENCRYPTED" in first or b"Proc-Type: 4,ENCRYPTED" in raw:
            _fail("the key is encrypted: upload it unencrypted (the sealed upload protects it)")
        if first != PKCS8_LABEL:
            label = first.decode("ascii", "replace")[:40] if first.isascii() else "(not ASCII)"
            _fail(f"the key's PEM label is {label!r}: a PKCS#8 '-----BEGIN PRIVATE KEY-----' is needed")
    elif not _der_is_pkcs8(raw):
        _fail(
            "input 'key' is not an unencrypted PKCS#8 private key, PEM or DER (an encrypted key is refused)"
        )
    loader = serialization.load_pem_private_key if pem else serialization.load_der_private_key
    problem = None
    try:
        key = loader(raw, password=None)
    except TypeError:  # the library's way of saying "this key needs a password"
        problem = "the key is encrypted: upload it unencrypted (the sealed upload protects it)"
    except Exception:  # its text is the library's, and none of it leaves
        problem = "input 'key' is not a readable PKCS#8 private key (garbled or truncated)"
    if problem is not None:
        _fail(problem)
    return key


def _check(key: Any, algorithm: str) -> str:
    """The key's kind ("ed25519" or "rsa") after the size and algorithm checks."""
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    if isinstance(key, ed25519.Ed25519PrivateKey):
        kind, what = "ed25519", "an Ed25519 key"
    elif isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            _fail(f"the key is RSA of {key.key_size} bits: at least {MIN_RSA_BITS} are needed")
        kind, what = "rsa", f"an RSA key of {key.key_size} bits"
    else:
        _fail(f"the key is of type {type(key).__name__}: this built-in signs with RSA or Ed25519 keys only")
    if algorithm.split("-")[0] != kind:
        _fail(f"algorithm {algorithm!r} does not fit the key: it is {what}")
    return kind


def _sign(key: Any, algorithm: str, message: Any) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, utils

    if algorithm == "ed25519":
        data = message.read(MAX_ED25519_MESSAGE + 1)
        if len(data) > MAX_ED25519_MESSAGE:
            _fail(f"input 'message' is longer than {MAX_ED25519_MESSAGE} bytes (Ed25519 signs it whole)")
        return bytes(key.sign(data))
    digest = hashes.Hash(hashes.SHA256())
    while chunk := message.read(1 << 20):
        digest.update(chunk)
    pad: Any = (
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
        if algorithm == "rsa-pss-sha256"
        else padding.PKCS1v15()
    )
    return bytes(key.sign(digest.finalize(), pad, utils.Prehashed(hashes.SHA256())))


def run(ctx: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    if sorted(ctx.inputs) != ["key", "message"]:
        _fail(f"needs inputs 'key' and 'message', got {sorted(ctx.inputs)}")
    unknown = sorted(set(ctx.params) - {"algorithm"})
    if unknown:
        _fail(f"unknown parameter(s) {', '.join(unknown)}")
    algorithm = ctx.params.get("algorithm")
    if algorithm not in ALGORITHMS:
        _fail(f"parameter 'algorithm' must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    extra = sorted(set(ctx.outputs) - {"signature", "public_key"})
    if extra or not ctx.outputs:
        _fail(f"writes signature and/or public_key, got {sorted(ctx.outputs)}")
    key = load_key(ctx.inputs["key"].read(MAX_KEY_BYTES + 1))
    _check(key, algorithm)
    if "signature" in ctx.outputs:
        ctx.outputs["signature"].write(_sign(key, algorithm, ctx.inputs["message"]))
    if "public_key" in ctx.outputs:
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        ctx.outputs["public_key"].write(public)
