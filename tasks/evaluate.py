"""Prefect tasks: evaluate a checkpoint on the test rows, and log the evaluation and the study's
plots to the best MLflow run."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import pandas as pd
from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tagifai import plots
from tagifai.behavioural import load_checks, run_checks, summary_line
from tagifai.evaluate import evaluation_report
from tagifai.lifecycle import tracking
from tagifai.serving.predictor import Predictor, top_tags


@task(name="evaluate-best", cache_policy=NO_CACHE)
def evaluate_challenger(checkpoint_dir: str, test: pd.DataFrame, checks_path: Optional[str]) -> dict:
    """The best checkpoint on the test rows (the full report, and the predicted tag of each row for
    the gate's paired comparison) and on the behavioural checks."""
    # The local checkpoint, not tagifai/serving/loader.py: this model is not registered yet (its
    # MLflow Model is logged at registration, after this), and the MLflow Model's ONNX graph is
    # exported from this very checkpoint and checked against it, so both score alike (to ~1e-6).
    predictor = Predictor(Path(checkpoint_dir))
    probabilities = predictor.predict_proba(list(test["title"]), list(test["description"]))
    report = evaluation_report(test, probabilities, predictor.classes)
    behavioural = run_checks(predictor, load_checks(checks_path))
    get_run_logger().info("behavioural checks: %s", summary_line(behavioural))
    return {
        "test": report,
        "predicted": top_tags(probabilities, predictor.classes),
        "behavioural": behavioural,
    }


@task(name="log-evaluation", cache_policy=NO_CACHE)
def log_evaluation(tracking_uri: str, best: dict, trials: list[dict], test_metrics: dict) -> dict:
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
