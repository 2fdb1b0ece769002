"""Ray's own output during a study goes to a log file in the run's folder, not the console.

What a person does not need on the console: Ray's start-up and token notices, Tune's bookkeeping
messages, and every trial worker's stdout/stderr (model-loading bars, library warnings), each line
prefixed `(run_trial pid=...)` with colour codes. They are written to the log file whose path
the flow prints once; Ray's errors still reach the console. `verbose=True` leaves Ray as it is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

RAY_LOGGERS = ("ray", "ray.data")  # the ones Ray gives console handlers of their own
WORKER_STREAM_HANDLER = "ray_print_logs"  # how Ray names its printer of worker output (Ray 2.x)
# The trials inherit the environment (of the driver, or of the head the driver joins): no progress
# bars from transformers or the hub there. Tune's newer console output prints its experiment banner
# even when silent; the classic one does not. MLflow prints a "View run ... at: <url>" line per
# finished trial run on a tracking server.
QUIET_WORKER_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "RAY_AIR_NEW_OUTPUT": "0",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "1",
}


@contextlib.contextmanager
def ray_logs_to(log_path: Path, verbose: bool) -> Iterator[None]:
    """Ray's driver-side logs go to `log_path` (errors also to the console) for the duration."""
    if verbose:
        yield
        return
    quiet_env = QUIET_WORKER_ENV
    saved_env = {name: os.environ.get(name) for name in quiet_env}
    os.environ.update(quiet_env)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log_path)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    errors = logging.StreamHandler(sys.stderr)
    errors.setLevel(logging.ERROR)
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate) for name in RAY_LOGGERS}
    for name in RAY_LOGGERS:
        logging.getLogger(name).handlers = [to_file, errors]
    try:
        yield
    finally:
        for name, (handlers, propagate) in saved.items():
            logging.getLogger(name).handlers, logging.getLogger(name).propagate = handlers, propagate
        to_file.close()
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def worker_output_to(log_path: Path, verbose: bool) -> Iterator[None]:
    """After ray.init: the workers' stdout/stderr lines go to `log_path` instead of the console.

    Ray hands every batch of worker output to the handlers of a dispatcher on the driver; this
    swaps its console printer for a file writer. If a Ray release renames that hook, the output
    stays on the console (noisier, nothing lost)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        dispatcher = None
    printers = [h for h in getattr(dispatcher, "handlers", []) if h[0] == WORKER_STREAM_HANDLER]
    if verbose or not printers:
        yield
        return
    lock = threading.Lock()
    with open(log_path, "a", encoding="utf-8") as log:

        def write(batch: dict) -> None:
            who = batch.get("actor_name") or batch.get("task_name") or "worker"
            with lock:
                for line in batch.get("lines", []):
                    log.write(f"({who} pid={batch.get('pid')}) {line}\n")
                log.flush()

        dispatcher.remove_handler(WORKER_STREAM_HANDLER)
        dispatcher.add_handler("tagifai_log_file", write)
        try:
            yield
        finally:
            dispatcher.remove_handler("tagifai_log_file")
            for name, handler in printers:
                dispatcher.add_handler(name, handler)
