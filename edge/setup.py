"""``civicmesh setup edge``: this device's key, its config and its enrolment request.

The config and the key always agree (the config names the key file that setup made),
and the registration line printed at the end names this device's own public key: the
central side registers it with ``civicmesh setup enrol REQUEST`` or that line.
"""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path

from civicmesh import __version__
from civicmesh.config import load_settings
from civicmesh.errors import CivicmeshError
from civicmesh.identity import Ed25519Signer, load_device_signer
from civicmesh.setup import (
    Finding,
    Outcome,
    SiteFiles,
    check_mqtt,
    check_secret,
    check_tls_files,
    enrolment_request,
    report,
    toml_str,
)
from edge.settings import EdgeSettings

CONFIG_TEMPLATE = """\
# civicmesh edge agent, written by `civicmesh setup edge` (edit freely: setup keeps it).
# Every key can be overridden by CIVICMESH_EDGE_<KEY> (nested: CIVICMESH_EDGE_MQTT__URL).
key_file = {key_file}
state_dir = {state_dir}
window_s = 60
batch_max_readings = 500
publish_interval_s = 10
health_interval_s = 60
await_receipts = true

[mqtt]
url = {url}
tls_ca = {tls_ca}
tls_cert = {tls_cert}
tls_key = {tls_key}

[models]
# true needs onnxruntime (64-bit ARM, x86-64); without it the agent runs with models off
enabled = false

[driver]
name = {driver}

[driver.options]
{driver_options}"""


def paths(args: argparse.Namespace) -> dict[str, Path]:
    return {"key_file": args.state_dir / "device.key", "pki": args.pki_dir}


def setup(args: argparse.Namespace) -> int:
    outcome = Outcome()
    if args.check:
        outcome.findings = check(args)
        return report(outcome, checking=True)
    files = SiteFiles(args.user, outcome)
    files.directory(args.state_dir, 0o700, owned=True)
    key_file = paths(args)["key_file"]
    if args.config.exists():
        outcome.kept.append(f"config: {args.config}")
        key_file = _settings(args.config).key_file
    if not files.exists(key_file, "device key"):
        Ed25519Signer.generate().save(key_file)
        files.own(key_file)
        outcome.made.append(f"device key: {key_file}")
    signer = load_device_signer(key_file)
    if not args.config.exists():
        pki = args.pki_dir
        text = CONFIG_TEMPLATE.format(
            key_file=toml_str(key_file),
            state_dir=toml_str(args.state_dir),
            url=toml_str(args.broker),
            tls_ca=toml_str(pki / "ca.crt"),
            tls_cert=toml_str(pki / f"{signer.key_id}.crt"),
            tls_key=toml_str(pki / f"{signer.key_id}.key"),
            driver=toml_str(args.driver),
            # the simulated sensors (a trial without hardware): seeded by the device id
            driver_options=(
                f"seed = {int(signer.key_id.encode().hex()[:8], 16)}\n"
                f"kind = {toml_str(args.kind)}\n"
                if args.driver == "sim"
                else "# keyword options of the driver\n"
            ),
        )
        files.public(args.config, text, "config")
    request = enrolment_request(
        signer,
        "edge",
        kind=args.kind,
        hostname=socket.gethostname(),
        agent_version=__version__,
    )
    out = args.request_out or args.config.with_name(f"enrol-{signer.key_id}.json")
    files.public(out, json.dumps(request, indent=2) + "\n", "enrolment request", replace=True)
    status = report(outcome, checking=False)
    print(f"device id: {signer.key_id}")
    print("On the central server, register it (and get its TLS files) with:")
    print(
        f"  civicmesh setup enrol {out.name} --zone ZONE --lat LAT --lon LON --out {signer.key_id}/"
    )
    print("or, by hand:")
    print(
        f"  civicmesh registry add-device --file /etc/civicmesh/registry.json "
        f"--public-key {request['public_key']} --kind {args.kind} --zone ZONE --lat LAT --lon LON"
    )
    print(f"then copy ca.crt, {signer.key_id}.crt and {signer.key_id}.key into {args.pki_dir}/")
    print(f"and check with: civicmesh setup edge --check --config {args.config}")
    return status


def _settings(config: Path) -> EdgeSettings:
    return load_settings(EdgeSettings, config)


def check(args: argparse.Namespace) -> list[Finding]:
    """What keeps this device from running: each item with its fix; changes nothing."""
    fix_setup = f"civicmesh setup edge --config {args.config}"
    if not args.config.exists():
        return [Finding(f"config ({args.config})", "missing", fix_setup)]
    try:
        settings = _settings(args.config)
    except CivicmeshError as exc:
        return [Finding(f"config ({args.config})", str(exc), f"edit {args.config}")]
    findings = check_secret(
        settings.key_file,
        "device key",
        f"{fix_setup} (a new device), or restore the registered device's key from backup",
        args.user,
    )
    findings += check_mqtt(
        settings.mqtt.url,
        f"mqtt.url in {args.config}",
        f'url = "mqtts://<site broker>:8883" in [mqtt] of {args.config}',
    )
    mqtt = settings.mqtt
    if mqtt.url.startswith("mqtts://"):
        findings += check_tls_files(
            mqtt.tls_ca,
            mqtt.tls_cert,
            mqtt.tls_key,
            where=f"mqtt.tls_* in {args.config}",
            where_key=f"mqtt.tls_key in {args.config}",
            owner=args.user,
        )
    if settings.models.enabled and not _onnxruntime_available():
        findings.append(
            Finding(
                "models.enabled",
                "onnxruntime is not installed (no wheel for 32-bit ARM): models stay off",
                "pip install onnxruntime (64-bit OS), or models.enabled = false",
            )
        )
    return findings


def _onnxruntime_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None
