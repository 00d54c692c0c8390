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
    ask = sub.add_parser(
        "ask",
        help="answer a question about air quality or traffic (no question: interactive)",
        description=(
            "Asks the running API when one answers at --url, else answers here; with no "
            "question, reads questions one a line and keeps the model loaded between them."
        ),
    )
    ask.add_argument("question", nargs="?", help="the question, in quotes")
    _common(ask)
    ask.add_argument(
        "--now", help="answer as if asked at this ISO time; without an offset, city time"
    )
    ask.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    ask.add_argument("--url", help="the API to ask (default: api.host and api.port)")
    ask.add_argument(
        "--local", action="store_true", help="answer in this process, never via the API"
    )
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
    from analytics.daemons import add_schedule

    add_schedule(cmds, _common, _settings)


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
    settings = _settings(args)
    if not args.local and args.question:
        url = args.url or f"http://{settings.api.host}:{settings.api.port}"
        remote = ask_api(url, args.question, args.now)
        if remote is not None:
            return _print_remote(remote, args.json)
    service, store = _with_service(args)
    try:
        if args.question:
            return _answer_one(service, args.question, args.now, args.json)
        print("civicmesh ask: one question a line; an empty line or Ctrl-D ends.")
        code = 0
        while True:
            try:
                question = input("> ").strip()
            except EOFError:
                break
            if not question:
                break
            code = _answer_one(service, question, args.now, args.json)
    finally:
        store.close()
    return code


def ask_api(url: str, question: str, now: str | None) -> dict[str, Any] | None:
    """The running API's answer, or None when no API answers at ``url``."""
    import os
    import urllib.error
    import urllib.request

    body = json.dumps({"question": question, **({"now": now} if now else {})}).encode()
    request = urllib.request.Request(
        url.rstrip("/") + "/api/v1/ask", body, {"Content-Type": "application/json"}
    )
    token = os.environ.get("CIVICMESH_API_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return {"status": response.status, **json.loads(response.read())}
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read())
        except ValueError:
            detail = {"detail": str(exc)}
        return {"status": exc.code, **detail}
    except (urllib.error.URLError, OSError):
        return None  # nothing listens there: answer locally


def _print_remote(answer: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print(json.dumps(answer, indent=2, ensure_ascii=False))
    elif answer.get("status") == 200:
        print(answer.get("text", ""))
    else:
        print(f"civicmesh: cannot answer ({answer.get('status')}): {answer.get('detail')}")
    return 0 if answer.get("status") == 200 else 2


def _answer_one(service: ReportService, question: str, now_text: str | None, as_json: bool) -> int:
    now = datetime.fromisoformat(now_text) if now_text else None
    try:
        answer = service.ask(question, now)
    except IntentError as exc:
        print(f"civicmesh: cannot answer ({exc.code}): {exc}")
        if exc.suggestions:
            print("closest known: " + ", ".join(exc.suggestions))
        return 2
    if as_json:
        print(json.dumps(answer.to_dict(), indent=2, ensure_ascii=False))
        return 0
    print(answer.text)
    if answer.narrative.source != "llm":
        print(f"[deterministic text: {answer.narrative.fallback_reason}]")
    print()
    for fact in answer.facts_used():
        print(f"  {fact['id']:<36} {fact['text']:<24} {fact['start']} .. {fact['end']}")
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
