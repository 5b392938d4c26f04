"""``python -m pipeline <stage>``: one entry point, one command per DVC stage.

Each command loads and validates ``params.yaml`` and calls the stage declared in :mod:`pipeline.stages`; Airflow
tasks call the same functions, so there is exactly one definition of every stage.

Exit codes: 0 done; 1 the input or the environment is at fault (a malformed file, an unreachable server, training
that diverged); 2 a parameter is (``params.yaml``, ``--set`` or an argument). Both print one line,
``error: <stage>: <what and how to fix it>``; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Callable, Sequence
from datetime import date

from pipeline.errors import PipelineError, cut, shown
from pipeline.params import Params, ParamsError, load_params, parse_yaml
from pipeline.stages import STAGES

# Commands that take arguments besides the parameters: name -> (help, add_arguments, run(args, params)).
COMMANDS: dict[
    str,
    tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace, Params], object]],
] = {}


def _replay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cut", required=True, help="date (YYYY-MM-DD): earlier events go to retrain.store_dir")
    parser.add_argument("--period", choices=["day", "week"], default="day", help="one inbox log file per period")
    parser.add_argument("--until", help="date (YYYY-MM-DD): stop writing log files before it (default: all)")


def _replay(args: argparse.Namespace, params: Params) -> object:
    from pipeline.ingest.replay import replay

    until = _date_argument("--until", args.until) if args.until else None
    return replay(params, _date_argument("--cut", args.cut), args.period, until)


def _ingest_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--start", required=True, help="interval start, ISO date or date-time (UTC)")
    parser.add_argument("--end", help="interval end, exclusive (default: start + 1 day)")


def _ingest(args: argparse.Namespace, params: Params) -> object:
    from pipeline.ingest.retrain import Interval, ingest

    return ingest(args.params, Interval.parse(args.start, args.end), _parse_overrides(args.set))


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model URI or folder (default: the registered model's champion)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5001, help="port (default: 5001)")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (default: 1)")


def _serve(args: argparse.Namespace, params: Params) -> object:
    from pipeline.tracking.serving import serve

    return serve(params, args.model, args.host, args.port, args.workers)


COMMANDS["replay"] = (
    "cut a dataset with real timestamps at a date: history -> interaction store, later days -> inbox log files",
    _replay_arguments,
    _replay,
)
COMMANDS["ingest"] = (
    "collect, validate and merge the inbox log files of one interval into the interaction store (no training)",
    _ingest_arguments,
    _ingest,
)
COMMANDS["serve"] = (
    "serve a registered model over HTTP: MLflow's scoring server, error answers one line without the request",
    _serve_arguments,
    _serve,
)


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
    for stage in STAGES.values():
        sub.add_parser(stage.name, help=stage.help)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        params = load_params(args.params, _parse_overrides(args.set))
        if args.stage in COMMANDS:
            COMMANDS[args.stage][2](args, params)
        else:
            STAGES[args.stage].run(params)
    except ParamsError as err:
        return _fail(args.stage, err, 2)
    except (PipelineError, OSError) as err:  # input or environment; OSError: a missing file, a full disk
        return _fail(args.stage, err, 1)
    return 0


def _fail(stage: str, err: Exception, code: int) -> int:
    """One line for the user, ``error: <stage>: <message>``; the traceback only with --verbose."""
    logging.getLogger("pipeline").debug("%s failed", stage, exc_info=True)
    message = str(err)
    if isinstance(err, FileNotFoundError) and err.filename:
        message = f"no such file: {err.filename}"
    elif isinstance(err, OSError) and err.errno == errno.ENOSPC and err.filename:
        message = f"no space left on device writing {err.filename}: free space on its disk, then run again"
    print(f"error: {stage}: {message}", file=sys.stderr)
    return code


def _parse_overrides(items: list[str]) -> dict[str, object]:
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ParamsError(f"--set expects KEY=VALUE, got {shown(item)}")
        key = key.strip()
        try:
            overrides[key] = parse_yaml(value, f"--set {cut(key)}")
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or "not a YAML value"
            raise ParamsError(
                f"--set {cut(key)}: {shown(value)} is not a YAML value ({cut(problem)}); quote strings"
            ) from err
    return overrides


def _date_argument(flag: str, value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError as err:
        raise ParamsError(f"{flag} must be a date (YYYY-MM-DD), got {shown(value)}") from err
