"""Ray Tune edge: HyperOpt search under a concurrency limit, ASHA pruning, MLflow per trial.

The trial is a function trainable around `train.train_classifier`; the tokenized data reaches it
through the object store once (`tune.with_parameters`). MLflow is written from the driver by
`TrialTracker`, so a local SQLite store has a single writer however many trials run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.hyperopt import HyperOptSearch

from tagifai import search_space
from tagifai.batching import TokenizedData
from tagifai.errors import ResourceError
from tagifai.lifecycle import tracking
from tagifai.lifecycle.database import redact
from tagifai.settings import TuneSettings, user_cache_dir
from tagifai.tuning import display as progress_display
from tagifai.tuning import snapshot
from tagifai.tuning import storage as storage_lib
from tagifai.tuning.claim import COMPLETE_MARKER, Claim, claim_experiment_dir
from tagifai.tuning.data_parallel import run_data_parallel_trial
from tagifai.tuning.head import HEAD_ADDRESS_ENV, OBJECT_STORE_BYTES
from tagifai.tuning.progress import StudyProgress
from tagifai.tuning.ray_output import ray_logs_to, worker_output_to
from tagifai.tuning.trial import TrialPlan, run_trial
from tagifai.tuning.trial_store import TrialRecord, TrialStore, checkpoint_epoch

logger = logging.getLogger(__name__)

METRIC, MODE = "val_loss", "min"
TRIAL_DIR_PREFIX = "trial_"
RAY_LOG_FILE = "ray.log"  # Ray's and the trials' own output, unless --verbose
SNAPSHOT_PERIOD_S = 2
# What a multi-worker trial's own Tune process holds: it waits on its Train run, so no CPU (one would
# take a worker's place on a 1-CPU node), but Ray needs some resource for it: its memory (bytes).
COORDINATOR_RESOURCES = {"cpu": 0, "gpu": 0, "memory": 256 * 1024**2}


def param_space() -> dict:
    """Ray Tune's sampling domains, one per row of the search-space table."""
    return {p.name: getattr(tune, p.distribution)(p.low, p.high) for p in search_space.SEARCH_SPACE}


class TrialTracker(tune.Callback):
    """One MLflow run per trial attempt: parameters at start, metrics per epoch, final status.

    At each start it reads the trial's own record (tagifai/tuning/trial_store.py): epochs recorded but
    never logged (the flow died in between) are logged first, and a trial the record calls
    finished gets no new run: its restart only reports the last epoch again. Each run's params hold
    the hyperparameters, `num_workers` asked for and, from the first result, the `world_size` the
    trial's workers saw.
    """

    # The real URIs behind the redacted ones that are pickled: a password never reaches the
    # experiment state in storage; the driver that restores it created a tracker with the real one.
    _passwords_kept: dict[str, str] = {}

    def __init__(self, tracking_uri: str, experiment_id: str, session: str, experiment_uri: str, num_workers: int = 1):
        self.tracking_uri, self.experiment_id, self.session = tracking_uri, experiment_id, session
        self.experiment_uri, self.num_workers = experiment_uri, num_workers
        self._client: Optional[MlflowClient] = None
        self._runs: dict[str, str] = {}
        self._without_world_size: set[str] = set()  # runs whose first result has not come yet
        self._replayed: set[str] = set()
        TrialTracker._passwords_kept[redact(tracking_uri)] = tracking_uri

    def __getstate__(self):  # Ray pickles callbacks into its experiment state; clients do not pickle
        state = {k: getattr(self, k) for k in ("experiment_id", "session", "experiment_uri", "num_workers")}
        return state | {"tracking_uri": redact(self.tracking_uri)}

    def __setstate__(self, state):
        real_uri = TrialTracker._passwords_kept.get(state["tracking_uri"], state["tracking_uri"])
        self.__init__(**(state | {"tracking_uri": real_uri}))

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def on_trial_start(self, iteration, trials, trial, **info):
        trial_id = trial.trial_id
        record = TrialStore(self.experiment_uri, trial_id).read()
        if record is not None:
            earlier = tracking.find_runs(self.client, self.experiment_id, self.session, trial_id)
            kept = [m for m in record.epochs if record.finished or m["epoch"] <= record.last_checkpoint_epoch]
            tracking.backfill_epochs(self.client, earlier, kept)
            if record.finished and earlier:
                self._replayed.add(trial_id)
                tracking.with_retries(lambda: self.client.set_terminated(earlier[0].info.run_id, status="FINISHED"))
                return
        resumed_from = record.last_checkpoint_epoch if record is not None else 0
        params = {**trial.config, "num_workers": self.num_workers}
        self._runs[trial_id] = tracking.start_trial_run(
            self.client, self.experiment_id, self.session, trial_id, params, resumed_from
        )
        self._without_world_size.add(self._runs[trial_id])

    on_trial_restore = on_trial_start

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._runs.get(trial.trial_id)
        if run_id is not None and not result.get("replayed"):
            if run_id in self._without_world_size:  # a one-process trial is a world of one
                world_size = str(result.get("world_size", 1))
                tracking.with_retries(lambda: self.client.log_param(run_id, "world_size", world_size))
                self._without_world_size.discard(run_id)
            metrics = {k: result[k] for k in tracking.EPOCH_METRICS if k in result}
            tracking.log_epoch(self.client, run_id, metrics, result["epoch"])

    def _end(self, trial, status: str) -> None:
        run_id = self._runs.pop(trial.trial_id, None)
        if run_id is not None:
            tracking.with_retries(lambda: self.client.set_terminated(run_id, status=status))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, "FINISHED")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._end(trial, "FAILED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "FAILED")


def connect_ray() -> bool:
    """Join $RAY_ADDRESS's cluster if set; else the head this command started early (see
    tagifai/tuning/head.py), else start a local Ray. True if this driver should let go of Ray when
    the study ends (a local Ray we started, or the command's own head, which stops at its exit)."""
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        logger.info("joining the Ray cluster at %s", os.environ["RAY_ADDRESS"])
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return False
    if os.environ.get(HEAD_ADDRESS_ENV):  # ray.init waits while the head is still coming up
        ray.init(address=os.environ[HEAD_ADDRESS_ENV], log_to_driver=True)
        return True
    # A small object store is plenty: the shared data is a few MB of token ids. address="local":
    # without it, ray.init() joins a cluster that `ray start` left on this machine, and fails there.
    ray.init(address="local", include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES, log_to_driver=True)
    return True


def check_resources(settings: TuneSettings) -> None:
    """Refuse, before any trial, a study whose trials could never start (they would wait forever).

    A worker runs on one node: its request must fit a live node. A trial's workers may span
    nodes: the cluster must hold all `num_workers` of them at once. A multi-worker trial's own
    Tune process holds only memory (COORDINATOR_RESOURCES); a one-worker trial is its worker.
    """
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    coordinator = COORDINATOR_RESOURCES["memory"] if settings.num_workers > 1 else 0
    if coordinator > max((resources.get("memory", 0.0) for resources in nodes), default=0.0):
        raise ResourceError(
            f"each trial's coordinator needs {coordinator / 1024**2:g} MiB of Ray memory; no node has it"
        )
    asked = {"CPU": settings.cpu_per_worker, "GPU": settings.gpu_per_worker}
    for name, amount in asked.items():
        have = max((resources.get(name, 0.0) for resources in nodes), default=0.0)
        if amount > have:
            raise ResourceError(
                f"each worker asks for {amount:g} {name} but the largest Ray node has {have:g}; "
                f"lower --{name.lower()}-per-worker (trials would wait forever)"
            )
    fits = sum(workers_fitting(resources, asked) for resources in nodes)
    if fits < settings.num_workers:
        needed = ", ".join(f"{settings.num_workers * amount:g} {name}" for name, amount in asked.items() if amount)
        total = ", ".join(
            f"{sum(r.get(name, 0.0) for r in nodes):g} {name}" for name, amount in asked.items() if amount
        )
        raise ResourceError(
            f"each trial needs {settings.num_workers} workers x {settings.cpu_per_worker:g} CPU, "
            f"{settings.gpu_per_worker:g} GPU ({needed} in all; the trial itself holds none) but the Ray cluster's "
            f"{len(nodes)} node(s) "
            f"({total}) hold only {fits} such workers; lower --num-workers or the per-worker resources "
            "(trials would wait forever)"
        )


def workers_fitting(node: dict, asked: dict) -> int:
    """How many workers asking `asked` a node with `node` resources can hold at once."""
    counts = [int(node.get(name, 0.0) / amount + 1e-9) for name, amount in asked.items() if amount > 0]
    return min(counts, default=0)


def local_study_dir(claim: Claim) -> Path:
    """The study's local files (Ray's log, downloaded checkpoints): its folder for local storage;
    for a remote one, a folder under the local cache, since Ray's loggers and the checkpoint
    loader read and write files, not objects."""
    if not storage_lib.is_remote(claim.uri):
        return Path(claim.uri)
    return user_cache_dir() / "studies" / claim.name


def _trainable(data: TokenizedData, settings: TuneSettings, experiment_uri: str):
    """One process per trial (the lean default), or with --num-workers N > 1 a Tune function that
    runs a Ray Train job of N workers and itself holds no CPU or GPU (its workers hold them)."""
    plan = TrialPlan(
        experiment_uri=experiment_uri,
        num_epochs=settings.num_epochs,
        batch_size=settings.batch_size,
        seed=settings.seed,
        trainable_layers=settings.trainable_layers,
        precision=settings.precision,
    )
    shared = dict(data=data, plan=plan)
    if settings.num_workers == 1:
        trainable = tune.with_parameters(run_trial, **shared)
        return tune.with_resources(trainable, {"cpu": settings.cpu_per_worker, "gpu": settings.gpu_per_worker})
    workers = dict(
        num_workers=settings.num_workers, cpu_per_worker=settings.cpu_per_worker, gpu_per_worker=settings.gpu_per_worker
    )
    trainable = tune.with_parameters(run_data_parallel_trial, **shared, **workers)
    return tune.with_resources(trainable, COORDINATOR_RESOURCES)


def build_tuner(
    data: TokenizedData, settings: TuneSettings, claim: Claim, tracker: TrialTracker, resume: bool
) -> tune.Tuner:
    trainable = _trainable(data, settings, claim.uri)
    if resume:  # finished trials stay finished; unfinished and errored ones continue from their records
        return tune.Tuner.restore(claim.uri, trainable, resume_unfinished=True, resume_errored=True)
    search = HyperOptSearch(
        points_to_evaluate=settings.initial_params, metric=METRIC, mode=MODE, random_state_seed=settings.seed
    )
    scheduler = AsyncHyperBandScheduler(
        time_attr="epoch", max_t=settings.num_epochs, grace_period=settings.grace_period
    )
    return tune.Tuner(
        trainable,
        param_space=param_space(),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            search_alg=ConcurrencyLimiter(search, max_concurrent=settings.max_concurrent),
            scheduler=scheduler,
            num_samples=settings.num_runs,
            trial_dirname_creator=trial_dirname,
            # A finished trial's worker runs the next one: no new process, imports or backbone
            # checksum per trial (benchmarks/RESULTS.md: ~8-10 s of start-up per trial otherwise).
            # With --num-workers > 1 it also lets a stopped trial end its Train run in order
            # (tagifai/tuning/data_parallel.py) instead of being killed with it.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=claim.name,
            storage_path=claim.parent,
            callbacks=[tracker, StudyProgress(settings.num_runs, settings.num_epochs)],
            # No checkpoints are handed to Tune: each trial keeps its own record (tagifai/tuning/trial_store.py).
            failure_config=tune.FailureConfig(max_failures=2),
            verbose=1 if settings.verbose else 0,  # Tune's own tables only with --verbose
        ),
    )


def trial_dirname(trial) -> str:
    """Each trial's folder is named after its id, which `trial_id_of` reads back."""
    return f"{TRIAL_DIR_PREFIX}{trial.trial_id}"


def trial_id_of(result) -> str:
    """A result's trial id, from its folder's name. (Its metrics are no guide: a trial that failed
    before reporting can carry the last result of the worker it was to reuse.)"""
    name = Path(result.path).name
    if name.startswith(TRIAL_DIR_PREFIX):
        return name.removeprefix(TRIAL_DIR_PREFIX)
    return (result.metrics or {}).get("trial_id") or name  # a study begun before folders were named so


def summarize_trials(results, experiment_uri: str, downloads: Path) -> list[dict]:
    """One row per trial, from its own record: val_loss and F1 of its best checkpoint, epochs run,
    status, and the checkpoint as a local folder (downloaded under `downloads` from remote storage)."""
    rows = []
    for result in results:
        trial_id = trial_id_of(result)
        store = TrialStore(experiment_uri, trial_id)
        record = store.read() or TrialRecord()
        checkpoint = store.checkpoint_to_use(record)
        best = record.metrics_of(checkpoint_epoch(checkpoint)) if checkpoint else None
        rows.append(
            {
                "trial_id": trial_id,
                "params": {k: float(v) for k, v in result.config.items()},
                "val_loss": best["val_loss"] if best else None,
                "val_f1": best["val_f1"] if best else None,
                "epochs": record.epochs[-1]["epoch"] if record.epochs else 0,
                "status": "completed" if record.finished else ("error" if result.error else "pruned"),
                "checkpoint_dir": str(store.local_checkpoint(checkpoint, downloads / trial_id)) if best else None,
            }
        )
    return rows


def tune_hyperparameters(
    data: TokenizedData,
    settings: TuneSettings,
    tracking_uri: str,
    experiment_id: str,
    data_key: str,
    display=None,
    announce: Callable[[str], None] = logger.info,
) -> dict:
    """Run (or resume) the study; every trial ends with an MLflow run holding its best checkpoint.
    `display` shows the study's progress (tagifai/tuning/display.py); `announce` says where Ray's own
    output went (unless settings.verbose).

    Returns {"experiment_dir", "resumed", "trials": [one row per trial], "log_file"}.
    """
    client = MlflowClient(tracking_uri)
    with claim_experiment_dir(settings.storage_path, settings, data_key) as claim:
        session = claim.name
        resumed = tune.Tuner.can_restore(claim.uri)
        # Tune snapshots its experiment state (which trials exist) every >= 10 s by default. A trial
        # started after the last snapshot is unknown to a resumed experiment, which starts a new one
        # in its place and wastes the work done. Every 2 s costs a few kB written per snapshot.
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(SNAPSHOT_PERIOD_S))
        # A worker reused for the next trial first waits for the stopped trial's thread; trials
        # leave within one batch (trial.stop_requested), which can exceed Tune's 2 s on a slow CPU.
        os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "60")
        # Tune's own Ctrl-C handler ends fit() "gracefully" and returns: the study would then be
        # summarised and marked complete with its trials cut short. Without it, Ctrl-C interrupts
        # fit() like any kill, and the next run resumes the study.
        os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
        log_file = local_study_dir(claim) / RAY_LOG_FILE
        if not settings.verbose:
            announce(f"Ray and trial logs: {log_file}")
        with ray_logs_to(log_file, settings.verbose):
            started_ray = connect_ray()
            try:
                check_resources(settings)
                tracker = TrialTracker(
                    tracking_uri,
                    experiment_id,
                    session=session,
                    experiment_uri=claim.uri,
                    num_workers=settings.num_workers,
                )
                if resumed and (repaired := snapshot.reconcile(claim.uri)):
                    announce(f"Resuming: {repaired}")
                tuner = build_tuner(data, settings, claim, tracker, resume=resumed)
                with worker_output_to(log_file, settings.verbose), progress_display.showing(display):
                    results = tuner.fit()
            finally:
                tracking.close_session_runs(client, experiment_id, session)
                if started_ray:
                    ray.shutdown()
        claim.check_held()

        downloads = local_study_dir(claim) / "checkpoints"
        shutil.rmtree(downloads, ignore_errors=True)  # from an earlier, interrupted summary
        rows = summarize_trials(results, claim.uri, downloads)
        known = {row["trial_id"] for row in rows}
        tracking.tag_orphaned_runs(client, experiment_id, session, known)
        for row in rows:
            runs = tracking.find_runs(client, experiment_id, session, row["trial_id"])
            row["run_id"] = runs[0].info.run_id if runs else None
            row["attempts"] = len(runs)
            if row["run_id"] and row["checkpoint_dir"]:
                tracking.log_checkpoint(client, row["run_id"], Path(row["checkpoint_dir"]))
                tracking.log_epoch(client, row["run_id"], {"best_val_loss": row["val_loss"]}, row["epochs"])
        claim.check_held()
        storage_lib.write_text(storage_lib.join(claim.uri, COMPLETE_MARKER), json.dumps(rows, indent=2, default=str))
    return {
        "experiment_dir": claim.uri,
        "resumed": resumed,
        "trials": rows,
        "log_file": str(log_file),
        # Checkpoints copied from remote storage (~90 MB each with the default backbone), for the
        # caller to delete once it has evaluated the best; None when they are the storage's own.
        "downloads": str(downloads) if storage_lib.is_remote(claim.uri) else None,
    }
