"""Dashboard query benchmark: ``days`` x ``devices`` x 8 metrics at one reading a minute
in PostgreSQL, then p50/p95 of the dashboard's queries, each beside the same question
answered from raw readings.

Loading is a bulk load (indexes built after COPY, then one rollup refresh through the
store's own refresh path), because 69 million rows through the live ingest would take
the benchmark ten minutes longer and measure nothing new (the ingest benchmark does).
"""

from __future__ import annotations

import hashlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from analytics.store.base import Resolution
from analytics.store.postgres import PostgresStore, ms_to_ts
from bench.copydata import COLUMNS, copy_rows
from civicmesh.identity import Ed25519Signer, derive_id
from civicmesh.metrics import METRICS
from civicmesh.registry import DeviceRecord
from civicmesh.timeutil import now_ms

REPO = Path(__file__).resolve().parent.parent
MIN_MS = 60_000
DAY_MS = 86_400_000
RUNS = 40


def timed(query: Callable[[], object], runs: int = RUNS) -> tuple[float, float]:
    query()  # warm the cache: the dashboard asks the same questions all day
    samples = []
    for _ in range(runs):
        began = time.perf_counter()
        query()
        samples.append((time.perf_counter() - began) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(0.95 * (len(samples) - 1))]


def load(url: str, days: int, devices: int) -> tuple[PostgresStore, int, int]:
    store = PostgresStore(url)
    store.migrate()
    end = (now_ms() // 3_600_000) * 3_600_000
    start = end - days * DAY_MS
    records = []
    for d in range(devices):
        key = Ed25519Signer.from_seed(hashlib.sha256(f"bench/q/{d}".encode()).digest())
        records.append(DeviceRecord(derive_id(key.public_key), key.verify_key().to_text(),
                                    f"zone-{d % 4}"))  # fmt: skip
    store.upsert_devices(records)
    for week in range(0, days + 14, 7):
        store.ensure_partitions_ahead(start + week * DAY_MS, weeks=0)
    minutes = np.arange(start, end, MIN_MS, dtype=np.int64)
    codes = np.array([m.code for m in METRICS[:8]], dtype=np.int16)
    rng = np.random.default_rng(11)
    rows = 0
    with psycopg.connect(url, autocommit=True) as conn:
        # Bulk load: indexes go, rows come in, indexes come back.
        conn.execute("DROP INDEX readings_device_metric_ts")
        for record in records:
            ts = np.repeat(minutes, len(codes))
            metric = np.tile(codes, len(minutes))
            value = np.round(rng.gamma(2.0, 8.0, len(ts)), 2)
            hours = (ts - start) // 3_600_000 + 1
            dev = np.full(len(ts), record.device_id.encode(), dtype="S16")
            with (
                conn.cursor() as cur,
                cur.copy(f"COPY readings ({COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy,
            ):
                copy.write(copy_rows(dev, ts, metric, value, hours))
            rows += len(ts)
            # One ledger row per hourly batch, as the ingest would have written it.
            conn.execute(
                """INSERT INTO batches (device_id, seq, payload_hash, prev_hash, sealed_at,
                       model_version, gateway_id, received_at, ingested_at, n_readings,
                       newest_reading, oldest_reading, device_message, gateway_message)
                   SELECT %(dev)s, h, sha256(h::text::bytea), sha256((h - 1)::text::bytea),
                          t + interval '1 hour', '', 'bench', t + interval '1 hour',
                          t + interval '1 hour', %(n)s, t + interval '59 minutes', t,
                          '\\x00', '\\x00'
                   FROM generate_series(1, %(hours)s) AS h, LATERAL (
                       SELECT %(start)s::timestamptz + (h - 1) * interval '1 hour') AS s(t)
                """,
                {"dev": record.device_id, "n": 60 * len(codes), "hours": days * 24,
                 "start": ms_to_ts(start)},
            )  # fmt: skip
            conn.execute(
                "INSERT INTO rollup_dirty VALUES (%s, %s, %s)",
                (record.device_id, ms_to_ts(start), ms_to_ts(end - MIN_MS)),
            )
        conn.execute("CREATE INDEX readings_device_metric_ts ON readings (device_id, metric, ts)")
        conn.execute("ANALYZE")
    store.refresh_rollups()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ANALYZE")
    return store, start, end


def run(days: int, devices: int) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "tests"))
    from support.postgres import create_database, drop_database

    database = create_database(prefix="civicmesh_bench_")
    try:
        print(f"queries: loading {days} days x {devices} devices x 8 metrics ...", flush=True)
        began = time.monotonic()
        store, start, end = load(database, days, devices)
        load_s = time.monotonic() - began
        day_ago = end - DAY_MS
        queries = {
            "zone hourly series over all days (pm25)": (
                lambda: store.rollup_series("pm25", start, end, Resolution.HOUR, zone="zone-0"),
                lambda: store.series("pm25", start, end, 3600, zone="zone-0"),
            ),
            "city overview (24 h per zone and metric)": (
                lambda: store.zone_aggregates(day_ago, end, Resolution.HOUR),
                lambda: store.zone_aggregates(day_ago, end, Resolution.RAW),
            ),
            "device health (last seen, last seq)": (
                store.devices,
                lambda: store._fetch(
                    "raw last seen",
                    "SELECT device_id, max(ts) FROM readings GROUP BY device_id",
                ),
            ),
        }
        results: dict[str, dict[str, float]] = {}
        for name, (fast, raw) in queries.items():
            p50, p95 = timed(fast)
            raw_p50, raw_p95 = timed(raw, runs=5)
            results[name] = {"p50": p50, "p95": p95, "raw_p50": raw_p50, "raw_p95": raw_p95}
            print(f"queries: {name}: {p50:.1f} / {p95:.1f} ms", flush=True)
        rows = store.counts().readings
        store.close()
    finally:
        drop_database(database)
    return {
        "rows": rows,
        "shape": f"{days} days x {devices} devices x 8 metrics, 1/min; loaded in {load_s:.0f} s",
        "queries": results,
    }
