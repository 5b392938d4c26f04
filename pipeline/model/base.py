"""The interface every model implements, and the next-item losses they share.

Items are ids 1..num_items, 0 is padding. Sequences are left-padded (the most recent item is at the right).
A model only defines :meth:`SequentialRecommender.encode` (hidden state per position); the losses and the
full-sort scores are one matmul against the item embedding table, which doubles as the output layer.

Optional history bias (``model.history_bias``): one learned scalar b is added to the score of every item already
in the history the model sees at that position. A dot product with tied embeddings cannot tell "like what you
just had" from "what you just had", so on data where nobody repeats an item (reviews, ratings) the items just
seen take top places the next item needs; b learns how likely repeats are (negative there, positive on re-purchase
data) from the same loss, in training and at scoring alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.model.config import ModelConfig
from pipeline.model.moe import MoEAux

# Adam moves a parameter by about lr per step: the history offset needs a few units (thousands of steps at lr 1e-3,
# most of a run on Beauty) where weights need hundredths, so it gets its own, larger learning rate
HISTORY_BIAS_LR_SCALE = 10.0


@dataclass
class LossOutput:
    loss: Tensor  # total = ce + lb, what to backpropagate
    ce: Tensor  # next-item (or cloze) cross-entropy, mean over predicted positions
    lb: Tensor  # 0-dim load-balance loss summed over layers; 0.0 without MoE
    auxes: list[MoEAux] = field(default_factory=list)  # per-layer routing statistics (MoE only)

    @property
    def stats(self) -> dict[str, float]:
        """Loggable floats per layer (alpha, usage entropy, load fractions), computed when read: a trainer that
        logs one step an epoch pays for one, and a GPU step never waits for the host on their account."""
        return moe_stats(self.auxes)


class SequentialRecommender(nn.Module):
    """Base class: left-padded item ids in, hidden states / losses / full-sort scores out.

    ``train_step`` is a buffer the trainer sets (``model.set_train_step(step)``) before each optimiser step;
    the MoE warm-up w(t) reads it, and because it is in the state_dict a resumed run continues the warm-up
    exactly. At evaluation the stored step is used.

    Every model validates its config, keeps it, and owns the item table (ids 0..num_items, 0 = padding, plus
    ``extra_tokens`` such as BERT4Rec's [MASK]) that doubles as the output layer; each model initialises it.
    """

    num_items: int
    max_seq_len: int
    item_emb: nn.Embedding
    history_bias: nn.Parameter | None

    def __init__(self, cfg: ModelConfig, num_items: int, *, extra_tokens: int = 0) -> None:
        super().__init__()
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        cfg.validate()
        self.cfg = cfg
        self.num_items = num_items
        self.max_seq_len = cfg.max_seq_len
        self.register_buffer("train_step", torch.zeros((), dtype=torch.long))
        self.register_parameter("history_bias", nn.Parameter(torch.zeros(())) if cfg.uses_history_bias else None)
        self.item_emb = nn.Embedding(num_items + 1 + extra_tokens, cfg.hidden_size, padding_idx=0)

    def set_train_step(self, step: int) -> None:
        self.train_step.fill_(int(step))

    def encode(self, input_ids: Tensor, *, return_topk: bool = False) -> tuple[Tensor, list[MoEAux]]:
        """Hidden states ``[B, L, d]`` (row t summarises the history up to t) and per-layer MoE statistics."""
        raise NotImplementedError

    def output_table(self) -> Tensor:
        """Embeddings of the real items 1..num_items (row i-1 is item i): the tied output layer."""
        return self.item_emb.weight[1 : self.num_items + 1]

    def training_loss(
        self,
        input_ids: Tensor,
        target_ids: Tensor,
        *,
        num_negatives: int = 0,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """Next-item cross-entropy at every position with a target (``target_ids > 0``), plus the MoE balance loss.

        Logits are computed only at those positions. ``num_negatives > 0`` switches from the full catalogue to
        a sampled softmax with that many uniform negatives shared by the batch.
        """
        hidden, auxes = self.encode(input_ids)
        seen = causal_history(input_ids[:, -self.max_seq_len :]) if self.history_bias is not None else None
        return self.loss_at(hidden, auxes, target_ids > 0, target_ids, num_negatives, generator, seen)

    def loss_at(
        self,
        hidden: Tensor,
        auxes: list[MoEAux],
        where: Tensor,
        targets: Tensor,
        num_negatives: int = 0,
        generator: torch.Generator | None = None,
        seen: Tensor | None = None,
    ) -> LossOutput:
        """Cross-entropy of ``targets`` at the positions where ``where`` holds (logits only there) + balance loss.

        ``seen [B, L, L']`` lists, per position, the item ids the history bias applies to (0 = none).
        """
        rows = where.flatten().nonzero().squeeze(1)
        history = None
        if seen is not None and self.history_bias is not None:
            history = (unique_per_row(seen.flatten(0, 1).index_select(0, rows)), self.history_bias)
        ce = next_item_ce(
            hidden.flatten(0, 1).index_select(0, rows),
            targets.flatten().index_select(0, rows),
            self.item_emb.weight,
            self.num_items,
            num_negatives=num_negatives,
            generator=generator,
            history=history,
        )
        return make_loss_output(ce, auxes)

    def score_next(self, input_ids: Tensor) -> Tensor:
        """Full-sort float32 scores ``[B, num_items + 1]`` of the item after the last position; column 0 = -inf."""
        return self.bias_history(
            score_items(self.encode_last(input_ids), self.item_emb.weight, self.num_items), input_ids
        )

    def encode_last(self, input_ids: Tensor) -> Tensor:
        """Hidden state ``[B, d]`` of the last position: what ranking reads (a model may compute it alone)."""
        return self.encode(input_ids)[0][:, -1]

    def bias_history(self, scores: Tensor, input_ids: Tensor) -> Tensor:
        """Add the learned history bias to the full-sort ``scores`` of the items in the window the model sees."""
        if self.history_bias is None:
            return scores
        seen = unique_per_row(input_ids[:, -self.max_seq_len :])  # in place, no second [B, num_items] buffer
        return scores.scatter_add_(1, seen, self.history_bias.float() * (seen > 0))  # padding: -inf + 0

    def routing(self, input_ids: Tensor) -> list[Tensor] | None:
        """Per-layer top-K expert ids ``[B, L, K]`` (-1 at padding), or None for a model without MoE."""
        return None

    def param_groups(self, weight_decay: float, lr: float) -> list[dict]:
        """AdamW groups by shape (nanoGPT rule): decay tensors of 2 or more dimensions (matrices, embeddings), not
        vectors and scalars (biases, norms, alpha); a module whose 2-D tensors are not weights names them in its
        class attribute ``no_weight_decay`` (stacked expert biases, Mamba's decay rates: declared on the class, so a
        copy of the model keeps them). The history offset (no decay) trains at ``HISTORY_BIAS_LR_SCALE * lr``."""
        exempt = {
            id(getattr(module, name))
            for module in self.modules()
            for name in getattr(type(module), "no_weight_decay", ())
        }
        decay, no_decay = [], []
        for p in self.parameters():
            if not p.requires_grad or p is self.history_bias:
                continue
            (decay if p.dim() >= 2 and id(p) not in exempt else no_decay).append(p)
        groups = [
            {"params": decay, "weight_decay": weight_decay, "lr": lr},
            {"params": no_decay, "weight_decay": 0.0, "lr": lr},
        ]
        if self.history_bias is not None:
            groups.append({"params": [self.history_bias], "weight_decay": 0.0, "lr": HISTORY_BIAS_LR_SCALE * lr})
        return groups


class FullSoftmaxCE(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ table.T`` against ``targets`` (0-based), keeping one logits buffer.

    ``F.cross_entropy`` on full-catalogue logits allocates four ``[n, num_items]`` float32 tensors per step
    (logits, log-softmax, and two gradients: ~2.4 GB at batch 256 x 50 x 12k items). On CPU, touching that much
    fresh memory costs more in page faults than the matmuls. Here the logits are kept from the forward and turned
    into ``softmax - onehot`` in place in the backward. The matmuls follow autocast (bf16 under CUDA) and the
    softmax is float32. Not twice differentiable (a second backward raises: the buffer was modified in place).
    ``seen [n, L]`` (0-based columns, unique per row, -1 = none) get ``bias`` added to their logits.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, hidden: Tensor, table: Tensor, targets: Tensor, seen: Tensor | None = None, bias: Tensor | None = None
    ) -> Tensor:
        logits = F.linear(hidden, table)
        ctx.mm_dtype = logits.dtype
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        ctx.history = seen is not None and bias is not None
        if ctx.history:
            cols, valid = seen.clamp_min(0), (seen >= 0).to(logits.dtype)
            logits.scatter_add_(1, cols, valid * bias.to(logits.dtype))
        target_logit = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
        # stable log-sum-exp done in place (torch.logsumexp would allocate another [n, num_items] temporary)
        row_max = logits.amax(dim=1, keepdim=True)
        unnormalised = logits.sub_(row_max).exp_()
        total = unnormalised.sum(dim=1)
        loss = (row_max.squeeze(1) + total.log() - target_logit).mean()
        seen_saved = seen if ctx.history else targets.new_empty(0)
        ctx.bias_dtype = bias.dtype if ctx.history else None
        ctx.save_for_backward(hidden, table, targets, total, unnormalised, seen_saved)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        hidden, table, targets, total, unnormalised, seen = ctx.saved_tensors
        # d loss / d logits = grad * (softmax - onehot) / n, built in place in two passes over the buffer
        scale = grad / len(targets)
        g = unnormalised.mul_((scale / total).unsqueeze(1))
        g[torch.arange(len(targets), device=targets.device), targets] -= scale
        grad_bias = None
        if ctx.history:
            grad_bias = (g.gather(1, seen.clamp_min(0)) * (seen >= 0)).sum().to(ctx.bias_dtype)
        g = g.to(ctx.mm_dtype)
        grad_hidden = (g @ table.to(ctx.mm_dtype)).to(hidden.dtype)
        grad_table = (g.T @ hidden.to(ctx.mm_dtype)).to(table.dtype)
        return grad_hidden, grad_table, None, None, grad_bias


def next_item_ce(
    hidden: Tensor,
    targets: Tensor,
    item_weight: Tensor,
    num_items: int,
    *,
    num_negatives: int = 0,
    generator: torch.Generator | None = None,
    history: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Cross-entropy of ``targets [n]`` (ids 1..num_items) given ``hidden [n, d]`` and the embedding table.

    Full catalogue: softmax over items 1..num_items (padding column never enters). Sampled: the target against
    ``num_negatives`` uniform items shared by all rows; a negative equal to a row's target is masked to -inf
    so it cannot count as a negative. ``history = (seen [n, L] ids unique per row with 0 = none, bias)`` adds
    the scalar bias to the logits of each row's seen items.
    """
    seen, bias = history if history is not None else (None, None)
    if hidden.shape[0] == 0:  # nothing to predict: a zero that keeps the graph (and dtype), every input used
        return hidden.sum() * 0.0 + (bias * 0.0 if bias is not None else 0.0)
    if num_negatives <= 0:
        return FullSoftmaxCE.apply(
            hidden, item_weight[1 : num_items + 1], targets - 1, None if seen is None else seen - 1, bias
        )
    device = generator.device if generator is not None else hidden.device
    negatives = torch.randint(1, num_items + 1, (num_negatives,), generator=generator, device=device)
    negatives = negatives.to(hidden.device)
    pos = (hidden * item_weight[targets]).sum(-1, keepdim=True).float()
    neg = F.linear(hidden, item_weight[negatives]).float()
    if seen is not None and bias is not None:
        pos = pos + bias * (seen == targets.unsqueeze(1)).any(1, keepdim=True)
        neg = neg + bias * (seen.unsqueeze(1) == negatives.view(1, -1, 1)).any(2)
    neg = neg.masked_fill(negatives.unsqueeze(0) == targets.unsqueeze(1), -math.inf)
    logits = torch.cat([pos, neg], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(targets))


def score_items(hidden: Tensor, item_weight: Tensor, num_items: int) -> Tensor:
    """Scores ``[B, num_items + 1]`` against items 0..num_items, padding column set to -inf."""
    # float32 with autocast off: bf16 scores (3 significant digits) would turn near-equal scores into exact ties
    with torch.autocast(hidden.device.type, enabled=False):
        scores = F.linear(hidden.float(), item_weight[: num_items + 1].float())
    scores[:, 0] = -math.inf
    return scores


def causal_history(input_ids: Tensor) -> Tensor:
    """``[B, L, L]``: row t holds the items at positions <= t (0 elsewhere), what position t has already seen."""
    L = input_ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=input_ids.device).tril()
    return input_ids.unsqueeze(1).expand(-1, L, -1) * causal


def unique_per_row(ids: Tensor) -> Tensor:
    """``ids [n, L]`` with repeats within a row replaced by 0, so each item is counted once per row."""
    ids, _ = ids.sort(dim=1)
    repeat = torch.zeros_like(ids, dtype=torch.bool)
    repeat[:, 1:] = ids[:, 1:] == ids[:, :-1]
    return ids.masked_fill(repeat, 0)


def make_loss_output(ce: Tensor, auxes: list[MoEAux]) -> LossOutput:
    lb = torch.stack([a.lb for a in auxes]).sum() if auxes else torch.zeros((), device=ce.device)
    return LossOutput(loss=ce + lb, ce=ce, lb=lb, auxes=auxes)


@torch.no_grad()
def moe_stats(auxes: list[MoEAux]) -> dict[str, float]:
    """Loggable floats per layer: alpha, normalised usage entropy H(g-bar)/log E, lb, top-K load fractions.

    Gathered with a single device-to-host copy so logging every step costs one sync.
    """
    if not auxes:
        return {}
    values, keys = [], []
    for layer, aux in enumerate(auxes):
        E = aux.mean_probs.numel()
        p = aux.mean_probs.float()
        entropy = -(p * p.clamp_min(1e-12).log()).sum() / (math.log(E) if E > 1 else 1.0)
        load = aux.counts.float() / aux.counts.sum().clamp_min(1)
        prefix = f"moe/l{layer}"
        keys += [f"{prefix}/alpha", f"{prefix}/usage_entropy", f"{prefix}/lb", f"{prefix}/load_max"]
        keys += [f"{prefix}/load/e{e}" for e in range(E)]
        values += [aux.alpha.float().reshape(1), entropy.reshape(1), aux.lb.float().reshape(1)]
        values += [load.max().reshape(1), load]
    return dict(zip(keys, torch.cat([v.to(values[0].device) for v in values]).tolist(), strict=True))


def left_to_right(input_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate left-padded rows ``[B, L]`` to right padding; returns them and the leading padding per row ``[B, 1]``.

    Recurrent encoders (GRU, Mamba) read a row from its first item, so their state never depends on how much
    padding a batch carries; trailing padding only follows the real items, so no packing (and no host sync).
    """
    L = input_ids.shape[1]
    pad = L - (input_ids > 0).sum(1, keepdim=True)
    cols = torch.arange(L, device=input_ids.device).unsqueeze(0)
    return input_ids.gather(1, (cols + pad) % L), pad


def right_to_left(states: Tensor, pad: Tensor) -> Tensor:
    """Undo :func:`left_to_right` on per-position states ``[B, L, H]`` (the padding rows hold whatever ran there)."""
    B, L, H = states.shape
    cols = torch.arange(L, device=states.device).unsqueeze(0)
    return states.gather(1, ((cols - pad) % L).unsqueeze(-1).expand(B, L, H))
