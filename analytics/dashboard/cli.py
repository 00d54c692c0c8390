"""``civicmesh dashboard add-user``: users of the web dashboard."""

from __future__ import annotations

import argparse
import getpass
import os
from pathlib import Path

from analytics.dashboard.auth import ROLES, AuthError, UserFile


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dash = sub.add_parser("dashboard", help="users of the web dashboard")
    cmds = dash.add_subparsers(dest="dashboard_command", metavar="ACTION", required=True)
    add = cmds.add_parser("add-user", help="add a user, or set a user's role and password")
    add.add_argument("--file", type=Path, default=Path("var/dashboard-users.json"))
    add.add_argument("--username", required=True)
    add.add_argument("--role", choices=ROLES, default="viewer")
    add.add_argument(
        "--password-env",
        help="read the password from this environment variable (default: ask for it)",
    )
    add.set_defaults(func=_add_user)


def _add_user(args: argparse.Namespace) -> int:
    if args.password_env:
        password = os.environ.get(args.password_env, "")
        if not password:
            raise AuthError(f"The environment variable {args.password_env} is empty or unset")
    else:
        password = getpass.getpass(f"Password for {args.username}: ")
    user = UserFile(args.file).add(args.username, args.role, password)
    print(f"{user.name} ({user.role}) saved in {args.file}")
    return 0
