"""What an object store adds to a study, against a local folder, measured in one run.

    python -m benchmarks.storage_overhead --repeats 2 --trials 2 --epochs 2 --num-samples 120

The same tokenized data and settings run alternately with `--storage-path` a local folder and an
s3:// bucket of a SeaweedFS server started here on loopback (tests/services.py; the network cost
of a real store comes on top). Each study runs in this process through `tune_hyperparameters`
(Ray Tune with a local Ray, MLflow in a temporary SQLite store), so both sides pay the same Ray
start-up. Printed per storage, as the mean over repeats:

- study_s: wall time of the whole study (claim, tuning, reading back the best checkpoints,
  logging them to MLflow, the completion marker);
- trial_outside_training_s: per trial, Tune's time_total_s minus the trial's own epoch times, i.e.
  model set-up, reporting and the crash-safe record/checkpoint writes (tagifai/tuning/trial_store.py);
- readback_s: the driver reading each trial's record and downloading its best checkpoint.

Then each storage operation alone, with one of those real checkpoints (median seconds): an epoch
that writes a new best checkpoint, one that does not, reading a record, downloading a checkpoint,
the completion marker, and (s3) claiming and releasing a folder's lease.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def trial_results(experiment_uri: str) -> list[dict]:
    """The last result.json line of every trial of an experiment, on any storage."""
    import pyarrow.fs as pafs

    from tagifai.tuning.storage import open_storage

    filesystem, root = open_storage(experiment_uri)
    last = []
    for info in filesystem.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.base_name == "result.json":
            with filesystem.open_input_stream(info.path) as stream:
                lines = [line for line in stream.read().decode().splitlines() if line]
            last.append(json.loads(lines[-1]))
    return last


def one_study(data, settings, tracking_uri: str, fingerprint: str) -> dict:
    from mlflow.tracking import MlflowClient

    import tagifai.tuning.study as tune_module
    from tagifai.lifecycle import tracking
    from tagifai.tuning.trial_store import TrialStore

    experiment_id = tracking.get_or_create_experiment(
        MlflowClient(tracking_uri), settings.experiment_name, tracking_uri
    )
    readback = []
    summarize = tune_module.summarize_trials

    def timed_summarize(results, experiment_uri):
        started = time.perf_counter()
        rows = summarize(results, experiment_uri)
        readback.append(time.perf_counter() - started)
        return rows

    tune_module.summarize_trials = timed_summarize
    try:
        started = time.perf_counter()
        study = tune_module.tune_hyperparameters(data, settings, tracking_uri, experiment_id, fingerprint)
        study_s = time.perf_counter() - started
    finally:
        tune_module.summarize_trials = summarize
    outside = []
    for result in trial_results(study["experiment_dir"]):
        record = TrialStore(study["experiment_dir"], result["trial_id"]).read()
        training = sum(m.get("epoch_time_s", 0.0) for m in record.epochs) if record else 0.0
        outside.append(result["time_total_s"] - training)
    return {
        "study_s": study_s,
        "trial_outside_training_s": statistics.mean(outside),
        "readback_s": readback[0],
        "trials": len(outside),
    }


def claim_and_release(lease) -> None:
    assert lease.acquire()
    lease.release()


def storage_operations(checkpoint: Path, experiment_uri: str, repeats: int) -> dict:
    """Seconds per storage operation of a trial and of the driver, with a real checkpoint folder:
    the same calls the trials make, timed alone (the study times above carry the machine's noise)."""
    from tagifai.tuning import storage
    from tagifai.tuning.trial_store import TrialStore

    def save(folder: Path) -> None:
        shutil.copytree(checkpoint, folder, dirs_exist_ok=True)

    timings: dict[str, list[float]] = {}

    def timed(name: str, action, *args):
        started = time.perf_counter()
        result = action(*args)
        timings.setdefault(name, []).append(time.perf_counter() - started)
        return result

    for repeat in range(repeats):
        store = TrialStore(experiment_uri, f"ops-{repeat}")
        first, second = {"epoch": 1, "val_loss": 0.9}, {"epoch": 2, "val_loss": 0.95}
        timed("epoch_with_new_best_checkpoint_s", store.record_epoch, first, save, False)
        timed("epoch_without_checkpoint_s", store.record_epoch, second, None, False)
        record = timed("read_record_s", store.read)
        with tempfile.TemporaryDirectory() as download:
            timed("download_best_checkpoint_s", store.local_checkpoint, record.best_checkpoint, Path(download))
        timed("write_marker_s", storage.write_text, storage.join(experiment_uri, f"marker-{repeat}.json"), "[]")
        if storage.is_remote(experiment_uri):
            from tagifai.tuning.lease import S3Lease

            timed("claim_and_release_s", claim_and_release, S3Lease(storage.join(experiment_uri, f".lease-{repeat}")))
    return {name: statistics.median(values) for name, values in timings.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.storage_overhead", description=__doc__)
    parser.add_argument("--repeats", type=int, default=2, help="studies per storage, alternating")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--num-samples", type=int, default=120, help="rows of the sample dataset used")
    parser.add_argument("--model", default=None, help="backbone (default: the project default, real checkpoint size)")
    parser.add_argument("--out", help="write the figures as JSON here")
    options = parser.parse_args(argv)

    sys.path.insert(0, str(REPO / "tests"))
    from services import seaweedfs

    from tagifai.batching import tokenize_splits
    from tagifai.data import load_dataset, sample_dataset_path, split_dataset
    from tagifai.settings import DEFAULT_BACKBONE, TuneSettings

    workdir = Path(tempfile.mkdtemp(prefix="storage-overhead-"))
    tracking_uri = f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"
    (workdir / "mlruns").mkdir()
    model = options.model or DEFAULT_BACKBONE
    data = load_dataset(str(sample_dataset_path()))
    splits = split_dataset(data.frame, num_samples=options.num_samples)
    tokenized = tokenize_splits(splits, model, 128)
    figures: dict[str, list[dict]] = {"local": [], "s3": []}
    with seaweedfs(workdir / "seaweedfs") as server:
        os.environ.update(server.env)
        bucket = server.create_bucket("storage-overhead")
        for repeat in range(options.repeats):
            for storage, path in (("local", str(workdir / "ray_results")), ("s3", f"s3://{bucket}/ray_results")):
                settings = TuneSettings(
                    experiment_name=f"overhead-{storage}",
                    model=model,
                    num_runs=options.trials,
                    num_epochs=options.epochs,
                    grace_period=options.epochs,
                    max_concurrent=2,
                    storage_path=path,
                    seed=1234 + repeat,  # a new folder per repeat: no study resumes another
                )
                figures[storage].append(one_study(tokenized, settings, tracking_uri, f"overhead-{repeat}"))
                print(storage, repeat, json.dumps(figures[storage][-1]), flush=True)
        checkpoint = next((workdir / "ray_results").glob("*/trial_records/*/checkpoint-*"))
        checkpoint_mb = sum(f.stat().st_size for f in checkpoint.iterdir()) / 1e6
        operations = {
            "local": storage_operations(checkpoint, str(workdir / "operations"), 2 * options.repeats),
            "s3": storage_operations(checkpoint, f"s3://{bucket}/operations", 2 * options.repeats),
        }
        print("operations", json.dumps(operations), flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    summary = {
        storage: {key: statistics.mean(run[key] for run in runs) for key in runs[0]}
        for storage, runs in figures.items()
    }
    summary["operations"] = operations
    summary["checkpoint_mb"] = round(checkpoint_mb, 1)
    summary["added_by_s3"] = {key: summary["s3"][key] - summary["local"][key] for key in summary["local"]}
    summary["runs"] = figures
    summary["setup"] = {
        "model": model,
        "trials": options.trials,
        "epochs": options.epochs,
        "num_samples": options.num_samples,
        "repeats": options.repeats,
        "s3_server": "SeaweedFS (weed mini) on loopback",
    }
    shown = ("local", "s3", "added_by_s3", "operations", "checkpoint_mb", "setup")
    print(json.dumps({k: summary[k] for k in shown}, indent=2))
    if options.out:
        Path(options.out).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
