"""Batch scoring: every row of a file scored with an MLflow Model, in chunks, resumable after a kill.

The model is anything `mlflow.pyfunc.load_model` loads whose `predict(frame)` takes `title` and
`description` text columns and returns, one row per input row in order, `prediction` and one
`probability_<tag>` column per tag. Nothing else about it is assumed.

Rows whose title and description are both empty (missing, null or blank) are rejected, not
scored: they stay in the output, in their place, with a null prediction and null probabilities,
and their ids are listed in the summary. Any other value is scored as its text.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Optional

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from tagifai.errors import ModelError
from tagifai.lifecycle.database import redact
from tagifai.serving.batch_io import (
    ID_COLUMN,
    InputSource,
    OutputStore,
    check_columns,
    count_rows,
    iter_chunks,
    open_input,
    target_schema,
)
from tagifai.serving.loader import PROBABILITY_PREFIX, without_type_hint_advice
from tagifai.settings import ScoreSettings
from tagifai.tuning.display import format_seconds

PREDICTION, VERSION_COLUMN = "prediction", "model_version"
MAX_LISTED_REJECTED = 1000  # ids listed in the summary; the output itself marks every rejected row
_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))$")


@dataclass
class ModelRef:
    """The model asked for, the URI that loads exactly the version it resolved to, and that version."""

    uri: str
    load_uri: str
    version: str
    name: Optional[str] = None


def resolve_model(model_uri: str, tracking_uri: str, pinned_version: Optional[str] = None) -> ModelRef:
    """Resolve a registry alias or version to one registered version (so that an alias moved
    mid-run cannot mix versions); `pinned_version` keeps a resumed run on its first version."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    match = _REGISTRY_URI.match(model_uri)
    if not match:  # a run's or logged model's URI, or a path: the URI is its own version
        return ModelRef(model_uri, model_uri, model_uri)
    name = match["name"]
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        if pinned_version:
            version = client.get_model_version(name, pinned_version).version
        elif match["alias"]:
            version = client.get_model_version_by_alias(name, match["alias"]).version
        elif match["version"] == "latest":
            version = str(max(int(v.version) for v in client.search_model_versions(f"name='{name}'")))
        else:
            version = client.get_model_version(name, match["version"]).version
    except (MlflowException, ValueError) as error:
        raise ModelError(
            f"model {model_uri} is not in the registry at {redact(tracking_uri)} "
            f"({str(error).splitlines()[0]}); check --model-uri and --tracking-uri"
        ) from None
    return ModelRef(model_uri, f"models:/{name}/{version}", str(version), name)


def load_model(load_uri: str, tracking_uri: str):
    """The pyfunc model; registry URIs are resolved through `tracking_uri`."""
    import mlflow
    import mlflow.pyfunc

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        with without_type_hint_advice():
            return mlflow.pyfunc.load_model(load_uri)
    except Exception as error:  # MLflow raises many kinds here; each means this model cannot be used
        raise ModelError(f"cannot load the model {load_uri}: {str(error).splitlines()[0]}") from None


def probability_columns(model) -> list[str]:
    """The model's probability columns, from one probe row; checks the output contract on the way."""
    out = model.predict(pd.DataFrame({"title": ["probe"], "description": [""]}))
    columns = list(getattr(out, "columns", []))
    if len(out) != 1 or not columns or columns[0] != PREDICTION:
        raise ModelError(f"the model's predict() must return a frame starting with '{PREDICTION}'; got {columns}")
    probabilities = [c for c in columns[1:] if str(c).startswith(PROBABILITY_PREFIX)]
    if not probabilities:
        raise ModelError(f"the model's predict() returned no '{PROBABILITY_PREFIX}<tag>' columns: {columns}")
    return probabilities


def score_table(
    model, table: pa.Table, keep_columns: list[str], version: str, probabilities: list[str], batch_rows: int
) -> pa.Table:
    """One output row per input row, in order: id, kept columns, prediction, probabilities, version."""
    titles = [value or "" for value in table.column("title").to_pylist()]
    descriptions = [value or "" for value in table.column("description").to_pylist()]
    scorable = [i for i, (t, d) in enumerate(zip(titles, descriptions)) if t.strip() or d.strip()]
    predictions: list[Optional[str]] = [None] * table.num_rows
    scores = {column: [None] * table.num_rows for column in probabilities}
    for start in range(0, len(scorable), batch_rows):
        rows = scorable[start : start + batch_rows]
        frame = pd.DataFrame({"title": [titles[i] for i in rows], "description": [descriptions[i] for i in rows]})
        out = model.predict(frame)
        if len(out) != len(rows):
            raise ModelError(f"the model returned {len(out)} rows for {len(rows)}: it must return one per row")
        for row, value in zip(rows, out[PREDICTION].tolist()):
            predictions[row] = str(value)
        for column in probabilities:
            column_scores = scores[column]
            for row, value in zip(rows, out[column].tolist()):
                column_scores[row] = float(value)
    columns = {ID_COLUMN: table.column(ID_COLUMN)}
    columns.update({name: table.column(name) for name in keep_columns if name != ID_COLUMN})
    columns[PREDICTION] = pa.array(predictions, pa.string())
    columns.update({name: pa.array(values, pa.float64()) for name, values in scores.items()})
    columns[VERSION_COLUMN] = pa.array([version] * table.num_rows, pa.string())
    return pa.table(columns)


class ChunkProgress:
    """One line per chunk: rows done/total, this run's rows/s, time left."""

    def __init__(self, total: int, already_done: int, emit: Callable[[str], None]):
        self.total, self.done, self.emit = total, already_done, emit
        self.scored_here, self.started = 0, time.monotonic()

    def rate(self) -> float:
        return self.scored_here / max(time.monotonic() - self.started, 1e-9)

    def chunk_done(self, rows: int) -> None:
        self.done += rows
        self.scored_here += rows
        rate = self.rate()
        left = format_seconds((self.total - self.done) / rate) if rate else "?"
        percent = 100.0 * self.done / max(self.total, 1)
        self.emit(f"scored {self.done:,}/{self.total:,} rows ({percent:.0f}%), {rate:,.0f} rows/s, {left} left")


@dataclass
class ScoringJob:
    """Everything checked before the first row is scored."""

    settings: ScoreSettings
    tracking_uri: str
    source: InputSource
    columns: list[str]
    schema: pa.Schema
    model_ref: ModelRef
    probabilities: list[str]
    total_rows: int
    store: OutputStore
    done: set[int]

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.total_rows / self.settings.chunk_rows)


def prepare_job(settings: ScoreSettings, tracking_uri: str, emit: Callable[[str], None]):
    """Every check that can fail on bad input, in order of cost, before any scoring: the output,
    the input and its columns, the model (loaded and probed once here, on a cluster too). Returns
    the job and the loaded model."""
    store = OutputStore(settings.output)
    if not settings.overwrite:
        store.refuse_if_complete()
    source = open_input(settings.input)
    keep = settings.kept_columns()
    columns = check_columns(source, keep)
    model_ref = resolve_model(settings.model_uri, tracking_uri)
    model = load_model(model_ref.load_uri, tracking_uri)
    probabilities = probability_columns(model)
    total_rows = count_rows(source, columns)
    job_record = dict(input=settings.input, model_uri=settings.model_uri, keep_columns=keep,
                      chunk_rows=settings.chunk_rows, rows=total_rows, model_version=model_ref.version)  # fmt: skip
    previous = store.prepare(job_record, settings.overwrite)
    if previous and previous["model_version"] != model_ref.version:
        emit(f"resuming with version {previous['model_version']}, which scored the first parts ({settings.model_uri} "
             f"is now version {model_ref.version}); --overwrite starts over with it")  # fmt: skip
        model_ref = resolve_model(settings.model_uri, tracking_uri, pinned_version=previous["model_version"])
        model = load_model(model_ref.load_uri, tracking_uri)
        probabilities = probability_columns(model)  # the pinned version's tags may differ from today's
    schema = target_schema(source, columns)
    job = ScoringJob(settings, tracking_uri, source, columns, schema, model_ref, probabilities, total_rows, store,
                     store.done_parts())  # fmt: skip
    return job, model


def local_chunks(job: ScoringJob, model) -> Iterator[Optional[pa.Table]]:
    """The scored chunks in order; None for a chunk whose part is already written (not scored again)."""
    for index, chunk in enumerate(iter_chunks(job.source, job.columns, job.schema, job.settings.chunk_rows)):
        if index in job.done:
            yield None
            continue
        yield score_table(model, chunk, job.settings.kept_columns(), job.model_ref.version, job.probabilities,
                          job.settings.batch_rows)  # fmt: skip


def score_batch(settings: ScoreSettings, tracking_uri: str, emit: Callable[[str], None]) -> dict:
    """Scores `settings.input` into `settings.output`: here, or with RAY_ADDRESS set on that Ray
    cluster (Ray Data read, map_batches on an actor pool, parts written here). The summary."""
    on_cluster = bool(os.environ.get("RAY_ADDRESS"))
    job, model = prepare_job(settings, tracking_uri, emit)
    if not on_cluster:
        return write_chunks(job, local_chunks(job, model), emit, {"engine": "local"})
    from tagifai.tuning.ray_scoring import cluster_chunks  # Ray stays out of a local run

    extra: dict = {"engine": "ray", "rows_by_node": {}}
    return write_chunks(job, cluster_chunks(job, extra["rows_by_node"], emit), emit, extra)


def write_chunks(
    job: ScoringJob, chunks: Iterable[Optional[pa.Table]], emit: Callable[[str], None], extra: dict
) -> dict:
    """Writes each new chunk as a part, then checks and commits the output; returns the summary
    (with `extra`, read after the last chunk)."""
    store, chunk_rows = job.store, job.settings.chunk_rows
    done_rows = sum(min(chunk_rows, job.total_rows - i * chunk_rows) for i in job.done if i < job.num_chunks)
    progress = ChunkProgress(job.total_rows, done_rows, emit)
    if job.done:
        emit(f"resuming: {len(job.done)} of {job.num_chunks} chunks were already written, {done_rows:,} rows")
    for index, scored in enumerate(chunks):
        if index in job.done or scored is None:
            continue
        store.write_part(index, scored)
        progress.chunk_done(scored.num_rows)
    summary = summarize(job, progress) | extra
    store.commit(job.num_chunks, summary)
    return summary


def summarize(job: ScoringJob, progress: ChunkProgress) -> dict:
    """Counts read back from the written parts: the summary describes what is on disk."""
    rows, scored, rejected = 0, 0, []
    for part in job.store.iter_parts(job.num_chunks, columns=[ID_COLUMN, PREDICTION]):
        rows += part.num_rows
        missing = pc.is_null(part.column(PREDICTION))
        scored += part.num_rows - (pc.sum(missing).as_py() or 0)
        if len(rejected) < MAX_LISTED_REJECTED:
            rejected += part.column(ID_COLUMN).filter(missing).to_pylist()
    if rows != job.total_rows:
        raise RuntimeError(f"the parts hold {rows} rows but the input has {job.total_rows}: not completing")
    return {
        "input": job.settings.input,
        "output": str(job.store.path),
        "model_uri": job.settings.model_uri,
        "model_version": job.model_ref.version,
        "rows_read": job.total_rows,
        "rows_scored": scored,
        "rows_rejected": rows - scored,
        "rejected_ids": rejected[:MAX_LISTED_REJECTED],
        "rows_per_s": round(progress.rate(), 1),
        "rows_scored_this_run": progress.scored_here,
        "seconds": round(time.monotonic() - progress.started, 2),
        "chunks": job.num_chunks,
        "chunks_resumed": len(job.done),
    }
