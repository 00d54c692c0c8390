"""Backend-independent pieces of the write path: outcome resolution, payload decoding."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Sequence

from analytics.store.base import StoredBatch, StoreError, WriteOutcome
from civicmesh.metrics import BY_CODE, BY_NAME
from civicmesh.quarantine import QuarantineRecord

BatchKey = tuple[str, int]

# Every metric code, so "all metrics of a device" stays an index range scan on
# (device_id, metric, ts) instead of a scan of everything the device ever sent.
ALL_METRIC_CODES: tuple[int, ...] = tuple(sorted(BY_CODE))


def metric_code(name: str) -> int:
    """Wire code of a metric name; the error lists the known names."""
    try:
        return BY_NAME[name].code
    except KeyError:
        known = ", ".join(sorted(BY_NAME))
        raise StoreError(f"Unknown metric {name!r}; known metrics: {known}") from None


def metric_name(code: int) -> str:
    return BY_CODE[code].name


def unique_batches(batches: Sequence[StoredBatch]) -> list[StoredBatch]:
    """First batch of each ``(device_id, seq)``, sorted by key.

    Sorting gives every writer the same lock order on the ledger, so two workers writing
    overlapping lists (a redelivery) wait for each other instead of deadlocking.
    """
    first: dict[BatchKey, StoredBatch] = {}
    for batch in batches:
        first.setdefault((batch.device_id, batch.seq), batch)
    return [first[key] for key in sorted(first)]


def resolve_outcomes(
    batches: Sequence[StoredBatch],
    inserted: set[BatchKey],
    stored_hashes: dict[BatchKey, bytes],
) -> list[WriteOutcome]:
    """One outcome per batch, in the caller's order.

    ``inserted``: keys written by this call; ``stored_hashes``: payload hash already in
    the ledger for keys that were not. A key repeated within the list is compared with
    its first occurrence.
    """
    outcomes: list[WriteOutcome] = []
    seen: dict[BatchKey, bytes] = {}
    for batch in batches:
        key = (batch.device_id, batch.seq)
        if key in seen:
            reference = seen[key]
        elif key in inserted:
            seen[key] = batch.payload_hash
            outcomes.append(WriteOutcome.INSERTED)
            continue
        else:
            try:
                reference = stored_hashes[key]
            except KeyError:
                raise StoreError(
                    f"Ledger row for device {key[0]} seq {key[1]} neither inserted nor found"
                ) from None
            seen[key] = reference
        same = reference == batch.payload_hash
        outcomes.append(WriteOutcome.DUPLICATE if same else WriteOutcome.CONFLICT)
    return outcomes


def newest_reading_ms(batch: StoredBatch) -> int | None:
    return batch.newest_ms


def quarantine_payload(record: QuarantineRecord) -> bytes:
    """The kept bytes of a quarantine record (base64 in the record, raw in the store)."""
    try:
        return base64.b64decode(record.payload_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise StoreError(
            f"Quarantine record from {record.source!r} carries malformed base64 payload: {exc}"
        ) from None


def payload_b64(payload: bytes) -> str:
    return base64.b64encode(payload).decode("ascii")


def oldest_reading_ms(batch: StoredBatch) -> int | None:
    return batch.oldest_ms


def touched_ranges(batches: Sequence[StoredBatch]) -> list[tuple[str, int, int]]:
    """Per device, the time range ``(device_id, lo_ms, hi_ms)`` the readings cover: what
    the rollup refresher must recompute after these batches are written."""
    ranges: dict[str, tuple[int, int]] = {}
    for batch in batches:
        lo, hi = batch.oldest_ms, batch.newest_ms
        if lo is None or hi is None:
            continue
        old = ranges.get(batch.device_id)
        ranges[batch.device_id] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
    return [(device, lo, hi) for device, (lo, hi) in sorted(ranges.items())]


def merge_ranges(
    ranges: Iterable[tuple[str, int, int]], slack_ms: int = 3_600_000
) -> list[tuple[str, int, int]]:
    """Merge each device's ranges that overlap or lie within ``slack_ms`` of each other,
    so a live stream plus one late batch are two small ranges, not one huge one."""
    merged: list[tuple[str, int, int]] = []
    for device, lo, hi in sorted(ranges):
        if merged and merged[-1][0] == device and lo <= merged[-1][2] + slack_ms:
            merged[-1] = (device, merged[-1][1], max(merged[-1][2], hi))
        else:
            merged.append((device, lo, hi))
    return merged
