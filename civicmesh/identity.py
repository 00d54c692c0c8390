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
        if self.algorithm != ALG_EDDSA:
            raise ValueError(f"Unsupported signature algorithm {self.algorithm}")
        if len(self.public_key) != 32:
            raise ValueError("An Ed25519 public key is 32 bytes")

    @property
    def key_id(self) -> str:
        return self.bound_id or derive_id(self.public_key)

    def verify(self, message: bytes, signature: bytes) -> bool:
        """True when ``signature`` is valid over ``message``."""
        try:
            nacl.signing.VerifyKey(self.public_key).verify(message, signature)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError):
            return False
        return True

    def to_text(self) -> str:
        return base64.b64encode(self.public_key).decode("ascii")

    @classmethod
    def from_text(cls, text: str) -> VerifyKey:
        try:
            raw = base64.b64decode(text, validate=True)
        except ValueError:
            raise ValueError("A public key is 32 bytes in standard base64") from None
        return cls(raw)


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
            raise KeyFileError(
                f"Key file {path} not found; create one with `civicmesh edge keygen --key {path}`"
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

    def __init__(self, signer: Ed25519Signer, identity: str) -> None:
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
        return VerifyKey(self._signer.public_key, bound_id=self._id)

    def sign(self, message: bytes) -> bytes:
        return self._signer.sign(message)


def identity_file(key_file: Path) -> Path:
    """Where a rotated key's identity is kept, beside the key."""
    return key_file.with_name(key_file.name + ".identity")


def load_device_signer(path: Path) -> Ed25519Signer | BoundSigner:
    """The device's signer: its key, bound to its first key's id after a rotation."""
    signer = Ed25519Signer.load(path)
    sidecar = identity_file(path)
    if sidecar.exists():
        return BoundSigner(signer, sidecar.read_text(encoding="ascii").strip())
    return signer
