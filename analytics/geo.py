"""Distances between declared device positions (accounting's neighbour and cell checks,
the network drift detector)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

EARTH_KM = 6371.0088  # the IUGG mean Earth radius


class Located(Protocol):
    @property
    def lat(self) -> float | None: ...

    @property
    def lon(self) -> float | None: ...


def distances_km(places: Sequence[Located]) -> NDArray[np.float64]:
    """Great-circle (haversine) distances between every pair of positions, in km; inf
    where either position is unknown."""
    lat = np.radians([p.lat if p.lat is not None else np.nan for p in places])
    lon = np.radians([p.lon if p.lon is not None else np.nan for p in places])
    dlat = lat[:, None] - lat[None, :]
    dlon = lon[:, None] - lon[None, :]
    a = np.sin(dlat / 2) ** 2 + np.cos(lat[:, None]) * np.cos(lat[None, :]) * np.sin(dlon / 2) ** 2
    dist = 2 * EARTH_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))
    return np.where(np.isnan(dist), np.inf, dist)
