"""The device and gateway registry: who may sign, with which key, in which zone.

Issue-2 depth: a JSON file written by the operator (``civicmesh registry ...``) and read
by gateways and ingest, reloaded when it changes. Signed snapshots and pulls from the
admin API come with fleet security.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import nacl.bindings

from civicmesh.errors import RegistryError
from civicmesh.identity import ALG_EDDSA, VerifyKey, derive_id, is_valid_id
from civicmesh.timeutil import now_ms

log = logging.getLogger(__name__)

STATUSES = ("active", "revoked")
# The kind of an importer identity (``civicmesh import``): a key that signs readings taken
# from an archive, not a sensor in the field. Its registration (``registered_at_ms``, the
# time from which its readings are accepted) may lie in the past; no other kind's may.
IMPORT_KIND = "import"
# An announcement older than this is refused: a replayed old rotation must not undo a newer one.
MAX_ROTATION_AGE_MS = 7 * 24 * 3_600_000


def refuse_weak_key(text: str, what: str) -> VerifyKey:
    """The key of a registration; refuses an Ed25519 key that is no valid point of the
    prime-order group (the all-zero key, the identity, the small-order points): with
    such a key, signatures can be forged or made to verify for many messages."""
    key = VerifyKey.from_text(text)
    if key.algorithm == ALG_EDDSA and not nacl.bindings.crypto_core_ed25519_is_valid_point(
        key.public_key
    ):
        raise ValueError(
            f"Invalid {what}: the public key is a weak Ed25519 key (all zero, the identity "
            "or a small-order point); make a new key with `civicmesh edge keygen`"
        )
    return key


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
    # Key rotation: the key the id derives from (once rotated), and the key before the
    # current one with the end of its overlap window (epoch ms).
    first_key: str | None = None
    previous_key: str | None = None
    previous_key_until_ms: int = 0
    owner: str = ""  # the independent operator who runs the node

    def __post_init__(self) -> None:
        if len(self.owner) > 120 or not self.owner.isprintable():
            raise ValueError(
                "Invalid device record: owner must be printable, 120 characters at most"
            )
        refuse_weak_key(self.public_key, "device record")
        origin = VerifyKey.from_text(self.first_key or self.public_key)
        if derive_id(origin.public_key) != self.device_id:
            raise ValueError(f"Invalid device record: id {self.device_id} does not match its key")
        if self.previous_key is not None:
            VerifyKey.from_text(self.previous_key)
        if self.status not in STATUSES:
            raise ValueError(f"Invalid device record: status {self.status!r}")
        if not self.zone:
            raise ValueError("Invalid device record: zone is empty")

    def verify_key(self) -> VerifyKey:
        return replace(VerifyKey.from_text(self.public_key), bound_id=self.device_id)

    def verify_keys(self, at_ms: int) -> tuple[VerifyKey, ...]:
        """The keys valid at ``at_ms``: the current one, and the previous one within its
        overlap window."""
        keys = [self.verify_key()]
        if self.previous_key is not None and at_ms < self.previous_key_until_ms:
            keys.append(replace(VerifyKey.from_text(self.previous_key), bound_id=self.device_id))
        return tuple(keys)

    def rotated(self, new_key: str, overlap_ms: int, now_ms: int) -> DeviceRecord:
        return replace(
            self,
            public_key=new_key,
            first_key=self.first_key or self.public_key,
            previous_key=self.public_key,
            previous_key_until_ms=now_ms + overlap_ms,
        )


@dataclass(frozen=True, slots=True)
class GatewayRecord:
    gateway_id: str
    public_key: str
    status: str = "active"

    def __post_init__(self) -> None:
        key = refuse_weak_key(self.public_key, "gateway record")
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

    def device_key(self, device_id: str) -> tuple[VerifyKey, ...] | None:
        """Keys of an active device (two during a rotation's overlap); None for unknown or
        revoked devices."""
        record = self.devices.get(device_id)
        if record is None or record.status != "active":
            return None
        return record.verify_keys(now_ms())

    def gateway_key(self, gateway_id: str) -> VerifyKey | None:
        record = self.gateways.get(gateway_id)
        return record.verify_key() if record and record.status == "active" else None

    def with_device(self, record: DeviceRecord) -> Registry:
        return Registry({**self.devices, record.device_id: record}, self.gateways)

    def with_importer(self, record: DeviceRecord, valid_from_ms: int) -> Registry:
        """Register an importer identity valid from ``valid_from_ms`` (back-dating allowed:
        only importers may have it), or move an importer's start earlier; never later, so
        what was accepted once stays acceptable."""
        check_valid_from(record.kind, valid_from_ms, now_ms())
        known = self.devices.get(record.device_id)
        if known is not None and known.kind != IMPORT_KIND:
            raise RegistryError(
                f"Device {record.device_id} is registered as a field device ({known.kind}); "
                "it cannot become an importer"
            )
        start = valid_from_ms if known is None else min(valid_from_ms, known.registered_at_ms)
        return self.with_device(replace(record, registered_at_ms=start))

    def with_gateway(self, record: GatewayRecord) -> Registry:
        return Registry(self.devices, {**self.gateways, record.gateway_id: record})

    def rotate_device_key(
        self, announcement: bytes, overlap_ms: int, now_ms: int
    ) -> tuple[Registry, str]:
        """Apply a rotation announcement (signed by the device's current key): the new key
        becomes current, the old one stays valid for ``overlap_ms``."""
        from civicmesh.protocol import open_rotation

        rotation = open_rotation(announcement, self.device_key)
        record = self.devices[rotation.device_id]
        if rotation.new_key.to_text() == record.public_key:
            raise RegistryError(f"Rotation of {rotation.device_id} is applied already")
        if abs(now_ms - rotation.issued_at_ms) > MAX_ROTATION_AGE_MS:
            raise RegistryError(
                f"Rotation of {rotation.device_id} was issued too long ago (or in the future)"
            )
        new = record.rotated(rotation.new_key.to_text(), overlap_ms, now_ms)
        return Registry({**self.devices, new.device_id: new}, self.gateways), new.device_id

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


def check_valid_from(kind: str, valid_from_ms: int, now: int, slack_ms: int = 60_000) -> None:
    """Refuse a back-dated registration unless it is an importer identity's."""
    if valid_from_ms < now - slack_ms and kind != IMPORT_KIND:
        raise RegistryError(
            f"A back-dated valid-from is accepted only for importer identities (kind "
            f"{IMPORT_KIND!r}); a {kind!r} device is valid from its registration. To bring "
            "in an archive, use `civicmesh import`"
        )


def _dev_key(record: DeviceRecord) -> str:
    return record.device_id


def _gw_key(record: GatewayRecord) -> str:
    return record.gateway_id


class RegistryFile:
    """A registry file reloaded when its modification time changes (thread-safe).

    The first load must succeed (a missing file is an empty registry). Afterwards a file
    that cannot be read or parsed, or that went missing (an operator's editor writing it
    in place, a copy half done), does not replace the last good registry: it is kept,
    the failure is logged and counted, and the file is read again on the next call.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._registry = Registry.empty()
        self._loaded = False
        self.reload_failures = 0
        self._failing_since: float | None = None
        self._failed_stamp: tuple[int, int] | None = None
        self._retry_at = 0.0
        self.current()

    def current(self) -> Registry:
        try:
            st = self.path.stat()
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        except OSError as exc:
            return self._keep(f"cannot stat it: {exc}")
        with self._lock:
            if stamp == self._stamp and self._loaded:
                return self._registry
            if stamp == self._failed_stamp and time.monotonic() < self._retry_at:
                return self._registry  # the same bad file: read it again in a moment
            if stamp is None and self._loaded and self._stamp is not None:
                return self._keep_locked("it went missing")
            try:
                registry = self._read() if stamp else Registry.empty()
            except RegistryError as exc:
                if not self._loaded:
                    raise
                self._failed_stamp, self._retry_at = stamp, time.monotonic() + 1.0
                return self._keep_locked(str(exc))
            if self._failing_since is not None:
                log.warning("registry file %s readable again; reloaded", self.path)
                self._failing_since = None
            self._registry, self._stamp, self._loaded = registry, stamp, True
            return self._registry

    def _read(self) -> Registry:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return Registry.empty()
        except (OSError, UnicodeDecodeError) as exc:
            raise RegistryError(f"cannot read {self.path}: {exc}") from None
        return Registry.from_json(text, origin=str(self.path))

    def _keep(self, why: str) -> Registry:
        with self._lock:
            return self._keep_locked(why)

    def _keep_locked(self, why: str) -> Registry:
        """Keep the last good registry; log the first failure of a run at warning."""
        self.reload_failures += 1
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.warning(
                "registry file %s not reloaded (%s); keeping the last good registry "
                "(%d devices) and retrying",
                self.path,
                why,
                len(self._registry.devices),
            )
        return self._registry

    def device_key(self, device_id: str) -> tuple[VerifyKey, ...] | None:
        return self.current().device_key(device_id) if is_valid_id(device_id) else None

    def gateway_key(self, gateway_id: str) -> VerifyKey | None:
        return self.current().gateway_key(gateway_id) if is_valid_id(gateway_id) else None
