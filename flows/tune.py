"""The tuning flow: load → split → tokenize → tune → evaluate → register, as Prefect tasks.

    python -m flows.tune --help

Load, split and tokenize are cached across runs on their inputs (data checksums, not data
frames) and their source code, so a second run with the same data skips them. The tune task
retries by resuming its Ray Tune experiment from storage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Optional

from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import INPUTS, TASK_SOURCE, CacheKeyFnPolicy
from prefect.settings import temporary_settings

from tagifai import plots, tracking
from tagifai.data import DataError, LoadedData, SourceUnavailableError, Splits, load_dataset, read_source_bytes, split_dataset
from tagifai.evaluate import evaluate_frame
from tagifai.predict import Predictor
from tagifai.settings import TuneSettings, parse_settings
from tagifai.train import TokenizedData, tokenize_splits
from tagifai.model import ModelError, check_backbone
from tagifai.tune import ResourceError, tune_hyperparameters

# Errors whose message already says what is wrong and what to do: no traceback for these.
USER_ERRORS = (DataError, ModelError, tracking.TrackingError, ResourceError)

# For command-line runs without a Prefect server: the temporary server Prefect starts can take
# over its 20 s default to come up on a busy 2-core machine, and it cannot phone home offline.
CLI_PREFECT_DEFAULTS = {"server.ephemeral.startup_timeout_seconds": 180, "server.analytics_enabled": False}


class _HideUserErrorTracebacks(logging.Filter):
    """Prefect logs a failed run with its traceback; for a user error the message is the answer."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], USER_ERRORS):
            record.exc_info, record.exc_text = None, None
        return True


@contextlib.contextmanager
def command_line_run():
    """Prefect defaults for runs started from a terminal, user errors shown without tracebacks."""
    quiet = _HideUserErrorTracebacks()
    run_loggers = [logging.getLogger(name) for name in ("prefect.flow_runs", "prefect.task_runs")]
    for run_logger in run_loggers:
        run_logger.addFilter(quiet)
    try:
        with temporary_settings(set_defaults=CLI_PREFECT_DEFAULTS):
            yield
    finally:
        for run_logger in run_loggers:
            run_logger.removeFilter(quiet)


def _source_key(context, parameters) -> str:
    """Cache key of a data source: its content hash for a file, the URL itself for a URL."""
    loc = parameters.get("loc")
    labelled = parameters.get("labelled", True)
    if loc is None or str(loc).startswith(("http://", "https://")):
        return f"{loc}|labelled={labelled}"
    try:
        return f"{hashlib.sha256(read_source_bytes(str(loc))).hexdigest()}|labelled={labelled}"
    except DataError:  # unreadable: the task itself reports why; a failed run caches nothing
        return f"unreadable|{loc}"


def _retry_if_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except SourceUnavailableError:
        return True
    except Exception:
        return False
    return False


@task(
    name="load-dataset",
    retries=2,
    retry_delay_seconds=3,
    retry_condition_fn=_retry_if_transient,
    cache_policy=CacheKeyFnPolicy(cache_key_fn=_source_key) + TASK_SOURCE,
    persist_result=True,
)
def load_data(loc: Optional[str], labelled: bool = True) -> LoadedData:
    return load_dataset(loc, labelled=labelled)


@task(name="split-dataset", cache_policy=INPUTS - "data" - "holdout" + TASK_SOURCE, persist_result=True)
def split_data(
    data: LoadedData,
    holdout: Optional[LoadedData],
    data_key: str,
    seed: int,
    num_samples: Optional[int],
) -> Splits:
    return split_dataset(data.frame, holdout.frame if holdout else None, seed=seed, num_samples=num_samples)


@task(name="tokenize", cache_policy=INPUTS - "splits" + TASK_SOURCE, persist_result=True)
def tokenize_data(splits: Splits, data_key: str, backbone: str, max_length: int) -> TokenizedData:
    return tokenize_splits(splits, backbone, max_length)


@task(name="tune-hyperparameters", retries=1, retry_delay_seconds=5)
def tune_task(data: TokenizedData, settings: TuneSettings, tracking_uri: str, experiment_id: str, data_key: str):
    return tune_hyperparameters(data, settings, tracking_uri, experiment_id, data_key)


@task(name="evaluate-best")
def evaluate_task(checkpoint_dir: str, splits: Splits) -> dict:
    return evaluate_frame(Predictor(Path(checkpoint_dir)), splits.test)


@task(name="plot-results")
def plot_task(tracking_uri: str, best: dict, trials: list[dict], test_metrics: dict) -> dict:
    """Plots and the full evaluation logged to the best run; returns the plots' artifact URIs."""
    client = MlflowClient(tracking_uri)
    histories = {t["trial_id"]: tracking.metric_histories(client, t["run_id"]) for t in trials if t["run_id"]}
    with tempfile.TemporaryDirectory(prefix="tagifai-plots-") as folder:
        folder = Path(folder)
        confusion = test_metrics["confusion_matrix"]
        plots.plot_confusion_matrix(confusion["matrix"], confusion["labels"], folder / "confusion_matrix.png")
        plots.plot_per_class_f1(test_metrics["per_class"], folder / "per_class_f1.png")
        plots.plot_parallel_coordinates(trials, best["trial_id"], folder / "parallel_coordinates.png")
        plots.plot_learning_curves(histories, best["trial_id"], folder / "learning_curves.png")
        names = sorted(path.name for path in folder.glob("*.png"))
        tracking.log_files(client, best["run_id"], folder, "plots")
    client.log_dict(best["run_id"], test_metrics, "evaluation.json")
    base = client.get_run(best["run_id"]).info.artifact_uri.rstrip("/")
    return {name.removesuffix(".png"): f"{base}/plots/{name}" for name in names}


@task(name="register-best")
def register_task(tracking_uri: str, model_name: str, run_id: str, test_metrics: dict) -> str:
    client = MlflowClient(tracking_uri)
    tracking.mark_best(client, run_id, test_metrics)
    return tracking.register_best(client, model_name, run_id)


def _publish_artifacts(summary: dict) -> None:
    rows = [
        {k: trial[k] for k in ("trial_id", "run_id", "status", "epochs", "val_loss", "val_f1")} | trial["params"]
        for trial in summary["trials"]
    ]
    create_table_artifact(key="tuning-trials", table=rows, description="Every trial of this tuning run")
    test = summary["test"]
    per_class = "\n".join(
        f"| {tag} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
        for tag, m in test["per_class"].items()
    )
    params = "\n".join(f"- `{k}`: {v:.4g}" for k, v in summary["params"].items())
    slices = "\n".join(
        f"| {name} | {m['num_samples']} | " + (f"{m['f1']:.3f} |" if m["num_samples"] else "- |")
        for name, m in test["slices"].items()
    )
    plot_links = "\n".join(f"- {name}: `{uri}`" for name, uri in summary["plots"].items())
    create_markdown_artifact(
        key="best-run",
        description="Best run of this tuning run",
        markdown=(
            f"# Best run `{summary['run_id']}`\n\n"
            f"Experiment `{summary['experiment_name']}`, registered as `{summary['registered_model']}` "
            f"version {summary['model_version']} (alias `{tracking.CHAMPION_ALIAS}`).\n\n"
            f"Validation loss {summary['val_loss']:.4f}\n\n## Parameters\n{params}\n\n"
            f"## Test metrics (weighted)\nprecision {test['precision']:.3f}, recall {test['recall']:.3f}, "
            f"**F1 {test['f1']:.3f}** on {test['num_samples']} examples\n\n"
            f"| tag | precision | recall | F1 | support |\n|---|---|---|---|---|\n{per_class}\n\n"
            f"## Slices\n| slice | rows | F1 |\n|---|---|---|\n{slices}\n\n"
            f"## Plots (MLflow artifacts of the best run)\n{plot_links}\n"
        ),
    )


@flow(name="tune-classifier", log_prints=True)
def tune_classifier(settings: TuneSettings = TuneSettings()) -> dict:
    """Tune a transformer text classifier with Ray Tune, track it in MLflow, evaluate the best."""
    logger = get_run_logger()
    tracking_uri = tracking.resolve_tracking_uri(settings.tracking_uri)
    tracking.check_reachable(tracking_uri)
    check_backbone(settings.model, settings.trainable_layers)

    cached = {}
    state = load_data(settings.dataset_loc, return_state=True)
    data, cached["load"] = state.result(), state.name == "Cached"
    holdout = None
    if settings.holdout_loc:
        holdout = load_data(settings.holdout_loc)
    data_key = hashlib.sha256(
        json.dumps([data.fingerprint, holdout and holdout.fingerprint, settings.seed, settings.num_samples]).encode()
    ).hexdigest()
    state = split_data(data, holdout, data_key, settings.seed, settings.num_samples, return_state=True)
    splits, cached["split"] = state.result(), state.name == "Cached"
    logger.info(
        "data: %d train / %d validation / %d test rows, tags %s",
        len(splits.train), len(splits.val), len(splits.test), list(splits.class_to_index),
    )
    state = tokenize_data(splits, data_key, settings.model, settings.max_length, return_state=True)
    tokenized, cached["tokenize"] = state.result(), state.name == "Cached"
    logger.info("cached steps reused: %s", [name for name, hit in cached.items() if hit] or "none")

    # The store is written only once the inputs are known to be good: bad data leaves no trace.
    experiment_id = tracking.get_or_create_experiment(MlflowClient(tracking_uri), settings.experiment_name, tracking_uri)
    logger.info("MLflow: %s (experiment %r)", tracking_uri, settings.experiment_name)

    logger.info("tuning: %d trials x up to %d epochs", settings.num_runs, settings.num_epochs)
    study = tune_task(tokenized, settings, tracking_uri, experiment_id, data_key)
    if study["resumed"]:
        logger.info("resumed the interrupted Ray Tune experiment in %s", study["experiment_dir"])
    trials = study["trials"]
    finished = [t for t in trials if t["checkpoint_dir"] and t["run_id"]]
    if not finished:
        raise RuntimeError("no trial produced a checkpoint; see the Ray Tune errors above")
    best = min(finished, key=lambda t: t["val_loss"])

    logger.info("evaluating the best trial %s on %d test rows", best["trial_id"], len(splits.test))
    test_metrics = evaluate_task(best["checkpoint_dir"], splits)
    version = register_task(tracking_uri, settings.registered_model_name, best["run_id"], test_metrics)
    plot_uris = plot_task(tracking_uri, best, trials, test_metrics)

    summary = {
        "run_id": best["run_id"],
        "experiment_name": settings.experiment_name,
        "tracking_uri": tracking_uri,
        "registered_model": settings.registered_model_name,
        "model_version": version,
        "params": best["params"],
        "val_loss": best["val_loss"],
        "test": test_metrics,
        "trials": [{k: v for k, v in t.items() if k != "checkpoint_dir"} for t in trials],
        "plots": plot_uris,
        "cached": cached,
        "ray_experiment_dir": study["experiment_dir"],
        "resumed": study["resumed"],
    }
    _publish_artifacts(summary)
    if settings.results_fp:
        Path(settings.results_fp).parent.mkdir(parents=True, exist_ok=True)
        Path(settings.results_fp).write_text(json.dumps(summary, indent=2))
    logger.info(
        "best run %s: params %s, val_loss %.4f, test F1 %.3f",
        best["run_id"], best["params"], best["val_loss"], test_metrics["f1"],
    )
    return summary


def main(argv: list[str] | None = None) -> dict:
    settings = parse_settings(
        TuneSettings, argv, prog="python -m flows.tune", description=tune_classifier.description or ""
    )
    try:
        with command_line_run():
            summary = tune_classifier(settings)
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")
    print(json.dumps({k: summary[k] for k in ("run_id", "params", "val_loss", "test")}, indent=2))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
