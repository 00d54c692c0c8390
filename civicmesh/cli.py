"""The ``civicmesh`` command: one entry point, command groups contributed by components.

Each component module named in :data:`GROUPS` exposes ``register(subparsers)``; it is
imported only if installed, so an edge-only install still has a working ``civicmesh``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from civicmesh import __version__
from civicmesh.errors import CivicmeshError

log = logging.getLogger(__name__)

# module -> the extra that provides it (for the error message when it is missing)
GROUPS: dict[str, str] = {
    "civicmesh.registry_cli": "",
    "civicmesh.audit.cli": "",
    "civicmesh.setup": "",
    "edge.cli": "edge",
    "gateway.cli": "gateway",
    "analytics.cli": "analytics",
    "analytics.reports.cli": "analytics",
    "analytics.dashboard.cli": "analytics",
    "civicmesh.pki": "analytics",
    "firmware_sim.cli": "edge",
    "training.cli": "train",
    "civicmesh.demo": "all",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="civicmesh", description="civicmesh smart-city sensor network"
    )
    parser.add_argument("--version", action="version", version=f"civicmesh {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name, extra in GROUPS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            log.debug(
                "command group %s unavailable (%s); install civicmesh[%s]", module_name, exc, extra
            )
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
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
