"""MLflow tracking: where runs go, one run per trial attempt, the best run's test metrics and its
checkpoint (registering it as a model version is tagifai/lifecycle/registry.py's job).

All writes go through an explicit `MlflowClient` with explicit run ids: no global active run that
could be left RUNNING, and (from the Ray driver) a single writer process for a SQLite store.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tagifai.errors import TrackingError
from tagifai.lifecycle.database import check_database, is_database, prepare_database_store, redact

DEFAULT_STORE_DIR = "mlruns"
TAG_SESSION = "tagifai.tuning_session"
TAG_TRIAL = "tagifai.trial_id"
TAG_BEST = "tagifai.best"
TAG_ATTEMPT = "tagifai.attempt"  # 1 for a trial's first run; a retry or a resumed experiment adds one
TAG_RESUMED_FROM = "tagifai.resumed_from_epoch"  # the checkpoint's epoch an attempt continued from (0: scratch)
TAG_ORPHANED = "tagifai.orphaned"  # a trial the resumed experiment never knew (started after its last snapshot)
EPOCH_METRICS = ("lr", "train_loss", "val_loss", "val_f1", "epoch_time_s")
CHECKPOINT_ARTIFACT = "checkpoint"
CHAMPION_ALIAS = "champion"


def configured_tracking_uri(tracking_uri: Optional[str]) -> str:
    """Explicit URI, else $MLFLOW_TRACKING_URI, else a SQLite store in ./mlruns (not created)."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path(DEFAULT_STORE_DIR).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(tracking_uri: Optional[str]) -> str:
    """The configured URI, with a SQLite or PostgreSQL store created (safely) if it does not exist yet."""
    uri = configured_tracking_uri(tracking_uri)
    prepare_sqlite_store(uri)
    prepare_database_store(uri)
    return uri


def prepare_sqlite_store(tracking_uri: str) -> None:
    """Open a SQLite store once under a file lock: MLflow's schema migration fails ("duplicate
    column") when two processes open a brand-new database at the same moment."""
    if not tracking_uri.startswith("sqlite:///"):
        return
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.parent / f".{database.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        MlflowClient(tracking_uri).search_experiments(max_results=1)


def local_artifact_root(tracking_uri: str) -> Optional[str]:
    """For a local SQLite store, artifacts live beside the database; servers choose their own."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
    return None


def artifact_root(tracking_uri: str, artifact_location: Optional[str]) -> Optional[str]:
    """Where a new experiment keeps its artifacts. Tracking straight into a database, MLflow's
    default is ./mlruns of whichever machine logs: unreadable elsewhere, so one must be named."""
    if artifact_location:
        return artifact_location
    if is_database(tracking_uri):
        raise TrackingError(
            f"tracking straight into {redact(tracking_uri)} needs a shared place for artifacts: pass "
            "--artifact-location s3://bucket/mlflow (or use an mlflow server with --artifacts-destination)"
        )
    return local_artifact_root(tracking_uri)


def check_reachable(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Fail before any training when an MLflow server or database does not answer."""
    if is_database(tracking_uri):
        check_database(tracking_uri)
        return
    if not tracking_uri.startswith(("http://", "https://")):
        return
    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            return
    except urllib.error.HTTPError as error:
        if error.code < 500:  # it answered: a proxy or auth layer may not expose /health
            return
        reason = f"HTTP {error.code}"
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        reason = str(getattr(error, "reason", error))
    raise TrackingError(
        f"MLflow tracking server {redact(tracking_uri)} is not reachable ({reason}); start it "
        "(mlflow server --host 127.0.0.1 --port 5000) or pass a reachable --tracking-uri"
    )


def get_or_create_experiment(
    client: MlflowClient, name: str, tracking_uri: str, artifact_location: Optional[str] = None
) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    location = artifact_root(tracking_uri, artifact_location)
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by a concurrent flow
        return client.get_experiment_by_name(name).experiment_id


def with_retries(action, attempts: int = 5, wait_s: float = 0.5):
    """Run `action()`, retrying MLflow errors such as SQLite's 'database is locked'."""
    for attempt in range(attempts):
        try:
            return action()
        except MlflowException:
            if attempt == attempts - 1:
                raise
            time.sleep(wait_s * (attempt + 1))


def start_trial_run(
    client: MlflowClient, experiment_id: str, session: str, trial_id: str, params: dict, resumed_from_epoch: int = 0
) -> str:
    """A run for one attempt of one trial. Earlier attempts still RUNNING were cut off (their flow
    was killed) and are marked KILLED; a failure that Ray reported was marked FAILED at the time."""
    earlier = find_runs(client, experiment_id, session, trial_id)
    for stale in earlier:
        if stale.info.status == "RUNNING":
            with_retries(lambda stale=stale: client.set_terminated(stale.info.run_id, status="KILLED"))
    tags = {TAG_SESSION: session, TAG_TRIAL: trial_id, TAG_ATTEMPT: str(len(earlier) + 1)}
    tags[TAG_RESUMED_FROM] = str(resumed_from_epoch)
    run = with_retries(lambda: client.create_run(experiment_id, run_name=f"trial-{trial_id}", tags=tags))
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in sorted(params.items())])
    return run.info.run_id


def backfill_epochs(client: MlflowClient, runs: list, epochs: list[dict]) -> int:
    """Log, into the latest of a trial's `runs`, the recorded epochs that none of them holds (the
    flow died between the trial recording an epoch and the driver logging it). Returns how many."""
    if not runs:
        return 0
    logged = {m.step for run in runs for m in client.get_metric_history(run.info.run_id, "val_loss")}
    missing = [metrics for metrics in epochs if metrics["epoch"] not in logged]
    for metrics in missing:
        log_epoch(client, runs[0].info.run_id, {k: metrics[k] for k in EPOCH_METRICS if k in metrics}, metrics["epoch"])
    return len(missing)


def log_epoch(client: MlflowClient, run_id: str, metrics: dict, epoch: int) -> None:
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, epoch) for k, v in metrics.items() if isinstance(v, (int, float))]
    with_retries(lambda: client.log_batch(run_id, metrics=batch))


def find_runs(
    client: MlflowClient, experiment_id: str, session: str, trial_id: str | None = None, status=None, **search
):
    """The runs of a tuning session (of one trial, in one status), newest first; `search` goes to
    `search_runs` (e.g. max_results)."""
    query = f"tags.`{TAG_SESSION}` = '{session}'"
    if trial_id is not None:
        query += f" AND tags.`{TAG_TRIAL}` = '{trial_id}'"
    if status is not None:
        query += f" AND attributes.status = '{status}'"
    return client.search_runs([experiment_id], filter_string=query, order_by=["attributes.start_time DESC"], **search)


def close_session_runs(client: MlflowClient, experiment_id: str, session: str, status: str = "KILLED") -> int:
    """Mark every run of a tuning session still RUNNING as ended (flow failure or kill)."""
    stale = find_runs(client, experiment_id, session, status="RUNNING")
    for run in stale:
        with_retries(lambda run=run: client.set_terminated(run.info.run_id, status=status))
    return len(stale)


def tag_orphaned_runs(client: MlflowClient, experiment_id: str, session: str, known_trials: set[str]) -> int:
    """Tag the runs of trials that a resumed experiment never knew about: started after Tune's last
    snapshot before a kill, they were replaced by new trials. They stay for the record, KILLED."""
    orphans = [
        run for run in find_runs(client, experiment_id, session) if run.data.tags.get(TAG_TRIAL) not in known_trials
    ]
    for run in orphans:
        with_retries(lambda run=run: client.set_tag(run.info.run_id, TAG_ORPHANED, "true"))
    return len(orphans)


def log_checkpoint(client: MlflowClient, run_id: str, checkpoint_dir: Path) -> None:
    log_files(client, run_id, checkpoint_dir, CHECKPOINT_ARTIFACT)


def mark_best(client: MlflowClient, run_id: str, test_metrics: dict) -> None:
    metrics = [
        Metric(f"test_{k}", float(test_metrics[k]), int(time.time() * 1000), 0) for k in ("precision", "recall", "f1")
    ]
    with_retries(lambda: client.log_batch(run_id, metrics=metrics, tags=[RunTag(TAG_BEST, "true")]))


def best_run_id(client: MlflowClient, experiment_name: str) -> str:
    """The experiment's finished run with the lowest best_val_loss that has a checkpoint."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise TrackingError(
            f"no MLflow experiment named {experiment_name!r}; train one first: "
            f"python -m flows.tune --experiment-name {experiment_name}"
        )
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string="attributes.status = 'FINISHED' AND metrics.best_val_loss > -1",
        order_by=["metrics.best_val_loss ASC"],
        max_results=20,
    )
    for run in runs:
        if client.list_artifacts(run.info.run_id, CHECKPOINT_ARTIFACT):
            return run.info.run_id
    raise TrackingError(
        f"experiment {experiment_name!r} has no finished run with a checkpoint; train one first: "
        f"python -m flows.tune --experiment-name {experiment_name}"
    )


def download_checkpoint(client: MlflowClient, run_id: str, destination: Optional[Path] = None) -> Path:
    """The run's checkpoint as a local folder (a copy for remote stores)."""
    try:
        client.get_run(run_id)
    except MlflowException:
        raise TrackingError(f"MLflow run {run_id!r} does not exist in {redact(client.tracking_uri)}") from None
    destination = destination or Path(tempfile.mkdtemp(prefix="tagifai-checkpoint-"))
    try:
        local = client.download_artifacts(run_id, CHECKPOINT_ARTIFACT, str(destination))
    except (MlflowException, OSError) as error:
        raise TrackingError(f"run {run_id} has no readable checkpoint artifact: {error}") from None
    return Path(local)


def metric_histories(client: MlflowClient, run_id: str, keys=("train_loss", "val_loss", "val_f1")) -> dict:
    """Per-epoch metric values of one run: {"epoch": [...], key: [...]} in epoch order."""
    by_key = {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in keys}
    epochs = sorted(set().union(*(values.keys() for values in by_key.values())))
    return {"epoch": epochs, **{key: [by_key[key].get(e) for e in epochs] for key in keys}}


def log_files(client: MlflowClient, run_id: str, folder: Path, artifact_path: str) -> None:
    with_retries(lambda: client.log_artifacts(run_id, str(folder), artifact_path=artifact_path))
