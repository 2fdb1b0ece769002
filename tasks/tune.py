"""Prefect task: the Ray Tune study, shown as it runs. A retry resumes the study's experiment from storage."""

from __future__ import annotations

import sys

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from tagifai.batching import TokenizedData
from tagifai.errors import ResourceError
from tagifai.settings import TuneSettings
from tagifai.tuning.display import LiveTable, PlainLines
from tagifai.tuning.study import tune_hyperparameters
from tasks.retries import raised

TRIAL_COLUMNS = ("trial_id", "run_id", "status", "epochs", "val_loss", "val_f1")


def progress_display(logger):
    """A live table on a terminal, with the same plain lines sent to the Prefect API only; plain
    lines through the run's logger (console and API) everywhere else: pipes, files, workers."""
    if not sys.stderr.isatty():
        return PlainLines(logger.info)
    import logging

    from prefect.logging.handlers import APILogHandler
    from rich.console import Console

    api_only = logging.getLogger("tagifai.tuning.display")
    api_only.propagate = False
    if not any(isinstance(handler, APILogHandler) for handler in api_only.handlers):
        api_only.addHandler(APILogHandler())
    return LiveTable(Console(stderr=True), also=PlainLines(logging.LoggerAdapter(api_only, logger.extra).info))


def retry_unless_it_cannot_fit(task, task_run, state) -> bool:
    """Retry (resuming the study) after any failure but a study too big for the cluster, which a
    retry would refuse again."""
    error = raised(state)
    return error is not None and not isinstance(error, ResourceError)


@task(
    name="tune-hyperparameters",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=retry_unless_it_cannot_fit,
    cache_policy=NO_CACHE,
)
def tune_study(
    data: TokenizedData, settings: TuneSettings, tracking_uri: str, experiment_id: str, data_key: str
) -> dict:
    """Every trial, each with its MLflow run and best checkpoint; published as the `tuning-trials` table."""
    logger = get_run_logger()
    study = tune_hyperparameters(
        data, settings, tracking_uri, experiment_id, data_key, display=progress_display(logger), announce=logger.info
    )
    rows = [{k: trial[k] for k in TRIAL_COLUMNS} | trial["params"] for trial in study["trials"]]
    create_table_artifact(key="tuning-trials", table=rows, description="Every trial of this tuning run")
    return study
