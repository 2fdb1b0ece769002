"""Integration: data-parallel trials (--num-workers 2) on a two-node Ray cluster, on loopback.

Two `ray start --block` processes with 1 CPU each (a head and a worker node) make a real
two-node cluster, with token authentication on as Ray 2.60 sets it up for `ray start`
(RAY_AUTH_MODE=token; the token is handed to every process in RAY_AUTH_TOKEN rather than written
to ~/.ray/auth_token, so no other Ray on this machine is affected). A trial of 2 workers x 1 CPU
fits only with one worker on each node. The cluster is started once for the module and stopped by
its processes' ids, never with `ray stop`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_integration_ray_cluster import HEAD_START_S, RAY, TUNE_RUN_S, ray_cluster

from conftest import tiny_settings
from processes import running, tail
from tune_runs import tune_command

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def alive_nodes(address: str, env: dict) -> int:
    code = f"import ray; ray.init(address={address!r}); print('NODES', sum(n['Alive'] for n in ray.nodes()))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stdout.splitlines() if line.startswith("NODES ")]
    return int(lines[0].split()[1]) if lines else 0


@contextlib.contextmanager
def worker_node(address: str, env: dict, log_path: Path):
    """`ray start --address` joining the head as a second node with 1 CPU."""
    args = [RAY, "start", "--block", "--address", address, "--num-cpus", "1", "--num-gpus", "0"]
    args += ["--object-store-memory", str(100 * 1024**2), "--disable-usage-stats"]
    with running(args, log_path, env, cwd=log_path.parent, grace_s=3) as node:
        yield node


@pytest.fixture(scope="module")
def two_nodes():
    """Address, temp folder and client environment of a 2-node, 1-CPU-each cluster with token auth."""
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    with ray_cluster(extra_env=auth, num_cpus=1) as (address, temp_dir):
        env = {**os.environ, **auth, "PYTHONUNBUFFERED": "1"}
        env.pop("RAY_ADDRESS", None)
        with worker_node(address, env, temp_dir / "worker-node.log") as node:
            deadline = time.monotonic() + HEAD_START_S
            while alive_nodes(address, env) < 2:
                if node.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the worker node did not join {address}\n{tail(temp_dir / 'worker-node.log')}")
                time.sleep(2)
            yield address, temp_dir, env


def run_flow(settings, address: str, env: dict, log_path: Path, timeout_s: float) -> tuple[int, float]:
    """`python -m flows.tune` with RAY_ADDRESS set; (exit code, seconds it ran)."""
    env = dict(
        env,
        RAY_ADDRESS=address,
        PREFECT_HOME=str(log_path.parent / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="INFO",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.monotonic()
    with running(tune_command(settings=settings), log_path, env) as driver:
        try:
            driver.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"python -m flows.tune still running after {timeout_s}s\n{tail(log_path)}")
    return driver.returncode, time.monotonic() - started


def logged_at(log: str, marker: str) -> float:
    """Seconds since midnight of the first Prefect log line (HH:MM:SS.fff | ...) containing `marker`."""
    line = next(line for line in log.splitlines() if marker in line and line[:2].isdigit())
    hours, minutes, seconds = line.split(" | ", 1)[0].split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def test_two_worker_trials_span_the_two_nodes_and_a_champion_is_registered(two_nodes, tiny_backbone, tmp_path):
    address, _, env = two_nodes
    settings = tiny_settings(
        tmp_path, tiny_backbone, num_workers=2, cpu_per_worker=1, max_concurrent=1, num_runs=2, num_epochs=2,
        force_promote=True,  # the random tiny model may not pass the gate; the gate is tested elsewhere
    )  # fmt: skip
    log_path = tmp_path / "driver.log"
    code, _ = run_flow(settings, address, env, log_path, TUNE_RUN_S)
    assert code == 0, tail(log_path, 120)

    summary = json.loads(Path(settings.results_fp).read_text())
    trials = summary["trials"]
    assert len(trials) == 2 and {t["status"] for t in trials} <= {"completed", "pruned"}, trials  # ASHA may prune
    assert all(t["run_id"] and t["attempts"] == 1 for t in trials), trials
    client = MlflowClient(settings.tracking_uri)
    experiment = client.get_experiment_by_name(settings.experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2, [run.info.run_id for run in runs]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.params["num_workers"] == "2" and run.data.params["world_size"] == "2", run.data.params
        epochs = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert epochs in ([1], [1, 2]), epochs
    champion = client.get_model_version_by_alias(settings.registered_model_name, "champion")
    assert champion.run_id == summary["run_id"]
    log = log_path.read_text()
    assert "epoch 2/2" in log  # the live progress lines


def test_a_study_that_cannot_fit_is_refused_in_one_line_before_any_trial(two_nodes, tiny_backbone, tmp_path):
    address, _, env = two_nodes
    settings = tiny_settings(tmp_path, tiny_backbone, num_workers=3, cpu_per_worker=1, max_concurrent=1)
    log_path = tmp_path / "driver.log"
    code, seconds = run_flow(settings, address, env, log_path, 300)
    log = log_path.read_text()
    assert code != 0, tail(log_path)
    refusals = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(refusals) == 1 and "3 workers x 1 CPU" in refusals[0] and "2 CPU" in refusals[0], tail(log_path)
    assert "Traceback" not in log, tail(log_path)
    # Within seconds of the study's start (before it: Prefect's temporary server and the data, tens
    # of seconds on a busy 2-core machine whatever the settings), and not retried.
    study_start, refused = (logged_at(log, marker) for marker in (" - tuning: ", "ResourceError("))
    print(f"refused {refused - study_start:.1f} s after the study started, {seconds:.1f} s after launch")
    assert refused - study_start < 10, (study_start, refused)
    task_failures = [line for line in log.splitlines() if "tune-hyperparameters" in line and "ResourceError" in line]
    assert len(task_failures) == 1, task_failures  # the task's retry is skipped: it would refuse again
    client = MlflowClient(settings.tracking_uri)
    experiment = client.get_experiment_by_name(settings.experiment_name)
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    assert not [run for run in runs if run.info.status == "RUNNING"]
    assert not runs  # no trial started
