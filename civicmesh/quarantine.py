"""Quarantine records: what a component rejected, why, and the bytes it rejected.

Nothing is dropped silently: a rejected message becomes a record (JSON on the wire,
``civicmesh/v1/quarantine/...``), and the central store keeps every record it sees.

A record on the wire is **signed by the gateway that made it** (``sig``: Ed25519 or
ES256 over :func:`signed_bytes`), so a client that may publish on a quarantine topic
cannot put another gateway's name, or any device's, on a record. Every field is bounded
(sizes, times, integers, text without NUL or lone surrogates), so a record that passed
:meth:`QuarantineRecord.from_wire` cannot fail the store's write.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from civicmesh.errors import CivicmeshError
from civicmesh.identity import Signer, VerifyKey, is_valid_id

MAX_KEPT_BYTES = 64 * 1024  # the raw bytes kept for inspection; the hash covers all of them
MAX_DETAIL = 1000
MAX_TOPIC = 256
MAX_SOURCE = 128
MAX_REASON = 128
MAX_PAYLOAD_SIZE = 2**31 - 1  # what the store's integer column holds
MAX_SEQ = 2**63 - 1
MIN_TIME_MS = 946_684_800_000  # 2000-01-01, as the wire protocol bounds times
MAX_TIME_MS = 4_102_444_800_000  # 2100-01-01
# A signed record on the wire: the kept bytes in base64, the texts, the signature.
MAX_WIRE_BYTES = 4 * MAX_KEPT_BYTES // 3 + 16 * 1024
_SIGNING_CONTEXT = b"civicmesh-quarantine-v1\n"
_REASON_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
# Reasons that record a harmless event, not a fault: a redelivery (a receipt lost on the
# way back) looks exactly like a replay and is kept as evidence, but it must not count
# against the device in reports or device health.
BENIGN_REASONS = frozenset({"chain.replay"})
# Reasons whose device id anyone could have caused: the id was read from a message whose
# signature did not verify, or a device's valid bytes were re-sent on another topic.
# Kept and shown, but reports do not count them against the device they name.
UNATTRIBUTED_PREFIXES = ("signature.", "decode.", "topic.", "envelope.", "gateway.")


class QuarantineError(CivicmeshError):
    """A quarantine record from the wire is malformed, unsigned or forged."""

    reason = "quarantine.malformed"


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
            reason=_clean(reason)[:MAX_REASON],
            detail=_clean(detail)[:MAX_DETAIL],
            source=_clean(source)[:MAX_SOURCE],
            topic=_clean(topic)[:MAX_TOPIC],
            received_at_ms=received_at_ms,
            payload_size=min(len(payload), MAX_PAYLOAD_SIZE),
            payload_sha256=hashlib.sha256(payload).hexdigest(),
            payload_b64=base64.b64encode(payload[:MAX_KEPT_BYTES]).decode("ascii"),
            device_id=device_id,
            seq=seq,
        )

    @property
    def benign(self) -> bool:
        """A harmless event kept as evidence (see BENIGN_REASONS)."""
        return self.reason in BENIGN_REASONS

    def to_json(self) -> bytes:
        """The unsigned record (what a store or a log keeps); the wire takes :meth:`to_wire`."""
        return json.dumps(asdict(self), separators=(",", ":")).encode("utf-8")

    def to_wire(self, signer: Signer) -> bytes:
        """The record signed by ``signer`` (the gateway that made it)."""
        obj: dict[str, Any] = asdict(self)
        obj["sig"] = base64.b64encode(signer.sign(signed_bytes(self))).decode("ascii")
        return json.dumps(obj, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> QuarantineRecord:
        """Parse and check an unsigned record; raises QuarantineError on anything malformed."""
        record, _ = _parse(data, signed=False)
        return record

    @classmethod
    def from_wire(
        cls, data: bytes, gateway_id: str, key_for: Callable[[str], VerifyKey | None]
    ) -> QuarantineRecord:
        """A record that arrived on ``gateway_id``'s quarantine topic, checked and verified.

        Raises QuarantineError with reason ``quarantine.malformed`` (fields),
        ``quarantine.unsigned``, ``quarantine.unknown_gateway``, ``quarantine.source_mismatch``
        (it names another source than the topic's gateway) or ``quarantine.forged``.
        """
        record, signature = _parse(data, signed=True)
        if record.source != f"gw:{gateway_id}":
            raise QuarantineError(
                f"record names source {record.source!r} but arrived on the topic of gateway "
                f"{gateway_id}",
                reason="quarantine.source_mismatch",
            )
        key = key_for(gateway_id) if is_valid_id(gateway_id) else None
        if key is None:
            raise QuarantineError(
                f"record of gateway {gateway_id}, which is not an active registered gateway",
                reason="quarantine.unknown_gateway",
            )
        if signature is None or not key.verify(signed_bytes(record), signature):
            raise QuarantineError(
                f"record signature does not verify with gateway {gateway_id}'s key",
                reason="quarantine.forged",
            )
        return record

    def payload(self) -> bytes:
        return base64.b64decode(self.payload_b64)


def signed_bytes(record: QuarantineRecord) -> bytes:
    """What a record's signature covers: every field, in a fixed order and encoding."""
    body = json.dumps(asdict(record), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return _SIGNING_CONTEXT + body.encode("ascii")


def _clean(text: str) -> str:
    """Text a store can keep: no NUL, no lone surrogates (each becomes U+FFFD)."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


_FIELDS = {f.name for f in fields(QuarantineRecord)}


def _parse(data: bytes, *, signed: bool) -> tuple[QuarantineRecord, bytes | None]:
    if len(data) > MAX_WIRE_BYTES:
        raise QuarantineError(f"quarantine record of {len(data)} bytes (at most {MAX_WIRE_BYTES})")
    try:
        obj: Any = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise QuarantineError(f"quarantine record is not JSON: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise QuarantineError("quarantine record must be a JSON object")
    signature: bytes | None = None
    if signed:
        sig = obj.pop("sig", None)
        if sig is None:
            raise QuarantineError(
                "quarantine record carries no signature", reason="quarantine.unsigned"
            )
        if not isinstance(sig, str) or len(sig) > 200:
            raise QuarantineError("quarantine record signature is not base64 text")
        try:
            signature = base64.b64decode(sig, validate=True)
        except binascii.Error:
            raise QuarantineError("quarantine record signature is not base64") from None
    unknown = sorted(set(obj) - _FIELDS)
    if unknown:
        raise QuarantineError(f"quarantine record has unknown fields: {', '.join(unknown)[:200]}")
    try:
        record = QuarantineRecord(**obj)
    except TypeError as exc:
        raise QuarantineError(f"quarantine record has wrong fields: {exc}") from None
    _check(record)
    return record, signature


def _text(record: QuarantineRecord, name: str, limit: int) -> str:
    value = getattr(record, name)
    if not isinstance(value, str):
        raise QuarantineError(f"quarantine record field {name} must be text")
    if len(value) > limit:
        raise QuarantineError(f"quarantine record field {name} is over {limit} characters")
    if _clean(value) != value:
        raise QuarantineError(f"quarantine record field {name} contains a NUL or a lone surrogate")
    return value


def _int(value: object, name: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise QuarantineError(
            f"quarantine record field {name} must be an integer in [{low}, {high}]"
        )
    return value


def _check(record: QuarantineRecord) -> None:
    """Raises QuarantineError, naming the field, for anything a store would refuse."""
    reason = _text(record, "reason", MAX_REASON)
    if not _REASON_PATTERN.fullmatch(reason):
        raise QuarantineError("quarantine record field reason must be dotted lower-case words")
    _text(record, "detail", MAX_DETAIL)
    _text(record, "source", MAX_SOURCE)
    _text(record, "topic", MAX_TOPIC)
    if not _SHA256_PATTERN.fullmatch(_text(record, "payload_sha256", 64)):
        raise QuarantineError("quarantine record field payload_sha256 must be 64 hex digits")
    kept = _text(record, "payload_b64", 4 * MAX_KEPT_BYTES // 3 + 4)
    _int(record.received_at_ms, "received_at_ms", MIN_TIME_MS, MAX_TIME_MS)
    size = _int(record.payload_size, "payload_size", 0, MAX_PAYLOAD_SIZE)
    if record.device_id is not None and (
        not isinstance(record.device_id, str) or not is_valid_id(record.device_id)
    ):
        raise QuarantineError("quarantine record field device_id must be a device id or null")
    if record.seq is not None:
        _int(record.seq, "seq", 0, MAX_SEQ)
    try:
        raw = base64.b64decode(kept, validate=True)
    except binascii.Error as exc:
        raise QuarantineError(f"quarantine record payload_b64 is not base64: {exc}") from None
    if len(raw) > min(size, MAX_KEPT_BYTES):
        raise QuarantineError("quarantine record keeps more bytes than its payload_size")
