"""The MLflow pyfunc of a trained recommender, logged as *code* (MLflow "models from code"): nothing is pickled.

MLflow copies this file into the logged model and executes it on load; :func:`mlflow.models.set_model` names the
model object. ``load_context`` rebuilds the network from the logged artifacts, ``model.pt`` (a state_dict read with
``weights_only=True``), ``model.json`` and ``item_map.parquet``, with the ``pipeline`` source shipped in the model's
``code`` folder, so ``mlflow models serve --env-manager local`` works from any directory.

Input: one row per user, ``history`` (list of raw item ids as strings, oldest first) and optional ``k`` (int, on every
row or none).
Output: ``items`` (the top-K raw item ids, best first) and ``scores`` (their scores). Unknown ids in a history are
ignored; padding is never returned; with ``exclude_history`` (model config) neither is an item of the history.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel


class RecommenderModel(PythonModel):
    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from pipeline.tracking.recommender import DEFAULT_K, Recommender

        config = context.model_config or {}
        config = config.get("serving", config)  # versions registered before the nesting kept these at the top
        self.recommender = Recommender.from_files(
            context.artifacts["weights"],
            context.artifacts["config"],
            context.artifacts["item_map"],
            exclude_history=bool(config.get("exclude_history", True)),
            default_k=int(config.get("default_k", DEFAULT_K)),
        )

    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        from pipeline.tracking.recommender import InvalidRequest

        try:
            return self.recommender.predict_frame(model_input)
        except InvalidRequest as err:  # a client's mistake: HTTP 400 with the reason, not 500 with a traceback
            raise RequestRejected(str(err)) from None


class RequestRejected(MlflowException):
    """A bad request, answered by ``mlflow models serve`` with HTTP 400 and a one-line ``message``.

    The scoring server rewrites ``message`` to ``Failed to predict data '<the whole input frame>' ...``, a
    multi-line echo of the request; the reason alone is what the client needs, so the rewrite is ignored.
    """

    def __init__(self, reason: str) -> None:
        self._reason = reason
        super().__init__(reason, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._reason

    @message.setter
    def message(self, _rewritten: str) -> None:
        pass


mlflow.models.set_model(RecommenderModel())
