"""Quarantine records: what a component rejected, why, and the bytes it rejected.

Nothing is dropped silently: a rejected message becomes a record (JSON on the wire,
``civicmesh/v1/quarantine/...``), and the central store keeps every record it sees.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

MAX_KEPT_BYTES = 64 * 1024  # the raw bytes kept for inspection; the hash covers all of them


@dataclass(frozen=True, slots=True)
class QuarantineRecord:
    reason: str  # machine-readable, e.g. "signature.invalid", "chain.replay"
    detail: str  # for the person who reads it
    source: str  # "gw:<id>" or "ingest:<worker>"
    topic: str  # where the rejected message arrived
    received_at_ms: int
    payload_size: int
    payload_sha256: str
    payload_b64: str  # up to MAX_KEPT_BYTES of the rejected bytes
    device_id: str | None = None
    seq: int | None = None

    @classmethod
    def of(
        cls,
        *,
        reason: str,
        detail: str,
        source: str,
        topic: str,
        received_at_ms: int,
        payload: bytes,
        device_id: str | None = None,
        seq: int | None = None,
    ) -> QuarantineRecord:
        return cls(
            reason=reason,
            detail=detail[:1000],
            source=source,
            topic=topic[:256],
            received_at_ms=received_at_ms,
            payload_size=len(payload),
            payload_sha256=hashlib.sha256(payload).hexdigest(),
            payload_b64=base64.b64encode(payload[:MAX_KEPT_BYTES]).decode("ascii"),
            device_id=device_id,
            seq=seq,
        )

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> QuarantineRecord:
        """Parse a record; raises ValueError on anything malformed."""
        try:
            obj: Any = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"quarantine record is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ValueError("quarantine record must be a JSON object")
        try:
            return cls(**obj)
        except TypeError as exc:
            raise ValueError(f"quarantine record has wrong fields: {exc}") from None

    def payload(self) -> bytes:
        return base64.b64decode(self.payload_b64)
