"""``civicmesh accounting score --day YYYY-MM-DD [--json]``: the day's quality scores."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from analytics.accounting.load import load_day, parse_day
from analytics.accounting.model import DayScores
from analytics.accounting.rules import AccountingRule
from analytics.accounting.score import score_day
from analytics.settings import AnalyticsSettings
from analytics.store import open_existing_store
from civicmesh.config import load_settings
from civicmesh.errors import CivicmeshError
from civicmesh.registry import Registry


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``accounting`` command group."""
    accounting = sub.add_parser("accounting", help="contributor accounting: data-quality scores")
    actions = accounting.add_subparsers(dest="accounting_command", metavar="ACTION", required=True)
    score = actions.add_parser(
        "score",
        help="score every device's day from the store and the registry (docs/accounting.md)",
    )
    score.add_argument("--day", required=True, help="UTC day, YYYY-MM-DD")
    score.add_argument("--json", action="store_true", help="print the scores as JSON")
    score.add_argument("--config", type=Path, help="TOML settings file (optional)")
    score.add_argument("--database-url", help="store URL (overrides database_url)")
    score.add_argument("--registry", type=Path, help="registry JSON (overrides registry_file)")
    score.set_defaults(func=_score)


def scores_for_day(store: Any, registry: Registry | None, day: str) -> DayScores:
    """Load the day and score it under the current rule (what the API serves too)."""
    day_start = parse_day(day)
    return score_day(load_day(store, day_start, registry), day_start, AccountingRule())


def _score(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.database_url:
        overrides["database_url"] = args.database_url
    if args.registry:
        if not args.registry.exists():
            print(f"civicmesh accounting score: no registry file {args.registry}", file=sys.stderr)
            return 2
        overrides["registry_file"] = args.registry
    try:
        parse_day(args.day)
        settings = load_settings(AnalyticsSettings, args.config, overrides)
        registry = (
            Registry.load(settings.registry_file) if settings.registry_file.exists() else None
        )
        store = open_existing_store(settings.database_url)
    except (ValueError, CivicmeshError) as exc:
        print(f"civicmesh accounting score: {exc}", file=sys.stderr)
        return 2
    try:
        scores = scores_for_day(store, registry, args.day)
    except CivicmeshError as exc:
        print(f"civicmesh accounting score: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    if args.json:
        print(json.dumps(scores.to_dict(), indent=2))
    else:
        print(render_text(scores))
    return 0


def render_text(scores: DayScores) -> str:
    lines = [f"Accounting {scores.day} under rule {scores.rule_id}: {len(scores.devices)} devices"]
    for device in sorted(scores.devices, key=lambda d: (-d.score, d.device_id)):
        state = "rewarded" if device.rewarded else f"not rewarded: {device.not_rewarded_because}"
        owner = f" ({device.owner})" if device.owner else ""
        lines.append(f"{device.device_id}{owner}  score {device.score:.3f}  {state}")
        lines.extend(f"    {loss.text(scores.day_start_ms)}" for loss in device.losses)
    return "\n".join(lines)
