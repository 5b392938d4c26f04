"""Where MLflow lives and how to talk to it: tracking-URI resolution, experiment and model names, retried calls.

``$MLFLOW_TRACKING_URI`` wins (a team server, ``http://127.0.0.1:5000``); without it the pipeline uses an embedded
store that needs no server: ``sqlite:///<mlflow.store_dir>/mlflow.db`` with artifacts in ``<store_dir>/artifacts``
(likewise ``artifacts/`` beside any ``sqlite:///`` database named in the variable).

MLflow's own HTTP client retries for minutes by default; here it is told not to (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``
defaults to 0 unless already set) and every call goes through :meth:`Tracking.call`, which retries transient
failures ``mlflow.retries`` times with doubling back-off (tenacity) and then raises :class:`TrackingError` naming the
URI. One retry policy for every call, whatever the store (MLflow's own retries cover only its HTTP client), and
for building the client itself: for a database URI (``postgresql://``, ``mysql://``, ``mssql://``) MLflow connects
in the client's constructor and retries a refused connection ten times over about 100 s, so the database is tried
once first, under this policy, before MLflow gets to it. While connecting only a refused, reset or timed-out
connection is retried: any other failure (a ``sqlite:///`` path whose folder cannot be created or written) ends at
once in a :class:`TrackingError` naming its cause. A failing call logs one warning, its later retries INFO.
Importing this module does not import MLflow (the train stage imports it even when tracking is off).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from pipeline.errors import PipelineError
from pipeline.params import Params

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
CHAMPION = "champion"  # the version that serves: replaced only by a better one on the same evaluation data
CHALLENGER = "challenger"  # the most recently registered version, promoted or not
MAX_BACKOFF_S = 30.0
DATABASE_CONNECT_TIMEOUT_S = 10  # a database host that does not answer at all fails each attempt after this
SERVER_DATABASES = ("postgresql", "mysql", "mssql")  # URI schemes (before any +driver) MLflow opens with SQLAlchemy
# MLflow error codes worth retrying: the server is down, overloaded or failed internally
TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}

T = TypeVar("T")


class TrackingError(PipelineError, RuntimeError):
    """MLflow could not be reached (after retries) or refused an operation; the message names the URI."""


def experiment_name(params: Params) -> str:
    return f"{params.mlflow.experiment_prefix}-{params.data.dataset}"


def model_name(params: Params) -> str:
    return f"{params.mlflow.model_name_prefix}-{params.data.dataset}"


def embedded_uri(store_dir: str | Path) -> str:
    return f"sqlite:///{Path(store_dir).resolve() / 'mlflow.db'}"


def display_uri(uri: str) -> str:
    """The URI without credentials (``http://user:token@host`` -> ``http://***@host``), fit for messages."""
    return re.sub(r"//[^/@]+@", "//***@", uri)


def is_transient(err: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return err.error_code in TRANSIENT_CODES
    return isinstance(err, OSError)  # includes requests' ConnectionError and Timeout


def is_transient_connect(err: BaseException) -> bool:
    """Whether building the client is worth another try: only a connection that failed or timed out may pass.

    Other ``OSError`` s while connecting (a sqlite folder that cannot be created or written, a read-only file) fail
    the same way on every try, so retrying them would only hide their cause behind "unreachable".
    """
    from requests.exceptions import ConnectionError as RequestsConnectionError
    from requests.exceptions import Timeout

    if not isinstance(err, OSError):
        return is_transient(err)
    return isinstance(err, (ConnectionError, TimeoutError, RequestsConnectionError, Timeout))


@dataclass
class Tracking:
    """One MLflow endpoint (tracking and registry) with the pipeline's retry policy."""

    uri: str
    artifact_root: Path | None = None  # only for the embedded store: experiments are created with artifacts here
    retries: int = 4
    backoff_s: float = 1.0
    _client: Any = field(default=None, init=False, repr=False)

    @classmethod
    def from_params(cls, params: Params) -> Tracking:
        cfg = params.mlflow
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the retries are ours (see module doc)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
        uri = os.environ.get(TRACKING_URI_ENV, "").strip()
        if uri.startswith("sqlite:///"):  # a local database file: artifacts beside it (MLflow's default is ./mlruns)
            return cls(
                uri, Path(uri.removeprefix("sqlite:///")).resolve().parent / "artifacts", cfg.retries, cfg.backoff_s
            )
        if uri:
            return cls(uri, None, cfg.retries, cfg.backoff_s)
        store = Path(cfg.store_dir).resolve()
        store.mkdir(parents=True, exist_ok=True)
        return cls(embedded_uri(store), store / "artifacts", cfg.retries, cfg.backoff_s)

    @property
    def client(self) -> MlflowClient:
        """Built on first use under :meth:`call`: an unreachable store is retried and ends in :class:`TrackingError`."""
        if self._client is None:
            self._client = self.call("connect", self._connect)
        return self._client

    def _connect(self) -> MlflowClient:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            if self.uri.split(":", 1)[0].split("+", 1)[0] in SERVER_DATABASES:
                _reach_database(self.uri)
            return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        except (MlflowException, OSError) as err:  # an unknown scheme, a malformed URI, a path that cannot be made
            if is_transient_connect(err):
                raise
            raise TrackingError(f"cannot use MLflow at {display_uri(self.uri)}: {one_line(err)}") from err

    def activate(self) -> None:
        """Point MLflow's global (fluent) API at this endpoint: needed by ``log_model`` and ``load_model``."""
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)

    def call(self, what: str, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``func(*args, **kwargs)``, retried on transient failures; :class:`TrackingError` once they run out.

        Other errors (an unknown alias, an invalid name) are raised unchanged: callers decide what they mean.
        """

        def announce(state: RetryCallState) -> None:
            failure = state.outcome.exception() if state.outcome is not None else None
            wait_s = state.next_action.sleep if state.next_action is not None else 0.0
            log.log(
                logging.WARNING if state.attempt_number == 1 else logging.INFO,  # one warning per failing call
                "MLflow %s failed (%s); retry %d/%d in %.1fs",
                what,
                one_line(failure),
                state.attempt_number,
                self.retries,
                wait_s,
            )

        retrying = Retrying(
            stop=stop_after_attempt(self.retries + 1),
            wait=wait_exponential(multiplier=self.backoff_s, max=MAX_BACKOFF_S),
            retry=retry_if_exception(is_transient),
            before_sleep=announce,
            reraise=True,
        )
        try:
            return retrying(func, *args, **kwargs)
        except Exception as err:
            if not is_transient(err):
                raise
            raise TrackingError(
                f"MLflow at {display_uri(self.uri)} is unreachable or failing: {what} failed "
                f"{self.retries + 1} time(s), last error: {one_line(err)}. Start the server or fix "
                f"${TRACKING_URI_ENV} (unset it for the embedded store), or set mlflow.enabled=false."
            ) from err

    def once(self) -> Tracking:
        """This endpoint (the same client) without retries: a last try after the server failed a whole budget."""
        single = replace(self, retries=0)
        single._client = self._client
        return single

    def experiment_id(self, name: str, description: str = "") -> str:
        """Id of experiment ``name``, created (or restored from the bin) on first use, with ``description``."""
        experiment = self.call("get experiment", self.client.get_experiment_by_name, name)
        if experiment is None:
            location = (self.artifact_root / name).as_uri() if self.artifact_root is not None else None
            tags = {"mlflow.note.content": description} if description else None
            return self.call(
                "create experiment", self.client.create_experiment, name, artifact_location=location, tags=tags
            )
        if experiment.lifecycle_stage == "deleted":
            self.call("restore experiment", self.client.restore_experiment, experiment.experiment_id)
        if description and "mlflow.note.content" not in experiment.tags:
            self.call(
                "describe experiment",
                self.client.set_experiment_tag,
                experiment.experiment_id,
                "mlflow.note.content",
                description,
            )
        return experiment.experiment_id


def _reach_database(uri: str) -> None:
    """Open and close one connection to the tracking database, with a connect timeout where the driver takes one.

    A refused or unanswered connection becomes :class:`ConnectionError` (transient, so :meth:`Tracking.call` retries
    it); a missing driver or a malformed URI becomes :class:`TrackingError` at once.
    """
    import sqlalchemy
    from sqlalchemy.exc import ArgumentError, OperationalError
    from sqlalchemy.pool import NullPool

    timeout = {"connect_timeout": DATABASE_CONNECT_TIMEOUT_S} if not uri.startswith("mssql") else {}
    try:
        engine = sqlalchemy.create_engine(uri, poolclass=NullPool, connect_args=timeout)
    except (ImportError, ArgumentError) as err:
        raise TrackingError(f"cannot use the tracking database {display_uri(uri)}: {one_line(err)}") from err
    try:
        with engine.connect():
            pass
    except OperationalError as err:
        raise ConnectionError(f"cannot connect to the database: {one_line(err.orig or err)}") from err
    finally:
        engine.dispose()


def one_line(err: BaseException) -> str:
    """An error's message on one line, at most 300 characters: fit for a log line or a :class:`TrackingError`."""
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:300] + "..."
