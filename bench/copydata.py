"""Synthetic readings as PostgreSQL binary COPY data, built with NumPy.

The raw-COPY baseline of the benchmarks must be the fastest way a client can hand rows
to PostgreSQL, so the buffer is built before the clock starts and written in one piece:
whatever the end-to-end path costs beyond it is then ours.
"""

from __future__ import annotations

import numpy as np

PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01T00:00Z in Unix microseconds
HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
TRAILER = (-1).to_bytes(2, "big", signed=True)

# One readings row: (device_id, ts, metric, value, quality, raw NULL, anomaly NULL, seq),
# every field as <int32 length><big-endian bytes>; device ids are 16 ASCII characters.
ROW = np.dtype(
    [
        ("nfields", ">i2"),
        ("l_dev", ">i4"),
        ("dev", "S16"),
        ("l_ts", ">i4"),
        ("ts", ">i8"),
        ("l_metric", ">i4"),
        ("metric", ">i2"),
        ("l_value", ">i4"),
        ("value", ">f8"),
        ("l_quality", ">i4"),
        ("quality", ">i4"),
        ("l_raw", ">i4"),
        ("l_anomaly", ">i4"),
        ("l_seq", ">i4"),
        ("seq", ">i8"),
    ]
)
COLUMNS = "device_id, ts, metric, value, quality, raw, anomaly, seq"


def copy_rows(
    device_ids: np.ndarray, ts_ms: np.ndarray, metric: np.ndarray, value: np.ndarray,
    seq: np.ndarray,
) -> bytes:  # fmt: skip
    """Binary COPY data (header, rows, trailer) for ``readings``."""
    rows = np.empty(len(ts_ms), dtype=ROW)
    rows["nfields"] = 8
    rows["l_dev"] = 16
    rows["dev"] = device_ids
    rows["l_ts"] = 8
    rows["ts"] = ts_ms.astype(np.int64) * 1000 - PG_EPOCH_US
    rows["l_metric"] = 2
    rows["metric"] = metric
    rows["l_value"] = 8
    rows["value"] = value
    rows["l_quality"] = 4
    rows["quality"] = 0
    rows["l_raw"] = -1
    rows["l_anomaly"] = -1
    rows["l_seq"] = 8
    rows["seq"] = seq
    return HEADER + rows.tobytes() + TRAILER
