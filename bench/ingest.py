"""Ingest benchmark: pre-signed batches through Mosquitto to K ingest workers into
PostgreSQL, against the raw binary COPY rate of the same rows into the same indexed table;
on the plain path, on the TimescaleDB path, or both in one run (``--compare-backends``).

The devices' batches are sealed and countersigned before the clock starts (that is the
devices' and gateway's work, not ingest's). K workers are started and subscribed; then
the clock starts and one publisher sends every batch as fast as the broker takes them,
while the workers verify both signatures of every message, write ledger and readings
idempotently, acknowledge after commit, send receipts and keep the rollups current. The
rate is readings over the time from the first publish until the bench sees the last
batch committed. With TimescaleDB the ingested chunks are then compressed, and a
simulated week is loaded and compressed, for the stored bytes per million readings.
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


BACKENDS = ("postgresql", "timescaledb")


def schema_url(database: str, schema: str) -> str:
    """URL of a new schema in ``database`` (used by the audit benchmark)."""
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}".encode())
    return f"{database}?options=-csearch_path%3D{schema}"


def open_backend(url: str, backend: str) -> PostgresStore:
    """A migrated store on ``backend``'s path (plain PostgreSQL: TimescaleDB off)."""
    store = PostgresStore(url, timescaledb="require" if backend == "timescaledb" else "off")
    store.migrate()
    return store


def raw_copy_rate(url: str, fleet: Fleet, rows_per_transaction: int, backend: str) -> float:
    """Readings/s of binary COPY of the same rows into the same indexed table of the same
    path (weekly partitions, or the hypertable), in a database of its own."""
    store = open_backend(url, backend)
    if backend == "postgresql":
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


def compressed_size(url: str, readings: int) -> dict[str, float]:
    """Compress every readings chunk of a TimescaleDB store now; bytes per million readings
    before and after (table, indexes and TOAST), from hypertable_compression_stats."""
    with psycopg.connect(url, autocommit=True) as conn:
        for (chunk,) in conn.execute("SELECT show_chunks('readings')").fetchall():
            conn.execute("SELECT compress_chunk(%s::regclass, if_not_compressed => true)", (chunk,))
        row = conn.execute(
            "SELECT sum(before_compression_total_bytes), sum(after_compression_total_bytes)"
            " FROM hypertable_compression_stats('readings')"
        ).fetchone()
    assert row is not None and row[0] and row[1], "nothing was compressed"
    before, after = float(row[0]), float(row[1])
    return {
        "before_bytes_per_million": before / readings * 1e6,
        "after_bytes_per_million": after / readings * 1e6,
        "ratio": after / before,
    }


def simulated_week(devices: int) -> tuple[bytes, int]:
    """A week of 1-minute readings of 8 metrics per device, as COPY data: a daily cycle
    plus a slow random walk and sensor-resolution noise, rounded to 0.01 (what a real
    sensor series looks like to a compressor, unlike independent uniform draws)."""
    minutes = 7 * 24 * 60
    rng = np.random.default_rng(11)
    start = (now_ms() // 86_400_000 - 8) * 86_400_000
    ts = start + np.arange(minutes, dtype=np.int64) * MIN_MS
    day = np.sin(2 * np.pi * np.arange(minutes) / 1440.0)
    parts = []
    for d in range(devices):
        dev = np.full(minutes, f"wk{d:014d}".encode(), dtype="S16")
        for m, metric in enumerate(METRICS_USED):
            base = max(metric.minimum, 0.0) + 10.0 + 5.0 * m
            walk = np.cumsum(rng.normal(0.0, 0.05, minutes))
            noise = rng.normal(0.0, 0.3, minutes)
            values = np.round(base + 4.0 * day + walk + noise, 2)
            parts.append((dev, ts, np.full(minutes, metric.code, dtype=np.int16), values))
    dev, ts_all, codes, values = (np.concatenate([p[i] for p in parts]) for i in range(4))
    data = copy_rows(dev, ts_all, codes, values, np.ones(len(ts_all), dtype=np.int64))
    return data, len(ts_all)


def week_compression(url: str, devices: int) -> dict[str, float]:
    """Compressed against uncompressed storage of a simulated week on TimescaleDB."""
    data, readings = simulated_week(devices)
    open_backend(url, "timescaledb").close()
    with (
        psycopg.connect(url, autocommit=True) as conn,
        conn.cursor() as cur,
        cur.copy(f"COPY readings ({COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy,
    ):
        copy.write(data)
    return {"readings": readings, "devices": devices, **compressed_size(url, readings)}


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


def ingest_rate(
    url: str, mqtt_url: str, fleet: Fleet, workers: int, workdir: Path, backend: str
) -> IngestResult:
    registry_path = workdir / f"registry-{backend}.json"
    fleet.registry.save(registry_path)
    store = open_backend(url, backend)
    env = {
        **os.environ,
        "CIVICMESH_DATABASE_URL": url,
        "CIVICMESH_REGISTRY_FILE": str(registry_path),
        "CIVICMESH_MQTT__URL": mqtt_url,
        "CIVICMESH_INGEST__SHARED_GROUP": f"bench-{backend}",
        "CIVICMESH_STORAGE__TIMESCALEDB": "require" if backend == "timescaledb" else "off",
    }
    logdir = workdir / backend
    logdir.mkdir(parents=True, exist_ok=True)
    pool = Workers(workers, env, logdir)
    pool.start()
    topic = topics.gateway_up(fleet.gateway_id)
    try:
        with MqttLink(mqtt_url, f"bench-publisher-{backend}", max_inflight=1000) as link:
            # The clock runs from the first publish until the bench sees the last batch
            # committed (not the ledger's ingested_at, which a worker stamps before it
            # writes: at --quick sizes that left out most of the last write).
            began = time.perf_counter()
            for lo in range(0, len(fleet.envelopes), 500):
                items = [(topic, e) for e in fleet.envelopes[lo : lo + 500]]
                if link.publish_many(items, timeout=120) != len(items):
                    raise RuntimeError("the broker did not acknowledge the batches")
        deadline = time.monotonic() + 1800
        while store.counts().readings < fleet.readings:
            if time.monotonic() > deadline:
                raise RuntimeError(f"ingest stalled at {store.counts()}")
            time.sleep(0.005)
        wall = time.perf_counter() - began
        peaks = pool.peak_rss_mb()
    finally:
        pool.stop()
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM quarantine").fetchone()
    assert row is not None
    counts = store.counts()
    store.close()
    return IngestResult(
        counts.readings / wall, wall, peaks, counts.batches - len(fleet.envelopes), int(row[0])
    )


def run(
    devices: int,
    batches: int,
    minutes: int,
    workers: int,
    backends: tuple[str, ...] = ("postgresql",),
    week_devices: int = 20,
) -> dict[str, Any]:
    """Ingest on each of ``backends``, each against raw COPY into its own path's table, in
    one run; with TimescaleDB also the compressed size per million readings (of the
    ingested fleet and of a simulated week). Both paths run on the same server (the
    TimescaleDB test server when TimescaleDB is among them), one database per
    measurement."""
    sys.path.insert(0, str(REPO / "tests"))
    from support.mosquitto import MosquittoProcess
    from support.postgres import admin_url, create_database, drop_database, tsdb_admin_url

    server = tsdb_admin_url() if "timescaledb" in backends else admin_url()
    print(f"ingest: sealing {devices} devices x {batches} batches ...", flush=True)
    fleet = build_fleet(devices, batches, minutes)
    workdir = Path(tempfile.mkdtemp(prefix="civicmesh-bench-"))
    results: dict[str, dict[str, Any]] = {}
    databases: list[str] = []

    def database() -> str:
        databases.append(create_database(server, prefix="civicmesh_bench_"))
        return databases[-1]

    # Both paths: in the order A B B A, so that a machine whose load drifts during the
    # run (other jobs on it) does not favour the path measured first.
    order = [*backends, *reversed(backends)] if len(backends) == 2 else list(backends)
    runs: dict[str, list[dict[str, Any]]] = {backend: [] for backend in backends}
    try:
        with MosquittoProcess(workdir=workdir / "mqtt") as broker:
            for backend in order:
                print(
                    f"ingest [{backend}]: raw COPY of {fleet.readings:,} readings ...", flush=True
                )
                copy_rate = raw_copy_rate(database(), fleet, 200 * minutes * 8, backend)
                print(f"ingest [{backend}]: {workers} workers, {len(fleet.envelopes)} batches ...")
                url = database()
                result = ingest_rate(url, broker.url, fleet, workers, workdir, backend)
                entry: dict[str, Any] = {
                    "copy_rate": copy_rate,
                    "ingest_rate": result.readings_per_s,
                    "ratio": result.readings_per_s / copy_rate,
                    "wall_s": result.wall_s,
                    "peak_rss_mb": result.peak_rss_mb,
                    "quarantined": result.quarantined,
                }
                if backend == "timescaledb" and not runs[backend]:
                    entry["compression"] = compressed_size(url, fleet.readings)
                runs[backend].append(entry)
                while databases:  # keep the server lean between measurements
                    drop_database(databases.pop(), server)
            week = None
            if "timescaledb" in backends:
                print(f"ingest: compressing a simulated week of {week_devices} devices ...")
                week = week_compression(database(), week_devices)
    finally:
        for url in databases:
            drop_database(url, server)
    for backend, measured in runs.items():
        merged = dict(measured[0])
        for key in ("copy_rate", "ingest_rate", "ratio"):
            merged[key] = sum(m[key] for m in measured) / len(measured)
        merged["runs"] = [
            {k: m[k] for k in ("copy_rate", "ingest_rate", "ratio")} for m in measured
        ]
        results[backend] = merged
    out: dict[str, Any] = {
        "readings": fleet.readings,
        "batches": len(fleet.envelopes),
        "workers": workers,
        "server": server.rsplit("@", 1)[-1].rsplit("/", 1)[0],
        "backends": results,
        "week": week,
    }
    if len(results) == 2:
        plain, ts = results["postgresql"], results["timescaledb"]
        out["timescaledb_vs_postgresql"] = float(ts["ingest_rate"]) / float(plain["ingest_rate"])
    return out


def rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The benchmark table's lines for ``result``."""
    out: list[tuple[str, str, str]] = []
    backends: dict[str, dict[str, Any]] = result["backends"]
    for backend, r in backends.items():
        table = "hypertable" if backend == "timescaledb" else "weekly partitions"
        each = r.get("runs", [])
        runs = (
            f" (mean of {len(each)} runs: "
            + ", ".join(f"{m['ingest_rate']:,.0f}" for m in each)
            + ")"
            if len(each) > 1
            else ""
        )
        out += [
            (f"ingest [{backend}], readings/s end to end", f"{r['ingest_rate']:,.0f}",
             f"{result['workers']} workers, {result['readings']:,} readings in "
             f"{result['batches']:,} batches, signatures verified, ledger + rollups{runs}"),
            (f"raw binary COPY [{backend}], readings/s", f"{r['copy_rate']:,.0f}",
             f"same rows into its own path's indexed table ({table}), one client"),
            (f"ingest / raw COPY [{backend}]", f"{r['ratio']:.2f}", "target >= 0.5"),
            (f"ingest worker peak RSS [{backend}], MB",
             ", ".join(f"{m:.0f}" for m in r["peak_rss_mb"]),
             "VmHWM of each worker process; target <= 150"),
        ]  # fmt: skip
        if "compression" in r:
            c = r["compression"]
            out.append(
                (f"stored per million readings [{backend}], MB",
                 f"{c['before_bytes_per_million'] / 1e6:.1f} -> "
                 f"{c['after_bytes_per_million'] / 1e6:.1f}",
                 f"the ingested fleet (uniform random values), compressed: "
                 f"{c['ratio']:.2f} of uncompressed"),
            )  # fmt: skip
    if "timescaledb_vs_postgresql" in result:
        out.append(
            ("ingest TimescaleDB / plain PostgreSQL", f"{result['timescaledb_vs_postgresql']:.2f}",
             f"same run, same server ({result['server']}); target >= 0.8"),
        )  # fmt: skip
    week: dict[str, Any] | None = result.get("week")
    if week:
        out.append(
            ("simulated week, compressed / uncompressed", f"{week['ratio']:.2f}",
             f"{week['devices']} devices x 7 days x 1/min x 8 metrics "
             f"({week['readings']:,} readings): {week['before_bytes_per_million'] / 1e6:.1f} -> "
             f"{week['after_bytes_per_million'] / 1e6:.1f} MB per million; target <= 0.33"),
        )  # fmt: skip
    return out
