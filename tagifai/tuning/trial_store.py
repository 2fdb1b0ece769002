"""A trial's durable record: every epoch it reported, its best checkpoint, whether it finished.

Why not Ray Tune's own checkpoint bookkeeping: Tune deletes a trial's older checkpoint as soon as
a newer one registers (`num_to_keep`), but writes the experiment-state snapshot that names the
checkpoints only every ~10 s and uploads it in the background. A flow killed in between leaves a
snapshot naming a checkpoint that no longer exists (the restored trial then fails with "Could not
recover from checkpoint as it does not exist on storage anymore") and missing the epochs since the
snapshot, so a trial that had finished is run again.

Here the trial itself keeps its record, in the experiment folder (a local path or an s3:// URI),
with an update order that leaves a consistent record whenever the process dies:

1. a new best checkpoint is written whole into its own folder (`checkpoint-<epoch>`);
2. `record.json` is replaced in one step (a rename, or one object PUT) to name it;
3. only then is the previous checkpoint deleted.

A kill before 2 leaves the old record with its old checkpoint intact (the new folder is an orphan,
removed at the next update); a kill after 2 leaves the new record with its new checkpoint. Tune is
given no checkpoints at all: a restarted trial reads this record, continues from its best checkpoint,
or, when the record says it finished, reports its last epoch again and stops.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pyarrow.fs as pafs

from tagifai.tuning.storage import join, open_storage

RECORD_FILE = "record.json"
CHECKPOINT_PREFIX = "checkpoint-"
RECORDS_DIR = "trial_records"


@dataclass
class TrialRecord:
    epochs: list[dict] = field(default_factory=list)  # the metrics of every epoch, in order
    best_checkpoint: Optional[str] = None  # folder name, e.g. checkpoint-000003
    finished: bool = False  # the trial trained its last epoch

    @property
    def last_checkpoint_epoch(self) -> int:
        return checkpoint_epoch(self.best_checkpoint) if self.best_checkpoint else 0

    def metrics_of(self, epoch: int) -> Optional[dict]:
        return next((m for m in self.epochs if m["epoch"] == epoch), None)


def checkpoint_epoch(name: str) -> int:
    return int(name.removeprefix(CHECKPOINT_PREFIX))


class TrialStore:
    """The record of one trial, under `<experiment folder>/trial_records/<trial id>/`."""

    def __init__(self, experiment_uri: str, trial_id: str):
        self.filesystem, root = open_storage(experiment_uri)
        self.path = join(root, RECORDS_DIR, trial_id)
        self.is_local = isinstance(self.filesystem, pafs.LocalFileSystem)

    def read(self) -> Optional[TrialRecord]:
        try:
            with self.filesystem.open_input_stream(join(self.path, RECORD_FILE)) as stream:
                return TrialRecord(**json.loads(stream.read()))
        except FileNotFoundError:
            return None

    def record_epoch(self, metrics: dict, save: Optional[Callable[[Path], None]], finished: bool) -> TrialRecord:
        """Add an epoch (replacing any later ones a resumed attempt is redoing) and, with `save`,
        make its checkpoint the best one, in the crash-safe order above."""
        record = self.read() or TrialRecord()
        record.epochs = [m for m in record.epochs if m["epoch"] < metrics["epoch"]] + [metrics]
        record.finished = finished
        if save is not None:
            name = f"{CHECKPOINT_PREFIX}{metrics['epoch']:06d}"
            self._write_checkpoint(save, name)
            record.best_checkpoint = name
        self._replace_record(record)
        self._remove_other_checkpoints(keep=record.best_checkpoint)
        return record

    def checkpoint_to_use(self, record: TrialRecord) -> Optional[str]:
        """The record's best checkpoint; if that folder has gone (deleted by hand, a storage
        glitch), the newest one that exists rather than an error; None when there is none."""
        existing = sorted(self._names(CHECKPOINT_PREFIX))
        if record.best_checkpoint in existing:
            return record.best_checkpoint
        return existing[-1] if existing else None

    def local_checkpoint(self, name: str, destination: Optional[Path] = None) -> Path:
        """Checkpoint `name` as a local folder: in place for local storage, else downloaded."""
        source = join(self.path, name)
        if self.is_local:
            return Path(source)
        destination = destination or Path(tempfile.mkdtemp(prefix="tagifai-checkpoint-"))
        destination.mkdir(parents=True, exist_ok=True)  # pyarrow creates no folder for an object store's files
        pafs.copy_files(source, str(destination), source_filesystem=self.filesystem)
        return destination

    def _names(self, prefix: str) -> list[str]:
        try:
            infos = self.filesystem.get_file_info(pafs.FileSelector(self.path))
        except FileNotFoundError:
            return []
        return [info.base_name for info in infos if info.base_name.startswith(prefix)]

    def _write_checkpoint(self, save: Callable[[Path], None], name: str) -> None:
        final = join(self.path, name)
        if self.is_local:  # written beside, then renamed: a folder appears whole or not at all
            partial = Path(join(self.path, f".partial-{uuid.uuid4().hex}"))
            save(partial)
            shutil.rmtree(final, ignore_errors=True)
            partial.rename(final)
            return
        with tempfile.TemporaryDirectory(prefix="tagifai-checkpoint-") as folder:
            save(Path(folder))
            self.filesystem.delete_dir_contents(final, missing_dir_ok=True)
            pafs.copy_files(folder, final, destination_filesystem=self.filesystem)

    def _replace_record(self, record: TrialRecord) -> None:
        self.filesystem.create_dir(self.path, recursive=True)
        content = json.dumps(record.__dict__, indent=1).encode()
        final = join(self.path, RECORD_FILE)
        if not self.is_local:  # one PUT: the object is replaced whole
            with self.filesystem.open_output_stream(final) as stream:
                stream.write(content)
            return
        partial = join(self.path, f".{RECORD_FILE}.{uuid.uuid4().hex}")
        with self.filesystem.open_output_stream(partial) as stream:
            stream.write(content)
        self.filesystem.move(partial, final)  # rename: atomic on a POSIX filesystem

    def _remove_other_checkpoints(self, keep: Optional[str]) -> None:
        for info in self.filesystem.get_file_info(pafs.FileSelector(self.path)):
            name = info.base_name
            leftover = name.startswith((".partial-", f".{RECORD_FILE}."))  # from a write cut short
            if leftover or (name.startswith(CHECKPOINT_PREFIX) and name != keep):
                if info.type == pafs.FileType.Directory:
                    self.filesystem.delete_dir(info.path)
                else:
                    self.filesystem.delete_file(info.path)
