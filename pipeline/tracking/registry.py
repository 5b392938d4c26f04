"""Registry calls: create a version and move the aliases as one unit, undo or recover a half-done registration,
read what an alias names, fetch the champion's files. The decision itself is :mod:`pipeline.tracking.promotion`'s.

Aliases (registry stages are deprecated in MLflow 3): ``challenger``, the latest registered version;
``champion``, the version that serves (``models:/<name>@champion``). A registration tags its version
``hymoerec.registration=pending`` (with the aliases it may move) until the aliases have moved, then ``complete``;
if a step fails the aliases are put back and the version deleted, and if even that fails the next registration of
that model restores and deletes it first (:func:`recover`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.params import Params
from pipeline.tracking.store import CHALLENGER, CHAMPION, Tracking, TrackingError, display_uri, model_name

log = logging.getLogger(__name__)

STATE_TAG = "hymoerec.registration"  # pending while the aliases move, complete afterwards
PREVIOUS_TAG = "hymoerec.previous."  # + alias: the version it named before this registration ("" = none)
READY_TIMEOUT_S = 300.0


def champion_uri(params: Params) -> str:
    return f"models:/{model_name(params)}@{CHAMPION}"


def download_champion(params: Params, dest: str | Path) -> Path | None:
    """The champion's ``model.pt`` and ``model.json`` copied into ``dest`` (a folder ``train.warm_start_from``
    accepts); None when tracking is off or no version is champion yet."""
    if not params.mlflow.enabled:
        return None
    import mlflow

    tracking = Tracking.from_params(params)
    champion = alias_target(tracking, model_name(params), CHAMPION)
    if champion is None:
        return None
    tracking.activate()
    dest = Path(dest)
    with tempfile.TemporaryDirectory(prefix="hymoe-champion-") as tmp:
        uri = f"models:/{champion.name}/{champion.version}"
        local = Path(tracking.call(f"download {uri}", mlflow.artifacts.download_artifacts, uri, dst_path=tmp))
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("model.pt", "model.json"):
            shutil.copy2(local / "artifacts" / name, dest / name)
    return dest


def publish(
    tracking: Tracking,
    name: str,
    source: str,
    model_id: str | None,
    run_id: str,
    tags: dict[str, str],
    description: str,
    promote: bool,
) -> str:
    """Create the version, wait for READY, move the aliases, mark it complete; undo everything if a step fails."""
    from mlflow.exceptions import MlflowException

    client = tracking.client
    try:
        tracking.call(
            "create registered model",
            client.create_registered_model,
            name,
            description=(
                "Next-item recommender of the HyMoERec pipeline. Alias `champion`: the version that serves (replaced "
                "only by a better one on the same test data); `challenger`: the latest registered. Each version's "
                "description says how it compared."
            ),
        )
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    previous = {alias: alias_target(tracking, name, alias) for alias in (CHALLENGER, CHAMPION)}
    version_tags = {
        **tags,
        STATE_TAG: "pending",
        **{PREVIOUS_TAG + alias: str(mv.version) if mv is not None else "" for alias, mv in previous.items()},
    }
    created = tracking.call(
        "create model version",
        client.create_model_version,
        name,
        source,
        run_id=run_id,
        tags=version_tags,
        description=description,
        await_creation_for=0,
        model_id=model_id,
    )
    version = str(created.version)
    try:
        wait_until_ready(tracking, name, version)
        tracking.call("set alias challenger", client.set_registered_model_alias, name, CHALLENGER, version)
        if promote:
            tracking.call("set alias champion", client.set_registered_model_alias, name, CHAMPION, version)
        tracking.call("mark version complete", client.set_model_version_tag, name, version, STATE_TAG, "complete")
    except BaseException:
        _undo(tracking, name, version, {a: str(mv.version) if mv else None for a, mv in previous.items()})
        raise
    return version


def wait_until_ready(tracking: Tracking, name: str, version: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Aliases move only after the version is READY (a remote registry may copy the artifacts first)."""
    deadline = time.monotonic() + timeout_s
    while True:
        mv = tracking.call("get model version", tracking.client.get_model_version, name, version)
        if mv.status == "READY":
            return
        if mv.status == "FAILED_REGISTRATION":
            raise TrackingError(f"{name} version {version} failed to register: {mv.status_message}")
        if time.monotonic() > deadline:
            raise TrackingError(f"{name} version {version} not READY after {timeout_s:.0f}s (status {mv.status})")
        time.sleep(1.0)


def recover(params: Params, tracking: Tracking | None = None) -> list[str]:
    """Remove versions a failed ``register`` left pending: put their aliases back, delete them; returns them."""
    tracking = tracking or Tracking.from_params(params)
    name = model_name(params)
    client = tracking.client
    versions = tracking.call("search model versions", client.search_model_versions, f"name = '{name}'")
    removed = []
    for mv in versions:
        if mv.tags.get(STATE_TAG) != "pending":
            continue
        mv = tracking.call("get model version", client.get_model_version, name, mv.version)
        for alias in mv.aliases:
            _restore_alias(tracking, name, alias, mv.tags.get(PREVIOUS_TAG + alias) or None)
        tracking.call("delete model version", client.delete_model_version, name, mv.version)
        log.warning("removed version %s of %s left half-registered by a failed register", mv.version, name)
        removed.append(str(mv.version))
    return removed


def _undo(tracking: Tracking, name: str, version: str, previous: dict[str, str | None]) -> None:
    client = tracking.client
    try:
        current = tracking.call("get model version", client.get_model_version, name, version)
        for alias in current.aliases:
            _restore_alias(tracking, name, alias, previous.get(alias))
        tracking.call("delete model version", client.delete_model_version, name, version)
        log.warning("registration of %s version %s failed: aliases restored, version deleted", name, version)
    except Exception:  # noqa: BLE001 - the original error is what the caller must see
        log.error(
            "registration of %s version %s failed and could not be undone (%s): it stays tagged %s=pending, "
            "and the next register of %s restores the aliases and deletes it",
            name,
            version,
            display_uri(tracking.uri),
            STATE_TAG,
            name,
        )


def _restore_alias(tracking: Tracking, name: str, alias: str, version: str | None) -> None:
    client = tracking.client
    if version:
        tracking.call(f"restore alias {alias}", client.set_registered_model_alias, name, alias, version)
    else:
        tracking.call(f"delete alias {alias}", client.delete_registered_model_alias, name, alias)


def alias_target(tracking: Tracking, name: str, alias: str) -> Any:
    """The model version ``alias`` names, or None (no such alias or no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        return tracking.call(f"get alias {alias}", tracking.client.get_model_version_by_alias, name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def registered_version(tracking: Tracking, name: str, run_id: str, digest: str | None) -> Any:
    versions = tracking.call(
        "search model versions", tracking.client.search_model_versions, f"name = '{name}' and run_id = '{run_id}'"
    )
    for mv in versions:
        if mv.tags.get(STATE_TAG) == "complete" and mv.tags.get("model_sha256") == digest:
            return mv
    return None
