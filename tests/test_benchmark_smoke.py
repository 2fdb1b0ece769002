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


@pytest.mark.slow  # the benchmark end to end, quick mode
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
    assert inference["batch64_examples_per_s"] > 0 and inference["batch64_fraction_of_peak"] > 0
    assert inference["single_p50_over_floor"] > 0
    bound = inference["bound"]
    assert bound["flops_per_example"] > 0 and bound["peak_gflops"] > 0 and bound["peak_source"]
    # The bound is a bound: no engine at any thread count, and no GEMM of the sweep, exceeds its peak.
    for threads, peak in bound["cpu_peak"]["by_threads"].items():
        assert peak["peak_gflops"] == bound["by_threads"][threads]["peak_gflops"]
        gemms = [rate for shapes in peak["gemm_gflops"].values() for rate in shapes.values()]
        assert gemms and max(gemms) <= peak["peak_gflops"]
        assert peak["peak_int8_gops"] >= peak["peak_gflops"]
        for engine, by_threads in inference["by_engine"].items():
            measured = by_threads[threads]
            own = peak["peak_int8_gops"] if "int8" in engine else peak["peak_gflops"]
            assert 0 < measured["batch64_gflops"] <= own, (engine, threads)
            assert 0 < measured["batch64_fraction_of_peak"] <= 1 and measured["single_p50_over_floor"] >= 1
            if "batch64_cpu_gflops" in measured:
                assert measured["batch64_cpu_fraction_of_peak"] <= 1, engine
    assert set(inference["by_engine"]) == {"torch", "onnxruntime-fp32", "onnxruntime-int8"}
    assert set(inference["test_f1"]) == set(inference["by_engine"])
    assert inference["load_costs"]["onnx_warm_load_s"] > 0
    assert results["memory"]["peak_rss_mb"] > 0
    assert set(results["targets"]) >= {
        "speedup_vs_naive",
        "fixed_cost_s",
        "fixed_cost_over_import_baseline",
        "batch64_fraction_of_peak",
        "single_p50_over_floor",
        "peer_wall_ratio",
        "peak_rss_mb",
    }
    assert results["targets"]["fixed_cost_s"]["met"] is None  # skipped, not missed


def test_choices_cv_scores_every_development_row_once_and_compares_on_the_same_rows(tiny_backbone, tiny_csv, tmp_path):
    from benchmarks import choices_cv

    out = tmp_path / "cv.json"
    quick = "pooling=cls,epochs=1,weights=balanced,smoothing=0.1"
    common = ["--dataset-loc", str(tiny_csv), "--model", str(tiny_backbone), "--folds", "2", "--out", str(out)]
    choices_cv.main([*common, "--choice", "base", "--choice", quick, "--ensemble", f"base+{quick}"])
    results = json.loads(out.read_text())

    assert results["dataset_rows"] + results["test_rows_excluded"] == 64
    base, other = results["choices"]["base"], results["choices"][quick]
    for entry in (base, other):
        probs = np.asarray(entry["oof_probs"])
        assert probs.shape == (results["dataset_rows"], 4)
        assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-3)  # every row scored by the fold holding it out
    assert other["options"]["pooling"] == "cls" and other["options"]["epochs"] == 1
    assert other["flop_proxy"] == pytest.approx(base["flop_proxy"] / 4)  # 1 epoch of today's 4
    ensemble = np.asarray(results["choices"][f"ensemble(base+{quick})"]["oof_probs"])
    assert np.allclose(ensemble, (np.asarray(base["oof_probs"]) + np.asarray(other["oof_probs"])) / 2, atol=1e-4)
    rows = {row["choice"]: row for row in results["summary"]}
    assert rows["base"]["diff_vs_base"] == 0 and rows["base"]["ci95"] == [0, 0]
    assert not rows["base"]["gate_promotes"]  # a tie keeps the champion
    assert rows[quick]["flop_ratio"] == pytest.approx(0.25)

    choices_cv.main([*common, "--choice", "base"])  # already there: kept, not retrained
    assert json.loads(out.read_text())["choices"]["base"]["finished_at"] == base["finished_at"]


def test_in_process_levers(tiny_backbone, tiny_csv):
    """The levers that need no extra processes (the thread and bf16 levers are left to real runs)."""
    from benchmarks import train_bench
    from tagifai.batching import tokenize_splits
    from tagifai.data import load_dataset, split_dataset

    data = tokenize_splits(split_dataset(load_dataset(str(tiny_csv)).frame), str(tiny_backbone), 64)
    padding = train_bench.padding_lever(data.train, batch_size=8, seed=0)
    assert 0 <= padding["bucketed"] <= padding["per_batch_random"] <= padding["full"] < 1
    optimizer = train_bench.optimizer_lever(data, str(tiny_backbone), steps=2, batch_size=8, seed=0)
    assert optimizer["default_adamw_step_s"] > 0 and optimizer["fused_adamw_step_s"] > 0
    loading = train_bench.loading_lever(data, str(tiny_backbone), repeats=1)
    assert loading["checkpoint_write_s"] > 0 and loading["checkpoint_mb"] > 0


def test_cli_utilisation_splits_idle_core_seconds_exactly():
    """Two cores, trials of 1 CPU: compute core-seconds over cores x wall, and the idle rest split
    into before the first epoch, between trials, the study's tail and after the last epoch."""
    from benchmarks.cli_run import utilisation

    def trial(trial_id, run_start, ends, epoch_s=4.0):
        return {
            "trial_id": trial_id,
            "run_start": run_start,
            "epochs": [{"epoch": i + 1, "end": end, "epoch_time_s": epoch_s} for i, end in enumerate(ends)],
        }

    # Process 0-40 s. Trials a, b start computing at 10 s; b is pruned after one epoch, c takes
    # its core after a 2 s launch (18-26 s); a ends at 22 s, so 22-26 s is the tail (c alone).
    trials = [trial("a", 8.0, [14.0, 18.0, 22.0]), trial("b", 8.0, [14.0]), trial("c", 15.0, [20.0, 24.0, 28.0])]
    phases = {
        "prefect_server_start": 1.5,
        "flow_start": 3.0,
        "flow_end": 37.0,
        "tasks": [
            {"name": "tokenize", "start": 4.0, "end": 5.0},
            {"name": "tune-hyperparameters", "start": 6.0, "end": 30.0},
            {"name": "evaluate-best", "start": 31.0, "end": 33.0},
            {"name": "register-best", "start": 33.0, "end": 34.0},
        ],
    }
    result = utilisation(0.0, 40.0, trials, cores=2, cpus_per_trial=1.0, phases=phases)

    assert result["trial_compute_core_s"] == pytest.approx(28.0)  # 7 epochs x 4 s x 1 CPU
    assert result["cli_core_utilisation"] == pytest.approx(28.0 / 80.0)
    idle = result["idle_breakdown_core_s"]
    assert sum(idle.values()) == pytest.approx(result["idle_core_s"], abs=0.05)
    assert idle["before_first_epoch"] == pytest.approx(20.0)  # 10 s x 2 cores
    assert idle["between_trials"] == pytest.approx(2.0, abs=0.05)  # 14-16: b's core waits for c
    assert idle["study_tail"] == pytest.approx(6.0, abs=0.05)  # 22-28: c alone, nothing left to start
    assert idle["after_last_epoch"] == pytest.approx(24.0)  # 28-40 s x 2 cores
    before = result["before_first_epoch_s"]
    assert before == pytest.approx(
        {
            "python_imports": 1.5,
            "prefect_start_and_flow_run": 1.5,
            "data_prep_and_checks": 3.0,
            "ray_start_tune_setup_and_worker_start": 2.0,
            "first_trial_data_and_model_build": 2.0,
        }
    )
    after = result["after_last_epoch_s"]
    assert after["tune_teardown_and_checkpoint_logging"] == pytest.approx(2.0)
    assert after["until_end_of_evaluation"] == pytest.approx(3.0)
    assert after["until_end_of_registration"] == pytest.approx(1.0)
    assert after["flow_rest"] == pytest.approx(3.0) and after["prefect_teardown_and_exit"] == pytest.approx(3.0)
    assert after["task_durations_s"] == {"evaluation": 2.0, "registration": 1.0}
    assert [row["trial_start_to_first_epoch_s"] for row in result["trials"]] == pytest.approx([2.0, 2.0, 1.0])


def test_prefect_server_start_is_read_from_its_log_line(tmp_path):
    from datetime import datetime

    from benchmarks.cli_run import prefect_server_start

    started = datetime(2026, 1, 2, 10, 0, 0).timestamp()
    log = tmp_path / "cli.log"
    log.write_text("noise\n10:00:07.250 | INFO    | prefect - Starting temporary server on http://127.0.0.1:8582\n")
    assert prefect_server_start(log, started) == pytest.approx(started + 7.25)
    log.write_text("10:00:07.250 | INFO    | Flow run 'x' - Beginning flow run\n")
    assert prefect_server_start(log, started) is None


def test_cli_utilisation_without_prefect_marks_keeps_phases_whole():
    from benchmarks.cli_run import utilisation

    trials = [{"trial_id": "a", "run_start": 2.0, "epochs": [{"epoch": 1, "end": 8.0, "epoch_time_s": 5.0}]}]
    result = utilisation(0.0, 10.0, trials, cores=2, cpus_per_trial=1.0, phases={})
    assert result["before_first_epoch_s"] == pytest.approx(
        {"ray_start_tune_setup_and_worker_start": 2.0, "first_trial_data_and_model_build": 1.0}
    )
    assert result["idle_breakdown_core_s"]["study_tail"] == pytest.approx(5.0, abs=0.05)
    assert result["cli_core_utilisation"] == pytest.approx(0.25)


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


def test_fma_table_and_measured_clock():
    """The peak's parts: lanes from the flags (Zen 4 splits 512-bit ops), a clock measured on this core."""
    from benchmarks.cpu_peak import fp32_flops_per_cycle, measured_clock_ghz

    def per_cycle(flags, vendor="GenuineIntel", family=6):
        return fp32_flops_per_cycle({"flags": set(flags), "vendor": vendor, "family": family})[0]

    import platform

    if platform.machine() != "x86_64":
        assert per_cycle({"avx2"}) is None and measured_clock_ghz() is None
        return
    assert per_cycle({"avx", "avx2", "fma"}) == 32
    assert per_cycle({"avx2", "fma", "avx512f"}) == 64
    assert per_cycle({"avx2", "fma", "avx512f"}, "AuthenticAMD", 25) == 32  # Zen 4
    assert per_cycle({"avx2", "fma", "avx512f"}, "AuthenticAMD", 26) == 64  # Zen 5
    assert per_cycle({"avx"}) == 16
    clock = measured_clock_ghz(repeats=5, loops=100_000)
    assert clock is None or 0.3 < clock < 8.0, clock


def test_cpu_accounting_by_window_and_role():
    """benchmarks/proctree.py: machine busy core-seconds between two moments, and each role's CPU in
    a window, from synthetic /proc samples (a process that ended keeps its last count)."""
    from benchmarks.proctree import CLOCK_TICKS, TreeSampler, role_of

    assert role_of("/v/bin/python -m flows.tune --num-runs 4") == "driver (the command)"
    # Options name other processes (a worker's --raylet-name): the program and script decide.
    assert role_of("/v/python /v/ray/_private/workers/default_worker.py --raylet-name=/tmp/raylet") == (
        "Ray workers (trials)"
    )
    assert role_of("/v/ray/core/src/ray/raylet/raylet --python_worker_command=default_worker.py") == "Ray raylet"
    assert role_of("/v/python -m uvicorn --factory prefect.server.api.server:create_app") == "Prefect server"

    sampler = TreeSampler(root=0)
    sampler.busy = [(0.0, 0), (1.0, 2 * CLOCK_TICKS), (2.0, 3 * CLOCK_TICKS), (3.0, 3 * CLOCK_TICKS)]
    assert sampler.busy_core_s(0.0, 2.0) == pytest.approx(3.0)
    assert sampler.busy_core_s(2.0, 3.0) == pytest.approx(0.0)
    sampler.commands = {1: "/v/python -m flows.tune", 2: "ray::IDLE", 3: "ray::IDLE"}
    sampler.ticks = [
        (0.0, {1: 0, 2: 0}),
        (1.0, {1: CLOCK_TICKS, 2: CLOCK_TICKS, 3: CLOCK_TICKS}),
        (2.0, {1: 2 * CLOCK_TICKS, 3: 0}),  # 2 has ended; 3 reads 0 as a zombie
    ]
    assert sampler.cpu_by_role(0.0, 1.0) == {"Ray workers (trials)": 2.0, "driver (the command)": 1.0}
    assert sampler.cpu_by_role(1.0, 2.0) == {"driver (the command)": 1.0, "Ray workers (trials)": 0.0}
    assert [row["cpu_s"] for row in sampler.processes(0.0, 2.0)] == [2.0, 1.0, 1.0]
