"""The experiment folder of a study: one stable folder per (data, settings) under --storage-path,
held by one flow at a time, resumed by the next run of the same command until it is finished.
"""

from __future__ import annotations

import _thread
import contextlib
import fcntl
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tagifai.errors import StorageError
from tagifai.settings import TuneSettings, training_fingerprint
from tagifai.tuning import storage as storage_lib
from tagifai.tuning.lease import S3Lease

COMPLETE_MARKER = "tuning_complete.json"


@dataclass
class Claim:
    """The experiment folder a flow holds (a local path or a URI), and whether it still holds it."""

    uri: str
    lease: Optional[S3Lease] = None

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[1]

    @property
    def parent(self) -> str:
        return self.uri.rsplit("/", 1)[0]

    def check_held(self) -> None:
        if self.lease is not None and self.lease.lost.is_set():
            raise StorageError(f"another flow took over {self.uri} (its lease lapsed): this flow's results are void")


@contextlib.contextmanager
def claim_experiment_dir(storage: str, settings: TuneSettings, data_key: str) -> Iterator[Claim]:
    """A stable folder per (data, settings), held while in use.

    An interrupted run leaves its folder unfinished and free, so the same command resumes it; a
    finished folder (marker file) or one held by a concurrent flow is skipped for the next. A local
    folder is held with `flock` (the OS drops it when its process dies, even by SIGKILL); an s3://
    folder with a lease object that the flow keeps renewing (tagifai/tuning/lease.py).
    """
    parts = [training_fingerprint(settings), settings.experiment_name, data_key]
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()
    base = f"{settings.experiment_name}-{key[:10]}"
    claim = _claim_remote if storage_lib.is_remote(storage) else _claim_local
    with claim(storage_lib.resolve(storage), base) as held:
        yield held


@contextlib.contextmanager
def _claim_local(storage: str, base: str) -> Iterator[Claim]:
    Path(storage).mkdir(parents=True, exist_ok=True)
    attempt = 0
    while True:
        attempt += 1
        path = Path(storage) / f"{base}-{attempt}"
        if (path / COMPLETE_MARKER).exists():
            continue
        with open(Path(storage) / f".{path.name}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            yield Claim(str(path))
            return


@contextlib.contextmanager
def _claim_remote(storage: str, base: str) -> Iterator[Claim]:
    attempt = 0
    while True:
        attempt += 1
        uri = storage_lib.join(storage, f"{base}-{attempt}")
        if storage_lib.exists(storage_lib.join(uri, COMPLETE_MARKER)):
            continue
        lease = S3Lease(storage_lib.join(storage, f".{base}-{attempt}.lease"))
        if not lease.acquire():
            continue
        try:
            if storage_lib.exists(storage_lib.join(uri, COMPLETE_MARKER)):  # finished while we waited
                continue
            # Taken over: stop Tune as Ctrl-C would; check_held() then fails the study.
            lease.keep_alive(on_lost=_thread.interrupt_main)
            yield Claim(uri, lease)
            return
        finally:
            lease.release()
