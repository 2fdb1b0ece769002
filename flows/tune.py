"""The tuning flow: load → split → tokenize → tune → evaluate → register.

    python -m flows.tune --help

Load, split and tokenize are cached across runs (tasks/load.py, split.py, tokenize.py say on
what); the tune task retries by resuming its Ray Tune experiment from storage.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger

from flows.cli import command_line_run, parse_settings
from tagifai import tracking
from tagifai.model import check_backbone
from tagifai.settings import TuneSettings
from tagifai.storage import check_storage, redact
from tasks.cache import key
from tasks.evaluate import evaluate_checkpoint, log_evaluation
from tasks.load import load_data
from tasks.register import publish_best_run, register_best
from tasks.split import split_data
from tasks.tokenize import tokenize_data
from tasks.tune import tune_study


def run_cached(task, settings: TuneSettings, *args):
    """Run a cached task (rerun it with --refresh-cache); returns (result, whether it came from the cache)."""
    state = task.with_options(refresh_cache=settings.refresh_cache)(*args, return_state=True)
    return state.result(), state.name == "Cached"


@flow(name="tune-classifier", log_prints=True)
def tune_classifier(settings: TuneSettings = TuneSettings()) -> dict:
    """Tune a transformer text classifier with Ray Tune, track it in MLflow, evaluate the best."""
    logger = get_run_logger()
    tracking_uri = tracking.resolve_tracking_uri(settings.tracking_uri)
    tracking.check_reachable(tracking_uri)
    check_storage(settings.storage_path)
    check_backbone(settings.model, settings.trainable_layers)

    cached = {}
    data, cached["load"] = run_cached(load_data, settings, settings.dataset_loc)
    holdout = load_data(settings.holdout_loc) if settings.holdout_loc else None
    data_key = key(data.fingerprint, holdout and holdout.fingerprint, settings.seed, settings.num_samples)
    splits, cached["split"] = run_cached(
        split_data, settings, data, holdout, data_key, settings.seed, settings.num_samples
    )
    logger.info(
        "data: %d train / %d validation / %d test rows, tags %s",
        len(splits.train),
        len(splits.val),
        len(splits.test),
        list(splits.class_to_index),
    )
    tokenized, cached["tokenize"] = run_cached(
        tokenize_data, settings, splits, data_key, settings.model, settings.max_length
    )
    logger.info("cached steps reused: %s", [name for name, hit in cached.items() if hit] or "none")

    # The store is written only once the inputs are known to be good: bad data leaves no trace.
    experiment_id = tracking.get_or_create_experiment(
        MlflowClient(tracking_uri), settings.experiment_name, tracking_uri, settings.artifact_location
    )
    logger.info("MLflow: %s (experiment %r)", redact(tracking_uri), settings.experiment_name)

    logger.info("tuning: %d trials x up to %d epochs", settings.num_runs, settings.num_epochs)
    study = tune_study(tokenized, settings, tracking_uri, experiment_id, data_key)
    if study["resumed"]:
        logger.info("resumed the interrupted Ray Tune experiment in %s", study["experiment_dir"])
    trials = study["trials"]
    finished = [t for t in trials if t["checkpoint_dir"] and t["run_id"]]
    if not finished:
        raise RuntimeError("no trial produced a checkpoint; see the Ray Tune errors above")
    best = min(finished, key=lambda t: t["val_loss"])

    logger.info("evaluating the best trial %s on %d test rows", best["trial_id"], len(splits.test))
    test_metrics = evaluate_checkpoint(best["checkpoint_dir"], splits.test)
    version = register_best(tracking_uri, settings.registered_model_name, best["run_id"], test_metrics)
    plot_uris = log_evaluation(tracking_uri, best, trials, test_metrics)

    summary = {
        "run_id": best["run_id"],
        "experiment_name": settings.experiment_name,
        "tracking_uri": redact(tracking_uri),
        "registered_model": settings.registered_model_name,
        "model_version": version,
        "params": best["params"],
        "val_loss": best["val_loss"],
        "test": test_metrics,
        "trials": [{k: v for k, v in t.items() if k != "checkpoint_dir"} for t in trials],
        "plots": plot_uris,
        "data": {
            "source": data.source,
            "fingerprint": data_key,
            "rows": len(data.frame),
            "train_rows": len(splits.train),
            "val_rows": len(splits.val),
            "test_rows": len(splits.test),
        },
        "cached": cached,
        "ray_experiment_dir": study["experiment_dir"],
        "resumed": study["resumed"],
    }
    publish_best_run(summary)
    if settings.results_fp:
        Path(settings.results_fp).parent.mkdir(parents=True, exist_ok=True)
        Path(settings.results_fp).write_text(json.dumps(summary, indent=2))
    logger.info(
        "best run %s: params %s, val_loss %.4f, test F1 %.3f",
        best["run_id"],
        best["params"],
        best["val_loss"],
        test_metrics["f1"],
    )
    return summary


def main(argv: list[str] | None = None) -> dict:
    settings = parse_settings(
        TuneSettings, argv, prog="python -m flows.tune", description=tune_classifier.description or ""
    )
    with command_line_run():
        summary = tune_classifier(settings)
    print(json.dumps({k: summary[k] for k in ("run_id", "params", "val_loss", "test")}, indent=2))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
