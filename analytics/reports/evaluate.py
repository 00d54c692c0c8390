"""``civicmesh eval ask | reports``: intent accuracy, faithfulness and latency.

A question set (``questions.json`` beside this file, or ``--questions FILE``) fixes
"now", the time zone and the zones; each question has the intent it should give, or the
error it should get. Schema v2 adds what is asked (``quantity``), hour-of-day and
weekday filters (``hours``, ``days``), the reference period of a comparison
(``reference``, ``reference_days``, ``reference_hours``) and ``alternatives`` (other
acceptable intents). Two figures are kept: *strict* scores every field the question
states; *v1 fields* scores only kind, metrics, places, period and error (what intents
carried before schema v2).

Periods are compared by the hours they select, not by how they are written: "Monday
06:00-12:00" and "Monday with hours [6, 12)" are the same question.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib import resources
from typing import Any
from zoneinfo import ZoneInfo

from analytics.reports.facts import AIR_METRICS, REPORT_METRICS, TRAFFIC_METRICS
from analytics.reports.intent import Intent, IntentError
from civicmesh.metrics import METRICS

# A named metric set is the catalogue's group ("traffic": every traffic metric the
# network measures) or the group reports used before schema v2 (without occupancy and
# weather): which of the two a general question covers is a convention, not a matter of
# understanding the question, so either is accepted, before and after alike.
METRIC_SETS: dict[str, tuple[frozenset[str], ...]] = {
    "all": (frozenset(m.name for m in METRICS), frozenset(REPORT_METRICS)),
    "air": (frozenset(m.name for m in METRICS if m.kind == "air"), frozenset(AIR_METRICS)),
    "traffic": (
        frozenset(m.name for m in METRICS if m.kind == "traffic"),
        frozenset(TRAFFIC_METRICS),
    ),
    "weather": (frozenset(m.name for m in METRICS if m.kind == "weather"),),
}
STRICT = "strict"
V1_FIELDS = "v1"


@dataclass(frozen=True, slots=True)
class QuestionSet:
    now: datetime
    timezone: str
    zones: tuple[str, ...]
    questions: tuple[dict[str, Any], ...]


def load_questions(path: str | None = None) -> QuestionSet:
    if path is None:
        text = resources.files("analytics.reports").joinpath("questions.json").read_text()
    else:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    data = json.loads(text)
    tz = ZoneInfo(data["timezone"])
    now = datetime.fromisoformat(data["now"]).replace(tzinfo=tz)
    return QuestionSet(now, data["timezone"], tuple(data["zones"]), tuple(data["questions"]))


def _local(text: str, tz: ZoneInfo) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=tz)


def selected_hours(
    start: datetime,
    end: datetime,
    days: str | None,
    hours: tuple[int, int] | list[int] | None,
) -> list[tuple[datetime, datetime]]:
    """The ``[from, to)`` stretches of time a period with its filters selects, merged."""
    if days is None and hours is None:
        return [(start, end)] if end > start else []
    tz = start.tzinfo
    lo_h, hi_h = (0, 24) if hours is None else (int(hours[0]), int(hours[1]))
    out: list[tuple[datetime, datetime]] = []
    day = start.date()
    while datetime(day.year, day.month, day.day, tzinfo=tz) < end:
        weekend = day.weekday() >= 5
        if days is None or (days == "weekends") == weekend:
            midnight = datetime(day.year, day.month, day.day, tzinfo=tz)
            spans = [(lo_h, hi_h)] if lo_h < hi_h else [(0, hi_h), (lo_h, 24)]
            for a, b in spans:
                # through the zone again, so a DST day keeps its wall-clock hours
                lo = (midnight + timedelta(hours=a)).replace(tzinfo=None).replace(tzinfo=tz)
                hi = (midnight + timedelta(hours=b)).replace(tzinfo=None).replace(tzinfo=tz)
                lo, hi = max(lo, start), min(hi, end)
                if hi > lo:
                    if out and out[-1][1] == lo:
                        out[-1] = (out[-1][0], hi)
                    else:
                        out.append((lo, hi))
        day += timedelta(days=1)
    return out


def _period_problem(
    want: list[str], want_days: Any, want_hours: Any, got: Any, tz: ZoneInfo, filters: bool
) -> str | None:
    start, end = _local(want[0], tz), _local(want[1], tz)
    got_start = datetime.fromtimestamp(got.start_ms / 1000, tz)
    got_end = datetime.fromtimestamp(got.end_ms / 1000, tz)
    if filters:
        got_days = getattr(got, "days", None)
        got_hours = getattr(got, "hours", None)
        same = selected_hours(start, end, want_days, want_hours) == selected_hours(
            got_start, got_end, got_days, got_hours
        )
    else:
        same = (start, end) == (got_start, got_end)
        got_days = got_hours = None
    if same:
        return None
    extra = "".join(
        f" {name} {value}"
        for name, value in (("days", got_days), ("hours", got_hours))
        if value is not None
    )
    return f"{got_start.isoformat()}..{got_end.isoformat()}{extra}"


def _one_mismatch(expected: dict[str, Any], got: Intent, tz: ZoneInfo, fields: str) -> str | None:
    strict = fields == STRICT
    if got.kind != expected["kind"]:
        return f"kind {got.kind}"
    if strict and "quantity" in expected:  # sets before schema v2 do not state it
        quantity = getattr(got, "quantity", "summary")  # nor did intents then
        if quantity != expected["quantity"]:
            return f"quantity {quantity}"
    metrics = expected["metrics"]
    wanted = METRIC_SETS[metrics] if isinstance(metrics, str) else (frozenset(metrics),)
    if frozenset(got.metrics) not in wanted:
        return f"metrics {sorted(got.metrics)}"
    places = list(expected["places"])
    same = set(got.places) == set(places) if got.kind == "rank" else list(got.places) == places
    if not same:
        return f"places {list(got.places)}"
    if expected.get("period"):
        problem = _period_problem(
            expected["period"],
            expected.get("days"),
            expected.get("hours"),
            got.periods[0],
            tz,
            strict,
        )
        if problem:
            return f"period {problem}"
    if strict and expected.get("reference") and got.kind == "compare_periods":
        problem = _period_problem(
            expected["reference"],
            expected.get("reference_days"),
            expected.get("reference_hours"),
            got.periods[1],
            tz,
            True,
        )
        if problem:
            return f"reference {problem}"
    return None


def mismatch(
    expected: dict[str, Any], got: Intent | IntentError, tz: ZoneInfo, fields: str = STRICT
) -> str | None:
    """Why ``got`` is not the expected intent nor one of its alternatives (None: it is)."""
    if "error" in expected:
        if isinstance(got, IntentError):
            return None if got.code == expected["error"] else f"error {got.code}"
        return f"answered as {got.kind}, expected error {expected['error']}"
    if isinstance(got, IntentError):
        return f"error {got.code}: {got}"
    first = _one_mismatch(expected, got, tz, fields)
    if first is None:
        return None
    for alternative in expected.get("alternatives", ()):
        if _one_mismatch(alternative, got, tz, fields) is None:
            return None
    return first


@dataclass(frozen=True, slots=True)
class IntentScore:
    total: int
    correct: int
    failures: list[tuple[str, str]]
    seconds: list[float]
    llm_used: int  # answers whose intent came from the model
    correct_v1: int = 0  # on the fields intents had before schema v2
    by_class: dict[str, tuple[int, int]] | None = None  # class -> (correct, total)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def accuracy_v1(self) -> float:
        return self.correct_v1 / self.total if self.total else 0.0


def score_intents(
    qs: QuestionSet, parse: Callable[[str], Intent], *, limit: int | None = None
) -> IntentScore:
    tz = ZoneInfo(qs.timezone)
    failures: list[tuple[str, str]] = []
    seconds: list[float] = []
    llm_used = correct = correct_v1 = 0
    by_class: dict[str, list[int]] = {}
    questions = qs.questions[:limit] if limit else qs.questions
    for item in questions:
        started = time.perf_counter()
        got: Intent | IntentError
        try:
            got = parse(item["q"])
        except IntentError as exc:
            got = exc
        seconds.append(time.perf_counter() - started)
        if isinstance(got, Intent) and got.parser == "llm":
            llm_used += 1
        tally = by_class.setdefault(str(item.get("class", "-")), [0, 0])
        tally[1] += 1
        if mismatch(item, got, tz, V1_FIELDS) is None:
            correct_v1 += 1
        problem = mismatch(item, got, tz, STRICT)
        if problem is None:
            correct += 1
            tally[0] += 1
        else:
            failures.append((item["q"], problem))
    classes = {k: (v[0], v[1]) for k, v in sorted(by_class.items())}
    return IntentScore(len(questions), correct, failures, seconds, llm_used, correct_v1, classes)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]
