"""``civicmesh setup central`` and ``civicmesh setup enrol``: the central server's files.

Layout under ``--dir`` (default ``/etc/civicmesh``)::

    analytics.toml          production config (every secret read from a file below)
    mosquitto.conf          the broker: TLS, client certificates, the ACL
    mosquitto.acl           regenerated from the registry on every run and enrolment
    registry.json           devices and gateways
    api-tokens.json         API tokens (hashes); the admin token is in secrets/
    dashboard-users.json    dashboard users (scrypt hashes)
    pki/                    site CA, broker, ingest and HTTPS certificates (keys 0600)
    secrets/                session_secret, database_url, api-admin.token,
                            dashboard-admin.password (0600, the service user's)

Both the systemd units and the compose stack read these same files.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
from functools import partial
from pathlib import Path
from urllib.parse import unquote, urlsplit

from analytics.apiauth import TokenFile
from analytics.dashboard.auth import UserFile, check_password
from analytics.settings import KNOWN_DEFAULT_SECRETS, AnalyticsSettings
from civicmesh.config import load_settings
from civicmesh.errors import CivicmeshError
from civicmesh.identity import VerifyKey
from civicmesh.pki import acl, init_ca, issue
from civicmesh.registry import DeviceRecord, GatewayRecord, Registry
from civicmesh.setup import (
    Finding,
    Outcome,
    SetupError,
    SiteFiles,
    check_mqtt,
    check_present,
    check_secret,
    read_enrolment,
    report,
    toml_str,
    unique,
)
from civicmesh.timeutil import now_ms

INGEST_USER = "ingest-central"
# Passwords nobody should still have: checked against the users file by --check.
DEFAULT_PASSWORDS = ("admin", "password", "civicmesh", "change-me", "changeme", "secret")

BROKER_TEMPLATE = """\
# Mosquitto for this civicmesh site, written by `civicmesh setup central` (as
# deploy/mosquitto/civicmesh-tls.conf, with this site's paths): TLS only, a client
# certificate for every client, and the ACL generated from the registry.
per_listener_settings false
allow_anonymous false

listener {port}
cafile {pki}/ca.crt
certfile {pki}/broker.crt
keyfile {pki}/broker.key
require_certificate true
use_identity_as_username true
tls_version tlsv1.2

acl_file {acl}

persistence true
persistence_location {persistence}/
persistence_file mosquitto.db
autosave_interval 10
max_queued_messages 100000
max_inflight_messages 1000
persistent_client_expiration 7d

# stderr: the journal under systemd, the container log under compose
log_dest stderr
log_type error
log_type warning
log_type notice
"""

CONFIG_TEMPLATE = """\
# civicmesh central service, written by `civicmesh setup central` (edit freely: setup
# keeps it; `civicmesh setup central --check` says what is missing or unsafe).
environment = "production"
database_url_file = {database_url_file}
registry_file = {registry}

[mqtt]
url = {mqtt_url}
tls_ca = {pki_ca}
tls_cert = {ingest_cert}
tls_key = {ingest_key}

[api]
host = {api_host}
port = {api_port}
tokens_file = {tokens}
tls_cert = {api_cert}                # HTTPS with the site CA's certificate
tls_key = {api_key}

[reports]
llm_backend = {llm_backend}
schedule = true

[dashboard]
users_file = {users}
session_secret_file = {session_secret}
secure_cookies = true
"""


def layout(directory: Path) -> dict[str, Path]:
    pki = directory / "pki"
    secrets_dir = directory / "secrets"
    return {
        "config": directory / "analytics.toml",
        "broker_conf": directory / "mosquitto.conf",
        "acl": directory / "mosquitto.acl",
        "registry": directory / "registry.json",
        "tokens": directory / "api-tokens.json",
        "users": directory / "dashboard-users.json",
        "pki": pki,
        "secrets": secrets_dir,
        "session_secret": secrets_dir / "session_secret",
        "database_url": secrets_dir / "database_url",
        "pg_password": secrets_dir / "pg_password",
        "admin_token": secrets_dir / "api-admin.token",
        "admin_password": secrets_dir / "dashboard-admin.password",
    }


def setup(args: argparse.Namespace) -> int:
    outcome = Outcome()
    if args.check:
        outcome.findings = check(args.dir, args.user)
        return report(outcome, checking=True)
    paths = layout(args.dir)
    files = SiteFiles(args.user, outcome)
    hosts = tuple(args.host) or ("localhost", "127.0.0.1")
    files.directory(args.dir, 0o755)
    files.directory(paths["secrets"], 0o700, owned=True)
    files.directory(args.state_dir, 0o700, owned=True)
    pki = paths["pki"]
    files.made_by(pki / "ca.key", "site CA", lambda: init_ca(pki))
    for name, server in (("broker", True), (INGEST_USER, False), ("api", True)):
        if files.made_by(
            pki / f"{name}.key",
            f"{name} certificate",
            partial(issue, pki, name, server=server, hosts=hosts),
        ):
            files.own(pki / f"{name}.key")
    broker = SiteFiles(args.broker_user, Outcome())
    broker.own(pki / "broker.key")
    broker.directory(args.broker_state_dir, 0o700, owned=True)

    if not files.exists(paths["registry"], "registry"):
        Registry.empty().save(paths["registry"])
        files.own(paths["registry"])
        outcome.made.append(f"registry: {paths['registry']}")
    write_acl(paths)
    files.public(
        paths["broker_conf"],
        BROKER_TEMPLATE.format(
            port=args.mqtt_port,
            pki=pki,
            acl=paths["acl"],
            persistence=args.broker_state_dir,
        ),
        "broker config",
    )

    url = args.database_url or f"sqlite:///{args.state_dir / 'civicmesh.db'}"
    files.secret(paths["database_url"], url + "\n", "database URL")
    db_password = urlsplit(url).password
    if db_password:  # compose's PostgreSQL service reads its password from here
        files.secret(paths["pg_password"], unquote(db_password) + "\n", "database password")
    files.secret(paths["session_secret"], secrets.token_hex(32) + "\n", "session secret")
    if not paths["admin_token"].exists():
        token = TokenFile(paths["tokens"]).add("admin", "admin")
        files.own(paths["tokens"])
        files.secret(paths["admin_token"], token + "\n", "API admin token")
    else:
        files.exists(paths["admin_token"], "API admin token")
    if not paths["admin_password"].exists():
        password = secrets.token_urlsafe(12)
        UserFile(paths["users"]).add(args.admin_user, "admin", password)
        files.own(paths["users"])
        files.secret(paths["admin_password"], password + "\n", "dashboard admin password")
    else:
        files.exists(paths["admin_password"], "dashboard admin password")

    host = hosts[0]
    files.public(
        paths["config"],
        CONFIG_TEMPLATE.format(
            database_url_file=toml_str(paths["database_url"]),
            registry=toml_str(paths["registry"]),
            mqtt_url=toml_str(f"mqtts://{host}:{args.mqtt_port}"),
            pki_ca=toml_str(pki / "ca.crt"),
            ingest_cert=toml_str(pki / f"{INGEST_USER}.crt"),
            ingest_key=toml_str(pki / f"{INGEST_USER}.key"),
            api_host=toml_str(args.api_host),
            api_port=args.api_port,
            tokens=toml_str(paths["tokens"]),
            api_cert=toml_str(pki / "api.crt"),
            api_key=toml_str(pki / "api.key"),
            llm_backend=toml_str(args.llm_backend),
            users=toml_str(paths["users"]),
            session_secret=toml_str(paths["session_secret"]),
        ),
        "config",
    )
    outcome.findings = check(args.dir, args.user)
    status = report(outcome, checking=False)
    print(
        f"dashboard: https://{host}:{args.api_port}/dashboard/  user {args.admin_user}, "
        f"password in {paths['admin_password']}"
    )
    print(f"API admin token in {paths['admin_token']}")
    print(f"broker: mosquitto -c {paths['broker_conf']}  (mqtts://{host}:{args.mqtt_port})")
    print(f"services read {paths['config']}; enrol devices with `civicmesh setup enrol REQUEST`")
    return status


def write_acl(paths: dict[str, Path]) -> bool:
    """Regenerate the broker ACL from the registry; True when it changed (HUP the broker)."""
    text = acl(Registry.load(paths["registry"]), (INGEST_USER,))
    current = paths["acl"].read_text(encoding="utf-8") if paths["acl"].exists() else None
    if current == text:
        return False
    tmp = paths["acl"].with_name(paths["acl"].name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(0o644)
    tmp.replace(paths["acl"])
    return True


def check(directory: Path, owner: str | None) -> list[Finding]:
    """Every missing or unsafe item of the central site, each with its fix."""
    paths = layout(directory)
    fix = f"civicmesh setup central --dir {directory}"
    findings: list[Finding] = []
    for key, what in (
        ("config", "config"),
        ("broker_conf", "broker config"),
        ("registry", "registry"),
        ("tokens", "API tokens"),
        ("users", "dashboard users"),
    ):
        findings += check_present(paths[key], what, fix)
    pki = paths["pki"]
    findings += check_present(pki / "ca.crt", "site CA certificate", fix)
    for name in ("ingest-central", "api"):
        findings += check_secret(pki / f"{name}.key", f"{name} TLS key", fix, owner)
    findings += check_secret(pki / "broker.key", "broker TLS key", fix, None)
    findings += check_secret(pki / "ca.key", "site CA key", fix, None)
    for key, what in (
        ("session_secret", "session secret"),
        ("database_url", "database URL"),
        ("admin_token", "API admin token"),
    ):
        findings += check_secret(paths[key], what, fix, owner)
    if paths["registry"].exists() and paths["acl"].exists():
        expected = acl(Registry.load(paths["registry"]), (INGEST_USER,))
        if paths["acl"].read_text(encoding="utf-8") != expected:
            findings.append(
                Finding(
                    f"broker ACL ({paths['acl']})",
                    "out of date with the registry",
                    f"{fix}, then kill -HUP the broker",
                )
            )
    elif paths["registry"].exists():
        findings += check_present(paths["acl"], "broker ACL", fix)
    if paths["users"].exists():
        findings += _default_passwords(paths["users"])
    if paths["config"].exists():
        findings += _check_config(paths["config"], owner)
    return unique(findings)


def _default_passwords(users_file: Path) -> list[Finding]:
    found = []
    for user in UserFile(users_file).users().values():
        for password in DEFAULT_PASSWORDS:
            if check_password(password, user.password_hash):
                found.append(
                    Finding(
                        f"dashboard user {user.name}",
                        f"default password {password!r}",
                        f"civicmesh dashboard add-user --file {users_file} --username "
                        f"{user.name} --role {user.role}  (asks for a new password)",
                    )
                )
    return found


def _check_config(config: Path, owner: str | None) -> list[Finding]:
    try:
        settings = load_settings(AnalyticsSettings, config)
    except (CivicmeshError, OSError) as exc:
        return [Finding(f"config ({config})", str(exc), f"edit {config}")]
    findings = check_mqtt(
        settings.mqtt.url, f"mqtt.url in {config}", 'url = "mqtts://<broker>:8883" in [mqtt]'
    )
    if settings.environment != "production":
        findings.append(
            Finding(
                f"environment in {config}",
                f"{settings.environment!r}: development defaults are accepted",
                'environment = "production"',
            )
        )
    for problem in settings.production_problems(serving_api=True):
        findings.append(Finding(f"config ({config})", problem, f"edit {config}"))
    if settings.api.tls_cert is None or settings.api.tls_key is None:
        findings.append(
            Finding(
                f"[api] in {config}",
                "the API and dashboard serve plain HTTP",
                "tls_cert and tls_key in [api] (`civicmesh pki server --name api`)",
            )
        )
    else:
        findings += check_present(
            settings.api.tls_cert, "API TLS certificate", "civicmesh pki server --name api"
        )
        findings += check_secret(
            settings.api.tls_key, "API TLS key", "civicmesh pki server --name api", owner
        )
    if settings.dashboard.enabled and not settings.dashboard.secure_cookies:
        findings.append(
            Finding(
                f"[dashboard] in {config}",
                "session cookie sent over plain HTTP too",
                "secure_cookies = true",
            )
        )
    secret = settings.dashboard.session_secret
    if secret is not None and secret.get_secret_value().encode() in KNOWN_DEFAULT_SECRETS:
        findings.append(
            Finding(
                f"dashboard.session_secret in {config}",
                "a default secret",
                "session_secret_file pointing at a random 32-byte secret",
            )
        )
    return findings


def enrol(args: argparse.Namespace) -> int:
    """Register a device or gateway from its signed request; write its TLS files to
    ``--out`` (the CA certificate, its certificate and key) and refresh the ACL."""
    paths = layout(args.dir)
    request = read_enrolment(args.request)
    if not paths["registry"].exists():
        raise SetupError(f"No registry at {paths['registry']}: run `civicmesh setup central` first")
    registry = Registry.load(paths["registry"])
    ident = str(request["id"])
    public = str(request["public_key"])
    VerifyKey.from_text(public)
    if request["role"] == "edge":
        if not args.zone:
            raise SetupError("A device needs --zone (and --lat/--lon for the map)")
        kind = str(request.get("kind", "multi"))
        if ident not in registry.devices:
            registry = registry.with_device(
                DeviceRecord(
                    ident,
                    public,
                    args.zone,
                    lat=args.lat,
                    lon=args.lon,
                    kind=kind,
                    registered_at_ms=now_ms(),
                    owner=args.owner,
                )
            )
        user = ident
    else:
        if ident not in registry.gateways:
            registry = registry.with_gateway(GatewayRecord(ident, public))
        user = f"gw-{ident}"
    registry.save(paths["registry"])
    changed = write_acl(paths)
    args.out.mkdir(parents=True, exist_ok=True)
    issue(paths["pki"], user, server=False, out=args.out)
    shutil.copyfile(paths["pki"] / "ca.crt", args.out / "ca.crt")
    print(f"registered {request['role']} {ident}")
    print(
        f"copy {args.out}/ca.crt, {user}.crt and {user}.key to the {request['role']}'s "
        "pki folder (keep the key 0600)"
    )
    if changed:
        print("broker ACL updated: reload the broker (systemctl reload mosquitto, or kill -HUP)")
    return 0
