"""The metric training selects on and the promotion gate compares: weighted F1, in numpy alone
(trial workers stay free of scikit-learn, seconds of start-up each)."""

from __future__ import annotations

import numpy as np


def weighted_f1(labels: np.ndarray, predicted: np.ndarray) -> float:
    """F1 per class averaged with class supports as weights (sklearn's average="weighted")."""
    total = 0.0
    for label in np.unique(labels):
        true_positive = np.sum((predicted == label) & (labels == label))
        support, chosen = np.sum(labels == label), np.sum(predicted == label)
        if true_positive:
            total += support * 2 * true_positive / (support + chosen)
    return float(total / len(labels)) if len(labels) else 0.0
