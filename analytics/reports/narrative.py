"""Prose from a fact sheet, with every number put there by code and checked afterwards.

The text is made of *topics*: a topic is a sentence template over fact ids ("Mean PM2.5
was {pm25.mean}, {pm25.change_direction} {pm25.change_pct} on the previous period").
The language model only chooses which topics to tell and in what order, and writes a
short lead-in for each and a closing line, under a JSON schema whose strings cannot hold
digits. It never sees a number, a place name or anything a device or operator typed: the
prompt names topics by id and describes them in words fixed here.

Whatever the source, the finished text goes through :func:`check_numbers`: every number
in it must be one the fact sheet states. If the model's plan is unusable or the check
fails, the deterministic narrative (all topics in a fixed order, no lead-ins) is
returned, and the result says so and why.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from analytics.reports.facts import LABELS, FactSheet, format_number
from analytics.reports.llm import LlmBackend, LlmError, LlmTimeout

log = logging.getLogger(__name__)

PROMPT_VERSION = "narrative-1"
MAX_TOPICS = 6
MIN_TOPICS = 3
# {"id": "traffic.weekend", "lead": "In addition"}, is about 20 tokens: the budget stops
# a model that repeats itself instead of closing the list.
TOKENS_PER_TOPIC = 22
OFFERED_TOPICS = 10
# The connecting words the model may put before a topic's sentence. A fixed choice: a
# 135M-parameter model writing free text between facts produced word salad.
LEADS = (
    "",
    "Meanwhile",
    "In addition",
    "Notably",
    "Of concern",
    "On the roads",
    "By contrast",
    "Overall",
    "As for the data",
    "At the same time",
)
# Numbers the fixed templates state themselves (the guideline edition).
TEMPLATE_NUMBERS = ("2021",)
# {fact.id} is the fact with its unit, {fact.id:n} the bare number.
_PLACEHOLDER = re.compile(r"\{([a-z0-9_.]+)(:n)?\}")
# Numbers written as words are numbers too: a lead-in holding one is refused.
NUMBER_WORDS = frozenset(
    [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
        "nineteen",
        "twenty",
        "thirty",
        "forty",
        "fifty",
        "sixty",
        "seventy",
        "eighty",
        "ninety",
        "hundred",
        "thousand",
        "million",
        "billion",
        "half",
        "double",
        "twice",
        "triple",
        "thrice",
        "dozen",
        "percent",
        "quarter",
        "third",
    ]
)


class NarrativeError(Exception):
    """A text states a number its fact sheet does not."""


@dataclass(frozen=True, slots=True)
class Topic:
    id: str
    hint: str  # what the topic says, in words, for the model (no numbers, no names)
    template: str  # the sentence, with {fact.id} placeholders
    needs: tuple[str, ...]  # facts that must exist for the topic to be told


def _t(topic_id: str, hint: str, template: str, *optional: str) -> Topic:
    needs = tuple(sorted({m[0] for m in _PLACEHOLDER.findall(template)} - set(optional)))
    return Topic(topic_id, hint, template, needs)


def _air_topics(sheet: FactSheet, metric: str) -> list[Topic]:
    topics: list[Topic] = []
    name = LABELS[metric]
    name_cap = name[0].upper() + name[1:]
    change = (
        f", {{{metric}.change_direction}} by {{{metric}.change_pct}} on the previous period"
        if f"{metric}.change_pct" in sheet
        else ""
    )
    topics.append(
        _t(
            f"{metric}.level",
            f"average {name} level{' and its change' if change else ''}",
            f"{name_cap} averaged {{{metric}.mean}}{change}.",
        )
    )
    topics.append(
        _t(
            f"{metric}.who",
            f"days when {name} was above the WHO guideline",
            f"{name_cap} was above the WHO 2021 guideline of {{{metric}.who_guideline}} on "
            f"{{{metric}.who_exceedance_days:n}} of {{{metric}.who_days}}.",
        )
    )
    topics.append(
        _t(
            f"{metric}.peak",
            f"the highest hour of {name}",
            f"The highest hourly {name} was {{{metric}.peak_hour}}, on "
            f"{{{metric}.peak_hour.time}}.",
        )
    )
    topics.append(
        _t(
            f"{metric}.eaqi",
            f"hours when {name} was rated poor by the European air quality index",
            f"For {{{metric}.eaqi_hours.poor_or_worse}}, {name} was rated Poor or worse "
            "by the European AQI.",
        )
    )
    topics.append(
        _t(
            f"{metric}.weekdays",
            f"which weekday had the most and least {name}",
            f"{name_cap} was highest on {{{metric}.weekday_high}}s "
            f"({{{metric}.weekday_high.mean}}) and lowest on {{{metric}.weekday_low}}s "
            f"({{{metric}.weekday_low.mean}}).",
        )
    )
    return topics


def _traffic_volume_topic(sheet: FactSheet) -> Topic:
    return (
        _t(
            "traffic.volume",
            "how much traffic was counted and its busiest hour",
            "Counters recorded {vehicle_count.total}, busiest around "
            "{vehicle_count.busiest_hour_of_day}.",
            "vehicle_count.busiest_hour_of_day",
        )
        if "vehicle_count.busiest_hour_of_day" in sheet
        else _t(
            "traffic.volume",
            "how much traffic was counted",
            "Counters recorded {vehicle_count.total}.",
        )
    )


def topics_for(sheet: FactSheet) -> list[Topic]:
    """The topics this sheet has the facts for, most important first."""
    candidates: list[Topic] = []
    for metric in ("pm25", "pm10", "no2", "o3", "co"):
        candidates += _air_topics(sheet, metric)
    candidates += [
        _t(
            "aqi.worst",
            "the worst day by the air quality index",
            "The worst day was {aqi.worst_day.date}, with a US AQI of {aqi.worst_day} "
            "({aqi.worst_day.category}, set by {aqi.worst_day.pollutant}).",
        ),
        _traffic_volume_topic(sheet),
        _t(
            "traffic.change",
            "the change in traffic volume",
            "Traffic was {vehicle_count.change_direction} by {vehicle_count.change_pct} on the "
            "previous period.",
        ),
        _t(
            "traffic.weekend",
            "traffic on working days against weekends",
            "Counting windows held {vehicle_count.workday_mean} on working days and "
            "{vehicle_count.weekend_mean} at weekends.",
        ),
        _t(
            "traffic.speed",
            "average traffic speed and its slowest hour",
            "Traffic moved at {mean_speed.mean} on average, slowest at "
            "{mean_speed.lowest_hour} in the worst hour.",
        ),
        _t(
            "traffic.no2",
            "how closely traffic and nitrogen dioxide moved together",
            "Hourly traffic and NO2 had a correlation of r = {traffic_no2.r} over "
            "{traffic_no2.hours}.",
        ),
        _t(
            "data.completeness",
            "how complete the data was",
            "Data completeness was {completeness.pct}, with {devices.reporting:n} of "
            "{devices.registered:n} registered devices reporting.",
        ),
        _t(
            "data.faults",
            "devices with faults or gaps",
            "Devices with fault-flagged readings or quarantined batches: {devices.faulty:n}; "
            "devices with gaps in their data: {devices.low_completeness:n}.",
        ),
    ]
    available = [t for t in candidates if all(n in sheet for n in t.needs)]
    scored = [(score, t) for t in available if (score := _importance(t.id, sheet)) > 0]
    return [t for _, t in sorted(scored, key=lambda pair: -pair[0])]


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def answer_topics(sheet: FactSheet) -> dict[str, Topic]:
    """Every topic an answer may be asked to state, by id, whether or not a report would
    choose it: the report topics, and what the asked quantity needs."""
    candidates = {t.id: t for t in topics_for(sheet)}
    for metric in sheet.metrics:
        name = LABELS[metric]
        mean = "vehicle_count.mean" if metric == "vehicle_count" else f"{metric}.mean"
        extra = [
            _t(f"{metric}.level", f"average {name}", f"Mean {name} was {{{mean}}}."),
            _t(
                f"{metric}.peak",
                f"the highest hour of {name}",
                f"The highest hourly {name} was {{{metric}.peak_hour}}, on "
                f"{{{metric}.peak_hour.time}}.",
            ),
            _t(
                f"{metric}.who_hours",
                f"hours above the WHO guideline for {name}",
                f"{_cap(name)} was above the WHO 2021 guideline level of "
                f"{{{metric}.who_guideline}} in {{{metric}.hours_above_who:n}} of "
                f"{{{metric}.hours}} with data.",
            ),
            _t(
                f"{metric}.who",
                f"days above the WHO guideline for {name}",
                f"{_cap(name)} was above the WHO 2021 guideline of {{{metric}.who_guideline}} "
                f"on {{{metric}.who_exceedance_days:n}} of {{{metric}.who_days}} with enough data.",
            ),
        ]
        for topic in extra:
            if topic.id not in candidates or topic.id.endswith(".who"):
                candidates[topic.id] = topic
    for topic in _quantity_topics(sheet):
        candidates[topic.id] = topic
    return {i: t for i, t in candidates.items() if all(n in sheet for n in t.needs)}


def _quantity_topics(sheet: FactSheet) -> list[Topic]:
    topics = [
        _t(
            "aqi.now",
            "the current air quality index",
            "The current US AQI (EPA NowCast, table {aqi.now.table}) is {aqi.now:n}: "
            "{aqi.now.category}, set by {aqi.now.pollutant}.",
        ),
        _t(
            "aqi.days_rated",
            "the daily air quality index of the period",
            "The daily US AQI was rated on {aqi.days}; the highest was {aqi.worst_day:n} "
            "({aqi.worst_day.category}, set by {aqi.worst_day.pollutant}) on "
            "{aqi.worst_day.date}.",
        ),
        _t(
            "traffic.busiest",
            "the busiest hour of traffic",
            "The busiest hour was {vehicle_count.peak_hour.time}, with {vehicle_count.peak_hour}.",
        ),
        _t(
            "traffic.busiest_hour_of_day",
            "the busiest hour of the day on average",
            "On average the busiest hour of the day was {vehicle_count.busiest_hour_of_day}.",
        ),
        _t(
            "traffic.total",
            "how much traffic was counted",
            "Counters recorded {vehicle_count.total}.",
        ),
        _t(
            "data.coverage",
            "how many hours have data",
            "Data for {coverage.hours:n} of {coverage.hours_expected}.",
        ),
        _t(
            "data.devices",
            "which devices reported and which had faults",
            "Of {devices.registered:n} registered devices, {devices.reporting:n} reported; "
            "{devices.faulty:n} had fault-flagged readings or quarantined batches and "
            "{devices.low_completeness:n} had gaps in their data.",
        ),
    ]
    return topics + _listed_topics(sheet)


_BASE = {"pm25": 50, "no2": 45, "pm10": 40, "o3": 35, "co": 30}


def _listed_topics(sheet: FactSheet) -> list[Topic]:
    """Topics whose number of facts varies: exceedance dates, devices, correlations."""
    topics: list[Topic] = []
    for metric in sheet.metrics:
        dates = [f.id for f in sheet.facts if f.id.startswith(f"{metric}.who_exceedance_day.")]
        if dates:
            listed = ", ".join(f"{{{i}}}" for i in dates[:-1])
            listed = f"{listed} and {{{dates[-1]}}}" if listed else f"{{{dates[-1]}}}"
            topics.append(
                _t(
                    f"{metric}.who_dates",
                    f"the days {LABELS[metric]} was above the WHO guideline",
                    f"{_cap(LABELS[metric])} was above the WHO 2021 guideline of "
                    f"{{{metric}.who_guideline}} on {listed} "
                    f"({{{metric}.who_exceedance_days:n}} of {{{metric}.who_days}}).",
                )
            )
    faulty = [f.id for f in sheet.facts if re.fullmatch(r"devices\.faulty\.\d+", f.id)]
    gaps = [f.id for f in sheet.facts if re.fullmatch(r"devices\.low_completeness\.\d+", f.id)]
    if faulty:
        names = ", ".join(f"{{{i}}}" for i in faulty[:6])
        topics.append(
            _t("data.faulty_list", "the devices with faults", f"Devices with faults: {names}.")
        )
    if gaps:
        names = ", ".join(f"{{{i}}}" for i in gaps[:6])
        topics.append(_t("data.gaps_list", "the devices with gaps", f"Devices with gaps: {names}."))
    gap_ids = [f.id for f in sheet.facts if re.fullmatch(r"devices\.gap\.\d+", f.id)]
    if gap_ids:
        names = ", ".join(f"{{{i}}} ({{{i}.pct}} of its data)" for i in gap_ids)
        topics.append(
            _t("data.gap_devices", "devices with gaps in their data", f"Data gaps: {names}.")
        )
    for fact in sheet.facts:
        m = re.fullmatch(r"corr\.(\w+)\.(\w+)\.r", fact.id)
        if m:
            a, b = m.groups()
            key = f"corr.{a}.{b}"
            topics.append(
                _t(
                    key,
                    "how closely two measurements moved together",
                    f"Hourly {LABELS[a]} and {LABELS[b]} had a Pearson correlation of "
                    f"r = {{{key}.r}} over {{{key}.hours}}: {{{key}.strength}} relationship.",
                )
            )
    return topics


def _value(sheet: FactSheet, fact_id: str) -> float:
    fact = sheet.get(fact_id)
    return float(fact.value) if fact is not None and not isinstance(fact.value, str) else 0.0


def _importance(topic_id: str, sheet: FactSheet) -> float:
    """How much a reader needs this topic (0: leave it out); fixed rules, no model."""
    subject, _, aspect = topic_id.partition(".")
    if subject in _BASE:
        exceeded = _value(sheet, f"{subject}.who_exceedance_days") > 0
        return {
            "level": _BASE[subject] + (20 if exceeded else 0),
            "who": 60 + _BASE[subject] / 10 if exceeded else 0,
            "peak": _BASE[subject] / 2,
            "eaqi": 52.0 if _value(sheet, f"{subject}.eaqi_hours.poor_or_worse") > 0 else 0.0,
            "weekdays": _BASE[subject] / 4,
        }[aspect]
    return {
        "aqi.worst": 55.0,
        "traffic.volume": 42.0,
        "traffic.change": 20.0 + (20.0 if _value(sheet, "vehicle_count.change_pct") > 10 else 0),
        "traffic.speed": 30.0,
        "traffic.no2": 36.0 if abs(_value(sheet, "traffic_no2.r")) >= 0.3 else 8.0,
        "traffic.weekend": 16.0,
        "data.completeness": 38.0 if _value(sheet, "completeness.pct") < 90 else 22.0,
        "data.faults": 48.0
        if _value(sheet, "devices.faulty") + _value(sheet, "devices.low_completeness") > 0
        else 0.0,
    }[topic_id]


def render_topic(topic: Topic, sheet: FactSheet) -> str:
    def fill(match: re.Match[str]) -> str:
        fact = sheet.get(match.group(1))
        if fact is None:  # topics_for keeps only topics whose facts exist
            raise NarrativeError(f"topic {topic.id} needs fact {match.group(1)}")
        if match.group(2) and not isinstance(fact.value, str):
            return format_number(fact.value, fact.decimals)
        return fact.text

    return _PLACEHOLDER.sub(fill, topic.template)


def title(sheet: FactSheet, kind: str = "Summary") -> str:
    where = "the city" if sheet.zone is None else sheet.scope
    return f"{kind} for {where}, {sheet.period_text()}"


# ------------------------------------------------------------------------ checking


_UNITS = (
    "%",
    "µg/m³",
    "mg/m³",
    "km/h",
    "vehicles per window",
    "vehicles",
    "days",
    "day",
    "hours",
    "hour",
    "devices",
    "device",
    "readings",
    "batches",
    "AQI",
)
# A number and the unit right after it: "31%" is not "31 days", nor a bare "31".
_NUMBER_WITH_UNIT = re.compile(
    r"(?<![A-Za-z\d.])(\d+(?:[.,:]\d+)*)(?:\s?("
    + "|".join(re.escape(u) for u in sorted(_UNITS, key=len, reverse=True))
    + r")(?![A-Za-z]))?"
)


def _stated(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2) or "") for m in _NUMBER_WITH_UNIT.finditer(text)]


def allowed_numbers(sheet: FactSheet, extra: Sequence[str] = ()) -> set[tuple[str, str]]:
    texts = [f.text for f in sheet.facts]
    texts += [sheet.period_text(), sheet.scope, *TEMPLATE_NUMBERS, *extra]
    allowed = {pair for text in texts for pair in _stated(text)}
    # {fact:n} states a fact's number without its unit
    for fact in sheet.facts:
        if not isinstance(fact.value, str):
            allowed.add((format_number(fact.value, fact.decimals), ""))
    return allowed


def check_numbers(text: str, sheet: FactSheet, extra: Sequence[str] = ()) -> list[str]:
    """The numbers in ``text`` (with the unit that follows each) that the fact sheet does
    not state; empty when every one matches a fact."""
    allowed = allowed_numbers(sheet, extra)
    return [f"{n} {u}".strip() for n, u in _stated(text) if (n, u) not in allowed]


def lead_problem(lead: str) -> str | None:
    """Why a model-written lead-in cannot be used, or None."""
    if lead not in LEADS:
        return f"the lead-in {lead[:40]!r} is not one of the allowed connecting words"
    words = {w.lower() for w in re.findall(r"[A-Za-z]+", lead)}
    found = sorted(words & NUMBER_WORDS)
    if found:
        return f"a lead-in states a number in words ({found[0]!r})"
    return None


# ----------------------------------------------------------------------- narrating


@dataclass(frozen=True, slots=True)
class Narrative:
    text: str
    source: str  # "llm" or "deterministic"
    topics: tuple[str, ...]
    facts_used: tuple[str, ...]
    model: str | None
    prompt_version: str
    fallback_reason: str | None = None
    llm_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "model": self.model,
            "prompt_version": self.prompt_version,
            "fallback_reason": self.fallback_reason,
            "topics": list(self.topics),
            "facts_used": list(self.facts_used),
            "llm_seconds": self.llm_seconds,
        }


def plan_schema(
    topic_ids: Sequence[str], max_items: int = MAX_TOPICS, min_items: int = 1
) -> dict[str, Any]:
    lead = {"enum": list(LEADS)}
    return {
        "type": "object",
        "properties": {
            "topics": {
                "type": "array",
                "minItems": max(1, min(min_items, len(topic_ids), max_items)),
                "maxItems": max(1, min(max_items, len(topic_ids))),
                "items": {
                    "type": "object",
                    "properties": {"id": {"enum": list(topic_ids)}, "lead": lead},
                    "required": ["id", "lead"],
                },
            },
        },
        "required": ["topics"],
    }


SYSTEM_PROMPT = (
    "You plan short air-quality and traffic summaries for city staff. You are given "
    "topics by id with a description. Choose the most useful topics for the reader, most "
    "important first, and pick for each a lead-in from the allowed connecting words. "
    "Never write numbers: the figures are filled in later. Answer with JSON only."
)


def _prompt(topics: Sequence[Topic], sheet: FactSheet, focus: str) -> str:
    where = "the whole city" if sheet.zone is None else "one district"
    lines = [f"Summary of {where} for {focus}.", "Topics:"]
    lines += [f"- {t.id}: {t.hint}" for t in topics]
    return "\n".join(lines)


def deterministic(
    sheet: FactSheet,
    topics: Sequence[Topic],
    heading: str,
    reason: str | None,
    model: str | None = None,
    limit: int | None = None,
) -> Narrative:
    chosen = list(topics)[:limit] if limit else list(topics)
    body = " ".join(render_topic(t, sheet) for t in chosen)
    text = f"{heading}. {body}" if body else f"{heading}. No data in this period."
    bad = check_numbers(text, sheet)
    if bad:  # our own templates: a bug, never hidden
        raise NarrativeError(f"deterministic narrative states {bad[0]} not in the fact sheet")
    return Narrative(
        text,
        "deterministic",
        tuple(t.id for t in chosen),
        _facts_of(chosen),
        model,
        PROMPT_VERSION,
        reason,
    )


def _facts_of(topics: Sequence[Topic]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for topic in topics:
        for fact_id, _ in _PLACEHOLDER.findall(topic.template):
            seen.setdefault(fact_id, None)
    return tuple(seen)


def narrate(
    sheet: FactSheet,
    llm: LlmBackend | None,
    *,
    heading: str,
    focus: str = "the period",
    topics: Sequence[Topic] | None = None,
    limit: int | None = None,
    required: Sequence[str] = (),
    on_llm_text: Callable[[str], str] | None = None,
    without_model: str | None = None,
) -> Narrative:
    """The narrative of ``sheet``: planned by ``llm`` when it can, else deterministic.

    ``required`` topic ids are told whatever the model picks (code puts a missing one
    first). ``on_llm_text`` lets a test corrupt the model's text for the check;
    ``without_model`` says why the model is not asked (kept as the fallback reason)."""
    available = list(topics) if topics is not None else topics_for(sheet)[:OFFERED_TOPICS]
    # the deterministic text tells the first topics: the required ones lead
    available.sort(key=lambda t: t.id not in required)
    reason = "no LLM backend configured" if llm is None else without_model
    if llm is None or reason is not None or not available:
        model = None if llm is None or without_model else llm.model_name
        return deterministic(sheet, available, heading, reason, model, limit)
    by_id = {t.id: t for t in available}
    most = min(MAX_TOPICS, limit or MAX_TOPICS)
    started = time.perf_counter()
    plan, failure = _ask_plan(llm, available, sheet, focus, most)
    if failure is not None:
        return deterministic(sheet, available, heading, failure, llm.model_name, limit)
    seconds = time.perf_counter() - started
    problem, chosen, sentences = _apply_plan(plan, by_id, sheet, required, most)
    if problem is not None:
        fallback = deterministic(
            sheet, available, heading, f"LLM plan refused: {problem}", llm.model_name, limit
        )
        return _with_seconds(fallback, seconds)
    text = f"{heading}. " + " ".join(sentences)
    text = on_llm_text(text) if on_llm_text is not None else text
    bad = check_numbers(text, sheet)
    if bad:
        fallback = deterministic(
            sheet,
            available,
            heading,
            f"number check failed: {bad[0]} is not in the fact sheet",
            llm.model_name,
            limit,
        )
        return _with_seconds(fallback, seconds)
    return Narrative(
        text,
        "llm",
        tuple(t.id for t in chosen),
        _facts_of(chosen),
        llm.model_name,
        PROMPT_VERSION,
        None,
        seconds,
    )


def _ask_plan(
    llm: LlmBackend, available: Sequence[Topic], sheet: FactSheet, focus: str, most: int
) -> tuple[Any, str | None]:
    """The model's plan, or (None, why it failed)."""
    try:
        return (
            llm.complete_json(
                SYSTEM_PROMPT,
                _prompt(available, sheet, focus),
                # a small model stops after one topic unless the grammar asks for more
                plan_schema([t.id for t in available], most, min_items=MIN_TOPICS),
                TOKENS_PER_TOPIC * most + 16,
            ),
            None,
        )
    except LlmTimeout as exc:  # a plan cut short tells fewer topics than the fixed text
        log.info("LLM narrative stopped, using the deterministic one: %s", exc)
        return None, f"LLM failed: {exc}"
    except LlmError as exc:
        salvaged = salvage_plan(exc.text)
        if salvaged is None:
            log.warning("LLM narrative failed, using the deterministic one: %s", exc)
            return None, f"LLM failed: {exc}"
        return salvaged, None


_PLAN_ITEM = re.compile(
    r'\{\s*"id"\s*:\s*"([^"\\]{1,60})"\s*,\s*"lead"\s*:\s*"([^"\\]{0,60})"\s*\}'
)


def salvage_plan(text: str | None) -> dict[str, Any] | None:
    """The complete topic entries of a plan the token budget cut off (a small model
    tends to repeat entries until it runs out); None when there are none."""
    if not text:
        return None
    items = [{"id": m.group(1), "lead": m.group(2)} for m in _PLAN_ITEM.finditer(text)]
    return {"topics": items} if items else None


def _with_seconds(narrative: Narrative, seconds: float) -> Narrative:
    return Narrative(
        narrative.text,
        narrative.source,
        narrative.topics,
        narrative.facts_used,
        narrative.model,
        narrative.prompt_version,
        narrative.fallback_reason,
        seconds,
    )


def _apply_plan(
    plan: Any,
    by_id: dict[str, Topic],
    sheet: FactSheet,
    required: Sequence[str] = (),
    most: int = MAX_TOPICS,
) -> tuple[str | None, list[Topic], list[str]]:
    if not isinstance(plan, dict) or not isinstance(plan.get("topics"), list):
        return "the plan is not an object with a topics list", [], []
    chosen: list[Topic] = []
    sentences: list[str] = []
    used: set[str] = set()
    for item in plan["topics"][:most]:
        if not isinstance(item, dict):
            return "a topic entry is not an object", [], []
        topic = by_id.get(str(item.get("id")))
        if topic is None:
            return f"unknown topic {item.get('id')!r}", [], []
        if topic in chosen:
            continue  # a repeated topic adds nothing
        lead = item.get("lead", "")
        if not isinstance(lead, str):
            return "a lead-in is not text", [], []
        problem = lead_problem(lead)
        if problem is not None:
            return problem, [], []
        sentence = render_topic(topic, sheet)
        # The first sentence needs no connector, and one used twice reads as a tic.
        if not chosen or lead in used:
            lead = ""
        used.add(lead)
        if lead:
            first = sentence[0].lower() if sentence[1:2].islower() else sentence[0]
            sentence = f"{lead[0].upper()}{lead[1:]}, {first}{sentence[1:]}"
        chosen.append(topic)
        sentences.append(sentence)
    if not chosen:
        return "the plan chose no topic", [], []
    missing = [by_id[i] for i in required if i in by_id and by_id[i] not in chosen]
    if missing:
        if len(chosen) + len(missing) > most:
            keep = max(most - len(missing), 0)
            chosen, sentences = chosen[:keep], sentences[:keep]
        chosen = missing + chosen
        sentences = [render_topic(t, sheet) for t in missing] + sentences
    return None, chosen, sentences
