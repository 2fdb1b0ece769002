"""Token ids stored flat and batches padded to their own longest row: what training and serving
both feed the model. Tokenized once per dataset, shared with every trial through Ray's object store.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

if TYPE_CHECKING:
    from tagifai.data import Splits

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
    # Imported here, on the driver: trial workers import this module and need neither the text
    # cleaning nor the tokenizer loading.
    from tagifai.model import load_tokenizer
    from tagifai.text_cleaning import project_texts

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


def subset(split: TokenizedSplit, rows: np.ndarray) -> TokenizedSplit:
    """The rows `rows` of `split`, in that order, as a split of their own."""
    lengths = split.lengths[rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    starts = np.repeat(split.offsets[rows], lengths)
    within = np.arange(int(offsets[-1])) - np.repeat(offsets[:-1], lengths)
    return TokenizedSplit(token_ids=split.token_ids[starts + within], offsets=offsets, labels=split.labels[rows])


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
