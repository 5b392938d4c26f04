"""The package's layers import one way, and a served model loads without the trainer or the downloader."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

# Lower numbers sit lower; a module may import its own layer and any layer below it, never one above.
LAYERS = {
    "errors": 0,
    "io": 0,
    "cpu_memory": 0,
    "device": 0,
    "params": 0,
    "local_servers": 0,
    "model": 1,
    "data": 1,
    "evaluation": 2,
    "training": 3,
    "tracking": 4,
    "stages": 5,
    "ingest": 6,
    "study": 6,
    "cli": 7,
    "__main__": 7,
    "airflow_local": 7,
}
# params reads the two leaf modules whose dataclasses are parameter sections (they import nothing of the pipeline)
ALLOWED_UPWARD = {("params", "pipeline.data.events"), ("params", "pipeline.model.config")}
# the machinery of experiment tracking and orchestration, kept out of the layers that compute
OUTSIDE_TOOLS = {"mlflow", "airflow", "dvc"}
COMPUTING_LAYERS = {"model", "data", "evaluation", "training"}


def top_part(module: str) -> str:
    """``pipeline.training.train`` -> ``training``; ``pipeline.io`` -> ``io``."""
    return module.split(".")[1]


def module_name(path: Path, root: Path) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def imports_of(path: Path) -> list[str]:
    """Every module ``path`` imports, at the top or inside a function (lazy imports count: they run too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            if node.module == "pipeline":  # `from pipeline import tracking` imports a part by name
                found.extend(f"pipeline.{alias.name}" for alias in node.names)
    return found


def layer_violations(root: Path = REPO_ROOT) -> list[str]:
    """Each import that goes up a layer, or from a computing layer to tracking, orchestration or their tools."""
    problems = []
    for path in sorted((root / "pipeline").rglob("*.py")):
        source = module_name(path, root)
        if source == "pipeline":
            continue
        own = top_part(source)
        assert own in LAYERS, f"{source}: new top-level part {own!r}: give it a layer in this test"
        for target in imports_of(path):
            package = target.split(".")[0]
            if own in COMPUTING_LAYERS and package in OUTSIDE_TOOLS:
                problems.append(f"{source} imports {target}")
            if package != "pipeline" or target == "pipeline":
                continue
            other = top_part(target)
            if LAYERS[other] > LAYERS[own] and (own, target) not in ALLOWED_UPWARD:
                problems.append(f"{source} ({own}) imports {target} ({other}, a higher layer)")
            if own in COMPUTING_LAYERS and other in ("tracking", "ingest", "stages", "study"):
                problems.append(f"{source} imports {target}")
    return problems


def test_layers_import_one_way() -> None:
    assert layer_violations() == []


def test_the_layer_check_reports_the_old_circle(tmp_path: Path) -> None:
    """Not vacuous: the imports that used to close the circle (lazy ones included) are each reported."""
    (tmp_path / "pipeline" / "training").mkdir(parents=True)
    (tmp_path / "pipeline" / "evaluation").mkdir()
    (tmp_path / "pipeline" / "training" / "train.py").write_text(
        "from pipeline.evaluation.ranking import rank_split\n"  # allowed: evaluation is below training
        "def train():\n    from pipeline.tracking.runs import RunLogger\n    import mlflow\n"
    )
    (tmp_path / "pipeline" / "evaluation" / "evaluate.py").write_text(
        "from pipeline.training.train import train\nfrom pipeline import ingest\n"
    )
    assert layer_violations(tmp_path) == [
        "pipeline.evaluation.evaluate (evaluation) imports pipeline.training.train (training, a higher layer)",
        "pipeline.evaluation.evaluate (evaluation) imports pipeline.ingest (ingest, a higher layer)",
        "pipeline.evaluation.evaluate imports pipeline.ingest",
        "pipeline.training.train (training) imports pipeline.tracking.runs (tracking, a higher layer)",
        "pipeline.training.train imports pipeline.tracking.runs",
        "pipeline.training.train imports mlflow",
    ]


SERVE = """
import json, sys
from pathlib import Path
import pyarrow as pa
import torch
from pipeline.data.id_maps import id_map_table
from pipeline.io import write_parquet_atomic
from pipeline.model import build_model
from pipeline.model.files import save_weights
from pipeline.params import load_params
from pipeline.tracking.recommender import Recommender

folder = Path(sys.argv[1])
cfg = load_params(sys.argv[2]).model
model = build_model(cfg, 5)
save_weights(folder / "model.pt", model.state_dict())
(folder / "model.json").write_text(json.dumps({"model": cfg.relevant(), "num_items": 5}))
write_parquet_atomic(folder / "item_map.parquet", id_map_table("item_id", pa.array(["a", "b", "c", "d", "e"])))
served = Recommender.from_files(folder / "model.pt", folder / "model.json", folder / "item_map.parquet")
items, _ = served.recommend([["a", "b"]], ks=[2])
print(json.dumps({"items": items[0], "modules": sorted(sys.modules)}))
"""


def test_a_served_model_loads_without_trainer_or_downloader(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SERVE, str(tmp_path), str(REPO_ROOT / "params.yaml")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert len(out["items"]) == 2 and set(out["items"]) <= {"c", "d", "e"}  # history excluded, padding never
    loaded = set(out["modules"])
    # (tqdm itself is loaded by ``import torch``, whose torch.hub imports it when installed: not ours to avoid)
    for unwanted in ("pipeline.training", "pipeline.data.download", "pipeline.data.fetch", "requests", "mlflow"):
        assert unwanted not in loaded, f"serving imported {unwanted}"
    assert {"pipeline.model.files", "pipeline.data.sequences"} <= loaded


@pytest.mark.parametrize("entry", ["pipeline.training.train", "pipeline.evaluation.evaluate"])
def test_training_and_evaluation_do_not_load_tracking(entry: str) -> None:
    code = (
        f"import sys, {entry}; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'airflow', 'dvc') "
        "or m.startswith(('pipeline.tracking', 'pipeline.ingest', 'pipeline.stages'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
