"""The served model as MLflow logs it: a pyfunc built from code (``pyfunc_model.py``), no pickles.

Artifacts: ``model.pt`` (a state_dict, read with ``weights_only=True``), ``model.json`` and ``item_map.parquet``;
the ``pipeline`` package ships as source in the model's ``code`` folder, so ``mlflow models serve --env-manager
local`` works from any directory. Signature, input example and pinned requirements go with it.
"""

from __future__ import annotations

import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.params import Params

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the pipeline package, shipped as source with the model


def log_model(params: Params, run_id: str, digest: str | None) -> Any:
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
