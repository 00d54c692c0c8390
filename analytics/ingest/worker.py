"""The ingest worker: receive -> verify -> write -> acknowledge, and what keeps it alive.

Flow: paho's network thread hands each message to the receiver's queue
(:mod:`analytics.ingest.receive`, never blocking); the worker thread takes up to
``max_batch_messages`` (or whatever arrived within ``max_batch_delay_ms``), verifies
every gateway envelope and the device batch inside it (:mod:`analytics.ingest.verify`),
writes the group with one store call plus the quarantine records of everything rejected
(:mod:`analytics.ingest.write`), and only then acknowledges the group to the broker and
sends each gateway its receipt (:mod:`analytics.ingest.acknowledge`). A crash before the
commit means a redelivery, never a loss; the store is idempotent on ``(device_id, seq)``.

Nothing a message carries can end the worker thread: every step of a cycle runs inside
its guard, and a watchdog thread restarts the worker thread should it end all the same.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from analytics.ingest.acknowledge import Acknowledger
from analytics.ingest.claim import HEARTBEAT_S, WorkerClaim
from analytics.ingest.errors import IngestError, describe
from analytics.ingest.pipeline import Pipeline
from analytics.ingest.receive import Receiver
from analytics.settings import AnalyticsSettings, IngestSettings
from analytics.store.base import Store
from civicmesh import topics
from civicmesh.mqtt import MqttLink
from civicmesh.registry import RegistryFile
from civicmesh.timeutil import now_ms

log = logging.getLogger(__name__)

_STOP_JOIN_S = 30.0
WATCHDOG_S = 1.0
_ERROR_PAUSE_S = 0.2
_COUNTERS = (
    "received", "verified", "written_batches", "written_readings", "duplicates",
    "conflicts", "store_errors", "store_refused", "health_dropped", "health_stored",
    "internal_errors", "restarts", "acked", "stale_acks", "records_dropped",
)  # fmt: skip


class IngestWorker:
    """One ingest worker. ``link`` is made by the caller with ``persistent=True``,
    ``manual_ack=True`` and a client id that stays the same across restarts.

    ``settings`` is the whole :class:`AnalyticsSettings` or just its ``ingest`` part.
    The link may be connected already; if it is not, :meth:`start` registers the
    subscriptions first and then connects, so messages the broker queued while the worker
    was away find their handler the moment they arrive.
    """

    def __init__(
        self,
        settings: AnalyticsSettings | IngestSettings,
        store: Store,
        registry: RegistryFile,
        link: MqttLink,
        worker_id: str,
        *,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        if isinstance(settings, AnalyticsSettings):
            self._settings = settings.ingest
        else:
            self._settings = settings
        self.store = store
        self.registry = registry
        self.link = link
        self.worker_id = worker_id
        self.source = f"ingest:{worker_id}"
        self._clock = clock
        self._closed = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._counters: Counter[str] = Counter()
        self._receiver = Receiver(
            clock, self._counters, self._lock, self._settings.queue_max_messages
        )
        self._pipeline = Pipeline(
            self._settings,
            store,
            registry,
            self.source,
            clock,
            self._stopping,
            self._counters,
            self._lock,
        )
        self._acknowledger = Acknowledger(link, self.source)
        self._claim = WorkerClaim(link, worker_id)
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        self._next_claim = 0.0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Check the worker id is free, sync the registry, subscribe, start the threads.

        Raises IngestError when another worker with this worker's id (MQTT client id) is
        running on the broker."""
        if self._thread is not None:
            raise IngestError(f"ingest worker {self.worker_id} is already started")
        self._claim.check_free(self._clock())
        self._pipeline.sync_devices()
        connected = self.link.is_connected
        if not connected:
            self.link.set_will(*self._claim.will())
        self._subscribe()
        if not connected:
            self.link.connect()
            if self.link.protocol_version != 5:
                # A 3.1.1 broker (amqtt) has no shared subscriptions: one worker, plain filters.
                self._subscribe()
        self._claim.announce(self._clock())
        self._thread = self._spawn()
        self._watchdog = threading.Thread(
            target=self._watch, name=f"ingest-{self.worker_id}-watchdog", daemon=True
        )
        self._watchdog.start()
        log.info(
            "ingest worker %s subscribed to %s (MQTT %s)",
            self.worker_id,
            topics.ALL_GATEWAY_UP,
            "5" if self.link.protocol_version == 5 else "3.1.1",
        )

    def _subscribe(self) -> None:
        shared = self.link.protocol_version == 5 or (
            not self.link.is_connected and self.link.protocol_choice != "3.1.1"
        )
        group = self._settings.shared_group

        def maybe_shared(topic_filter: str) -> str:
            return topics.shared(topic_filter, group) if shared else topic_filter

        # Quarantine records too: each is stored by one worker of the group, not by each.
        self.link.subscribe(maybe_shared(topics.ALL_GATEWAY_UP), self._receiver.on_uplink)
        self.link.subscribe(maybe_shared(topics.ALL_QUARANTINE), self._receiver.on_quarantine)
        self.link.subscribe(topics.ALL_GATEWAY_HEALTH, self._receiver.on_health, qos=0)

    def stop(self, timeout: float = _STOP_JOIN_S) -> None:
        """Finish and acknowledge the current group, then stop.

        Messages still queued are not acknowledged: the broker redelivers them to the
        next worker (or this one, restarted).
        """
        self._stopping.set()
        self._closed.set()
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.join(timeout)
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("ingest worker %s did not stop within %.0f s", self.worker_id, timeout)
            self._claim.release()
        left = self._receiver.queued
        if left:
            log.info(
                "ingest worker %s stopped; %d unacknowledged messages stay with the broker",
                self.worker_id,
                left,
            )

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        """Counters for health endpoints and logs (a copy; safe from any thread)."""
        with self._lock:
            c = self._counters
            return {
                "worker_id": self.worker_id,
                "running": self.running,
                **{key: c[key] for key in _COUNTERS},
                "quarantined": sum(self._pipeline.quarantined.values()),
                "quarantined_by_reason": dict(sorted(self._pipeline.quarantined.items())),
                "dropped_by_reason": dict(sorted(self._pipeline.dropped.items())),
                "store_ok": self._pipeline.store_ok,
                "queued": self._receiver.queued,
                "pending": self._pipeline.pending,
                "last_lag_ms": self._pipeline.last_lag_ms,
                "last_write_ms": self._pipeline.last_write_ms,
            }

    # ---------------------------------------------------------------- worker loop

    def _spawn(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name=f"ingest-{self.worker_id}", daemon=True)
        thread.start()
        return thread

    def _watch(self) -> None:
        """Restart the worker thread if it ended while the worker was not stopping."""
        while not self._stopping.wait(WATCHDOG_S):
            thread = self._thread
            if thread is not None and not thread.is_alive() and not self._stopping.is_set():
                with self._lock:
                    self._counters["restarts"] += 1
                log.error("ingest worker %s thread ended; restarting it", self.worker_id)
                self._thread = self._spawn()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._cycle()
            except Exception as exc:
                # A bug must not end ingest: the group stays unacknowledged (the broker
                # redelivers it on the next session) and the worker goes on.
                log.exception("ingest worker %s cycle failed: %s", self.worker_id, describe(exc))
                with self._lock:
                    self._counters["internal_errors"] += 1
                self._stopping.wait(_ERROR_PAUSE_S)

    def _cycle(self) -> None:
        group = self._receiver.take_group(
            self._settings.max_batch_messages,
            self._settings.max_batch_delay_ms / 1000,
            self._stopping,
        )
        self._pipeline.maybe_sync_devices()
        self._pipeline.store_health(self._receiver.take_health())
        self._refresh_claim()
        if not group:
            return
        if not self._pipeline.process(group):
            return  # stopping with the store down: nothing acknowledged, broker redelivers
        acked, stale = self._acknowledger.acknowledge(group)
        with self._lock:
            self._counters["acked"] += acked
            self._counters["stale_acks"] += stale

    def _refresh_claim(self) -> None:
        if time.monotonic() >= self._next_claim:
            self._next_claim = time.monotonic() + HEARTBEAT_S
            self._claim.announce(self._clock())
