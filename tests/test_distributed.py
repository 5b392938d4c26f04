"""Data-parallel training for real: ``torchrun --standalone --nproc_per_node 2 -m pipeline train`` on the CPU (gloo)
trains one model as one process does, and a run whose rank is killed resumes from its checkpoint under torchrun."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from pipeline.model.train_log import read_log
from pipeline.training.train import TrainOutputs
from tests.conftest import REPO_ROOT, prepared, tiny_overrides

pytestmark = pytest.mark.slow

EPOCHS = 6
# both runs see the same data and batches; the two ranks' halves differ from one process's whole batch only in how
# the mean loss weighs them and in dropout draws: on this tiny data the best validation NDCG@10 lands within
TOLERANCE = 0.03


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    prepared(root)
    return root


def command(overrides: dict[str, Any], nproc: int = 0) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*(launcher if nproc else [sys.executable]), "-m", "pipeline", "--params", str(REPO_ROOT / "params.yaml")]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return [*cmd, "train"]


def run(overrides: dict[str, Any], nproc: int = 0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        command(overrides, nproc), cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_two_processes_train_one_model_as_one_process_does(data_root: Path, tmp_path: Path) -> None:
    common = {"train.epochs": EPOCHS, "train.patience": EPOCHS, "mlflow.enabled": False}
    run(tiny_overrides(data_root, **common, **{"train.model_dir": str(tmp_path / "one")}))
    done = run(tiny_overrides(data_root, **common, **{"train.model_dir": str(tmp_path / "two")}), nproc=2)

    one = json.loads(TrainOutputs.under(tmp_path / "one").config.read_text())
    two = json.loads(TrainOutputs.under(tmp_path / "two").config.read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["steps"] == one["steps"]  # each rank steps once per global batch
    assert abs(two["best_valid_ndcg@10"] - one["best_valid_ndcg@10"]) <= TOLERANCE, (one, two)
    log = read_log(TrainOutputs.under(tmp_path / "two").log)
    assert [int(r["epoch"]) for r in log] == list(range(1, EPOCHS + 1))  # one writer: no row twice
    assert done.stderr.count("best validation NDCG@10") == 1  # rank 0 reports, the other rank stays quiet


def test_a_killed_rank_fails_the_run_and_torchrun_resumes_it(data_root: Path, tmp_path: Path) -> None:
    overrides = tiny_overrides(
        data_root, **{"train.epochs": 40, "train.patience": 40, "train.model_dir": str(tmp_path / "m")}
    )
    outputs = TrainOutputs.under(tmp_path / "m")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        command(overrides, nproc=2), cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 300
    while len(read_log(outputs.log)) < 2 and time.monotonic() < deadline and launcher.poll() is None:
        time.sleep(0.1)
    assert launcher.poll() is None, "training ended before a rank could be killed"
    ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "pipeline" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    ranks[-1].send_signal(signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=300)
    assert launcher.returncode != 0  # the run fails as a whole, it does not go on with one rank
    done_before = len(read_log(outputs.log))
    assert 2 <= done_before < 40 and not outputs.model.exists()

    resumed = run(overrides, nproc=2)  # the same command: the checkpoint matches its parameters and data
    assert f"resumed after epoch {done_before}" in resumed.stderr
    log = read_log(outputs.log)
    assert [int(r["epoch"]) for r in log] == list(range(1, 41))
    assert json.loads(outputs.config.read_text())["world_size"] == 2


# rank 1 alone sees a NaN mean loss from epoch 2 on: its loss reads NaN, its gradients stay finite (the NaN is a
# constant added to the value), so the ranks' weights stay equal and only rank 1's own check would fire
NAN_ON_RANK_1 = """
import os, sys, torch
from pipeline.cli import main
from pipeline.training import train

finished = 0
end_epoch, forward = train.Trainer.end_epoch, train.TrainingLoss.forward

def counted(self, row):
    global finished
    finished += 1
    return end_epoch(self, row)

def nan_on_rank_1(self, inputs, targets, **kwargs):
    loss = forward(self, inputs, targets, **kwargs)
    if finished >= 1 and os.environ["RANK"] == "1":
        self.last.loss = self.last.loss + torch.tensor(float("nan"), device=loss.device)
    return loss

train.Trainer.end_epoch, train.TrainingLoss.forward = counted, nan_on_rank_1
sys.exit(main(sys.argv[1:]))
"""


def test_a_loss_gone_nan_on_one_rank_stops_every_rank_with_one_line(data_root: Path, tmp_path: Path) -> None:
    driver = tmp_path / "nan_on_rank_1.py"
    driver.write_text(NAN_ON_RANK_1)
    overrides = tiny_overrides(data_root, **{"train.epochs": 4, "mlflow.enabled": False, "train.resume": False})
    overrides["train.model_dir"] = str(tmp_path / "m")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        launcher + command(overrides)[3:], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode != 0
    checkpoint = TrainOutputs.under(tmp_path / "m").checkpoint
    # both ranks stop on the same epoch's check with the same line (their stderr is shared: lines may run together)
    lines = re.findall(r"error: train: (training diverged in epoch .*?valid NDCG@10 [0-9.]+\))", done.stderr)
    assert len(lines) == 2 and lines[0] == lines[1], done.stderr[-5000:]
    assert "RuntimeError" not in done.stderr  # before: rank 0 failed in its next collective, on the lost peer
    assert lines[0].startswith("training diverged in epoch 2: the mean loss is nan (ce "), lines[0]
    left = f"model.pt was not written; {checkpoint} holds epoch 1 and the best weights so far (epoch 1, valid NDCG@10"
    assert left in lines[0], lines[0]
    assert checkpoint.exists() and not TrainOutputs.under(tmp_path / "m").model.exists()


def test_every_rank_gets_a_share_of_every_batch() -> None:
    """Ranks step in lockstep: the same number of batches each, together exactly one process's batches."""
    import numpy as np

    from pipeline.training.train import epoch_batches

    lengths = np.random.default_rng(0).integers(1, 50, size=1001)
    whole = epoch_batches(lengths, 64, seed=3, epoch=2, bucket=True)
    shares = [epoch_batches(lengths, 64, seed=3, epoch=2, bucket=True, rank=r, world=2) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == len(whole)  # 1001 = 15 x 64 + 41: no batch smaller than the world
    for batch, first, second in zip(whole, *shares, strict=True):
        assert sorted([*first, *second]) == sorted(batch) and abs(len(first) - len(second)) <= 1
