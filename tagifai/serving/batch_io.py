"""Reading and writing for batch scoring, in bounded memory.

Input: a CSV or Parquet file, an http(s) URL, an s3:// object, or a folder (or prefix) of such
parts, read as a stream and cut into chunks of exactly `chunk_rows` rows, so that chunk k holds
the same rows in every run over the same input.

Output: one Parquet part per chunk, written under a temporary name and renamed, so that a part
either exists whole or not at all; a manifest, written before the first part, says which job the
parts belong to; completion is written last (the `_SUCCESS` marker of a folder, or the rename of
the single output file). A run killed at any moment leaves only whole parts, and the next run
scores only the chunks whose part is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tagifai.data import URL_TIMEOUT_S, _write_atomically, is_url
from tagifai.errors import DataError, SourceUnavailableError, UserError
from tagifai.settings import user_cache_dir
from tagifai.tuning.storage import open_storage

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
ID_COLUMN, TEXT_COLUMNS = "id", ("title", "description")
MANIFEST, SUCCESS = "_manifest.json", "_SUCCESS"
CSV_BLOCK_BYTES = 4 << 20  # the CSV reader's unit: memory stays at a few blocks whatever the file size
PARQUET_BATCH_ROWS = 8192


class OutputExistsError(UserError):
    """The output is complete, or is something other than this job's unfinished output."""


def file_format(path: str) -> Optional[str]:
    """csv or parquet from the name (a .gz/.bz2/.zst after .csv is decompressed on the fly)."""
    name = path.lower()
    for compressed in (".gz", ".bz2", ".zst"):
        name = name.removesuffix(compressed)
    return FORMATS.get(Path(name).suffix)


@dataclass
class InputSource:
    """The files to read, in order, on their filesystem."""

    loc: str
    filesystem: pafs.FileSystem
    files: list[str]

    def format(self, path: str) -> str:
        return file_format(path) or ""


def download_to_cache(url: str) -> str:
    """Streams `url` into the local cache (never whole in memory); returns the file's path."""
    name = Path(urllib.parse.urlsplit(url).path).name
    target = user_cache_dir() / "score-inputs" / f"{hashlib.sha256(url.encode()).hexdigest()[:24]}-{name}"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response, open(partial, "wb") as handle:
            shutil.copyfileobj(response, handle, 1 << 20)
    except urllib.error.HTTPError as error:
        partial.unlink(missing_ok=True)
        kind = SourceUnavailableError if error.code >= 500 else DataError
        raise kind(f"could not download {url}: HTTP {error.code} {error.reason}; check the URL") from None
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        partial.unlink(missing_ok=True)
        raise SourceUnavailableError(f"could not download {url}: {getattr(error, 'reason', error)}") from None
    os.replace(partial, target)
    return str(target)


def open_input(loc: str) -> InputSource:
    """The input's files: one file, or a folder's CSV/Parquet parts in name order."""
    local = download_to_cache(loc) if is_url(loc) else loc
    try:
        filesystem, path = open_storage(local)
        info = filesystem.get_file_info(path)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot open the input {loc}: {error}") from None
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"the input {loc} does not exist")
    if info.type == pafs.FileType.Directory:
        listing = filesystem.get_file_info(pafs.FileSelector(path, recursive=False))
        files = sorted(
            i.path for i in listing if i.is_file and not i.base_name.startswith(("_", ".")) and file_format(i.path)
        )
        if not files:
            raise DataError(f"the input folder {loc} has no .csv or .parquet files")
    else:
        if not file_format(path):
            raise DataError(f"the input {loc} is neither .csv nor .parquet (by its name)")
        files = [path]
    return InputSource(loc, filesystem, files)


def _file_batches(source: InputSource, path: str, columns: Optional[list[str]]) -> Iterator[pa.RecordBatch]:
    try:
        if source.format(path) == "parquet":
            with source.filesystem.open_input_file(path) as handle:
                yield from pq.ParquetFile(handle).iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns)
            return
        with source.filesystem.open_input_stream(path) as stream:
            convert = pacsv.ConvertOptions(
                column_types={name: pa.string() for name in TEXT_COLUMNS}, include_columns=columns or []
            )
            yield from pacsv.open_csv(
                stream,
                read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                parse_options=pacsv.ParseOptions(newlines_in_values=True),
                convert_options=convert,
            )
    except (pa.ArrowInvalid, OSError) as error:
        raise DataError(f"cannot read {path}: {str(error).splitlines()[0]}") from None


def file_columns(source: InputSource, path: str) -> list[str]:
    if source.format(path) == "parquet":
        try:
            with source.filesystem.open_input_file(path) as handle:
                return pq.ParquetFile(handle).schema_arrow.names
        except (pa.ArrowInvalid, OSError) as error:
            raise DataError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    for batch in _file_batches(source, path, None):
        return batch.schema.names
    raise DataError(f"{path} is empty: no header row")


def check_columns(source: InputSource, keep_columns: list[str]) -> list[str]:
    """The columns to read (id, title, description if present, kept ones); every file must have them."""
    needed = [ID_COLUMN, "title", *keep_columns]
    first = file_columns(source, source.files[0])
    for path in source.files:
        names = first if path == source.files[0] else file_columns(source, path)
        missing = [name for name in needed if name not in names]
        if missing:
            raise DataError(f"{path} has no {', '.join(repr(m) for m in missing)} column (it has: {', '.join(names)})")
    optional = ["description"] if "description" in first else []
    return list(dict.fromkeys([ID_COLUMN, "title", *optional, *keep_columns]))


def count_rows(source: InputSource, columns: list[str]) -> int:
    """Rows in the input (Parquet: from the footers; CSV: a parse of the id column, which also finds
    unreadable rows before anything is scored)."""
    total = 0
    for path in source.files:
        if source.format(path) == "parquet":
            with source.filesystem.open_input_file(path) as handle:
                total += pq.ParquetFile(handle).metadata.num_rows
        else:
            total += sum(batch.num_rows for batch in _file_batches(source, path, [ID_COLUMN]))
    return total


def target_schema(source: InputSource, columns: list[str]) -> pa.Schema:
    """The first file's types for id and kept columns, with title and description as text."""
    batch = next(_file_batches(source, source.files[0], columns), None)
    schema = batch.schema if batch is not None else pa.schema([(name, pa.string()) for name in columns])
    fields = [pa.field(f.name, pa.string() if f.name in TEXT_COLUMNS else f.type) for f in schema]
    if "description" not in schema.names:
        fields.append(pa.field("description", pa.string()))
    return pa.schema(fields)


def conform(batch: pa.RecordBatch | pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    """`batch` with exactly `schema`'s columns and types (a missing description is empty)."""
    table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
    if "description" not in table.column_names:
        table = table.append_column("description", pa.nulls(table.num_rows, pa.string()))
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        raise DataError(f"{where}: a column's values do not match the first file's types ({error})") from None


def iter_chunks(source: InputSource, columns: list[str], schema: pa.Schema, chunk_rows: int) -> Iterator[pa.Table]:
    """The input as tables of exactly `chunk_rows` rows (the last one shorter), in input order."""
    pending: list[pa.Table] = []
    filled = 0
    for path in source.files:
        for batch in _file_batches(source, path, columns):
            table = conform(batch, schema, path)
            while table.num_rows:
                take = min(chunk_rows - filled, table.num_rows)
                pending.append(table.slice(0, take))
                filled += take
                table = table.slice(take)
                if filled == chunk_rows:
                    yield pa.concat_tables(pending).combine_chunks()
                    pending, filled = [], 0
    if filled:
        yield pa.concat_tables(pending).combine_chunks()


class OutputStore:
    """The output's parts, manifest and completion. A .parquet/.csv output is assembled from parts
    kept in a hidden sibling folder; any other output is the folder of parts itself."""

    def __init__(self, output: str):
        self.path = Path(output).absolute()
        self.single_format = FORMATS.get(self.path.suffix.lower())
        single = self.single_format is not None
        self.parts_dir = self.path.with_name(f".{self.path.name}.parts") if single else self.path

    def completed(self) -> bool:
        return self.path.is_file() if self.single_format else (self.path / SUCCESS).exists()

    def refuse_if_complete(self) -> None:
        if self.completed():
            raise OutputExistsError(
                f"the output {self.path} exists (a completed run's, or another file); pass --overwrite to replace it"
            )

    def part_path(self, index: int) -> Path:
        return self.parts_dir / f"part-{index:06d}.parquet"

    def done_parts(self) -> set[int]:
        return {int(p.stem.removeprefix("part-")) for p in self.parts_dir.glob("part-*.parquet")}

    def prepare(self, job: dict, overwrite: bool) -> Optional[dict]:
        """Checks the output against `job` and records the job; returns the manifest of an unfinished
        run of the same job being resumed (None for a fresh start)."""
        if overwrite:
            self.remove()
        self.refuse_if_complete()
        if self.path.exists() and bool(self.single_format) != self.path.is_file():
            kind = "a folder" if self.path.is_dir() else "a file"
            raise OutputExistsError(f"the output {self.path} exists and is {kind}; choose another path")
        manifest_path = self.parts_dir / MANIFEST
        if manifest_path.exists():
            previous = json.loads(manifest_path.read_text())
            differs = [key for key in job if key != "model_version" and previous.get(key) != job[key]]
            if differs:
                raise OutputExistsError(
                    f"{self.path} holds an unfinished run of another job (different {', '.join(differs)}); "
                    "pass --overwrite to start over"
                )
            # a part, or the assembled file, that was being written when the run died
            stale = list(self.parts_dir.glob(".part-*"))
            if self.single_format:
                stale += self.path.parent.glob(f".{self.path.name}.*.tmp")
            for path in stale:
                path.unlink(missing_ok=True)
            return previous
        if self.parts_dir.exists() and any(self.parts_dir.iterdir()):
            raise OutputExistsError(f"the output {self.parts_dir} exists and is not empty; choose another path")
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(manifest_path, json.dumps(job, indent=2).encode())
        return None

    def write_part(self, index: int, table: pa.Table) -> None:
        final = self.part_path(index)
        temporary = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        pq.write_table(table, temporary)
        os.replace(temporary, final)

    def iter_parts(self, num_parts: int, columns: Optional[list[str]] = None) -> Iterator[pa.Table]:
        for index in range(num_parts):
            yield pq.read_table(self.part_path(index), columns=columns)

    def commit(self, num_parts: int, summary: dict) -> None:
        """Marks the output complete; refuses while any part is missing."""
        missing = [i for i in range(num_parts) if not self.part_path(i).exists()]
        if missing:
            raise RuntimeError(f"not completing {self.path}: parts {missing[:10]} are missing")
        if not self.single_format:
            _write_atomically(self.path / SUCCESS, json.dumps(summary, indent=2).encode())
            return
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        schema = pq.read_schema(self.part_path(0))
        writer_class = pq.ParquetWriter if self.single_format == "parquet" else pacsv.CSVWriter
        with writer_class(str(temporary), schema) as writer:
            for table in self.iter_parts(num_parts):
                writer.write_table(table)
        os.replace(temporary, self.path)  # the output is complete from this instant
        shutil.rmtree(self.parts_dir, ignore_errors=True)

    def remove(self) -> None:
        """Deletes a previous output: the file and its parts folder, or a folder's parts and markers."""
        if self.single_format:
            if self.path.is_file():
                self.path.unlink()
            shutil.rmtree(self.parts_dir, ignore_errors=True)
            return
        for pattern in ("part-*.parquet", ".part-*", MANIFEST, SUCCESS):
            for path in self.parts_dir.glob(pattern):
                path.unlink()
