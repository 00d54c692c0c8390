"""What the scores are computed from (public data only) and what they say."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from numpy.typing import NDArray

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


@dataclass(frozen=True, slots=True)
class MetricSeries:
    """One metric of one device over the day, ascending by time."""

    times: NDArray[np.int64]  # epoch ms
    values: NDArray[np.float64]
    quality: NDArray[np.int64]  # civicmesh.metrics.Quality bits


@dataclass(frozen=True, slots=True)
class DeviceDay:
    """One registered device's public data for one day."""

    device_id: str
    owner: str
    kind: str
    lat: float | None
    lon: float | None
    registered_at_ms: int
    series: dict[str, MetricSeries]
    # The day's ledger rows: the device's seal time and the gateway's receive time.
    sealed_ms: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    received_ms: NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass(frozen=True, slots=True)
class Loss:
    """Points of the daily score lost to one check on one metric (``*``: the device)."""

    check: str  # offline, missing, range, stuck, jump, flagged, neighbours, clock, duplicate
    metric: str
    points: float  # of the daily score (0..1)
    intervals: tuple[tuple[int, int], ...] = ()  # [start, end) epoch ms
    detail: str = ""

    def text(self, day_start_ms: int) -> str:
        what = self.check if self.metric == "*" else f"{self.metric} {self.check}"
        spans = _spans(self.intervals, day_start_ms)
        parts = [what] + ([spans] if spans else []) + ([f"({self.detail})"] if self.detail else [])
        return f"{' '.join(parts)}: -{self.points:.3f}"


def _clock(ms: int, day_start_ms: int) -> str:
    offset = ms - day_start_ms
    if offset >= 0 and offset % 60_000 == 0 and offset // 60_000 == 24 * 60:
        return "24:00"
    minutes = max(0, min(offset, 24 * HOUR_MS) // 60_000)
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


SPANS_SHOWN = 4


def _spans(intervals: tuple[tuple[int, int], ...], day_start_ms: int) -> str:
    shown = [f"{_clock(a, day_start_ms)}-{_clock(b, day_start_ms)}" for a, b in intervals]
    more = len(shown) - SPANS_SHOWN
    text = ", ".join(shown[:SPANS_SHOWN])
    return f"{text} and {more} more" if more > 0 else text


@dataclass(frozen=True, slots=True)
class DeviceScore:
    """One device's day: the mean of its hourly scores and every point it lost."""

    device_id: str
    owner: str
    score: float
    hourly: tuple[float, ...]  # 24 scores, 0..1
    losses: tuple[Loss, ...]
    cell: str | None  # H3 cell of the declared location
    rewarded: bool  # False: capped in its cell, or a duplicate stream
    not_rewarded_because: str = ""

    def to_dict(self, day_start_ms: int) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "owner": self.owner,
            "score": round(self.score, 4),
            "hourly": [round(h, 4) for h in self.hourly],
            "cell": self.cell,
            "rewarded": self.rewarded,
            "not_rewarded_because": self.not_rewarded_because,
            "explanations": [loss.text(day_start_ms) for loss in self.losses],
            "losses": [
                {
                    "check": loss.check,
                    "metric": loss.metric,
                    "points": round(loss.points, 4),
                    "intervals": [list(span) for span in loss.intervals],
                    "detail": loss.detail,
                }
                for loss in self.losses
            ],
        }


@dataclass(frozen=True, slots=True)
class DayScores:
    day_start_ms: int
    rule_id: str
    devices: tuple[DeviceScore, ...]

    @property
    def day(self) -> str:
        return datetime.fromtimestamp(self.day_start_ms / 1000, UTC).date().isoformat()

    def device(self, device_id: str) -> DeviceScore:
        for score in self.devices:
            if score.device_id == device_id:
                return score
        raise KeyError(device_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "day": self.day,
            "rule": self.rule_id,
            "devices": [d.to_dict(self.day_start_ms) for d in self.devices],
        }
