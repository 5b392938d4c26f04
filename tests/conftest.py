"""Fixtures shared by the data-stage tests: the offline dataset mirror and small file writers."""

from __future__ import annotations

import gzip
import os
import socket
from pathlib import Path

import pytest

from pipeline.params import MIRROR_ENV

REPO_ROOT = Path(__file__).resolve().parents[1]

# a model small enough that an epoch on tiny synthetic data takes well under a second on two CPU cores
TINY_MODEL = {
    "model.hidden_size": 16,
    "model.num_layers": 1,
    "model.num_heads": 1,
    "model.ffn_hidden": 32,
    "model.moe.dense_hidden": 32,
    "model.moe.expert_hidden": 16,
    "model.moe.num_experts": 4,
    "model.moe.warmup_steps": 10,
}


def mirror_dir() -> Path | None:
    """The offline dataset copies: ``$HYMOE_DATA_MIRROR`` if set, else ``<repo>/../shared/datasets``."""
    value = os.environ.get(MIRROR_ENV)
    path = Path(value).expanduser() if value else REPO_ROOT.parent / "shared" / "datasets"
    return path if path.is_dir() else None


@pytest.fixture(autouse=True)
def _no_outside_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs go to the embedded store under each test's folder, never to a server set in the developer's shell."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def real_mirror() -> Path:
    """Folder of real dataset copies (see shared/datasets/SOURCES.md); the test is skipped without one."""
    root = mirror_dir()
    if root is None:
        pytest.skip(f"no dataset mirror: set ${MIRROR_ENV} or provide <repo>/../shared/datasets")
    return root


@pytest.fixture
def no_mirror_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make sure a mirror configured in the developer's shell cannot leak into a fixture-only test."""
    monkeypatch.delenv(MIRROR_ENV, raising=False)


def write_text(path: Path, text: str, *, encoding: str = "utf-8", gz: bool = False) -> Path:
    """Write ``text`` (optionally gzip-compressed) creating parent folders; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode(encoding)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def closed_port() -> int:
    """A local TCP port with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
