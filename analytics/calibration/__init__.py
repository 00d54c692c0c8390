"""Network-wide drift detection and correction estimates (issue 23, part 3): each
device's hourly means against its neighbours' (and references') median, as a pure
function of stored hourly data. See docs/calibration.md."""

from analytics.calibration.drift import (
    Correction,
    DriftAlarm,
    DriftRule,
    Network,
    NetworkDevice,
    correction_for,
    detect_drift,
)

__all__ = [
    "Correction",
    "DriftAlarm",
    "DriftRule",
    "Network",
    "NetworkDevice",
    "correction_for",
    "detect_drift",
]
