"""The tuning flow: load → split → tokenize → tune → evaluate → register → promote.

    python -m flows.tune --help

Load, split and tokenize are cached across runs (tasks/load.py, split.py, tokenize.py say on
what); the tune task retries by resuming its Ray Tune experiment from storage; the promotion gate
decides whether the new model replaces the champion (tasks/promote.py).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger

from flows import report
from flows.cli import command_line_run, parse_settings
from tagifai.behavioural import load_checks
from tagifai.lifecycle import registry, tracking
from tagifai.lifecycle.database import redact
from tagifai.lifecycle.promotion import GateRules
from tagifai.model import check_backbone
from tagifai.settings import TuneSettings, training_fingerprint
from tagifai.tuning.display import format_params
from tagifai.tuning.storage import check_storage
from tasks.cache import key
from tasks.evaluate import evaluate_challenger, log_evaluation
from tasks.load import load_data
from tasks.promote import promote_if_better
from tasks.register import publish_best_run, register_best
from tasks.split import split_data
from tasks.tokenize import tokenize_data
from tasks.tune import tune_study


def run_cached(task, settings: TuneSettings, *args):
    """Run a cached task (rerun it with --refresh-cache); returns (result, whether it came from the cache)."""
    state = task.with_options(refresh_cache=settings.refresh_cache)(*args, return_state=True)
    return state.result(), state.name == "Cached"


def starting_from_champion(settings: TuneSettings, client: MlflowClient, champion) -> TuneSettings:
    """The settings with the champion's hyperparameters added to the search's initial points (after
    the configured ones), so that a re-tune never starts from scratch."""
    point = registry.hyperparameters_of(client, champion) if champion else None
    if point is None or point in settings.initial_params:
        return settings
    return settings.model_copy(update={"initial_params": [*settings.initial_params, point]})


def write_results(settings: TuneSettings, summary: dict) -> None:
    if settings.results_fp:
        Path(settings.results_fp).parent.mkdir(parents=True, exist_ok=True)
        Path(settings.results_fp).write_text(json.dumps(summary, indent=2))


@flow(name="tune-classifier", log_prints=True)
def tune_classifier(settings: TuneSettings = TuneSettings()) -> dict:
    """Tune a transformer text classifier with Ray Tune, track it in MLflow, evaluate the best, and
    promote it to champion if it beats the current one."""
    logger = get_run_logger()
    timings = {"flow_started_at": time.time()}
    tracking_uri = tracking.resolve_tracking_uri(settings.tracking_uri)
    tracking.check_reachable(tracking_uri)
    check_storage(settings.storage_path)
    check_backbone(settings.model, settings.trainable_layers)
    load_checks(settings.behavioural_checks)  # a bad checks file stops the run now, not after tuning
    client = MlflowClient(tracking_uri)

    cached = {}
    data, cached["load"] = run_cached(load_data, settings, settings.dataset_loc)
    holdout = load_data(settings.holdout_loc) if settings.holdout_loc else None
    data_key = key(data.fingerprint, holdout and holdout.fingerprint, settings.seed, settings.num_samples)
    champion = registry.champion(client, settings.registered_model_name)
    if (
        settings.skip_if_unchanged
        and champion
        and registry.trained_on(champion)
        == (
            data_key,
            training_fingerprint(settings),
        )
    ):
        reason = f"champion version {champion.version} was trained on the same data with the same settings"
        logger.info("skipped: %s; nothing to re-tune (drop --skip-if-unchanged to tune anyway)", reason)
        summary = {"skipped": True, "reason": reason, "champion_version": str(champion.version), "cached": cached}
        summary["data"] = {"source": data.source, "fingerprint": data_key, "rows": len(data.frame)}
        write_results(settings, summary)
        return summary

    splits, cached["split"] = run_cached(
        split_data, settings, data, holdout, data_key, settings.seed, settings.num_samples
    )
    tokenized, cached["tokenize"] = run_cached(
        tokenize_data, settings, splits, data_key, settings.model, settings.max_length
    )
    logger.info(
        "data: %d rows of %s -> %d train / %d validation / %d test, tags %s (cached: %s)",
        len(data.frame), data.source, len(splits.train), len(splits.val), len(splits.test),
        ", ".join(splits.class_to_index), ", ".join(name for name, hit in cached.items() if hit) or "none",
    )  # fmt: skip

    # The store is written only once the inputs are known to be good: bad data leaves no trace.
    experiment_id = tracking.get_or_create_experiment(
        client, settings.experiment_name, tracking_uri, settings.artifact_location
    )
    study_settings = starting_from_champion(settings, client, champion)
    logger.info(
        "tuning: %d trials x up to %d epochs, %d at a time; MLflow %s, experiment %r",
        settings.num_runs, settings.num_epochs, settings.max_concurrent, redact(tracking_uri), settings.experiment_name,
    )  # fmt: skip
    timings["data_s"] = time.time() - timings["flow_started_at"]
    tuning_started = time.time()
    study = tune_study(tokenized, study_settings, tracking_uri, experiment_id, data_key)
    timings["tuning_s"] = time.time() - tuning_started
    if study["resumed"]:
        logger.info("resumed the interrupted Ray Tune experiment in %s", study["experiment_dir"])
    trials = study["trials"]
    finished = [t for t in trials if t["checkpoint_dir"] and t["run_id"]]
    if not finished:
        raise RuntimeError("no trial produced a checkpoint; see the Ray Tune errors above")
    best = min(finished, key=lambda t: t["val_loss"])

    logger.info("evaluating the best trial %s on %d test rows", best["trial_id"], len(splits.test))
    evaluation = evaluate_challenger(best["checkpoint_dir"], splits.test, settings.behavioural_checks)
    test_metrics = evaluation["test"]
    version = register_best(
        tracking_uri, settings.registered_model_name, best["run_id"], best["checkpoint_dir"], test_metrics, data_key,
        training_fingerprint(settings),
    )  # fmt: skip
    rules = GateRules(settings.min_improvement, settings.max_class_drop, settings.force_promote)
    decision = promote_if_better(
        tracking_uri, settings.registered_model_name, version, evaluation, splits.test, rules, settings.seed
    )
    plot_uris = log_evaluation(tracking_uri, best, trials, test_metrics)

    summary = {
        "skipped": False,
        "run_id": best["run_id"],
        "experiment_name": settings.experiment_name,
        "tracking_uri": redact(tracking_uri),
        "registered_model": settings.registered_model_name,
        "model_version": version,
        "params": best["params"],
        "val_loss": best["val_loss"],
        "test": test_metrics,
        "behavioural": evaluation["behavioural"],
        "promotion": decision,
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
        "ray_log_file": study["log_file"],
        "resumed": study["resumed"],
        "timings": timings,
    }
    publish_best_run(summary)
    if study["downloads"]:  # local copies of remote checkpoints: MLflow holds them now
        shutil.rmtree(study["downloads"], ignore_errors=True)
    timings["evaluation_s"] = time.time() - tuning_started - timings["tuning_s"]
    write_results(settings, summary)
    logger.info(
        "best run %s: val_loss %.4f, test F1 %.3f | %s",
        best["run_id"], best["val_loss"], test_metrics["f1"], format_params(best["params"]),
    )  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> dict:
    settings = parse_settings(
        TuneSettings, argv, prog="python -m flows.tune", description=tune_classifier.description or ""
    )
    with command_line_run(settings.verbose):
        summary = tune_classifier(settings)
    if settings.json_output:
        print(json.dumps(summary, indent=2))
    else:
        print(report.tune_summary(summary, time.time(), report.process_started_at()))
        if settings.results_fp:
            print(f"Full results: {settings.results_fp}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
