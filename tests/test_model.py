"""Model tests: MoE kernels agree, causality, padding, balance loss, warm-up, ablation, losses, tiny training."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from pipeline.evaluation.metrics import EvalBatch
from pipeline.model import (
    BERT4Rec,
    HybridMoE,
    HyMoERec,
    ModelConfig,
    MoEConfig,
    build_model,
    mamba4rec,
    warmup_weight,
)
from pipeline.model.base import next_item_ce, score_items
from pipeline.model.config import MambaConfig, NARMConfig
from pipeline.model.mamba4rec import fused_scan_available, selective_scan
from pipeline.model.moe import FeedForward, load_balance
from tests.conftest import REPO_ROOT

IMPLEMENTATIONS = ("loop", "dense", "grouped")
ROUTER_INPUTS = ("hidden", "hidden_item", "hidden_item_user")
KINDS = ("hymoerec", "gru4rec", "bert4rec", "narm", "mamba4rec")
CAUSAL_KINDS = ("hymoerec", "gru4rec", "narm", "mamba4rec")
RECURRENT_KINDS = ("gru4rec", "narm", "mamba4rec")  # read a history from its first item: padding must not matter


def small_cfg(kind: str = "hymoerec", moe: bool = True, **moe_kw) -> ModelConfig:
    moe_cfg = MoEConfig(enabled=moe, num_experts=4, top_k=2, expert_hidden=16, dense_hidden=32, **moe_kw)
    return ModelConfig(
        kind=kind,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        max_seq_len=12,
        ffn_hidden=32,
        dropout=0.1,
        attn_dropout=0.1,
        moe=moe_cfg,
        narm=NARMConfig(hidden_size=24),
        mamba=MambaConfig(num_layers=2, d_state=8, dropout=0.1),
    )


def without_dropout(cfg: ModelConfig) -> ModelConfig:
    cfg.dropout = cfg.attn_dropout = cfg.mamba.dropout = 0.0
    cfg.narm.embedding_dropout = cfg.narm.context_dropout = 0.0
    return cfg


def random_batch(B: int = 4, L: int = 12, num_items: int = 50, seed: int = 0) -> torch.Tensor:
    """Left-padded random histories with different lengths (one row fully real, one fully padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, num_items + 1, (B, L), generator=g)
    for b, length in enumerate([L, 1, 0, L // 2][:B]):
        ids[b, : L - length] = 0
    return ids


# ---------------------------------------------------------------- MoE kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lb_type", ["entropy", "switch"])
@pytest.mark.parametrize("num_tokens", [37, 3])  # 3 tokens: some experts receive nothing
def test_moe_paths_agree(dtype: torch.dtype, lb_type: str, num_tokens: int) -> None:
    torch.manual_seed(0)
    cfg = MoEConfig(
        num_experts=8,
        top_k=2,
        expert_hidden=16,
        dense_hidden=24,
        router_input="hidden_item_user",
        warmup_steps=10,
        lb_type=lb_type,
        lb_weight=0.5,
        alpha_init=0.3,
    )
    layer = HybridMoE(20, cfg, dropout=0.0).to(dtype)
    with torch.no_grad():  # non-trivial biases so their gradients are compared too
        layer.b1.normal_(std=0.1)
        layer.b2.normal_(std=0.1)
        layer.router.weight.normal_(std=0.5)
    x = torch.randn(num_tokens, 20, dtype=dtype)
    ctx = torch.randn(num_tokens, 40, dtype=dtype)
    upstream = torch.randn(num_tokens, 20, dtype=dtype)
    results = {}
    for impl in (*IMPLEMENTATIONS, "auto"):
        layer.zero_grad()
        xi, ci = x.clone().requires_grad_(), ctx.clone().requires_grad_()
        y, aux = layer(xi, ci, step=5, implementation=impl)
        ((y * upstream).sum() + aux.lb).backward()
        grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
        results[impl] = (y.detach(), xi.grad, ci.grad, grads, aux.lb.detach())
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-9}
    ref = results["loop"]
    assert set(ref[3]) >= {"w1", "w2", "b1", "b2", "router.weight", "alpha_param", "dense.fc1.weight"}
    for impl in ("dense", "grouped", "auto"):
        y, gx, gc, grads, lb = results[impl]
        assert y.dtype == dtype
        torch.testing.assert_close(y, ref[0], **tol)
        torch.testing.assert_close(gx, ref[1], **tol)
        torch.testing.assert_close(gc, ref[2], **tol)
        torch.testing.assert_close(lb, ref[4], **tol)
        assert grads.keys() == ref[3].keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref[3][name], **tol, msg=f"{impl}: grad of {name}")


def test_grouped_kernel_runs_the_experts_as_grouped_gemms_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU the grouped kernel is two grouped GEMMs over the sorted rows (no padded buffer, no host sync);
    widths that are not whole 16-byte rows fall back to the padded batched matmul, with the same result."""
    from pipeline.model import moe

    calls = []
    real = moe.F.grouped_mm
    monkeypatch.setattr(moe.F, "grouped_mm", lambda *a, **k: calls.append(k["offs"].tolist()) or real(*a, **k))
    torch.manual_seed(0)
    for d, used in ((16, True), (6, False)):
        calls.clear()
        layer = HybridMoE(d, MoEConfig(num_experts=4, top_k=2, expert_hidden=8, dense_hidden=8))
        x = torch.randn(11, d)
        grouped, _ = layer(x, step=10, implementation="grouped")
        torch.testing.assert_close(grouped, layer(x, step=10, implementation="loop")[0])
        assert bool(calls) == used
        if used:  # offsets end where each expert's rows end: every (token, slot) pair exactly once
            assert calls[0] == calls[1] and calls[0][-1] == 11 * 2


def test_grouped_kernel_follows_cpu_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    """autocast does not list grouped_mm, so the kernel casts by hand: under ``cpu_amp`` the experts run in bf16."""
    from pipeline.model import moe

    dtypes = []
    real = moe.F.grouped_mm
    monkeypatch.setattr(moe.F, "grouped_mm", lambda a, b, **k: dtypes.append(a.dtype) or real(a, b, **k))
    torch.manual_seed(0)
    layer = HybridMoE(16, MoEConfig(num_experts=4, top_k=2, expert_hidden=8, dense_hidden=8))
    x = torch.randn(11, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grouped, _ = layer(x, step=10, implementation="grouped")
        loop, _ = layer(x, step=10, implementation="loop")
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    torch.testing.assert_close(grouped.float(), loop.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_moe_expert_dropout(impl: str) -> None:
    """Expert activations are dropped in training only; null takes the dense branch's rate."""
    torch.manual_seed(2)
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden=32, dense_hidden=8, router_input="hidden", warmup_steps=0)
    layer = HybridMoE(8, replace(cfg, expert_dropout=0.5), dropout=0.1)
    assert layer.expert_drop.p == 0.5
    assert HybridMoE(8, replace(cfg, expert_dropout=None), dropout=0.3).expert_drop.p == 0.3
    x = torch.randn(64, 8)
    dense_only = layer.dense.eval()(x)
    layer.eval()
    experts_eval = layer(x, implementation=impl)[0] - dense_only
    reference = layer(x, implementation="loop")[0] - dense_only
    torch.testing.assert_close(experts_eval, reference)  # eval: no dropout, kernels agree
    layer.train()
    layer.dense.eval()  # isolate the expert branch
    experts_train = layer(x, implementation=impl)[0] - dense_only
    assert not torch.allclose(experts_train, experts_eval)
    # inverted dropout keeps the expectation: the mean over many draws approaches the eval output
    mean = torch.stack([layer(x, implementation=impl)[0] - dense_only for _ in range(2000)]).mean(0)
    torch.testing.assert_close(mean, experts_eval, atol=0.1 * experts_eval.abs().max().item(), rtol=0.0)
    with pytest.raises(ValueError, match="expert_dropout"):
        replace(cfg, expert_dropout=1.0).validate()


class FixedUnitMask(torch.nn.Module):
    """Stands in for the expert dropout: the same mask over each expert's h units in every kernel."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, hid: torch.Tensor) -> torch.Tensor:
        h = self.mask.numel()
        assert hid.shape[-1] % h == 0, "expert dropout must act on the experts' hidden units"
        return hid * self.mask.repeat(hid.shape[-1] // h)  # [n, h] (loop, grouped) or [N, E*h] (dense)


def test_moe_kernels_agree_with_a_fixed_expert_mask_in_training() -> None:
    """Dropout sits on the activated hidden units of each expert in all three kernels (GELU: not before it)."""
    torch.manual_seed(3)
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden=16, dense_hidden=8, router_input="hidden", warmup_steps=0)
    layer = HybridMoE(8, replace(cfg, expert_dropout=0.5), activation="gelu").train()
    with torch.no_grad():
        layer.b1.normal_(std=0.5)
    mask = (torch.rand(16) > 0.5).float() * 2.0
    layer.expert_drop = FixedUnitMask(mask)
    x = torch.randn(33, 8)
    outputs = {impl: layer(x, implementation=impl)[0] for impl in IMPLEMENTATIONS}
    for impl in ("dense", "grouped"):
        torch.testing.assert_close(outputs[impl], outputs["loop"])
    layer.expert_drop = torch.nn.Identity()
    assert not torch.allclose(layer(x, implementation="loop")[0], outputs["loop"])  # the mask mattered
    layer.eval()
    probs = layer.gate_probs(x)
    top = probs.topk(2)
    gates = top.values / top.values.sum(-1, keepdim=True)
    expected = layer.dense(x)
    for slot in range(2):
        e = top.indices[:, slot]
        hid = F.gelu(torch.einsum("nd,ndh->nh", x, layer.w1[e]) + layer.b1[e]) * mask
        expected = expected + layer.alpha(0) * gates[:, slot : slot + 1] * (
            torch.einsum("nh,nhd->nd", hid, layer.w2[e]) + layer.b2[e]
        )
    torch.testing.assert_close(outputs["loop"], expected)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_moe_empty_batch(impl: str) -> None:
    layer = HybridMoE(8, MoEConfig(num_experts=4, top_k=2, expert_hidden=4, dense_hidden=8, router_input="hidden"))
    y, aux = layer(torch.zeros(0, 8), step=1000, implementation=impl)
    assert y.shape == (0, 8)
    assert aux.lb.item() == 0.0 and aux.counts.sum().item() == 0


def test_moe_output_is_dense_plus_alpha_weighted_topk() -> None:
    """Spell out y = FFN(x) + alpha * sum_topK g_i f_i(x), gates renormalised over the top-K."""
    torch.manual_seed(1)
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden=8, dense_hidden=8, router_input="hidden", warmup_steps=0)
    layer = HybridMoE(6, cfg).eval()
    x = torch.randn(5, 6)
    y, aux = layer(x, step=0, return_topk=True)
    probs = torch.softmax(x @ layer.router.weight.T, -1)
    alpha = torch.sigmoid(layer.alpha_param)
    for n in range(5):
        top = probs[n].topk(2)
        expected = layer.dense(x[n])
        for p, e in zip(top.values / top.values.sum(), top.indices.tolist(), strict=True):
            f = torch.relu(x[n] @ layer.w1[e] + layer.b1[e]) @ layer.w2[e] + layer.b2[e]
            expected = expected + alpha * p * f
        torch.testing.assert_close(y[n], expected)
        assert sorted(aux.topk_idx[n].tolist()) == sorted(top.indices.tolist())


def test_router_softmax_float32_under_autocast() -> None:
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden=8, dense_hidden=8, router_input="hidden_item")
    layer = HybridMoE(16, cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs = layer.gate_probs(torch.randn(10, 16), torch.randn(10, 16))
        for impl in IMPLEMENTATIONS:
            y, aux = layer(torch.randn(10, 16), torch.randn(10, 16), step=1000, implementation=impl)
            assert aux.lb.dtype == torch.float32 and aux.mean_probs.dtype == torch.float32
    assert probs.dtype == torch.float32


def test_pure_sparse_moe_is_the_gated_expert_sum_alone() -> None:
    """``dense_branch: false`` (the ablation): no dense FFN, no alpha or warm-up, y = sum_topK g_i f_i(x)."""
    torch.manual_seed(0)
    layer = HybridMoE(16, MoEConfig(num_experts=4, top_k=2, expert_hidden=8, dense_branch=False)).eval()
    assert layer.dense is None
    x = torch.randn(10, 16)
    probs = layer.gate_probs(x)
    top_p, top_i = probs.topk(2, dim=-1)
    gates = top_p / top_p.sum(-1, keepdim=True)
    expected = sum(
        gates[:, k : k + 1] * torch.stack([layer._expert(int(e), x[n : n + 1])[0] for n, e in enumerate(top_i[:, k])])
        for k in range(2)
    )
    for impl in IMPLEMENTATIONS:
        y, aux = layer(x, step=0, implementation=impl)  # step 0: a warm-up would still be at 0 here
        torch.testing.assert_close(y, expected)
        assert aux.alpha.item() == 1.0
    model = build_model(small_cfg(dense_branch=False), num_items=20)
    out = model.training_loss(torch.randint(1, 21, (4, 12)), torch.randint(1, 21, (4, 12)))
    out.loss.backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if "alpha_param" not in name)


# ---------------------------------------------------------------- balance loss and warm-up


def test_load_balance_minimal_at_uniform() -> None:
    E, K, N = 4, 2, 8
    uniform = torch.full((N, E), 1.0 / E)
    uniform_top = torch.arange(N * K).view(N, K) % E  # every expert chosen equally often
    skewed = torch.softmax(torch.tensor([3.0, 0.0, 0.0, -1.0]).expand(N, E), -1)
    skewed_top = torch.tensor([[0, 1]]).expand(N, K)
    lb_u, g, counts = load_balance(uniform, uniform_top, "entropy")
    lb_s, _, _ = load_balance(skewed, skewed_top, "entropy")
    assert lb_u.item() == pytest.approx(-math.log(E))
    assert lb_s > lb_u
    torch.testing.assert_close(g, torch.full((E,), 1.0 / E))
    assert counts.tolist() == [4, 4, 4, 4]
    sw_u, _, _ = load_balance(uniform, uniform_top, "switch")
    sw_s, _, _ = load_balance(skewed, skewed_top, "switch")
    assert sw_u.item() == pytest.approx(1.0)
    assert sw_s > sw_u


@pytest.mark.parametrize("router_input", ROUTER_INPUTS)
def test_padding_ignored_by_balance_loss_and_outputs(router_input: str) -> None:
    """Extra left padding, even with non-zero padding/position embeddings, changes neither lb nor any output."""
    torch.manual_seed(0)
    model = HyMoERec(small_cfg(router_input=router_input), num_items=30).eval()
    model.set_train_step(10_000)
    short = torch.tensor([[4, 9, 2, 7], [0, 0, 3, 5]])
    long = torch.cat([torch.zeros(2, 5, dtype=torch.long), short], dim=1)
    h_short, aux_short = model.encode(short)
    with torch.no_grad():  # arbitrary padding contents: if padding reached the router, lb would move
        model.item_emb.weight[0].normal_(std=3.0)
    h_long, aux_long = model.encode(long)
    torch.testing.assert_close(h_long[:, 5:][short > 0], h_short[short > 0])
    for a, b in zip(aux_short, aux_long, strict=True):
        torch.testing.assert_close(a.lb, b.lb)
        torch.testing.assert_close(a.mean_probs, b.mean_probs)
        assert a.counts.tolist() == b.counts.tolist()
        assert a.counts.sum().item() == 6 * 2  # 6 real tokens x top-2
    routes = model.routing(long)
    assert routes is not None and len(routes) == 2
    assert routes[0].shape == (2, 9, 2)
    assert (routes[0][long == 0] == -1).all() and (routes[0][long > 0] >= 0).all()


def test_warmup_schedule() -> None:
    W = 100
    assert warmup_weight(0, W).item() == 0.0
    assert warmup_weight(W, W).item() == 1.0
    assert warmup_weight(5 * W, W).item() == 1.0
    assert warmup_weight(W // 2, W).item() == pytest.approx(0.5)
    assert warmup_weight(W // 2, W, "cosine").item() == pytest.approx(0.5)
    assert warmup_weight(W // 4, W, "cosine").item() < warmup_weight(W // 4, W).item()
    assert warmup_weight(0, W, "cosine").item() == 0.0 and warmup_weight(W, W, "cosine").item() == 1.0
    assert warmup_weight(0, 0).item() == 1.0
    steps = torch.arange(0, 2 * W)
    for schedule in ("linear", "cosine"):
        w = warmup_weight(steps, W, schedule)
        assert (w.diff() >= 0).all()
    with pytest.raises(ValueError):
        warmup_weight(1, W, "step")


def test_alpha_follows_train_step_buffer() -> None:
    model = HyMoERec(small_cfg(warmup_steps=200, alpha_init=1.5), num_items=20)
    ids = random_batch(num_items=20)
    assert model.training_loss(ids, ids).stats["moe/l0/alpha"] == 0.0
    model.set_train_step(50)
    expected = torch.sigmoid(torch.tensor(1.5)).item() * 0.25
    assert model.training_loss(ids, ids).stats["moe/l1/alpha"] == pytest.approx(expected)
    state = model.state_dict()
    assert state["train_step"].item() == 50  # resume restores the warm-up position
    other = HyMoERec(small_cfg(warmup_steps=200, alpha_init=1.5), num_items=20)
    other.load_state_dict(state)
    assert other.blocks[0].ffn.alpha(other.train_step).item() == pytest.approx(expected)


# ---------------------------------------------------------------- structure and interface


def test_moe_disabled_is_plain_sasrec() -> None:
    cfg = small_cfg(moe=False)
    model = build_model(cfg, num_items=40)
    assert isinstance(model, HyMoERec)
    for block in model.blocks:
        assert type(block.ffn) is FeedForward
        assert block.ffn.fc1.out_features == cfg.ffn_hidden
    names = [n for n, _ in model.named_parameters()]
    assert not any(key in n for n in names for key in ("router", "w1", "w2", "alpha", "experts", "dense."))
    out = model.training_loss(random_batch(num_items=40), random_batch(num_items=40, seed=1))
    assert out.lb.item() == 0.0 and out.stats == {}
    assert model.routing(random_batch(num_items=40)) is None
    # fair ablation: the MoE model's dense branch has the same size as SASRec's FFN
    moe = build_model(small_cfg(), num_items=40)
    assert moe.blocks[0].ffn.dense.fc1.out_features == cfg.ffn_hidden


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("moe", [True, False])
def test_score_next(kind: str, moe: bool) -> None:
    model = build_model(small_cfg(kind, moe=moe), num_items=25).eval()
    ids = random_batch(num_items=25)
    scores = model.score_next(ids)
    assert scores.shape == (4, 26) and scores.dtype == torch.float32
    assert torch.isneginf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()


@pytest.mark.parametrize(
    "kind,moe,router_input",
    [("hymoerec", True, r) for r in ROUTER_INPUTS] + [(k, False, "hidden") for k in CAUSAL_KINDS],
)
def test_causality(kind: str, moe: bool, router_input: str) -> None:
    torch.manual_seed(0)
    model = build_model(small_cfg(kind, moe=moe, router_input=router_input), num_items=50).eval()
    model.set_train_step(10_000)
    ids = random_batch(num_items=50)
    h, _ = model.encode(ids)
    for t in (3, 7, 10):
        changed = ids.clone()
        future = torch.randint(1, 51, changed[:, t + 1 :].shape)
        changed[:, t + 1 :] = torch.where(ids[:, t + 1 :] > 0, future, 0)  # same padding, different items
        h2, _ = model.encode(changed)
        torch.testing.assert_close(h2[:, : t + 1], h[:, : t + 1])
        assert not torch.allclose(h2[:, t + 1 :], h[:, t + 1 :])
        if moe:
            for r1, r2 in zip(model.routing(ids), model.routing(changed), strict=True):
                assert torch.equal(r1[:, : t + 1], r2[:, : t + 1])


@pytest.mark.parametrize("kind", RECURRENT_KINDS)
def test_recurrent_models_ignore_leading_padding(kind: str) -> None:
    model = build_model(small_cfg(kind), num_items=20).eval()
    short = torch.tensor([[3, 4, 5]])
    long = torch.tensor([[0, 0, 0, 0, 3, 4, 5]])
    torch.testing.assert_close(model.encode(long)[0][:, 4:], model.encode(short)[0])
    torch.testing.assert_close(model.score_next(long), model.score_next(short))
    assert model.encode(long)[0][:, :4].abs().sum() == 0  # padding rows are zero


@pytest.mark.parametrize("training", [False, True])
def test_narm_matches_its_formulas_at_every_position(training: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Global + unnormalised local attention over h_j (j <= t), concatenated, through the bilinear decoder; in
    chunks of 5 positions (so several chunks run), recomputed in the backward pass when training."""
    from pipeline.model import narm

    monkeypatch.setattr(narm, "QUERY_CHUNK", 5)
    torch.manual_seed(0)
    model = build_model(without_dropout(small_cfg("narm")), num_items=30).train(training)
    ids = random_batch(num_items=30)
    hidden, _ = model.encode(ids)
    if training:
        hidden.sum().backward()
        assert model.a1.weight.grad.abs().sum() > 0
    for b in range(len(ids)):
        real = (ids[b] > 0).nonzero().squeeze(1)
        if not len(real):
            continue
        states, _ = model.gru(model.item_emb(ids[b, real]).unsqueeze(0))
        states = states[0]
        for i, t in enumerate(real.tolist()):
            weights = model.v(torch.sigmoid(model.a1(states[i]) + model.a2(states[: i + 1]))).squeeze(-1)
            context = torch.cat([states[i], weights @ states[: i + 1]])
            torch.testing.assert_close(hidden[b, t], model.decoder(context), atol=1e-5, rtol=1e-5)


def test_narm_ranks_from_the_last_position_alone_as_from_the_whole_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """``score_next`` skips the local attention of every earlier position: same scores as the last row of
    ``encode``, history bias included."""
    from pipeline.model import narm

    monkeypatch.setattr(narm, "QUERY_CHUNK", 5)
    torch.manual_seed(0)
    model = build_model(without_dropout(small_cfg("narm")), num_items=30).eval()
    with torch.no_grad():
        model.history_bias.fill_(0.7)
        ids = random_batch(num_items=30)
        hidden, _ = model.encode(ids)
        expected = model.bias_history(score_items(hidden[:, -1], model.item_emb.weight, 30), ids)
        torch.testing.assert_close(model.score_next(ids), expected)


@pytest.mark.parametrize(
    "kind,moe,router_input,dense_branch",
    [
        ("hymoerec", False, "hidden", True),
        *(("hymoerec", True, r, True) for r in ROUTER_INPUTS),
        ("hymoerec", True, "hidden", False),
        ("bert4rec", False, "hidden", True),
        ("bert4rec", True, "hidden_item_user", True),
    ],
)
def test_transformers_rank_from_the_top_blocks_last_position_alone(
    kind: str, moe: bool, router_input: str, dense_branch: bool
) -> None:
    """Ranking runs the top block's attention and FFN for the last position only: the same hidden state and scores
    as the last row of the full ``encode`` (rows of every length, an empty one included; each routing kernel)."""
    torch.manual_seed(0)
    cfg = without_dropout(small_cfg(kind, moe, router_input=router_input, dense_branch=dense_branch))
    model = build_model(cfg, num_items=50).eval()
    ids = random_batch(B=4, L=12)
    with torch.no_grad():
        for impl in IMPLEMENTATIONS if moe else ("auto",):
            cfg.moe.implementation = impl  # the config every HybridMoE of the model reads
            torch.testing.assert_close(model.encode_last(ids), model.encode(ids)[0][:, -1], atol=1e-6, rtol=1e-5)
        if kind == "hymoerec":
            expected = model.bias_history(score_items(model.encode(ids)[0][:, -1], model.item_emb.weight, 50), ids)
            torch.testing.assert_close(model.score_next(ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [1, 5, 16, 37])
def test_parallel_scan_matches_the_sequential_reference(length: int) -> None:
    """Forward and gradients of the parallel (mambapy) scan equal the step-by-step recurrence (float64)."""
    g = torch.Generator().manual_seed(length)
    b, d, n = 3, 6, 4
    inputs = {
        "u": torch.randn(b, length, d, generator=g, dtype=torch.float64),
        "delta": torch.rand(b, length, d, generator=g, dtype=torch.float64),
        "A": -torch.rand(d, n, generator=g, dtype=torch.float64) * 3,
        "B": torch.randn(b, length, n, generator=g, dtype=torch.float64),
        "C": torch.randn(b, length, n, generator=g, dtype=torch.float64),
        "D": torch.randn(d, generator=g, dtype=torch.float64),
    }
    results = {}
    for kernel in ("parallel", "sequential"):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        y = selective_scan(*leaves.values(), kernel=kernel)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        results[kernel] = (y, {k: torch.zeros_like(v) if v.grad is None else v.grad for k, v in leaves.items()})
    torch.testing.assert_close(results["parallel"][0], results["sequential"][0])
    for name, grad in results["parallel"][1].items():
        torch.testing.assert_close(grad, results["sequential"][1][name], msg=name)


def test_selective_scan_is_the_recurrence() -> None:
    """The sequential kernel itself against the formula, one position by hand."""
    u, delta = torch.tensor([[[1.0], [2.0]]]), torch.tensor([[[0.5], [0.25]]])
    A, B, C, D = torch.tensor([[-2.0]]), torch.tensor([[[3.0], [1.0]]]), torch.tensor([[[1.0], [2.0]]]), torch.ones(1)
    y = selective_scan(u, delta, A, B, C, D, kernel="sequential")
    h1 = 0.5 * 3.0 * 1.0
    h2 = math.exp(0.25 * -2.0) * h1 + 0.25 * 1.0 * 2.0
    torch.testing.assert_close(y, torch.tensor([[[h1 + 1.0], [2.0 * h2 + 2.0]]]))


def test_inference_scan_in_chunks_of_users_gives_the_whole_batch_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without gradients the scan runs a few users at a time (memory); the result is the one-batch scan's."""
    g = torch.Generator().manual_seed(7)
    b, length, d, n = 7, 13, 6, 4
    u, delta = torch.randn(b, length, d, generator=g), torch.rand(b, length, d, generator=g)
    A, D = -torch.rand(d, n, generator=g) * 3, torch.randn(d, generator=g)
    B, C = torch.randn(b, length, n, generator=g), torch.randn(b, length, n, generator=g)
    whole = selective_scan(u, delta, A, B, C, D, kernel="parallel")  # grad mode: one batch
    monkeypatch.setattr(mamba4rec, "INFERENCE_SCAN_BYTES", 3 * 16 * d * n * 4)  # 3 users per chunk (L pads to 16)
    assert mamba4rec._rows_per_chunk(length, A) == 3
    with torch.no_grad():
        chunked = selective_scan(u, delta, A, B, C, D, kernel="parallel")
    torch.testing.assert_close(chunked, whole)


@pytest.mark.parametrize("kernel", ["parallel", "sequential"])
def test_mamba4rec_kernels_give_the_same_model(kernel: str) -> None:
    torch.manual_seed(0)
    reference_cfg = small_cfg("mamba4rec")
    reference_cfg.mamba.scan = "sequential"
    reference = build_model(reference_cfg, num_items=30).eval()
    cfg = small_cfg("mamba4rec")
    cfg.mamba.scan = kernel
    model = build_model(cfg, num_items=30).eval()
    model.load_state_dict(reference.state_dict())
    ids = random_batch(num_items=30)
    torch.testing.assert_close(model.score_next(ids), reference.score_next(ids), atol=1e-5, rtol=1e-5)


def test_mamba_block_is_wired_as_mamba() -> None:
    """Same weights, same output as mambapy's reference Mamba block (same parameter names as mamba_ssm.Mamba)."""
    from mambapy.mamba import MambaBlock as ReferenceBlock
    from mambapy.mamba import MambaConfig as ReferenceConfig

    from pipeline.model.mamba4rec import MambaBlock

    torch.manual_seed(0)
    block = MambaBlock(32, MambaConfig(d_state=8, scan="sequential"))
    reference = ReferenceBlock(ReferenceConfig(d_model=32, n_layers=1, d_state=8, expand_factor=2, d_conv=4))
    reference.load_state_dict(block.state_dict())
    x = torch.randn(3, 11, 32)
    torch.testing.assert_close(block(x), reference(x), atol=1e-5, rtol=1e-4)


def test_single_mamba_layer_is_causal_and_padding_free() -> None:
    """Mamba4Rec's default (one layer, no residual around it) keeps both properties."""
    cfg = small_cfg("mamba4rec")
    cfg.mamba.num_layers = 1
    model = build_model(cfg, num_items=20).eval()
    ids = torch.tensor([[0, 0, 3, 4, 5, 6]])
    later = torch.tensor([[0, 0, 3, 4, 9, 9]])
    torch.testing.assert_close(model.encode(ids)[0][:, :4], model.encode(later)[0][:, :4])
    torch.testing.assert_close(model.score_next(ids[:, 2:]), model.score_next(ids))


@pytest.mark.skipif(not (torch.cuda.is_available() and fused_scan_available()), reason="needs CUDA and mamba-ssm")
def test_fused_cuda_scan_matches_the_parallel_scan() -> None:
    """Values and gradients of mamba-ssm's kernel against the parallel scan (fast-math build: 1e-4 tolerance)."""
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(2, 50, 16, generator=g), torch.rand(2, 50, 16, generator=g), -torch.rand(16, 8, generator=g)]
    args += [torch.randn(2, 50, 8, generator=g), torch.randn(2, 50, 8, generator=g), torch.randn(16, generator=g)]
    results = {}
    for kernel, device in (("fused", "cuda"), ("parallel", "cpu")):
        leaves = [a.to(device).requires_grad_() for a in args]
        y = selective_scan(*leaves, kernel=kernel)
        (y * torch.linspace(-1, 1, y.numel(), device=device).view_as(y)).sum().backward()
        results[kernel] = [y.detach().cpu(), *(leaf.grad.cpu() for leaf in leaves)]
    for fused, parallel in zip(results["fused"], results["parallel"], strict=True):
        torch.testing.assert_close(fused, parallel, atol=1e-4, rtol=1e-4)


def test_bert4rec_masking_reproducible_and_uses_last_target() -> None:
    cfg = small_cfg("bert4rec", moe=False)
    cfg.dropout = cfg.attn_dropout = 0.0  # dropout draws from the global RNG; the cloze mask from `generator`
    model = BERT4Rec(cfg, num_items=20)
    ids = random_batch(num_items=20)
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = 7
    losses = [model.training_loss(ids, targets, generator=torch.Generator().manual_seed(3)).loss for _ in range(2)]
    assert losses[0].item() == losses[1].item()
    assert losses[0].item() == pytest.approx(math.log(20), abs=0.25)  # untrained: about uniform over 20 items
    seq, masked = model.cloze(ids, targets, torch.Generator().manual_seed(3))
    torch.testing.assert_close(seq[:, :-1], ids[:, 1:])  # window slides by one to take in the last target
    assert (seq[:, -1] == 7).all()
    assert not masked[seq == 0].any()  # padding is never a cloze target
    assert masked.any(1).all()  # every non-empty sequence predicts something
    ids[:, -1] = 3
    seq, _ = model.cloze(ids, torch.zeros_like(ids))  # no last target: the input is the whole sequence
    assert torch.equal(seq, ids)
    assert model.item_emb.num_embeddings == 22 and model.mask_id == 21


@pytest.mark.parametrize("kind", KINDS)
def test_sampled_softmax_runs(kind: str) -> None:
    model = build_model(small_cfg(kind), num_items=30)
    ids = random_batch(num_items=30)
    targets = torch.where(ids > 0, torch.roll(ids, -1, 1).clamp_min(1), 0)
    out = model.training_loss(ids, targets, num_negatives=16, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert out.ce.item() == pytest.approx(math.log(17), abs=0.25)  # untrained: about uniform over target + 16
    assert model.item_emb.weight.grad[1:].abs().sum() > 0


def test_sampled_softmax_never_counts_the_target_as_negative() -> None:
    hidden = torch.randn(5, 8)
    weight = torch.randn(3, 8)  # items 1..2
    # one real item: every negative equals the target, so all of them are masked and the loss is exactly 0
    ce = next_item_ce(hidden, torch.ones(5, dtype=torch.long), weight[:2], 1, num_negatives=10)
    assert ce.item() == 0.0
    # two items: only the other item may count; compare with a hand-written loss
    gen = torch.Generator().manual_seed(0)
    targets = torch.tensor([1, 2, 1, 2, 2])
    ce = next_item_ce(hidden, targets, weight, 2, num_negatives=6, generator=gen)
    negatives = torch.randint(1, 3, (6,), generator=torch.Generator().manual_seed(0))
    expected = []
    for h, t in zip(hidden, targets.tolist(), strict=True):
        others = [n for n in negatives.tolist() if n != t]
        logits = torch.stack([h @ weight[t]] + [h @ weight[n] for n in others])
        expected.append(-torch.log_softmax(logits, 0)[0])
    torch.testing.assert_close(ce, torch.stack(expected).mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_softmax_matches_cross_entropy_and_excludes_padding(dtype: torch.dtype) -> None:
    """The in-place full-catalogue CE equals F.cross_entropy over items 1..n (values and gradients)."""
    hidden = torch.randn(4, 8, dtype=dtype, requires_grad=True)
    weight = torch.randn(6, 8, dtype=dtype, requires_grad=True)
    targets = torch.tensor([1, 5, 3, 5])
    ce = next_item_ce(hidden * 3, targets, weight, 5)  # *3: peaked softmax, stresses the stable lse
    grads = torch.autograd.grad(ce, (hidden, weight))
    expected = torch.nn.functional.cross_entropy((hidden * 3) @ weight[1:].T, targets - 1)
    expected_grads = torch.autograd.grad(expected, (hidden, weight))
    torch.testing.assert_close(ce, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want)
    assert grads[1][0].abs().sum() == 0  # padding row gets no gradient


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_model_trains_under_bf16_autocast(impl: str) -> None:
    model = HyMoERec(small_cfg(implementation=impl, router_input="hidden_item_user"), num_items=30)
    model.set_train_step(1000)
    ids = random_batch(num_items=30)
    torch.manual_seed(0)
    full = model.training_loss(ids, torch.where(ids > 0, 1, 0)).loss.item()
    torch.manual_seed(0)  # the same dropout masks
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.training_loss(ids, torch.where(ids > 0, 1, 0))
    out.loss.backward()
    assert out.lb.dtype == torch.float32 and out.loss.item() == pytest.approx(full, rel=0.02)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.blocks[0].ffn.parameters())


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="top_k"):
        ModelConfig(moe=MoEConfig(num_experts=2, top_k=3)).validate()
    with pytest.raises(ValueError, match="kind"):
        ModelConfig(kind="transformer").validate()
    with pytest.raises(ValueError, match="router_input"):
        ModelConfig(moe=MoEConfig(router_input="user")).validate()
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig(hidden_size=30, num_heads=4).validate()
    ModelConfig(kind="gru4rec", moe=MoEConfig(top_k=99)).validate()  # GRU4Rec ignores the MoE section
    for kind in ("narm", "mamba4rec"):
        assert not ModelConfig(kind=kind).uses_moe  # no FFN to replace: never "MoE on" in logs or tags
        ModelConfig(kind=kind, hidden_size=30, num_heads=4).validate()  # no attention heads either
    with pytest.raises(ValueError, match="narm.context_dropout"):
        ModelConfig(kind="narm", narm=NARMConfig(context_dropout=1.0)).validate()
    with pytest.raises(ValueError, match="mamba.scan"):
        ModelConfig(kind="mamba4rec", mamba=MambaConfig(scan="cuda")).validate()


def test_param_groups_cover_every_parameter_once() -> None:
    model = build_model(small_cfg(), num_items=20)
    groups = model.param_groups(0.1, 1e-3)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    no_decay = {id(p) for p in groups[1]["params"]}
    ffn = model.blocks[0].ffn
    assert {id(ffn.b1), id(ffn.b2), id(ffn.alpha_param)} <= no_decay and id(ffn.w1) not in no_decay
    # by shape: every decayed tensor is a matrix or more, every vector and scalar is exempt
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.1
    assert {id(p) for p in model.parameters() if p.dim() < 2 and p is not model.history_bias} <= no_decay
    assert id(model.item_emb.weight) not in no_decay
    copied = copy.deepcopy(model)  # the exemptions belong to the module classes: a copy keeps them
    assert {id(copied.blocks[0].ffn.b1), id(copied.blocks[0].ffn.b2)} <= {
        id(p) for p in copied.param_groups(0.1, 1e-3)[1]["params"]
    }
    biased = build_model(replace(small_cfg(), history_bias=True), num_items=20)
    groups = biased.param_groups(0.1, 1e-3)
    assert sum(len(g["params"]) for g in groups) == len(list(biased.parameters()))
    assert groups[-1]["params"] == [biased.history_bias]
    assert groups[-1]["lr"] == pytest.approx(1e-2) and groups[-1]["weight_decay"] == 0.0
    mamba = build_model(small_cfg("mamba4rec"), num_items=20)
    decayed = {id(p) for p in mamba.param_groups(0.1, 1e-3)[0]["params"]}
    block = mamba.layers[0].mamba
    assert id(block.A_log) not in decayed and id(block.D) not in decayed and id(block.in_proj.weight) in decayed


# ---------------------------------------------------------------- tiny training runs


def chain_data(num_users: int = 200, num_items: int = 100, length: int = 13) -> torch.Tensor:
    """Deterministic chains: item i is always followed by item i % num_items + 1; random starts and lengths."""
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, num_items, (num_users, 1), generator=g)
    seqs = (starts + torch.arange(length)) % num_items + 1
    lengths = torch.randint(3, length + 1, (num_users,), generator=g)
    return torch.where(torch.arange(length) >= length - lengths.unsqueeze(1), seqs, 0)


@pytest.mark.parametrize("kind,moe", [("hymoerec", True), *((k, False) for k in KINDS)])
def test_short_training_lowers_loss(kind: str, moe: bool) -> None:
    torch.manual_seed(0)
    seqs = chain_data()
    inputs, targets = seqs[:, :-1], torch.where(seqs[:, :-1] > 0, seqs[:, 1:], 0)
    cfg = without_dropout(small_cfg(kind, moe=moe, warmup_steps=20, router_input="hidden_item_user"))
    model = build_model(cfg, num_items=100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(150):
        model.set_train_step(step)
        rows = torch.randint(0, len(seqs), (64,), generator=gen)
        out = model.training_loss(inputs[rows], targets[rows], generator=gen)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.ce.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 4.0  # ~log(100) at init
    assert last < 0.5 * first, (first, last)
    if kind != "bert4rec":  # the chain rule is learnt: the next item ranks first for most users
        model.eval()
        hits = (model.score_next(inputs).argmax(1) == seqs[:, -1]).float().mean().item()
        assert hits > 0.5, hits


# ---------------------------------------------------------------- history bias


def history_reference_logits(model, ids: torch.Tensor, rows: list[tuple[int, int]]) -> torch.Tensor:
    """Hand-built logits: h_t . e_i plus the bias once for every item among positions <= t (padding excluded)."""
    hidden, _ = model.encode(ids)
    table = model.item_emb.weight[1 : model.num_items + 1]
    logits = []
    for b, t in rows:
        seen = torch.zeros(model.num_items)
        for item in set(ids[b, : t + 1].tolist()) - {0}:
            seen[item - 1] = 1.0
        logits.append(hidden[b, t] @ table.T + model.history_bias * seen)
    return torch.stack(logits)


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
@pytest.mark.parametrize("num_negatives", [0, 6])
def test_history_bias_loss_matches_reference(kind: str, num_negatives: int) -> None:
    """Full and sampled softmax: the bias counts each seen item once, only from the past, with exact gradients."""
    torch.manual_seed(0)
    cfg = without_dropout(small_cfg(kind))
    cfg.history_bias = True
    num_items = 8  # a small catalogue makes repeats within a history likely
    model = build_model(cfg, num_items=num_items).eval()
    model.set_train_step(10_000)
    with torch.no_grad():
        model.history_bias.fill_(-1.5)
    ids = random_batch(num_items=num_items)
    targets = torch.where(ids > 0, torch.roll(ids, -1, 1), 0)
    targets[:, -1] = torch.where(ids[:, -1] > 0, 3, 0)
    out = model.training_loss(ids, targets, num_negatives=num_negatives, generator=torch.Generator().manual_seed(0))
    rows = [(b, t) for b, t in (targets > 0).nonzero().tolist()]
    logits = history_reference_logits(model, ids, rows)
    wanted = torch.tensor([targets[b, t].item() - 1 for b, t in rows])
    if num_negatives:
        negatives = torch.randint(1, num_items + 1, (num_negatives,), generator=torch.Generator().manual_seed(0)) - 1
        neg = logits[:, negatives].masked_fill(negatives.unsqueeze(0) == wanted.unsqueeze(1), -math.inf)
        logits, wanted = torch.cat([logits.gather(1, wanted.unsqueeze(1)), neg], 1), torch.zeros_like(wanted)
    expected = F.cross_entropy(logits, wanted)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.ce, params, allow_unused=True)
    expected_grads = torch.autograd.grad(expected, params, allow_unused=True)
    torch.testing.assert_close(out.ce, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        if want is None:
            assert got is None or got.abs().sum() == 0
        else:
            torch.testing.assert_close(got, want)
    assert grads[params.index(model.history_bias)].abs() > 0


@pytest.mark.parametrize("kind", CAUSAL_KINDS)
def test_history_bias_scores_match_training_logits(kind: str) -> None:
    """score_next adds b to exactly the items of the window the model sees, as the training logits do."""
    cfg = small_cfg(kind)
    model = build_model(cfg, num_items=25).eval()
    biased = build_model(replace(cfg, history_bias=True), num_items=25).eval()
    biased.load_state_dict({**model.state_dict(), "history_bias": torch.tensor(-2.0)})
    ids = random_batch(num_items=25)
    wide = torch.cat([torch.randint(1, 26, (len(ids), 5)), ids], dim=1)  # 5 older items outside the window of 12
    for inputs in (ids, wide):
        diff = biased.score_next(inputs) - model.score_next(inputs)
        for b in range(len(ids)):
            seen = set(ids[b].tolist()) - {0}
            for item in range(1, 26):
                assert diff[b, item].item() == pytest.approx(-2.0 if item in seen else 0.0, abs=1e-5)
    last = [(b, ids.shape[1] - 1) for b in range(len(ids))]
    torch.testing.assert_close(biased.score_next(ids)[:, 1:], history_reference_logits(biased, ids, last))
    assert torch.isneginf(biased.score_next(ids)[:, 0]).all()


def test_history_bias_is_on_by_default_and_causal_only() -> None:
    assert "history_bias" in dict(build_model(ModelConfig(), num_items=25).named_parameters())
    assert "history_bias" not in dict(build_model(replace(small_cfg(), history_bias=False), 25).named_parameters())
    bert = build_model(ModelConfig(kind="bert4rec", history_bias=True), num_items=25)  # sees the future: ignored
    assert "history_bias" not in dict(bert.named_parameters())


@pytest.mark.parametrize("repeats", [False, True])
def test_history_bias_learns_the_sign_of_repeats(repeats: bool) -> None:
    """Histories without repeats drive the bias down; histories whose next item is a recent one drive it up."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cfg = small_cfg()
    cfg.history_bias = True
    model = build_model(cfg, num_items=60)
    opt = torch.optim.Adam(model.param_groups(0.0, 1e-2))  # the offset's own, 10x larger learning rate
    for step in range(40):
        seqs = torch.stack([torch.randperm(60, generator=g)[:13] + 1 for _ in range(32)])
        if repeats:
            seqs[:, 2:] = seqs[:, [0, 1] * 6][:, :11]  # a, b, a, b, ...: the next item is the one two steps back
        model.set_train_step(step)
        out = model.training_loss(seqs[:, :-1], seqs[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    offset = model.history_bias.item()
    assert (offset > 1.0) if repeats else (offset < -1.0), offset


def test_models_deepcopy_and_state_dict_roundtrip() -> None:
    model = build_model(small_cfg(), num_items=20).eval()
    clone = copy.deepcopy(model)
    ids = random_batch(num_items=20)
    torch.testing.assert_close(model.score_next(ids), clone.score_next(ids))
    assert "train_step" in model.state_dict()


def test_scores_stay_float32_under_bf16_autocast() -> None:
    """bf16 scores would turn near-equal items into exact ties and bias the tie-aware metrics."""
    from pipeline.model.base import score_items

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 16, generator=generator)
    table = torch.randn(51, 16, generator=generator)
    plain = score_items(hidden, table, 50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = score_items(hidden, table, 50)
    assert autocast.dtype == torch.float32
    assert torch.equal(plain, autocast)


# ---------------------------------------------------------------- evaluation batching and dropout


@pytest.mark.parametrize("kind", KINDS)
def test_ranking_by_length_in_trimmed_chunks_equals_full_width_scoring(kind: str) -> None:
    """rank_split sorts users by history length and cuts each chunk to its longest history; the per-user results
    are those of scoring every user alone at the full window, in the split's order."""
    import numpy as np

    from pipeline.data.sequences import EvalSplit, gather_windows
    from pipeline.evaluation.metrics import full_ranking_metrics, metric_names
    from pipeline.evaluation.ranking import rank_split

    torch.manual_seed(0)
    model = build_model(small_cfg(kind), num_items=30).eval()
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 20, size=23)  # some longer than the window of 12
    values = rng.integers(1, 31, size=int(lengths.sum())).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    inputs = gather_windows(values, offsets[:-1], offsets[1:], 12)
    split = EvalSplit(np.arange(23, dtype=np.int32), inputs, rng.integers(1, 31, size=23), offsets, values)
    got = rank_split(model, split, ks=(5, 10), exclude_seen=False, batch_size=4, device=torch.device("cpu"))
    for row in range(len(split)):
        alone = full_ranking_metrics(
            lambda b: model.score_next(b.inputs),
            [EvalBatch(torch.tensor(split.targets[row : row + 1]), inputs=torch.from_numpy(inputs[row : row + 1]))],
            30,
            (5, 10),
            exclude_seen=False,
        )
        for name in metric_names((5, 10)):
            assert got[name][row] == pytest.approx(alone[name][0], abs=1e-12), (name, row)
    seen = rank_split(model, split, ks=(10,), exclude_seen=True, batch_size=5, device=torch.device("cpu"))
    assert all(seen["hr@10"] >= got["hr@10"] - 1e-12)  # dropping seen items only lifts the target


def test_dropout_keeps_the_expected_share_and_scales() -> None:
    from pipeline.model.dropout import Dropout

    drop = Dropout(0.3)
    x = torch.ones(200_000, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.7, abs=0.01)
    assert torch.allclose(y[kept], torch.tensor(1 / 0.7))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient passes the same mask and scale
    assert torch.equal(drop.eval()(x), x) and torch.equal(Dropout(0.0)(x), x)


def test_build_model_imports_only_the_kind_it_builds() -> None:
    """Without mambapy (the lent GPU's image) every other kind still builds; Mamba4Rec says what is missing."""
    script = """
import importlib.abc, sys
class NoMambapy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "mambapy":
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NoMambapy())
from pipeline.model import ModelConfig, build_model
for kind in ("hymoerec", "gru4rec", "bert4rec", "narm"):
    assert build_model(ModelConfig(kind=kind, max_seq_len=8), 20).num_items == 20
try:
    build_model(ModelConfig(kind="mamba4rec", max_seq_len=8), 20)
except ModuleNotFoundError as err:
    print("mamba4rec:", err)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "mamba4rec: No module named 'mambapy'"
