"""A trial trained by N data-parallel workers: a Ray Train `TorchTrainer` inside a Tune function.

Ray 2.60 runs Ray Train V2, where a Trainer is no longer a Tune trainable: the Tune trial is a
function (`run_data_parallel_trial`) that builds the `TorchTrainer` and calls `fit()`, and Train's
reports reach Tune through `TuneReportCallback`. The trial itself only waits on the Train run, so
it holds no CPU or GPU of its own (a study needs N x the per-worker resources, nothing more).

Each worker runs `tagifai.train.train_classifier` with a `DataParallel` (DDP over gloo on CPU,
nccl on GPU): the same seeded global batch order on every worker, each training on its slice of
every batch, metrics gathered over all rows. Rank 0 keeps the trial's record and checkpoints
(tagifai/tuning/trial_store.py), exactly as a one-process trial does, so resuming, retrying and
the MLflow runs work the same way.

Stopping: when Tune stops the trial (ASHA pruned it, or it reached its last epoch), the workers
must end in order. Killed with the trial's process instead, Train's controller leaves its placement
group behind (Ray scopes it to the job; Train's own cleaner actor, which should remove it, fails on
a machine running several Ray instances) and the next trials wait for its CPUs forever. So the
trial tells rank 0 through a `StopSignal` actor, all workers agree before every batch, the Train
run returns, and Tune (reuse_actors) waits for it before reusing the trial's process.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import ray
import ray.train
import torch
import torch.distributed as dist
from ray import tune
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from torch import nn

from tagifai.batching import TokenizedData
from tagifai.train import DataParallel, release_freed_memory
from tagifai.tuning.trial import (
    TrialPlan,
    maybe_inject_fault,
    resources_of_this_process,
    resume_point,
    stop_requested,
    train_attempt,
)
from tagifai.tuning.trial_store import TrialStore


def gather_from_workers(value) -> list:
    """Every worker's `value`, in rank order (small Python objects: metrics, predicted classes)."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def share_gradients(model: nn.Module) -> nn.Module:
    """DDP: gradients are averaged over the workers in every backward pass.

    static_graph: the backbone's pooler never takes part in the forward pass, and DDP otherwise
    waits for its gradients forever; the set of used parameters is the same every step. Buffers
    (position ids) never change: synced once at the start, not before every forward pass.
    """
    device_ids = [model.head.weight.device.index] if model.head.weight.is_cuda else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, static_graph=True, forward_sync_buffers=False
    )


STOP_POLL_S = 1.0  # how often the trial and rank 0 look for a stop


@ray.remote(num_cpus=0)
class StopSignal:
    """Set by the trial when Tune stops it; read by rank 0 of its Train run."""

    def __init__(self):
        self.stopped = False

    def set(self) -> None:
        self.stopped = True

    def is_set(self) -> bool:
        return self.stopped


def agreed_stop(signal, device: str) -> Callable[[], bool]:
    """`should_stop` for train_classifier: rank 0 asks the signal (at most every STOP_POLL_S) and
    broadcasts its answer before every batch, so all workers leave at the same batch (one leaving
    alone would leave the others waiting in the gradient all-reduce)."""
    asked_at, stopped = 0.0, False

    def should_stop() -> bool:
        nonlocal asked_at, stopped
        if dist.get_rank() == 0 and time.monotonic() - asked_at > STOP_POLL_S:
            stopped, asked_at = ray.get(signal.is_set.remote()), time.monotonic()
        flag = torch.tensor([int(stopped)], device=device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    return should_stop


def train_worker(config: dict) -> None:
    """What each Train worker runs: its share of the trial, reporting every epoch (all workers
    report the same, all-rows metrics; Train passes rank 0's on to Tune)."""
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device, plan = resources_of_this_process(), config["plan"]
    store = TrialStore(plan.experiment_uri, config["trial_id"])
    parallel = DataParallel(rank, world_size, gather=gather_from_workers, wrap=share_gradients)

    def report(metrics: dict, save) -> None:
        metrics = metrics | {"world_size": world_size}
        if rank == 0:
            maybe_inject_fault(metrics["epoch"], config["trial_id"])
            store.record_epoch(metrics, save, finished=metrics["epoch"] >= plan.num_epochs)
        ray.train.report(metrics)  # a barrier: no worker starts the next epoch before the record is written

    try:
        train_attempt(
            plan, config["hyperparameters"], ray.get(config["data"]), store, config["resume_checkpoint"],
            report=report, device=device, should_stop=agreed_stop(config["stop_signal"], device), parallel=parallel,
        )  # fmt: skip
    finally:
        release_freed_memory()


def run_data_parallel_trial(
    config: dict, data: TokenizedData, plan: TrialPlan, num_workers: int, cpu_per_worker: float, gpu_per_worker: float
) -> None:
    """One trial attempt (the Tune function): a Train run of `num_workers` workers that continues
    from the trial's record, as `tagifai.tuning.trial.run_trial` does for one process."""
    # Tune reuses this process for the next trial only once this function has returned, waiting
    # TUNE_FUNCTION_THREAD_TIMEOUT_S (2 s by default) before it fails that trial; ending a Train run
    # in order takes longer. Set here because Tune reads it in this process: the driver's setting
    # (study.py) does not reach the nodes of a `ray start` cluster.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "60")
    trial_id = tune.get_context().get_trial_id()
    store = TrialStore(plan.experiment_uri, trial_id)
    finished, checkpoint = resume_point(store)
    if finished:
        return
    use_gpu = gpu_per_worker > 0
    signal = StopSignal.remote()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "hyperparameters": config,
            "data": ray.put(data),  # once into the object store, not pickled into every worker's task
            "plan": plan,
            "trial_id": trial_id,
            "resume_checkpoint": checkpoint,
            "stop_signal": signal,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpu_per_worker, **({"GPU": gpu_per_worker} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=f"train_{trial_id}",
            # Train keeps only its own bookkeeping here (no checkpoints are reported to it): the
            # trial's local folder, on the node where this trial and Train's controller run.
            storage_path=str(Path.cwd().resolve()),
            callbacks=[TuneReportCallback()],
            # A failed worker fails the attempt; Tune retries it from the record (FailureConfig in study.py).
            failure_config=ray.train.FailureConfig(max_failures=0),
        ),
    )
    finished = threading.Event()

    def pass_on_stop() -> None:
        while not finished.wait(STOP_POLL_S):
            if stop_requested():
                signal.set.remote()
                return

    threading.Thread(target=pass_on_stop, name="pass-on-stop", daemon=True).start()
    try:
        trainer.fit()
    finally:
        finished.set()
