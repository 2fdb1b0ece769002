"""Tokenize once, batch by length, and train: the loop a trial runs, free of Ray and Prefect.

`train_classifier` reads top to bottom: build the model, then per epoch train, validate, step the
LR scheduler and hand the metrics (and, on improvement, a checkpoint writer) to `report`.
Measured speed levers are recorded in benchmarks/RESULTS.md (`python -m benchmarks.run`); the
benchmark times the loop from outside, through `report`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from torch import nn

from tagifai.model import (
    TextClassifier,
    build_classifier,
    freeze_lower_layers,
    load_checkpoint,
    load_tokenizer,
    save_checkpoint,
)

if TYPE_CHECKING:
    from tagifai.data import Splits

BUCKET_BATCHES = 16  # length-sort within windows of this many batches: little padding, still shuffled
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class TokenizedSplit:
    """Variable-length token ids stored flat (cheap to share through Ray's object store)."""

    token_ids: np.ndarray  # int32, all sequences concatenated
    offsets: np.ndarray  # int64, sequence i is token_ids[offsets[i]:offsets[i + 1]]
    labels: np.ndarray  # int64 class indices (-1 when unlabelled)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class TokenizedData:
    """Everything a trial needs besides its hyperparameters."""

    backbone: str
    class_to_index: dict[str, int]
    max_length: int
    pad_token_id: int
    train: TokenizedSplit
    val: TokenizedSplit


def tokenize_texts(texts: list[str], labels: list[int], tokenizer, max_length: int) -> TokenizedSplit:
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(ids) for ids in encoded])
    token_ids = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32, count=int(offsets[-1]))
    return TokenizedSplit(token_ids=token_ids, offsets=offsets, labels=np.asarray(labels, dtype=np.int64))


def tokenize_splits(splits: Splits, backbone: str, max_length: int) -> TokenizedData:
    """Clean and tokenize train and validation once, for every trial to share."""
    # Imported here, on the driver: trial workers import this module and need neither the text
    # cleaning nor scikit-learn, which tagifai.data pulls in (seconds of start-up per worker).
    from tagifai.data import project_texts

    tokenizer = load_tokenizer(backbone)

    def encode(frame) -> TokenizedSplit:
        labels = [splits.class_to_index[tag] for tag in frame["tag"]]
        return tokenize_texts(project_texts(frame["title"], frame["description"]), labels, tokenizer, max_length)

    return TokenizedData(
        backbone=backbone,
        class_to_index=splits.class_to_index,
        max_length=max_length,
        pad_token_id=int(tokenizer.pad_token_id or 0),
        train=encode(splits.train),
        val=encode(splits.val),
    )


def batch_order(split: TokenizedSplit, batch_size: int, rng: Optional[np.random.Generator] = None) -> list[np.ndarray]:
    """Row indices of each batch (see `iterate_batches`); cheap, so padding can be counted upfront."""
    lengths = split.lengths
    if rng is None:
        order = np.argsort(lengths, kind="stable")
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    order = rng.permutation(len(split))
    window = batch_size * BUCKET_BATCHES
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        order[start : start + window] = chunk[np.argsort(lengths[chunk], kind="stable")]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def pad_batch(split: TokenizedSplit, indices: np.ndarray, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of `indices`, padded to the longest of them."""
    lengths = split.lengths[indices]
    mask = np.arange(int(lengths.max()))[None, :] < lengths[:, None]
    input_ids = np.full(mask.shape, pad_token_id, dtype=np.int64)
    starts = np.repeat(split.offsets[indices], lengths)
    within = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    input_ids[mask] = split.token_ids[starts + within]  # row-major fill matches the mask's order
    return torch.from_numpy(input_ids), torch.from_numpy(mask.astype(np.int64))


def iterate_batches(
    split: TokenizedSplit, batch_size: int, pad_token_id: int, rng: Optional[np.random.Generator] = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches padded to their own longest sequence.

    With `rng`, the order is shuffled, then sorted by length inside windows of BUCKET_BATCHES
    batches, and the batches are shuffled again: similar lengths share a batch (little padding)
    while each epoch still sees a different mix. Without `rng`, batches follow length order.
    """
    for indices in batch_order(split, batch_size, rng):
        input_ids, attention_mask = pad_batch(split, indices, pad_token_id)
        yield input_ids, attention_mask, torch.from_numpy(split.labels[indices])


def bf16_supported(device: str = "cpu") -> bool:
    """True where bf16 matmuls run natively: a CUDA GPU with bf16, or a CPU with AVX512-BF16/AMX.
    Elsewhere bf16 falls back to slow kernels: on an AVX2-only CPU, 1.2-1.4 GFLOP/s against 55-110
    in fp32, and a training step 3-20x slower under autocast (benchmarks/RESULTS.md)."""
    if str(device).startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: str) -> str:
    """'auto' becomes bf16 where it is native and fp32 elsewhere; an explicit 'bf16' where it is not
    native is refused rather than silently made 20x slower."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    if precision == "bf16" and not bf16_supported(device):
        raise ValueError(
            f"precision 'bf16' needs native bf16 on {device} (a bf16 GPU, or AVX512-BF16/AMX); use fp32 or auto"
        )
    return precision


def autocast(precision: str, device: str):
    """The forward pass's numeric context: fp32 as is, or bf16 autocast (weights stay fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if str(device).startswith("cuda") else "cpu", dtype=torch.bfloat16)


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
) -> Optional[float]:
    """One pass over `split` in shuffled, length-bucketed batches; returns the mean loss, or None
    when `should_stop()` turned true before a batch."""
    model.train()
    total_loss, seen = 0.0, 0
    for input_ids, attention_mask, labels in iterate_batches(split, batch_size, pad_token_id, rng):
        if should_stop():
            return None
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision, device):
            logits = model(input_ids.to(device), attention_mask.to(device))
        loss = loss_fn(logits.float(), labels.to(device))
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(labels)
        seen += len(labels)
    return total_loss / seen


@torch.inference_mode()
def predict_logits(
    model: TextClassifier,
    split: TokenizedSplit,
    *,
    batch_size: int,
    pad_token_id: int,
    device: str = "cpu",
    precision: str = "fp32",
) -> torch.Tensor:
    """Logits (on the CPU) in the split's original row order."""
    if model.training:  # eval() walks every submodule: ~0.8 ms, 4% of a one-example prediction
        model.eval()
    order = np.argsort(split.lengths, kind="stable")
    batches = iterate_batches(split, batch_size, pad_token_id)
    with autocast(precision, device):
        logits = torch.cat([model(ids.to(device), mask.to(device)).float().cpu() for ids, mask, _ in batches])
    restored = torch.empty_like(logits)
    restored[torch.from_numpy(order)] = logits
    return restored


def weighted_f1(labels: np.ndarray, predicted: np.ndarray) -> float:
    """F1 per class averaged with class supports as weights (sklearn's average="weighted")."""
    total = 0.0
    for label in np.unique(labels):
        true_positive = np.sum((predicted == label) & (labels == label))
        support, chosen = np.sum(labels == label), np.sum(predicted == label)
        if true_positive:
            total += support * 2 * true_positive / (support + chosen)
    return float(total / len(labels)) if len(labels) else 0.0


def validate(
    model: TextClassifier,
    split: TokenizedSplit,
    *,
    batch_size: int,
    pad_token_id: int,
    loss_fn: nn.Module,
    device: str = "cpu",
    precision: str = "fp32",
) -> tuple[float, float]:
    """(loss, weighted F1) on `split`."""
    logits = predict_logits(
        model, split, batch_size=batch_size, pad_token_id=pad_token_id, device=device, precision=precision
    )
    val_loss = loss_fn(logits, torch.tensor(split.labels)).item()  # a copy: shared arrays are read-only
    return val_loss, weighted_f1(split.labels, logits.argmax(dim=1).numpy())


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
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Fine-tune backbone + head with AdamW and ReduceLROnPlateau, reporting every epoch.

    `config` holds the search space's hyperparameters (tagifai/search_space.py). A resumed run
    continues from its checkpoint's weights, epoch and learning rate (not the optimizer moments).
    `should_stop()` is asked before every batch: a trial the scheduler pruned leaves at once.
    """
    precision = resolve_precision(precision, device)
    release_freed_memory()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    lr = float(config["lr"])
    first_epoch, best_val_loss = 1, math.inf
    if resume_from is None:
        model = build_classifier(data.backbone, len(data.class_to_index), float(config["dropout_p"]))
    else:
        model, _, saved = load_checkpoint(resume_from)
        first_epoch, best_val_loss, lr = saved["epoch"] + 1, saved["val_loss"], saved["lr"]
    freeze_lower_layers(model, trainable_layers)
    model.to(device)
    tokenizer = functools.cache(lambda: load_tokenizer(data.backbone))  # only needed to save a checkpoint

    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=float(config["lr_factor"]), patience=int(config["lr_patience"])
    )
    loss_fn = nn.CrossEntropyLoss()
    steps = dict(pad_token_id=data.pad_token_id, loss_fn=loss_fn, device=device, precision=precision)

    for epoch in range(first_epoch, num_epochs + 1):
        started = time.perf_counter()
        epoch_lr = optimizer.param_groups[0]["lr"]
        train_loss = train_epoch(
            model, data.train, batch_size=batch_size, optimizer=optimizer, rng=rng, should_stop=should_stop, **steps
        )
        if train_loss is None:  # stopped from outside: nothing of this epoch is reported
            return
        val_loss, val_f1 = validate(model, data.val, batch_size=batch_size * 2, **steps)
        scheduler.step(val_loss)
        metrics = {
            "epoch": epoch,
            "lr": epoch_lr,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_f1": val_f1,
            "epoch_time_s": time.perf_counter() - started,
            "train_tokens": int(data.train.lengths.sum()),  # real tokens, for tokens/s: every row once per epoch
        }
        save = None
        if val_loss < best_val_loss:
            best_val_loss = val_loss
            args = {
                "backbone": data.backbone,
                "class_to_index": data.class_to_index,
                "max_length": data.max_length,
                "trainable_layers": trainable_layers,
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
