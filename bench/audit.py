"""Audit log benchmark: what the log costs the ingest, proof time at 10 M leaves, verify time.

1. **Write-step overhead**: the ingest's write step (``Store.write_batches``, 100 messages
   per transaction as the ingest groups them) with and without the log, alternating
   rounds on fresh schemas of the same PostgreSQL database (and on SQLite). The
   end-to-end ingest also verifies signatures and talks MQTT, which the log does not
   touch, so this ratio is an upper bound of the end-to-end cost.
2. **Inclusion proof at 10 M leaves**: a file store of complete-subtree hashes (the
   layout the database tables hold) built for 10,000,000 random leaf hashes (the levels
   above are real hashes of them), then proofs for random leaves, each verified.
3. **``audit verify`` of a simulated city-day**: 200 devices, a batch every 5 minutes
   (288 batches of 35 readings per device), one gateway, two witnesses; the verifier
   reads the mirror folder and checks everything (both signatures of every batch,
   chains, tiles, root, cosignatures).
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from analytics.store import open_store
from analytics.store.base import StoredBatch
from civicmesh.audit.example import build_example
from civicmesh.audit.merkle import (
    HASH_SIZE,
    FileHashStore,
    inclusion_proof,
    root_hash,
    verify_inclusion,
)
from civicmesh.audit.tiles import FolderSource
from civicmesh.audit.verify import Trust, Verifier
from civicmesh.protocol import open_batch, open_envelope

REPO = Path(__file__).resolve().parent.parent
GROUP = 100  # messages per transaction: the ingest's default max_batch_messages


def _stored(fleet_envelopes: list[bytes], registry: object) -> list[StoredBatch]:
    out = []
    for envelope in fleet_envelopes:
        opened = open_envelope(envelope, registry.gateway_key)  # type: ignore[attr-defined]
        batch = open_batch(opened.device_message, registry.device_key)  # type: ignore[attr-defined]
        out.append(
            StoredBatch(
                batch.device_id,
                batch.seq,
                batch.hash,
                batch.payload.prev_hash,
                batch.payload.sealed_at_ms,
                batch.payload.model_version,
                opened.gateway_id,
                opened.received_at_ms,
                opened.received_at_ms + 5,
                opened.device_message,
                envelope,
                batch.payload.readings,
            )
        )
    return out


def _interleaved(url: str, batches: list[StoredBatch], first_with_log: bool) -> dict[bool, float]:
    """Readings/s of write_batches with and without the log, alternating transaction by
    transaction on one store (so the machine's load hits both modes alike)."""
    store = open_store(url)
    store.migrate()
    seconds = {True: 0.0, False: 0.0}
    readings = {True: 0, False: 0}
    expected = 0
    for k, i in enumerate(range(0, len(batches), GROUP)):
        group = batches[i : i + GROUP]
        audit = (k % 2 == 0) == first_with_log
        store.audit.enabled = audit
        started = time.perf_counter()
        store.write_batches(group)
        seconds[audit] += time.perf_counter() - started
        readings[audit] += sum(len(b.readings) for b in group)
        expected += len(group) if audit else 0
    store.audit.enabled = True
    logged = store.audit.size()
    store.close()
    assert logged == sum(
        len(batches[i : i + GROUP])
        for k, i in enumerate(range(0, len(batches), GROUP))
        if (k % 2 == 0) == first_with_log
    )
    return {mode: readings[mode] / seconds[mode] for mode in (True, False)}


def write_overhead(devices: int, batches: int, rounds: int) -> dict[str, Any]:
    import bench.ingest as ingest

    sys.path.insert(0, str(REPO / "tests"))
    from support.postgres import create_database, drop_database

    print(f"audit: sealing {devices} devices x {batches} batches of 480 readings ...", flush=True)
    fleet = ingest.build_fleet(devices, batches, 60)
    stored = _stored(fleet.envelopes, fleet.registry)
    figures: dict[str, object] = {"batches": len(stored), "readings": fleet.readings}
    database = create_database(prefix="civicmesh_bench_audit_")
    workdir = Path(tempfile.mkdtemp(prefix="civicmesh-bench-audit-"))
    try:
        for backend in ("postgresql", "sqlite"):
            rates: dict[bool, list[float]] = {True: [], False: []}
            for r in range(rounds):
                if backend == "postgresql":
                    url = ingest.schema_url(database, f"audit_{r}")
                else:
                    url = f"sqlite:///{workdir / f'audit_{r}.db'}"
                for mode, rate in _interleaved(url, stored, r % 2 == 0).items():
                    rates[mode].append(rate)
            without = sum(rates[False]) / rounds
            with_log = sum(rates[True]) / rounds
            figures[backend] = {
                "without_log": without,
                "with_log": with_log,
                "cost": 1 - with_log / without,
                "rounds": rounds,
            }
            print(f"audit: {backend} write step {without:,.0f} -> {with_log:,.0f} readings/s")
    finally:
        drop_database(database)
        shutil.rmtree(workdir, ignore_errors=True)
    return figures


def proof_at_size(size: int, proofs: int) -> dict[str, Any]:
    """Build the stored levels of a ``size``-leaf tree in files; time random proofs."""
    import hashlib

    directory = Path(tempfile.mkdtemp(prefix="civicmesh-bench-tree-"))
    store = FileHashStore(directory)
    try:
        print(f"audit: building the stored levels of a {size:,}-leaf tree ...", flush=True)
        started = time.perf_counter()
        chunk = 1 << 20  # leaves per step (a multiple of every power of two below it)
        level_data = []
        for lo in range(0, size, chunk):
            data = os.urandom(min(chunk, size - lo) * HASH_SIZE)
            store.write_level(0, lo, data)
            level_data.append(data)
        level, count = 0, size
        sha = hashlib.sha256
        while count > 1:
            parents = count // 2
            joined = b"".join(level_data)
            out = b"".join(
                sha(b"\x01" + joined[i : i + 64]).digest() for i in range(0, parents * 64, 64)
            )
            level += 1
            store.write_level(level, 0, out)
            level_data, count = [out], parents
        build_s = time.perf_counter() - started
        root = root_hash(store, size)
        rng = random.Random(7)
        indexes = [rng.randrange(size) for _ in range(proofs)]
        leaves = store.read_nodes([(0, i) for i in indexes])
        timings = []
        for index, leaf in zip(indexes, leaves, strict=True):
            t0 = time.perf_counter()
            proof = inclusion_proof(store, index, size)
            timings.append(time.perf_counter() - t0)
            verify_inclusion(index, size, leaf, proof, root)
        t0 = time.perf_counter()
        for index, leaf in zip(indexes[:200], leaves, strict=False):
            verify_inclusion(index, size, leaf, inclusion_proof(store, index, size), root)
        verify_ms = (time.perf_counter() - t0) / 200 * 1000
        timings.sort()
        return {
            "size": size,
            "build_s": build_s,
            "proof_ms_median": statistics.median(timings) * 1000,
            "proof_ms_p99": timings[int(len(timings) * 0.99)] * 1000,
            "proof_and_verify_ms": verify_ms,
            "proofs": proofs,
            "disk_mb": sum(f.stat().st_size for f in directory.iterdir()) / 1e6,
        }
    finally:
        store.close()
        shutil.rmtree(directory, ignore_errors=True)


def verify_city_day(devices: int, batches_per_device: int, readings: int) -> dict[str, Any]:
    directory = Path(tempfile.mkdtemp(prefix="civicmesh-bench-mirror-"))
    try:
        print(
            f"audit: simulating a city-day: {devices} devices x {batches_per_device} batches ...",
            flush=True,
        )
        t0 = time.perf_counter()
        log = build_example(
            directory,
            devices=devices,
            batches_per_device=batches_per_device,
            readings_per_batch=readings,
        )
        build_s = time.perf_counter() - t0
        trust = Trust(log.signer.key, log.registry, tuple(w.key for w in log.witnesses), 2)
        out: dict[str, object] = {
            "devices": devices,
            "batches": len(log.envelopes),
            "readings": len(log.envelopes) * readings,
            "build_s": build_s,
            "mirror_mb": sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) / 1e6,
        }
        for jobs in (1, os.cpu_count() or 1):
            t0 = time.perf_counter()
            report = Verifier(FolderSource(directory), trust, jobs=jobs).run()
            elapsed = time.perf_counter() - t0
            assert report.ok, "\n".join(report.lines())
            out[f"verify_s_jobs{jobs}"] = elapsed
        out["cores"] = os.cpu_count() or 1
        return out
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run(quick: bool = False) -> dict[str, Any]:
    return {
        "write": write_overhead(20 if quick else 100, 5 if quick else 10, 2 if quick else 3),
        "proof": proof_at_size(100_000 if quick else 10_000_000, 200 if quick else 2000),
        "verify": verify_city_day(20 if quick else 200, 24 if quick else 288, 35),
    }


def rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The table rows of :func:`run`'s figures."""
    write, proof, verify = result["write"], result["proof"], result["verify"]
    out = []
    for backend in ("postgresql", "sqlite"):
        w = write[backend]
        out.append(
            (
                f"audit: write step with / without the log ({backend})",
                f"{1 - w['cost']:.3f}",
                f"{w['with_log']:,.0f} vs {w['without_log']:,.0f} readings/s, "
                f"{write['batches']:,} batches of 480 readings, transactions alternating "
                f"with / without, {w['rounds']} rounds; "
                f"cost {w['cost'] * 100:.1f} %, target <= 5 %",
            )
        )
    out.append(
        (
            "audit: inclusion proof, ms",
            f"{proof['proof_ms_median']:.3f}",
            f"median of {proof['proofs']:,} at {proof['size']:,} leaves (p99 "
            f"{proof['proof_ms_p99']:.3f} ms; with verification "
            f"{proof['proof_and_verify_ms']:.3f} ms); target <= 1 ms",
        )
    )
    cores = verify["cores"]
    out.append(
        (
            "audit verify, city-day, s",
            f"{verify[f'verify_s_jobs{cores}']:.1f}",
            f"{verify['devices']} devices, {verify['batches']:,} batches, "
            f"{verify['readings']:,} readings, {cores} processes "
            f"(one process: {verify['verify_s_jobs1']:.1f} s); target <= 10 s",
        )
    )
    return out
