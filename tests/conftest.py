"""Fixtures and helpers shared by the test modules: the offline dataset mirror, small file writers, tiny parameter
sets for the training and retraining tests, and one thread per test process.

Shared here so that no test module imports another."""

from __future__ import annotations

import gzip
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from pipeline.data.download import download
from pipeline.data.preprocess import preprocess
from pipeline.params import MIRROR_ENV, Params, load_params

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


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    """Tiny models train fastest on one thread, and two test processes then share the two cores fairly."""
    torch.set_num_threads(1)


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


def write_params(path: Path, overrides: dict[str, Any]) -> Path:
    """The repository's params.yaml with dotted ``overrides`` applied, written to ``path``."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def tiny_retrain(root: Path, **extra: Any) -> dict[str, Any]:
    """Tiny synthetic data, a tiny model, every folder under ``root``, no MLflow unless ``extra`` says so."""
    return {
        "data.dataset": "synthetic",
        "data.synthetic.n_users": 200,
        "data.synthetic.n_items": 60,
        "data.synthetic.mean_events_per_user": 15.0,
        "data.synthetic.n_categories": 4,
        "data.interim_dir": str(root / "interim"),
        "preprocess.processed_dir": str(root / "processed"),
        **TINY_MODEL,
        "model.max_seq_len": 10,
        "train.model_dir": str(root / "models"),
        "train.epochs": 1,
        "train.batch_size": 64,
        "train.eval_batch_size": 128,
        "evaluate.report_dir": str(root / "reports"),
        "retrain.inbox": str(root / "inbox"),
        "retrain.store_dir": str(root / "store"),
        "retrain.work_dir": str(root / "work"),
        "retrain.min_new_events": 20,
        "retrain.retries": 0,
        "mlflow.enabled": False,
        "mlflow.store_dir": str(root / "mlflow"),
        **extra,
    }


def tiny_overrides(root: Path, **extra: Any) -> dict[str, Any]:
    """A model and data small enough that an epoch takes well under a second on two CPU cores."""
    return {
        "data.dataset": "synthetic",
        "data.interim_dir": str(root / "interim"),
        "data.synthetic.n_users": 300,
        "data.synthetic.n_items": 120,
        "data.synthetic.mean_events_per_user": 20.0,
        "data.synthetic.n_categories": 6,
        "preprocess.processed_dir": str(root / "processed"),
        **TINY_MODEL,
        "model.max_seq_len": 12,
        "train.model_dir": str(root / "models"),
        "train.epochs": 4,
        "train.batch_size": 64,
        "train.lr": 0.005,
        "train.eval_batch_size": 128,
        "evaluate.report_dir": str(root / "reports"),
        "mlflow.store_dir": str(root / "mlflow"),  # the embedded MLflow store stays in the test's folder
        **extra,
    }


def prepared(root: Path, **extra: Any) -> Params:
    params = load_params(REPO_ROOT / "params.yaml", tiny_overrides(root, **extra))
    download(params.data)
    preprocess(params.preprocess, params.data.interim_dir)
    return params
