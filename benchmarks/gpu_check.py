"""GPU check: train and evaluate HyMoERec and SASRec on ML-1M at L = 200 with bf16 autocast on one CUDA device.

Run it from the repository root of the CUDA machine (the working tree is enough: the script puts the repository on
``sys.path``, so no ``pip install`` is needed when torch, numpy, pandas, pyarrow, pyyaml, tqdm, requests and
matplotlib import)::

    python benchmarks/gpu_check.py --mirror shared/datasets --out $OUT

The pipeline's own stages do the work: ``download`` (from the mirror folder, which must hold
``ml-1m/gsasrec_splits/*.txt`` or another ML-1M layout: ``pipeline/data/registry.py``), ``preprocess``, then per
model ``train`` and ``evaluate``, with MLflow off and every folder under ``--out``. ``--budget-s`` (counted from the
start, data stages included) is shared by the models still to run; each model first trains a 2-epoch probe in its
own folder, and the real run's ``train.epochs`` is capped at what the rest of its share allows at the probe's warm
(second) epoch time, so a model that stops early leaves its time to the next. The budget is a target, not a hard
limit.

Writes ``<out>/gpu_check.json`` (rewritten after every model), ``<out>/gpu_check.md``, ``<out>/gpu_check.log`` and
per model ``<out>/<model>/{probe,model,reports}``. Exit codes: 0 done; 1 the data stages or a model failed (the
error is in the JSON); 2 a package or the pipeline does not import; 3 no CUDA device; 4 no mirror folder.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MIRROR_ENV = "HYMOE_DATA_MIRROR"  # == pipeline.params.MIRROR_ENV, needed before the pipeline is known to import
REQUIRED = ("torch", "numpy", "pandas", "pyarrow", "yaml", "tqdm", "requests", "matplotlib", "tenacity", "filelock")
STAGES = (
    "pipeline.params",
    "pipeline.data.download",
    "pipeline.data.preprocess",
    "pipeline.training.train",
    "pipeline.model.train_log",
    "pipeline.stages",
    "pipeline.evaluation.evaluate",
)
VARIANTS: dict[str, dict[str, Any]] = {
    "hymoerec": {"model.kind": "hymoerec", "model.moe.enabled": True},
    "sasrec": {"model.kind": "hymoerec", "model.moe.enabled": False},
    # issue 26: dense 128 + the top-2 of 8 experts of width 64 = SASRec's FFN FLOPs per token
    "flop-matched": {"model.kind": "hymoerec", "model.moe.enabled": True, "model.moe.dense_hidden": 128},
}
COMMON: dict[str, Any] = {
    "data.dataset": "ml-1m",
    "model.max_seq_len": 200,
    "model.dropout": 0.2,
    "model.attn_dropout": 0.2,
    "model.mamba.dropout": 0.2,
    "train.device": "cuda",
    "train.amp": True,
    "train.resume": False,  # a clean measurement: never continue an older run's checkpoint
    "mlflow.enabled": False,
}
TEST_KEYS = ("hr@10", "ndcg@10", "mrr@10", "hr@20", "ndcg@20", "mrr@20")
PROBE_EPOCHS = 2
EVAL_RESERVE_S = 20.0  # evaluate (test + valid ranking, expert load, plots) after training
MIB = 2**20

log = logging.getLogger("gpu_check")


def main() -> int:
    args = parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        handlers=[logging.StreamHandler(sys.stdout), logging.FileHandler(out / "gpu_check.log")],
    )
    started = time.monotonic()
    deadline = started + args.budget_s
    report: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": {**COMMON, "budget_s": args.budget_s, "max_epochs": args.max_epochs, "patience": args.patience},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "models": {},
    }
    report["imports"] = imports = check_imports()
    missing = {name: status for name, status in imports.items() if status.startswith("MISSING")}
    if missing:
        first = next(iter(missing.items()))
        return fail(
            out,
            report,
            2,
            f"cannot import {first[0]} ({first[1]}); missing: {', '.join(missing)}; "
            "install the dependencies of pyproject.toml (pip install -e . needs a package index)",
        )
    import torch

    if not torch.cuda.is_available():
        return fail(
            out, report, 3, f"CUDA is not available (torch {torch.__version__}, CUDA build {torch.version.cuda})"
        )
    report["environment"] = environment(torch)
    log.info("environment: %s", json.dumps(report["environment"]))
    mirror = Path(args.mirror).expanduser().resolve()
    if not mirror.is_dir():
        return fail(out, report, 4, f"the mirror folder {mirror} does not exist (--mirror or ${MIRROR_ENV})")
    os.environ[MIRROR_ENV] = str(mirror)  # the environment wins over data.mirror: make both name the same folder
    base = {
        **COMMON,
        "data.mirror": str(mirror),
        "data.cache_dir": str(out / "data" / "cache"),
        "data.interim_dir": str(out / "data" / "interim"),
        "preprocess.processed_dir": str(out / "data" / "processed"),
        "train.patience": args.patience,
    }
    try:
        report["data"] = prepare_data(base)
    except Exception as err:  # reported, then the script stops
        traceback.print_exc()
        return fail(out, report, 1, f"data stages failed: {type(err).__name__}: {err}")
    write_outputs(out, report, started)
    for index, name in enumerate(args.models):
        try:
            report["models"][name] = run_model(name, base, out, deadline, len(args.models) - index, args.max_epochs)
        except Exception as err:  # one model failing must not hide the other's
            traceback.print_exc()
            report["models"][name] = {"error": f"{type(err).__name__}: {err}"}
            log.error("%s failed: %s", name, report["models"][name]["error"])
        gc.collect()
        torch.cuda.empty_cache()
        write_outputs(out, report, started)
    print(markdown(report), flush=True)
    failed = [name for name, result in report["models"].items() if "error" in result]
    log.info(
        "done in %.0f s; wrote %s and %s", time.monotonic() - started, out / "gpu_check.json", out / "gpu_check.md"
    )
    if failed:
        print(f"error: gpu_check: {', '.join(failed)} failed (see gpu_check.json)", file=sys.stderr)
        return 1
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", default=os.environ.get(MIRROR_ENV) or "shared/datasets", help="data mirror folder")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_out", help="output folder (default $OUT)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="seconds for everything (a target)")
    parser.add_argument("--max-epochs", type=int, default=200, help="train.epochs when the budget allows it")
    parser.add_argument("--patience", type=int, default=10, help="train.patience (early stopping)")
    parser.add_argument("--models", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="in this order")
    return parser.parse_args()


def check_imports() -> dict[str, str]:
    """Version of every third-party package the stages need, then the stage modules: ``MISSING: ...`` when absent."""
    sys.path.insert(0, str(REPO))  # the working tree, installed or not
    status: dict[str, str] = {}
    for name in (*REQUIRED, *STAGES):
        try:
            module = importlib.import_module(name)
            status[name] = str(getattr(module, "__version__", "ok"))
        except Exception as err:  # ImportError, or a broken install raising anything
            status[name] = f"MISSING: {type(err).__name__}: {err}"
            log.error("import %s failed: %s", name, status[name])
    return status


def environment(torch: Any) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    return {
        "device": torch.cuda.get_device_name(0),
        "device_count": torch.cuda.device_count(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "bf16_supported": torch.cuda.is_bf16_supported(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "mamba_ssm": package_version("mamba_ssm", "mamba-ssm"),
        "nvidia_smi": nvidia_smi(),
    }


def package_version(module: str, distribution: str) -> str | None:
    """The installed version (``installed`` when unknown), None when the module is not installed."""
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "installed"


def nvidia_smi() -> str | None:
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    try:
        return subprocess.run(query, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def prepare_data(base: dict[str, Any]) -> dict[str, Any]:
    from pipeline.data.download import download
    from pipeline.data.preprocess import preprocess
    from pipeline.params import load_params

    params = load_params(REPO / "params.yaml", base)
    started = time.monotonic()
    log.info("download (mirror %s) ...", params.data.resolved_mirror())
    manifest = json.loads(download(params.data).manifest.read_text())
    log.info("preprocess ...")
    stats = json.loads(preprocess(params.preprocess, params.data.interim_dir).stats.read_text())
    summary = {
        "source": {k: manifest["source"].get(k) for k in ("kind", "layout", "complete", "note")},
        "users": stats["users"],
        "items": stats["items"],
        "events": stats["events"],
        "mean_sequence_length": stats["sequence_length"]["mean"],
        "seconds": time.monotonic() - started,
    }
    log.info("data: %s", json.dumps(summary))
    return summary


def run_model(
    name: str, base: dict[str, Any], out: Path, deadline: float, models_left: int, max_epochs: int
) -> dict[str, Any]:
    import torch

    from pipeline.model.train_log import read_log
    from pipeline.params import load_params
    from pipeline.stages import evaluate, train
    from pipeline.training.train import TrainOutputs

    quiet_progress_bars()
    folder = out / name
    share = (deadline - time.monotonic()) / models_left
    overrides = {**base, **VARIANTS[name]}
    probe = load_params(
        REPO / "params.yaml",
        {**overrides, "train.epochs": PROBE_EPOCHS, "train.model_dir": str(folder / "probe")},
    )
    log.info("%s: %d-epoch probe (share of the budget: %.0f s) ...", name, PROBE_EPOCHS, share)
    started = time.monotonic()
    train(probe)
    probe_s = time.monotonic() - started
    probe_epochs = [row["epoch_seconds"] for row in read_log(TrainOutputs.under(folder / "probe").log)]
    warm = probe_epochs[-1]
    usable = share - probe_s - (probe_s - sum(probe_epochs)) - EVAL_RESERVE_S  # setup overhead counted once more
    epochs = max(1, min(max_epochs, math.floor(0.9 * usable / warm)))
    log.info("%s: probe epochs %s s; training with train.epochs=%d", name, [round(s, 2) for s in probe_epochs], epochs)

    params = load_params(
        REPO / "params.yaml",
        {
            **overrides,
            "train.epochs": epochs,
            "train.model_dir": str(folder / "model"),
            "evaluate.report_dir": str(folder / "reports"),
        },
    )
    torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    outputs = train(params).outputs
    train_s = time.monotonic() - started
    peak_train, reserved_train = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    reports = evaluate(params).outputs
    eval_s = time.monotonic() - started
    peak_eval = torch.cuda.max_memory_allocated()

    seconds = [row["epoch_seconds"] for row in read_log(outputs.log)]
    meta = json.loads(outputs.config.read_text())
    metrics = json.loads(reports.metrics.read_text())
    result = {
        "epochs_cap": epochs,
        "epochs_run": meta["epochs_run"],
        "stopped_by": "early stopping" if meta["epochs_run"] < epochs else "epoch cap",
        "best_epoch": meta["best_epoch"],
        "best_valid_ndcg@10": meta["best_valid_ndcg@10"],
        "test": {key: metrics["test"][key] for key in TEST_KEYS},
        "epoch_seconds": seconds,
        "epoch_seconds_median": sorted(seconds)[len(seconds) // 2],
        "probe_epoch_seconds": probe_epochs,
        "train_wall_s": train_s,
        "evaluate_wall_s": eval_s,
        "peak_gpu_mib_train": peak_train / MIB,
        "peak_gpu_reserved_mib_train": reserved_train / MIB,
        "peak_gpu_mib_evaluate": peak_eval / MIB,
    }
    log.info("%s: %s", name, json.dumps({k: v for k, v in result.items() if k != "epoch_seconds"}))
    return result


def quiet_progress_bars() -> None:
    """Turn off the trainer's per-batch tqdm bars (they would flood a captured log); its per-epoch lines stay."""
    trainer = importlib.import_module("pipeline.training.train")
    bar = trainer.tqdm
    if getattr(bar, "quiet", False):
        return

    def quiet(*args: Any, **kwargs: Any) -> Any:
        return bar(*args, **{**kwargs, "disable": True})

    quiet.quiet = True  # type: ignore[attr-defined]
    trainer.tqdm = quiet


def fail(out: Path, report: dict[str, Any], code: int, reason: str) -> int:
    report["error"] = reason
    write_outputs(out, report, None)
    print(f"error: gpu_check: {reason}", file=sys.stderr)
    return code


def write_outputs(out: Path, report: dict[str, Any], started: float | None) -> None:
    if started is not None:
        report["elapsed_s"] = time.monotonic() - started
    (out / "gpu_check.json").write_text(json.dumps(finite(report), indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))


def finite(obj: Any) -> Any:
    """Strict JSON: NaN and infinities become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: finite(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(value) for value in obj]
    return obj


def markdown(report: dict[str, Any]) -> str:
    env, data = report.get("environment", {}), report.get("data", {})
    lines = [
        "# GPU check: HyMoERec vs SASRec on ML-1M (L = 200, bf16 autocast)",
        "",
        f"- device: {env.get('device')} (cc {env.get('capability')}, {env.get('memory_gib')} GiB); "
        f"torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}; "
        f"mamba-ssm: {env.get('mamba_ssm') or 'not installed'}",
        f"- data: {data.get('users')} users, {data.get('items')} items, {data.get('events')} events "
        f"({data.get('source', {}).get('layout')}); budget {report['settings']['budget_s']:.0f} s, "
        f"elapsed {report.get('elapsed_s', 0):.0f} s",
    ]
    if "error" in report:
        lines.append(f"- error: {report['error']}")
    lines += [
        "",
        "| model | epochs run / cap | best epoch | best valid NDCG@10 | "
        + " | ".join(f"test {key.upper()}" for key in TEST_KEYS)
        + " | median epoch s | peak GPU MiB train / eval |",
        "|" + "---|" * (4 + len(TEST_KEYS) + 2),
    ]
    for name, r in report["models"].items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} |" + " |" * (2 + len(TEST_KEYS) + 2))
            continue
        lines.append(
            f"| {name} | {r['epochs_run']} / {r['epochs_cap']} | {r['best_epoch']} | {r['best_valid_ndcg@10']:.4f} | "
            + " | ".join(f"{r['test'][key]:.4f}" for key in TEST_KEYS)
            + f" | {r['epoch_seconds_median']:.2f} | {r['peak_gpu_mib_train']:.0f} / {r['peak_gpu_mib_evaluate']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
