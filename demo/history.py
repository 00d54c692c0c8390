"""Weeks of a simulated city's history, written straight into a central store.

Reports, the report API and their evaluation need days and weeks of data; running the
whole pipeline for that long is what the demo does in real time. This writes the same
kind of data the pipeline would: readings from ``firmware_sim``'s signal model, sealed
into signed, hash-chained batches by each device's key and countersigned by a gateway,
then stored and rolled up. Deterministic for a given seed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from analytics.store.base import StoredBatch
from civicmesh.identity import Ed25519Signer
from civicmesh.protocol import GENESIS_HASH, Reading, make_payload, seal_batch, wrap_envelope
from civicmesh.registry import DeviceRecord
from firmware_sim.city import SimulatedCity
from firmware_sim.driver import METRICS_BY_KIND, signal_params
from firmware_sim.signals import simulate

HOUR_MS = 3_600_000


def history_signer(seed: int, name: str) -> Ed25519Signer:
    """Reproducible identity of a simulated device or gateway (the seed is public)."""
    return Ed25519Signer.from_seed(
        hashlib.sha256(f"civicmesh-history/{seed}/{name}".encode()).digest()
    )


@dataclass(frozen=True, slots=True)
class HistoryDevice:
    name: str
    zone: str
    kind: str
    signer: Ed25519Signer
    driver_options: dict[str, Any]


def history_devices(city: SimulatedCity) -> list[HistoryDevice]:
    return [
        HistoryDevice(d.name, d.zone, d.kind, history_signer(city.seed, d.name), d.driver_options)
        for d in city.devices
    ]


def device_records(city: SimulatedCity, registered_ms: int) -> list[DeviceRecord]:
    return [
        DeviceRecord(
            device.signer.key_id,
            device.signer.verify_key().to_text(),
            device.zone,
            sim.lat,
            sim.lon,
            device.kind,
            registered_at_ms=registered_ms,
        )
        for device, sim in zip(history_devices(city), city.devices, strict=True)
    ]


def fill_store(
    store: Any,
    city: SimulatedCity,
    start_ms: int,
    end_ms: int,
    *,
    step_ms: int = 600_000,
    batch_span_ms: int = 6 * HOUR_MS,
    gaps: dict[str, tuple[int, int]] | None = None,
) -> int:
    """Write readings every ``step_ms`` in ``[start_ms, end_ms)`` for every device of
    ``city`` and refresh the rollups; returns the number of readings.

    ``gaps`` maps a device name to a ``[from, to)`` window with no readings (a device that
    was offline), so completeness and fault facts have something to find.
    """
    store.upsert_devices(device_records(city, start_ms - HOUR_MS))
    gateway = history_signer(city.seed, "gateway")
    times = np.arange(start_ms - start_ms % step_ms, end_ms, step_ms, dtype=np.int64)
    times = times[times >= start_ms]
    total = 0
    for device in history_devices(city):
        params = signal_params(
            int(device.driver_options.get("seed", 0)),
            device.driver_options.get("zone_profile"),
            step_ms,
        )
        metrics = METRICS_BY_KIND[device.kind]
        values = simulate(params, times, metrics)
        gap = (gaps or {}).get(device.name)
        keep = np.ones(times.size, dtype=bool)
        if gap is not None:
            keep &= ~((times >= gap[0]) & (times < gap[1]))
        prev_hash, seq = GENESIS_HASH, 0
        batches = []
        for lo in range(start_ms, end_ms, batch_span_ms):
            window = keep & (times >= lo) & (times < lo + batch_span_ms)
            rows = [
                Reading(int(t), metric, round(float(values[metric][i]), 3))
                for i in np.flatnonzero(window)
                for metric, t in ((m, times[i]) for m in metrics)
            ]
            if not rows:
                continue
            seq += 1
            sealed_at = min(lo + batch_span_ms, end_ms)
            payload = make_payload(
                device.signer.key_id, seq, prev_hash, sealed_at, rows, "sim-history"
            )
            batch = seal_batch(device.signer, payload)
            envelope = wrap_envelope(gateway, batch.message, sealed_at + 1_000)
            batches.append(stored_batch(batch, envelope, prev_hash, gateway.key_id))
            prev_hash = batch.hash
            total += len(rows)
        for i in range(0, len(batches), 50):
            store.write_batches(batches[i : i + 50])
    while store.refresh_rollups():
        pass
    return total


def stored_batch(batch: Any, envelope: Any, prev_hash: bytes, gateway_id: str) -> StoredBatch:
    return StoredBatch(
        device_id=batch.device_id,
        seq=batch.seq,
        payload_hash=batch.hash,
        prev_hash=prev_hash,
        sealed_at_ms=batch.payload.sealed_at_ms,
        model_version=batch.payload.model_version,
        gateway_id=gateway_id,
        received_at_ms=envelope.received_at_ms,
        ingested_at_ms=envelope.received_at_ms + 500,
        device_message=batch.message,
        gateway_message=envelope.message,
        readings=batch.payload.readings,
    )
