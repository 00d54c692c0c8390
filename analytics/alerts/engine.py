"""The alert engine: rules evaluated on the store, findings turned into alerts.

One open alert per (rule, subject). A finding that fires opens one (unless the rule's
cooldown since the last one of that subject has not passed); while an alert is open its
evidence is refreshed silently; when the condition no longer holds it resolves. Opening
and resolving each queue one event per contact point in the same transaction, and the
:class:`~analytics.alerts.delivery.Deliverer` sends them on its own thread.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from analytics.alerts.config import AlertRule, AlertSettings
from analytics.alerts.delivery import Deliverer, WebhookSender
from analytics.alerts.rules import Finding, evaluate
from analytics.alerts.state import AlertLog, AlertRecord, AlertStateError
from analytics.store.base import Store, StoreError
from civicmesh.errors import CivicmeshError, ConfigError

log = logging.getLogger(__name__)

BODY_VERSION = 1
DAY_MS = 86_400_000
PRUNE_EVERY_MS = 3_600_000


@dataclass(frozen=True, slots=True)
class Evaluation:
    """What one evaluation changed."""

    opened: tuple[str, ...]  # "rule_id/subject"
    resolved: tuple[str, ...]
    suppressed: tuple[str, ...]  # would have opened, but inside the rule's cooldown
    failed_rules: tuple[str, ...]


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def alert_json(alert: AlertRecord, public_url: str = "") -> dict[str, Any]:
    """An alert as the API and the webhooks show it."""
    return {
        "id": alert.id,
        "rule_id": alert.rule_id,
        "kind": alert.kind,
        "severity": alert.severity,
        "subject": alert.subject,
        "state": alert.state,
        "summary": alert.summary,
        "since": _iso(alert.since_ms),
        "opened": _iso(alert.opened_ms),
        "updated": _iso(alert.updated_ms),
        "resolved": _iso(alert.resolved_ms),
        "evidence": alert.evidence,
        "time_range": {"start": _iso(alert.start_ms), "end": _iso(alert.end_ms)},
        "link": public_url.rstrip("/") + alert.link if alert.link else None,
    }


class AlertEngine:
    """Evaluates ``settings.rules`` and owns the delivery thread."""

    def __init__(
        self, settings: AlertSettings, alert_log: AlertLog, senders: dict[str, WebhookSender],
        *, public_url: str = "",
    ) -> None:  # fmt: skip
        self.settings = settings
        self.log = alert_log
        self.senders = senders
        self.public_url = public_url
        self.deliverer = Deliverer(alert_log, senders)
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._last_prune_ms = 0

    def start(self) -> None:
        self.deliverer.start()

    def stop(self) -> None:
        self.deliverer.stop()

    def close(self) -> None:
        self.stop()
        self.log.close()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            counts = dict(self._counts)
        return {**counts, **{f"delivery.{k}": v for k, v in self.deliverer.stats().items()}}

    def evaluate(self, store: Store, now_ms: int) -> Evaluation:
        """Evaluate every rule at ``now_ms``; StoreError (the database is down) propagates,
        a rule that fails otherwise is counted and logged and the others still run."""
        opened: list[str] = []
        resolved: list[str] = []
        suppressed: list[str] = []
        failed: list[str] = []
        for rule in self.settings.rules:
            try:
                findings = evaluate(store, rule, now_ms)
            except StoreError:
                raise
            except (CivicmeshError, ValueError, ArithmeticError) as exc:
                failed.append(rule.id)
                self._count("rule_errors")
                log.warning("alert rule %r could not be evaluated: %s", rule.id, exc)
                continue
            changes = self._apply(rule, findings, now_ms)
            opened += changes[0]
            resolved += changes[1]
            suppressed += changes[2]
        if opened or resolved:
            self.deliverer.wake()
            log.info("alerts opened: %s; resolved: %s", opened or "-", resolved or "-")
        if now_ms - self._last_prune_ms >= PRUNE_EVERY_MS:
            self._last_prune_ms = now_ms
            self.log.prune(now_ms - int(self.settings.history_days * DAY_MS))
        self._count("evaluations")
        return Evaluation(tuple(opened), tuple(resolved), tuple(suppressed), tuple(failed))

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def _contact_points(self, rule: AlertRule) -> list[str]:
        return list(rule.contact_points) or [c.name for c in self.settings.contact_points]

    def _apply(
        self, rule: AlertRule, findings: list[Finding], now_ms: int
    ) -> tuple[list[str], list[str], list[str]]:
        opened: list[str] = []
        resolved: list[str] = []
        suppressed: list[str] = []
        cooldown_ms = int(rule.cooldown_s * 1000)
        with self.log.transaction() as conn:
            open_ids = {
                subject: alert_id
                for alert_id, subject in conn.execute(
                    "SELECT id, subject FROM alerts WHERE rule_id = ? AND state = 'open'",
                    (rule.id,),
                )
            }
            for f in findings:
                name = f"{rule.id}/{f.subject}"
                alert_id = open_ids.get(f.subject)
                if alert_id is not None and f.holds:
                    conn.execute(
                        "UPDATE alerts SET updated_ms = ?, summary = ?, evidence_json = ?, "
                        "end_ms = ? WHERE id = ?",
                        (now_ms, f.summary, json.dumps(f.evidence), f.end_ms, alert_id),
                    )
                elif alert_id is not None:
                    self._resolve(conn, rule, alert_id, f, now_ms)
                    resolved.append(name)
                elif f.fires:
                    (last_resolved,) = conn.execute(
                        "SELECT max(resolved_ms) FROM alerts WHERE rule_id = ? AND subject = ?",
                        (rule.id, f.subject),
                    ).fetchone()
                    if last_resolved is not None and now_ms - last_resolved < cooldown_ms:
                        suppressed.append(name)
                        continue
                    self._open(conn, rule, f, now_ms)
                    opened.append(name)
        self._count("opened", len(opened))
        self._count("resolved", len(resolved))
        self._count("suppressed_by_cooldown", len(suppressed))
        return opened, resolved, suppressed

    def _open(self, conn: Any, rule: AlertRule, f: Finding, now_ms: int) -> None:
        cursor = conn.execute(
            "INSERT INTO alerts (rule_id, kind, severity, subject, state, since_ms, opened_ms, "
            "updated_ms, summary, evidence_json, start_ms, end_ms, link) "
            "VALUES (?, ?, ?, ?, 'open', ?, ?, ?, ?, ?, ?, ?, ?)",
            (rule.id, rule.kind, rule.severity, f.subject, f.since_ms, now_ms, now_ms,
             f.summary, json.dumps(f.evidence), f.start_ms, f.end_ms, f.link),
        )  # fmt: skip
        self._queue(conn, rule, int(cursor.lastrowid), "firing", now_ms)

    def _resolve(self, conn: Any, rule: AlertRule, alert_id: int, f: Finding, now_ms: int) -> None:
        (evidence_json,) = conn.execute(
            "SELECT evidence_json FROM alerts WHERE id = ?", (alert_id,)
        ).fetchone()
        evidence = {**json.loads(evidence_json), "at_resolve": f.evidence}
        conn.execute(
            "UPDATE alerts SET state = 'resolved', resolved_ms = ?, updated_ms = ?, "
            "evidence_json = ?, end_ms = ? WHERE id = ?",
            (now_ms, now_ms, json.dumps(evidence), now_ms, alert_id),
        )
        self._queue(conn, rule, alert_id, "resolved", now_ms)

    def _queue(self, conn: Any, rule: AlertRule, alert_id: int, event: str, now_ms: int) -> None:
        row = conn.execute(
            "SELECT id, rule_id, kind, severity, subject, state, since_ms, opened_ms, "
            "updated_ms, resolved_ms, summary, evidence_json, start_ms, end_ms, link "
            "FROM alerts WHERE id = ?",
            (alert_id,),
        ).fetchone()
        values = list(row)
        values[11] = json.loads(values[11])
        alert = AlertRecord(*values)
        body = json.dumps(
            {
                "version": BODY_VERSION,
                "event": event,
                "alert": alert_json(alert, self.public_url),
                "source": "civicmesh",
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
        conn.executemany(
            "INSERT INTO deliveries (alert_id, event, contact_point, body, created_ms, "
            "next_attempt_ms) VALUES (?, ?, ?, ?, ?, 0)",
            [(alert_id, event, name, body, now_ms) for name in self._contact_points(rule)],
        )


def build_engine(settings: AlertSettings) -> AlertEngine | None:
    """The engine ``settings`` describe, with its state file open; None without rules.
    ConfigError names a contact point whose secret cannot be read."""
    if not settings.rules:
        return None
    senders = {}
    for point in settings.contact_points:
        try:
            senders[point.name] = WebhookSender(point, point.key())
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    try:
        alert_log = AlertLog(settings.state_file)
    except AlertStateError as exc:
        raise ConfigError(f"alerts.state_file: {exc}") from None
    return AlertEngine(settings, alert_log, senders, public_url=settings.public_url)
