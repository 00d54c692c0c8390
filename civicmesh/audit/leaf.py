"""The leaf of the audit log: one accepted batch.

Version 1, 89 bytes::

    0x01                      leaf format version
    device id                 16 ASCII bytes (identity.ID_LENGTH)
    seq                       uint64, big-endian
    SHA-256(device message)   the device's COSE_Sign1 bytes, exactly as signed
    SHA-256(gateway message)  the gateway's envelope (COSE_Sign1) around them

Its Merkle hash is ``SHA-256(0x00 || leaf)`` (RFC 9162). The leaf commits to both
signed messages, so anyone holding the raw bytes can check them against the log, while
the log itself publishes only hashes, ids and sequence numbers. Device id and seq are in
the clear so that chain continuity and "is my batch in the log" can be checked from the
leaves alone.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from civicmesh.audit import AuditError
from civicmesh.identity import ID_LENGTH, is_valid_id

LEAF_VERSION = 1
LEAF_SIZE = 1 + ID_LENGTH + 8 + 32 + 32
_FORMAT = struct.Struct(f">B{ID_LENGTH}sQ32s32s")


@dataclass(frozen=True, slots=True)
class Leaf:
    device_id: str
    seq: int
    device_sha256: bytes
    gateway_sha256: bytes

    def __post_init__(self) -> None:
        if not is_valid_id(self.device_id):
            raise ValueError(f"Invalid leaf: malformed device id {self.device_id!r}")
        if not 1 <= self.seq < 2**63:
            raise ValueError(f"Invalid leaf: seq {self.seq} out of range")
        if len(self.device_sha256) != 32 or len(self.gateway_sha256) != 32:
            raise ValueError("Invalid leaf: message hashes are 32 bytes")

    def encode(self) -> bytes:
        return _FORMAT.pack(
            LEAF_VERSION,
            self.device_id.encode("ascii"),
            self.seq,
            self.device_sha256,
            self.gateway_sha256,
        )


def make_leaf(device_id: str, seq: int, device_message: bytes, gateway_message: bytes) -> Leaf:
    """The leaf of a batch from its signed bytes."""
    return Leaf(
        device_id,
        seq,
        hashlib.sha256(device_message).digest(),
        hashlib.sha256(gateway_message).digest(),
    )


def decode_leaf(data: bytes) -> Leaf:
    """Strictly decode leaf bytes; raises :class:`AuditError` (``leaf.malformed``)."""
    if len(data) != LEAF_SIZE:
        raise AuditError(f"a leaf is {LEAF_SIZE} bytes, not {len(data)}", reason="leaf.malformed")
    version, device, seq, device_sha, gateway_sha = _FORMAT.unpack(data)
    if version != LEAF_VERSION:
        raise AuditError(f"unknown leaf version {version}", reason="leaf.malformed")
    try:
        return Leaf(device.decode("ascii"), seq, device_sha, gateway_sha)
    except (UnicodeDecodeError, ValueError) as exc:
        raise AuditError(f"malformed leaf: {exc}", reason="leaf.malformed") from None
