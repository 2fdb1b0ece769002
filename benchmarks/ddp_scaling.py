"""Data-parallel scaling: one trial on 2 workers x 1 CPU against 1 worker x 2 CPUs (issue 22).

    python -m benchmarks.ddp_scaling [--dataset-loc PATH] [--num-epochs 3] [--repeats 1] --out ddp.json

Both set-ups run the same study (one trial, the real all-MiniLM-L6-v2 backbone, the flow's first
hyperparameters) through `tagifai.tuning.study.tune_hyperparameters`, alternating (1 worker, 2
workers, 1 worker, ...) so that load from other jobs on the machine hits both alike. Measured:

- per-epoch throughput: training rows / epoch_time_s (training and validation of the epoch, as the
  trial reports it), the median over the epochs after the first (the first pays warm-up);
  `scaling_efficiency` = 2-worker throughput / 1-worker throughput (target >= 0.85);
- start-up per trial: from the trial's start (its MLflow run, created when Tune starts the trial)
  to the start of its first epoch (end of epoch 1 minus its epoch_time_s). For 2 workers this
  includes Ray Train's worker group (a placement group, two worker processes, the gloo process
  group); `added_startup_s` is the difference.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from benchmarks.cli_run import mlflow_trials, print_and_save
from tagifai.batching import tokenize_splits
from tagifai.data import load_dataset, split_dataset
from tagifai.lifecycle import tracking
from tagifai.settings import DEFAULT_SEED, TuneSettings
from tagifai.tuning.study import tune_hyperparameters

SHARED_DATASET = Path(__file__).resolve().parents[2] / "shared" / "data" / "made-with-ml" / "dataset.csv"
SETUPS = {"1x2cpu": dict(num_workers=1, cpu_per_worker=2), "2x1cpu": dict(num_workers=2, cpu_per_worker=1)}


def one_trial(data, workdir: Path, name: str, num_epochs: int, **resources) -> dict:
    """One study of one trial; its per-epoch throughput and start-up."""
    uri = tracking.resolve_tracking_uri(f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}")
    settings = TuneSettings(
        experiment_name=name, num_runs=1, num_epochs=num_epochs, grace_period=num_epochs, max_concurrent=1,
        storage_path=str(workdir / "ray_results"), **resources,
    )  # fmt: skip
    client = MlflowClient(uri)
    experiment_id = tracking.get_or_create_experiment(client, name, uri)
    started = time.time()
    tune_hyperparameters(data, settings, uri, experiment_id, data_key=f"{name}-{started}")
    [trial] = mlflow_trials(uri, name)
    epochs = trial["epochs"]
    throughput = [len(data.train.labels) / e["epoch_time_s"] for e in epochs]
    return {
        "epoch_time_s": [round(e["epoch_time_s"], 2) for e in epochs],
        "rows_per_s": round(statistics.median(throughput[1:] or throughput), 2),
        "startup_s": round(epochs[0]["end"] - epochs[0]["epoch_time_s"] - trial["run_start"], 2),
        "study_s": round(time.time() - started, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset-loc", default=str(SHARED_DATASET) if SHARED_DATASET.exists() else None)
    parser.add_argument("--num-epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=None)
    options = parser.parse_args(argv)

    splits = split_dataset(load_dataset(options.dataset_loc).frame, seed=DEFAULT_SEED)
    data = tokenize_splits(splits, TuneSettings().model, TuneSettings().max_length)
    runs: dict[str, list[dict]] = {name: [] for name in SETUPS}
    with tempfile.TemporaryDirectory(prefix="tagifai-ddp-bench-") as folder:
        for repeat in range(options.repeats):
            for name, resources in SETUPS.items():
                result = one_trial(data, Path(folder), f"{name}-{repeat}", options.num_epochs, **resources)
                print(name, result, flush=True)
                runs[name].append(result)

    def median_of(name: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[name])

    results = {
        "dataset": options.dataset_loc or "bundled sample",
        "train_rows": len(data.train.labels),
        "num_epochs": options.num_epochs,
        "runs": runs,
        "scaling_efficiency": round(median_of("2x1cpu", "rows_per_s") / median_of("1x2cpu", "rows_per_s"), 3),
        "added_startup_s": round(median_of("2x1cpu", "startup_s") - median_of("1x2cpu", "startup_s"), 1),
        "target_scaling_efficiency": 0.85,
    }
    print_and_save(results, options.out, long_key="runs")
    return results


if __name__ == "__main__":
    main()
