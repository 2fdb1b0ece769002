"""Memory of a process tree and the machine's load, sampled in a thread (Linux /proc, no psutil)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


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


def _command(pid: int) -> str:
    try:
        return (
            (Path("/proc") / str(pid) / "cmdline")
            .read_bytes()
            .replace(b"\0", b" ")
            .decode(errors="replace")
            .strip()[:90]
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
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval_s)

    def sample(self) -> None:
        pids = process_tree(self.root)
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

    def stop(self) -> dict:
        self._halt.set()
        self.join()
        return {
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
