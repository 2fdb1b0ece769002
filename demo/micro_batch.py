"""Requests that arrive together answered by one call: a micro-batcher for the demo's predictions.

One worker thread takes every request waiting (up to `max_batch_size`) and runs them as one batch;
requests that arrive meanwhile form the next batch. Nothing waits on a timer: a lone request runs
at once, and under load the batch grows to what queued up during the previous forward pass.

Why not Gradio's `batch=True` (cheaper per request, benchmarks/RESULTS.md section 8): there a
`gr.Error` raised for one request (an empty title and description) fails every request in its
batch, and the `validator=` hook that could refuse it before batching fails on batched events
(Gradio 6.31). Here each request is checked on its own before it joins a batch, so a bad request
gets its own message and its neighbours their answers.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

RECENT_BATCHES = 1_000  # sizes kept for inspection (tests, debugging)


class MicroBatcher(Generic[Item, Result]):
    """`submit(item)` returns a Future of `run_batch([..., item, ...])`'s answer for that item.

    `run_batch` takes a list of items and returns one result per item, in order. If it raises,
    every request of that batch gets the exception. The worker thread starts with the first
    request and is a daemon: it idles on an empty queue and ends with the process.
    """

    def __init__(self, run_batch: Callable[[list[Item]], Sequence[Result]], max_batch_size: int = 32):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self._run_batch, self.max_batch_size = run_batch, max_batch_size
        self._waiting: queue.SimpleQueue[tuple[Item, Future]] = queue.SimpleQueue()
        self._start_lock = threading.Lock()
        self._worker: threading.Thread | None = None
        self.batch_sizes: deque[int] = deque(maxlen=RECENT_BATCHES)

    @property
    def waiting(self) -> int:
        """Requests queued for the next batch (approximate while requests arrive)."""
        return self._waiting.qsize()

    def submit(self, item: Item) -> Future:
        answer: Future = Future()
        self._waiting.put((item, answer))
        if self._worker is None:
            with self._start_lock:
                if self._worker is None:
                    self._worker = threading.Thread(target=self._work, name="micro-batcher", daemon=True)
                    self._worker.start()
        return answer

    def _next_batch(self) -> list[tuple[Item, Future]]:
        batch = [self._waiting.get()]  # blocks until a request comes
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._waiting.get_nowait())
            except queue.Empty:
                break
        return batch

    def _work(self) -> None:
        while True:
            batch = [(item, answer) for item, answer in self._next_batch() if answer.set_running_or_notify_cancel()]
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            try:
                results = self._run_batch([item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
            except Exception as error:  # noqa: BLE001 - handed to the callers; the worker keeps serving
                for _, answer in batch:
                    answer.set_exception(error)
                continue
            for (_, answer), result in zip(batch, results):
                answer.set_result(result)
