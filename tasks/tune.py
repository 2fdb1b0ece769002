"""Prefect task: the Ray Tune study. A retry resumes the study's experiment from storage."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from tagifai.settings import TuneSettings
from tagifai.train import TokenizedData
from tagifai.tune import tune_hyperparameters

TRIAL_COLUMNS = ("trial_id", "run_id", "status", "epochs", "val_loss", "val_f1")


@task(name="tune-hyperparameters", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def tune_study(
    data: TokenizedData, settings: TuneSettings, tracking_uri: str, experiment_id: str, data_key: str
) -> dict:
    """Every trial, each with its MLflow run and best checkpoint; published as the `tuning-trials` table."""
    study = tune_hyperparameters(data, settings, tracking_uri, experiment_id, data_key)
    rows = [{k: trial[k] for k in TRIAL_COLUMNS} | trial["params"] for trial in study["trials"]]
    create_table_artifact(key="tuning-trials", table=rows, description="Every trial of this tuning run")
    return study
