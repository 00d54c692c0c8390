"""``civicmesh eval ask | reports``: intent accuracy, faithfulness and latency.

The question set (``questions.json`` beside this file) fixes "now", the time zone and
the zones; each question has the intent it should give, or the error it should get.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any
from zoneinfo import ZoneInfo

from analytics.reports.facts import AIR_METRICS, REPORT_METRICS, TRAFFIC_METRICS
from analytics.reports.intent import Intent, IntentError

METRIC_SETS = {"all": REPORT_METRICS, "air": AIR_METRICS, "traffic": TRAFFIC_METRICS}


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


def _local_ms(text: str, tz: ZoneInfo) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=tz).timestamp() * 1000)


def mismatch(expected: dict[str, Any], got: Intent | IntentError, tz: ZoneInfo) -> str | None:
    """Why ``got`` is not the expected intent (None when it is)."""
    if "error" in expected:
        if isinstance(got, IntentError):
            return None if got.code == expected["error"] else f"error {got.code}"
        return f"answered as {got.kind}, expected error {expected['error']}"
    if isinstance(got, IntentError):
        return f"error {got.code}: {got}"
    if got.kind != expected["kind"]:
        return f"kind {got.kind}"
    metrics = expected["metrics"]
    want = set(METRIC_SETS[metrics] if isinstance(metrics, str) else metrics)
    if set(got.metrics) != want:
        return f"metrics {sorted(got.metrics)}"
    places = list(expected["places"])
    same = set(got.places) == set(places) if got.kind == "rank" else list(got.places) == places
    if not same:
        return f"places {list(got.places)}"
    lo, hi = (_local_ms(t, tz) for t in expected["period"])
    period = got.periods[0]
    if (period.start_ms, period.end_ms) != (lo, hi):
        return f"period {period.to_dict(tz)['start']}..{period.to_dict(tz)['end']}"
    return None


@dataclass(frozen=True, slots=True)
class IntentScore:
    total: int
    correct: int
    failures: list[tuple[str, str]]
    seconds: list[float]
    llm_used: int  # answers whose intent came from the model

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def score_intents(
    qs: QuestionSet, parse: Callable[[str], Intent], *, limit: int | None = None
) -> IntentScore:
    tz = ZoneInfo(qs.timezone)
    failures: list[tuple[str, str]] = []
    seconds: list[float] = []
    llm_used = correct = 0
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
        problem = mismatch(item, got, tz)
        if problem is None:
            correct += 1
        else:
            failures.append((item["q"], problem))
    return IntentScore(len(questions), correct, failures, seconds, llm_used)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]
