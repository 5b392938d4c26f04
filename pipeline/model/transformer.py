"""Transformer recommenders: HyMoERec / SASRec (causal) and BERT4Rec (bidirectional cloze), top to bottom.

Block layout is pre-LayerNorm with a final LayerNorm (nanoGPT / GPT-2):

    x = x + drop(attn(ln1(x)));   x = x + drop(ffn(ln2(x)));   ...;   h = ln_f(x)

SASRec's reference code already normalises the attention queries and ends with a LayerNorm; full pre-LN trains
stably without a learning-rate warm-up at these depths and keeps the residual stream an identity path, so the
hybrid MoE only ever *adds* to what the dense FFN computes. BERT4Rec uses the same blocks (GELU instead of
SASRec's ReLU) rather than BERT's post-LN, so the two transformers differ only in masking and objective.

Every FFN (plain, or hybrid MoE when ``moe.enabled``) runs on the real tokens only: the block gathers the
non-padding rows, applies the FFN and adds the result back. Padding positions are zeroed after every block (as
in SASRec) and are never attended to, so outputs do not depend on how much left padding a batch carries.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.model.base import LossOutput, SequentialRecommender, score_items
from pipeline.model.config import ModelConfig
from pipeline.model.dropout import Dropout
from pipeline.model.moe import FeedForward, HybridMoE, MoEAux


class SelfAttention(nn.Module):
    """Multi-head self-attention with an explicit boolean mask (True = may attend)."""

    def __init__(self, d_model: int, num_heads: int, attn_dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.attn_dropout = attn_dropout

    def forward(self, x: Tensor, attn_mask: Tensor, last_only: bool = False) -> Tensor:
        """``[B, L, d]``, or with ``last_only`` the last position's output alone ``[B, 1, d]`` (its query against
        every key: what ranking reads from the top block, L times less attention)."""
        B, L, d = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if last_only:
            q, attn_mask = q[:, :, -1:], attn_mask[:, :, -1:]
        dropout = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(B, q.shape[2], d))


class Block(nn.Module):
    """Pre-LN transformer block whose FFN is either plain (SASRec) or the hybrid MoE (HyMoERec)."""

    def __init__(self, cfg: ModelConfig, activation: str) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.ln1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, cfg.num_heads, cfg.attn_dropout)
        self.ln2 = nn.LayerNorm(d)
        self.ffn: nn.Module
        if cfg.uses_moe:
            self.ffn = HybridMoE(d, cfg.moe, dropout=cfg.dropout, activation=activation)
        else:
            self.ffn = FeedForward(d, cfg.ffn_hidden, cfg.dropout, activation)
        self.drop = Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor,
        tokens: Tensor,
        router_ctx: Tensor | None,
        step: Tensor,
        return_topk: bool = False,
        last_only: bool = False,
    ) -> tuple[Tensor, MoEAux | None]:
        """``tokens`` are the flat indices of the real positions; ``router_ctx`` is already packed to them.

        ``last_only``: the block's output at the last position alone, ``[B, 1, d]`` (``tokens`` and ``router_ctx``
        then index the rows whose last position is real): the attention and the FFN run for that position only.
        """
        x = (x[:, -1:] if last_only else x) + self.drop(self.attn(self.ln1(x), attn_mask, last_only))
        B, L, d = x.shape
        flat = x.reshape(B * L, d)
        x_real = flat.index_select(0, tokens)
        h = self.ln2(x_real)
        aux = None
        if isinstance(self.ffn, HybridMoE):
            y, aux = self.ffn(h, router_ctx, step=step, return_topk=return_topk)
        else:
            y = self.ffn(h)
        # only real rows are kept: padding rows restart from zero in every block
        out = torch.zeros_like(flat).index_copy(0, tokens, x_real + self.drop(y).to(x.dtype))
        return out.view(B, L, d), aux


def attention_mask(real: Tensor, causal: bool) -> Tensor:
    """``[B, 1, L, L]`` bool mask: real keys only (and only earlier ones if causal), plus the diagonal.

    The diagonal lets a padding query attend to itself, so no softmax row is all -inf (which would be NaN);
    real queries never see padding keys, so padding contents cannot leak into real positions.
    """
    L = real.shape[1]
    allowed = real[:, None, None, :]
    eye = torch.eye(L, dtype=torch.bool, device=real.device)
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=real.device).tril()
    return allowed | eye


def causal_user_context(item: Tensor, is_item: Tensor) -> Tensor:
    """Mean of the item embeddings at positions <= t that hold a real item (0 where none yet)."""
    w = is_item.unsqueeze(-1).to(item.dtype)
    return (item * w).cumsum(1) / w.cumsum(1).clamp_min(1.0)


class TransformerRecommender(SequentialRecommender):
    """Item + learned position embeddings -> blocks -> final LN; output layer tied to the item embeddings.

    Positions are right-aligned (the most recent item always has position ``max_seq_len - 1``), so a history
    gets the same encoding whatever width it is padded to. Item embeddings are not scaled by sqrt(d) (SASRec
    does): with the tied output layer and normal(0, 0.02) init, item and position embeddings start on one scale.
    """

    def __init__(self, cfg: ModelConfig, num_items: int, *, causal: bool, extra_tokens: int = 0) -> None:
        super().__init__(cfg, num_items, extra_tokens=extra_tokens)
        self.causal = causal
        d = cfg.hidden_size
        activation = "relu" if causal else "gelu"
        self.pos_emb = nn.Embedding(cfg.max_seq_len, d)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg, activation) for _ in range(cfg.num_layers)])
        self.ln_f = nn.LayerNorm(d)
        self.router_input = cfg.moe.router_input if cfg.uses_moe else None
        self.apply(self._init_weights)
        # GPT-2 scaled init: each residual branch adds to the stream, keep their sum's variance independent of depth
        out_std = 0.02 / math.sqrt(2 * cfg.num_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=out_std)
            dense = block.ffn.dense if isinstance(block.ffn, HybridMoE) else block.ffn
            if dense is not None:  # None: pure sparse MoE (moe.dense_branch: false)
                nn.init.normal_(dense.fc2.weight, std=out_std)
            if isinstance(block.ffn, HybridMoE):
                block.ffn.reset_experts(std=0.02, out_std=out_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def encode(self, input_ids: Tensor, *, return_topk: bool = False) -> tuple[Tensor, list[MoEAux]]:
        return self._encode(input_ids, return_topk=return_topk, last_only=False)

    def encode_last(self, input_ids: Tensor) -> Tensor:
        """The last position's hidden state ``[B, d]``: every block but the top one runs on all positions (their
        keys and values feed the top block), the top block's attention and FFN on the last position alone."""
        hidden, _ = self._encode(input_ids, return_topk=False, last_only=True)
        return hidden[:, -1]

    def _encode(self, input_ids: Tensor, *, return_topk: bool, last_only: bool) -> tuple[Tensor, list[MoEAux]]:
        input_ids = input_ids[:, -self.max_seq_len :]
        B, L = input_ids.shape
        real = input_ids > 0
        tokens = real.flatten().nonzero().squeeze(1)
        item = self.item_emb(input_ids)
        positions = torch.arange(self.max_seq_len - L, self.max_seq_len, device=input_ids.device)
        x = self.drop(item + self.pos_emb(positions)) * real.unsqueeze(-1).to(item.dtype)
        context = self._router_context(input_ids, item)
        router_ctx = None if context is None else context.flatten(0, 1).index_select(0, tokens)
        mask = attention_mask(real, self.causal)
        auxes = []
        for i, block in enumerate(self.blocks):
            if last_only and i == len(self.blocks) - 1:
                tokens = real[:, -1].nonzero().squeeze(1)  # rows (of B x 1) whose last position holds an item
                router_ctx = None if context is None else context[:, -1].index_select(0, tokens)
                x, aux = block(x, mask, tokens, router_ctx, self.train_step, return_topk, last_only=True)
            else:
                x, aux = block(x, mask, tokens, router_ctx, self.train_step, return_topk)
            if aux is not None:
                auxes.append(aux)
        return self.ln_f(x), auxes

    def _router_context(self, input_ids: Tensor, item: Tensor) -> Tensor | None:
        """Extra router input per position ``[B, L, c]``: the item embedding (item-aware), plus the user context."""
        if self.router_input in (None, "hidden"):
            return None
        parts = [item]
        if self.router_input == "hidden_item_user":
            is_item = (input_ids > 0) & (input_ids <= self.num_items)  # BERT4Rec's [MASK] carries no item
            parts.append(causal_user_context(item, is_item))
        return torch.cat(parts, dim=-1)

    @torch.no_grad()
    def routing(self, input_ids: Tensor) -> list[Tensor] | None:
        """Analysis only (no graph); call in eval mode so dropout does not change the routes."""
        if self.router_input is None:
            return None
        input_ids = input_ids[:, -self.max_seq_len :]
        B, L = input_ids.shape
        _, auxes = self.encode(input_ids, return_topk=True)
        tokens = (input_ids > 0).flatten().nonzero().squeeze(1)
        out = []
        for aux in auxes:
            assert aux.topk_idx is not None
            ids = torch.full((B * L, aux.topk_idx.shape[1]), -1, dtype=torch.long, device=input_ids.device)
            out.append(ids.index_copy(0, tokens, aux.topk_idx).view(B, L, -1))
        return out


class HyMoERec(TransformerRecommender):
    """Causal next-item transformer; ``cfg.moe.enabled=False`` makes it exactly SASRec (uniform FFN)."""

    def __init__(self, cfg: ModelConfig, num_items: int) -> None:
        super().__init__(cfg, num_items, causal=True)


class BERT4Rec(TransformerRecommender):
    """Bidirectional transformer trained by cloze: real items are replaced by [MASK] (id num_items + 1).

    Training uses the full training sequence: ``input_ids`` plus the last target (the item after the last
    input), dropping the oldest item if the window is full; ``target_ids`` serves only for that. At inference
    [MASK] is appended after the history and its hidden state scores the next item.
    """

    def __init__(self, cfg: ModelConfig, num_items: int) -> None:
        super().__init__(cfg, num_items, causal=False, extra_tokens=1)
        self.mask_id = num_items + 1
        self.mask_prob = cfg.bert_mask_prob

    def training_loss(
        self,
        input_ids: Tensor,
        target_ids: Tensor,
        *,
        num_negatives: int = 0,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        seq, masked = self.cloze(input_ids, target_ids, generator)
        hidden, auxes = self.encode(seq.masked_fill(masked, self.mask_id))
        return self.loss_at(hidden, auxes, masked, seq, num_negatives, generator)

    def cloze(
        self, input_ids: Tensor, target_ids: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Full training sequence ``[B, L]`` and the bool mask of the positions to hide and predict."""
        last = target_ids[:, -1]
        shifted = torch.cat([input_ids[:, 1:], last.unsqueeze(1)], dim=1)
        seq = torch.where((last > 0).unsqueeze(1), shifted, input_ids)[:, -self.max_seq_len :]
        real = seq > 0
        device = generator.device if generator is not None else seq.device
        masked = (torch.rand(seq.shape, generator=generator, device=device).to(seq.device) < self.mask_prob) & real
        # every non-empty sequence predicts at least one item: mask its most recent one if the draw missed
        masked[:, -1] |= real[:, -1] & ~masked.any(1)
        return seq, masked

    def score_next(self, input_ids: Tensor) -> Tensor:
        mask_col = torch.full_like(input_ids[:, :1], self.mask_id)
        hidden = self.encode_last(torch.cat([input_ids, mask_col], dim=1))
        return score_items(hidden, self.item_emb.weight, self.num_items)
