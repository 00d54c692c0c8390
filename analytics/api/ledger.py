"""``/ledger`` and ``/quarantine``: accepted batches and refused messages."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated

from fastapi import Path, Query
from pydantic import BaseModel, Field

from analytics.api.common import (
    ErrorOut,
    StoreDep,
    iso,
    require_device,
    resource_router,
)
from analytics.apiauth import requires

router = resource_router()


class LedgerEntryOut(BaseModel):
    device_id: str
    seq: int
    payload_hash: str = Field(description="SHA-256 of the device payload bytes, hex")
    prev_hash: str = Field(description="The previous batch's payload hash, hex")
    gateway_id: str
    readings: int = Field(description="Readings stored from this batch")
    sealed_at: datetime
    received_at: datetime = Field(description="When the gateway received the batch")
    ingested_at: datetime
    device_message_b64: str = Field(description="The device's COSE_Sign1 bytes, base64")
    gateway_message_b64: str = Field(description="The gateway's envelope bytes, base64")


class QuarantineOut(BaseModel):
    reason: str = Field(description='Machine-readable reason, e.g. "signature.invalid"')
    detail: str
    source: str = Field(description='Who rejected it: "gw:<id>" or "ingest:<worker>"')
    topic: str
    received_at: datetime
    received_at_ms: int
    payload_size: int
    payload_sha256: str
    payload_b64: str = Field(description="Up to 64 KiB of the rejected bytes, base64")
    device_id: str | None
    seq: int | None


@router.get(
    "/ledger/{device_id}",
    response_model=list[LedgerEntryOut],
    summary="Batch ledger of a device (audit)",
    tags=["audit"],
    responses={404: {"model": ErrorOut, "description": "Unknown device"}},
)
def ledger(
    store: StoreDep,
    device_id: Annotated[str, Path(min_length=1, max_length=64, description="Device id")],
    after_seq: Annotated[
        int, Query(ge=0, le=2**63 - 1, description="Only batches with a higher seq")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=1000, description="Most entries returned")] = 100,
) -> list[LedgerEntryOut]:
    """Stored batches in seq order with hashes and the exact signed bytes.

    Anyone can re-verify: decode ``gateway_message_b64`` and ``device_message_b64`` and
    check both signatures and the hash chain (``prev_hash`` of each entry equals the
    ``payload_hash`` of the one before).
    """
    require_device(store, device_id)
    return [
        LedgerEntryOut(
            device_id=e.device_id,
            seq=e.seq,
            payload_hash=e.payload_hash.hex(),
            prev_hash=e.prev_hash.hex(),
            gateway_id=e.gateway_id,
            readings=e.readings,
            sealed_at=iso(e.sealed_at_ms),
            received_at=iso(e.received_at_ms),
            ingested_at=iso(e.ingested_at_ms),
            device_message_b64=base64.b64encode(e.device_message).decode("ascii"),
            gateway_message_b64=base64.b64encode(e.gateway_message).decode("ascii"),
        )
        for e in store.ledger(device_id, after_seq=after_seq, limit=limit)
    ]


@router.get(
    "/quarantine",
    dependencies=[requires("operator")],
    response_model=list[QuarantineOut],
    summary="Quarantined messages and readings",
    tags=["audit"],
)
def quarantine(
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="Most records returned")] = 100,
) -> list[QuarantineOut]:
    """What gateways and ingest rejected, newest first, with the reason."""
    return [
        QuarantineOut(
            reason=q.reason,
            detail=q.detail,
            source=q.source,
            topic=q.topic,
            received_at=iso(q.received_at_ms),
            received_at_ms=q.received_at_ms,
            payload_size=q.payload_size,
            payload_sha256=q.payload_sha256,
            payload_b64=q.payload_b64,
            device_id=q.device_id,
            seq=q.seq,
        )
        for q in store.quarantined(limit)
    ]
