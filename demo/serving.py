"""What the demo serves: the model chosen from MLflow, where it came from, and a holder that
follows the registry's `champion` alias, loading a new champion in the background.

Swapping is one reference assignment of a fully loaded `Served`: a request that started on the
old model finishes on it, the next one gets the new model, and none waits for the load.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from demo.experiment import Experiment, load_experiment
from tagifai.errors import TrackingError
from tagifai.lifecycle import registry, tracking
from tagifai.lifecycle.database import redact
from tagifai.serving.loader import LoadedModel, load_model

logger = logging.getLogger(__name__)
TRAIN_COMMAND = "python -m flows.tune"


@dataclass
class Provenance:
    """What the page says about the served model, so a prediction can be traced to its run."""

    run_id: str
    experiment_name: str
    chosen_by: str
    backbone: str
    model_name: Optional[str] = None  # set when the model came from the registry
    version: Optional[str] = None
    alias: Optional[str] = None
    hyperparameters: dict = field(default_factory=dict)
    epoch: Optional[int] = None
    val_loss: Optional[float] = None
    val_f1: Optional[float] = None
    test_f1: Optional[float] = None
    trained_at: str = "unknown"

    def to_markdown(self) -> str:
        def number(value: Optional[float]) -> str:
            return "not recorded" if value is None else f"{value:.4f}"

        params = ", ".join(f"{k}={v:.4g}" for k, v in sorted(self.hyperparameters.items())) or "not recorded"
        registered = f"`{self.model_name}` version {self.version}" if self.version else "not registered"
        if self.alias:
            registered += f" (alias `{self.alias}`)"
        rows = [
            ("Registered model", registered),
            ("MLflow run", f"`{self.run_id}`"),
            ("Experiment", self.experiment_name),
            ("Chosen as", self.chosen_by),
            ("Backbone", f"`{self.backbone}`"),
            ("Hyperparameters", params),
            ("Best epoch", "not recorded" if self.epoch is None else str(self.epoch)),
            ("Validation loss", number(self.val_loss)),
            ("Validation F1", number(self.val_f1)),
            ("Test F1", number(self.test_f1)),
            ("Trained", self.trained_at),
        ]
        return "\n".join(f"- **{name}**: {value}" for name, value in rows)


@dataclass
class Served:
    predictor: LoadedModel
    provenance: Provenance
    experiment: Optional[Experiment]
    loaded_at: str

    def info(self) -> dict:
        p = self.provenance
        return {"run_id": p.run_id, "model_name": p.model_name, "version": p.version, "alias": p.alias,
                "loaded_at": self.loaded_at}  # fmt: skip


def existing_store_uri(tracking_uri: Optional[str]) -> str:
    """The URI to serve from, as training resolves it, but never created: an empty store has no model."""
    uri = tracking.configured_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.exists():
            command = TRAIN_COMMAND + (f" --tracking-uri {uri}" if tracking_uri else "")
            raise TrackingError(
                f"no MLflow store at {path}: no model has been trained there yet. Train one first: {command}"
            )
    return uri


def choose_run(
    client, run_id: Optional[str], experiment_name: str, model_name: str
) -> tuple[str, str, Optional[object]]:
    """(run to serve, why, its champion model version or None): the explicit id, else the
    registered model's champion, else the experiment's best run."""
    if run_id:
        return run_id, "--run-id", None
    version = registry.champion(client, model_name)
    if version is not None:
        return version.run_id, f"registered model {model_name!r}, alias {tracking.CHAMPION_ALIAS!r}", version
    best = tracking.best_run_id(client, experiment_name)
    return best, f"lowest validation loss in experiment {experiment_name!r}", None


def describe_run(client, run, args: dict, chosen_by: str, version=None, model_name: Optional[str] = None) -> Provenance:
    metrics = run.data.metrics
    experiment = client.get_experiment(run.info.experiment_id)
    started = datetime.fromtimestamp(run.info.start_time / 1000, tz=timezone.utc) if run.info.start_time else None
    return Provenance(
        run_id=run.info.run_id,
        experiment_name=experiment.name if experiment else run.info.experiment_id,
        chosen_by=chosen_by,
        backbone=str(args.get("backbone", "unknown")),
        model_name=model_name if version is not None else None,
        version=str(version.version) if version is not None else None,
        alias=tracking.CHAMPION_ALIAS if version is not None else None,
        hyperparameters=dict(args.get("hyperparameters") or {}),
        epoch=args.get("epoch"),
        val_loss=metrics.get("best_val_loss", args.get("val_loss")),
        val_f1=args.get("val_f1"),
        test_f1=metrics.get("test_f1"),
        trained_at=started.strftime("%Y-%m-%d %H:%M UTC") if started else "unknown",
    )


def load_served(
    tracking_uri: str, run_id: Optional[str], experiment_name: str, model_name: str, with_experiment: bool = True
) -> Served:
    """The chosen model in memory, its provenance and (optionally) its tuning session's trials."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    run_id, chosen_by, version = choose_run(client, run_id, experiment_name, model_name)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise TrackingError(
            f"MLflow run {run_id!r} does not exist in {redact(tracking_uri)}; check the id "
            "(mlflow ui lists the runs) or leave out --run-id to serve the best run"
        ) from None
    # The version itself rather than the alias: the alias may move while this loads, and the page
    # must describe what it serves.
    uri = f"models:/{model_name}/{version.version}" if version is not None else f"runs:/{run_id}"
    predictor = load_model(tracking_uri, uri)
    provenance = describe_run(client, run, predictor.args, chosen_by, version, model_name)
    experiment = load_experiment(tracking_uri, run_id) if with_experiment else None
    loaded_at = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return Served(predictor, provenance, experiment, loaded_at)


class ModelHolder:
    """The served model. With `follow_alias`, a background thread checks the registry's champion
    every `interval_s` seconds and, when it moved, loads the new one and then swaps it in."""

    def __init__(self, served: Served, check_champion: Optional[Callable[[], Optional[str]]] = None,
                 load: Optional[Callable[[], Served]] = None, interval_s: float = 0):  # fmt: skip
        self.current = served
        self._check_champion, self._load, self.interval_s = check_champion, load, interval_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def follows(self) -> bool:
        return self._check_champion is not None and self.interval_s > 0

    def reload_if_moved(self) -> bool:
        """Load and swap in the champion if the alias points elsewhere than what is served."""
        champion_version = self._check_champion()
        if champion_version is None or champion_version == self.current.provenance.version:
            return False
        logger.info("champion moved to version %s: loading it", champion_version)
        served = self._load()
        self.current = served  # the swap: one assignment, the old model keeps answering until here
        logger.info("now serving version %s (run %s)", served.provenance.version, served.provenance.run_id)
        return True

    def start(self) -> None:
        if self.follows and self._thread is None:
            self._thread = threading.Thread(target=self._follow, name="follow-champion", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _follow(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.reload_if_moved()
            except Exception:  # a registry or load failure must not stop serving the current model
                logger.exception("could not check or load the champion; still serving version %s",
                                 self.current.provenance.version)  # fmt: skip


def holder_for(tracking_uri: str, run_id: Optional[str], experiment_name: str, model_name: str,
               reload_interval_s: float) -> ModelHolder:  # fmt: skip
    """The served model, following the champion alias unless a run was named."""
    from mlflow.tracking import MlflowClient

    def load() -> Served:
        return load_served(tracking_uri, None, experiment_name, model_name)

    served = load_served(tracking_uri, run_id, experiment_name, model_name)
    if run_id or reload_interval_s <= 0:
        return ModelHolder(served)

    def champion_version() -> Optional[str]:
        version = registry.champion(MlflowClient(tracking_uri), model_name)
        return str(version.version) if version is not None else None

    return ModelHolder(served, champion_version, load, reload_interval_s)
