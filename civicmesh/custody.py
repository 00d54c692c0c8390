"""When to send again a message that no receipt has named (edge outbox, gateway buffer).

A fixed timeout alone collapses under a backlog: while the receiver works through an
hour of queued messages, every one of them passes the timeout and would be sent again,
doubling the very load that made it late. So a message is sent again only when there is
evidence that it was lost:

- **progress passed it**: a receipt arrived for a message sent *after* it (delivery is
  in order per path, give or take ``REORDER_MS``), and it is older than ``resend_after``;
- **or the path is quiet**: no receipt for ``resend_after`` while messages are
  outstanding. Then only a small *probe* (the oldest few) is sent, and quiet probes back
  off exponentially (x2 up to x64), so a receiver that is down (database stopped) is not
  flooded with copies. When the probe's receipt comes back, progress has passed
  everything sent before it, and that is sent again by the first rule.

Copies are harmless: the gateway and ingest recognise a message they already hold and
answer with its receipt again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from civicmesh.timeutil import now_ms

REORDER_MS = 2_000
MAX_BACKOFF = 64
PROBE_SIZE = 20


@dataclass(frozen=True, slots=True)
class ResendPlan:
    """What to send again now: everything sent before ``before_ms`` that is still
    unconfirmed, plus the oldest ``probe`` unconfirmed ones sent before ``probe_before_ms``."""

    before_ms: int
    probe: int
    probe_before_ms: int


class ResendPolicy:
    def __init__(self, resend_after_s: float, *, clock: Callable[[], int] = now_ms) -> None:
        self.after_ms = int(resend_after_s * 1000)
        self._clock = clock
        self._lock = threading.Lock()
        self._progress_ms = 0  # newest send time of any confirmed message
        self._last_receipt_ms = clock()
        self._last_probe_ms = 0
        self._backoff = 1

    def confirmed(self, newest_sent_ms: int | None) -> None:
        """A receipt arrived; ``newest_sent_ms`` is the latest send time among what it named."""
        with self._lock:
            self._last_receipt_ms = self._clock()
            self._backoff = 1
            if newest_sent_ms is not None:
                self._progress_ms = max(self._progress_ms, newest_sent_ms)

    def plan(self) -> ResendPlan:
        now = self._clock()
        with self._lock:
            aged = now - self.after_ms
            before = min(aged, self._progress_ms - REORDER_MS)
            quiet_since = max(self._last_receipt_ms, self._last_probe_ms)
            probe = PROBE_SIZE if now - quiet_since >= self.after_ms * self._backoff else 0
        return ResendPlan(before, probe, aged)

    def probed(self) -> None:
        """A quiet probe went out: the next one waits twice as long (until a receipt)."""
        with self._lock:
            self._last_probe_ms = self._clock()
            self._backoff = min(self._backoff * 2, MAX_BACKOFF)
