"""API tokens with roles, rate limits and request size limits for ``/api/v1``.

Tokens are random strings handed out once (``civicmesh api add-token``); the tokens file
keeps only their SHA-256, a name and a role (viewer < operator < admin). A request
carries ``Authorization: Bearer <token>``. Every route needs at least viewer; routes that
change state or show raw payloads need operator or admin (see ``ROUTE_ROLES`` in the
tests' authorization matrix). Without a tokens file (development) the API is open.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Depends, HTTPException, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from civicmesh.errors import CivicmeshError

ROLES = ("viewer", "operator", "admin")
TOKEN_PREFIX = "cm_"


class TokenError(CivicmeshError):
    reason = "api.token"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ApiToken:
    name: str
    role: str
    sha256: str


class TokenFile:
    """The tokens file, re-read when it changes (a revoked token stops at once)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._by_hash: dict[str, ApiToken] = {}

    def tokens(self) -> dict[str, ApiToken]:
        with self._lock:
            try:
                stat = self.path.stat()
            except FileNotFoundError:
                self._by_hash, self._stamp = {}, None
                return {}
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                tokens = [ApiToken(t["name"], t["role"], t["sha256"]) for t in data["tokens"]]
                for t in tokens:
                    if t.role not in ROLES:
                        raise TokenError(
                            f"{self.path}: token {t.name!r} has unknown role {t.role!r}"
                        )
                self._by_hash = {t.sha256: t for t in tokens}
                self._stamp = stamp
            return dict(self._by_hash)

    def authenticate(self, token: str) -> ApiToken | None:
        digest = _digest(token)
        for known, record in self.tokens().items():
            if hmac.compare_digest(known, digest):
                return record
        return None

    def add(self, name: str, role: str) -> str:
        """A new token for ``name`` (replacing its old one); the token itself is returned
        once and never stored."""
        if role not in ROLES:
            raise TokenError(f"Unknown role {role!r}; use {', '.join(ROLES)}")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        kept = [t for t in self.tokens().values() if t.name != name]
        kept.append(ApiToken(name, role, _digest(token)))
        self._write(kept)
        return token

    def revoke(self, name: str) -> bool:
        tokens = self.tokens().values()
        kept = [t for t in tokens if t.name != name]
        self._write(kept)
        return len(kept) != len(tokens)

    def _write(self, tokens: list[ApiToken]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "tokens": [
                {"name": t.name, "role": t.role, "sha256": t.sha256}
                for t in sorted(tokens, key=lambda t: t.name)
            ]
        }
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(body, handle, indent=2)
        tmp.replace(self.path)


class RateLimiter:
    """A token bucket per caller: ``rate`` requests a second, bursts up to ``burst``."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def exhausted(self, key: str) -> bool:
        """Would the next request of ``key`` be refused? (Takes nothing from its bucket.)"""
        now = time.monotonic()
        with self._lock:
            level, last = self._buckets.get(key, (float(self.burst), now))
        return min(float(self.burst), level + (now - last) * self.rate) < 1.0

    def level(self, key: str) -> float:
        """Requests ``key`` may make at once now (the bucket's level; takes nothing):
        what the OpenAQ routes report in their ``x-ratelimit-*`` headers."""
        now = time.monotonic()
        with self._lock:
            level, last = self._buckets.get(key, (float(self.burst), now))
        return min(float(self.burst), level + (now - last) * self.rate)

    def allow(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            level, last = self._buckets.get(key, (float(self.burst), now))
            level = min(float(self.burst), level + (now - last) * self.rate)
            if level < 1.0:
                self._buckets[key] = (level, now)
                return False
            self._buckets[key] = (level - 1.0, now)
            if len(self._buckets) > 100_000:  # forget idle callers
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 60}
            return True


def _failure_limiter() -> RateLimiter:
    # Wrong tokens from one address: 10 at once, then one every 10 s. Guessing a 256-bit
    # token is hopeless anyway; this keeps a guesser from costing the API anything.
    return RateLimiter(0.1, 10)


@dataclass
class ApiSecurity:
    tokens: TokenFile | None
    limiter: RateLimiter
    failures: RateLimiter = field(default_factory=_failure_limiter)

    @property
    def open(self) -> bool:
        return self.tokens is None


def requires(role: str) -> Any:
    """A dependency: the caller's token has at least ``role`` (or the API is open)."""

    def check(request: Request) -> ApiToken | None:
        security: ApiSecurity | None = getattr(request.app.state, "api_security", None)
        client = request.client.host if request.client else "?"
        if security is None:
            return None
        header = request.headers.get("authorization", "")
        token = None
        if security.tokens is not None:
            # The limiter comes before the 401: a caller that keeps sending wrong tokens
            # gets 429s, however the tokens look.
            if security.failures.exhausted(client):
                raise HTTPException(
                    429, "Too many failed sign-ins; wait a minute", headers={"Retry-After": "10"}
                )
            if not header.lower().startswith("bearer "):
                security.failures.allow(client)
                raise HTTPException(
                    401,
                    "Send Authorization: Bearer <token> (civicmesh api add-token)",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            token = security.tokens.authenticate(header[7:].strip())
            if token is None:
                security.failures.allow(client)
                raise HTTPException(
                    401, "Unknown or revoked token", headers={"WWW-Authenticate": "Bearer"}
                )
        if not security.limiter.allow(token.name if token else client):
            raise HTTPException(429, "Too many requests; slow down", headers={"Retry-After": "1"})
        if token is not None and ROLES.index(token.role) < ROLES.index(role):
            raise HTTPException(403, f"This needs the {role} role; the token is {token.role}")
        return token

    return Depends(check)


class BodyLimit:
    """ASGI middleware: bodies over ``max_bytes`` get 413 before a route reads them."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = JSONResponse(
            {"detail": f"Request body over {self.max_bytes} bytes"}, status_code=413
        )
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


class RejectNul:
    """ASGI middleware: a NUL in the path or a query parameter is a 400 with a clear
    message (no database refuses it later with its own text)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = _nul_problem(scope)
            if problem is not None:
                response = JSONResponse({"detail": problem}, status_code=400)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _nul_problem(scope: Scope) -> str | None:
    if "\x00" in str(scope.get("path", "")):
        return "The request path contains a NUL character"
    query = bytes(scope.get("query_string") or b"").decode("latin-1")
    for name, value in parse_qsl(query, keep_blank_values=True):
        if "\x00" in name or "\x00" in value:
            return f"Query parameter {name.replace(chr(0), '?')[:64]!r} contains a NUL character"
    return None


# The dashboard loads its own script, styles and data only: no inline code, no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
# FastAPI's /docs and /redoc pages are built from inline script and a CDN's files.
_DOC_PATHS = ("/docs", "/redoc")
HSTS = "max-age=31536000; includeSubDomains"


class SecurityHeaders:
    """ASGI middleware: CSP, X-Frame-Options, nosniff and Referrer-Policy on every HTTP
    response, and HSTS on those served over HTTPS."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = [
            (b"x-frame-options", b"DENY"),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
        ]
        path = str(scope.get("path", ""))
        if not path.startswith(_DOC_PATHS):
            extra.append((b"content-security-policy", CONTENT_SECURITY_POLICY.encode()))
        else:
            extra.append((b"content-security-policy", b"frame-ancestors 'none'"))
        if scope.get("scheme") == "https":
            extra.append((b"strict-transport-security", HSTS.encode()))

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = [
                    *message.get("headers", []),
                    *[(n, v) for n, v in extra if n not in names],
                ]
            await send(message)

        await self.app(scope, receive, with_headers)


Middleware = Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]
