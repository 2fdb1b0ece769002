"""Prefect tasks: score a file in chunks (retried: a retry resumes from the parts already written)
and publish the summary as an artifact."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tagifai.errors import SourceUnavailableError, UserError
from tagifai.serving.batch import score_batch
from tagifai.settings import ScoreSettings
from tasks.retries import raised


def retry_unless_user_error(task, task_run, state) -> bool:
    """A bad input fails at once; a download or storage hiccup (or any crash) is worth another try."""
    error = raised(state)
    return isinstance(error, SourceUnavailableError) or (error is not None and not isinstance(error, UserError))


# No Prefect cache: the output on disk is the cache. Its manifest and parts make a rerun (or a
# retry) score only what is missing, and a completed output is refused, not silently served.
@task(name="score-rows", retries=2, retry_delay_seconds=[5, 20], retry_condition_fn=retry_unless_user_error,
      cache_policy=NO_CACHE)  # fmt: skip
def score_rows(settings: ScoreSettings, tracking_uri: str) -> dict:
    """Every input row scored into the output; the summary of what the output holds."""
    return score_batch(settings, tracking_uri, get_run_logger().info)


@task(name="publish-scoring-summary", retries=2, retry_delay_seconds=[2, 5], cache_policy=NO_CACHE)
def publish_summary(summary: dict) -> None:
    lines = ["| | |", "|---|---|"]
    for name in ("input", "output", "model_uri", "model_version", "engine", "rows_read", "rows_scored",
                 "rows_rejected", "rows_per_s", "seconds", "chunks", "chunks_resumed"):  # fmt: skip
        lines.append(f"| {name} | {summary.get(name, '')} |")
    if summary.get("rows_by_node"):
        lines.append(f"| rows_by_node | {summary['rows_by_node']} |")
    if summary["rejected_ids"]:
        lines.append(f"\nRejected (empty title and description), first ids: {summary['rejected_ids'][:50]}")
    create_markdown_artifact(key="score-batch", markdown="# Batch scoring\n" + "\n".join(lines),
                             description=f"{summary['rows_scored']} rows scored into {summary['output']}")  # fmt: skip
