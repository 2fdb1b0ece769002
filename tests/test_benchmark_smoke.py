"""The benchmark runs end to end on a tiny random BERT and data made here (no Prefect, Ray or network)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_TAGS

WORDS = {
    "computer-vision": "image pixels segmentation detection camera convolution video frames",
    "mlops": "deployment monitoring pipeline serving kubernetes docker registry drift",
    "natural-language-processing": "text tokens translation language sentiment transformer summarization",
    "other": "graph recommendation tabular reinforcement audio time series",
}


@pytest.fixture
def tiny_csv(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for index in range(64):
        tag = TINY_TAGS[index % len(TINY_TAGS)]
        words = WORDS[tag].split()
        description = " ".join(rng.choice(words, size=int(rng.integers(3, 25))))
        rows.append(
            {
                "id": index,
                "created_on": "2020-01-01",
                "title": f"{words[0]} project {index}",
                "description": description,
                "tag": tag,
            }
        )
    path = tmp_path / "tiny.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_benchmark_writes_sane_json(tiny_backbone, tiny_csv, tmp_path):
    from benchmarks.run import main

    out = tmp_path / "results.json"
    main(
        [
            "--dataset-loc",
            str(tiny_csv),
            "--model",
            str(tiny_backbone),
            "--quick",
            "--skip-tuning",
            "--skip-levers",
            "--out",
            str(out),
        ]
    )
    results = json.loads(out.read_text())

    assert {"machine", "train", "tuning", "inference", "memory", "targets"} <= set(results)
    assert results["machine"]["nproc"] >= 1 and results["machine"]["threads"] >= 1
    train = results["train"]
    for key in (
        "tokens_per_s",
        "naive_tokens_per_s",
        "speedup_vs_naive",
        "matmul_gflops_fp32",
        "model_gflops",
        "efficiency_fp32",
        "samples_per_s",
    ):
        assert train[key] > 0, key
    for key in ("padding_waste", "naive_padding_waste"):
        assert 0 <= train[key] < 1, key
    assert (
        train["padding_waste"] <= train["naive_padding_waste"]
    )  # bucketing never pads more than padding to the longest
    for key in ("val_f1", "naive_val_f1"):
        assert 0 <= train[key] <= 1, key
    assert results["tuning"] == {"skipped": True}
    inference = results["inference"]
    assert 0 < inference["single_p50_ms"] <= inference["single_p95_ms"]
    assert inference["batch64_examples_per_s"] > 0
    assert results["memory"]["peak_rss_mb"] > 0
    assert set(results["targets"]) >= {"speedup_vs_naive", "efficiency_fp32", "single_p50_ms", "peak_rss_mb"}


def test_in_process_levers(tiny_backbone, tiny_csv):
    """The levers that need no extra processes (the thread and bf16 levers are left to real runs)."""
    from benchmarks import train_bench
    from tagifai.data import load_dataset, split_dataset
    from tagifai.train import tokenize_splits

    data = tokenize_splits(split_dataset(load_dataset(str(tiny_csv)).frame), str(tiny_backbone), 64)
    padding = train_bench.padding_lever(data.train, batch_size=8, seed=0)
    assert 0 <= padding["bucketed"] <= padding["per_batch_random"] <= padding["full"] < 1
    optimizer = train_bench.optimizer_lever(data, str(tiny_backbone), steps=2, batch_size=8, seed=0)
    assert optimizer["default_adamw_step_s"] > 0 and optimizer["fused_adamw_step_s"] > 0
    loading = train_bench.loading_lever(data, str(tiny_backbone), repeats=1)
    assert loading["checkpoint_write_s"] > 0 and loading["checkpoint_mb"] > 0


def test_timeline_attribution_adds_up():
    """The tuning breakdown's kinds sum to the overhead, and parallel epochs count once."""
    from benchmarks.tuning_probe import Timeline, attribute

    timeline = Timeline()
    timeline.intervals = [
        ("flow_body", "tune", 1.0, 19.0),
        ("ray_start", "connect_ray", 2.0, 3.0),
        ("ray_fit", "fit", 3.0, 16.0),
        ("mlflow_logging", "log_epoch", 9.0, 9.5),  # under compute: hidden, not overhead
    ]
    timeline.marks = {"start": [("a", 3.0), ("b", 3.0)], "end": [("a", 15.5), ("b", 15.5)]}

    def epochs(ends):
        return [
            {"epoch": i + 1, "epoch_time_s": 5.0, "epoch_end_unix": end, "val_loss": 1.0 - i}
            for i, end in enumerate(ends)
        ]

    trials = [{"trial_id": "a", "epochs": epochs([9.0, 15.0])}, {"trial_id": "b", "epochs": epochs([9.0, 15.0])}]
    result = attribute(timeline, trials, called=0.0, returned=20.0)
    assert result["wall_s"] == pytest.approx(20.0)
    assert result["trial_compute_s"] == pytest.approx(20.0)
    assert result["critical_path_compute_s"] == pytest.approx(10.0, abs=0.05)
    assert result["overhead_s"] == pytest.approx(10.0, abs=0.05)
    assert sum(result["overhead_breakdown"].values()) == pytest.approx(result["overhead_s"], abs=0.05)
    breakdown = result["overhead_breakdown"]
    assert breakdown["prefect_start"] == pytest.approx(1.0, abs=0.05)
    assert breakdown["ray_start"] == pytest.approx(1.0, abs=0.05)
    assert breakdown["trial_start"] == pytest.approx(1.0, abs=0.05)
    assert breakdown["checkpoint_writes"] == pytest.approx(1.0 + 0.5, abs=0.05)
    assert breakdown["mlflow_logging"] == pytest.approx(0.0, abs=0.05)
    assert breakdown["ray_tune_teardown"] == pytest.approx(0.5, abs=0.05)
    assert result["max_parallel_trials"] == 2


def test_training_flops_count_only_the_work_done(tiny_backbone):
    from benchmarks.train_bench import flop_parameters, training_flops_per_token
    from tagifai.model import build_classifier, encoder_layers

    model = build_classifier(str(tiny_backbone), 4, 0.1)
    total = flop_parameters(model)
    layer = sum(p.numel() for p in encoder_layers(model.backbone)[1].parameters())
    head = sum(p.numel() for p in model.head.parameters())
    assert training_flops_per_token(model, None) == 6 * total  # everything trains: the usual 6N
    # top layer + head: forward everywhere, weight gradients for both, input gradient for the head only
    assert training_flops_per_token(model, 1) == 2 * total + 2 * (layer + head) + 2 * head
    assert training_flops_per_token(model, 0) == 2 * total + 2 * head  # a linear probe
