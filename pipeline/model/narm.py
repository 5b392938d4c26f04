"""NARM (Li et al., CIKM 2017, "Neural Attentive Session-based Recommendation"), at every position of a history.

    e = dropout_e(item_emb(x));   h_1..h_t = GRU(e)
    c_g = h_t                                               global encoder: the last hidden state
    c_l = sum_j<=t  v^T sigmoid(A1 h_t + A2 h_j) * h_j      local encoder: attention of h_t over the history
    c_t = dropout_c([c_g; c_l]);  score_i = emb_i^T B c_t   bilinear decoder (B: 2H -> d)

as in the paper and RecBole's reference (the attention weights are not normalised). The per-position form lets NARM
train with the same next-item loss at every position as the other models (the paper's prefix augmentation), and
``encode`` returns ``B c_t``, so the shared full-sort scorer (one matmul with the item table) is NARM's decoder.
Histories are rotated to right padding before the GRU, as in GRU4Rec, so every user starts from h0. Ranking
(``encode_last``) forms the local attention of the last position alone, not the [L, L] pairs a training step needs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pipeline.model.base import SequentialRecommender, left_to_right, right_to_left
from pipeline.model.config import ModelConfig
from pipeline.model.dropout import Dropout
from pipeline.model.moe import MoEAux

QUERY_CHUNK = 32  # positions whose local attention is computed at once: bounds the [B, chunk, L, H] activation


class NARM(SequentialRecommender):
    def __init__(self, cfg: ModelConfig, num_items: int) -> None:
        super().__init__(cfg, num_items)
        d, hidden = cfg.hidden_size, cfg.narm.hidden_size
        self.emb_drop = Dropout(cfg.narm.embedding_dropout)
        self.gru = nn.GRU(d, hidden, num_layers=cfg.narm.num_layers, batch_first=True, bias=False)
        self.a1 = nn.Linear(hidden, hidden, bias=False)
        self.a2 = nn.Linear(hidden, hidden, bias=False)
        self.v = nn.Linear(hidden, 1, bias=False)
        self.ctx_drop = Dropout(cfg.narm.context_dropout)
        self.decoder = nn.Linear(2 * hidden, d, bias=False)  # B of the bilinear decoder
        for weight in (self.item_emb.weight, self.a1.weight, self.a2.weight, self.v.weight, self.decoder.weight):
            nn.init.xavier_normal_(weight)  # RecBole's NARM init
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def encode(self, input_ids: Tensor, *, return_topk: bool = False) -> tuple[Tensor, list[MoEAux]]:
        states, real = self._states(input_ids)
        return self._decode(states, real, first=0), []

    def encode_last(self, input_ids: Tensor) -> Tensor:
        """Ranking needs the last position alone: its local attention is 1/L of what ``encode`` computes."""
        states, real = self._states(input_ids)
        return self._decode(states, real, first=states.shape[1] - 1)[:, -1]

    def _states(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """GRU states ``[B, L, H]`` (padding rows 0) and the mask of real positions."""
        input_ids = input_ids[:, -self.max_seq_len :]
        real = input_ids > 0
        right, pad = left_to_right(input_ids)
        states, _ = self.gru(self.emb_drop(self.item_emb(right)))
        return right_to_left(states, pad) * real.unsqueeze(-1).to(states.dtype), real

    def _decode(self, states: Tensor, real: Tensor, first: int) -> Tensor:
        """``B c_t`` for the positions ``first..L-1`` (padding rows 0)."""
        keys = self.a2(states)
        queries = self.a1(states[:, first:])
        L = states.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=states.device).tril()[first:]
        may_attend = causal & real.unsqueeze(1)  # [B, L - first, L]
        # the [B, chunk, L, H] energies are the largest activation (B L^2 H in all): in training each chunk is
        # recomputed in the backward pass rather than kept, so memory stays at one chunk's worth at L = 200;
        # a chunk attends to no state after its last position (`keys_to`), so the later keys are never formed
        recompute = self.training and torch.is_grad_enabled()
        local = []
        for start in range(0, L - first, QUERY_CHUNK):
            stop = min(start + QUERY_CHUNK, L - first)
            keys_to = first + stop
            args = (queries[:, start:stop], keys[:, :keys_to], states[:, :keys_to], may_attend[:, start:stop, :keys_to])
            local.append(checkpoint(self._local, *args, use_reentrant=False) if recompute else self._local(*args))
        context = torch.cat([states[:, first:], torch.cat(local, dim=1)], dim=-1)
        return self.decoder(self.ctx_drop(context)) * real[:, first:].unsqueeze(-1).to(states.dtype)

    def _local(self, queries: Tensor, keys: Tensor, states: Tensor, may_attend: Tensor) -> Tensor:
        """c_local for a chunk of positions: sum_j v^T sigmoid(A1 h_t + A2 h_j) h_j over the allowed j."""
        energy = self.v(torch.sigmoid(queries[:, :, None, :] + keys[:, None, :, :])).squeeze(-1)
        return (energy * may_attend.to(energy.dtype)) @ states  # [B, chunk, T] @ [B, T, H]: j <= t, real j only
