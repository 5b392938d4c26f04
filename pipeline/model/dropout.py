"""Dropout with a cheaper mask on the CPU (every model uses it instead of ``nn.Dropout``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Dropout(nn.Dropout):
    """``nn.Dropout`` with the mask drawn by ``rand >= p``: the same distribution, 3-4x faster on the CPU.

    PyTorch's CPU dropout draws its mask with ``bernoulli_`` (7 ms for a [256, 30, 64] activation here, against 2
    ms for uniform draws and a comparison), and a transformer step applies dropout about ten times. Masks come
    from the global generator as before; the draws differ, so a seed gives other (equally distributed) masks.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.p == 1.0:
            return x * 0.0
        keep = torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))
        return x.mul_(keep) if self.inplace else x * keep
