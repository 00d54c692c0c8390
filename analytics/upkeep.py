"""Store upkeep in the ingest service: rollup refresh, partitions ahead, retention.

One thread per ingest process. With several workers on one database each runs it; the
store serialises the work (a refresh is taken by one worker at a time, the others find
nothing to do), so no worker has to be the special one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from analytics.settings import StorageSettings
from analytics.store.base import Store, StoreError
from civicmesh.timeutil import now_ms

if TYPE_CHECKING:
    from analytics.alerts.engine import AlertEngine

log = logging.getLogger(__name__)


class StoreUpkeep:
    def __init__(
        self,
        store: Store,
        settings: StorageSettings,
        alerts: AlertEngine | None = None,
        alerts_interval_s: float = 60.0,
    ) -> None:
        self.store = store
        self.settings = settings
        # alert rules are evaluated on this thread, after a refresh: fresh rollups, and
        # the store is used by one thread of upkeep only
        self.alerts = alerts
        self.alerts_interval_s = alerts_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-upkeep", daemon=True)
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        # this process refreshes one range set at a time, so flush() cannot return while
        # the thread still holds ranges it took (Postgres: the others find the lock taken)
        self._refreshing = threading.Lock()

    def start(self) -> None:
        if self.alerts is not None:
            self.alerts.start()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        if self.alerts is not None:
            self.alerts.close()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._counts)

    def run_once(self, *, upkeep: bool = True) -> None:
        """One refresh (and, with ``upkeep``, partitions ahead and retention)."""
        self._refresh()
        if not upkeep:
            return
        ensure_ahead = getattr(self.store, "ensure_partitions_ahead", None)
        if ensure_ahead is not None:
            ensure_ahead(now_ms(), self.settings.partitions_ahead_weeks)
        dropped = self.store.apply_retention(now_ms(), self.settings.retention())
        if any(dropped.values()):
            log.info("retention: %s", dropped)

    def flush(self, max_rounds: int = 20) -> int:
        """Refresh until nothing is left dirty, e.g. before a report on data that has just
        arrived (between two periodic refreshes the rollups lag the readings); the
        ranges refreshed. At most ``max_rounds`` refreshes: under live ingest new ranges
        keep arriving, and what came after the call may wait for the thread."""
        total = 0
        for _ in range(max_rounds):
            refreshed = self._refresh()
            if not refreshed:
                break
            total += refreshed
        return total

    def _refresh(self) -> int:
        with self._refreshing:
            refreshed = self.store.refresh_rollups()
        with self._lock:
            self._counts["rollup_ranges_refreshed"] += refreshed
        return refreshed

    def _evaluate_alerts(self) -> None:
        from analytics.alerts.state import AlertStateError

        assert self.alerts is not None
        try:
            self.alerts.evaluate(self.store, now_ms())
        except StoreError:
            raise
        except AlertStateError as exc:
            with self._lock:
                self._counts["alert_errors"] += 1
            log.warning("alert evaluation failed (%s); retrying", exc)
        except Exception:
            # A fault in a rule must not end this thread: the rollups run on it too.
            with self._lock:
                self._counts["alert_errors"] += 1
            log.exception("alert evaluation failed; retrying at the next interval")

    def _run(self) -> None:
        next_upkeep = next_alerts = 0.0
        while not self._stop.is_set():
            due = time.monotonic() >= next_upkeep
            try:
                self.run_once(upkeep=due)
                if due:
                    next_upkeep = time.monotonic() + self.settings.upkeep_interval_s
                if self.alerts is not None and time.monotonic() >= next_alerts:
                    next_alerts = time.monotonic() + self.alerts_interval_s
                    self._evaluate_alerts()
            except StoreError as exc:
                # The database is down or busy: ingest backs off on its own; try again.
                with self._lock:
                    self._counts["errors"] += 1
                log.warning("store upkeep failed (%s); retrying", exc)
            self._stop.wait(self.settings.rollup_refresh_s)
