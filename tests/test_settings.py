"""The CLI is generated from the typed settings: every option documented and validated."""

from __future__ import annotations

import pytest

from flows.cli import build_parser, parse_settings
from tagifai.settings import DEFAULT_INITIAL_PARAMS, TuneSettings


def test_help_documents_every_option():
    text = build_parser(TuneSettings, "python -m flows.tune", "").format_help()
    for option in (
        "--experiment-name",
        "--dataset-loc",
        "--holdout-loc",
        "--initial-params",
        "--num-runs",
        "--num-samples",
        "--num-epochs",
        "--batch-size",
        "--cpu-per-worker",
        "--gpu-per-worker",
        "--num-workers",
        "--results-fp",
        "--model",
        "--max-concurrent",
        "--grace-period",
        "--tracking-uri",
    ):
        assert option in text


def test_defaults_and_typed_parsing():
    settings = parse_settings(TuneSettings, ["--num-runs", "3", "--cpu-per-worker", "0.5"], "p", "")
    assert settings.num_runs == 3 and settings.cpu_per_worker == 0.5
    assert settings.initial_params == DEFAULT_INITIAL_PARAMS


@pytest.mark.parametrize(
    "value",
    [
        '[{"train_loop_config": {"dropout_p": 0.5, "lr": 1e-4, "lr_factor": 0.8, "lr_patience": 3}}]',
        '{"dropout_p": 0.5, "lr": 1e-4, "lr_factor": 0.8, "lr_patience": 3}',
    ],
)
def test_initial_params_accept_the_course_format_and_a_bare_dict(value):
    settings = parse_settings(TuneSettings, ["--initial-params", value], "p", "")
    assert settings.initial_params == DEFAULT_INITIAL_PARAMS


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num-runs", "0"], "num-runs"),
        (["--num-epochs", "-1"], "num-epochs"),
        (["--batch-size", "0"], "batch-size"),
        (["--initial-params", "{not json"], "not valid JSON"),
        (["--initial-params", '{"dropout": 0.5}'], "unknown keys"),
        (["--initial-params", '{"lr": 0.5}'], "outside the search space"),
        (["--grace-period", "5", "--num-epochs", "2"], "grace_period"),
    ],
)
def test_bad_options_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(TuneSettings, argv, "python -m flows.tune", "")
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_num_workers_is_checked_against_the_batch_and_whole_gpus():
    assert TuneSettings().num_workers == 1
    assert TuneSettings(num_workers=3, batch_size=3).num_workers == 3
    with pytest.raises(ValueError, match="every worker needs at least one row"):
        TuneSettings(num_workers=4, batch_size=3)
    with pytest.raises(ValueError, match="NCCL cannot run two workers"):
        TuneSettings(num_workers=2, gpu_per_worker=0.5)
    assert TuneSettings(num_workers=2, gpu_per_worker=1).gpu_per_worker == 1
    assert TuneSettings(num_workers=1, gpu_per_worker=0.5).gpu_per_worker == 0.5


def test_num_workers_enters_the_fingerprint_only_above_one():
    from tagifai.settings import training_fingerprint

    assert training_fingerprint(TuneSettings()) == training_fingerprint(TuneSettings(num_workers=1))
    assert training_fingerprint(TuneSettings()) != training_fingerprint(TuneSettings(num_workers=2))
