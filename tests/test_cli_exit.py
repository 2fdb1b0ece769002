"""`exit_after_results` ends a command the way the interpreter's exit would, minus the module
teardown: threads finish, pools finish their work, exit handlers run, the exit code is kept.

Found in CI: a flow run printed its results and then hung in exit_after_results for 10 minutes.
An MLflow artifact repository had kept its ThreadPoolExecutor alive, and the pool's idle worker
waits for the "shut down" that only threading's exit hooks send; joining the threads without
running those hooks first waited forever. A real pool held alive reproduces it in a second.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

COMMAND = """
import atexit, concurrent.futures, os, threading, time
from flows.cli import exit_after_results

def say(line):  # one write(2) per line: print() from two threads can interleave its text and newline
    os.write(1, (line + "\\n").encode())

pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # held, as MLflow's repositories hold theirs
pool.submit(time.sleep, 0).result()  # its worker thread exists and now waits for work
say("results written")
pool.submit(lambda: (time.sleep({pool_work_s}), say("pool work done")))

def late_thread():
    time.sleep({thread_s})
    say("thread done")

threading.Thread(target=late_thread).start()
atexit.register(lambda: say("exit handler ran"))
exit_after_results(3)
"""


# Vary the timing on purpose: the pool's last work item and a non-daemon thread end before the
# exit starts, or while it waits for them.
@pytest.mark.parametrize("pool_work_s, thread_s", [(0, 0), (0.5, 0), (0, 0.5), (0.5, 1.0)])
def test_exit_waits_for_threads_and_pools_then_runs_exit_handlers(pool_work_s, thread_s):
    script = COMMAND.format(pool_work_s=pool_work_s, thread_s=thread_s)
    try:
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"the command did not exit within 60 s of its results:\n{hung.stdout}\n{hung.stderr}")
    lines = done.stdout.splitlines()
    assert done.returncode == 3, done.stderr
    assert lines[0] == "results written", done.stdout
    assert sorted(lines[1:3]) == ["pool work done", "thread done"], done.stdout
    assert lines[3:] == ["exit handler ran"], done.stdout  # the handlers run after the threads end
