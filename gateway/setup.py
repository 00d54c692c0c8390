"""``civicmesh setup gateway``: the gateway's key, its config and its enrolment request."""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path

from civicmesh import __version__
from civicmesh.config import load_settings
from civicmesh.errors import CivicmeshError
from civicmesh.identity import Ed25519Signer
from civicmesh.setup import (
    Finding,
    Outcome,
    SiteFiles,
    check_mqtt,
    check_present,
    check_secret,
    check_tls_files,
    enrolment_request,
    report,
    toml_str,
    unique,
)
from gateway.settings import GatewaySettings

CONFIG_TEMPLATE = """\
# civicmesh gateway, written by `civicmesh setup gateway` (edit freely: setup keeps it).
# Overrides: CIVICMESH_GATEWAY_<KEY> (nested with __).
key_file = {key_file}
registry_file = {registry}
# registry_authority = "base64 key"   # take the registry from the central's signed snapshots
state_dir = {state_dir}
await_receipts = true

[device_mqtt]                         # where devices publish
url = {device_url}
tls_ca = {tls_ca}
tls_cert = {tls_cert}
tls_key = {tls_key}

[upstream_mqtt]                       # the central broker
url = {upstream_url}
tls_ca = {tls_ca}
tls_cert = {tls_cert}
tls_key = {tls_key}
"""


def _settings(config: Path) -> GatewaySettings:
    return load_settings(GatewaySettings, config)


def setup(args: argparse.Namespace) -> int:
    outcome = Outcome()
    if args.check:
        outcome.findings = check(args)
        return report(outcome, checking=True)
    files = SiteFiles(args.user, outcome)
    files.directory(args.state_dir, 0o700, owned=True)
    key_file = args.state_dir / "gateway.key"
    if args.config.exists():
        outcome.kept.append(f"config: {args.config}")
        key_file = _settings(args.config).key_file
    if not files.exists(key_file, "gateway key"):
        Ed25519Signer.generate().save(key_file)
        files.own(key_file)
        outcome.made.append(f"gateway key: {key_file}")
    signer = Ed25519Signer.load(key_file)
    user = f"gw-{signer.key_id}"
    if not args.config.exists():
        pki = args.pki_dir
        files.public(
            args.config,
            CONFIG_TEMPLATE.format(
                key_file=toml_str(key_file),
                registry=toml_str(args.config.parent / "registry.json"),
                state_dir=toml_str(args.state_dir / "gateway"),
                device_url=toml_str(args.device_broker or args.upstream),
                upstream_url=toml_str(args.upstream),
                tls_ca=toml_str(pki / "ca.crt"),
                tls_cert=toml_str(pki / f"{user}.crt"),
                tls_key=toml_str(pki / f"{user}.key"),
            ),
            "config",
        )
    request = enrolment_request(
        signer, "gateway", hostname=socket.gethostname(), agent_version=__version__
    )
    out = args.request_out or args.config.with_name(f"enrol-{signer.key_id}.json")
    files.public(out, json.dumps(request, indent=2) + "\n", "enrolment request", replace=True)
    status = report(outcome, checking=False)
    print(f"gateway id: {signer.key_id}")
    print("On the central server, register it (and get its TLS files) with:")
    print(f"  civicmesh setup enrol {out.name} --out {user}/")
    print(f"then copy ca.crt, {user}.crt and {user}.key into {args.pki_dir}/")
    print(f"and check with: civicmesh setup gateway --check --config {args.config}")
    return status


def check(args: argparse.Namespace) -> list[Finding]:
    fix_setup = f"civicmesh setup gateway --config {args.config}"
    if not args.config.exists():
        return [Finding(f"config ({args.config})", "missing", fix_setup)]
    try:
        settings = _settings(args.config)
    except CivicmeshError as exc:
        return [Finding(f"config ({args.config})", str(exc), f"edit {args.config}")]
    findings = check_secret(
        settings.key_file,
        "gateway key",
        f"{fix_setup} (a new gateway), or restore the registered gateway's key from backup",
        args.user,
    )
    if settings.registry_authority is None:
        findings += check_present(
            settings.registry_file,
            "registry",
            "copy the central's registry.json here, or set registry_authority",
        )
    for section in ("device_mqtt", "upstream_mqtt"):
        mqtt = getattr(settings, section)
        findings += check_mqtt(
            mqtt.url, f"{section}.url in {args.config}", f'url = "mqtts://..." in [{section}]'
        )
        if mqtt.url.startswith("mqtts://"):
            findings += check_tls_files(
                mqtt.tls_ca,
                mqtt.tls_cert,
                mqtt.tls_key,
                where=f"{section} in {args.config}",
                where_key=f"{section}.tls_key in {args.config}",
                owner=args.user,
            )
    return unique(findings)
