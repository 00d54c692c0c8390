"""Over-the-air model updates: verify, store, smoke-check, swap, roll back.

A release arrives on the retained topic of the device's group (``models/{group}/{name}``)
or from a file. It is installed only when a configured release key signed its manifest,
the artifact has the manifest's SHA-256, the manifest names this device's group and a
sensor type it has, this agent is new enough, and the model passes its smoke check on
the device's recent windows. The swap is atomic for the windows (one lock) and on disk
(``active.json`` is replaced with ``os.replace``). A new version that fails in service
within its probation is rolled back to the previous one.

On disk, under ``models_dir``::

    <name>/<version>/release.cbor   the signed release as received (re-verified at load)
    active.json                     {name: {"version": v, "previous": v or null}}
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from civicmesh.identity import VerifyKey
from civicmesh.mqtt import Message
from civicmesh.protocol import ModelRelease, ProtocolError, open_model_release
from edge.errors import ModelError, ReleaseRefused
from edge.models import Model, ModelRuntime, check_outputs, load_model

log = logging.getLogger(__name__)

PROBATION_WINDOWS = 20  # a new version's first windows: any failure rolls it back


def version_key(version: str) -> tuple[int, ...]:
    """``1.10.2`` -> (1, 10, 2); anything else is refused."""
    try:
        parts = tuple(int(p) for p in version.split("."))
    except ValueError:
        raise ReleaseRefused(
            f"version {version!r} is not dotted numbers", reason="release.version"
        ) from None
    if not parts or any(p < 0 for p in parts):
        raise ReleaseRefused(f"version {version!r} is not dotted numbers", reason="release.version")
    return parts


@dataclass
class UpdateEvent:
    """What happened to one release, for health messages and logs."""

    name: str
    version: str
    state: str  # installed | refused | rolled_back | ignored
    reason: str = ""

    def as_dict(self) -> dict[str, str]:
        # health messages are at most 4 KiB: reasons are cut here, the log has them whole
        return {
            "name": self.name,
            "version": self.version,
            "state": self.state,
            "reason": self.reason[:160],
        }


class ModelStore:
    """The releases kept on the device, and which version of each is active."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._active_path = directory / "active.json"

    def active(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self._active_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning(
                "models: %s unreadable (%s); starting without models", self._active_path, exc
            )
            return {}
        return data if isinstance(data, dict) else {}

    def set_active(self, active: dict[str, dict[str, Any]]) -> None:
        tmp = self._active_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(active, sort_keys=True))
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, self._active_path)  # atomic: the old or the new file, never half

    def path(self, name: str, version: str) -> Path:
        return self.directory / name / version / "release.cbor"

    def save(self, release: ModelRelease) -> None:
        path = self.path(release.name, release.version)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(release.message)
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    def read(self, name: str, version: str) -> bytes:
        return self.path(name, version).read_bytes()


class ModelUpdater:
    """Takes model releases for one device and keeps its runtime's models current."""

    def __init__(
        self,
        store: ModelStore,
        runtime: ModelRuntime,
        release_keys: Sequence[VerifyKey],
        *,
        group: str,
        sensor_types: Sequence[str],
        agent_version: str,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.release_keys = tuple(release_keys)
        self.group = group
        self.sensor_types = frozenset(sensor_types)
        self.agent_version = agent_version
        self.events: list[UpdateEvent] = []
        self._pending: list[bytes] = []
        self._pending_lock = threading.Lock()
        self._probation: dict[str, int] = {}
        runtime.on_failure = self._on_failure

    # ---- start-up ----------------------------------------------------------------

    def load_active(self) -> None:
        """Load the active versions from disk, re-verified; a bad one falls back to its
        previous version, and failing that the model is left out (readings stay raw)."""
        active = self.store.active()
        for name, entry in sorted(active.items()):
            for version in (entry.get("version"), entry.get("previous")):
                if not version:
                    continue
                try:
                    release = self._open(self.store.read(name, str(version)))
                    self.runtime.install(load_model(release.manifest, release.artifact))
                    if version != entry.get("version"):
                        active[name] = {"version": version, "previous": None}
                        self.store.set_active(active)
                        self._event(name, str(version), "rolled_back", "active version unusable")
                    break
                except (OSError, ReleaseRefused, ModelError) as exc:
                    self._event(name, str(version), "refused", f"at start-up: {exc}")

    # ---- arriving releases --------------------------------------------------------

    def on_message(self, message: Message) -> None:
        """MQTT thread: queue the release; :meth:`apply_pending` installs it."""
        if not message.payload:
            return  # a cleared retained topic
        with self._pending_lock:
            self._pending.append(message.payload)

    def apply_pending(self) -> list[UpdateEvent]:
        with self._pending_lock:
            pending, self._pending = self._pending, []
        return [self.offer(data) for data in pending]

    def offer(self, data: bytes) -> UpdateEvent:
        """Verify and install one release; never raises for a bad release."""
        try:
            release = self._open(data)
        except ReleaseRefused as exc:
            return self._event("?", "?", "refused", f"{exc.reason}: {exc}")
        name, version = release.name, release.version
        try:
            self._check_fit(release)
        except ReleaseRefused as exc:
            return self._event(name, version, "refused", f"{exc.reason}: {exc}")
        active = self.store.active()
        current = active.get(name, {}).get("version")
        if current is not None and version_key(version) <= version_key(str(current)):
            return self._event(name, version, "ignored", f"version {current} is active")
        try:
            model = load_model(release.manifest, release.artifact)
        except ModelError as exc:
            return self._event(name, version, "refused", f"model.load: {exc}")
        unfit = self.runtime.refusal(model.spec)
        if unfit is not None:
            return self._event(name, version, "refused", f"model.window: {unfit}")
        problem = self._smoke_check(model)
        if problem is not None:
            # never swapped in: the previous version keeps running
            return self._event(name, version, "rolled_back", f"smoke check: {problem}")
        self.store.save(release)
        active[name] = {"version": version, "previous": current}
        self.store.set_active(active)
        self.runtime.install(model)
        self._probation[name] = PROBATION_WINDOWS
        return self._event(name, version, "installed")

    def _open(self, data: bytes) -> ModelRelease:
        try:
            return open_model_release(data, self.release_keys)
        except ProtocolError as exc:
            raise ReleaseRefused(str(exc), reason=exc.reason) from None

    def _check_fit(self, release: ModelRelease) -> None:
        manifest = release.manifest
        version_key(release.version)
        if self.group not in manifest["groups"]:
            raise ReleaseRefused(
                f"released to {manifest['groups']}, this device is in group {self.group!r}",
                reason="release.group",
            )
        targets = set(manifest["target_sensor_types"])
        if "*" not in targets and not targets & self.sensor_types:
            raise ReleaseRefused(
                f"for sensor types {sorted(targets)}, this device has {sorted(self.sensor_types)}",
                reason="release.sensor_type",
            )
        if version_key(manifest["min_agent_version"]) > version_key(self.agent_version):
            raise ReleaseRefused(
                f"needs agent {manifest['min_agent_version']}, this is {self.agent_version}",
                reason="release.agent_version",
            )

    def _smoke_check(self, model: Model) -> str | None:
        rows = self.runtime.smoke_rows(model.spec)
        try:
            outputs = model.run(rows)
        except ModelError as exc:
            return str(exc)
        return check_outputs(model.spec, outputs, len(rows))

    # ---- in service ---------------------------------------------------------------

    def _on_failure(self, name: str, problem: str) -> None:
        """A model failed on a window: within probation, go back to the previous version."""
        if self._probation.get(name, 0) > 0:
            self.rollback(name, f"failed in probation: {problem}")

    def tick(self) -> None:
        """Count one processed window off every probation."""
        for name in list(self._probation):
            self._probation[name] -= 1
            if self._probation[name] <= 0:
                del self._probation[name]

    def rollback(self, name: str, reason: str) -> UpdateEvent:
        active = self.store.active()
        entry = active.get(name, {})
        failed, previous = entry.get("version", "?"), entry.get("previous")
        self._probation.pop(name, None)
        if previous:
            try:
                release = self._open(self.store.read(name, str(previous)))
                self.runtime.install(load_model(release.manifest, release.artifact))
                active[name] = {"version": previous, "previous": None}
            except (OSError, ReleaseRefused, ModelError) as exc:
                self.runtime.remove(name)
                active.pop(name, None)
                reason += f"; previous {previous} unusable too ({exc}), running without it"
        else:
            self.runtime.remove(name)
            active.pop(name, None)
        self.store.set_active(active)
        return self._event(name, str(failed), "rolled_back", reason)

    def _event(self, name: str, version: str, state: str, reason: str = "") -> UpdateEvent:
        event = UpdateEvent(name, version, state, reason)
        self.events.append(event)
        del self.events[:-20]
        level = logging.INFO if state in ("installed", "ignored") else logging.WARNING
        log.log(level, "model release %s %s: %s %s", name, version, state, reason)
        return event

    def health(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "active": self.store.active(),
            "events": [e.as_dict() for e in self.events[-5:]],
        }
