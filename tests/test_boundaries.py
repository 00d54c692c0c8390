"""The package boundaries of pyproject.toml hold, and their check fails when one is crossed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CHECK = REPO_ROOT / "scripts" / "check_boundaries.py"

CONTRACTS = """
[tool.civicmesh.boundaries]
civicmesh = []
edge = ["civicmesh"]
analytics = ["civicmesh"]
tests = "*"

[tool.civicmesh.boundaries-private]
allowed = ["tests"]
"""


def _run(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHECK), "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _tree(tmp_path: Path, files: dict[str, str], contracts: str = CONTRACTS) -> Path:
    (tmp_path / "pyproject.toml").write_text(contracts)
    for package in ("civicmesh", "edge", "analytics", "tests"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    for name, text in files.items():
        (tmp_path / name).write_text(textwrap.dedent(text))
    return tmp_path


def test_the_repository_keeps_its_boundaries() -> None:
    result = _run(REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_clean_tree_passes(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "edge/agent.py": "import json\nimport numpy\nfrom civicmesh import protocol\n",
            "tests/test_x.py": "from edge.agent import _inner\nimport analytics\n",
        },
    )
    result = _run(root)
    assert result.returncode == 0, result.stdout


def test_the_shared_package_importing_a_component_fails(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "civicmesh/demo.py": """
                def run():
                    from analytics.store import open_store  # hidden in a function
                    return open_store
            """
        },
    )
    result = _run(root)
    assert result.returncode == 1
    assert "civicmesh/demo.py:3: civicmesh imports analytics.store" in result.stdout


def test_a_component_importing_another_fails(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"edge/x.py": "import analytics.api as api\n"})
    result = _run(root)
    assert result.returncode == 1
    assert "edge/x.py:1: edge imports analytics.api (edge may import: civicmesh)" in result.stdout


def test_an_import_by_name_is_seen(tmp_path: Path) -> None:
    root = _tree(
        tmp_path, {"civicmesh/cli.py": "import importlib\nimportlib.import_module('edge.cli')\n"}
    )
    result = _run(root)
    assert result.returncode == 1
    assert "civicmesh/cli.py:2: civicmesh imports edge.cli" in result.stdout


def test_a_private_name_of_another_package_fails(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "analytics/a.py": "from civicmesh.protocol import _SCALES, PUBLIC\n",
            "edge/b.py": "import civicmesh._internal\n",
        },
    )
    result = _run(root)
    assert result.returncode == 1
    assert "analytics/a.py:1: analytics imports the private _SCALES of civicmesh.protocol" in (
        result.stdout
    )
    assert "edge/b.py:1: edge imports the private _internal of civicmesh._internal" in (
        result.stdout
    )


def test_a_package_without_a_contract_fails(tmp_path: Path) -> None:
    root = _tree(tmp_path, {})
    (root / "newpkg").mkdir()
    (root / "newpkg" / "__init__.py").write_text("")
    result = _run(root)
    assert result.returncode == 1
    assert "package newpkg has no line in [tool.civicmesh.boundaries]" in result.stdout
