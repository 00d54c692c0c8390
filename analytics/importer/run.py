"""The import itself: identities, sealing, and the write through ingest's pipeline.

Per station, an importer identity (an Ed25519 key under ``<state>/keys/``) is registered
with kind ``import`` and a valid-from at the start of its archive. Its readings, sorted
and de-duplicated, are sealed into signed batches chained by hash (the shared protocol
code), each wrapped in an envelope signed by the state directory's relay key (registered
as a gateway, so the audit log and ``civicmesh audit verify`` see the same shapes as for
field data), and handed to :class:`analytics.ingest.pipeline.Pipeline`: the verify and
write steps the ingest worker runs, minus MQTT.

Resumable and idempotent: the store's ledger is the truth. ``stations.json`` remembers
each station's last seq, head hash and newest reading time; at start it is checked
against the ledger and moved forward over batches committed after it was last written
(a kill between the commit and the state write). Readings at or before a station's
newest imported time are already in; they are counted, never sealed again.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import TextIO

from analytics.importer.errors import ArchiveError
from analytics.importer.formats import Archive, Row, StationData
from analytics.importer.mapping import Mapping
from analytics.ingest.pipeline import Pipeline
from analytics.ingest.receive import Inbound, Kind
from analytics.settings import AnalyticsSettings
from analytics.store.base import Store, StoreError
from civicmesh import topics
from civicmesh.errors import KeyFileError
from civicmesh.identity import Ed25519Signer
from civicmesh.metrics import BY_CODE
from civicmesh.mqtt import Message
from civicmesh.protocol import (
    GENESIS_HASH,
    MAX_SPAN_MS,
    BatchPayload,
    ProtocolError,
    Reading,
    open_batch,
    seal_batch,
    wrap_envelope,
)
from civicmesh.registry import (
    IMPORT_KIND,
    DeviceRecord,
    GatewayRecord,
    Registry,
    RegistryFile,
)
from civicmesh.timeutil import now_ms

log = logging.getLogger(__name__)

BATCH_READINGS = 2000  # readings per sealed batch (the protocol allows 10,000)
GROUP_READINGS = 50_000  # readings per store transaction
DAY_MS = 86_400_000


# ------------------------------------------------------------------------- state


@dataclass(slots=True)
class StationState:
    device_id: str
    seq: int = 0
    head: bytes = GENESIS_HASH
    last_ts_ms: int | None = None


class ImportState:
    """The import state directory: one key per station, the relay key, the progress."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.file = root / "stations.json"

    def key_path(self, station_id: str) -> Path:
        return self.root / "keys" / f"{station_id}.key"

    def signer(self, station_id: str, *, create: bool) -> Ed25519Signer | None:
        return self._key(self.key_path(station_id), create)

    def relay(self, *, create: bool) -> Ed25519Signer | None:
        return self._key(self.root / "relay.key", create)

    def _key(self, path: Path, create: bool) -> Ed25519Signer | None:
        if path.exists():
            return Ed25519Signer.load(path)
        if not create:
            return None
        signer = Ed25519Signer.generate()
        try:
            signer.save(path)
        except KeyFileError:
            return Ed25519Signer.load(path)  # another import made it just now
        return signer

    def load(self) -> dict[str, StationState]:
        try:
            obj = json.loads(self.file.read_text(encoding="utf-8"))
            return {
                key: StationState(
                    v["device_id"], int(v["seq"]), bytes.fromhex(v["head"]), v["last_ts_ms"]
                )
                for key, v in obj["stations"].items()
            }
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError) as exc:
            raise ArchiveError(
                f"Import state {self.file} is damaged ({exc}); the store's ledger holds what "
                "was imported: move the file away and run again to rebuild it"
            ) from None

    def save(self, states: dict[str, StationState]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        body = {
            "version": 1,
            "stations": {
                key: {
                    "device_id": s.device_id,
                    "seq": s.seq,
                    "head": s.head.hex(),
                    "last_ts_ms": s.last_ts_ms,
                }
                for key, s in sorted(states.items())
            },
        }
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".stations-")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(body, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.file)


def reconcile(store: Store, state: StationState, signer: Ed25519Signer) -> None:
    """Check ``state`` against the store's ledger and move it over later batches."""
    if state.seq > 0:
        found = store.ledger(state.device_id, after_seq=state.seq - 1, limit=1)
        if not found or found[0].seq != state.seq or found[0].payload_hash != state.head:
            raise ArchiveError(
                f"The import state says station device {state.device_id} is at seq "
                f"{state.seq}, but the store does not hold that batch: is this the store it "
                "was imported into? (a restored or new store needs a new --state-dir)"
            )
    key = signer.verify_key()
    while True:
        entries = store.ledger(state.device_id, after_seq=state.seq, limit=200)
        if not entries:
            return
        for entry in entries:
            try:
                batch = open_batch(entry.device_message, lambda _id: key)
            except ProtocolError as exc:
                raise ArchiveError(
                    f"ledger batch {entry.device_id} seq {entry.seq} does not verify: {exc}"
                ) from None
            state.seq, state.head = entry.seq, entry.payload_hash
            if batch.payload.readings:
                state.last_ts_ms = max(r.ts_ms for r in batch.payload.readings)


# ------------------------------------------------------------------------ planning


@dataclass(slots=True)
class StationPlan:
    data: StationData
    new: list[Row]
    already: int
    duplicates: int
    device_id: str | None
    metrics: set[str] = field(default_factory=set)
    future: int = 0


def plan_station(data: StationData, state: StationState | None, horizon_ms: int) -> StationPlan:
    """Sort, drop repeated (time, metric) pairs and future times (ingest would quarantine
    them), and leave out what is already in."""
    rows = sorted(data.rows, key=itemgetter(0, 1))  # stable: the archive's first stays first
    unique: list[Row] = []
    duplicates = future = 0
    last_key: tuple[int, int] | None = None
    for row in rows:
        key = (row[0], row[1])
        if key == last_key:
            duplicates += 1
            continue
        last_key = key
        if row[0] > horizon_ms:
            future += 1
            continue
        unique.append(row)
    done = state.last_ts_ms if state is not None and state.last_ts_ms is not None else None
    if done is None:
        new, already = unique, 0
    else:
        new = [r for r in unique if r[0] > done]
        already = len(unique) - len(new)
    metrics = {BY_CODE[code].name for _, code, _ in new}
    device_id = state.device_id if state else None
    return StationPlan(data, new, already, duplicates, device_id, metrics, future)


def chunks(rows: Sequence[Row], size: int = BATCH_READINGS) -> Iterator[Sequence[Row]]:
    """Batches of at most about ``size`` readings within the protocol's span, cut between
    timestamps (never inside one), so a time is in one batch or the next, whole."""
    start = 0
    n = len(rows)
    while start < n:
        first_ts = rows[start][0]
        end = start
        while end < n and end - start < size and rows[end][0] - first_ts <= MAX_SPAN_MS:
            end += 1
        if end < n and rows[end][0] - first_ts <= MAX_SPAN_MS:
            # a full batch: move the cut back to a time boundary (unless one time fills it)
            cut = end
            while cut > start and rows[cut][0] == rows[cut - 1][0]:
                cut -= 1
            end = cut if cut > start else end
        yield rows[start:end]
        start = end


# ------------------------------------------------------------------------ progress


class Progress:
    """One line on stderr: readings done of the total, rate."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()
        self._next = 0.0

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now >= self._next or self.done >= self.total:
            self._next = now + (0.5 if self._tty else 5.0)
            self._show(now)

    def _show(self, now: float) -> None:
        elapsed = max(now - self.started, 1e-9)
        share = 100.0 * self.done / self.total if self.total else 100.0
        line = (
            f"import: {self.done:,} / {self.total:,} readings ({share:.0f}%), "
            f"{self.done / elapsed:,.0f} readings/s"
        )
        end = "\r" if self._tty and self.done < self.total else "\n"
        print(line, end=end, file=self._stream, flush=True)


# ------------------------------------------------------------------------ importing


@dataclass(slots=True)
class ImportResult:
    plans: list[StationPlan]
    batches: int = 0
    readings: int = 0
    seconds: float = 0.0
    rollup_seconds: float = 0.0
    quarantined: Counter[str] = field(default_factory=Counter)


class Importer:
    """Registers the identities and writes the planned readings through the pipeline."""

    def __init__(
        self,
        settings: AnalyticsSettings,
        store: Store,
        state: ImportState,
        mapping: Mapping,
        *,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.settings = settings
        self.store = store
        self.state = state
        self.mapping = mapping
        self.clock = clock
        self.stopping = threading.Event()

    def states(self) -> dict[str, StationState]:
        """The saved progress, checked against (and moved forward by) the store's ledger."""
        states = self.state.load()
        for station_id, st in states.items():
            signer = self.state.signer(station_id, create=False)
            if signer is None:
                raise ArchiveError(
                    f"Import state names station {station_id} but its key "
                    f"{self.state.key_path(station_id)} is missing: restore it from backup"
                )
            reconcile(self.store, st, signer)
        # a key made (and maybe used) before the first state write
        keys = self.state.root / "keys"
        for path in sorted(keys.glob("*.key")) if keys.is_dir() else []:
            if path.stem not in states:
                signer = Ed25519Signer.load(path)
                st = StationState(signer.key_id)
                reconcile(self.store, st, signer)
                states[path.stem] = st
        return states

    def register(
        self, plans: Sequence[StationPlan]
    ) -> tuple[Ed25519Signer, dict[str, Ed25519Signer]]:
        """Make the keys and register them (kind import, valid from the archive's start)."""
        path = self.settings.registry_file
        registry = Registry.load(path) if path.exists() else Registry.empty()
        before = registry.to_json()
        relay = self.state.relay(create=True)
        assert relay is not None
        if relay.key_id not in registry.gateways:
            registry = registry.with_gateway(
                GatewayRecord(relay.key_id, relay.verify_key().to_text())
            )
        signers: dict[str, Ed25519Signer] = {}
        for plan in plans:
            if not plan.new:
                continue
            data = plan.data
            signer = self.state.signer(data.station_id, create=True)
            assert signer is not None
            signers[data.station_id] = signer
            valid_from = (plan.new[0][0] // DAY_MS) * DAY_MS
            record = DeviceRecord(
                device_id=signer.key_id,
                public_key=signer.verify_key().to_text(),
                zone=data.zone,
                lat=data.lat,
                lon=data.lon,
                kind=IMPORT_KIND,
                registered_at_ms=valid_from,
                owner=self.mapping.spec.owner,
            )
            registry = registry.with_importer(record, valid_from)
            plan.device_id = signer.key_id
        if registry.to_json() != before:
            registry.save(path)
        return relay, signers

    def run(
        self, plans: list[StationPlan], states: dict[str, StationState], progress: Progress
    ) -> ImportResult:
        result = ImportResult(plans)
        relay, signers = self.register(plans)
        counters: Counter[str] = Counter()
        pipeline = Pipeline(
            self.settings.ingest,
            self.store,
            RegistryFile(self.settings.registry_file),
            f"ingest:import-{relay.key_id}",
            self.clock,
            self.stopping,
            counters,
            threading.Lock(),
        )
        pipeline.sync_devices()
        topic = topics.gateway_up(relay.key_id)
        started = time.monotonic()
        for plan in plans:
            if not plan.new:
                continue
            station_id = plan.data.station_id
            signer = signers[station_id]
            st = states.setdefault(station_id, StationState(signer.key_id))
            group: list[Inbound] = []
            pending: list[tuple[int, bytes, int, int]] = []  # seq, hash, newest ts, readings
            size = 0
            for rows in chunks(plan.new):
                readings = tuple(Reading(ts, BY_CODE[code].name, value) for ts, code, value in rows)
                now = self.clock()
                payload = BatchPayload(st.device_id, st.seq + 1, st.head, now, readings)
                batch = seal_batch(signer, payload)
                envelope = wrap_envelope(relay, batch.message, now)
                group.append(
                    Inbound(Message(topic, envelope.message, 1, 0, False), now, Kind.UPLINK)
                )
                st.seq, st.head = batch.seq, batch.hash
                pending.append((batch.seq, batch.hash, rows[-1][0], len(rows)))
                size += len(rows)
                if size >= GROUP_READINGS:
                    self._write(pipeline, counters, group, pending, st, states, result, progress)
                    group, pending, size = [], [], 0
            if group:
                self._write(pipeline, counters, group, pending, st, states, result, progress)
        result.seconds = time.monotonic() - started
        result.quarantined = pipeline.quarantined
        return result

    def _write(
        self,
        pipeline: Pipeline,
        counters: Counter[str],
        group: list[Inbound],
        pending: list[tuple[int, bytes, int, int]],
        st: StationState,
        states: dict[str, StationState],
        result: ImportResult,
        progress: Progress,
    ) -> None:
        before = counters["written_batches"]
        if not pipeline.process(group):
            raise ArchiveError("import stopped while the store was failing; run it again")
        written = counters["written_batches"] - before
        if written != len(group):
            reasons = ", ".join(f"{r}: {n}" for r, n in pipeline.quarantined.items())
            raise ArchiveError(
                f"the store took {written} of {len(group)} batches of device {st.device_id} "
                f"(quarantined: {reasons or 'none'}); nothing after them was imported"
            )
        seq, head, newest, _ = pending[-1]
        st.seq, st.head, st.last_ts_ms = seq, head, newest
        self.state.save(states)
        n = sum(p[3] for p in pending)
        result.batches += len(group)
        result.readings += n
        progress.add(n)


def summarize(archive: Archive, plans: Sequence[StationPlan]) -> list[str]:
    """What the archive holds and what an import would do, as lines for a person."""
    lines: list[str] = []
    new = sum(len(p.new) for p in plans)
    already = sum(p.already for p in plans)
    duplicates = sum(p.duplicates for p in plans)
    metrics = sorted(set().union(*(p.metrics for p in plans))) if plans else []
    times = [t for p in plans if p.new for t in (p.new[0][0], p.new[-1][0])]
    lines.append(
        f"archive: {archive.files} file(s), {archive.rows_read:,} rows, {len(plans)} station(s)"
    )
    for p in plans:
        d = p.data
        span = f"{_utc(p.new[0][0])} .. {_utc(p.new[-1][0])}" if p.new else "nothing new"
        where = "" if d.lat is None or d.lon is None else f" at {d.lat:.5f},{d.lon:.5f}"
        lines.append(
            f"  station {d.station_id} ({d.name}, zone {d.zone}{where}): "
            f"{len(p.new):,} new readings, {p.already:,} already imported; "
            f"metrics {', '.join(sorted(p.metrics)) or '-'}; {span}"
        )
    lines.append(f"metrics: {', '.join(metrics) or 'none'}")
    if times:
        lines.append(f"period: {_utc(min(times))} .. {_utc(max(times))} (UTC)")
    lines.append(f"readings to import: {new:,}; already imported: {already:,}")
    skipped = sum(archive.skips.counts.values()) + duplicates + sum(p.future for p in plans)
    lines.append(f"readings skipped: {skipped:,}")
    for reason, n in archive.skips.counts.most_common():
        lines.append(f"  {n:,} {reason} (first: {archive.skips.first[reason]})")
    if duplicates:
        lines.append(f"  {duplicates:,} repeated (station, time, metric): the first kept")
    future = sum(p.future for p in plans)
    if future:
        lines.append(f"  {future:,} timed in the future (past ingest's max_future_ms)")
    if archive.ignored_columns:
        lines.append(f"columns ignored: {', '.join(sorted(archive.ignored_columns))}")
    return lines


def _utc(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ms / 1000))


def open_for_import(settings: AnalyticsSettings) -> Store:
    from analytics.store import open_store

    store = open_store(
        settings.database_url,
        timescaledb=settings.storage.timescaledb,
        policy=settings.storage.policy(),
    )
    try:
        store.migrate()
    except StoreError:
        store.close()
        raise
    return store
