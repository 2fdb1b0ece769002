"""The model registry as the contract with the demo: versions, the `champion` alias, and an audit
trail of every move of that alias (by the promotion gate or by hand), which rollback reads.

Each move is one tag on the registered model, `tagifai.champion_move.<time>-<random>`, whose value
is a small JSON record: when, who (the OS user), from which version, to which, why, and what kind
of move it was. One tag per move means concurrent writers never overwrite each other's entries,
and sorting the keys gives the history in order.
"""

from __future__ import annotations

import getpass
import json
import secrets
import time
from datetime import datetime, timezone
from typing import Optional

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tagifai.errors import TrackingError
from tagifai.lifecycle.tracking import CHAMPION_ALIAS, CHECKPOINT_ARTIFACT, with_retries

MOVE_TAG_PREFIX = "tagifai.champion_move."
# The data key a version was trained on (skip-if-unchanged); the tag keeps its first name, which
# the versions registered so far carry.
TAG_DATA_KEY = "tagifai.data_fingerprint"
TAG_SETTINGS_FINGERPRINT = "tagifai.settings_fingerprint"
MOVE_KINDS = ("gate", "forced", "manual", "rollback")


def ensure_registered_model(client: MlflowClient, model_name: str) -> None:
    try:
        client.create_registered_model(model_name)
    except MlflowException as error:
        if "already exists" not in str(error).lower() and error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def run_model_id(client: MlflowClient, run_id: str) -> Optional[str]:
    """The id of the MLflow Model last logged in the run (MLflow 3's LoggedModel), or None for a run
    that has only its checkpoint (registered before models were logged)."""
    outputs = client.get_run(run_id).outputs
    logged = sorted(outputs.model_outputs, key=lambda output: output.step) if outputs else []
    return logged[-1].model_id if logged else None


def register_version(client: MlflowClient, model_name: str, run_id: str, tags: Optional[dict] = None) -> str:
    """A new version from the run's MLflow Model (tagifai/serving/packaging.py logs it), or from its
    checkpoint artifact where the run has no model; the alias does not move."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    ensure_registered_model(client, model_name)
    model_id = run_model_id(client, run_id)
    if model_id is None:
        source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/" + CHECKPOINT_ARTIFACT
    else:
        source = f"models:/{model_id}"

    def create():
        # MLflow resolves a models:/ source through its global store URI: point it at this one.
        with _use_tracking_uri(client.tracking_uri):
            return client.create_model_version(model_name, source=source, run_id=run_id, tags=tags, model_id=model_id)

    return str(with_retries(create).version)


def champion(client: MlflowClient, model_name: str, alias: str = CHAMPION_ALIAS):
    """The model version behind the alias, or None."""
    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def get_version(client: MlflowClient, model_name: str, version: str):
    try:
        return client.get_model_version(model_name, str(version))
    except MlflowException:
        known = sorted(int(v.version) for v in client.search_model_versions(f"name = '{model_name}'"))
        raise TrackingError(
            f"registered model {model_name!r} has no version {version!r}; versions: {known or 'none'}"
        ) from None


def move_alias(
    client: MlflowClient, model_name: str, to_version: Optional[str], reason: str, kind: str,
    alias: str = CHAMPION_ALIAS,
) -> dict:  # fmt: skip
    """Point the alias at `to_version` (None removes it) and record the move; returns the record."""
    if kind not in MOVE_KINDS:
        raise ValueError(f"kind must be one of {MOVE_KINDS}")
    before = champion(client, model_name, alias)
    if to_version is None:
        with_retries(lambda: client.delete_registered_model_alias(model_name, alias))
    else:
        get_version(client, model_name, to_version)
        with_retries(lambda: client.set_registered_model_alias(model_name, alias, str(to_version)))
    move = {
        "at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "by": _os_user(),
        "from": str(before.version) if before else None,
        "to": None if to_version is None else str(to_version),
        "alias": alias,
        "kind": kind,
        "reason": reason,
    }
    key = f"{MOVE_TAG_PREFIX}{time.time_ns():020d}-{secrets.token_hex(3)}"
    with_retries(lambda: client.set_registered_model_tag(model_name, key, json.dumps(move)))
    return move


def history(client: MlflowClient, model_name: str, alias: str = CHAMPION_ALIAS) -> list[dict]:
    """Every recorded move of the alias, oldest first."""
    try:
        tags = client.get_registered_model(model_name).tags
    except MlflowException:
        raise TrackingError(
            f"no registered model named {model_name!r}; train one first: python -m flows.tune"
        ) from None
    moves = [json.loads(value) for key, value in sorted(tags.items()) if key.startswith(MOVE_TAG_PREFIX)]
    return [move for move in moves if move.get("alias", CHAMPION_ALIAS) == alias]


def rollback_target(moves: list[dict]) -> Optional[str]:
    """The champion before the current one. Moves stack up; a rollback pops the last one, so two
    rollbacks in a row go two champions back, not back and forth."""
    stack: list[Optional[str]] = []
    for move in moves:
        if move["kind"] == "rollback":
            if stack:
                stack.pop()
        else:
            stack.append(move["from"])
    return stack[-1] if stack else None


def rollback(client: MlflowClient, model_name: str, reason: str, alias: str = CHAMPION_ALIAS) -> dict:
    target = rollback_target(history(client, model_name, alias))
    if target is None:
        raise TrackingError(
            f"nothing to roll back to: the history of {model_name!r}@{alias} has no earlier champion "
            "(python -m flows.promote --history lists it)"
        )
    return move_alias(client, model_name, target, reason, "rollback", alias)


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (some containers)
        return "unknown"


def trained_on(version) -> tuple[Optional[str], Optional[str]]:
    """(data key, settings fingerprint) a version was trained on, as tagged at registration."""
    return version.tags.get(TAG_DATA_KEY), version.tags.get(TAG_SETTINGS_FINGERPRINT)


def hyperparameters_of(client: MlflowClient, version) -> Optional[dict]:
    """The searched hyperparameters of a version's run, if they are all there and inside today's
    search space (the table may have changed since): a known-good point to start a new search from."""
    from tagifai import search_space

    params = client.get_run(version.run_id).data.params
    try:
        return search_space.check_point({name: float(params[name]) for name in search_space.NAMES})
    except (KeyError, ValueError):
        return None
