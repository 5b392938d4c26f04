"""``python -m pipeline <stage>``: one entry point, one command per DVC stage.

Each command loads and validates ``params.yaml`` and calls the stage's plain function; Airflow tasks call the same
functions, so there is exactly one definition of every stage.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from pipeline.params import Params, ParamsError, load_params

STAGES: dict[str, tuple[str, Callable[[Params], object]]] = {}


def stage(name: str, help_text: str) -> Callable[[Callable[[Params], object]], Callable[[Params], object]]:
    def register(func: Callable[[Params], object]) -> Callable[[Params], object]:
        STAGES[name] = (help_text, func)
        return func

    return register


@stage("download", "obtain the dataset (mirror, cache or official URL) -> interactions.parquet + manifest")
def _download(params: Params) -> object:
    from pipeline.data.download import download

    return download(params.data)


@stage("preprocess", "filter, k-core, re-index and split -> Parquet sequences + stats.json")
def _preprocess(params: Params) -> object:
    from pipeline.data.preprocess import preprocess

    return preprocess(params.preprocess, params.data.interim_dir)


@stage("train", "train the model with early stopping on validation NDCG@10 (resumes a matching checkpoint)")
def _train(params: Params) -> object:
    from pipeline.training.train import train

    return train(params)


@stage("evaluate", "full-ranking test metrics, bucket analysis, expert load and plots -> metrics.json")
def _evaluate(params: Params) -> object:
    from pipeline.evaluation.evaluate import evaluate

    return evaluate(params)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a parameter, e.g. --set data.dataset=ml-100k (YAML value syntax)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (help_text, _) in STAGES.items():
        sub.add_parser(name, help=help_text)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        params = load_params(args.params, _parse_overrides(args.set))
    except (ParamsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _, func = STAGES[args.stage]
    try:
        func(params)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        logging.getLogger("pipeline").debug("stage failed", exc_info=True)
        print(f"error: {args.stage}: {err}", file=sys.stderr)
        return 1
    return 0


def _parse_overrides(items: list[str]) -> dict[str, object]:
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ParamsError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides
