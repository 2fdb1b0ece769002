"""Integration: prefect.yaml's deployments on a real Prefect server, worker and MLflow server.

What the README's "Run on a Prefect server" section tells a user to do, from the repository root:
start `prefect server` and `mlflow server`, create the process work pool, `prefect deploy --all`,
start a worker, `prefect deployment run` the tuning flow (tiny settings that track into the MLflow
server over HTTP), then evaluate the best run through the second deployment and load it back with
`tagifai.serving.loader.load_model`. One tuning run (about a minute on 2 idle cores) serves every test here.

Every process started here runs in a session of its own and is stopped, with everything it
started (the worker's flow runs, their local Ray), by the fixture that started it, also on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import tiny_settings
from processes import REPO, free_port, running, tail

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PREFECT = Path(sys.executable).with_name("prefect")
MLFLOW = Path(sys.executable).with_name("mlflow")
POOL = "local-process"  # the work pool named in prefect.yaml
TUNE, EVALUATE = "tune-classifier/tune-classifier", "evaluate-classifier/evaluate-classifier"
# Generous for a shared, loaded 2-core machine; each bound fails the test with the logs.
SERVER_START_S, CLI_S, TUNE_RUN_S, EVALUATE_RUN_S = 240, 300, 600, 300


def wait_healthy(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float = SERVER_START_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args[:3]} exited with {process.returncode}\n{tail(log_path)}")
        with contextlib.suppress(urllib.error.URLError, OSError):
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        time.sleep(1)
    pytest.fail(f"{url} not healthy after {timeout_s}s\n{tail(log_path)}")


def run_cli(args: list, env: dict, timeout_s: float = CLI_S) -> str:
    result = subprocess.run(
        [str(arg) for arg in args],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{output[-4000:]}"
    return output


# --- the stack: MLflow server, Prefect server, work pool, worker, deployments -----------------


@dataclass
class Stack:
    api_url: str
    mlflow_url: str
    artifacts_dir: Path
    env: dict
    worker: subprocess.Popen
    worker_log: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefect-stack")
    prefect_port, mlflow_port = free_port(), free_port()
    api_url, mlflow_url = f"http://127.0.0.1:{prefect_port}/api", f"http://127.0.0.1:{mlflow_port}"
    env = dict(
        os.environ,
        PREFECT_HOME=str(root / "prefect-home"),
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_LOGGING_LEVEL="INFO",
        PREFECT_WORKER_QUERY_SECONDS="2",
        PREFECT_CLI_WRAP_LINES="false",
        COLUMNS="200",
        PWD=str(REPO),  # what a shell sets after `cd repo`; prefect.yaml's pull step reads it
        PYTHONUNBUFFERED="1",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    # The server's job runner (a dozen huey processes for GenAI jobs) is not needed here.
    mlflow_env = dict(env, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    artifacts_dir = root / "mlflow-artifacts"
    mlflow_args = [
        MLFLOW,
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        mlflow_port,
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        artifacts_dir,
    ]
    prefect_args = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", prefect_port]
    with contextlib.ExitStack() as processes:  # stopped in reverse: worker, Prefect, MLflow
        mlflow_server = processes.enter_context(running(mlflow_args, root / "mlflow-server.log", mlflow_env, root))
        prefect_server = processes.enter_context(running(prefect_args, root / "prefect-server.log", env, root))
        wait_healthy(mlflow_url + "/health", mlflow_server, root / "mlflow-server.log")
        wait_healthy(api_url + "/health", prefect_server, root / "prefect-server.log")
        run_cli([PREFECT, "work-pool", "create", POOL, "--type", "process"], env)
        worker_log = root / "worker.log"
        worker = processes.enter_context(running([PREFECT, "worker", "start", "--pool", POOL], worker_log, env, root))
        run_cli([PREFECT, "--no-prompt", "deploy", "--all"], env)
        yield Stack(api_url, mlflow_url, artifacts_dir, env, worker, worker_log)


def run_deployment(stack: Stack, name: str, settings: dict, timeout_s: float):
    """`prefect deployment run NAME --param settings=JSON`, then wait for the run to end."""
    from prefect.client.orchestration import SyncPrefectClient

    output = run_cli([PREFECT, "deployment", "run", name, "--param", "settings=" + json.dumps(settings)], stack.env)
    found = re.search(r"UUID: ([0-9a-f-]{36})", output)
    assert found, f"no flow run id in the output of prefect deployment run:\n{output}"
    flow_run_id = uuid.UUID(found.group(1))
    deadline = time.monotonic() + timeout_s
    with SyncPrefectClient(stack.api_url) as client:
        while True:
            flow_run = client.read_flow_run(flow_run_id)
            if flow_run.state is not None and flow_run.state.is_final():
                break
            if stack.worker.poll() is not None:
                pytest.fail(f"the worker exited with {stack.worker.returncode}\n{tail(stack.worker_log)}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{name} run {flow_run_id} still {flow_run.state_name} after {timeout_s}s\n{tail(stack.worker_log)}"
                )
            time.sleep(3)
    assert flow_run.state.is_completed(), f"{name} ended {flow_run.state_name}\n{tail(stack.worker_log, 120)}"
    return flow_run


@pytest.fixture(scope="module")
def tuning_run(stack, tiny_backbone, tmp_path_factory):
    """One run of the tuning deployment with tiny settings, tracked in the MLflow server."""
    workdir = tmp_path_factory.mktemp("deployed-tuning")
    settings = tiny_settings(
        workdir, tiny_backbone, tracking_uri=stack.mlflow_url, force_promote=True
    )  # gate: test_lifecycle
    flow_run = run_deployment(stack, TUNE, settings.model_dump(mode="json", exclude_unset=True), TUNE_RUN_S)
    return flow_run, json.loads(Path(settings.results_fp).read_text())


# --- the tests ---------------------------------------------------------------------------------


def test_deploy_all_creates_the_deployments_of_prefect_yaml(stack):
    import yaml
    from prefect.client.orchestration import SyncPrefectClient

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    with SyncPrefectClient(stack.api_url) as client:
        deployed = {deployment.name: deployment for deployment in client.read_deployments()}
    assert sorted(deployed) == sorted(entry["name"] for entry in spec["deployments"])
    for entry in spec["deployments"]:
        deployment = deployed[entry["name"]]
        assert deployment.entrypoint == entry["entrypoint"] and deployment.work_pool_name == POOL
        assert deployment.parameters == (entry.get("parameters") or {})
        # {{ $PWD }} was filled in at deploy time with the folder `prefect deploy` ran in.
        assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    schedules = deployed["tune-classifier"].schedules
    assert schedules and not any(schedule.active for schedule in schedules)  # present, switched off


def test_tuning_deployment_run_publishes_artifacts_and_summary(stack, tuning_run):
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    flow_run, summary = tuning_run
    with SyncPrefectClient(stack.api_url) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
        )
    by_key = {artifact.key: artifact for artifact in artifacts}
    assert {"tuning-trials", "best-run"} <= set(by_key), sorted(by_key)
    assert by_key["tuning-trials"].type == "table" and by_key["best-run"].type == "markdown"
    rows = json.loads(by_key["tuning-trials"].data)
    assert sorted(row["run_id"] for row in rows) == sorted(trial["run_id"] for trial in summary["trials"])
    assert summary["run_id"] in by_key["best-run"].data

    assert summary["tracking_uri"] == stack.mlflow_url
    assert len(summary["trials"]) == 2 and all(trial["run_id"] for trial in summary["trials"])
    assert 0.0 <= summary["test"]["f1"] <= 1.0 and summary["model_version"] == "1"


def test_trials_and_checkpoints_are_served_by_the_mlflow_server(stack, tuning_run):
    from mlflow.tracking import MlflowClient

    from tagifai.lifecycle.tracking import best_run_id
    from tagifai.serving.loader import load_model

    _, summary = tuning_run
    client = MlflowClient(stack.mlflow_url)
    experiment = client.get_experiment_by_name(summary["experiment_name"])
    runs = {run.info.run_id: run for run in client.search_runs([experiment.experiment_id])}
    assert {trial["run_id"] for trial in summary["trials"]} <= set(runs)
    best = runs[summary["run_id"]]
    # Proxied artifact storage: the client uploaded over HTTP, the server wrote to its destination.
    assert best.info.artifact_uri.startswith("mlflow-artifacts:"), best.info.artifact_uri
    stored = stack.artifacts_dir / experiment.experiment_id / best.info.run_id / "artifacts" / "checkpoint"
    assert (stored / "model.safetensors").is_file(), sorted(stack.artifacts_dir.rglob("*"))
    assert client.get_model_version_by_alias(summary["registered_model"], "champion").run_id == best.info.run_id

    run_id = best_run_id(client, summary["experiment_name"])
    assert run_id == summary["run_id"]  # the experiment's best run, found and its MLflow Model downloaded over HTTP
    predictor = load_model(stack.mlflow_url, f"runs:/{run_id}")
    assert predictor.is_mlflow_model
    [prediction] = predictor.predict(["Transformers for text"], ["Fine-tuning BERT to classify sentences."])
    assert prediction["prediction"] in predictor.classes
    assert abs(sum(prediction["probabilities"].values()) - 1.0) < 1e-4


def test_evaluate_deployment_scores_the_best_run_from_the_mlflow_server(stack, tuning_run, tmp_path):
    _, summary = tuning_run
    results_fp = tmp_path / "evaluation.json"
    settings = {
        "run_id": summary["run_id"],
        # Relative on purpose: it resolves only if the pull step moved the run into the repository.
        "dataset_loc": "tagifai/sample_projects.csv",
        "tracking_uri": stack.mlflow_url,
        "results_fp": str(results_fp),
    }
    run_deployment(stack, EVALUATE, settings, EVALUATE_RUN_S)
    result = json.loads(results_fp.read_text())
    assert result["run_id"] == summary["run_id"]
    assert result["test"]["num_samples"] > 0 and 0.0 <= result["test"]["f1"] <= 1.0
