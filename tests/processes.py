"""Background processes for integration tests: each in its own session, and stopping one stops
everything it started (a worker's flow runs, a flow's local Ray), also when a test fails."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session id, start time) of every live process (Linux /proc)."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), int(fields[3]), fields[19])
    return table


def _family(root: int, known: set[tuple[int, str]]) -> set[tuple[int, str]]:
    """Live processes that are `known`, in `root`'s session, or descendants of either."""
    table = _process_table()
    family = {(pid, start) for pid, (_, session, start) in table.items() if session == root or pid == root}
    family |= {(pid, start) for pid, start in known if table.get(pid, (0, 0, None))[2] == start}
    frontier = [pid for pid, _ in family]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _, start) in table.items():
            if ppid == parent and (pid, start) not in family:
                family.add((pid, start))
                frontier.append(pid)
    return family


def stop(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, the process, its descendants and its session; the flow runs of a
    worker start sessions of their own, so descendants are gathered before anything dies."""
    if not Path("/proc").is_dir():  # not Linux: the session's process group is the best we know
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        return
    family = _family(process.pid, set())
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        for pid, _ in family:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while family and time.monotonic() < deadline:
            time.sleep(0.2)
            process.poll()  # reap our child so that it leaves the table
            family = _family(process.pid, family)
        if not family:
            break
    process.wait(timeout=10)


@contextlib.contextmanager
def running(args: list, log_path: Path, env: dict, cwd: Path = REPO, grace_s: float = 10.0):
    """A background process writing to `log_path`, stopped on exit whatever happened."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(arg) for arg in args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield process
        finally:
            stop(process, grace_s)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 60) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return f"--- last lines of {path} ---\n" + "\n".join(text.splitlines()[-lines:])


def descendants(root: int, known: set[tuple[int, str]]) -> set[tuple[int, str]]:
    """`root`, its session and descendants, and the live ones of `known`: as (pid, start time)."""
    return _family(root, known)


def still_alive(processes: set[tuple[int, str]]) -> set[tuple[int, str]]:
    """Those of `processes` (pid, start time) still running (a zombie is not)."""
    table = _process_table()
    return {(pid, start) for pid, start in processes if table.get(pid, (0, 0, None))[2] == start}


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
