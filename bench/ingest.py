"""Ingest benchmark: pre-signed batches through Mosquitto to K ingest workers into
PostgreSQL, against the raw binary COPY rate of the same rows into the same indexed table.

The devices' batches are sealed and countersigned before the clock starts (that is the
devices' and gateway's work, not ingest's). K workers are started and subscribed; then
the clock starts and one publisher sends every batch as fast as the broker takes them,
while the workers verify both signatures of every message, write ledger and readings
idempotently, acknowledge after commit, send receipts and keep the rollups current. The
rate is readings over the time from the first publish to the last batch written (the
ledger's ingested_at).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from analytics.store.postgres import PostgresStore
from bench.copydata import COLUMNS, copy_rows
from civicmesh import topics
from civicmesh.identity import Ed25519Signer
from civicmesh.metrics import METRICS
from civicmesh.mqtt import MqttLink
from civicmesh.protocol import GENESIS_HASH, Reading, make_payload, seal_batch, wrap_envelope
from civicmesh.registry import DeviceRecord, GatewayRecord, Registry
from civicmesh.timeutil import now_ms

REPO = Path(__file__).resolve().parent.parent
MIN_MS = 60_000
METRICS_USED = METRICS[:8]


@dataclass
class Fleet:
    envelopes: list[bytes]
    gateway_id: str
    device_ids: np.ndarray
    ts_ms: np.ndarray
    metric: np.ndarray
    value: np.ndarray
    seq: np.ndarray
    registry: Registry

    @property
    def readings(self) -> int:
        return len(self.ts_ms)


def build_fleet(devices: int, batches: int, minutes_per_batch: int) -> Fleet:
    """Sealed, countersigned batches: ``minutes_per_batch`` minutes of 8 metrics each."""
    gateway = Ed25519Signer.from_seed(hashlib.sha256(b"bench/gateway").digest())
    registry = Registry.empty().with_gateway(
        GatewayRecord(gateway.key_id, gateway.verify_key().to_text())
    )
    start = (now_ms() // 3_600_000 - batches * minutes_per_batch // 60 - 2) * 3_600_000
    per_batch = minutes_per_batch * len(METRICS_USED)
    offsets = np.repeat(np.arange(minutes_per_batch, dtype=np.int64) * MIN_MS, len(METRICS_USED))
    codes = np.tile(np.array([m.code for m in METRICS_USED], dtype=np.int16), minutes_per_batch)
    names = [m.name for m in METRICS_USED] * minutes_per_batch
    rng = np.random.default_rng(7)
    lows = np.array([max(m.minimum, 0.0) for m in METRICS_USED])
    envelopes, dev_col, ts_col, metric_col, value_col, seq_col = [], [], [], [], [], []
    for d in range(devices):
        signer = Ed25519Signer.from_seed(hashlib.sha256(f"bench/device/{d}".encode()).digest())
        registry = registry.with_device(
            DeviceRecord(signer.key_id, signer.verify_key().to_text(), f"zone-{d % 4}")
        )
        prev = GENESIS_HASH
        for b in range(batches):
            t0 = start + b * minutes_per_batch * MIN_MS
            ts = t0 + offsets
            values = np.round(np.tile(lows, minutes_per_batch) + rng.uniform(1, 40, per_batch), 2)
            rows = zip(ts.tolist(), names, values.tolist(), strict=True)
            readings = [Reading(t, name, v) for t, name, v in rows]
            payload = make_payload(signer.key_id, b + 1, prev, int(ts[-1]) + 1000, readings)
            batch = seal_batch(signer, payload)
            prev = batch.hash
            envelopes.append(wrap_envelope(gateway, batch.message, int(ts[-1]) + 2000).message)
            dev_col.append(np.full(per_batch, signer.key_id.encode(), dtype="S16"))
            ts_col.append(ts)
            metric_col.append(codes)
            value_col.append(values)
            seq_col.append(np.full(per_batch, b + 1, dtype=np.int64))
    return Fleet(
        envelopes,
        gateway.key_id,
        np.concatenate(dev_col),
        np.concatenate(ts_col),
        np.concatenate(metric_col),
        np.concatenate(value_col),
        np.concatenate(seq_col),
        registry,
    )


def schema_url(database: str, schema: str) -> str:
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}".encode())
    return f"{database}?options=-csearch_path%3D{schema}"


def raw_copy_rate(url: str, fleet: Fleet, rows_per_transaction: int) -> float:
    """Readings/s of binary COPY of the same rows into the same indexed, partitioned table."""
    store = PostgresStore(url)
    store.migrate()
    store.ensure_partitions_ahead(int(fleet.ts_ms.min()), weeks=2)
    chunks = []
    for lo in range(0, fleet.readings, rows_per_transaction):
        hi = lo + rows_per_transaction
        chunks.append(
            copy_rows(
                fleet.device_ids[lo:hi], fleet.ts_ms[lo:hi], fleet.metric[lo:hi],
                fleet.value[lo:hi], fleet.seq[lo:hi],
            )
        )  # fmt: skip
    store.close()
    with psycopg.connect(url, autocommit=True) as conn:
        began = time.perf_counter()
        for data in chunks:
            with (
                conn.transaction(),
                conn.cursor() as cur,
                cur.copy(f"COPY readings ({COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy,
            ):
                copy.write(data)
        elapsed = time.perf_counter() - began
        (count,) = conn.execute("SELECT count(*) FROM readings").fetchone()  # type: ignore[misc]
    assert count == fleet.readings, f"COPY stored {count} of {fleet.readings} rows"
    return fleet.readings / elapsed


@dataclass
class IngestResult:
    readings_per_s: float
    wall_s: float
    peak_rss_mb: list[float]
    duplicates: int
    quarantined: int


class Workers:
    def __init__(self, count: int, env: dict[str, str], logdir: Path) -> None:
        self.count, self.env, self.logdir = count, env, logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        for i in range(self.count):
            log = (self.logdir / f"worker{i}.log").open("ab")
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "civicmesh.cli", "-v", "ingest", "run",
                     "--worker-id", f"bench{i}"],
                    env=self.env, stdout=log, stderr=subprocess.STDOUT,
                )
            )  # fmt: skip
        deadline = time.monotonic() + 60
        for i in range(self.count):
            path = self.logdir / f"worker{i}.log"
            while b"subscribed to" not in path.read_bytes():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker {i} did not start: {path.read_text()[-2000:]}")
                time.sleep(0.05)

    def peak_rss_mb(self) -> list[float]:
        peaks = []
        for proc in self.procs:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
            peaks.append(int(line.split()[1]) / 1024)
        return peaks

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs = []


def ingest_rate(url: str, mqtt_url: str, fleet: Fleet, workers: int, workdir: Path) -> IngestResult:
    registry_path = workdir / "registry.json"
    fleet.registry.save(registry_path)
    store = PostgresStore(url)
    store.migrate()
    env = {
        **os.environ,
        "CIVICMESH_DATABASE_URL": url,
        "CIVICMESH_REGISTRY_FILE": str(registry_path),
        "CIVICMESH_MQTT__URL": mqtt_url,
        "CIVICMESH_INGEST__SHARED_GROUP": "bench",
    }
    pool = Workers(workers, env, workdir)
    pool.start()
    topic = topics.gateway_up(fleet.gateway_id)
    try:
        with MqttLink(mqtt_url, "bench-publisher", max_inflight=1000) as link:
            began = time.time()
            for lo in range(0, len(fleet.envelopes), 500):
                items = [(topic, e) for e in fleet.envelopes[lo : lo + 500]]
                if link.publish_many(items, timeout=120) != len(items):
                    raise RuntimeError("the broker did not acknowledge the batches")
        deadline = time.monotonic() + 1800
        while store.counts().readings < fleet.readings:
            if time.monotonic() > deadline:
                raise RuntimeError(f"ingest stalled at {store.counts()}")
            time.sleep(0.1)
        wall = time.time() - began
        peaks = pool.peak_rss_mb()
    finally:
        pool.stop()
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM max(ingested_at)), (SELECT count(*) FROM quarantine)"
            " FROM batches"
        ).fetchone()
    assert row is not None
    last_write, quarantined = float(row[0]), int(row[1])
    counts = store.counts()
    store.close()
    span = last_write - began
    return IngestResult(
        counts.readings / span, wall, peaks, counts.batches - len(fleet.envelopes), quarantined
    )


def run(devices: int, batches: int, minutes: int, workers: int) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "tests"))
    from support.mosquitto import MosquittoProcess
    from support.postgres import create_database, drop_database

    print(f"ingest: sealing {devices} devices x {batches} batches ...", flush=True)
    fleet = build_fleet(devices, batches, minutes)
    database = create_database(prefix="civicmesh_bench_")
    workdir = Path(tempfile.mkdtemp(prefix="civicmesh-bench-"))
    try:
        print(f"ingest: raw COPY of {fleet.readings:,} readings ...", flush=True)
        copy_rate = raw_copy_rate(schema_url(database, "copy_base"), fleet, 200 * minutes * 8)
        with MosquittoProcess(workdir=workdir / "mqtt") as broker:
            print(f"ingest: {workers} workers draining {len(fleet.envelopes)} batches ...")
            result = ingest_rate(schema_url(database, "e2e"), broker.url, fleet, workers, workdir)
    finally:
        drop_database(database)
    return {
        "readings": fleet.readings,
        "batches": len(fleet.envelopes),
        "workers": workers,
        "copy_rate": copy_rate,
        "ingest_rate": result.readings_per_s,
        "ratio": result.readings_per_s / copy_rate,
        "wall_s": result.wall_s,
        "peak_rss_mb": result.peak_rss_mb,
        "quarantined": result.quarantined,
    }
