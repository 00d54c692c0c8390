"""Questions in plain language -> a structured intent: what, where, when, compared how.

Two parsers give the same :class:`Intent`:

- :func:`parse_question`, deterministic: synonyms for metrics, the known zone names, and
  relative time expressions ("last week", "yesterday morning", "since Monday", "in
  October", "the last 3 days") resolved in the city's time zone against a given "now".
- :func:`llm_intent`: the language model fills a JSON schema (metric names from a fixed
  list; places and the time expression as words copied from the question). Zone names
  never go into the prompt (operators typed them); the model's words are matched to
  zones by code, and its time words go through the same period parser. Anything the
  model says that the question does not support is refused, and the deterministic
  parser answers instead.

Questions outside air quality and traffic, forecasts, and questions carrying
instructions to the system are refused with a reason, not answered.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from analytics.reports.facts import AIR_METRICS, REPORT_METRICS, TRAFFIC_METRICS
from analytics.reports.llm import LlmBackend, LlmError
from civicmesh.errors import CivicmeshError

CITY = "city"
KINDS = ("summary", "compare_places", "compare_periods", "rank")


class IntentError(CivicmeshError):
    """A question that cannot be turned into an intent; ``code`` says why."""

    reason = "ask.invalid"

    def __init__(self, code: str, message: str, suggestions: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.code = code  # unknown_place, unknown_metric, out_of_scope, refused
        self.suggestions = tuple(suggestions)


@dataclass(frozen=True, slots=True)
class Period:
    start_ms: int
    end_ms: int
    label: str

    def to_dict(self, tz: ZoneInfo) -> dict[str, Any]:
        return {
            "start": datetime.fromtimestamp(self.start_ms / 1000, tz).isoformat(),
            "end": datetime.fromtimestamp(self.end_ms / 1000, tz).isoformat(),
            "label": self.label,
        }


@dataclass(frozen=True, slots=True)
class Intent:
    kind: str
    metrics: tuple[str, ...]
    places: tuple[str, ...]  # zone names, or CITY
    periods: tuple[Period, ...]  # one, or two for compare_periods (asked, then reference)
    parser: str = "deterministic"  # or "llm"
    notes: tuple[str, ...] = field(default=())

    def to_dict(self, tz: ZoneInfo) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "metrics": list(self.metrics),
            "places": list(self.places),
            "periods": [p.to_dict(tz) for p in self.periods],
            "parser": self.parser,
        }


# ------------------------------------------------------------------- vocabulary

# Longest phrases first when matching; each maps to metrics.
METRIC_TERMS: dict[str, tuple[str, ...]] = {
    "pm2.5": ("pm25",),
    "pm 2.5": ("pm25",),
    "pm25": ("pm25",),
    "pm2,5": ("pm25",),
    "fine particles": ("pm25",),
    "fine particulate": ("pm25",),
    "fine dust": ("pm25",),
    "pm10": ("pm10",),
    "pm 10": ("pm10",),
    "coarse particles": ("pm10",),
    "particulate matter": ("pm25", "pm10"),
    "particulates": ("pm25", "pm10"),
    "particulate": ("pm25", "pm10"),
    "particles": ("pm25", "pm10"),
    "dust": ("pm10",),
    "soot": ("pm25",),
    "no2": ("no2",),
    "nitrogen dioxide": ("no2",),
    "nitrogen": ("no2",),
    "no₂": ("no2",),
    "ozone": ("o3",),
    "o3": ("o3",),
    "smog": ("o3",),
    "carbon monoxide": ("co",),
    "co": ("co",),
    "air quality": AIR_METRICS,
    "air pollution": AIR_METRICS,
    "pollution": AIR_METRICS,
    "pollutants": AIR_METRICS,
    "polluted": AIR_METRICS,
    "aqi": AIR_METRICS,
    "the air": AIR_METRICS,
    "air": AIR_METRICS,
    "emissions": AIR_METRICS,
    "traffic volume": ("vehicle_count",),
    "vehicle count": ("vehicle_count",),
    "vehicles": ("vehicle_count",),
    "cars": ("vehicle_count",),
    "vehicle": ("vehicle_count",),
    "traffic counts": ("vehicle_count",),
    "how many cars": ("vehicle_count",),
    "speed": ("mean_speed",),
    "traffic speed": ("mean_speed",),
    "average speed": ("mean_speed",),
    "speeds": ("mean_speed",),
    "how fast": ("mean_speed",),
    "congestion": ("vehicle_count", "mean_speed"),
    "congested": ("vehicle_count", "mean_speed"),
    "faster": ("mean_speed",),
    "slower": ("mean_speed",),
    "traffic": TRAFFIC_METRICS,
    "roads": TRAFFIC_METRICS,
}
# Things people ask about that the network does not report on.
OTHER_MEASURES = (
    "so2",
    "sulphur dioxide",
    "sulfur dioxide",
    "pollen",
    "noise",
    "benzene",
    "radon",
    "ammonia",
    "methane",
    "co2",
    "carbon dioxide",
    "lead",
    "humidity",
    "humid",
    "temperature",
    "rainfall",
    "rain",
    "water quality",
    "water",
    "wind",
    "uv",
    "voc",
    "vocs",
    "h2s",
)
DOMAIN_WORDS = (
    "report",
    "summary",
    "summarise",
    "summarize",
    "overview",
    "levels",
    "level",
    "readings",
    "measurements",
    "sensors",
    "sensor",
    "exceed",
    "guideline",
    "who guideline",
    "worst",
    "best",
    "cleanest",
    "dirtiest",
    "highest",
    "lowest",
    "peak",
    "average",
    "mean",
    "how was",
    "how is",
    "how were",
    "what was",
    "compare",
    "trend",
)
FORECAST = re.compile(
    r"\b(tomorrow|next (week|month|year|monday|tuesday|wednesday|thursday|"
    r"friday|saturday|sunday)|forecast|predict\w*|will (it|the|there) be|"
    r"going to be)\b"
)
INJECTION = re.compile(
    r"\b(ignore|disregard|forget)\b.{0,40}\b(instruction|prompt|rule|above|previous)"
    r"|\bsystem prompt\b|\byou are now\b|\bpretend\b|\bjailbreak\b|\bas an ai\b"
    r"|\b(reveal|print|show)\b.{0,20}\b(prompt|instructions|password|secret|key)s?\b"
    r"|\bsay that\b|\bwrite that\b|\breply with\b|\brespond with\b"
)
CITY_TERMS = (
    "whole city",
    "the city",
    "citywide",
    "city-wide",
    "city wide",
    "all zones",
    "all districts",
    "across town",
    "the town",
    "city",
)
RANK = re.compile(
    r"\b(which|what) (zone|district|area|part|neighbourhood|neighborhood|place)s?\b"
    r"|\b(rank|ranking)\b|\b(worst|best|cleanest|dirtiest|most polluted|least "
    r"polluted) (zone|district|area|part)s?\b"
)
COMPARE_PERIOD = re.compile(
    r"\b(compared? (to|with)|versus|vs\.?|than|against|week[- ]on[- ]week|week[- ]over[- ]week"
    r"|month[- ]on[- ]month|change[ds]? (since|from)|the week before"
    r"|the day before(?! yesterday)|the month before)\b"
)
WEEKDAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
MONTHS = (
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
)
MONTH_ABBR = {m[:3]: i + 1 for i, m in enumerate(MONTHS)} | {"sept": 9}
NUMBER_WORDS = {
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "twelve": 12,
    "fourteen": 14,
    "thirty": 30,
    "a": 1,
    "an": 1,
}
PARTS_OF_DAY = {
    "morning": (6, 12),
    "afternoon": (12, 18),
    "evening": (18, 24),
    "night": (0, 6),
    "rush hour": (7, 10),
}
PLACE_PREPOSITIONS = ("in", "at", "for", "near", "around", "of", "across")
STOP_AFTER_PREPOSITION = frozenset(
    (
        *MONTHS,
        *WEEKDAY_NAMES,
        "the",
        "last",
        "this",
        "past",
        "previous",
        "recent",
        "morning",
        "afternoon",
        "evening",
        "night",
        "week",
        "month",
        "day",
        "days",
        "weeks",
        "months",
        "hours",
        "hour",
        "year",
        "today",
        "yesterday",
        "general",
        "total",
        "particular",
        "terms",
        "comparison",
        "my",
        "our",
        "each",
        "every",
        "all",
        "both",
        "a",
        "an",
        "which",
        "what",
        "it",
        "town",
        "city",
        "zone",
        "district",
        "area",
        "rush",
        "peak",
        "weekend",
        "weekends",
        "2025",
        "2026",
        "2027",
        "us",
        "me",
        "mind",
        "detail",
        "one",
        "two",
        "three",
        "several",
        "some",
        "any",
        "that",
        "those",
        "these",
        "time",
        "order",
        "moment",
        "start",
        "beginning",
        "end",
        "same",
        "other",
        "whole",
        "roads",
        "road",
        "air",
        "numbers",
        "levels",
        "data",
        "it",
        "there",
        "here",
        "general",
        "average",
    )
)


def _norm(text: str) -> str:
    text = text.lower().replace("’", "'").replace("‘", "'")
    text = re.sub(r"[?!;\"()\[\]]", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def _has(text: str, phrase: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(phrase)}(?![\w])", text) is not None


def _zone_forms(zone: str) -> list[str]:
    z = zone.lower()
    return sorted(
        {z, z.replace("-", " "), z.replace("-", ""), z.replace("_", " ")}, key=len, reverse=True
    )


# ---------------------------------------------------------------------- metrics


def find_metrics(text: str) -> tuple[list[str], list[str]]:
    """Metrics named in ``text`` (catalogue order) and the phrases that named them."""
    found: set[str] = set()
    phrases: list[str] = []
    rest = text
    for phrase in sorted(METRIC_TERMS, key=len, reverse=True):
        if phrase == "co" and not re.search(r"(?<![\w.])co(?![\w-])", rest):
            continue
        if _has(rest, phrase):
            found.update(METRIC_TERMS[phrase])
            phrases.append(phrase)
            rest = re.sub(rf"(?<![\w.]){re.escape(phrase)}(?![\w])", " ", rest)
    specific = set(phrases) - {"traffic", "roads", "congestion", "congested"}
    if {"traffic", "roads"} & set(phrases) and any(
        set(METRIC_TERMS[p]) <= set(TRAFFIC_METRICS) for p in specific
    ):
        # "how fast was traffic": the specific term says which traffic metric
        found = {m for m in found if m not in TRAFFIC_METRICS}
        for phrase in specific:
            found.update(m for m in METRIC_TERMS[phrase] if m in TRAFFIC_METRICS)
    speed_words = {"speed", "speeds", "how fast", "faster", "slower", "average speed"}
    volume_words = {"traffic volume", "vehicle count", "traffic counts", "how many cars"}
    if speed_words & set(phrases) and not volume_words & set(phrases):
        # "did vehicles drive faster": the vehicles are the subject, speed the measure
        found.discard("vehicle_count")
    return [m for m in REPORT_METRICS if m in found], phrases


def _unknown_measure(text: str) -> str | None:
    for word in OTHER_MEASURES:
        if _has(text, word):
            return word
    return None


# ----------------------------------------------------------------------- places


def find_places(text: str, zones: Sequence[str]) -> tuple[list[str], list[str]]:
    """Zones (and CITY) named in ``text``, in order of mention, and unknown place words."""
    hits: list[tuple[int, str]] = []
    rest = text
    for zone in sorted(zones, key=len, reverse=True):
        for form in _zone_forms(zone):
            match = re.search(rf"(?<![\w-]){re.escape(form)}(?![\w-])", rest)
            if match:
                hits.append((match.start(), zone))
                rest = rest[: match.start()] + " " * len(form) + rest[match.end() :]
                break
    for term in CITY_TERMS:
        match = re.search(rf"(?<![\w-]){re.escape(term)}(?![\w-])", rest)
        if match:
            hits.append((match.start(), CITY))
            rest = rest[: match.start()] + " " * len(term) + rest[match.end() :]
            break
    unknown = []
    for match in re.finditer(
        rf"\b(?:{'|'.join(PLACE_PREPOSITIONS)}) ([a-z][a-z'-]*(?: [a-z][a-z'-]*)?)", rest
    ):
        words = match.group(1).split()
        if words[0] == "the":
            after = rest[match.end() :].split()
            words = words[1:] or after[:1]
            if not words or not re.fullmatch(r"[a-z][a-z'-]*", words[0]):
                continue
        head = words[0]
        if head in STOP_AFTER_PREPOSITION or head in MONTH_ABBR or head.isdigit():
            continue
        if any(head == p.split()[0] for p in METRIC_TERMS) or head in OTHER_MEASURES:
            continue
        if head in ("terms", "total", "particular", "comparison", "general"):
            continue
        unknown.append(
            head if len(words) == 1 or words[1] in STOP_AFTER_PREPOSITION else " ".join(words)
        )
    ordered = []
    for _, zone in sorted(hits):
        if zone not in ordered:
            ordered.append(zone)
    return ordered, unknown


def closest(word: str, known: Sequence[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(word, list(known), n=n, cutoff=0.0)[:n]


# ---------------------------------------------------------------------- periods


@dataclass(frozen=True, slots=True)
class Clock:
    now: datetime  # aware, in the city's zone

    @property
    def tz(self) -> ZoneInfo:
        assert isinstance(self.now.tzinfo, ZoneInfo)
        return self.now.tzinfo

    def midnight(self, day: date) -> datetime:
        return datetime(day.year, day.month, day.day, tzinfo=self.tz)

    def period(self, start: datetime, end: datetime, label: str) -> Period:
        end = min(end, self.now) if start < self.now else end
        return Period(int(start.timestamp() * 1000), int(end.timestamp() * 1000), label)


def _month_start(year: int, month: int) -> date:
    return date(year + (month - 1) // 12, (month - 1) % 12 + 1, 1)


def _number(token: str) -> int | None:
    if token.isdigit():
        return int(token)
    return NUMBER_WORDS.get(token)


def find_periods(text: str, clock: Clock) -> list[Period]:
    """Time expressions in ``text``, in order of mention, resolved against ``clock``."""
    found: list[tuple[int, Period]] = []
    today = clock.now.date()
    midnight = clock.midnight(today)

    def add(match: re.Match[str] | None, start: datetime, end: datetime) -> None:
        if match is not None:
            found.append((match.start(), clock.period(start, end, match.group(0).strip())))

    # explicit ISO dates
    for m in re.finditer(r"\b(\d{4})-(\d{2})-(\d{2})\b", text):
        day = date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
        add(m, clock.midnight(day), clock.midnight(day + timedelta(days=1)))
    # "3 November", "november 3", "3rd of nov 2025"
    month_re = "|".join(sorted(list(MONTHS) + list(MONTH_ABBR), key=len, reverse=True))
    for m in re.finditer(
        rf"\b(\d{{1,2}})(?:st|nd|rd|th)? (?:of )?({month_re})\.?(?: (\d{{4}}))?\b"
        rf"|\b({month_re})\.? (\d{{1,2}})(?:st|nd|rd|th)?(?:,? (\d{{4}}))?\b",
        text,
    ):
        day_s, month_s, year_s = (
            (m.group(1), m.group(2), m.group(3))
            if m.group(1)
            else (m.group(5), m.group(4), m.group(6))
        )
        month = MONTH_ABBR[month_s[:3]] if month_s[:4] != "sept" else 9
        year = int(year_s) if year_s else today.year
        try:
            day = date(year, month, int(day_s))
        except ValueError:
            continue
        if not year_s and day > today:
            day = date(year - 1, month, int(day_s))
        add(m, clock.midnight(day), clock.midnight(day + timedelta(days=1)))
    taken = [(s, s + len(p.label)) for s, p in found]

    def free(m: re.Match[str]) -> bool:
        return all(m.end() <= a or m.start() >= b for a, b in taken)

    # whole months: "in october", "october 2025", "last month", "this month"
    for m in re.finditer(rf"\b(?:in |during |for )?({'|'.join(MONTHS)})(?: (\d{{4}}))?\b", text):
        if not free(m):
            continue
        month = MONTHS.index(m.group(1)) + 1
        year = int(m.group(2)) if m.group(2) else today.year
        if not m.group(2) and _month_start(year, month) > today:
            year -= 1
        first = _month_start(year, month)
        add(m, clock.midnight(first), clock.midnight(_month_start(year, month + 1)))
    patterns: list[tuple[str, Any]] = [
        (
            r"\b(?:in the |over the |during the |for the )?(?:last|past|previous) (\d+|[a-z]+) "
            r"(hour|day|week|month)s?\b",
            "last_n",
        ),
        (r"\b(?:the )?(?:last|past) (24|48) ?h\b", "last_h"),
        (r"\b(\d+|[a-z]+) days? ago\b", "days_ago"),
        (r"\b(?:the )?past week\b|\bweekly\b", "last_7"),
        (r"\b(?:the )?(?:last|past) fortnight\b", "last_14"),
        (
            r"\b(?:on )?(monday|tuesday|wednesday|thursday|friday|saturday|sunday) "
            r"(morning|afternoon|evening|night)\b",
            "day_part",
        ),
        (r"\b(?:the )?past month\b|\bmonthly\b", "last_30"),
        (r"\byesterday (morning|afternoon|evening|night)\b", "yesterday_part"),
        (r"\b(?:this|today'?s?) (morning|afternoon|evening)\b", "today_part"),
        (r"\b(?:last|yesterday) night\b", "last_night"),
        (r"\bday before yesterday\b", "day_before"),
        (r"\bsince (monday|tuesday|wednesday|thursday|friday|saturday|sunday)\b", "since_day"),
        (r"\bsince yesterday\b", "since_yesterday"),
        (r"\bsince (?:the )?(?:start|beginning) of (?:the )?(week|month)\b", "since_start"),
        (r"\byesterday\b", "yesterday"),
        (r"\btoday\b|\bso far today\b", "today"),
        (r"\b(?:last|past|previous) week ?end\b|\blast weekend\b", "last_weekend"),
        (r"\b(?:this|the) ?week ?end\b", "this_weekend"),
        (
            r"\b(?:last|previous|past) (monday|tuesday|wednesday|thursday|friday|saturday|sunday)"
            r"\b",
            "last_day",
        ),
        (r"\b(?:on )?(monday|tuesday|wednesday|thursday|friday|saturday|sunday)\b", "on_day"),
        (r"\b(?:the )?week before(?: last)?\b", "week_before"),
        (r"\b(?:the )?previous week\b", "last_week"),
        (r"\b(?:last|past) week\b", "last_week"),
        (r"\bthis week\b", "this_week"),
        (r"\bthe week\b", "last_7"),
        (r"\b(?:the )?month before\b|\bprevious month\b", "month_before"),
        (r"\b(?:last|past) month\b", "last_month"),
        (r"\bthis month\b", "this_month"),
        (r"\b(?:last|past|this) year\b", "year"),
        (r"\b(?:right )?now\b|\bcurrently\b|\bat the moment\b|\blatest\b", "now"),
    ]
    for pattern, what in patterns:
        for m in re.finditer(pattern, text):
            if not free(m):
                continue
            result = _resolve(what, m, clock, today, midnight)
            if result is not None:
                found.append((m.start(), clock.period(result[0], result[1], m.group(0).strip())))
                taken.append((m.start(), m.end()))
    return [p for _, p in sorted(found, key=lambda pair: pair[0])]


def _resolve(
    what: str, m: re.Match[str], clock: Clock, today: date, midnight: datetime
) -> tuple[datetime, datetime] | None:
    now = clock.now
    day = timedelta(days=1)
    monday = clock.midnight(today - timedelta(days=today.weekday()))
    if what == "last_n":
        n = _number(m.group(1))
        if n is None or n <= 0:
            return None
        unit = {"hour": timedelta(hours=1), "day": day, "week": 7 * day}.get(m.group(2))
        if m.group(2) == "month":
            unit = 30 * day
        assert unit is not None
        return now - n * unit, now
    if what == "last_h":
        return now - timedelta(hours=int(m.group(1))), now
    if what in ("yesterday_part", "today_part"):
        base = clock.midnight(today - day) if what == "yesterday_part" else midnight
        lo, hi = PARTS_OF_DAY[m.group(1)]
        return base + timedelta(hours=lo), base + timedelta(hours=hi)
    if what == "last_night":
        return clock.midnight(today - day) + timedelta(hours=18), midnight + timedelta(hours=6)
    if what == "day_before":
        return clock.midnight(today - 2 * day), clock.midnight(today - day)
    if what == "yesterday":
        return clock.midnight(today - day), midnight
    if what == "today":
        return midnight, now
    if what == "since_day":
        back = (today.weekday() - WEEKDAY_NAMES.index(m.group(1))) % 7
        return clock.midnight(today - timedelta(days=back)), now
    if what == "since_yesterday":
        return clock.midnight(today - day), now
    if what == "since_start":
        if m.group(1) == "week":
            return monday, now
        return clock.midnight(today.replace(day=1)), now
    if what == "last_weekend":
        saturday = monday - 2 * day
        return saturday, monday
    if what == "this_weekend":
        saturday = monday + 5 * day
        if saturday > now:
            saturday -= 7 * day
        return saturday, saturday + 2 * day
    if what in ("last_day", "on_day"):
        back = (today.weekday() - WEEKDAY_NAMES.index(m.group(1))) % 7
        if back == 0 and what == "last_day":
            back = 7
        if back == 0:  # "on Monday" asked on a Monday: today so far
            return midnight, now
        start = clock.midnight(today - timedelta(days=back))
        return start, start + day
    if what == "week_before":
        return monday - 14 * day, monday - 7 * day
    if what == "last_week":
        return monday - 7 * day, monday
    if what == "this_week":
        return monday, now
    if what == "last_7":
        return now - 7 * day, now
    if what == "last_14":
        return now - 14 * day, now
    if what == "day_part":
        back = (today.weekday() - WEEKDAY_NAMES.index(m.group(1))) % 7
        base = clock.midnight(today - timedelta(days=back))
        lo, hi = PARTS_OF_DAY[m.group(2)]
        return base + timedelta(hours=lo), base + timedelta(hours=hi)
    if what == "last_30":
        return now - 30 * day, now
    if what == "days_ago":
        n = _number(m.group(1))
        if n is None or n <= 0:
            return None
        start = clock.midnight(today - n * day)
        return start, start + day
    if what in ("month_before", "last_month"):
        first = today.replace(day=1)
        prev = _month_start(first.year, first.month - 1)
        if what == "month_before":
            prev2 = _month_start(first.year, first.month - 2)
            return clock.midnight(prev2), clock.midnight(prev)
        return clock.midnight(prev), clock.midnight(first)
    if what == "this_month":
        return clock.midnight(today.replace(day=1)), now
    if what == "year":
        if m.group(0).startswith("this"):
            return clock.midnight(date(today.year, 1, 1)), now
        return clock.midnight(date(today.year - 1, 1, 1)), clock.midnight(date(today.year, 1, 1))
    if what == "now":
        return now - timedelta(hours=1), now
    return None


def following_period(period: Period, clock: Clock) -> Period:
    length = period.end_ms - period.start_ms
    end = min(period.end_ms + length, int(clock.now.timestamp() * 1000))
    return Period(period.end_ms, end, "the period after")


def previous_period(period: Period) -> Period:
    length = period.end_ms - period.start_ms
    return Period(period.start_ms - length, period.start_ms, "the period before")


# ------------------------------------------------------------------------ parse


def _screen(text: str) -> None:
    if INJECTION.search(text):
        raise IntentError(
            "refused",
            "The question contains instructions to the system. Ask about air quality or "
            "traffic in a zone or the city over a period, e.g. 'NO2 in harbour last week'.",
        )
    if FORECAST.search(text):
        raise IntentError(
            "out_of_scope",
            "civicmesh reports on measured data only; it does not forecast. Ask about a "
            "past period, e.g. 'PM2.5 in the city yesterday'.",
        )


def parse_question(question: str, zones: Sequence[str], now: datetime) -> Intent:
    """The intent of ``question`` by fixed rules; IntentError when there is none."""
    text = _norm(question)
    if not text:
        raise IntentError("out_of_scope", "The question is empty.")
    if len(text) > 500:
        raise IntentError("out_of_scope", "The question is too long (500 characters at most).")
    _screen(text)
    clock = Clock(now)
    metrics, _ = find_metrics(text)
    places, unknown_places = find_places(text, zones)
    periods = find_periods(text, clock)
    other = _unknown_measure(text)
    if other and not metrics:
        raise IntentError(
            "unknown_metric",
            f"civicmesh does not measure {other!r}. Known: {', '.join(REPORT_METRICS)}.",
            closest(other, REPORT_METRICS),
        )
    ranking = RANK.search(text) is not None
    domain = bool(metrics or places or ranking) or any(_has(text, w) for w in DOMAIN_WORDS)
    if not domain:
        raise IntentError(
            "out_of_scope",
            "This service answers questions about measured air quality and traffic, e.g. "
            "'How was NO2 in harbour last week?'",
        )
    if unknown_places and not places and not ranking:
        known = [*zones, CITY]
        word = unknown_places[0]
        raise IntentError(
            "unknown_place",
            f"Unknown place {word!r}. Known places: {', '.join(sorted(zones))}, or the city.",
            closest(word, known),
        )
    return _assemble(text, metrics, places, periods, clock, ranking, "deterministic", zones)


def _assemble(
    text: str,
    metrics: list[str],
    places: list[str],
    periods: list[Period],
    clock: Clock,
    ranking: bool,
    parser: str,
    zones: Sequence[str],
) -> Intent:
    notes = []
    if not metrics:
        metrics = list(REPORT_METRICS)
    if not periods:
        now_ms = int(clock.now.timestamp() * 1000)
        periods = [Period(now_ms - 24 * 3_600_000, now_ms, "the last 24 hours")]
        notes.append("no period named: the last 24 hours")
    if ranking:
        return Intent("rank", tuple(metrics), tuple(zones), (periods[0],), parser, tuple(notes))
    if not places:
        places = [CITY]
        if parser == "deterministic":
            notes.append("no place named: the whole city")
    if len(places) >= 2:
        return Intent(
            "compare_places", tuple(metrics), tuple(places), (periods[0],), parser, tuple(notes)
        )
    compare = COMPARE_PERIOD.search(text)
    if len(periods) >= 2 or compare:
        if len(periods) >= 2:
            asked, reference = periods[0], periods[1]
        elif compare is not None and 0 <= compare.start() < text.find(periods[0].label):
            # "compared with last week": that is the reference; asked is what follows it
            reference = periods[0]
            asked = following_period(reference, clock)
        else:
            asked, reference = periods[0], previous_period(periods[0])
        periods = [asked, reference]
        reference = periods[1]
        return Intent(
            "compare_periods",
            tuple(metrics),
            tuple(places),
            (periods[0], reference),
            parser,
            tuple(notes),
        )
    return Intent("summary", tuple(metrics), tuple(places), (periods[0],), parser, tuple(notes))


# -------------------------------------------------------------------------- LLM

INTENT_PROMPT_VERSION = "intent-1"
INTENT_SYSTEM = (
    "You turn questions about a city's air quality and traffic into JSON. metrics: the "
    "measurements asked about (empty list if none is named). places: place names exactly "
    "as written in the question (empty if none). time: the time expression exactly as "
    "written in the question (empty if none). compare: true if the question compares two "
    "places or two periods. Answer with JSON only.\n"
    "Example: 'Was ozone worse in riverside than in the docks yesterday?' -> "
    '{"metrics": ["o3"], "places": ["riverside", "the docks"], "time": "yesterday", '
    '"compare": true}'
)


def intent_schema() -> dict[str, Any]:
    words = {"type": "string", "maxLength": 40}
    return {
        "type": "object",
        "properties": {
            "metrics": {"type": "array", "items": {"enum": list(REPORT_METRICS)}, "maxItems": 3},
            "places": {"type": "array", "items": words, "maxItems": 2},
            "time": words,
            "compare": {"type": "boolean"},
        },
        "required": ["metrics", "places", "time", "compare"],
    }


def llm_intent(question: str, zones: Sequence[str], now: datetime, llm: LlmBackend) -> Intent:
    """The model's intent, every part checked against the question; IntentError or
    LlmError when it cannot be used (the caller then parses deterministically)."""
    text = _norm(question)
    _screen(text)
    answer = llm.complete_json(
        INTENT_SYSTEM, f"Question: {question.strip()[:500]}", intent_schema(), 120
    )
    if not isinstance(answer, dict):
        raise LlmError("the intent is not a JSON object")
    clock = Clock(now)
    metrics = [m for m in answer.get("metrics", []) if m in REPORT_METRICS]
    supported, _ = find_metrics(text)
    for metric in metrics:
        if metric not in supported:
            raise LlmError(f"the model chose {metric}, which the question does not name")
    places: list[str] = []
    for words in answer.get("places", []):
        if not isinstance(words, str) or not words.strip():
            continue
        matched, _ = find_places(_norm(words), zones)
        if not matched or _norm(words) not in text:
            raise LlmError(f"the model's place {words[:40]!r} is not a known place in the question")
        places += [p for p in matched if p not in places]
    periods: list[Period] = []
    time_words = answer.get("time", "")
    if isinstance(time_words, str) and time_words.strip():
        if _norm(time_words) not in text:
            raise LlmError(f"the model's time {time_words[:40]!r} is not in the question")
        periods = find_periods(_norm(time_words), clock)
        if not periods:
            raise LlmError(f"the model's time {time_words[:40]!r} is not a period")
    # What the question names, the model must not leave out either.
    if set(supported) - set(metrics):
        raise LlmError("the model left out a metric the question names")
    named_places, _ = find_places(text, zones)
    if set(named_places) - set(places):
        raise LlmError("the model left out a place the question names")
    if find_periods(text, clock) and not periods:
        raise LlmError("the model left out the time the question names")
    ranking = RANK.search(text) is not None
    intent = _assemble(text, metrics, places, periods, clock, ranking, "llm", zones)
    if answer.get("compare") and intent.kind == "summary":
        raise LlmError("the model saw a comparison the question does not support")
    return intent
