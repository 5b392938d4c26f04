"""Train and evaluate stages end to end on tiny synthetic data: learning, leakage, exact resume, reports."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.data.layout import PreprocessOutputs
from pipeline.data.sequences import training_sequences
from pipeline.device import autocast_dtype
from pipeline.evaluation.evaluate import evaluate, length_buckets, popularity_buckets
from pipeline.model.train_log import read_log
from pipeline.params import load_params
from pipeline.training.train import Trainer, TrainOutputs, train
from tests.conftest import REPO_ROOT, prepared, tiny_overrides


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    prepared(root)
    return root


def test_training_windows_hold_only_training_events(data_root: Path) -> None:
    """No valid/test leakage: every training window is a contiguous slice of the user's training sequence."""
    splits = PreprocessOutputs.under(data_root / "processed")
    train_table = pq.read_table(splits.train)
    valid = pq.read_table(splits.valid).to_pydict()
    test = pq.read_table(splits.test).to_pydict()
    train_rows = dict(zip(train_table["user_id"].to_pylist(), train_table["item_ids"].to_pylist(), strict=True))
    for windows in ("last", "all"):
        seqs = training_sequences(train_table, max_seq_len=5, windows=windows)
        for x, y in zip(seqs.inputs, seqs.targets, strict=True):
            window = tuple(int(v) for v in x if v) + (int(y[-1]),)
            assert any(_is_slice(window, seq) for seq in train_rows.values())
    # valid history is exactly the training sequence; test history adds only the valid target
    valid_target = dict(zip(valid["user_id"], valid["target"], strict=True))
    for user, history in zip(valid["user_id"], valid["history"], strict=True):
        assert history == train_rows[user]
    for user, history in zip(test["user_id"], test["history"], strict=True):
        assert history == train_rows[user] + [valid_target[user]]


def _is_slice(items: tuple[int, ...], seq: list[int]) -> bool:
    n = len(items)
    return any(tuple(seq[i : i + n]) == items for i in range(len(seq) - n + 1))


def test_all_windows_cover_every_training_transition(data_root: Path) -> None:
    train_table = pq.read_table(PreprocessOutputs.under(data_root / "processed").train)
    seqs = training_sequences(train_table, max_seq_len=4, windows="all")
    expected = sum(max(len(s) - 1, 0) for s in train_table["item_ids"].to_pylist())
    assert int((seqs.targets > 0).sum()) == expected
    last = training_sequences(train_table, max_seq_len=4, windows="last")
    assert int((last.targets > 0).sum()) < expected


@pytest.mark.parametrize(
    "kind,moe,history_bias",
    [
        ("hymoerec", True, False),
        ("hymoerec", False, True),
        ("gru4rec", False, True),
        ("bert4rec", False, False),
        ("narm", False, False),
        ("mamba4rec", False, True),
    ],
)
def test_train_and_evaluate_stage(tmp_path: Path, data_root: Path, kind: str, moe: bool, history_bias: bool) -> None:
    params = load_params(
        REPO_ROOT / "params.yaml",
        tiny_overrides(
            data_root,
            **{
                "model.kind": kind,
                "model.moe.enabled": moe,
                "model.history_bias": history_bias,
                "train.epochs": 6,
                "train.patience": 6,
                "train.model_dir": str(tmp_path / "models"),
                "evaluate.report_dir": str(tmp_path / "reports"),
            },
        ),
    )
    result = train(params)
    outputs = result.outputs
    log = read_log(outputs.log)
    assert [int(r["epoch"]) for r in log] == list(range(1, 7))
    assert result.epochs_run == 6  # the returned result is what the log holds
    assert [r["valid_ndcg@10"] for r in result.history] == [r["valid_ndcg@10"] for r in log]
    assert float(log[-1]["ce_loss"]) < float(log[0]["ce_loss"])  # it learns
    if moe:
        assert float(log[-1]["lb_loss"]) != 0.0 and 0.0 < float(log[-1]["usage_entropy"]) <= 1.0
    # the learned offset is logged each epoch; it moved from its initial 0 and stayed finite (nan when off)
    offset = log[-1]["history_bias"]
    assert (0.0 < abs(offset) < 100.0) if history_bias else math.isnan(offset)
    config = json.loads(outputs.config.read_text())
    best = max(float(r["valid_ndcg@10"]) for r in log)
    assert config["best_valid_ndcg@10"] == pytest.approx(best)  # selection on validation only
    assert result.best_valid_ndcg10 == config["best_valid_ndcg@10"] and result.best_epoch == config["best_epoch"]

    evaluated = evaluate(params)
    reports = evaluated.outputs
    metrics = json.loads(reports.metrics.read_text())
    assert evaluated.metrics == metrics
    assert metrics["valid"]["ndcg@10"] == pytest.approx(best, abs=1e-9)  # same protocol in train and evaluate
    assert metrics["protocol"]["exclude_seen"] is False
    assert 0.0 <= metrics["test"]["ndcg@10"] <= metrics["test"]["hr@10"] <= metrics["test"]["hr@20"] <= 1.0
    users = sum(b["users"] for b in metrics["test_by_history_length"].values())
    assert users == metrics["protocol"]["test_users"]
    assert sum(b["users"] for b in metrics["test_by_target_popularity"].values()) == users
    load = json.loads(reports.expert_load.read_text())
    if moe:
        shares = np.asarray(load["by_history_length"])
        assert shares.shape == (1, 3, 4) and np.allclose(shares.sum(-1), 1.0)
        check_routing_information(params, load["information"])
    else:
        assert load["layers"] == 0
    for png in (reports.curves_png, reports.buckets_png, reports.experts_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    per_user = pq.read_table(reports.per_user)
    assert per_user.num_rows == users
    assert np.mean(per_user["ndcg@10"].to_numpy()) == pytest.approx(metrics["test"]["ndcg@10"])


def check_routing_information(params: Any, information: dict[str, Any]) -> None:
    """Every real test token's K experts are counted once under its target's popularity bucket and (synthetic data)
    under its user's generated kind; the mutual information lies between 0 and the label's entropy."""
    from pipeline.data.sequences import eval_split
    from pipeline.data.synthetic import SEGMENTS, SyntheticConfig, generate_interactions

    splits = PreprocessOutputs.under(params.preprocess.processed_dir)
    test = eval_split(pq.read_table(splits.test), params.model.max_seq_len)
    tokens_per_user = (test.inputs > 0).sum(1)
    _, users = generate_interactions(SyntheticConfig(**vars(params.data.synthetic)))
    segment = dict(zip(users["user_id"].to_pylist(), users["segment"].to_pylist(), strict=True))
    raw = pq.read_table(splits.user_map).to_pydict()
    raw_of = dict(zip(raw["user_id"], raw["raw_user_id"], strict=True))
    K = params.model.moe.top_k
    expected = [K * int(tokens_per_user[[segment[raw_of[u]] == s for u in test.users]].sum()) for s in SEGMENTS]
    kind = information["user_kind"]
    assert np.asarray(kind["counts"])[0].sum(1).tolist() == expected
    target = np.asarray(information["target_popularity"]["counts"])
    assert target.shape == (1, 3, 4) and target.sum() == K * tokens_per_user.sum()
    for table in (kind, information["target_popularity"]):
        assert all(0.0 <= mi <= table["label_entropy_bits"] + 1e-9 for mi in table["mi_bits"])


def test_mutual_information_of_a_routing_table() -> None:
    """0 bits when the experts ignore the label, H(label) when they reveal it, in between otherwise."""
    from pipeline.evaluation.evaluate import entropy_bits, mutual_information_bits

    assert mutual_information_bits(np.outer([1, 3], [2, 5, 1])) == pytest.approx(0.0, abs=1e-12)
    revealing = np.array([[8, 0, 0, 0], [0, 0, 2, 2]])
    label_entropy = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert entropy_bits(revealing.sum(1)) == pytest.approx(label_entropy)
    assert mutual_information_bits(revealing) == pytest.approx(label_entropy)
    assert 0.0 < mutual_information_bits(np.array([[5, 1], [1, 5]])) < 1.0
    assert mutual_information_bits(np.zeros((2, 3))) == 0.0


def test_exclude_seen_is_applied_and_reported(tmp_path: Path, data_root: Path) -> None:
    overrides = tiny_overrides(data_root, **{"train.epochs": 1, "train.model_dir": str(tmp_path / "m")})
    params = load_params(REPO_ROOT / "params.yaml", overrides)
    train(params)
    results = {}
    for exclude in (False, True):
        params.evaluate.exclude_seen = exclude
        params.evaluate.report_dir = str(tmp_path / f"r{exclude}")
        results[exclude] = json.loads(evaluate(params).outputs.metrics.read_text())
    assert results[True]["protocol"]["exclude_seen"] is True
    # removing seen competitors can only move targets up: HR@20 never drops
    assert results[True]["test"]["hr@20"] >= results[False]["test"]["hr@20"]


def test_cpu_amp_trains_in_bf16_and_learns_what_float32_learns(tmp_path: Path, data_root: Path) -> None:
    """``train.cpu_amp`` runs the CPU steps under bf16 autocast (matmuls bf16, softmax and scores float32): the
    model it trains must rank about as well as the float32 one, and the default stays float32."""
    cpu = torch.device("cpu")
    assert (autocast_dtype(True, cpu), autocast_dtype(True, cpu, cpu_amp=True)) == (None, torch.bfloat16)
    assert autocast_dtype(False, cpu, cpu_amp=True) is None  # amp off means off everywhere
    valid = {}
    for cpu_amp in (False, True):
        overrides = tiny_overrides(data_root, **{"train.model_dir": str(tmp_path / str(cpu_amp))})
        params = load_params(REPO_ROOT / "params.yaml", {**overrides, "train.cpu_amp": cpu_amp})
        assert Trainer(params).amp_dtype == (torch.bfloat16 if cpu_amp else None)  # what the steps run under
        valid[cpu_amp] = train(params).best_valid_ndcg10
    popularity = 0.217  # validation NDCG@10 of ranking by training popularity on this data: both learn more
    assert valid[False] > popularity + 0.02 and valid[True] > popularity + 0.02, valid
    assert abs(valid[True] - valid[False]) < 0.02, valid  # 0.2738 vs 0.2731 when written


def test_checkpoint_of_other_params_is_not_resumed(tmp_path: Path, data_root: Path) -> None:
    base = tiny_overrides(data_root, **{"train.epochs": 2, "train.model_dir": str(tmp_path / "m")})
    train(load_params(REPO_ROOT / "params.yaml", base))
    changed = load_params(REPO_ROOT / "params.yaml", {**base, "train.lr": 0.001})
    train(changed)
    log = read_log(TrainOutputs.under(tmp_path / "m").log)
    assert [int(r["epoch"]) for r in log] == [1, 2]  # started afresh: two new epochs, not resumed at 2


def _cli(overrides: dict[str, Any]) -> list[str]:
    cmd = [sys.executable, "-m", "pipeline", "--params", str(REPO_ROOT / "params.yaml")]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return [*cmd, "train"]


@pytest.mark.slow
def test_killed_run_resumes_to_identical_weights_and_metrics(tmp_path: Path, data_root: Path) -> None:
    """SIGKILL a real training process mid-run, resume it, and compare with an uninterrupted run."""
    common = {"train.epochs": 6, "train.patience": 6, "model.dropout": 0.3, "model.kind": "hymoerec"}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    straight = tiny_overrides(data_root, **common, **{"train.model_dir": str(tmp_path / "straight")})
    done = subprocess.run(_cli(straight), check=True, cwd=REPO_ROOT, env=env, capture_output=True, timeout=300)
    # captured output (as in an Airflow task log) gets the per-epoch lines, never progress-bar noise
    assert "epoch 6: loss" in done.stderr.decode() and "it/s" not in done.stderr.decode()

    killed = tiny_overrides(data_root, **common, **{"train.model_dir": str(tmp_path / "killed")})
    checkpoint = TrainOutputs.under(tmp_path / "killed").checkpoint
    proc = subprocess.Popen(_cli(killed), cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed; make the run longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted = read_log(TrainOutputs.under(tmp_path / "killed").log)
    assert len(interrupted) < 6
    subprocess.run(_cli(killed), check=True, cwd=REPO_ROOT, env=env, capture_output=True, timeout=300)

    a, b = TrainOutputs.under(tmp_path / "straight"), TrainOutputs.under(tmp_path / "killed")
    weights_a = torch.load(a.model, weights_only=True)
    weights_b = torch.load(b.model, weights_only=True)
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name
    drop = ("epoch_seconds", "epoch_cpu_seconds")
    log_a = [{k: v for k, v in r.items() if k not in drop} for r in read_log(a.log)]
    log_b = [{k: v for k, v in r.items() if k not in drop} for r in read_log(b.log)]
    assert json.dumps(log_a) == json.dumps(log_b)  # (nan-aware: columns that do not apply hold nan)


def test_bucket_helpers() -> None:
    lengths = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert length_buckets(lengths).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    popularity = np.array([0, 50, 30, 10, 5, 5, 0])  # item 1 alone is a third of all interactions
    # cumulative share before each item: 0, .5, .8, .9, .95 -> head, mid, tail, tail, tail; unseen item -> tail
    assert popularity_buckets(popularity)[1:].tolist() == [0, 1, 2, 2, 2, 2]


def test_empty_bucket_is_reported_not_crashed() -> None:
    from pipeline.evaluation.evaluate import bucket_metrics

    lengths = np.array([3, 3, 3, 3, 3, 9])  # both tertile cuts are 3: the middle bucket is empty
    per_user = {"ndcg@10": np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])}
    buckets = bucket_metrics(per_user, length_buckets(lengths), ("short", "medium", "long"))
    assert buckets["medium"] == {"users": 0}
    assert buckets["short"]["users"] == 5 and buckets["short"]["ndcg@10"] == pytest.approx(0.3)
    assert buckets["long"] == {"users": 1, "ndcg@10": pytest.approx(0.6)}


def test_checkpoint_fingerprint_covers_only_the_models_own_settings(tmp_path: Path) -> None:
    """A setting of another model kind (say mamba.dropout for a transformer) never discards a checkpoint."""
    from pipeline.training.train import run_fingerprint

    def fingerprint(**overrides: object) -> str:
        return run_fingerprint(
            load_params(REPO_ROOT / "params.yaml", {"preprocess.processed_dir": str(tmp_path), **overrides})
        )

    base = fingerprint()
    assert fingerprint(**{"model.mamba.dropout": 0.3, "model.narm.hidden_size": 7, "model.bert_mask_prob": 0.3}) == base
    assert fingerprint(**{"model.moe.top_k": 1}) != base  # its own MoE setting
    sasrec = fingerprint(**{"model.moe.enabled": False})
    assert fingerprint(**{"model.moe.enabled": False, "model.moe.top_k": 1}) == sasrec  # no MoE, no MoE settings
    mamba = fingerprint(**{"model.kind": "mamba4rec"})
    assert fingerprint(**{"model.kind": "mamba4rec", "model.mamba.dropout": 0.3}) != mamba
    assert fingerprint(**{"model.kind": "mamba4rec", "model.moe.top_k": 1}) == mamba


def test_a_model_file_that_is_not_what_it_claims_is_refused(tmp_path: Path, data_root: Path) -> None:
    """The loader (evaluate, serving) takes only the model.pt training wrote, as plain weights of that network."""
    import pickle
    import shutil

    from pipeline.io import file_digest
    from pipeline.model.files import ModelFileError, load_trained_model

    params = load_params(REPO_ROOT / "params.yaml", tiny_overrides(data_root, **{"train.epochs": 1}))
    params.train.model_dir = str(tmp_path / "m")
    outputs = train(params).outputs
    assert load_trained_model(tmp_path / "m").num_items > 0  # as written: loads
    config = json.loads(outputs.config.read_text())
    assert config["weights_sha256"] == file_digest(outputs.model)

    weights = torch.load(outputs.model, weights_only=True)
    swapped = {k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}
    torch.save(swapped, outputs.model)  # a valid state_dict, but not the one trained
    with pytest.raises(ModelFileError, match="sha256 differs"):
        load_trained_model(tmp_path / "m")

    def rewrite(payload: bytes) -> None:
        outputs.model.write_bytes(payload)
        outputs.config.write_text(json.dumps({**config, "weights_sha256": file_digest(outputs.model)}))

    rewrite(pickle.dumps(shutil.rmtree))  # code, not weights: weights_only refuses to unpickle it
    with pytest.raises(ModelFileError, match="is not weights of the model"):
        load_trained_model(tmp_path / "m")
    other = tmp_path / "other.pt"
    torch.save({k: v[..., :1] if v.dim() else v for k, v in weights.items()}, other)  # another shape
    rewrite(other.read_bytes())
    with pytest.raises(ModelFileError, match="is not weights of the model"):
        load_trained_model(tmp_path / "m")
