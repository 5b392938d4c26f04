"""Sequential recommenders behind one interface: HyMoERec / SASRec, GRU4Rec, BERT4Rec.

``build_model(cfg, num_items)`` returns a :class:`SequentialRecommender` with ``training_loss``, ``score_next``
and ``routing``; see :mod:`pipeline.model.base` for the contract.
"""

from __future__ import annotations

from pipeline.model.base import LossOutput, SequentialRecommender
from pipeline.model.config import ModelConfig, MoEConfig
from pipeline.model.gru4rec import GRU4Rec
from pipeline.model.moe import HybridMoE, MoEAux, warmup_weight
from pipeline.model.transformer import BERT4Rec, HyMoERec

__all__ = [
    "BERT4Rec",
    "GRU4Rec",
    "HyMoERec",
    "HybridMoE",
    "LossOutput",
    "MoEAux",
    "MoEConfig",
    "ModelConfig",
    "SequentialRecommender",
    "build_model",
    "warmup_weight",
]


def build_model(cfg: ModelConfig, num_items: int) -> SequentialRecommender:
    """Validate ``cfg`` and build the model it names for items 1..num_items (0 = padding)."""
    cfg.validate()
    if cfg.kind == "hymoerec":
        return HyMoERec(cfg, num_items)
    if cfg.kind == "bert4rec":
        return BERT4Rec(cfg, num_items)
    return GRU4Rec(cfg, num_items)
