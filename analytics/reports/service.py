"""The report service: questions to answers, and daily and weekly reports.

One object wires the store, the language model and the city's settings; the API, the
CLI, the scheduler and the evaluation all go through it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from analytics.reports.answering import asked_topics
from analytics.reports.answering import pairs as _pairs
from analytics.reports.answering import taken_as as _taken_as
from analytics.reports.facts import (
    LABELS,
    REPORT_METRICS,
    TRAFFIC_METRICS,
    Fact,
    FactSheet,
    FactSheetError,
    audit_checkpoint,
    build_fact_sheet,
    checkpoint_dict,
    format_number,
    ledger_dict,
)
from analytics.reports.intent import (
    CITY,
    INTENT_PROMPT_VERSION,
    Intent,
    IntentError,
    llm_intent,
    parse_question,
)
from analytics.reports.llm import LlmBackend, LlmError, time_budget
from analytics.reports.narrative import (
    PROMPT_VERSION,
    Narrative,
    NarrativeError,
    answer_topics,
    check_numbers,
    deterministic,
    narrate,
    title,
    topics_for,
)
from analytics.reports.periods import Period
from analytics.reports.writer import (
    WORD_BUDGET,
    add_history_facts,
    city_topics,
    words,
    zone_paragraph,
)
from analytics.store.base import LedgerSpan, ReportRecord, Resolution, Store, StoreError
from civicmesh.metrics import BY_NAME

log = logging.getLogger(__name__)

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
INTENT_MODES = ("llm-first", "parser-first", "parser")
ANSWER_TOPICS = 4
# /ask waits on the model at most this long; past it the deterministic text (the same
# facts, every one asked for) is used: a plan cut short would tell fewer topics
ANSWER_MODEL_BUDGET_S = 1.5
# after the model ran past that budget, answers do without it for this long (a loaded
# machine: its prompt alone takes longer than the budget, and that part cannot be cut)
MODEL_REST_S = 120.0


@dataclass(frozen=True, slots=True)
class Answer:
    question: str
    intent: Intent
    text: str
    narrative: Narrative
    sheets: tuple[FactSheet, ...]
    table: dict[str, Any]
    chart: dict[str, Any]
    timezone: str
    seconds: float = 0.0
    intent_seconds: float = 0.0
    notes: tuple[str, ...] = field(default=())
    names: tuple[str, ...] = field(default=())  # what each sheet is called in the text
    derived: tuple[Fact, ...] = field(default=())  # computed from the sheets' facts

    def facts_used(self) -> list[dict[str, Any]]:
        used = set(self.narrative.facts_used)
        names = self.names or tuple(s.scope for s in self.sheets)
        out = []
        for name, sheet in zip(names, self.sheets, strict=True):
            for fact in sheet.facts:
                key = fact.id if len(self.sheets) == 1 else f"{name}@{fact.id}"
                if key in used:
                    item = fact.to_dict()
                    item["scope"] = name
                    out.append(item)
        for fact in self.derived:
            if fact.id in used:
                out.append(dict(fact.to_dict(), scope=None))
        return out

    def to_dict(self) -> dict[str, Any]:
        tz = ZoneInfo(self.timezone)
        return {
            "question": self.question,
            "intent": self.intent.to_dict(tz),
            "text": self.text,
            "narrative": self.narrative.to_dict(),
            "facts": self.facts_used(),
            "table": self.table,
            "chart": self.chart,
            "ledger": [
                dict(ledger_dict(s.ledger), scope=s.scope, checkpoint=checkpoint_dict(s.checkpoint))
                for s in self.sheets
            ],
            "notes": list(self.notes) + list(self.intent.notes),
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True, slots=True)
class Report:
    scope: str
    zone: str | None
    kind: str  # "daily" or "weekly"
    sheet: FactSheet
    narrative: Narrative
    created_ms: int
    seconds: float
    zone_sheets: tuple[FactSheet, ...] = ()  # a city report's zone paragraphs rest on these

    @property
    def text(self) -> str:
        return self.narrative.text

    def facts(self) -> FactSheet:
        """Every fact the text may state: the sheet's, and each zone's as ``zone@id``."""
        if not self.zone_sheets:
            return self.sheet
        names = [self.sheet.scope] + [s.scope for s in self.zone_sheets]
        merged = merge_sheets([self.sheet, *self.zone_sheets], names)
        own = self.sheet.facts  # the city's facts keep their plain ids too
        return replace(merged, facts=own + merged.facts[len(own) :], ledger=self.sheet.ledger)


class ReportService:
    def __init__(
        self,
        store: Store,
        llm: LlmBackend | None,
        *,
        timezone: str = "UTC",
        window_s: int = 60,
        intent_mode: str = "llm-first",
        answer_budget_s: float | None = ANSWER_MODEL_BUDGET_S,
    ) -> None:
        if intent_mode not in INTENT_MODES:
            raise ValueError(f"Unknown intent mode {intent_mode!r}; use {', '.join(INTENT_MODES)}")
        self.store = store
        self.llm = llm
        self.timezone = timezone
        self.tz = ZoneInfo(timezone)
        self.window_s = window_s
        self.intent_mode = intent_mode
        self.answer_budget_s = answer_budget_s
        self._model_rests_until = 0.0  # time.monotonic() before which answers skip it

    # ------------------------------------------------------------------ intents

    def zones(self) -> list[str]:
        return [z.zone for z in self.store.zones()]

    def now(self) -> datetime:
        return datetime.now(self.tz)

    def city_time(self, when: datetime | None) -> datetime:
        """``when`` in the city's zone; a time without an offset is city time (not UTC,
        not this machine's zone); None is now."""
        if when is None:
            return self.now()
        if when.tzinfo is None:
            return when.replace(tzinfo=self.tz)
        return when.astimezone(self.tz)

    def intent(self, question: str, now: datetime | None = None) -> Intent:
        """The question's intent by the configured mode; IntentError when it has none."""
        now = self.city_time(now)
        zones = self.zones()
        if self.llm is None or self.intent_mode in ("parser", "parser-first"):
            # parser-first: a question the parser rules out (out of scope, refused, an
            # unknown place or metric) gets its 422; it never goes to the model raw
            return parse_question(question, zones, now)
        try:
            return llm_intent(question, zones, now, self.llm)
        except LlmError as exc:
            log.info("model intent not used (%s); parsing deterministically", exc)
            return parse_question(question, zones, now)

    # ------------------------------------------------------------------ answers

    def ask(self, question: str, now: datetime | None = None) -> Answer:
        started = time.perf_counter()
        intent = self.intent(question, now)
        intent_seconds = time.perf_counter() - started
        if intent.kind == "summary":
            answer = self._summary(question, intent)
        elif intent.kind == "compare_places":
            answer = self._compare(question, intent, by_place=True)
        elif intent.kind == "compare_periods":
            answer = self._compare(question, intent, by_place=False)
        else:
            answer = self._rank(question, intent)
        return Answer(
            answer.question,
            intent,
            answer.text,
            answer.narrative,
            answer.sheets,
            answer.table,
            answer.chart,
            self.timezone,
            time.perf_counter() - started,
            intent_seconds,
            answer.notes,
            answer.names,
            answer.derived,
        )

    def _sheet(
        self,
        place: str,
        period: Period,
        metrics: Sequence[str],
        *,
        pairs: Sequence[tuple[str, str]] = (),
        aqi_now: bool = False,
        notes: Sequence[str] = (),
    ) -> FactSheet:
        zone = None if place == CITY else place
        sheet = build_fact_sheet(
            self.store,
            period.start_ms,
            period.end_ms,
            zone=zone,
            timezone=self.timezone,
            metrics=metrics,
            window_s=self.window_s,
            days=period.days,
            hours=period.hours,
            pairs=pairs,
            aqi_now=aqi_now,
        )
        return replace(sheet, facts=sheet.facts + tuple(_asked_facts(period, notes)))

    def _summary(self, question: str, intent: Intent) -> Answer:
        period = intent.periods[0]
        now = intent.quantity == "aqi" and period.end_ms - period.start_ms <= 3 * HOUR_MS
        pairs = _pairs(intent) if intent.quantity == "correlation" else ()
        sheet = self._sheet(
            intent.places[0], period, intent.metrics, pairs=pairs, aqi_now=now, notes=intent.notes
        )
        by_id = answer_topics(sheet)
        required, missing = asked_topics(intent, by_id, now, sheet)
        wanted = set(intent.metrics)
        relevant = [t for t in topics_for(sheet) if _topic_metrics(t.id) & wanted]
        rest = [t for t in relevant if t not in required]
        if intent.quantity != "summary":
            rest = [t for t in rest if t.id == "data.completeness"][:1]
        topics = (required + rest)[: max(len(required), ANSWER_TOPICS) + 2]
        plain = title(sheet, "Answer")
        heading = plain + (f" ({period.filter_text()})" if period.filter_text() else "")
        with time_budget(self.answer_budget_s):
            narrative = narrate(
                sheet,
                self.llm,
                heading=plain,
                focus=period.label,
                topics=topics,
                limit=max(len(required), ANSWER_TOPICS),
                required=[t.id for t in required],
                without_model=_model_not_needed(intent) or self._model_resting(),
            )
        if (narrative.fallback_reason or "").startswith("LLM failed: stopped at the time budget"):
            self._model_rests_until = time.monotonic() + MODEL_REST_S
        body = narrative.text.replace(plain, heading, 1)
        text = " ".join([body, *missing, *_taken_as(intent)])
        bad = check_numbers(text, sheet, extra=[heading, *missing, *intent.notes])
        if bad:
            raise NarrativeError(f"answer states {bad[0]}, which the fact sheet does not hold")
        notes: tuple[str, ...] = ()
        if not sheet.facts or all(
            f.id.startswith(("devices.", "completeness", "coverage")) for f in sheet.facts
        ):
            notes = ("no readings in this period and place",)
        return Answer(
            question,
            intent,
            text,
            narrative,
            (sheet,),
            _table([sheet], intent.metrics),
            self._chart([sheet], intent),
            self.timezone,
            notes=notes,
        )

    def _model_resting(self) -> str | None:
        if time.monotonic() < self._model_rests_until:
            return (
                f"the model ran past its {self.answer_budget_s:g} s budget less than "
                f"{MODEL_REST_S:g} s ago"
            )
        return None

    def _compare(self, question: str, intent: Intent, *, by_place: bool) -> Answer:
        if by_place:
            period = intent.periods[0]
            sheets = [self._sheet(p, period, intent.metrics) for p in intent.places]
            names = [("the city" if p == CITY else p) for p in intent.places]
        else:
            place = intent.places[0]
            sheets = [self._sheet(place, p, intent.metrics) for p in intent.periods]
            names = [
                s.period_text() + (f" ({p.filter_text()})" if p.filter_text() else "")
                for s, p in zip(sheets, intent.periods, strict=True)
            ]
        merged = merge_sheets(sheets, names)
        sentences, extra_facts = _compare_sentences(intent, sheets, names, by_place)
        merged = replace(merged, facts=merged.facts + tuple(extra_facts))
        what = "places" if by_place else "periods"
        heading = f"Comparison of {' and '.join(names)}"
        if by_place:
            heading += f", {sheets[0].period_text()}"
            if intent.periods[0].filter_text():
                heading += f" ({intent.periods[0].filter_text()})"
        text = f"{heading}. " + (" ".join(sentences) or "There is no data to compare.")
        bad = check_numbers(text, merged, extra=[*names, heading])
        if bad:
            raise NarrativeError(f"comparison states {bad[0]}, which no fact sheet holds")
        stated = {f"{m}.mean" for m in intent.metrics}
        used = tuple(
            f.id
            for f in merged.facts
            if f.id.split("@", 1)[-1] in stated or f.id.startswith("compare.")
        )
        narrative = Narrative(
            text,
            "deterministic",
            ("compare",),
            used,
            None,
            PROMPT_VERSION,
            f"comparisons of {what} are written by fixed templates",
        )
        return Answer(
            question,
            intent,
            text,
            narrative,
            tuple(sheets),
            _table(sheets, intent.metrics, names),
            self._chart(sheets, intent, names),
            self.timezone,
            names=tuple(names),
            derived=tuple(extra_facts),
        )

    def _rank(self, question: str, intent: Intent) -> Answer:
        period = intent.periods[0]
        aggregates = self.store.zone_aggregates(
            period.start_ms - period.start_ms % HOUR_MS, period.end_ms, Resolution.HOUR
        )
        facts: list[Fact] = []
        sentences = []
        rows = []
        for metric in intent.metrics:
            ranked = sorted(
                (a for a in aggregates if a.metric == metric and a.zone is not None),
                key=lambda a: -a.mean,
            )
            if not ranked:
                continue
            unit = "vehicles per window" if metric == "vehicle_count" else BY_NAME[metric].unit
            parts = []
            for i, agg in enumerate(ranked):
                fact = Fact(
                    f"rank.{metric}.{i + 1}",
                    agg.mean,
                    unit,
                    f"mean {LABELS[metric]} in {agg.zone}",
                    period.start_ms,
                    period.end_ms,
                    "rollup_zone_1h",
                    2 if metric == "co" else 1,
                )
                facts.append(fact)
                parts.append(f"{agg.zone} ({fact.text})")
                rows.append([metric, agg.zone, i + 1, fact.value, unit])
            sentences.append(f"By mean {LABELS[metric]}, highest first: {', '.join(parts)}.")
        span = self.store.ledger_span(period.start_ms, period.end_ms)
        sheet = FactSheet(
            CITY, None, period.start_ms, period.end_ms, self.timezone, tuple(facts), span,
            tuple(intent.metrics),
            audit_checkpoint(self.store),
        )  # fmt: skip
        heading = f"Zones ranked, {sheet.period_text()}"
        text = f"{heading}. " + (" ".join(sentences) or "No zone has data in this period.")
        bad = check_numbers(text, sheet, extra=list(intent.places))
        if bad:
            raise NarrativeError(f"ranking states {bad[0]}, which no fact holds")
        narrative = Narrative(
            text,
            "deterministic",
            ("rank",),
            tuple(f.id for f in facts),
            None,
            PROMPT_VERSION,
            "rankings are written by fixed templates",
        )
        columns = ["metric", "zone", "rank", "mean", "unit"]
        table = {"columns": columns, "rows": rows}
        chart = _rank_chart(heading, columns, rows)
        return Answer(question, intent, text, narrative, (sheet,), table, chart, self.timezone)

    def _chart(
        self, sheets: Sequence[FactSheet], intent: Intent, names: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """A Vega-Lite line chart of the hourly (or daily, past a week) means."""
        values = []
        for i, sheet in enumerate(sheets):
            span = sheet.end_ms - sheet.start_ms
            resolution = Resolution.HOUR if span <= 8 * DAY_MS else Resolution.DAY
            series_name = names[i] if names else sheet.scope
            for metric in intent.metrics:
                for p in self.store.rollup_series(
                    metric, sheet.start_ms, sheet.end_ms, resolution, zone=sheet.zone
                ):
                    values.append(
                        {
                            "time": datetime.fromtimestamp(p.bucket_ms / 1000, self.tz).isoformat(),
                            "metric": metric,
                            "series": series_name,
                            "mean": round(p.mean, 3),
                        }
                    )
        return {
            "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
            "data": {"values": values},
            "mark": {"type": "line", "point": len(values) < 60},
            "encoding": {
                "x": {"field": "time", "type": "temporal"},
                "y": {"field": "mean", "type": "quantitative"},
                "color": {"field": "series", "type": "nominal"},
                "row": {"field": "metric", "type": "nominal"},
            },
        }

    # ------------------------------------------------------------------ reports

    def report(self, kind: str, zone: str | None, end: datetime | None = None) -> Report:
        """The daily or weekly report of ``zone`` (None: the city, with a paragraph per
        zone) for the whole local day or Monday-to-Monday week before ``end``."""
        started = time.perf_counter()
        start_ms, end_ms = report_window(kind, self.city_time(end))
        sheet = self._report_sheet(zone, start_ms, end_ms)
        heading = title(sheet, "Weekly summary" if kind == "weekly" else "Daily summary")
        focus = "a week" if kind == "weekly" else "a day"
        found, usual = city_topics(sheet)
        narrative = narrate(
            sheet,
            self.llm,
            heading=heading,
            focus=focus,
            topics=found + usual,
            limit=len(found) + len(usual),
            required=[t.id for t in found],
        )
        zone_sheets: list[FactSheet] = []
        paragraphs = [narrative.text]
        told = list(narrative.topics)
        if zone is None:
            budget = max(WORD_BUDGET - words(narrative.text), 40) // max(len(self.zones()), 1)
            for name in self.zones():
                zone_sheet = self._report_sheet(name, start_ms, end_ms)
                text, ids = zone_paragraph(name, zone_sheet, budget)
                bad = check_numbers(text, zone_sheet, extra=[name])
                if bad:
                    raise NarrativeError(f"the {name} paragraph states {bad[0]}, not a fact")
                zone_sheets.append(zone_sheet)
                paragraphs.append(text)
                told += [f"{name}@{i}" for i in ids]
        narrative = replace(narrative, text="\n\n".join(paragraphs), topics=tuple(told))
        return Report(
            sheet.scope,
            zone,
            kind,
            sheet,
            narrative,
            int(time.time() * 1000),
            time.perf_counter() - started,
            tuple(zone_sheets),
        )

    def _report_sheet(self, zone: str | None, start_ms: int, end_ms: int) -> FactSheet:
        sheet = build_fact_sheet(
            self.store, start_ms, end_ms, zone=zone, timezone=self.timezone, window_s=self.window_s
        )
        return add_history_facts(sheet, self.store)


def report_window(kind: str, end: datetime) -> tuple[int, int]:
    """The last whole local day, or the last whole Monday-to-Monday week, before ``end``."""
    midnight = end.replace(hour=0, minute=0, second=0, microsecond=0)
    if kind == "daily":
        start = midnight - timedelta(days=1)
        stop = midnight
    elif kind == "weekly":
        stop = midnight - timedelta(days=midnight.weekday())
        start = stop - timedelta(days=7)
    else:
        raise ValueError(f"Unknown report kind {kind!r}; use daily or weekly")
    # Rebuild through the zone so a DST change inside the window is respected.
    tz = end.tzinfo
    start = start.replace(tzinfo=None).replace(tzinfo=tz)
    stop = stop.replace(tzinfo=None).replace(tzinfo=tz)
    return int(start.timestamp() * 1000), int(stop.timestamp() * 1000)


def _model_not_needed(intent: Intent) -> str | None:
    """Why the model need not plan an answer: a question for one quantity (a peak, the
    AQI, hours above a guideline...) is answered by that quantity's facts, which the
    fixed template states in full; there is nothing for the model to choose."""
    if intent.quantity == "summary":
        return None
    return f"the asked {intent.quantity.replace('_', ' ')} is stated by the fixed template"


def _asked_facts(period: Period, notes: Sequence[str]) -> list[Fact]:
    """What the question was read as, as facts: the hour and weekday filters of the
    period and what was taken for what it left open (an answer states them)."""
    out = []
    span = (period.start_ms, period.end_ms)
    if period.filter_text():
        out.append(
            Fact("asked.filters", period.filter_text(), "filters", "hours and days asked",
                 *span, "the question")
        )  # fmt: skip
    for i, note in enumerate(notes):
        out.append(Fact(f"asked.note.{i + 1}", note, "note", "taken as", *span, "the question"))
    return out


def _compare_sentences(
    intent: Intent, sheets: Sequence[FactSheet], names: Sequence[str], by_place: bool
) -> tuple[list[str], list[Fact]]:
    """One sentence per metric: each side's mean and the difference between them."""
    sentences = []
    extra_facts: list[Fact] = []
    for metric in intent.metrics:
        fact_id = "vehicle_count.mean" if metric == "vehicle_count" else f"{metric}.mean"
        facts = [s.get(fact_id) for s in sheets]
        present = [(n, f) for n, f in zip(names, facts, strict=True) if f is not None]
        if len(present) < 2:
            continue
        label = LABELS[metric]
        parts = [f"{f.text} in {n}" if by_place else f"{f.text} ({n})" for n, f in present]
        sentence = f"Mean {label} was " + ", ".join(parts[:-1]) + f" and {parts[-1]}"
        first, second = present[0][1], present[1][1]
        if isinstance(first.value, float) and isinstance(second.value, float) and second.value:
            change = (first.value - second.value) / second.value * 100
            fact = Fact(
                f"compare.{metric}.difference_pct",
                abs(change),
                "%",
                f"difference of mean {label}",
                first.start_ms,
                first.end_ms,
                "computed from the facts above",
            )
            extra_facts.append(fact)
            word = "higher" if change > 0 else "lower"
            sentence += f": {present[0][0]} was {fact.text} {word}"
        sentences.append(sentence + ".")
    return sentences, extra_facts


def _rank_chart(heading: str, columns: list[str], rows: list[list[Any]]) -> dict[str, Any]:
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "title": heading,
        "data": {"values": [dict(zip(columns, r, strict=True)) for r in rows]},
        "mark": "bar",
        "encoding": {
            "x": {"field": "zone", "type": "nominal", "sort": "-y"},
            "y": {"field": "mean", "type": "quantitative"},
            "column": {"field": "metric", "type": "nominal"},
        },
    }


def _topic_metrics(topic_id: str) -> set[str]:
    subject = topic_id.split(".")[0]
    if subject in REPORT_METRICS:
        return {subject}
    if subject == "traffic":
        return set(TRAFFIC_METRICS) | ({"no2"} if topic_id == "traffic.no2" else set())
    if subject == "aqi":
        return {"pm25", "pm10", "no2", "o3"}
    return set(REPORT_METRICS)  # data quality goes with a broad question


def merge_sheets(sheets: Sequence[FactSheet], names: Sequence[str]) -> FactSheet:
    """One sheet holding every sheet's facts, ids prefixed ``name@`` (for checking)."""
    facts = []
    for sheet, name in zip(sheets, names, strict=True):
        for f in sheet.facts:
            facts.append(
                Fact(
                    f"{name}@{f.id}",
                    f.value,
                    f.unit,
                    f.label,
                    f.start_ms,
                    f.end_ms,
                    f.source,
                    f.decimals,
                )
            )
    heads = tuple(h for s in sheets for h in s.ledger.heads)
    first = sheets[0]
    span = LedgerSpan(
        min(s.start_ms for s in sheets), max(s.end_ms for s in sheets), first.zone, heads
    )
    return FactSheet(
        first.scope,
        first.zone,
        span.start_ms,
        span.end_ms,
        first.timezone,
        tuple(facts),
        span,
        first.metrics,
        first.checkpoint,
    )


def _table(
    sheets: Sequence[FactSheet], metrics: Sequence[str], names: Sequence[str] | None = None
) -> dict[str, Any]:
    columns = [
        "scope",
        "metric",
        "mean",
        "highest hour",
        "highest hour at",
        "change %",
        "WHO days exceeded",
        "unit",
    ]
    rows = []
    for i, sheet in enumerate(sheets):
        for metric in metrics:
            mean = sheet.get(
                "vehicle_count.mean" if metric == "vehicle_count" else f"{metric}.mean"
            )
            if mean is None:
                continue

            def value(fact_id: str, sheet: FactSheet = sheet) -> Any:
                fact = sheet.get(fact_id)
                return None if fact is None else fact.value

            change = value(f"{metric}.change_pct")
            direction = value(f"{metric}.change_direction")
            signed = None if change is None else (-change if direction == "down" else change)
            rows.append(
                [
                    names[i] if names else sheet.scope,
                    metric,
                    mean.value,
                    value(f"{metric}.peak_hour"),
                    value(f"{metric}.peak_hour.time"),
                    signed,
                    value(f"{metric}.who_exceedance_days"),
                    mean.unit,
                ]
            )
    return {"columns": columns, "rows": rows}


def deterministic_text(sheet: FactSheet, heading: str) -> str:
    """The deterministic narrative alone (for a backend-less caller)."""
    return deterministic(sheet, topics_for(sheet), heading, None).text


__all__ = [
    "INTENT_PROMPT_VERSION",
    "Answer",
    "IntentError",
    "Report",
    "ReportService",
    "format_number",
]


# ----------------------------------------------------------------- storing, schedule


def to_record(report: Report) -> ReportRecord:
    return ReportRecord(
        scope=report.scope,
        kind=report.kind,
        period_start_ms=report.sheet.start_ms,
        period_end_ms=report.sheet.end_ms,
        created_ms=report.created_ms,
        text=report.text,
        narrative_source=report.narrative.source,
        fallback_reason=report.narrative.fallback_reason,
        model=report.narrative.model,
        prompt_version=report.narrative.prompt_version,
        fact_sheet_json=json.dumps(report.facts().to_dict(), ensure_ascii=False),
        ledger_digest=report.sheet.ledger.digest(),
        ledger_batches=report.sheet.ledger.batches,
    )


def record_dict(record: ReportRecord) -> dict[str, Any]:
    sheet = json.loads(record.fact_sheet_json)
    return {
        "id": record.id,
        "scope": record.scope,
        "kind": record.kind,
        "period_start": sheet["start"],
        "period_end": sheet["end"],
        "created_ms": record.created_ms,
        "text": record.text,
        "narrative": {
            "source": record.narrative_source,
            "fallback_reason": record.fallback_reason,
            "model": record.model,
            "prompt_version": record.prompt_version,
        },
        "facts": sheet["facts"],
        "ledger": sheet["ledger"],
    }


def scopes(service: ReportService) -> list[str | None]:
    return [None, *service.zones()]


def generate_due(
    service: ReportService, now: datetime | None = None, *, delay_s: float = 0.0
) -> list[ReportRecord]:
    """Write the reports whose period has ended and that are not stored yet: yesterday's
    daily report and last week's weekly report, for the city and every zone. With
    ``delay_s``, a period counts as ended that long after its end: batches sealed in its
    last minutes are still on their way through gateways and ingest then."""
    now = ((now or service.now()) - timedelta(seconds=delay_s)).astimezone(service.tz)
    written = []
    for kind in ("daily", "weekly"):
        start_ms, _ = report_window(kind, now)
        for zone in scopes(service):
            scope = zone or CITY
            stored = service.store.reports(scope=scope, kind=kind, limit=1)
            if stored and stored[0].period_start_ms >= start_ms - start_ms % HOUR_MS:
                continue
            record = to_record(service.report(kind, zone, now))
            service.store.save_report(record)
            written.append(record)
            log.info(
                "wrote the %s report of %s (%s narrative)", kind, scope, record.narrative_source
            )
    return written


class ReportScheduler(threading.Thread):
    """Writes due reports every ``interval_s`` until stopped; failures are logged and
    retried at the next tick, never fatal to the service."""

    def __init__(self, service: ReportService, interval_s: float, delay_s: float = 0.0) -> None:
        super().__init__(name="civicmesh-reports", daemon=True)
        self._service = service
        self._interval = interval_s
        self._delay = delay_s
        self._stop_event = threading.Event()
        self.written = 0

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.written += len(generate_due(self._service, delay_s=self._delay))
            except (StoreError, NarrativeError, FactSheetError) as exc:
                log.warning("report schedule: %s (retrying in %.0f s)", exc, self._interval)
            self._stop_event.wait(self._interval)

    def stop(self) -> None:
        self._stop_event.set()
