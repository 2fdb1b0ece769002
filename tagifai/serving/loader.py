"""The one way this project loads a model to serve: `load_model(tracking_uri, uri)`, used by the
demo, `flows.predict`, `flows.evaluate` and the promotion gate.

`uri` is `models:/NAME@ALIAS`, `models:/NAME/VERSION`, or `runs:/RUN_ID` (the MLflow Model logged
in that run). What loads is the registered MLflow Model itself (`mlflow.pyfunc.load_model`,
tagifai/serving/pyfunc_model.py), so the project serves exactly what an MLflow user gets. A
version or run from before models were logged (its source is the checkpoint folder, no MLmodel)
still loads, from the checkpoint, with a one-line warning.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from tagifai.errors import TrackingError

logger = logging.getLogger(__name__)
PROBABILITY_PREFIX = "probability_"


@contextlib.contextmanager
def without_type_hint_advice():
    """MLflow advises type hints on `predict` (a coloured UserWarning) each time the model's code is
    run, at logging and at every load; this model declares a signature instead. Dropped where
    warnings are shown: MLflow turns its UserWarnings back on ("once") around that code, past any filter."""
    with warnings.catch_warnings():
        show = warnings.showwarning

        def show_others(message, category, filename, lineno, file=None, line=None):
            if "Add type hints to the `predict` method" not in str(message):
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = show_others
        yield


class PyfuncScorer:
    """An MLflow pyfunc model behind the `predict_proba(titles, descriptions)` and `classes` that
    the project's consumers use; inputs over the model's row limit go in several calls."""

    def __init__(self, model):
        self.model = model
        columns = model.metadata.get_output_schema().input_names()
        self.classes = [c.removeprefix(PROBABILITY_PREFIX) for c in columns if c.startswith(PROBABILITY_PREFIX)]
        self.max_rows = model.unwrap_python_model().max_rows

    def predict_proba(self, titles: Sequence[str], descriptions: Sequence[str]) -> np.ndarray:
        frame = pd.DataFrame({"title": list(titles), "description": list(descriptions)})
        columns = [PROBABILITY_PREFIX + tag for tag in self.classes]
        parts = [
            self.model.predict(frame.iloc[start : start + self.max_rows])[columns].to_numpy()
            for start in range(0, len(frame), self.max_rows)
        ]
        return np.concatenate(parts) if parts else np.empty((0, len(self.classes)))


@dataclass
class LoadedModel:
    """A model in memory and where it came from. `args`: the checkpoint's arguments (backbone,
    hyperparameters, epoch, val_loss, val_f1), for provenance."""

    scorer: object  # PyfuncScorer, or a checkpoint Predictor for a model from before MLflow Models
    model_uri: str
    run_id: str
    version: Optional[str] = None
    args: dict = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return list(self.scorer.classes)

    @property
    def is_mlflow_model(self) -> bool:
        return isinstance(self.scorer, PyfuncScorer)

    def predict_proba(self, titles: Sequence[str], descriptions: Sequence[str]) -> np.ndarray:
        """Class probabilities, one row per input, columns in `classes` order."""
        return self.scorer.predict_proba(titles, descriptions)

    def predict(self, titles: Sequence[str], descriptions: Sequence[str]) -> list[dict]:
        from tagifai.serving.predictor import tag_probabilities, top_tags

        probabilities, classes = self.predict_proba(titles, descriptions), self.classes
        return [
            {"prediction": tag, "probabilities": tag_probabilities(row, classes)}
            for tag, row in zip(top_tags(probabilities, classes), probabilities)
        ]


def resolve(client, uri: str) -> tuple[str, Optional[str], Optional[str]]:
    """(run id, registered version or None, the MLflow Model's source or None when there is only a
    checkpoint) of a `models:/NAME@ALIAS`, `models:/NAME/VERSION` or `runs:/RUN_ID` URI."""
    from mlflow.exceptions import MlflowException

    from tagifai.lifecycle import registry

    if uri.startswith("runs:/"):
        run_id = uri.removeprefix("runs:/").strip("/")
        try:
            model_id = registry.run_model_id(client, run_id)
        except MlflowException:
            raise TrackingError(
                f"MLflow run {run_id!r} does not exist; check the id (mlflow ui lists the runs)"
            ) from None
        return run_id, None, f"models:/{model_id}" if model_id else None
    if not uri.startswith("models:/"):
        raise TrackingError(f"cannot load {uri!r}: give models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID")
    name, _, alias = uri.removeprefix("models:/").partition("@")
    if alias:
        version = registry.champion(client, name, alias)
        if version is None:
            raise TrackingError(f"registered model {name!r} has no alias {alias!r}; train or promote one first")
    else:
        name, _, number = name.partition("/")
        version = registry.get_version(client, name, number)
    source = version.source if str(version.source).startswith("models:/") else None
    return version.run_id, str(version.version), source


def download_model(client, source: str, folder: str) -> str:
    """The logged MLflow Model `models:/<model id>` as a local folder. Through its artifact location
    and this client's store: MLflow itself would look the id up in its global store."""
    import mlflow

    location = client.get_logged_model(source.removeprefix("models:/")).artifact_location
    return mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=folder, tracking_uri=client.tracking_uri)


def load_model(tracking_uri: str, uri: str) -> LoadedModel:
    """The model behind `uri` (see `resolve`), in memory."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from tagifai.lifecycle import tracking
    from tagifai.serving import packaging
    from tagifai.serving.predictor import Predictor

    client = MlflowClient(tracking_uri)
    run_id, version, source = resolve(client, uri)
    with tempfile.TemporaryDirectory(prefix="tagifai-model-") as folder:  # the model is in memory after
        if source is None:
            logger.warning("%s has no MLflow Model (registered before models were logged): loading its checkpoint", uri)
            predictor = Predictor(tracking.download_checkpoint(client, run_id, Path(folder)))
            return LoadedModel(predictor, uri, run_id, version, predictor.args)
        try:
            with without_type_hint_advice():
                model = mlflow.pyfunc.load_model(download_model(client, source, folder))
        except (MlflowException, OSError) as error:
            raise TrackingError(f"cannot load the MLflow Model of {uri} ({source}): {error}") from None
    args = (model.metadata.metadata or {}).get(packaging.METADATA_KEY, {})
    return LoadedModel(PyfuncScorer(model), uri, run_id, version, args)
