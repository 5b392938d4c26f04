"""What the study runs: the spec (``spec.yaml``) resolved into (dataset, variant, seed) runs and their parameters.

A run's parameters are ``params.yaml``, then the dataset's overrides, then the group's base variant, then the
variant's own overrides, then ``train.seed`` and the run's folders. The *config digest* hashes the resolved
parameters that can change a result (not folders, seed, device or tracking), so the report can tell which seeds
belong together and which finished runs a later change of defaults has made stale.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.params import Params, ParamsError, load_params
from pipeline.tracking.runs import flatten

SPEC_FILE = Path(__file__).with_name("spec.yaml")
WORK_DIR = Path("data/study")  # models, checkpoints, reports, prepared data: never committed
RECORDS_DIR = Path("results")  # one small JSON per finished run: committed, so no result is lost with a machine
EXPERIMENT_PREFIX = "study"  # MLflow experiment study-<dataset>
# parameters that say where or how a run executes, not what it computes
NOT_IN_DIGEST = (
    "data.mirror",
    "data.cache_dir",
    "data.interim_dir",
    "data.max_file_mb",  # a limit: a run reads the same data or is refused, so results recorded before it stay valid
    "preprocess.processed_dir",
    "train.model_dir",
    "train.seed",
    "train.device",
    "train.resume",
    "train.eval_batch_size",
    "evaluate.report_dir",
)


@dataclass(frozen=True)
class Run:
    dataset: str
    variant: str
    group: str
    seed: int
    overrides: dict[str, Any]  # dataset + base + variant overrides, in that order (no seed, no folders)

    @property
    def name(self) -> str:
        return f"{self.variant}-seed{self.seed}"

    def folder(self, work_dir: Path = WORK_DIR) -> Path:
        return work_dir / self.dataset / "runs" / self.name

    def record_path(self, records_dir: Path = RECORDS_DIR) -> Path:
        return records_dir / self.dataset / f"{self.name}.json"

    def interim_record_path(self, records_dir: Path = RECORDS_DIR) -> Path:
        """The record of the run's best weights so far, while it is unfinished (removed when it finishes)."""
        return records_dir / self.dataset / f"{self.name}.interim.json"


def load_spec(path: Path = SPEC_FILE) -> dict[str, Any]:
    spec = yaml.safe_load(path.read_text())
    for name, variant in spec["variants"].items():
        if variant["group"] not in spec["groups"]:
            raise ParamsError(f"{path}: variant {name!r} names unknown group {variant['group']!r}")
    return spec


def data_dirs(dataset: str, work_dir: Path = WORK_DIR) -> dict[str, str]:
    """The prepared-data folders shared by every run of one dataset."""
    base = work_dir / dataset / "data"
    return {"data.interim_dir": str(base / "interim"), "preprocess.processed_dir": str(base / "processed")}


def plan(
    spec: dict[str, Any],
    dataset: str,
    *,
    groups: list[str] | None = None,
    variants: list[str] | None = None,
    seeds: list[int] | None = None,
) -> list[Run]:
    """The runs of one dataset: group by group in spec order, seed-major within a group (every variant's first
    seed before any second seed, so a partial table fills across, not down)."""
    if dataset not in spec["datasets"]:
        raise ParamsError(f"unknown study dataset {dataset!r}; the spec has {sorted(spec['datasets'])}")
    unknown = set(variants or ()) - set(spec["variants"])
    if unknown:
        raise ParamsError(f"unknown study variants {sorted(unknown)}; the spec has {sorted(spec['variants'])}")
    data = spec["datasets"][dataset]
    runs: list[Run] = []
    for name, variant in spec["variants"].items():
        group = spec["groups"][variant["group"]]
        if dataset not in variant.get("datasets", group["datasets"]) or (groups and variant["group"] not in groups):
            continue
        if variants and name not in variants:
            continue
        base = spec["variants"][group["base"]]["overrides"] if "base" in group else {}
        overrides = {**data["overrides"], **base, **variant["overrides"]}
        for seed in data.get("seeds_by_variant", {}).get(name, group.get("seeds", data["seeds"])):
            if seeds is None or seed in seeds:
                runs.append(Run(dataset, name, variant["group"], int(seed), overrides))
    group_order = list(spec["groups"])
    return sorted(runs, key=lambda run: (group_order.index(run.group), run.seed))


def run_params(
    run: Run, params_file: str | Path = "params.yaml", work_dir: Path = WORK_DIR, extra: dict[str, Any] | None = None
) -> Params:
    """The run's parameters; ``extra`` overrides last (a benchmark training the same run elsewhere, say)."""
    folder = run.folder(work_dir)
    return load_params(
        params_file,
        {
            **run.overrides,
            **data_dirs(run.dataset, work_dir),
            "train.seed": run.seed,
            "train.model_dir": str(folder / "model"),
            "evaluate.report_dir": str(folder / "reports"),
            "mlflow.experiment_prefix": EXPERIMENT_PREFIX,
            **(extra or {}),
        },
    )


def resolved_settings(params: Params) -> dict[str, Any]:
    """Every parameter that can change a run's result, flattened (``model.moe.top_k``: 2); model settings only
    of the run's own kind (a Mamba setting does not make a SASRec result stale)."""
    flat = flatten({**dataclasses.asdict(params), "model": params.model.relevant()})
    return {k: v for k, v in flat.items() if k not in NOT_IN_DIGEST and not k.startswith(("mlflow.", "retrain."))}


def config_digest(params: Params) -> str:
    return hashlib.sha256(json.dumps(resolved_settings(params), sort_keys=True).encode()).hexdigest()[:12]
