"""The ONNX Runtime prediction path against the PyTorch model it replaces, on a tiny random BERT.

Tolerance: probabilities within 1e-5 of PyTorch's for the fp32 graph (seen: ~1e-7; the graph does
the same float32 arithmetic in another order). The int8 graph only has to stay close (0.05), as
its accuracy is judged on real data by the benchmark.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from tagifai.model import build_classifier, load_tokenizer, save_checkpoint
from tagifai.serving import onnx_engine
from tagifai.serving.predictor import ENGINE_ENV, Predictor

pytest.importorskip("onnxruntime")

FP32_TOLERANCE = 1e-5
INT8_TOLERANCE = 0.05
TAGS = ["computer-vision", "mlops", "natural-language-processing", "other"]
TITLES = [
    "",
    "Object detection",
    "Transformers for text classification with attention over long documents and summaries",
    "Kubernetes",
    "Graph neural networks",
    "A survey",
]
DESCRIPTIONS = [
    "Segment images into pixels",
    "",
    "Fine-tune BERT on sentiment, translation, question answering and named entity recognition " * 3,
    "Serving models with canary releases, monitoring and drift detection in production pipelines",
    "",
    "x",
]


def make_checkpoint(backbone, folder, seed: int, pooling: str = "mean"):
    torch.manual_seed(seed)
    model = build_classifier(str(backbone), len(TAGS), 0.1, pooling=pooling)
    with torch.no_grad():  # move every weight, so two checkpoints of one architecture really differ
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    args = {"class_to_index": {tag: i for i, tag in enumerate(TAGS)}, "dropout_p": 0.1, "max_length": 64}
    args["pooling"] = pooling
    return save_checkpoint(model, load_tokenizer(str(backbone)), folder, args)


@pytest.fixture(scope="module")
def checkpoints(tiny_backbone, tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine")
    return [make_checkpoint(tiny_backbone, folder / f"ckpt{seed}", seed) for seed in (1, 2)]


def test_fp32_engine_matches_pytorch_for_single_texts_and_mixed_batches(checkpoints):
    for checkpoint in checkpoints:  # the second reuses the first one's exported graph with its own weights
        fast, slow = Predictor(checkpoint, engine="onnx"), Predictor(checkpoint, engine="torch")
        assert fast.engine_name == "onnxruntime-fp32" and slow.engine_name == "torch"
        for title, description in zip(TITLES, DESCRIPTIONS):
            got, expected = fast.predict_proba([title], [description]), slow.predict_proba([title], [description])
            np.testing.assert_allclose(got, expected, atol=FP32_TOLERANCE, rtol=0)
        for batch_size in (1, 2, 64):  # several session runs of mixed lengths, and one
            got = fast.predict_proba(TITLES, DESCRIPTIONS, batch_size=batch_size)
            np.testing.assert_allclose(got, slow.predict_proba(TITLES, DESCRIPTIONS), atol=FP32_TOLERANCE, rtol=0)
            np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    assert not fast.engine.exported  # the architecture's graph came from the cache the second time


def test_cls_pooling_gets_its_own_graph_that_matches_pytorch(checkpoints, tiny_backbone, tmp_path):
    """The exported graph is keyed by pooling: a [CLS] model must not reuse a mean-pooling graph."""
    cls_checkpoint = make_checkpoint(tiny_backbone, tmp_path / "cls", seed=3, pooling="cls")
    fast, slow = Predictor(cls_checkpoint, engine="onnx"), Predictor(cls_checkpoint, engine="torch")
    assert fast.engine_name == "onnxruntime-fp32"
    assert onnx_engine.template_key(slow.model) != onnx_engine.template_key(Predictor(checkpoints[0]).model)
    got = fast.predict_proba(TITLES, DESCRIPTIONS, batch_size=2)
    np.testing.assert_allclose(got, slow.predict_proba(TITLES, DESCRIPTIONS), atol=FP32_TOLERANCE, rtol=0)


def test_int8_engine_stays_close(checkpoints):
    fast, slow = Predictor(checkpoints[0], engine="onnx-int8"), Predictor(checkpoints[0], engine="torch")
    assert fast.engine_name == "onnxruntime-int8"
    np.testing.assert_allclose(
        fast.predict_proba(TITLES, DESCRIPTIONS), slow.predict_proba(TITLES, DESCRIPTIONS), atol=INT8_TOLERANCE, rtol=0
    )


def test_engine_is_chosen_by_environment(checkpoints, monkeypatch):
    monkeypatch.setenv(ENGINE_ENV, "torch")
    assert Predictor(checkpoints[0]).engine is None
    monkeypatch.setenv(ENGINE_ENV, "tensorrt")
    with pytest.raises(ValueError, match="inference engine must be one of"):
        Predictor(checkpoints[0])
    monkeypatch.delenv(ENGINE_ENV)
    assert Predictor(checkpoints[0]).engine_name == "onnxruntime-fp32"  # the default


def test_pytorch_is_the_fallback_when_onnx_runtime_is_missing_or_fails(checkpoints, monkeypatch, caplog):
    expected = Predictor(checkpoints[0], engine="torch").predict_proba(TITLES, DESCRIPTIONS)

    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # import fails as if not installed
    with caplog.at_level(logging.WARNING):
        predictor = Predictor(checkpoints[0], engine="onnx")
    assert predictor.engine is None and "ONNX Runtime is not installed" in caplog.text
    np.testing.assert_allclose(predictor.predict_proba(TITLES, DESCRIPTIONS), expected, atol=1e-6)
    monkeypatch.undo()

    def broken_export(model):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(onnx_engine, "cache_dir", lambda: checkpoints[0].parent / "empty-cache")
    monkeypatch.setattr(onnx_engine, "export_template", broken_export)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert Predictor(checkpoints[0], engine="onnx").engine is None
    assert "ONNX Runtime path failed (RuntimeError: unsupported operator): predicting with PyTorch" in caplog.text
    monkeypatch.undo()

    predictor = Predictor(checkpoints[0], engine="onnx")  # a failure while serving: PyTorch from then on
    monkeypatch.setattr(predictor.engine, "session", None)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        np.testing.assert_allclose(predictor.predict_proba(TITLES, DESCRIPTIONS), expected, atol=1e-6)
    assert predictor.engine is None and "predicting with PyTorch from now on" in caplog.text


def test_a_graph_that_disagrees_with_pytorch_is_refused(checkpoints, monkeypatch, caplog):
    real_fill = onnx_engine.fill_weights

    def wrong_weights(graph, model):
        serialized, weights = real_fill(graph, model)
        name = next(name for name, array in weights.items() if array.ndim == 2)
        weights[name] = np.ascontiguousarray(weights[name][::-1])  # a mapping mistake, say
        return serialized, weights

    monkeypatch.setattr(onnx_engine, "fill_weights", wrong_weights)
    with caplog.at_level(logging.WARNING):
        assert Predictor(checkpoints[0], engine="onnx").engine is None
    assert "differ from PyTorch" in caplog.text


def test_runs_cover_every_row_once_in_length_order_within_the_token_budget():
    lengths = np.array([5, 40, 3, 12, 12, 7, 90, 1, 30, 8])
    runs = list(onnx_engine.run_chunks(lengths, max_rows=3, tokens_per_run=64))
    assert sorted(np.concatenate(runs).tolist()) == list(range(len(lengths)))
    assert np.all(np.diff(lengths[np.concatenate(runs)]) >= 0)
    for rows in runs:
        assert len(rows) <= 3
        assert len(rows) == 1 or len(rows) * lengths[rows].max() <= 64  # a lone long row may exceed it
