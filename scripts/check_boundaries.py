#!/usr/bin/env python3
"""Check the package boundaries in pyproject.toml's ``[tool.civicmesh.boundaries]``.

    python scripts/check_boundaries.py [--root DIR]

Each top-level package of the repository (a folder with ``__init__.py``) must have a
line there naming the packages it may import; this reads every ``.py`` file of every
package (function-level imports and ``importlib.import_module("...")`` with a literal
name included) and reports each import of a package not on its line, and each import of
another package's private (``_name``) module or name. Standard library and third-party
imports are not this check's business. Exit status 1 when anything is reported, with
one ``file:line: what`` per finding.
"""

from __future__ import annotations

import argparse
import ast
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ANY = "*"


@dataclass(frozen=True, slots=True)
class Finding:
    path: Path
    line: int
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.text}"


@dataclass(frozen=True, slots=True)
class Contracts:
    allowed: dict[str, frozenset[str] | None]  # None: may import anything
    private_ok: frozenset[str]

    @classmethod
    def load(cls, pyproject: Path) -> Contracts:
        with pyproject.open("rb") as handle:
            tool = tomllib.load(handle).get("tool", {}).get("civicmesh", {})
        if "boundaries" not in tool:
            raise SystemExit(f"{pyproject}: no [tool.civicmesh.boundaries] table")
        allowed: dict[str, frozenset[str] | None] = {}
        for package, value in tool["boundaries"].items():
            allowed[package] = None if value == ANY else frozenset(value)
        private = tool.get("boundaries-private", {}).get("allowed", [])
        return cls(allowed, frozenset(private))


def local_packages(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").is_file())


def imports(tree: ast.AST) -> Iterator[tuple[int, str, list[str]]]:
    """(line, module, imported names) for every absolute import in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func) and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield node.lineno, first.value, []


def _is_dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Attribute):
        return func.attr == "import_module"
    return isinstance(func, ast.Name) and func.id in ("import_module", "__import__")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def check_file(
    path: Path, package: str, contracts: Contracts, known: set[str], shown: Path
) -> list[Finding]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as exc:
        return [Finding(shown, exc.lineno or 0, f"cannot parse: {exc.msg}")]
    allowed = contracts.allowed[package]
    findings = []
    for line, module, names in imports(tree):
        top = module.split(".")[0]
        if top not in known or top == package:
            continue
        if allowed is not None and top not in allowed:
            may = ", ".join(sorted(allowed)) or "no other package"
            findings.append(
                Finding(shown, line, f"{package} imports {module} ({package} may import: {may})")
            )
            continue
        if package in contracts.private_ok:
            continue
        hidden = [part for part in module.split(".")[1:] if _private(part)]
        hidden += [name for name in names if _private(name)]
        if hidden:
            findings.append(
                Finding(
                    shown,
                    line,
                    f"{package} imports the private {', '.join(hidden)} of {module}; "
                    "make it public there or keep it inside its package",
                )
            )
    return findings


def check(root: Path) -> list[Finding]:
    contracts = Contracts.load(root / "pyproject.toml")
    packages = local_packages(root)
    known = set(packages) | set(contracts.allowed)
    findings = [
        Finding(
            Path("pyproject.toml"),
            0,
            f"package {name} has no line in [tool.civicmesh.boundaries]; say what it may import",
        )
        for name in packages
        if name not in contracts.allowed
    ]
    for package in packages:
        if package not in contracts.allowed:
            continue
        for path in sorted((root / package).rglob("*.py")):
            findings += check_file(path, package, contracts, known, path.relative_to(root))
    return findings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args(argv)
    findings = check(args.root)
    for finding in findings:
        print(finding)
    if findings:
        print(
            f"{len(findings)} package boundary violation(s); the rules are in "
            "pyproject.toml [tool.civicmesh.boundaries]",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
