"""Evaluation metrics on hand-made examples with known answers, and plots with real content."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tagifai import plots
from tagifai.evaluate import evaluation_report

CLASSES = ["computer-vision", "natural-language-processing"]


def frame(rows):
    return pd.DataFrame(rows, columns=["title", "description", "tag"])


def test_metrics_match_hand_computed_values():
    data = frame(
        [
            ("Image segmentation with UNet for medical scans", "pixels and masks", "computer-vision"),
            ("Visual question answering over images and text", "caption words", "computer-vision"),
            ("BERT sentence classification", "text tokens and language", "natural-language-processing"),
            ("CNN", "", "natural-language-processing"),
        ]
    )
    # predicted: cv, nlp, nlp, nlp  -> cv: P=1, R=0.5; nlp: P=2/3, R=1
    probabilities = np.array([[0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [0.4, 0.6]])
    report = evaluation_report(data, probabilities, CLASSES)

    cv, nlp = report["per_class"]["computer-vision"], report["per_class"]["natural-language-processing"]
    assert cv["precision"] == pytest.approx(1.0) and cv["recall"] == pytest.approx(0.5)
    assert cv["f1"] == pytest.approx(2 / 3) and cv["support"] == 2
    assert nlp["precision"] == pytest.approx(2 / 3) and nlp["recall"] == pytest.approx(1.0)
    assert nlp["f1"] == pytest.approx(0.8)
    assert report["precision"] == pytest.approx((1 + 2 / 3) / 2)
    assert report["recall"] == pytest.approx(0.75)
    assert report["f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert report["confusion_matrix"] == {"labels": CLASSES, "matrix": [[1, 1], [0, 2]]}

    # Slices: "CNN" alone is short; the VQA row mentions vision and language terms.
    short = report["slices"]["short_text_under_5_words"]
    assert short["num_samples"] == 1 and short["f1"] == pytest.approx(1.0)  # nlp row predicted nlp
    both = report["slices"]["mentions_vision_and_language"]
    assert both["num_samples"] == 1 and both["recall"] == pytest.approx(0.0)  # the VQA row was missed

    hardest = report["hardest_examples"]["computer-vision"]
    assert hardest[0]["title"].startswith("Visual question answering")
    assert hardest[0]["predicted"] == "natural-language-processing"
    assert hardest[0]["probability_of_true_tag"] == pytest.approx(0.3)


def assert_real_image(path):
    image = np.asarray(Image.open(path).convert("RGB"), dtype=float)
    assert image.shape[0] > 200 and image.shape[1] > 300
    assert image.std() > 10  # not blank
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20


def test_plots_are_real_images_with_content(tmp_path):
    trials = [
        {
            "trial_id": "a",
            "params": {"dropout_p": 0.5, "lr": 1e-4, "lr_factor": 0.8, "lr_patience": 3},
            "val_loss": 0.4,
        },
        {
            "trial_id": "b",
            "params": {"dropout_p": 0.7, "lr": 3e-5, "lr_factor": 0.3, "lr_patience": 8},
            "val_loss": 0.9,
        },
        {
            "trial_id": "c",
            "params": {"dropout_p": 0.4, "lr": 2e-4, "lr_factor": 0.5, "lr_patience": 2},
            "val_loss": 0.6,
        },
    ]
    histories = {
        "a": {"epoch": [1, 2, 3], "train_loss": [1.2, 0.7, 0.4], "val_loss": [1.0, 0.6, 0.4]},
        "b": {"epoch": [1], "train_loss": [1.3], "val_loss": [0.9]},  # pruned: visibly shorter
        "c": {"epoch": [1, 2], "train_loss": [1.1, 0.8], "val_loss": [0.8, 0.6]},
    }
    per_class = {"computer-vision": {"f1": 0.9, "support": 10}, "mlops": {"f1": 0.5, "support": 4}}
    paths = [
        plots.plot_confusion_matrix([[5, 1], [2, 7]], ["computer-vision", "mlops"], tmp_path / "cm.png"),
        plots.plot_per_class_f1(per_class, tmp_path / "f1.png"),
        plots.plot_parallel_coordinates(trials, "a", tmp_path / "parallel.png"),
        plots.plot_learning_curves(histories, "a", tmp_path / "curves.png"),
    ]
    for path in paths:
        assert_real_image(path)
