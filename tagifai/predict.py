"""Load a checkpoint once and predict tags with their probabilities."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from tagifai.data import project_texts
from tagifai.model import load_checkpoint
from tagifai.settings import DEFAULT_EXPERIMENT_NAME
from tagifai.train import predict_logits, tokenize_texts


class Predictor:
    """A checkpoint in memory: `predict_proba` for arrays, `predict` for readable dicts."""

    def __init__(self, checkpoint_dir: Path):
        self.model, self.tokenizer, self.args = load_checkpoint(Path(checkpoint_dir))
        self.index_to_class = {index: tag for tag, index in self.args["class_to_index"].items()}
        self.classes = [self.index_to_class[i] for i in range(len(self.index_to_class))]
        self.max_length = int(self.args.get("max_length", 128))
        self.pad_token_id = int(self.tokenizer.pad_token_id or 0)

    def predict_proba(self, titles: Sequence[str], descriptions: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Class probabilities, one row per input, columns in `self.classes` order."""
        texts = project_texts(titles, descriptions)
        split = tokenize_texts(texts, [-1] * len(texts), self.tokenizer, self.max_length)
        logits = predict_logits(self.model, split, batch_size=batch_size, pad_token_id=self.pad_token_id)
        return torch.softmax(logits, dim=1).numpy()

    def predict(self, titles: Sequence[str], descriptions: Sequence[str]) -> list[dict]:
        probabilities = self.predict_proba(titles, descriptions)
        return [
            {
                "prediction": self.classes[int(row.argmax())],
                "probabilities": {tag: float(p) for tag, p in zip(self.classes, row)},
            }
            for row in probabilities
        ]


def load_run_predictor(
    tracking_uri: str, run_id: str | None = None, experiment_name: str = DEFAULT_EXPERIMENT_NAME
) -> tuple[Predictor, str]:
    """The predictor of `run_id`, or of the experiment's best run; and the run id used."""
    from mlflow.tracking import MlflowClient

    from tagifai import tracking

    client = MlflowClient(tracking_uri)
    run_id = run_id or tracking.best_run_id(client, experiment_name)
    return Predictor(tracking.download_checkpoint(client, run_id)), run_id
