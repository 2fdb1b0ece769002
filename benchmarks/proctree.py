"""Memory and CPU time of a process tree and the machine's load, sampled in a thread (Linux /proc,
no psutil)."""

from __future__ import annotations

import bisect
import os
import threading
import time
from pathlib import Path

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# What a process of a tuning run is, by its command line (first match); the CPU time is summed by role.
ROLES = (
    ("flows.tune", "driver (the command)"),
    ("uvicorn", "Prefect server"),
    ("gcs_server", "Ray GCS"),
    ("raylet", "Ray raylet"),
    ("dashboard/agent", "Ray dashboard agent"),
    ("runtime_env/agent", "Ray runtime-env agent"),
    ("dashboard/dashboard.py", "Ray dashboard"),
    ("ray.scripts.scripts", "Ray head (`ray start`)"),
    ("log_monitor", "Ray log monitor"),
    ("monitor.py", "Ray monitor"),
    ("ray::", "Ray workers (trials)"),
    ("default_worker", "Ray workers (trials)"),
)


def role_of(command: str) -> str:
    """The role of a command line, from its program and script (its options name other processes)."""
    program = command.split(" --", 1)[0]
    return next((role for needle, role in ROLES if needle in program), "other: " + program[-40:])


def machine_busy_ticks() -> int:
    """CPU ticks every core of the machine spent on anything but idle and I/O wait, since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4]


def _cpu_ticks(pid: int) -> int:
    """utime + stime of one process (its own, not its reaped children's)."""
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return 0


def _parents() -> dict[int, int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended meanwhile
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants alive now."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parents().items():
        children.setdefault(parent, []).append(pid)
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


def _rss_and_pss(pid: int) -> tuple[int, int]:
    """Resident bytes, and proportional bytes (shared pages split among the processes sharing them)."""
    try:
        rss = int((Path("/proc") / str(pid) / "statm").read_text().split()[1]) * PAGE_SIZE
        pss = 0
        for line in (Path("/proc") / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
                break
        return rss, pss
    except (OSError, ValueError, IndexError):
        return 0, 0


def _command(pid: int, limit: int = 90) -> str:
    try:
        return (
            (Path("/proc") / str(pid) / "cmdline")
            .read_bytes()
            .replace(b"\0", b" ")
            .decode(errors="replace")
            .strip()[:limit]
        )
    except OSError:
        return "?"


class TreeSampler(threading.Thread):
    """Peak summed RSS/PSS of a process tree and the load average, every `interval_s` seconds."""

    def __init__(self, root: int, interval_s: float = 0.5):
        super().__init__(daemon=True)
        self.root, self.interval_s = root, interval_s
        self.peak_rss = self.peak_pss = self.peak_processes = 0
        self.at_peak: list[tuple[str, float, float]] = []
        self.loads: list[float] = []
        self.commands: dict[int, str] = {}  # pid -> its command line when first seen
        self.ticks: list[tuple[float, dict[int, int]]] = []  # (time.time(), {pid: utime + stime})
        self.busy: list[tuple[float, int]] = []  # (time.time(), machine_busy_ticks())
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval_s)

    def sample(self) -> None:
        now = time.time()
        self.busy.append((now, machine_busy_ticks()))
        pids = process_tree(self.root)
        for pid in pids:
            if pid not in self.commands:
                self.commands[pid] = _command(pid, limit=400)  # roles are told apart by the script's path
        self.ticks.append((now, {pid: _cpu_ticks(pid) for pid in pids}))
        sizes = [_rss_and_pss(pid) for pid in pids]
        if sum(rss for rss, _ in sizes) > self.peak_rss:
            self.at_peak = sorted(
                ((_command(pid), rss / 2**20, pss / 2**20) for pid, (rss, pss) in zip(pids, sizes)),
                key=lambda row: -row[1],
            )
        self.peak_rss = max(self.peak_rss, sum(rss for rss, _ in sizes))
        self.peak_pss = max(self.peak_pss, sum(pss for _, pss in sizes))
        self.peak_processes = max(self.peak_processes, len(pids))
        self.loads.append(os.getloadavg()[0])

    def busy_core_s(self, start: float, end: float) -> float:
        """Core-seconds the whole machine was busy between two sampled moments (nearest samples
        inside [start, end]): on an otherwise idle machine, what the run's processes used."""
        times = [t for t, _ in self.busy]
        first, last = bisect.bisect_left(times, start), bisect.bisect_right(times, end) - 1
        if last <= first:
            return 0.0
        return (self.busy[last][1] - self.busy[first][1]) / CLOCK_TICKS * (end - start) / (times[last] - times[first])

    def _ticks_at(self, moment: float) -> dict[int, int]:
        """Each process's CPU ticks as of the last sample at or before `moment` (a process keeps its
        highest count: after it ends, or as a zombie, /proc reads 0 or nothing)."""
        seen: dict[int, int] = {}
        for sampled_at, ticks in self.ticks:
            if sampled_at > moment:
                break
            for pid, count in ticks.items():
                seen[pid] = max(seen.get(pid, 0), count)
        return seen

    def cpu_by_role(self, start: float = 0.0, end: float = float("inf")) -> dict[str, float]:
        """CPU seconds the tree's processes used between two moments, summed by role (a process
        that ended between two samples loses its last interval's time, at most `interval_s` each)."""
        before, after = self._ticks_at(start), self._ticks_at(end)
        roles: dict[str, float] = {}
        for pid, ticks in after.items():
            role = role_of(self.commands.get(pid, "?"))
            roles[role] = roles.get(role, 0.0) + (ticks - before.get(pid, 0)) / CLOCK_TICKS
        return {role: round(seconds, 2) for role, seconds in sorted(roles.items(), key=lambda item: -item[1])}

    def processes(self, start: float, end: float) -> list[dict]:
        """Per process of the tree: its role and CPU seconds between two moments, then in all."""
        before, after, total = self._ticks_at(start), self._ticks_at(end), self._ticks_at(float("inf"))
        rows = [
            {
                "pid": pid,
                "role": role_of(self.commands.get(pid, "?")),
                "cpu_s_in_window": (after.get(pid, 0) - before.get(pid, 0)) / CLOCK_TICKS,
                "cpu_s": ticks / CLOCK_TICKS,
            }
            for pid, ticks in total.items()
        ]
        return sorted(rows, key=lambda row: -row["cpu_s"])

    def stop(self) -> dict:
        self._halt.set()
        self.join()
        return {
            "cpu_s_by_role": self.cpu_by_role(),
            "peak_rss_mb": self.peak_rss / 2**20,
            "peak_pss_mb": self.peak_pss / 2**20,
            "peak_processes": self.peak_processes,
            "at_peak_mb": [
                {"process": name, "rss_mb": round(rss), "pss_mb": round(pss)} for name, rss, pss in self.at_peak
            ],
            "load_avg_1m_mean": sum(self.loads) / len(self.loads) if self.loads else None,
            "load_avg_1m_max": max(self.loads, default=None),
        }


class LoadSampler(threading.Thread):
    """The 1-minute load average every few seconds: how busy the machine was during a benchmark."""

    def __init__(self, interval_s: float = 5.0):
        super().__init__(daemon=True)
        self.interval_s, self.loads, self._halt = interval_s, [], threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.loads.append(os.getloadavg()[0])
            self._halt.wait(self.interval_s)

    def stop(self) -> dict:
        self._halt.set()
        self.join()
        return {
            "load_avg_1m_mean": sum(self.loads) / len(self.loads),
            "load_avg_1m_max": max(self.loads),
            "samples": len(self.loads),
        }
