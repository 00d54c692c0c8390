"""A simulated city's log, built from deterministic keys: tests, benchmarks, the demo.

Devices seal signed, hash-chained batches; a gateway wraps them; the log appends their
leaves in arrival order (devices interleaved); witnesses cosign; a mirror folder is
written exactly as the central service writes it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from civicmesh.audit.leaf import make_leaf
from civicmesh.audit.log import LogWriter, Mirror, make_checkpoint
from civicmesh.audit.merkle import MemoryHashStore, consistency_proof
from civicmesh.audit.note import ALG_COSIGNATURE_V1, NoteSigner, split_note
from civicmesh.audit.witness import Witness
from civicmesh.identity import Ed25519Signer
from civicmesh.protocol import (
    GENESIS_HASH,
    Reading,
    make_payload,
    open_batch,
    open_envelope,
    seal_batch,
    wrap_envelope,
)
from civicmesh.registry import DeviceRecord, GatewayRecord, Registry

ORIGIN = "civicmesh.example/log"
START_MS = 1_767_225_600_000  # 2026-01-01T00:00Z
METRICS = ("pm25", "pm10", "no2", "o3", "temperature", "relativehumidity", "vehicle_count")


def _seed(label: str, i: int) -> bytes:
    return hashlib.sha256(f"civicmesh/audit/example/{label}/{i}".encode()).digest()


def log_signer(origin: str = ORIGIN) -> NoteSigner:
    return NoteSigner(origin, _seed("log", 0))


def witness_signer(i: int) -> NoteSigner:
    return NoteSigner(f"witness.example/w{i}", _seed("witness", i), ALG_COSIGNATURE_V1)


def reading_value(device: int, seq: int, k: int) -> float:
    """Values that need a float64 on the wire (so a tampered value is easy to find)."""
    return 10.0 + device * 0.013 + seq * 0.0007 + k * 0.00011


@dataclass(slots=True)
class ExampleLog:
    directory: Path
    signer: NoteSigner
    witnesses: list[NoteSigner]
    registry: Registry
    envelopes: list[bytes]
    store: MemoryHashStore = field(default_factory=MemoryHashStore)
    note: bytes = b""


def device_signer(i: int) -> Ed25519Signer:
    return Ed25519Signer.from_seed(_seed("device", i))


def gateway_signer() -> Ed25519Signer:
    return Ed25519Signer.from_seed(_seed("gateway", 0))


def simulate_envelopes(
    devices: int, batches_per_device: int, readings_per_batch: int, *, batch_ms: int = 300_000
) -> tuple[Registry, list[bytes]]:
    """Signed envelopes of a city: ``devices`` devices, one gateway, time-interleaved."""
    gateway = gateway_signer()
    signers = [device_signer(d) for d in range(devices)]
    registry = Registry(
        {
            s.key_id: DeviceRecord(s.key_id, s.verify_key().to_text(), zone=f"zone-{d % 5}")
            for d, s in enumerate(signers)
        },
        {gateway.key_id: GatewayRecord(gateway.key_id, gateway.verify_key().to_text())},
    )
    prev = [GENESIS_HASH] * devices
    envelopes: list[bytes] = []
    step = batch_ms // max(1, readings_per_batch)
    for b in range(batches_per_device):
        for d, signer in enumerate(signers):
            t0 = START_MS + b * batch_ms
            readings = [
                Reading(t0 + k * step, METRICS[k % len(METRICS)], reading_value(d, b + 1, k))
                for k in range(readings_per_batch)
            ]
            batch = seal_batch(
                signer, make_payload(signer.key_id, b + 1, prev[d], t0 + batch_ms, readings)
            )
            prev[d] = batch.hash
            envelopes.append(wrap_envelope(gateway, batch.message, t0 + batch_ms + 500).message)
    return registry, envelopes


def leaf_of(envelope: bytes, registry: Registry) -> bytes:
    """The leaf bytes of an envelope (verifies both signatures)."""
    opened = open_envelope(envelope, registry.gateway_key)
    batch = open_batch(opened.device_message, registry.device_key)
    return make_leaf(batch.device_id, batch.seq, opened.device_message, envelope).encode()


def write_log(
    directory: Path,
    signer: NoteSigner,
    registry: Registry,
    envelopes: list[bytes],
    witnesses: list[NoteSigner] | None = None,
) -> ExampleLog:
    """Append ``envelopes`` to a fresh log, sign, have ``witnesses`` cosign, publish."""
    log = ExampleLog(directory, signer, list(witnesses or []), registry, list(envelopes))
    writer = LogWriter(log.store)
    writer.append([leaf_of(e, registry) for e in envelopes])
    log.note = make_checkpoint(signer, log.store, writer.size)
    store = log.store

    def proof_for(m: int, n: int) -> list[bytes]:
        return consistency_proof(store, m, n)

    cosignatures = [Witness(w, signer.key).cosign(log.note, proof_for) for w in log.witnesses]
    Mirror(directory).publish(
        log.store, writer.size, log.note, lambda lo, hi: log.envelopes[lo:hi], cosignatures
    )
    return log


def build_example(
    directory: Path,
    *,
    devices: int = 3,
    batches_per_device: int = 4,
    readings_per_batch: int = 5,
    witnesses: int = 2,
) -> ExampleLog:
    registry, envelopes = simulate_envelopes(devices, batches_per_device, readings_per_batch)
    return write_log(
        directory, log_signer(), registry, envelopes, [witness_signer(i) for i in range(witnesses)]
    )


def checkpoint_text(note: bytes) -> str:
    return split_note(note)[0]
