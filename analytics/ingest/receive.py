"""Receive: what paho's network thread does with a message, and nothing more.

Handlers here never wait and never raise: a message goes into an in-memory queue (or,
for health, into the newest-per-device table) and paho's thread returns at once, so it
keeps answering the broker's keepalive however long the database is away. The memory
this takes is bounded by the broker, not here: a QoS 1 message stays unacknowledged
until its group is committed, and the broker sends a client at most its in-flight window
(Mosquitto's ``max_inflight_messages``, MQTT 5's receive maximum) of those.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from civicmesh import health, topics
from civicmesh.mqtt import Message

log = logging.getLogger(__name__)

_POLL_S = 0.5


class Kind(Enum):
    UPLINK = "uplink"  # a gateway envelope around a device batch
    QUARANTINE = "quarantine"  # a record of what a gateway rejected


@dataclass(frozen=True, slots=True)
class Inbound:
    """A received message waiting for its group to be written."""

    message: Message
    arrived_ms: int
    kind: Kind

    @property
    def is_quarantine(self) -> bool:
        return self.kind is Kind.QUARANTINE


class Receiver:
    """The MQTT callbacks of one worker, and the queue they fill."""

    def __init__(
        self,
        clock: Callable[[], int],
        counters: Counter[str],
        lock: threading.Lock,
        soft_limit: int,
    ) -> None:
        self._clock = clock
        self._counters = counters  # shared with the worker, guarded by ``lock``
        self._lock = lock
        self._soft_limit = soft_limit
        self._queue: queue.SimpleQueue[Inbound] = queue.SimpleQueue()
        self._health: dict[str, health.HealthReport] = {}
        self._over_limit = False

    # ---------------------------------------------------------------- callbacks

    def on_uplink(self, message: Message) -> None:
        self._put(Inbound(message, self._clock(), Kind.UPLINK))

    def on_quarantine(self, message: Message) -> None:
        self._put(Inbound(message, self._clock(), Kind.QUARANTINE))

    def on_health(self, message: Message) -> None:
        """Keep the newest health report per device (QoS 0: nothing to acknowledge)."""
        gateway_id = topics.gateway_from_health_topic(message.topic)
        try:
            if gateway_id is None:
                raise health.HealthError(f"not a gateway health topic: {message.topic[:256]!r}")
            report = health.from_relay(message.payload, gateway_id)
        except health.HealthError as exc:
            self._count("health_dropped")
            log.warning("health report dropped: %s", exc)
            return
        with self._lock:
            old = self._health.get(report.device_id)
            if old is None or old.reported_ms <= report.reported_ms:
                self._health[report.device_id] = report

    def _put(self, item: Inbound) -> None:
        self._queue.put(item)  # unbounded: never blocks paho's thread (see the module doc)
        with self._lock:
            self._counters["received"] += 1
        size = self._queue.qsize()
        if size > self._soft_limit and not self._over_limit:
            self._over_limit = True
            log.warning(
                "ingest queue holds %d messages (more than queue_max_messages %d): the "
                "store is slower than the broker delivers (the broker's in-flight window, "
                "max_inflight_messages, bounds how many it holds unacknowledged)",
                size,
                self._soft_limit,
            )
        elif size <= self._soft_limit // 2:
            self._over_limit = False

    def _count(self, key: str) -> None:
        with self._lock:
            self._counters[key] += 1

    # ------------------------------------------------------------- worker side

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    def take_health(self) -> list[health.HealthReport]:
        with self._lock:
            reports, self._health = list(self._health.values()), {}
        return reports

    def take_group(self, limit: int, delay_s: float, stopping: threading.Event) -> list[Inbound]:
        """Up to ``limit`` messages, waiting at most ``delay_s`` after the first."""
        try:
            first = self._queue.get(timeout=min(delay_s, _POLL_S))
        except queue.Empty:
            return []
        group = [first]
        deadline = time.monotonic() + delay_s
        while len(group) < limit:
            try:
                group.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0 or stopping.is_set():
                break
            try:
                group.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return group
