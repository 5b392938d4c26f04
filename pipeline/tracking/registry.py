"""The ``register`` step: log the evaluated model as a pyfunc, register it, and gate the ``champion`` alias.

Aliases (registry stages are deprecated in MLflow 3):

* ``challenger``: the latest registered version, whatever the decision;
* ``champion``: the version that serves (``models:/<name>@champion``). A new version takes it only if its test
  NDCG@10 beats the champion's by more than 0 and by at least ``mlflow.min_delta``, measured on the same
  evaluation data: the champion's logged figure when its evaluation fingerprint (test split, id map, protocol) is
  the current one, else the champion re-scored here on the current test split through raw item ids.

The decision is computed before anything in the registry changes. Then, as one unit: create the version (tagged
``hymoerec.registration=pending`` with the aliases it may move), wait until it is READY, move ``challenger``, maybe
``champion``, and tag it ``complete``. If a step fails the aliases are put back and the version deleted; if even
that fails (the server went away) the version stays tagged pending, and the next ``register`` of that model puts
back whatever alias it took (from the tags) and deletes it before doing anything else. A model registers once:
re-running ``register`` for the same run and ``model.pt`` returns the recorded decision and moves nothing.
One ``register`` per model name at a time (the DAG and ``dvc repro`` each run one).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.params import Params
from pipeline.tracking.runs import RunLogger, eval_pointer, model_digest, read_pointer
from pipeline.tracking.store import CHALLENGER, CHAMPION, Tracking, TrackingError, display_uri, model_name

log = logging.getLogger(__name__)

STATE_TAG = "hymoerec.registration"  # pending while the aliases move, complete afterwards
PREVIOUS_TAG = "hymoerec.previous."  # + alias: the version it named before this registration ("" = none)
SELECTION = "test.ndcg_at_10"
READY_TIMEOUT_S = 300.0
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the pipeline package, shipped as source with the model


@dataclass(frozen=True)
class PromotionResult:
    model_name: str
    version: str | None  # the version registered by this call (None when tracking is off)
    decision: str  # promoted | kept | skipped
    challenger_ndcg: float | None  # test NDCG@10 of the new version
    champion_ndcg: float | None  # the champion's, on the same evaluation data (None: there was no champion)
    champion_version: str | None  # the champion before this decision
    measured: str  # logged (same evaluation data) | rescored | no champion | "" (skipped)
    min_delta: float
    run_id: str | None

    @property
    def promoted(self) -> bool:
        return self.decision == "promoted"


def decide(challenger: float, champion: float | None, min_delta: float) -> bool:
    """Promote when there is no champion, or the challenger is strictly better and by at least ``min_delta``."""
    if champion is None:
        return True
    return challenger > champion and challenger - champion >= min_delta


def champion_uri(params: Params) -> str:
    return f"models:/{model_name(params)}@{CHAMPION}"


def register(params: Params) -> PromotionResult:
    """Register the model evaluated in ``<report_dir>`` on its MLflow run and gate ``champion`` (see module doc)."""
    cfg = params.mlflow
    name = model_name(params)
    if not cfg.enabled:
        log.info("mlflow.enabled is false: nothing registered")
        return PromotionResult(name, None, "skipped", None, None, None, "", cfg.min_delta, None)
    tracking = Tracking.from_params(params)
    tracking.activate()
    client = tracking.client
    pointer_path = eval_pointer(params)
    pointer = read_pointer(pointer_path)
    run_id = pointer.get("run_id")
    if not run_id:
        raise PipelineError(f"{pointer_path} names no MLflow run: run the evaluate stage with mlflow.enabled first")
    digest = model_digest(params)
    if pointer.get("model_sha256") != digest or pointer.get("tracking_uri") != display_uri(tracking.uri):
        raise PipelineError(
            f"{pointer_path} was written for another model.pt or tracking store: run the evaluate stage again"
        )
    run = tracking.call("get run", client.get_run, run_id)
    if SELECTION not in run.data.metrics:
        raise PipelineError(f"run {run_id} has no {SELECTION}: run the evaluate stage first")
    challenger = float(run.data.metrics[SELECTION])
    fingerprint = run.data.tags.get("eval.fingerprint", "")

    recover(params, tracking)
    existing = _registered_version(tracking, name, run_id, digest)
    if existing is not None:
        log.info("%s version %s already holds this model (run %s): nothing to do", name, existing.version, run_id)
        result = _result_from_tags(name, existing, run_id, cfg.min_delta)
        _tag_run(tracking, result)
        return result

    champion = _alias_target(tracking, name, CHAMPION)
    champion_version = str(champion.version) if champion is not None else None
    champion_ndcg, measured = None, "no champion"
    if champion is not None:
        champion_ndcg, measured = champion_figure(params, tracking, champion, fingerprint)
    decision = "promoted" if decide(challenger, champion_ndcg, cfg.min_delta) else "kept"
    figures = {"promotion.challenger_ndcg_at_10": challenger, "promotion.min_delta": cfg.min_delta}
    if champion_ndcg is not None:
        figures["promotion.champion_ndcg_at_10"] = champion_ndcg
    RunLogger(tracking, run_id).log_metrics(figures)

    info = tracking.call("log model", _log_model, params, run_id, digest)
    tags = {
        "run_id": run_id,
        "model_sha256": digest or "",
        "eval.fingerprint": fingerprint,
        "test_ndcg_at_10": repr(challenger),
        "promotion.decision": decision,
        "promotion.measured": measured,
        "promotion.champion_version": champion_version or "",
        "promotion.champion_ndcg_at_10": repr(champion_ndcg) if champion_ndcg is not None else "",
        "promotion.min_delta": repr(cfg.min_delta),
    }
    against = f"champion v{champion_version} {champion_ndcg:.5f} ({measured})" if champion is not None else "none"
    description = f"test NDCG@10 {challenger:.5f} vs {against}: {decision}"
    version = publish(tracking, name, info.model_uri, info.model_id, run_id, tags, description, decision == "promoted")
    result = PromotionResult(
        name, version, decision, challenger, champion_ndcg, champion_version, measured, cfg.min_delta, run_id
    )
    _tag_run(tracking, result)
    log.info("%s version %s: %s", name, version, description)
    return result


def _tag_run(tracking: Tracking, result: PromotionResult) -> None:
    """The decision on the run, for the UI (the version's own tags hold the same, written atomically with it)."""
    RunLogger(tracking, result.run_id).set_tags(
        {
            "promotion.decision": result.decision,
            "promotion.model": result.model_name,
            "promotion.version": result.version or "",
            "promotion.measured": result.measured,
            "promotion.champion_version": result.champion_version or "",
        }
    )


# ----------------------------------------------------------------------------------------------- the champion
def champion_figure(params: Params, tracking: Tracking, champion: Any, fingerprint: str) -> tuple[float, str]:
    """The champion's test NDCG@10 on the current evaluation data: logged if comparable, else re-scored."""
    if fingerprint and champion.tags.get("eval.fingerprint") == fingerprint and champion.tags.get("test_ndcg_at_10"):
        return float(champion.tags["test_ndcg_at_10"]), "logged"
    import mlflow

    uri = f"models:/{champion.name}/{champion.version}"
    log.info("champion v%s was evaluated on other data or protocol: re-scoring it on this test split", champion.version)
    model = tracking.call("load champion", mlflow.pyfunc.load_model, uri)
    return rescore(model.unwrap_python_model().recommender, params), "rescored"


def rescore(recommender: Any, params: Params) -> float:
    """Test NDCG@10 of ``recommender`` (a :class:`~pipeline.tracking.recommender.Recommender`, possibly trained on
    another id map) on the current test split, with the project's evaluator and protocol.

    Histories and targets go through raw ids into the recommender's own ids; history items it does not know are
    dropped, and a user whose target it does not know counts as a miss (every test user weighs the same).
    """

    from pipeline.data.id_maps import read_id_map
    from pipeline.data.layout import PreprocessOutputs
    from pipeline.data.sequences import eval_split, list_parts
    from pipeline.device import autocast_dtype, pick_device
    from pipeline.evaluation.ranking import rank_split

    processed = PreprocessOutputs.under(params.preprocess.processed_dir)
    test = pq.read_table(processed.test)
    raw_items = read_id_map(processed.item_map, "item_id")
    lookup = np.zeros(max(raw_items, default=0) + 1, dtype=np.int64)  # current id -> the recommender's id
    lookup[list(raw_items)] = [recommender.index.get(raw, 0) for raw in raw_items.values()]
    offsets, values = list_parts(test["history"])
    mapped = lookup[values]
    kept = np.concatenate([[0], np.cumsum(mapped > 0)])[offsets]
    targets = lookup[test["target"].to_numpy()]
    table = pa.table(
        {
            "user_id": test["user_id"],
            "history": pa.ListArray.from_arrays(pa.array(kept, pa.int32()), pa.array(mapped[mapped > 0], pa.int32())),
            "target": pa.array(targets, pa.int32()),
        }
    ).filter(pa.array(targets > 0))
    if table.num_rows == 0:
        return 0.0
    device = pick_device(params.train.device)
    per_user = rank_split(
        recommender.model.to(device),
        eval_split(table, recommender.max_seq_len),
        ks=(10,),
        exclude_seen=params.evaluate.exclude_seen,
        batch_size=params.train.eval_batch_size,
        device=device,
        amp_dtype=autocast_dtype(params.train.amp, device),  # as evaluate does
    )
    return float(np.sum(per_user["ndcg@10"])) / test.num_rows


def download_champion(params: Params, dest: str | Path) -> Path | None:
    """The champion's ``model.pt`` and ``model.json`` copied into ``dest`` (a folder ``train.warm_start_from``
    accepts); None when tracking is off or no version is champion yet."""
    if not params.mlflow.enabled:
        return None
    import mlflow

    tracking = Tracking.from_params(params)
    champion = _alias_target(tracking, model_name(params), CHAMPION)
    if champion is None:
        return None
    tracking.activate()
    dest = Path(dest)
    with tempfile.TemporaryDirectory(prefix="hymoe-champion-") as tmp:
        uri = f"models:/{champion.name}/{champion.version}"
        local = Path(tracking.call(f"download {uri}", mlflow.artifacts.download_artifacts, uri, dst_path=tmp))
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("model.pt", "model.json"):
            shutil.copy2(local / "artifacts" / name, dest / name)
    return dest


# ----------------------------------------------------------------------------------------------- registry writes
def publish(
    tracking: Tracking,
    name: str,
    source: str,
    model_id: str | None,
    run_id: str,
    tags: dict[str, str],
    description: str,
    promote: bool,
) -> str:
    """Create the version, wait for READY, move the aliases, mark it complete; undo everything if a step fails."""
    from mlflow.exceptions import MlflowException

    client = tracking.client
    try:
        tracking.call(
            "create registered model",
            client.create_registered_model,
            name,
            description=(
                "Next-item recommender of the HyMoERec pipeline. Alias `champion`: the version that serves (replaced "
                "only by a better one on the same test data); `challenger`: the latest registered. Each version's "
                "description says how it compared."
            ),
        )
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    previous = {alias: _alias_target(tracking, name, alias) for alias in (CHALLENGER, CHAMPION)}
    version_tags = {
        **tags,
        STATE_TAG: "pending",
        **{PREVIOUS_TAG + alias: str(mv.version) if mv is not None else "" for alias, mv in previous.items()},
    }
    created = tracking.call(
        "create model version",
        client.create_model_version,
        name,
        source,
        run_id=run_id,
        tags=version_tags,
        description=description,
        await_creation_for=0,
        model_id=model_id,
    )
    version = str(created.version)
    try:
        wait_until_ready(tracking, name, version)
        tracking.call("set alias challenger", client.set_registered_model_alias, name, CHALLENGER, version)
        if promote:
            tracking.call("set alias champion", client.set_registered_model_alias, name, CHAMPION, version)
        tracking.call("mark version complete", client.set_model_version_tag, name, version, STATE_TAG, "complete")
    except BaseException:
        _undo(tracking, name, version, {a: str(mv.version) if mv else None for a, mv in previous.items()})
        raise
    return version


def wait_until_ready(tracking: Tracking, name: str, version: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Aliases move only after the version is READY (a remote registry may copy the artifacts first)."""
    deadline = time.monotonic() + timeout_s
    while True:
        mv = tracking.call("get model version", tracking.client.get_model_version, name, version)
        if mv.status == "READY":
            return
        if mv.status == "FAILED_REGISTRATION":
            raise TrackingError(f"{name} version {version} failed to register: {mv.status_message}")
        if time.monotonic() > deadline:
            raise TrackingError(f"{name} version {version} not READY after {timeout_s:.0f}s (status {mv.status})")
        time.sleep(1.0)


def recover(params: Params, tracking: Tracking | None = None) -> list[str]:
    """Remove versions a failed ``register`` left pending: put their aliases back, delete them; returns them."""
    tracking = tracking or Tracking.from_params(params)
    name = model_name(params)
    client = tracking.client
    versions = tracking.call("search model versions", client.search_model_versions, f"name = '{name}'")
    removed = []
    for mv in versions:
        if mv.tags.get(STATE_TAG) != "pending":
            continue
        mv = tracking.call("get model version", client.get_model_version, name, mv.version)
        for alias in mv.aliases:
            _restore_alias(tracking, name, alias, mv.tags.get(PREVIOUS_TAG + alias) or None)
        tracking.call("delete model version", client.delete_model_version, name, mv.version)
        log.warning("removed version %s of %s left half-registered by a failed register", mv.version, name)
        removed.append(str(mv.version))
    return removed


def _undo(tracking: Tracking, name: str, version: str, previous: dict[str, str | None]) -> None:
    client = tracking.client
    try:
        current = tracking.call("get model version", client.get_model_version, name, version)
        for alias in current.aliases:
            _restore_alias(tracking, name, alias, previous.get(alias))
        tracking.call("delete model version", client.delete_model_version, name, version)
        log.warning("registration of %s version %s failed: aliases restored, version deleted", name, version)
    except Exception:  # noqa: BLE001 - the original error is what the caller must see
        log.error(
            "registration of %s version %s failed and could not be undone (%s): it stays tagged %s=pending, "
            "and the next register of %s restores the aliases and deletes it",
            name,
            version,
            display_uri(tracking.uri),
            STATE_TAG,
            name,
        )


def _restore_alias(tracking: Tracking, name: str, alias: str, version: str | None) -> None:
    client = tracking.client
    if version:
        tracking.call(f"restore alias {alias}", client.set_registered_model_alias, name, alias, version)
    else:
        tracking.call(f"delete alias {alias}", client.delete_registered_model_alias, name, alias)


def _alias_target(tracking: Tracking, name: str, alias: str) -> Any:
    """The model version ``alias`` names, or None (no such alias or no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        return tracking.call(f"get alias {alias}", tracking.client.get_model_version_by_alias, name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _registered_version(tracking: Tracking, name: str, run_id: str, digest: str | None) -> Any:
    versions = tracking.call(
        "search model versions", tracking.client.search_model_versions, f"name = '{name}' and run_id = '{run_id}'"
    )
    for mv in versions:
        if mv.tags.get(STATE_TAG) == "complete" and mv.tags.get("model_sha256") == digest:
            return mv
    return None


def _result_from_tags(name: str, mv: Any, run_id: str, min_delta: float) -> PromotionResult:
    tags = mv.tags

    def number(key: str) -> float | None:
        return float(tags[key]) if tags.get(key) else None

    return PromotionResult(
        name,
        str(mv.version),
        tags.get("promotion.decision", "kept"),
        number("test_ndcg_at_10"),
        number("promotion.champion_ndcg_at_10"),
        tags.get("promotion.champion_version") or None,
        tags.get("promotion.measured", ""),
        min_delta,
        run_id,
    )


# ----------------------------------------------------------------------------------------------- the pyfunc
def _log_model(params: Params, run_id: str, digest: str | None) -> Any:
    """Log the pyfunc (models from code: weights + JSON config + id map, ``pipeline`` as source) on the run."""
    import mlflow
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import AnyType, Array

    from pipeline.data.layout import PreprocessOutputs

    model_dir = Path(params.train.model_dir)
    processed = PreprocessOutputs.under(params.preprocess.processed_dir)
    # The inputs are typed loosely on purpose: MLflow's server would cast a JSON k of 2.7 to 2 for a long column and
    # the 23-digit number 1e22-ish to a string id for a string array, before the model sees them. The model checks
    # the request itself (history: a list of string ids; k: a positive whole number) and answers 400 with a reason.
    history = ColSpec(AnyType(), "history")
    k = ColSpec(AnyType(), "k", required=False)
    signature = ModelSignature(
        inputs=Schema([history, k]),
        outputs=Schema([ColSpec(Array(DataType.string), "items"), ColSpec(Array(DataType.double), "scores")]),
    )
    with tempfile.TemporaryDirectory(prefix="hymoe-model-") as tmp:
        code = Path(tmp) / "pipeline"
        shutil.copytree(PACKAGE_DIR, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        with mlflow.start_run(run_id=run_id):
            return mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_FILE),
                artifacts={
                    "weights": str(model_dir / "model.pt"),
                    "config": str(model_dir / "model.json"),
                    "item_map": str(processed.item_map),
                },
                code_paths=[str(code)],
                signature=signature,
                input_example=_input_example(processed, params.mlflow.batch_k),
                # nested: MLflow logs a model_config as run params, here serving/exclude_history, serving/default_k
                model_config={
                    "serving": {"exclude_history": params.mlflow.exclude_history, "default_k": params.mlflow.batch_k}
                },
                pip_requirements=[
                    f"mlflow=={mlflow.__version__}",
                    f"torch=={torch.__version__.split('+')[0]}",
                    "numpy",
                    "pandas",
                    "pyarrow",
                    "pyyaml",  # the shipped pipeline package's parameter loader (serving imports no more)
                    *([f"mambapy=={version('mambapy')}"] if params.model.kind == "mamba4rec" else []),  # its scan
                ],
                tags={"model_sha256": digest or ""},
            )


def _input_example(processed: Any, k: int) -> Any:
    """The first test user's last five items, as raw ids."""
    import pandas as pd

    from pipeline.data.id_maps import read_id_map

    raw = read_id_map(processed.item_map, "item_id")
    history = pq.read_table(processed.test, columns=["history"]).column("history")[0].as_py()[-5:]
    return pd.DataFrame({"history": [[raw[i] for i in history]], "k": [k]})
