"""Batch scoring on a Ray cluster (RAY_ADDRESS): Ray Data reads the input, `map_batches` scores it
on a pool of actors that each load the model once, and the driver writes the scored chunks as
parts (tagifai.serving.batch_io), so that output, manifest and completion are those of a local run.

Order: Ray Data is told to preserve it, and the driver cuts the stream into chunks of exactly
`chunk_rows`, so the output equals a local run's row for row (probabilities up to float32's last bit:
a replica's batches group rows differently, and a batch is padded to its longest row). A resumed run skips writing the
parts it has, but the cluster scores the whole input again (Ray Data has no row offset to start
from); a local run scores only the missing chunks.

Ray is imported inside the functions: importing this module starts nothing and needs no cluster.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator

import pyarrow as pa
import pyarrow.csv as pacsv

from tagifai.errors import DataError
from tagifai.serving.batch import ScoringJob, load_model, score_table
from tagifai.serving.batch_io import TEXT_COLUMNS, conform

NODE_COLUMN = "_scored_on_node"
ACTORS_START_S = 600  # replicas load the model (and start Python) on busy nodes
MAX_BLOCKS = 10_000


class ChunkScorer:
    """A Ray Data actor: loads the model once, then scores every batch it is given."""

    def __init__(self, job_fields: dict):
        import ray

        self.fields = job_fields
        self.model = load_model(job_fields["load_uri"], job_fields["tracking_uri"])
        self.node_id = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: pa.Table) -> pa.Table:
        fields = self.fields
        table = conform(batch, fields["schema"], "the input")
        scored = score_table(self.model, table, fields["keep_columns"], fields["version"], fields["probabilities"],
                             fields["batch_rows"])  # fmt: skip
        return scored.append_column(NODE_COLUMN, pa.array([self.node_id] * scored.num_rows, pa.string()))


def read_dataset(job: ScoringJob, actors: int):
    """The input as a Ray Dataset of the columns scoring needs, files in name order, in blocks of
    about one batch (a single file would otherwise be one block, scored by one actor alone)."""
    import ray.data

    source = job.source
    blocks = max(actors, min(MAX_BLOCKS, math.ceil(job.total_rows / job.settings.batch_rows)))
    formats = {source.format(path) for path in source.files}
    # Reading is light next to scoring: read tasks ask for no CPU, so that actors may hold them all.
    remote = {"num_cpus": 0}
    if formats == {"parquet"}:
        return ray.data.read_parquet(source.files, filesystem=source.filesystem, columns=job.columns,
                                     ray_remote_args=remote, override_num_blocks=blocks)  # fmt: skip
    if formats == {"csv"}:
        convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in TEXT_COLUMNS}, include_columns=job.columns)
        parse = pacsv.ParseOptions(newlines_in_values=True)
        return ray.data.read_csv(source.files, filesystem=source.filesystem, convert_options=convert,
                                 parse_options=parse, ray_remote_args=remote, override_num_blocks=blocks)  # fmt: skip
    raise DataError(f"{job.settings.input} mixes CSV and Parquet parts: on a Ray cluster, give one format")


def cluster_chunks(job: ScoringJob, rows_by_node: dict, emit: Callable[[str], None]) -> Iterator[pa.Table]:
    """The scored input in chunks of `chunk_rows` rows, in input order; counts rows per node id."""
    import ray
    import ray.data

    joined = not ray.is_initialized()
    if joined:
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    try:
        yield from _scored_chunks(job, rows_by_node, emit)
    finally:
        if joined:
            ray.shutdown()


def _scored_chunks(job: ScoringJob, rows_by_node: dict, emit: Callable[[str], None]) -> Iterator[pa.Table]:
    import ray
    import ray.data

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    actors = job.settings.ray_actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
    emit(f"scoring on the Ray cluster at {os.environ['RAY_ADDRESS']} with {actors} model replica(s)")
    fields = {"load_uri": job.model_ref.load_uri, "tracking_uri": job.tracking_uri, "schema": job.schema,
              "keep_columns": job.settings.kept_columns(), "version": job.model_ref.version,
              "probabilities": job.probabilities, "batch_rows": job.settings.batch_rows}  # fmt: skip
    # Every replica loaded before the first batch is handed out: else the first one up takes all the work.
    context.wait_for_min_actors_s = ACTORS_START_S
    scored = read_dataset(job, actors).map_batches(
        ChunkScorer,
        fn_constructor_kwargs={"job_fields": fields},
        concurrency=actors,
        batch_size=job.settings.batch_rows,
        batch_format="pyarrow",
        num_cpus=1,
    )
    for chunk in scored.iter_batches(batch_size=job.settings.chunk_rows, batch_format="pyarrow"):
        for node_id, count in zip(*_value_counts(chunk.column(NODE_COLUMN))):
            rows_by_node[node_id] = rows_by_node.get(node_id, 0) + count
        yield chunk.drop_columns([NODE_COLUMN])


def _value_counts(column: pa.ChunkedArray) -> tuple[list, list]:
    counts = column.value_counts()
    return counts.field("values").to_pylist(), counts.field("counts").to_pylist()
