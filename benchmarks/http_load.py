"""Servers in child processes under load from plain HTTP clients: start, pause, stop, measure.

The load side of `benchmarks/serving_load.py`: `http.client` connections in threads (no client
library, so the clients spend little of the CPU the servers need), back to back, bounded in count
and time; the server's CPU time is read from /proc for its whole session.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

START_TIMEOUT_S = 600  # loading MLflow, the checkpoint and the ONNX export on a busy 2-core machine
REQUEST_TIMEOUT_S = 60


Call = Callable[[http.client.HTTPConnection, str, str], str]  # one request -> the predicted tag


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    port: int
    call: Call
    log: Path

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)  # its own session: the server and its workers


def session_cpu_s(session: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of `session` (Linux /proc)."""
    total = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry.name}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                if int(fields[3]) == session:
                    total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(name: str, command: list[str], ready_path: str, call: Call, cwd: Path, env: dict, logs: Path) -> Server:
    port = free_port()
    log = logs / f"{name.replace(' ', '-')}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, "--port", str(port)],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(name, process, port, call, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log.read_text()[-2000:]}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", ready_path)
            if conn.getresponse().status == 200:
                return server
        time.sleep(1)
    stop(server)
    raise RuntimeError(f"{name} did not answer {ready_path} within {START_TIMEOUT_S} s; log: {log}")


def stop(server: Server) -> None:
    server.signal(signal.SIGCONT)
    server.signal(signal.SIGTERM)
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.signal(signal.SIGKILL)
        server.process.wait(timeout=30)


def load(server: Server, projects: list[tuple[str, str]], clients: int, seconds: float, max_requests: int) -> dict:
    """`clients` threads, each with one keep-alive connection, sending requests back to back until
    `seconds` have passed or `max_requests` were sent: count, errors, latencies."""
    latencies, errors, sent = [], [], [0]
    lock, go = threading.Lock(), threading.Barrier(clients + 1)
    deadline: list[float] = []

    def client(offset: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_TIMEOUT_S)
        go.wait()
        index = offset
        while time.monotonic() < deadline[0]:
            with lock:
                if sent[0] >= max_requests:
                    break
                sent[0] += 1
            title, description = projects[index % len(projects)]
            index += clients
            started = time.perf_counter()
            try:
                server.call(conn, title, description)
                with lock:
                    latencies.append(time.perf_counter() - started)
            except (OSError, http.client.HTTPException, RuntimeError, ValueError, KeyError) as error:
                with lock:
                    errors.append(f"{type(error).__name__}: {error}"[:200])
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_TIMEOUT_S)
        conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    deadline.append(time.monotonic() + seconds)
    started, cpu_before = time.perf_counter(), session_cpu_s(server.process.pid)
    go.wait()
    for thread in threads:
        thread.join(REQUEST_TIMEOUT_S + seconds)
    cpu_s = session_cpu_s(server.process.pid) - cpu_before
    return {"wall_s": time.perf_counter() - started, "latencies_s": latencies, "errors": errors, "server_cpu_s": cpu_s}


def summary(name: str, clients: int, runs: list[dict]) -> dict:
    latencies = np.array([s for run in runs for s in run["latencies_s"]])
    wall = sum(run["wall_s"] for run in runs)
    errors = [e for run in runs for e in run["errors"]]
    return {
        "server": name,
        "clients": clients,
        "requests": int(latencies.size),
        "errors": len(errors),
        "first_errors": errors[:3],
        "seconds": round(wall, 2),
        "req_per_s": round(latencies.size / wall, 2) if wall else 0.0,
        "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 1) if latencies.size else None,
        "p95_ms": round(float(np.percentile(latencies, 95)) * 1000, 1) if latencies.size else None,
        "server_cpu_ms_per_request": round(sum(r["server_cpu_s"] for r in runs) * 1000 / max(latencies.size, 1), 1),
        "per_round_req_per_s": [round(len(run["latencies_s"]) / run["wall_s"], 2) for run in runs],
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| server | clients | requests | errors | req/s | p50 ms | p95 ms | server CPU ms/request |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['server']} | {r['clients']} | {r['requests']} | {r['errors']} | {r['req_per_s']:.1f} | "
        f"{r['p50_ms']} | {r['p95_ms']} | {r['server_cpu_ms_per_request']} |"
        for r in rows
    ]
    return "\n".join(lines)
