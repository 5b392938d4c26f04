"""The promotion policy and the ``register`` step: log the evaluated model, register it, gate ``champion``.

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
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.params import Params
from pipeline.tracking.packaging import log_model
from pipeline.tracking.registry import alias_target, publish, recover, registered_version
from pipeline.tracking.runs import RunLogger, eval_pointer, model_digest, read_pointer
from pipeline.tracking.store import CHAMPION, Tracking, display_uri, model_name

log = logging.getLogger(__name__)

SELECTION = "test.ndcg_at_10"


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
    existing = registered_version(tracking, name, run_id, digest)
    if existing is not None:
        log.info("%s version %s already holds this model (run %s): nothing to do", name, existing.version, run_id)
        result = _result_from_tags(name, existing, run_id, cfg.min_delta)
        _tag_run(tracking, result)
        return result

    champion = alias_target(tracking, name, CHAMPION)
    champion_version = str(champion.version) if champion is not None else None
    champion_ndcg, measured = None, "no champion"
    if champion is not None:
        champion_ndcg, measured = champion_figure(params, tracking, champion, fingerprint)
    decision = "promoted" if decide(challenger, champion_ndcg, cfg.min_delta) else "kept"
    figures = {"promotion.challenger_ndcg_at_10": challenger, "promotion.min_delta": cfg.min_delta}
    if champion_ndcg is not None:
        figures["promotion.champion_ndcg_at_10"] = champion_ndcg
    RunLogger(tracking, run_id).log_metrics(figures)

    info = tracking.call("log model", log_model, params, run_id, digest)
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
        amp_dtype=autocast_dtype(params.train.amp, device, params.train.cpu_amp),  # as evaluate does
    )
    return float(np.sum(per_user["ndcg@10"])) / test.num_rows
