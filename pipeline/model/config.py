"""Model configuration: plain dataclasses, no torch import (the params loader imports this module).

Fair ablation: with MoE on, each block's dense branch has ``moe.dense_hidden`` inner units; with MoE off, the
plain FFN has ``ffn_hidden``. Both default to 256, so ``moe.enabled=False`` is exactly the HyMoERec network
minus the experts and the router (the paper's "w/o MoE" row), not a smaller or larger FFN.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODEL_KINDS = ("hymoerec", "gru4rec", "bert4rec")
ROUTER_INPUTS = ("hidden", "hidden_item", "hidden_item_user")
WARMUP_SCHEDULES = ("linear", "cosine")
LB_TYPES = ("entropy", "switch")
MOE_IMPLEMENTATIONS = ("auto", "loop", "dense", "grouped")


@dataclass
class MoEConfig:
    enabled: bool = True  # (bool) add the expert branch to every FFN; False = plain SASRec FFN
    num_experts: int = 8  # (int) E, number of experts per layer
    top_k: int = 2  # (int) K, experts evaluated per token; gates renormalised over these K
    expert_hidden: int = 64  # (int) inner width of each expert FFN
    dense_hidden: int = 256  # (int) inner width of the always-on dense FFN branch
    router_input: str = "hidden_item"  # (str) hidden | hidden_item | hidden_item_user
    alpha_init: float = 0.0  # (float) initial alpha_param; alpha = sigmoid(alpha_param) * w(t)
    warmup_steps: int = 500  # (int) optimiser steps over which w(t) rises from 0 to 1 (0 = no warm-up)
    warmup_schedule: str = "linear"  # (str) linear | cosine
    lb_weight: float = 0.01  # (float) lambda, weight of the load-balance loss (per layer, summed)
    lb_type: str = "entropy"  # (str) entropy (lambda * sum g log g) | switch (lambda * E * sum f * P)
    expert_dropout: float | None = 0.0  # (float|null) dropout on expert FFN activations; null = model.dropout
    implementation: str = "auto"  # (str) auto | loop | dense | grouped: routing kernel, same result

    def validate(self) -> None:
        """Raise ValueError on an inconsistent MoE setting."""
        if self.num_experts < 1:
            raise ValueError(f"moe.num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"moe.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.expert_hidden < 1 or self.dense_hidden < 1:
            raise ValueError("moe.expert_hidden and moe.dense_hidden must be >= 1")
        if self.router_input not in ROUTER_INPUTS:
            raise ValueError(f"moe.router_input must be one of {ROUTER_INPUTS}, got {self.router_input!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"moe.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.warmup_schedule not in WARMUP_SCHEDULES:
            raise ValueError(f"moe.warmup_schedule must be one of {WARMUP_SCHEDULES}, got {self.warmup_schedule!r}")
        if self.lb_weight < 0:
            raise ValueError(f"moe.lb_weight must be >= 0, got {self.lb_weight}")
        if self.expert_dropout is not None and not 0.0 <= self.expert_dropout < 1.0:
            raise ValueError(f"moe.expert_dropout must be in [0, 1) or null, got {self.expert_dropout}")
        if self.lb_type not in LB_TYPES:
            raise ValueError(f"moe.lb_type must be one of {LB_TYPES}, got {self.lb_type!r}")
        if self.implementation not in MOE_IMPLEMENTATIONS:
            raise ValueError(f"moe.implementation must be one of {MOE_IMPLEMENTATIONS}, got {self.implementation!r}")


@dataclass
class ModelConfig:
    kind: str = "hymoerec"  # (str) hymoerec (causal transformer; moe.enabled toggles SASRec) | gru4rec | bert4rec
    hidden_size: int = 64  # (int) d, embedding and hidden width
    num_layers: int = 2  # (int) transformer blocks / GRU layers
    num_heads: int = 2  # (int) attention heads (must divide hidden_size)
    max_seq_len: int = 50  # (int) L, longest history the model sees (positions are right-aligned)
    dropout: float = 0.2  # (float) dropout on embeddings, (dense) FFN inner activations and residual branches
    attn_dropout: float = 0.2  # (float) dropout on attention probabilities
    ffn_hidden: int = 256  # (int) FFN inner width of the plain (non-MoE) transformer
    bert_mask_prob: float = 0.2  # (float) BERT4Rec cloze masking probability per real item
    history_bias: bool = False  # (bool) learn one score offset for items already in the history (causal models)
    moe: MoEConfig = field(default_factory=MoEConfig)

    def validate(self) -> None:
        """Raise ValueError on an inconsistent model setting (MoE settings only checked when MoE is used)."""
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model.kind must be one of {MODEL_KINDS}, got {self.kind!r}")
        for name in ("hidden_size", "num_layers", "max_seq_len", "ffn_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.kind != "gru4rec" and (self.num_heads < 1 or self.hidden_size % self.num_heads):
            raise ValueError(
                f"model.num_heads ({self.num_heads}) must be >= 1 and divide hidden_size ({self.hidden_size})"
            )
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 < self.bert_mask_prob < 1.0:
            raise ValueError(f"model.bert_mask_prob must be in (0, 1), got {self.bert_mask_prob}")
        if self.history_bias and self.kind == "bert4rec":
            raise ValueError("model.history_bias needs a causal model (hymoerec or gru4rec): BERT4Rec sees the future")
        # GRU4Rec has no FFN, so its `moe` section is ignored rather than rejected
        if self.moe.enabled and self.kind != "gru4rec":
            self.moe.validate()
