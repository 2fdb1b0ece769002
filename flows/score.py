"""Score every row of a file (or folder, URL, s3:// object) with a registered MLflow Model.

    python -m flows.score --input rows.csv --output scores.parquet [--model-uri models:/tagifai@champion]

With RAY_ADDRESS set, the scoring runs on that Ray cluster. A killed run resumes when the same
command is run again; a completed output is refused unless --overwrite.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from prefect import flow

from flows.cli import command_line_run, parse_settings
from tagifai.lifecycle import tracking
from tagifai.settings import ScoreSettings
from tasks.score import publish_summary, score_rows


@flow(name="score-batch")
def score_batch(settings: ScoreSettings) -> dict:
    """Tag every row of a file with a registered model: read, predict, write, in resumable chunks."""
    tracking_uri = tracking.resolve_tracking_uri(settings.tracking_uri)
    tracking.check_reachable(tracking_uri)
    summary = score_rows(settings, tracking_uri)
    publish_summary(summary)
    if settings.results_fp:
        Path(settings.results_fp).parent.mkdir(parents=True, exist_ok=True)
        Path(settings.results_fp).write_text(json.dumps(summary, indent=2))
    return summary


def summary_line(summary: dict) -> str:
    return (
        f"{summary['rows_scored']:,} of {summary['rows_read']:,} rows scored with {summary['model_uri']} "
        f"(version {summary['model_version']}), {summary['rows_rejected']:,} rejected, "
        f"{summary['rows_per_s']:,.0f} rows/s -> {summary['output']}"
    )


def main(argv: list[str] | None = None) -> dict:
    settings = parse_settings(
        ScoreSettings, argv, prog="python -m flows.score", description=score_batch.description or ""
    )
    with command_line_run():
        summary = score_batch(settings)
    print(json.dumps(summary, indent=2) if settings.json_output else summary_line(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
