"""``civicmesh ask``, ``civicmesh reports ...`` and ``civicmesh eval ask | reports``."""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from analytics.reports.evaluate import (
    QuestionSet,
    load_questions,
    percentile,
    score_intents,
)
from analytics.reports.intent import IntentError
from analytics.reports.llm import LlmBackend, LlmError
from analytics.reports.narrative import check_numbers
from analytics.reports.service import (
    ReportService,
    generate_due,
    merge_sheets,
    record_dict,
    to_record,
)
from analytics.settings import AnalyticsSettings
from analytics.store import open_store
from analytics.store.base import Store
from civicmesh.config import load_settings

log = logging.getLogger(__name__)

EVAL_SEED = 7
EVAL_DAYS = 80  # the question set reaches back to September (for "the month before")
EVAL_DEVICES = 12
EVAL_STEP_MS = 600_000


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ask = sub.add_parser("ask", help="answer a question about air quality or traffic")
    ask.add_argument("question", help="the question, in quotes")
    _common(ask)
    ask.add_argument("--now", help="answer as if asked at this ISO time (default: now)")
    ask.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    ask.set_defaults(func=_ask)

    reports = sub.add_parser("reports", help="daily and weekly reports")
    cmds = reports.add_subparsers(dest="reports_command", metavar="ACTION", required=True)
    gen = cmds.add_parser("generate", help="write and store one report now")
    _common(gen)
    gen.add_argument("--kind", choices=("daily", "weekly"), default="daily")
    gen.add_argument("--zone", help="a zone (default: the whole city)")
    gen.add_argument("--end", help="the report covers the day or week before this ISO time")
    gen.set_defaults(func=_generate)
    due = cmds.add_parser("due", help="write every report whose period has ended")
    _common(due)
    due.set_defaults(func=_due)
    show = cmds.add_parser("list", help="print stored reports")
    _common(show)
    show.add_argument("--scope")
    show.add_argument("--kind", choices=("daily", "weekly"))
    show.add_argument("--limit", type=int, default=10)
    show.set_defaults(func=_list)

    ev = sub.add_parser("eval", help="evaluate the report API and the reports")
    ev_cmds = ev.add_subparsers(dest="eval_command", metavar="WHAT", required=True)
    for name, func, text in (
        ("ask", _eval_ask, "intent accuracy, faithfulness and latency of /ask"),
        ("reports", _eval_reports, "faithfulness and latency of daily and weekly reports"),
    ):
        p = ev_cmds.add_parser(name, help=text)
        p.add_argument("--llm-backend", choices=("llama-cpp", "openai", "none"))
        p.add_argument("--llm-url", help="endpoint for --llm-backend openai")
        p.add_argument("--model-path", type=Path, help="a GGUF file for llama-cpp")
        p.add_argument("--questions", help="question set JSON (default: the shipped one)")
        p.add_argument("--limit", type=int, help="only the first N questions")
        p.add_argument("--json", action="store_true", help="print the figures as JSON")
        p.set_defaults(func=func)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML settings file (optional)")
    parser.add_argument("--database-url", help="store URL (overrides database_url)")
    parser.add_argument("--llm-backend", choices=("llama-cpp", "openai", "none"))


def _settings(args: argparse.Namespace) -> AnalyticsSettings:
    overrides: dict[str, Any] = {}
    if getattr(args, "database_url", None):
        overrides["database_url"] = args.database_url
    reports: dict[str, Any] = {}
    if getattr(args, "llm_backend", None):
        reports["llm_backend"] = args.llm_backend
    if getattr(args, "llm_url", None):
        reports["llm_url"] = args.llm_url
    if getattr(args, "model_path", None):
        reports["model_path"] = args.model_path
    if reports:
        overrides["reports"] = reports
    return load_settings(AnalyticsSettings, getattr(args, "config", None), overrides)


def open_llm(settings: AnalyticsSettings) -> LlmBackend | None:
    """The configured model, or None (deterministic text, said so in every answer) when it
    cannot be loaded: a missing model must not stop the service."""
    try:
        return settings.reports.open_llm()
    except LlmError as exc:
        log.warning("no language model (%s): answers use the deterministic narrative", exc)
        return None


def service_for(settings: AnalyticsSettings, store: Store) -> ReportService:
    r = settings.reports
    return ReportService(
        store,
        open_llm(settings),
        timezone=r.timezone,
        window_s=r.window_s,
        intent_mode=r.intent_mode,
    )


def _with_service(args: argparse.Namespace) -> tuple[ReportService, Store]:
    settings = _settings(args)
    store = open_store(settings.database_url, timescaledb=settings.storage.timescaledb)
    store.migrate()
    return service_for(settings, store), store


def _ask(args: argparse.Namespace) -> int:
    service, store = _with_service(args)
    try:
        now = datetime.fromisoformat(args.now) if args.now else None
        try:
            answer = service.ask(args.question, now)
        except IntentError as exc:
            print(f"civicmesh: cannot answer ({exc.code}): {exc}")
            if exc.suggestions:
                print("closest known: " + ", ".join(exc.suggestions))
            return 2
        if args.json:
            print(json.dumps(answer.to_dict(), indent=2, ensure_ascii=False))
            return 0
        print(answer.text)
        if answer.narrative.source != "llm":
            print(f"[deterministic text: {answer.narrative.fallback_reason}]")
        print()
        for fact in answer.facts_used():
            print(f"  {fact['id']:<36} {fact['text']:<24} {fact['start']} .. {fact['end']}")
    finally:
        store.close()
    return 0


def _generate(args: argparse.Namespace) -> int:
    service, store = _with_service(args)
    try:
        end = datetime.fromisoformat(args.end) if args.end else None
        record = to_record(service.report(args.kind, args.zone, end))
        record_id = store.save_report(record)
        print(f"report {record_id} ({record.narrative_source}): {record.text}")
    finally:
        store.close()
    return 0


def _due(args: argparse.Namespace) -> int:
    service, store = _with_service(args)
    try:
        written = generate_due(service)
        print(f"{len(written)} reports written")
    finally:
        store.close()
    return 0


def _list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    store = open_store(settings.database_url, timescaledb=settings.storage.timescaledb)
    try:
        store.migrate()
        for record in store.reports(scope=args.scope, kind=args.kind, limit=args.limit):
            item = record_dict(record)
            print(
                f"#{item['id']} {item['kind']} {item['scope']} {item['period_start']}: "
                f"{item['text']}"
            )
    finally:
        store.close()
    return 0


# --------------------------------------------------------------------- evaluation


def eval_store(qs: QuestionSet, directory: Path) -> Store:
    """A SQLite store holding the simulated city's history up to the question set's now."""
    from civicmesh.simhistory import fill_store
    from firmware_sim.city import SimulatedCity

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


def _eval_ask(args: argparse.Namespace) -> int:
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


def _eval_reports(args: argparse.Namespace) -> int:
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
