"""Test metrics users can act on: overall and per-class scores, a confusion matrix, named slices
of the data where models tend to fail, and each tag's hardest examples."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from tagifai.data import project_texts
from tagifai.serving.predictor import Predictor, tag_probabilities, top_tags

SHORT_TEXT_WORDS = 5  # cleaned words; titles-only listings are the usual case
VISION_TERMS = {
    "image",
    "images",
    "video",
    "videos",
    "vision",
    "visual",
    "pixel",
    "pixels",
    "camera",
    "photo",
    "photos",
    "detection",
    "segmentation",
    "cnn",
    "yolo",
    "ocr",
}
LANGUAGE_TERMS = {
    "text",
    "texts",
    "language",
    "languages",
    "nlp",
    "sentence",
    "sentences",
    "word",
    "words",
    "translation",
    "caption",
    "captions",
    "captioning",
    "token",
    "tokens",
    "bert",
    "llm",
    "question",
}
HARDEST_PER_TAG = 3


def classification_metrics(true_tags: list[str], predicted_tags: list[str], classes: list[str]) -> dict:
    """Weighted precision, recall, F1 and the same per class (with support)."""
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


def slice_masks(texts: list[str]) -> dict[str, np.ndarray]:
    """Boolean masks of the named slices over cleaned texts."""
    words = [set(text.split()) for text in texts]
    return {
        f"short_text_under_{SHORT_TEXT_WORDS}_words": np.array(
            [len(text.split()) < SHORT_TEXT_WORDS for text in texts]
        ),
        "mentions_vision_and_language": np.array([bool(w & VISION_TERMS) and bool(w & LANGUAGE_TERMS) for w in words]),
    }


def hardest_examples(frame: pd.DataFrame, probabilities: np.ndarray, classes: list[str], k: int) -> dict:
    """Per true tag, the k examples given the lowest probability of their own tag."""
    index = {tag: i for i, tag in enumerate(classes)}
    own = probabilities[np.arange(len(frame)), [index[tag] for tag in frame["tag"]]]
    predicted = top_tags(probabilities, classes)
    hardest = {}
    for tag in classes:
        rows = np.flatnonzero((frame["tag"] == tag).to_numpy())
        hardest[tag] = [
            {
                "title": frame["title"].iloc[i],
                "description": frame["description"].iloc[i],
                "predicted": predicted[i],
                "probability_of_true_tag": float(own[i]),
                "probabilities": {c: round(p, 4) for c, p in tag_probabilities(probabilities[i], classes).items()},
            }
            for i in rows[np.argsort(own[rows], kind="stable")][:k]
        ]
    return hardest


def evaluation_report(frame: pd.DataFrame, probabilities: np.ndarray, classes: list[str]) -> dict:
    """Everything `evaluate_frame` reports, from probabilities (testable without a model)."""
    true_tags = list(frame["tag"])
    predicted = top_tags(probabilities, classes)
    report = classification_metrics(true_tags, predicted, classes)
    report["confusion_matrix"] = {
        "labels": classes,  # rows: true tag, columns: predicted tag
        "matrix": confusion_matrix(true_tags, predicted, labels=classes).tolist(),
    }
    texts = project_texts(frame["title"], frame["description"])
    report["slices"] = {}
    for name, mask in slice_masks(texts).items():
        chosen = np.flatnonzero(mask)
        if len(chosen) == 0:
            report["slices"][name] = {"num_samples": 0}
            continue
        sliced = classification_metrics([true_tags[i] for i in chosen], [predicted[i] for i in chosen], classes)
        report["slices"][name] = {k: sliced[k] for k in ("precision", "recall", "f1", "num_samples")}
    report["hardest_examples"] = hardest_examples(frame, probabilities, classes, HARDEST_PER_TAG)
    return report


def evaluate_frame(predictor: Predictor, frame: pd.DataFrame) -> dict:
    """The evaluation report of the predictor on a labelled frame; unseen tags are an error."""
    unseen = sorted(set(frame["tag"]) - set(predictor.classes))
    if unseen:
        raise ValueError(
            f"the evaluation data has tag(s) {unseen} the model was not trained on; the model knows {predictor.classes}"
        )
    probabilities = predictor.predict_proba(list(frame["title"]), list(frame["description"]))
    return evaluation_report(frame, probabilities, predictor.classes)
