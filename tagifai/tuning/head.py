"""A local Ray head started as a child process, for a command that will need Ray later.

`ray start --head --block` comes up (about 5-14 s on 2 cores: its imports, the GCS, the raylet)
while the command does other work: Prefect starts its temporary server, the flow loads its data.
The flow joins it (study.connect_ray reads HEAD_ADDRESS_ENV) instead of starting Ray itself, and
disconnects when its study ends. Ray is not imported here: the head is the `ray` command line.

The head runs in a process group of its own, stopped by its id when the command ends however it
ends (never `ray stop`, which would stop every Ray on the machine): a SIGKILL to the group takes
the raylet, the GCS and the trial workers with it. Should the command itself be killed outright,
the head gets SIGKILL from the kernel (PR_SET_PDEATHSIG), and Ray's own fate-sharing takes the rest.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

HEAD_ADDRESS_ENV = "TAGIFAI_RAY_HEAD"  # the address of a head started for this command, to join
OBJECT_STORE_BYTES = 256 * 1024**2  # plenty: the shared data is a few MB of token ids
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def use_private_token() -> None:
    """Token authentication for the head, its workers and this process alike, unless the user chose.

    With RAY_AUTH_MODE unset, Ray 2.60 turns tokens on for `ray start --head` when ~/.ray/auth_token
    exists (any earlier `ray.init()` on the machine writes one), but not for a driver that joins by
    address: the flow would be refused by its own head. Both read the mode and the token from this
    environment, so setting them here (before the head starts) makes them agree; the token is new
    for each command, and the user's ~/.ray is left as it is."""
    if "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


class RayHead:
    """`ray start --head --block` in the background; `stop()` ends it and removes its files."""

    def __init__(self, worker_env: Optional[dict] = None):
        # Short on purpose: Ray puts unix sockets under it (paths are limited to 107 bytes). A
        # folder of its own also keeps /tmp/ray/ray_current_cluster, which `ray.init()` elsewhere
        # on the machine would read, pointing at a cluster that exists.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="tagifai-ray-", dir="/tmp"))
        self.log_path = self.temp_dir / "head.log"
        self.address = f"127.0.0.1:{_free_port()}"
        command = [
            sys.executable, "-c", "from ray.scripts.scripts import main; main()", "start", "--head", "--block",
            "--port", self.address.split(":")[1], "--object-store-memory", str(OBJECT_STORE_BYTES),
            "--temp-dir", str(self.temp_dir), "--include-dashboard=false", "--disable-usage-stats",
        ]  # fmt: skip
        use_private_token()
        env = {**os.environ, **(worker_env or {})}  # the trial workers inherit the head's environment
        env.pop("RAY_ADDRESS", None)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own group: a terminal's Ctrl-C reaches the command, which stops it
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )

    def failure(self) -> Optional[str]:
        """Why the head is gone, with its log's tail; None while it runs (or after `stop`)."""
        code = self.process.poll()
        if code is None or getattr(self, "stopped", False):
            return None
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"the Ray head (`ray start --head`) exited with code {code}:\n" + "\n".join(text.splitlines()[-30:])

    def stop(self) -> Optional[str]:
        """Kill the head's process group and wait for the head; returns `failure()` as it was before."""
        problem = self.failure()
        self.stopped = True
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return problem
