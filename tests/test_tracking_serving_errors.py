"""Bad input and lost backends at the edges of MLflow: the tracking store (a refusing database, a server killed
mid-training) and the served model (``python -m pipeline serve``, MLflow's scoring server with one-line errors).

Real parts only: the CLI in fresh processes, a real ``mlflow server`` stopped mid-training, a tiny model really
registered in the embedded store and served over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from pipeline.local_servers import free_port, start_group, stop_group, wait_http
from pipeline.params import Params, load_params
from pipeline.stages import evaluate, train
from pipeline.tracking.promotion import register
from pipeline.tracking.runs import POINTER
from tests.conftest import BIN, REPO_ROOT, MlflowServer, prepared, tiny_overrides, with_venv_path, write_params

pytestmark = pytest.mark.slow

MAX_ECHO = 200  # characters of a request an error answer may repeat


def cli_env(**extra: str) -> dict[str, str]:
    """This environment for a CLI or server process: this checkout's package, no tracking URI from the shell."""
    env = with_venv_path(PYTHONPATH=str(REPO_ROOT), **extra)
    if "MLFLOW_TRACKING_URI" not in extra:
        env.pop("MLFLOW_TRACKING_URI", None)
    return env


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " WARNING " in line]


def train_against(uri: str, params_file: Path) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m pipeline train`` with ``$MLFLOW_TRACKING_URI=uri``, in the params file's folder; its seconds."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "--params", str(params_file), "train"],
        cwd=params_file.parent,
        env=cli_env(MLFLOW_TRACKING_URI=uri),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done, time.monotonic() - started


# ----------------------------------------------------------------------------------------------- tracking
def test_a_refusing_tracking_database_fails_in_one_line_within_seconds(tmp_path: Path) -> None:
    """The client used to be built outside the retries: MLflow retried the database for ~100 s, then a traceback."""
    params_file = write_params(tmp_path / "params.yaml", tiny_overrides(tmp_path))  # default retries and back-off
    uri = f"postgresql://127.0.0.1:{free_port()}/x"
    done, elapsed = train_against(uri, params_file)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: train: MLflow at {uri} is unreachable or failing: connect failed 5 time(s)")
    assert "Connection refused" in last
    assert len(warnings_in(done.stderr)) == 1  # later retries log at INFO
    assert elapsed < 60  # 1 + 2 + 4 + 8 s of back-off at the defaults, plus start-up
    assert not (tmp_path / "models" / "model.pt").exists()


def test_a_tracking_store_that_cannot_be_created_fails_at_once_in_one_line(tmp_path: Path) -> None:
    """Only a refused or timed-out connection is retried while connecting; this used to be retried 5 times and
    reported as "unreachable or failing". A regular file stands where the database's folder should be: a real
    failing path even for root (whom chmod does not stop)."""
    (tmp_path / "file").write_text("not a folder\n")
    uri = f"sqlite:///{tmp_path / 'file' / 'x' / 'mlflow.db'}"
    overrides = tiny_overrides(tmp_path, **{"mlflow.retries": 4, "mlflow.backoff_s": 30.0})  # 4 waits of 30 s
    params_file = write_params(tmp_path / "params.yaml", overrides)
    done, elapsed = train_against(uri, params_file)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "unreachable" not in done.stderr, done.stderr
    assert not warnings_in(done.stderr), done.stderr  # no "connect failed ...; retry 1/4"
    cause = f"[Errno 20] Not a directory: '{tmp_path / 'file' / 'x'}'"
    assert done.stderr.strip().splitlines()[-1] == f"error: train: cannot use MLflow at {uri}: {cause}"
    assert elapsed < 60  # a retry budget of 120 s: the warnings above show that not even one wait was made


def test_a_tracking_server_lost_mid_training_logs_one_warning_and_one_error_line(tmp_path: Path) -> None:
    """The server is stopped while training's run is open: one warning, the one-line error, no traceback.

    Deterministic without mocks: stopping the server after a given epoch raced the training, which on a fast machine
    finished first and exited 0. Instead the training process is frozen (SIGSTOP) as soon as the run's pointer file
    exists (written once the run is created, before the first epoch), the server confirms that the run is still
    RUNNING, so the process has at least its `end run` call still to make, and only then is the server stopped and
    the process thawed (SIGCONT). Whatever training had reached, its next MLflow call meets a stopped server.
    """
    overrides = tiny_overrides(
        tmp_path, **{"train.epochs": 60, "train.patience": 60, "mlflow.retries": 1, "mlflow.backoff_s": 0.1}
    )
    params_file = write_params(tmp_path / "params.yaml", overrides)
    prepared(tmp_path)  # the data: downloads and preprocessing do not depend on train.*
    pointer = tmp_path / "models" / POINTER
    assert not pointer.exists()
    (tmp_path / "server").mkdir()
    server = MlflowServer(tmp_path / "server")
    server.start()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "--params", str(params_file), "train"],
        cwd=tmp_path,
        env=cli_env(MLFLOW_TRACKING_URI=server.uri),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        try:
            deadline = time.monotonic() + 240
            while not pointer.exists():
                assert proc.poll() is None, f"training ended before creating its MLflow run: {proc.stderr.read()}"
                assert time.monotonic() < deadline, "training created no MLflow run"
                time.sleep(0.05)
            proc.send_signal(signal.SIGSTOP)
            run_id = json.loads(pointer.read_text())["run_id"]
            assert server.client().get_run(run_id).info.status == "RUNNING"
        finally:
            server.stop()
            proc.send_signal(signal.SIGCONT)
        stderr = proc.communicate(timeout=240)[1]
    finally:
        if proc.poll() is None:  # only when an assertion above failed
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, stderr
    assert "Traceback" not in stderr
    warnings = warnings_in(stderr)
    assert len(warnings) == 1 and server.uri in warnings[0], warnings
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: train: MLflow at {server.uri} is unreachable or failing")
    assert sum(line.startswith("error:") for line in lines) == 1


# ----------------------------------------------------------------------------------------------- serving
@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Params]:
    """A tiny model trained one epoch, evaluated and registered as champion in the embedded store; its params file."""
    root = tmp_path_factory.mktemp("registered")
    overrides = tiny_overrides(root, **{"train.epochs": 1})
    params_file = write_params(root / "params.yaml", overrides)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        prepared(root, **{"train.epochs": 1})
        params = load_params(params_file)
        train(params)
        evaluate(params)
        assert register(params).decision == "promoted"
    return params_file, params


def start_server(cmd: list[str], cwd: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    log = cwd / "server.log"
    with open(log, "w") as out:
        proc = start_group([*cmd, "--port", str(port)], out, env=cli_env(), cwd=cwd)
    wait_http(f"http://127.0.0.1:{port}/ping", proc, log)
    return proc, port


@pytest.fixture(scope="module")
def pipeline_server(registered: tuple[Path, Params], tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """``python -m pipeline serve``: the champion of the params file's store; yields the port."""
    params_file, _ = registered
    cmd = [sys.executable, "-m", "pipeline", "--params", str(params_file), "serve"]
    proc, port = start_server(cmd, tmp_path_factory.mktemp("pipeline-serve"))
    try:
        yield port
    finally:
        stop_group(proc)


def post(port: int, body: bytes, content_type: str = "application/json") -> tuple[int, str]:
    """POST ``body`` to ``/invocations``; (HTTP status, answer text) whatever the status."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def records(*rows: dict[str, Any]) -> bytes:
    return json.dumps({"dataframe_records": list(rows)}).encode()


FIVE_MB = b'{"dataframe_records": [{"history": ["' + b"x" * 5_000_000 + b'"]'  # cut short: malformed
BAD_REQUESTS = {  # issue case -> (body, content type, what the one-line message says)
    "1,000 nested brackets": (
        b'{"dataframe_records": ' + b"[" * 1000 + b"]" * 1000 + b"}",
        "application/json",
        "nests too deeply",
    ),
    "malformed JSON": (b'{"dataframe_records": [{"history": ["1"]', "application/json", "not valid JSON"),
    "malformed CSV": (b'history,k\n"a,b\n1,2,3,4\n', "text/csv", "text/csv cannot carry"),
    "a Parquet body that is not Parquet": (b"PAR1 not a table PAR1", "application/vnd.apache.parquet", "Parquet"),
    "k on only some rows": (
        records({"history": ["1"], "k": 3}, {"history": ["2"]}),
        "application/json",
        "k must be on every row or on none; rows without it: 1",
    ),
    "a 5 MB body": (FIVE_MB, "application/json", "not valid JSON"),
    "a schema error": (records({"hist": ["1"]}), "application/json", "Model is missing inputs ['history']"),
    "not UTF-8": (b'{"dataframe_records": [\xff' + b"x" * 1_000_000 + b"]}", "application/json", "not utf-8"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_served_model_answers_bad_requests_with_one_line_400(pipeline_server: int, case: str) -> None:
    body, content_type, reason = BAD_REQUESTS[case]
    status, text = post(pipeline_server, body, content_type)
    assert status == 400, (status, text[:500])
    assert "\n" not in text.strip() and len(text) < 2 * MAX_ECHO, text[:500]  # one line, the request not echoed
    answer = json.loads(text)
    assert set(answer) == {"error_code", "message"}  # no stack_trace
    assert reason in answer["message"] and len(answer["message"]) <= MAX_ECHO, answer
    assert "site-packages" not in text and str(REPO_ROOT) not in text and "Traceback" not in text


def test_served_model_still_answers_good_requests(pipeline_server: int, registered: tuple[Path, Params]) -> None:
    """The same app as ``mlflow models serve``: JSON records, and a Parquet table, are scored."""
    history = ["1", "2", "3"]
    status, text = post(pipeline_server, records({"history": history, "k": 4}))
    assert status == 200, text
    (prediction,) = json.loads(text)["predictions"]
    assert len(prediction["items"]) == 4 and not set(prediction["items"]) & set(history)
    table = io.BytesIO()
    pd.DataFrame({"history": [history], "k": [4]}).to_parquet(table)
    status, text = post(pipeline_server, table.getvalue(), "application/vnd.apache.parquet")
    assert status == 200 and json.loads(text)["predictions"] == [prediction], text


def test_mlflow_models_serve_refuses_k_on_only_some_rows(
    registered: tuple[Path, Params], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under MLflow's own command the pyfunc shapes what reaches it (here: k on some rows) the same way."""
    _, params = registered
    store = f"sqlite:///{Path(params.mlflow.store_dir).resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", "models:/hymoerec-synthetic@champion"]
    proc, port = start_server([*cmd, "--env-manager", "local", "-h", "127.0.0.1", "--workers", "1"], tmp_path)
    try:
        status, text = post(port, records({"history": ["1"]}, {"history": ["2"], "k": 2}))
    finally:
        stop_group(proc)
    assert status == 400 and "\n" not in text.strip(), text
    assert json.loads(text)["message"] == "k must be on every row or on none; rows without it: 0"


def test_serve_without_a_registered_model_fails_in_one_line(registered: tuple[Path, Params]) -> None:
    params_file, _ = registered
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "--params", str(params_file), "serve", "--model", "models:/none@champion"],
        cwd=params_file.parent,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: serve: cannot load models:/none@champion (")


def test_every_error_answer_is_one_short_line() -> None:
    """The message shaping alone, on MLflow's own wording of the errors the HTTP tests cannot all provoke."""
    from pipeline.tracking.serving import error_body

    frame = "   history  k\n0  [" + "a" * 5000 + "]  0"
    dict_error = "The input must be a JSON dictionary ... Received dictionary with input fields: []. IMPORTANT: more"
    for status, body in [
        (400, json.dumps({"error_code": "BAD_REQUEST", "message": f"Failed to predict data '{frame}'. \nError: x"})),
        (400, json.dumps({"error_code": "BAD_REQUEST", "message": dict_error, "stack_trace": "Traceback..."})),
        (415, "This predictor only supports ... Got '" + "y" * 5000 + "'."),
        (504, "Request processing time exceeded limit"),
    ]:
        shaped = error_body(status, body.encode(), "application/json")
        answer = json.loads(shaped)
        assert b"\n" not in shaped and set(answer) == {"error_code", "message"}
        assert len(answer["message"]) <= MAX_ECHO and "a" * 50 not in answer["message"], answer
    assert json.loads(error_body(504, b"Request processing time exceeded limit", ""))["error_code"] == (
        "DEADLINE_EXCEEDED"
    )
    assert json.loads(error_body(404, b'{"detail": "Not Found"}', "")) == {
        "error_code": "BAD_REQUEST",
        "message": "Not Found",
    }
