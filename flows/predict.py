"""Predict the tag of one project from a tracked run (default: the experiment's best run).

    python -m flows.predict --title "..." --description "..." [--run-id RUN]

No Prefect and no Ray here: a prediction needs only MLflow and the model.
"""

from __future__ import annotations

import json
import sys

from mlflow.tracking import MlflowClient

from flows import report
from flows.cli import exit_on_user_error, parse_settings
from tagifai.lifecycle import tracking
from tagifai.serving.loader import load_model
from tagifai.settings import PredictSettings


def main(argv: list[str] | None = None) -> dict:
    settings = parse_settings(
        PredictSettings, argv, prog="python -m flows.predict", description="Predict a project's tag as JSON."
    )
    if not (settings.title.strip() or settings.description.strip()):
        sys.exit("error: give a --title and/or a --description to classify")
    with exit_on_user_error():
        tracking_uri = tracking.resolve_tracking_uri(settings.tracking_uri)
        tracking.check_reachable(tracking_uri)
        run_id = settings.run_id or tracking.best_run_id(MlflowClient(tracking_uri), settings.experiment_name)
        model = load_model(tracking_uri, f"runs:/{run_id}")
    result = {"run_id": run_id, **model.predict([settings.title], [settings.description])[0]}
    print(json.dumps(result, indent=2) if settings.json_output else report.predict_summary(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
