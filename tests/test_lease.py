"""The experiment-folder lease on a real S3 server (tests/services.py): a live holder keeps it, a
dead one loses it after the TTL, exactly one of many racing flows wins, and flows in separate
processes, one of them SIGKILLed, end up in the folders the local `flock` would give them."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tagifai.tuning.claim import COMPLETE_MARKER
from tagifai.tuning.lease import TTL_ENV, S3Lease
from tagifai.tuning.storage import s3_client, write_text

TTL_S = 3.0


def lease_uri(bucket: str, name: str = "study-1") -> str:
    return f"s3://{bucket}/studies/.{name}.lease"


def test_a_live_lease_sends_the_next_flow_away_and_a_released_one_is_taken_at_once(s3_bucket):
    holder = S3Lease(lease_uri(s3_bucket), ttl_s=TTL_S)
    assert holder.acquire()
    holder.keep_alive(on_lost=lambda: None)
    try:
        waits = []
        started = time.monotonic()
        assert not S3Lease(lease_uri(s3_bucket), ttl_s=TTL_S).acquire(on_wait=waits.append)
        # It saw a heartbeat (every TTL/6) rather than waiting out the TTL.
        assert time.monotonic() - started < TTL_S, time.monotonic() - started
        assert len(waits) == 1 and f"pid {os.getpid()}" in waits[0] and "waiting up to 3 s" in waits[0]
    finally:
        holder.release()
    assert not holder.lost.is_set()
    started = time.monotonic()
    assert S3Lease(lease_uri(s3_bucket), ttl_s=TTL_S).acquire(on_wait=pytest.fail)
    assert time.monotonic() - started < 1.0


def test_a_lease_whose_heartbeat_stopped_is_taken_over_after_the_ttl_and_the_old_holder_learns_it(s3_bucket):
    dead = S3Lease(lease_uri(s3_bucket), ttl_s=TTL_S)
    assert dead.acquire()  # and never renewed: its process was killed
    started = time.monotonic()
    waits = []
    successor = S3Lease(lease_uri(s3_bucket), ttl_s=TTL_S)
    assert successor.acquire(on_wait=waits.append)
    assert time.monotonic() - started >= TTL_S and len(waits) == 1
    assert successor.read()[1]["owner"] == successor.owner

    # A holder that was only cut off (not dead) finds out at its next heartbeat and stops.
    lost = threading.Event()
    dead.keep_alive(on_lost=lost.set)
    assert lost.wait(TTL_S), "the old holder never noticed that it lost the lease"
    dead.release()  # does not touch the successor's lease
    assert successor.read()[1]["owner"] == successor.owner and not successor.read()[1]["released"]


def race(uri: str, delays: list[float], ttl_s: float, client) -> list[str]:
    """Contenders for `uri`, released together, each starting after its delay; a winner keeps its
    lease alive, as a flow does, until every contender has decided. The owners that won."""
    winners, barrier = [], threading.Barrier(len(delays))

    def contend(delay: float) -> None:
        lease = S3Lease(uri, ttl_s=ttl_s, client=client)
        barrier.wait()
        time.sleep(delay)
        if lease.acquire(on_wait=lambda message: None):
            lease.keep_alive(on_lost=lambda: None)
            winners.append(lease)

    threads = [threading.Thread(target=contend, args=(delay,)) for delay in delays]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for lease in winners:
        lease.release()
    assert not any(lease.lost.is_set() for lease in winners)
    return [lease.owner for lease in winners]


@pytest.mark.parametrize("state", ["absent", "dead"])
def test_of_many_flows_racing_for_a_lease_exactly_one_wins(s3_bucket, state):
    """8 contenders, 12 rounds, each contender starting after its own random delay (0-40 ms): the
    store's conditional writes, not lucky timing, must pick one winner in every round."""
    seed = int(os.environ.get("TAGIFAI_CHAOS_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    client = s3_client()  # one client, thread-safe, with a pool of 10 connections
    ttl_s = 0.6
    for round_number in range(12):
        uri = lease_uri(s3_bucket, f"race-{state}-{round_number}")
        if state == "dead":
            assert S3Lease(uri, ttl_s=ttl_s, client=client).acquire()
        delays = [rng.uniform(0, 0.04) for _ in range(8)]
        winners = race(uri, delays, ttl_s, client)
        assert len(winners) == 1, f"round {round_number}: {len(winners)} winners (TAGIFAI_CHAOS_SEED={seed})"
        holder = S3Lease(uri, client=client).read()[1]
        assert holder["owner"] == winners[0] and holder["released"]


CLAIMER = """
import sys, time
from pathlib import Path
from tagifai.tuning.claim import claim_experiment_dir
from tagifai.settings import TuneSettings

settings = TuneSettings(experiment_name="leased", storage_path=sys.argv[1])
with claim_experiment_dir(settings.storage_path, settings, "data-fingerprint") as claim:
    print("CLAIMED", claim.uri, flush=True)
    while not Path(sys.argv[2]).exists():
        time.sleep(0.1)
"""


def start_claimer(tmp_path: Path, storage: str, name: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"{name}.log"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), TTL_ENV: str(TTL_S)}
    process = subprocess.Popen(
        [sys.executable, "-c", CLAIMER, storage, str(tmp_path / "stop")],
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return process, log


def claimed(process: subprocess.Popen, log: Path, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = [line for line in log.read_text().splitlines() if line.startswith("CLAIMED ")]
        if lines:
            return lines[0].split()[1]
        assert process.poll() is None, log.read_text()
        time.sleep(0.1)
    raise AssertionError(f"nothing claimed in {timeout_s} s:\n{log.read_text()}")


def test_flows_in_separate_processes_claim_folders_as_flock_would(s3_bucket, tmp_path):
    storage = f"s3://{s3_bucket}/ray_results"
    processes = []
    try:
        first = start_claimer(tmp_path, storage, "first")
        processes.append(first[0])
        folder_1 = claimed(*first)
        second = start_claimer(tmp_path, storage, "second")
        processes.append(second[0])
        folder_2 = claimed(*second)
        assert folder_1.endswith("-1") and folder_2 == folder_1[:-1] + "2"  # a live lease: the next folder

        os.killpg(first[0].pid, signal.SIGKILL)  # its lease stays, never renewed again
        first[0].wait()
        started = time.monotonic()
        rerun = start_claimer(tmp_path, storage, "rerun")
        processes.append(rerun[0])
        assert claimed(*rerun) == folder_1  # the same command takes the dead flow's folder back
        assert time.monotonic() - started >= TTL_S
        assert "waiting up to 3 s for its heartbeat" in rerun[1].read_text()

        write_text(f"{folder_2}/{COMPLETE_MARKER}", "[]")  # a finished folder is never claimed again
        late = start_claimer(tmp_path, storage, "late")
        processes.append(late[0])
        assert claimed(*late) == folder_1[:-1] + "3"
    finally:
        (tmp_path / "stop").touch()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    for name in ("second", "rerun", "late"):
        assert "Traceback" not in (tmp_path / f"{name}.log").read_text()
