"""Verify: gateway envelope, device batch, every reading, and forwarded records.

Nothing here touches the store or the broker: a message goes in, and out come the batch
to write (if any) and the quarantine records of what was rejected, each with a reason.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from analytics.ingest.receive import Inbound
from analytics.store.base import StoredBatch
from civicmesh import topics
from civicmesh.metrics import BY_NAME
from civicmesh.protocol import (
    ProtocolError,
    Reading,
    SchemaError,
    SignedBatch,
    open_batch,
    open_envelope,
    peek_signer,
)
from civicmesh.quarantine import QuarantineError, QuarantineRecord
from civicmesh.registry import Registry

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Verified:
    """One uplink message after verification: a batch to write and its origin."""

    item: Inbound
    batch: StoredBatch


Outcome = tuple[Verified | None, list[QuarantineRecord]]


class Verifier:
    """Checks messages against a registry; makes the quarantine records of rejects."""

    def __init__(self, source: str, max_future_ms: int, clock: Callable[[], int]) -> None:
        self.source = source
        self._max_future_ms = max_future_ms
        self._clock = clock

    def uplink(self, item: Inbound, registry: Registry, now: int) -> Outcome:
        """Check one uplink message; the batch to store (if any) and the quarantine records."""
        message = item.message
        parsed = topics.id_from_up_topic(message.topic)
        if parsed is None or parsed[0] != "gw":
            return None, [self.record(item, "topic.invalid", "not a gateway uplink topic")]
        try:
            envelope = open_envelope(message.payload, registry.gateway_key)
        except ProtocolError as exc:
            return None, [self.record(item, exc.reason, str(exc))]
        if envelope.gateway_id != parsed[1]:
            detail = (
                f"envelope signed by gateway {envelope.gateway_id} arrived on the topic of "
                f"gateway {parsed[1]}"
            )
            return None, [self.record(item, "gateway.topic_mismatch", detail)]
        try:
            batch = open_batch(envelope.device_message, registry.device_key)
            if "\x00" in batch.payload.model_version:
                raise SchemaError("batch field model_version contains a NUL character")
        except ProtocolError as exc:
            device_id = _signer_or_none(envelope.device_message)
            return None, [self.record(item, exc.reason, str(exc), device_id=device_id)]
        kept, rejects = self._readings(item, batch, registry, now)
        stored = StoredBatch(
            device_id=batch.device_id,
            seq=batch.seq,
            payload_hash=batch.hash,
            prev_hash=batch.payload.prev_hash,
            sealed_at_ms=batch.payload.sealed_at_ms,
            model_version=batch.payload.model_version,
            gateway_id=envelope.gateway_id,
            received_at_ms=envelope.received_at_ms,
            ingested_at_ms=now,
            device_message=batch.message,
            gateway_message=envelope.message,
            readings=tuple(kept),
        )
        return Verified(item, stored), rejects

    def _readings(
        self, item: Inbound, batch: SignedBatch, registry: Registry, now: int
    ) -> tuple[list[Reading], list[QuarantineRecord]]:
        kept: list[Reading] = []
        rejects: list[QuarantineRecord] = []
        horizon = now + self._max_future_ms
        device = registry.devices.get(batch.device_id)
        registered = device.registered_at_ms if device is not None else 0
        for reading in batch.payload.readings:
            problem = reading_problem(reading, horizon, registered)
            if problem is None:
                kept.append(reading)
                continue
            reason, why = problem
            rejects.append(
                QuarantineRecord.of(
                    reason=reason,
                    detail=f"device {batch.device_id} seq {batch.seq}: {why}",
                    source=self.source,
                    topic=item.message.topic,
                    received_at_ms=item.arrived_ms,
                    payload=reading_json(reading),
                    device_id=batch.device_id,
                    seq=batch.seq,
                )
            )
        if rejects:
            log.warning(
                "device %s seq %d: %d of %d readings quarantined (%s)",
                batch.device_id,
                batch.seq,
                len(rejects),
                len(batch.payload.readings),
                ", ".join(sorted({r.reason for r in rejects})),
            )
        return kept, rejects

    def forwarded(self, item: Inbound, registry: Registry) -> QuarantineRecord:
        """A gateway's signed quarantine record as the store keeps it.

        A bad one (malformed, unsigned, forged, another gateway's) is kept as itself, under
        ingest's name and no device's, so it can frame nobody."""
        gateway_id = topics.gateway_from_topic(item.message.topic)
        if gateway_id is None:
            detail = "quarantine records are taken from gateway quarantine topics only"
            return self.record(item, "quarantine.topic_invalid", detail)
        try:
            return QuarantineRecord.from_wire(
                item.message.payload, gateway_id, registry.gateway_key
            )
        except QuarantineError as exc:
            return self.record(item, exc.reason, str(exc))

    def record(
        self,
        item: Inbound,
        reason: str,
        detail: str,
        *,
        device_id: str | None = None,
        seq: int | None = None,
    ) -> QuarantineRecord:
        log.warning(
            "quarantined message on %.256s: %s (%.300s)", item.message.topic, reason, detail
        )
        return QuarantineRecord.of(
            reason=reason,
            detail=detail,
            source=self.source,
            topic=item.message.topic,
            received_at_ms=item.arrived_ms,
            payload=item.message.payload,
            device_id=device_id,
            seq=seq,
        )


def _signer_or_none(message: bytes) -> str | None:
    try:
        return peek_signer(message)
    except ProtocolError:
        return None


def reading_problem(
    reading: Reading, horizon_ms: int, registered_ms: int = 0
) -> tuple[str, str] | None:
    """Why a verified reading must not be stored, or None when it is fine."""
    # The common case first, without building any text (this runs for every reading).
    value, raw, anomaly = reading.value, reading.raw, reading.anomaly
    spec = BY_NAME[reading.metric]
    if (
        spec.minimum <= value <= spec.maximum  # False for NaN
        and (raw is None or -math.inf < raw < math.inf)
        and (anomaly is None or -math.inf < anomaly < math.inf)
        and registered_ms <= reading.ts_ms <= horizon_ms
    ):
        return None
    where = f"{reading.metric} at {reading.ts_ms}"
    numbers = {"value": reading.value, "raw": reading.raw, "anomaly": reading.anomaly}
    for name, number in numbers.items():
        if number is not None and not math.isfinite(number):
            return "reading.non_finite", f"{where}: {name} {number!r} is not finite"
    if not spec.plausible(reading.value):
        return (
            "reading.out_of_range",
            f"{where}: value {reading.value!r} {spec.unit} outside the plausible "
            f"[{spec.minimum:g}, {spec.maximum:g}]",
        )
    if reading.ts_ms > horizon_ms:
        return (
            "reading.future",
            f"{where}: time lies {reading.ts_ms - horizon_ms} ms past the horizon",
        )
    if reading.ts_ms < registered_ms:
        return (
            "reading.before_registration",
            f"{where}: time lies {registered_ms - reading.ts_ms} ms before the device "
            "was registered",
        )
    return None


def reading_json(reading: Reading) -> bytes:
    """The rejected reading as the quarantine payload (non-finite numbers as text)."""

    def number(value: float | None) -> float | str | None:
        return value if value is None or math.isfinite(value) else repr(value)

    return json.dumps(
        {
            "ts_ms": reading.ts_ms,
            "metric": reading.metric,
            "value": number(reading.value),
            "quality": reading.quality,
            "raw": number(reading.raw),
            "anomaly": number(reading.anomaly),
        },
        separators=(",", ":"),
    ).encode("utf-8")
