"""Model configuration: plain dataclasses, no torch import (the params loader imports this module).

Fair ablation: with MoE on, each block's dense branch has ``moe.dense_hidden`` inner units; with MoE off, the
plain FFN has ``ffn_hidden``. Both default to 256, so ``moe.enabled=False`` is exactly the HyMoERec network
minus the experts and the router (the paper's "w/o MoE" row), not a smaller or larger FFN.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

MODEL_KINDS = ("hymoerec", "gru4rec", "bert4rec", "narm", "mamba4rec")
TRANSFORMER_KINDS = ("hymoerec", "bert4rec")  # the kinds with a position-wise FFN, where the hybrid MoE lives
MAMBA_SCANS = ("auto", "parallel", "sequential", "fused")
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
    dense_branch: bool = True  # (bool) False = pure sparse MoE (ablation): y = sum g_i f_i(x), no alpha, no warm-up
    router_input: str = "hidden"  # (str) hidden | hidden_item | hidden_item_user
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
class NARMConfig:
    """NARM's own settings; defaults are the paper's (Li et al. 2017: GRU width 100, dropouts 0.25 and 0.5)."""

    hidden_size: int = 100  # (int) GRU width H (the item embedding width is model.hidden_size)
    num_layers: int = 1  # (int) GRU layers
    embedding_dropout: float = 0.25  # (float) dropout on the item embeddings
    context_dropout: float = 0.5  # (float) dropout on [c_global; c_local] before the bilinear decoder

    def validate(self) -> None:
        if self.hidden_size < 1 or self.num_layers < 1:
            raise ValueError("narm.hidden_size and narm.num_layers must be >= 1")
        for name in ("embedding_dropout", "context_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"narm.{name} must be in [0, 1), got {getattr(self, name)}")


@dataclass
class MambaConfig:
    """Mamba4Rec's own settings; defaults are the paper's (Liu et al. 2024: 1 layer, dropout 0.2, d_state 32,
    d_conv 4, expand 2)."""

    num_layers: int = 1  # (int) Mamba layers (Mamba block + position-wise FFN each)
    dropout: float = 0.2  # (float) dropout on embeddings, Mamba outputs and FFN
    d_state: int = 32  # (int) N, SSM state size per channel
    d_conv: int = 4  # (int) width of the causal depthwise convolution
    expand: int = 2  # (int) inner width = expand * model.hidden_size
    scan: str = "auto"  # (str) auto | parallel | sequential | fused: selective-scan kernel, same result

    def validate(self) -> None:
        for name in ("num_layers", "d_state", "d_conv", "expand"):
            if getattr(self, name) < 1:
                raise ValueError(f"mamba.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"mamba.dropout must be in [0, 1), got {self.dropout}")
        if self.scan not in MAMBA_SCANS:
            raise ValueError(f"mamba.scan must be one of {MAMBA_SCANS}, got {self.scan!r}")


@dataclass
class ModelConfig:
    kind: str = "hymoerec"  # (str) hymoerec (moe.enabled=false: SASRec) | gru4rec | bert4rec | narm | mamba4rec
    hidden_size: int = 64  # (int) d, embedding and hidden width
    num_layers: int = 2  # (int) transformer blocks / GRU layers
    num_heads: int = 2  # (int) attention heads (must divide hidden_size)
    max_seq_len: int = 50  # (int) L, longest history the model sees (positions are right-aligned)
    dropout: float = 0.2  # (float) dropout on embeddings, (dense) FFN inner activations and residual branches
    attn_dropout: float = 0.2  # (float) dropout on attention probabilities
    ffn_hidden: int = 256  # (int) FFN inner width of the plain (non-MoE) transformer
    bert_mask_prob: float = 0.2  # (float) BERT4Rec cloze masking probability per real item
    history_bias: bool = True  # (bool) learn one score offset for items already in the history (ignored by BERT4Rec)
    moe: MoEConfig = field(default_factory=MoEConfig)
    narm: NARMConfig = field(default_factory=NARMConfig)
    mamba: MambaConfig = field(default_factory=MambaConfig)

    @property
    def uses_moe(self) -> bool:
        """Whether the built network has the hybrid MoE: only transformer kinds have an FFN to replace."""
        return self.moe.enabled and self.kind in TRANSFORMER_KINDS

    @property
    def display_name(self) -> str:
        """The model's name in the literature: ``hymoerec`` without MoE is SASRec (what runs are called)."""
        names = {"gru4rec": "GRU4Rec", "narm": "NARM", "mamba4rec": "Mamba4Rec"}
        if self.kind == "hymoerec":
            return "HyMoERec" if self.uses_moe else "SASRec"
        if self.kind == "bert4rec":
            return "BERT4Rec + hybrid MoE" if self.uses_moe else "BERT4Rec"
        return names.get(self.kind, self.kind)

    def relevant(self) -> dict[str, Any]:
        """The settings the built network depends on: sections of other kinds are left out.

        Fingerprints (checkpoint resume, the study's config digest) hash this, so a setting of another model kind
        (e.g. ``mamba.dropout`` for a transformer) never invalidates a checkpoint or a finished result.
        """
        settings = asdict(self)
        if not self.uses_moe:
            settings["moe"] = {"enabled": False}
        if self.kind != "narm":
            del settings["narm"]
        if self.kind != "mamba4rec":
            del settings["mamba"]
        if self.kind != "bert4rec":
            del settings["bert_mask_prob"]
        settings["history_bias"] = self.uses_history_bias
        return settings

    @property
    def uses_history_bias(self) -> bool:
        """Whether the built network has the history bias: BERT4Rec sees the future, so it never gets one."""
        return self.history_bias and self.kind != "bert4rec"

    def validate(self) -> None:
        """Raise ValueError on an inconsistent model setting (MoE settings only checked when MoE is used)."""
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"model.kind must be one of {MODEL_KINDS}, got {self.kind!r}")
        for name in ("hidden_size", "num_layers", "max_seq_len", "ffn_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.kind in TRANSFORMER_KINDS and (self.num_heads < 1 or self.hidden_size % self.num_heads):
            raise ValueError(
                f"model.num_heads ({self.num_heads}) must be >= 1 and divide hidden_size ({self.hidden_size})"
            )
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 < self.bert_mask_prob < 1.0:
            raise ValueError(f"model.bert_mask_prob must be in (0, 1), got {self.bert_mask_prob}")
        # only the transformers have an FFN: the `moe` section is ignored (not rejected) for the other kinds
        if self.uses_moe:
            self.moe.validate()
        if self.kind == "narm":
            self.narm.validate()
        if self.kind == "mamba4rec":
            self.mamba.validate()
