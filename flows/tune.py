"""The tuning flow: load → split → tokenize → tune → evaluate → register → promote.

    python -m flows.tune --help

Load, split and tokenize are cached across runs (tasks/load.py, split.py, tokenize.py say on
what); the tune task retries by resuming its Ray Tune experiment from storage; the promotion gate
decides whether the new model replaces the champion (tagifai/lifecycle/promotion.py; tasks/promote.py
records the decision).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

if __name__ == "__main__":  # the command line: Ray's head comes up beside the imports below
    from flows.cli import start_ray_head_early

    start_ray_head_early(sys.argv[1:])

from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger

from flows import report
from flows.cli import command_line_run, exit_after_results, parse_settings
from tagifai.behavioural import load_checks
from tagifai.lifecycle import registry, tracking
from tagifai.lifecycle.promotion import GateRules
from tagifai.model import check_backbone
from tagifai.settings import TuneSettings, training_fingerprint
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


def write_results(settings: TuneSettings, summary: dict) -> dict:
    """The summary, written to --results-fp if given."""
    if settings.results_fp:
        Path(settings.results_fp).parent.mkdir(parents=True, exist_ok=True)
        Path(settings.results_fp).write_text(json.dumps(summary, indent=2))
    return summary


def preflight(settings: TuneSettings) -> tuple[str, MlflowClient]:
    """Fail in seconds, before any data is read, on what would otherwise fail after tuning: an
    unreachable tracking store, unusable storage, a backbone that does not load, a bad checks file.
    Returns the tracking URI (a local store is created here) and its client."""
    tracking_uri = tracking.resolve_tracking_uri(settings.tracking_uri)
    tracking.check_reachable(tracking_uri)
    check_storage(settings.storage_path)
    check_backbone(settings.model, settings.trainable_layers)
    load_checks(settings.behavioural_checks)
    return tracking_uri, MlflowClient(tracking_uri)


def data_key_of(data, holdout, settings: TuneSettings) -> str:
    """What the split, the tokens and the study depend on from the data: the bytes of the dataset
    and of the holdout, the seed and the row limit."""
    return key(data.fingerprint, holdout and holdout.fingerprint, settings.seed, settings.num_samples)


def unchanged_since(champion, settings: TuneSettings, data_key: str) -> Optional[str]:
    """With --skip-if-unchanged, why there is nothing to re-tune: the champion was trained on the
    same data with the same settings. None: tune."""
    if settings.skip_if_unchanged and champion:
        if registry.trained_on(champion) == (data_key, training_fingerprint(settings)):
            return f"champion version {champion.version} was trained on the same data with the same settings"
    return None


def skip(settings: TuneSettings, reason: str, champion, data_facts: dict, cached: dict) -> dict:
    """End the run early: say why, and write the short results of a skipped run."""
    get_run_logger().info("skipped: %s; nothing to re-tune (drop --skip-if-unchanged to tune anyway)", reason)
    return write_results(settings, report.skipped_results(reason, champion, data_facts, cached))


def best_of(trials: list[dict]) -> dict:
    """The finished trial (checkpoint and MLflow run) with the lowest validation loss."""
    finished = [t for t in trials if t["checkpoint_dir"] and t["run_id"]]
    if not finished:
        raise RuntimeError("no trial produced a checkpoint; see the Ray Tune errors above")
    return min(finished, key=lambda t: t["val_loss"])


@flow(name="tune-classifier", log_prints=True)
def tune_classifier(settings: TuneSettings = TuneSettings()) -> dict:
    """Tune a transformer text classifier with Ray Tune, track it in MLflow, evaluate the best, and
    promote it to champion if it beats the current one."""
    logger = get_run_logger()
    timings = {"flow_started_at": time.time()}
    tracking_uri, client = preflight(settings)
    cached = {}
    data, cached["load"] = run_cached(load_data, settings, settings.dataset_loc)
    holdout = load_data(settings.holdout_loc) if settings.holdout_loc else None
    data_key = data_key_of(data, holdout, settings)
    champion = registry.champion(client, settings.registered_model_name)
    if reason := unchanged_since(champion, settings, data_key):
        return skip(settings, reason, champion, report.data_facts(data, data_key), cached)

    splits, cached["split"] = run_cached(split_data, settings, data, holdout, data_key, settings.seed,
                                         settings.num_samples)  # fmt: skip
    tokenized, cached["tokenize"] = run_cached(tokenize_data, settings, splits, data_key, settings.model,
                                               settings.max_length)  # fmt: skip
    logger.info("%s", report.data_line(data, splits, cached))
    # Nothing is written to MLflow until the inputs are known to be good: bad data leaves no
    # experiment and no run behind (the pre-flight only opens the store, creating an empty local one).
    experiment_id = tracking.get_or_create_experiment(client, settings.experiment_name, tracking_uri,
                                                      settings.artifact_location)  # fmt: skip
    logger.info("%s", report.tuning_line(settings, tracking_uri))
    timings["data_s"] = time.time() - timings["flow_started_at"]
    tuning_started = time.time()
    study_settings = starting_from_champion(settings, client, champion)
    study = tune_study(tokenized, study_settings, tracking_uri, experiment_id, data_key)
    timings["tuning_s"] = time.time() - tuning_started
    if study["resumed"]:
        logger.info("resumed the interrupted Ray Tune experiment in %s", study["experiment_dir"])
    best = best_of(study["trials"])

    logger.info("evaluating the best trial %s on %d test rows", best["trial_id"], len(splits.test))
    evaluation = evaluate_challenger(best["checkpoint_dir"], splits.test, settings.behavioural_checks)
    version = register_best(tracking_uri, settings.registered_model_name, best["run_id"], best["checkpoint_dir"],
                            evaluation["test"], data_key, training_fingerprint(settings))  # fmt: skip
    rules = GateRules(settings.min_improvement, settings.max_class_drop, settings.force_promote)
    decision = promote_if_better(tracking_uri, settings.registered_model_name, version, evaluation, splits.test, rules,
                                 settings.seed)  # fmt: skip
    plot_uris = log_evaluation(tracking_uri, best, study["trials"], evaluation["test"])

    summary = report.tune_results(settings, tracking_uri, study, best, evaluation, version, decision, plot_uris,
                                  report.data_facts(data, data_key, splits), cached, timings)  # fmt: skip
    publish_best_run(summary)
    if study["downloads"]:  # local copies of remote checkpoints: MLflow holds them now
        shutil.rmtree(study["downloads"], ignore_errors=True)
    timings["evaluation_s"] = time.time() - tuning_started - timings["tuning_s"]
    write_results(settings, summary)
    logger.info("%s", report.best_line(best, evaluation["test"]))
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
    exit_after_results()
