"""``civicmesh eval ask | reports``: the report API and the reports against a simulated city.

The evaluation harness, kept out of the central service: it fills a throw-away SQLite
store with the simulated city's history (``demo.history``) up to the question set's
"now" and scores the same ``ReportService`` the API uses. The question sets and the
scoring live with the reports (``analytics.reports.evaluate``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from analytics.app import open_llm
from analytics.reports.evaluate import QuestionSet, load_questions, percentile, score_intents
from analytics.reports.intent import IntentError
from analytics.reports.narrative import check_numbers
from analytics.reports.service import ReportService, merge_sheets, to_record
from analytics.settings import AnalyticsSettings
from analytics.store import open_store
from analytics.store.base import Store
from civicmesh.config import load_settings
from demo.history import fill_store
from firmware_sim.city import SimulatedCity

EVAL_SEED = 7
EVAL_DAYS = 80  # the question set reaches back to September (for "the month before")
EVAL_DEVICES = 12
EVAL_STEP_MS = 600_000


def _settings(args: argparse.Namespace) -> AnalyticsSettings:
    reports: dict[str, Any] = {}
    for option in ("llm_backend", "llm_url", "model_path"):
        if getattr(args, option, None):
            reports[option] = getattr(args, option)
    return load_settings(AnalyticsSettings, None, {"reports": reports} if reports else {})


def eval_store(qs: QuestionSet, directory: Path) -> Store:
    """A SQLite store holding the simulated city's history up to the question set's now."""
    store = open_store(f"sqlite:///{directory / 'eval.db'}")
    store.migrate()
    city = SimulatedCity.generate(EVAL_SEED, devices=EVAL_DEVICES, zones=len(qs.zones))
    names = sorted(z.name for z in city.zones)
    if names != sorted(qs.zones):
        raise ValueError(f"the question set's zones {sorted(qs.zones)} are not the city's {names}")
    now_ms = int(qs.now.timestamp() * 1000)
    fill_store(store, city, now_ms - EVAL_DAYS * 86_400_000, now_ms, step_ms=EVAL_STEP_MS)
    return store


def _eval_service(args: argparse.Namespace, qs: QuestionSet, store: Store) -> ReportService:
    settings = _settings(args)
    llm = open_llm(settings)
    return ReportService(
        store,
        llm,
        timezone=qs.timezone,
        window_s=EVAL_STEP_MS // 1000,
        intent_mode=settings.reports.intent_mode,
    )


def eval_ask(args: argparse.Namespace) -> int:
    qs = load_questions(args.questions)
    with tempfile.TemporaryDirectory(prefix="civicmesh-eval-") as tmp:
        started = time.perf_counter()
        store = eval_store(qs, Path(tmp))
        fill_s = time.perf_counter() - started
        service = _eval_service(args, qs, store)
        try:
            figures: dict[str, Any] = {"questions": len(qs.questions[: args.limit or None])}
            figures["store_fill_s"] = round(fill_s, 1)
            figures["model"] = service.llm.model_name if service.llm else None
            modes = ["parser"] + (["llm-first", "parser-first"] if service.llm else [])
            for mode in modes:
                service.intent_mode = mode
                score = score_intents(qs, lambda q: service.intent(q, qs.now), limit=args.limit)
                figures[f"intent_{mode}"] = {
                    "accuracy": round(score.accuracy, 4),
                    "correct": score.correct,
                    # kind, metrics, places, period and error only (schema v1's fields)
                    "accuracy_v1_fields": round(score.accuracy_v1, 4),
                    "correct_v1_fields": score.correct_v1,
                    "by_class": {k: f"{c}/{n}" for k, (c, n) in (score.by_class or {}).items()},
                    "llm_intents_used": score.llm_used,
                    "p50_s": round(percentile(score.seconds, 50), 4),
                    "p95_s": round(percentile(score.seconds, 95), 4),
                    "failures": score.failures[:20],
                }
            service.intent_mode = _settings(args).reports.intent_mode
            figures["answers"] = _answer_figures(service, qs, args.limit)
        finally:
            store.close()
    _print(figures, args.json)
    return 0


def _answer_figures(service: ReportService, qs: QuestionSet, limit: int | None) -> dict[str, Any]:
    seconds, sources = [], {"llm": 0, "deterministic": 0}
    numbers_checked = unfaithful = refused = 0
    fallbacks: dict[str, int] = {}
    for item in qs.questions[:limit] if limit else qs.questions:
        started = time.perf_counter()
        try:
            answer = service.ask(item["q"], qs.now)
        except IntentError:
            seconds.append(time.perf_counter() - started)
            refused += 1
            continue
        seconds.append(time.perf_counter() - started)
        sources[answer.narrative.source] += 1
        reason = answer.narrative.fallback_reason
        if reason:
            key = reason.split(":")[0]
            fallbacks[key] = fallbacks.get(key, 0) + 1
        names = [s.scope for s in answer.sheets] + [s.period_text() for s in answer.sheets]
        merged = merge_sheets(answer.sheets, [f"s{i}" for i in range(len(answer.sheets))])
        extra_facts = [f.text for f in merged.facts] + [f.text for f in answer.derived]
        numbers_checked += 1
        if check_numbers(answer.text, merged, extra=names + extra_facts + list(qs.zones)):
            unfaithful += 1
    return {
        "answered": numbers_checked,
        "refused_or_422": refused,
        "narrative_sources": sources,
        "fallback_reasons": fallbacks,
        "texts_with_a_number_not_in_the_facts": unfaithful,
        "p50_s": round(percentile(seconds, 50), 3),
        "p95_s": round(percentile(seconds, 95), 3),
        "max_s": round(max(seconds), 3) if seconds else None,
    }


def eval_reports(args: argparse.Namespace) -> int:
    qs = load_questions(args.questions)
    with tempfile.TemporaryDirectory(prefix="civicmesh-eval-") as tmp:
        store = eval_store(qs, Path(tmp))
        service = _eval_service(args, qs, store)
        figures: dict[str, Any] = {"model": service.llm.model_name if service.llm else None}
        try:
            for kind in ("daily", "weekly"):
                seconds, sources, unfaithful, count = [], {"llm": 0, "deterministic": 0}, 0, 0
                zone_seconds = []
                for zone in [None, *service.zones()]:
                    report = service.report(kind, zone, qs.now)
                    store.save_report(to_record(report))
                    count += 1
                    seconds.append(report.seconds)
                    if zone is not None:
                        zone_seconds.append(report.seconds)
                    sources[report.narrative.source] += 1
                    if check_numbers(report.text, report.sheet):
                        unfaithful += 1
                figures[kind] = {
                    "reports": count,
                    "narrative_sources": sources,
                    "texts_with_a_number_not_in_the_facts": unfaithful,
                    "p50_s": round(percentile(seconds, 50), 3),
                    "max_s": round(max(seconds), 3),
                    "zone_max_s": round(max(zone_seconds), 3) if zone_seconds else None,
                }
            figures["stored_reports"] = len(store.reports(limit=500))
        finally:
            store.close()
    _print(figures, args.json)
    return 0


def _print(figures: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(figures, indent=2, ensure_ascii=False))
        return
    for key, value in figures.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                if k == "failures":
                    for q, why in v:
                        print(f"    miss: {q!r} -> {why}")
                else:
                    print(f"    {k}: {v}")
        else:
            print(f"{key}: {value}")
