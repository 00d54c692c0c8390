"""The storage interface: every backend (embedded SQLite, PostgreSQL, TimescaleDB) has it.

Writes are idempotent on ``(device_id, seq)``: writing a batch whose key is stored
already changes nothing and reports ``DUPLICATE`` (same payload hash) or ``CONFLICT``
(another hash: a fork). The ledger row and the readings of a batch are written in one
transaction, so a crash leaves either both or neither.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from civicmesh.errors import CivicmeshError
from civicmesh.protocol import Reading
from civicmesh.quarantine import QuarantineRecord
from civicmesh.registry import DeviceRecord

if TYPE_CHECKING:
    from analytics.store.auditlog import AuditTables


class StoreError(CivicmeshError):
    """The database refused or failed; the caller keeps the data and retries."""

    reason = "store.error"


class WriteOutcome(Enum):
    INSERTED = "inserted"
    DUPLICATE = "duplicate"  # (device, seq) stored already with the same hash
    CONFLICT = "conflict"  # (device, seq) stored already with another hash


@dataclass(frozen=True, slots=True)
class StoredBatch:
    """A verified batch as ingest hands it to the store."""

    device_id: str
    seq: int
    payload_hash: bytes  # sha256 of the device payload bytes
    prev_hash: bytes
    sealed_at_ms: int
    model_version: str
    gateway_id: str
    received_at_ms: int  # gateway receive time, from the envelope
    ingested_at_ms: int
    device_message: bytes  # the device COSE_Sign1 bytes, kept for audit
    gateway_message: bytes  # the gateway envelope bytes, kept for audit
    readings: tuple[Reading, ...]
    # Time span of the readings (None when there are none), computed once: the ledger,
    # the rollup refresh and the partitioning all need it.
    oldest_ms: int | None = field(init=False, compare=False, repr=False)
    newest_ms: int | None = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        times = [r.ts_ms for r in self.readings]
        object.__setattr__(self, "oldest_ms", min(times) if times else None)
        object.__setattr__(self, "newest_ms", max(times) if times else None)


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    device_id: str
    zone: str
    lat: float | None
    lon: float | None
    kind: str
    status: str
    last_seen_ms: int | None  # newest reading time
    last_seq: int | None
    batches: int


@dataclass(frozen=True, slots=True)
class ZoneSummary:
    zone: str
    devices: int
    lat: float | None  # mean of its devices' positions
    lon: float | None


@dataclass(frozen=True, slots=True)
class LatestReading:
    device_id: str
    zone: str
    metric: str
    ts_ms: int
    value: float
    quality: int


@dataclass(frozen=True, slots=True)
class SeriesPoint:
    bucket_ms: int  # bucket start, epoch ms, aligned to the bucket size from the epoch
    count: int
    mean: float
    min: float
    max: float


class Resolution(Enum):
    """The tables a series can be read from: raw readings, or a rollup."""

    RAW = ("raw", 0)
    MINUTE = ("1m", 60)
    HOUR = ("1h", 3600)
    DAY = ("1d", 86_400)

    def __init__(self, label: str, seconds: int) -> None:
        self.label = label
        self.seconds = seconds

    @property
    def table(self) -> str:
        return f"rollup_{self.label}"

    @property
    def zone_table(self) -> str:
        """The per-zone rollup (1 h and 1 day only; see ZONE_ROLLUPS)."""
        return f"rollup_zone_{self.label}"

    @classmethod
    def parse(cls, label: str) -> Resolution:
        for resolution in cls:
            if resolution.label == label:
                return resolution
        known = ", ".join(r.label for r in cls)
        raise ValueError(f"Unknown resolution {label!r}; use one of {known} or auto")


ROLLUPS = (Resolution.MINUTE, Resolution.HOUR, Resolution.DAY)
# Zone rollups: what dashboards ask over long ranges (a zone's month, the city's day).
ZONE_ROLLUPS = (Resolution.HOUR, Resolution.DAY)


def choose_resolution(start_ms: int, end_ms: int, max_points: int) -> Resolution:
    """The finest rollup that answers ``[start_ms, end_ms)`` in at most ``max_points``
    buckets (1 day when even that gives more)."""
    span_s = max(0, end_ms - start_ms) / 1000
    for resolution in ROLLUPS:
        if span_s / resolution.seconds <= max_points:
            return resolution
    return Resolution.DAY


@dataclass(frozen=True, slots=True)
class ZoneAggregate:
    """One metric over one zone (or the whole city, ``zone`` None) and a time window."""

    zone: str | None
    metric: str
    count: int
    mean: float
    min: float
    max: float


@dataclass(frozen=True, slots=True)
class Completeness:
    """Readings received against readings expected over a window, per device."""

    device_id: str
    zone: str
    metrics: int  # metrics the device reported in the window
    expected: int  # metrics x window / interval
    received: int

    @property
    def ratio(self) -> float:
        return 0.0 if self.expected == 0 else min(1.0, self.received / self.expected)


@dataclass(frozen=True, slots=True)
class ChainHead:
    """One device's part of a ledger span: its batches ``first_seq..last_seq`` and the
    payload hash of the last one, which by the hash chain commits to all before it."""

    device_id: str
    first_seq: int
    last_seq: int
    batches: int  # fewer than last - first + 1 when batches of the range lie elsewhere
    first_received_ms: int
    last_received_ms: int
    head_hash: bytes


@dataclass(frozen=True, slots=True)
class LedgerSpan:
    """The verified batches whose readings overlap ``[start_ms, end_ms)`` in a zone (or
    the city): what a report built on that window rests on."""

    start_ms: int
    end_ms: int
    zone: str | None
    heads: tuple[ChainHead, ...]

    @property
    def batches(self) -> int:
        return sum(h.batches for h in self.heads)

    def digest(self) -> str:
        """sha256 over every device's (id, first seq, last seq, head hash), in id order."""
        h = hashlib.sha256()
        for head in self.heads:
            h.update(f"{head.device_id}:{head.first_seq}:{head.last_seq}:".encode())
            h.update(head.head_hash)
        return h.hexdigest()


@dataclass(frozen=True, slots=True)
class ReportRecord:
    """A stored report: its text, how it was written and what it rests on."""

    scope: str  # a zone, or "city"
    kind: str  # "daily" or "weekly"
    period_start_ms: int
    period_end_ms: int
    created_ms: int
    text: str
    narrative_source: str  # "llm" or "deterministic"
    fallback_reason: str | None
    model: str | None
    prompt_version: str
    fact_sheet_json: str
    ledger_digest: str
    ledger_batches: int
    id: int | None = None


@dataclass(frozen=True, slots=True)
class ZoneShape:
    zone: str
    label: str
    geometry_json: str  # a GeoJSON geometry (Polygon or MultiPolygon)
    updated_ms: int


@dataclass(frozen=True, slots=True)
class DeviceHealth:
    """The newest health report of a device's agent, as relayed by its gateway."""

    device_id: str
    reported_ms: int  # the agent's clock
    received_ms: int  # ingest's clock
    gateway_id: str
    outbox_batches: int  # sealed, not yet confirmed upstream
    outbox_readings: int  # windowed, not yet sealed
    model_version: str
    agent_version: str


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How long each table keeps data, in days (None: forever). Imported history (the
    readings and rollups of importer identities, ``civicmesh import``) is kept forever
    unless ``include_imported``."""

    raw_days: float | None = None
    rollup_1m_days: float | None = None
    rollup_1h_days: float | None = None
    rollup_1d_days: float | None = None
    include_imported: bool = False


@dataclass(frozen=True, slots=True)
class StoragePolicy:
    """Chunking, compression and retention, as a TimescaleDB store applies them."""

    chunk_hours: float
    compress_after_days: float
    retention: RetentionPolicy


# What a store applies when it is given no policy (the defaults of StorageSettings).
DEFAULT_STORAGE_POLICY = StoragePolicy(
    chunk_hours=24.0,
    compress_after_days=7.0,
    retention=RetentionPolicy(raw_days=90.0, rollup_1m_days=30.0, rollup_1h_days=730.0),
)


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    device_id: str
    seq: int
    payload_hash: bytes
    prev_hash: bytes
    sealed_at_ms: int
    gateway_id: str
    received_at_ms: int
    ingested_at_ms: int
    readings: int
    device_message: bytes
    gateway_message: bytes


@dataclass(frozen=True, slots=True)
class StoreCounts:
    batches: int
    readings: int
    quarantined: int


class Store(ABC):
    """One storage backend. Implementations are thread-compatible: one per thread, or
    guarded by the caller; ``open_store`` makes a new instance per call."""

    # The public audit log (analytics/store/auditlog.py): its leaves are appended in
    # write_batches' transaction.
    audit: AuditTables

    backend: str  # "sqlite", "postgresql" or "timescaledb"

    @abstractmethod
    def migrate(self) -> list[str]:
        """Apply pending numbered migrations; return the names applied now."""

    @abstractmethod
    def close(self) -> None: ...

    # -- writes ---------------------------------------------------------------

    @abstractmethod
    def write_batches(self, batches: Sequence[StoredBatch]) -> list[WriteOutcome]:
        """Write batches (ledger + readings) in one transaction; one outcome each."""

    @abstractmethod
    def add_quarantine(self, records: Sequence[QuarantineRecord]) -> None: ...

    @abstractmethod
    def upsert_devices(self, records: Iterable[DeviceRecord]) -> None: ...

    # -- reads ----------------------------------------------------------------

    @abstractmethod
    def devices(self) -> list[DeviceStatus]: ...

    @abstractmethod
    def zones(self) -> list[ZoneSummary]: ...

    @abstractmethod
    def latest(self, zone: str | None = None) -> list[LatestReading]:
        """Newest reading per device and metric (optionally within one zone)."""

    @abstractmethod
    def series(
        self,
        metric: str,
        start_ms: int,
        end_ms: int,
        bucket_s: int,
        *,
        zone: str | None = None,
        device_id: str | None = None,
    ) -> list[SeriesPoint]:
        """Bucketed aggregate of ``metric`` in ``[start_ms, end_ms)``, ascending."""

    @abstractmethod
    def readings(
        self, device_id: str, start_ms: int, end_ms: int, metric: str | None = None
    ) -> list[Reading]:
        """Raw readings of one device, ascending by time then metric."""

    @abstractmethod
    def ledger(self, device_id: str, *, after_seq: int = 0, limit: int = 1000) -> list[LedgerEntry]:
        """Ledger rows of one device with ``seq > after_seq``, ascending."""

    @abstractmethod
    def quarantined(self, limit: int = 100) -> list[QuarantineRecord]:
        """Newest quarantine records first."""

    @abstractmethod
    def counts(self) -> StoreCounts: ...

    # -- rollups, queries over them, upkeep ------------------------------------

    @abstractmethod
    def refresh_rollups(self) -> int:
        """Recompute the rollups over the ranges written since the last refresh; return
        how many (device, range) pieces were refreshed. Safe to call from several
        processes: one refreshes, the others return 0."""

    @abstractmethod
    def rollup_series(
        self,
        metric: str,
        start_ms: int,
        end_ms: int,
        resolution: Resolution,
        *,
        zone: str | None = None,
        device_id: str | None = None,
    ) -> list[SeriesPoint]:
        """Like :meth:`series`, from the rollup of ``resolution`` (city-wide without
        ``zone`` and ``device_id``); buckets align to the resolution from the epoch."""

    def auto_series(
        self,
        metric: str,
        start_ms: int,
        end_ms: int,
        max_points: int,
        *,
        zone: str | None = None,
        device_id: str | None = None,
    ) -> tuple[Resolution, list[SeriesPoint]]:
        """The series at the finest resolution giving at most ``max_points`` buckets."""
        resolution = choose_resolution(start_ms, end_ms, max_points)
        points = self.rollup_series(
            metric, start_ms, end_ms, resolution, zone=zone, device_id=device_id
        )
        return resolution, points

    @abstractmethod
    def zone_aggregates(
        self, start_ms: int, end_ms: int, resolution: Resolution = Resolution.HOUR
    ) -> list[ZoneAggregate]:
        """Count, mean, min and max of every metric per zone, and for the whole city
        (``zone`` None), over buckets of ``resolution`` starting in ``[start_ms, end_ms)``
        (``RAW``: the readings themselves)."""

    @abstractmethod
    def completeness(
        self, start_ms: int, end_ms: int, interval_s: int, *, zone: str | None = None
    ) -> list[Completeness]:
        """Per device: readings received in ``[start_ms, end_ms)`` (from the hourly
        rollup) against one per ``interval_s`` for each metric it reports."""

    @abstractmethod
    def ledger_span(self, start_ms: int, end_ms: int, *, zone: str | None = None) -> LedgerSpan:
        """Per device, the ledger batches whose readings overlap the window."""

    @abstractmethod
    def flagged_readings(
        self, start_ms: int, end_ms: int, mask: int, *, zone: str | None = None
    ) -> dict[str, int]:
        """Per device, readings in the window whose quality flags intersect ``mask``."""

    @abstractmethod
    def quarantine_counts(
        self, start_ms: int, end_ms: int, *, zone: str | None = None
    ) -> dict[str, int]:
        """Per registered device, quarantine records received in the window."""

    @abstractmethod
    def save_report(self, report: ReportRecord) -> int:
        """Store a report, replacing one of the same scope, kind and period; its id."""

    @abstractmethod
    def reports(
        self, *, scope: str | None = None, kind: str | None = None, limit: int = 20
    ) -> list[ReportRecord]:
        """Stored reports, newest period first."""

    @abstractmethod
    def zone_shapes(self) -> list[ZoneShape]:
        """Every zone's map shape."""

    @abstractmethod
    def save_zone_shape(self, shape: ZoneShape) -> None:
        """Insert or replace one zone's shape."""

    @abstractmethod
    def device_health(self) -> list[DeviceHealth]:
        """The newest health report of every device that sent one."""

    @abstractmethod
    def save_device_health(self, reports: Sequence[DeviceHealth]) -> None:
        """Keep each report unless a newer one (by the agent's clock) is stored."""

    @abstractmethod
    def model_versions(self) -> dict[str, str]:
        """Per device, the model version its newest stored batch names."""

    @abstractmethod
    def quarantine_reasons(self, start_ms: int, end_ms: int) -> dict[str, dict[str, int]]:
        """Per device, quarantine records received in the window, counted by reason."""

    def configure(self, policy: StoragePolicy) -> None:
        """Apply storage policies the database enforces itself (TimescaleDB); the other
        backends are kept by :meth:`apply_retention` and need nothing here."""
        return None

    @abstractmethod
    def apply_retention(self, now_ms: int, policy: RetentionPolicy) -> dict[str, int]:
        """Drop data older than the policy allows; how many rows (or partitions) went."""
