"""The demo's micro-batcher alone: batches form from what queued up; answers and failures reach their own callers."""

from __future__ import annotations

import threading
import time

import pytest

from demo.micro_batch import MicroBatcher

WAIT_S = 60  # generous: the machine may be busy; a healthy run takes milliseconds


class HeldFirstBatch:
    """A run_batch that squares numbers, and holds its first batch until released, so that the test
    can queue more requests behind it."""

    def __init__(self, fail_on: int | None = None):
        self.release, self.started, self.fail_on = threading.Event(), threading.Event(), fail_on
        self.batches: list[list[int]] = []

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(items)
        self.started.set()
        assert self.release.wait(WAIT_S)
        if self.fail_on in items:
            raise ValueError(f"cannot square {self.fail_on}")
        return [item * item for item in items]


def wait_until(condition) -> None:
    for _ in range(WAIT_S * 100):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def test_requests_queued_during_a_batch_form_the_next_one_up_to_the_limit():
    run = HeldFirstBatch()
    batcher = MicroBatcher(run, max_batch_size=4)
    first = batcher.submit(0)
    assert run.started.wait(WAIT_S)
    queued = [batcher.submit(n) for n in range(1, 7)]
    wait_until(lambda: batcher.waiting == 6)
    run.release.set()
    assert first.result(WAIT_S) == 0
    assert [answer.result(WAIT_S) for answer in queued] == [n * n for n in range(1, 7)]
    assert run.batches == [[0], [1, 2, 3, 4], [5, 6]]
    assert list(batcher.batch_sizes) == [1, 4, 2]


def test_a_failing_batch_fails_its_own_requests_only():
    run = HeldFirstBatch(fail_on=3)
    batcher = MicroBatcher(run, max_batch_size=2)
    first = batcher.submit(1)
    assert run.started.wait(WAIT_S)
    failing, later = [batcher.submit(2), batcher.submit(3)], batcher.submit(4)
    wait_until(lambda: batcher.waiting == 3)
    run.release.set()
    assert first.result(WAIT_S) == 1
    for answer in failing:
        with pytest.raises(ValueError, match="cannot square 3"):
            answer.result(WAIT_S)
    assert later.result(WAIT_S) == 16  # the worker kept serving


def test_a_cancelled_request_is_left_out_of_its_batch():
    run = HeldFirstBatch()
    batcher = MicroBatcher(run, max_batch_size=8)
    first = batcher.submit(1)
    assert run.started.wait(WAIT_S)
    gone, kept = batcher.submit(2), batcher.submit(3)
    assert gone.cancel()  # the caller went away (an HTTP client disconnected)
    run.release.set()
    assert first.result(WAIT_S) == 1 and kept.result(WAIT_S) == 9
    assert run.batches == [[1], [3]]


def test_a_wrong_number_of_results_is_an_error_not_a_misrouted_answer():
    batcher = MicroBatcher(lambda items: items[:-1], max_batch_size=4)
    with pytest.raises(RuntimeError, match="returned 0 results for 1 items"):
        batcher.submit("a").result(WAIT_S)


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        MicroBatcher(lambda items: items, max_batch_size=0)
