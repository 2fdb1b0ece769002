"""What a person sees: `python -m flows.tune` with its output in a file, on a terminal, with
--verbose and with --json (the real CLI in a subprocess, on the tiny BERT)."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import time
from pathlib import Path

import pytest

from processes import REPO
from tune_runs import local_store_options, tune_command

NOISE = (
    "╭", "│", "Checkpoint successfully created", "run_trial pid=", "TensorBoard", "Token authentication",
    "Loading weights", "Trial status", "deduplicat", "Logical resource usage", "View detailed results",
)  # fmt: skip
EPOCH_LINE = re.compile(r"trial (\w+) epoch (\d+)/(\d+): val_loss")


def console_command(workdir: Path, backbone: Path, *extra: str) -> list[str]:
    return tune_command(
        "--model", backbone, "--trainable-layers", "all", *local_store_options(workdir),
        "--results-fp", workdir / "results.json", *extra,
    )  # fmt: skip


def environment() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_LOGGING_LEVEL", None)  # the CLI's own defaults, as a user gets them
    return env


@pytest.mark.integration
@pytest.mark.slow
def test_the_defaults_into_a_file_are_quiet_short_and_end_with_a_summary(tmp_path, tiny_backbone):
    """4 trials x 4 epochs, the defaults' shape."""
    log = tmp_path / "out.txt"
    with open(log, "w") as out:
        command = console_command(tmp_path, tiny_backbone, "--num-runs", "4", "--num-epochs", "4")
        done = subprocess.run(command, cwd=REPO, env=environment(), stdout=out, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    lines = text.splitlines()
    assert "\x1b" not in text
    assert [line for line in lines if any(noise in line for noise in NOISE)] == []
    assert len(lines) <= 60, f"{len(lines)} lines:\n{text}"

    summary = json.loads((tmp_path / "results.json").read_text())
    epochs = [(m.group(1), int(m.group(2))) for m in map(EPOCH_LINE.search, lines) if m]
    expected = sorted((t["trial_id"], e) for t in summary["trials"] for e in range(1, t["epochs"] + 1))
    assert sorted(epochs) == expected  # one line per finished epoch of every trial, no more
    ended = [line for line in lines if re.search(r"trial \w+ (done|pruned|error) after", line)]
    assert len(ended) == len(summary["trials"])
    assert f"run {summary['run_id']}" in text and f"F1 {summary['test']['f1']:.3f}" in text
    assert f"Ray and trial logs: {summary['ray_log_file']}" in text
    ray_log = Path(summary["ray_log_file"]).read_text()  # Ray's output went there: joining the CLI's early head
    assert "Connected to Ray cluster" in ray_log or "Started a local Ray instance" in ray_log
    for command in ("ui --backend-store-uri", "-m demo.app", f"-m flows.predict --run-id {summary['run_id']}"):
        assert command in text


@pytest.mark.integration
@pytest.mark.slow
def test_verbose_brings_back_rays_output(tmp_path, tiny_backbone):
    command = console_command(tmp_path, tiny_backbone, "--num-runs", "1", "--num-epochs", "1", "--verbose")
    done = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "run_trial pid=" in output and "Trial status" in output


@pytest.mark.integration
@pytest.mark.slow
def test_json_prints_the_full_summary_on_stdout(tmp_path, tiny_backbone):
    command = console_command(tmp_path, tiny_backbone, "--num-runs", "1", "--num-epochs", "1", "--json")
    done = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)
    assert printed == json.loads((tmp_path / "results.json").read_text())
    assert {"trials", "test", "promotion", "timings"} <= set(printed)


@pytest.mark.integration
@pytest.mark.slow
def test_a_terminal_gets_a_live_table(tmp_path, tiny_backbone):
    """Run under a pseudo-terminal: the study is drawn as a table redrawn in place."""
    command = console_command(tmp_path, tiny_backbone, "--num-runs", "2", "--num-epochs", "2")
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI with the terminal as stdout and stderr
        os.chdir(REPO)
        os.execve(command[0], command, environment())
    chunks, deadline = [], time.monotonic() + 600
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the terminal: it has exited
                break
            if not chunk:
                break
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    output = b"".join(chunks).decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, output[-3000:]
    assert "val_loss" in output and "hyperparameters" in output and "trials done" in output
    assert "\x1b[" in output  # the table is redrawn in place (cursor movement), not printed line by line
    summary = json.loads((tmp_path / "results.json").read_text())
    assert f"run {summary['run_id']}" in output


def test_worker_output_goes_to_the_log_file_and_comes_back_after(tmp_path):
    """Ray hands each batch of worker output to its dispatcher's handlers on the driver: while
    the study runs, the file gets it and Ray's console printer does not; afterwards, the printer again."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from tagifai.tuning.ray_output import WORKER_STREAM_HANDLER, worker_output_to

    printed = []
    dispatcher.add_handler(WORKER_STREAM_HANDLER, lambda batch: printed.append(batch["lines"]))
    batch = {"lines": ["Loading weights: 100%"], "pid": 42, "actor_name": "run_trial", "is_err": True}
    log = tmp_path / "ray.log"
    try:
        with worker_output_to(log, verbose=False):
            dispatcher.emit(batch)
        assert log.read_text() == "(run_trial pid=42) Loading weights: 100%\n" and printed == []
        dispatcher.emit(batch)
        assert printed == [["Loading weights: 100%"]]
        with worker_output_to(tmp_path / "verbose.log", verbose=True):
            dispatcher.emit(batch)
        assert len(printed) == 2 and not (tmp_path / "verbose.log").exists()
    finally:
        dispatcher.remove_handler(WORKER_STREAM_HANDLER)
