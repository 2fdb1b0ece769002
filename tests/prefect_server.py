"""Prefect's temporary server started as its own process: the test session's server (conftest.py).

With no Prefect server configured, Prefect starts a temporary one at a flow's first API call: its
server app under uvicorn on a free loopback port, stopped at exit. The test session starts the same
server command itself when pytest starts, so that the server migrates its new database (~8 s)
while the test modules are collected, and points the test process's Prefect at it with
PREFECT_API_URL, like any server. It stops when the session ends.

Tried for `python -m flows.tune` too (started at the command's first line instead of Prefect's
start from a thread): 2.7 s less from process start to flow run (median of 3 interleaved pairs,
benchmarks/RESULTS.md "Fixed cost"), reverted before landing: in one CI run a command-line test
spent 8 minutes after writing its results, not reproduced in four tries, and not explained yet.
Ports come from 8000-8999, as Prefect chooses them, away from the ephemeral ports Ray's processes
pick while they start.
"""

from __future__ import annotations

import atexit
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Optional

STARTUP_FAILURE_EXIT_CODE = 3  # uvicorn's, for a port taken after we chose it (or any failed start)
MAX_LAUNCHES = 3  # a port race is rare; three failed starts in a row are a real failure


PORTS = [port for port in range(8000, 9000) if port != 8265]  # Prefect's range, less Ray's dashboard port


def _free_port() -> int:
    for _ in range(50):
        port = random.choice(PORTS)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 8000-8999 for Prefect's temporary server")


class TemporaryPrefectServer:
    """Prefect's own server command (the one its temporary server runs) as a child process."""

    def __init__(self):
        from prefect.settings import get_current_settings

        # What Prefect gives its temporary server: the settings, no UI, and the ephemeral flag (no
        # background services).
        self.env = {
            **os.environ,
            **get_current_settings().to_environment_variables(exclude_unset=True),
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
        }
        self.process: Optional[subprocess.Popen] = None
        self.launches = 0
        self._launch()
        atexit.register(self.stop)

    def _launch(self) -> None:
        import prefect

        self.port = _free_port()
        self.launches += 1
        command = [
            sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
            "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
            "--port", str(self.port), "--log-level", "error", "--lifespan", "on",
        ]  # fmt: skip
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, env=self.env)
        # The flow, Prefect's background workers (threads) and any child process find it here.
        os.environ["PREFECT_API_URL"] = self.api_url
        if "prefect.context" in sys.modules:  # Prefect's settings already read the environment
            sys.modules["prefect.context"].refresh_global_settings_context()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def wait_until_healthy(self, timeout_s: float) -> None:
        """Return once the server answers its health check; start it again on another port if it
        could not start (its port may have been taken meanwhile), up to MAX_LAUNCHES starts; raise
        RuntimeError if it exits otherwise, fails every start, or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.process.poll()
            if status == STARTUP_FAILURE_EXIT_CODE and self.launches < MAX_LAUNCHES:
                self._launch()
                continue
            if status is not None:
                raise RuntimeError(
                    f"Prefect's temporary server exited with status {status} after {self.launches} start(s) "
                    "(its output is above)"
                )
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"Prefect's temporary server did not answer on {self.api_url} within {timeout_s:.0f} s")

    def stop(self) -> None:
        """Terminate the server and wait for it (5 s, then kill), as Prefect stops its own."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
