"""Readings as PostgreSQL binary COPY data, built column-wise with NumPy.

psycopg's ``write_row`` costs a few microseconds a row in Python; at city scale that is
most of an ingest worker's time. Here each column is gathered once into an array and
the rows are laid out as a NumPy structured array in COPY's binary format, so the
per-row work is a handful of list comprehensions.

Rows are grouped by which nullable columns (raw, anomaly) are NULL, each group with its
own fixed row layout; a table does not care in which order its rows arrive.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from analytics.store.base import StoredBatch
from civicmesh.metrics import BY_NAME

PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01T00:00Z in Unix microseconds
HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags 0, no header extension
TRAILER = b"\xff\xff"
COLUMNS = ("device_id", "ts", "metric", "value", "quality", "raw", "anomaly", "seq")
_CODE = {name: spec.code for name, spec in BY_NAME.items()}


def _layout(id_bytes: int, with_raw: bool, with_anomaly: bool) -> np.dtype:
    fields: list[tuple[str, str]] = [
        ("nfields", ">i2"),
        ("l_dev", ">i4"), ("dev", f"S{id_bytes}"),
        ("l_ts", ">i4"), ("ts", ">i8"),
        ("l_metric", ">i4"), ("metric", ">i2"),
        ("l_value", ">i4"), ("value", ">f8"),
        ("l_quality", ">i4"), ("quality", ">i4"),
        ("l_raw", ">i4"),
    ]  # fmt: skip
    if with_raw:
        fields.append(("raw", ">f8"))
    fields.append(("l_anomaly", ">i4"))
    if with_anomaly:
        fields.append(("anomaly", ">f8"))
    fields += [("l_seq", ">i4"), ("seq", ">i8")]
    return np.dtype(fields)


def encode_readings(batches: Sequence[StoredBatch]) -> bytes | None:
    """The readings of ``batches`` as one binary COPY stream for the columns
    :data:`COLUMNS`; None when the device ids differ in length (then use ``write_row``)."""
    readings = [r for b in batches for r in b.readings]
    if not readings:
        return HEADER + TRAILER
    id_lengths = {len(b.device_id) for b in batches if b.readings}
    if len(id_lengths) != 1:
        return None
    (id_bytes,) = id_lengths
    counts = [len(b.readings) for b in batches]
    dev = np.repeat(np.array([b.device_id.encode() for b in batches], f"S{id_bytes}"), counts)
    seq = np.repeat(np.array([b.seq for b in batches], np.int64), counts)
    ts = np.array([r.ts_ms for r in readings], np.int64) * 1000 - PG_EPOCH_US
    metric = np.array([_CODE[r.metric] for r in readings], np.int16)
    value = np.array([r.value for r in readings], np.float64)
    quality = np.array([r.quality for r in readings], np.int32)
    raw_list = [r.raw for r in readings]
    anomaly_list = [r.anomaly for r in readings]
    has_raw = np.array([x is not None for x in raw_list], bool)
    has_anomaly = np.array([x is not None for x in anomaly_list], bool)
    raw = np.array([0.0 if x is None else x for x in raw_list], np.float64)
    anomaly = np.array([0.0 if x is None else x for x in anomaly_list], np.float64)
    parts = [HEADER]
    for with_raw in (False, True):
        for with_anomaly in (False, True):
            mask = (has_raw == with_raw) & (has_anomaly == with_anomaly)
            n = int(mask.sum())
            if n == 0:
                continue
            rows = np.empty(n, _layout(id_bytes, with_raw, with_anomaly))
            rows["nfields"] = len(COLUMNS)
            rows["l_dev"], rows["dev"] = id_bytes, dev[mask]
            rows["l_ts"], rows["ts"] = 8, ts[mask]
            rows["l_metric"], rows["metric"] = 2, metric[mask]
            rows["l_value"], rows["value"] = 8, value[mask]
            rows["l_quality"], rows["quality"] = 4, quality[mask]
            rows["l_raw"] = 8 if with_raw else -1
            if with_raw:
                rows["raw"] = raw[mask]
            rows["l_anomaly"] = 8 if with_anomaly else -1
            if with_anomaly:
                rows["anomaly"] = anomaly[mask]
            rows["l_seq"], rows["seq"] = 8, seq[mask]
            parts.append(rows.tobytes())
    parts.append(TRAILER)
    return b"".join(parts)
