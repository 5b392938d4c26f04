"""The reproduction study end to end on a tiny spec: plan, resumable runs, records, MLflow, RESULTS.md."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.params import load_params
from pipeline.study.__main__ import main
from pipeline.study.plan import config_digest, load_spec, plan, resolved_settings, run_params
from pipeline.study.report import (
    CAPPED_NOTE,
    INTERIM_NOTE,
    METRICS,
    ON_GPU_NOTE,
    Variant,
    comparison_table,
    marks,
    precedence,
    speed_table,
    stopped_by_cap,
    versus,
    wilcoxon_p,
)
from pipeline.study.runner import claimed, decode_per_user, encode_per_user, prepare_data
from tests.conftest import REPO_ROOT, TINY_MODEL

TINY_SPEC = {
    "datasets": {
        "synthetic": {
            "description": "tiny synthetic logs",
            "overrides": {
                "data.dataset": "synthetic",
                "data.synthetic.n_users": 150,
                "data.synthetic.n_items": 60,
                "data.synthetic.mean_events_per_user": 12.0,
                "model.max_seq_len": 12,
                "train.epochs": 2,
                "train.batch_size": 64,
                **TINY_MODEL,
            },
            "seeds": [1, 2],
            "seeds_by_variant": {"no-dense": [1]},
            "target_ndcg10": 0.99,
        }
    },
    "groups": {
        "main": {"datasets": ["synthetic"], "title": "Comparison"},
        "ablation": {"datasets": ["synthetic"], "base": "hymoerec", "title": "Ablations"},
        "search": {"datasets": ["synthetic"], "base": "hymoerec", "title": "Search", "seeds": [1]},
    },
    "variants": {
        "hymoerec": {"group": "main", "label": "HyMoERec", "overrides": {"model.kind": "hymoerec"}},
        "sasrec": {"group": "main", "label": "SASRec", "overrides": {"model.moe.enabled": False}},
        "no-dense": {"group": "ablation", "label": "pure sparse", "overrides": {"model.moe.dense_branch": False}},
        "wide": {"group": "search", "label": "wide experts", "overrides": {"model.moe.expert_hidden": 32}},
        "elsewhere": {"group": "search", "datasets": ["ml-1m"], "label": "only on ml-1m", "overrides": {}},
    },
    "published": {"synthetic": [{"model": "Elsewhere", "hr@10": 0.5, "ndcg@10": 0.25, "source": "a paper"}]},
}


@pytest.fixture
def study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(TINY_SPEC, sort_keys=False))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    return tmp_path


def cli(study: Path, *args: str, params: Path = REPO_ROOT / "params.yaml") -> int:
    common = ["--params", str(params), "--spec", str(study / "spec.yaml"), "--work-dir", str(study / "work")]
    return main([*common, "--records", str(study / "results"), *args])


def test_the_project_spec_plans_the_issue_table() -> None:
    spec = load_spec()
    beauty = plan(spec, "beauty")
    main_runs = [(r.variant, r.seed) for r in beauty if r.group == "main"]
    baselines = ("gru4rec", "narm", "bert4rec", "mamba4rec", "flop-matched")
    five = [(m, s) for m in ("hymoerec", "sasrec") for s in (1, 2, 3, 4, 5)]  # issue 26: the main claim, 5 seeds
    assert sorted(main_runs) == sorted(five + [(m, s) for m in baselines for s in (1, 2, 3)])
    assert [r.seed for r in beauty if r.group == "main"] == sorted(r.seed for r in beauty if r.group == "main")
    assert {r.variant for r in beauty if r.group == "ablation"} >= {"no-dense", "no-warmup", "no-balance", "top-1"}
    ml = [r for r in plan(spec, "ml-1m") if r.group == "main"]
    assert {(r.variant, len([x for x in ml if x.variant == r.variant])) for r in ml} == {
        ("hymoerec", 5),
        ("sasrec", 5),
        ("flop-matched", 3),
        ("gru4rec", 3),
        ("narm", 3),
        ("bert4rec", 3),
        ("mamba4rec", 3),
    }
    flop = run_params(next(r for r in ml if r.variant == "flop-matched"), REPO_ROOT / "params.yaml").model
    # dense + the K chosen experts cost SASRec's FFN: the same hidden units per token
    assert flop.moe.dense_hidden + flop.moe.top_k * flop.moe.expert_hidden == flop.ffn_hidden
    searched = {r.variant for r in plan(spec, "ml-1m") if r.group == "search"}
    for knob in ("hidden-128", "layers-3", "lr-0.0005", "lr-0.002", "dropout-0.1", "dropout-0.3", "batch-128"):
        assert {knob, f"sasrec-{knob}"} <= searched  # HyMoERec and SASRec each get their best
    levels = [d for d, data in spec["datasets"].items() if "heterogeneity" in data]
    assert sorted(spec["datasets"][d]["heterogeneity"] for d in levels) == [1, 2, 3]
    for dataset in levels:
        assert {(r.variant, r.seed) for r in plan(spec, dataset)} == {
            (m, s) for m in ("hymoerec", "sasrec") for s in (1, 2, 3)
        }
    assert not [r for r in plan(spec, "ml-1m") if r.group == "ablation"]  # ablations are Beauty-only
    assert {r.seed for r in plan(spec, "beauty") if r.group == "search"} == {1}  # the screen: one seed
    params = run_params(next(r for r in ml if r.variant == "sasrec"), REPO_ROOT / "params.yaml")
    assert (params.model.max_seq_len, params.model.moe.enabled, params.mlflow.experiment_prefix) == (
        200,
        False,
        "study",
    )
    for run in (r for r in beauty if r.group == "main" and r.seed == 1):  # a baseline is its published network
        label = spec["variants"][run.variant]["label"].split(",")[0]  # "HyMoERec, FLOP-matched": a HyMoERec
        assert run_params(run, REPO_ROOT / "params.yaml").model.display_name == label, run.variant
    ablation = run_params(next(r for r in beauty if r.variant == "no-dense"), REPO_ROOT / "params.yaml")
    assert ablation.model.uses_moe and not ablation.model.moe.dense_branch and ablation.model.dropout == 0.5


def test_make_run_is_the_study_run_of_a_results_row() -> None:
    """``make run`` (``dvc repro`` on params.yaml) trains exactly the study's Beauty HyMoERec run of seed 1: every
    setting that can change a result agrees, so the same seed gives that RESULTS.md row's record."""
    spec = load_spec()
    run = next(r for r in plan(spec, "beauty") if r.variant == "hymoerec" and r.seed == 1)
    defaults = load_params(REPO_ROOT / "params.yaml")
    assert defaults.train.seed == run.seed
    assert resolved_settings(defaults) == resolved_settings(run_params(run, REPO_ROOT / "params.yaml"))
    assert config_digest(defaults) == config_digest(run_params(run, REPO_ROOT / "params.yaml"))


def test_status_lists_the_pending_runs_as_gpu_study_jobs(study: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``status --jobs`` prints what is left, in plan order, as benchmarks/gpu_study.sh's JOBS list."""
    (study / "results" / "synthetic").mkdir(parents=True)
    (study / "results" / "synthetic" / "hymoerec-seed1.json").write_text("{}")  # finished: not a job
    assert cli(study, "status", "--jobs", "--variants", "hymoerec", "sasrec") == 0
    assert capsys.readouterr().out.strip() == "synthetic sasrec 1,synthetic hymoerec 2,synthetic sasrec 2"


def test_per_user_values_round_trip_and_the_test_is_paired() -> None:
    rng = np.random.default_rng(0)
    values = np.where(rng.random(1000) < 0.9, 0.0, rng.random(1000)).astype(np.float32)
    block = encode_per_user(np.arange(1000), values)
    np.testing.assert_array_equal(decode_per_user(block), values)
    assert len(block["data"]) < 0.5 * values.nbytes  # mostly zeros: packs well
    assert wilcoxon_p(values, values) == 1.0
    better = values + np.where(values > 0, 0.05, 0.0)
    assert wilcoxon_p(better, values) < 1e-6
    noise = values + rng.normal(0, 0.01, 1000) * (values > 0)
    assert wilcoxon_p(noise, values) > 0.01


def test_the_paired_test_sets_each_model_against_the_other_on_the_seeds_both_finished() -> None:
    rng = np.random.default_rng(1)
    users = np.arange(2000)

    def record(seed: int, values: np.ndarray) -> dict:
        return {"seed": seed, "per_user_test": encode_per_user(users, values.astype(np.float32))}

    ours_by_seed = {seed: rng.random(2000) * (rng.random(2000) < 0.2) for seed in (1, 2, 3)}
    ours = Variant("hymoerec", "HyMoERec", "main", [record(s, v) for s, v in ours_by_seed.items()], [], [])
    theirs_seed1 = ours_by_seed[1] * 0.9  # one seed, clearly below our seed 1
    theirs = Variant("ablation", "Ablation", "ablation", [record(1, theirs_seed1)], [], [])
    p = wilcoxon_p(ours_by_seed[1], theirs_seed1)
    delta = float(np.mean(ours_by_seed[1] - theirs_seed1))
    assert versus(ours, theirs) == f"{delta:+.4f}, p < 1e-4 ▲ (seed 1)" and p < 1e-4
    elsewhere = Variant("other", "Other", "ablation", [record(7, theirs_seed1)], [], [])
    assert versus(ours, elsewhere).endswith("(no seed in common)")  # falls back to every seed of each


def test_the_speed_table_reads_records_from_before_cpu_time_was_logged() -> None:
    def record(seed: int, cpu: list[float] | None) -> dict:
        times = {"epoch_seconds": [10.0, 12.0]} | ({} if cpu is None else {"epoch_cpu_seconds": cpu})
        return {"seed": seed, "epochs_run": 2, "best_epoch": 1, "seconds_to_best": 10.0, "torch_threads": 1, **times}

    old = Variant("a", "Old", "main", [record(1, None)], [], [])
    mixed = Variant("b", "Mixed", "main", [record(1, None), record(2, [8.0, 9.0])], [], [])
    new = Variant("c", "New", "main", [record(1, [8.0, 9.0])], [], [])
    old_row, mixed_row, new_row = speed_table([old, mixed, new])[2:]
    assert old_row.split(" | ")[3] == "–"
    assert mixed_row.split(" | ")[3] == "8.5 (1 of the seeds)"
    assert new_row.split(" | ")[2:4] == ["11.0", "8.5"]


def test_a_run_trained_on_a_gpu_is_marked_and_its_times_are_not_read_as_this_cpus() -> None:
    def record(seed: int, device: str) -> dict:
        return {
            "seed": seed,
            "device": device,
            "epochs_run": 2,
            "best_epoch": 1,
            "epoch_seconds": [1.0, 1.0] if device == "cuda" else [10.0, 12.0],
            "epoch_cpu_seconds": [30.0, 30.0] if device == "cuda" else [8.0, 9.0],  # a GPU run's host threads
            "seconds_to_best": 10.0,
            "torch_threads": 16 if device == "cuda" else 2,
            "metrics": {"test": dict.fromkeys(METRICS, 0.1)},
            "per_user_test": encode_per_user(np.arange(10), np.linspace(0, 1, 10, dtype=np.float32)),
        }

    cpu = Variant("hymoerec", "HyMoERec", "main", [record(1, "cpu")], [], [])
    gpu = Variant("mamba4rec", "Mamba4Rec", "main", [record(1, "cuda")], [], [])
    mixed = Variant("sasrec", "SASRec", "main", [record(1, "cpu"), record(2, "cuda")], [], [])
    table = comparison_table([cpu, gpu, mixed])
    assert table[3].startswith("| Mamba4Rec § | 1 |") and table[4].startswith("| SASRec § | 2 |")
    assert table[2].startswith("| **HyMoERec** | 1 |") and table[-1] == ON_GPU_NOTE
    # the speed table never averages a GPU's seconds with the CPU's: GPU seeds get a row of their own
    speed = speed_table([cpu, gpu, mixed])
    cells = [row.split(" | ") for row in speed[2:6]]
    assert [c[0] for c in cells] == ["| HyMoERec", "| Mamba4Rec (GPU)", "| SASRec", "| SASRec (GPU)"]
    assert [c[2] for c in cells] == ["11.0", "1.0", "11.0", "1.0"]
    assert [c[3] for c in cells] == ["8.5", "–", "8.5", "–"]  # a GPU run's host CPU time is not shown
    assert [c[4] for c in cells] == ["2 (1)", "2 (1)§", "2 (1)", "2 (1)§"]
    assert [c[6] for c in cells] == ["2 |", "GPU |", "2 |", "GPU |"]
    assert "§" not in "".join(comparison_table([cpu]))
    # a record from before devices were recorded counts as the CPU's; the marks keep their order
    older = {k: v for k, v in record(1, "cpu").items() if k != "device"}
    assert marks([older]) == ""
    interim_gpu = {**record(1, "cuda"), "interim": True, "settings": {"train.epochs": 2, "train.patience": 10}}
    assert marks([interim_gpu]) == "†‡§"


def test_a_run_that_the_epoch_cap_ended_is_marked_in_the_tables() -> None:
    """Still improving within the last `patience` epochs at the cap: the tables say that the cap ended the run."""

    def record(seed: int, epochs_run: int, best_epoch: int) -> dict:
        return {
            "seed": seed,
            "epochs_run": epochs_run,
            "best_epoch": best_epoch,
            "settings": {"train.epochs": 200, "train.patience": 10},
            "metrics": {"test": dict.fromkeys(METRICS, 0.1)},
            "per_user_test": encode_per_user(np.arange(10), np.linspace(0, 1, 10, dtype=np.float32)),
            "epoch_seconds": [10.0],
            "seconds_to_best": 10.0,
            "torch_threads": 1,
        }

    assert stopped_by_cap(record(1, 200, 195)) and stopped_by_cap(record(1, 200, 191))
    assert not stopped_by_cap(record(1, 200, 190))  # early stopping fired at the cap
    assert not stopped_by_cap(record(1, 120, 115))  # a run still going (or resumed) is not capped
    assert not stopped_by_cap({"epochs_run": 200, "best_epoch": 199})  # records without settings: no claim
    converged = Variant("hymoerec", "HyMoERec", "main", [record(1, 78, 68)], [], [])
    capped = Variant("gru4rec", "GRU4Rec", "main", [record(1, 78, 68), record(2, 200, 195)], [], [])
    table = comparison_table([converged])
    assert table[-1].startswith("| **HyMoERec** | 1 |") and "†" not in "".join(table)
    rows = comparison_table([converged, capped])
    assert rows[3].startswith("| GRU4Rec † | 2 |") and rows[-1].startswith("† at least one seed ran into")
    speed = speed_table([converged, capped])
    assert speed[3].split(" | ")[4] == "78 (68), 200 (195)†" and speed[-1] == rows[-1]


def test_an_unfinished_run_is_an_interim_result_until_it_finishes(
    study: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run longer than a machine is held: its best weights so far are evaluated and marked ‡ in the tables, and
    the finished run, resumed from the same checkpoint, replaces them."""
    from pipeline.training.train import train

    params_file = REPO_ROOT / "params.yaml"
    run = plan(load_spec(study / "spec.yaml"), "synthetic", variants=["hymoerec"], seeds=[1])[0]
    prepare_data(run, params_file, study / "work")

    class MachineTakenBack(Exception):
        pass

    def take_back(row: dict) -> None:
        raise MachineTakenBack

    with pytest.raises(MachineTakenBack):  # after the first epoch's checkpoint, as when a session ends
        train(run_params(run, params_file, study / "work"), on_epoch=take_back)

    assert cli(study, "interim", "--variants", "hymoerec", "sasrec") == 0  # sasrec never started: nothing to take
    records = study / "results" / "synthetic"
    assert [p.name for p in records.glob("*.json")] == ["hymoerec-seed1.interim.json"]
    recorded = (records / "hymoerec-seed1.interim.json").stat().st_mtime
    assert cli(study, "interim") == 0  # no epoch trained since: nothing to do again
    assert (records / "hymoerec-seed1.interim.json").stat().st_mtime == recorded
    interim = json.loads((records / "hymoerec-seed1.interim.json").read_text())
    assert interim["interim"] is True and (interim["epochs_run"], interim["best_epoch"]) == (1, 1)
    # the weights evaluated are the best epoch's: they score validation as training did
    assert interim["metrics"]["valid"]["ndcg@10"] == pytest.approx(interim["valid_ndcg@10_by_epoch"][0], abs=1e-5)
    capsys.readouterr()
    assert cli(study, "status", "--variants", "hymoerec", "--seeds", "1") == 0
    assert capsys.readouterr().out.split()[-3:] == ["pending", "(interim", "result)"]

    assert cli(study, "report", "--out", str(study / "interim.md")) == 0
    text = (study / "interim.md").read_text()
    assert "0 of 6 planned runs finished, 1 interim." in text
    assert "| **HyMoERec** ‡ | 1 |" in text and INTERIM_NOTE in text and ", 1 seed(s) ‡)" in text  # and the target
    assert "- HyMoERec seed 1: unfinished, in the tables as an interim result (best validation at epoch 1 of 1" in text
    assert re.search(r"\n\| HyMoERec ‡ \| [0-9.]+ \|", text)  # the bucket table
    speed_row = r"\n\| HyMoERec \| 1 \| [0-9.]+ \| [0-9.]+ \| 1 \(1\)‡ \| [0-9]+ \| – \|"  # threads: unknown
    assert re.search(speed_row, text)

    from mlflow import MlflowClient

    # the study's own store, explicitly: an earlier test may have left mlflow's global tracking URI on a stopped server
    client = MlflowClient(tracking_uri=f"sqlite:///{study / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("study-synthetic").experiment_id
    runs = client.search_runs([experiment], "tags.`study.interim` = 'true'")
    assert [run.data.tags["study.variant"] for run in runs] == ["hymoerec"]  # told apart in the MLflow UI

    assert cli(study, "run", "--variants", "hymoerec", "--seeds", "1") == 0  # resumes after epoch 1
    finished = json.loads((records / "hymoerec-seed1.json").read_text())
    assert finished["epochs_run"] == 2 and "interim" not in finished
    assert not (records / "hymoerec-seed1.interim.json").exists()
    assert cli(study, "report", "--out", str(study / "finished.md")) == 0  # the interim run is in MLflow still
    text = (study / "finished.md").read_text()
    tables = text[text.index("## synthetic") :]
    assert "1 of 6 planned runs finished." in tables and "| **HyMoERec** † | 1 |" in tables and "‡" not in tables


def test_the_latest_record_of_a_seed_counts_and_a_finished_one_wins_a_tie() -> None:
    finished = {"finished": "2026-12-01T10:00:00Z"}
    interim = {"finished": "2026-12-01T10:00:00Z", "interim": True}
    rerun_interim = {"finished": "2026-12-03T09:00:00Z", "interim": True}
    assert max([interim, finished], key=precedence) is finished
    # an older finished run (stale: its record deleted to rerun it) does not hide the rerun's interim result
    assert max([finished, rerun_interim], key=precedence) is rerun_interim


def test_a_claimed_run_is_skipped_by_a_second_worker(tmp_path: Path) -> None:
    with claimed(tmp_path / "run.lock", wait=False) as first, claimed(tmp_path / "run.lock", wait=False) as second:
        assert first and not second
    with claimed(tmp_path / "run.lock", wait=False) as again:
        assert again  # released with the block


def test_study_runs_records_and_reports(study: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli(study, "report", "--out", str(study / "empty.md")) == 0  # before any run: the published figures
    empty = (study / "empty.md").read_text()
    assert "No finished run yet" in empty and "| Elsewhere | 0.5000 | 0.2500 | – | a paper |" in empty
    assert cli(study, "run", "--seeds", "1", "--threads", "1") == 0
    records = sorted(p.name for p in (study / "results" / "synthetic").glob("*.json"))
    assert records == ["hymoerec-seed1.json", "no-dense-seed1.json", "sasrec-seed1.json", "wide-seed1.json"]
    record = json.loads((study / "results" / "synthetic" / "hymoerec-seed1.json").read_text())
    assert record["epochs_run"] == 2 and len(record["epoch_seconds"]) == 2 and record["torch_threads"] == 1
    assert record["data_source"] == "synthetic"
    # one torch thread: the CPU an epoch cost is positive and (save a little interpreter overhead) within its wall
    epochs = zip(record["epoch_cpu_seconds"], record["epoch_seconds"], strict=True)
    assert all(0 < cpu <= wall * 1.5 for cpu, wall in epochs)
    assert decode_per_user(record["per_user_test"]).mean() == pytest.approx(record["metrics"]["test"]["ndcg@10"])
    sasrec = json.loads((study / "results" / "synthetic" / "sasrec-seed1.json").read_text())
    assert sasrec["settings"]["model.moe.enabled"] is False and record["config_digest"] != sasrec["config_digest"]

    mtime = (study / "results" / "synthetic" / "hymoerec-seed1.json").stat().st_mtime
    assert cli(study, "run", "--seeds", "1") == 0  # finished runs are skipped, not retrained
    assert (study / "results" / "synthetic" / "hymoerec-seed1.json").stat().st_mtime == mtime
    assert cli(study, "run", "--variants", "hymoerec", "sasrec", "--seeds", "2", "--threads", "1") == 0

    out = study / "RESULTS.md"
    assert cli(study, "report", "--out", str(out)) == 0
    text = out.read_text()
    # a 2-epoch cap within patience 10: the cap, not early stopping, ends every run, and the tables say so
    assert CAPPED_NOTE in text
    hymoerec_row = next(line for line in text.splitlines() if line.startswith("| **HyMoERec** † | 2 |"))
    ndcg = [json.loads(p.read_text())["metrics"]["test"]["ndcg@10"] for p in (study / "results").glob("*/hymoerec*")]
    assert f"{np.mean(ndcg):.4f} ± {np.std(ndcg, ddof=1):.4f}" in hymoerec_row
    sasrec_row = next(line for line in text.splitlines() if line.startswith("| SASRec † | 2 |"))
    assert re.search(r", p (= [0-9.e-]+|< 1e-4)( [▲▼])? \(seeds 1, 2\)", sasrec_row)  # paired test vs HyMoERec
    assert "- HyMoERec test NDCG@10 ≥ 0.99: **not met** (" in text
    assert "- HyMoERec above its own SASRec with p < 0.05: " in text
    assert "| pure sparse | 1 |" in text and "| Elsewhere | 0.5000 | 0.2500 | – | a paper |" in text
    assert "![synthetic-buckets](results/plots/synthetic-buckets.png)" in text
    routes = next(line for line in text.splitlines() if line.startswith("| HyMoERec | 2 | "))  # 2 seeds measured
    assert re.fullmatch(r"\| HyMoERec \| 2 \| \d\.\d{3} of \d\.\d\d \|", routes)  # one layer in TINY_MODEL
    assert (study / "results" / "plots" / "synthetic-buckets.png").stat().st_size > 1000
    assert (study / "results" / "plots" / "synthetic-experts-seed1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "not finished" not in text and "only on ml-1m" not in text  # all six planned runs are in, no other
    search = text[text.index("### Validation search") :].splitlines()
    assert sum("◀ best" in line for line in search) == 1
    assert any(line.startswith("| wide experts † |") for line in search)

    # a fresh machine: an empty MLflow store, only the committed records -> the same tables
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{study / 'fresh' / 'mlflow.db'}")
    assert cli(study, "report", "--out", str(study / "again.md")) == 0
    assert (study / "again.md").read_text() == text

    # a changed default makes the finished runs stale: listed, never averaged in
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["train"]["lr"] = 0.002
    (study / "params.yaml").write_text(yaml.safe_dump(params))
    assert cli(study, "report", "--out", str(study / "stale.md"), params=study / "params.yaml") == 0
    stale = (study / "stale.md").read_text()
    assert "| **HyMoERec** |" not in stale and "HyMoERec seed 1: finished with other settings" in stale
    assert "train.lr 0.001 → 0.002" in stale

    # a parameter added later at a default that keeps the old behaviour does not make a run stale
    for path in (study / "results" / "synthetic").glob("*.json"):
        record = json.loads(path.read_text())
        if record["variant"] == "no-dense":  # recorded at a non-default value it could not have had: stays
            continue
        record["settings"].pop("model.moe.dense_branch", None)  # as if recorded before the parameter existed
        record["finished"] += "-edited"  # a newer record for the same seed
        path.write_text(json.dumps(record))
    assert cli(study, "report", "--out", str(study / "older.md")) == 0
    assert "finished with other settings" not in (study / "older.md").read_text()


def test_the_heterogeneity_levels_get_one_section_with_the_gain_and_what_the_routes_know(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Datasets marked ``heterogeneity`` are the controlled experiment: one section for all levels (not a section
    each), HyMoERec against SASRec per level, I(experts; user kind) where the users are of several kinds, a plot."""
    base = TINY_SPEC["datasets"]["synthetic"]["overrides"]
    kinds = {1: (1.0, 0.0, 0.0), 2: (0.5, 0.5, 0.0)}
    fractions = [f"data.synthetic.{s}_fraction" for s in ("chain", "loyal", "noisy")]
    spec = {
        **TINY_SPEC,
        "datasets": {
            f"synthetic-{k}": {
                "description": f"{k} kind(s)",
                "heterogeneity": k,
                "overrides": {
                    **base,
                    **dict(zip(fractions, mix, strict=True)),
                },
                "seeds": [1],
            }
            for k, mix in kinds.items()
        },
        "groups": {"main": {"datasets": ["synthetic-1", "synthetic-2"], "title": "Comparison"}},
        "variants": {k: TINY_SPEC["variants"][k] for k in ("hymoerec", "sasrec")},
        "published": {},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    assert cli(tmp_path, "run", "--threads", "1") == 0
    mixed = json.loads((tmp_path / "results" / "synthetic-2" / "hymoerec-seed1.json").read_text())
    kind = mixed["expert_load"]["information"]["user_kind"]
    assert kind["labels"] == ["chain", "loyal"] and 0.9 < kind["label_entropy_bits"] <= 1.0  # about half each
    assert cli(tmp_path, "report", "--out", str(tmp_path / "RESULTS.md")) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## synthetic-1" not in text and "## synthetic-2" not in text
    section = text[text.index("## Where the experts help") :]
    rows = [line for line in section.splitlines() if re.match(r"\| [12] \| 1 / 1 † \|", line)]
    assert len(rows) == 2 and CAPPED_NOTE in section  # two epochs within patience 10: the cap ended them, marked
    one_kind, two_kinds = rows
    assert "| 0.000 of 0.00 |" in one_kind  # one kind of user: nothing for the routes to know
    assert re.search(r"\| \d\.\d{3} of (0\.9\d|1\.00) \|", two_kinds)  # what the routes know of the user's kind
    gain = re.search(r"([+-]\d\.\d{4}), p (= [0-9.e-]+|< 1e-4)", two_kinds)  # the paired gain over SASRec
    ndcg = {
        m: json.loads((tmp_path / "results" / "synthetic-2" / f"{m}-seed1.json").read_text())["metrics"]["test"][
            "ndcg@10"
        ]
        for m in ("hymoerec", "sasrec")
    }
    assert gain and float(gain.group(1)) == pytest.approx(
        ndcg["hymoerec"] - ndcg["sasrec"], abs=6e-5
    )  # HyMoERec − SASRec
    assert (tmp_path / "results" / "plots" / "heterogeneity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_default_is_chosen_by_the_spec_rule_on_validation_alone() -> None:
    """The candidate wins unless the current default leads on mean validation NDCG@10 by more than the larger seed
    std; the verdict waits for every planned seed, and test figures never enter it."""
    from pipeline.study.report import choice_lines

    def variant(name: str, valid: list[float], test: float = 0.5) -> Variant:
        records = [
            {"seed": seed, "metrics": {"valid": {"ndcg@10": v}, "test": {"ndcg@10": test}}}
            for seed, v in enumerate(valid, 1)
        ]
        return Variant(name, name.upper(), "main", records, [], [])

    choice = {"current": "a", "candidate": "b", "seeds": [1, 2, 3]}
    tie = choice_lines(choice, [variant("a", [0.30, 0.31, 0.32]), variant("b", [0.295, 0.305, 0.315], test=0.0)])
    assert "the cheaper B wins here" in tie[1]
    ahead = choice_lines(choice, [variant("a", [0.40, 0.41, 0.42], test=0.0), variant("b", [0.29, 0.30, 0.31])])
    assert "it stays the default here" in ahead[1]
    assert "not decided yet" in choice_lines(choice, [variant("a", [0.4] * 3), variant("b", [0.3])])[1]
    assert choice_lines(None, [variant("a", [0.4])]) == []
