"""Delivery of alert events to contact points: signed webhooks, retried with backoff.

A webhook POST carries the event's JSON body, fixed when the event was recorded (so a
retry or a redelivery after a restart sends the same bytes), and these headers:

- ``X-Civicmesh-Timestamp``: Unix seconds when this attempt was sent;
- ``X-Civicmesh-Signature``: ``sha256=`` + hex HMAC-SHA256 of ``<timestamp>.<body>``
  (the timestamp's ASCII digits, a full stop, the exact body bytes) under the contact
  point's secret; a receiver recomputes it, compares in constant time, and refuses
  timestamps more than 5 minutes away from its clock (replays);
- ``X-Civicmesh-Delivery``: the delivery's id, the same on every retry (the receiver
  drops a delivery it has seen: delivery is at least once);
- ``X-Civicmesh-Event``: ``firing`` or ``resolved``.

The sender runs on its own thread over the alert log's queue, so a slow or dead receiver
never holds up the evaluator; a failing contact point is counted and logged, never raised.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import logging
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from typing import Any

from analytics.alerts.config import WebhookContactPoint
from analytics.alerts.state import AlertLog, AlertStateError, Delivery
from civicmesh.timeutil import now_ms

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Civicmesh-Signature"
TIMESTAMP_HEADER = "X-Civicmesh-Timestamp"
DELIVERY_HEADER = "X-Civicmesh-Delivery"
EVENT_HEADER = "X-Civicmesh-Event"
MAX_REPLAY_SKEW_S = 300
USER_AGENT = "civicmesh-alerts/1"


def sign(key: bytes, timestamp: int, body: bytes) -> str:
    """The ``X-Civicmesh-Signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(key, str(timestamp).encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(
    key: bytes, body: bytes, timestamp: str, signature: str, *, now_s: float | None = None
) -> bool:
    """What a receiver does (and what the tests' receiver does): the signature matches
    and the timestamp is within :data:`MAX_REPLAY_SKEW_S` of the clock."""
    if not timestamp.isdigit():
        return False
    now = time.time() if now_s is None else now_s
    if abs(now - int(timestamp)) > MAX_REPLAY_SKEW_S:
        return False
    return hmac.compare_digest(sign(key, int(timestamp), body), signature)


@dataclass
class WebhookSender:
    """One webhook contact point."""

    point: WebhookContactPoint
    key: bytes

    def send(self, delivery: Delivery) -> str | None:
        """POST once; None on a 2xx answer, else what went wrong (for the log)."""
        timestamp = int(time.time())
        request = urllib.request.Request(
            self.point.url,
            data=delivery.body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "User-Agent": USER_AGENT,
                TIMESTAMP_HEADER: str(timestamp),
                SIGNATURE_HEADER: sign(self.key, timestamp, delivery.body),
                DELIVERY_HEADER: str(delivery.id),
                EVENT_HEADER: delivery.event,
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self.point.timeout_s) as response:
                response.read(65_536)
                status = int(response.status)
        except urllib.error.HTTPError as exc:
            exc.close()
            return f"HTTP {exc.code}"
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            return f"{type(exc).__name__}: {reason}"
        return None if 200 <= status < 300 else f"HTTP {status}"

    def retry_delay_s(self, attempts: int) -> float:
        """Wait after the ``attempts``-th failure: doubling from retry_initial_s."""
        delay: float = self.point.retry_initial_s * 2 ** min(attempts - 1, 30)
        return min(delay, self.point.retry_max_s)


class Deliverer:
    """The thread that empties the delivery queue."""

    def __init__(self, log_: AlertLog, senders: dict[str, WebhookSender]) -> None:
        self.log = log_
        self.senders = senders
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alert-delivery", daemon=True)
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)

    def wake(self) -> None:
        self._wake.set()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._counts)

    def _count(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def run_once(self) -> int:
        """Send what is due now; how many deliveries were attempted."""
        lease_ms = int(max((s.point.timeout_s for s in self.senders.values()), default=10) * 2000)
        due = self.log.claim_due(now_ms(), lease_ms)
        for delivery in due:
            if self._stop.is_set():
                break
            self._attempt(delivery)
        return len(due)

    def _attempt(self, delivery: Delivery) -> None:
        sender = self.senders.get(delivery.contact_point)
        if sender is None:  # the contact point left the config since the event was queued
            self.log.mark_failed(delivery.id, now_ms(), "contact point no longer configured", None)
            self._count("gave_up")
            log.warning(
                "alert delivery %d: contact point %r is no longer configured; dropped",
                delivery.id,
                delivery.contact_point,
            )
            return
        error = sender.send(delivery)
        if error is None:
            self.log.mark_delivered(delivery.id, now_ms())
            self._count("delivered")
            return
        attempts = delivery.attempts + 1
        self._count(f"failed_attempts.{delivery.contact_point}")
        if attempts >= sender.point.max_attempts:
            self.log.mark_failed(delivery.id, now_ms(), error, None)
            self._count("gave_up")
            log.warning(
                "alert delivery %d (%s) to %r failed %d times (last: %s); giving up",
                delivery.id, delivery.event, delivery.contact_point, attempts, error,
            )  # fmt: skip
            return
        delay = sender.retry_delay_s(attempts)
        self.log.mark_failed(delivery.id, now_ms(), error, now_ms() + int(delay * 1000))
        log.warning(
            "alert delivery %d (%s) to %r failed (%s); attempt %d of %d, retrying in %.1f s",
            delivery.id, delivery.event, delivery.contact_point, error, attempts,
            sender.point.max_attempts, delay,
        )  # fmt: skip

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
                next_due = self.log.next_due_ms()
            except AlertStateError as exc:
                self._count("state_errors")
                log.warning("alert delivery: %s; retrying", exc)
                next_due = None
            except Exception:
                # Whatever a receiver does must not end delivery for every contact point;
                # the leased deliveries are retried when their lease runs out.
                self._count("errors")
                log.exception("alert delivery failed; retrying")
                next_due = None
            wait_s = 1.0 if next_due is None else (next_due - now_ms()) / 1000
            self._wake.wait(min(max(wait_s, 0.01), 1.0))
            self._wake.clear()
