"""One group through verify and write, with the registry and the accounting it needs."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

from analytics.ingest.errors import PARAMETER_ERRORS, describe
from analytics.ingest.receive import Inbound
from analytics.ingest.verify import Verified, Verifier
from analytics.ingest.write import GroupWriter, Refused, WriteResult
from analytics.settings import IngestSettings
from analytics.store.base import DeviceHealth, Store, StoreError, WriteOutcome
from civicmesh import health
from civicmesh.errors import RegistryError
from civicmesh.identity import is_valid_id
from civicmesh.quarantine import MAX_PAYLOAD_SIZE, MAX_SEQ, QuarantineRecord
from civicmesh.registry import Registry, RegistryFile

log = logging.getLogger(__name__)

SYNC_RETRY_S = 5.0


class Pipeline:
    """Verify and write groups for one worker; keeps its quarantine accounting."""

    def __init__(
        self,
        settings: IngestSettings,
        store: Store,
        registry: RegistryFile,
        source: str,
        clock: Callable[[], int],
        stopping: threading.Event,
        counters: Counter[str],
        lock: threading.Lock,
    ) -> None:
        self.store = store
        self.registry = registry
        self.source = source
        self._clock = clock
        self._counters = counters
        self._lock = lock
        self.verifier = Verifier(source, settings.max_future_ms, clock)
        self.writer = GroupWriter(store, stopping, self._store_failed, self._refused_record)
        self.quarantined: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.store_ok = True
        self.pending = 0
        self.last_lag_ms: int | None = None
        self.last_write_ms: int | None = None
        self._registry_snapshot: Registry | None = None
        self._synced_registry: Registry | None = None
        self._next_sync_attempt = 0.0  # monotonic; a failed sync is retried after a pause

    # ------------------------------------------------------------------- groups

    def process(self, group: Sequence[Inbound]) -> bool:
        """Verify and write a group; False when stopping left it unwritten."""
        registry = self.current_registry()
        now = self._clock()
        verified: list[Verified] = []
        records: list[QuarantineRecord] = []
        for item in group:
            if item.is_quarantine:
                records.append(self.verifier.forwarded(item, registry))
                continue
            entry, rejects = self.verifier.uplink(item, registry, now)
            records.extend(rejects)
            if entry is not None:
                verified.append(entry)
        with self._lock:
            self._counters["verified"] += len(verified)
            self.pending = len(group)
        try:
            result = self._write(verified, records)
        finally:
            with self._lock:
                self.pending = 0
        return result is not None

    def _write(
        self, verified: list[Verified], records: list[QuarantineRecord]
    ) -> WriteResult | None:
        # Outcome records are built from the first write's outcomes: a retry of the
        # quarantine write alone must not turn the batches just inserted into duplicates.
        result = self.writer.write(verified, records)
        if result is None:
            return None
        outcome_records = self._outcome_records(verified, result.outcomes)
        more = self.writer.write([], outcome_records) if outcome_records else None
        self._account(verified, result, more)
        return result

    def _account(
        self, verified: Sequence[Verified], result: WriteResult, more: WriteResult | None
    ) -> None:
        now = self._clock()
        outcomes = result.outcomes
        inserted = [
            v for v, o in zip(verified, outcomes, strict=True) if o is WriteOutcome.INSERTED
        ]
        records = [*result.records, *(more.records if more else [])]
        with self._lock:
            if not self.store_ok:
                log.info("store is writable again; %s resumes", self.source)
            self.store_ok = True
            c = self._counters
            c["written_batches"] += len(inserted)
            c["written_readings"] += sum(len(v.batch.readings) for v in inserted)
            c["duplicates"] += outcomes.count(WriteOutcome.DUPLICATE)
            c["conflicts"] += outcomes.count(WriteOutcome.CONFLICT)
            c["store_refused"] += sum(isinstance(o, Refused) for o in outcomes)
            c["records_dropped"] += result.dropped_records + (more.dropped_records if more else 0)
            for record in records:
                self.quarantined[record.reason] += 1
            if verified:
                self.last_lag_ms = now - max(v.batch.received_at_ms for v in verified)
                self.last_write_ms = now

    def _store_failed(self, exc: BaseException, delay: float) -> None:
        with self._lock:
            self._counters["store_errors"] += 1
            self.store_ok = False
        log.warning("store write failed (%s); kept unacknowledged, retry in %.1f s", exc, delay)

    def _refused_record(self, record: QuarantineRecord, detail: str) -> QuarantineRecord:
        """What the store keeps of an item it refused: ingest's own fields and the reason."""
        device_id = record.device_id
        seq = record.seq
        return QuarantineRecord(
            reason="store.refused",
            detail=f"{record.reason}: {record.detail[:300]}: the store refused it: {detail}"[:1000],
            source=self.source,
            topic=record.topic[:256],
            received_at_ms=self._clock(),
            payload_size=max(0, min(record.payload_size, MAX_PAYLOAD_SIZE))
            if type(record.payload_size) is int
            else 0,
            payload_sha256=record.payload_sha256,
            payload_b64=record.payload_b64,
            device_id=device_id if isinstance(device_id, str) and is_valid_id(device_id) else None,
            seq=seq if type(seq) is int and 0 <= seq <= MAX_SEQ else None,
        )

    def _outcome_records(
        self, verified: Sequence[Verified], outcomes: Sequence[WriteOutcome | Refused]
    ) -> list[QuarantineRecord]:
        """Records for what the store already held: a fork (another hash) or a replay (the
        same hash: a redelivery after a lost receipt, or a replay; harmless, and recorded
        so an operator sees it)."""
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
                self.verifier.record(
                    entry.item, reason, detail, device_id=batch.device_id, seq=batch.seq
                )
            )
        return records

    # ------------------------------------------------------------------- health

    def store_health(self, reports: list[health.HealthReport]) -> None:
        """Store the newest health reports; a report the store refuses is dropped, counted."""
        if not reports:
            return
        registry = self.current_registry()
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
        except (StoreError, *PARAMETER_ERRORS) as exc:
            with self._lock:
                self._counters["health_dropped"] += len(kept)
            log.info("device health not stored (%s); the next reports will be", describe(exc))
            return
        with self._lock:
            self._counters["health_stored"] += len(kept)
            self._counters["health_dropped"] += len(reports) - len(kept)

    # ------------------------------------------------------------------ registry

    def current_registry(self) -> Registry:
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

    def sync_devices(self) -> None:
        registry = self.current_registry()
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

    def maybe_sync_devices(self) -> None:
        # RegistryFile.current() returns the same object until the file changes.
        if (
            self.current_registry() is not self._synced_registry
            and time.monotonic() >= self._next_sync_attempt
        ):
            self.sync_devices()
