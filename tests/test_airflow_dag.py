"""The retraining DAG for real: DagBag, task graph, ``dag.test()`` runs on replayed synthetic logs with a real MLflow
SQLite store, and (slow) the real scheduler + DAG processor + API server driven over the REST API. No mocks.

The in-process runs share one module-level world, in order: a first interval trains and registers the champion;
an interval without logs, a malformed log file, an interval with too many bad rows and a failing train task must
all leave the champion alone; re-running the first interval must not add an event twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.ingest.replay import replay
from pipeline.ingest.retrain import Interval
from pipeline.ingest.store import count_events, read_store
from pipeline.params import load_params
from tests.conftest import (
    REDIS,
    REPO_ROOT,
    MlflowServer,
    free_port,
    migrate_airflow,
    postgres_database,
    require_service,
    tiny_retrain,
    write_params,
)

DAG_ID = "hymoerec_retrain"
CHAIN = [
    "collect",
    "validate",
    "merge",
    "enough_new_events",
    "download",
    "preprocess",
    "train",
    "evaluate",
    "register",
]
TRAINING = CHAIN[4:]
CUT = date(2021, 2, 15)  # replayed weekly: log files 2021-02-15, -22, 03-01, 03-08


def airflow_env(home_root: Path, params_file: Path) -> dict[str, str]:
    """A private Airflow home under ``home_root``, the repository's DAG folder and the DAG's parameters file."""
    return {
        "AIRFLOW_HOME": str(home_root / "airflow_home"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "HYMOE_PARAMS": str(params_file),  # read when the DAG file is parsed
    }


def run_dir(world_root: Path, day: str) -> Path:
    return world_root / "work" / Interval.parse(day).name


# ----------------------------------------------------------------------------------------------- the world
@pytest.fixture(scope="module")
def world_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder of the module's shared world: params, inbox, store, MLflow store, Airflow home."""
    return tmp_path_factory.mktemp("airflow-world")


@pytest.fixture(scope="module")
def world(world_root: Path) -> Iterator[dict[str, Any]]:
    """Airflow pointed at a private home (set before Airflow is first imported: it reads its configuration then),
    a migrated metadata database, the replayed logs and the parsed DAG; the environment is restored afterwards."""
    params_file = world_root / "params.yaml"
    with pytest.MonkeyPatch.context() as env:
        for key, value in airflow_env(world_root, params_file).items():
            env.setenv(key, value)
        # module fixtures run before the per-test ones: drop a tracking URI that mlflow.set_tracking_uri left in the
        # environment of this process (an earlier test module's server), so the DAG uses its own store
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        import airflow.configuration

        if Path(airflow.configuration.AIRFLOW_HOME) != world_root / "airflow_home":
            pytest.skip("Airflow was imported before this module set AIRFLOW_HOME; run this file on its own")
        write_params(params_file, tiny_retrain(world_root, **{"mlflow.enabled": True}))
        replay(load_params(params_file), CUT, "week")
        migrate_airflow()
        from airflow.dag_processing.dagbag import DagBag

        bag = DagBag(dag_folder=str(REPO_ROOT / "dags"))
        yield {"bag": bag, "dag": bag.get_dag(DAG_ID)}


def run_interval(dag: Any, day: str, **overrides: Any) -> tuple[Any, dict[str, str]]:
    """``dag.test()`` for the daily interval that starts on ``day`` (logical date = the next midnight)."""
    logical = Interval.parse(day).end
    run = dag.test(logical_date=logical, run_conf={"overrides": overrides})
    return run, {ti.task_id: str(ti.state) for ti in run.get_task_instances()}


def tracking(world_root: Path) -> Any:
    """A client of the SQLite MLflow store the DAG's tasks use (``mlflow.store_dir`` of the test's params)."""
    from mlflow import MlflowClient

    from pipeline.tracking.store import embedded_uri

    uri = embedded_uri(world_root / "mlflow")
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def champion(world_root: Path) -> Any:
    return tracking(world_root).get_model_version_by_alias("hymoerec-custom", "champion")


@pytest.fixture(scope="module")
def first_run(world: dict[str, Any], world_root: Path) -> dict[str, Any]:
    before = count_events(world_root / "store")
    run, states = run_interval(world["dag"], "2021-02-15")
    store = read_store(world_root / "store")
    return {"dag": world["dag"], "run": run, "states": states, "before": before, "store": store}


# ----------------------------------------------------------------------------------------------- structure
def test_dagbag_has_no_import_errors(world: dict[str, Any]) -> None:
    assert world["bag"].import_errors == {}
    assert DAG_ID in world["bag"].dag_ids


def test_task_graph_is_as_designed(world_root: Path, world: dict[str, Any]) -> None:
    dag = world["dag"]
    assert [t.task_id for t in dag.topological_sort()] == CHAIN
    for upstream, downstream in zip(CHAIN, CHAIN[1:], strict=False):
        assert upstream in dag.get_task(downstream).upstream_task_ids
    assert dag.get_task("enough_new_events").upstream_task_ids == {"validate", "merge"}
    assert type(dag.get_task("enough_new_events")).__name__ == "_ShortCircuitDecoratedOperator"
    store = (world_root / "store").resolve().as_uri()
    assert [(a.name, a.uri) for a in dag.get_task("merge").outlets] == [(store, store)]
    assert dag.catchup is False and dag.max_active_runs == 1
    assert dag.description.startswith("Ingest the interval's interaction logs")  # what the Dags list shows
    assert dag.timetable.expression == "0 0 * * *"  # @daily from params.yaml, as a data-interval timetable
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable"
    train = dag.get_task("train")
    assert (train.retries, train.retry_exponential_backoff) == (0, 2.0)  # retries from the test's params file


def test_parsing_the_dag_file_stays_light(tmp_path: Path) -> None:
    code = (
        "import runpy, sys; runpy.run_path(sys.argv[1]); "
        "heavy = [m for m in ('torch', 'mlflow', 'pandas', 'pipeline') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(REPO_ROOT / "dags" / "retrain.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **airflow_env(tmp_path, REPO_ROOT / "params.yaml")},
    )
    assert done.returncode == 0, done.stderr[-3000:]


# ----------------------------------------------------------------------------------------------- dag.test runs
def test_first_interval_trains_and_registers_a_champion(world_root: Path, first_run: dict[str, Any]) -> None:
    assert str(first_run["run"].state) == "success", first_run["states"]
    assert first_run["states"] == {task: "success" for task in CHAIN}
    arrived = len(pd.read_csv(world_root / "inbox" / "2021-02-15.csv"))
    assert first_run["store"].num_rows == first_run["before"] + arrived
    version = champion(world_root)
    assert str(version.version) == "1"
    metrics = json.loads((run_dir(world_root, "2021-02-15") / "reports" / "metrics.json").read_text())
    assert float(version.tags["test_ndcg_at_10"]) == pytest.approx(metrics["test"]["ndcg@10"])


def test_interval_without_logs_skips_training_and_keeps_the_champion(
    world_root: Path, first_run: dict[str, Any]
) -> None:
    before = champion(world_root).version
    run, states = run_interval(first_run["dag"], "2021-02-16")
    assert str(run.state) == "success"
    assert {t: states[t] for t in CHAIN[:4]} == {t: "success" for t in CHAIN[:4]}
    assert {t: states[t] for t in TRAINING} == {t: "skipped" for t in TRAINING}
    assert champion(world_root).version == before
    assert read_store(world_root / "store").equals(first_run["store"])


def test_malformed_log_file_is_quarantined_and_its_good_rows_kept(world_root: Path, first_run: dict[str, Any]) -> None:
    before = champion(world_root).version
    good = [(f"u{i}", str(1 + i % 9), int(datetime(2021, 2, 17, 12, tzinfo=UTC).timestamp()) + i) for i in range(60)]
    lines = ["user_id,item_id,timestamp", *(f"{u},{i},{t}" for u, i, t in good), "u1,,1613563200", "u2,3,soon"]
    (world_root / "inbox" / "2021-02-17-shipper2.csv").write_text("\n".join(lines) + "\n")
    run, states = run_interval(first_run["dag"], "2021-02-17", **{"retrain.min_new_events": 1000})  # ingest only: quick
    assert str(run.state) == "success"
    assert states["merge"] == "success" and states["train"] == "skipped"
    quarantine = pd.read_csv(run_dir(world_root, "2021-02-17") / "ingest" / "quarantine.csv")
    assert sorted(zip(quarantine["line"], quarantine["reason"], strict=True)) == [
        (62, "missing item_id"),
        (63, "bad timestamp"),
    ]
    assert quarantine["source"].str.endswith("/inbox/2021-02-17-shipper2.csv").all()  # the inbox file, not the copy
    stored = read_store(world_root / "store").to_pandas()
    assert set(good) <= set(zip(stored["user_id"], stored["item_id"], stored["timestamp"], strict=True))
    assert champion(world_root).version == before


def test_too_many_bad_rows_fail_the_interval_clearly(world_root: Path, first_run: dict[str, Any]) -> None:
    before, events = champion(world_root).version, count_events(world_root / "store")
    (world_root / "inbox" / "2021-02-18.csv").write_text("user_id,item_id,timestamp\nu1,2,1613650000\nu1,,x\n,,\n")
    run, states = run_interval(first_run["dag"], "2021-02-18")
    assert str(run.state) == "failed"
    assert states["validate"] == "failed" and states["merge"] == "upstream_failed"
    assert len(pd.read_csv(run_dir(world_root, "2021-02-18") / "ingest" / "quarantine.csv")) == 2
    assert champion(world_root).version == before and count_events(world_root / "store") == events


def test_rerunning_an_interval_adds_no_event_twice_and_warm_starts(world_root: Path, first_run: dict[str, Any]) -> None:
    store_before = read_store(world_root / "store")
    run, states = run_interval(first_run["dag"], "2021-02-15")
    assert str(run.state) == "success" and states == {task: "success" for task in CHAIN}
    assert read_store(world_root / "store").equals(store_before)
    merged = json.loads((run_dir(world_root, "2021-02-15") / "ingest" / "merge.json").read_text())
    assert merged["added"] == 0 and merged["duplicates"] > 0
    # later days are already in the store, but this interval trains only on events before its end
    until = json.loads((run_dir(world_root, "2021-02-15") / "interim" / "manifest.json").read_text())["source"]["until"]
    used = pq.read_table(run_dir(world_root, "2021-02-15") / "interim" / "interactions.parquet")["timestamp"].to_numpy()
    assert used.max() < until <= read_store(world_root / "store")["timestamp"].to_numpy().max()
    pointer = json.loads((run_dir(world_root, "2021-02-15") / "models" / "mlflow_run.json").read_text())
    warm = tracking(world_root).get_run(pointer["run_id"]).data.params["train.warm_start_from"]
    assert warm.startswith(str(run_dir(world_root, "2021-02-15") / "champion"))  # started from the champion's files
    assert Path(warm, "model.pt").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the failure needs a machine without CUDA")
def test_failing_train_task_leaves_the_champion_unchanged(world_root: Path, first_run: dict[str, Any]) -> None:
    before = champion(world_root)
    run, states = run_interval(first_run["dag"], "2021-02-22", **{"train.device": "cuda"})  # fails in train only
    assert str(run.state) == "failed"
    assert states["preprocess"] == "success" and states["train"] == "failed"
    assert states["evaluate"] == states["register"] == "upstream_failed"
    after = champion(world_root)
    assert (after.version, after.run_id) == (before.version, before.run_id)


def test_run_conf_cannot_point_a_run_at_other_paths(
    world_root: Path, first_run: dict[str, Any], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    before, events = champion(world_root).version, count_events(world_root / "store")
    elsewhere = tmp_path / "elsewhere"
    run, states = run_interval(first_run["dag"], "2021-02-23", **{"retrain.store_dir": str(elsewhere)})
    assert str(run.state) == "failed" and states["collect"] == "failed"
    assert "['retrain.store_dir'] are not allowed" in "".join(capfd.readouterr())  # the reason, in the task log
    assert not elsewhere.exists()
    assert champion(world_root).version == before and count_events(world_root / "store") == events


# ----------------------------------------------------------------------------------------------- the real thing
def api(port: int, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})},
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read() or b"null")


def wait_for(what: str, check: Any, timeout_s: float, launcher: subprocess.Popen, log: Path) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if launcher.poll() is not None:
            raise AssertionError(f"the Airflow launcher exited ({launcher.returncode}):\n{log.read_text()[-3000:]}")
        try:
            value = check()
            if value:
                return value
        except (urllib.error.URLError, OSError, KeyError):
            pass
        time.sleep(2.0)
    raise AssertionError(f"{what} did not happen within {timeout_s:.0f}s:\n{log.read_text()[-3000:]}")


def test_the_launcher_adds_a_celery_worker_for_the_celery_executor_only() -> None:
    from pipeline.airflow_local import components, uses_celery

    for executor in ("CeleryExecutor", "LocalExecutor,CeleryExecutor", "celery:some.module.CeleryExecutor"):
        assert uses_celery({"AIRFLOW__CORE__EXECUTOR": executor}), executor
    assert not uses_celery({"AIRFLOW__CORE__EXECUTOR": "LocalExecutor"}) and not uses_celery({})
    worker = components(8080, celery_worker=True)["celery-worker"]
    assert worker[:2] == ["celery", "worker"] and "--skip-serve-logs" in worker  # no log server on 0.0.0.0
    assert "celery-worker" not in components(8080)


@pytest.fixture(params=["sqlite-local", "postgres-celery"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Where the launched Airflow and the DAG's MLflow keep their state: the embedded default (SQLite, the
    LocalExecutor, an MLflow SQLite store), or the scaled-out setting (PostgreSQL metadata DB, the CeleryExecutor
    with a Redis broker and a real ``airflow celery worker``, an ``mlflow server`` on PostgreSQL)."""
    if request.param == "sqlite-local":
        yield {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
        return
    require_service("Redis", REDIS)
    with postgres_database("airflow") as airflow_db, postgres_database("mlflow") as mlflow_db:
        (tmp_path / "mlflow-server").mkdir()
        server = MlflowServer(tmp_path / "mlflow-server", backend_uri=mlflow_db)
        server.start()
        try:
            yield {
                "MLFLOW_TRACKING_URI": server.uri,
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": airflow_db,
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__CELERY__BROKER_URL": f"redis://{REDIS[0]}:{REDIS[1]}/0",
                "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{airflow_db}",
                # a queue of this test's own: a worker of another run on the same Redis never takes its tasks
                "AIRFLOW__OPERATORS__DEFAULT_QUEUE": f"hymoe-{uuid.uuid4().hex[:8]}",
            }
        finally:
            server.stop()


@pytest.mark.slow
def test_scheduler_runs_a_dag_run_triggered_over_the_rest_api(tmp_path: Path, backend: dict[str, str]) -> None:
    """``python -m pipeline.airflow_local`` (what ``make airflow`` runs): trigger over REST v2, wait for success."""
    import psutil
    from mlflow import MlflowClient

    params_file = write_params(
        tmp_path / "params.yaml", tiny_retrain(tmp_path, **{"mlflow.enabled": True, "retrain.schedule": None})
    )
    replay(load_params(params_file), CUT, "week")
    port, home = free_port(), tmp_path / "airflow_home"
    tracking_uri = backend["MLFLOW_TRACKING_URI"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(HYMOE_PARAMS=str(params_file), **backend)
    log = tmp_path / "launcher.out"
    with open(log, "wb") as out:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "pipeline.airflow_local", "--home", str(home), "--port", str(port)]
            + ["--no-triggerer", "--ready-timeout", "240", "--stop-timeout", "30"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the teardown can end everything it started
        )
    try:
        wait_for("the banner", lambda: "Airflow is up" in log.read_text(), 300, launcher, log)
        password = json.loads((home / "simple_auth_manager_passwords.json.generated").read_text())["admin"]
        token = api(port, "POST", "/auth/token", {"username": "admin", "password": password})["access_token"]
        wait_for(
            "the DAG to be parsed", lambda: api(port, "GET", f"/api/v2/dags/{DAG_ID}", token=token), 180, launcher, log
        )
        listening = [
            c.laddr.ip
            for p in [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]
            for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ]
        assert listening and set(listening) == {"127.0.0.1"}, listening
        body = {
            "logical_date": "2021-02-16T00:00:00Z",
            "data_interval_start": "2021-02-15T00:00:00Z",
            "data_interval_end": "2021-02-16T00:00:00Z",
            "conf": {"overrides": {}},
        }
        run_id = api(port, "POST", f"/api/v2/dags/{DAG_ID}/dagRuns", body, token)["dag_run_id"]
        path = f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}"

        def finished() -> str | None:
            state = api(port, "GET", path, token=token)["state"]
            return state if state in ("success", "failed") else None

        state = wait_for("the DAG run to finish", finished, 360, launcher, log)
        tasks = api(port, "GET", f"{path}/taskInstances", token=token)["task_instances"]
        assert state == "success", [(t["task_id"], t["state"]) for t in tasks]
        assert {t["task_id"]: t["state"] for t in tasks} == {task: "success" for task in CHAIN}
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        assert str(client.get_model_version_by_alias("hymoerec-custom", "champion").version) == "1"
        if "AIRFLOW__CELERY__BROKER_URL" in backend:  # the tasks really went through the queue to the worker
            assert {t["queue"] for t in tasks} == {backend["AIRFLOW__OPERATORS__DEFAULT_QUEUE"]}
            worker_log = home / "logs" / "celery-worker.out"
            # A task's state reaches the API server before Celery logs the task done: wait for the last line.
            wait_for(
                "the worker to log every task done",
                lambda: worker_log.read_text().count("succeeded in") >= len(CHAIN),
                60,
                launcher,
                worker_log,
            )
            assert worker_log.read_text().count("succeeded in") == len(CHAIN), worker_log.read_text()[-3000:]
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                launcher.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)  # anything of its group still alive (normally nothing)
