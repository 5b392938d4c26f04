"""Mamba4Rec (Liu et al., 2024, "Mamba4Rec: Towards Efficient Sequential Recommendation with Selective State Space
Models"), top to bottom:

    x = LayerNorm(dropout(item_emb(history)))                                no position embedding
    per layer:  h = LayerNorm(dropout(Mamba(x)) [+ x when num_layers > 1]);  x = LayerNorm(h + FFN(h))

``Mamba`` is the selective state-space block of Gu & Dao (2023), with the parameter layout of ``mamba_ssm.Mamba``:
in_proj -> causal depthwise conv1d -> SiLU -> x_proj (dt, B, C) -> softplus(dt_proj) -> selective scan -> gate with
SiLU(z) -> out_proj. The scan

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t,     y_t = C_t . h_t + D * u_t

runs in one of three kernels with the same result: ``parallel`` (mambapy's Blelloch parallel scan, pure PyTorch,
2 log2(L) in-place whole-tensor steps; CPU and GPU), ``sequential`` (a loop over time: the reference the tests hold
the others to) and ``fused`` (``mamba_ssm``'s CUDA kernel, when installed and on CUDA). mambapy was chosen over an
own recursive-doubling scan by measurement (``benchmarks/mamba_scan.py``: 5x faster on the CPU, less memory).
``auto`` takes ``fused`` where it can, else ``parallel``. Weights are initialised as Mamba4Rec's code does
(normal(0.02) for every linear and embedding weight, zero biases); histories are rotated to right padding first, as
in GRU4Rec, so a user's state starts at their first item whatever the padding.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from mambapy.pscan import npo2, pscan
from torch import Tensor, nn

from pipeline.model.base import SequentialRecommender, left_to_right, right_to_left
from pipeline.model.config import MambaConfig, ModelConfig
from pipeline.model.dropout import Dropout
from pipeline.model.moe import MoEAux


# --------------------------------------------------------------------------------------------------- the scan
def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, kernel: str) -> Tensor:
    """``y [b, L, d]`` of the selective scan over ``u, delta [b, L, d]``, ``A [d, n]``, ``B, C [b, L, n]``, ``D [d]``.

    Computed in float32 at least, whatever the autocast dtype (the decays multiply over the whole sequence).
    """
    if kernel == "auto":
        kernel = "fused" if u.is_cuda and fused_scan_available() else "parallel"
    if kernel == "fused" and not (u.is_cuda and fused_scan_available()):
        raise RuntimeError("model.mamba.scan=fused needs a CUDA device and the mamba-ssm package; use auto or parallel")
    with torch.autocast(u.device.type, enabled=False):  # bf16 einsums would round the states
        u, delta, A, B, C, D = (_at_least_float32(t) for t in (u, delta, A, B, C, D))
        if kernel == "fused" or torch.is_grad_enabled():  # training keeps every state for the backward anyway
            return _selective_scan(u, delta, A, B, C, D, kernel)
        rows = _rows_per_chunk(u.shape[1], A)
        chunks = zip(u.split(rows), delta.split(rows), B.split(rows), C.split(rows), strict=True)
        parts = [_selective_scan(u_, delta_, A, B_, C_, D, kernel) for u_, delta_, B_, C_ in chunks]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


INFERENCE_SCAN_BYTES = 256 * 2**20
"""Largest [rows, L, d, n] state tensor of one inference chunk. Full ranking scores 512-1024 users at once; at
ML-1M's L = 200 (padded to 256 steps by the scan) each state-sized tensor of the scan takes 1.7 GB per 512 users,
and an ML-1M Mamba4Rec epoch was killed for memory at 15 GB. The scan is independent per row, so chunks of users
give the same scores in a fraction of the memory."""


def _rows_per_chunk(length: int, A: Tensor) -> int:
    bytes_per_row = npo2(length) * A.numel() * 4  # pscan pads L to the next power of two
    return max(1, INFERENCE_SCAN_BYTES // bytes_per_row)


def _selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, kernel: str) -> Tensor:
    if kernel == "fused":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        y = selective_scan_fn(
            u.transpose(1, 2).contiguous(),
            delta.transpose(1, 2).contiguous(),
            A,
            B.transpose(1, 2).contiguous(),
            C.transpose(1, 2).contiguous(),
            D,
        )
        return y.transpose(1, 2)
    decay = torch.exp(delta.unsqueeze(-1) * A)  # [b, L, d, n]
    drive = (delta * u).unsqueeze(-1) * B.unsqueeze(2)  # [b, L, d, n]
    states = pscan(decay, drive) if kernel == "parallel" else _scan_sequential(decay, drive)
    return torch.einsum("bldn,bln->bld", states, C) + u * D


def _at_least_float32(tensor: Tensor) -> Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _scan_sequential(decay: Tensor, drive: Tensor) -> Tensor:
    """All ``h_t = decay_t * h_{t-1} + drive_t`` (h_0 = 0) along dim 1, one step at a time: the plain reference."""
    state = torch.zeros_like(drive[:, 0])
    states = []
    for t in range(drive.shape[1]):
        state = decay[:, t] * state + drive[:, t]
        states.append(state)
    return torch.stack(states, dim=1)


@functools.cache
def fused_scan_available() -> bool:
    try:
        import mamba_ssm.ops.selective_scan_interface  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------------- the layers
class MambaBlock(nn.Module):
    """The selective SSM block (Mamba-1), parameters named as in ``mamba_ssm.Mamba``."""

    no_weight_decay = ("A_log", "D")  # as in mamba_ssm: decay rates and skip gains, not weights

    def __init__(self, d_model: int, cfg: MambaConfig) -> None:
        super().__init__()
        d_inner = cfg.expand * d_model
        self.d_state = cfg.d_state
        self.dt_rank = math.ceil(d_model / 16)
        self.scan = cfg.scan
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, cfg.d_conv, groups=d_inner, padding=cfg.d_conv - 1)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * cfg.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        length = x.shape[1]
        u, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self.conv1d(u.transpose(1, 2))[..., :length].transpose(1, 2))  # causal: trim the right overhang
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt).float())
        y = selective_scan(u, delta, -torch.exp(self.A_log.float()), B, C, self.D, self.scan)
        return self.out_proj((y * F.silu(z.float())).to(x.dtype))


class PointwiseFeedForward(nn.Module):
    """Mamba4Rec's FFN: LayerNorm(x + dropout(W2 dropout(GELU(W1 x)))), inner width 4d."""

    def __init__(self, d_model: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, 4 * d_model)
        self.fc2 = nn.Linear(4 * d_model, d_model)
        self.drop = Dropout(dropout)
        self.norm = nn.LayerNorm(d_model, eps=1e-12)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.drop(self.fc2(self.drop(F.gelu(self.fc1(x))))))


class MambaLayer(nn.Module):
    def __init__(self, d_model: int, cfg: MambaConfig) -> None:
        super().__init__()
        self.residual = cfg.num_layers > 1  # Mamba4Rec drops the residual around a single layer
        self.mamba = MambaBlock(d_model, cfg)
        self.drop = Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(d_model, eps=1e-12)
        self.ffn = PointwiseFeedForward(d_model, cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(self.mamba(x))
        return self.ffn(self.norm(h + x if self.residual else h))


class Mamba4Rec(SequentialRecommender):
    def __init__(self, cfg: ModelConfig, num_items: int) -> None:
        super().__init__(cfg, num_items)
        d = cfg.hidden_size
        self.drop = Dropout(cfg.mamba.dropout)
        self.norm = nn.LayerNorm(d, eps=1e-12)
        self.layers = nn.ModuleList([MambaLayer(d, cfg.mamba) for _ in range(cfg.mamba.num_layers)])
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

    def encode(self, input_ids: Tensor, *, return_topk: bool = False) -> tuple[Tensor, list[MoEAux]]:
        input_ids = input_ids[:, -self.max_seq_len :]
        right, pad = left_to_right(input_ids)
        x = self.norm(self.drop(self.item_emb(right)))
        for layer in self.layers:
            x = layer(x)
        hidden = right_to_left(x, pad) * (input_ids > 0).unsqueeze(-1).to(x.dtype)
        return hidden, []
