"""Helpers of the batch-scoring tests: a registered keyword model, input files, the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from processes import REPO, running, tail

MODEL_CODE = Path(__file__).with_name("scoring_model.py")
TEST_MODEL_NAME = "score-test"
WORDS = ["image", "pixel", "deploy", "pipeline", "text", "token", "graph", "river", "data", "model"]


def register_keyword_model(tracking_uri: str, name: str = TEST_MODEL_NAME, alias: str = "champion") -> str:
    """Logs tests/scoring_model.py as an MLflow Model, registers it and points `alias` at it."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    experiment = mlflow.set_experiment("score-test")
    with mlflow.start_run(experiment_id=experiment.experiment_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            input_example=pd.DataFrame({"title": ["an image"], "description": ["pixels"]}),
            pip_requirements=["mlflow", "pandas", "numpy"],
        )
    version = mlflow.register_model(info.model_uri, name).version
    MlflowClient(tracking_uri).set_registered_model_alias(name, alias, version)
    return str(version)


def make_rows(count: int, seed: int = 0, start_id: int = 0) -> pd.DataFrame:
    """`count` projects with unique ids and keyword texts of varying length."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(count):
        title = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
        description = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 20)))
        rows.append({"id": start_id + i, "title": title, "description": description, "source": f"s{i % 7}"})
    return pd.DataFrame(rows)


def score_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "flows.score", *arguments]


def score_env(tmp_path: Path, **extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", PREFECT_LOGGING_LEVEL="INFO")
    env.setdefault("PREFECT_HOME", str(tmp_path / "prefect-home"))
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


@dataclass
class Finished:
    returncode: int
    output: str  # stdout and stderr together


def run_score(tmp_path: Path, *arguments: str, timeout: float = 300, **extra_env: str) -> Finished:
    """`python -m flows.score` in a session of its own; whatever it started (its temporary Prefect
    server) is stopped with it, also on a timeout."""
    log_path = tmp_path / f"score-{uuid.uuid4().hex[:8]}.log"
    with running(score_command(*arguments), log_path, score_env(tmp_path, **extra_env)) as process:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"python -m flows.score still running after {timeout}s\n{tail(log_path)}")
    return Finished(process.returncode, log_path.read_text(errors="replace"))
