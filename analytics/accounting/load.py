"""The day's public data from a store and the registry: what :func:`score_day` needs."""

from __future__ import annotations

from datetime import UTC, date, datetime

import numpy as np
from numpy.typing import NDArray

from analytics.accounting.model import DAY_MS, DeviceDay, MetricSeries
from analytics.store.base import ChainHead, Store
from civicmesh.registry import IMPORT_KIND, Registry

LEDGER_PAGE = 1000


def parse_day(text: str) -> int:
    """Epoch ms of the UTC midnight starting ``YYYY-MM-DD``."""
    try:
        day = date.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"Invalid day {text!r}: use YYYY-MM-DD, e.g. 2026-12-07") from None
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)


def load_day(store: Store, day_start_ms: int, registry: Registry | None = None) -> list[DeviceDay]:
    """Every field device known to the store (importer identities excluded: they sign
    archives, nobody runs them), with its readings and ledger rows of the day. Owner and
    registration time come from the registry when one is given."""
    end_ms = day_start_ms + DAY_MS
    records = registry.devices if registry is not None else {}
    heads = {h.device_id: h for h in store.ledger_span(day_start_ms, end_ms).heads}
    devices = []
    for status in store.devices():
        record = records.get(status.device_id)
        kind = record.kind if record is not None else status.kind
        if kind == IMPORT_KIND:
            continue
        if record is not None and record.registered_at_ms >= end_ms:
            continue  # registered after the day: nothing was expected of it
        sealed, received = _ledger_times(store, status.device_id, heads.get(status.device_id))
        devices.append(
            DeviceDay(
                device_id=status.device_id,
                owner=record.owner if record is not None else "",
                kind=kind,
                lat=record.lat if record is not None else status.lat,
                lon=record.lon if record is not None else status.lon,
                registered_at_ms=record.registered_at_ms if record is not None else 0,
                series=_series(store, status.device_id, day_start_ms, end_ms),
                sealed_ms=sealed,
                received_ms=received,
            )
        )
    return devices


def _series(store: Store, device_id: str, start_ms: int, end_ms: int) -> dict[str, MetricSeries]:
    rows = store.readings(device_id, start_ms, end_ms)
    by_metric: dict[str, list[tuple[int, float, int]]] = {}
    for r in rows:
        by_metric.setdefault(r.metric, []).append((r.ts_ms, r.value, r.quality))
    series = {}
    for metric, items in by_metric.items():
        table = np.array(items, dtype=np.float64)
        series[metric] = MetricSeries(
            times=table[:, 0].astype(np.int64),
            values=table[:, 1],
            quality=table[:, 2].astype(np.int64),
        )
    return series


def _ledger_times(
    store: Store, device_id: str, head: ChainHead | None
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Seal and receive times of the batches whose readings overlap the day."""
    if head is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    sealed: list[int] = []
    received: list[int] = []
    after = head.first_seq - 1
    while after < head.last_seq:
        page = store.ledger(
            device_id, after_seq=after, limit=min(LEDGER_PAGE, head.last_seq - after)
        )
        if not page:
            break
        for entry in page:
            if entry.seq <= head.last_seq:
                sealed.append(entry.sealed_at_ms)
                received.append(entry.received_at_ms)
        after = page[-1].seq
    return np.array(sealed, np.int64), np.array(received, np.int64)
