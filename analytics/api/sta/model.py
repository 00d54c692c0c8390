"""The SensorThings entity graph over the store.

- **Thing** = one registered device; ``@iot.id`` is the device's OpenAQ location id
  (analytics/api/openaq.py: a stable integer hashed from the device id), so one device
  has one number in both dialects.
- **Location** and **FeatureOfInterest** = the device's registered position (GeoJSON
  Point), same id as the Thing; a device without a position has neither.
- **HistoricalLocation** = one per located Thing (civicmesh keeps one position per
  device, not its moves), same id, ``time`` the device's newest reading.
- **Sensor** = a sensor package kind (``air``, ``traffic``, ``multi``, ``import``), id
  hashed from the kind.
- **ObservedProperty** = a metric, id = its OpenAQ parameter id.
- **Datastream** = device x metric with readings, id = its OpenAQ sensor id
  (``thing id * 16 + metric code``).
- **Observation** = one stored reading, id ``'<datastream id>-<epoch ms>'`` (a string:
  the pair does not fit a JSON-safe integer).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from analytics.api.openaq import METRIC_SLOTS, Network, parameter_id, sensor_id
from analytics.export import provenance
from analytics.store.base import DeviceStatus
from civicmesh.metrics import BY_CODE, BY_NAME, METRICS, Metric, Quality
from civicmesh.protocol import Reading

OM_MEASUREMENT = "http://www.opengis.net/def/observationType/OGC-OM/2.0/OM_Measurement"
GEOJSON = "application/geo+json"

# entity set -> {navigation property: (target entity set, single-valued)}
NAVIGATION: dict[str, dict[str, tuple[str, bool]]] = {
    "Things": {
        "Locations": ("Locations", False),
        "HistoricalLocations": ("HistoricalLocations", False),
        "Datastreams": ("Datastreams", False),
    },
    "Locations": {
        "Things": ("Things", False),
        "HistoricalLocations": ("HistoricalLocations", False),
    },
    "HistoricalLocations": {"Thing": ("Things", True), "Locations": ("Locations", False)},
    "Sensors": {"Datastreams": ("Datastreams", False)},
    "ObservedProperties": {"Datastreams": ("Datastreams", False)},
    "Datastreams": {
        "Thing": ("Things", True),
        "Sensor": ("Sensors", True),
        "ObservedProperty": ("ObservedProperties", True),
        "Observations": ("Observations", False),
    },
    "Observations": {
        "Datastream": ("Datastreams", True),
        "FeatureOfInterest": ("FeaturesOfInterest", True),
    },
    "FeaturesOfInterest": {"Observations": ("Observations", False)},
}
ENTITY_SETS = tuple(NAVIGATION)
UNIT_DEFINITIONS = {
    "µg/m³": "http://qudt.org/vocab/unit/MicroGM-PER-M3",
    "mg/m³": "http://qudt.org/vocab/unit/MilliGM-PER-M3",
    "°C": "http://qudt.org/vocab/unit/DEG_C",
    "%": "http://qudt.org/vocab/unit/PERCENT",
    "km/h": "http://qudt.org/vocab/unit/KiloM-PER-HR",
}


def iso_ms(ms: int) -> str:
    """``2026-01-05T00:00:00.000Z``: one fixed width, so text order is time order."""
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def sensor_type_id(kind: str) -> int:
    digest = hashlib.sha256(f"civicmesh/sta/sensor/{kind}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % ((1 << 27) - 1) + 1


def observation_id(datastream: int, ts_ms: int) -> str:
    return f"{datastream}-{ts_ms}"


def point(device: DeviceStatus) -> dict[str, Any] | None:
    if device.lat is None or device.lon is None:
        return None
    return {"type": "Point", "coordinates": [device.lon, device.lat]}


@dataclass(eq=False)
class Entity:
    """One entity: its set, id and properties (as served), and what it stands for."""

    set: str
    id: int | str
    props: dict[str, Any]
    device: DeviceStatus | None = None
    metric: Metric | None = None
    reading: Reading | None = None
    sensor_kind: str | None = None
    links: dict[str, list[Entity]] = field(default_factory=dict)


def flags(quality: int) -> list[str]:
    return [f.name.lower() for f in Quality if f and quality & f and f.name]


class Graph:
    """Every entity but the Observations, built from the store's devices and newest
    readings (one ``Network`` read); Observations are read on demand."""

    def __init__(self, network: Network) -> None:
        self.network = network
        self.sets: dict[str, dict[int | str, Entity]] = {name: {} for name in ENTITY_SETS}
        for lid, device in sorted(network.by_location.items()):
            self._thing(lid, device)
        for metric in METRICS:
            if any(d.metric is metric for d in self.sets["Datastreams"].values()):
                self._property(metric)
        for datastream in self.sets["Datastreams"].values():
            self._link_datastream(datastream)

    # -- building ---------------------------------------------------------------------

    def _thing(self, lid: int, device: DeviceStatus) -> None:
        source = provenance(device)
        thing = self._add(
            "Things",
            lid,
            {
                "name": device.device_id,
                "description": f"civicmesh {device.kind} node in zone {device.zone}",
                "properties": {
                    "deviceId": device.device_id,
                    "zone": device.zone,
                    "kind": device.kind,
                    "status": device.status,
                    "provenance": source,
                    "lastSeen": None
                    if device.last_seen_ms is None
                    else iso_ms(device.last_seen_ms),
                },
            },
            device=device,
        )
        where = point(device)
        if where is not None:
            location = self._add(
                "Locations",
                lid,
                {
                    "name": device.device_id,
                    "description": f"Registered position of {device.device_id}",
                    "encodingType": GEOJSON,
                    "location": where,
                    "properties": {"zone": device.zone},
                },
                device=device,
            )
            moved = self._add(
                "HistoricalLocations",
                lid,
                {"time": iso_ms(device.last_seen_ms or 0)},
                device=device,
            )
            feature = self._add(
                "FeaturesOfInterest",
                lid,
                {
                    "name": device.device_id,
                    "description": f"The air and street at {device.device_id}",
                    "encodingType": GEOJSON,
                    "feature": where,
                    "properties": {"zone": device.zone},
                },
                device=device,
            )
            _link(thing, "Locations", location)
            _link(location, "Things", thing)
            _link(thing, "HistoricalLocations", moved)
            _link(location, "HistoricalLocations", moved)
            _link(moved, "Thing", thing)
            _link(moved, "Locations", location)
            feature.links["Observations"] = []  # read on demand
        sensor = self.sets["Sensors"].get(sensor_type_id(device.kind))
        if sensor is None:
            sensor = self._add(
                "Sensors",
                sensor_type_id(device.kind),
                {
                    "name": f"civicmesh {device.kind} node",
                    "description": f"The civicmesh sensor package of kind {device.kind!r}",
                    "encodingType": "text/plain",
                    "metadata": f"civicmesh device kind {device.kind}",
                    "properties": {"kind": device.kind},
                },
                sensor_kind=device.kind,
            )
        for latest in self.network.latest.get(device.device_id, []):
            metric = BY_NAME[latest.metric]
            datastream = self._add(
                "Datastreams",
                sensor_id(lid, metric.name),
                {
                    "name": f"{metric.name} at {device.device_id}",
                    "description": f"{metric.description} measured by {device.device_id}",
                    "observationType": OM_MEASUREMENT,
                    "unitOfMeasurement": {
                        "name": metric.unit,
                        "symbol": metric.unit,
                        "definition": UNIT_DEFINITIONS.get(metric.unit, ""),
                    },
                    "observedArea": where,
                    # the store keeps no first-reading time: the interval ends at the newest
                    "phenomenonTime": None,
                    "resultTime": None,
                    "properties": {
                        "deviceId": device.device_id,
                        "metric": metric.name,
                        "provenance": source,
                        "newestReading": iso_ms(latest.ts_ms),
                    },
                },
                device=device,
                metric=metric,
            )
            _link(thing, "Datastreams", datastream)
            _link(datastream, "Thing", thing)
            _link(datastream, "Sensor", sensor)
            _link(sensor, "Datastreams", datastream)
            datastream.links["Observations"] = []  # read on demand

    def _property(self, metric: Metric) -> None:
        self._add(
            "ObservedProperties",
            parameter_id(metric.name),
            {
                "name": metric.name,
                "definition": f"https://civicmesh.org/def/metric/{metric.name}",
                "description": metric.description,
                "properties": {"unit": metric.unit, "kind": metric.kind, "code": metric.code},
            },
            metric=metric,
        )

    def _link_datastream(self, datastream: Entity) -> None:
        assert datastream.metric is not None
        observed = self.sets["ObservedProperties"][parameter_id(datastream.metric.name)]
        _link(datastream, "ObservedProperty", observed)
        _link(observed, "Datastreams", datastream)

    def _add(self, set_name: str, key: int | str, props: dict[str, Any], **ref: Any) -> Entity:
        entity = Entity(set_name, key, props, **ref)
        self.sets[set_name][key] = entity
        return entity

    # -- reading ----------------------------------------------------------------------

    def get(self, set_name: str, key: int | str) -> Entity | None:
        if set_name == "Observations":
            return self.observation_by_id(key)
        return self.sets[set_name].get(key)

    def observation_by_id(self, key: int | str) -> Entity | None:
        """The reading an observation id names, or None (read from the store by the
        caller: this only checks the id's shape and its datastream)."""
        text = str(key)
        head, _, tail = text.partition("-")
        if not (head.isdigit() and tail.isdigit()):
            return None
        return self.sets["Datastreams"].get(int(head))

    def datastreams_of(self, entity: Entity) -> list[Entity]:
        """The datastreams whose observations ``entity``'s Observations are."""
        if entity.set == "Datastreams":
            return [entity]
        if entity.set == "FeaturesOfInterest":
            return [d for d in self.sets["Datastreams"].values() if d.device is entity.device]
        return []

    def observation(self, datastream: Entity, reading: Reading) -> Entity:
        assert datastream.device is not None
        lid = int(datastream.id) // METRIC_SLOTS
        props = {
            "phenomenonTime": iso_ms(reading.ts_ms),
            # the reading's window closes at its time stamp; the result is known then
            "resultTime": iso_ms(reading.ts_ms),
            "result": reading.value,
            "resultQuality": {
                "quality": reading.quality,
                "flags": flags(reading.quality),
                "hasFlags": reading.quality != 0,
                "provenance": provenance(datastream.device),
                "deviceId": datastream.device.device_id,
            },
            "parameters": {"anomalyScore": reading.anomaly}
            if reading.anomaly is not None
            else None,
        }
        entity = Entity(
            "Observations",
            observation_id(int(datastream.id), reading.ts_ms),
            props,
            device=datastream.device,
            metric=datastream.metric,
            reading=reading,
        )
        entity.links["Datastream"] = [datastream]
        feature = self.sets["FeaturesOfInterest"].get(lid)
        entity.links["FeatureOfInterest"] = [feature] if feature is not None else []
        return entity


def _link(entity: Entity, name: str, target: Entity) -> None:
    entity.links.setdefault(name, []).append(target)


def metric_of_code(code: int) -> Metric | None:
    return BY_CODE.get(code)
