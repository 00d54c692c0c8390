"""``civicmesh pki``: a small certificate authority for one site's MQTT broker.

- ``init``: the CA (ECDSA P-256 key, self-signed certificate).
- ``server``: the broker's certificate (its host names and addresses in the SAN).
- ``client``: a client certificate whose common name is the MQTT user name the broker
  sees (``use_identity_as_username``): a device id for a device, ``gw-<gateway id>`` for
  a gateway, ``ingest-<name>`` for the central service.
- ``acl``: the Mosquitto ACL file for the registry: each active device may publish only
  to its own uplink and health topics and read only its own command, receipt and model
  topics; each gateway only to its own gateway topics; ingest reads the gateways'
  uplinks. A revoked device has no rule at all.
- ``crl``: ``ca.crl``, revoking every certificate issued to a revoked device or gateway
  (the broker's ``crlfile``), so a revoked client cannot even connect.

Keys are written with mode 0600 and never printed. The CA key signs certificates only;
keep it off the broker in production. (Imported only where ``cryptography`` is installed:
the edge install does without this command.)
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from civicmesh import topics
from civicmesh.errors import CivicmeshError
from civicmesh.identity import is_valid_id
from civicmesh.registry import Registry

CA_DAYS = 3650
LEAF_DAYS = 825


class PkiError(CivicmeshError):
    reason = "pki.invalid"


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def init_ca(directory: Path, name: str = "civicmesh site CA") -> Path:
    """Create ``ca.key`` and ``ca.crt`` in ``directory``; refuses to overwrite a CA."""
    if (directory / "ca.key").exists():
        raise PkiError(f"{directory / 'ca.key'} exists: a CA is there already")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_private(directory / "ca.key", _key_pem(key))
    (directory / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_crl(directory)  # an empty CRL, so the broker's crlfile exists from the start
    return directory / "ca.crt"


def issue(
    directory: Path,
    name: str,
    *,
    server: bool,
    hosts: tuple[str, ...] = (),
    out: Path | None = None,
) -> tuple[Path, Path]:
    """A key and certificate signed by the CA in ``directory``: ``<name>.key``, ``<name>.crt``
    (in ``out``, default ``directory``)."""
    EKU = ExtendedKeyUsageOID
    if not server and not (_is_user_name(name)):
        raise PkiError(
            f"Client name {name!r} must be a device id, gw-<gateway id> or ingest-<name>"
        )
    try:
        ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    except FileNotFoundError:
        raise PkiError(
            f"No CA in {directory}: run `civicmesh pki init --dir {directory}`"
        ) from None
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([EKU.SERVER_AUTH if server else EKU.CLIENT_AUTH]),
            critical=False,
        )
    )
    if server:
        names: list[x509.GeneralName] = []
        for host in hosts or ("localhost", "127.0.0.1"):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{directory / 'ca.key'} is not an ECDSA key made by civicmesh pki")
    cert = builder.sign(ca_key, hashes.SHA256())
    _record_issued(directory, name, cert.serial_number)
    target = out or directory
    target.mkdir(parents=True, exist_ok=True)
    _write_private(target / f"{name}.key", _key_pem(key))
    (target / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return target / f"{name}.key", target / f"{name}.crt"


def _is_user_name(name: str) -> bool:
    if is_valid_id(name):
        return True
    if name.startswith("gw-") and is_valid_id(name[3:]):
        return True
    return name.startswith("ingest-") and name[7:].replace("-", "").isalnum()


def acl(registry: Registry, ingest_users: tuple[str, ...] = ("ingest-central",)) -> str:
    """The Mosquitto ACL text for ``registry`` (user names as :func:`issue` makes them)."""
    root = topics.ROOT
    lines = [
        "# Generated by `civicmesh pki acl` from the device registry: regenerate it when a",
        "# device or gateway is added or revoked, then `kill -HUP` the broker.",
        "",
        "# Each active device (user name = certificate CN = device id): its own topics only.",
        "# No pattern rules: a revoked or unknown device matches nothing and may do nothing.",
    ]
    for device_id, device in sorted(registry.devices.items()):
        if device.status != "active":
            continue
        lines += [
            "",
            f"user {device_id}",
            f"topic write {root}/dev/{device_id}/up",
            f"topic write {root}/dev/{device_id}/health",
            f"topic read {root}/dev/{device_id}/cmd",
            f"topic read {root}/dev/{device_id}/receipt",
            f"topic read {root}/models/#",
        ]
    for gateway_id, record in sorted(registry.gateways.items()):
        if record.status != "active":
            continue
        lines += [
            "",
            f"user gw-{gateway_id}",
            f"topic read {root}/dev/+/up",
            f"topic read {root}/dev/+/health",
            f"topic write {root}/dev/+/receipt",
            f"topic write {root}/gw/{gateway_id}/up",
            f"topic write {root}/gw/{gateway_id}/health",
            f"topic read {root}/gw/{gateway_id}/receipt",
            f"topic write {root}/quarantine/gw/{gateway_id}",
        ]
    for user in ingest_users:
        lines += [
            "",
            f"user {user}",
            f"topic read {root}/gw/+/up",
            f"topic read {root}/gw/+/health",
            f"topic write {root}/gw/+/receipt",
            f"topic read {root}/quarantine/#",
            f"topic write {root}/quarantine/ingest/#",
            f"topic readwrite {root}/ingest/+/claim",
        ]
    revoked = sorted(d for d, r in registry.devices.items() if r.status != "active")
    if revoked:
        lines += [
            "",
            "# Revoked devices: no rules (and `civicmesh pki crl` refuses their certificates):",
        ]
        lines += [f"#   {d}" for d in revoked]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CRL

ISSUED_INDEX = "issued.json"
CRL_FILE = "ca.crl"
CRL_DAYS = 30


def _record_issued(directory: Path, name: str, serial: int) -> None:
    """Remember which serial went to which name, so a revocation can name certificates."""
    path = directory / ISSUED_INDEX
    issued: list[dict[str, object]] = json.loads(path.read_text()) if path.exists() else []
    issued.append({"name": name, "serial": serial})
    path.write_text(json.dumps(issued, indent=1))


def revoked_names(registry: Registry) -> set[str]:
    """The certificate names (user names) of every device and gateway no longer active."""
    names = {d for d, r in registry.devices.items() if r.status != "active"}
    names |= {f"gw-{g}" for g, r in registry.gateways.items() if r.status != "active"}
    return names


def write_crl(directory: Path, names: set[str] = frozenset()) -> Path:  # type: ignore[assignment]
    """Sign ``ca.crl`` (PEM) revoking every certificate issued to one of ``names``.

    Mosquitto reads it with ``crlfile`` (see deploy/mosquitto/civicmesh-tls.conf) and
    refuses those certificates at the TLS handshake; reload the broker after writing it.
    """
    try:
        ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    except FileNotFoundError:
        raise PkiError(
            f"No CA in {directory}: run `civicmesh pki init --dir {directory}`"
        ) from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{directory / 'ca.key'} is not an ECDSA key made by civicmesh pki")
    index = directory / ISSUED_INDEX
    issued = json.loads(index.read_text()) if index.exists() else []
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=CRL_DAYS))
    )
    for entry in issued:
        if entry["name"] in names:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(entry["serial"]))
                .revocation_date(now - dt.timedelta(minutes=5))
                .build()
            )
    crl = builder.sign(ca_key, hashes.SHA256())
    path = directory / CRL_FILE
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return path


# --------------------------------------------------------------------------- CLI


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pki = sub.add_parser("pki", help="a small CA for the site's MQTT broker (TLS, client certs)")
    cmds = pki.add_subparsers(dest="pki_command", metavar="ACTION", required=True)
    init = cmds.add_parser("init", help="create the CA")
    init.add_argument("--dir", type=Path, required=True)
    init.add_argument("--name", default="civicmesh site CA")
    init.set_defaults(func=lambda a: print(init_ca(a.dir, a.name)) or 0)
    srv = cmds.add_parser("server", help="the broker's certificate")
    srv.add_argument("--dir", type=Path, required=True)
    srv.add_argument("--name", default="broker")
    srv.add_argument("--host", action="append", default=[], help="DNS name or IP (repeat)")
    srv.set_defaults(
        func=lambda a: print(*issue(a.dir, a.name, server=True, hosts=tuple(a.host))) or 0
    )
    cli = cmds.add_parser("client", help="a device, gateway or ingest certificate")
    cli.add_argument("--dir", type=Path, required=True)
    cli.add_argument("--name", required=True, help="device id, gw-<gateway id> or ingest-<name>")
    cli.add_argument("--out", type=Path, help="where to write the key and certificate")
    cli.set_defaults(func=lambda a: print(*issue(a.dir, a.name, server=False, out=a.out)) or 0)
    crl = cmds.add_parser(
        "crl", help="write ca.crl revoking the certificates of revoked devices and gateways"
    )
    crl.add_argument("--dir", type=Path, required=True)
    crl.add_argument("--registry", type=Path, required=True)
    crl.add_argument("--name", action="append", default=[], help="revoke this name too")
    crl.set_defaults(
        func=lambda a: (
            print(write_crl(a.dir, revoked_names(Registry.load(a.registry)) | set(a.name))) or 0
        )
    )
    acl_cmd = cmds.add_parser("acl", help="print the Mosquitto ACL file for the registry")
    acl_cmd.add_argument("--registry", type=Path, required=True)
    acl_cmd.add_argument("--ingest-user", action="append", default=[])
    acl_cmd.set_defaults(
        func=lambda a: (
            print(
                acl(Registry.load(a.registry), tuple(a.ingest_user) or ("ingest-central",)), end=""
            )
            or 0
        )
    )
