"""``civicmesh ask`` and ``civicmesh reports ...`` (``civicmesh eval``: ``demo.evaluate``)."""

from __future__ import annotations

import argparse
import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from analytics.app import service_for
from analytics.reports.intent import IntentError
from analytics.reports.service import (
    ReportService,
    generate_due,
    record_dict,
    to_record,
)
from analytics.settings import AnalyticsSettings
from analytics.store import open_store
from analytics.store.base import Store
from civicmesh.config import load_settings

log = logging.getLogger(__name__)


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
