"""C2SP signed notes, checkpoints and cosignatures (Ed25519).

- **Signed note** (c2sp.org/signed-note): UTF-8 text ending in a newline, a blank line,
  then signature lines ``— <name> base64(key_id[4] || signature)``. The key id of an
  Ed25519 key is ``SHA-256(name || "\\n" || 0x01 || public_key)[:4]``. Keys travel as
  *vkeys* ``<name>+<key id hex>+base64(0x01 || public_key)`` and private keys as
  ``PRIVATE+KEY+<name>+<key id hex>+base64(0x01 || seed)``, the Go ``sumdb/note`` format.
- **Checkpoint** (c2sp.org/tlog-checkpoint): the note text is the origin line, the tree
  size in decimal, the base64 root hash, then optional extension lines.
- **Cosignature** (c2sp.org/tlog-cosignature, v1): a witness key (type ``0x04`` in its
  key id) signs ``"cosignature/v1\\ntime <t>\\n" + checkpoint text``; the signature
  bytes are ``timestamp (u64 big-endian) || Ed25519 signature``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.signing

from civicmesh.audit import AuditError

ALG_ED25519 = 0x01
ALG_COSIGNATURE_V1 = 0x04
DASH = "\u2014 "  # an em dash and a space open every signature line
MAX_SIGNATURES = 100
MAX_NOTE_BYTES = 1 << 20


def _reject(message: str, reason: str = "note.malformed") -> AuditError:
    return AuditError(message, reason=reason)


def _valid_name(name: str) -> bool:
    return bool(name) and not any(c.isspace() or c == "+" for c in name) and name.isprintable()


def key_id(name: str, key_type: int, public_key: bytes) -> int:
    """The 32-bit key id of a named key (C2SP signed-note)."""
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([key_type]) + public_key).digest()
    return int.from_bytes(digest[:4], "big")


@dataclass(frozen=True, slots=True)
class NoteKey:
    """A named public key that verifies note signatures (log key or witness key)."""

    name: str
    public_key: bytes
    key_type: int = ALG_ED25519

    def __post_init__(self) -> None:
        if not _valid_name(self.name):
            raise ValueError(f"Invalid key name {self.name!r}: no spaces, no '+'")
        if len(self.public_key) != 32:
            raise ValueError("An Ed25519 public key is 32 bytes")
        if self.key_type not in (ALG_ED25519, ALG_COSIGNATURE_V1):
            raise ValueError(f"Unsupported note key type {self.key_type:#04x}")

    @property
    def id(self) -> int:
        return key_id(self.name, self.key_type, self.public_key)

    def to_vkey(self) -> str:
        blob = base64.b64encode(bytes([self.key_type]) + self.public_key).decode()
        return f"{self.name}+{self.id:08x}+{blob}"

    @classmethod
    def from_vkey(cls, text: str) -> NoteKey:
        """Parse a vkey; refuses one whose key id does not match its name and key."""
        parts = text.strip().split("+", 2)
        if len(parts) != 3 or len(parts[1]) != 8:
            raise ValueError(f"Invalid verifier key {text!r}: expected name+keyid+base64")
        name, hex_id, blob = parts
        try:
            raw = base64.b64decode(blob, validate=True)
            wanted = int(hex_id, 16)
        except (binascii.Error, ValueError):
            raise ValueError(f"Invalid verifier key {text!r}: bad key id or base64") from None
        if len(raw) != 33:
            raise ValueError(f"Invalid verifier key {text!r}: not an Ed25519 key")
        key = cls(name, raw[1:], raw[0])
        if key.id != wanted:
            raise ValueError(f"Invalid verifier key {text!r}: key id does not match the key")
        return key

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            nacl.signing.VerifyKey(self.public_key).verify(message, signature)
        except (nacl.exceptions.BadSignatureError, ValueError):
            return False
        return True


class NoteSigner:
    """A named Ed25519 private key (log key: type 0x01; witness key: type 0x04)."""

    def __init__(self, name: str, seed: bytes, key_type: int = ALG_ED25519) -> None:
        self._key = nacl.signing.SigningKey(seed)
        self.key = NoteKey(name, bytes(self._key.verify_key), key_type)
        self._seed = seed

    @classmethod
    def generate(cls, name: str, key_type: int = ALG_ED25519) -> NoteSigner:
        return cls(name, os.urandom(32), key_type)

    @property
    def name(self) -> str:
        return self.key.name

    def sign(self, message: bytes) -> bytes:
        return bytes(self._key.sign(message).signature)

    def to_skey(self) -> str:
        blob = base64.b64encode(bytes([self.key.key_type]) + self._seed).decode()
        return f"PRIVATE+KEY+{self.name}+{self.key.id:08x}+{blob}"

    @classmethod
    def from_skey(cls, text: str) -> NoteSigner:
        parts = text.strip().split("+", 4)
        if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
            raise ValueError("Invalid private key: expected PRIVATE+KEY+name+keyid+base64")
        try:
            raw = base64.b64decode(parts[4], validate=True)
            wanted = int(parts[3], 16)
        except (binascii.Error, ValueError):
            raise ValueError("Invalid private key: bad key id or base64") from None
        if len(raw) != 33:
            raise ValueError("Invalid private key: not an Ed25519 seed")
        signer = cls(parts[2], raw[1:], raw[0])
        if signer.key.id != wanted:
            raise ValueError("Invalid private key: key id does not match the key")
        return signer

    def save(self, path: Path) -> None:
        """Write the private key with mode 0600; never overwrites a key."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise AuditError(
                f"Key file {path} already exists; refusing to overwrite a log or witness key",
                reason="audit.key",
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(self.to_skey() + "\n")

    @classmethod
    def load(cls, path: Path) -> NoteSigner:
        try:
            return cls.from_skey(path.read_text())
        except OSError as exc:
            raise AuditError(f"Cannot read key file {path}: {exc}", reason="audit.key") from None
        except ValueError as exc:
            raise AuditError(f"Key file {path}: {exc}", reason="audit.key") from None


# ---------------------------------------------------------------- notes


@dataclass(frozen=True, slots=True)
class NoteSignature:
    name: str
    key_id: int
    signature: bytes  # after the 4-byte key id

    def line(self) -> str:
        blob = base64.b64encode(struct.pack(">I", self.key_id) + self.signature).decode()
        return f"{DASH}{self.name} {blob}\n"


def split_note(data: bytes) -> tuple[str, list[NoteSignature]]:
    """The text and the signature lines of a signed note (no signature is checked)."""
    if len(data) > MAX_NOTE_BYTES:
        raise _reject("note is too large")
    try:
        whole = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _reject("note is not UTF-8") from None
    if any(c != "\n" and (ord(c) < 0x20 or ord(c) == 0x7F) for c in whole):
        raise _reject("note holds control characters")
    cut = whole.rfind("\n\n")
    if cut < 0 or not whole.endswith("\n"):
        raise _reject("note has no signature block (a blank line, then signature lines)")
    text, block = whole[: cut + 1], whole[cut + 2 :]
    signatures: list[NoteSignature] = []
    for line in block.splitlines():
        if not line.startswith(DASH):
            raise _reject(f"note signature line {line[:40]!r} does not start with an em dash")
        name, _, blob = line[len(DASH) :].partition(" ")
        if not _valid_name(name) or " " in blob:
            raise _reject(f"note signature line names an invalid key {name!r}")
        try:
            raw = base64.b64decode(blob, validate=True)
        except binascii.Error:
            raise _reject(f"note signature of {name} is not base64") from None
        if len(raw) < 5:
            raise _reject(f"note signature of {name} is too short")
        signatures.append(NoteSignature(name, int.from_bytes(raw[:4], "big"), raw[4:]))
    if not signatures:
        raise _reject("note has no signatures")
    if len(signatures) > MAX_SIGNATURES:
        raise _reject(f"note has more than {MAX_SIGNATURES} signatures")
    return text, signatures


def parse_signature_line(line: str) -> NoteSignature:
    """One ``— name base64`` line (trailing newline optional)."""
    return split_note(f"x\n\n{line.rstrip(chr(10))}\n".encode())[1][0]


def sign_note(text: str, signer: NoteSigner) -> NoteSignature:
    if not text.endswith("\n") or "\n\n" in text:
        raise ValueError("A note text ends with a newline and holds no blank line")
    return NoteSignature(signer.name, signer.key.id, signer.sign(text.encode()))


def format_note(text: str, signatures: Sequence[NoteSignature]) -> bytes:
    return (text + "\n" + "".join(s.line() for s in signatures)).encode()


def verify_note_signature(text: str, signature: NoteSignature, key: NoteKey) -> bool:
    if key.key_type != ALG_ED25519 or signature.name != key.name or signature.key_id != key.id:
        return False
    return len(signature.signature) == 64 and key.verify(text.encode(), signature.signature)


# ---------------------------------------------------------------- checkpoints


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A tree head: the log's origin, its size and its root hash."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.origin or "\n" in self.origin or not self.origin.isprintable():
            raise ValueError(f"Invalid checkpoint origin {self.origin!r}")
        if not 0 <= self.size < 2**63:
            raise ValueError(f"Invalid checkpoint size {self.size}")
        if len(self.root) != 32:
            raise ValueError("A checkpoint root is 32 bytes")
        if any(not e or "\n" in e for e in self.extensions):
            raise ValueError("Checkpoint extension lines are non-empty single lines")

    def text(self) -> str:
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode()]
        return "\n".join([*lines, *self.extensions]) + "\n"

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        lines = text.split("\n")
        if len(lines) < 4 or lines[-1] != "":
            raise _reject(
                "checkpoint text needs origin, size and root lines", "checkpoint.malformed"
            )
        origin, size_text, root_text, *extensions = lines[:-1]
        if not size_text.isdigit() or (size_text.startswith("0") and size_text != "0"):
            raise _reject(f"checkpoint size {size_text!r} is not a decimal", "checkpoint.malformed")
        try:
            root = base64.b64decode(root_text, validate=True)
            return cls(origin, int(size_text), root, tuple(extensions))
        except (binascii.Error, ValueError) as exc:
            raise _reject(f"checkpoint is malformed: {exc}", "checkpoint.malformed") from None


def sign_checkpoint(checkpoint: Checkpoint, signer: NoteSigner) -> bytes:
    """The signed note of ``checkpoint`` (its origin must be the log key's name)."""
    if signer.name != checkpoint.origin:
        raise ValueError(
            f"The log key {signer.name!r} cannot sign for origin {checkpoint.origin!r}"
        )
    text = checkpoint.text()
    return format_note(text, [sign_note(text, signer)])


def _cosigned_message(text: str, timestamp: int) -> bytes:
    return f"cosignature/v1\ntime {timestamp}\n{text}".encode()


def cosign(text: str, witness: NoteSigner, timestamp: int) -> NoteSignature:
    """A witness's cosignature/v1 over a checkpoint text at ``timestamp`` (seconds)."""
    if witness.key.key_type != ALG_COSIGNATURE_V1:
        raise ValueError("A cosignature needs a witness key (type 0x04)")
    if not 0 <= timestamp < 2**63:
        raise ValueError("A cosignature timestamp is a u64 below 2**63")
    sig = witness.sign(_cosigned_message(text, timestamp))
    return NoteSignature(witness.name, witness.key.id, struct.pack(">Q", timestamp) + sig)


def verify_cosignature(text: str, signature: NoteSignature, key: NoteKey) -> int | None:
    """The cosignature's timestamp when it is valid under ``key``, else None."""
    if (
        key.key_type != ALG_COSIGNATURE_V1
        or signature.name != key.name
        or signature.key_id != key.id
        or len(signature.signature) != 72
    ):
        return None
    (timestamp,) = struct.unpack(">Q", signature.signature[:8])
    if timestamp >= 2**63 or not key.verify(
        _cosigned_message(text, timestamp), signature.signature[8:]
    ):
        return None
    return int(timestamp)


@dataclass(frozen=True, slots=True)
class OpenedCheckpoint:
    """A checkpoint whose log signature verified, with the cosigners that verified."""

    checkpoint: Checkpoint
    text: str
    signatures: tuple[NoteSignature, ...]
    cosigned_by: tuple[tuple[str, int], ...]  # (witness name, timestamp)

    @property
    def note(self) -> bytes:
        return format_note(self.text, self.signatures)


def open_checkpoint(
    note: bytes, log_key: NoteKey, witnesses: Sequence[NoteKey] = (), quorum: int = 0
) -> OpenedCheckpoint:
    """Verify a checkpoint's log signature and count its valid cosignatures.

    Raises :class:`AuditError`: ``checkpoint.signature`` when no valid signature of the
    log key is on it (a checkpoint signed by another key), ``checkpoint.origin`` when
    its origin is not the log's, ``checkpoint.witnesses`` when fewer than ``quorum`` of
    ``witnesses`` cosigned it.
    """
    text, signatures = split_note(note)
    checkpoint = Checkpoint.parse(text)
    if checkpoint.origin != log_key.name:
        raise _reject(
            f"checkpoint origin {checkpoint.origin!r} is not the log {log_key.name!r}",
            "checkpoint.origin",
        )
    if not any(verify_note_signature(text, s, log_key) for s in signatures):
        names = ", ".join(f"{s.name}+{s.key_id:08x}" for s in signatures)
        raise _reject(
            f"checkpoint of size {checkpoint.size} carries no valid signature of the log key "
            f"{log_key.name}+{log_key.id:08x} (signed by: {names})",
            "checkpoint.signature",
        )
    cosigned: list[tuple[str, int]] = []
    for witness in witnesses:
        for s in signatures:
            timestamp = verify_cosignature(text, s, witness)
            if timestamp is not None:
                cosigned.append((witness.name, timestamp))
                break
    if len(cosigned) < quorum:
        raise _reject(
            f"checkpoint of size {checkpoint.size} is cosigned by {len(cosigned)} of "
            f"{len(witnesses)} witnesses; {quorum} are required",
            "checkpoint.witnesses",
        )
    return OpenedCheckpoint(checkpoint, text, tuple(signatures), tuple(cosigned))


def add_signatures(note: bytes, extra: Sequence[NoteSignature]) -> bytes:
    """The note with ``extra`` signature lines added (a signer's older line replaced)."""
    text, signatures = split_note(note)
    replaced = {(s.name, s.key_id) for s in extra}
    kept = [s for s in signatures if (s.name, s.key_id) not in replaced]
    return format_note(text, [*kept, *extra])
