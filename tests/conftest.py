"""Fixtures and helpers shared by the test modules: the offline dataset mirror, small file writers, tiny parameter
sets for the training and retraining tests, one thread per test process, and the real services tests start
(``mlflow server``) or need running (PostgreSQL, Redis).

Shared here so that no test module imports another."""

from __future__ import annotations

import contextlib
import gzip
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from pipeline.data.download import download
from pipeline.data.preprocess import preprocess
from pipeline.local_servers import free_port, start_group, stop_group, wait_http
from pipeline.params import MIRROR_ENV, Params, load_params

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POSTGRES = ("127.0.0.1", 5432)  # trust auth for user postgres, as on the CI machines
REDIS = ("127.0.0.1", 6379)

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


def pipeline_cli(params_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m pipeline --params params_file ...`` in a fresh process from the file's folder, as a user runs it:
    this checkout's code, no data mirror."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop(MIRROR_ENV, None)
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "--params", str(params_file), *args],
        cwd=params_file.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


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


def migrate_airflow(env: dict[str, str] | None = None) -> None:
    """``airflow db migrate`` of the Airflow home set in ``env`` (default: this process's environment)."""
    migrate = subprocess.run(
        [str(Path(sys.executable).with_name("airflow")), "db", "migrate"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]


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


# --------------------------------------------------------------------------------------------- real services
def with_venv_path(**extra: str) -> dict[str, str]:
    """This environment with the venv's ``bin`` first on PATH (servers spawn ``mlflow`` / ``airflow`` by name)."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **extra}


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 with proxied artifacts in ``root`` and a SQLite store there (or
    ``backend_uri``, e.g. PostgreSQL); restartable."""

    def __init__(self, root: Path, backend_uri: str | None = None) -> None:
        self.root = root
        self.backend_uri = backend_uri or f"sqlite:///{root / 'mlflow.db'}"
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = self.root / "server.log"
        cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", self.backend_uri]
        cmd += ["--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--workers", "1"]
        with open(log, "a") as out:
            env = with_venv_path(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
            self.proc = start_group(cmd, out, env=env, cwd=self.root)
        wait_http(f"{self.uri}/health", self.proc, log)

    def stop(self) -> None:
        stop_group(self.proc)
        self.proc = None

    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(self.uri, registry_uri=self.uri)  # explicit: the global registry URI may be elsewhere


SERVICE_HINTS = {
    "PostgreSQL": "sudo service postgresql start (Debian: apt-get install postgresql; trust auth on 127.0.0.1)",
    "Redis": "sudo service redis-server start (Debian: apt-get install redis-server)",
}


def require_service(name: str, address: tuple[str, int]) -> None:
    """Skip (on a developer's machine) or fail (in CI, where ``.ci/run`` starts them) without the service."""
    try:
        socket.create_connection(address, timeout=3).close()
    except OSError as err:
        message = f"{name} is not reachable on {address[0]}:{address[1]} ({err}); start it: {SERVICE_HINTS[name]}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)


@contextlib.contextmanager
def postgres_database(purpose: str) -> Iterator[str]:
    """A fresh, uniquely named PostgreSQL database for one test, dropped afterwards; yields its SQLAlchemy URI."""
    import psycopg

    require_service("PostgreSQL", POSTGRES)
    name = f"hymoe_{purpose}_{uuid.uuid4().hex[:8]}"
    admin = f"postgresql://postgres@{POSTGRES[0]}:{POSTGRES[1]}/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@{POSTGRES[0]}:{POSTGRES[1]}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
