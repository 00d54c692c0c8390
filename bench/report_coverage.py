"""Report coverage: the share of the simulator's injected events each report mentions.

``python -m bench.report_coverage [--weeks N] [--json]``

The events come from the simulator, not from the report code:

- **pollution episodes**: local days whose simulated weather (``firmware_sim.signals.
  stagnation``, the city's weather state; above 1 is "a still, damp pollution-episode
  day") has a daily mean above 1, and whose city PM2.5 daily mean is above the WHO
  2021 24-hour guideline (an episode the air shows); mentioned when the report names
  the day ("Wed 11 Nov");
- **dropout faults**: one device per week loses all its readings for a day
  (``fill_store`` gaps, the simulator's dropout at magnitude 1.0), in a different zone
  each week; mentioned when the report names the device.

For every evaluated week the city's weekly report is written with the configured
backend (``--llm-backend none``: the deterministic writer) and scored: events mentioned,
numbers not in the facts (must be 0), words.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

from analytics import aqi
from analytics.reports.facts import daily_means
from analytics.reports.narrative import check_numbers
from analytics.reports.service import ReportService, report_window
from analytics.store import open_store
from analytics.store.base import Resolution
from demo.history import fill_store, history_signer
from firmware_sim.city import SimulatedCity
from firmware_sim.driver import signal_params
from firmware_sim.signals import stagnation

SEED = 7
DEVICES = 12
STEP_MS = 600_000
DAY_MS = 86_400_000
TZ = "Europe/London"
NOW = datetime(2026, 11, 19, 15, 30, tzinfo=ZoneInfo(TZ))


def episode_days(city: SimulatedCity, start_ms: int, end_ms: int) -> list[str]:
    """Local days whose simulated stagnation averages above 1 (ISO dates)."""
    device = city.devices[0]
    params = signal_params(
        int(device.driver_options.get("seed", 0)),
        device.driver_options.get("zone_profile"),
        STEP_MS,
    )
    times = np.arange(start_ms, end_ms, STEP_MS, dtype=np.int64)
    values = stagnation(params, times)
    by_day: dict[str, list[float]] = {}
    tz = ZoneInfo(TZ)
    for t, v in zip(times, values, strict=True):
        by_day.setdefault(datetime.fromtimestamp(int(t) / 1000, tz).date().isoformat(), []).append(
            float(v)
        )
    return sorted(d for d, v in by_day.items() if sum(v) / len(v) > 1.0)


def run(weeks: int, backend: str | None) -> dict[str, Any]:
    city = SimulatedCity.generate(SEED, devices=DEVICES, zones=4)
    now_ms = int(NOW.timestamp() * 1000)
    week_ends = [NOW - timedelta(days=7 * k) for k in range(weeks)]
    windows = [report_window("weekly", end) for end in week_ends]
    start_ms = min(w[0] for w in windows) - 30 * DAY_MS  # history before, for records
    # one dropout per week: a device of another zone each week, the week's Wednesday
    gaps: dict[str, tuple[int, int]] = {}
    zones = sorted({d.zone for d in city.devices})
    for k, (lo, _) in enumerate(windows):
        zone = zones[k % len(zones)]
        device = next(d for d in city.devices if d.zone == zone and d.name not in gaps)
        gaps[device.name] = (lo + 2 * DAY_MS, lo + 3 * DAY_MS)
    with tempfile.TemporaryDirectory(prefix="civicmesh-coverage-") as tmp:
        store = open_store(f"sqlite:///{Path(tmp) / 'city.db'}")
        store.migrate()
        fill_store(store, city, start_ms, now_ms, step_ms=STEP_MS, gaps=gaps)
        llm = None
        if backend not in (None, "none"):
            from analytics.reports.llm import open_backend

            llm = open_backend(backend)
        service = ReportService(store, llm, timezone=TZ, window_s=STEP_MS // 1000)
        pm25 = daily_means(
            store.rollup_series("pm25", start_ms, now_ms, Resolution.HOUR), ZoneInfo(TZ)
        )
        guideline = aqi.who_guideline("pm25", "24h").value
        episodes = [d for d in episode_days(city, start_ms, now_ms) if pm25.get(d, 0.0) > guideline]
        key_of = {d.name: history_signer(city.seed, d.name).key_id for d in city.devices}
        rows = [
            _score_week(service, end, window, episodes, gaps, key_of)
            for end, window in zip(week_ends, windows, strict=True)
        ]
        store.close()
    events = sum(r["events"] for r in rows)
    mentioned = sum(r["mentioned"] for r in rows)
    return {
        "weeks": rows,
        "events": events,
        "mentioned": mentioned,
        "coverage": round(mentioned / events, 4) if events else None,
        "texts_with_a_number_not_in_the_facts": sum(r["unfaithful"] for r in rows),
        "words": [r["words"] for r in rows],
        "narrative_sources": [r["source"] for r in rows],
    }


def _score_week(
    service: ReportService,
    end: datetime,
    window: tuple[int, int],
    episodes: list[str],
    gaps: dict[str, tuple[int, int]],
    key_of: dict[str, str],
) -> dict[str, Any]:
    report = service.report("weekly", None, end)
    text = report.text
    lo, hi = window
    tz = ZoneInfo(TZ)
    events: list[tuple[str, bool]] = []
    for day in episodes:
        midnight = datetime.fromisoformat(day).replace(tzinfo=tz)
        if lo <= int(midnight.timestamp() * 1000) < hi:
            events.append((f"episode {day}", midnight.strftime("%a %d %b") in text))
    for name, (g_lo, g_hi) in gaps.items():
        if g_lo < hi and g_hi > lo:
            events.append((f"dropout {name}", key_of[name] in text))
    bad = check_numbers(text, report.facts())
    return {
        "week": datetime.fromtimestamp(lo / 1000, tz).date().isoformat(),
        "events": len(events),
        "mentioned": sum(ok for _, ok in events),
        "missed": [e for e, ok in events if not ok],
        "unfaithful": 1 if bad else 0,
        "words": len(text.split()),
        "source": report.narrative.source,
        "seconds": round(report.seconds, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report_coverage", description=__doc__)
    parser.add_argument("--weeks", type=int, default=6)
    parser.add_argument("--llm-backend", default="none", help="none or llama-cpp")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--show", action="store_true", help="print each week's report text")
    args = parser.parse_args(argv)
    figures = run(args.weeks, args.llm_backend)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
