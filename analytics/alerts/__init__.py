"""Alerts: rules on what the central service computes, signed webhook delivery.

:mod:`.config` (the ``[alerts]`` settings), :mod:`.rules` (what each rule reads from the
store), :mod:`.engine` (findings to alerts: de-duplication, cooldown, resolve),
:mod:`.state` (the SQLite state file and delivery queue), :mod:`.delivery` (signed
webhooks with retry) and :mod:`.routes` (``GET /api/v1/alerts``). See docs/alerts.md.
"""
