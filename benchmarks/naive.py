"""The straightforward fine-tuning loop that tagifai/train.py is measured against.

What a first version usually does: tokenize inside the trial, pad the whole dataset to its longest
sequence, wrap the tensors in a shuffling `DataLoader`, fp32, PyTorch's default AdamW. Same model,
seed, hyperparameters and validation metric as `tagifai.train.train_classifier`, so only speed differs.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tagifai.data import Splits, project_texts
from tagifai.model import build_classifier, load_tokenizer


class NaiveTrial:
    """One trial of the naive loop, run an epoch at a time so a benchmark can interleave it with
    another loop. It keeps its own torch RNG state, so interleaving changes neither loop's numbers."""

    def __init__(self, splits: Splits, backbone: str, config: dict, batch_size: int, max_length: int, seed: int):
        outer_rng = torch.get_rng_state()
        started = time.perf_counter()
        tokenizer = load_tokenizer(backbone)
        self.train_set = self._encode(splits, splits.train, tokenizer, max_length)
        self.val_set = self._encode(splits, splits.val, tokenizer, max_length)
        self.tokenize_s = time.perf_counter() - started
        torch.manual_seed(seed)
        self.model = build_classifier(backbone, len(splits.class_to_index), float(config["dropout_p"]))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=float(config["lr"]))
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=float(config["lr_factor"]), patience=int(config["lr_patience"])
        )
        self.loss_fn = nn.CrossEntropyLoss()
        loader_rng = torch.Generator().manual_seed(seed)
        self.train_loader = DataLoader(self.train_set, batch_size=batch_size, shuffle=True, generator=loader_rng)
        self.val_loader = DataLoader(self.val_set, batch_size=batch_size * 2)
        self.setup_s = time.perf_counter() - started
        self._rng_state = torch.get_rng_state()
        torch.set_rng_state(outer_rng)

    @staticmethod
    def _encode(splits: Splits, frame, tokenizer, max_length: int) -> TensorDataset:
        encoded = tokenizer(
            project_texts(frame["title"], frame["description"]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        labels = torch.tensor([splits.class_to_index[tag] for tag in frame["tag"]])
        return TensorDataset(encoded["input_ids"], encoded["attention_mask"], labels)

    @property
    def padded_length(self) -> int:
        return int(self.train_set.tensors[0].shape[1])

    def epoch(self) -> dict:
        """Train one epoch and validate; the same metric keys as train_classifier reports."""
        outer_rng = torch.get_rng_state()
        torch.set_rng_state(self._rng_state)
        try:
            return self._epoch()
        finally:
            self._rng_state = torch.get_rng_state()
            torch.set_rng_state(outer_rng)

    def _epoch(self) -> dict:
        started = time.perf_counter()
        self.model.train()
        total_loss, seen, tokens, padded = 0.0, 0, 0, 0
        for input_ids, attention_mask, labels in self.train_loader:
            self.optimizer.zero_grad()
            loss = self.loss_fn(self.model(input_ids, attention_mask), labels)
            loss.backward()
            self.optimizer.step()
            total_loss += loss.item() * len(labels)
            seen += len(labels)
            tokens += int(attention_mask.sum())
            padded += attention_mask.numel()
        train_time_s = time.perf_counter() - started
        self.model.eval()
        logits, labels = [], []
        with torch.no_grad():
            for input_ids, attention_mask, batch_labels in self.val_loader:
                logits.append(self.model(input_ids, attention_mask))
                labels.append(batch_labels)
        logits, labels = torch.cat(logits), torch.cat(labels)
        val_loss = self.loss_fn(logits, labels).item()
        self.scheduler.step(val_loss)
        predicted = logits.argmax(dim=1).numpy()
        return {
            "train_loss": total_loss / seen,
            "val_loss": val_loss,
            "val_f1": float(f1_score(labels.numpy(), predicted, average="weighted", zero_division=0)),
            "epoch_time_s": time.perf_counter() - started,
            "train_time_s": train_time_s,
            "tokens": tokens,
            "padded_tokens": padded,
        }


def full_padding_waste(lengths: np.ndarray) -> float:
    """Share of pad tokens when every row is padded to the longest one."""
    return float(1 - lengths.sum() / (len(lengths) * lengths.max()))
