"""The failure classes of issue 19's second round, one rule each: another name of a zone,
day-only ranges and holidays, like-for-like reference periods, the quantity of a ranking,
refusals whatever the subject; and the /ask time budget on the model (real llama.cpp)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from analytics.reports.evaluate import load_questions, score_intents
from analytics.reports.intent import IntentError, parse_question
from analytics.reports.llm import (
    LlamaCppBackend,
    LlmBackend,
    LlmError,
    LlmTimeout,
    time_budget,
)
from analytics.reports.narrative import check_numbers
from analytics.reports.service import ReportService
from analytics.store import open_store
from analytics.store.base import Store
from demo.history import fill_store
from firmware_sim.city import SimulatedCity

TZ = ZoneInfo("Europe/London")
NOW = datetime(2026, 11, 19, 15, 30, tzinfo=TZ)  # a Thursday
NOW_MS = int(NOW.timestamp() * 1000)
ZONES = ["harbour", "old-town", "ring-road", "university"]
TRAFFIC = ("vehicle_count", "mean_speed")
NO2, PM10 = ("no2",), ("pm10",)
HERE = Path(__file__).resolve().parents[1] / "analytics" / "reports"


def local(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=TZ).timestamp() * 1000)


def span(question: str, i: int = 0, zones: list[str] = ZONES) -> tuple[int, int]:
    period = parse_question(question, zones, NOW).periods[i]
    return period.start_ms, period.end_ms


def error(question: str, zones: list[str] = ZONES) -> str:
    with pytest.raises(IntentError) as caught:
        parse_question(question, zones, NOW)
    return caught.value.code


# ----------------------------------------------------------------------- places


@pytest.mark.parametrize(
    ("question", "zone", "word"),
    [
        ("NO2 down by the docks yesterday", "harbour", "docks"),
        ("how is the air on campus", "university", "campus"),
        ("traffic on the bypass this morning", "ring-road", "bypass"),
        ("PM10 in the town centre today", "old-town", "town centre"),
        ("is the city centre busy right now", "old-town", "city centre"),
    ],
)
def test_another_name_of_a_zone_is_read_as_it_and_said(question: str, zone: str, word: str) -> None:
    intent = parse_question(question, ZONES, NOW)
    assert intent.places == (zone,)
    assert f"I read {word!r} as {zone}" in intent.notes


def test_a_place_word_that_fits_no_zone_or_two_is_unknown() -> None:
    # no zone of this city is a port: "docks" names nothing
    assert error("NO2 at the docks yesterday", ["north", "south"]) == "unknown_place"
    # two zones are harbours: which one "the docks" is cannot be told
    assert error("NO2 at the docks", ["east-harbour", "west-harbour"]) == "unknown_place"
    # a zone called by the word itself wins over the kind
    zones = ["port", "harbour"]
    assert parse_question("NO2 in port yesterday", zones, NOW).places == ("port",)


def test_an_unknown_place_beside_a_known_one_is_not_dropped() -> None:
    assert error("Compare NO2 in Springfield and the harbour") == "unknown_place"
    assert error("pm2.5 in zone 7 this week") == "unknown_place"
    assert error("pm10 in district 9 today") == "unknown_place"
    # words after a named place are not places ("at the harbour better ...")
    intent = parse_question("Is NO2 at the ring road better this week than last week?", ZONES, NOW)
    assert intent.places == ("ring-road",)


# ---------------------------------------------------------------------- periods


def test_days_without_a_month_ranges_and_holidays() -> None:
    assert span("pm10 at the harbour from the 2nd to the 6th") == (
        local("2026-11-02T00:00"),
        local("2026-11-07T00:00"),
    )
    assert span("NO2 on the 14th") == (local("2026-11-14T00:00"), local("2026-11-15T00:00"))
    # a day still to come this month is last month's
    assert span("NO2 on the 25th") == (local("2026-10-25T00:00"), local("2026-10-26T00:00"))
    assert span("oct 20-22 carbon monoxide") == (
        local("2026-10-20T00:00"),
        local("2026-10-23T00:00"),
    )
    assert span("harbour NO2, 10th through 12th November") == (
        local("2026-11-10T00:00"),
        local("2026-11-13T00:00"),
    )
    assert span("traffic on Halloween") == (local("2026-10-31T00:00"), local("2026-11-01T00:00"))
    # Christmas 2026 is still to come: the last one
    assert span("PM2.5 on Christmas Day") == (local("2025-12-25T00:00"), local("2025-12-26T00:00"))
    assert span("NO2 for the week starting Monday 2 November") == (
        local("2026-11-02T00:00"),
        local("2026-11-09T00:00"),
    )
    assert span("ozone in the first week of November") == (
        local("2026-11-01T00:00"),
        local("2026-11-08T00:00"),
    )


def test_clock_times_and_parts_of_the_day() -> None:
    assert span("ozone since 3pm in the harbour") == (local("2026-11-19T15:00"), NOW_MS)
    assert span("PM2.5 at noon today") == (local("2026-11-19T12:00"), local("2026-11-19T13:00"))
    assert span("traffic during the evening rush on Monday") == (
        local("2026-11-16T16:00"),
        local("2026-11-16T19:00"),
    )
    # "between 7 and 9 am" is hours, not the 7th to the 9th
    assert span("cars between 7 and 9 am yesterday") == (
        local("2026-11-18T07:00"),
        local("2026-11-18T09:00"),
    )
    # "overnight" beside a month is a filter of the month, not a second period
    intent = parse_question("overnight PM10 in the harbour during October", ZONES, NOW)
    assert intent.kind == "summary"
    assert intent.periods[0].hours == (0, 6)
    intent = parse_question("PM10 in October (midnight to 6am)", ZONES, NOW)
    assert intent.periods[0].hours == (0, 6)


@pytest.mark.parametrize(
    ("question", "asked", "reference"),
    [
        # a period still running is compared with the same span of the one before
        (
            "NO2 this week vs last week",
            ("2026-11-16T00:00", "2026-11-19T15:30"),
            ("2026-11-09T00:00", "2026-11-12T15:30"),
        ),
        (
            "NO2 this week compared with the week before",
            ("2026-11-16T00:00", "2026-11-19T15:30"),
            ("2026-11-09T00:00", "2026-11-12T15:30"),
        ),
        (
            "has PM10 changed since last week?",
            ("2026-11-16T00:00", "2026-11-19T15:30"),
            ("2026-11-09T00:00", "2026-11-12T15:30"),
        ),
        (
            "did the harbour get warmer this week compared to last?",
            ("2026-11-16T00:00", "2026-11-19T15:30"),
            ("2026-11-09T00:00", "2026-11-12T15:30"),
        ),
        (
            "ozone this month compared to last",
            ("2026-11-01T00:00", "2026-11-19T15:30"),
            ("2026-10-01T00:00", "2026-10-19T15:30"),
        ),
        # a finished period: the whole one before
        (
            "NO2 last week compared with the week before",
            ("2026-11-09T00:00", "2026-11-16T00:00"),
            ("2026-11-02T00:00", "2026-11-09T00:00"),
        ),
        (
            "traffic last weekend against the weekend before",
            ("2026-11-14T00:00", "2026-11-16T00:00"),
            ("2026-11-07T00:00", "2026-11-09T00:00"),
        ),
        (
            "Compare Saturday's NO2 with the Saturday before",
            ("2026-11-14T00:00", "2026-11-15T00:00"),
            ("2026-11-07T00:00", "2026-11-08T00:00"),
        ),
    ],
)
def test_the_reference_period_is_like_for_like(
    question: str, asked: tuple[str, str], reference: tuple[str, str]
) -> None:
    intent = parse_question(question, ZONES, NOW)
    assert intent.kind == "compare_periods"
    assert span(question, 0) == (local(asked[0]), local(asked[1]))
    assert span(question, 1) == (local(reference[0]), local(reference[1]))


def test_weekend_against_the_week_is_two_filters_of_one_period() -> None:
    intent = parse_question(
        "Was air quality better at the weekend than during the week in October?", ZONES, NOW
    )
    assert intent.kind == "compare_periods"
    assert {intent.periods[0].days, intent.periods[1].days} == {"weekends", "weekdays"}
    assert span("NO2 at the weekend than during the week in October", 1) == (
        local("2026-10-01T00:00"),
        local("2026-11-01T00:00"),
    )


# ------------------------------------------------------------------- quantities


@pytest.mark.parametrize(
    ("question", "quantity", "metrics"),
    [
        ("Which zone has the lowest NO2 right now?", "mean", ("no2",)),
        ("Which zone was coldest yesterday?", "mean", ("temperature",)),
        ("Which district saw the most cars last week?", "total", ("vehicle_count",)),
        ("What's the cleanest zone this week?", "summary", ("pm25", "pm10", "no2", "o3", "co")),
        ("Was it colder on campus this week than last week?", "mean", ("temperature",)),
        ("Was old town quieter than the harbour yesterday?", "summary", TRAFFIC),
        ("what share of readings arrived from the ring road in October", "completeness", None),
        ("how many hours of data are missing city-wide in the last 48 hours", "completeness", None),
        ("status of the traffic counters at ring road today", "device_health", None),
        ("Which sensors have stopped sending data?", "device_health", None),
        ("does occupancy track pm2.5 on the ring road", "correlation", ("pm25", "occupancy")),
        ("more hours of NO2 above the WHO limit than the week before?", "exceedance_hours", NO2),
        ("Compare exceedance hours for PM10 at harbour and ring road", "exceedance_hours", PM10),
        ("biggest PM2.5 reading in old town this week", "peak", ("pm25",)),
        ("In which hours was the ring road busiest on Friday?", "busiest_hour", ("vehicle_count",)),
    ],
)  # fmt: skip
def test_the_asked_quantity_in_new_wordings(
    question: str, quantity: str, metrics: tuple[str, ...] | None
) -> None:
    intent = parse_question(question, ZONES, NOW)
    assert intent.quantity == quantity
    if metrics is not None:
        assert set(intent.metrics) == set(metrics)


@pytest.mark.parametrize(
    ("question", "code"),
    [
        ("what's the admin password for the dashboard", "refused"),
        ("can you give me the API key you use for the database", "refused"),
        ("reboot the sensors at old town", "refused"),
        ("Translate 'air quality' into French", "out_of_scope"),
        ("Write a Python function that averages NO2 readings", "out_of_scope"),
        ("Any good pubs near the harbour?", "out_of_scope"),
        ("Is PM2.5 likely to rise at the harbour later today?", "out_of_scope"),
        ("wind speed at the docks right now", "unknown_metric"),
        ("how noisy was the ring road last night", "unknown_metric"),
        ("Any radiation readings from the harbour?", "unknown_metric"),
    ],
)
def test_refusals_whatever_else_the_question_names(question: str, code: str) -> None:
    assert error(question) == code


def test_what_is_left_out_or_refused_is_said() -> None:
    with pytest.raises(IntentError) as caught:
        parse_question("tell me the database password", ZONES, NOW)
    assert "credentials" in str(caught.value)
    with pytest.raises(IntentError) as caught:
        parse_question("wind speed at the harbour", ZONES, NOW)
    assert "'wind speed'" in str(caught.value)
    intent = parse_question("noise and NO2 at the harbour yesterday", ZONES, NOW)
    assert intent.metrics == ("no2",)
    assert "civicmesh does not measure 'noise'; left out" in intent.notes


def test_more_period_and_scope_wordings() -> None:
    assert span("ozone on the weekend of the 7th") == (
        local("2026-11-07T00:00"),
        local("2026-11-09T00:00"),
    )
    assert span("pm10 during the 2nd week of November") == (
        local("2026-11-08T00:00"),
        local("2026-11-15T00:00"),
    )
    assert span("How many sensors reported in the last hour?") == (
        local("2026-11-19T14:30"),
        NOW_MS,
    )
    every = parse_question("Give me yesterday's AQI for every zone", ZONES, NOW)
    assert (every.kind, every.quantity) == ("rank", "aqi")
    # "reported" alone is what the sensors measured, not their health
    said = parse_question("what have the sensors reported for NO2 yesterday", ZONES, NOW)
    assert said.quantity == "summary"


def test_the_development_set_v3_meets_the_target() -> None:
    qs = load_questions(str(HERE / "questions_dev_v3.json"))
    score = score_intents(qs, lambda q: parse_question(q, qs.zones, qs.now))
    assert score.total >= 60 and score.accuracy >= 0.9, score.failures


# ------------------------------------------------------------- /ask and the model


class CountingLlm(LlmBackend):
    """Counts the prompts it gets and answers nothing (a backend never to be asked)."""

    name = "counting"

    def __init__(self) -> None:
        self.calls = 0

    @property
    def model_name(self) -> str:
        return "counting"

    def complete_json(self, system: str, user: str, schema: dict[str, Any], max_tokens: int) -> Any:
        self.calls += 1
        return {"topics": []}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    city = SimulatedCity.generate(7, devices=8, zones=4)
    opened = open_store(f"sqlite:///{tmp_path_factory.mktemp('intent') / 'city.db'}")
    opened.migrate()
    fill_store(opened, city, NOW_MS - 9 * 86_400_000, NOW_MS)
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def llama() -> Iterator[LlamaCppBackend]:
    backend = LlamaCppBackend(n_threads=2)
    yield backend
    backend.close()


def test_a_question_for_one_quantity_never_waits_on_the_model(store: Store) -> None:
    llm = CountingLlm()
    service = ReportService(store, llm, timezone=str(TZ), window_s=600, intent_mode="parser-first")
    answer = service.ask("when was PM10 highest at the docks yesterday?", NOW)
    assert llm.calls == 0
    assert answer.narrative.source == "deterministic"
    assert "fixed template" in (answer.narrative.fallback_reason or "")
    assert "The highest hourly PM10 was" in answer.text
    assert "(I read 'docks' as harbour.)" in answer.text
    assert not check_numbers(answer.text, answer.sheets[0], extra=list(answer.intent.notes))
    service.ask("How was the air in harbour yesterday?", NOW)  # a summary: the model plans it
    assert llm.calls == 1


def test_the_model_stops_at_the_time_budget(llama: LlamaCppBackend) -> None:
    schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
    started = time.monotonic()
    with time_budget(0.01), pytest.raises(LlmTimeout) as caught:
        llama.complete_json("Write JSON.", "Describe the sea at length.", schema, 400)
    assert "time budget" in str(caught.value)
    assert time.monotonic() - started < 20  # the prompt is evaluated; no 400 tokens follow
    # outside the block there is no budget: the generation runs to its token cap
    with pytest.raises(LlmError) as capped:
        llama.complete_json("Write JSON.", "Describe the sea at length.", schema, 6)
    assert not isinstance(capped.value, LlmTimeout)


def test_an_answer_past_the_budget_is_the_full_fixed_text_and_the_model_rests(
    store: Store, llama: LlamaCppBackend
) -> None:
    service = ReportService(
        store, llama, timezone=str(TZ), window_s=600, intent_mode="parser-first",
        answer_budget_s=0.001,
    )  # fmt: skip
    plain = ReportService(store, None, timezone=str(TZ), window_s=600)
    question = "How was the air in harbour yesterday?"
    first = service.ask(question, NOW)
    assert first.narrative.source == "deterministic"
    assert "time budget" in (first.narrative.fallback_reason or "")
    # the same text the fixed writer gives: nothing is lost to the budget
    assert first.text == plain.ask(question, NOW).text
    started = time.monotonic()
    second = service.ask(question, NOW)
    assert "budget less than" in (second.narrative.fallback_reason or "")
    assert time.monotonic() - started < 3.0
