"""SensorThings benchmark: a page of 1,000 Observations of one Datastream's week (the
third page, reached through the previous page's ``@iot.nextLink`` as a client does) and
the same page ordered newest first, over HTTP against uvicorn, each beside the store
reads that page needs, measured in the same run; plus the Things list with their
Datastreams expanded.

``python -m bench.sensorthings [--devices 20] [--days 7] [--database-url URL]``: the
store is filled as ``bench.opendata`` fills it (one reading a minute of five metrics per
device through the store's write path).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from analytics.api import create_app
from analytics.api.openaq import location_id, sensor_id
from analytics.app import serve_in_thread
from analytics.store import open_store
from analytics.store.base import Resolution, Store
from bench.opendata import DAY_MS, MIN_MS, T0, fill, timed

PAGE = 1000


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def pages(store: Store, devices: list[str], days: int) -> dict[str, Any]:
    device = devices[0]
    datastream = sensor_id(location_id(device), "pm25")
    span = min(days, 7) * DAY_MS
    week = f"phenomenonTime ge {_iso(T0)} and phenomenonTime lt {_iso(T0 + span)}"
    app = create_app(store)
    results: dict[str, Any] = {}
    with serve_in_thread(app, "127.0.0.1", 0) as url, httpx.Client(base_url=url) as http:
        first = http.get(
            f"/sta/v1.1/Datastreams({datastream})/Observations",
            params={"$filter": week, "$top": str(PAGE)},
        )
        first.raise_for_status()
        second = http.get(first.json()["@iot.nextLink"]).json()
        third_link = second["@iot.nextLink"]  # the third page, as a client follows it
        expected = min(PAGE, max(0, span // MIN_MS - 2 * PAGE))

        def third() -> None:
            response = http.get(third_link)
            response.raise_for_status()
            assert response.content.count(b'"phenomenonTime"') == expected

        def newest() -> None:
            response = http.get(
                f"/sta/v1.1/Datastreams({datastream})/Observations",
                params={"$filter": week, "$top": str(PAGE), "$orderby": "phenomenonTime desc"},
            )
            response.raise_for_status()

        def things() -> None:
            http.get("/sta/v1.1/Things", params={"$expand": "Datastreams"}).raise_for_status()

        results["third"] = timed(third)
        results["newest"] = timed(newest)
        results["things"] = timed(things)
    needed = 3 * PAGE * MIN_MS + DAY_MS  # three pages, read a day at a time

    def baseline() -> None:
        store.readings(device, T0, T0 + needed, "pm25")
        store.rollup_series("pm25", 0, T0 + span, Resolution.DAY, device_id=device)
        store.devices()
        store.latest()

    results["store"] = timed(baseline)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sensorthings", description=__doc__)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--database-url", help="an empty store (default: a temporary SQLite)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        store = open_store(url, timescaledb="off")
        try:
            store.migrate()
            began = time.perf_counter()
            devices, rows = fill(store, args.devices, args.days)
            store.refresh_rollups()
            print(f"filled {rows:,} readings in {time.perf_counter() - began:.1f} s ({url})")
            out = pages(store, devices, args.days)
            for name, label in (
                ("third", "page 3 of 1000 observations (its @iot.nextLink)"),
                ("newest", "1000 newest observations ($orderby=phenomenonTime desc)"),
                ("things", "Things?$expand=Datastreams"),
                ("store", "baseline: the store reads a page 3 needs"),
            ):
                p50, p95 = out[name]
                print(f"{label}: p50 {p50:.1f} ms, p95 {p95:.1f} ms")
        finally:
            store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
