"""The ``civicmesh`` command: one entry point, command groups contributed by components.

Components register their commands as entry points in the ``civicmesh.commands`` group
(``[project.entry-points."civicmesh.commands"]`` in pyproject.toml): the name is the
command, the value ``module:register [extra, ...]`` names the function that adds it to
the parser and the extras it needs. This module names no component. A command whose
extra is not installed is still listed, and running it says what to install instead of
vanishing from the help.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from civicmesh import __version__
from civicmesh.errors import CivicmeshError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "civicmesh.commands"
DISTRIBUTION = "civicmesh"

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?")
_EXTRA_MARKER = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")

Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


@dataclass(frozen=True, slots=True)
class Command:
    """One ``civicmesh.commands`` entry point: a command name, where it is, what it needs."""

    name: str
    target: str  # "module:function"
    extras: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Unavailable:
    """A command that cannot run here, and the one line that says why."""

    name: str
    reason: str
    short: str  # for the command list


def commands(entry_points: Iterable[importlib.metadata.EntryPoint] | None = None) -> list[Command]:
    """The registered commands, sorted by name."""
    if entry_points is None:
        entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    found = {
        ep.name: Command(ep.name, f"{ep.module}:{ep.attr}", tuple(ep.extras)) for ep in entry_points
    }
    return [found[name] for name in sorted(found)]


def missing_requirements(
    extra: str, requires: Sequence[str] | None = None, seen: frozenset[str] = frozenset()
) -> list[str]:
    """Distributions that ``civicmesh[extra]`` needs and that are not installed."""
    if requires is None:
        requires = importlib.metadata.requires(DISTRIBUTION) or []
    missing: list[str] = []
    for line in requires:
        requirement, _, marker = line.partition(";")
        markers = _EXTRA_MARKER.findall(marker)
        if extra not in markers:
            continue
        match = _NAME.match(requirement)
        if match is None:
            continue
        name, nested = match.group(1), match.group(2)
        if name.lower() == DISTRIBUTION:  # civicmesh[pki] inside another extra
            for inner in (e.strip() for e in (nested or "").split(",") if e.strip()):
                if inner not in seen:
                    missing += missing_requirements(inner, requires, seen | {extra})
            continue
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def install_hint(command: Command) -> str:
    extras = ",".join(command.extras)
    return f"install civicmesh[{extras}] for `civicmesh {command.name}`"


def add_commands(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], registered: Sequence[Command]
) -> list[Unavailable]:
    """Add every available command to ``sub``; return the ones that cannot run here.

    Several commands may share one ``register`` function (it adds all of them); it is
    called once.
    """
    unavailable: list[Unavailable] = []
    loaded: set[str] = set()
    for command in registered:
        missing = [m for extra in command.extras for m in missing_requirements(extra)]
        if missing:
            reason = f"{install_hint(command)} (missing: {', '.join(sorted(set(missing)))})"
            short = f"needs civicmesh[{','.join(command.extras)}], not installed"
            unavailable.append(Unavailable(command.name, reason, short))
            continue
        if command.target in loaded:
            continue
        try:
            register = _load(command.target)
        except ImportError as exc:
            # The extra is installed and the import still fails: a broken install, said
            # plainly; the other commands keep working.
            log.warning("command %s unavailable: %s", command.name, exc)
            reason = f"`civicmesh {command.name}` cannot be loaded ({exc}); reinstall civicmesh"
            if command.extras:
                reason += f"[{','.join(command.extras)}]"
            unavailable.append(Unavailable(command.name, reason, "cannot be loaded"))
            continue
        register(sub)
        loaded.add(command.target)
    for item in unavailable:
        if item.name not in sub.choices:
            sub.add_parser(item.name, help=f"({item.short})", add_help=False)
    return unavailable


def _load(target: str) -> Register:
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    register: Register = getattr(module, attr)
    return register


def build_parser(
    registered: Sequence[Command] | None = None,
) -> tuple[argparse.ArgumentParser, list[Unavailable]]:
    parser = argparse.ArgumentParser(
        prog="civicmesh", description="civicmesh smart-city sensor network"
    )
    parser.add_argument("--version", action="version", version=f"civicmesh {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    unavailable = add_commands(sub, commands() if registered is None else registered)
    return parser, unavailable


def _command_word(argv: Sequence[str]) -> str | None:
    """The subcommand in ``argv`` (the first word that is not a global option)."""
    for word in argv:
        if not word.startswith("-"):
            return word
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, unavailable = build_parser()
    word = _command_word(argv)
    for item in unavailable:
        if item.name == word:  # before argparse: `civicmesh api --help` lands here too
            print(f"civicmesh: {item.reason}", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except CivicmeshError as exc:
        print(f"civicmesh: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
