"""HyMoERec retraining on fresh interaction logs (Airflow 3 TaskFlow).

Each run covers its data interval ``[data_interval_start, data_interval_end)`` (the schedule's previous period;
a manual run with a logical date covers the period before that date):

    collect -> validate -> merge -> enough_new_events -> download -> preprocess -> train -> evaluate -> register

- **collect** copies the inbox's log files dated within the interval (``retrain.inbox``: a folder or fsspec URL);
- **validate** checks them with the download stage's readers; bad rows go to ``ingest/quarantine.csv`` with reasons,
  and the run fails above ``retrain.max_bad_fraction``;
- **merge** adds the valid events to the date-partitioned store (de-duplicated, so a re-run adds nothing twice) and
  updates the store's asset (``file://<store folder>``), which other DAGs can be scheduled on;
- **enough_new_events** skips the rest (the champion stays) when fewer than ``retrain.min_new_events`` arrived;
- **download ... evaluate** are the DVC stages' functions, run on the store in the interval's own folder; **train**
  starts from the champion's weights when ``retrain.warm_start`` is on and the item catalogue is unchanged;
- **register** logs and registers the model; ``champion`` moves only to a better model (DVC's ``evaluate`` stage
  runs evaluate and register in one go; here they are two tasks, so a registration failure retries on its own).

Every task calls one function of :mod:`pipeline.ingest.retrain`, which calls the same functions as
``python -m pipeline`` and ``dvc repro``. Parsing this file imports only PyYAML and the Airflow SDK; ``pipeline``,
torch and MLflow load inside the tasks. Settings come from the ``retrain:`` section of ``params.yaml``
(``$HYMOE_PARAMS`` names another file); a run's conf may hold ``{"overrides": {"train.epochs": 5}}`` to change
hyperparameters for that run only: ``model.*``, the training hyperparameters and the retraining gates
(``retrain.min_new_events``, ``retrain.warm_start``); a path or store location is refused, failing the run with the
reason in the task log.

Parameter mistakes: the settings the DAG itself is built from (``retrain.schedule``, ``start_date``, ``retries``,
``retry_delay_s``, ``max_retry_delay_s``, ``store_dir``) are checked when this file is parsed, and a mistake there is
the DAG's import error, naming key and file; so are YAML anchors and aliases anywhere in the file (an alias bomb
would otherwise hang the DAG processor), and echoed values are cut at 120 characters. Every other mistake in the
params file, and a run's conf whose values fail validation (``train.lr=1e30``, ``train.seed=-1``), fails the run's
first task with ``AirflowFailException`` (no retries, nothing merged), the key and file in its log: the DAG stays
listed with its history, and the failed run is where the retraining's failures are watched. Settings that do not
fit the machine's memory and training that diverges fail ``train`` the same way, without retries.
"""

from __future__ import annotations

import contextlib
import os
import reprlib
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from airflow.sdk import Asset, CronDataIntervalTimetable, Param, dag, task

PARAMS_FILE = Path(os.environ.get("HYMOE_PARAMS") or Path(__file__).resolve().parents[1] / "params.yaml").resolve()
REQUIRED = ("schedule", "start_date", "store_dir", "retries", "retry_delay_s", "max_retry_delay_s")
MAX_PARAMS_BYTES = 1 << 20  # as pipeline.params (not imported here: parsing stays light)
MAX_YAML_DEPTH = 16  # as pipeline.params
MAX_ECHO = 120  # as pipeline.errors: an echoed value is cut at this many characters


class _Loader(yaml.SafeLoader):
    """Dates stay text, as in ``pipeline.params``: an impossible one elsewhere in the file (``2024-02-30``) is for
    the run's first task to report by key, not a constructor error that hides the DAG."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _settings() -> dict[str, Any]:
    """The ``retrain`` settings the DAG is built from, checked: a mistake names its key and the file."""
    if not PARAMS_FILE.is_file() or PARAMS_FILE.stat().st_size > MAX_PARAMS_BYTES:
        raise ValueError(f"{PARAMS_FILE}: not a parameters file (a regular file of at most {MAX_PARAMS_BYTES} bytes)")
    try:
        text = PARAMS_FILE.read_text()
        problem = _expansion_problem(text)
        raw = {} if problem else yaml.load(text, Loader=_Loader) or {}  # noqa: S506 - a SafeLoader
    except (yaml.YAMLError, ValueError, RecursionError) as err:
        raise ValueError(f"{PARAMS_FILE} is not valid YAML: {' '.join(str(err).split())[:300]}") from None
    if problem:
        raise ValueError(f"{PARAMS_FILE}: {problem}")
    retrain = (raw.get("retrain") if isinstance(raw, dict) else None) or {}
    missing = [key for key in REQUIRED if key not in retrain]
    if missing:
        raise KeyError(f"{PARAMS_FILE}: the retrain section lacks {', '.join(missing)}")
    valid = {
        "schedule": retrain["schedule"] is None or isinstance(retrain["schedule"], str),
        "start_date": _is_date(retrain["start_date"]),
        "store_dir": isinstance(retrain["store_dir"], str),
        "retries": _is_number(retrain["retries"], 0, 100, int),
        "retry_delay_s": _is_number(retrain["retry_delay_s"], 1e-3, 86_400),
        "max_retry_delay_s": _is_number(retrain["max_retry_delay_s"], 1e-3, 7 * 86_400),
    }
    for key, ok in valid.items():
        if not ok:
            raise ValueError(
                f"{PARAMS_FILE}: retrain.{key} is invalid, got {_shown(retrain[key])} (schedule: a cron "
                "expression or null; start_date: YYYY-MM-DD from 1970-01-01; retries: 0..100; retry_delay_s: "
                "up to 86400; max_retry_delay_s: up to 604800)"
            )
    return retrain


def _expansion_problem(text: str) -> str | None:
    """Anchors and aliases, or nesting deeper than :data:`MAX_YAML_DEPTH`, found in the parser's events before
    anything is built (as ``pipeline.params.parse_yaml`` refuses them), named by the key that holds them: an alias
    bomb of a few hundred bytes (``schedule: *bomb``) would otherwise expand to gigabytes where the value is walked
    or echoed, and hang the DAG processor instead of failing the import. ``None`` when there is none."""
    path: list[list[Any]] = []  # per open collection: [key or index, whether a mapping's next node is a key]
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.CollectionEndEvent):
            path.pop()
            _next_node(path)
            continue
        if not isinstance(event, yaml.NodeEvent):
            continue
        if isinstance(event, yaml.AliasEvent) or event.anchor:
            where = "".join(f"[{key}]" if isinstance(key, int) else f".{key}" for key, _ in path).lstrip(".")
            return f"{where or 'the top level'}: YAML anchors and aliases (&name, *name) are not allowed in parameters"
        if isinstance(event, yaml.CollectionStartEvent):
            if len(path) == MAX_YAML_DEPTH:
                return f"YAML nested deeper than {MAX_YAML_DEPTH} levels"
            path.append([0, isinstance(event, yaml.MappingStartEvent)])
        elif path and path[-1][1] and isinstance(event, yaml.ScalarEvent):  # a key: the next node is its value
            path[-1] = [event.value, False]
        else:
            _next_node(path)
    return None


def _next_node(path: list[list[Any]]) -> None:
    """A node ended: a mapping expects its next key, a sequence moves to its next index."""
    if path and isinstance(path[-1][0], int) and not path[-1][1]:
        path[-1][0] += 1
    elif path:
        path[-1][1] = True


# reprlib walks only as much of a value as it shows: a deep or wide one costs no more than its cut echo
_ECHO = reprlib.Repr()
_ECHO.maxlevel, _ECHO.maxlist, _ECHO.maxdict, _ECHO.maxstring, _ECHO.maxother = 3, 10, 10, MAX_ECHO, MAX_ECHO


def _shown(value: Any) -> str:
    """``repr(value)`` cut at :data:`MAX_ECHO` characters, never expanding more of a huge value than that."""
    text = _ECHO.repr(value)
    return text if len(text) <= MAX_ECHO else f"{text[: MAX_ECHO - 3]}..."


def _is_date(value: Any) -> bool:
    try:
        return date(1970, 1, 1) <= date.fromisoformat(str(value)) < date(9999, 1, 1)
    except ValueError:
        return False


def _is_number(value: Any, low: float, high: float, kind: type = float) -> bool:
    types = int if kind is int else (int, float)
    return isinstance(value, types) and not isinstance(value, bool) and low <= value <= high


SETTINGS = _settings()
# named by its URI: another store folder is another asset (two URIs under one name would deactivate both)
STORE = Asset((PARAMS_FILE.parent / SETTINGS["store_dir"]).resolve().as_uri(), group="hymoerec")


def _timetable(schedule: str | None) -> CronDataIntervalTimetable | None:
    # a data-interval timetable: a run at midnight covers the day before (a plain "@daily" would give Airflow 3's
    # trigger timetable, whose runs have an empty interval)
    return CronDataIntervalTimetable(schedule, timezone="UTC") if schedule else None


def _interval(context: dict[str, Any]) -> Any:
    from pipeline.ingest.retrain import Interval

    start, end = context.get("data_interval_start"), context.get("data_interval_end")
    if start is None or end is None or start >= end:
        raise ValueError(
            f"run {context['run_id']} has no data interval ({start} .. {end}): trigger it with a logical date (it "
            "covers the schedule's period before that date) or, with retrain.schedule null, give data_interval_start "
            "and data_interval_end (REST API)"
        )
    return Interval(start, end)


@contextlib.contextmanager
def _no_retry() -> Iterator[None]:
    """A parameter error or diverging training fails the task at once: a retry with the same settings would fail the
    same way. The reason is the task log's last line."""
    from airflow.sdk.exceptions import AirflowFailException

    from pipeline.errors import ParamsError, TrainingDivergedError

    try:
        yield
    except (ParamsError, TrainingDivergedError) as err:
        raise AirflowFailException(str(err)) from err


def _overrides(context: dict[str, Any]) -> dict[str, Any]:
    """The run's conf overrides, refused (with the params file validated with them) at the first task that asks."""
    from pipeline.ingest.retrain import run_overrides

    with _no_retry():
        return run_overrides(context["params"], PARAMS_FILE)


@dag(
    dag_id="hymoerec_retrain",
    description=(
        "Ingest the interval's interaction logs into the store, retrain HyMoERec on it, evaluate, and promote the "
        "model to champion only if it beats the current one"
    ),
    schedule=_timetable(SETTINGS["schedule"]),
    start_date=datetime.fromisoformat(str(SETTINGS["start_date"])).replace(tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args={
        "retries": SETTINGS["retries"],
        "retry_delay": timedelta(seconds=SETTINGS["retry_delay_s"]),
        "retry_exponential_backoff": 2.0,  # Airflow 3.3 takes the multiplier: 2.0 doubles the delay each retry
        "max_retry_delay": timedelta(seconds=SETTINGS["max_retry_delay_s"]),
    },
    params={
        "overrides": Param(
            {},
            type="object",
            description='hyperparameter overrides for this run, as for --set: {"train.epochs": 5} (model.*, train.*'
            " hyperparameters, retrain.min_new_events, retrain.warm_start; paths are refused)",
        )
    },
    tags=["hymoerec", "retraining"],
    doc_md=__doc__,
)
def hymoerec_retrain() -> None:
    @task
    def collect(**context: Any) -> list[str]:
        from pipeline.ingest import retrain

        return retrain.collect_logs(PARAMS_FILE, _interval(context), _overrides(context))

    @task
    def validate(files: list[str], **context: Any) -> dict[str, Any]:
        from pipeline.ingest import retrain

        return retrain.validate_batch(PARAMS_FILE, _interval(context), files, _overrides(context))

    @task(outlets=[STORE])
    def merge(report: dict[str, Any], **context: Any) -> dict[str, Any]:
        from pipeline.ingest import retrain

        return retrain.merge_batch(PARAMS_FILE, _interval(context), _overrides(context))

    @task.short_circuit
    def enough_new_events(report: dict[str, Any], merged: dict[str, Any], **context: Any) -> bool:
        # `merged` only orders this check after the merge: a quiet interval still lands in the store
        from pipeline.ingest import retrain

        return retrain.enough_new_events(PARAMS_FILE, report, _overrides(context))

    @task
    def download(**context: Any) -> None:
        from pipeline.ingest import retrain

        retrain.run_stage("download", PARAMS_FILE, _interval(context), _overrides(context))

    @task
    def preprocess(**context: Any) -> None:
        from pipeline.ingest import retrain

        retrain.run_stage("preprocess", PARAMS_FILE, _interval(context), _overrides(context))

    @task
    def train(**context: Any) -> dict[str, Any]:
        from pipeline.ingest import retrain

        with _no_retry():  # too big for the machine's memory, or diverged
            return retrain.train_model(PARAMS_FILE, _interval(context), _overrides(context))

    @task
    def evaluate(**context: Any) -> None:
        from pipeline.ingest import retrain

        retrain.run_stage("evaluate", PARAMS_FILE, _interval(context), _overrides(context))

    @task
    def register(**context: Any) -> dict[str, Any]:
        from pipeline.ingest import retrain

        return retrain.register_model(PARAMS_FILE, _interval(context), _overrides(context))

    report = validate(collect())
    gate = enough_new_events(report, merge(report))
    gate >> download() >> preprocess() >> train() >> evaluate() >> register()


hymoerec_retrain()
