"""MLflow tracking, registry, gated promotion, serving and faults, against a real ``mlflow server`` (no mocks).

One server per module (SQLite backend, temporary artifact folder, 127.0.0.1, a free port, one worker); a few tiny
models trained once on synthetic data; every registry test uses its own model name so the tests stay independent.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from pipeline.data.layout import PreprocessOutputs
from pipeline.io import file_digest
from pipeline.params import Params, load_params
from pipeline.stages import evaluate, train
from pipeline.tracking import registry
from pipeline.tracking.batch import recommend_batch, user_histories
from pipeline.tracking.promotion import decide, register
from pipeline.tracking.recommender import Recommender
from pipeline.tracking.registry import STATE_TAG, champion_uri, download_champion
from pipeline.tracking.runs import read_pointer, train_pointer
from pipeline.tracking.store import TRACKING_URI_ENV, Tracking, TrackingError, model_name
from tests.conftest import (
    BIN,
    POSTGRES,
    REPO_ROOT,
    MlflowServer,
    free_port,
    postgres_database,
    prepared,
    start_group,
    stop_group,
    tiny_overrides,
    wait_http,
    with_venv_path,
)

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------------------------- a real server
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _the_server(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if "server" in request.fixturenames:
        monkeypatch.setenv(TRACKING_URI_ENV, request.getfixturevalue("server").uri)


# ----------------------------------------------------------------------------------------------- tiny models
def params_for(data_root: Path, model_dir: Path, **extra: Any) -> Params:
    overrides = tiny_overrides(
        data_root,
        **{
            "train.model_dir": str(model_dir / "models"),
            "evaluate.report_dir": str(model_dir / "reports"),
            "mlflow.store_dir": str(model_dir / "mlflow"),
            "mlflow.retries": 2,
            "mlflow.backoff_s": 0.1,
            **extra,
        },
    )
    return load_params(REPO_ROOT / "params.yaml", overrides)


def named(params: Params, prefix: str, **mlflow: Any) -> Params:
    """The same model registered under its own name (``<prefix>-synthetic``), with other mlflow settings."""
    out = copy.deepcopy(params)
    out.mlflow.model_name_prefix = prefix
    for key, value in mlflow.items():
        setattr(out.mlflow, key, value)
    return out


def ndcg_of(params: Params) -> float:
    return json.loads((Path(params.evaluate.report_dir) / "metrics.json").read_text())["test"]["ndcg@10"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-data")
    prepared(root)
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, data_root: Path, server: MlflowServer) -> dict[str, Params]:
    """good (6 epochs) and bad (1 slow epoch) trained and evaluated on the server, plus copies of both evaluated
    again as new runs (same weights, so exactly the same test NDCG@10)."""
    root = tmp_path_factory.mktemp("models")
    out: dict[str, Params] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TRACKING_URI_ENV, server.uri)
        out["good"] = params_for(data_root, root / "good", **{"train.epochs": 6, "train.patience": 6})
        out["bad"] = params_for(data_root, root / "bad", **{"train.epochs": 1, "train.lr": 0.0003})
        for params in out.values():
            train(params)
            evaluate(params)
        for source in ("good", "bad"):
            copy_params = params_for(data_root, root / f"{source}-copy")
            src, dst = Path(out[source].train.model_dir), Path(copy_params.train.model_dir)
            dst.mkdir(parents=True)
            for name in ("model.pt", "model.json", "train_log.csv"):  # no mlflow_run.json: a run of its own
                shutil.copy2(src / name, dst / name)
            evaluate(copy_params)
            out[f"{source}-copy"] = copy_params
    assert ndcg_of(out["good"]) > ndcg_of(out["bad"]) + 0.01
    assert ndcg_of(out["good-copy"]) == ndcg_of(out["good"])
    return out


def run_of(params: Params) -> str:
    return read_pointer(Path(params.evaluate.report_dir) / "mlflow_run.json")["run_id"]


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}


def versions(client: MlflowClient, name: str) -> list[str]:
    return sorted((str(mv.version) for mv in client.search_model_versions(f"name = '{name}'")), key=int)


# ----------------------------------------------------------------------------------------------- tracking
def test_train_and_evaluate_log_one_run_with_params_metrics_tags_artifacts(
    models: dict[str, Params], server: MlflowServer
) -> None:
    client = server.client()
    good = models["good"]
    run_id = run_of(good)
    assert read_pointer(train_pointer(good))["run_id"] == run_id  # evaluate continued train's run
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "hymoerec-synthetic"
    assert client.get_run(run_of(models["bad"])).info.experiment_id == experiment.experiment_id  # side by side

    params = run.data.params
    assert (
        params["model.kind"] == "hymoerec" and params["train.epochs"] == "6" and params["evaluate.ks"] == "[5, 10, 20]"
    )
    assert params["data.dataset"] == "synthetic" and params["model.moe.enabled"] == "true"
    # only what shaped the model: no retraining or tracking settings, no other model kind's or data source's
    assert not [k for k in params if k.startswith(("retrain.", "mlflow.", "model.mamba.", "data.custom."))]
    assert "data.synthetic.n_users" in params

    history = client.get_metric_history(run_id, "valid_ndcg_at_10")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]  # step = epoch
    assert {"train_loss", "lb_loss", "usage_entropy", "epoch_seconds", "epoch_cpu_seconds"} <= set(run.data.metrics)
    metrics = json.loads((Path(good.evaluate.report_dir) / "metrics.json").read_text())
    assert run.data.metrics["test.ndcg_at_10"] == pytest.approx(metrics["test"]["ndcg@10"])
    assert run.data.metrics["valid.ndcg_at_10"] == pytest.approx(metrics["valid"]["ndcg@10"])
    short = metrics["test_by_history_length"]["short"]["ndcg@10"]
    assert run.data.metrics["test_by_history_length.short.ndcg_at_10"] == pytest.approx(short)
    assert "test_by_target_popularity.tail.ndcg_at_10" in run.data.metrics
    # the headline figures, not one metric per bucket and cut-off (those stay in metrics.json)
    assert not [k for k in run.data.metrics if k.startswith("test_by_") and not k.endswith("ndcg_at_10")]
    assert not [k for k in run.data.metrics if k.startswith("protocol.")]

    tags = run.data.tags
    processed = PreprocessOutputs.under(good.preprocess.processed_dir)
    assert tags["dataset"] == "synthetic" and tags["model.kind"] == "hymoerec" and tags["device"] == "cpu"
    assert tags["data.processed.test.sha256"] == file_digest(processed.test)
    assert len(tags["mlflow.source.git.commit"]) == 40
    assert tags["eval.fingerprint"]
    assert tags["model.name"] == "HyMoERec" and tags["mlflow.runName"].startswith("HyMoERec-synthetic-")
    test_ndcg = f"NDCG@10 {metrics['test']['ndcg@10']:.4f}"
    assert "**HyMoERec** on **synthetic**" in tags["mlflow.note.content"] and test_ndcg in tags["mlflow.note.content"]
    assert experiment.tags["mlflow.note.content"].startswith("Models trained on synthetic")
    inputs = {(d.dataset.name, d.tags[0].value) for d in run.inputs.dataset_inputs}
    assert inputs == {("synthetic-train", "training"), ("synthetic-valid", "validation"), ("synthetic-test", "testing")}
    digests = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert digests["synthetic-test"] == file_digest(processed.test)[:16]

    root = {a.path for a in client.list_artifacts(run_id)}
    assert {"params.yaml", "metrics.json", "stats.json", "train_log.csv", "model.json", "plots"} <= root
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"plots/training_curves.png", "plots/bucket_metrics.png", "plots/expert_load.png"} <= plots
    logged = Path(client.download_artifacts(run_id, "params.yaml", str(server.root / "dl")))
    assert "min_delta" in logged.read_text()


def test_evaluate_of_a_model_without_a_run_starts_a_backfilled_run(
    models: dict[str, Params], server: MlflowServer
) -> None:
    client = server.client()
    copy_run, original_run = run_of(models["good-copy"]), run_of(models["good"])
    assert copy_run != original_run
    run = client.get_run(copy_run)
    assert run.data.tags["backfilled_from"] == "train_log.csv"
    assert sorted(m.step for m in client.get_metric_history(copy_run, "valid_ndcg_at_10")) == [1, 2, 3, 4, 5, 6]
    assert run.data.metrics["test.ndcg_at_10"] == client.get_run(original_run).data.metrics["test.ndcg_at_10"]


# ----------------------------------------------------------------------------------------------- registry
def test_decide_rule() -> None:
    assert decide(0.1, None, 0.5)  # no champion: the first version serves
    assert decide(0.30, 0.20, 0.05) and not decide(0.22, 0.20, 0.05)
    assert not decide(0.20, 0.20, 0.0) and not decide(0.19, 0.20, 0.0)  # equal or worse never replaces


def test_register_promotes_only_a_better_model(models: dict[str, Params], server: MlflowServer) -> None:
    client = server.client()
    bad, good = named(models["bad"], "gate"), named(models["good"], "gate")
    name = model_name(good)

    first = register(bad)
    assert (first.version, first.decision, first.measured) == ("1", "promoted", "no champion")
    assert aliases(client, name) == {"challenger": "1", "champion": "1"}

    better = register(good)
    assert (better.version, better.decision, better.measured) == ("2", "promoted", "logged")
    assert better.champion_ndcg == pytest.approx(ndcg_of(bad)) and better.champion_version == "1"
    assert better.challenger_ndcg == pytest.approx(ndcg_of(good))
    assert aliases(client, name) == {"challenger": "2", "champion": "2"}
    mv = client.get_model_version(name, "2")
    assert mv.status == "READY" and mv.run_id == run_of(good) and mv.tags[STATE_TAG] == "complete"
    # the logged model knows its version (its page says "Registered": model_id passed to create_model_version),
    # and the registered model says what it is
    experiment = client.get_run(run_of(good)).info.experiment_id
    logged = [m for m in client.search_logged_models([experiment]) if m.source_run_id == run_of(good)]
    links = [[(v["name"], str(v["version"])) for v in json.loads(m.tags["mlflow.modelVersions"])] for m in logged]
    assert links == [[(name, "2")]]
    assert "champion" in client.get_registered_model(name).description
    run = client.get_run(run_of(good))
    assert run.data.tags["promotion.decision"] == "promoted"
    assert run.data.metrics["promotion.champion_ndcg_at_10"] == pytest.approx(ndcg_of(bad))
    assert run.data.metrics["promotion.challenger_ndcg_at_10"] == pytest.approx(ndcg_of(good))

    worse = register(named(models["bad-copy"], "gate"))
    assert (worse.version, worse.decision) == ("3", "kept")
    assert aliases(client, name) == {"challenger": "3", "champion": "2"}  # champion stays
    assert client.get_run(run_of(models["bad-copy"])).data.tags["promotion.decision"] == "kept"

    equal = register(named(models["good-copy"], "gate"))
    assert (equal.version, equal.decision) == ("4", "kept")
    assert equal.challenger_ndcg == equal.champion_ndcg
    assert aliases(client, name) == {"challenger": "4", "champion": "2"}

    again = register(good)  # the same run and model.pt: the recorded decision, nothing new, no alias moved
    assert (again.version, again.decision) == ("2", "promoted")
    assert versions(client, name) == ["1", "2", "3", "4"]
    assert aliases(client, name) == {"challenger": "4", "champion": "2"}


def test_min_delta_gates_a_small_gain(models: dict[str, Params], server: MlflowServer) -> None:
    client = server.client()
    gain = ndcg_of(models["good"]) - ndcg_of(models["bad"])
    register(named(models["bad"], "delta"))
    result = register(named(models["good"], "delta", min_delta=gain + 0.01))
    assert result.decision == "kept" and result.min_delta == pytest.approx(gain + 0.01)
    assert aliases(client, "delta-synthetic") == {"challenger": "2", "champion": "1"}


def test_champion_from_other_evaluation_data_is_rescored(
    models: dict[str, Params], server: MlflowServer, tmp_path: Path
) -> None:
    """Under another protocol (seen items excluded) the champion's logged figure does not compare: it is re-scored
    with the project's evaluator, and matches what evaluate reports for it under that protocol."""
    client = server.client()
    register(named(models["good"], "rescore"))
    expected_params = copy.deepcopy(models["good"])
    expected_params.evaluate.exclude_seen = True
    expected_params.evaluate.report_dir = str(tmp_path / "expected")
    expected_params.mlflow.enabled = False
    evaluate(expected_params)
    expected = ndcg_of(expected_params)

    challenger = copy.deepcopy(named(models["bad-copy"], "rescore"))
    challenger.evaluate.exclude_seen = True
    challenger.evaluate.report_dir = str(tmp_path / "challenger")
    evaluate(challenger)
    result = register(challenger)
    assert result.measured == "rescored"
    assert result.champion_ndcg == pytest.approx(expected, abs=1e-9)
    assert result.decision == "kept" and aliases(client, "rescore-synthetic")["champion"] == "1"


# ----------------------------------------------------------------------------------------------- serving
@pytest.fixture(scope="module")
def served(models: dict[str, Params], server: MlflowServer) -> Params:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TRACKING_URI_ENV, server.uri)
        params = named(models["good"], "serve")
        assert register(params).decision == "promoted"
    return params


def sample_histories(params: Params, n: int = 5) -> list[list[str]]:
    return user_histories(params.preprocess.processed_dir)[1][:n]


def test_champion_loads_by_alias_and_recommends_raw_ids(served: Params, server: MlflowServer) -> None:
    import mlflow

    model = mlflow.pyfunc.load_model(champion_uri(served))
    histories = sample_histories(served)
    out = model.predict(pd.DataFrame({"history": histories, "k": [5] * len(histories)}))
    assert list(out.columns) == ["items", "scores"] and len(out) == len(histories)
    local = Recommender.from_files(
        Path(served.train.model_dir) / "model.pt",
        Path(served.train.model_dir) / "model.json",
        PreprocessOutputs.under(served.preprocess.processed_dir).item_map,
    )
    known = set(local.index)
    for history, items, scores in zip(histories, out["items"], out["scores"], strict=True):
        assert len(items) == 5 and set(items) <= known  # never padding, never an unknown id
        assert not set(items) & set(history)  # the user's own history is excluded
        assert list(scores) == sorted(scores, reverse=True)
    assert [list(i) for i in out["items"]] == local.recommend(histories, [5] * len(histories))[0]

    noisy = [["no-such-item", *histories[0], "another"], ["no-such-item"], []]
    out = model.predict(pd.DataFrame({"history": noisy, "k": [5, 5, 5]}))
    assert list(out["items"][0]) == local.recommend([histories[0]], [5])[0][0]  # unknown ids are ignored
    assert list(out["items"][1]) == [] and list(out["items"][2]) == []  # nothing known: nothing to condition on

    folder = Path(mlflow.artifacts.download_artifacts(champion_uri(served), dst_path=str(server.root / "champ")))
    assert not list(folder.rglob("*.pkl")) and not list(folder.rglob("*.pickle"))  # models from code, no pickles
    assert (folder / "artifacts" / "model.pt").exists() and (folder / "code" / "pipeline" / "model").is_dir()
    assert json.loads((folder / "serving_input_example.json").read_text())

    warm = download_champion(served, server.root / "warm")  # what a warm-started retrain loads
    assert file_digest(warm / "model.pt") == file_digest(Path(served.train.model_dir) / "model.pt")


def test_served_champion_answers_http(served: Params, server: MlflowServer, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", champion_uri(served), "--env-manager", "local"]
    cmd += ["-h", "127.0.0.1", "-p", str(port), "--workers", "1"]
    with open(log, "w") as out:  # from another working directory: the model carries its code
        proc = start_group(cmd, out, env=with_venv_path(), cwd=tmp_path)
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", proc, log)
        histories = sample_histories(served, 3)
        body = json.dumps({"dataframe_records": [{"history": h, "k": 4} for h in histories]}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            predictions = json.loads(response.read())["predictions"]
        known = histories[0]
        bad_requests = {  # each answered 400 with a one-line reason naming the problem, never a stack trace
            "k must be a positive integer, got 0": [{"history": known, "k": 0}],
            "k must be a positive integer, got -3": [{"history": known, "k": -3}],
            "k must be a positive integer, got 2.7": [{"history": known, "k": 2.7}],
            "item ids must be strings, got 12345678901234567890123": [{"history": [12345678901234567890123]}],
            "item ids must be strings, got 5 (int)": [{"history": [*known, 5]}],
            "k must be a positive integer, got '5'": [{"history": known, "k": "5"}],
            "k must be a positive integer, got True": [{"history": known, "k": True}],
            "history must be a list of raw item ids, got str": [{"history": "abc"}],
        }
        answers = {reason: _post_records(port, records) for reason, records in bad_requests.items()}
    finally:
        stop_group(proc)
    for reason, (status, answer) in answers.items():
        assert status == 400, (reason, status, answer)
        assert reason in answer["message"] and "\n" not in answer["message"], answer
        assert "stack_trace" not in answer and "Traceback" not in json.dumps(answer), answer
    local = Recommender.from_files(
        Path(served.train.model_dir) / "model.pt",
        Path(served.train.model_dir) / "model.json",
        PreprocessOutputs.under(served.preprocess.processed_dir).item_map,
    )
    items, scores = local.recommend(histories, [4, 4, 4])
    assert [p["items"] for p in predictions] == items
    assert np.allclose([p["scores"] for p in predictions], scores, atol=1e-5)


def test_a_rejected_request_keeps_its_one_line_reason() -> None:
    """MLflow's server rewrites an exception's message to echo the whole input frame; the reason must survive."""
    from pipeline.tracking.pyfunc_model import RequestRejected

    err = RequestRejected("row 0: k must be a positive integer, got 0")
    err.message = "Failed to predict data '   history  k\\n0  [a]  0'. \\nError: " + err.message  # as the server does
    body = json.loads(err.serialize_as_json())
    assert body["message"] == "row 0: k must be a positive integer, got 0" and "stack_trace" not in body
    assert err.get_http_status_code() == 400


def _post_records(port: int, records: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """POST ``dataframe_records`` to a served model; (HTTP status, JSON body) whatever the status."""
    body = json.dumps({"dataframe_records": records}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_batch_writes_top_k_for_every_user(served: Params, tmp_path: Path) -> None:
    from_champion = recommend_batch(served, k=5, output=tmp_path / "champion.parquet")
    table = pq.read_table(from_champion)
    users, histories = user_histories(served.preprocess.processed_dir)
    assert table.column("user_id").to_pylist() == users
    for history, items in zip(histories, table.column("items").to_pylist(), strict=True):
        assert len(items) == 5 and not set(items) & set(history)
    local = copy.deepcopy(served)
    local.mlflow.enabled = False  # no MLflow: the local model.pt, the same code
    from_files = pq.read_table(recommend_batch(local, k=5, output=tmp_path / "local.parquet"))
    assert from_files.column("items").to_pylist() == table.column("items").to_pylist()


# ----------------------------------------------------------------------------------------------- embedded store
def test_embedded_store_needs_no_server(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    monkeypatch.delenv(TRACKING_URI_ENV, raising=False)
    params = params_for(data_root, tmp_path, **{"train.epochs": 2, "mlflow.model_name_prefix": "embedded"})
    train(params)
    evaluate(params)
    result = register(params)
    store = Path(params.mlflow.store_dir)
    assert result.decision == "promoted" and (store / "mlflow.db").is_file()
    assert list((store / "artifacts").rglob("model.pt"))  # artifacts beside the database, not in ./mlruns
    db = f"sqlite:///{store / 'mlflow.db'}"
    client = MlflowClient(db, registry_uri=db)
    assert aliases(client, "embedded-synthetic") == {"challenger": "1", "champion": "1"}
    run = client.get_run(result.run_id)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "valid_ndcg_at_10")) == [1, 2]
    model = mlflow.pyfunc.load_model(champion_uri(params))
    out = model.predict(pd.DataFrame({"history": sample_histories(params, 2)}))
    assert all(len(items) == params.mlflow.batch_k for items in out["items"])  # k defaults to mlflow.batch_k

    monkeypatch.setenv(TRACKING_URI_ENV, f"sqlite:///{tmp_path / 'elsewhere' / 'named.db'}")
    assert Tracking.from_params(params).artifact_root == tmp_path / "elsewhere" / "artifacts"  # not ./mlruns


# ----------------------------------------------------------------------------------------------- faults
def test_unreachable_tracking_fails_clearly_unless_disabled(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv(TRACKING_URI_ENV, uri)
    params = params_for(data_root, tmp_path / "on", **{"train.epochs": 1})
    started = time.monotonic()
    with pytest.raises(TrackingError, match=uri.replace(".", r"\.")) as caught:
        train(params)
    assert "3 time(s)" in str(caught.value)  # first attempt + mlflow.retries = 2
    assert time.monotonic() - started < 30
    assert not (Path(params.train.model_dir) / "model.pt").exists()  # failed before training, not after

    off = params_for(data_root, tmp_path / "off", **{"train.epochs": 1, "mlflow.enabled": False})
    train(off)
    evaluate(off)
    assert read_pointer(train_pointer(off)) == {"run_id": None}
    assert register(off).decision == "skipped"


def test_server_down_during_register_moves_no_alias_and_leaves_nothing_half_registered(
    models: dict[str, Params], server: MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = server.client()
    bad, good = named(models["bad"], "fault"), named(models["good"], "fault")
    name = model_name(good)
    register(bad)
    before = aliases(client, name)
    assert before == {"challenger": "1", "champion": "1"}

    # 1. a step fails after the version exists, server up: aliases restored, version deleted at once
    original = registry.wait_until_ready

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise TrackingError("injected failure before the aliases move")

    monkeypatch.setattr(registry, "wait_until_ready", refuse)
    with pytest.raises(TrackingError, match="injected"):
        register(good)
    assert versions(client, name) == ["1"] and aliases(client, name) == before

    # 2. the server dies once the version exists: nothing can be undone now...
    def die_then_wait(*args: Any, **kwargs: Any) -> None:
        server.stop()
        original(*args, **kwargs)

    monkeypatch.setattr(registry, "wait_until_ready", die_then_wait)
    uri = server.uri.replace(".", r"\.")
    with pytest.raises(TrackingError, match=uri):
        register(good)
    monkeypatch.setattr(registry, "wait_until_ready", original)
    # ... and a register while it is down fails before touching anything, naming the URI
    with pytest.raises(TrackingError, match=uri):
        register(good)

    server.start()
    assert aliases(client, name) == before  # no alias moved
    orphans = [v for v in versions(client, name) if v != "1"]
    assert len(orphans) == 1  # the version of step 2, and nothing from the register while down
    orphan = client.get_model_version(name, orphans[0])
    assert orphan.tags[STATE_TAG] == "pending" and not orphan.aliases  # never served, marked for removal
    result = register(good)  # recovery first: the orphan goes, then the registration completes
    assert result.decision == "promoted"
    assert versions(client, name) == ["1", result.version]
    assert aliases(client, name) == {"challenger": result.version, "champion": result.version}


def test_database_down_during_register_moves_no_alias_and_the_next_register_recovers(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tracking server's PostgreSQL stops accepting connections mid-registration: a clear failure naming the
    server, the champion unchanged, and once the database is back the next registration completes."""
    import psycopg

    with postgres_database("mlflow") as backend_uri:
        database = backend_uri.rsplit("/", 1)[1]

        def accept_connections(allowed: bool) -> None:
            with psycopg.connect(f"postgresql://postgres@{POSTGRES[0]}:{POSTGRES[1]}/postgres", autocommit=True) as db:
                db.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS {str(allowed).lower()}')
                if not allowed:  # and drop the server's pooled connections: the database is gone for it
                    db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", [database])

        (tmp_path / "server").mkdir()
        pg_server = MlflowServer(tmp_path / "server", backend_uri=backend_uri)
        pg_server.start()
        try:
            monkeypatch.setenv(TRACKING_URI_ENV, pg_server.uri)
            bad = params_for(data_root, tmp_path / "bad", **{"train.epochs": 1, "train.lr": 0.0003})
            good = params_for(data_root, tmp_path / "good", **{"train.epochs": 6, "train.patience": 6})
            for params in (bad, good):
                train(params)
                evaluate(params)
            assert register(bad).decision == "promoted"
            client, name = pg_server.client(), model_name(good)
            before = aliases(client, name)
            assert before == {"challenger": "1", "champion": "1"}

            original = registry.wait_until_ready

            def database_goes_down(*args: Any, **kwargs: Any) -> None:
                accept_connections(False)
                original(*args, **kwargs)

            monkeypatch.setattr(registry, "wait_until_ready", database_goes_down)
            with pytest.raises(TrackingError, match=pg_server.uri.replace(".", r"\.")):
                register(good)
            monkeypatch.setattr(registry, "wait_until_ready", original)
            with pytest.raises(TrackingError, match=pg_server.uri.replace(".", r"\.")):
                register(good)  # while it is down: fails before touching anything

            accept_connections(True)
            assert aliases(client, name) == before  # nobody was served a half-registered model
            assert versions(client, name) == ["1", "2"]  # the version created before the database went down
            assert client.get_model_version(name, "2").tags[STATE_TAG] == "pending"  # marked for removal
            result = register(good)
            assert result.decision == "promoted"
            assert aliases(client, name) == {"challenger": result.version, "champion": result.version}
            assert versions(client, name) == ["1", result.version] and result.version != "2"  # orphan removed
        finally:
            pg_server.stop()
