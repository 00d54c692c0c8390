"""Sign-in for the dashboard: users with roles, scrypt password hashes, signed sessions.

Users live in a JSON file (``civicmesh dashboard add-user``): name, role and an scrypt
hash, never a password. A session is a cookie holding the user, role, expiry and a
random session id with an HMAC-SHA256 over them (logout revokes the id); the key comes
from the settings (environment or a secrets file), or is made at start-up, in which
case sessions end with the process.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from civicmesh.errors import CivicmeshError

ROLES = ("viewer", "operator", "admin")
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
COOKIE = "civicmesh_session"
MAX_NAME = 64


class AuthError(CivicmeshError):
    reason = "auth.invalid"


def role_allows(role: str, needed: str) -> bool:
    """Roles are ordered: an admin may do what an operator may, and so on."""
    return ROLES.index(role) >= ROLES.index(needed)


def hash_password(password: str, salt: bytes | None = None) -> str:
    if len(password) < 8:
        raise AuthError("A password needs at least 8 characters")
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32
    )
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(
            password.encode(),
            salt=bytes.fromhex(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(bytes.fromhex(digest)),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, bytes.fromhex(digest))


@dataclass(frozen=True, slots=True)
class User:
    name: str
    role: str
    password_hash: str

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > MAX_NAME or not self.name.isprintable():
            raise AuthError(f"Invalid user name {self.name[:MAX_NAME]!r}")
        if self.role not in ROLES:
            raise AuthError(f"Unknown role {self.role!r}; use {', '.join(ROLES)}")


class UserFile:
    """The users JSON file, re-read when it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._users: dict[str, User] = {}

    def users(self) -> dict[str, User]:
        with self._lock:
            try:
                stat = self.path.stat()
            except FileNotFoundError:
                return {}
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                self._users = {
                    u["name"]: User(u["name"], u["role"], u["password_hash"])
                    for u in data.get("users", [])
                }
                self._stamp = stamp
            return dict(self._users)

    def add(self, name: str, role: str, password: str) -> User:
        user = User(name, role, hash_password(password))
        users = self.users()
        users[name] = user
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        body = {
            "users": [
                {"name": u.name, "role": u.role, "password_hash": u.password_hash}
                for u in sorted(users.values(), key=lambda u: u.name)
            ]
        }
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(body, handle, indent=2)
        tmp.replace(self.path)
        return user

    def authenticate(self, name: str, password: str) -> User | None:
        user = self.users().get(name)
        if user is None:
            # Same work either way, so timing does not tell which names exist.
            check_password(password, _DUMMY_HASH)
            return None
        return user if check_password(password, user.password_hash) else None


_DUMMY_HASH = hash_password("not-a-real-password", b"\0" * 16)


@dataclass(frozen=True, slots=True)
class Session:
    user: str
    role: str
    expires: int  # epoch seconds
    session_id: str = ""


class SessionSigner:
    """Signed session cookies, each with its own id; a signed-out id is refused until the
    session would have expired anyway (the revocation list forgets it then)."""

    def __init__(self, key: bytes | None, lifetime_s: int = 12 * 3600) -> None:
        self._key = key or secrets.token_bytes(32)
        self._lifetime = lifetime_s
        self._revoked: dict[str, int] = {}  # session id -> its expiry (epoch s)
        self._lock = threading.Lock()

    def issue(self, user: User) -> str:
        session = {
            "u": user.name,
            "r": user.role,
            "e": int(time.time()) + self._lifetime,
            "i": secrets.token_urlsafe(16),
        }
        body = base64.urlsafe_b64encode(json.dumps(session).encode()).decode().rstrip("=")
        return f"{body}.{self._mac(body)}"

    def revoke(self, cookie: str | None) -> bool:
        """Sign a session out for good (logout); False when the cookie is no session."""
        session = self.read(cookie)
        if session is None:
            return False
        now = int(time.time())
        with self._lock:
            self._revoked = {i: e for i, e in self._revoked.items() if e >= now}
            self._revoked[session.session_id] = session.expires
        return True

    def read(self, cookie: str | None) -> Session | None:
        if not cookie or "." not in cookie or len(cookie) > 1024:
            return None
        body, mac = cookie.rsplit(".", 1)
        if not hmac.compare_digest(mac, self._mac(body)):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            session = Session(str(data["u"]), str(data["r"]), int(data["e"]), str(data["i"]))
        except (ValueError, KeyError, TypeError):
            return None  # (cookies without an id, made before ids, are refused too)
        if session.expires < time.time() or session.role not in ROLES:
            return None
        with self._lock:
            if session.session_id in self._revoked:
                return None
        return session

    def _mac(self, body: str) -> str:
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()
