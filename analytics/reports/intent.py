"""Questions in plain language -> a structured intent: what, where, when, compared how.

Two parsers give the same :class:`Intent`:

- :func:`parse_question`, deterministic: what is asked (:data:`QUANTITY_RULES`: a mean,
  a peak and when, the AQI, hours or days above the WHO guideline, the busiest hour, a
  total, a correlation, device health, data completeness), synonyms for every measured
  metric, the known zone names, and time expressions (:mod:`analytics.reports.periods`)
  resolved in the city's time zone against a given "now".
- :func:`llm_intent`: the language model fills a JSON schema (metric names from a fixed
  list; places and the time expression as words copied from the question). Zone names
  never go into the prompt (operators typed them); the model's words are matched to
  zones by code, and its time words go through the same period parser. Anything the
  model says that the question does not support is refused, and the deterministic
  parser answers instead.

Every question is first folded to one spelling (:func:`textnorm.normalise`: NFKC, no
zero-width or format characters, Latin look-alikes), then screened: instructions to the
system and requests to change data are refused (``refused``); forecasts in any wording,
periods that have not happened and other subjects are out of scope (``out_of_scope``).
A screened question never reaches the model.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from analytics.reports.facts import (
    AIR_METRICS,
    MEASURED_METRICS,
    REPORT_METRICS,
    TRAFFIC_METRICS,
    WEATHER_METRICS,
)
from analytics.reports.llm import LlmBackend, LlmError
from analytics.reports.periods import (
    DAY,
    MONTH_ABBR,
    MONTHS,
    WEEKDAY_NAMES,
    Clock,
    Found,
    Period,
    find_days,
    find_hours,
    find_periods,
    with_filters,
)
from analytics.reports.textnorm import normalise
from civicmesh.errors import CivicmeshError

CITY = "city"
KINDS = ("summary", "compare_places", "compare_periods", "rank")
QUANTITIES = (
    "summary",
    "mean",
    "peak",
    "aqi",
    "exceedance_hours",
    "exceedance_days",
    "busiest_hour",
    "total",
    "correlation",
    "device_health",
    "completeness",
)


class IntentError(CivicmeshError):
    """A question that cannot be turned into an intent; ``code`` says why."""

    reason = "ask.invalid"

    def __init__(self, code: str, message: str, suggestions: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.code = code  # unknown_place, unknown_metric, out_of_scope, refused
        self.suggestions = tuple(suggestions)


@dataclass(frozen=True, slots=True)
class Intent:
    kind: str
    metrics: tuple[str, ...]
    places: tuple[str, ...]  # zone names, or CITY
    periods: tuple[Period, ...]  # one, or two for compare_periods (asked, then reference)
    parser: str = "deterministic"  # or "llm"
    notes: tuple[str, ...] = field(default=())
    quantity: str = "summary"  # what is asked about the metrics (QUANTITIES)

    def to_dict(self, tz: ZoneInfo) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "quantity": self.quantity,
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
    "cleaner": AIR_METRICS,
    "cleanest": AIR_METRICS,
    "dirtier": AIR_METRICS,
    "dirtiest": AIR_METRICS,
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
    # how busy a place is: its traffic
    "busy": TRAFFIC_METRICS,
    "busier": TRAFFIC_METRICS,
    "busiest": TRAFFIC_METRICS,
    "quiet": TRAFFIC_METRICS,
    "quieter": TRAFFIC_METRICS,
    "quietest": TRAFFIC_METRICS,
    "crowded": TRAFFIC_METRICS,
    "jams": TRAFFIC_METRICS,
    "jammed": TRAFFIC_METRICS,
    "gridlock": TRAFFIC_METRICS,
    "gridlocked": TRAFFIC_METRICS,
    "temperature": ("temperature",),
    "temperatures": ("temperature",),
    "temp": ("temperature",),
    "how warm": ("temperature",),
    "how hot": ("temperature",),
    "how cold": ("temperature",),
    "hottest": ("temperature",),
    "coldest": ("temperature",),
    "warmest": ("temperature",),
    "coolest": ("temperature",),
    "degrees": ("temperature",),
    "heat": ("temperature",),
    "warm": ("temperature",),
    "cold": ("temperature",),
    "hot": ("temperature",),
    "warmer": ("temperature",),
    "colder": ("temperature",),
    "hotter": ("temperature",),
    "cooler": ("temperature",),
    "chilly": ("temperature",),
    "chillier": ("temperature",),
    "freezing": ("temperature",),
    "humidity": ("relativehumidity",),
    "relative humidity": ("relativehumidity",),
    "humid": ("relativehumidity",),
    "more humid": ("relativehumidity",),
    "drier": ("relativehumidity",),
    "dampness": ("relativehumidity",),
    "damp": ("relativehumidity",),
    "moisture": ("relativehumidity",),
    "weather": WEATHER_METRICS,
    "occupancy": ("occupancy",),
    "road occupancy": ("occupancy",),
    "lane occupancy": ("occupancy",),
    "detector occupancy": ("occupancy",),
    "occupied": ("occupancy",),
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
    "rainfall",
    "rain",
    "water quality",
    "water",
    "wind",
    "wind speed",
    "windy",
    "uv",
    "uv index",
    "noisy",
    "loud",
    "decibels",
    "radiation",
    "radioactivity",
    "sunshine",
    "sunny",
    "rainy",
    "snow",
    "visibility",
    "air pressure",
    "barometric pressure",
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
    r"\b(tomorrow|tonight|next (week|month|year|weekend|few|couple|\d+|monday|tuesday|"
    r"wednesday|thursday|friday|saturday|sunday)|forecasts?|forecasting|predict\w*|"
    r"projected|projections?|outlook|upcoming|coming (days?|weeks?|weekend|months?|hours?)|"
    r"in the future|later (today|this week|on)|from now|will|won't|'ll|shall|gonna|"
    r"going to (be|get|rise|fall|drop|go|stay|improve|worsen)|expect(ed|ing)? (to|it|the)|"
    r"anticipat\w*|likely to|chance of|should i expect|what to expect)\b"
)
INJECTION = re.compile(
    r"\b(ignore|disregard|forget|override|bypass)\b.{0,40}\b(instruction|prompt|rule|above|"
    r"previous|guideline|polic)"
    r"|\bsystem prompt\b|\byou are now\b|\bpretend\b|\bjailbreak\b|\bas an ai\b"
    r"|\bdeveloper mode\b|\bact as\b|\broleplay\b"
    r"|\b(reveal|print|show|tell me|repeat)\b.{0,20}\b(prompt|instructions|password|secret|"
    r"key|token|credential)s?\b"
    r"|\bsay that\b|\bwrite that\b|\breply with\b|\brespond with\b|\bclaim that\b"
)
# Credentials, in any wording: never given out.
CREDENTIALS = re.compile(
    r"\b(passwords?|passcodes?|api[- ]?keys?|secret keys?|private keys?|access tokens?|"
    r"credentials?|login details|admin login|ssh keys?|connection strings?)\b"
)
# Requests to change what is stored: refused, whatever follows.
_WRITE_VERBS = (
    r"delete|remove|erase|drop|truncate|wipe|purge|destroy|clear|update|modify|edit|"
    r"overwrite|insert|add|create|register|deregister|reset|rename|disable|enable|restart|"
    r"reboot|shut down|turn off|switch off|set|change|alter|correct|fix|replace|upload|"
    r"import|revoke|move|mark|flag|hide|falsify|fake|adjust|lower|raise"
)
WRITE = re.compile(
    rf"^(?:(?:please|pls|can you|could you|would you|will you|i want you to|i want to|"
    rf"i'd like (?:you )?to|i need (?:you )?to|go ahead and|now|ok|okay|just)[ ,]+)*"
    rf"(?:{_WRITE_VERBS})\b"
    rf"|\b(?:delete|remove|erase|wipe|purge|overwrite|truncate|drop|falsify|destroy|"
    rf"tamper with|clear out)\b.{{0,40}}\b(?:readings?|data|records?|values?|"
    rf"measurements?|sensors?|devices?|zones?|reports?|database|tables?|history|"
    rf"everything|all|logs?|ledger)\b"
)
# Work of another kind than reporting measured data, and other subjects.
OTHER_WORK = re.compile(
    r"\b(write|compose|tell|sing|draw|generate|make up|create|code|implement|build|give me)"
    r"\b.{0,25}\b(poem|story|joke|song|essay|limerick|haiku|picture|image|code|script|email|"
    r"letter|tweet|function|program|programme|query|sql|regex|class|website|app|spreadsheet|"
    r"algorithm)s?\b|\btranslat\w*\b|\b(python|javascript|java|sql|c\+\+|html) "
    r"(function|script|code|query|program)\b"
)
OTHER_TASK = re.compile(
    r"\b(recipe|football|soccer|cricket|lottery|horoscope|bitcoin|stock|"
    r"shares|election|mayor|council tax|bus|buses|train|trains|tram|timetable|ticket|"
    r"tickets|fare|fares|restaurant|restaurants|hotel|hotels|cinema|parking|crime|house "
    r"prices|rent|population|tourist|museum|school|hospital|elections?|news|president|"
    r"capital of|meaning of life|yourself|pubs?|bars?|cafes?|shops?|"
    r"shopping|nightlife|things to do|directions to|route to)\b"
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
    r"|\b(every|each|per|by) (zone|district|area|neighbou?rhood)\b|\bzone by zone\b"
)
COMPARE_PERIOD = re.compile(
    r"\b(compared? (to|with)|versus|vs\.?|than|against|week[- ]on[- ]week|week[- ]over[- ]week"
    r"|month[- ]on[- ]month|change[ds]? (since|from)|the week before"
    r"|the day before(?! yesterday)|the month before)\b"
)
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
        "mornings",
        "afternoons",
        "evenings",
        "nights",
        "overnight",
        "lunchtime",
        "daytime",
        "weekday",
        "weekdays",
        "recent",
        "hours",
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
    return normalise(text)


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
    return [m for m in MEASURED_METRICS if m in found], phrases


def without_other_measures(text: str) -> str:
    """``text`` with the unmeasured things blanked out, so "wind speed" names no speed."""
    for word in sorted(OTHER_MEASURES, key=len, reverse=True):
        text = re.sub(rf"(?<![\w.]){re.escape(word)}(?![\w])", " " * len(word), text)
    return text


def _unknown_measure(text: str) -> str | None:
    for word in sorted(OTHER_MEASURES, key=len, reverse=True):
        if _has(text, word):
            return word
    return None


# ----------------------------------------------------------------------- places


def _blank(text: str, match: re.Match[str]) -> str:
    """``text`` with a found place replaced by a placeholder of the same length (a stop
    word, so the words after it are not read as another place)."""
    width = match.end() - match.start()
    filler = "zone".ljust(width) if width >= 4 else " " * width
    return text[: match.start()] + filler + text[match.end() :]


# Kinds of place people name instead of a zone: a group's words mean the one zone whose
# name is in the group ("the docks" is the harbour when one zone is called harbour).
PLACE_KINDS: tuple[tuple[str, ...], ...] = (
    ("harbour",  "port", "docks", "dock", "docklands", "dockside", "waterfront",
     "quay", "quayside", "quays", "marina", "wharf", "seafront", "the seaside"),
    ("university", "uni", "campus", "college", "the university area", "student quarter"),
    ("ring road", "ringroad", "ring-road", "bypass", "by-pass", "orbital", "orbital road",
     "beltway", "ring way", "relief road"),
    ("old town", "old-town", "oldtown", "town centre", "town center", "city centre",
     "city center", "downtown", "historic centre", "historic center", "old quarter",
     "historic quarter", "old city", "centre of town", "center of town", "high street"),
    ("industrial", "industrial estate", "industrial park", "industrial zone", "factories"),
    ("station", "train station", "railway station", "central station"),
    ("airport", "the airport"),
)  # fmt: skip


def place_aliases(text: str, zones: Sequence[str]) -> list[tuple[str, str]]:
    """(word, zone) for each place word in ``text`` that is another name of one zone."""
    taken: list[tuple[str, str]] = []
    own = {form for zone in zones for form in _zone_forms(zone)}
    for group in PLACE_KINDS:
        matching = [z for z in zones if set(_zone_forms(z)) & set(group)]
        if len(matching) != 1:
            continue
        for word in sorted(group, key=len, reverse=True):
            if word in own or any(word in w for w, _ in taken):
                continue
            if re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text):
                taken.append((word, matching[0]))
    return taken


def find_places(text: str, zones: Sequence[str]) -> tuple[list[str], list[str]]:
    """Zones (and CITY) named in ``text``, in order of mention, and unknown place words."""
    hits: list[tuple[int, str]] = []
    rest = text
    for zone in sorted(zones, key=len, reverse=True):
        for form in _zone_forms(zone):
            match = re.search(rf"(?<![\w-]){re.escape(form)}(?![\w-])", rest)
            if match:
                hits.append((match.start(), zone))
                rest = _blank(rest, match)
                break
    for word, zone in place_aliases(rest, zones):
        match = re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", rest)
        if match:
            hits.append((match.start(), zone))
            rest = _blank(rest, match)
    for term in CITY_TERMS:
        match = re.search(rf"(?<![\w-]){re.escape(term)}(?![\w-])", rest)
        if match:
            hits.append((match.start(), CITY))
            rest = _blank(rest, match)
            break
    ordered = []
    for _, zone in sorted(hits):
        if zone not in ordered:
            ordered.append(zone)
    return ordered, _unknown_places(rest)


def _unknown_places(rest: str) -> list[str]:
    """Words after a place preposition that name no zone, metric or time ("Springfield"),
    and numbered places ("zone 7"), in ``rest`` (the text with known places blanked)."""
    unknown = [m.group(0) for m in NUMBERED_PLACE.finditer(rest)]
    for match in re.finditer(
        rf"\b(?:{'|'.join(PLACE_PREPOSITIONS)}) ([a-z][a-z'-]*(?!\w)(?: [a-z][a-z'-]*(?!\w))?)",
        rest,
    ):
        words = match.group(1).split()
        if words[0] == "the":
            after = rest[match.end() :].split()
            words = words[1:] or after[:1]
            if not words or not re.fullmatch(r"[a-z][a-z'-]*", words[0]):
                continue
        head = words[0]
        if head in STOP_AFTER_PREPOSITION or head in MONTH_ABBR or head[0].isdigit():
            continue
        if any(head == p.split()[0] for p in METRIC_TERMS) or head in OTHER_MEASURES:
            continue
        if head in ("terms", "total", "particular", "comparison", "general"):
            continue
        unknown.append(
            head if len(words) == 1 or words[1] in STOP_AFTER_PREPOSITION else " ".join(words)
        )
    return unknown


NUMBERED_PLACE = re.compile(r"\b(?:zone|district|area|sector|ward|region|block) (?:\d+|[a-z])\b")


def closest(word: str, known: Sequence[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(word, list(known), n=n, cutoff=0.0)[:n]


# -------------------------------------------------------------------- quantities

# What is asked about the metrics, most specific first: the first rule that matches wins.
QUANTITY_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (quantity, re.compile(pattern))
    for quantity, pattern in (
        (
            "correlation",
            r"\b(correlat\w*|relationship|related|relate|link(ed|s)?|connection|connected|"
            r"associat\w*|go(es)? together|move(d)? together|track(s|ed)? (with|each other)|"
            r"depend(s|ed)? on|follow(s|ed)? (the )?traffic|affect(s|ed)?|effect of|impact(s|ed)?|"
            r"caus(e|es|ed|ing)|drives|driven by|due to|because of|contribut\w*|explain\w*|"
            r"tracks?|tracked|tracking|mirrors?|mirrored|in step|rise and fall together|"
            r"more \w+ means? (more|less|higher|lower|worse|better))\b",
        ),
        (
            "device_health",
            r"\b(sensors?|devices?|stations?|monitors?|counters?|detectors?|nodes?|equipment|"
            r"hardware)\b.{0,40}\b(broken|faulty|faults?|offline|online|working|down|fail\w*|"
            r"malfunction\w*|problems?|issues?|health\w*|status|errors?|stuck|dead|ok|okay|"
            r"reporting|report in|silent|trouble|drift\w*|defective|glitch\w*|alive|up|stopped|"
            r"disconnected|dropped out|unreachable|lost contact|not sending|gone dark|bad readings|"
            r"flagged|suspicious|implausible)\b"
            r"|\b(how many|number of) (sensors|devices|monitors|stations|counters|detectors)\b"
            r"|\b(broken|faulty|malfunctioning|defective|offline|dead|failing|misbehaving)\b.{0,20}"
            r"\b(sensors?|devices?|stations?|monitors?|counters?|detectors?)\b"
            r"|\bdevice health\b|\bsensor health\b|\bhealth of the (sensors|devices|network)\b"
            r"|\b(status|state|condition|health|uptime)\b.{0,30}\b(sensors?|devices?|stations?|"
            r"monitors?|counters?|detectors?|nodes?)\b",
        ),
        (
            "completeness",
            r"\b(complete(ness)?|coverage|missing (data|readings|values|hours|measurements)|"
            r"data gaps?|gaps? in (the )?(data|readings|record)|how much (of the )?data|"
            r"data availability|availability of (the )?data|uptime|data loss|lost data|"
            r"any gaps|holes in|data quality|how reliable|blanks?|(percentage|share|proportion|"
            r"fraction|percent) of (the )?(expected )?(\w+ )?(readings|data|measurements|"
            r"hours|values)|(data|readings|hours|values|measurements)\b.{0,25}\bmissing|"
            r"missing\b.{0,25}\b(data|readings|hours|values|measurements)|(lose|lost) (any )?"
            r"(data|readings)|(readings|data) (arrived|came in|were received|did we (get|receive))|"
            r"(how many|number of) (readings|measurements|data points|values))"
            r"\b",
        ),
        (
            "busiest_hour",
            r"\b(busiest|heaviest|peak traffic|traffic peak(ed)?|most traffic|most cars|most "
            r"vehicles|worst traffic|rush hour peak|busiest time|heaviest time)\b.{0,20}"
            r"\b(hours?|time|times|moment)\b|\b(what|which) (hours?|time)\b.{0,40}\b(busiest|"
            r"heaviest|most traffic|most cars|most vehicles|peak|most congested)\b|\bwhen\b.{0,30}"
            r"\b(busiest|heaviest|most (traffic|cars|vehicles|congested)|congested|jammed)\b",
        ),
        (
            "exceedance_hours",
            r"\b(how many|number of|count of|total|which|what|more|fewer|most|least)"
            r"(?: [\w.-]+){0,3}? hours?\b.{0,60}\b(above|over|exceed\w*|beyond|breach\w*|"
            r"higher than|more than|past|broke|break|unsafe|unhealthy)"
            r"|\bhours?(?: of [\w.]+)? (above|over|exceed\w*|beyond|in breach|higher than|"
            r"more than)\b|\bexceedance hours?\b|\bhours? (of|in) exceedance\b",
        ),
        (
            "exceedance_days",
            r"\bexceedance days?\b|\b(how many|number of|count of|total|which|what|more|"
            r"fewer) days?\b.{0,60}\b(above|over|"
            r"exceed\w*|beyond|breach\w*|higher than|more than|past|broke|break|unsafe|unhealthy)"
            r"|\bdays? (above|over|exceed\w*|beyond|in breach|higher than|more than)\b"
            r"|\b(exceed\w*|breach\w*|above|over|broke|break|beyond|within|under|below|meet|met|"
            r"comply|complied)\b.{0,30}\b(who|guideline|guidelines|limit|limits|threshold|"
            r"standard|safe level)\b|\b(who|guideline|guidelines|limit|limits|threshold|"
            r"standard|safe level)\b.{0,20}\b(exceeded|breached|broken|crossed|passed)\b",
        ),
        (
            "aqi",
            r"\b(aqi|air quality index|air-quality index|air quality rating|pollution index|"
            r"index|nowcast|air quality category|aqi category)\b",
        ),
        (
            "total",
            r"\b(how many (vehicles|cars|trucks|lorries|buses|motorists)|total (number of )?"
            r"(vehicles|cars|traffic|count)|number of (vehicles|cars)|vehicles counted|"
            r"cars counted|vehicle total|traffic count|counted|(most|fewest|least) (vehicles|"
            r"cars|trucks|lorries))\b",
        ),
        (
            "peak",
            r"\b(highest|peak\w*|max(imum)?|worst (hour|moment|time|reading|level|value)|"
            r"top (reading|value|level)|spike\w*|hottest|warmest|coldest|coolest|most humid|"
            r"biggest|largest|"
            r"record|lowest|minimum|slowest|fastest|when (was|did|were)|at what time|"
            r"what time)\b",
        ),
        (
            "mean",
            r"\b(average|averaged|mean|typical|typically|on average|avg|colder|warmer|hotter|"
            r"cooler|chillier)\b",
        ),
    )
)
# Words that mean the rank's direction in a ranking, not a peak
_RANK_DIRECTION = re.compile(
    r"\b(highest|lowest|worst|best|most|least|hottest|warmest|coldest|coolest|most humid|"
    r"biggest|largest)\b"
)


def find_quantity(text: str, ranking: bool = False) -> str:
    """What ``text`` asks about its metrics (a name from QUANTITIES)."""
    for quantity, pattern in QUANTITY_RULES:
        match = pattern.search(text)
        if match is None:
            continue
        if ranking and quantity == "peak" and _RANK_DIRECTION.fullmatch(match.group(0)):
            rest = pattern.search(text, match.end())
            if rest is None:
                continue
        return quantity
    return "summary"


def _metrics_for(quantity: str, named: list[str], text: str) -> list[str]:
    """The metrics a question asks about, given what it asks and what it names."""
    if quantity == "correlation":
        return _correlation_metrics(named)
    if quantity in ("busiest_hour", "total") and not named:
        return ["vehicle_count"]
    if quantity in ("busiest_hour", "total") and set(named) >= set(TRAFFIC_METRICS):
        return ["vehicle_count"]
    if quantity in ("aqi", "exceedance_hours", "exceedance_days") and (
        not named or set(named) == set(MEASURED_METRICS)
    ):
        return list(AIR_METRICS)
    if quantity == "aqi":
        air = [m for m in named if m in AIR_METRICS]
        return air or list(AIR_METRICS)
    return named or list(REPORT_METRICS)


def _correlation_metrics(named: list[str]) -> list[str]:
    traffic = [m for m in named if m in TRAFFIC_METRICS or m == "occupancy"]
    air = [m for m in named if m in AIR_METRICS]
    weather = [m for m in named if m in WEATHER_METRICS]
    if set(air) == set(AIR_METRICS):  # "pollution", "air quality": the traffic pollutant
        air = ["no2"]
    if set(traffic) == set(TRAFFIC_METRICS):
        traffic = ["vehicle_count"]
    if not traffic and not weather and len(air) < 2:
        traffic = ["vehicle_count"]
    if not air and not weather:
        air = ["no2"]
    chosen = set(traffic + air + weather)
    return [m for m in MEASURED_METRICS if m in chosen]


# ------------------------------------------------------------------------ screens


def _screen(text: str) -> None:
    """Refuse instructions and writes, and rule out forecasts and other subjects."""
    if CREDENTIALS.search(text):
        raise IntentError(
            "refused",
            "civicmesh does not give out passwords, keys or other credentials. Ask about "
            "measured data, e.g. 'PM2.5 in the city yesterday'.",
        )
    if INJECTION.search(text):
        raise IntentError(
            "refused",
            "The question contains instructions to the system. Ask about air quality or "
            "traffic in a zone or the city over a period, e.g. 'NO2 in harbour last week'.",
        )
    if WRITE.search(text):
        raise IntentError(
            "refused",
            "This service only reads measured data; it does not change, add or delete "
            "anything. Ask about a measurement, e.g. 'PM2.5 in the city yesterday'.",
        )
    if FORECAST.search(text):
        raise IntentError(
            "out_of_scope",
            "civicmesh reports on measured data only; it does not forecast. Ask about a "
            "past period, e.g. 'PM2.5 in the city yesterday'.",
        )


def _checked_text(question: str) -> str:
    text = _norm(question)
    if not text:
        raise IntentError("out_of_scope", "The question is empty.")
    if len(text) > 500:
        raise IntentError("out_of_scope", "The question is too long (500 characters at most).")
    _screen(text)
    return text


_OUT_OF_SCOPE = (
    "This service answers questions about measured air quality, traffic and weather, e.g. "
    "'How was NO2 in harbour last week?'"
)


def _check_subject(text: str, metrics: list[str], places: list[str], ranking: bool) -> None:
    other = _unknown_measure(text)
    if other and not metrics:
        raise IntentError(
            "unknown_metric",
            f"civicmesh does not measure {other!r}. Known: {', '.join(MEASURED_METRICS)}.",
            closest(other, MEASURED_METRICS),
        )
    if OTHER_WORK.search(text) or (OTHER_TASK.search(text) and not metrics):
        raise IntentError("out_of_scope", _OUT_OF_SCOPE)
    quantity = find_quantity(text, ranking)
    domain = bool(metrics or places or ranking or quantity != "summary")
    if not (domain or any(_has(text, w) for w in DOMAIN_WORDS)):
        raise IntentError("out_of_scope", _OUT_OF_SCOPE)


def _future(found: Sequence[Found], clock: Clock) -> None:
    now_ms = int(clock.now.timestamp() * 1000)
    for item in found:
        if item.period.start_ms >= now_ms:
            raise IntentError(
                "out_of_scope",
                f"{item.period.label!r} has not happened yet, and civicmesh does not forecast. "
                "Ask about a past period.",
            )


# ------------------------------------------------------------------------ parse


def parse_question(question: str, zones: Sequence[str], now: datetime) -> Intent:
    """The intent of ``question`` by fixed rules; IntentError when there is none."""
    text = _checked_text(question)
    clock = Clock(now)
    metrics, _ = find_metrics(without_other_measures(text))
    found = find_periods(text, clock)
    # the words of a period ("the first week of ...", "at noon") are no place
    places, unknown_places = find_places(_without_periods(text, found), zones)
    ranking = RANK.search(text) is not None
    _check_subject(text, metrics, places, ranking)
    _future(found, clock)
    if unknown_places and not ranking and (not places or _compares_places(text)):
        word = unknown_places[0]
        raise IntentError(
            "unknown_place",
            f"Unknown place {word!r}. Known places: {', '.join(sorted(zones))}, or the city.",
            closest(word, [*zones, CITY]),
        )
    intent = _assemble(text, metrics, places, found, clock, ranking, "deterministic", zones)
    taken = tuple(f"I read {word!r} as {zone}" for word, zone in place_aliases(text, zones))
    other = _unknown_measure(text)  # beside a measured metric: answered, and said
    left_out = (f"civicmesh does not measure {other!r}; left out",) if other else ()
    notes = taken + left_out
    return replace(intent, notes=notes + intent.notes) if notes else intent


def _without_periods(text: str, found: Sequence[Found]) -> str:
    for item in found:
        width = item.end - item.at
        text = text[: item.at] + "time".ljust(width)[:width] + text[item.end :]
    return text


def _compares_places(text: str) -> bool:
    """Two places asked side by side: an unknown one cannot be left out silently."""
    return re.search(r"\b(compare\w*|versus|vs\.?|than|between|and)\b", text) is not None


# "the week before": the 7 days before the period it follows
BEFORE = re.compile(
    rf"\b(?:the|a) (week|day|month|fortnight|weekend|period|year|{'|'.join(WEEKDAY_NAMES)}) "
    r"(?:before|prior|earlier)(?! last| yesterday)\b"
    r"|\bthe (?:previous|preceding|prior) (week|day|month|period|weekend|fortnight|year)\b"
    # "this week compared to last": the unit is the asked period's
    r"|\b(?:compared (?:to|with)|than|versus|vs\.?|against) (?:the )?(?:last|previous|prior|before)"
    r"(?P<bare>)(?! ?(?:week|month|day|year|weekend|night|fortnight|time|\d|"
    rf"{'|'.join(WEEKDAY_NAMES)}))\b"
)
# the unit a period's rule names, for "compared to last" and "the previous one"
_RULE_UNITS = {
    "this_week": "week",
    "last_week": "week",
    "week_of": "week",
    "past_week": "week",
    "the_week": "week",
    "week_before_last": "week",
    "this_month": "month",
    "last_month": "month",
    "month": "month",
    "month_so_far": "month",
    "past_month": "month",
    "last_weekend": "weekend",
    "this_weekend": "weekend",
    "weekday": "weekend",  # "Saturday compared to last": the same day a week before
    "fortnight": "fortnight",
    "year": "year",
    "yesterday": "day",
    "today": "day",
}
CHANGE = re.compile(
    r"\b(improv\w*|chang\w*|better|worse|worsen\w*|gone (up|down)|go (up|down)|went (up|down)|"
    r"ris(en|e)|rose|fall(en)?|fell|dropp?(ed)?|increas\w*|decreas\w*|differ\w*|declin\w*|"
    r"grow(n)?|grew|shift\w*)\b"
)
_BEFORE_DAYS = {"week": 7, "day": 1, "fortnight": 14, "weekend": 7, "year": 365}
_BEFORE_DAYS.update({name: 7 for name in WEEKDAY_NAMES})


def _month_back(when: datetime, clock: Clock) -> datetime:
    """The same day and time a calendar month earlier (the month's last day at most)."""
    first = (when.date().replace(day=1) - DAY).replace(day=1)
    day = first
    while day.month == first.month and day.day < when.day:
        day += DAY
    if day.month != first.month:
        day -= DAY
    return clock.midnight(day) + (when - clock.midnight(when.date()))


def _before(asked: Period, unit: str, clock: Clock) -> Period:
    """The period one ``unit`` before ``asked``, like for like: a period of at most one
    unit (this week so far, a weekend, a day) moves back by the unit and keeps its length,
    so "this week so far" is compared with the same days and hours of the week before; a
    longer one is compared with the unit before it."""
    start = datetime.fromtimestamp(asked.start_ms / 1000, clock.tz)
    end = datetime.fromtimestamp(asked.end_ms / 1000, clock.tz)
    if unit == "period" or (unit not in _BEFORE_DAYS and unit != "month"):
        return replace(previous_period(asked), days=asked.days, hours=asked.hours)
    if unit == "month":
        lo, hi = _month_back(start, clock), _month_back(end, clock)
    else:
        span = timedelta(days=_BEFORE_DAYS[unit])
        if end - start <= span + timedelta(hours=1):  # a DST day is 25 hours
            lo = (start - span).replace(tzinfo=None).replace(tzinfo=clock.tz)
            hi = (end - span).replace(tzinfo=None).replace(tzinfo=clock.tz)
        else:
            lo, hi = start - span, start
    before = clock.period(lo, hi, f"the {unit} before")
    return replace(before, days=asked.days, hours=asked.hours)


def like_for_like(asked: Period, reference: Period, clock: Clock) -> Period:
    """A reference longer than an asked period that is still running ("this week so far"
    against "last week") is cut to the same length from its start: the same days and
    hours of both, not 3 days against 7."""
    now_ms = int(clock.now.timestamp() * 1000)
    length = asked.end_ms - asked.start_ms
    if asked.end_ms < now_ms or reference.end_ms > asked.start_ms:
        return reference
    if reference.end_ms - reference.start_ms <= length:
        return reference
    start = datetime.fromtimestamp(reference.start_ms / 1000, clock.tz)
    cut = clock.period(start, start + timedelta(milliseconds=length), reference.label)
    return replace(reference, end_ms=cut.end_ms, label=f"{reference.label} (same length)")


@dataclass(frozen=True, slots=True)
class TimeFrame:
    asked: Period
    reference: Period | None
    notes: tuple[str, ...] = ()


def time_frame(
    text: str, found: Sequence[Found], clock: Clock, periods_compared: bool = True
) -> TimeFrame:
    """The asked period (with its filters) and the reference period, if any (never
    when ``periods_compared`` is false: the question compares places)."""
    before = BEFORE.search(text)
    days = find_days(text)
    found = _periods_asked(found, before, days)
    found, hour_of = _fold_hours(found, clock)
    hours = hour_of or find_hours(text, clock, [(f.at, f.end) for f in found])
    notes: list[str] = []
    if found:
        base = found[0].period
    elif before is not None and _unit(before, found) in _BEFORE_DAYS:
        # "compared with the week before": the last 7 days against the 7 before them
        length = _BEFORE_DAYS[_unit(before, found)]
        base = clock.period(clock.now - length * DAY, clock.now, f"the last {length} days")
        notes.append(f"no period named: the last {length} days")
    else:
        base, note = _default_period(clock, bool(days or hours))
        notes.append(note)
    if len(days) >= 2:  # weekdays against weekends, over the same period
        asked = with_filters(base, clock, days[0], hours)
        return TimeFrame(asked, with_filters(base, clock, days[1], hours), tuple(notes))
    day = days[0] if days else None
    if periods_compared:
        asked, reference = _pair(text, found, base, clock, before)
    else:
        asked, reference = base, None
    asked = with_filters(asked, clock, day, hours)
    if reference is not None:
        reference = with_filters(reference, clock, day, hours)
    return TimeFrame(asked, reference, tuple(notes))


# Periods that are only the words of a filter when another period or filter is named
_FILTER_WORDS = {"overnight": "period", "this_weekend": "days", "the_week": "days"}


def _periods_asked(
    found: Sequence[Found], before: re.Match[str] | None, days: Sequence[str]
) -> list[Found]:
    """The periods the question asks about: not those inside "the week before", not
    "overnight" beside a month (a filter), nor "the weekend" and "the week" when they
    are weekends against weekdays."""
    out = [f for f in found if not (before and f.at < before.end() and f.end > before.start())]
    drop = {r for r, why in _FILTER_WORDS.items() if why == "days" and len(days) >= 2}
    if len(out) > 1:
        drop.add("overnight")
    return [f for f in out if f.rule not in drop]


def _fold_hours(found: Sequence[Found], clock: Clock) -> tuple[list[Found], tuple[int, int] | None]:
    """ "at 8am this morning": the hour narrows the day it is said with."""
    hours = [f for f in found if f.rule == "at_hour"]
    rest = [f for f in found if f.rule != "at_hour"]
    if not hours or not rest:
        return list(found), None
    hour = datetime.fromtimestamp(hours[0].period.start_ms / 1000, clock.tz).hour
    return rest, (hour, hour + 1)


def _default_period(clock: Clock, filtered: bool) -> tuple[Period, str]:
    now_ms = int(clock.now.timestamp() * 1000)
    if filtered:  # "weekday mornings": a day or two would hold too few of them
        period = Period(now_ms - 7 * 86_400_000, now_ms, "the last 7 days")
        return period, "no period named: the last 7 days"
    period = Period(now_ms - 86_400_000, now_ms, "the last 24 hours")
    return period, "no period named: the last 24 hours"


def _pair(
    text: str,
    found: Sequence[Found],
    base: Period,
    clock: Clock,
    before: re.Match[str] | None,
) -> tuple[Period, Period | None]:
    """(asked, reference): the reference is None when nothing is compared."""
    if before is not None:
        return base, _before(base, _unit(before, found), clock)
    compare = COMPARE_PERIOD.search(text)
    if len(found) >= 2:
        if compare is not None and compare.start() < found[0].at:
            asked, reference = found[1].period, found[0].period  # "compared with X, Y"
        else:
            asked, reference = found[0].period, found[1].period
        return asked, like_for_like(asked, reference, clock)
    if not found:
        return base, None
    first = found[0]
    if first.since and CHANGE.search(text):
        # "has it improved since last week": that week against the time after it
        reference = _unsince(first, clock)
        now = clock.now
        start = datetime.fromtimestamp(reference.end_ms / 1000, clock.tz)
        asked = clock.period(start, now, f"after {reference.label}")
        return asked, like_for_like(asked, reference, clock)
    if compare is None:
        return base, None
    if compare.start() < first.at:  # "compared with last week": that is the reference
        asked = following_period(first.period, clock)
        return asked, like_for_like(asked, first.period, clock)
    return base, previous_period(base)


def _unit(before: re.Match[str], found: Sequence[Found]) -> str:
    """The unit of "the week before", or of the asked period for "compared to last"."""
    named = before.group(1) or before.group(2)
    if named:
        return named
    return _RULE_UNITS.get(found[0].rule, "period") if found else "week"


def _unsince(item: Found, clock: Clock) -> Period:
    """The period a "since X" started from, as X alone."""
    label = item.period.label.removeprefix("since ").strip()
    for other in find_periods(label, clock):
        return other.period
    return previous_period(item.period)


def following_period(period: Period, clock: Clock) -> Period:
    length = period.end_ms - period.start_ms
    end = min(period.end_ms + length, int(clock.now.timestamp() * 1000))
    return Period(period.end_ms, end, "the period after")


def previous_period(period: Period) -> Period:
    length = period.end_ms - period.start_ms
    return Period(period.start_ms - length, period.start_ms, "the period before")


def _assemble(
    text: str,
    metrics: list[str],
    places: list[str],
    found: Sequence[Found],
    clock: Clock,
    ranking: bool,
    parser: str,
    zones: Sequence[str],
) -> Intent:
    quantity = find_quantity(text, ranking)
    if ranking and quantity == "summary" and _ranks_a_metric(text, metrics):
        quantity = "mean"  # "which zone had the lowest NO2": zones ranked by their means
    metrics = _metrics_for(quantity, metrics, text)
    frame = time_frame(text, found, clock, periods_compared=not ranking and len(places) < 2)
    notes = list(frame.notes)
    kind, chosen_places, periods = _shape(frame, places, ranking, zones, clock)
    for period in periods:
        if period.end_ms <= period.start_ms:
            raise IntentError(
                "out_of_scope",
                f"{period.label!r} is an empty period (it has not begun yet). Ask about a "
                "past period.",
            )
    if not places and not ranking and parser == "deterministic":
        notes.append("no place named: the whole city")
    return Intent(
        kind, tuple(metrics), tuple(chosen_places), periods, parser, tuple(notes), quantity
    )


def _ranks_a_metric(text: str, named: Sequence[str]) -> bool:
    """A direction word ("highest", "coldest") over named metrics, not the air or the
    traffic as a whole ("the cleanest air" ranks the air's summary)."""
    if not named or set(named) in (set(AIR_METRICS), set(TRAFFIC_METRICS)):
        return False
    return _RANK_DIRECTION.search(text) is not None


def _shape(
    frame: TimeFrame, places: list[str], ranking: bool, zones: Sequence[str], clock: Clock
) -> tuple[str, list[str], tuple[Period, ...]]:
    if ranking:
        return "rank", list(zones), (frame.asked,)
    places = places or [CITY]
    if len(places) >= 2:
        return "compare_places", places, (frame.asked,)
    if frame.reference is not None:
        return "compare_periods", places, (frame.asked, frame.reference)
    return "summary", places, (frame.asked,)


Parse = Callable[[str], Intent]


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
            "metrics": {"type": "array", "items": {"enum": list(MEASURED_METRICS)}, "maxItems": 3},
            "places": {"type": "array", "items": words, "maxItems": 2},
            "time": words,
            "compare": {"type": "boolean"},
        },
        "required": ["metrics", "places", "time", "compare"],
    }


def llm_intent(question: str, zones: Sequence[str], now: datetime, llm: LlmBackend) -> Intent:
    """The model's intent, every part checked against the question; IntentError or
    LlmError when it cannot be used (the caller then parses deterministically)."""
    # the same screens as the parser, first: a question they stop never reaches the model
    deterministic = parse_question(question, zones, now)
    text = _norm(question)
    answer = llm.complete_json(
        INTENT_SYSTEM, f"Question: {question.strip()[:500]}", intent_schema(), 120
    )
    if not isinstance(answer, dict):
        raise LlmError("the intent is not a JSON object")
    clock = Clock(now)
    metrics = [m for m in answer.get("metrics", []) if m in MEASURED_METRICS]
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
    periods: list[Found] = []
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
    # what is asked and the hour and weekday filters come from the fixed rules
    return replace(intent, quantity=deterministic.quantity)
