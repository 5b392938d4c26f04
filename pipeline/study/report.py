"""``RESULTS.md`` from the study's MLflow runs: tables, significance tests, bucket and expert plots.

Source of truth: the MLflow runs of experiments ``study-<dataset>`` that carry a study record (``study/record.json``,
attached by the runner). Committed records (``results/``) that the store lacks, e.g. on a fresh machine, are
imported into it first, so the report is the same wherever it is generated. Per (dataset, variant, seed) the most
recently recorded run counts (an interim result of an unfinished run until the run finishes, which always records
later); a run whose settings differ from what the spec and ``params.yaml`` give today is *stale*: listed with the
settings that changed, never averaged in.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.io import write_bytes_atomic
from pipeline.params import Params, load_params
from pipeline.study.plan import (
    EXPERIMENT_PREFIX,
    RECORDS_DIR,
    SPEC_FILE,
    WORK_DIR,
    Run,
    load_spec,
    plan,
    resolved_settings,
    run_params,
)
from pipeline.study.runner import decode_per_user, study_tags
from pipeline.tracking.runs import headline_metrics
from pipeline.tracking.store import Tracking

if TYPE_CHECKING:
    from pipeline.study.plots import Information

log = logging.getLogger(__name__)

METRICS = ("hr@10", "ndcg@10", "mrr@10", "hr@20", "ndcg@20", "mrr@20")
RECORD_ARTIFACT = "study/record.json"
SIGNIFICANCE = 0.05
CAPPED = "†"
CAPPED_NOTE = (
    f"{CAPPED} at least one seed ran into the `train.epochs` cap before early stopping: its validation NDCG@10 was "
    "still improving within the last `train.patience` epochs, so the protocol's cap, not convergence, ended it."
)
INTERIM = "‡"
INTERIM_NOTE = (
    f"{INTERIM} at least one seed is unfinished: an interim result, the best validation epoch's weights after the "
    "epochs it could train in the time a machine was held (`python -m pipeline.study interim`); its finished run "
    "replaces it."
)
ON_GPU = "§"
ON_GPU_NOTE = (
    f"{ON_GPU} at least one seed was trained (its last part, if resumed) on a CUDA GPU, not the reference machine's "
    "CPU: the same code, settings and data, with the default `train.amp` (bf16 autocast on CUDA; float32 on the CPU). "
    "Training times of GPU runs have rows of their own."
)
PROTOCOL = """\
- **Split**: chronological leave-one-out per user (last event = test, second to last = validation, the rest
  trains), users and items with fewer than 5 events removed (5-core).
- **Ranking**: every item of the catalogue is a candidate (no sampled negatives), padding is never ranked, ties are
  resolved by their expected rank, items already in the history stay candidates (`evaluate.exclude_seen: false`).
- **Selection**: each run keeps the epoch with the best *validation* NDCG@10 (early stopping, patience 10); test is
  read once, after training. Defaults were chosen on validation only.
- **Figures**: mean ± sample std over seeds (one seed: the value alone). HR@k, NDCG@k, MRR@k over all test users.
  A run that could not finish while a machine was held may stand in as an *interim* result (its best validation
  epoch's weights so far, marked ‡) until it finishes.
- **Hardware**: the reference machine's 2 CPU cores (float32), except runs marked §, which a lent CUDA GPU trained
  with the same code and settings (bf16 autocast there, `train.amp`).
- **Significance**: two-sided Wilcoxon signed-rank test over test users of per-user NDCG@10, HyMoERec against each
  baseline, each model's value averaged over the seeds *both* finished (so a 3-seed model is never set against a
  1-seed one; the Δ beside p is over the same seeds, which are named); zero differences dropped, normal
  approximation with tie correction (`scipy.stats.wilcoxon`). ▲ / ▼: HyMoERec significantly better / worse at
  p < 0.05.
- **Settings**: `params.yaml` defaults plus the dataset's and variant's overrides in `pipeline/study/spec.yaml`.
  Every run is an MLflow run of experiment `study-<dataset>` (tags `study.variant`, `study.seed`; its curves, plots
  and the record these tables read), and a committed record in `results/<dataset>/<variant>-seed<k>.json`
  (`<variant>-seed<k>.interim.json` and tag `study.interim` for an interim result).
"""


@dataclass
class Variant:
    name: str
    label: str
    group: str
    records: list[dict[str, Any]]
    stale: list[dict[str, Any]]
    pending: list[int]  # seeds planned but not (validly) finished

    def values(self, metric: str) -> list[float]:
        return [r["metrics"]["test"][metric] for r in self.records]

    def seeds(self) -> set[int]:
        return {r["seed"] for r in self.records}

    def per_user(self, seeds: set[int] | None = None) -> np.ndarray:
        """Per-user test NDCG@10 averaged over the finished seeds (or only over ``seeds``)."""
        chosen = [r for r in self.records if seeds is None or r["seed"] in seeds]
        return np.mean([decode_per_user(r["per_user_test"]) for r in chosen], axis=0)


def paired(ours: Variant, theirs: Variant) -> tuple[np.ndarray, np.ndarray, set[int]]:
    """Both models' per-user NDCG@10 over the seeds both finished, and those seeds.

    Averaging one side over three seeds and the other over one would set a smoothed model against a noisy one; with
    no seed in common the two fall back to all their seeds (an empty set, which the tables say).
    """
    common = ours.seeds() & theirs.seeds()
    return ours.per_user(common or None), theirs.per_user(common or None), common


# ----------------------------------------------------------------------------------------------- MLflow
def import_records(tracking: Tracking, records_dir: Path) -> int:
    """Log every committed record the store lacks as a run of its study experiment; returns how many."""
    known = {_key(record) for record in fetch_records(tracking)}
    imported = 0
    for path in sorted(records_dir.glob("*/*.json")):
        record = json.loads(path.read_text())
        if _key(record) in known:
            continue
        experiment = tracking.experiment_id(f"{EXPERIMENT_PREFIX}-{record['dataset']}")
        tags = {
            **study_tags(record),
            "mlflow.runName": f"{record['variant']}-seed{record['seed']}-imported",
            "study.imported_from": str(path),
        }
        run = tracking.call("create run", tracking.client.create_run, experiment, tags=tags)
        run_id = run.info.run_id
        from mlflow.entities import Metric

        metrics = [Metric(k, v, 0, 0) for k, v in headline_metrics(record["metrics"]).items()]
        for start in range(0, len(metrics), 1000):
            tracking.call("log metrics", tracking.client.log_batch, run_id, metrics=metrics[start : start + 1000])
        tracking.call("upload study record", tracking.client.log_dict, run_id, record, RECORD_ARTIFACT)
        tracking.call("end run", tracking.client.set_terminated, run_id, status="FINISHED")
        imported += 1
    return imported


def fetch_records(tracking: Tracking) -> list[dict[str, Any]]:
    """The study record of every run in the study experiments (each tagged with its MLflow run id)."""
    experiments = [
        e.experiment_id
        for e in tracking.call("list experiments", tracking.client.search_experiments)
        if e.name.startswith(f"{EXPERIMENT_PREFIX}-")
    ]
    if not experiments:
        return []
    runs = tracking.call(
        "search runs",
        tracking.client.search_runs,
        experiments,
        filter_string="tags.`study.variant` LIKE '%'",
        max_results=5000,
    )
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            path = tracking.call(
                "download study record", tracking.client.download_artifacts, run.info.run_id, RECORD_ARTIFACT, tmp
            )
            record = json.loads(Path(path).read_text())
            record["mlflow_run_id"] = run.info.run_id
            records.append(record)
    return records


def _key(record: dict[str, Any]) -> tuple[str, str, int, str, str]:
    return record["dataset"], record["variant"], record["seed"], record["config_digest"], record["finished"]


# ----------------------------------------------------------------------------------------------- assembly
def assemble(
    records: list[dict[str, Any]], spec: dict[str, Any], params_file: str | Path, work_dir: Path = WORK_DIR
) -> dict[str, list[Variant]]:
    """Per dataset, the spec's variants with their valid records (latest per seed), stale runs and pending seeds."""
    base = resolved_settings(load_params(params_file))
    latest: dict[tuple[str, str, int], dict[str, Any]] = {}
    for record in records:
        key = (record["dataset"], record["variant"], record["seed"])
        if key not in latest or precedence(record) > precedence(latest[key]):
            latest[key] = record
    out: dict[str, list[Variant]] = {}
    for dataset in spec["datasets"]:
        by_variant: dict[str, list[Run]] = defaultdict(list)
        for run in plan(spec, dataset):
            by_variant[run.variant].append(run)
        variants = []
        for name, runs in by_variant.items():
            valid, stale, pending = [], [], []
            for run in runs:
                record = latest.get((dataset, name, run.seed))
                if record is None:
                    pending.append(run.seed)
                elif changed := changed_settings(record["settings"], run_params(run, params_file, work_dir), base):
                    stale.append({**record, "changed": changed})
                    pending.append(run.seed)
                else:
                    valid.append(record)
            label = spec["variants"][name].get("label", name)
            variants.append(Variant(name, label, spec["variants"][name]["group"], valid, stale, pending))
        out[dataset] = variants
    return out


def precedence(record: dict[str, Any]) -> tuple[str, bool]:
    """The latest record; a finished run over an interim result recorded in the same second.

    Not finished-over-interim always: a stale finished run whose record was deleted to rerun it stays in MLflow,
    and must not hide the rerun's interim result (nor make the report differ from a fresh machine's)."""
    return record["finished"], not is_interim(record)


def is_interim(record: dict[str, Any]) -> bool:
    return bool(record.get("interim", False))


def changed_settings(recorded: dict[str, Any], params: Params, base: dict[str, Any]) -> list[str]:
    """Settings in which a finished run differs from what the spec and ``params.yaml`` give today.

    A parameter added after the run was recorded counts as changed only if today's value differs from the
    ``params.yaml`` default (new parameters keep the old behaviour at their default); removed ones are ignored.
    """
    changed = []
    for key, value in resolved_settings(params).items():
        before = recorded[key] if key in recorded else base.get(key)
        if json.loads(json.dumps(before)) != json.loads(json.dumps(value)):  # JSON round trip: tuples are lists
            changed.append(f"{key} {before!r} → {value!r}")
    return changed


def wilcoxon_p(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired per-user values (1.0 when every pair ties)."""
    from scipy.stats import wilcoxon

    if not np.any(ours != theirs):
        return 1.0
    return float(wilcoxon(ours, theirs, zero_method="wilcox", method="approx").pvalue)


def stopped_by_cap(record: dict[str, Any]) -> bool:
    """Whether the run used every epoch ``train.epochs`` allowed with its best epoch within the last patience.

    Early stopping never fired, so the figure is what the cap allowed, not a converged run's."""
    settings = record.get("settings", {})
    cap, patience = settings.get("train.epochs"), settings.get("train.patience")
    if cap is None or patience is None:
        return False
    return record["epochs_run"] >= cap and record["epochs_run"] - record["best_epoch"] < patience


def marks(records: list[dict[str, Any]]) -> str:
    """† when the epoch cap ended a run, ‡ when a run is unfinished (its figures are interim), § when a run was
    trained on a GPU."""
    return (
        CAPPED * any(map(stopped_by_cap, records))
        + INTERIM * any(map(is_interim, records))
        + ON_GPU * any(map(trained_on_gpu, records))
    )


def trained_on_gpu(record: dict[str, Any]) -> bool:
    return str(record.get("device", "cpu")).startswith("cuda")


def with_marks(text: str, records: list[dict[str, Any]]) -> str:
    """``text`` followed by the records' marks, if any (``NARM ‡``, ``1 seed(s) ‡``)."""
    mark = marks(records)
    return f"{text} {mark}" if mark else text


def marks_note(variants: list[Variant]) -> list[str]:
    """The lines under a table that explain its marks (none when no run is marked)."""
    shown = marks([r for v in variants for r in v.records])
    explained = ((CAPPED, CAPPED_NOTE), (INTERIM, INTERIM_NOTE), (ON_GPU, ON_GPU_NOTE))
    notes = [note for mark, note in explained if mark in shown]
    return ["", *notes] if notes else []


def mean_std(values: list[float], digits: int = 4) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


# ----------------------------------------------------------------------------------------------- tables
def comparison_table(variants: list[Variant], reference: str = "hymoerec") -> list[str]:
    ref = next((v for v in variants if v.name == reference and v.records), None)
    header = "| model | seeds | " + " | ".join(m.upper() for m in METRICS) + " | vs HyMoERec: Δ NDCG@10, p (seeds) |"
    lines = [header, "|---" * (len(METRICS) + 3) + "|"]
    for variant in variants:
        if not variant.records:
            continue
        cells = [mean_std(variant.values(metric)) for metric in METRICS]
        best = f"**{variant.label}**" if variant.name == reference else variant.label
        cells.append(versus(ref, variant))
        lines.append(f"| {with_marks(best, variant.records)} | {len(variant.records)} | " + " | ".join(cells) + " |")
    return lines + marks_note(variants)


def versus(ref: Variant | None, variant: Variant) -> str:
    if ref is None or variant is ref:
        return "–"
    if len({r["per_user_test"]["users_sha256"] for r in ref.records + variant.records}) != 1:
        return "test users differ"
    ours, theirs, common = paired(ref, variant)
    p = wilcoxon_p(ours, theirs)
    delta = float(ours.mean() - theirs.mean())
    mark = ("▲" if delta > 0 else "▼") if p < SIGNIFICANCE else ""
    delta = round(delta, 4) + 0.0  # + 0.0: no "-0.0000"
    seeds = f"seed{'s' * (len(common) > 1)} {', '.join(map(str, sorted(common)))}" if common else "no seed in common"
    return f"{delta:+.4f}, p {format_p(p)} {mark} ({seeds})".replace("  ", " ")


def format_p(p: float) -> str:
    """The relation and the value, to follow "p ": ``= 0.037`` or ``< 1e-4``."""
    return f"= {p:.2g}" if p >= 1e-4 else "< 1e-4"


def bucket_table(variants: list[Variant]) -> list[str]:
    from pipeline.study.plots import BUCKETS

    titles = [
        f"{name} ({'popularity' if key.endswith('popularity') else 'history'})"
        for key, names, _ in BUCKETS
        for name in names
    ]
    lines = ["| model | " + " | ".join(titles) + " |", "|---" * (len(titles) + 1) + "|"]
    for variant in variants:
        if not variant.records:
            continue
        cells = [
            mean_std([r["metrics"][key][name].get("ndcg@10", math.nan) for r in variant.records])
            for key, names, _ in BUCKETS
            for name in names
        ]
        lines.append(f"| {with_marks(variant.label, variant.records)} | " + " | ".join(cells) + " |")
    return lines + marks_note(variants)


def speed_table(variants: list[Variant]) -> list[str]:
    """Epoch times and time to the best epoch; a variant's GPU-trained seeds get a row of their own (their seconds
    would mean nothing averaged with the CPU's)."""
    lines = [
        "| model | seeds | s / epoch (median) | CPU s / epoch (median) | epochs run (best) | s to best validation "
        "| torch threads |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in variants:
        for on_gpu in (False, True):
            records = [r for r in variant.records if trained_on_gpu(r) == on_gpu]
            if records:
                lines.append(speed_row(f"{variant.label} (GPU)" if on_gpu else variant.label, records, on_gpu))
    return lines + marks_note(variants)


def speed_row(label: str, records: list[dict[str, Any]], on_gpu: bool) -> str:
    per_epoch = [statistics.median(r["epoch_seconds"]) for r in records]
    # a GPU run's host CPU time is no CPU figure; records from before CPU time was logged lack it
    cpu = [] if on_gpu else [statistics.median(r["epoch_cpu_seconds"]) for r in records if r.get("epoch_cpu_seconds")]
    epochs = ", ".join(f"{r['epochs_run']} ({r['best_epoch']}){marks([r])}" for r in records)
    to_best = mean_std([r["seconds_to_best"] for r in records], digits=0)
    cpu_cell = "–" if not cpu else f"{statistics.mean(cpu):.1f}"
    if 0 < len(cpu) < len(per_epoch):
        cpu_cell += f" ({len(cpu)} of the seeds)"
    threads = "GPU" if on_gpu else threads_cell(records)
    return (
        f"| {label} | {len(records)} | {statistics.mean(per_epoch):.1f} | {cpu_cell} | {epochs} | {to_best} "
        f"| {threads} |"
    )


def threads_cell(records: list[dict[str, Any]]) -> str:
    """The torch threads CPU runs trained with; an interim record's are the evaluating process's (not shown)."""
    return ", ".join(sorted({str(r["torch_threads"]) for r in records if not is_interim(r)})) or "–"


def search_table(variants: list[Variant]) -> list[str]:
    """Validation NDCG@10 of every screened setting, best first: what the defaults were chosen by (test unread)."""
    rows = []
    for variant in variants:
        seed1 = [r["metrics"]["valid"]["ndcg@10"] for r in variant.records if r["seed"] == 1]
        if seed1:
            every = [r["metrics"]["valid"]["ndcg@10"] for r in variant.records]
            rows.append((seed1[0], variant, every))
    lines = [
        "| setting | validation NDCG@10, seed 1 | mean over seeds (n) |",
        "|---|---:|---:|",
    ]
    for rank, (value, variant, every) in enumerate(sorted(rows, key=lambda row: -row[0])):
        label = with_marks(
            f"**{variant.label}** (default)" if variant.name == "hymoerec" else variant.label, variant.records
        )
        lines.append(f"| {label} | {value:.4f}{' ◀ best' if rank == 0 else ''} | {mean_std(every)} ({len(every)}) |")
    return lines + marks_note(variants)


def status_lines(variants: list[Variant]) -> list[str]:
    lines = []
    for variant in variants:
        if variant.pending:
            lines.append(f"- {variant.label}: seed(s) {', '.join(map(str, variant.pending))} not finished yet")
        for record in filter(is_interim, variant.records):
            lines.append(
                f"- {variant.label} seed {record['seed']}: unfinished, in the tables as an interim result "
                f"(best validation at epoch {record['best_epoch']} of {record['epochs_run']} trained)"
            )
        for record in variant.stale:
            state = "unfinished (interim result)" if is_interim(record) else "finished"
            lines.append(
                f"- {variant.label} seed {record['seed']}: {state} with other settings (commit "
                f"{str(record['git_commit'])[:10]}; {'; '.join(record['changed'][:3])}): stale, not counted"
            )
    return lines


# ----------------------------------------------------------------------------------------------- the document
def write_report(
    out: Path,
    records_dir: Path = RECORDS_DIR,
    params_file: str | Path = "params.yaml",
    spec_file: Path = SPEC_FILE,
    work_dir: Path = WORK_DIR,
) -> Path:
    """Import missing committed records, then write ``out`` and its plots (beside the records) from MLflow."""
    params = load_params(params_file)
    tracking = Tracking.from_params(params)
    imported = import_records(tracking, records_dir)
    if imported:
        log.info("report: imported %d committed record(s) into %s", imported, tracking.uri)
    spec = load_spec(spec_file)
    by_dataset = assemble(fetch_records(tracking), spec, params_file, work_dir)

    lines = [
        "# Results",
        "",
        "<!-- generated by `python -m pipeline.study report` from the study's MLflow runs: do not edit by hand -->",
        "",
        "HyMoERec against its own SASRec (the same network without the experts) and four published baselines,",
        "trained and evaluated by this project's trainer and evaluator. Runs: `python -m pipeline.study run` (see the",
        "README); plan and state: `python -m pipeline.study status`.",
        "",
        "## Protocol",
        "",
        PROTOCOL,
    ]
    controlled = {d: v for d, v in by_dataset.items() if "heterogeneity" in spec["datasets"][d]}
    for dataset, variants in by_dataset.items():
        if dataset in controlled:
            continue
        data = spec["datasets"][dataset]
        shown = sum(len(v.records) for v in variants)
        interim = sum(map(is_interim, (r for v in variants for r in v.records)))
        planned = shown + sum(len(v.pending) for v in variants)
        progress = f"{shown - interim} of {planned} planned runs finished" + f", {interim} interim" * bool(interim)
        lines += [f"## {dataset}", "", f"{data['description']}. {progress}.", ""]
        if not shown:
            lines += ["No finished run yet.", "", *published_lines(spec, dataset)]
        else:
            lines += dataset_sections(dataset, spec, variants, records_dir, out)
        pending = status_lines(variants)
        if pending:
            lines += ["### Unfinished and stale runs", "", *pending, ""]
    if controlled:
        lines += heterogeneity_section(spec, controlled, records_dir, out)
    write_bytes_atomic(out, ("\n".join(lines).rstrip() + "\n").encode())
    log.info("report: wrote %s", out)
    return out


def published_lines(spec: dict[str, Any], dataset: str) -> list[str]:
    """Figures published elsewhere, shown even before our first run so readers see where the target stands."""
    lines = []
    if spec.get("published", {}).get(dataset):
        lines += ["Published figures (other code and preprocessing: for orientation, not like-for-like rows):", ""]
        lines += published_table(spec["published"][dataset]) + [""]
    if spec.get("published_notes", {}).get(dataset):
        lines += [spec["published_notes"][dataset], ""]
    return lines


def dataset_sections(
    dataset: str, spec: dict[str, Any], variants: list[Variant], records_dir: Path, out: Path
) -> list[str]:
    from pipeline.study import plots

    main = [v for v in variants if v.group == "main"]
    ablations = [v for v in variants if v.group == "ablation"]
    lines = ["### Comparison", "", *comparison_table(main), "", *target_lines(spec["datasets"][dataset], main), ""]
    lines += choice_lines(spec.get("default_choice"), main)
    lines += published_lines(spec, dataset)
    lines += ["### Where the gain comes from", "", "Test NDCG@10 by bucket:", "", *bucket_table(main), ""]
    for picture in plots.draw(dataset, main, records_dir / "plots"):
        lines += [f"![{picture.stem}]({os.path.relpath(picture, out.parent)})", ""]
    lines += routing_lines(main)
    reference = [v for v in main if v.name == spec["groups"]["ablation"].get("base")]
    if any(v.records for v in ablations):
        lines += ["### Ablations", "", *comparison_table(reference + ablations), ""]
    screened = [v for v in variants if v.group in ("ablation", "search")]
    if any(v.records for v in screened):
        lines += [
            "### Validation search",
            "",
            "Every setting tried, one change from HyMoERec's defaults at a time, by validation NDCG@10 (the",
            "figure the defaults are chosen by; test is not read)."
            + (" The ablations above double as search points." if any(v.group == "ablation" for v in screened) else ""),
            "",
            *search_table(reference + screened),
            "",
        ]
    lines += [
        "### Training time",
        "",
        "As the runs went: several workers shared the machine (torch threads: last column), so wall seconds depend on",
        "what else ran; CPU seconds (the process's, over the same span) count the work and are closer to comparable,",
        "but contention for caches and memory still inflates them. Compare speed in the side-by-side measurements of",
        "BENCHMARKS.md. Both include the full-ranking validation; runs recorded before CPU time was logged show –.",
        "",
        *speed_table(main + ablations),
        "",
    ]
    return lines


def information(records: list[dict[str, Any]], label: str) -> Information | None:
    """Per layer, I(experts; label) in bits averaged over the seeds that measured it, and H(label); None if none did."""
    tables = [r["expert_load"].get("information", {}).get(label) for r in records]
    tables = [t for t in tables if t is not None]
    if not tables:
        return None
    per_layer = list(np.mean([t["mi_bits"] for t in tables], axis=0))
    return per_layer, statistics.mean(t["label_entropy_bits"] for t in tables) + 0.0  # + 0.0: no "-0.00"


def information_cell(measured: Information | None) -> str:
    if measured is None:
        return "–"
    per_layer, entropy = measured
    return " / ".join(f"{mi:.3f}" for mi in per_layer) + f" of {entropy:.2f}"


def routing_lines(main: list[Variant]) -> list[str]:
    """What each MoE model's routes know of the target's popularity (runs recorded before it was measured: none)."""
    rows = []
    for variant in main:
        measured = information(variant.records, "target_popularity")
        if measured is not None:
            seeds = sum("information" in r["expert_load"] for r in variant.records)
            rows.append(f"| {variant.label} | {seeds} | {information_cell(measured)} |")
    if not rows:
        return []
    return [
        "What the routes know: the mutual information between the experts a test token is sent to and the popularity",
        "bucket (head / mid / tail) of the item that follows it, per layer, in bits, beside the bucket's entropy (the",
        "most it could be); each of a token's K experts counts once. 0 means the routing ignores popularity.",
        "",
        "| model | seeds measured | I(experts; target popularity), layer 1 / 2 … of H |",
        "|---|---:|---|",
        *rows,
        "",
    ]


def heterogeneity_section(
    spec: dict[str, Any], controlled: dict[str, list[Variant]], records_dir: Path, out: Path
) -> list[str]:
    """The controlled experiment: the same synthetic catalogue with 1, 2, 3 … kinds of user, HyMoERec against
    SASRec at each level, and what HyMoERec's routes know of each token's user kind and target popularity."""
    from pipeline.study import plots

    levels = sorted(controlled, key=lambda d: spec["datasets"][d]["heterogeneity"])
    lines = [
        "## Where the experts help: users of one kind or of several (synthetic)",
        "",
        "The synthetic generator knows each user's kind: *chain* users follow item-to-item successor chains, *loyal*",
        "users stay in 1-3 categories, *noisy* users draw from global popularity. One catalogue (1,000 items, data",
        "seed 0) and 4,000 users, of one kind, two or three (`pipeline/study/spec.yaml`), HyMoERec and SASRec with",
        "the project's defaults at dropout 0.2 and max length 50. Δ: HyMoERec − SASRec test NDCG@10 (paired Wilcoxon p",
        "over users, seeds averaged as in the tables above). I(experts; ·): mutual information between the experts a",
        "test token is routed to and its user's kind or its target's popularity bucket, per layer, in bits, of the",
        "label's entropy H (the most it could be).",
        "",
        "| kinds of user | seeds | HyMoERec NDCG@10 | SASRec NDCG@10 | Δ NDCG@10, p | I(experts; user kind) | "
        "I(experts; target popularity) |",
        "|---|---|---|---|---|---|---|",
    ]
    points = []
    for dataset in levels:
        by_name = {v.name: v for v in controlled[dataset]}
        ours, sasrec = by_name.get("hymoerec"), by_name.get("sasrec")
        kinds = spec["datasets"][dataset]["heterogeneity"]
        if ours is None or sasrec is None or not ours.records or not sasrec.records:
            lines.append(f"| {kinds} | – | not run yet | | | | |")
            continue
        ours_test = {r["seed"]: r["metrics"]["test"]["ndcg@10"] for r in ours.records}
        sasrec_test = {r["seed"]: r["metrics"]["test"]["ndcg@10"] for r in sasrec.records}
        gains = [ours_test[seed] - sasrec_test[seed] for seed in sorted(ours_test.keys() & sasrec_test.keys())]
        kind_info = information(ours.records, "user_kind")
        popularity_info = information(ours.records, "target_popularity")
        if gains:  # no seed in common yet: nothing to plot for this level
            points.append(plots.LevelPoint(kinds, gains, kind_info, popularity_info))
        seeds = with_marks(f"{len(ours.records)} / {len(sasrec.records)}", ours.records + sasrec.records)
        lines.append(
            f"| {kinds} | {seeds} | {mean_std(ours.values('ndcg@10'))} | "
            f"{mean_std(sasrec.values('ndcg@10'))} | {versus(ours, sasrec)} | {information_cell(kind_info)} | "
            f"{information_cell(popularity_info)} |"
        )
    lines += ["", "Seeds: HyMoERec / SASRec. The Δ column sets HyMoERec against SASRec (positive: HyMoERec ahead).", ""]
    lines += marks_note([v for dataset in levels for v in controlled[dataset]])
    if points:
        picture = plots.heterogeneity(points, records_dir / "plots" / "heterogeneity.png")
        lines += [f"![heterogeneity]({os.path.relpath(picture, out.parent)})", ""]
    for dataset in levels:
        kinds = spec["datasets"][dataset]["heterogeneity"]
        lines += [f"- {kinds} kind(s) of user: {line[2:]}" for line in status_lines(controlled[dataset])]
    return lines


def choice_lines(choice: dict[str, Any] | None, main: list[Variant]) -> list[str]:
    """Where the spec's rule for the default stands on this dataset: validation NDCG@10 over the planned seeds; the
    candidate wins unless the current default leads by more than the larger of the two seed std's (test unread)."""
    by_name = {v.name: v for v in main}
    if not choice or choice["current"] not in by_name or choice["candidate"] not in by_name:
        return []
    current, candidate = by_name[choice["current"]], by_name[choice["candidate"]]

    def valid(variant: Variant) -> list[float]:  # finished runs only: an interim result never decides
        chosen = (r for r in variant.records if r["seed"] in choice["seeds"] and not is_interim(r))
        return [r["metrics"]["valid"]["ndcg@10"] for r in chosen]

    ours, theirs = valid(current), valid(candidate)
    n = len(choice["seeds"])
    figures = (
        f"{current.label} {mean_std(ours)} ({len(ours)} of {n} seeds), "
        f"{candidate.label} {mean_std(theirs)} ({len(theirs)} of {n} seeds)"
    )
    if len(ours) < n or len(theirs) < n:
        verdict = "not decided yet"
    else:
        margin = max(statistics.stdev(ours), statistics.stdev(theirs)) if n > 1 else 0.0
        lead = statistics.mean(ours) - statistics.mean(theirs)
        verdict = (
            f"{current.label} leads by {lead:.4f}, more than {margin:.4f}: it stays the default here"
            if lead > margin
            else f"{current.label} leads by {lead:+.4f}, within {margin:.4f}: the cheaper {candidate.label} wins here"
        )
    return [
        "Choosing the default (validation NDCG@10, the rule in `pipeline/study/spec.yaml`, both datasets must agree):",
        f"{figures}; {verdict}.",
        "",
    ]


def target_lines(data: dict[str, Any], main: list[Variant]) -> list[str]:
    """Whether the defaults reach the issue's targets, said plainly (with the figure reached when they do not)."""
    ours = next((v for v in main if v.name == "hymoerec"), None)
    sasrec = next((v for v in main if v.name == "sasrec"), None)
    lines = ["Targets:", ""]
    if "target_ndcg10" in data:
        goal = data["target_ndcg10"]
        if ours is None or not ours.records:
            lines.append(f"- HyMoERec test NDCG@10 ≥ {goal}: no finished HyMoERec run yet")
        else:
            value = statistics.mean(ours.values("ndcg@10"))
            verdict = "met" if value >= goal else "**not met**"
            seeds = with_marks(f"{len(ours.records)} seed(s)", ours.records)
            lines.append(f"- HyMoERec test NDCG@10 ≥ {goal}: {verdict} ({value:.4f}, {seeds})")
    if ours is None or sasrec is None or not ours.records or not sasrec.records:
        lines.append("- HyMoERec above its own SASRec with p < 0.05: not measured yet (both need runs)")
    else:
        delta = statistics.mean(ours.values("ndcg@10")) - statistics.mean(sasrec.values("ndcg@10"))
        p = wilcoxon_p(*paired(ours, sasrec)[:2])
        verdict = "met" if delta > 0 and p < SIGNIFICANCE else "**not met**"
        seeds = with_marks(f"{len(sasrec.records)} seed(s)", sasrec.records)
        lines.append(
            f"- HyMoERec above its own SASRec with p < {SIGNIFICANCE}: {verdict} (Δ NDCG@10 {delta:+.4f}, "
            f"p {format_p(p)}, {len(ours.records)} and {seeds})"
        )
    return lines


def published_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | HR@10 | NDCG@10 | MRR@10 | source |", "|---|---|---|---|---|"]
    for row in rows:
        cells = [f"{row[m]:.4f}" if row.get(m) is not None else "–" for m in ("hr@10", "ndcg@10", "mrr@10")]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + f" | {row['source']} |")
    return lines
