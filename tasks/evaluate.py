"""Test metrics: weighted precision, recall and F1 overall, and the same per class."""

from __future__ import annotations

import pandas as pd
from sklearn.metrics import precision_recall_fscore_support

from tasks.predict import Predictor


def classification_metrics(true_tags: list[str], predicted_tags: list[str], classes: list[str]) -> dict:
    precision, recall, f1, _ = precision_recall_fscore_support(
        true_tags, predicted_tags, labels=classes, average="weighted", zero_division=0
    )
    per_precision, per_recall, per_f1, support = precision_recall_fscore_support(
        true_tags, predicted_tags, labels=classes, average=None, zero_division=0
    )
    return {
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "num_samples": len(true_tags),
        "per_class": {
            tag: {
                "precision": float(per_precision[i]),
                "recall": float(per_recall[i]),
                "f1": float(per_f1[i]),
                "support": int(support[i]),
            }
            for i, tag in enumerate(classes)
        },
    }


def evaluate_frame(predictor: Predictor, frame: pd.DataFrame) -> dict:
    """Metrics of the predictor on a labelled frame; tags the model never saw are an error."""
    unseen = sorted(set(frame["tag"]) - set(predictor.classes))
    if unseen:
        raise ValueError(
            f"the evaluation data has tag(s) {unseen} the model was not trained on; "
            f"the model knows {predictor.classes}"
        )
    probabilities = predictor.predict_proba(list(frame["title"]), list(frame["description"]))
    predicted = [predictor.classes[i] for i in probabilities.argmax(axis=1)]
    return classification_metrics(list(frame["tag"]), predicted, predictor.classes)
