"""Predict the tag of one project from a tracked run (default: the experiment's best run).

    python -m flows.predict --title "..." --description "..." [--run-id RUN]
"""

from __future__ import annotations

import json
import sys

from tagifai import tracking
from tagifai.predict import load_run_predictor
from tagifai.settings import PredictSettings, parse_settings
from flows.tune import USER_ERRORS


def main(argv: list[str] | None = None) -> dict:
    settings = parse_settings(
        PredictSettings, argv, prog="python -m flows.predict", description="Predict a project's tag as JSON."
    )
    if not (settings.title.strip() or settings.description.strip()):
        sys.exit("error: give a --title and/or a --description to classify")
    try:
        tracking_uri = tracking.resolve_tracking_uri(settings.tracking_uri)
        tracking.check_reachable(tracking_uri)
        predictor, run_id = load_run_predictor(tracking_uri, settings.run_id, settings.experiment_name)
    except USER_ERRORS as error:
        sys.exit(f"error: {error}")
    result = {"run_id": run_id, **predictor.predict([settings.title], [settings.description])[0]}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
