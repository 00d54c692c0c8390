"""``civicmesh sim``: look at the simulated city and its signals."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from civicmesh.timeutil import datetime_to_ms, ms_to_datetime
from firmware_sim.city import SimulatedCity
from firmware_sim.driver import SimulatedDriver
from firmware_sim.errors import InvalidSpecError
from firmware_sim.signals import HOUR_MS

# A Monday, so the first day of a sample shows weekday rush hours.
DEFAULT_SAMPLE_START = "2024-03-04T00:00:00+00:00"


def register(sub: Any) -> None:
    """Add the ``sim`` command group to the umbrella CLI."""
    sim = sub.add_parser("sim", help="simulated city and sensors (firmware_sim)")
    commands = sim.add_subparsers(dest="sim_command", metavar="SIM_COMMAND", required=True)

    city = commands.add_parser("city", help="print a generated city as JSON")
    _city_arguments(city)
    city.add_argument("--geojson", type=Path, help="also write the zone polygons to FILE")
    city.set_defaults(func=_cmd_city)

    sample = commands.add_parser("sample", help="print windowed means of one simulated device")
    _city_arguments(sample)
    sample.add_argument("--hours", type=float, default=24.0, help="span to simulate (hours)")
    sample.add_argument(
        "--device", help="device name (default: the city's first device)", default=None
    )
    sample.add_argument(
        "--start",
        default=DEFAULT_SAMPLE_START,
        help="start time, ISO 8601 with a timezone (default: %(default)s, a Monday)",
    )
    sample.add_argument("--window-min", type=int, default=60, help="window length in minutes")
    sample.set_defaults(func=_cmd_sample)


def _city_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=1, help="city seed (default: %(default)s)")
    parser.add_argument("--devices", type=int, default=20, help="number of devices")
    parser.add_argument("--zones", type=int, default=4, help="number of zones")


def _cmd_city(args: argparse.Namespace) -> int:
    city = SimulatedCity.generate(args.seed, devices=args.devices, zones=args.zones)
    if args.geojson is not None:
        args.geojson.write_text(json.dumps(city.zones_geojson(), indent=2) + "\n")
    json.dump(city.to_dict(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    city = SimulatedCity.generate(args.seed, devices=args.devices, zones=args.zones)
    device = city.devices[0]
    if args.device is not None:
        matches = [d for d in city.devices if d.name == args.device]
        if not matches:
            names = ", ".join(d.name for d in city.devices)
            raise InvalidSpecError(f"No device {args.device!r} in this city; devices: {names}")
        device = matches[0]
    try:
        start = datetime.fromisoformat(args.start)
    except ValueError as exc:
        raise InvalidSpecError(f"Invalid --start {args.start!r}: {exc}") from exc
    if start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    if args.hours <= 0 or args.window_min <= 0:
        raise InvalidSpecError("--hours and --window-min must be positive")
    start_ms = datetime_to_ms(start)
    end_ms = start_ms + int(args.hours * HOUR_MS)
    window_ms = args.window_min * 60_000
    driver = SimulatedDriver(**dict(device.driver_options, start_ms=start_ms))
    blocks = {block.metric: block for block in driver.read(end_ms)}
    driver.close()

    print(f"# {device.name} ({device.kind}) in {device.zone}, means per {args.window_min} min")
    header = ["window (UTC)", *driver.metrics]
    widths = [16] + [max(len(name), 8) for name in driver.metrics]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for window_start in range(start_ms - start_ms % window_ms, end_ms, window_ms):
        label = ms_to_datetime(window_start).strftime("%a %m-%d %H:%M")
        cells = [label.rjust(widths[0])]
        for name, width in zip(driver.metrics, widths[1:], strict=True):
            block = blocks.get(name)
            mean = float("nan")
            if block is not None:
                times = np.asarray(block.times_ms)
                inside = (times >= window_start) & (times < window_start + window_ms)
                if inside.any():
                    mean = float(np.asarray(block.values)[inside].mean())
            cells.append(f"{mean:.2f}".rjust(width))
        print("  ".join(cells))
    return 0
