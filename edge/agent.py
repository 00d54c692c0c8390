"""The edge agent loop: collect -> window -> outbox -> seal -> publish.

A batch leaves the outbox only after the gateway's receipt names it (see
:mod:`edge.outbox`); while the link is down the outbox grows and drains in seq order
once the link returns.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict
from typing import Any, Protocol

from civicmesh import topics
from civicmesh.custody import ResendPlan, ResendPolicy
from civicmesh.drivers import SensorDriver
from civicmesh.errors import ConfigError, MqttError
from civicmesh.identity import Signer, VerifyKey
from civicmesh.mqtt import Message, MqttLink
from civicmesh.protocol import ProtocolError, decode_receipt
from civicmesh.systemd import Watchdog, notify
from civicmesh.timeutil import now_ms
from edge import __version__
from edge.models import ModelRuntime, onnxruntime_available
from edge.ota import ModelStore, ModelUpdater
from edge.outbox import Outbox
from edge.settings import EdgeSettings
from edge.windowing import Windower

log = logging.getLogger(__name__)


class Clock(Protocol):
    def now_ms(self) -> int: ...


class SystemClock:
    def now_ms(self) -> int:
        return now_ms()


class SimulatedClock:
    """Time running ``speed`` times faster than the wall clock from ``start_ms``."""

    def __init__(self, start_ms: int, speed: float) -> None:
        self.start_ms = start_ms
        self.speed = speed
        self._began = time.monotonic()

    def now_ms(self) -> int:
        return self.start_ms + int((time.monotonic() - self._began) * 1000 * self.speed)


class EdgeAgent:
    def __init__(
        self,
        settings: EdgeSettings,
        signer: Signer,
        driver: SensorDriver,
        link: MqttLink | None,
        clock: Clock | None = None,
        *,
        model_version: str = "",
    ) -> None:
        self.settings = settings
        self.signer = signer
        self.driver = driver
        self.link = link  # may be shared between agents; not owned
        self.clock = clock or SystemClock()
        self._model_version = model_version
        self.topic = topics.device_up(signer.key_id)
        window_ms = settings.window_s * 1000
        self.windower = Windower(
            window_ms,
            max(1, window_ms // driver.sample_interval_ms),
            simulated=settings.driver.name == "sim",
        )
        self.outbox = Outbox(
            settings.state_dir / "outbox.db",
            max_readings=settings.outbox_max_readings,
            max_bytes=settings.outbox_max_bytes,
            min_free_bytes=settings.outbox_min_free_bytes,
            await_receipts=settings.await_receipts,
        )
        self.published = 0
        self.confirmed = 0
        self.resend = ResendPolicy(settings.resend_after_s)
        self._receipts: list[bytes] = []
        self._receipts_lock = threading.Lock()
        if link is not None and settings.await_receipts:
            # subscribe() also works before connect(): it is renewed on every connect.
            link.subscribe(topics.device_receipt(self.device_id), self._on_receipt)
        self.runtime: ModelRuntime | None = None
        self.updater: ModelUpdater | None = None
        if settings.models.enabled:
            self._start_models(window_ms)

    def _start_models(self, window_ms: int) -> None:
        section = self.settings.models
        try:
            keys = [VerifyKey.from_text(k) for k in section.release_keys]
        except ValueError as exc:
            raise ConfigError(f"models.release_keys: {exc}") from None
        self.runtime = ModelRuntime(window_ms, section.calibrate)
        if not onnxruntime_available():
            # No onnxruntime wheel for 32-bit ARM: run without models (calibrated metrics
            # carry UNCALIBRATED) and take no releases, rather than fail each one.
            log.warning(
                "models.enabled, but onnxruntime is not installed (no wheel for 32-bit ARM): "
                "running with models disabled; UNCALIBRATED on: %s",
                ", ".join(section.calibrate) or "(no metric)",
            )
            return
        store = ModelStore(section.dir or self.settings.state_dir / "models")
        self.updater = ModelUpdater(
            store,
            self.runtime,
            keys,
            group=section.group,
            sensor_types=section.sensor_types,
            agent_version=__version__,
        )
        self.updater.load_active()
        for path in section.install:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ConfigError(f"models.install: cannot read {path}: {exc}") from None
            self.updater.offer(data)
        if self.link is not None:
            self.link.subscribe(topics.model_releases(section.group), self.updater.on_message)

    @property
    def model_version(self) -> str:
        """What the batches report: the loaded models' versions, or the fixed label."""
        if self.runtime is not None:
            return self.runtime.version_text()
        return self._model_version

    def _on_receipt(self, message: Message) -> None:
        """Runs in the MQTT thread: note the digests; :meth:`apply_receipts` releases them
        (a disk write here would hold up the PUBACKs this thread also delivers)."""
        try:
            receipt = decode_receipt(message.payload)
        except ProtocolError as exc:
            log.warning("ignored a malformed receipt on %s: %s", message.topic, exc.reason)
            return
        with self._receipts_lock:
            self._receipts.extend(receipt.digests)

    def apply_receipts(self) -> int:
        """Release the batches named by the receipts received so far (one transaction)."""
        with self._receipts_lock:
            digests, self._receipts = self._receipts, []
        if not digests:
            return 0
        count, newest_sent = self.outbox.confirm(digests)
        self.confirmed += count
        self.resend.confirmed(newest_sent)
        return count

    @property
    def device_id(self) -> str:
        return self.signer.key_id

    def collect(self, now: int) -> int:
        """Read the driver up to ``now`` and store the completed windows' readings."""
        readings = self.windower.feed(self.driver.read(now), now)
        raw = self.windower.take_raw()  # raw channels: model inputs, never published
        if self.runtime is not None and self.updater is not None:
            self.updater.apply_pending()
            readings = self.runtime.process(readings, raw)
            for _ in {r.ts_ms for r in readings}:
                self.updater.tick()
        self.outbox.add(readings, source=self.settings.driver.name)
        return len(readings)

    def seal_all(self) -> int:
        sealed = 0
        while self.outbox.seal(self.signer, self.settings.batch_max_readings, self.model_version):
            sealed += 1
        return sealed

    def flush(self, timeout: float = 10.0) -> int:
        """Publish unsent batches in seq order; release only the acknowledged prefix."""
        self.apply_receipts()
        if self.link is None or not self.link.is_connected:
            return 0
        published = 0
        plan = self.resend.plan()
        while True:
            unsent = self.outbox.unsent(200, plan)
            if not unsent:
                break
            try:
                acked = self.link.publish_many(
                    [(self.topic, message) for _, message in unsent], timeout=timeout
                )
            except MqttError as exc:
                log.warning("publish failed, %d batches stay in the outbox: %s", len(unsent), exc)
                break
            self.outbox.mark_sent([seq for seq, _ in unsent[:acked]])
            if acked and plan.probe:
                self.resend.probed()  # anything sent on a quiet path serves as its probe
                plan = ResendPlan(plan.before_ms, 0, plan.probe_before_ms)
            published += acked
            if acked < len(unsent):
                break
        self.published += published
        return published

    def backfill(self, start_ms: int, end_ms: int, step_ms: int = 3_600_000) -> None:
        """Run simulated time from ``start_ms`` to ``end_ms`` as fast as it goes."""
        t = start_ms
        while t < end_ms:
            t = min(t + step_ms, end_ms)
            self.collect(t)
            self.seal_all()
            self.flush()

    def health(self) -> dict[str, Any]:
        self.apply_receipts()
        stats = self.outbox.stats()
        return {
            "device_id": self.device_id,
            "agent_version": __version__,
            "model_version": self.model_version,
            "models": None
            if self.runtime is None or self.updater is None
            else {"loaded": self.runtime.health(), **self.updater.health()},
            "driver": self.settings.driver.name,
            "outbox": asdict(stats),
            "dropped_total": stats.dropped_total,
            "published": self.published,
            "confirmed": self.confirmed,
            "time_ms": self.clock.now_ms(),
        }

    def publish_health(self) -> None:
        if self.link is None or not self.link.is_connected:
            return
        try:
            self.link.publish(
                topics.device_health(self.device_id), json.dumps(self.health()).encode(), qos=0
            )
        except MqttError as exc:
            log.info("health message not sent: %s", exc)

    def run(self, stop: threading.Event) -> None:
        """Real-time loop until ``stop`` is set; failed flushes back off 1 s .. 30 s."""
        backoff = 1.0
        next_health = 0.0
        watchdog = Watchdog()
        notify("READY=1")
        while not stop.is_set():
            # The agent owns its reconnection: a link that never connected (booted
            # offline) or whose network thread died is connected again, with backoff.
            if self.link is not None:
                self.link.maintain()
            if self.link is None or self.link.healthy:
                watchdog.tick()  # under systemd: a loop or link that stops gets restarted
            self.collect(self.clock.now_ms())
            self.seal_all()
            self.flush()
            if self.outbox.stats().unpublished_batches:
                wait = backoff
                backoff = min(backoff * 2, 30.0)
            else:
                wait = self.settings.publish_interval_s
                backoff = 1.0
            if time.monotonic() >= next_health:
                self.publish_health()
                next_health = time.monotonic() + self.settings.health_interval_s
            stop.wait(wait)
        self.seal_all()
        self.flush(timeout=5)

    def close(self) -> None:
        self.driver.close()
        self.outbox.close()
