"""The device and gateway registry: who may sign, with which key, in which zone.

Issue-2 depth: a JSON file written by the operator (``civicmesh registry ...``) and read
by gateways and ingest, reloaded when it changes. Signed snapshots and pulls from the
admin API come with fleet security.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from civicmesh.errors import RegistryError
from civicmesh.identity import VerifyKey, derive_id, is_valid_id

STATUSES = ("active", "revoked")


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    device_id: str
    public_key: str  # base64 Ed25519
    zone: str
    lat: float | None = None
    lon: float | None = None
    kind: str = "multi"  # sensor package: "air", "traffic", "multi"
    status: str = "active"
    registered_at_ms: int = 0

    def __post_init__(self) -> None:
        key = VerifyKey.from_text(self.public_key)
        if derive_id(key.public_key) != self.device_id:
            raise ValueError(f"Invalid device record: id {self.device_id} does not match its key")
        if self.status not in STATUSES:
            raise ValueError(f"Invalid device record: status {self.status!r}")
        if not self.zone:
            raise ValueError("Invalid device record: zone is empty")

    def verify_key(self) -> VerifyKey:
        return VerifyKey.from_text(self.public_key)


@dataclass(frozen=True, slots=True)
class GatewayRecord:
    gateway_id: str
    public_key: str
    status: str = "active"

    def __post_init__(self) -> None:
        key = VerifyKey.from_text(self.public_key)
        if derive_id(key.public_key) != self.gateway_id:
            raise ValueError(f"Invalid gateway record: id {self.gateway_id} does not match key")
        if self.status not in STATUSES:
            raise ValueError(f"Invalid gateway record: status {self.status!r}")

    def verify_key(self) -> VerifyKey:
        return VerifyKey.from_text(self.public_key)


@dataclass(frozen=True, slots=True)
class Registry:
    devices: dict[str, DeviceRecord]
    gateways: dict[str, GatewayRecord]

    @classmethod
    def empty(cls) -> Registry:
        return cls({}, {})

    def device_key(self, device_id: str) -> VerifyKey | None:
        """Key of an active device; None for unknown or revoked devices."""
        record = self.devices.get(device_id)
        return record.verify_key() if record and record.status == "active" else None

    def gateway_key(self, gateway_id: str) -> VerifyKey | None:
        record = self.gateways.get(gateway_id)
        return record.verify_key() if record and record.status == "active" else None

    def with_device(self, record: DeviceRecord) -> Registry:
        return Registry({**self.devices, record.device_id: record}, self.gateways)

    def with_gateway(self, record: GatewayRecord) -> Registry:
        return Registry(self.devices, {**self.gateways, record.gateway_id: record})

    def revoke_device(self, device_id: str) -> Registry:
        if device_id not in self.devices:
            raise RegistryError(f"Device {device_id} is not registered")
        revoked = replace(self.devices[device_id], status="revoked")
        return Registry({**self.devices, device_id: revoked}, self.gateways)

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": 1,
                "devices": [asdict(d) for d in sorted(self.devices.values(), key=_dev_key)],
                "gateways": [asdict(g) for g in sorted(self.gateways.values(), key=_gw_key)],
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str, *, origin: str = "registry") -> Registry:
        try:
            obj: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{origin} is not valid JSON: {exc}") from None
        if not isinstance(obj, dict) or obj.get("version") != 1:
            raise RegistryError(f'{origin} must be a JSON object with "version": 1')
        try:
            devices = {d["device_id"]: DeviceRecord(**d) for d in obj.get("devices", [])}
            gateways = {g["gateway_id"]: GatewayRecord(**g) for g in obj.get("gateways", [])}
        except (TypeError, KeyError, ValueError) as exc:
            raise RegistryError(f"{origin} has an invalid entry: {exc}") from None
        return cls(devices, gateways)

    def save(self, path: Path) -> None:
        """Atomic write (temporary file + rename), so readers never see half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".registry-")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Registry:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RegistryError(
                f"Registry file {path} not found; create it with `civicmesh registry add-device`"
            ) from None
        return cls.from_json(text, origin=str(path))


def _dev_key(record: DeviceRecord) -> str:
    return record.device_id


def _gw_key(record: GatewayRecord) -> str:
    return record.gateway_id


class RegistryFile:
    """A registry file reloaded when its modification time changes (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._registry = Registry.empty()
        self.current()

    def current(self) -> Registry:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._registry = Registry.load(self.path) if stamp else Registry.empty()
                self._stamp = stamp
            return self._registry

    def device_key(self, device_id: str) -> VerifyKey | None:
        return self.current().device_key(device_id) if is_valid_id(device_id) else None

    def gateway_key(self, gateway_id: str) -> VerifyKey | None:
        return self.current().gateway_key(gateway_id) if is_valid_id(gateway_id) else None
