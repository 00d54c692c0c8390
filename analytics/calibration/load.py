"""The hourly table drift detection reads: every device's hourly means from the store."""

from __future__ import annotations

import numpy as np

from analytics.calibration.drift import HOUR_MS, Network, NetworkDevice
from analytics.store.base import Store
from civicmesh.registry import IMPORT_KIND, Registry


def load_network(
    store: Store, metric: str, start_ms: int, end_ms: int, registry: Registry | None = None
) -> Network:
    """Hourly means of ``metric`` for every device with a position, ``[start_ms, end_ms)``
    on whole hours. Imported stations (registry kind 'import', e.g. a regulatory
    monitor's archive) are the network's references."""
    start = start_ms // HOUR_MS * HOUR_MS
    hours = max(0, -(-(end_ms - start) // HOUR_MS))
    records = registry.devices if registry is not None else {}
    devices = []
    for status in sorted(store.devices(), key=lambda s: s.device_id):
        record = records.get(status.device_id)
        kind = record.kind if record is not None else status.kind
        lat = record.lat if record is not None and record.lat is not None else status.lat
        lon = record.lon if record is not None and record.lon is not None else status.lon
        if lat is None or lon is None:
            continue  # without a position a device has no neighbours
        values = np.full(hours, np.nan)
        for point in store.series(
            metric, start, start + hours * HOUR_MS, 3600, device_id=status.device_id
        ):
            index = (point.bucket_ms - start) // HOUR_MS
            if 0 <= index < hours and point.count:
                values[index] = point.mean
        if np.isnan(values).all():
            continue
        devices.append(
            NetworkDevice(status.device_id, lat, lon, values, reference=kind == IMPORT_KIND)
        )
    return Network(metric, start, tuple(devices))
