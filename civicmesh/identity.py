"""Identities: Ed25519 key pairs for devices and gateways, ids derived from public keys.

A device id is ``base32(sha256("civicmesh/id/v1" || public_key))[:16]`` in lower case:
16 characters of ``[a-z2-7]``, safe in MQTT topics and file names, and bound to the
key so nobody can claim an id without the matching private key.
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import nacl.exceptions
import nacl.signing

from civicmesh.errors import KeyFileError

ID_LENGTH = 16
ALG_EDDSA = -8  # COSE algorithm identifier for EdDSA (RFC 9053)
ALG_ES256 = -7  # ECDSA P-256 with SHA-256: what secure elements (ATECC608) and TPMs sign
ES256_PREFIX = "es256:"  # text form of a P-256 public key (Ed25519 keys have no prefix)


def derive_id(public_key: bytes) -> str:
    """Id of the holder of ``public_key`` (device or gateway)."""
    digest = hashlib.sha256(b"civicmesh/id/v1" + public_key).digest()
    return base64.b32encode(digest).decode("ascii").lower()[:ID_LENGTH]


def is_valid_id(value: str) -> bool:
    """True for a well-formed id (length and alphabet; not whether it is registered)."""
    return len(value) == ID_LENGTH and all(c in "abcdefghijklmnopqrstuvwxyz234567" for c in value)


class Signer(Protocol):
    """Something that signs with a private key it may never reveal (file, TPM, secure element)."""

    @property
    def key_id(self) -> str: ...

    @property
    def algorithm(self) -> int: ...

    @property
    def public_key(self) -> bytes: ...

    def sign(self, message: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class VerifyKey:
    """A public key that checks signatures made by one identity."""

    public_key: bytes
    algorithm: int = ALG_EDDSA
    # The identity this key signs for when it is not the one the key derives: a device
    # whose key was rotated keeps the id of its first key (see registry.DeviceRecord).
    bound_id: str | None = None

    def __post_init__(self) -> None:
        if self.algorithm == ALG_EDDSA:
            if len(self.public_key) != 32:
                raise ValueError("An Ed25519 public key is 32 bytes")
        elif self.algorithm == ALG_ES256:
            if len(self.public_key) != 65 or self.public_key[0] != 4:
                raise ValueError("A P-256 public key is a 65-byte uncompressed point")
        else:
            raise ValueError(f"Unsupported signature algorithm {self.algorithm}")

    @property
    def key_id(self) -> str:
        return self.bound_id or derive_id(self.public_key)

    def verify(self, message: bytes, signature: bytes) -> bool:
        """True when ``signature`` is valid over ``message``."""
        if self.algorithm == ALG_ES256:
            return _es256_verify(self.public_key, message, signature)
        try:
            nacl.signing.VerifyKey(self.public_key).verify(message, signature)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
            return False
        return True

    def to_text(self) -> str:
        text = base64.b64encode(self.public_key).decode("ascii")
        return ES256_PREFIX + text if self.algorithm == ALG_ES256 else text

    @classmethod
    def from_text(cls, text: str) -> VerifyKey:
        algorithm = ALG_EDDSA
        if text.startswith(ES256_PREFIX):
            algorithm, text = ALG_ES256, text[len(ES256_PREFIX) :]
        try:
            raw = base64.b64decode(text, validate=True)
        except ValueError:
            raise ValueError(
                "A public key is standard base64 (32 bytes Ed25519, or es256: and a 65-byte "
                "P-256 point)"
            ) from None
        return cls(raw, algorithm)


class Ed25519Signer:
    """An Ed25519 private key held in memory (loaded from a 0600 key file)."""

    algorithm = ALG_EDDSA

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self._key = signing_key
        self._public = bytes(signing_key.verify_key)
        self._id = derive_id(self._public)

    @classmethod
    def generate(cls) -> Ed25519Signer:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Ed25519Signer:
        """Deterministic key from a 32-byte seed (simulated fleets and tests)."""
        return cls(nacl.signing.SigningKey(seed))

    @property
    def key_id(self) -> str:
        return self._id

    @property
    def public_key(self) -> bytes:
        return self._public

    def verify_key(self) -> VerifyKey:
        return VerifyKey(self._public)

    def sign(self, message: bytes) -> bytes:
        return bytes(self._key.sign(message).signature)

    def save(self, path: Path, *, overwrite: bool = False) -> None:
        """Write the private key seed to ``path`` with mode 0600 (refuses to overwrite)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            raise KeyFileError(
                f"Key file {path} already exists; refusing to overwrite a device identity "
                "(move it away first if you really mean to replace it)"
            ) from None
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write("civicmesh-ed25519-v1\n")
            handle.write(base64.b64encode(bytes(self._key)).decode("ascii") + "\n")
        os.chmod(path, 0o600)

    @classmethod
    def load(cls, path: Path) -> Ed25519Signer:
        """Read a key written by :meth:`save`; refuses files readable by others."""
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            # A new key would be a new, unregistered identity: say so rather than offer it.
            raise KeyFileError(
                f"Key file {path} not found. A registered device or gateway: put its key "
                "file back (from its backup; its id is bound to that key) or fix key_file in "
                "the config. A new one: `civicmesh setup edge` (or `setup gateway`) makes a "
                "key, a config naming it, and the registration request"
            ) from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(
                f"Key file {path} is readable by other users; run `chmod 600 {path}`"
            )
        lines = path.read_text(encoding="ascii").split()
        if len(lines) != 2 or lines[0] != "civicmesh-ed25519-v1":
            raise KeyFileError(f"Key file {path} is not a civicmesh Ed25519 key file")
        try:
            seed = base64.b64decode(lines[1], validate=True)
            return cls(nacl.signing.SigningKey(seed))
        except (ValueError, nacl.exceptions.CryptoError):
            raise KeyFileError(f"Key file {path} holds a malformed key") from None


class BoundSigner:
    """A key that signs for an identity it does not derive: a device after a key
    rotation keeps its id (that of its first key) and signs with the new key."""

    def __init__(self, signer: Ed25519Signer | Es256Signer, identity: str) -> None:
        if not is_valid_id(identity):
            raise ValueError(f"Invalid identity {identity!r}")
        self._signer = signer
        self._id = identity
        self.algorithm = signer.algorithm

    @property
    def key_id(self) -> str:
        return self._id

    @property
    def public_key(self) -> bytes:
        return self._signer.public_key

    def verify_key(self) -> VerifyKey:
        return VerifyKey(self._signer.public_key, self.algorithm, bound_id=self._id)

    def sign(self, message: bytes) -> bytes:
        return self._signer.sign(message)


def identity_file(key_file: Path) -> Path:
    """Where a rotated key's identity is kept, beside the key."""
    return key_file.with_name(key_file.name + ".identity")


def load_device_signer(path: Path) -> Ed25519Signer | Es256Signer | BoundSigner:
    """The device's signer: its key (Ed25519, or an ES256 PEM key), bound to its first
    key's id after a rotation."""
    try:
        pem = path.read_bytes().startswith(b"-----BEGIN")
    except FileNotFoundError:
        pem = False
    signer: Ed25519Signer | Es256Signer = (
        Es256Signer.load(path) if pem else Ed25519Signer.load(path)
    )
    sidecar = identity_file(path)
    if sidecar.exists():
        return BoundSigner(signer, sidecar.read_text(encoding="ascii").strip())
    return signer


# ----------------------------------------------------------------------------- ES256


def _es256_verify(point: bytes, message: bytes, signature: bytes) -> bool:
    """COSE ES256: the signature is r || s, 32 bytes each (RFC 9053), not DER."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    except ImportError:  # pragma: no cover - the edge install may lack it
        raise KeyFileError("ES256 keys need the cryptography package") from None
    if len(signature) != 64:
        return False
    try:
        key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        key.verify(der, message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


class Es256Signer:
    """A P-256 key in software, signing the way a secure element or TPM does (ES256).

    It is the reference for hardware signers: a driver for an ATECC608 or a TPM offers the
    same ``key_id``, ``algorithm``, ``public_key`` and ``sign`` (r || s) and never exports
    its private key.
    """

    algorithm = ALG_ES256

    def __init__(self, private_key: object) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        if not isinstance(private_key, ec.EllipticCurvePrivateKey) or not isinstance(
            private_key.curve, ec.SECP256R1
        ):
            raise KeyFileError("An ES256 key is an ECDSA P-256 private key")
        self._key = private_key
        self._public = private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        self._id = derive_id(self._public)

    @classmethod
    def generate(cls) -> Es256Signer:
        from cryptography.hazmat.primitives.asymmetric import ec

        return cls(ec.generate_private_key(ec.SECP256R1()))

    @property
    def key_id(self) -> str:
        return self._id

    @property
    def public_key(self) -> bytes:
        return self._public

    def verify_key(self) -> VerifyKey:
        return VerifyKey(self._public, ALG_ES256)

    def save(self, path: Path) -> None:
        """PKCS#8 PEM, mode 0600, refusing to overwrite (a software stand-in for a chip)."""
        from cryptography.hazmat.primitives import serialization

        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise KeyFileError(f"Key file {path} exists; refusing to overwrite it") from None
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)

    @classmethod
    def load(cls, path: Path) -> Es256Signer:
        from cryptography.hazmat.primitives import serialization

        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(
                f"Key file {path} is readable by other users; run `chmod 600 {path}`"
            )
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), None)
        except ValueError:
            raise KeyFileError(f"Key file {path} holds a malformed key") from None
        return cls(key)

    def sign(self, message: bytes) -> bytes:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        r, s = decode_dss_signature(self._key.sign(message, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
