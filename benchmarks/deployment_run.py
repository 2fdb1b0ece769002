"""Benchmark: the defaults as a Prefect deployment run through a process worker, beside the same
study from `python -m flows.tune`, in one process run (issue 23: the fixed cost of both paths).

    python -m benchmarks.deployment_run                      # sample data, 4 trials x 4 epochs
    python -m benchmarks.deployment_run --out deployment_run.json

The deployment side is a new user's set-up from the README: `prefect server start`, a process work
pool, `prefect --no-prompt deploy --all` from the repository root (prefect.yaml) and `prefect
worker start` from this virtualenv; the server and the worker are up before the clock starts, as
they are for a scheduled run. The run is created through Prefect's API with the settings the CLI
gets (its own MLflow store and study folder, warm as in benchmarks/cli_run.py), then polled.

Measured from the moment the run is created: the worker's pick-up (it polls every
PREFECT_WORKER_QUERY_SECONDS, set to 1 here; Prefect's default is 10, a wait a user adds on top),
the flow run's start and end as Prefect records them, and the study's wall from MLflow's epoch
records. Fixed cost = end - created - study, the CLI's definition with the run's creation as its
start. The flow-run process's own exit after its Completed state is not on the user's path and is
not counted. Every server and worker started here is stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from benchmarks import cli_run
from benchmarks.run import prefect_server
from tagifai.settings import DEFAULT_BACKBONE

ROOT = Path(__file__).resolve().parent.parent
POOL = "local-process"  # prefect.yaml's work pool
DEPLOYMENT = "tune-classifier/tune-classifier"
EXPERIMENT = "benchmark"


def prefect_command(*arguments: str, env: dict) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "prefect", *arguments], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if done.returncode != 0:
        raise RuntimeError(f"prefect {' '.join(arguments)} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout


@contextlib.contextmanager
def worker(env: dict, log_path: Path):
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def study_span(trials: list[dict]) -> tuple[float, float]:
    """(first epoch's start, last epoch's end), as epoch time stamps, from MLflow's records."""
    epochs = [epoch for trial in trials for epoch in trial["epochs"]]
    if not epochs:
        raise RuntimeError("no epoch was recorded in MLflow")
    return min(e["end"] - e["epoch_time_s"] for e in epochs), max(e["end"] for e in epochs)


def deployment_run(workdir: Path, num_runs: int, num_epochs: int, timeout_s: float = 900) -> dict:
    from prefect.client.orchestration import SyncPrefectClient

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "mlruns").mkdir(exist_ok=True)
    env = cli_run.child_env(workdir)
    warm_s = cli_run.warm_stores(workdir, env, EXPERIMENT, DEFAULT_BACKBONE)
    settings = {
        "experiment_name": EXPERIMENT,
        "num_runs": num_runs,
        "num_epochs": num_epochs,
        "tracking_uri": cli_run.tracking_uri(workdir),
        "storage_path": str(workdir / "ray_results"),
        "results_fp": str(workdir / "summary.json"),
    }
    with prefect_server(env, workdir / "prefect-server.log") as api_url:
        env = dict(env, PREFECT_API_URL=api_url, PREFECT_WORKER_QUERY_SECONDS="1", PWD=str(ROOT))
        prefect_command("work-pool", "create", POOL, "--type", "process", env=env)
        prefect_command("--no-prompt", "deploy", "--all", env=env)
        with worker(env, workdir / "worker.log") as process, SyncPrefectClient(api_url) as client:
            deployment = client.read_deployment_by_name(DEPLOYMENT)
            baseline, baseline_runs = cli_run.import_baseline_s(env, workdir)
            created = time.time()
            flow_run = client.create_flow_run_from_deployment(deployment.id, parameters={"settings": settings})
            picked_up: Optional[float] = None
            deadline = time.monotonic() + timeout_s
            while True:
                flow_run = client.read_flow_run(flow_run.id)
                if picked_up is None and flow_run.state_name not in ("Scheduled", "Late"):
                    picked_up = time.time()  # Pending: the worker has taken it and starts its process
                if flow_run.state is not None and flow_run.state.is_final():
                    break
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the deployment run is {flow_run.state_name}; see {workdir / 'worker.log'}")
                time.sleep(0.2)
    if not flow_run.state.is_completed():
        raise RuntimeError(f"the deployment run ended {flow_run.state_name}; see {workdir / 'worker.log'}")
    trials = cli_run.mlflow_trials(settings["tracking_uri"], EXPERIMENT)
    first_epoch_start, last_epoch_end = study_span(trials)
    ended = flow_run.end_time.timestamp()
    study_s = last_epoch_end - first_epoch_start
    summary = json.loads((workdir / "summary.json").read_text())
    return {
        "wall_s": ended - created,
        "study_s": study_s,
        "fixed_cost_s": ended - created - study_s,
        "fixed_cost_over_import_baseline": (ended - created - study_s) / baseline,
        "import_baseline_s": baseline,
        "import_baseline_runs_s": baseline_runs,
        "pick_up_s": (picked_up or created) - created,
        "created_to_flow_start_s": flow_run.start_time.timestamp() - created,
        "flow_start_to_first_epoch_s": first_epoch_start - flow_run.start_time.timestamp(),
        "last_epoch_to_flow_end_s": ended - last_epoch_end,
        "epochs_run": sum(len(t["epochs"]) for t in trials),
        "test_f1": summary["test"]["f1"],
        "worker_query_seconds": 1,
        "warm_up_s": warm_s,
    }


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.deployment_run", description=__doc__.split("\n")[0])
    parser.add_argument("--num-runs", type=int, default=4)
    parser.add_argument("--num-epochs", type=int, default=4)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None)
    options = parser.parse_args(argv)
    workdir = Path(options.workdir or tempfile.mkdtemp(prefix="tagifai-deployment-run-")).resolve()
    print("deployment run through a process worker ...", flush=True)
    deployed = deployment_run(workdir / "deployment", options.num_runs, options.num_epochs)
    print("the same study from the command line ...", flush=True)
    command_line, _ = cli_run.run_cli(workdir / "cli", options.num_runs, options.num_epochs)
    keys = ("wall_s", "study_s", "fixed_cost_s", "import_baseline_s", "fixed_cost_over_import_baseline", "test_f1")
    result = {
        "deployment": deployed,
        "cli": {key: command_line.get(key) for key in keys}
        | {"before_first_epoch_s": command_line.get("before_first_epoch_s")},
    }
    cli_run.print_and_save(result, options.out, long_key="")
    return result


if __name__ == "__main__":
    main()
