"""The classifier, its checkpoints, batching and the training loop, on a tiny random BERT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tagifai import model as model_module
from tagifai.batching import TokenizedSplit, iterate_batches, tokenize_splits
from tagifai.data import load_dataset, split_dataset
from tagifai.errors import ModelError
from tagifai.metrics import weighted_f1
from tagifai.model import build_classifier, freeze_lower_layers, load_checkpoint, predict_logits, save_checkpoint
from tagifai.serving.predictor import Predictor
from tagifai.settings import DEFAULT_BACKBONE
from tagifai.train import train_classifier

CONFIG = {"dropout_p": 0.3, "lr": 5e-4, "lr_factor": 0.8, "lr_patience": 3}


@pytest.fixture(scope="module")
def tiny_data(tiny_backbone):
    splits = split_dataset(load_dataset(None).frame, num_samples=160)
    return splits, tokenize_splits(splits, str(tiny_backbone), max_length=64)


def test_batches_cover_every_row_once_with_per_batch_padding():
    lengths = [3, 7, 1, 5, 2, 9, 4]
    ids = np.concatenate([np.arange(1, n + 1) for n in lengths]).astype(np.int32)
    split = TokenizedSplit(ids, np.concatenate([[0], np.cumsum(lengths)]), np.arange(len(lengths)))
    seen = []
    for input_ids, mask, labels in iterate_batches(split, 3, pad_token_id=0, rng=np.random.default_rng(0)):
        assert input_ids.shape[1] == int(mask.sum(dim=1).max())  # padded to the batch's longest only
        for row, label in enumerate(labels.tolist()):
            n = lengths[label]
            assert mask[row].sum() == n
            assert input_ids[row, :n].tolist() == list(range(1, n + 1))
        seen += labels.tolist()
    assert sorted(seen) == list(range(len(lengths)))


def test_training_lowers_the_loss_and_checkpoints_on_improvement(tiny_data, tmp_path):
    _, data = tiny_data
    reports, saved = [], []

    def report(metrics, save):
        reports.append(metrics)
        if save is not None:
            save(tmp_path / f"epoch{metrics['epoch']}")
            saved.append(metrics["epoch"])

    train_classifier(CONFIG, data, num_epochs=4, batch_size=16, report=report, seed=0)
    assert [r["epoch"] for r in reports] == [1, 2, 3, 4]
    assert set(reports[0]) >= {"epoch", "lr", "train_loss", "val_loss", "val_f1"}
    assert reports[-1]["train_loss"] < reports[0]["train_loss"]
    assert min(r["val_loss"] for r in reports) < reports[0]["val_loss"] + 1e-9
    best_so_far = np.minimum.accumulate([r["val_loss"] for r in reports])
    improved = [r["epoch"] for r, b, prev in zip(reports, best_so_far, [np.inf, *best_so_far]) if b < prev]
    assert saved == improved  # a checkpoint only when val_loss improved


def test_checkpoint_round_trip_gives_identical_predictions(tiny_data, tiny_backbone, tmp_path):
    splits, data = tiny_data
    torch.manual_seed(0)
    model = build_classifier(str(tiny_backbone), len(data.class_to_index), 0.5).eval()
    from tagifai.model import load_tokenizer

    args = {"backbone": str(tiny_backbone), "class_to_index": data.class_to_index, "max_length": 64, "dropout_p": 0.5}
    save_checkpoint(model, load_tokenizer(str(tiny_backbone)), tmp_path / "ckpt", args)
    assert not list((tmp_path / "ckpt").glob("*.bin")) and not list((tmp_path / "ckpt").glob("*.pkl"))
    restored, _, restored_args = load_checkpoint(tmp_path / "ckpt")
    assert restored_args["class_to_index"] == data.class_to_index
    ids = torch.tensor([[101, 2000, 3000, 102], [101, 2500, 102, 0]])
    mask = (ids != 0).long()
    with torch.inference_mode():
        assert torch.equal(model(ids, mask), restored(ids, mask))
    predictor = Predictor(tmp_path / "ckpt")
    probabilities = predictor.predict_proba(list(splits.test["title"]), list(splits.test["description"]))
    assert probabilities.shape == (len(splits.test), len(data.class_to_index))
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_pooling_option_reads_mean_or_first_token_and_survives_a_checkpoint(tiny_data, tiny_backbone, tmp_path):
    _, data = tiny_data
    ids = torch.tensor([[101, 2000, 3000, 102], [101, 2500, 102, 0]])
    mask = (ids != 0).long()
    from tagifai.model import load_tokenizer

    for pooling in ("mean", "cls"):
        torch.manual_seed(0)
        model = build_classifier(str(tiny_backbone), len(data.class_to_index), 0.5, pooling=pooling).eval()
        with torch.inference_mode():
            states = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).float()
            pooled = states[:, 0] if pooling == "cls" else (states * weights).sum(1) / weights.sum(1)
            assert torch.allclose(model(ids, mask), model.head(pooled), atol=1e-6)
        args = {"class_to_index": data.class_to_index, "dropout_p": 0.5, "pooling": pooling}
        save_checkpoint(model, load_tokenizer(str(tiny_backbone)), tmp_path / pooling, args)
        restored = load_checkpoint(tmp_path / pooling)[0]
        assert restored.pooling == pooling
        with torch.inference_mode():
            assert torch.equal(model(ids, mask), restored(ids, mask))
    with pytest.raises(ModelError, match="pooling must be one of"):
        build_classifier(str(tiny_backbone), 4, 0.5, pooling="max")


def test_loss_options_shape_training_but_not_the_validation_loss(tiny_data, tmp_path):
    """Label smoothing and class weights change what is trained; the reported validation loss stays
    plain cross-entropy of the kept checkpoint, so choices are compared on one scale."""
    _, data = tiny_data
    favoured = 0
    predicted_share = {}
    for name, options in {
        "plain": {},
        "weighted": {"class_weights": [20.0 if i == favoured else 0.05 for i in range(len(data.class_to_index))]},
        "smoothed": {"label_smoothing": 0.4},
    }.items():
        reports = []

        def report(metrics, save, name=name, reports=reports):
            reports.append(metrics)
            if save is not None:
                save(tmp_path / name)

        train_classifier(CONFIG, data, num_epochs=2, batch_size=16, report=report, seed=0, **options)
        model = load_checkpoint(tmp_path / name)[0]
        logits = predict_logits(model, data.val, batch_size=32, pad_token_id=data.pad_token_id)
        plain_loss = torch.nn.functional.cross_entropy(logits, torch.tensor(data.val.labels)).item()
        best = min(reports, key=lambda m: m["val_loss"])
        assert best["val_loss"] == pytest.approx(plain_loss, rel=1e-5)
        predicted_share[name] = float((logits.argmax(dim=1) == favoured).float().mean())
    assert predicted_share["weighted"] > predicted_share["plain"]
    assert predicted_share["weighted"] > 0.9


def test_corrupted_checkpoint_is_refused(tiny_data, tiny_backbone, tmp_path):
    _, data = tiny_data
    model = build_classifier(str(tiny_backbone), len(data.class_to_index), 0.5)
    from tagifai.model import load_tokenizer

    args = {"backbone": "tiny", "class_to_index": data.class_to_index, "max_length": 64, "dropout_p": 0.5}
    folder = save_checkpoint(model, load_tokenizer(str(tiny_backbone)), tmp_path / "ckpt", args)
    weights = folder / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-10] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="checksum"):
        load_checkpoint(folder)


def test_a_folder_that_is_not_a_model_is_rejected(tmp_path):
    (tmp_path / "readme.txt").write_text("not a model")
    with pytest.raises(ModelError, match="cannot load"):
        build_classifier(str(tmp_path), 4, 0.5)


def test_real_default_backbone_is_checksum_verified_and_loads():
    """Loads the real 22.7M-parameter all-MiniLM-L6-v2 shipped on PyPI, offline."""
    from pathlib import Path

    folder = Path(model_module.resolve_backbone(DEFAULT_BACKBONE))
    assert model_module.file_sha256(folder / "model.safetensors") == model_module.DEFAULT_BACKBONE_SHA256
    classifier = build_classifier(DEFAULT_BACKBONE, num_classes=4, dropout_p=0.5).eval()
    parameters = sum(p.numel() for p in classifier.backbone.parameters())
    assert 22_000_000 < parameters < 23_500_000
    tokenizer = model_module.load_tokenizer(DEFAULT_BACKBONE)
    encoded = tokenizer(
        ["image segmentation with unet", "serving models with kubernetes"], padding=True, return_tensors="pt"
    )
    with torch.inference_mode():
        states = classifier.backbone(**encoded).last_hidden_state
    assert states.shape[-1] == 384 and torch.isfinite(states).all()


def test_default_backbone_checksum_mismatch_stops_with_clear_error(monkeypatch):
    model_module.resolve_backbone.cache_clear()
    monkeypatch.setattr(model_module, "DEFAULT_BACKBONE_SHA256", "0" * 64)
    try:
        with pytest.raises(ModelError, match="checksum mismatch"):
            model_module.resolve_backbone(DEFAULT_BACKBONE)
    finally:
        model_module.resolve_backbone.cache_clear()


def test_weighted_f1_matches_scikit_learn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    for _ in range(100):
        size, classes = int(rng.integers(1, 40)), int(rng.integers(1, 5))
        labels, predicted = rng.integers(0, classes, size), rng.integers(0, classes + 1, size)
        expected = f1_score(labels, predicted, average="weighted", zero_division=0)
        assert weighted_f1(labels, predicted) == pytest.approx(expected, abs=1e-12)


def test_freezing_keeps_lower_layers_and_embeddings_unchanged(tiny_data, tiny_backbone, tmp_path):
    model = build_classifier(str(tiny_backbone), 4, 0.1)
    freeze_lower_layers(model, trainable_layers=1)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("backbone.encoder.layer.1.", "head.")) for name in trainable)
    assert any(name.startswith("head.") for name in trainable)
    with pytest.raises(ModelError, match="between 0 and 2"):
        freeze_lower_layers(build_classifier(str(tiny_backbone), 4, 0.1), trainable_layers=3)

    _, data = tiny_data
    saved = {}
    train_classifier(
        CONFIG,
        data,
        num_epochs=1,
        batch_size=16,
        trainable_layers=1,
        seed=0,
        report=lambda metrics, save: saved.setdefault("save", save),
    )
    reference = build_classifier(str(tiny_backbone), 4, 0.1).state_dict()
    folder = tmp_path / "frozen-checkpoint"
    saved["save"](folder)
    trained = load_checkpoint(folder)[0].state_dict()
    for name, tensor in trained.items():
        if name.startswith(("backbone.embeddings.", "backbone.encoder.layer.0.")):
            assert torch.equal(tensor, reference[name]), name
    changed = [
        n for n in trained if n.startswith("backbone.encoder.layer.1.") and not torch.equal(trained[n], reference[n])
    ]
    assert changed  # the top layer did train


def test_trial_workers_do_not_import_driver_only_libraries():
    """Each trial worker imports tagifai.tuning.trial; MLflow, HyperOpt and scikit-learn would add seconds."""
    import subprocess
    import sys

    code = (
        "import sys, tagifai.tuning.trial; "
        "print(sorted(m for m in ('mlflow', 'hyperopt', 'sklearn', 'prefect') if m in sys.modules))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"
