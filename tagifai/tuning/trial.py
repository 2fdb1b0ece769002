"""The code a Ray Tune trial runs, kept apart from the driver-side tuning edge (tagifai/tuning/study.py).

Each trial worker is a fresh process that imports this module; it imports only what training
needs (Ray Tune's reporting, torch, transformers), not MLflow, HyperOpt or scikit-learn, which
saves the first trials seconds of start-up (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import ray
import torch
from ray import tune

from tagifai.batching import TokenizedData
from tagifai.train import release_freed_memory, train_classifier
from tagifai.tuning.trial_store import TrialStore

# Fault injection for the test suite, unset in normal use: "<epoch>:<folder>" makes each trial raise
# once just before reporting that epoch, so Tune's retry and the resume from checkpoint run for real.
INJECT_FAULT_ENV = "TAGIFAI_INJECT_FAULT"


def maybe_inject_fault(epoch: int, trial_id: str) -> None:
    spec = os.environ.get(INJECT_FAULT_ENV)
    if not spec:
        return
    fault_epoch, folder = spec.split(":", 1)
    marker = Path(folder) / trial_id
    if epoch == int(fault_epoch) and not marker.exists():
        marker.touch()
        raise RuntimeError(f"injected fault at epoch {epoch} ({INJECT_FAULT_ENV})")


def stop_requested() -> bool:
    """True once Tune has stopped this trial (ASHA pruned it). Tune only ends a function trainable
    at its next report, i.e. after another whole epoch, and meanwhile refuses to reuse the worker
    for the next trial (it waits 2 s, then fails that trial); checked before every batch, the trial
    leaves at once. Reads the session's stop flag, which Ray 2.x keeps on its internal session."""
    from ray.train._internal.session import get_session

    session = get_session()
    stop = getattr(session, "stop_event", None)
    return bool(stop is not None and stop.is_set())


def resources_of_this_process() -> str:
    """Torch threads matched to the CPUs Ray gave this process; its device ("cuda" with a GPU)."""
    assigned = ray.get_runtime_context().get_assigned_resources()
    torch.set_num_threads(max(1, int(assigned.get("CPU", 1))))
    return "cuda" if assigned.get("GPU", 0) > 0 and torch.cuda.is_available() else "cpu"


def resume_point(store: TrialStore) -> tuple[bool, Optional[str]]:
    """(finished, checkpoint to continue from). A trial whose record says it finished before the
    flow died reports its last epoch again (marked replayed) and trains nothing."""
    record = store.read()
    if record is not None and record.finished:
        tune.report({**record.epochs[-1], "replayed": True})
        return True, None
    return False, store.checkpoint_to_use(record) if record is not None else None


@dataclass(frozen=True)
class TrialPlan:
    """What every trial of a study shares besides the data and its own hyperparameters."""

    experiment_uri: str  # the study's folder: each trial's record lives under it
    num_epochs: int
    batch_size: int
    seed: int
    trainable_layers: Optional[int]
    precision: str


def train_attempt(
    plan: TrialPlan, config: dict, data: TokenizedData, store: TrialStore, checkpoint, **loop_options
) -> None:
    """The training loop as the plan says, continuing from `checkpoint` of the trial's `store` if
    there is one; `loop_options`: report, device, should_stop (and a worker's `parallel`)."""
    with tempfile.TemporaryDirectory(prefix="tagifai-resume-") as download:
        train_classifier(
            config,
            data,
            num_epochs=plan.num_epochs,
            batch_size=plan.batch_size,
            seed=plan.seed,
            resume_from=store.local_checkpoint(checkpoint, Path(download)) if checkpoint else None,
            precision=plan.precision,
            trainable_layers=plan.trainable_layers,
            **loop_options,
        )


def run_trial(config: dict, data: TokenizedData, plan: TrialPlan) -> None:
    """One trial attempt: threads matched to its CPUs; a restarted trial (a retry after a crash, or
    a resumed experiment) continues from its own record (tagifai/tuning/trial_store.py)."""
    device = resources_of_this_process()
    trial_id = tune.get_context().get_trial_id()
    store = TrialStore(plan.experiment_uri, trial_id)
    finished, checkpoint = resume_point(store)
    if finished:
        return

    def report(metrics: dict, save) -> None:
        maybe_inject_fault(metrics["epoch"], trial_id)
        store.record_epoch(metrics, save, finished=metrics["epoch"] >= plan.num_epochs)
        tune.report(metrics)

    try:
        train_attempt(plan, config, data, store, checkpoint, report=report, device=device, should_stop=stop_requested)
    finally:
        # Free the model now, in this thread, and give the memory back before the next trial. Left
        # to the garbage collector (closures form cycles), the tensors may be freed while Ray tears
        # the worker down: once in ~7 runs a torch destructor then aborted in a thread the exiting
        # interpreter had stopped, printing a C++ stack trace (results unaffected).
        release_freed_memory()
