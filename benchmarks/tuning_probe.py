"""Run the tuning flow once with timers around its parts, and say where the wall time went.

    python -m benchmarks.tuning_probe --dataset-loc PATH --trials 4 --epochs 3 --workdir DIR --out probe.json

benchmarks/run.py starts this in a child process (a clean process tree to measure memory over).
Nothing in flows/ or tasks/ is changed: module attributes are wrapped with timers at run time,
and the trials' own timings come from Ray Tune's result.json files (tagifai/train.py reports
`epoch_time_s` and `epoch_end_unix` every epoch). The analysis is described in `attribute`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

GRID_S = 0.01  # resolution of the timeline attribution
MLFLOW_CATEGORIES = {  # tagifai.tracking functions that are not per-epoch logging
    "log_checkpoint": "checkpoint_writes",
    "resolve_tracking_uri": "mlflow_store_setup",
    "prepare_sqlite_store": "mlflow_store_setup",
    "check_reachable": "mlflow_store_setup",
    "get_or_create_experiment": "mlflow_store_setup",
}


class Timeline:
    """Labelled [start, end] intervals in Unix time (the clock Ray workers report in too)."""

    def __init__(self):
        self.intervals: list[tuple[str, str, float, float]] = []
        self.marks: dict[str, list[tuple[str, float]]] = {}

    def timed(self, function, category: str, name: str):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            started = time.time()
            try:
                return function(*args, **kwargs)
            finally:
                self.intervals.append((category, name, started, time.time()))

        return timed

    def wrap(self, owner, attribute: str, category: str) -> bool:
        function = getattr(owner, attribute, None)
        if not callable(function):
            return False
        setattr(owner, attribute, self.timed(function, category, attribute))
        return True

    def mark(self, kind: str, key: str) -> None:
        self.marks.setdefault(kind, []).append((key, time.time()))


class TimedTask:
    """A Prefect task whose calls are timed; everything else (submit, with_options...) passes through."""

    def __init__(self, task, timeline: Timeline):
        self._task, self._timeline = task, timeline

    def __call__(self, *args, **kwargs):
        return self._timeline.timed(self._task, "task_wall", self._task.name)(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._task, name)


def _time_bodies(engine_module, timeline: Timeline, category: str) -> None:
    """Time the user function inside each flow/task run (Prefect's engines call it through here)."""
    call = engine_module.call_with_parameters

    def timed_call(fn, parameters, *args, **kwargs):
        return timeline.timed(call, category, getattr(fn, "__name__", "?"))(fn, parameters, *args, **kwargs)

    engine_module.call_with_parameters = timed_call


def instrument(timeline: Timeline):
    """Wrap the flow's parts with timers; return the flow to call. Missing names are skipped."""
    import prefect.flow_engine
    import prefect.task_engine
    import ray
    from prefect import Flow, Task

    import flows.tune as flow_module
    import tagifai.tracking as tracking
    import tagifai.tune as tune_module

    flow = flow_module.tune_classifier
    assert isinstance(flow, Flow)
    _time_bodies(prefect.flow_engine, timeline, "flow_body")
    _time_bodies(prefect.task_engine, timeline, "task_body")
    for attribute, value in list(vars(flow_module).items()):
        if isinstance(value, Task):
            setattr(flow_module, attribute, TimedTask(value, timeline))
    for attribute in ("load_dataset", "split_dataset", "tokenize_splits", "read_source_bytes"):
        timeline.wrap(flow_module, attribute, "data_prep")
    for attribute in ("evaluate_frame", "Predictor"):
        timeline.wrap(flow_module, attribute, "evaluation")
    timeline.wrap(flow_module, "_publish_artifacts", "prefect_artifacts")
    for attribute, value in list(vars(tracking).items()):
        if callable(value) and getattr(value, "__module__", None) == tracking.__name__ and not isinstance(value, type):
            timeline.wrap(tracking, attribute, MLFLOW_CATEGORIES.get(attribute, "mlflow_logging"))
    timeline.wrap(tune_module, "connect_ray", "ray_start")
    timeline.wrap(ray, "shutdown", "ray_shutdown")
    build_tuner = getattr(tune_module, "build_tuner", None)
    if build_tuner is not None:

        def build_timed_tuner(*args, **kwargs):
            tuner = build_tuner(*args, **kwargs)
            tuner.fit = timeline.timed(tuner.fit, "ray_fit", "fit")
            return tuner

        tune_module.build_tuner = build_timed_tuner
    tracker = getattr(tune_module, "TrialTracker", None)
    if tracker is not None:
        for hook, kind in (
            ("on_trial_start", "start"),
            ("on_trial_restore", "start"),
            ("on_trial_complete", "end"),
            ("on_trial_error", "end"),
        ):
            original = getattr(tracker, hook, None)
            if original is not None:

                def hooked(self, iteration, trials, trial, *args, _original=original, _kind=kind, **kwargs):
                    timeline.mark(_kind, trial.trial_id)
                    return _original(self, iteration, trials, trial, *args, **kwargs)

                setattr(tracker, hook, hooked)
    return flow


def read_trials(storage: Path) -> list[dict]:
    """Every trial's reported epochs, from Ray Tune's result.json files under `storage`."""
    trials = []
    for results in sorted(storage.rglob("result.json")):
        rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        rows = [row for row in rows if "epoch_time_s" in row and "epoch_end_unix" in row]
        if rows:
            trials.append({"trial_id": rows[0].get("trial_id", results.parent.name), "epochs": rows})
    return trials


def _mask(grid: np.ndarray, intervals) -> np.ndarray:
    mask = np.zeros(len(grid), dtype=bool)
    for start, end in intervals:
        mask[np.searchsorted(grid, start) : np.searchsorted(grid, end)] = True
    return mask


def attribute(timeline: Timeline, trials: list[dict], called: float, returned: float) -> dict:
    """Split the flow's wall time into trial compute and named kinds of overhead.

    Trial compute on the critical path is the time during which at least one trial was inside an
    epoch (training + validation: the union of every trial's [epoch end - epoch_time_s, epoch end]):
    with two trials side by side, a second counts once however many trials computed in it.
    Overhead is the rest of the wall time. Each 10 ms of it goes to the first kind in `kinds` that
    was under way then, so the kinds add up to the overhead exactly. Driver-side kinds are timed
    calls (Prefect engine, tagifai.tracking, connect_ray, ...). Trial-side kinds come from timestamps:
    `trial_launch` from a slot freeing (fit start or the end of the trial it replaces) to Tune's
    on_trial_start (placement, the worker process starting and importing), `trial_start` from
    there to the first epoch (data fetch, model build), `checkpoint_writes` the gap after an epoch
    that wrote a checkpoint (serialize, Ray persisting it, the report hand-off) plus MLflow's
    upload of checkpoints, `trial_reporting` the gap after an epoch without one.
    """
    grid = np.arange(called, returned, GRID_S)
    by_category: dict[str, list[tuple[float, float]]] = {}
    for category, _, start, end in timeline.intervals:
        by_category.setdefault(category, []).append((start, end))
    body = by_category.get("flow_body", [(called, returned)])[0]
    starts = dict(timeline.marks.get("start", []))  # the latest start of each trial
    ends = dict(timeline.marks.get("end", []))
    fits = by_category.get("ray_fit", [])
    fit_start, fit_end = (fits[0][0], fits[-1][1]) if fits else (called, returned)
    compute, launch, trial_start, checkpoint_gaps, report_gaps, trial_rows = [], [], [], [], [], []
    for trial in trials:
        epochs = sorted(trial["epochs"], key=lambda row: row["epoch_end_unix"])
        spans = [(row["epoch_end_unix"] - row["epoch_time_s"], row["epoch_end_unix"]) for row in epochs]
        compute += spans
        launched = starts.get(trial["trial_id"])
        if launched is not None:
            # From the slot freeing (fit start, or the end of the trial it replaces) to Tune's
            # on_trial_start: placement and the trial's worker process starting up.
            freed = max([fit_start] + [end for end in ends.values() if end <= launched])
            launch.append((freed, launched))
            trial_start.append((launched, spans[0][0]))
        best, saved = float("inf"), []
        for row in epochs:
            saved.append(row["val_loss"] < best)
            best = min(best, row["val_loss"])
        finished = ends.get(trial["trial_id"], spans[-1][1])
        for index, (span, wrote) in enumerate(zip(spans, saved)):
            gap = (span[1], spans[index + 1][0] if index + 1 < len(spans) else finished)
            (checkpoint_gaps if wrote else report_gaps).append(gap)
        trial_rows.append(
            {
                "trial_id": trial["trial_id"],
                "epochs": len(epochs),
                "epoch_time_s": [row["epoch_time_s"] for row in epochs],
                "setup_time_s": epochs[0].get("setup_time_s"),
                "checkpoints": int(sum(saved)),
                "launched_s": None if launched is None else launched - called,
                "first_epoch_start_s": spans[0][0] - called,
                "finished_s": finished - called,
            }
        )
    computing = _mask(grid, compute)
    kinds = [
        ("prefect_start", [(called, body[0])]),
        ("prefect_teardown", [(body[1], returned)]),
        ("ray_start", by_category.get("ray_start", [])),
        ("ray_shutdown", by_category.get("ray_shutdown", [])),
        ("data_prep", by_category.get("data_prep", [])),
        ("evaluation", by_category.get("evaluation", [])),
        ("checkpoint_writes", by_category.get("checkpoint_writes", []) + checkpoint_gaps),
        ("mlflow_logging", by_category.get("mlflow_logging", [])),
        ("mlflow_store_setup", by_category.get("mlflow_store_setup", [])),
        ("trial_launch", launch),
        ("trial_start", trial_start),
        ("trial_reporting", report_gaps),
        ("ray_tune_teardown", [(max(ends.values(), default=fit_end), fit_end)]),
        ("prefect_artifacts", by_category.get("prefect_artifacts", [])),
        ("ray_scheduling", fits),
    ]
    task_bodies: dict[str, list] = {}
    for category, name, start, end in timeline.intervals:
        if category == "task_body":
            task_bodies.setdefault(f"task_other:{name}", []).append((start, end))
    kinds += sorted(task_bodies.items())
    kinds += [("prefect_task_overhead", by_category.get("task_wall", [])), ("flow_body_other", [body])]
    unassigned = ~computing
    breakdown = {}
    for name, intervals in kinds:
        taken = unassigned & _mask(grid, intervals)
        breakdown[name] = float(taken.sum() * GRID_S)
        unassigned &= ~taken
    breakdown["unattributed"] = float(unassigned.sum() * GRID_S)
    wall = returned - called
    critical = float(computing.sum() * GRID_S)
    total_compute = float(sum(end - start for start, end in compute))
    lanes = max(1, int(np.max(_depth(grid, compute)))) if compute else 1
    mlflow = _mask(grid, by_category.get("mlflow_logging", []))
    return {
        "wall_s": wall,
        "trial_compute_s": total_compute,
        "critical_path_compute_s": critical,
        "overhead_s": wall - critical,
        "overhead_share": (wall - critical) / wall,
        "max_parallel_trials": lanes,
        "lane_utilisation": total_compute / (lanes * wall),
        "overhead_breakdown": breakdown,
        "mlflow_logging_total_s": float(mlflow.sum() * GRID_S),
        "mlflow_logging_under_compute_s": float((mlflow & computing).sum() * GRID_S),
        "in_trial_checkpoint_serialize_s": sum(
            max(r["epochs"][-1].get("checkpoint_write_s", 0.0), 0.0) for r in trials
        ),
        "driver_calls": _call_totals(timeline),
        "trial_timings": trial_rows,
    }


def _call_totals(timeline: Timeline) -> dict:
    """Seconds and count per timed driver-side call, e.g. {"mlflow_logging:log_epoch": [s, n]}."""
    totals: dict[str, list] = {}
    for category, name, start, end in timeline.intervals:
        entry = totals.setdefault(f"{category}:{name}", [0.0, 0])
        entry[0] += end - start
        entry[1] += 1
    return dict(sorted(totals.items(), key=lambda item: -item[1][0]))


def _depth(grid: np.ndarray, intervals) -> np.ndarray:
    depth = np.zeros(len(grid), dtype=np.int32)
    for start, end in intervals:
        depth[np.searchsorted(grid, start) : np.searchsorted(grid, end)] += 1
    return depth


WARM_UP = """
import sys, time
from mlflow.tracking import MlflowClient
from prefect import flow
from tagifai import tracking
started = time.time()
uri = tracking.resolve_tracking_uri(sys.argv[1])
tracking.get_or_create_experiment(MlflowClient(uri), sys.argv[2], uri)
mlflow_s = time.time() - started
started = time.time()
flow(name="benchmark-warm-up")(lambda: None)()
print(mlflow_s, time.time() - started)
"""


def warm_stores(settings) -> dict:
    """Create the MLflow store and Prefect's database before the timed run, in another process,
    as a previous run would have; returns what that took (a first run pays it on top)."""
    import subprocess
    import sys

    output = subprocess.run(
        [sys.executable, "-c", WARM_UP, settings.tracking_uri, settings.experiment_name],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    mlflow_s, prefect_s = map(float, output.split()[-2:])
    return {"mlflow_store": mlflow_s, "prefect_first_flow": prefect_s}


def run(options) -> dict:
    from tagifai.settings import TuneSettings

    workdir = Path(options.workdir).resolve()
    (workdir / "mlruns").mkdir(parents=True, exist_ok=True)
    settings = TuneSettings(
        experiment_name="benchmark",
        dataset_loc=options.dataset_loc,
        model=options.model,
        num_runs=options.trials,
        num_epochs=options.epochs,
        num_samples=options.num_samples,
        tracking_uri=f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}",
        storage_path=str(workdir / "ray_results"),
    )
    cold_start = warm_stores(settings) if options.warm_stores else None
    timeline = Timeline()
    flow = instrument(timeline)
    called = time.time()
    summary = flow(settings)
    returned = time.time()
    result = attribute(timeline, read_trials(workdir / "ray_results"), called, returned)
    result.update(
        trials_requested=options.trials,
        epochs_requested=options.epochs,
        test_f1=summary["test"]["f1"],
        best_val_loss=summary["val_loss"],
        settings={k: v for k, v in settings.model_dump().items() if k not in ("initial_params",)},
        stores="warm (created before timing, as on any run after the first)" if cold_start else "cold (first run)",
        first_run_store_creation_s=cold_start,
    )
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tuning_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset-loc", default=None)
    parser.add_argument("--model", required=True)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=None)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--cold",
        dest="warm_stores",
        action="store_false",
        help="time a first run: no MLflow store or Prefect database yet",
    )
    options = parser.parse_args(argv)
    options.workdir = options.workdir or tempfile.mkdtemp(prefix="tagifai-tuning-bench-")
    result = run(options)
    Path(options.out).write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
