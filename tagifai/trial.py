"""The code a Ray Tune trial runs, kept apart from the driver-side tuning edge (tagifai/tune.py).

Each trial worker is a fresh process that imports this module; it imports only what training
needs (Ray Tune's reporting, torch, transformers), not MLflow, HyperOpt or scikit-learn, which
saves the first trials seconds of start-up (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import ray
import torch
from ray import tune

from tagifai.train import TokenizedData, release_freed_memory, train_classifier

# Fault injection for the test suite, unset in normal use: "<epoch>:<folder>" makes each trial raise
# once just before reporting that epoch, so Tune's retry and the resume from checkpoint run for real.
INJECT_FAULT_ENV = "TAGIFAI_INJECT_FAULT"


def _maybe_inject_fault(epoch: int) -> None:
    spec = os.environ.get(INJECT_FAULT_ENV)
    if not spec:
        return
    fault_epoch, folder = spec.split(":", 1)
    marker = Path(folder) / tune.get_context().get_trial_id()
    if epoch == int(fault_epoch) and not marker.exists():
        marker.touch()
        raise RuntimeError(f"injected fault at epoch {epoch} ({INJECT_FAULT_ENV})")


def run_trial(
    config: dict,
    data: TokenizedData,
    num_epochs: int,
    batch_size: int,
    seed: int,
    trainable_layers: int | None,
    precision: str,
) -> None:
    """One trial: threads matched to its CPUs, resumed from its checkpoint when retried."""
    assigned = ray.get_runtime_context().get_assigned_resources()
    torch.set_num_threads(max(1, int(assigned.get("CPU", 1))))
    device = "cuda" if assigned.get("GPU", 0) > 0 and torch.cuda.is_available() else "cpu"

    def report(metrics: dict, save) -> None:
        _maybe_inject_fault(metrics["epoch"])
        if save is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="tagifai-ckpt-") as folder:
            save(Path(folder))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    training = dict(
        num_epochs=num_epochs,
        batch_size=batch_size,
        report=report,
        seed=seed,
        device=device,
        precision=precision,
        trainable_layers=trainable_layers,
    )
    checkpoint = tune.get_checkpoint()
    try:
        if checkpoint is None:
            train_classifier(config, data, **training)
        else:
            with checkpoint.as_directory() as folder:
                train_classifier(config, data, resume_from=Path(folder), **training)
    finally:
        # Free the model now, in this thread, and give the memory back before the next trial. Left
        # to the garbage collector (closures form cycles), the tensors may be freed while Ray tears
        # the worker down: once in ~7 runs a torch destructor then aborted in a thread the exiting
        # interpreter had stopped, printing a C++ stack trace (results unaffected). Not reproduced
        # since, with or without this line, so its effect on that is unproven.
        release_freed_memory()
