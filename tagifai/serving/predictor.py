"""Load a checkpoint once and predict tags with their probabilities.

Predictions run in ONNX Runtime where it is installed and the checkpoint exports (tagifai/
serving/onnx_engine.py: same probabilities to ~1e-6, faster; `python -m benchmarks.run` measures it), else in
PyTorch. The tuning flow evaluates its fresh best checkpoint through `Predictor`; registered models
load through tagifai/serving/loader.py (which falls back to `Predictor` for a checkpoint-only
version). $TAGIFAI_INFERENCE_ENGINE picks the engine by hand: `torch`, `onnx` (fp32), `onnx-int8`,
or `auto` (the default, DEFAULT_ENGINE).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from tagifai.batching import tokenize_texts
from tagifai.data import project_texts
from tagifai.model import load_checkpoint, predict_logits

logger = logging.getLogger(__name__)

ENGINE_ENV = "TAGIFAI_INFERENCE_ENGINE"
ENGINES = ("auto", "onnx", "onnx-int8", "torch")
# fp32: the int8 graph ran faster but moved test F1 on the real data by 0.0068, past the 0.005 allowed
# (0.8894 -> 0.8826 on its 153 test rows, `inference.int8_f1_change`); `onnx-int8` keeps it one switch away.
DEFAULT_ENGINE = "onnx"


def top_tags(probabilities: np.ndarray, classes: Sequence[str]) -> list[str]:
    """The most likely tag of each row of `probabilities` (columns in `classes` order)."""
    return [classes[int(i)] for i in probabilities.argmax(axis=1)]


def tag_probabilities(row: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """One row of probabilities as {tag: probability}."""
    return {tag: float(p) for tag, p in zip(classes, row)}


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class Predictor:
    """A checkpoint in memory: `predict_proba` for arrays, `predict` for readable dicts.

    `engine`: one of ENGINES (default: $TAGIFAI_INFERENCE_ENGINE, else auto); `threads`: the
    engine's thread count (default: torch's).
    """

    def __init__(self, checkpoint_dir: Path, engine: Optional[str] = None, threads: Optional[int] = None):
        self.model, self.tokenizer, self.args = load_checkpoint(Path(checkpoint_dir))
        self.index_to_class = {index: tag for tag, index in self.args["class_to_index"].items()}
        self.classes = [self.index_to_class[i] for i in range(len(self.index_to_class))]
        self.max_length = int(self.args.get("max_length", 128))
        self.pad_token_id = int(self.tokenizer.pad_token_id or 0)
        choice = engine or os.environ.get(ENGINE_ENV) or "auto"
        if choice not in ENGINES:
            raise ValueError(f"inference engine must be one of {ENGINES}, got {choice!r} (${ENGINE_ENV})")
        choice = DEFAULT_ENGINE if choice == "auto" else choice
        self.engine = None
        if choice != "torch":
            from tagifai.serving import onnx_engine

            self.engine = onnx_engine.load_engine(
                self.model, self.pad_token_id, quantize=choice == "onnx-int8", threads=threads
            )

    @property
    def engine_name(self) -> str:
        return self.engine.name if self.engine is not None else "torch"

    def predict_proba(self, titles: Sequence[str], descriptions: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Class probabilities, one row per input, columns in `self.classes` order."""
        texts = project_texts(titles, descriptions)
        split = tokenize_texts(texts, [-1] * len(texts), self.tokenizer, self.max_length)
        if self.engine is not None:
            try:
                return softmax(self.engine.logits(split, self.pad_token_id, max_rows=batch_size))
            except Exception as error:  # a runtime failure: keep serving, from PyTorch
                logger.warning(
                    "ONNX Runtime failed (%s: %s): predicting with PyTorch from now on", type(error).__name__, error
                )
                self.engine = None
        logits = predict_logits(self.model, split, batch_size=batch_size, pad_token_id=self.pad_token_id)
        return torch.softmax(logits, dim=1).numpy()

    def predict(self, titles: Sequence[str], descriptions: Sequence[str]) -> list[dict]:
        probabilities = self.predict_proba(titles, descriptions)
        tags = top_tags(probabilities, self.classes)
        return [
            {"prediction": tag, "probabilities": tag_probabilities(row, self.classes)}
            for tag, row in zip(tags, probabilities)
        ]
