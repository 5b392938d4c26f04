"""Typed, validated parameters loaded from ``params.yaml``.

Every stage takes one of these dataclasses instead of a loose dict, so a typo in ``params.yaml`` fails at once with
the list of valid keys rather than being silently ignored (which would make ``dvc repro`` reproduce the wrong
experiment). The same objects are built by the Airflow tasks, so DVC and Airflow run one definition of each stage.

Reading is bounded: only a regular file of at most 1 MiB, YAML without anchors or aliases (an alias bomb) and at
most 16 levels deep, dates kept as text so that an impossible one is reported by its key; every number must lie
within :data:`LIMITS`, so that what validation accepts, training can run.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import re
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.data.events import LogTyping, TimestampWindow, timestamp_format_error
from pipeline.errors import ParamsError, cut, shown
from pipeline.model.config import ModelConfig

DATASETS = ("ml-1m", "ml-100k", "beauty", "custom", "synthetic")
MAX_FUTURE_TOLERANCE_S = 10 * 365 * 86_400
MIRROR_ENV = "HYMOE_DATA_MIRROR"
MAX_PARAMS_BYTES = 1 << 20  # a parameters file is a few KB: a larger "file" (/dev/zero, a log) is never read
MAX_YAML_DEPTH = 16  # parameters nest four levels deep; PyYAML composes nesting by recursion
# a float written as text: YAML 1.1 reads 1e-3 and 1e30 (no dot, or no exponent sign) as strings, which a float
# setting takes as the number they spell; never nan, inf, hex or underscores
FLOAT_TEXT = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
LAST_DATE = datetime.date(
    9998, 12, 31
)  # the last day starting a date: its interval ends well inside a datetime's range


@dataclass
class DownloadParams:
    retries: int = 5
    backoff_s: float = 1.0
    timeout_s: float = 30.0

    def validate(self) -> None:
        if self.retries < 0 or self.backoff_s < 0 or self.timeout_s <= 0:
            raise ParamsError("data.download.retries and backoff_s must be >= 0, timeout_s > 0")


@dataclass
class CustomSourceParams:
    path: str | None = None
    format: Literal["auto", "csv", "parquet", "jsonl"] = "auto"
    user_col: str = "user_id"
    item_col: str = "item_id"
    timestamp_col: str = "timestamp"
    rating_col: str | None = None
    event_col: str | None = None
    event_types: list[str] | None = None
    csv_delimiter: str = ","
    until: int | None = None
    id_type: Literal["auto", "int", "string"] = "auto"
    timestamp_format: str = "auto"

    def columns(self) -> dict[str, str]:
        """Canonical column -> this source's column name (``rating`` only when a rating column is configured)."""
        columns = {"user_id": self.user_col, "item_id": self.item_col, "timestamp": self.timestamp_col}
        if self.rating_col:
            columns["rating"] = self.rating_col
        return columns

    def log_typing(self) -> LogTyping:
        """How this source's ids and times are typed (``id_type``, ``timestamp_format``)."""
        return LogTyping(self.id_type, self.timestamp_format)


@dataclass
class SyntheticParams:
    n_users: int = 2000
    n_items: int = 1000
    mean_events_per_user: float = 40.0
    n_categories: int = 20
    chain_fraction: float = 0.4
    loyal_fraction: float = 0.4
    noisy_fraction: float = 0.2
    seed: int = 0


@dataclass
class TimestampParams:
    earliest: str = "1970-01-01"
    future_tolerance_s: float = 86_400.0

    def validate(self) -> None:
        try:
            earliest = datetime.date.fromisoformat(self.earliest)
        except ValueError as err:
            raise ParamsError(
                f"data.timestamps.earliest must be a date (YYYY-MM-DD), got {shown(self.earliest)}"
            ) from err
        if earliest < datetime.date(1970, 1, 1):
            raise ParamsError(f"data.timestamps.earliest must be 1970-01-01 or later, got {self.earliest}")
        if earliest > LAST_DATE:
            raise ParamsError(f"data.timestamps.earliest must be {LAST_DATE} or earlier, got {self.earliest}")
        if not 0 <= self.future_tolerance_s <= MAX_FUTURE_TOLERANCE_S:
            raise ParamsError(
                f"data.timestamps.future_tolerance_s must lie in [0, {MAX_FUTURE_TOLERANCE_S}] (ten years), "
                f"got {self.future_tolerance_s}"
            )

    def window(self, now: float | None = None) -> TimestampWindow:
        """Valid unix seconds ``[earliest, now + tolerance]``: outside it a timestamp is quarantined, never kept."""
        start = datetime.datetime.combine(datetime.date.fromisoformat(self.earliest), datetime.time(), datetime.UTC)
        return TimestampWindow.until_now(self.future_tolerance_s, int(start.timestamp()), now)


@dataclass
class DataParams:
    dataset: str = "ml-1m"
    mirror: str | None = None
    cache_dir: str = "data/cache"
    interim_dir: str = "data/interim"
    max_bad_fraction: float = 0.01
    max_file_mb: int = 64  # MiB per custom log file (JSON lines: 4x); see pipeline.data.readers
    timestamps: TimestampParams = field(default_factory=TimestampParams)
    beauty_source: Literal["auto", "raw", "s3rec", "ticoserec"] = "auto"
    download: DownloadParams = field(default_factory=DownloadParams)
    custom: CustomSourceParams = field(default_factory=CustomSourceParams)
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise ParamsError(
                f"data.dataset: unknown dataset {shown(self.dataset)}; choose one of {', '.join(DATASETS)}"
            )
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ParamsError(f"data.max_bad_fraction must lie in [0, 1], got {self.max_bad_fraction}")
        if self.dataset == "custom" and not self.custom.path:
            raise ParamsError("data.custom.path must name a file, folder or glob when data.dataset is 'custom'")
        delimiter = self.custom.csv_delimiter
        if len(delimiter) != 1 or delimiter in '\r\n"':
            raise ParamsError(
                f"data.custom.csv_delimiter must be one character, not a quote or newline: {shown(delimiter)}"
            )
        if (problem := timestamp_format_error(self.custom.timestamp_format)) is not None:
            raise ParamsError(f"data.custom.timestamp_format: {problem}")
        self.download.validate()
        self.timestamps.validate()

    def resolved_mirror(self) -> Path | None:
        """The mirror folder: ``$HYMOE_DATA_MIRROR`` wins over ``data.mirror`` so CI can point at a copy."""
        value = os.environ.get(MIRROR_ENV) or self.mirror
        return Path(value).expanduser() if value else None


@dataclass
class TimeSplitParams:
    valid_fraction: float = 0.1
    test_fraction: float = 0.1


@dataclass
class PreprocessParams:
    processed_dir: str = "data/processed"
    min_rating: float | None = None
    dedup: Literal["none", "first", "last", "consecutive"] = "none"
    user_min: int = 5
    item_min: int = 5
    split: Literal["leave_one_out", "global_time"] = "leave_one_out"
    time_split: TimeSplitParams = field(default_factory=TimeSplitParams)

    def validate(self) -> None:
        if self.user_min < 1 or self.item_min < 1:
            raise ParamsError("preprocess.user_min and preprocess.item_min must be >= 1")
        if self.split == "leave_one_out" and self.user_min < 3:
            raise ParamsError("leave-one-out needs preprocess.user_min >= 3 (train, valid and test events)")
        fractions = self.time_split.valid_fraction + self.time_split.test_fraction
        if self.split == "global_time" and not (0 < fractions < 1):
            raise ParamsError("preprocess.time_split fractions must be positive and sum to less than 1")


@dataclass
class TrainParams:
    model_dir: str = "models"
    epochs: int = 200
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_warmup_steps: int = 0
    grad_clip: float = 1.0
    num_negatives: int = 0
    windows: Literal["last", "all"] = "last"
    length_buckets: bool = True
    patience: int = 10
    seed: int = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    cpu_amp: bool = False
    eval_batch_size: int = 512
    resume: bool = True
    warm_start_from: str | None = None

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "patience", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ParamsError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.num_negatives < 0:
            raise ParamsError("train.lr must be > 0; weight_decay, grad_clip and num_negatives must be >= 0")


@dataclass
class EvaluateParams:
    report_dir: str = "reports"
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    exclude_seen: bool = False
    sampled_negatives: int = 0
    sampled_distribution: Literal["uniform", "popularity"] = "uniform"
    seed: int = 0

    def validate(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise ParamsError("evaluate.ks must list cut-offs >= 1")
        if 10 not in self.ks:
            raise ParamsError("evaluate.ks must include 10: NDCG@10 drives model selection and promotion")


@dataclass
class RetrainParams:
    inbox: str = "data/inbox"
    file_pattern: str = "**"
    store_dir: str = "data/store"
    work_dir: str = "data/retrain"
    schedule: str | None = "@daily"
    start_date: str = "1995-01-01"
    min_new_events: int = 100
    max_bad_fraction: float = 0.05
    warm_start: bool = True
    retries: int = 2
    retry_delay_s: float = 60.0
    max_retry_delay_s: float = 900.0

    def validate(self) -> None:
        if self.min_new_events < 0 or self.retries < 0:
            raise ParamsError("retrain.min_new_events and retrain.retries must be >= 0")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ParamsError(f"retrain.max_bad_fraction must lie in [0, 1], got {self.max_bad_fraction}")
        if self.retry_delay_s <= 0 or self.max_retry_delay_s < self.retry_delay_s:
            raise ParamsError("retrain.retry_delay_s must be > 0 and <= retrain.max_retry_delay_s")
        try:
            start = datetime.date.fromisoformat(self.start_date)
        except ValueError as err:
            raise ParamsError(f"retrain.start_date must be a date (YYYY-MM-DD), got {shown(self.start_date)}") from err
        if not datetime.date(1970, 1, 1) <= start <= LAST_DATE:
            raise ParamsError(f"retrain.start_date must lie in [1970-01-01, {LAST_DATE}], got {self.start_date}")


@dataclass
class MlflowParams:
    enabled: bool = True
    store_dir: str = "data/mlflow"
    experiment_prefix: str = "hymoerec"
    model_name_prefix: str = "hymoerec"
    min_delta: float = 0.0
    retries: int = 4
    backoff_s: float = 1.0
    exclude_history: bool = True
    batch_k: int = 10
    batch_output: str = "reports/recommendations.parquet"

    def validate(self) -> None:
        if not self.experiment_prefix.strip() or not self.model_name_prefix.strip():
            raise ParamsError("mlflow.experiment_prefix and mlflow.model_name_prefix must not be empty")
        if self.min_delta < 0 or self.retries < 0 or self.backoff_s < 0:
            raise ParamsError("mlflow.min_delta, mlflow.retries and mlflow.backoff_s must be >= 0")
        if self.batch_k < 1:
            raise ParamsError(f"mlflow.batch_k must be >= 1, got {self.batch_k}")


@dataclass
class Params:
    data: DataParams = field(default_factory=DataParams)
    preprocess: PreprocessParams = field(default_factory=PreprocessParams)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    retrain: RetrainParams = field(default_factory=RetrainParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)

    def validate(self) -> None:
        try:
            self.data.validate()
            self.preprocess.validate()
            self.train.validate()
            self.evaluate.validate()
            self.retrain.validate()
            self.mlflow.validate()
            try:
                self.model.validate()
            except ValueError as err:
                raise ParamsError(f"model: {err}") from err
            check_limits(self)
        except ParamsError as err:  # the messages end in the value they refuse: never a screenful of it
            raise ParamsError(_cut_echo(str(err))) from err


SEED_RANGE = (0, 2**32 - 1)  # numpy's legacy seeding (np.random.seed) takes no more
# The bounds of every number a run can be given: a value outside them is refused at validation (exit 2, or
# AirflowFailException at a DAG run's first task) instead of crashing or hanging training. Sizes are capped far
# above any recommender this pipeline trains, at values whose network alone still fits a large GPU; what a
# combination of sizes needs for the actual catalogue is estimated when training starts (training_memory_bytes).
LIMITS: dict[str, tuple[float, float]] = {  # inclusive; the validators above refuse a zero where it is one
    "data.max_file_mb": (1, 4096),  # a CSV file takes about 20x its size in memory while it is read
    "data.download.retries": (0, 100),
    "data.download.backoff_s": (0, 3600),
    "data.download.timeout_s": (0, 3600),
    "data.custom.until": (0, 253_402_214_400),  # 9999-12-31 in unix seconds
    "data.synthetic.n_users": (1, 10_000_000),
    "data.synthetic.n_items": (1, 10_000_000),
    "data.synthetic.mean_events_per_user": (1, 10_000),
    "data.synthetic.n_categories": (1, 1_000_000),
    "data.synthetic.seed": SEED_RANGE,
    "preprocess.user_min": (1, 1_000_000),
    "preprocess.item_min": (1, 1_000_000),
    "preprocess.time_split.valid_fraction": (0, 1),
    "preprocess.time_split.test_fraction": (0, 1),
    "model.hidden_size": (1, 4096),
    "model.num_layers": (1, 64),
    "model.num_heads": (1, 64),
    "model.max_seq_len": (1, 4096),
    "model.ffn_hidden": (1, 65_536),
    "model.moe.num_experts": (1, 256),
    "model.moe.expert_hidden": (1, 65_536),
    "model.moe.dense_hidden": (1, 65_536),
    "model.moe.alpha_init": (-100, 100),
    "model.moe.warmup_steps": (0, 1_000_000_000),
    "model.moe.lb_weight": (0, 100),
    "model.narm.hidden_size": (1, 4096),
    "model.narm.num_layers": (1, 64),
    "model.mamba.num_layers": (1, 64),
    "model.mamba.d_state": (1, 1024),
    "model.mamba.d_conv": (1, 64),
    "model.mamba.expand": (1, 16),
    "train.epochs": (1, 100_000),
    "train.batch_size": (1, 65_536),
    "train.lr": (0, 1.0),
    "train.weight_decay": (0, 10),
    "train.lr_warmup_steps": (0, 1_000_000_000),
    "train.grad_clip": (0, 1e6),
    "train.num_negatives": (0, 100_000),
    "train.patience": (1, 100_000),
    "train.seed": SEED_RANGE,
    "train.eval_batch_size": (1, 65_536),
    "evaluate.sampled_negatives": (0, 100_000),
    "evaluate.seed": SEED_RANGE,
    "retrain.min_new_events": (0, 10**12),
    "retrain.retries": (0, 100),
    "retrain.retry_delay_s": (0, 86_400),
    "retrain.max_retry_delay_s": (0, 7 * 86_400),
    "mlflow.min_delta": (0, 1),
    "mlflow.retries": (0, 100),
    "mlflow.backoff_s": (0, 3600),
    "mlflow.batch_k": (1, 10_000),
}
MAX_K = 10_000  # evaluate.ks: the longest cut-off
MAX_SYNTHETIC_EVENTS = 200_000_000  # data.synthetic: about 5 GB of generated events


def check_limits(params: Params) -> None:
    """Refuse any number outside :data:`LIMITS` (floats are known finite already), naming the key and the range."""
    for dotted, (low, high) in LIMITS.items():
        value: Any = params
        for part in dotted.split("."):
            value = getattr(value, part)
        if value is not None and not low <= value <= high:
            raise ParamsError(f"{dotted} must lie in [{_number(low)}, {_number(high)}], got {shown(value)}")
    if max(params.evaluate.ks) > MAX_K:
        raise ParamsError(f"evaluate.ks must be cut-offs <= {MAX_K}, got {shown(max(params.evaluate.ks))}")
    events = params.data.synthetic.n_users * params.data.synthetic.mean_events_per_user
    if events > MAX_SYNTHETIC_EVENTS:
        raise ParamsError(
            f"data.synthetic.n_users * mean_events_per_user must be <= {MAX_SYNTHETIC_EVENTS} events, got {events:.0f}"
        )


def load_params(path: str | os.PathLike[str] = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Load, type-check and validate ``params.yaml``; ``overrides`` maps dotted keys (``data.dataset``) to values.

    A mistake the file makes on its own is reported with the file's name in front, so the user (or the Airflow
    task log) knows where to fix it; one that only the overrides make is reported as it is.
    """
    raw = _read_params_file(path)
    try:
        params = _build(raw, overrides)
    except ParamsError as err:
        if overrides and not _fails_alike(path, err):
            raise
        raise ParamsError(f"{path}: {err}") from err
    return params


def _read_params_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The parameters file as a mapping; only a regular file of at most :data:`MAX_PARAMS_BYTES` is read."""
    try:
        # non-blocking, so that a FIFO is not waited on but refused; fstat judges what was actually opened
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            info = os.fstat(descriptor)
            if stat.S_ISDIR(info.st_mode):
                raise ParamsError(f"the parameters file {path} is a folder, not a file")
            if not stat.S_ISREG(info.st_mode):
                raise ParamsError(f"the parameters file {path} is not a regular file (a device, FIFO or socket)")
            with open(descriptor, "rb", closefd=False) as file:
                data = file.read(MAX_PARAMS_BYTES + 1)
        finally:
            os.close(descriptor)
        if len(data) > MAX_PARAMS_BYTES:
            raise ParamsError(f"the parameters file {path} is larger than {MAX_PARAMS_BYTES} bytes")
        raw = parse_yaml(data.decode(), str(path)) or {}
    except (OSError, UnicodeDecodeError) as err:
        raise ParamsError(f"cannot read the parameters file {path}: {err}") from err
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from err
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: the top level must be a mapping")
    return raw


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader without its implicit date type: an unquoted date stays text, so an impossible one
    (``2024-02-30``) reaches validation, which names its key, instead of failing inside the YAML constructor."""


ParamsLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def parse_yaml(text: str, source: str) -> Any:
    """YAML parameter text -> value. Anchors and aliases are refused before anything is built: an alias bomb of a
    few hundred bytes would otherwise expand to gigabytes wherever the value is walked or printed. Nesting deeper
    than :data:`MAX_YAML_DEPTH` is refused too (PyYAML would build it by recursion). Raises ``yaml.YAMLError`` for
    malformed YAML, :class:`ParamsError` for the rest."""
    depth = 0
    for event in yaml.parse(text, Loader=ParamsLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise ParamsError(f"{source}: YAML anchors and aliases (&name, *name) are not allowed in parameters")
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise ParamsError(f"{source}: YAML nested deeper than {MAX_YAML_DEPTH} levels")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    try:
        return yaml.load(text, Loader=ParamsLoader)  # noqa: S506 - ParamsLoader is a SafeLoader
    except ValueError as err:  # an integer of more digits than Python converts
        raise ParamsError(f"{source}: {cut(str(err))}") from err


def _build(raw: dict[str, Any], overrides: dict[str, Any] | None) -> Params:
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    params = from_dict(Params, raw, "")
    params.validate()
    return params


def _fails_alike(path: str | os.PathLike[str], err: ParamsError) -> bool:
    """Whether the parameters file on its own fails with the same message as with the overrides applied."""
    try:
        _build(_read_params_file(path), None)
    except ParamsError as alone:
        return str(alone) == str(err)
    return False


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types with the dotted key path."""
    if not isinstance(data, dict):
        raise ParamsError(f"{where or 'params'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ParamsError(
            f"unknown key(s) {cut(', '.join(_join(where, str(k)) for k in unknown))}; "
            f"valid keys{' under ' + where if where else ''}: {', '.join(sorted(known))}"
        )
    kwargs: dict[str, Any] = {}
    for name in known & set(data):
        kwargs[name] = _coerce(hints[name], data[name], _join(where, name))
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, where)
            except ParamsError as err:
                errors.append(str(err))
        raise ParamsError(errors[0] if len(errors) == 1 else f"{where}: {shown(value)} matches none of {hint}")
    if origin is Literal:
        if value not in args:
            raise ParamsError(f"{where}: {shown(value)} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{where}: expected a list, got {shown(value)}")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{where}: expected true/false, got {shown(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where}: expected an integer, got {shown(value)}")
        return value
    if hint is float:
        if isinstance(value, str) and FLOAT_TEXT.fullmatch(value):
            value = float(value)  # 1e-3 in YAML 1.1 is text; too large a one becomes inf, refused below
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParamsError(f"{where}: expected a number, got {shown(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer of hundreds of digits
            number = math.inf
        if not math.isfinite(number):  # YAML's .nan / .inf: NaN fails deep inside torch, inf trains on NaN loss
            raise ParamsError(f"{where}: expected a finite number, got {str(value)[:40]}")
        return number
    if hint is str:
        if isinstance(value, datetime.date):  # YAML reads an unquoted 2024-01-05 as a date
            return value.isoformat()
        if not isinstance(value, str):
            raise ParamsError(f"{where}: expected a string, got {shown(value)}")
        return value
    if hint is Any or typing.get_origin(hint) is dict:
        return value
    raise ParamsError(f"{where}: unsupported parameter type {hint}")


def _number(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _cut_echo(message: str) -> str:
    """``message`` with what follows its last ``got `` (the echoed value) cut as :func:`pipeline.errors.cut` cuts."""
    head, sep, echoed = message.rpartition("got ")
    return head + sep + cut(echoed) if sep else message


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    if not all(part.strip() for part in dotted.split(".")):
        raise ParamsError(f"override key {shown(dotted)}: expected a dotted key such as train.epochs")
    for depth, key in enumerate(parents):
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            where = ".".join(parents[: depth + 1])
            raise ParamsError(
                f"override key {shown(dotted)}: {cut(where)} is a value, not a section; set {cut(where)} itself"
            )
    node[leaf] = value
