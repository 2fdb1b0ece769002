"""The CUDA code path is chosen correctly, checked on a CPU-only machine by faking `torch.cuda`.

What runs on a real GPU (benchmarks/gpu_check.sh) cannot run here; these tests pin the choices
that lead there: a trial's device string, the autocast dtype, and fractional GPUs per trial
accepted by the settings and checked against the Ray cluster.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from pydantic import ValidationError

from tagifai import model
from tagifai.errors import ResourceError
from tagifai.settings import TuneSettings
from tagifai.tuning import study as tune
from tagifai.tuning import trial


def fake_cuda(monkeypatch, available: bool = True, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_auto_precision_is_bf16_on_a_gpu_with_bf16(monkeypatch, device):
    fake_cuda(monkeypatch, bf16=True)
    assert model.resolve_precision("auto", device) == "bf16"
    assert model.resolve_precision("fp32", device) == "fp32"
    assert model.resolve_precision("bf16", device) == "bf16"


def test_auto_precision_is_fp32_on_a_gpu_without_bf16_and_explicit_bf16_is_refused(monkeypatch):
    fake_cuda(monkeypatch, bf16=False)
    assert model.resolve_precision("auto", "cuda") == "fp32"
    with pytest.raises(ValueError, match="needs native bf16 on cuda"):
        model.resolve_precision("bf16", "cuda")


def test_cpu_precision_does_not_ask_cuda(monkeypatch):
    fake_cuda(monkeypatch, bf16=True)  # a bf16 GPU in the machine says nothing about the CPU
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False, raising=False)
    assert model.resolve_precision("auto", "cpu") == "fp32"


def test_autocast_targets_the_gpu_in_bf16():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available ... Disabling autocast" on this machine
        context = model.autocast("bf16", "cuda:0")
    assert isinstance(context, torch.autocast)
    assert context.device == "cuda" and context.fast_dtype == torch.bfloat16
    cpu = model.autocast("bf16", "cpu")
    assert cpu.device == "cpu" and cpu.fast_dtype == torch.bfloat16
    assert not isinstance(model.autocast("fp32", "cuda"), torch.autocast)


@pytest.mark.parametrize(
    ("assigned", "cuda", "expected"),
    [
        ({"CPU": 1.0, "GPU": 0.5}, True, "cuda"),  # two trials sharing one GPU
        ({"CPU": 1.0, "GPU": 1.0}, True, "cuda"),
        ({"CPU": 1.0}, True, "cpu"),  # no GPU assigned: never touch the GPU another trial holds
        ({"CPU": 1.0, "GPU": 0.5}, False, "cpu"),  # assigned but torch has no CUDA: CPU rather than a crash
    ],
)
def test_a_trial_trains_on_cuda_exactly_when_it_holds_a_gpu(monkeypatch, tmp_path, assigned, cuda, expected):
    fake_cuda(monkeypatch, available=cuda)
    context = types.SimpleNamespace(get_assigned_resources=lambda: assigned)
    monkeypatch.setattr(trial.ray, "get_runtime_context", lambda: context)
    monkeypatch.setattr(trial.tune, "get_context", lambda: types.SimpleNamespace(get_trial_id=lambda: "t0"))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep this test process's threads
    seen = {}
    monkeypatch.setattr(trial, "train_classifier", lambda config, data, **kwargs: seen.update(kwargs))
    trial.run_trial(
        {},
        None,
        trial.TrialPlan(str(tmp_path), num_epochs=1, batch_size=8, seed=0, trainable_layers=2, precision="auto"),
    )
    assert seen["device"] == expected and seen["precision"] == "auto"


def test_fractional_gpus_per_trial_are_valid_settings():
    assert TuneSettings(gpu_per_worker=0.5).gpu_per_worker == 0.5
    assert TuneSettings(gpu_per_worker=0.25, max_concurrent=4).gpu_per_worker == 0.25
    with pytest.raises(ValidationError):
        TuneSettings(gpu_per_worker=-0.5)


def nodes(*resources):
    return lambda: [{"Alive": True, "Resources": r} for r in resources] + [{"Alive": False, "Resources": {"GPU": 8}}]


@pytest.mark.parametrize(
    ("gpus", "cluster", "fits"),
    [
        (0.5, [{"CPU": 16.0, "GPU": 1.0}], True),
        (1.0, [{"CPU": 16.0, "GPU": 1.0}], True),
        (0.5, [{"CPU": 16.0}], False),  # no GPU anywhere: the trials would wait forever
        (1.5, [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}], False),  # 2 GPUs, but not on one node
        (2.0, [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 1.0}], True),
    ],
)
def test_gpu_requests_are_checked_against_the_largest_live_node(monkeypatch, gpus, cluster, fits):
    monkeypatch.setattr(tune.ray, "nodes", nodes(*cluster))
    settings = TuneSettings(gpu_per_worker=gpus)
    if fits:
        tune.check_resources(settings)
    else:
        with pytest.raises(ResourceError, match="--gpu-per-worker"):
            tune.check_resources(settings)
