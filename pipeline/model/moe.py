"""Hybrid mixture-of-experts feed-forward layer (HyMoERec).

    y = FFN_dense(x) + alpha * sum_{i in topK(x)} g_i(x) * f_i(x),    alpha = sigmoid(alpha_param) * w(t)

(``moe.dense_branch: false``, the "pure sparse MoE" ablation, drops FFN_dense and with it alpha: y = sum g_i f_i.)

The dense FFN keeps the plain SASRec path (and its accuracy) from the first step; the experts are faded in by
the warm-up w(t) so a randomly initialised router cannot disturb early training, and the learned alpha_param lets
the model decide how much the specialists should count afterwards.

Experts are stored as stacked weights ``w1 (E, d, h)``, ``w2 (E, h, d)`` (megablocks style) so three routing
kernels can share the same parameters and be compared exactly:

* ``loop``    reference: for each expert that received tokens, gather its rows, run it, ``index_add`` back;
* ``dense``   run every expert on every token as two plain GEMMs over the concatenated experts and weight by a
              gate matrix that is zero off the top-K (E/K times the FLOPs, but no gathers or host syncs);
* ``grouped`` sort (token, slot) pairs by expert, two grouped GEMMs over the experts' contiguous rows (CPU;
              a zero-padded ``[E, capacity, d]`` buffer and batched matmuls elsewhere), un-permute.

The layer works on *real tokens only*: callers pass the packed non-padding rows ``[N, d]``.  That is how padding
is kept out of the balance statistics (and out of the compute; in recommendation most positions are padding).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.model.config import MoEConfig
from pipeline.model.dropout import Dropout

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu}

# Routing kernel used by implementation="auto", per device type. CPU: measured with benchmarks/moe_speed.py
# (figures in BENCHMARKS.md): quiet 2-core CPU, torch 2.13, d=64, E=8, K=2, h=64, 2 layers, batch 256 x L=50,
# 12,101 items, one training step (fwd + bwd + AdamW), median of 15. All positions real: SASRec 787 ms,
# loop 855 (1.09x), grouped 854 (1.08x), dense 903 (1.15x); 19% real positions: 224 / 246 / 243 / 251 ms.
# Issue 12 made grouped one padded batched matmul per FFN layer instead of one matmul per expert: one layer's
# experts, forward + backward on 1,455 tokens (a Beauty step), 3.4 ms against 5.8 (loop 5.3, dense 6.1).
# The dense kernel's E/K = 4x expert FLOPs cost more than the gathers here; loop and grouped tie, and grouped
# has one host sync per layer instead of one per expert. (Under heavy CPU contention from other processes the
# gather kernels degraded more than dense did, so re-measure on a shared machine.) CUDA was not measured in
# this task; "dense" there because it needs no host syncs (loop and grouped read per-expert counts on the
# host) and at d=64 the extra FLOPs are cheap for a GPU.
AUTO_IMPLEMENTATION: dict[str, str] = {"cpu": "grouped", "cuda": "dense"}


def warmup_weight(step: Tensor | int, warmup_steps: int, schedule: str = "linear") -> Tensor:
    """w(t): 0 at step 0, 1 from ``warmup_steps`` on; linear or cosine (half-period) in between."""
    t = torch.as_tensor(step).float()
    if warmup_steps <= 0:
        return torch.ones_like(t)
    ramp = (t / warmup_steps).clamp(0.0, 1.0)
    if schedule == "linear":
        return ramp
    if schedule == "cosine":
        return 0.5 * (1.0 - torch.cos(math.pi * ramp))
    raise ValueError(f"unknown warm-up schedule {schedule!r} (linear | cosine)")


def expert_counts(top_i: Tensor, num_experts: int) -> Tensor:
    """Top-K assignments per expert ``[E]`` (long), without a host sync (CUDA's ``bincount`` reads its max first)."""
    flat = top_i.flatten()
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def load_balance(
    probs: Tensor, top_i: Tensor, lb_type: str = "entropy", counts: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Unweighted balance loss, g-bar and top-K counts (``counts`` when the caller has them) from the gate
    probabilities of real tokens.

    ``entropy``: sum_e g_e log g_e with g = mean full-softmax probability, i.e. minus the entropy of the
    average routing distribution, minimal (-log E) at uniform load. ``switch``: E * sum_e f_e P_e with f the
    fraction of top-K slots per expert (not differentiable) and P = g-bar, minimal (1) at uniform load.
    Both only see the rows they are given, so callers pass real tokens only.
    """
    N, E = probs.shape
    mean_probs = probs.sum(0) / max(N, 1)  # zeros (and a zero loss) for a batch with no real token
    counts = expert_counts(top_i, E) if counts is None else counts
    if lb_type == "entropy":
        lb = (mean_probs * mean_probs.clamp_min(1e-12).log()).sum()
    elif lb_type == "switch":
        frac = counts.to(probs.dtype) / max(top_i.numel(), 1)
        lb = E * (frac * mean_probs).sum()
    else:
        raise ValueError(f"unknown load-balance type {lb_type!r} (entropy | switch)")
    return lb, mean_probs, counts


class FeedForward(nn.Module):
    """Position-wise two-layer FFN: the SASRec FFN, and the always-on dense branch of the hybrid MoE."""

    def __init__(self, d_model: int, hidden: int, dropout: float, activation: str = "relu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)
        self.drop = Dropout(dropout)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


@dataclass
class MoEAux:
    """Per-layer routing statistics; everything is computed over the real (non-padding) tokens only."""

    lb: Tensor  # 0-dim float32: weighted load-balance loss of this layer (differentiable)
    mean_probs: Tensor  # [E] float32: g-bar, mean full-softmax gate probability per expert (differentiable)
    counts: Tensor  # [E] long: top-K assignments per expert
    alpha: Tensor  # 0-dim float32: sigmoid(alpha_param) * w(t)
    topk_idx: Tensor | None = None  # [N, K] long: expert ids per token, only when requested


class HybridMoE(nn.Module):
    """Dense FFN plus an alpha-scaled, top-K gated sum of small expert FFNs.

    The router is one bias-free linear layer on the *concatenation* [hidden, item, user] (per ``router_input``).
    A linear map of a concatenation equals a sum of per-source projections, so unlike routing on the sum the
    router can weigh the item signal against the hidden state independently; it costs (sources * d * E) extra
    weights, a few thousand. Logits and softmax are always float32 (outside autocast): bf16 logits would flip
    near-tied top-K choices and the balance statistics need the precision.

    Expert activations get their own dropout (``moe.expert_dropout``; null = the dense branch's rate). At 0 the
    three kernels compute the same function in training too, differing only in summation order; above 0 each
    kernel draws its own masks (same distribution), and in eval mode they agree again. With ``top_k=1``
    the renormalised gate is always 1 and the router learns from the balance loss alone.
    """

    no_weight_decay = ("b1", "b2")  # one bias vector per expert, stacked: 2-D, but biases

    def __init__(self, d_model: int, cfg: MoEConfig, *, dropout: float = 0.0, activation: str = "relu") -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        E, h = cfg.num_experts, cfg.expert_hidden
        self.num_experts, self.top_k = E, cfg.top_k
        self.act = ACTIVATIONS[activation]
        self.dense = FeedForward(d_model, cfg.dense_hidden, dropout, activation) if cfg.dense_branch else None
        self.expert_drop = Dropout(dropout if cfg.expert_dropout is None else cfg.expert_dropout)
        n_sources = {"hidden": 1, "hidden_item": 2, "hidden_item_user": 3}[cfg.router_input]
        self.router = nn.Linear(n_sources * d_model, E, bias=False)
        self.w1 = nn.Parameter(torch.empty(E, d_model, h))
        self.b1 = nn.Parameter(torch.zeros(E, h))
        self.w2 = nn.Parameter(torch.empty(E, h, d_model))
        self.b2 = nn.Parameter(torch.zeros(E, d_model))
        self.alpha_param = nn.Parameter(torch.tensor(float(cfg.alpha_init)))
        self.reset_experts()

    def reset_experts(self, std: float = 0.02, out_std: float = 0.02) -> None:
        """Normal init of the stacked expert weights (``out_std`` lets the model scale residual projections)."""
        nn.init.normal_(self.w1, std=std)
        nn.init.normal_(self.w2, std=out_std)
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)

    def alpha(self, step: Tensor | int) -> Tensor:
        """alpha = sigmoid(alpha_param) * w(step), float32."""
        w = warmup_weight(step, self.cfg.warmup_steps, self.cfg.warmup_schedule).to(self.alpha_param.device)
        return torch.sigmoid(self.alpha_param.float()) * w

    def forward(
        self,
        x: Tensor,
        ctx: Tensor | None = None,
        *,
        step: Tensor | int = 0,
        implementation: str | None = None,
        return_topk: bool = False,
    ) -> tuple[Tensor, MoEAux]:
        """Apply the layer to real tokens ``x [N, d]``; ``ctx [N, c]`` is the extra router input (item, user).

        Returns the output ``[N, d]`` and this layer's :class:`MoEAux`.
        """
        impl = implementation or self.cfg.implementation
        if impl == "auto":
            impl = AUTO_IMPLEMENTATION.get(x.device.type, "dense")  # unknown accelerators: no host syncs
        probs = self.gate_probs(x, ctx)  # [N, E] float32
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        gates = top_p / top_p.sum(-1, keepdim=True)  # renormalised over the K chosen experts
        counts = expert_counts(top_i, self.num_experts)
        route = {"loop": self._loop, "dense": self._dense, "grouped": self._grouped}[impl]
        experts = route(x, top_i, gates, counts)
        alpha = self.alpha(step)
        if self.dense is None:  # pure sparse MoE: the experts are the whole FFN, nothing to fade them in beside
            return experts.to(x.dtype), self._aux(probs, top_i, counts, torch.ones_like(alpha), return_topk)
        dense = self.dense(x)
        y = dense + alpha.to(dense.dtype) * experts.to(dense.dtype)
        return y, self._aux(probs, top_i, counts, alpha, return_topk)

    def gate_probs(self, x: Tensor, ctx: Tensor | None = None) -> Tensor:
        """Full softmax over experts in (at least) float32, autocast off so the router matmul is float32 too."""
        if (ctx is None) != (self.cfg.router_input == "hidden"):
            raise ValueError(f"router_input={self.cfg.router_input!r} needs ctx exactly when it is not 'hidden'")
        dtype = torch.promote_types(x.dtype, torch.float32)  # float64 inputs stay float64 (gradcheck)
        router_in = x if ctx is None else torch.cat([x, ctx.to(x.dtype)], dim=-1)
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(router_in.to(dtype), self.router.weight.to(dtype))
        return logits.softmax(dim=-1)

    def _aux(self, probs: Tensor, top_i: Tensor, counts: Tensor, alpha: Tensor, return_topk: bool) -> MoEAux:
        lb, mean_probs, counts = load_balance(probs, top_i, self.cfg.lb_type, counts)
        return MoEAux(self.cfg.lb_weight * lb, mean_probs, counts, alpha, top_i if return_topk else None)

    def _expert(self, e: int, x: Tensor) -> Tensor:
        hid = self.expert_drop(self.act(torch.addmm(self.b1[e], x, self.w1[e])))
        return torch.addmm(self.b2[e], hid, self.w2[e])

    def _loop(self, x: Tensor, top_i: Tensor, gates: Tensor, counts: Tensor) -> Tensor:
        """Reference kernel: one gather / expert / ``index_add`` per expert that received tokens."""
        K = self.top_k
        flat_e, flat_g = top_i.flatten(), gates.flatten()
        out = torch.zeros_like(x)
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            slots = (flat_e == e).nonzero().squeeze(1)
            tokens = slots // K
            y = self._expert(e, x.index_select(0, tokens)) * flat_g[slots].unsqueeze(1)
            out.index_add_(0, tokens, y.to(out.dtype))
        return out

    def _dense(self, x: Tensor, top_i: Tensor, gates: Tensor, counts: Tensor) -> Tensor:
        """Every expert on every token: sum_e g_e f_e(x) = (g * act(x W1cat + b1)) W2cat + g b2."""
        N, d = x.shape
        E, _, h = self.w1.shape
        gate_mat = torch.zeros(N, E, dtype=gates.dtype, device=gates.device).scatter(1, top_i, gates)
        hid = self.expert_drop(self.act(torch.addmm(self.b1.flatten(), x, self.w1.permute(1, 0, 2).reshape(d, E * h))))
        hid = (hid.view(N, E, h) * gate_mat.unsqueeze(-1).to(hid.dtype)).view(N, E * h)
        return torch.addmm(gate_mat.to(hid.dtype) @ self.b2.to(hid.dtype), hid, self.w2.reshape(E * h, d))

    def _grouped(self, x: Tensor, top_i: Tensor, gates: Tensor, counts: Tensor) -> Tensor:
        """Sort the (token, slot) pairs by expert, run every expert on its contiguous rows, un-permute.

        On the CPU (float32, or bf16 under ``cpu_amp``; widths of whole 16-byte rows) the experts are one
        ``grouped_mm`` per layer of the FFN over the sorted rows, split at the experts' offsets (megablocks style):
        no padding, no host sync, and the backward yields the stacked weights' gradients at once. Elsewhere (CUDA's
        grouped GEMM wants Hopper and bf16; float64 checks) each expert's rows are zero-padded to the busiest
        expert's count into one ``[E, capacity, d]`` buffer for a ``baddbmm``, at the cost of one host sync and of
        the padding (balanced routing pads little; a trained model's skewed routing, its busiest expert near 1.5x
        the mean, pads a third).
        """
        N, d = x.shape
        K, E = self.top_k, self.num_experts
        flat_e = top_i.flatten()
        order = torch.argsort(flat_e, stable=True)
        sorted_e = flat_e.index_select(0, order)
        rows = x.index_select(0, order // K)
        h = self.w1.shape[-1]
        # autocast does not list grouped_mm: under cpu_amp cast by hand, as it would a matmul
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        aligned = all(width * torch.finfo(dtype).bits // 8 % 16 == 0 for width in (d, h))  # grouped_mm's stride rule
        if x.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and aligned:
            offsets = counts.cumsum(0).to(torch.int32)
            rows, weights1, weights2 = rows.to(dtype), self.w1.to(dtype), self.w2.to(dtype)
            hid = F.grouped_mm(rows, weights1, offs=offsets) + self.b1.to(dtype).index_select(0, sorted_e)
            hid = self.expert_drop(self.act(hid))
            out = F.grouped_mm(hid, weights2, offs=offsets) + self.b2.to(dtype).index_select(0, sorted_e)
        else:
            capacity = int(counts.max())  # one host sync per layer
            slot = torch.arange(order.numel(), device=x.device) - (counts.cumsum(0) - counts).index_select(0, sorted_e)
            row = sorted_e * capacity + slot  # where each sorted pair sits in the padded buffer
            padded = x.new_zeros(E * capacity, d).index_copy(0, row, rows)
            hid = self.expert_drop(self.act(torch.baddbmm(self.b1.unsqueeze(1), padded.view(E, capacity, d), self.w1)))
            out = torch.baddbmm(self.b2.unsqueeze(1).to(hid.dtype), hid, self.w2.to(hid.dtype)).view(E * capacity, d)
            out = out.index_select(0, row)
        y = out * gates.flatten()[order].unsqueeze(1).to(out.dtype)
        # back to (token, slot) order by copying each row to its own place: no atomics, deterministic on every
        # device, and the backward is a gather (an inverse-permutation gather would scatter-add in its backward)
        return y.new_empty(y.shape).index_copy(0, order, y).view(N, K, d).sum(1).to(x.dtype)
