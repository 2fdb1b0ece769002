"""Integration: the whole scaled-out stack on loopback, as docs/scaling.md tells a user to run it.

- a `ray start --head` cluster whose workers get the AWS variables (as every node would);
- an S3 server (SeaweedFS) holding Ray Tune's state and checkpoints (`--storage-path s3://...`)
  and MLflow's artifacts (`mlflow server --artifacts-destination s3://...`);
- `mlflow server --backend-store-uri postgresql://...` on a real PostgreSQL;
- `python -m flows.tune` with RAY_ADDRESS, `python -m demo.app`, `flows.evaluate`, `flows.predict`.

The first test checks what lands where: checkpoint objects in the bucket, runs and the registered
version in PostgreSQL's tables, the champion served by the demo, and no secret in the results.
The second SIGKILLs a flow mid-tuning and reruns the same command: it waits out the dead flow's
lease, resumes the experiment from S3 and does not run a finished trial again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_integration_prefect import wait_healthy
from test_integration_ray_cluster import ray_cluster

from processes import REPO, free_port, running, tail
from tagifai.lifecycle import tracking
from tagifai.tuning.lease import TTL_ENV
from tune_runs import runs_by_trial, tune_command

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MLFLOW = Path(sys.executable).with_name("mlflow")
LEASE_TTL_S = 6
TUNE_RUN_S = 600


@pytest.fixture(scope="module")
def stack(s3_server, postgres_server, tmp_path_factory):
    """Bucket, MLflow server on PostgreSQL with S3 artifacts, Ray head: the flow's environment."""
    root = tmp_path_factory.mktemp("scale-out")
    bucket = s3_server.create_bucket("tagifai-scale-out")
    database = postgres_server.create_database("mlflow_scale_out")
    port = free_port()
    server_env = dict(os.environ, **s3_server.env, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", PYTHONUNBUFFERED="1")
    server_env.pop("MLFLOW_TRACKING_URI", None)
    args = [MLFLOW, "server", "--host", "127.0.0.1", "--port", port, "--workers", "1"]
    args += ["--backend-store-uri", database, "--artifacts-destination", f"s3://{bucket}/mlflow"]
    with running(args, root / "mlflow-server.log", server_env, root) as server:
        wait_healthy(f"http://127.0.0.1:{port}/health", server, root / "mlflow-server.log")
        with ray_cluster(extra_env=s3_server.env) as (address, _):
            env = dict(
                os.environ,
                **s3_server.env,
                RAY_ADDRESS=address,
                RAY_AUTH_MODE="disabled",
                PREFECT_HOME=str(root / "prefect-home"),
                PREFECT_SERVER_ANALYTICS_ENABLED="false",
                PREFECT_LOGGING_LEVEL="INFO",
                PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300",
                PYTHONPATH=str(REPO),
                PYTHONUNBUFFERED="1",
                **{TTL_ENV: str(LEASE_TTL_S)},
            )
            env.pop("MLFLOW_TRACKING_URI", None)
            yield {"root": root, "bucket": bucket, "tracking_uri": f"http://127.0.0.1:{port}", "env": env}


def scaled_command(stack: dict, backbone: Path, experiment: str, *extra: str) -> list[str]:
    return tune_command(
        "--model", backbone, "--experiment-name", experiment,
        "--registered-model-name", experiment, "--tracking-uri", stack["tracking_uri"],
        "--storage-path", f"s3://{stack['bucket']}/ray_results", "--batch-size", "8",
        # Every layer (a random backbone learns nothing frozen); promoted whatever its quality: the
        # gate is tested in test_lifecycle, this test checks where the champion is stored.
        "--trainable-layers", "all", "--force-promote", *extra,
    )  # fmt: skip


def run_to_end(command: list[str], env: dict, log: Path, timeout_s: float = TUNE_RUN_S) -> None:
    with running(command, log, env) as flow:
        try:
            flow.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{command[:3]} still running after {timeout_s}s\n{tail(log)}")
    assert flow.returncode == 0, tail(log, 120)


def test_flow_tracks_into_postgresql_keeps_checkpoints_in_s3_and_the_demo_serves_the_champion(
    stack, s3_server, postgres_server, tiny_backbone, tmp_path
):
    results = tmp_path / "results.json"
    command = scaled_command(stack, tiny_backbone, "scaled", "--num-runs", "2", "--num-epochs", "2")
    run_to_end(command + ["--results-fp", str(results)], stack["env"], tmp_path / "flow.log")
    summary = json.loads(results.read_text())
    trials = summary["trials"]
    assert len(trials) == 2 and all(t["run_id"] for t in trials)
    assert summary["ray_experiment_dir"].startswith(f"s3://{stack['bucket']}/ray_results/scaled-")

    # Ray Tune's state and each trial's best checkpoint are objects in the bucket.
    keys = s3_server.keys(stack["bucket"])
    folder = summary["ray_experiment_dir"].removeprefix(f"s3://{stack['bucket']}/")
    for trial in trials:
        weights = [k for k in keys if k.startswith(f"{folder}/trial_records/{trial['trial_id']}/checkpoint-")]
        assert [k for k in weights if k.endswith("/model.safetensors")], (trial["trial_id"], weights)
    assert f"{folder}/tuning_complete.json" in keys and any(k.startswith(f"{folder}/experiment_state") for k in keys)
    # The local copies of the trials' checkpoints (for MLflow and the evaluation) are gone; Ray's log stays.
    study = Path(os.environ["XDG_CACHE_HOME"]) / "tagifai" / "studies" / folder.rsplit("/", 1)[1]
    assert (study / "ray.log").is_file() and not (study / "checkpoints").exists(), sorted(study.rglob("*"))
    # MLflow's artifacts went through the server into the bucket.
    best_checkpoint = [k for k in keys if k.startswith("mlflow/") and summary["run_id"] in k and "checkpoint/" in k]
    assert any(k.endswith("model.safetensors") for k in best_checkpoint), best_checkpoint

    # Runs and the registered version are rows of PostgreSQL's tables.
    rows = postgres_server.query(
        "mlflow_scale_out",
        "SELECT r.run_uuid, r.status FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id "
        "WHERE e.name = %s",
        "scaled",
    )
    assert sorted(rows) == sorted((t["run_id"], "FINISHED") for t in trials)
    versions = postgres_server.query(
        "mlflow_scale_out", "SELECT version, run_id FROM model_versions WHERE name = %s", "scaled"
    )
    assert versions == [(int(summary["model_version"]), summary["run_id"])]
    assert postgres_server.query(
        "mlflow_scale_out", "SELECT alias, version FROM registered_model_aliases WHERE name = %s", "scaled"
    ) == [(tracking.CHAMPION_ALIAS, int(summary["model_version"]))]

    # No secret in the results or the flow's output, and none of MLflow's per-run URL lines.
    output = results.read_text() + (tmp_path / "flow.log").read_text()
    assert "View run" not in output
    assert s3_server.secret_key not in output and postgres_server.password not in output

    # predict and evaluate read the run back from the server (and its checkpoint from S3, through it).
    env = stack["env"]
    predicted = subprocess.run(
        [sys.executable, "-m", "flows.predict", "--tracking-uri", stack["tracking_uri"], "--experiment-name", "scaled",
         "--title", "Transformers for text", "--description", "fine-tuning language models", "--json"],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert json.loads(predicted.stdout)["run_id"] == summary["run_id"]
    from tagifai.data import sample_dataset_path

    evaluated = subprocess.run(
        [sys.executable, "-m", "flows.evaluate", "--tracking-uri", stack["tracking_uri"], "--run-id",
         summary["run_id"], "--dataset-loc", str(sample_dataset_path())],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]

    # The demo serves the registered champion, read back from the server.
    port = free_port()
    demo_args = [sys.executable, "-m", "demo.app", "--tracking-uri", stack["tracking_uri"], "--port", port]
    demo_args += ["--model-name", "scaled", "--experiment-name", "scaled"]
    demo_log = tmp_path / "demo.log"
    with running(demo_args, demo_log, dict(env, NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")) as demo:
        deadline = time.monotonic() + 180
        while "Running on" not in demo_log.read_text() and "serving run" not in demo_log.read_text():
            assert demo.poll() is None and time.monotonic() < deadline, tail(demo_log)
            time.sleep(0.5)
        wait_healthy(f"http://127.0.0.1:{port}/", demo, demo_log)
        assert f"serving run {summary['run_id']} (registered model 'scaled', alias 'champion')" in demo_log.read_text()
        from gradio_client import Client

        probabilities = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            "Transformers for text", "fine-tuning language models", api_name="/predict"
        )
        assert probabilities["label"] in {c["label"] for c in probabilities["confidences"]}


def test_a_flow_killed_mid_tuning_resumes_from_s3_without_rerunning_finished_trials(stack, tiny_backbone, tmp_path):
    results = tmp_path / "results.json"
    command = scaled_command(
        stack, tiny_backbone, "killed", "--num-runs", "3", "--max-concurrent", "1", "--num-epochs", "4",
        "--grace-period", "4", "--batch-size", "4", "--results-fp", str(results),
    )  # fmt: skip
    client = MlflowClient(stack["tracking_uri"])
    with running(command, tmp_path / "first.log", stack["env"]) as first:
        deadline = time.monotonic() + TUNE_RUN_S
        finished = []
        while not finished and time.monotonic() < deadline and first.poll() is None:
            experiment = client.get_experiment_by_name("killed")
            if experiment:
                finished = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
            time.sleep(0.5)
        assert finished, "no trial finished before the deadline\n" + tail(tmp_path / "first.log")
        assert first.poll() is None, "the flow ended before it could be killed"
        os.killpg(first.pid, signal.SIGKILL)  # the driver and its temporary Prefect server, at once
    finished_trial = finished[0].data.tags[tracking.TAG_TRIAL]

    run_to_end(command, stack["env"], tmp_path / "second.log")
    log = (tmp_path / "second.log").read_text()
    assert f"waiting up to {LEASE_TTL_S} s for its heartbeat" in log  # the dead flow's lease, taken back
    assert "resumed the interrupted Ray Tune experiment" in log
    summary = json.loads(results.read_text())
    assert summary["resumed"] is True
    assert summary["ray_experiment_dir"].endswith("-1")  # the killed flow's folder, not a new one
    trial_ids = [t["trial_id"] for t in summary["trials"]]
    assert len(trial_ids) == 3 == len(set(trial_ids))
    grouped = runs_by_trial(client, "killed")
    assert len(grouped[finished_trial]) == 1  # the finished trial was not run again
    assert "RUNNING" not in [run.info.status for attempts in grouped.values() for run in attempts]
    assert all(t["status"] == "completed" and t["epochs"] == 4 for t in summary["trials"])
