"""``civicmesh setup``: what each role gets, idempotence, ``--check`` findings, enrolment,
and the edge install layout actually running (the key the config names is the key
install made)."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from civicmesh.setup import SetupError, read_enrolment

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CLI = str(Path(sys.executable).parent / "civicmesh")
ME = pwd.getpwuid(os.geteuid()).pw_name  # the service user of these test sites


def civicmesh(
    *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env or clean_env(),
    )


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CIVICMESH")}


def tree_digest(folder: Path) -> dict[str, tuple[str, int]]:
    """Content and mode of every file under ``folder`` (to show --check changes nothing)."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def setup_edge(tmp: Path, name: str = "edge", *extra: str) -> tuple[Path, str]:
    config = tmp / name / "edge.toml"
    proc = civicmesh(
        "setup",
        "edge",
        "--config",
        config,
        "--state-dir",
        tmp / name / "state",
        "--pki-dir",
        tmp / name / "pki",
        "--broker",
        "mqtts://127.0.0.1:1",
        "--user",
        ME,
        *extra,
    )
    assert proc.returncode in (0, 1), proc.stderr
    device_id = next(
        line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("device id:")
    )
    return config, device_id


def test_setup_edge_key_and_config_agree_and_rerun_keeps_identity(tmp_path: Path) -> None:
    from civicmesh.config import load_settings
    from edge.settings import EdgeSettings

    config, device_id = setup_edge(tmp_path)
    settings = load_settings(EdgeSettings, config)
    assert settings.key_file.exists() and settings.key_file.stat().st_mode & 0o777 == 0o600
    assert settings.mqtt.tls_cert == tmp_path / "edge" / "pki" / f"{device_id}.crt"
    request = read_enrolment(config.with_name(f"enrol-{device_id}.json"))
    assert request["id"] == device_id and request["role"] == "edge"
    key_before = settings.key_file.read_bytes()
    _, same_id = setup_edge(tmp_path)
    assert same_id == device_id and settings.key_file.read_bytes() == key_before
    # the printed registration line names this device's own key
    proc = civicmesh("setup", "edge", "--config", config, "--state-dir", tmp_path / "edge/state")
    assert f"--public-key {request['public_key']}" in proc.stdout


def test_enrolment_request_is_bound_to_its_key(tmp_path: Path) -> None:
    config, device_id = setup_edge(tmp_path)
    path = config.with_name(f"enrol-{device_id}.json")
    data = json.loads(path.read_text())
    data["kind"] = "traffic"  # altered after signing
    path.write_text(json.dumps(data))
    with pytest.raises(SetupError, match="signature does not verify"):
        read_enrolment(path)


def test_missing_key_hint_does_not_offer_a_new_identity(tmp_path: Path) -> None:
    config, _ = setup_edge(tmp_path)
    (tmp_path / "edge" / "state" / "device.key").unlink()
    proc = civicmesh("edge", "run", "--config", config)
    assert proc.returncode == 1
    assert "put its key file back" in proc.stderr and "keygen" not in proc.stderr
    assert "Traceback" not in proc.stderr


def run_until(
    argv: list[str], env: dict[str, str], phrase: str, logs: Path, timeout: float = 90
) -> tuple[int, str]:
    """Start ``argv``, wait until its output shows ``phrase`` (and a moment more), stop it
    with SIGTERM; its exit status and output. Start-up time varies a lot on a shared
    machine, so the wait is for the agent's own word, not a fixed sleep."""
    out = logs / "agent.log"
    with out.open("wb") as log:
        agent = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env | {"PYTHONUNBUFFERED": "1"}
        )
    try:
        deadline = time.monotonic() + timeout
        while phrase not in out.read_text(errors="replace"):
            assert agent.poll() is None, out.read_text()
            assert time.monotonic() < deadline, f"no {phrase!r} within {timeout} s"
            time.sleep(0.2)
        time.sleep(2)
        assert agent.poll() is None, out.read_text()
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
    return agent.returncode, out.read_text(errors="replace")


def _install_commands(role: str) -> list[list[str]]:
    proc = subprocess.run(
        ["bash", str(DEPLOY / "install.sh"), "--role", role, "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]


def _relocate(argv: list[str], tmp: Path) -> list[str]:
    """An install step's command with /etc and /var/lib moved under ``tmp``."""
    out = []
    for arg in argv:
        arg = arg.replace("/opt/civicmesh/venv/bin/civicmesh", CLI)
        arg = arg.replace("/etc/civicmesh", str(tmp / "etc"))
        arg = arg.replace("/var/lib/civicmesh", str(tmp / "state"))
        out.append(arg)
    return out


def test_installed_edge_starts_with_what_install_made(tmp_path: Path) -> None:
    """The install script's own setup step, enrolment, then the unit's exact ExecStart:
    the agent finds its key and TLS files and runs (no broker yet: it buffers) instead of
    restart-looping on a key the config does not name."""
    setup_cmd = next(c for c in _install_commands("edge") if "setup" in c)
    proc = subprocess.run(
        _relocate(setup_cmd, tmp_path), capture_output=True, text=True, timeout=120, env=clean_env()
    )
    assert proc.returncode == 0, proc.stderr
    assert "civicmesh setup enrol" in proc.stdout
    unit = (DEPLOY / "systemd" / "civicmesh-edge.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = _relocate(shlex.split(exec_start.removeprefix("ExecStart=")), tmp_path)
    early = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=clean_env())
    assert early.returncode == 1 and "Traceback" not in early.stderr, early.stderr
    assert "TLS file(s) not found" in early.stderr and "setup enrol" in early.stderr

    site, _ = setup_central(tmp_path)
    request = next((tmp_path / "etc").glob("enrol-*.json"))
    enrolled = civicmesh(
        "setup", "enrol", request, "--dir", site, "--zone", "z1", "--out", tmp_path / "etc" / "pki"
    )
    assert enrolled.returncode == 0, enrolled.stderr
    code, out = run_until(argv, clean_env(), "buffering in the outbox", tmp_path)
    assert code == 0, out


def test_agent_runs_models_disabled_without_onnxruntime(tmp_path: Path) -> None:
    """32-bit ARM has no onnxruntime wheel: models.enabled still runs, says so once."""
    config, _ = enrolled_edge(tmp_path)
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['onnxruntime'] = None\n")
    env = clean_env() | {
        "PYTHONPATH": f"{hide}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "CIVICMESH_EDGE_MODELS__ENABLED": "true",
        "CIVICMESH_EDGE_MODELS__CALIBRATE": '["pm25"]',
        "CIVICMESH_EDGE_WINDOW_S": "1",
    }
    code, err = run_until(
        [CLI, "edge", "run", "--config", str(config)], env, "buffering in the outbox", tmp_path
    )
    assert code == 0, err
    assert err.count("onnxruntime is not installed") == 1, err
    assert "models disabled" in err and "UNCALIBRATED on: pm25" in err
    status = civicmesh("edge", "status", "--config", config)
    assert status.returncode == 0 and "'readings': 0" not in status.stdout, status.stdout


def setup_central(tmp: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    site = tmp / "site"
    proc = civicmesh(
        "setup",
        "central",
        "--dir",
        site,
        "--state-dir",
        tmp / "central-state",
        "--host",
        "127.0.0.1",
        "--host",
        "localhost",
        "--llm-backend",
        "none",
        "--user",
        ME,
    )
    return site, proc


def enrolled_edge(tmp: Path, name: str = "edge") -> tuple[Path, str]:
    """A device set up and enrolled at a central site in ``tmp``, its TLS files in place."""
    site = tmp / "site"
    if not site.exists():
        assert setup_central(tmp)[1].returncode == 0
    config, device_id = setup_edge(tmp, name)
    proc = civicmesh(
        "setup",
        "enrol",
        config.with_name(f"enrol-{device_id}.json"),
        "--dir",
        site,
        "--zone",
        "z1",
        "--out",
        tmp / name / "pki",
    )
    assert proc.returncode == 0, proc.stderr
    return config, device_id


def test_setup_central_makes_a_site_that_passes_its_check(tmp_path: Path) -> None:
    from analytics.settings import AnalyticsSettings
    from civicmesh.config import load_settings

    site, proc = setup_central(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in (
        "analytics.toml",
        "mosquitto.conf",
        "mosquitto.acl",
        "registry.json",
        "api-tokens.json",
        "dashboard-users.json",
        "pki/ca.crt",
        "pki/api.crt",
    ):
        assert (site / name).exists(), name
    for secret in (
        "secrets/session_secret",
        "secrets/database_url",
        "secrets/api-admin.token",
        "secrets/dashboard-admin.password",
        "pki/ca.key",
        "pki/broker.key",
        "pki/api.key",
        "pki/ingest-central.key",
    ):
        assert (site / secret).stat().st_mode & 0o777 == 0o600, secret
    settings = load_settings(AnalyticsSettings, site / "analytics.toml")
    assert settings.environment == "production"
    assert settings.production_problems(serving_api=True) == []
    assert settings.mqtt.url.startswith("mqtts://") and settings.api.tls_cert is not None
    check = civicmesh("setup", "central", "--check", "--dir", site, "--user", ME)
    assert check.returncode == 0 and "all checks passed" in check.stdout, check.stdout

    before = tree_digest(site)
    again = civicmesh(
        "setup",
        "central",
        "--dir",
        site,
        "--state-dir",
        tmp_path / "central-state",
        "--host",
        "127.0.0.1",
        "--llm-backend",
        "none",
        "--user",
        ME,
    )
    assert again.returncode == 0, again.stdout
    assert "made " not in again.stdout  # everything kept
    assert tree_digest(site) == before


def test_setup_central_check_names_each_unsafe_item_and_changes_nothing(tmp_path: Path) -> None:
    from analytics.dashboard.auth import UserFile

    site, proc = setup_central(tmp_path)
    assert proc.returncode == 0, proc.stdout
    (site / "secrets" / "session_secret").chmod(0o644)  # world-readable secret
    UserFile(site / "dashboard-users.json").add("clerk", "viewer", "password")  # default password
    config = site / "analytics.toml"
    config.write_text(config.read_text().replace("mqtts://127.0.0.1:8883", "mqtt://127.0.0.1:1883"))
    (site / "pki" / "api.crt").unlink()  # half-configured
    before = tree_digest(site)
    check = civicmesh("setup", "central", "--check", "--dir", site, "--user", ME)
    assert check.returncode == 1
    out = check.stdout
    assert "session secret" in out and "world-readable (mode 0644)" in out
    assert "chmod 600" in out
    assert "dashboard user clerk: default password 'password'" in out
    assert "civicmesh dashboard add-user" in out
    assert "plain MQTT (mqtt://127.0.0.1:1883)" in out
    assert "API TLS certificate" in out and "missing" in out
    assert tree_digest(site) == before


def test_setup_edge_and_gateway_check(tmp_path: Path) -> None:
    config, device_id = setup_edge(tmp_path)
    check = civicmesh("setup", "edge", "--check", "--config", config, "--user", ME)
    assert check.returncode == 1
    assert f"{device_id}.crt" in check.stdout and "civicmesh setup enrol" in check.stdout
    key = tmp_path / "edge" / "state" / "device.key"
    key.chmod(0o644)
    assert (
        "world-readable"
        in civicmesh("setup", "edge", "--check", "--config", config, "--user", ME).stdout
    )
    gw_config = tmp_path / "gw" / "gateway.toml"
    made = civicmesh(
        "setup",
        "gateway",
        "--config",
        gw_config,
        "--state-dir",
        tmp_path / "gw/st",
        "--pki-dir",
        tmp_path / "gw/pki",
        "--upstream",
        "mqtt://127.0.0.1:1883",
    )
    assert "gateway id:" in made.stdout, made.stderr
    gw_check = civicmesh("setup", "gateway", "--check", "--config", gw_config)
    assert gw_check.returncode == 1 and "plain MQTT" in gw_check.stdout


def test_enrol_registers_device_and_gateway_and_issues_their_certificates(tmp_path: Path) -> None:
    from civicmesh.registry import Registry

    site, _ = setup_central(tmp_path)
    config, device_id = setup_edge(tmp_path)
    request = config.with_name(f"enrol-{device_id}.json")
    out = tmp_path / "bundle"
    proc = civicmesh(
        "setup",
        "enrol",
        request,
        "--dir",
        site,
        "--zone",
        "z1",
        "--lat",
        "57.1",
        "--lon",
        "-2.1",
        "--out",
        out,
    )
    assert proc.returncode == 0, proc.stderr
    assert Registry.load(site / "registry.json").devices[device_id].zone == "z1"
    assert {p.name for p in out.iterdir()} == {"ca.crt", f"{device_id}.crt", f"{device_id}.key"}
    assert (
        civicmesh("setup", "enrol", request, "--dir", site, "--out", out).returncode == 1
    )  # no zone

    gw_config = tmp_path / "gw" / "gateway.toml"
    made = civicmesh("setup", "gateway", "--config", gw_config, "--state-dir", tmp_path / "gw/st")
    gateway_id = next(
        ln.split()[-1] for ln in made.stdout.splitlines() if ln.startswith("gateway id:")
    )
    proc = civicmesh(
        "setup",
        "enrol",
        gw_config.with_name(f"enrol-{gateway_id}.json"),
        "--dir",
        site,
        "--out",
        tmp_path / "gwb",
    )
    assert proc.returncode == 0, proc.stderr
    assert gateway_id in Registry.load(site / "registry.json").gateways
    assert f"user gw-{gateway_id}" in (site / "mosquitto.acl").read_text()
    check = civicmesh("setup", "central", "--check", "--dir", site, "--user", ME)
    assert check.returncode == 0, check.stdout  # the ACL follows the registry
