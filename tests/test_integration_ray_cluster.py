"""Integration: scale-out. With RAY_ADDRESS set, the tuning flow runs its trials on that cluster.

A head node is started here the way a user starts one (`ray start --head`), and
`python -m flows.tune` runs in a subprocess whose only Ray setting is RAY_ADDRESS.

How the test knows the trials ran in that cluster and not in a Ray instance the driver started
for itself: Ray writes every process's log into the session folder of the cluster the process
belongs to, named after its job id and pid. In our head's session folder,
`python-core-driver-<job id>..._<driver pid>.log` shows that this cluster admitted our subprocess
as job <job id>; and for the pid of each trial (which Tune records in the trial's result.json),
`worker-<worker id>-<job id>-<pid>.out` shows that the trial ran in a worker process that this
cluster's raylet started for that job. A driver with a local instance of its own writes both to
another session folder (/tmp/ray/...), so the check cannot pass by accident.

The head is not stopped with `ray stop`: that kills every Ray process on the machine, other test
sessions' included. It runs with --block in a session of its own, and stopping that session (with
its worker processes) stops this cluster and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import pytest

from conftest import tiny_settings
from processes import free_port, running, tail
from tune_runs import tune_command

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RAY = Path(sys.executable).with_name("ray")
HEAD_START_S, TUNE_RUN_S = 180, 600


@pytest.fixture(scope="module")
def ray_head():
    """A one-node Ray cluster (2 CPUs, GCS on a free port); yields its address and temp folder."""
    with ray_cluster() as head:
        yield head


@contextlib.contextmanager
def ray_cluster(extra_env: Optional[dict] = None, num_cpus: int = 2):
    """`ray start --head` in a session of its own; `extra_env` reaches its workers (e.g. the AWS
    variables, as a user sets them on every node, or RAY_AUTH_MODE=token and its token). Yields its
    address and temp folder."""
    # Short on purpose: Ray puts unix sockets under it, and socket paths are limited to 107 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    log_path = temp_dir / "head.log"
    address = f"127.0.0.1:{free_port()}"
    args = [
        RAY,
        "start",
        "--head",
        "--block",
        "--port",
        address.split(":")[1],
        "--num-cpus",
        str(num_cpus),
        "--num-gpus",
        "0",
        "--object-store-memory",
        str(200 * 1024**2),
        "--temp-dir",
        temp_dir,
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    # Token authentication off unless `extra_env` turns it on, as on the driver below (with it on, a
    # driver needs RAY_AUTH_MODE=token and the token).
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    env.pop("RAY_ADDRESS", None)
    try:
        # Ray drains for up to 30 s on SIGTERM; nothing here needs draining.
        with running(args, log_path, env, cwd=temp_dir, grace_s=3) as head:
            deadline = time.monotonic() + HEAD_START_S
            while "Ray runtime started" not in log_path.read_text(errors="replace"):
                if head.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ray start --head did not start (exit code {head.poll()})\n{tail(log_path)}")
                time.sleep(1)
            yield address, temp_dir
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_tuning_flow_runs_its_trials_on_the_cluster_in_ray_address(ray_head, tiny_backbone, tmp_path):
    address, temp_dir = ray_head
    settings = tiny_settings(tmp_path, tiny_backbone)
    env = dict(
        os.environ,
        RAY_ADDRESS=address,
        RAY_AUTH_MODE="disabled",
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="INFO",
        # The flow's temporary Prefect server migrates a fresh database first: slow on a busy box.
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300",
        PYTHONUNBUFFERED="1",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    log_path = tmp_path / "driver.log"
    with running(tune_command(settings=settings), log_path, env) as driver:
        try:
            driver.wait(timeout=TUNE_RUN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"python -m flows.tune still running after {TUNE_RUN_S}s\n{tail(log_path)}")
    assert driver.returncode == 0, tail(log_path, 120)
    summary = json.loads(Path(settings.results_fp).read_text())
    assert len(summary["trials"]) == 2 and all(trial["run_id"] for trial in summary["trials"])

    logs = temp_dir / "session_latest" / "logs"
    driver_logs = sorted(logs.glob(f"python-core-driver-*_{driver.pid}.log"))
    assert driver_logs, (
        f"the cluster at {address} has no driver log for pid {driver.pid}: the flow did not join it\n"
        f"{sorted(p.name for p in logs.glob('python-core-driver-*'))}\n{tail(log_path)}"
    )
    job_id = driver_logs[0].name.removeprefix("python-core-driver-")[:8]  # a JobID is 4 bytes

    results = sorted(Path(settings.storage_path).glob("*/*/result.json"))
    assert len(results) == 2, results
    trial_pids = {json.loads(line)["pid"] for path in results for line in path.read_text().splitlines() if line}
    for pid in trial_pids:
        assert list(logs.glob(f"worker-*-{job_id}-{pid}.out")), (
            f"trial process {pid} is not a worker of job {job_id} on the cluster at {address}: "
            f"{sorted(p.name for p in logs.glob('worker-*.out'))}"
        )


def test_without_ray_address_the_flow_starts_its_own_ray_next_to_a_cluster(ray_head):
    """`ray start` records its address where a bare `ray.init()` looks first; the flow must not
    join that cluster by accident (it failed there: object_store_memory is not allowed when
    joining). Only RAY_ADDRESS joins a cluster."""
    address, temp_dir = ray_head
    recorded = temp_dir / "ray_current_cluster"
    assert recorded.is_file(), sorted(p.name for p in temp_dir.iterdir())
    # RAY_TMPDIR points the lookup at a copy of the record, not at the machine's /tmp/ray.
    ray_tmpdir = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))
    try:
        (ray_tmpdir / "ray").mkdir()
        (ray_tmpdir / "ray" / "ray_current_cluster").write_text(recorded.read_text())
        env = dict(os.environ, RAY_TMPDIR=str(ray_tmpdir), RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
        env.pop("RAY_ADDRESS", None)
        script = (
            "import ray\n"
            "from tagifai.tuning.study import connect_ray\n"
            "started = connect_ray()\n"
            "print('RESULT', started, ray.get_runtime_context().gcs_address)\n"
            "ray.shutdown()\n"
        )
        log_path = ray_tmpdir / "driver.log"
        with running([sys.executable, "-c", script], log_path, env, grace_s=3) as driver:
            driver.wait(timeout=HEAD_START_S)
        assert driver.returncode == 0, tail(log_path)
        [result] = [line.split()[1:] for line in log_path.read_text().splitlines() if line.startswith("RESULT ")]
        started, gcs_address = result
        assert started == "True" and gcs_address.rsplit(":", 1)[1] != address.rsplit(":", 1)[1], result
    finally:
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
