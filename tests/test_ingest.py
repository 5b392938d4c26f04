"""Ingestion of fresh logs: dated file collection (local and fsspec), validation with quarantine, the
date-partitioned store (idempotent, order-free, read back by the download stage), the replay of a dataset with real
timestamps, the ``ingest`` command and the warm start of training. Tiny files, no Airflow, no MLflow."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from pathlib import Path

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.cli import main
from pipeline.data.download import download
from pipeline.data.events import AFTER_WINDOW
from pipeline.data.quarantine import BadInputError
from pipeline.ingest.inbox import collect, file_day
from pipeline.ingest.replay import replay
from pipeline.ingest.retrain import Interval, training_overrides
from pipeline.ingest.store import STORE_SCHEMA, count_events, merge, partition_files, read_store
from pipeline.ingest.validate import DUPLICATE_REASON, BatchOutputs, validate_logs
from pipeline.model import build_model
from pipeline.params import CustomSourceParams, Params, load_params
from pipeline.training.train import TrainOutputs, train, warm_start
from tests.conftest import REPO_ROOT, tiny_retrain, write_params, write_text

DAY = 86_400
T0 = int(datetime(2024, 1, 5, tzinfo=UTC).timestamp())  # 2024-01-05 00:00 UTC


def events_frame(rows: list[tuple[str, str, int]], rating: bool = False) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    if rating:
        frame["rating"] = [float(i % 5 + 1) for i in range(len(frame))]
    return frame


# ----------------------------------------------------------------------------------------------- inbox
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("2024-01-05.csv", date(2024, 1, 5)),
        ("events_20240105.jsonl.gz", date(2024, 1, 5)),
        ("date=2024-01-05/part-0.parquet", date(2024, 1, 5)),
        ("2024-13-45.csv", None),  # not a calendar date
        ("part-123456789.csv", None),  # digits that are no date
        ("shipper-7/2024-02-29.csv", date(2024, 2, 29)),
        ("undated.csv", None),
    ],
)
def test_file_day_reads_the_date_in_the_path(name: str, expected: date | None) -> None:
    assert file_day(name) == expected


def _inbox(root: Path) -> Path:
    for name in (
        "2024-01-04.csv",
        "2024-01-05.csv",
        "sub/events_20240105.jsonl",
        "2024-01-06.csv",
        "undated.csv",
        "2024-01-05.txt",  # not a log format
        ".2024-01-05.csv.x1.tmp",  # a writer's temporary file
    ):
        write_text(root / name, "user_id,item_id,timestamp\n1,2,3\n")
    (root / "date=2024-01-05").mkdir()
    pq.write_table(pa.table({"user_id": ["1"]}), root / "date=2024-01-05" / "part-0.parquet")
    return root


def test_collect_stages_exactly_the_files_of_the_interval(tmp_path: Path) -> None:
    inbox = _inbox(tmp_path / "inbox")
    staging = tmp_path / "staging"
    write_text(staging / "stale.csv", "left by an earlier attempt\n")
    start, end = datetime(2024, 1, 5, tzinfo=UTC), datetime(2024, 1, 6, tzinfo=UTC)
    files = collect(str(inbox), "**", start, end, staging)
    assert sorted(Path(f.local).relative_to(staging).as_posix() for f in files) == [
        "2024-01-05.csv",
        "date=2024-01-05/part-0.parquet",
        "sub/events_20240105.jsonl",
    ]
    assert not (staging / "stale.csv").exists()
    assert {f.day for f in files} == {"2024-01-05"}
    assert all(f.source.startswith("file://") and len(f.sha256) == 64 for f in files)
    # a weekly interval takes seven days of files; the same interval again stages the same files
    week = collect(str(inbox), "*.csv", datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 8, tzinfo=UTC), staging)
    assert [Path(f.local).name for f in week] == ["2024-01-04.csv", "2024-01-05.csv", "2024-01-06.csv"]


def test_collect_reads_any_fsspec_url(tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/hymoe-inbox-test/2024-01-05.csv", b"user_id,item_id,timestamp\n1,2,3\n")
    fs.pipe_file("/hymoe-inbox-test/2024-01-07.csv", b"user_id,item_id,timestamp\n1,2,3\n")
    try:
        start, end = datetime(2024, 1, 5, tzinfo=UTC), datetime(2024, 1, 6, tzinfo=UTC)
        files = collect("memory://hymoe-inbox-test", "**", start, end, tmp_path / "staging")
        assert [f.source for f in files] == ["memory:///hymoe-inbox-test/2024-01-05.csv"]
        assert Path(files[0].local).read_text().startswith("user_id")
        assert collect("memory://hymoe-absent", "**", start, end, tmp_path / "other") == []
    finally:
        fs.rm("/hymoe-inbox-test", recursive=True)


# ----------------------------------------------------------------------------------------------- validation
def test_validate_quarantines_bad_rows_with_reasons_and_keeps_the_good(tmp_path: Path) -> None:
    good = "\n".join(f"u{i},i{i % 7},{T0 + i}" for i in range(40))
    csv = write_text(
        tmp_path / "2024-01-05.csv",
        "user_id,item_id,timestamp\n"
        f"{good}\n"
        f"u1,i1,{T0 + 1}\n"  # line 42: repeats line 3
        f"u9,,{T0}\n"  # line 43: missing item
        "u9,i9,yesterday-ish\n"  # line 44: unparsable time
        f"u9,i9,{T0 * 1000}\n"  # line 45: milliseconds
        f"u9,i9,{T0},extra\n",  # line 46: extra field
    )
    record = json.dumps({"user_id": "v1", "item_id": "i1", "timestamp": T0})
    jsonl = write_text(tmp_path / "2024-01-05.jsonl", record + "\n")  # complete: a last line ends with its newline
    report = validate_logs([csv, jsonl], CustomSourceParams(), 0.2, tmp_path / "out", now=T0 + DAY)
    assert (report.files, report.rows, report.events, report.malformed, report.duplicates) == (2, 46, 41, 4, 1)
    outputs = BatchOutputs.under(tmp_path / "out")
    quarantine = pd.read_csv(outputs.quarantine)
    assert sorted(zip(quarantine["line"], quarantine["reason"], strict=True)) == [
        (0, DUPLICATE_REASON),  # found after parsing: line 0, the parsed values as raw text
        (43, "missing item_id"),
        (44, "bad timestamp"),
        (45, AFTER_WINDOW),  # the reader's window: the row's own line number
        (46, "expected 3 fields, got 4"),
    ]
    assert (quarantine["source"] == str(csv)).all()
    batch = pq.read_table(outputs.batch)
    assert batch.schema == STORE_SCHEMA and batch.num_rows == 41
    assert json.loads(outputs.report.read_text())["events"] == 41


def test_validate_fails_clearly_above_the_bad_fraction_after_writing_the_quarantine(tmp_path: Path) -> None:
    csv = write_text(tmp_path / "2024-01-05.csv", "user_id,item_id,timestamp\na,b,1\n,b,2\na,,3\n")
    with pytest.raises(BadInputError, match=r"retrain\.max_bad_fraction=0\.1"):
        validate_logs([csv], CustomSourceParams(), 0.1, tmp_path / "out")
    outputs = BatchOutputs.under(tmp_path / "out")
    assert len(pd.read_csv(outputs.quarantine)) == 2
    assert not outputs.batch.exists()  # nothing for the merge to pick up


def test_validate_of_no_files_is_an_empty_batch(tmp_path: Path) -> None:
    report = validate_logs([], CustomSourceParams(), 0.0, tmp_path / "out")
    assert report.events == 0
    assert pq.read_table(BatchOutputs.under(tmp_path / "out").batch).num_rows == 0


# ----------------------------------------------------------------------------------------------- store
def test_store_merge_is_idempotent_and_independent_of_arrival_order(tmp_path: Path) -> None:
    first = events_frame([("u1", "a", T0), ("u2", "b", T0 + 10), ("u1", "c", T0 + DAY + 5)], rating=True)
    second = events_frame([("u1", "c", T0 + DAY + 5), ("u3", "a", T0 + 2 * DAY), ("u3", "a", T0 + 2 * DAY)])
    one, two = tmp_path / "one", tmp_path / "two"
    assert merge(one, first).added == 3
    result = merge(one, second)
    assert (result.added, result.duplicates) == (1, 2)  # one already stored, one repeated inside the batch
    assert merge(one, second).added == 0 and merge(one, first).added == 0
    merge(two, second)
    merge(two, first)
    stored = read_store(one)
    assert stored.num_rows == count_events(one) == 4
    assert [p.parent.name for p in partition_files(one)] == ["date=2024-01-05", "date=2024-01-06", "date=2024-01-07"]
    # the event seen first keeps its values (here: the rating of `first` in store one)
    assert read_store(two).drop(["rating"]).equals(stored.drop(["rating"]))
    assert stored.column("rating").null_count == 1
    assert not [p for p in one.rglob("*") if p.name.endswith(".tmp")]


def test_store_is_read_back_by_the_download_stage(tmp_path: Path) -> None:
    merge(tmp_path / "store", events_frame([(f"u{i}", f"i{i % 3}", T0 + i * 3600) for i in range(60)], rating=True))
    params = load_params(REPO_ROOT / "params.yaml", tiny_retrain(tmp_path))
    run = load_params(REPO_ROOT / "params.yaml", {**tiny_retrain(tmp_path), **training_overrides(params, _day())})
    outputs = download(run.data)
    table = pq.read_table(outputs.interactions)
    # the interval's run sees only events before the interval's end, even when later days are in the store
    before_end = sum(T0 + i * 3600 < _day().end.timestamp() for i in range(60))
    assert 0 < before_end < 60
    assert table.num_rows == before_end and set(table.column_names) == {"user_id", "item_id", "timestamp", "rating"}
    assert json.loads(outputs.manifest.read_text())["rows"]["quarantined"] == 0


def _day() -> Interval:
    return Interval.parse("2024-01-05")


# ----------------------------------------------------------------------------------------------- replay and CLI
@pytest.fixture(scope="module")
def synthetic_total(tmp_path_factory: pytest.TempPathFactory) -> int:
    root = tmp_path_factory.mktemp("synthetic")
    params = load_params(REPO_ROOT / "params.yaml", tiny_retrain(root))
    return pq.read_metadata(download(params.data).interactions).num_rows


@pytest.mark.parametrize("period", ["day", "week"])
def test_replay_cuts_history_into_the_store_and_later_periods_into_dated_logs(
    tmp_path: Path, period: str, synthetic_total: int
) -> None:
    params = load_params(REPO_ROOT / "params.yaml", tiny_retrain(tmp_path))
    cut = date(2021, 2, 15)
    result = replay(params, cut, period)  # type: ignore[arg-type]
    assert result.store_events == count_events(tmp_path / "store") > 0
    assert result.store_events + sum(result.events_per_file) == synthetic_total  # nothing lost, nothing twice
    assert int(read_store(tmp_path / "store").column("timestamp").to_numpy().max()) < _midnight(cut)
    step = 1 if period == "day" else 7
    for name, count in zip(result.files, result.events_per_file, strict=True):
        first = date.fromisoformat(Path(name).stem)
        assert (first - cut).days % step == 0
        frame = pd.read_csv(name)
        assert len(frame) == count and list(frame.columns) == ["user_id", "item_id", "timestamp"]
        assert frame["timestamp"].between(_midnight(first), _midnight(first) + step * DAY - 1).all()
    again = replay(params, cut, period)  # type: ignore[arg-type]
    assert again.store_events == 0 and again.files == result.files


def test_replay_refuses_a_copy_without_timestamps(tmp_path: Path, no_mirror_env: None) -> None:
    mirror = tmp_path / "mirror"
    write_text(mirror / "ml-1m" / "ml-1m.txt", "".join(f"{u} {i}\n" for u in range(1, 4) for i in range(1, 6)))
    params = load_params(
        REPO_ROOT / "params.yaml", tiny_retrain(tmp_path, **{"data.dataset": "ml-1m", "data.mirror": str(mirror)})
    )
    with pytest.raises(ValueError, match="no real timestamps"):
        replay(params, date(2000, 1, 1))
    assert not (tmp_path / "store").exists()


def test_ingest_command_merges_an_interval_once(tmp_path: Path) -> None:
    params_file = write_params(tmp_path / "params.yaml", tiny_retrain(tmp_path))
    assert main(["--params", str(params_file), "replay", "--cut", "2021-02-15", "--until", "2021-02-17"]) == 0
    before = count_events(tmp_path / "store")
    arrived = len(pd.read_csv(tmp_path / "inbox" / "2021-02-15.csv"))
    for _ in range(2):  # the second run finds every event already stored
        assert main(["--params", str(params_file), "ingest", "--start", "2021-02-15"]) == 0
        assert count_events(tmp_path / "store") == before + arrived
    merged = json.loads((tmp_path / "work" / "20210215T000000_20210216T000000" / "ingest" / "merge.json").read_text())
    assert merged["added"] == 0 and merged["duplicates"] == arrived


# ----------------------------------------------------------------------------------------------- warm start
def test_warm_start_loads_weights_only_for_the_same_catalogue_and_architecture(tmp_path: Path) -> None:
    from pipeline.data.layout import PreprocessOutputs
    from pipeline.data.preprocess import preprocess

    params: Params = load_params(REPO_ROOT / "params.yaml", tiny_retrain(tmp_path / "a"))
    download(params.data)
    preprocess(params.preprocess, params.data.interim_dir)
    train(params)
    source = TrainOutputs.under(params.train.model_dir)
    item_map = PreprocessOutputs.under(params.preprocess.processed_dir).item_map
    n_items = json.loads(source.config.read_text())["num_items"]

    model = build_model(params.model, n_items)
    assert warm_start(model, source.model.parent, params.model, item_map)
    saved = torch.load(source.model, weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())

    other_map = tmp_path / "other_item_map.parquet"
    table = pq.read_table(item_map)
    raw = table.column("raw_item_id").cast(pa.string()).to_pylist()
    pq.write_table(table.set_column(1, "raw_item_id", pa.array(raw[::-1])), other_map)  # same size, other items
    assert not warm_start(build_model(params.model, n_items), source.model.parent, params.model, other_map)
    wider = load_params(REPO_ROOT / "params.yaml", tiny_retrain(tmp_path / "a", **{"model.hidden_size": 32}))
    assert not warm_start(build_model(wider.model, n_items), source.model.parent, wider.model, item_map)
    # a setting of another model kind (model.json leaves those sections out) is not another architecture
    other_kind = load_params(REPO_ROOT / "params.yaml", tiny_retrain(tmp_path / "a", **{"model.mamba.dropout": 0.1}))
    assert warm_start(build_model(other_kind.model, n_items), source.model.parent, other_kind.model, item_map)
    with pytest.raises(FileNotFoundError, match="warm_start_from"):
        warm_start(model, tmp_path / "missing", params.model, item_map)

    # a champion saved before a parameter existed (here moe.expert_dropout) still warm-starts at that default;
    # one saved by a newer version, with a parameter unknown here, is treated as another architecture
    config = json.loads(source.config.read_text())
    for folder, edit in (("older", lambda moe: moe.pop("expert_dropout")), ("newer", lambda moe: moe.update(x=1))):
        copy_dir = tmp_path / folder
        copy_dir.mkdir()
        (copy_dir / "model.pt").write_bytes(source.model.read_bytes())
        edited = json.loads(json.dumps(config))
        edit(edited["model"]["moe"])
        (copy_dir / "model.json").write_text(json.dumps(edited))
        loaded = warm_start(build_model(params.model, n_items), copy_dir, params.model, item_map)
        assert loaded == (folder == "older")

    # a warm-started run continues the MoE warm-up w(t) from the source's step instead of fading experts in again
    source_step = int(saved["train_step"])
    assert source_step > 0
    continued = load_params(
        REPO_ROOT / "params.yaml",
        tiny_retrain(
            tmp_path / "a",
            **{"train.warm_start_from": str(source.model.parent), "train.model_dir": str(tmp_path / "warm")},
        ),
    )
    train(continued)
    steps_per_epoch = int(pd.read_csv(source.log)["step"].iloc[0])  # same data and batch size in both runs
    assert int(pd.read_csv(TrainOutputs.under(tmp_path / "warm").log)["step"].iloc[0]) == source_step + steps_per_epoch

    warm = load_params(
        REPO_ROOT / "params.yaml",
        tiny_retrain(
            tmp_path / "a",
            **{"train.model_dir": str(tmp_path / "b"), "train.warm_start_from": str(source.model.parent)},
        ),
    )
    train(warm)  # the train stage itself: starts from the weights above, then trains as usual
    config = json.loads(TrainOutputs.under(tmp_path / "b").config.read_text())
    assert config["steps"] == source_step + config["epochs_run"] * steps_per_epoch  # the step count carried on


def _midnight(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())
