"""The CLI's early Ray head (tagifai/tuning/head.py) is joined by the flow whatever the machine's Ray
authentication set-up: Ray 2.60 turns tokens on for `ray start --head` when ~/.ray/auth_token exists
(any earlier `ray.init()` writes one) but not for a driver joining by address, which made
`python -m flows.tune` fail on such a machine ("Authentication token is missing or incorrect").
Each case runs in a fresh process with its own HOME, the way a user's shell would start the CLI.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from processes import REPO

pytestmark = pytest.mark.slow

JOIN_OWN_HEAD = """
import sys
from flows.cli import start_ray_head_early

start_ray_head_early([])  # as flows/tune.py does on its first lines, before any other import
assert "ray" not in sys.modules  # Ray reads its authentication mode once, when first imported
import ray
from tagifai.tuning.study import connect_ray

assert connect_ray()  # joins the command's own head
square = ray.remote(lambda x: x * x)
print("worker result", ray.get(square.remote(7)))
ray.shutdown()
"""  # the head is stopped at exit, as the CLI's is


@pytest.mark.parametrize(
    "auth_mode, user_token",
    [(None, "a-token-written-by-an-earlier-ray-init"), (None, None), ("disabled", "any"), ("token", "users-own")],
    ids=["unset-with-user-token", "unset-fresh-machine", "disabled", "token-from-users-file"],
)
def test_the_flow_joins_the_head_it_started(tmp_path, auth_mode, user_token):
    if user_token:
        (tmp_path / ".ray").mkdir()
        (tmp_path / ".ray" / "auth_token").write_text(user_token)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # A Prefect URL: start_ray_head_early then starts no temporary server (not needed here).
    env.update(
        HOME=str(tmp_path),
        PYTHONPATH=str(REPO),
        PREFECT_API_URL="http://127.0.0.1:9/api",
        **({"RAY_AUTH_MODE": auth_mode} if auth_mode else {}),
    )
    done = subprocess.run([sys.executable, "-c", JOIN_OWN_HEAD], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "worker result 49" in done.stdout, done.stdout[-2000:] + done.stderr[-4000:]
    if user_token:  # the user's token file is theirs: read at most, never replaced
        assert (tmp_path / ".ray" / "auth_token").read_text() == user_token
