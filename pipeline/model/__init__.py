"""Sequential recommenders behind one interface: HyMoERec / SASRec, GRU4Rec, BERT4Rec, NARM, Mamba4Rec.

``build_model(cfg, num_items)`` returns a :class:`SequentialRecommender` with ``training_loss``, ``score_next``
and ``routing``; see :mod:`pipeline.model.base` for the contract.

The names below load on first use (PEP 562): the parameter loader imports :mod:`pipeline.model.config`, and the
stages that never touch a network (download, ingest, the CLI's error paths) should not pay torch's import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.model.base import LossOutput, SequentialRecommender
    from pipeline.model.config import ModelConfig, MoEConfig
    from pipeline.model.gru4rec import GRU4Rec
    from pipeline.model.mamba4rec import Mamba4Rec
    from pipeline.model.moe import HybridMoE, MoEAux, warmup_weight
    from pipeline.model.narm import NARM
    from pipeline.model.transformer import BERT4Rec, HyMoERec

_HOMES = {
    "LossOutput": "base",
    "SequentialRecommender": "base",
    "ModelConfig": "config",
    "MoEConfig": "config",
    "GRU4Rec": "gru4rec",
    "Mamba4Rec": "mamba4rec",
    "NARM": "narm",
    "HybridMoE": "moe",
    "MoEAux": "moe",
    "warmup_weight": "moe",
    "BERT4Rec": "transformer",
    "HyMoERec": "transformer",
}
_KINDS = {
    "hymoerec": "HyMoERec",
    "bert4rec": "BERT4Rec",
    "gru4rec": "GRU4Rec",
    "narm": "NARM",
    "mamba4rec": "Mamba4Rec",
}

__all__ = [
    "BERT4Rec",
    "GRU4Rec",
    "HyMoERec",
    "HybridMoE",
    "LossOutput",
    "Mamba4Rec",
    "NARM",
    "MoEAux",
    "MoEConfig",
    "ModelConfig",
    "SequentialRecommender",
    "build_model",
    "warmup_weight",
]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_model(cfg: ModelConfig, num_items: int) -> SequentialRecommender:
    """Validate ``cfg`` and build the model it names for items 1..num_items (0 = padding).

    Only the named kind's module is imported: a machine without Mamba4Rec's ``mambapy`` (a GPU image, say) still
    trains the others."""
    cfg.validate()
    return __getattr__(_KINDS[cfg.kind])(cfg, num_items)
