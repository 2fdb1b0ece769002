"""Evaluate any MLflow run's checkpoint on any labelled CSV.

python -m flows.evaluate --run-id RUN --dataset-loc data.csv --results-fp metrics.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prefect import flow, get_run_logger

from flows import report
from flows.cli import command_line_run, parse_settings
from tagifai.behavioural import load_checks, run_checks, summary_line
from tagifai.evaluate import evaluate_frame
from tagifai.lifecycle import tracking
from tagifai.serving.loader import load_model
from tagifai.settings import EvaluateSettings
from tasks.load import load_data


@flow(name="evaluate-classifier")
def evaluate_classifier(settings: EvaluateSettings) -> dict:
    """Weighted and per-class precision, recall and F1 of a run's checkpoint on a labelled dataset,
    and its behavioural checks."""
    logger = get_run_logger()
    tracking_uri = tracking.resolve_tracking_uri(settings.tracking_uri)
    tracking.check_reachable(tracking_uri)
    checks = load_checks(settings.behavioural_checks)
    data = load_data(settings.dataset_loc)
    run_id = settings.run_id
    model = load_model(tracking_uri, f"runs:/{run_id}")
    metrics = evaluate_frame(model, data.frame)
    behavioural = run_checks(model, checks)
    result = {"run_id": run_id, "dataset_loc": data.source, "test": metrics, "behavioural": behavioural}
    if settings.results_fp:
        Path(settings.results_fp).parent.mkdir(parents=True, exist_ok=True)
        Path(settings.results_fp).write_text(json.dumps(result, indent=2))
    logger.info("run %s on %s: F1 %.3f over %d rows", run_id, data.source, metrics["f1"], metrics["num_samples"])
    logger.info("behavioural checks: %s", summary_line(behavioural))
    return result


def main(argv: list[str] | None = None) -> dict:
    settings = parse_settings(
        EvaluateSettings, argv, prog="python -m flows.evaluate", description=evaluate_classifier.description or ""
    )
    with command_line_run():
        result = evaluate_classifier(settings)
    print(json.dumps(result, indent=2) if settings.json_output else report.evaluate_summary(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
