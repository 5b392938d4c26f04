"""Parameters a user can get wrong, through the real CLI and a real ``dag.test()``: every mistake ends in one line
and exit 2 (exit 1 for a run that diverges), and never costs more than reading it.

Each case was once a hang, a traceback or a crash in training: a YAML alias bomb in ``--set`` or the params file,
``--params /dev/zero``, an impossible date, an interval at the end of the calendar, a long value echoed whole,
values validation let through (a negative seed, a huge network, ``train.lr=1e30``), a loss gone NaN, and a DAG run
whose conf merged its interval before failing in ``train``. The CLI runs under a 4 GiB address-space limit, so a
case that regresses into expansion fails fast instead of taking the machine's memory.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO_ROOT, migrate_airflow, tiny_overrides, tiny_retrain, write_params

ADDRESS_SPACE = 4 << 30
# nine levels of nine aliases: a few hundred bytes that expand to 9**9 (387 million) strings when walked
BOMB = (
    "["
    + ", ".join(
        ["&a [x, x, x, x, x, x, x, x, x]"]
        + [f"&{name} [{', '.join([f'*{prev}'] * 9)}]" for prev, name in zip("abcdefgh", "bcdefghi", strict=True)]
    )
    + "]"
)
LONG = "x" * 151


def limited() -> None:
    """Run in the child before exec: an address-space cap, so an expansion dies of MemoryError, not the host."""
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_cli(
    params_file: Path | str, *args: str, timeout: float = 300
) -> tuple[subprocess.CompletedProcess[str], float]:
    """``python -m pipeline --params <file> ...`` in a fresh, memory-capped process; returns it and its wall time."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("HYMOE_DATA_MIRROR", None)
    cwd = Path(params_file).parent if Path(params_file).is_file() else Path.cwd()
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "--params", str(params_file), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limited,
    )
    return done, time.perf_counter() - started


def one_line(done: subprocess.CompletedProcess[str], stage: str, code: int) -> str:
    """Exit ``code``, no traceback, and stderr's last line ``error: <stage>: ...``; returns that line."""
    assert done.returncode == code, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {stage}: "), done.stderr[-3000:]
    return last


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 3}}))
    return path


def plain_mistake_seconds(params_file: Path) -> float:
    """Wall time of the CLI refusing an ordinary bad value: start-up and imports, the baseline of a refusal."""
    done, seconds = run_cli(params_file, "--set", "train.epochs=x", "train")
    one_line(done, "train", 2)
    return seconds


# ----------------------------------------------------------------------------------------------- reading YAML
def test_an_alias_bomb_in_set_is_refused_within_a_second(params_file: Path) -> None:
    baseline = plain_mistake_seconds(params_file)
    done, seconds = run_cli(params_file, "--set", f"train.epochs={BOMB}", "train", timeout=60)
    assert "anchors and aliases" in one_line(done, "train", 2)
    assert seconds < baseline + 1.0


def test_an_alias_bomb_in_the_params_file_is_refused_within_a_second(params_file: Path) -> None:
    baseline = plain_mistake_seconds(params_file)
    params_file.write_text(f"train:\n  epochs: {BOMB}\n")
    done, seconds = run_cli(params_file, "train", timeout=60)
    line = one_line(done, "train", 2)
    assert str(params_file) in line and "anchors and aliases" in line
    assert seconds < baseline + 1.0


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_params_that_are_not_a_regular_file_are_refused_unread(tmp_path: Path, kind: str) -> None:
    path = Path("/dev/zero")
    if kind == "fifo":
        path = tmp_path / "params.yaml"
        os.mkfifo(path)  # opening it for reading would wait for a writer forever
    done, _ = run_cli(path, "train", timeout=60)
    assert f"the parameters file {path} is not a regular file" in one_line(done, "train", 2)


# ----------------------------------------------------------------------------------------------- dates
def test_an_impossible_date_in_set_is_exit_2(params_file: Path) -> None:
    done, _ = run_cli(params_file, "--set", "data.timestamps.earliest=2024-02-30", "train")
    line = one_line(done, "train", 2)
    assert "data.timestamps.earliest must be a date" in line and "2024-02-30" in line


def test_an_impossible_date_in_the_params_file_names_key_and_file(params_file: Path) -> None:
    params_file.write_text("data:\n  timestamps:\n    earliest: 2024-02-30\n")
    done, _ = run_cli(params_file, "train")
    line = one_line(done, "train", 2)
    assert line.startswith(f"error: train: {params_file}: data.timestamps.earliest must be a date"), line


@pytest.mark.parametrize("start", ["9999-12-31", "0001-01-01"])
def test_an_interval_at_the_ends_of_the_calendar_is_exit_2(params_file: Path, start: str) -> None:
    (params_file.parent / "data" / "inbox").mkdir(parents=True)
    done, _ = run_cli(params_file, "ingest", "--start", start)
    assert "an interval must lie within [1970-01-01, 9999-01-01)" in one_line(done, "ingest", 2)


# ----------------------------------------------------------------------------------------------- echoes
@pytest.mark.parametrize("key", ["train.epochs", "train.lr_schedule", "data.dataset", "model.kind", LONG])
def test_a_long_value_is_echoed_at_most_120_characters(params_file: Path, key: str) -> None:
    value = LONG if key != LONG else "1"
    done, _ = run_cli(params_file, "--set", f"{key}={value}", "train")
    line = one_line(done, "train", 2)
    echoed = sum(len(run) for run in re.findall("x{3,}", line))  # the value, cut at its start, end or middle
    assert 100 <= echoed <= 120, line
    assert len(line) < 400


# ----------------------------------------------------------------------------------------------- bounds
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.seed=-1", "train.seed must lie in [0, 4294967295], got -1"),
        ("train.seed=4294967296", "train.seed must lie in [0, 4294967295], got 4294967296"),
        ("model.hidden_size=1000000", "model.hidden_size must lie in [1, 4096], got 1000000"),
        ("model.max_seq_len=1000000", "model.max_seq_len must lie in [1, 4096], got 1000000"),
        ("train.lr=1.0e+30", "train.lr must lie in [0, 1], got 1e+30"),
    ],
)
def test_values_training_cannot_run_are_refused(params_file: Path, override: str, expected: str) -> None:
    done, _ = run_cli(params_file, "--set", override, "train")
    assert one_line(done, "train", 2) == f"error: train: {expected}"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny synthetic data, downloaded and preprocessed by the CLI; returns its params file (no MLflow)."""
    root = tmp_path_factory.mktemp("tiny")
    path = write_params(root / "params.yaml", tiny_overrides(root, **{"mlflow.enabled": False, "train.device": "cpu"}))
    for stage in ("download", "preprocess"):
        done, _ = run_cli(path, stage)
        assert done.returncode == 0, done.stderr[-3000:]
    return path


def test_a_network_too_big_for_memory_is_refused_before_it_is_built(tiny_data: Path) -> None:
    huge = ["model.moe.enabled=false", "model.hidden_size=4096", "model.num_layers=64", "model.ffn_hidden=65536"]
    done, _ = run_cli(tiny_data, *(arg for item in huge for arg in ("--set", item)), "train", timeout=120)
    line = one_line(done, "train", 2)
    assert "training would need at least" in line and "lower model.hidden_size" in line


def test_a_diverging_run_stops_with_one_line_and_exit_1(tiny_data: Path) -> None:
    # both at their ceilings: AdamW multiplies every weight matrix by 1 - lr * weight_decay = -9 each step
    settings = ["train.lr=1.0", "train.weight_decay=10", "train.batch_size=8", "train.epochs=3", "train.resume=false"]
    done, _ = run_cli(tiny_data, *(arg for item in settings for arg in ("--set", item)), "train")
    assert "training diverged in epoch 1: the mean loss is nan" in one_line(done, "train", 1)
    assert not (tiny_data.parent / "models" / "model.pt").exists()  # no model of NaN weights


# ----------------------------------------------------------------------------------------------- the DAG
@pytest.fixture(scope="module")
def airflow_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A private, migrated Airflow home; yields a function that parses the DAG folder for a given params file."""
    root = tmp_path_factory.mktemp("dag-limits")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AIRFLOW_HOME", str(root / "airflow_home"))
        env.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(REPO_ROOT / "dags"))
        env.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        import airflow.configuration

        if Path(airflow.configuration.AIRFLOW_HOME) != root / "airflow_home":
            pytest.skip("Airflow was imported before this module set AIRFLOW_HOME; run this file on its own")
        migrate_airflow()
        from airflow.dag_processing.dagbag import DagBag

        def parse(params_file: Path) -> Any:
            env.setenv("HYMOE_PARAMS", str(params_file))  # read when the DAG file is parsed
            return DagBag(dag_folder=str(REPO_ROOT / "dags"))

        yield {"root": root, "parse": parse}


def dag_world(root: Path, **extra: Any) -> Path:
    """A params file and an inbox holding one valid log file of 2024-01-05: a merge would add its events."""
    params_file = write_params(root / "params.yaml", tiny_retrain(root, **extra))
    stamp = int(datetime(2024, 1, 5, 12, tzinfo=UTC).timestamp())
    rows = "".join(f"u{i},{1 + i % 9},{stamp + i}\n" for i in range(30))
    (root / "inbox").mkdir(parents=True, exist_ok=True)
    (root / "inbox" / "2024-01-05.csv").write_text("user_id,item_id,timestamp\n" + rows)
    return params_file


def run_day(dag: Any, overrides: dict[str, Any]) -> tuple[str, dict[str, str]]:
    run = dag.test(logical_date=datetime(2024, 1, 6, tzinfo=UTC), run_conf={"overrides": overrides})
    return str(run.state), {ti.task_id: str(ti.state) for ti in run.get_task_instances()}


def test_a_dag_run_with_an_out_of_range_conf_fails_its_first_task_unmerged(
    airflow_world: dict[str, Any], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    bag = airflow_world["parse"](dag_world(tmp_path))
    assert bag.import_errors == {}
    state, states = run_day(bag.get_dag("hymoerec_retrain"), {"train.lr": 1e30})
    assert state == "failed" and states["collect"] == "failed" and states["merge"] == "upstream_failed"
    assert "AirflowFailException" in (log := "".join(capfd.readouterr()))
    assert "run conf overrides: train.lr must lie in [0, 1], got 1e+30" in log
    assert not (tmp_path / "store").exists()  # nothing merged


def test_an_impossible_date_in_params_yaml_keeps_the_dag_and_fails_its_first_task(
    airflow_world: dict[str, Any], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    params_file = dag_world(tmp_path)
    params_file.write_text(params_file.read_text().replace("earliest: '1970-01-01'", "earliest: 2024-02-30"))
    assert "earliest: 2024-02-30" in params_file.read_text()
    bag = airflow_world["parse"](params_file)
    assert bag.import_errors == {}  # the DAG stays listed, with its history
    state, states = run_day(bag.get_dag("hymoerec_retrain"), {})
    assert state == "failed" and states["collect"] == "failed" and states["merge"] == "upstream_failed"
    log = "".join(capfd.readouterr())
    assert "AirflowFailException" in log
    assert f"{params_file}: data.timestamps.earliest must be a date (YYYY-MM-DD), got '2024-02-30'" in log
    assert not (tmp_path / "store").exists()


def test_a_bad_setting_the_dag_is_built_from_is_its_import_error_naming_key_and_file(tmp_path: Path) -> None:
    params_file = write_params(tmp_path / "params.yaml", {"retrain.start_date": "2024-02-30"})
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import runpy, sys; runpy.run_path(sys.argv[1])",
            str(REPO_ROOT / "dags" / "retrain.py"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow_home"), "HYMOE_PARAMS": str(params_file)},
    )
    assert done.returncode == 1
    assert f"ValueError: {params_file}: retrain.start_date is invalid, got '2024-02-30'" in done.stderr, done.stderr
