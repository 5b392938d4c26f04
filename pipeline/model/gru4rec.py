"""GRU4Rec baseline: item embedding -> dropout -> GRU -> next-item scores at every position (tied output layer).

Trained with the same full-catalogue (or sampled) cross-entropy as the transformers, the loss that works best for
GRU4Rec in later re-evaluations, so the comparison isolates the sequence encoder.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.model.base import SequentialRecommender, left_to_right, right_to_left
from pipeline.model.config import ModelConfig
from pipeline.model.dropout import Dropout
from pipeline.model.moe import MoEAux


class GRU4Rec(SequentialRecommender):
    """Left-padded histories are rotated to right padding before the GRU so every user starts from h0 at their
    first item (running the GRU over leading padding would make the state depend on the amount of padding);
    trailing padding only follows the real items, so no packing (and no host sync) is needed."""

    def __init__(self, cfg: ModelConfig, num_items: int) -> None:
        super().__init__(cfg, num_items)
        d = cfg.hidden_size
        self.drop = Dropout(cfg.dropout)
        self.gru = nn.GRU(
            d, d, num_layers=cfg.num_layers, batch_first=True, dropout=cfg.dropout if cfg.num_layers > 1 else 0.0
        )
        nn.init.normal_(self.item_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def encode(self, input_ids: Tensor, *, return_topk: bool = False) -> tuple[Tensor, list[MoEAux]]:
        input_ids = input_ids[:, -self.max_seq_len :]
        right, pad = left_to_right(input_ids)
        out, _ = self.gru(self.drop(self.item_emb(right)))
        hidden = right_to_left(out, pad) * (input_ids > 0).unsqueeze(-1).to(out.dtype)
        return hidden, []
