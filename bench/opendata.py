"""Open-data benchmark: an OpenAQ page of 1,000 raw measurements (p50/p95, over HTTP
against uvicorn) and a streamed CSV export of ~1 M readings (time and peak traced
memory), each beside a baseline measured in the same run: the store's own read of the
same rows (``Store.readings``), which the endpoints cannot beat.

``python -m bench.opendata [--devices 20] [--days 7] [--database-url URL]``: the store is
filled through the store's write path (sealed, signed batches of 60 readings) at one
reading a minute of five metrics per device: 20 devices x 7 days = 1,008,000 readings.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from analytics.api import create_app
from analytics.api.openaq import location_id, sensor_id
from analytics.app import serve_in_thread
from analytics.export import ExportRequest, csv_chunks
from analytics.store import open_store
from analytics.store.base import Resolution, Store, StoredBatch
from civicmesh.identity import Ed25519Signer
from civicmesh.protocol import GENESIS_HASH, Reading, make_payload, seal_batch, wrap_envelope
from civicmesh.registry import DeviceRecord

MIN_MS = 60_000
DAY_MS = 86_400_000
T0 = 1_767_571_200_000  # 2026-01-05T00:00:00Z
METRICS = ("pm25", "pm10", "no2", "temperature", "relativehumidity")
PER_BATCH_MINUTES = 12  # 12 minutes x 5 metrics = 60 readings a batch
RUNS = 40


def _signer(name: str) -> Ed25519Signer:
    return Ed25519Signer.from_seed(hashlib.sha256(f"bench/opendata/{name}".encode()).digest())


def fill(store: Store, devices: int, days: int) -> tuple[list[str], int]:
    """``devices`` x ``days`` of one reading a minute of five metrics; (device ids, rows)."""
    gateway = _signer("gateway")
    signers = [_signer(str(d)) for d in range(devices)]
    store.upsert_devices(
        DeviceRecord(s.key_id, s.verify_key().to_text(), f"zone-{d % 4}", 52.5 + d / 100, 13.4)
        for d, s in enumerate(signers)
    )
    rows = 0
    for signer in signers:
        prev, batches = GENESIS_HASH, []
        for seq, first in enumerate(range(0, days * 1440, PER_BATCH_MINUTES), start=1):
            readings = [
                Reading(T0 + m * MIN_MS, metric, 10.0 + (m * 7 + i) % 50)
                for m in range(first, first + PER_BATCH_MINUTES)
                for i, metric in enumerate(METRICS)
            ]
            sealed_at = readings[-1].ts_ms + 1000
            payload = make_payload(signer.key_id, seq, prev, sealed_at, readings, "m1")
            batch = seal_batch(signer, payload)
            envelope = wrap_envelope(gateway, batch.message, sealed_at + 100)
            batches.append(
                StoredBatch(
                    signer.key_id,
                    seq,
                    batch.hash,
                    prev,
                    sealed_at,
                    "m1",
                    gateway.key_id,
                    envelope.received_at_ms,
                    sealed_at + 200,
                    batch.message,
                    envelope.message,
                    batch.payload.readings,
                )
            )
            prev = batch.hash
            rows += len(readings)
        for i in range(0, len(batches), 500):
            store.write_batches(batches[i : i + 500])
    store.refresh_rollups()
    return [s.key_id for s in signers], rows


def timed(action: Callable[[], object], runs: int = RUNS) -> tuple[float, float]:
    action()  # warm
    samples = []
    for _ in range(runs):
        began = time.perf_counter()
        action()
        samples.append((time.perf_counter() - began) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(0.95 * (len(samples) - 1))]


def openaq_page(store: Store, device: str, days: int) -> dict[str, Any]:
    """p50/p95 of the third 1,000-measurement page of one sensor's week over HTTP, and of
    the store reads that page needs (the baseline: its rows and the device list)."""
    sid = sensor_id(location_id(device), "pm25")
    span = min(days, 7) * DAY_MS
    params = {
        "datetime_from": _iso(T0),
        "datetime_to": _iso(T0 + span),
        "limit": "1000",
        "page": str(max(1, min(3, span // MIN_MS // 1000))),
    }
    app = create_app(store)
    with serve_in_thread(app, "127.0.0.1", 0) as url, httpx.Client(base_url=url) as http:

        def page() -> None:
            response = http.get(f"/openaq/v3/sensors/{sid}/measurements", params=params)
            response.raise_for_status()
            # Counted, not parsed: the client's JSON decoding is not the server's time.
            assert response.content.count(b'"period"') == min(1000, span // MIN_MS)

        p50, p95 = timed(page)
    needed = min(span, 3000 * MIN_MS + 6 * 3_600_000)  # 3,001 rows, read in 6-hour slices

    def baseline() -> None:
        store.readings(device, T0, T0 + needed, "pm25")
        store.devices()

    b50, b95 = timed(baseline)
    return {"p50_ms": p50, "p95_ms": p95, "store_p50_ms": b50, "store_p95_ms": b95}


def export(store: Store, devices: list[str], days: int) -> dict[str, Any]:
    """The city's raw CSV over the whole range: seconds, rows, and peak traced memory
    (a second pass under tracemalloc); the baseline reads the same rows from the store."""
    request = ExportRequest(T0, T0 + days * DAY_MS, Resolution.RAW)
    began = time.perf_counter()
    size = lines = 0
    for chunk in csv_chunks(store, request):
        size += len(chunk)
        lines += chunk.count("\n")
    seconds = time.perf_counter() - began
    began = time.perf_counter()
    for device in devices:
        for day in range(days):
            store.readings(device, T0 + day * DAY_MS, T0 + (day + 1) * DAY_MS)
    baseline = time.perf_counter() - began
    tracemalloc.start()
    for _ in csv_chunks(store, request):
        pass
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "rows": lines - 1,
        "seconds": seconds,
        "mb": size / 1e6,
        "store_read_seconds": baseline,
        "peak_traced_mb": peak / 1e6,
    }


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.opendata", description=__doc__)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--database-url", help="an empty store (default: a temporary SQLite)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        store = open_store(url, timescaledb="off")
        try:
            store.migrate()
            began = time.perf_counter()
            devices, rows = fill(store, args.devices, args.days)
            print(f"filled {rows:,} readings in {time.perf_counter() - began:.1f} s ({url})")
            page = openaq_page(store, devices[0], args.days)
            print(
                f"openaq page of 1000 raw: p50 {page['p50_ms']:.1f} ms, p95 {page['p95_ms']:.1f} "
                f"ms; the store reads it needs: p95 {page['store_p95_ms']:.1f} ms "
                f"(ratio {page['p95_ms'] / page['store_p95_ms']:.2f})"
            )
            out = export(store, devices, args.days)
            print(
                f"csv export: {out['rows']:,} rows, {out['mb']:.0f} MB in {out['seconds']:.2f} s "
                f"({out['rows'] / out['seconds']:,.0f} rows/s); store read alone "
                f"{out['store_read_seconds']:.2f} s (ratio "
                f"{out['seconds'] / out['store_read_seconds']:.2f}); peak traced memory "
                f"{out['peak_traced_mb']:.1f} MB"
            )
        finally:
            store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
