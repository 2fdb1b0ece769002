"""Faults injected for real: a trial that raises, a flow killed with SIGKILL, a corrupted
checkpoint, and two flows writing to one MLflow store at once."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import tiny_settings
from tagifai.lifecycle import registry, tracking
from tagifai.tuning.trial import INJECT_FAULT_ENV
from tune_runs import local_store_options, runs_by_trial, start_flow, tune_command

pytestmark = pytest.mark.slow  # each test runs the tuning flow, two of them as separate processes


def test_failing_trial_is_retried_from_its_checkpoint_and_failed_attempt_is_marked(
    tmp_path, tiny_backbone, monkeypatch, capsys, own_ray
):
    from flows.tune import tune_classifier

    monkeypatch.setenv(INJECT_FAULT_ENV, f"2:{tmp_path}")  # every trial raises once, at epoch 2
    settings = tiny_settings(tmp_path, tiny_backbone, experiment_name="faulty", num_epochs=3, grace_period=3)
    summary = tune_classifier(settings)

    client = MlflowClient(settings.tracking_uri)
    grouped = runs_by_trial(client, "faulty")
    assert len(grouped) == 2 and len(summary["trials"]) == 2
    for attempts in grouped.values():
        failed, retried = attempts
        assert failed.info.status == "FAILED"
        assert [m.step for m in client.get_metric_history(failed.info.run_id, "val_loss")] == [1]
        assert retried.info.status == "FINISHED"
        # Resumed from the epoch-1 checkpoint, not from scratch.
        assert [m.step for m in client.get_metric_history(retried.info.run_id, "val_loss")] == [2, 3]
    assert all(t["epochs"] == 3 and t["status"] == "completed" for t in summary["trials"])

    # A corrupted model in the store is refused by predict and evaluate with a clear error: the
    # MLflow Model's graph they load (its sha256 is checked), and the training checkpoint beside it.
    artifact_dir = Path(client.get_run(summary["run_id"]).info.artifact_uri.removeprefix("file://"))
    model_id = registry.run_model_id(client, summary["run_id"])
    model_dir = Path(client.get_logged_model(model_id).artifact_location.removeprefix("file://"))
    for damaged in (artifact_dir / "checkpoint" / "model.safetensors", model_dir / "artifacts" / "model.onnx"):
        damaged.write_bytes(damaged.read_bytes()[:-64] + b"\0" * 64)
    from flows import evaluate, predict

    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--title", "a", "--run-id", summary["run_id"], "--tracking-uri", settings.tracking_uri])
    assert exit_info.value.code == 1 and "corrupted" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(
            [
                "--run-id",
                summary["run_id"],
                "--dataset-loc",
                str(tmp_path / "missing.csv"),
                "--tracking-uri",
                settings.tracking_uri,
            ]
        )
    assert "not found" in capsys.readouterr().err  # data is checked first...
    from tagifai.data import sample_dataset_path

    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(
            [
                "--run-id",
                summary["run_id"],
                "--dataset-loc",
                str(sample_dataset_path()),
                "--tracking-uri",
                settings.tracking_uri,
            ]
        )
    assert "corrupted" in capsys.readouterr().err  # ...then the checkpoint


def test_flow_killed_mid_tuning_resumes_without_rerunning_finished_trials(tmp_path, tiny_backbone):
    command = tune_command(
        "--model",
        tiny_backbone,
        *local_store_options(tmp_path),
        "--experiment-name",
        "killed",
        "--num-runs",
        "3",
        "--max-concurrent",
        "1",
        "--num-epochs",
        "4",
        "--grace-period",
        "4",
        "--batch-size",
        "4",
        "--results-fp",
        str(tmp_path / "out.json"),
    )
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    first = start_flow(command, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 300
        finished = []
        while time.monotonic() < deadline and first.poll() is None:
            tracking.prepare_sqlite_store(uri)  # the same lock the flow takes while creating the store
            experiment = MlflowClient(uri).get_experiment_by_name("killed")
            if experiment:
                finished = MlflowClient(uri).search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
                if finished:
                    break
            time.sleep(0.2)
        assert finished, "no trial finished before the deadline:\n" + (tmp_path / "first.log").read_text()[-3000:]
        assert first.poll() is None, "the flow ended before it could be killed"
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    finished_trial = finished[0].data.tags[tracking.TAG_TRIAL]

    second = start_flow(command, tmp_path / "second.log")
    assert second.wait(timeout=400) == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert "resumed the interrupted Ray Tune experiment" in (tmp_path / "second.log").read_text()

    summary = json.loads((tmp_path / "out.json").read_text())
    assert summary["resumed"] is True
    trial_ids = [t["trial_id"] for t in summary["trials"]]
    assert len(trial_ids) == 3 == len(set(trial_ids))  # every trial counted once
    grouped = runs_by_trial(MlflowClient(uri), "killed")
    assert len(grouped[finished_trial]) == 1  # the finished trial was not run again
    statuses = [run.info.status for attempts in grouped.values() for run in attempts]
    assert "RUNNING" not in statuses


def test_two_flows_at_once_share_one_mlflow_store(tmp_path, tiny_backbone):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    flows = [
        start_flow(
            tune_command(
                "--model",
                tiny_backbone,
                *local_store_options(tmp_path),
                "--experiment-name",
                "shared",
                "--num-runs",
                "2",
                "--num-epochs",
                "2",
                "--results-fp",
                str(tmp_path / f"out{i}.json"),
            ),
            tmp_path / f"flow{i}.log",
        )
        for i in range(2)
    ]
    try:
        codes = [flow.wait(timeout=500) for flow in flows]
    finally:
        for flow in flows:
            if flow.poll() is None:
                os.killpg(flow.pid, signal.SIGKILL)
    logs = [(tmp_path / f"flow{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], "\n\n".join(log[-3000:] for log in logs)
    assert not any("database is locked" in log for log in logs)
    summaries = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("shared").experiment_id])
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    assert {t["run_id"] for s in summaries for t in s["trials"]} == {r.info.run_id for r in runs}
