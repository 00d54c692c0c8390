"""Contributor accounting: per device-hour data-quality scores, gaming checks and their
explanations, as a pure function of the public readings, ledger and registry data
(issue 22, part 1). See docs/accounting.md."""

from analytics.accounting.model import DayScores, DeviceDay, DeviceScore, Loss, MetricSeries
from analytics.accounting.rules import RULE_VERSION, AccountingRule
from analytics.accounting.score import score_day

__all__ = [
    "RULE_VERSION",
    "AccountingRule",
    "DayScores",
    "DeviceDay",
    "DeviceScore",
    "Loss",
    "MetricSeries",
    "score_day",
]
