"""Stored batches made the way ingest makes them: really sealed by a device and relayed
in a gateway's envelope (for tests that fill a store without a broker)."""

from __future__ import annotations

from collections.abc import Sequence

from analytics.store.base import StoredBatch
from civicmesh.identity import Ed25519Signer
from civicmesh.protocol import Reading, make_payload, seal_batch, wrap_envelope


def relayed_batch(
    device: Ed25519Signer,
    gateway: Ed25519Signer,
    seq: int,
    prev: bytes,
    readings: Sequence[Reading],
    model_version: str = "m1",
) -> StoredBatch:
    """Sealed 1 s after its newest reading, received 200 ms later, ingested 500 ms after
    sealing."""
    sealed_at = max(r.ts_ms for r in readings) + 1000
    payload = make_payload(device.key_id, seq, prev, sealed_at, readings, model_version)
    batch = seal_batch(device, payload)
    envelope = wrap_envelope(gateway, batch.message, sealed_at + 200)
    return StoredBatch(
        device_id=device.key_id,
        seq=seq,
        payload_hash=batch.hash,
        prev_hash=prev,
        sealed_at_ms=sealed_at,
        model_version=model_version,
        gateway_id=gateway.key_id,
        received_at_ms=envelope.received_at_ms,
        ingested_at_ms=sealed_at + 500,
        device_message=batch.message,
        gateway_message=envelope.message,
        readings=batch.payload.readings,
    )
