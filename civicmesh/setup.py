"""``civicmesh setup central|gateway|edge|enrol``: make and check what a role needs.

Each role's steps live in its own package (``analytics.setup``, ``gateway.setup``,
``edge.setup``), imported only when that role is set up, so an edge-only install has
``civicmesh setup edge`` without the central service's dependencies. This module holds
what they share: writing files with the right mode and owner, the findings of
``--check``, and the command line. It imports no component.

Every step is idempotent: what exists is kept (a key is an identity, a CA signs every
certificate of the site) and only what is missing is made. ``--check`` changes nothing
and names each missing or unsafe item with the command that fixes it.
"""

from __future__ import annotations

import argparse
import base64
import grp
import importlib
import json
import os
import pwd
import stat
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from civicmesh.errors import CivicmeshError

SERVICE_USER = "civicmesh"

# role -> (module with ``setup(args) / check(args)``, the extra that installs it)
ROLES: dict[str, tuple[str, str]] = {
    "central": ("analytics.setup", "analytics"),
    "gateway": ("gateway.setup", "gateway"),
    "edge": ("edge.setup", "edge"),
    "enrol": ("analytics.setup", "analytics"),
}


class SetupError(CivicmeshError):
    reason = "setup.invalid"


@dataclass(frozen=True, slots=True)
class Finding:
    """One missing or unsafe item, and the command or edit that fixes it."""

    item: str
    problem: str
    fix: str

    def line(self) -> str:
        return f"  {self.item}: {self.problem}\n      fix: {self.fix}"


@dataclass
class Outcome:
    """What a run of ``setup`` made, kept and found (printed at the end)."""

    made: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def toml_str(value: str | Path) -> str:
    """A TOML basic string (JSON's escaping is valid TOML for these values)."""
    return json.dumps(str(value))


class SiteFiles:
    """Writes a role's files: secrets 0600 owned by the service user, the rest 0644.

    Ownership changes only when running as root and the user exists (a test or a
    trial run as an ordinary user keeps its own files)."""

    def __init__(self, owner: str | None, outcome: Outcome) -> None:
        self.outcome = outcome
        self.uid = self.gid = -1
        if owner and owner.isdigit() and os.geteuid() == 0:
            # a container's user (compose: user "10001:10001") need not exist on the host
            self.uid = self.gid = int(owner)
        elif owner and os.geteuid() == 0:
            try:
                entry = pwd.getpwnam(owner)
            except KeyError:
                outcome.notes.append(
                    f"user {owner!r} does not exist: files stay owned by root "
                    f"(create it: useradd --system {owner}, then run setup again)"
                )
            else:
                self.uid, self.gid = entry.pw_uid, entry.pw_gid

    def exists(self, path: Path, what: str) -> bool:
        if path.exists():
            self.outcome.kept.append(f"{what}: {path}")
            return True
        return False

    def directory(self, path: Path, mode: int = 0o755, *, owned: bool = False) -> None:
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, mode)
        if owned:
            self.own(path)

    def own(self, path: Path) -> None:
        if self.uid >= 0:
            os.chown(path, self.uid, self.gid)

    def secret(self, path: Path, data: bytes | str, what: str) -> bool:
        """Write ``data`` to ``path`` (mode 0600, the service user's) unless it exists."""
        if self.exists(path, what):
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = data.encode() if isinstance(data, str) else data
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(raw)
        os.chmod(path, 0o600)
        self.own(path)
        self.outcome.made.append(f"{what}: {path}")
        return True

    def public(self, path: Path, data: str, what: str, *, replace: bool = False) -> bool:
        """Write a non-secret file (mode 0644); ``replace`` rewrites a generated one."""
        if not replace and self.exists(path, what):
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(data, encoding="utf-8")
        os.chmod(tmp, 0o644)
        tmp.replace(path)
        self.outcome.made.append(f"{what}: {path}")
        return True

    def made_by(self, path: Path, what: str, make: Callable[[], object]) -> bool:
        """Run ``make`` (which writes ``path``) unless ``path`` exists."""
        if self.exists(path, what):
            return False
        make()
        self.outcome.made.append(f"{what}: {path}")
        return True


def check_secret(path: Path, what: str, fix_missing: str, owner: str | None) -> list[Finding]:
    """A secret file must exist, be readable by its owner only, and belong to ``owner``."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return [Finding(f"{what} ({path})", "missing", fix_missing)]
    findings = []
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        readable = "world-readable" if info.st_mode & stat.S_IROTH else "group-accessible"
        findings.append(
            Finding(
                f"{what} ({path})",
                f"{readable} (mode {info.st_mode & 0o777:04o})",
                f"chmod 600 {path}",
            )
        )
    if owner and os.geteuid() == 0:
        try:
            uid = int(owner) if owner.isdigit() else pwd.getpwnam(owner).pw_uid
        except KeyError:
            findings.append(
                Finding(f"service user {owner}", "missing", f"useradd --system {owner}")
            )
        else:
            if info.st_uid != uid:
                holder = _user_name(info.st_uid)
                findings.append(
                    Finding(
                        f"{what} ({path})",
                        f"owned by {holder}, the service runs as {owner}",
                        f"chown {owner}: {path}",
                    )
                )
    return findings


def check_present(path: Path, what: str, fix: str) -> list[Finding]:
    return [] if path.exists() else [Finding(f"{what} ({path})", "missing", fix)]


def check_mqtt(url: str, where: str, fix: str) -> list[Finding]:
    if url.startswith("mqtts://"):
        return []
    return [
        Finding(where, f"plain MQTT ({url}): readings and keys cross the network in clear", fix)
    ]


ENROL_FIX = "civicmesh setup enrol <request> --out DIR on the central server, copy DIR here"


def check_tls_files(
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    *,
    where: str,
    where_key: str,
    owner: str | None,
) -> list[Finding]:
    """The TLS files an mqtts:// link needs (CA, certificate, 0600 key), with the
    enrolment step as the fix; edge and gateway links alike."""
    findings: list[Finding] = []
    for what, path in (("CA certificate", ca), ("TLS certificate", cert)):
        if path is None:
            findings.append(Finding(where, f"{what} unset", ENROL_FIX))
        else:
            findings += check_present(path, what, ENROL_FIX)
    if key is None:
        findings.append(Finding(where_key, "unset", ENROL_FIX))
    else:
        findings += check_secret(key, "TLS key", ENROL_FIX, owner)
    return findings


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def report(outcome: Outcome, *, checking: bool, out: Callable[[str], None] = print) -> int:
    """Print what was made, kept and found; exit status 1 when anything is wrong."""
    if not checking:
        for line in outcome.made:
            out(f"made  {line}")
        for line in outcome.kept:
            out(f"kept  {line}")
    for note in outcome.notes:
        out(note)
    if outcome.findings:
        out(f"{len(outcome.findings)} problem(s):")
        for finding in outcome.findings:
            out(finding.line())
        return 1
    if checking:
        out("all checks passed")
    return 0


def unique(findings: Iterable[Finding]) -> list[Finding]:
    seen: set[tuple[str, str]] = set()
    kept = []
    for finding in findings:
        if (finding.item, finding.problem) not in seen:
            seen.add((finding.item, finding.problem))
            kept.append(finding)
    return kept


# --------------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    setup = sub.add_parser(
        "setup", help="make (or --check) what a central server, gateway or edge device needs"
    )
    roles = setup.add_subparsers(dest="setup_role", metavar="ROLE", required=True)

    central = roles.add_parser(
        "central", help="site CA, broker certs and ACL, registry, tokens, admin user, config"
    )
    central.add_argument(
        "--dir",
        type=Path,
        default=Path("/etc/civicmesh"),
        help="configuration directory (default /etc/civicmesh)",
    )
    central.add_argument(
        "--state-dir",
        type=Path,
        default=Path("/var/lib/civicmesh"),
        help="state directory (SQLite store, reports)",
    )
    central.add_argument(
        "--host",
        action="append",
        default=[],
        help="name or address the broker and the API are reached at (repeat)",
    )
    central.add_argument(
        "--database-url",
        help="postgresql://user:password@host/db or sqlite:////path.db "
        "(default: SQLite in the state directory); kept in a 0600 file",
    )
    central.add_argument("--mqtt-port", type=int, default=8883)
    central.add_argument("--api-port", type=int, default=8443)
    central.add_argument("--admin-user", default="admin", help="first dashboard admin")
    central.add_argument("--user", default=SERVICE_USER, help="service user owning secrets")
    central.add_argument(
        "--broker-user", default="mosquitto", help="user the broker runs as (owns the broker's key)"
    )
    central.add_argument("--api-host", default="0.0.0.0", help="the API's listen address")
    central.add_argument(
        "--broker-state-dir",
        type=Path,
        default=Path("/var/lib/mosquitto"),
        help="the broker's persistence folder (owned by --broker-user)",
    )
    central.add_argument(
        "--llm-backend",
        default="llama-cpp",
        choices=["llama-cpp", "openai", "none"],
        help="reports' language model (none: deterministic text only)",
    )
    central.add_argument("--check", action="store_true", help="report only; change nothing")
    central.set_defaults(func=_run_role)

    gateway = roles.add_parser("gateway", help="gateway key and config")
    gateway.add_argument("--config", type=Path, default=Path("/etc/civicmesh/gateway.toml"))
    gateway.add_argument("--state-dir", type=Path, default=Path("/var/lib/civicmesh"))
    gateway.add_argument(
        "--pki-dir",
        type=Path,
        default=Path("/etc/civicmesh/pki"),
        help="where the CA certificate and this gateway's TLS files go",
    )
    gateway.add_argument("--upstream", default="mqtts://127.0.0.1:8883", help="the central broker")
    gateway.add_argument(
        "--device-broker", help="the broker the devices publish to (default: --upstream)"
    )
    gateway.add_argument("--user", default=SERVICE_USER)
    gateway.add_argument(
        "--request-out", type=Path, help="enrolment request file (default: beside the config)"
    )
    gateway.add_argument("--check", action="store_true", help="report only; change nothing")
    gateway.set_defaults(func=_run_role)

    edge = roles.add_parser("edge", help="device key, config and enrolment request")
    edge.add_argument("--config", type=Path, default=Path("/etc/civicmesh/edge.toml"))
    edge.add_argument("--state-dir", type=Path, default=Path("/var/lib/civicmesh"))
    edge.add_argument(
        "--pki-dir",
        type=Path,
        default=Path("/etc/civicmesh/pki"),
        help="where the CA certificate and this device's TLS files go",
    )
    edge.add_argument(
        "--broker", default="mqtts://127.0.0.1:8883", help="the site broker the device publishes to"
    )
    edge.add_argument("--kind", default="multi", choices=["air", "traffic", "multi"])
    edge.add_argument("--driver", default="sim", help="sensor driver (sim, or module:Class)")
    edge.add_argument("--user", default=SERVICE_USER)
    edge.add_argument(
        "--request-out", type=Path, help="enrolment request file (default: beside the config)"
    )
    edge.add_argument("--check", action="store_true", help="report only; change nothing")
    edge.set_defaults(func=_run_role)

    enrol = roles.add_parser(
        "enrol", help="central side: register a device or gateway from its request file"
    )
    enrol.add_argument("request", type=Path, help="the file `setup edge|gateway` wrote")
    enrol.add_argument("--dir", type=Path, default=Path("/etc/civicmesh"))
    enrol.add_argument("--zone", help="the device's zone (devices only)")
    enrol.add_argument("--lat", type=float)
    enrol.add_argument("--lon", type=float)
    enrol.add_argument("--owner", default="")
    enrol.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder for the files to copy to the device's --pki-dir",
    )
    enrol.set_defaults(func=_run_role)


def _run_role(args: argparse.Namespace) -> int:
    module_name, extra = ROLES[args.setup_role]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SetupError(
            f"`setup {args.setup_role}` needs civicmesh[{extra}] ({exc}); "
            f"install it with: pip install 'civicmesh[{extra}]'"
        ) from None
    handler = getattr(module, "enrol" if args.setup_role == "enrol" else "setup")
    result: int = handler(args)
    sys.stdout.flush()
    return result


# ------------------------------------------------------------------ enrolment requests

ENROL_FORMAT = "civicmesh-enrol-v1"


def _canonical(body: dict[str, object]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def enrolment_request(signer: object, role: str, **details: object) -> dict[str, object]:
    """A request to register ``signer``'s key, signed by it (proof that the requester
    holds the key, so nobody registers a key they do not have)."""
    from civicmesh.identity import VerifyKey

    public = VerifyKey(signer.public_key, signer.algorithm).to_text()  # type: ignore[attr-defined]
    body: dict[str, object] = {
        "format": ENROL_FORMAT,
        "role": role,
        "id": signer.key_id,  # type: ignore[attr-defined]
        "public_key": public,
        **details,
    }
    signature = signer.sign(_canonical(body))  # type: ignore[attr-defined]
    return {**body, "signature": base64.b64encode(signature).decode("ascii")}


def read_enrolment(path: Path) -> dict[str, object]:
    """The request in ``path``, its signature and id checked."""
    from civicmesh.identity import VerifyKey, derive_id

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SetupError(f"Enrolment request {path} not found") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise SetupError(f"Enrolment request {path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != ENROL_FORMAT:
        raise SetupError(f"{path} is not a civicmesh enrolment request ({ENROL_FORMAT})")
    body = {k: v for k, v in data.items() if k != "signature"}
    try:
        key = VerifyKey.from_text(str(data["public_key"]))
        signature = base64.b64decode(str(data["signature"]), validate=True)
    except (KeyError, ValueError) as exc:
        raise SetupError(f"Enrolment request {path}: bad key or signature ({exc})") from None
    if derive_id(key.public_key) != data.get("id"):
        raise SetupError(f"Enrolment request {path}: its id is not its key's id")
    if not key.verify(_canonical(body), signature):
        raise SetupError(f"Enrolment request {path}: the signature does not verify")
    if data.get("role") not in ("edge", "gateway"):
        raise SetupError(f"Enrolment request {path}: role must be edge or gateway")
    return body
