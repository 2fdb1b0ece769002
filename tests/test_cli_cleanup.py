"""Nothing `python -m flows.tune` starts outlives it: its early Ray head (raylet, GCS, trial
workers) and Prefect's temporary server are gone after a normal exit, an error exit, SIGTERM, and a
terminal's Ctrl-C (SIGINT to its process group). The real CLI in a subprocess, on the tiny BERT."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import time

import pytest
from test_console import console_command, environment

from processes import command_line, descendants, still_alive
from tagifai.tuning.claim import COMPLETE_MARKER

SETTLE_S = 15  # SIGKILLed processes vanish when the kernel gets to them: seconds on a loaded machine


def watch(command: list[str], log_path, signal_when_training=None, group: bool = False, **env: str):
    """Run `command` in a session of its own, noting every process it starts; send the signal (to the
    process, or to its group) once a trial has finished an epoch. Returns (exit code, processes:
    their command lines by (pid, start time))."""
    seen: set[tuple[int, str]] = set()
    names: dict[tuple[int, str], str] = {}
    with open(log_path, "w") as log:
        child = subprocess.Popen(
            command, env={**environment(), **env}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 900
    signalled = False
    while child.poll() is None:
        assert time.monotonic() < deadline, log_path.read_text()[-3000:]
        seen = descendants(child.pid, seen)
        names.update({process: command_line(process[0]) for process in seen - set(names)})
        if signal_when_training and not signalled and " epoch 1/" in log_path.read_text(errors="replace"):
            seen = descendants(child.pid, seen)
            (os.killpg if group else os.kill)(child.pid, signal_when_training)
            signalled = True
        time.sleep(0.1)
    assert signalled or not signal_when_training, log_path.read_text()[-3000:]
    return child.returncode, names


def assert_nothing_left(seen: dict[tuple[int, str], str]) -> None:
    deadline = time.monotonic() + SETTLE_S
    while still_alive(seen) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = {pid: seen[pid, start] for pid, start in still_alive(set(seen))}
    assert left == {}, f"still running after the command exited: {left}"


@pytest.mark.integration
@pytest.mark.slow  # a whole CLI run each
@pytest.mark.parametrize(
    "ending, sig, group",
    [("normal", None, False), ("sigterm", signal.SIGTERM, False), ("ctrl-c", signal.SIGINT, True)],
)
def test_nothing_outlives_the_command(tmp_path, tiny_backbone, ending, sig, group):
    # With a signal: a study long enough for it to arrive mid-study, no trial pruned before.
    shape = ["--num-epochs", "2"] if sig is None else ["--num-epochs", "200", "--grace-period", "200"]
    command = console_command(tmp_path, tiny_backbone, "--num-runs", "2", *shape)
    prefect_home = tmp_path / "prefect-home"  # this run's own Prefect database, read below
    code, seen = watch(command, tmp_path / "out.txt", sig, group, PREFECT_HOME=str(prefect_home))
    text = (tmp_path / "out.txt").read_text()
    assert (code == 0) == (sig is None), text[-3000:]
    names = list(seen.values())
    assert any("ray.scripts.scripts" in name and "--head" in name for name in names)  # the early head ran
    assert any("raylet" in name for name in names) and any("uvicorn" in name for name in names)
    assert_nothing_left(seen)
    # An interrupted study is not recorded as finished (Tune's own Ctrl-C handler, which ends a
    # study "gracefully", would have had it summarised and marked complete): the next run resumes it.
    assert bool(list((tmp_path / "ray_results").rglob(COMPLETE_MARKER))) == (sig is None)
    if sig is None:
        assert "Traceback" not in text and "error:" not in text, text[-3000:]
        # The flow run's last log line (Prefect's own, after every task) reached Prefect's server
        # before the exit stopped it.
        with contextlib.closing(sqlite3.connect(prefect_home / "prefect.db")) as database:
            flow_logs = database.execute("SELECT message FROM log WHERE task_run_id IS NULL").fetchall()
        assert ("Finished in state Completed()",) in flow_logs, flow_logs


@pytest.mark.integration
@pytest.mark.slow  # a whole CLI run each
def test_an_error_exit_stops_the_early_head_too(tmp_path, tiny_backbone):
    command = console_command(tmp_path, tiny_backbone, "--dataset-loc", str(tmp_path / "missing.csv"))
    code, seen = watch(command, tmp_path / "out.txt")
    text = (tmp_path / "out.txt").read_text()
    assert code == 1 and "error:" in text, text[-3000:]
    assert any("ray.scripts.scripts" in name for name in seen.values())  # the early head was started
    assert_nothing_left(seen)
