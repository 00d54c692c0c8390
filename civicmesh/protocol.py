"""civicmesh wire protocol, version 1: the one place that knows the format.

A device **batch** is a COSE_Sign1 message (RFC 9052, CBOR tag 18) whose payload is a
CBOR map with small integer keys::

    1: protocol version (1)          5: sealed_at, epoch ms
    2: device id (text, 16 chars)    6: t0, epoch ms; reading times are offsets from it
    3: seq (uint, per device, from 1) 7: readings, array of [dt_ms, metric_code, value,
    4: prev_hash (32 bytes)              quality, raw?, anomaly?]
                                     8: model version (text, "" when none)

The protected header is ``{1: -8 (EdDSA), 4: kid (device id as bytes)}``; the signature
covers ``["Signature1", protected, h'', payload]`` exactly as sent, so the payload is
never re-serialized before verification. ``prev_hash`` is the SHA-256 of the previous
batch's payload bytes (32 zero bytes for seq 1): a hash chain per device.

A gateway **envelope** is a COSE_Sign1 signed by the gateway whose payload is::

    1: protocol version (1)   3: received_at, epoch ms
    2: gateway id             4: the device's COSE_Sign1 bytes, unchanged

A **receipt** says that the receiver has taken durable custody of messages (the
gateway: buffered them; ingest: committed them to the store or to quarantine). It is a
plain CBOR map, not signed (topic ACLs guard who may publish it)::

    1: protocol version (1)   2: issuer id (text)   3: array of message digests

where a message digest is :func:`message_digest` of the exact bytes received. The
sender keeps a message until a receipt names it and re-sends it after a timeout, so a
broker that loses queued messages (restart without persistence) loses nothing.

Decoding is strict: exact types, no unknown keys, size limits, and every failure raises
a :class:`ProtocolError` subclass whose ``reason`` names what was wrong.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import cbor2

from civicmesh.errors import CivicmeshError
from civicmesh.identity import ALG_EDDSA, ALG_ES256, Signer, VerifyKey, is_valid_id
from civicmesh.metrics import BY_CODE, BY_NAME

PROTOCOL_VERSION = 1
COSE_SIGN1_TAG = 18
GENESIS_HASH = bytes(32)

MAX_MESSAGE_BYTES = 512 * 1024
MAX_READINGS = 10_000
MAX_SPAN_MS = 7 * 24 * 3600 * 1000  # readings of one batch lie within a week of t0
MAX_SEQ = 2**63 - 1
MAX_TEXT = 64
MAX_RECEIPT_DIGESTS = 4096
DIGEST_BYTES = 16
# Integers accepted as reading values: beyond 2**53 a float no longer holds them exactly,
# and a CBOR bignum (2**1100) does not fit a float at all.
MAX_INT_VALUE = 2**53
_MIN_TIME_MS = 946_684_800_000  # 2000-01-01: anything earlier is a broken clock
_MAX_TIME_MS = 4_102_444_800_000  # 2100-01-01


# --------------------------------------------------------------------------- errors


class ProtocolError(CivicmeshError):
    """A message broke the wire protocol; ``reason`` says how."""

    reason = "protocol"


class DecodeError(ProtocolError):
    """The bytes are not well-formed CBOR / COSE of the expected shape."""

    reason = "decode.malformed"


class TooLargeError(ProtocolError):
    """The message exceeds a size limit."""

    reason = "decode.too_large"


class SchemaError(ProtocolError):
    """Well-formed CBOR whose fields have the wrong type, range or keys."""

    reason = "schema.invalid"


class UnknownKeyError(ProtocolError):
    """No key is known for the signer named in the message."""

    reason = "signature.unknown_signer"


class SignatureError(ProtocolError):
    """The signature does not verify with the signer's key."""

    reason = "signature.invalid"


class ChainError(ProtocolError):
    """The batch does not continue its device's hash chain."""

    reason = "chain.broken"


class ChainGapError(ChainError):
    reason = "chain.gap"


class ChainForkError(ChainError):
    reason = "chain.fork"


class ReplayError(ChainError):
    reason = "chain.replay"


# ------------------------------------------------------------------------ value types


@dataclass(frozen=True, slots=True)
class Reading:
    """One windowed measurement of one metric."""

    ts_ms: int
    metric: str
    value: float
    quality: int = 0
    raw: float | None = None
    anomaly: float | None = None

    def __post_init__(self) -> None:
        if self.metric not in BY_NAME:
            raise ValueError(f"Invalid reading: unknown metric {self.metric!r}")
        if not _MIN_TIME_MS <= self.ts_ms <= _MAX_TIME_MS:
            raise ValueError(f"Invalid reading: time {self.ts_ms} ms is outside 2000..2100")
        if not 0 <= self.quality < 2**16:
            raise ValueError(f"Invalid reading: quality flags {self.quality} out of range")


_set = object.__setattr__


def _checked_reading(
    ts_ms: int, metric: str, value: float, quality: int, raw: float | None, anomaly: float | None
) -> Reading:
    """A Reading from values the decoder has already checked (skips ``__post_init__``)."""
    reading = object.__new__(Reading)
    _set(reading, "ts_ms", ts_ms)
    _set(reading, "metric", metric)
    _set(reading, "value", value)
    _set(reading, "quality", quality)
    _set(reading, "raw", raw)
    _set(reading, "anomaly", anomaly)
    return reading


@dataclass(frozen=True, slots=True)
class BatchPayload:
    """The content of a device batch, before signing or after verification."""

    device_id: str
    seq: int
    prev_hash: bytes
    sealed_at_ms: int
    readings: tuple[Reading, ...]
    model_version: str = ""
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if not _is_version(self.version):
            raise ValueError(f"Invalid batch: unsupported protocol version {self.version!r}")
        if not is_valid_id(self.device_id):
            raise ValueError(f"Invalid batch: malformed device id {self.device_id!r}")
        if not 1 <= self.seq <= MAX_SEQ:
            raise ValueError(f"Invalid batch: seq {self.seq} out of range")
        if len(self.prev_hash) != 32:
            raise ValueError("Invalid batch: prev_hash must be 32 bytes")
        if len(self.readings) > MAX_READINGS:
            raise ValueError(f"Invalid batch: more than {MAX_READINGS} readings")
        if len(self.model_version) > MAX_TEXT:
            raise ValueError("Invalid batch: model version too long")
        if self.readings:
            t0 = min(r.ts_ms for r in self.readings)
            if max(r.ts_ms for r in self.readings) - t0 > MAX_SPAN_MS:
                raise ValueError("Invalid batch: readings span more than a week")


@dataclass(frozen=True, slots=True)
class SignedBatch:
    """A device batch as it travels: the exact bytes plus what they say."""

    message: bytes  # the whole COSE_Sign1, as signed and sent
    payload_bytes: bytes
    payload: BatchPayload
    signature: bytes

    @property
    def hash(self) -> bytes:
        """SHA-256 of the payload bytes: what the next batch names as ``prev_hash``."""
        return hashlib.sha256(self.payload_bytes).digest()

    @property
    def device_id(self) -> str:
        return self.payload.device_id

    @property
    def seq(self) -> int:
        return self.payload.seq


@dataclass(frozen=True, slots=True)
class GatewayEnvelope:
    """A device batch relayed by a gateway, countersigned by it."""

    message: bytes
    gateway_id: str
    received_at_ms: int
    device_message: bytes
    signature: bytes = field(repr=False)


# --------------------------------------------------------------------------- COSE


def _protected_header(signer_id: str, algorithm: int = ALG_EDDSA) -> bytes:
    return cbor2.dumps({1: algorithm, 4: signer_id.encode("ascii")})


def _sig_structure(protected: bytes, payload: bytes) -> bytes:
    return cbor2.dumps(["Signature1", protected, b"", payload])


def _cose_sign1(signer: Signer, payload: bytes) -> tuple[bytes, bytes]:
    protected = _protected_header(signer.key_id, signer.algorithm)
    signature = signer.sign(_sig_structure(protected, payload))
    message = cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [protected, {}, payload, signature]))
    return message, signature


@dataclass(frozen=True, slots=True)
class _CoseParts:
    protected: bytes
    signer_id: str
    payload: bytes
    signature: bytes
    algorithm: int = ALG_EDDSA


def _loads(data: bytes, what: str) -> Any:
    """Decode exactly one CBOR item; trailing bytes are an error (cbor2 ignores them)."""
    stream = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(stream).decode()
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise DecodeError(f"{what} is not well-formed CBOR: {exc}") from None
    if stream.tell() != len(data):
        raise DecodeError(f"{what} has {len(data) - stream.tell()} trailing bytes")
    return value


def _split_cose(data: bytes, what: str) -> _CoseParts:
    if not isinstance(data, bytes | bytearray):
        raise DecodeError(f"{what} must be bytes")
    if len(data) > MAX_MESSAGE_BYTES:
        raise TooLargeError(f"{what} is {len(data)} bytes; the limit is {MAX_MESSAGE_BYTES}")
    obj = _loads(bytes(data), what)
    if not isinstance(obj, cbor2.CBORTag) or obj.tag != COSE_SIGN1_TAG:
        raise DecodeError(f"{what} is not a tagged COSE_Sign1 message")
    parts = obj.value  # cbor2 >= 6 decodes tagged arrays as tuples
    if not isinstance(parts, list | tuple) or len(parts) != 4:
        raise DecodeError(f"{what}: COSE_Sign1 must be an array of 4 items")
    protected, unprotected, payload, signature = parts
    if not isinstance(protected, bytes) or not isinstance(payload, bytes):
        raise DecodeError(f"{what}: protected header and payload must be byte strings")
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise DecodeError(f"{what}: the signature must be 64 bytes (Ed25519, or ES256 r || s)")
    if unprotected != {}:
        raise SchemaError(f"{what}: unprotected header must be empty")
    header = _loads(protected, f"{what} protected header")
    if not isinstance(header, dict) or set(header) != {1, 4}:
        raise SchemaError(f"{what}: protected header must hold exactly alg (1) and kid (4)")
    if header[1] not in (ALG_EDDSA, ALG_ES256):
        raise SchemaError(f"{what}: unsupported algorithm {header[1]!r} (EdDSA -8 or ES256 -7)")
    kid = header[4]
    if not isinstance(kid, bytes):
        raise SchemaError(f"{what}: kid must be a byte string")
    try:
        signer_id = kid.decode("ascii")
    except UnicodeDecodeError:
        raise SchemaError(f"{what}: kid is not an ASCII id") from None
    if not is_valid_id(signer_id):
        raise SchemaError(f"{what}: kid {signer_id!r} is not a well-formed id")
    return _CoseParts(protected, signer_id, payload, signature, header[1])


def _check_signature(parts: _CoseParts, key: VerifyKey, what: str) -> None:
    if key.key_id != parts.signer_id:
        raise SignatureError(f"{what}: key does not belong to signer {parts.signer_id}")
    if key.algorithm != parts.algorithm:
        raise SignatureError(f"{what}: signed with algorithm {parts.algorithm}, not the key's")
    if not key.verify(_sig_structure(parts.protected, parts.payload), parts.signature):
        raise SignatureError(f"{what}: signature does not verify for {parts.signer_id}")


# A signer id -> its key, or its keys (a device within a key rotation's overlap has two).
KeyLookup = Callable[[str], VerifyKey | Sequence[VerifyKey] | None]


def _resolve(lookup: KeyLookup, signer_id: str, what: str) -> tuple[VerifyKey, ...]:
    found = lookup(signer_id)
    if found is None or (not isinstance(found, VerifyKey) and not found):
        raise UnknownKeyError(f"{what}: no key registered for {signer_id}")
    return (found,) if isinstance(found, VerifyKey) else tuple(found)


def _check_any(parts: _CoseParts, keys: tuple[VerifyKey, ...], what: str) -> None:
    """The signature verifies under one of ``keys`` (tried in order)."""
    last: SignatureError | None = None
    for key in keys:
        try:
            _check_signature(parts, key, what)
            return
        except SignatureError as exc:
            last = exc
    assert last is not None
    raise last


# ------------------------------------------------------------------------ batches


def encode_payload(payload: BatchPayload) -> bytes:
    """Canonical CBOR of a batch payload."""
    t0 = min((r.ts_ms for r in payload.readings), default=payload.sealed_at_ms)
    rows: list[list[Any]] = []
    for r in payload.readings:
        row: list[Any] = [r.ts_ms - t0, BY_NAME[r.metric].code, float(r.value), r.quality]
        if r.raw is not None or r.anomaly is not None:
            row.append(None if r.raw is None else float(r.raw))
        if r.anomaly is not None:
            row.append(float(r.anomaly))
        rows.append(row)
    body = {
        1: payload.version,
        2: payload.device_id,
        3: payload.seq,
        4: payload.prev_hash,
        5: payload.sealed_at_ms,
        6: t0,
        7: rows,
        8: payload.model_version,
    }
    return cbor2.dumps(body, canonical=True)


def seal_batch(signer: Signer, payload: BatchPayload) -> SignedBatch:
    """Encode and sign a batch. The signer must be the device named in the payload."""
    if signer.key_id != payload.device_id:
        raise ValueError(
            f"Signer {signer.key_id} cannot seal a batch of device {payload.device_id}"
        )
    payload_bytes = encode_payload(payload)
    message, signature = _cose_sign1(signer, payload_bytes)
    if len(message) > MAX_MESSAGE_BYTES:
        raise ValueError(
            f"Batch is {len(message)} bytes, over the {MAX_MESSAGE_BYTES}-byte limit: "
            "seal fewer readings per batch"
        )
    return SignedBatch(message, payload_bytes, payload, signature)


def _int(value: Any, name: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise SchemaError(f"batch field {name} must be an integer in [{low}, {high}]")
    return value


def _is_version(value: Any) -> bool:
    """Exactly the integer 1: ``True`` and ``1.0`` compare equal to it but are not it."""
    return type(value) is int and value == PROTOCOL_VERSION


def _float(value: Any, name: str) -> float:
    # Integers are accepted for values (CBOR encoders may shrink 3.0 to 3), within the
    # range a float holds exactly; NaN and infinities are legal on the wire and are
    # judged row by row at ingest.
    if type(value) is int:
        if not -MAX_INT_VALUE <= value <= MAX_INT_VALUE:
            raise SchemaError(f"batch field {name} is an integer beyond +-2**53")
        return float(value)
    if type(value) is not float:
        raise SchemaError(f"batch field {name} must be a number")
    return value


def decode_payload(payload_bytes: bytes) -> BatchPayload:
    """Strictly decode batch payload bytes (no signature check: see :func:`open_batch`)."""
    body = _loads(payload_bytes, "batch payload")
    if not isinstance(body, dict):
        raise SchemaError("batch payload must be a CBOR map")
    expected = {1, 2, 3, 4, 5, 6, 7, 8}
    if set(body) != expected:
        missing = sorted(expected - set(body), key=str)
        extra = sorted(set(body) - expected, key=str)
        raise SchemaError(f"batch payload keys wrong: missing {missing}, unexpected {extra}")
    version = body[1]
    if not _is_version(version):
        raise SchemaError(f"unsupported protocol version {version!r}", reason="schema.version")
    device_id = body[2]
    if not isinstance(device_id, str) or not is_valid_id(device_id):
        raise SchemaError("batch field device_id is not a well-formed id")
    seq = _int(body[3], "seq", 1, MAX_SEQ)
    prev_hash = body[4]
    if not isinstance(prev_hash, bytes) or len(prev_hash) != 32:
        raise SchemaError("batch field prev_hash must be 32 bytes")
    sealed_at = _int(body[5], "sealed_at", _MIN_TIME_MS, _MAX_TIME_MS)
    t0 = _int(body[6], "t0", _MIN_TIME_MS, _MAX_TIME_MS)
    rows = body[7]
    if not isinstance(rows, list | tuple):
        raise SchemaError("batch field readings must be an array")
    if len(rows) > MAX_READINGS:
        raise TooLargeError(f"batch holds {len(rows)} readings; the limit is {MAX_READINGS}")
    model_version = body[8]
    if not isinstance(model_version, str) or len(model_version) > MAX_TEXT:
        raise SchemaError("batch field model_version must be text of at most 64 characters")
    readings: list[Reading] = []
    append = readings.append
    # The hot loop of ingest: plain type checks inline, the detailed (slower) checks and
    # messages only when a row fails them.
    for index, row in enumerate(rows):
        n = len(row) if type(row) is list or type(row) is tuple else 0
        if not 4 <= n <= 6:
            raise SchemaError(f"reading {index} must be an array of 4 to 6 items")
        dt, code, value, quality = row[0], row[1], row[2], row[3]
        if type(dt) is not int or not 0 <= dt <= MAX_SPAN_MS:
            _int(dt, f"readings[{index}].dt", 0, MAX_SPAN_MS)
        spec = BY_CODE.get(code) if type(code) is int else None
        if spec is None:
            raise SchemaError(
                f"reading {index} has unknown metric code {code!r}", reason="schema.unknown_metric"
            )
        if type(value) is not float:
            value = _float(value, f"readings[{index}].value")
        if type(quality) is not int or not 0 <= quality <= 0xFFFF:
            _int(quality, f"readings[{index}].quality", 0, 0xFFFF)
        raw = anomaly = None
        if n >= 5 and row[4] is not None:
            raw = row[4] if type(row[4]) is float else _float(row[4], f"readings[{index}].raw")
        if n == 6:
            anomaly = (
                row[5] if type(row[5]) is float else _float(row[5], f"readings[{index}].anomaly")
            )
        ts = t0 + dt
        if ts > _MAX_TIME_MS:
            raise SchemaError(f"reading {index} lies after 2100")
        append(_checked_reading(ts, spec.name, value, quality, raw, anomaly))
    try:
        return BatchPayload(
            device_id=device_id,
            seq=seq,
            prev_hash=prev_hash,
            sealed_at_ms=sealed_at,
            readings=tuple(readings),
            model_version=model_version,
        )
    except ValueError as exc:
        raise SchemaError(str(exc)) from None


def open_batch(message: bytes, lookup: KeyLookup) -> SignedBatch:
    """Verify and decode a device batch; ``lookup`` maps a device id to its key.

    The signature is checked before the payload is decoded, and the payload must name
    the same device as the signer.
    """
    parts = _split_cose(message, "device batch")
    keys = _resolve(lookup, parts.signer_id, "device batch")
    _check_any(parts, keys, "device batch")
    payload = decode_payload(parts.payload)
    if payload.device_id != parts.signer_id:
        raise SchemaError(
            f"batch names device {payload.device_id} but is signed by {parts.signer_id}",
            reason="schema.device_mismatch",
        )
    return SignedBatch(bytes(message), parts.payload, payload, parts.signature)


@dataclass(frozen=True, slots=True)
class BatchHeader:
    """The chain fields of a verified device batch (its readings not decoded)."""

    device_id: str
    seq: int
    prev_hash: bytes
    hash: bytes  # SHA-256 of the payload bytes, as SignedBatch.hash


def open_batch_header(message: bytes, lookup: KeyLookup) -> BatchHeader:
    """Verify a device batch's signature and read only what its hash chain needs.

    For auditors, who check millions of batches: the same checks as :func:`open_batch`
    on the signature and the chain fields, without building every reading.
    """
    parts = _split_cose(message, "device batch")
    _check_any(parts, _resolve(lookup, parts.signer_id, "device batch"), "device batch")
    body = _loads(parts.payload, "batch payload")
    if not isinstance(body, dict) or set(body) != {1, 2, 3, 4, 5, 6, 7, 8}:
        raise SchemaError("batch payload must be a CBOR map with keys 1..8")
    if body[1] != PROTOCOL_VERSION:
        raise SchemaError(f"unsupported protocol version {body[1]!r}", reason="schema.version")
    device_id, prev_hash = body[2], body[4]
    if not isinstance(device_id, str) or device_id != parts.signer_id:
        raise SchemaError(
            f"batch names device {device_id!r} but is signed by {parts.signer_id}",
            reason="schema.device_mismatch",
        )
    if not isinstance(prev_hash, bytes) or len(prev_hash) != 32:
        raise SchemaError("batch field prev_hash must be 32 bytes")
    seq = _int(body[3], "seq", 1, MAX_SEQ)
    return BatchHeader(device_id, seq, prev_hash, hashlib.sha256(parts.payload).digest())


def peek_signer(message: bytes) -> str:
    """The signer id of a COSE_Sign1 message, without verifying anything."""
    return _split_cose(message, "message").signer_id


# ----------------------------------------------------------------------- envelopes


def wrap_envelope(signer: Signer, device_message: bytes, received_at_ms: int) -> GatewayEnvelope:
    """Countersign a device batch for forwarding upstream; the device bytes stay unchanged."""
    body = cbor2.dumps(
        {1: PROTOCOL_VERSION, 2: signer.key_id, 3: received_at_ms, 4: bytes(device_message)},
        canonical=True,
    )
    message, signature = _cose_sign1(signer, body)
    return GatewayEnvelope(message, signer.key_id, received_at_ms, bytes(device_message), signature)


def open_envelope(message: bytes, lookup: KeyLookup) -> GatewayEnvelope:
    """Verify a gateway envelope (not the device batch inside: see :func:`open_batch`)."""
    parts = _split_cose(message, "gateway envelope")
    keys = _resolve(lookup, parts.signer_id, "gateway envelope")
    _check_any(parts, keys, "gateway envelope")
    body = _loads(parts.payload, "gateway envelope payload")
    if not isinstance(body, dict) or set(body) != {1, 2, 3, 4}:
        raise SchemaError("gateway envelope payload must be a map with keys 1..4")
    if not _is_version(body[1]):
        raise SchemaError(f"unsupported protocol version {body[1]!r}", reason="schema.version")
    if body[2] != parts.signer_id:
        raise SchemaError(
            "gateway envelope names another gateway than its signer",
            reason="schema.gateway_mismatch",
        )
    received = _int(body[3], "received_at", _MIN_TIME_MS, _MAX_TIME_MS)
    inner = body[4]
    if not isinstance(inner, bytes):
        raise SchemaError("gateway envelope must carry the device batch as a byte string")
    return GatewayEnvelope(bytes(message), parts.signer_id, received, inner, parts.signature)


# --------------------------------------------------------------------------- chain


class ChainVerdict(Enum):
    """How a batch relates to what is known of its device's chain."""

    NEXT = "next"  # continues the chain
    FIRST = "first"  # nothing known yet for the device (trust on first use of the position)
    GAP = "gap"  # seq jumps ahead: batches in between are missing (so far)
    REPLAY = "replay"  # seq already seen with the same content
    FORK = "fork"  # seq already seen with other content, or prev_hash does not link


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The last accepted batch of a device."""

    seq: int
    hash: bytes


def judge_chain(head: ChainHead | None, batch: SignedBatch) -> ChainVerdict:
    """Classify ``batch`` against the device's last accepted batch."""
    seq, prev = batch.seq, batch.payload.prev_hash
    if head is None:
        if seq == 1 and prev != GENESIS_HASH:
            return ChainVerdict.FORK
        return ChainVerdict.FIRST
    if seq == head.seq + 1:
        return ChainVerdict.NEXT if prev == head.hash else ChainVerdict.FORK
    if seq == head.seq:
        return ChainVerdict.REPLAY if batch.hash == head.hash else ChainVerdict.FORK
    if seq < head.seq:
        # Older than the head: the content cannot be compared without history, and a
        # device never legitimately goes backwards, so it is a replay either way.
        return ChainVerdict.REPLAY
    return ChainVerdict.GAP


def raise_for_verdict(verdict: ChainVerdict, batch: SignedBatch, head: ChainHead | None) -> None:
    """Turn a rejecting verdict into its named error (NEXT, FIRST and GAP pass)."""
    where = f"device {batch.device_id} seq {batch.seq}"
    last = "nothing" if head is None else f"seq {head.seq}"
    if verdict is ChainVerdict.REPLAY:
        raise ReplayError(f"{where} was already accepted (last accepted: {last})")
    if verdict is ChainVerdict.FORK:
        raise ChainForkError(f"{where} does not link to the accepted chain (last: {last})")


def make_payload(
    device_id: str,
    seq: int,
    prev_hash: bytes,
    sealed_at_ms: int,
    readings: Sequence[Reading],
    model_version: str = "",
) -> BatchPayload:
    """Convenience constructor that sorts readings by time (stable wire order)."""
    ordered = tuple(sorted(readings, key=lambda r: (r.ts_ms, BY_NAME[r.metric].code)))
    return BatchPayload(device_id, seq, prev_hash, sealed_at_ms, ordered, model_version)


def is_finite(value: float) -> bool:
    return math.isfinite(value)


# ------------------------------------------------------------------------ receipts


def message_digest(message: bytes) -> bytes:
    """The key a receipt uses for a message: SHA-256 of its exact bytes, first 16 bytes."""
    return hashlib.sha256(message).digest()[:DIGEST_BYTES]


@dataclass(frozen=True, slots=True)
class Receipt:
    """Custody of the messages with these digests passed to ``issuer``."""

    issuer: str
    digests: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not self.issuer or len(self.issuer) > MAX_TEXT:
            raise ValueError(f"Invalid receipt issuer: {self.issuer!r}")
        if len(self.digests) > MAX_RECEIPT_DIGESTS:
            raise ValueError(
                f"Invalid receipt: {len(self.digests)} digests, at most {MAX_RECEIPT_DIGESTS}"
            )
        for digest in self.digests:
            if not isinstance(digest, bytes) or len(digest) != DIGEST_BYTES:
                raise ValueError(f"Invalid receipt digest: must be {DIGEST_BYTES} bytes")


def encode_receipt(receipt: Receipt) -> bytes:
    return cbor2.dumps(
        {1: PROTOCOL_VERSION, 2: receipt.issuer, 3: list(receipt.digests)}, canonical=True
    )


def decode_receipt(data: bytes) -> Receipt:
    """Strictly decode a receipt; raises a :class:`ProtocolError` naming the problem."""
    limit = 64 + MAX_RECEIPT_DIGESTS * (DIGEST_BYTES + 1) + MAX_TEXT
    if len(data) > limit:
        raise TooLargeError(f"receipt is {len(data)} bytes; the limit is {limit}")
    body = _loads(bytes(data), "receipt")
    if not isinstance(body, dict) or set(body) != {1, 2, 3}:
        raise SchemaError("receipt must be a map with keys 1..3")
    if not _is_version(body[1]):
        raise SchemaError(f"unsupported protocol version {body[1]!r}", reason="schema.version")
    issuer, digests = body[2], body[3]
    if not isinstance(issuer, str) or not isinstance(digests, list | tuple):
        raise SchemaError("receipt issuer must be text and its digests an array")
    try:
        return Receipt(issuer, tuple(digests))
    except ValueError as exc:
        raise SchemaError(str(exc)) from None


# ---------------------------------------------------------------------- key rotation

ROTATION_KIND = "rotate-key"


@dataclass(frozen=True, slots=True)
class KeyRotation:
    """A device announcing its next key, signed by its current one."""

    device_id: str
    new_key: VerifyKey
    issued_at_ms: int
    message: bytes


def encode_rotation(current: Signer, new_public_key: bytes, issued_at_ms: int) -> bytes:
    """The announcement ``current`` signs to hand its identity over to a new key."""
    if len(new_public_key) != 32:
        raise ValueError("An Ed25519 public key is 32 bytes")
    body = cbor2.dumps(
        {
            1: PROTOCOL_VERSION,
            2: ROTATION_KIND,
            3: current.key_id,
            4: bytes(new_public_key),
            5: issued_at_ms,
        },
        canonical=True,
    )
    message, _ = _cose_sign1(current, body)
    return message


def open_rotation(message: bytes, lookup: KeyLookup) -> KeyRotation:
    """Verify a rotation announcement against the device's registered key(s)."""
    parts = _split_cose(message, "key rotation")
    _check_any(parts, _resolve(lookup, parts.signer_id, "key rotation"), "key rotation")
    body = _loads(parts.payload, "key rotation payload")
    if not isinstance(body, dict) or set(body) != {1, 2, 3, 4, 5} or body[2] != ROTATION_KIND:
        raise SchemaError("key rotation payload must be a rotate-key map with keys 1..5")
    if not _is_version(body[1]):
        raise SchemaError(f"unsupported protocol version {body[1]!r}", reason="schema.version")
    if body[3] != parts.signer_id:
        raise SchemaError("key rotation names another device than its signer")
    if not isinstance(body[4], bytes) or len(body[4]) != 32:
        raise SchemaError("key rotation must carry a 32-byte Ed25519 public key")
    issued = _int(body[5], "issued_at", _MIN_TIME_MS, _MAX_TIME_MS)
    new_key = VerifyKey(bytes(body[4]), bound_id=parts.signer_id)
    return KeyRotation(parts.signer_id, new_key, issued, bytes(message))


# ------------------------------------------------------------------ registry snapshot

SNAPSHOT_KIND = "registry"


@dataclass(frozen=True, slots=True)
class RegistrySnapshot:
    """The device and gateway registry as the central authority signed it: valid from
    ``issued_at_ms`` (also its serial: newer wins) until ``expires_at_ms``."""

    authority_id: str
    issued_at_ms: int
    expires_at_ms: int
    registry_json: bytes


def encode_registry_snapshot(
    authority: Signer, registry_json: bytes, issued_at_ms: int, expires_at_ms: int
) -> bytes:
    if expires_at_ms <= issued_at_ms:
        raise ValueError("a registry snapshot must expire after it is issued")
    body = cbor2.dumps(
        {
            1: PROTOCOL_VERSION,
            2: SNAPSHOT_KIND,
            3: issued_at_ms,
            4: expires_at_ms,
            5: bytes(registry_json),
        },
        canonical=True,
    )
    message, _ = _cose_sign1(authority, body)
    return message


def open_registry_snapshot(message: bytes, authority: VerifyKey) -> RegistrySnapshot:
    """Verify a snapshot against the configured authority key (and only that key)."""
    parts = _split_cose(message, "registry snapshot")
    _check_signature(parts, authority, "registry snapshot")
    body = _loads(parts.payload, "registry snapshot payload")
    if not isinstance(body, dict) or set(body) != {1, 2, 3, 4, 5} or body[2] != SNAPSHOT_KIND:
        raise SchemaError("registry snapshot payload must be a registry map with keys 1..5")
    if not _is_version(body[1]):
        raise SchemaError(f"unsupported protocol version {body[1]!r}", reason="schema.version")
    issued = _int(body[3], "issued_at", _MIN_TIME_MS, _MAX_TIME_MS)
    expires = _int(body[4], "expires_at", _MIN_TIME_MS, _MAX_TIME_MS)
    if not isinstance(body[5], bytes) or expires <= issued:
        raise SchemaError("registry snapshot must carry the registry and expire after issue")
    return RegistrySnapshot(parts.signer_id, issued, expires, bytes(body[5]))


# --------------------------------------------------------------------------- model releases

RELEASE_KIND = "model-release"
MAX_MODEL_BYTES = 1024 * 1024  # the edge budget is 1 MB a model
MAX_RELEASE_BYTES = MAX_MODEL_BYTES + MAX_MESSAGE_BYTES


@dataclass(frozen=True, slots=True)
class ModelRelease:
    """A model artifact with the manifest a release key signed.

    The manifest (a JSON object: name, version, sha256, size, target sensor types,
    minimum agent version, groups, runtime) is what is signed; the artifact travels beside
    it and is accepted only when its SHA-256 and size are the manifest's.
    """

    signer_id: str
    manifest: dict[str, Any]
    artifact: bytes = field(repr=False)
    message: bytes = field(repr=False)

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])


def encode_model_release(signer: Signer, manifest: dict[str, Any], artifact: bytes) -> bytes:
    """Sign ``manifest`` (it must name the artifact's sha256 and size) and pack both."""
    if manifest.get("sha256") != hashlib.sha256(artifact).hexdigest():
        raise ValueError("the manifest's sha256 is not the artifact's")
    if manifest.get("size") != len(artifact) or len(artifact) > MAX_MODEL_BYTES:
        raise ValueError(f"the artifact must be the manifest's size and at most {MAX_MODEL_BYTES}")
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    body = cbor2.dumps({1: PROTOCOL_VERSION, 2: RELEASE_KIND, 3: manifest_bytes}, canonical=True)
    signed, _ = _cose_sign1(signer, body)
    return cbor2.dumps({1: signed, 2: bytes(artifact)}, canonical=True)


_MANIFEST_TEXT = ("name", "version", "sha256", "min_agent_version")


def open_model_release(message: bytes, keys: Sequence[VerifyKey]) -> ModelRelease:
    """Verify a release against the configured release keys; check the artifact's hash.

    Raises SignatureError (``signature.invalid``) for a manifest no release key signed,
    SchemaError for a malformed one and ``release.hash`` for an artifact that is not the
    one the manifest names.
    """
    if not isinstance(message, bytes | bytearray) or len(message) > MAX_RELEASE_BYTES:
        raise TooLargeError(f"a model release is at most {MAX_RELEASE_BYTES} bytes")
    outer = _loads(bytes(message), "model release")
    if not isinstance(outer, dict) or set(outer) != {1, 2}:
        raise SchemaError("model release must be a map with keys 1 (manifest) and 2 (artifact)")
    signed, artifact = outer[1], outer[2]
    if not isinstance(signed, bytes) or not isinstance(artifact, bytes):
        raise SchemaError("model release manifest and artifact must be byte strings")
    parts = _split_cose(signed, "model release manifest")
    if not keys:
        raise SignatureError("no release key is configured: every model release is refused")
    _check_any(parts, tuple(keys), "model release manifest")
    body = _loads(parts.payload, "model release manifest")
    if not isinstance(body, dict) or set(body) != {1, 2, 3} or body[2] != RELEASE_KIND:
        raise SchemaError("model release manifest must be a release map with keys 1..3")
    if not _is_version(body[1]):
        raise SchemaError(f"unsupported protocol version {body[1]!r}", reason="schema.version")
    try:
        manifest = json.loads(body[3])
    except (TypeError, ValueError):
        raise SchemaError("model release manifest is not JSON") from None
    if not isinstance(manifest, dict):
        raise SchemaError("model release manifest must be a JSON object")
    for key in _MANIFEST_TEXT:
        if not isinstance(manifest.get(key), str) or not manifest[key]:
            raise SchemaError(f"model release manifest field {key!r} must be text")
    for key in ("target_sensor_types", "groups"):
        value = manifest.get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SchemaError(f"model release manifest field {key!r} must be a list of text")
    if not isinstance(manifest.get("runtime"), dict):
        raise SchemaError("model release manifest field 'runtime' must be an object")
    if manifest.get("size") != len(artifact):
        raise ProtocolError(
            "the artifact is not the size its manifest names", reason="release.hash"
        )
    if hashlib.sha256(artifact).hexdigest() != manifest["sha256"]:
        raise ProtocolError("the artifact's sha256 is not its manifest's", reason="release.hash")
    return ModelRelease(parts.signer_id, manifest, bytes(artifact), bytes(message))
