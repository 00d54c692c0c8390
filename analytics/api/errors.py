"""One readable line for a request the API cannot take (422), instead of pydantic's
list of error objects: ``start: not a date and time; write ISO 8601, e.g.
2026-12-08T09:00:00Z``. The objects stay under ``errors`` for programs."""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

ISO_EXAMPLE = "2026-12-08T09:00:00Z"
_CHOICES = re.compile(r"^\^\(([^()]*)\)\$$")  # a pattern like ^(raw|1m|1h|1d)$
_WHERE = ("query", "body", "path", "header")


def describe(error: dict[str, Any]) -> str:
    """``name: what is wrong, and what to write`` for one pydantic error."""
    where = ".".join(str(p) for p in error.get("loc", ()) if p not in _WHERE) or "request"
    kind = str(error.get("type", ""))
    ctx = error.get("ctx") or {}
    if kind.startswith(("datetime", "date")):
        return f"{where}: not a date and time; write ISO 8601, e.g. {ISO_EXAMPLE}"
    if kind == "string_pattern_mismatch":
        choices = _CHOICES.match(str(ctx.get("pattern", "")))
        if choices:
            return f"{where}: must be one of {', '.join(choices.group(1).split('|'))}"
    if kind == "missing":
        return f"{where}: required"
    if kind == "json_invalid":
        return "the body is not valid JSON"
    return f"{where}: {error.get('msg', 'invalid')}"


def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    return JSONResponse(
        {"detail": "; ".join(describe(e) for e in errors), "errors": jsonable_encoder(errors)},
        status_code=422,
    )


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _invalid_request)
