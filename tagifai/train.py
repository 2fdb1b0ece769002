"""The training loop a trial runs, free of Ray and Prefect.

`train_classifier` reads top to bottom: build the model, then per epoch train, validate, step the
LR scheduler and hand the metrics (and, on improvement, a checkpoint writer) to `report`.
Measured speed levers are recorded in benchmarks/RESULTS.md.

The same loop runs in each worker of a data-parallel trial: a `DataParallel` passed in says which
rows of every global batch are this worker's and how results from all workers are gathered; the
default is one process that owns every row.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from tagifai.batching import TokenizedData, TokenizedSplit, batch_order, pad_batch, subset
from tagifai.metrics import weighted_f1
from tagifai.model import (
    TextClassifier,
    autocast,
    build_classifier,
    freeze_lower_layers,
    load_checkpoint,
    load_tokenizer,
    predict_logits,
    resolve_precision,
    save_checkpoint,
)


def make_optimizer(parameters, lr: float) -> torch.optim.Optimizer:
    """AdamW with the fused kernel (one pass over each tensor instead of a dozen elementwise ops):
    the same update rule, a step 3.7-6x faster on CPU than the default per-tensor loop
    (benchmarks/RESULTS.md). Falls back where fused is missing."""
    parameters = list(parameters)
    try:
        return torch.optim.AdamW(parameters, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(parameters, lr=lr)


def release_freed_memory() -> None:
    """Give memory freed by an earlier trial in this process back to the OS. glibc keeps freed
    heap pages otherwise, so a Ray worker reused for the next trial would carry the previous
    trial's peak on top of its own (measured: 1.67 GB instead of ~1.3 GB per trial)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to give back this way
        pass


@dataclass(frozen=True)
class DataParallel:
    """This process's share of a trial trained by `world_size` workers (rank 0 .. world_size - 1).

    Every worker draws the same global batch order from the same seed and keeps its own slice of
    each batch, so an epoch sees the same global batches as one process does. `gather(value)` returns
    every worker's `value` in rank order (an all-gather); `wrap(model)` makes gradients shared (DDP).
    """

    rank: int = 0
    world_size: int = 1
    gather: Callable[[Any], list] = lambda value: [value]
    wrap: Callable[[nn.Module], nn.Module] = lambda model: model

    def shard(self, rows: np.ndarray) -> np.ndarray:
        """This worker's contiguous slice of `rows`; when world_size does not divide them, the first
        ranks take one row more."""
        return np.array_split(rows, self.world_size)[self.rank]

    def sum(self, *values: float) -> list[float]:
        return [float(sum(column)) for column in zip(*self.gather(values))]


SINGLE_PROCESS = DataParallel()


def train_epoch(
    model: TextClassifier,
    split: TokenizedSplit,
    *,
    batch_size: int,
    pad_token_id: int,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    rng: np.random.Generator,
    device: str = "cpu",
    precision: str = "fp32",
    should_stop: Callable[[], bool] = lambda: False,
    parallel: DataParallel = SINGLE_PROCESS,
) -> Optional[float]:
    """One pass over `split` in shuffled, length-bucketed batches; returns the mean loss over every
    row (of all workers), or None when `should_stop()` turned true before a batch."""
    model.train()
    total_loss, seen = 0.0, 0
    for batch in batch_order(split, batch_size, rng):
        if should_stop():
            return None
        rows = parallel.shard(batch)
        # Gradients are averaged over workers, so each worker's mean loss is weighted by its share of
        # the batch: the average is then the whole batch's mean, however unevenly it was split. A
        # worker left without rows (a last batch smaller than world_size) still joins the gradient
        # all-reduce, on one row weighted 0.
        weight = len(rows) * parallel.world_size / len(batch)
        fed = rows if len(rows) else batch[:1]
        input_ids, attention_mask = pad_batch(split, fed, pad_token_id)
        labels = torch.from_numpy(split.labels[fed])
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision, device):
            logits = model(input_ids.to(device), attention_mask.to(device))
        loss = loss_fn(logits.float(), labels.to(device))
        (loss * weight if weight != 1 else loss).backward()
        optimizer.step()
        total_loss += loss.item() * len(rows)
        seen += len(rows)
    total_loss, seen = parallel.sum(total_loss, seen)
    return total_loss / seen


def validate(
    model: TextClassifier,
    split: TokenizedSplit,
    *,
    batch_size: int,
    pad_token_id: int,
    loss_fn: nn.Module,
    device: str = "cpu",
    precision: str = "fp32",
    parallel: DataParallel = SINGLE_PROCESS,
) -> tuple[float, float]:
    """(loss, weighted F1) on the whole of `split`: each worker predicts its slice of the rows, and
    the predictions of all workers are gathered in row order."""
    mine = subset(split, parallel.shard(np.arange(len(split))))
    unwrapped = getattr(model, "module", model)  # no gradients here: the model itself, not DDP's wrapper
    logits = torch.empty((0, 1))  # a worker with no rows (fewer rows than workers)
    if len(mine):
        logits = predict_logits(
            unwrapped, mine, batch_size=batch_size, pad_token_id=pad_token_id, device=device, precision=precision
        )
    labels = torch.tensor(mine.labels)  # a copy: shared arrays are read-only
    loss_sum = loss_fn(logits, labels).item() * len(labels) if len(labels) else 0.0
    gathered = parallel.gather((loss_sum, logits.argmax(dim=1).numpy()))
    predicted = np.concatenate([worker_predicted for _, worker_predicted in gathered])
    val_loss = sum(worker_loss for worker_loss, _ in gathered) / len(split)
    return val_loss, weighted_f1(split.labels, predicted)


# `report(metrics, save)` receives each epoch's metrics and, when val_loss improved, a function that
# writes the checkpoint into a folder it is given; Ray Tune, tests and benchmarks supply their own.
Reporter = Callable[[dict, Optional[Callable[[Path], None]]], None]


def train_classifier(
    config: dict,
    data: TokenizedData,
    *,
    num_epochs: int,
    batch_size: int,
    report: Reporter,
    seed: int,
    resume_from: Optional[Path] = None,
    device: str = "cpu",
    precision: str = "fp32",
    trainable_layers: Optional[int] = None,
    pooling: str = "mean",
    label_smoothing: float = 0.0,
    class_weights: Optional[list[float]] = None,
    should_stop: Callable[[], bool] = lambda: False,
    parallel: DataParallel = SINGLE_PROCESS,
) -> None:
    """Fine-tune backbone + head with AdamW and ReduceLROnPlateau, reporting every epoch.

    `config` holds the search space's hyperparameters (tagifai/search_space.py). A resumed run
    continues from its checkpoint's weights, epoch and learning rate (not the optimizer moments).
    `should_stop()` is asked before every batch: a trial the scheduler pruned leaves at once.
    With `parallel`, `batch_size` is the global batch that the workers share, and every worker
    reports the same metrics (those of all rows).
    `label_smoothing` and `class_weights` shape the training loss only: validation keeps plain
    cross-entropy, so checkpoints and the LR schedule are judged the same way whatever they are.
    """
    precision = resolve_precision(precision, device)
    release_freed_memory()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    lr = float(config["lr"])
    first_epoch, best_val_loss = 1, math.inf
    if resume_from is None:
        model = build_classifier(data.backbone, len(data.class_to_index), float(config["dropout_p"]), pooling)
    else:
        model, _, saved = load_checkpoint(resume_from)
        first_epoch, best_val_loss, lr = saved["epoch"] + 1, saved["val_loss"], saved["lr"]
    freeze_lower_layers(model, trainable_layers)
    model.to(device)
    trained = parallel.wrap(model)
    if parallel.rank:  # the other workers draw dropout masks of their own, not copies of rank 0's
        torch.manual_seed(seed + parallel.rank)
    tokenizer = functools.cache(lambda: load_tokenizer(data.backbone))  # only needed to save a checkpoint

    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=float(config["lr_factor"]), patience=int(config["lr_patience"])
    )
    weights = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32, device=device)
    train_loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=label_smoothing)
    steps = dict(pad_token_id=data.pad_token_id, device=device, precision=precision, parallel=parallel)

    for epoch in range(first_epoch, num_epochs + 1):
        started = time.perf_counter()
        epoch_lr = optimizer.param_groups[0]["lr"]
        train_loss = train_epoch(
            trained,
            data.train,
            batch_size=batch_size,
            optimizer=optimizer,
            loss_fn=train_loss_fn,
            rng=rng,
            should_stop=should_stop,
            **steps,
        )
        if train_loss is None:  # stopped from outside: nothing of this epoch is reported
            return
        val_loss, val_f1 = validate(model, data.val, batch_size=batch_size * 2, loss_fn=nn.CrossEntropyLoss(), **steps)
        scheduler.step(val_loss)
        metrics = {
            "epoch": epoch,
            "lr": epoch_lr,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_f1": val_f1,
            "epoch_time_s": time.perf_counter() - started,
        }
        save = None
        if val_loss < best_val_loss:
            best_val_loss = val_loss
            args = {
                "backbone": data.backbone,
                "class_to_index": data.class_to_index,
                "max_length": data.max_length,
                "trainable_layers": trainable_layers,
                "pooling": model.pooling,
                "dropout_p": float(config["dropout_p"]),
                "hyperparameters": {k: float(v) for k, v in config.items()},
                "epoch": epoch,
                "val_loss": val_loss,
                "val_f1": val_f1,
                "lr": optimizer.param_groups[0]["lr"],
            }

            def save(folder: Path, args=args) -> None:
                save_checkpoint(model, tokenizer(), folder, args)

        report(metrics, save)
