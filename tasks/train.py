"""Tokenize once, batch by length, and train: the loop a trial runs, free of Ray and Prefect.

`train_classifier` reads top to bottom: build the model, then per epoch train, validate, step the
LR scheduler and hand the metrics (and, on improvement, a checkpoint writer) to `report`.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch import nn

from tasks.data import Splits, project_texts
from tasks.model import TextClassifier, build_classifier, load_checkpoint, load_tokenizer, save_checkpoint

BUCKET_BATCHES = 16  # length-sort within windows of this many batches: little padding, still shuffled


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
    tokenizer = load_tokenizer(backbone)

    def encode(frame) -> TokenizedSplit:
        labels = [splits.class_to_index[tag] for tag in frame["tag"]]
        return tokenize_texts(project_texts(frame), labels, tokenizer, max_length)

    return TokenizedData(
        backbone=backbone,
        class_to_index=splits.class_to_index,
        max_length=max_length,
        pad_token_id=int(tokenizer.pad_token_id or 0),
        train=encode(splits.train),
        val=encode(splits.val),
    )


def iterate_batches(
    split: TokenizedSplit, batch_size: int, pad_token_id: int, rng: Optional[np.random.Generator] = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches padded to their own longest sequence.

    With `rng`, the order is shuffled, then sorted by length inside windows of BUCKET_BATCHES
    batches, and the batches are shuffled again: similar lengths share a batch (little padding)
    while each epoch still sees a different mix. Without `rng`, batches follow length order.
    """
    lengths = split.lengths
    if rng is None:
        order = np.argsort(lengths, kind="stable")
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    else:
        order = rng.permutation(len(split))
        window = batch_size * BUCKET_BATCHES
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            order[start : start + window] = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        rng.shuffle(batches)
    for indices in batches:
        width = int(lengths[indices].max())
        input_ids = np.full((len(indices), width), pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(indices), width), dtype=np.int64)
        for row, index in enumerate(indices):
            ids = split.token_ids[split.offsets[index] : split.offsets[index + 1]]
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        yield torch.from_numpy(input_ids), torch.from_numpy(attention_mask), torch.from_numpy(split.labels[indices])


def train_epoch(model, split, batch_size, pad_token_id, optimizer, loss_fn, rng, device="cpu") -> float:
    model.train()
    total_loss, seen = 0.0, 0
    for input_ids, attention_mask, labels in iterate_batches(split, batch_size, pad_token_id, rng):
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids.to(device), attention_mask.to(device))
        loss = loss_fn(logits, labels.to(device))
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(labels)
        seen += len(labels)
    return total_loss / seen


@torch.inference_mode()
def predict_logits(
    model: TextClassifier, split: TokenizedSplit, batch_size: int, pad_token_id: int, device="cpu"
) -> torch.Tensor:
    """Logits (on the CPU) in the split's original row order."""
    model.eval()
    order = np.argsort(split.lengths, kind="stable")
    batches = iterate_batches(split, batch_size, pad_token_id)
    logits = torch.cat([model(ids.to(device), mask.to(device)).float().cpu() for ids, mask, _ in batches])
    restored = torch.empty_like(logits)
    restored[torch.from_numpy(order)] = logits
    return restored


def validate(model, split, batch_size, pad_token_id, loss_fn, device="cpu") -> tuple[float, float]:
    logits = predict_logits(model, split, batch_size, pad_token_id, device)
    labels = torch.tensor(split.labels)
    val_loss = loss_fn(logits, labels).item()
    val_f1 = f1_score(split.labels, logits.argmax(dim=1).numpy(), average="weighted", zero_division=0)
    return val_loss, float(val_f1)


# `report(metrics, save)` receives each epoch's metrics and, when val_loss improved, a function that
# writes the checkpoint into a folder it is given; Ray Tune, tests and benchmarks supply their own.
Reporter = Callable[[dict, Optional[Callable[[Path], None]]], None]


def train_classifier(
    config: dict,
    data: TokenizedData,
    num_epochs: int,
    batch_size: int,
    report: Reporter,
    seed: int = 1234,
    resume_from: Optional[Path] = None,
    device: str = "cpu",
) -> None:
    """Fine-tune backbone + head with AdamW and ReduceLROnPlateau, reporting every epoch."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    lr = float(config["lr"])
    first_epoch, best_val_loss = 1, math.inf
    if resume_from is None:
        model = build_classifier(data.backbone, len(data.class_to_index), float(config["dropout_p"]))
    else:  # a retried trial continues from its best checkpoint (weights and LR; not optimizer moments)
        model, _, saved = load_checkpoint(resume_from)
        first_epoch, best_val_loss, lr = saved["epoch"] + 1, saved["val_loss"], saved["lr"]
    model.to(device)
    tokenizer = load_tokenizer(data.backbone)

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=float(config["lr_factor"]), patience=int(config["lr_patience"])
    )
    loss_fn = nn.CrossEntropyLoss()

    for epoch in range(first_epoch, num_epochs + 1):
        started = time.perf_counter()
        epoch_lr = optimizer.param_groups[0]["lr"]
        train_loss = train_epoch(model, data.train, batch_size, data.pad_token_id, optimizer, loss_fn, rng, device)
        val_loss, val_f1 = validate(model, data.val, batch_size * 2, data.pad_token_id, loss_fn, device)
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
                "dropout_p": float(config["dropout_p"]),
                "hyperparameters": {k: float(v) for k, v in config.items()},
                "epoch": epoch,
                "val_loss": val_loss,
                "val_f1": val_f1,
                "lr": optimizer.param_groups[0]["lr"],
            }

            def save(folder: Path, args=args) -> None:
                save_checkpoint(model, tokenizer, folder, args)

        report(metrics, save)
