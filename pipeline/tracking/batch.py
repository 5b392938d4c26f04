"""``python -m pipeline recommend``: the top-K items for every user, written to Parquet.

Each user's history is the longest sequence the processed splits know (test history + test target under
leave-one-out), in raw ids. The model is the registered ``champion`` (``models:/<name>@champion``) when MLflow is
enabled, else the local ``model.pt``; either way the predictions come from the same
:class:`~pipeline.tracking.recommender.Recommender` code the served model runs. Output columns: ``user_id`` (raw id,
string), ``items`` (list of raw item ids, best first) and ``scores`` (list of float).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.id_maps import read_id_map
from pipeline.data.layout import PreprocessOutputs
from pipeline.errors import PipelineError
from pipeline.io import write_parquet_atomic
from pipeline.params import Params

log = logging.getLogger(__name__)

CHUNK_USERS = 2048


def recommend_batch(
    params: Params, k: int | None = None, output: str | Path | None = None, model_uri: str | None = None
) -> Path:
    """Write the top-``k`` recommendations of every user to ``output`` (defaults from ``params.mlflow``)."""
    k = k or params.mlflow.batch_k
    output = Path(output or params.mlflow.batch_output)
    predict, source = _predictor(params, model_uri)
    users, histories = user_histories(params.preprocess.processed_dir)
    items: list[list[str]] = []
    scores: list[list[float]] = []
    for start in range(0, len(users), CHUNK_USERS):
        chunk = histories[start : start + CHUNK_USERS]
        result = predict(pd.DataFrame({"history": chunk, "k": [k] * len(chunk)}))
        items += [list(v) for v in result["items"]]
        scores += [[float(s) for s in v] for v in result["scores"]]
    table = pa.table(
        {
            "user_id": pa.array(users, pa.string()),
            "items": pa.array(items, pa.list_(pa.string())),
            "scores": pa.array(scores, pa.list_(pa.float64())),
        }
    )
    write_parquet_atomic(output, table)
    log.info("top-%d recommendations of %d users from %s -> %s", k, len(users), source, output)
    return output


def user_histories(processed_dir: str | Path) -> tuple[list[str], list[list[str]]]:
    """(raw user ids, raw item-id histories) of every user, ordered by internal user id."""
    splits = PreprocessOutputs.under(processed_dir)
    sequences: dict[int, list[int]] = {}
    train = pq.read_table(splits.train, columns=["user_id", "item_ids"])
    sequences.update(zip(train["user_id"].to_pylist(), train["item_ids"].to_pylist(), strict=True))
    for path in (splits.valid, splits.test):  # later splits extend the earlier ones: the last one seen wins
        table = pq.read_table(path, columns=["user_id", "history", "target"])
        columns = (table[c].to_pylist() for c in ("user_id", "history", "target"))
        for user, history, target in zip(*columns, strict=True):
            sequences[user] = [*history, target]
    raw_user = read_id_map(splits.user_map, "user_id")
    raw_item = read_id_map(splits.item_map, "item_id")
    order = sorted(sequences)
    return [raw_user[u] for u in order], [[raw_item[i] for i in sequences[u]] for u in order]


def _predictor(params: Params, model_uri: str | None) -> tuple[Callable[[pd.DataFrame], pd.DataFrame], str]:
    if model_uri is None and not params.mlflow.enabled:
        from pipeline.tracking.recommender import Recommender

        model_dir = Path(params.train.model_dir)
        recommender = Recommender.from_files(
            model_dir / "model.pt",
            model_dir / "model.json",
            PreprocessOutputs.under(params.preprocess.processed_dir).item_map,
            exclude_history=params.mlflow.exclude_history,
        )
        return recommender.predict_frame, str(model_dir)

    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.tracking.registry import champion_uri
    from pipeline.tracking.store import Tracking

    tracking = Tracking.from_params(params)
    tracking.activate()
    uri = model_uri or champion_uri(params)
    try:
        model = tracking.call(f"load {uri}", mlflow.pyfunc.load_model, uri)
    except MlflowException as err:
        raise PipelineError(f"cannot load {uri} from {tracking.uri}: {err.message}; run `dvc repro` first") from err
    return model.predict, uri
