"""Real ``dvc repro`` of the data stages in a temporary copy of the repository."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO_ROOT, mirror_dir

pytestmark = pytest.mark.slow


def _copy_repo(dest: Path) -> None:
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for name in tracked:
        source = REPO_ROOT / name
        if source.is_file() and not name.startswith(".dvc/"):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def _dvc_repo(tmp_path: Path, substitutions: dict[str, str]) -> tuple[Path, dict[str, str]]:
    """A git + DVC repository holding a copy of the project, with ``params.yaml`` edited by regex substitutions."""
    repo = tmp_path / "repo"
    _copy_repo(repo)
    params = (repo / "params.yaml").read_text()
    for pattern, replacement in substitutions.items():
        params = re.sub(pattern, replacement, params)
    (repo / "params.yaml").write_text(params)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    mirror = mirror_dir()
    if mirror is not None:
        env["HYMOE_DATA_MIRROR"] = str(mirror)
    _run(["git", "init", "-q"], repo, env)
    _run([*DVC, "init", "-q"], repo, env)
    _run([*DVC, "config", "core.analytics", "false"], repo, env)
    return repo, env


DVC = [sys.executable, "-m", "dvc"]


def _changed_stages(repo: Path, env: dict[str, str], substitutions: dict[str, str]) -> set[str]:
    """The stages ``dvc status`` reports as changed after editing ``params.yaml`` (restored afterwards)."""
    path = repo / "params.yaml"
    original = path.read_text()
    edited = original
    for pattern, replacement in substitutions.items():
        edited, count = re.subn(pattern, replacement, edited)
        assert count == 1, f"{pattern!r} matched {count} lines of params.yaml"
    path.write_text(edited)
    try:
        done = subprocess.run(
            [*DVC, "status", "--json"], cwd=repo, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        status = json.loads(done.stdout.strip() or "{}")
    finally:
        path.write_text(original)
    return {name.split(":")[-1] for name in status}


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.mark.parametrize("dataset", ["ml-100k", "synthetic"])
def test_dvc_repro_data_stages_then_nothing_to_do(tmp_path: Path, dataset: str) -> None:
    mirror = mirror_dir()
    if dataset == "ml-100k" and mirror is None:
        pytest.skip("ML-100K needs the offline mirror (HYMOE_DATA_MIRROR)")
    repo, env = _dvc_repo(
        tmp_path, {r"(?m)^  dataset: \S+": f"  dataset: {dataset}", r"(?m)^    n_users: \d+": "    n_users: 300"}
    )

    first = _run([*DVC, "repro", "preprocess"], repo, env)
    assert "Running stage 'download'" in first and "Running stage 'preprocess'" in first
    stats = (repo / "data/processed/stats.json").read_text()
    if dataset == "ml-100k":
        assert '"users": 943' in stats and '"items": 1349' in stats and '"events": 99287' in stats
    train = pq.read_table(repo / "data/processed/train.parquet")
    assert train.num_rows > 0
    outputs = sorted((repo / "data").rglob("*.parquet"))
    mtimes = {p: p.stat().st_mtime_ns for p in outputs}

    second = _run([*DVC, "repro", "preprocess"], repo, env)
    assert "Running stage" not in second
    assert "didn't change" in second or "up to date" in second
    assert {p: p.stat().st_mtime_ns for p in outputs} == mtimes

    metrics = _run([*DVC, "metrics", "show"], repo, env)
    assert "stats.json" in metrics


def test_dvc_full_pipeline_metrics_plots_and_sasrec_ablation(tmp_path: Path) -> None:
    """download -> preprocess -> train -> evaluate under DVC, then the MoE-off ablation as a DVC experiment."""
    mirror = mirror_dir()
    dataset = "ml-100k" if mirror is not None else "synthetic"
    repo, env = _dvc_repo(
        tmp_path, {r"(?m)^  dataset: \S+": f"  dataset: {dataset}", r"(?m)^  epochs: \d+": "  epochs: 3"}
    )
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init"], repo, env)

    out = _run([*DVC, "repro"], repo, env)
    for stage in ("download", "preprocess", "train", "evaluate"):
        assert f"Running stage '{stage}'" in out
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert 0.0 < metrics["test"]["ndcg@10"] <= metrics["test"]["hr@10"] <= 1.0
    shown = _run([*DVC, "metrics", "show"], repo, env)
    assert "test.ndcg@10" in shown and "stats.json" in shown
    _run([*DVC, "plots", "show", "-o", str(tmp_path / "plots")], repo, env)
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "valid_ndcg@10" in html and "expert_load.png" in html

    # each stage lists exactly the parameters it reads: tracking, retraining and report cut-offs do not re-train
    assert _changed_stages(repo, env, {r"experiment_prefix: \w+": "experiment_prefix: other"}) == {"evaluate"}
    assert _changed_stages(repo, env, {r"ks: \[5, 10, 20\]": "ks: [10, 20]"}) == {"evaluate"}
    assert _changed_stages(repo, env, {r"min_new_events: 100": "min_new_events: 5"}) == set()
    assert _changed_stages(repo, env, {r"(?m)^  hidden_size: 64": "  hidden_size: 32"}) == {"train"}

    # the paper's main ablation: same data, MoE off; only train and evaluate run again
    exp = _run([*DVC, "exp", "run", "-S", "model.moe.enabled=false"], repo, env)
    assert "Running stage 'train'" in exp and "Running stage 'download'" not in exp
    ablation = json.loads((repo / "reports/metrics.json").read_text())
    assert json.loads((repo / "reports/expert_load.json").read_text())["layers"] == 0
    assert ablation["test"] != metrics["test"]

    # evaluate also registered both models in the embedded MLflow store (no server): the first became champion, the
    # ablation is the challenger and took `champion` only if its test NDCG@10 is higher
    from mlflow import MlflowClient

    store = f"sqlite:///{repo / 'data/mlflow/mlflow.db'}"
    client = MlflowClient(store, registry_uri=store)
    name = f"hymoerec-{dataset}"
    first, second = client.get_model_version(name, "1"), client.get_model_version(name, "2")
    run = client.get_run(first.run_id)
    assert run.data.metrics["test.ndcg_at_10"] == pytest.approx(metrics["test"]["ndcg@10"])
    assert "plots/expert_load.png" in {a.path for a in client.list_artifacts(first.run_id, "plots")}
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"
    better = ablation["test"]["ndcg@10"] > metrics["test"]["ndcg@10"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == ("2" if better else "1")
    assert second.tags["promotion.decision"] == ("promoted" if better else "kept")
