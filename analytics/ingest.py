"""The ingest worker: MQTT -> verify -> one idempotent store write per group -> acknowledge.

Flow: paho's network thread hands each message to a bounded queue; the worker thread
takes up to ``max_batch_messages`` (or whatever arrived within ``max_batch_delay_ms``),
verifies every gateway envelope and the device batch inside it, and writes the group
with ONE ``Store.write_batches`` call plus the quarantine records of everything rejected.
Only after the store returned are the group's messages acknowledged to the broker, so a
crash before the commit means a redelivery, never a loss; the store is idempotent on
``(device_id, seq)``, so a redelivery stores nothing twice (it is counted as a duplicate
and recorded as a ``chain.replay`` quarantine entry, since a replay looks the same).

After the acknowledgement each gateway gets a receipt naming the messages of its that
are now committed, stored or quarantined; the gateway forwards again whatever no receipt
named within its ``resend_after_s``, so a broker that lost a queued message loses nothing.

When the store fails (database down) the group is kept unacknowledged and retried with
backoff; the queue fills, the MQTT thread waits, and further messages stay queued at the
broker until the database is back.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from analytics.settings import AnalyticsSettings, IngestSettings
from analytics.store.base import DeviceHealth, Store, StoredBatch, StoreError, WriteOutcome
from civicmesh import health, topics
from civicmesh.errors import CivicmeshError, MqttError, RegistryError
from civicmesh.metrics import BY_NAME
from civicmesh.mqtt import Message, MqttLink
from civicmesh.protocol import (
    MAX_RECEIPT_DIGESTS,
    ProtocolError,
    Reading,
    Receipt,
    SchemaError,
    encode_receipt,
    message_digest,
    open_batch,
    open_envelope,
    peek_signer,
)
from civicmesh.quarantine import QuarantineRecord
from civicmesh.registry import Registry, RegistryFile
from civicmesh.timeutil import now_ms

log = logging.getLogger(__name__)

RETRY_MIN_S = 0.5
RETRY_MAX_S = 10.0
SYNC_RETRY_S = 5.0
_PUT_POLL_S = 0.5
_STOP_JOIN_S = 30.0


class IngestError(CivicmeshError):
    """The ingest worker was used wrongly (started twice, ...)."""

    reason = "ingest.error"


@dataclass(frozen=True, slots=True)
class _Inbound:
    """A received message waiting for its group to be written."""

    message: Message
    arrived_ms: int
    is_quarantine: bool


@dataclass(slots=True)
class _Verified:
    """One uplink message after verification: a batch to write and its origin."""

    item: _Inbound
    batch: StoredBatch


class IngestWorker:
    """One ingest worker. ``link`` is made by the caller with ``persistent=True``,
    ``manual_ack=True`` and a client id that stays the same across restarts.

    ``settings`` is the whole :class:`AnalyticsSettings` or just its ``ingest`` part.
    The link may be connected already; if it is not, :meth:`start` registers the
    subscriptions first and then connects, so messages the broker queued while the worker
    was away find their handler the moment they arrive.
    """

    def __init__(
        self,
        settings: AnalyticsSettings | IngestSettings,
        store: Store,
        registry: RegistryFile,
        link: MqttLink,
        worker_id: str,
        *,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        if isinstance(settings, AnalyticsSettings):
            self._settings = settings.ingest
            self._protocol_choice = settings.mqtt.protocol
        else:
            self._settings = settings
            self._protocol_choice = "auto"
        self.store = store
        self.registry = registry
        self.link = link
        self.worker_id = worker_id
        self.source = f"ingest:{worker_id}"
        self._clock = clock
        self._queue: queue.Queue[_Inbound] = queue.Queue(self._settings.queue_max_messages)
        self._closed = threading.Event()  # no more messages are accepted
        self._stopping = threading.Event()  # finish the current group, then leave
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._counters: Counter[str] = Counter()
        self._quarantined: Counter[str] = Counter()
        self._health: dict[str, health.HealthReport] = {}  # newest per device, not yet stored
        self._last_lag_ms: int | None = None
        self._last_write_ms: int | None = None
        self._pending = 0
        self._store_ok = True
        self._registry_snapshot: Registry | None = None
        self._synced_registry: Registry | None = None
        self._next_sync_attempt = 0.0  # monotonic; a failed sync is retried after a pause

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Sync the registry's devices, subscribe, and start the worker thread."""
        if self._thread is not None:
            raise IngestError(f"ingest worker {self.worker_id} is already started")
        self._sync_devices()
        uplink = topics.shared(topics.ALL_GATEWAY_UP, self._settings.shared_group)
        if self.link.is_connected:
            if self.link.protocol_version != 5:
                uplink = topics.ALL_GATEWAY_UP
            self.link.subscribe(uplink, self._on_uplink)
            self.link.subscribe(topics.ALL_QUARANTINE, self._on_quarantine)
            self.link.subscribe(topics.ALL_GATEWAY_HEALTH, self._on_health, qos=0)
        else:
            if self._protocol_choice == "3.1.1":
                uplink = topics.ALL_GATEWAY_UP
            self.link.subscribe(uplink, self._on_uplink)
            self.link.subscribe(topics.ALL_QUARANTINE, self._on_quarantine)
            self.link.subscribe(topics.ALL_GATEWAY_HEALTH, self._on_health, qos=0)
            self.link.connect()
            if self.link.protocol_version != 5 and uplink != topics.ALL_GATEWAY_UP:
                # A 3.1.1 broker (amqtt) has no shared subscriptions: one worker, plain filter.
                # The shared filter stays registered but matches nothing there.
                uplink = topics.ALL_GATEWAY_UP
                self.link.subscribe(uplink, self._on_uplink)
        self._thread = threading.Thread(
            target=self._run, name=f"ingest-{self.worker_id}", daemon=True
        )
        self._thread.start()
        log.info(
            "ingest worker %s subscribed to %s (MQTT %s)",
            self.worker_id,
            uplink,
            "5" if self.link.protocol_version == 5 else "3.1.1",
        )

    def stop(self, timeout: float = _STOP_JOIN_S) -> None:
        """Finish and acknowledge the current group, then stop.

        Messages still queued are not acknowledged: the broker redelivers them to the
        next worker (or this one, restarted).
        """
        self._stopping.set()
        self._closed.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("ingest worker %s did not stop within %.0f s", self.worker_id, timeout)
        left = self._queue.qsize()
        if left:
            log.info(
                "ingest worker %s stopped; %d unacknowledged messages stay with the broker",
                self.worker_id,
                left,
            )

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        """Counters for health endpoints and logs (a copy; safe from any thread)."""
        with self._lock:
            return {
                "worker_id": self.worker_id,
                "running": self.running,
                "received": self._counters["received"],
                "verified": self._counters["verified"],
                "written_batches": self._counters["written_batches"],
                "written_readings": self._counters["written_readings"],
                "duplicates": self._counters["duplicates"],
                "conflicts": self._counters["conflicts"],
                "quarantined": sum(self._quarantined.values()),
                "quarantined_by_reason": dict(sorted(self._quarantined.items())),
                "store_errors": self._counters["store_errors"],
                "health_dropped": self._counters["health_dropped"],
                "internal_errors": self._counters["internal_errors"],
                "store_ok": self._store_ok,
                "acked": self._counters["acked"],
                "queued": self._queue.qsize(),
                "pending": self._pending,
                "last_lag_ms": self._last_lag_ms,
                "last_write_ms": self._last_write_ms,
            }

    # ----------------------------------------------------------- MQTT callbacks

    def _on_uplink(self, message: Message) -> None:
        self._enqueue(_Inbound(message, self._clock(), is_quarantine=False))

    def _on_quarantine(self, message: Message) -> None:
        self._enqueue(_Inbound(message, self._clock(), is_quarantine=True))

    def _on_health(self, message: Message) -> None:
        """Keep the newest health report per device; the worker stores them (paho's
        thread must not wait on the database)."""
        gateway_id = topics.gateway_from_health_topic(message.topic)
        try:
            if gateway_id is None:
                raise health.HealthError(f"not a gateway health topic: {message.topic}")
            report = health.from_relay(message.payload, gateway_id)
        except health.HealthError as exc:
            with self._lock:
                self._counters["health_dropped"] += 1
            log.warning("health report dropped: %s", exc)
            return
        with self._lock:
            old = self._health.get(report.device_id)
            if old is None or old.reported_ms <= report.reported_ms:
                self._health[report.device_id] = report

    def _store_health(self) -> None:
        with self._lock:
            reports, self._health = list(self._health.values()), {}
        if not reports:
            return
        registry = self._current_registry()
        kept = [
            DeviceHealth(
                r.device_id,
                r.reported_ms,
                self._clock(),
                r.gateway_id,
                r.outbox_batches,
                r.outbox_readings,
                r.model_version,
                r.agent_version,
            )
            for r in reports
            # only what a registered gateway relays for a registered device
            if registry.gateway_key(r.gateway_id) is not None and r.device_id in registry.devices
        ]
        try:
            self.store.save_device_health(kept)
        except StoreError as exc:
            log.info("device health not stored (%s); the next reports will be", exc)

    def _enqueue(self, item: _Inbound) -> None:
        """Runs in paho's thread: waiting here stops paho reading more (back-pressure)."""
        with self._lock:
            self._counters["received"] += 1
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=_PUT_POLL_S)
                return
            except queue.Full:
                continue
        # Stopping: not acknowledged, so the broker keeps it for the next session.
        log.debug(
            "ingest worker %s stopping; message on %s left to the broker",
            self.worker_id,
            item.message.topic,
        )

    # ---------------------------------------------------------------- worker loop

    def _run(self) -> None:
        while True:
            group = self._take_group()
            self._maybe_sync_devices()
            self._store_health()
            if group:
                try:
                    self._process(group)
                except Exception:
                    # A bug must not end ingest: the group stays unacknowledged (the broker
                    # redelivers it on the next session) and the worker goes on.
                    log.exception(
                        "ingest worker %s failed on a group of %d messages",
                        self.worker_id,
                        len(group),
                    )
                    with self._lock:
                        self._counters["internal_errors"] += 1
                        self._pending = 0
            elif self._stopping.is_set():
                return
            if self._stopping.is_set():
                return

    def _take_group(self) -> list[_Inbound]:
        """Up to ``max_batch_messages``, waiting at most ``max_batch_delay_ms`` after the first."""
        limit = self._settings.max_batch_messages
        delay_s = self._settings.max_batch_delay_ms / 1000
        try:
            first = self._queue.get(timeout=min(delay_s, _PUT_POLL_S))
        except queue.Empty:
            return []
        group = [first]
        deadline = time.monotonic() + delay_s
        while len(group) < limit:
            try:
                group.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping.is_set():
                break
            try:
                group.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return group

    def _process(self, group: list[_Inbound]) -> None:
        registry = self._current_registry()
        now = self._clock()
        verified: list[_Verified] = []
        rejects: list[QuarantineRecord] = []
        forwarded: list[QuarantineRecord] = []
        for item in group:
            if item.is_quarantine:
                forwarded.append(self._forwarded_record(item))
            else:
                outcome = self._verify(item, registry, now)
                rejects.extend(outcome[1])
                if outcome[0] is not None:
                    verified.append(outcome[0])
        with self._lock:
            self._counters["verified"] += len(verified)
            self._pending = len(group)
        if not self._write(verified, rejects, forwarded):
            with self._lock:
                self._pending = 0
            return  # stopping with the store down: nothing acknowledged, broker redelivers
        for item in group:
            self.link.ack(item.message)
        self._send_receipts(group)
        with self._lock:
            self._counters["acked"] += len(group)
            self._pending = 0

    def _send_receipts(self, group: Sequence[_Inbound]) -> None:
        """Tell each gateway which of its messages are now committed (stored or quarantined).

        At QoS 0: a lost receipt only makes the gateway forward the message again,
        which the store recognises as a duplicate and this worker receipts again.
        """
        by_gateway: dict[str, list[bytes]] = {}
        for item in group:
            gateway_id = topics.gateway_from_topic(item.message.topic)
            if gateway_id is not None:
                by_gateway.setdefault(gateway_id, []).append(message_digest(item.message.payload))
        for gateway_id, digests in by_gateway.items():
            for start in range(0, len(digests), MAX_RECEIPT_DIGESTS):
                receipt = Receipt(self.source, tuple(digests[start : start + MAX_RECEIPT_DIGESTS]))
                try:
                    self.link.publish(
                        topics.gateway_receipt(gateway_id), encode_receipt(receipt), qos=0
                    )
                except MqttError as exc:
                    log.info("receipt to gateway %s not sent (%s)", gateway_id, exc)

    def _write(
        self,
        verified: list[_Verified],
        rejects: list[QuarantineRecord],
        forwarded: list[QuarantineRecord],
    ) -> bool:
        """Store the group, retrying with backoff while the store fails.

        Returns False only when asked to stop while the store still fails.
        """
        outcomes: list[WriteOutcome] | None = None if verified else []
        delay = RETRY_MIN_S
        while True:
            try:
                if outcomes is None:
                    outcomes = self.store.write_batches([v.batch for v in verified])
                # Outcome records are built once: a retry of add_quarantine alone must not
                # turn the batches just inserted into "duplicates".
                records = [*forwarded, *rejects, *self._outcome_records(verified, outcomes)]
                self.store.add_quarantine(records)
            except StoreError as exc:
                with self._lock:
                    self._counters["store_errors"] += 1
                    self._store_ok = False
                if self._stopping.is_set():
                    log.warning(
                        "ingest worker %s stopping while the store fails (%s); %d messages "
                        "left unacknowledged for redelivery",
                        self.worker_id,
                        exc,
                        len(verified) + len(rejects) + len(forwarded),
                    )
                    return False
                log.warning(
                    "store write failed (%s); keeping %d batches unacknowledged, retry in %.1f s",
                    exc,
                    len(verified),
                    delay,
                )
                self._stopping.wait(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            self._account(verified, outcomes, records)
            return True

    def _account(
        self,
        verified: Sequence[_Verified],
        outcomes: Sequence[WriteOutcome],
        records: Sequence[QuarantineRecord],
    ) -> None:
        now = self._clock()
        inserted = [
            v for v, o in zip(verified, outcomes, strict=True) if o is WriteOutcome.INSERTED
        ]
        with self._lock:
            if not self._store_ok:
                log.info("store is writable again; ingest worker %s resumes", self.worker_id)
            self._store_ok = True
            self._counters["written_batches"] += len(inserted)
            self._counters["written_readings"] += sum(len(v.batch.readings) for v in inserted)
            self._counters["duplicates"] += outcomes.count(WriteOutcome.DUPLICATE)
            self._counters["conflicts"] += outcomes.count(WriteOutcome.CONFLICT)
            for record in records:
                self._quarantined[record.reason] += 1
            if verified:
                self._last_lag_ms = now - max(v.batch.received_at_ms for v in verified)
                self._last_write_ms = now

    # -------------------------------------------------------------- verification

    def _verify(
        self, item: _Inbound, registry: Registry, now: int
    ) -> tuple[_Verified | None, list[QuarantineRecord]]:
        """Check one uplink message; the batch to store (if any) and the quarantine records."""
        message = item.message
        parsed = topics.id_from_up_topic(message.topic)
        if parsed is None or parsed[0] != "gw":
            return None, [self._record(item, "topic.invalid", "not a gateway uplink topic")]
        topic_gateway = parsed[1]
        try:
            envelope = open_envelope(message.payload, registry.gateway_key)
        except ProtocolError as exc:
            return None, [self._record(item, exc.reason, str(exc))]
        if envelope.gateway_id != topic_gateway:
            detail = (
                f"envelope signed by gateway {envelope.gateway_id} arrived on the topic of "
                f"gateway {topic_gateway}"
            )
            return None, [self._record(item, "gateway.topic_mismatch", detail)]
        try:
            batch = open_batch(envelope.device_message, registry.device_key)
            if "\x00" in batch.payload.model_version:
                raise SchemaError("batch field model_version contains a NUL character")
        except ProtocolError as exc:
            device_id = _signer_or_none(envelope.device_message)
            return None, [self._record(item, exc.reason, str(exc), device_id=device_id)]
        kept: list[Reading] = []
        rejects: list[QuarantineRecord] = []
        horizon = now + self._settings.max_future_ms
        record = registry.devices.get(batch.device_id)
        registered = record.registered_at_ms if record is not None else 0
        for reading in batch.payload.readings:
            problem = _reading_problem(reading, horizon, registered)
            if problem is None:
                kept.append(reading)
                continue
            reason, why = problem
            detail = f"device {batch.device_id} seq {batch.seq}: {why}"
            rejects.append(
                QuarantineRecord.of(
                    reason=reason,
                    detail=detail,
                    source=self.source,
                    topic=message.topic,
                    received_at_ms=item.arrived_ms,
                    payload=_reading_json(reading),
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
        return _Verified(item, stored), rejects

    def _outcome_records(
        self, verified: Sequence[_Verified], outcomes: Sequence[WriteOutcome]
    ) -> list[QuarantineRecord]:
        """Quarantine records for what the store already held: a fork (another hash) or a
        replay (the same hash: a redelivery after a lost receipt, or a replay; harmless,
        and recorded so an operator sees it)."""
        records = []
        for entry, outcome in zip(verified, outcomes, strict=True):
            batch = entry.batch
            where = f"device {batch.device_id} seq {batch.seq}"
            if outcome is WriteOutcome.DUPLICATE:
                reason = "chain.replay"
                detail = f"{where} is already stored with the same hash: a redelivery or a replay"
            elif outcome is WriteOutcome.CONFLICT:
                reason = "chain.fork"
                detail = f"{where} is already stored with another hash: the chain forks"
                log.warning("fork: %s arrived with another payload hash than the stored one", where)
            else:
                continue
            records.append(
                self._record(entry.item, reason, detail, device_id=batch.device_id, seq=batch.seq)
            )
        return records

    def _forwarded_record(self, item: _Inbound) -> QuarantineRecord:
        """A gateway's quarantine record as the store keeps it; a malformed one is itself kept."""
        try:
            record = _checked_record(QuarantineRecord.from_json(item.message.payload))
        except ValueError as exc:
            return self._record(item, "quarantine.malformed", str(exc))
        return record

    def _record(
        self,
        item: _Inbound,
        reason: str,
        detail: str,
        *,
        device_id: str | None = None,
        seq: int | None = None,
    ) -> QuarantineRecord:
        log.warning("quarantined message on %s: %s (%s)", item.message.topic, reason, detail)
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

    # ------------------------------------------------------------------ registry

    def _current_registry(self) -> Registry:
        """The registry file's content; while it is unreadable, the last good one."""
        try:
            snapshot = self.registry.current()
        except RegistryError as exc:
            if self._registry_snapshot is None:
                log.warning("registry unreadable (%s); every message is unknown for now", exc)
                return Registry.empty()
            log.warning("registry unreadable (%s); using the last good version", exc)
            return self._registry_snapshot
        self._registry_snapshot = snapshot
        return snapshot

    def _sync_devices(self) -> None:
        registry = self._current_registry()
        try:
            self.store.upsert_devices(registry.devices.values())
        except StoreError as exc:
            log.warning(
                "device sync to the store failed (%s); retrying in %.0f s", exc, SYNC_RETRY_S
            )
            self._next_sync_attempt = time.monotonic() + SYNC_RETRY_S
            return
        self._synced_registry = registry
        log.info("synced %d registry devices into the store", len(registry.devices))

    def _maybe_sync_devices(self) -> None:
        # RegistryFile.current() returns the same object until the file changes.
        if (
            self._current_registry() is not self._synced_registry
            and time.monotonic() >= self._next_sync_attempt
        ):
            self._sync_devices()


# ------------------------------------------------------------------------ helpers


def _signer_or_none(message: bytes) -> str | None:
    try:
        return peek_signer(message)
    except ProtocolError:
        return None


def _reading_problem(
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
    spec = BY_NAME[reading.metric]
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


def _reading_json(reading: Reading) -> bytes:
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


_TEXT_FIELDS = ("reason", "detail", "source", "topic", "payload_sha256", "payload_b64")


def _checked_record(record: QuarantineRecord) -> QuarantineRecord:
    """A record from the wire with types checked, so a bad one cannot fail the store write.

    Raises ValueError, naming the field, for anything a store would refuse.
    """
    for name in _TEXT_FIELDS:
        value = getattr(record, name)
        if not isinstance(value, str):
            raise ValueError(f"quarantine record field {name} must be text")
        if "\x00" in value:
            raise ValueError(f"quarantine record field {name} contains a NUL character")
    for name in ("received_at_ms", "payload_size"):
        value = getattr(record, name)
        if type(value) is not int or not 0 <= value < 2**63:
            raise ValueError(f"quarantine record field {name} must be a non-negative integer")
    if record.device_id is not None and (
        not isinstance(record.device_id, str) or "\x00" in record.device_id
    ):
        raise ValueError("quarantine record field device_id must be text or null")
    if record.seq is not None and (type(record.seq) is not int or not 0 <= record.seq < 2**63):
        raise ValueError("quarantine record field seq must be a non-negative integer or null")
    if not record.reason or len(record.reason) > 128:
        raise ValueError("quarantine record field reason must be 1..128 characters")
    try:
        base64.b64decode(record.payload_b64, validate=True)
    except ValueError as exc:  # binascii.Error is a ValueError
        raise ValueError(f"quarantine record payload_b64 is not base64: {exc}") from None
    return record
