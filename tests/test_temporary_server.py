"""The test session's own start of Prefect's temporary server (tests/prefect_server.py): a port
taken between choosing it and the server binding it (the race Prefect's own start also handles)
moves the server to another port, Prefect in the process follows it, and a server that cannot
start at all is an error after a few tries rather than the 180 s start-up timeout. Each case runs
in a fresh process: the server points that process's Prefect settings at itself."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from processes import REPO

pytestmark = pytest.mark.slow

PORT_TAKEN_FIRST = """
import os, socket
import prefect_server as temporary_server

taken = socket.socket()
taken.bind(("127.0.0.1", 0))
taken.listen()
ports = [taken.getsockname()[1]]  # the first port chosen is already held by another process
choose_port = temporary_server._free_port
temporary_server._free_port = lambda: ports.pop() if ports else choose_port()

server = temporary_server.TemporaryPrefectServer()
first = server.port
server.wait_until_healthy(180)
from prefect.settings import PREFECT_API_URL

print("moved", server.port != first, "launches", server.launches)
print("environment follows", os.environ["PREFECT_API_URL"] == server.api_url)
print("prefect follows", PREFECT_API_URL.value() == server.api_url)
process = server.process
server.stop()
print("stopped", process.poll() is not None)
"""

CANNOT_START = """
from prefect_server import TemporaryPrefectServer

server = TemporaryPrefectServer()
try:
    server.wait_until_healthy(180)
except RuntimeError as error:
    print("refused:", error)
"""


def run_script(script: str, tmp_path, **env) -> str:
    environment = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    environment.update(
        PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]), PREFECT_HOME=str(tmp_path / "prefect-home"), **env
    )
    done = subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_a_port_taken_before_the_server_binds_it_moves_the_server_and_prefect_with_it(tmp_path):
    out = run_script(PORT_TAKEN_FIRST, tmp_path)
    assert "moved True launches 2" in out, out
    assert "environment follows True" in out and "prefect follows True" in out, out
    assert "stopped True" in out, out


def test_a_server_that_cannot_start_is_an_error_after_three_tries(tmp_path):
    # Its database would live under a regular file: every start fails in its migrations.
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    out = run_script(
        CANNOT_START, tmp_path, PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{not_a_folder}/prefect.db"
    )
    # The exit status, not the start-up timeout's message: it gave up after its three starts.
    assert "refused: Prefect's temporary server exited with status 3 after 3 start(s)" in out, out
