"""Parameters a user can get wrong, through the real CLI and a real ``dag.test()``: every mistake ends in one line
and exit 2 (exit 1 for a run that diverges), and never costs more than reading it.

Each case was once a hang, a traceback or a crash in training: a YAML alias bomb in ``--set`` or the params file,
``--params /dev/zero``, an impossible date, an interval at the end of the calendar, a long value echoed whole,
values validation let through (a negative seed, a huge network, ``train.lr=1e30``), a loss gone NaN, and a DAG run
whose conf merged its interval before failing in ``train``. The CLI runs under a 4 GiB address-space limit, so a
case that regresses into expansion fails fast instead of taking the machine's memory.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.errors import ParamsError
from pipeline.params import load_params, parse_yaml
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


def run_cli(params_file: Path | str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m pipeline --params <file> ...`` in a fresh, memory-capped process."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("HYMOE_DATA_MIRROR", None)
    cwd = Path(params_file).parent if Path(params_file).is_file() else Path.cwd()
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "--params", str(params_file), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=limited,
    )


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


# ----------------------------------------------------------------------------------------------- reading YAML
def test_parse_yaml_refuses_an_alias_bomb_within_a_second() -> None:
    started = time.perf_counter()
    with pytest.raises(ParamsError, match="anchors and aliases"):
        parse_yaml(f"train:\n  epochs: {BOMB}\n", "params.yaml")
    assert time.perf_counter() - started < 1.0  # refused from the parser's events, nothing expanded


def test_an_alias_bomb_in_set_is_one_line_and_exit_2(params_file: Path) -> None:
    done = run_cli(params_file, "--set", f"train.epochs={BOMB}", "train", timeout=60)
    assert "anchors and aliases" in one_line(done, "train", 2)


def test_an_alias_bomb_in_the_params_file_is_one_line_and_exit_2(params_file: Path) -> None:
    params_file.write_text(f"train:\n  epochs: {BOMB}\n")
    done = run_cli(params_file, "train", timeout=60)
    line = one_line(done, "train", 2)
    assert str(params_file) in line and "anchors and aliases" in line


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_params_that_are_not_a_regular_file_are_refused_unread(tmp_path: Path, kind: str) -> None:
    path = Path("/dev/zero")
    if kind == "fifo":
        path = tmp_path / "params.yaml"
        os.mkfifo(path)  # opening it for reading would wait for a writer forever
    done = run_cli(path, "train", timeout=60)
    assert f"the parameters file {path} is not a regular file" in one_line(done, "train", 2)


# ----------------------------------------------------------------------------------------------- dates
def test_an_impossible_date_in_set_is_exit_2(params_file: Path) -> None:
    done = run_cli(params_file, "--set", "data.timestamps.earliest=2024-02-30", "train")
    line = one_line(done, "train", 2)
    assert "data.timestamps.earliest must be a date" in line and "2024-02-30" in line


def test_an_impossible_date_in_the_params_file_names_key_and_file(params_file: Path) -> None:
    params_file.write_text("data:\n  timestamps:\n    earliest: 2024-02-30\n")
    done = run_cli(params_file, "train")
    line = one_line(done, "train", 2)
    assert line.startswith(f"error: train: {params_file}: data.timestamps.earliest must be a date"), line


@pytest.mark.parametrize("start", ["9999-12-31", "0001-01-01"])
def test_an_interval_at_the_ends_of_the_calendar_is_exit_2(params_file: Path, start: str) -> None:
    (params_file.parent / "data" / "inbox").mkdir(parents=True)
    done = run_cli(params_file, "ingest", "--start", start)
    assert "an interval must lie within [1970-01-01, 9999-01-01)" in one_line(done, "ingest", 2)


# ----------------------------------------------------------------------------------------------- echoes
@pytest.mark.parametrize("key", ["train.epochs", "train.lr_schedule", "data.dataset", "model.kind", LONG])
def test_a_long_value_is_echoed_at_most_120_characters(params_file: Path, key: str) -> None:
    value = LONG if key != LONG else "1"
    done = run_cli(params_file, "--set", f"{key}={value}", "train")
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
    done = run_cli(params_file, "--set", override, "train")
    assert one_line(done, "train", 2) == f"error: train: {expected}"


def test_a_float_in_yaml_1_1_text_form_is_taken_as_the_number_it_spells(params_file: Path) -> None:
    # YAML 1.1 reads 1e30 (no dot) as text: before, the CLI answered "expected a number, got '1e30'"
    done = run_cli(params_file, "--set", "train.lr=1e30", "train")
    assert one_line(done, "train", 2) == "error: train: train.lr must lie in [0, 1], got 1e+30"


@pytest.mark.parametrize(("text", "number"), [("1e-3", 1e-3), ("5E-4", 5e-4), ("+.5e-2", 5e-3), ("2.e-1", 0.2)])
def test_a_float_setting_takes_scientific_notation(text: str, number: float) -> None:
    params = load_params(REPO_ROOT / "params.yaml", {"train.lr": parse_yaml(text, "--set train.lr")})
    assert params.train.lr == number


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lr=1e999", "train.lr: expected a finite number, got inf"),
        ("train.lr=nan", "train.lr: expected a number, got 'nan'"),
        ("train.lr=1_0e-3", "train.lr: expected a number, got '1_0e-3'"),  # Python's float() takes these two
        ("train.lr=١e-3", "train.lr: expected a number, got '١e-3'"),
        ("train.lr=1e-3x", "train.lr: expected a number, got '1e-3x'"),
        ("train.epochs=1e3", "train.epochs: expected an integer, got '1e3'"),  # only float settings read text
    ],
)
def test_text_that_is_not_a_plain_float_is_still_refused(params_file: Path, override: str, expected: str) -> None:
    assert one_line(run_cli(params_file, "--set", override, "train"), "train", 2) == f"error: train: {expected}"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny synthetic data, downloaded and preprocessed by the CLI; returns its params file (no MLflow)."""
    root = tmp_path_factory.mktemp("tiny")
    path = write_params(root / "params.yaml", tiny_overrides(root, **{"mlflow.enabled": False, "train.device": "cpu"}))
    for stage in ("download", "preprocess"):
        done = run_cli(path, stage)
        assert done.returncode == 0, done.stderr[-3000:]
    return path


def test_a_network_too_big_for_memory_is_refused_before_it_is_built(tiny_data: Path) -> None:
    huge = ["model.moe.enabled=false", "model.hidden_size=4096", "model.num_layers=64", "model.ffn_hidden=65536"]
    done = run_cli(tiny_data, *(arg for item in huge for arg in ("--set", item)), "train", timeout=120)
    line = one_line(done, "train", 2)
    assert "training would need at least" in line and "lower model.hidden_size" in line


def test_a_diverging_run_stops_with_one_line_and_exit_1(tiny_data: Path) -> None:
    # both at their ceilings: AdamW multiplies every weight matrix by 1 - lr * weight_decay = -9 each step
    settings = ["train.lr=1.0", "train.weight_decay=10", "train.batch_size=8", "train.epochs=3", "train.resume=false"]
    done = run_cli(tiny_data, *(arg for item in settings for arg in ("--set", item)), "train")
    line = one_line(done, "train", 1)
    assert "training diverged in epoch 1: the mean loss is nan" in line
    assert line.endswith("; nothing was written for this run"), line  # no epoch finished: no checkpoint either
    assert not (tiny_data.parent / "models" / "checkpoint.pt").exists()
    assert not (tiny_data.parent / "models" / "model.pt").exists()  # no model of NaN weights


# ----------------------------------------------------------------------------------------------- the DAG
# Parses the DAG folder and runs dag.test() for the interval of 2024-01-05 in a process of its own, so that its Airflow
# home is this module's whatever other test module imported Airflow first; prints the outcome as its last line.
DAG_RUN = """
import json, sys
from datetime import UTC, datetime
from airflow.dag_processing.dagbag import DagBag

bag = DagBag(dag_folder=sys.argv[1])
outcome = {"import_errors": {str(path): error for path, error in bag.import_errors.items()}}
if not bag.import_errors:
    run = bag.get_dag("hymoerec_retrain").test(
        logical_date=datetime(2024, 1, 6, tzinfo=UTC), run_conf={"overrides": json.loads(sys.argv[2])}
    )
    outcome.update(state=str(run.state), states={ti.task_id: str(ti.state) for ti in run.get_task_instances()})
print(json.dumps(outcome))
"""


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a private, migrated Airflow home whose DAG folder is this checkout's ``dags``."""
    home = tmp_path_factory.mktemp("dag-limits") / "airflow_home"
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PYTHONPATH": str(REPO_ROOT),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    migrate_airflow(env)
    return env


def run_day(env: dict[str, str], params_file: Path, overrides: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """``dag.test()`` of the interval of 2024-01-05 with ``params_file``: the outcome and the run's whole log."""
    done = subprocess.run(
        [sys.executable, "-c", DAG_RUN, str(REPO_ROOT / "dags"), json.dumps(overrides)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, "HYMOE_PARAMS": str(params_file)},  # read when the DAG file is parsed
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout + done.stderr


def dag_world(root: Path, **extra: Any) -> Path:
    """A params file and an inbox holding one valid log file of 2024-01-05: a merge would add its events."""
    params_file = write_params(root / "params.yaml", tiny_retrain(root, **extra))
    stamp = int(datetime(2024, 1, 5, 12, tzinfo=UTC).timestamp())
    rows = "".join(f"u{i},{1 + i % 9},{stamp + i}\n" for i in range(30))
    (root / "inbox").mkdir(parents=True, exist_ok=True)
    (root / "inbox" / "2024-01-05.csv").write_text("user_id,item_id,timestamp\n" + rows)
    return params_file


def test_a_dag_run_with_an_out_of_range_conf_fails_its_first_task_unmerged(
    airflow_env: dict[str, str], tmp_path: Path
) -> None:
    outcome, log = run_day(airflow_env, dag_world(tmp_path), {"train.lr": 1e30})
    assert outcome["import_errors"] == {}
    states = outcome["states"]
    assert outcome["state"] == "failed" and states["collect"] == "failed" and states["merge"] == "upstream_failed"
    assert "AirflowFailException" in log
    assert "run conf overrides: train.lr must lie in [0, 1], got 1e+30" in log
    assert not (tmp_path / "store").exists()  # nothing merged


def test_an_impossible_date_in_params_yaml_keeps_the_dag_and_fails_its_first_task(
    airflow_env: dict[str, str], tmp_path: Path
) -> None:
    params_file = dag_world(tmp_path)
    params_file.write_text(params_file.read_text().replace("earliest: '1970-01-01'", "earliest: 2024-02-30"))
    assert "earliest: 2024-02-30" in params_file.read_text()
    outcome, log = run_day(airflow_env, params_file, {})
    assert outcome["import_errors"] == {}  # the DAG stays listed, with its history
    states = outcome["states"]
    assert outcome["state"] == "failed" and states["collect"] == "failed" and states["merge"] == "upstream_failed"
    assert "AirflowFailException" in log
    assert f"{params_file}: data.timestamps.earliest must be a date (YYYY-MM-DD), got '2024-02-30'" in log
    assert not (tmp_path / "store").exists()


def import_dag_file(params_file: Path, airflow_home: Path) -> subprocess.CompletedProcess[str]:
    """Run ``dags/retrain.py`` as the DAG processor imports it, in a fresh, memory-capped process."""
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import runpy, sys; runpy.run_path(sys.argv[1])",
            str(REPO_ROOT / "dags" / "retrain.py"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "AIRFLOW_HOME": str(airflow_home), "HYMOE_PARAMS": str(params_file)},
        preexec_fn=limited,
    )


def test_a_bad_setting_the_dag_is_built_from_is_its_import_error_naming_key_and_file(tmp_path: Path) -> None:
    params_file = write_params(tmp_path / "params.yaml", {"retrain.start_date": "2024-02-30"})
    done = import_dag_file(params_file, tmp_path / "airflow_home")
    assert done.returncode == 1
    assert f"ValueError: {params_file}: retrain.start_date is invalid, got '2024-02-30'" in done.stderr, done.stderr


def test_an_alias_bomb_in_the_dags_settings_is_its_import_error_naming_key_and_file(tmp_path: Path) -> None:
    params_file = write_params(tmp_path / "params.yaml", {})
    text = params_file.read_text()
    params_file.write_text(text.replace("schedule: '@daily'", f"schedule: {BOMB}", 1))
    assert BOMB in params_file.read_text()
    done = import_dag_file(params_file, tmp_path / "airflow_home")  # before: an endless echo, then MemoryError
    assert done.returncode == 1
    expected = (
        f"ValueError: {params_file}: retrain.schedule[0]: YAML anchors and aliases (&name, *name) are not allowed"
    )
    assert expected in done.stderr, done.stderr[-3000:]
