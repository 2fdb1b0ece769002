"""How busy the cores are during a whole `python -m flows.tune` run, measured from outside.

    python -m benchmarks.cli_run --num-runs 4 --num-epochs 4 [--dataset-loc PATH] --out cli.json

The CLI runs as a child process, unchanged; nothing is patched and the training loop carries no
bookkeeping. Afterwards the run is reconstructed from what the flow records anyway:

- trial compute: each trial's per-epoch `epoch_time_s` (MLflow metrics of its run), times the
  CPUs per trial; an epoch's end is the timestamp of that metric (the driver logs it when the
  result arrives: a few hundred ms after the epoch, when it wrote a checkpoint), so it ran over
  [end - epoch_time_s, end];
- trial starts: the trial's MLflow run start (Tune's on_trial_start on the driver, called once the
  trial's actor is up: its worker process started and imported the trainable);
- the flow's phases: flow and task run start/end times in Prefect's database ($PREFECT_HOME);
- the process: started and reaped here.

`fixed_cost_s` = wall from process start to exit minus the study's wall (first epoch's start to
last epoch's end): what a run costs beyond its trials (issue 23: <= 10 s for the defaults). It is
set against `import_baseline_s`, the wall of a bare `python -c "import torch, transformers, ray,
prefect, mlflow"` (median of three, in the same environment, just before the CLI): the floor any
Python tool on this stack pays.

`cli_core_utilisation` = trial compute core-seconds / (usable cores x wall from process start to
exit). The idle core-seconds (the rest) are split, exactly, into: before the first epoch (Python
imports, Prefect's temporary server and flow run, data preparation, Ray start, Tune set-up and
the first worker processes, then the first trial's data fetch and model build), between trials
(a core idle while some trial has still to start: worker launch, model build, result hand-off),
the study's tail (a core idle with no trial left to start: the last trial(s)
finishing on fewer cores than there are), and after the last epoch (Tune/Ray teardown,
evaluation, registration, plots, Prefect teardown, interpreter exit).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np

from tagifai.settings import DEFAULT_BACKBONE

GRID_S = 0.01  # resolution of the in-study idle split
ROOT = Path(__file__).resolve().parent.parent
# Prefect task names (without their run suffix) after the study, and what they are in the breakdown.
AFTER_STUDY_TASKS = {
    "evaluate-best": "evaluation",
    "register-best": "registration",
    "promotion-gate": "promotion_gate",
    "log-evaluation": "plots_and_evaluation_logging",
    "publish-best-run": "prefect_artifacts",
}
TUNE_TASK = "tune-hyperparameters"

WARM_UP = """
import sys
from pathlib import Path
from mlflow.tracking import MlflowClient
from prefect import flow
from tagifai.lifecycle import tracking
uri = tracking.resolve_tracking_uri(sys.argv[1])
tracking.get_or_create_experiment(MlflowClient(uri), sys.argv[2], uri)
flow(name="benchmark-warm-up")(lambda: None)()
if sys.argv[3]:  # the backbone's exported prediction graph, as cached by any earlier evaluation
    import tempfile
    from benchmarks.predict_latency import build_untrained_checkpoint
    from tagifai.serving.predictor import Predictor
    with tempfile.TemporaryDirectory() as folder:
        Predictor(build_untrained_checkpoint(sys.argv[3], Path(folder)))
"""


def unix(text: Optional[str]) -> Optional[float]:
    """Prefect's stored times (UTC, with or without an offset) as Unix seconds."""
    if not text:
        return None
    moment = datetime.fromisoformat(str(text))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def prefect_phases(prefect_home: Path) -> dict:
    """The latest flow run and its task runs from Prefect's SQLite database (read-only)."""
    database = prefect_home / "prefect.db"
    if not database.exists():
        return {}
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        flow = connection.execute(
            "SELECT id, start_time, end_time FROM flow_run WHERE name IS NOT NULL ORDER BY start_time DESC LIMIT 1"
        ).fetchone()
        if flow is None:
            return {}
        tasks = connection.execute(
            "SELECT name, start_time, end_time FROM task_run WHERE flow_run_id = ? ORDER BY start_time", (flow[0],)
        ).fetchall()
    finally:
        connection.close()
    return {
        "flow_start": unix(flow[1]),
        "flow_end": unix(flow[2]),
        "tasks": [
            {"name": name.rsplit("-", 1)[0], "start": unix(start), "end": unix(end)}
            for name, start, end in tasks
            if start is not None
        ],
    }


def prefect_server_start(log_path: Path, started: float) -> Optional[float]:
    """When Prefect began starting its temporary server (its own log line, local time of day): the
    end of the CLI's imports. None when the run used a running server or the line is not there."""
    pattern = re.compile(r"^(\d\d):(\d\d):(\d\d\.\d+) \| INFO +\| prefect - Starting temporary server")
    day = datetime.fromtimestamp(started).replace(hour=0, minute=0, second=0, microsecond=0)
    for line in log_path.read_text(errors="replace").splitlines():
        match = pattern.match(line)
        if match:
            hours, minutes, seconds = int(match[1]), int(match[2]), float(match[3])
            moment = day.timestamp() + hours * 3600 + minutes * 60 + seconds
            return moment + 86400 if moment < started - 60 else moment  # past midnight
    return None


def mlflow_trials(tracking_uri: str, experiment_name: str) -> list[dict]:
    """Per trial run: its start and end, and every epoch's end time and epoch_time_s."""
    from mlflow.tracking import MlflowClient

    from tagifai.lifecycle.tracking import TAG_TRIAL

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    trials = []
    for run in client.search_runs([experiment.experiment_id], max_results=1000):
        if TAG_TRIAL not in run.data.tags:
            continue
        history = sorted(client.get_metric_history(run.info.run_id, "epoch_time_s"), key=lambda m: m.step)
        trials.append(
            {
                "trial_id": run.data.tags[TAG_TRIAL],
                "run_start": run.info.start_time / 1000,
                "run_end": (run.info.end_time or 0) / 1000 or None,
                "epochs": [{"epoch": m.step, "end": m.timestamp / 1000, "epoch_time_s": m.value} for m in history],
            }
        )
    return trials


def record_epoch_times(storage: Path) -> dict[str, list[float]]:
    """epoch_time_s per trial from the trials' own records (a cross-check of MLflow's copy)."""
    times = {}
    for path in storage.glob("**/trial_records/*/record.json"):
        try:
            epochs = json.loads(path.read_text()).get("epochs", [])
        except (OSError, json.JSONDecodeError):
            continue
        times[path.parent.name] = [float(m["epoch_time_s"]) for m in epochs if "epoch_time_s" in m]
    return times


def _mask(grid: np.ndarray, start: float, end: float) -> slice:
    return slice(int(np.searchsorted(grid, start)), int(np.searchsorted(grid, end)))


def utilisation(
    started: float, exited: float, trials: list[dict], cores: int, cpus_per_trial: float, phases: dict
) -> dict:
    """Core utilisation of the run and its idle core-seconds by cause (see the module docstring).

    `trials` as from `mlflow_trials`; `phases` as from `prefect_phases` (may be empty: the
    before/after parts then stay whole instead of being split by flow stage).
    """
    wall = exited - started
    spans = [(e["end"] - e["epoch_time_s"], e["end"]) for t in trials for e in t["epochs"]]
    compute_core_s = sum(end - start for start, end in spans) * cpus_per_trial
    result = {
        "wall_s": wall,
        "usable_cores": cores,
        "cpus_per_trial": cpus_per_trial,
        "trial_compute_s": compute_core_s / cpus_per_trial,
        "trial_compute_core_s": compute_core_s,
        "cli_core_utilisation": compute_core_s / (cores * wall),
        "idle_core_s": cores * wall - compute_core_s,
    }
    if not spans:
        return result
    first, last = min(s for s, _ in spans), max(e for _, e in spans)
    firsts = sorted(min(e["end"] - e["epoch_time_s"] for e in t["epochs"]) for t in trials if t["epochs"])

    # In the study: idle cores on a grid, split by whether some trial has still to start.
    grid = np.arange(first, last, GRID_S)
    busy = np.zeros(len(grid))
    for start, end in spans:
        busy[_mask(grid, start, end)] += cpus_per_trial
    idle = np.clip(cores - busy, 0, None) * GRID_S
    pending = np.zeros(len(grid), dtype=bool)
    pending[: int(np.searchsorted(grid, firsts[-1]))] = True
    # Overlap of more trials than cores (oversubscription) shows as compute above capacity.
    oversubscribed = float(np.clip(busy - cores, 0, None).sum() * GRID_S)

    before = _split_before(started, first, trials, phases)
    after = _split_after(last, exited, phases)
    idle_core_s = {
        "before_first_epoch": cores * (first - started),
        "between_trials": float(idle[pending].sum()),
        "study_tail": float(idle[~pending].sum()),
        "after_last_epoch": cores * (exited - last),
    }
    result.update(
        idle_breakdown_core_s=idle_core_s,
        idle_breakdown_share_of_core_s={k: v / (cores * wall) for k, v in idle_core_s.items()},
        before_first_epoch_s=before,
        after_last_epoch_s=after,
        study_s=last - first,
        study_core_utilisation=float((busy.clip(max=cores) * GRID_S).sum() / (cores * (last - first))),
        oversubscribed_core_s=oversubscribed,
        trials=[_trial_row(t, started) for t in sorted(trials, key=lambda t: t["run_start"])],
    )
    return result


def _split_before(started: float, first: float, trials: list[dict], phases: dict) -> dict:
    """Wall seconds from process start to the first epoch, by stage (each stage ends where the next
    begins; a stage whose marks are missing is folded into the next)."""
    tasks = phases.get("tasks", [])
    tune = next((t for t in tasks if t["name"] == TUNE_TASK), None)
    first_run = min((t["run_start"] for t in trials), default=None)
    marks = [
        ("python_imports", phases.get("prefect_server_start")),
        ("prefect_start_and_flow_run", phases.get("flow_start")),
        ("data_prep_and_checks", tune["start"] if tune else None),
        ("ray_start_tune_setup_and_worker_start", first_run),
        ("first_trial_data_and_model_build", first),
    ]
    return _consecutive(started, marks, first)


def _split_after(last: float, exited: float, phases: dict) -> dict:
    """Wall seconds from the last epoch's end to process exit, by stage."""
    tasks = phases.get("tasks", [])
    tune = next((t for t in tasks if t["name"] == TUNE_TASK), None)
    marks = [("tune_teardown_and_checkpoint_logging", tune["end"] if tune else None)]
    for task in tasks:
        if task["name"] in AFTER_STUDY_TASKS and task["end"] is not None:
            marks.append((f"until_end_of_{AFTER_STUDY_TASKS[task['name']]}", task["end"]))
    marks += [("flow_rest", phases.get("flow_end")), ("prefect_teardown_and_exit", exited)]
    split = _consecutive(last, marks, exited)
    # Name each after-study task by its own duration too (the stage above also holds the gap before it).
    split["task_durations_s"] = {
        AFTER_STUDY_TASKS[t["name"]]: t["end"] - t["start"]
        for t in tasks
        if t["name"] in AFTER_STUDY_TASKS and t["end"] is not None
    }
    return split


def _consecutive(start: float, marks: list[tuple[str, Optional[float]]], end: float) -> dict:
    split, previous = {}, start
    for name, mark in marks:
        if mark is None:
            continue
        mark = min(max(mark, previous), end)
        split[name] = mark - previous
        previous = mark
    if end > previous:
        split["unmarked"] = end - previous
    return split


def _trial_row(trial: dict, started: float) -> dict:
    epochs = trial["epochs"]
    row = {"trial_id": trial["trial_id"], "epochs": len(epochs), "run_start_s": trial["run_start"] - started}
    if epochs:
        first_start = epochs[0]["end"] - epochs[0]["epoch_time_s"]
        row.update(
            trial_start_to_first_epoch_s=first_start - trial["run_start"],
            first_epoch_start_s=first_start - started,
            last_epoch_end_s=epochs[-1]["end"] - started,
            epoch_time_s=[e["epoch_time_s"] for e in epochs],
            gaps_between_epochs_s=[(b["end"] - b["epoch_time_s"]) - a["end"] for a, b in zip(epochs, epochs[1:])],
        )
    return row


def cpu_split(sampler, started: float, exited: float, trials: list[dict], cores: int, fixed_cost_s: float) -> dict:
    """How busy the machine's cores were outside the study (before the first epoch, after the last)
    and in it. `fixed_cost_cpu_floor_s` is the busy core-seconds outside the study over the cores:
    the fixed cost no reordering of the same work can go below (only less work can), on a machine
    that runs nothing else. `busy_share_outside_study` near 1 means the fixed cost is CPU-bound."""
    spans = [(e["end"] - e["epoch_time_s"], e["end"]) for t in trials for e in t["epochs"]]
    first, last = min(s for s, _ in spans), max(e for _, e in spans)
    before, study, after = (sampler.busy_core_s(a, b) for a, b in ((started, first), (first, last), (last, exited)))
    return {
        "busy_core_s": {"before_first_epoch": before, "study": study, "after_last_epoch": after},
        "busy_share": {
            "before_first_epoch": before / (cores * (first - started)),
            "study": study / (cores * (last - first)),
            "after_last_epoch": after / (cores * (exited - last)),
        },
        "busy_share_outside_study": (before + after) / (cores * fixed_cost_s),
        "fixed_cost_cpu_floor_s": (before + after) / cores,
        "cpu_s_by_role": {
            "before_first_epoch": sampler.cpu_by_role(started, first),
            "study": sampler.cpu_by_role(first, last),
            "after_last_epoch": sampler.cpu_by_role(last, exited),
        },
        "processes_before_first_epoch": sampler.processes(started, first),
        "source": "machine-wide /proc/stat busy ticks, sampled every 0.25 s; per process utime + stime",
    }


def child_env(workdir: Path) -> dict:
    """The environment of a new user's run: a local Ray, a SQLite MLflow store, Prefect's
    temporary server, a private Prefect home, and a private cache for the exported graph."""
    env = dict(os.environ)
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "TAGIFAI_INFERENCE_ENGINE"):
        env.pop(name, None)
    env.update(
        PREFECT_HOME=str(workdir / "prefect-home"),
        XDG_CACHE_HOME=str(workdir / "cache"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    env.setdefault("RAY_AUTH_MODE", "disabled")
    # Prefect gives its temporary server 20 s to start; a busy 2-core machine can take longer (the
    # CLI itself raises this too, the warm-up below needs it set).
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def warm_stores(workdir: Path, env: dict, experiment_name: str, backbone: str) -> float:
    """Create the MLflow store, Prefect's database and the exported prediction graph in another
    process, as any run after a machine's first finds them; returns the seconds that took."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", WARM_UP, tracking_uri(workdir), experiment_name, backbone],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"warming the stores failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


IMPORT_BASELINE = "import torch, transformers, ray, prefect, mlflow"


def import_baseline_s(env: dict, cwd: Path, runs: int = 3) -> tuple[float, list[float]]:
    """Median wall of a bare Python process importing the stack (and every run's)."""
    walls = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", IMPORT_BASELINE], cwd=cwd, env=env, check=True)
        walls.append(time.perf_counter() - started)
    return float(np.median(walls)), walls


def tracking_uri(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"


def run_cli(
    workdir: Path,
    num_runs: int,
    num_epochs: int,
    dataset_loc: Optional[str] = None,
    model: Optional[str] = None,
    extra_args: tuple[str, ...] = (),
    warm: bool = True,
    cpus_per_trial: float = 1.0,
    extra_env: Optional[dict] = None,
) -> tuple[dict, dict]:
    """One CLI run in a child process, its process tree's memory sampled; (result, memory)."""
    from benchmarks.proctree import TreeSampler

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "mlruns").mkdir(exist_ok=True)
    env, experiment = {**child_env(workdir), **(extra_env or {})}, "benchmark"
    warm_s = warm_stores(workdir, env, experiment, model or DEFAULT_BACKBONE) if warm else None
    command = [sys.executable, "-m", "flows.tune", "--experiment-name", experiment]
    command += ["--num-runs", str(num_runs), "--num-epochs", str(num_epochs), "--cpu-per-worker", f"{cpus_per_trial:g}"]
    command += ["--tracking-uri", tracking_uri(workdir), "--storage-path", str(workdir / "ray_results")]
    command += ["--results-fp", str(workdir / "summary.json")]
    if dataset_loc:
        command += ["--dataset-loc", dataset_loc]
    if model:
        command += ["--model", model]
    command += list(extra_args)
    baseline, baseline_runs = import_baseline_s(env, workdir)
    log_path = workdir / "cli.log"
    with open(log_path, "w") as log:
        started = time.time()
        child = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = TreeSampler(child.pid, interval_s=0.25)
        sampler.start()
        code = child.wait()
        exited = time.time()
        memory = sampler.stop()
    if code != 0:
        raise RuntimeError(f"the tuning CLI failed (exit {code}); log {log_path}:\n{log_path.read_text()[-3000:]}")
    summary = json.loads((workdir / "summary.json").read_text())
    trials = mlflow_trials(tracking_uri(workdir), experiment)
    phases = prefect_phases(workdir / "prefect-home")
    phases["prefect_server_start"] = prefect_server_start(log_path, started)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    result = utilisation(started, exited, trials, cores, cpus_per_trial, phases)
    records = record_epoch_times(workdir / "ray_results")
    if "study_s" in result:
        result["fixed_cost_s"] = result["wall_s"] - result["study_s"]
        result["fixed_cost_over_import_baseline"] = result["fixed_cost_s"] / baseline
        result["cpu"] = cpu_split(sampler, started, exited, trials, cores, result["fixed_cost_s"])
    result.update(
        import_baseline_s=baseline,
        import_baseline_runs_s=baseline_runs,
        import_baseline_command=f'python -c "{IMPORT_BASELINE}"',
        command=" ".join(command[1:]),
        trials_requested=num_runs,
        epochs_requested=num_epochs,
        epochs_run=sum(len(t["epochs"]) for t in trials),
        records_trial_compute_s=sum(sum(v) for v in records.values()) if records else None,
        test_f1=summary["test"]["f1"],
        best_val_loss=summary["val_loss"],
        data_rows=summary.get("data", {}),
        stores="warm (created before timing)" if warm else "cold (first run on this machine)",
        warm_up_s=warm_s,
        log=str(log_path),
    )
    memory["source"] = "tuning CLI process tree (driver, Prefect server, Ray processes, trials)"
    # Kept beside the run, so a benchmark stopped later still leaves this run's figures.
    (workdir / "cli_result.json").write_text(json.dumps({**result, "memory": memory}, indent=2))
    return result, memory


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cli_run", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset-loc", default=None, help="labelled CSV (default: the bundled sample)")
    parser.add_argument("--model", default=None, help="backbone (default: the flow's)")
    parser.add_argument("--num-runs", type=int, default=4)
    parser.add_argument("--num-epochs", type=int, default=4)
    parser.add_argument("--cold", action="store_true", help="no MLflow store, Prefect database or graph cache yet")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None)
    options = parser.parse_args(argv)
    workdir = Path(options.workdir or tempfile.mkdtemp(prefix="tagifai-cli-run-")).resolve()
    result, memory = run_cli(
        workdir, options.num_runs, options.num_epochs, options.dataset_loc, options.model, warm=not options.cold
    )
    result["memory"] = memory
    print_and_save(result, options.out, long_key="trials")
    return result


def print_and_save(result: dict, out: str | None, long_key: str) -> None:
    """The figures on stdout without the long per-run list `long_key`; everything in `out`, if given."""
    print(json.dumps({k: v for k, v in result.items() if k != long_key}, indent=2))
    if out:
        Path(out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
