"""``python -m pipeline serve``: MLflow's scoring server for a registered model, with error answers that fit on one
line and never carry the request back.

The app is MLflow's own (:func:`mlflow.pyfunc.scoring_server.init`: ``/invocations``, ``/ping``, ``/health``,
``/version``, the request and answer formats of ``mlflow models serve``), run by uvicorn as MLflow runs it. One thin
ASGI middleware, :class:`OneLineErrors`, reshapes its error answers, because several arise in MLflow's request
parsing before the model runs, where the pyfunc cannot shape them:

* malformed JSON: MLflow's 400 repeats the whole body (a 5 MB body, a 5 MB answer);
* JSON nested deeper than Python's parser allows (about 1,000 levels): an unhandled RecursionError, HTTP 500;
* any ``text/csv`` body (a CSV cell cannot hold the ``history`` list) and a body that is not Parquet: a 400 with a
  ``stack_trace`` field naming server paths;
* a schema error (no ``history`` column): a multi-line message that prints the request's data frame.

Every answer with a status of 400 or more becomes one JSON line, ``{"error_code": ..., "message": ...}``, with the
status MLflow chose and a message of at most :data:`MAX_MESSAGE` characters (so no answer repeats more than that of
the request); the RecursionError becomes a 400. Successful answers pass through untouched.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from pipeline.errors import PipelineError, cut
from pipeline.params import Params

log = logging.getLogger(__name__)

MAX_MESSAGE = 200  # characters of an error message: the most of a request an answer can repeat
MODEL_PATH_ENV = "HYMOE_SERVED_MODEL"  # the downloaded model's folder, for each uvicorn worker's create_app
CSV = "text/csv"
ERROR_CODES = {504: "DEADLINE_EXCEEDED"}  # for answers that carry no MLflow error code; else by status class

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# MLflow's scoring-server messages (mlflow.pyfunc.scoring_server, MLflow 3) that print the request or bury the reason
_PREDICT = re.compile(r"Failed to predict data '.*'\. \nError: (?P<reason>.*)", re.S)
_SCHEMA = re.compile(r"Failed to enforce schema of data '.*' with schema '.*'\. Error: (?P<reason>.*)", re.S)
_JSON = re.compile(r"Invalid input\. Ensure that input is a valid JSON formatted string\. Error: '(?P<reason>.*?)'\n")
_PARSE = re.compile(r"Failed to parse input as a Pandas DataFrame\..*? Error: '(?P<reason>.*)'", re.S)
_NOT_UTF8 = re.compile(r"UnicodeDecodeError\('(?P<codec>[^']*)', b.*, (?P<at>\d+), \d+, '(?P<why>[^']*)'\)", re.S)
_EXCEPTION_REPR = re.compile(r"\w+\((?P<q>['\"])(?P<text>.*)(?P=q)\)", re.S)


def one_line_message(message: str, content_type: str = "") -> str:
    """MLflow's error ``message`` as the client needs it: the reason, on one line, at most :data:`MAX_MESSAGE`."""
    if match := _PREDICT.fullmatch(message):
        message = match["reason"]
    if match := _SCHEMA.fullmatch(message):
        message = f"the input does not match the model's signature: {match['reason']}"
    elif match := _JSON.match(message):
        reason = match["reason"]
        if utf8 := _NOT_UTF8.fullmatch(reason):
            message = f"the body is not {utf8['codec']} text: {utf8['why']} at byte {utf8['at']}"
        else:
            plain = _EXCEPTION_REPR.fullmatch(reason)
            message = f"the body is not valid JSON: {plain['text'] if plain else reason}"
    elif match := _PARSE.match(message):
        if content_type.split(";")[0].strip().lower() == CSV:
            message = (
                "text/csv cannot carry this model's input (history is a list of item ids): "
                "send application/json or application/vnd.apache.parquet"
            )
        else:
            message = f"the body is not a Parquet table: {match['reason']}"
    else:
        message = next((line for line in message.splitlines() if line.strip()), "").split(" IMPORTANT: ")[0]
    return cut(" ".join(message.split()), MAX_MESSAGE)


def error_body(status: int, body: bytes, content_type: str) -> bytes:
    """An error answer as one JSON line: MLflow's error code (if any) and the one-line message; no stack trace."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("message", parsed.get("detail")), str):  # MLflow, FastAPI
        code, message = str(parsed.get("error_code", "")), parsed.get("message", parsed.get("detail"))
    else:
        code, message = "", body.decode("utf-8", errors="replace")
    code = code or ERROR_CODES.get(status, "BAD_REQUEST" if status < 500 else "INTERNAL_ERROR")
    return json.dumps({"error_code": code[:50], "message": one_line_message(message, content_type)}).encode()


class OneLineErrors:
    """ASGI middleware: answers of status 400 or more are rewritten by :func:`error_body`; the rest pass through.

    MLflow's app answers an unhandled exception with a plain 500 and re-raises it; a RecursionError (JSON nested too
    deeply to parse) is the client's doing, so it is answered 400 instead and logged as one line.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        content_type = headers.get(b"content-type", b"").decode("latin-1")
        held: dict[str, Any] = {}  # an error answer's status and body, sent once the app has returned or raised

        async def holding_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held.update(status=message["status"], body=b"")
            elif "status" not in held:
                await send(message)
            elif message["type"] == "http.response.body":
                held["body"] += message.get("body", b"")

        try:
            await self.app(scope, receive, holding_send)
        except RecursionError:
            log.warning("%s %s: the request nests too deeply to parse; answered 400", scope["method"], scope["path"])
            message = "the JSON body nests too deeply to parse (at most about 1,000 levels of [ and {)"
            await _answer(send, 400, json.dumps({"error_code": "BAD_REQUEST", "message": message}).encode())
            return
        except Exception:
            if "status" in held:  # MLflow's app answered 500 before re-raising: that answer, shaped, then the error
                await _answer(send, held["status"], error_body(held["status"], held["body"], content_type))
            raise
        if "status" in held:
            await _answer(send, held["status"], error_body(held["status"], held["body"], content_type))


async def _answer(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def create_app() -> OneLineErrors:
    """What each uvicorn worker runs: MLflow's scoring-server app for the model in ``$HYMOE_SERVED_MODEL``, wrapped."""
    from mlflow.pyfunc import scoring_server

    model = scoring_server.load_model_with_mlflow_config(os.environ[MODEL_PATH_ENV])
    return OneLineErrors(scoring_server.init(model))


def serve(params: Params, model_uri: str | None, host: str, port: int, workers: int) -> None:
    """Download the model (default: the registered model's champion) and serve it until interrupted."""
    import mlflow
    import uvicorn
    from mlflow.exceptions import MlflowException

    from pipeline.tracking.registry import champion_uri
    from pipeline.tracking.store import Tracking, one_line

    if model_uri is None and not params.mlflow.enabled:
        raise PipelineError("mlflow.enabled is false, so there is no registered champion: name a model with --model")
    uri = model_uri or champion_uri(params)
    tracking = Tracking.from_params(params)
    tracking.activate()
    with tempfile.TemporaryDirectory(prefix="hymoe-serve-") as tmp:
        try:
            local = tracking.call(f"download {uri}", mlflow.artifacts.download_artifacts, uri, dst_path=tmp)
        except MlflowException as err:
            raise PipelineError(
                f"cannot load {uri} ({one_line(err)}): register a model first (python -m pipeline register) "
                "or name one with --model"
            ) from err
        os.environ[MODEL_PATH_ENV] = local
        log.info("serving %s on http://%s:%d (POST /invocations)", uri, host, port)
        uvicorn.run(f"{__name__}:create_app", factory=True, host=host, port=port, workers=workers)
