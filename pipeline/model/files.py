"""A trained model on disk: ``model.pt`` (best weights, a state_dict) and ``model.json`` (how to rebuild it).

Next to the model, not in the trainer, so that the evaluate stage, the registry and the served MLflow model load a
model with torch and the model code only (no trainer, downloader or progress bars).
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import PipelineError
from pipeline.io import file_digest, write_bytes_atomic
from pipeline.model import SequentialRecommender, build_model
from pipeline.model.config import ModelConfig
from pipeline.params import from_dict


@dataclass(frozen=True)
class ModelFiles:
    weights: Path  # model.pt: best-on-validation state_dict
    config: Path  # model.json: the model settings, catalogue size and how training went

    @classmethod
    def under(cls, folder: str | Path) -> ModelFiles:
        folder = Path(folder)
        return cls(folder / "model.pt", folder / "model.json")


def save_weights(path: Path, weights: dict[str, torch.Tensor]) -> None:
    """A state_dict written atomically (a reader never sees half a file)."""
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def load_trained_model(model_dir: str | Path, device: torch.device | str = "cpu") -> SequentialRecommender:
    """The best weights of the run in ``model_dir`` (``model.pt`` + ``model.json``)."""
    files = ModelFiles.under(model_dir)
    return load_model_files(files.weights, files.config, device)


def load_model_files(
    weights: str | Path, config: str | Path, device: torch.device | str = "cpu"
) -> SequentialRecommender:
    """Rebuild the model from ``model.json`` and load ``model.pt`` (``weights_only=True``: no pickled code), eval mode.

    One loader for the evaluate stage and the served MLflow model, whose artifacts are separate files. A
    ``model.pt`` that is not what ``model.json`` describes is refused with a :class:`ModelFileError`: another file
    than the one trained (its sha256, recorded at training, differs), not a plain state_dict (pickled code), or
    weights of another architecture.
    """
    meta = json.loads(Path(config).read_text())
    recorded = meta.get("weights_sha256")  # absent in a model.json written before it was recorded
    if recorded and file_digest(weights) != recorded:
        raise ModelFileError(f"{weights} is not the model {config} describes (sha256 differs): retrain or re-download")
    model = build_model(from_dict(ModelConfig, meta["model"], "model"), int(meta["num_items"]))
    try:
        state = torch.load(weights, map_location=device, weights_only=True)
        model.load_state_dict(state)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelFileError(f"{weights} is not weights of the model {config} describes: {first}") from err
    return model.to(device).eval()


class ModelFileError(PipelineError):
    """A model file that is not what it claims to be: refused, never loaded."""
