"""The ``civicmesh`` command finds its subcommands through entry points and names no component.

A command whose extra is missing is listed and says what to install (the clean-venv
check of the edge extra is in test_install_footprint.py).
"""

from __future__ import annotations

import argparse
import importlib.metadata
from pathlib import Path

import pytest

from civicmesh import cli

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_the_shared_cli_names_no_component() -> None:
    text = (REPO_ROOT / "civicmesh" / "cli.py").read_text()
    for component in ("analytics", "edge.", "gateway", "firmware_sim", "training", "demo."):
        assert component not in text


def test_every_entry_point_registers_exactly_its_commands() -> None:
    registered = cli.commands()
    names = {c.name for c in registered}
    assert {"edge", "gateway", "api", "ingest", "pki", "demo", "eval", "registry"} <= names
    by_target: dict[str, set[str]] = {}
    for command in registered:
        by_target.setdefault(command.target, set()).add(command.name)
    for target, expected in by_target.items():
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        cli._load(target)(sub)
        assert set(sub.choices) == expected, target


def test_the_help_lists_every_command() -> None:
    parser, unavailable = cli.build_parser()
    assert unavailable == []  # the dev install has every extra
    text = parser.format_help()
    for command in cli.commands():
        assert command.name in text


def test_missing_requirements_of_an_extra() -> None:
    requires = [
        'pytest>=8; extra == "x"',
        'surely-not-installed-dist>=1; extra == "x"',
        'other-missing; extra == "y"',
        'civicmesh[y]; extra == "x"',
    ]
    assert cli.missing_requirements("x", requires) == [
        "surely-not-installed-dist",
        "other-missing",
    ]
    assert cli.missing_requirements("z", requires) == []


def test_the_real_extras_are_satisfied_here() -> None:
    for extra in ("edge", "gateway", "analytics", "pki", "train"):
        assert cli.missing_requirements(extra) == [], extra


def test_a_command_whose_extra_is_missing_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.metadata.requires("civicmesh") or []
    monkeypatch.setattr(
        importlib.metadata,
        "requires",
        lambda name: [*real, 'surely-not-installed-dist; extra == "ghost"'],
    )
    commands = [
        cli.Command("api", "analytics.cli:register", ("ghost",)),
        cli.Command("registry", "civicmesh.registry_cli:register", ()),
    ]
    monkeypatch.setattr(cli, "commands", lambda: commands)
    parser, unavailable = cli.build_parser()
    assert [u.name for u in unavailable] == ["api"]
    assert "(needs civicmesh[ghost], not installed)" in parser.format_help()
    for argv in (["api", "--help"], ["-v", "api", "run"], ["api"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.strip() == (
            "civicmesh: install civicmesh[ghost] for `civicmesh api` "
            "(missing: surely-not-installed-dist)"
        )
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["registry", "--help"])
    assert exit_info.value.code == 0


def test_a_broken_module_is_reported_not_raised(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    commands = [cli.Command("ghost", "civicmesh.no_such_module:register", ())]
    monkeypatch.setattr(cli, "commands", lambda: commands)
    assert cli.main(["ghost"]) == 2
    assert "`civicmesh ghost` cannot be loaded" in capsys.readouterr().err


def test_drivers_are_found_through_entry_points_not_named_in_the_shared_package() -> None:
    from civicmesh.drivers import DriverError, load_driver, registered_drivers

    drivers = registered_drivers()
    assert drivers["sim"] == "firmware_sim.driver:SimulatedDriver"
    assert {"replay-sensor-community", "replay-uci"} <= set(drivers)
    assert "firmware_sim." not in (REPO_ROOT / "civicmesh" / "drivers.py").read_text()
    assert load_driver("sim", {"seed": 1}).metrics
    with pytest.raises(DriverError, match="use one of replay-sensor-community, replay-uci, sim"):
        load_driver("nope", {})
