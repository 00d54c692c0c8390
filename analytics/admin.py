"""Admin routes of the API: register and revoke devices (``/api/v1/admin/...``).

The registry file is the source of truth: gateways and ingest re-read it when it changes,
so a revocation takes effect at the next message they verify.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field

from analytics.apiauth import requires
from analytics.store.base import Store
from civicmesh.errors import CivicmeshError
from civicmesh.identity import VerifyKey, derive_id
from civicmesh.registry import DeviceRecord, Registry, RegistryFile
from civicmesh.timeutil import now_ms

router = APIRouter(prefix="/api/v1/admin", tags=["admin"], dependencies=[requires("admin")])


class RegisterDeviceIn(BaseModel):
    public_key: str = Field(
        min_length=40, max_length=120, description="base64 Ed25519 key, or es256: and a P-256 key"
    )
    zone: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9-]*$")
    lat: float | None = Field(default=None, ge=-90, le=90)
    lon: float | None = Field(default=None, ge=-180, le=180)
    kind: str = Field(default="multi", pattern="^(air|traffic|multi)$")
    owner: str = Field(default="", max_length=120, description="Who runs the node")


class RegisteredDeviceOut(BaseModel):
    device_id: str
    zone: str
    status: str


def _registry(request: Request) -> tuple[Registry, RegistryFile]:
    registry: RegistryFile | None = request.app.state.registry
    if registry is None:
        raise HTTPException(409, "No registry file is configured (registry_file)")
    return registry.current(), registry


@router.post(
    "/devices", status_code=201, response_model=RegisteredDeviceOut, summary="Register a device"
)
def register_device(body: RegisterDeviceIn, request: Request) -> Any:
    """Add a device by its public key (its id is derived from the key)."""
    _, registry = _registry(request)
    record = add_device(registry.path, request.app.state.store, body)
    return RegisteredDeviceOut(device_id=record.device_id, zone=record.zone, status="active")


def add_device(registry_path: Path, store: Store, body: RegisterDeviceIn) -> DeviceRecord:
    """Write a new device into the registry file and the store (the API's admin route and
    the dashboard's admin page both do it this way); HTTP errors for the caller."""
    try:
        key = VerifyKey.from_text(body.public_key)
    except (CivicmeshError, ValueError) as exc:
        raise HTTPException(422, f"Not a device public key: {exc}") from None
    current = RegistryFile(registry_path).current()
    device_id = derive_id(key.public_key)
    if device_id in current.devices:
        raise HTTPException(409, f"Device {device_id} is registered already")
    record = DeviceRecord(
        device_id,
        body.public_key,
        body.zone,
        body.lat,
        body.lon,
        body.kind,
        registered_at_ms=now_ms(),
        owner=body.owner,
    )
    current.with_device(record).save(registry_path)
    store.upsert_devices([record])
    return record


@router.post(
    "/devices/{device_id}/revoke", response_model=RegisteredDeviceOut, summary="Revoke a device"
)
def revoke_device(device_id: str, request: Request) -> Any:
    """Mark a device revoked: its batches are quarantined from the next one on."""
    current, registry = _registry(request)
    if device_id not in current.devices:
        raise HTTPException(404, f"Device {device_id} is not registered")
    updated = current.revoke_device(device_id)
    updated.save(registry.path)
    record = updated.devices[device_id]
    request.app.state.store.upsert_devices([replace(record)])
    return RegisteredDeviceOut(device_id=device_id, zone=record.zone, status=record.status)
