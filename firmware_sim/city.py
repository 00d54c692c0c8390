"""A simulated city: zones with their own traffic and background pollution, and devices.

The layout sits in a box around Aberdeen (the city of the replayed Sensor.Community data
set), but the zones are fictional. Everything is deterministic for the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from firmware_sim.errors import InvalidSpecError

DEVICE_KINDS: tuple[str, ...] = ("air", "traffic", "multi")
DEFAULT_SAMPLE_INTERVAL_MS = 20_000

# (south, west, north, east) in degrees.
CITY_BOX: tuple[float, float, float, float] = (57.10, -2.25, 57.19, -2.05)
MAX_ZONES = 48
MAX_DEVICES = 10_000


@dataclass(frozen=True, slots=True)
class _ZoneKind:
    name: str
    traffic_intensity: float
    background_level: float
    free_speed_kmh: float
    lanes: int


# Ordered: the first zones are the ones every demo city has.
_ZONE_CATALOGUE: tuple[_ZoneKind, ...] = (
    _ZoneKind("harbour", 0.6, 1.5, 40.0, 2),
    _ZoneKind("old-town", 0.35, 1.0, 30.0, 1),
    _ZoneKind("ring-road", 1.05, 1.1, 80.0, 3),
    _ZoneKind("university", 0.45, 0.8, 40.0, 2),
    _ZoneKind("city-centre", 0.75, 1.3, 40.0, 2),
    _ZoneKind("industrial-estate", 0.55, 1.6, 50.0, 2),
    _ZoneKind("beach-esplanade", 0.3, 0.7, 50.0, 2),
    _ZoneKind("north-suburbs", 0.4, 0.8, 50.0, 1),
    _ZoneKind("airport-link", 0.85, 1.2, 70.0, 2),
    _ZoneKind("hospital-quarter", 0.5, 0.9, 40.0, 2),
    _ZoneKind("riverside", 0.4, 0.85, 50.0, 2),
    _ZoneKind("market-street", 0.7, 1.2, 30.0, 2),
)


@dataclass(frozen=True, slots=True)
class SimZone:
    """A district with one traffic/pollution character."""

    name: str
    traffic_intensity: float
    background_level: float
    free_speed_kmh: float
    lanes: int
    lat: float
    lon: float
    polygon: tuple[tuple[float, float], ...]  # closed ring of (lon, lat), counter-clockwise

    def profile(self, weather_seed: int, utc_offset_min: int = 0) -> dict[str, Any]:
        """The ``zone_profile`` driver option for devices in this zone."""
        return {
            "name": self.name,
            "traffic_intensity": self.traffic_intensity,
            "background_level": self.background_level,
            "free_speed_kmh": self.free_speed_kmh,
            "lanes": self.lanes,
            "weather_seed": weather_seed,
            "utc_offset_min": utc_offset_min,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "traffic_intensity": self.traffic_intensity,
            "background_level": self.background_level,
            "free_speed_kmh": self.free_speed_kmh,
            "lanes": self.lanes,
            "lat": self.lat,
            "lon": self.lon,
            "polygon": [list(point) for point in self.polygon],
        }


@dataclass(frozen=True, slots=True)
class SimDevice:
    """A simulated sensor node; ``driver_options`` are the SimulatedDriver keyword args."""

    name: str
    zone: str
    lat: float
    lon: float
    kind: str
    seed: int
    driver_options: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "zone": self.zone,
            "lat": self.lat,
            "lon": self.lon,
            "kind": self.kind,
            "seed": self.seed,
            "driver_options": self.driver_options,
        }


@dataclass(frozen=True, slots=True)
class SimulatedCity:
    """Zones and devices of one simulated city."""

    seed: int
    weather_seed: int
    utc_offset_min: int
    zones: tuple[SimZone, ...]
    devices: tuple[SimDevice, ...]

    @classmethod
    def generate(cls, seed: int, devices: int = 20, zones: int = 4) -> SimulatedCity:
        """A city of ``zones`` zones and ``devices`` devices spread evenly over them.

        Every zone's first device measures everything ("multi"), so each zone with a
        device (all of them when ``devices >= zones``) has air and traffic data.
        """
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InvalidSpecError(f"Invalid city seed {seed!r}: a non-negative integer")
        if not 1 <= zones <= MAX_ZONES:
            raise InvalidSpecError(f"Invalid zone count {zones}: use 1 to {MAX_ZONES}")
        if not 1 <= devices <= MAX_DEVICES:
            raise InvalidSpecError(f"Invalid device count {devices}: use 1 to {MAX_DEVICES}")
        layout = np.random.default_rng([seed, 0x5C17])
        weather_seed = int(layout.integers(0, 2**31))
        utc_offset_min = 0  # Aberdeen in winter; summer time is not simulated
        city_zones = _make_zones(layout, zones)
        city_devices = []
        for index in range(devices):
            zone = city_zones[index % zones]
            number = index // zones + 1
            kind = (
                "multi"
                if number == 1
                else str(layout.choice(("multi", "air", "traffic"), p=(0.5, 0.3, 0.2)))
            )
            device_seed = int(layout.integers(0, 2**31))
            lat, lon = _point_in_zone(layout, zone)
            options: dict[str, Any] = {
                "seed": device_seed,
                "zone_profile": zone.profile(weather_seed, utc_offset_min),
                "kind": kind,
                "sample_interval_ms": DEFAULT_SAMPLE_INTERVAL_MS,
            }
            city_devices.append(
                SimDevice(
                    f"{zone.name}-{number:02d}", zone.name, lat, lon, kind, device_seed, options
                )
            )
        return cls(seed, weather_seed, utc_offset_min, city_zones, tuple(city_devices))

    def zone(self, name: str) -> SimZone:
        for zone in self.zones:
            if zone.name == name:
                return zone
        raise KeyError(f"no zone {name!r}; zones: {', '.join(z.name for z in self.zones)}")

    def zones_geojson(self) -> dict[str, Any]:
        """The zone polygons as a GeoJSON FeatureCollection (RFC 7946)."""
        features = [
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[list(point) for point in zone.polygon]],
                },
                "properties": {
                    "name": zone.name,
                    "traffic_intensity": zone.traffic_intensity,
                    "background_level": zone.background_level,
                    "centre": [zone.lon, zone.lat],
                },
            }
            for zone in self.zones
        ]
        return {"type": "FeatureCollection", "features": features}

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "weather_seed": self.weather_seed,
            "utc_offset_min": self.utc_offset_min,
            "zones": [zone.to_dict() for zone in self.zones],
            "devices": [device.to_dict() for device in self.devices],
        }


_VERTICES = 8
_RADIUS = 0.35  # of a grid cell; with the centre jitter below, zones never overlap
_JITTER = 0.15


def _zone_names(count: int) -> list[_ZoneKind]:
    kinds = []
    for index in range(count):
        base = _ZONE_CATALOGUE[index % len(_ZONE_CATALOGUE)]
        round_ = index // len(_ZONE_CATALOGUE)
        if round_:
            base = _ZoneKind(f"{base.name}-{round_ + 1}", *_zone_values(base))
        kinds.append(base)
    return kinds


def _zone_values(kind: _ZoneKind) -> tuple[float, float, float, int]:
    return kind.traffic_intensity, kind.background_level, kind.free_speed_kmh, kind.lanes


def _make_zones(layout: np.random.Generator, count: int) -> tuple[SimZone, ...]:
    south, west, north, east = CITY_BOX
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    cell_lat = (north - south) / rows
    cell_lon = (east - west) / cols
    cells = layout.permutation(rows * cols)[:count]
    zones = []
    for kind, cell in zip(_zone_names(count), cells, strict=True):
        row, col = divmod(int(cell), cols)
        lat = south + (row + 0.5 + layout.uniform(-_JITTER, _JITTER)) * cell_lat
        lon = west + (col + 0.5 + layout.uniform(-_JITTER, _JITTER)) * cell_lon
        phase = layout.uniform(0.0, 2.0 * math.pi / _VERTICES)
        ring = []
        for k in range(_VERTICES):
            angle = phase + 2.0 * math.pi * k / _VERTICES  # increasing: counter-clockwise
            reach = _RADIUS * layout.uniform(0.75, 1.0)
            ring.append(
                (
                    round(lon + reach * cell_lon * math.cos(angle), 6),
                    round(lat + reach * cell_lat * math.sin(angle), 6),
                )
            )
        ring.append(ring[0])
        zones.append(
            SimZone(
                name=kind.name,
                traffic_intensity=round(kind.traffic_intensity * layout.uniform(0.9, 1.1), 3),
                background_level=round(kind.background_level * layout.uniform(0.9, 1.1), 3),
                free_speed_kmh=kind.free_speed_kmh,
                lanes=kind.lanes,
                lat=round(lat, 6),
                lon=round(lon, 6),
                polygon=tuple(ring),
            )
        )
    return tuple(zones)


def _point_in_zone(layout: np.random.Generator, zone: SimZone) -> tuple[float, float]:
    # Every vertex lies at >= 0.75 of the radius, so the polygon contains the ellipse of
    # 0.75 * cos(pi / 8) ~ 0.69 of it; the bounding box half-width is at most the radius,
    # so 0.45 of it stays safely inside.
    lons = [p[0] for p in zone.polygon]
    lats = [p[1] for p in zone.polygon]
    half_lon = (max(lons) - min(lons)) / 2.0
    half_lat = (max(lats) - min(lats)) / 2.0
    angle = layout.uniform(0.0, 2.0 * math.pi)
    reach = 0.45 * math.sqrt(layout.uniform(0.0, 1.0))
    return (
        round(zone.lat + reach * half_lat * math.sin(angle), 6),
        round(zone.lon + reach * half_lon * math.cos(angle), 6),
    )
