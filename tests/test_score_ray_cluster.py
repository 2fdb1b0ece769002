"""Batch scoring on a two-node Ray cluster on loopback, with token authentication as Ray 2.60 sets
it up: the same `python -m flows.score` command, with RAY_ADDRESS set, reads with Ray Data, scores
with map_batches on an actor pool (one replica per node: each node has 1 CPU and each replica asks
for 1), and writes the same output as a local run.

The nodes are two `ray start --block` processes started and stopped here by pid (never `ray
stop`, which would kill every Ray process on the machine). The token lives in a file of this test
(RAY_AUTH_TOKEN_PATH), not in the user's ~/.ray/auth_token.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from scoring_helpers import TEST_MODEL_NAME, make_rows, register_keyword_model, run_score

from processes import REPO, free_port, running, tail

pytestmark = [pytest.mark.slow, pytest.mark.integration]

RAY = Path(sys.executable).with_name("ray")
START_S = 180


def wait_for(log_path: Path, text: str, process) -> None:
    deadline = time.monotonic() + START_S
    while text not in log_path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{log_path.name}: no '{text}' (exit code {process.poll()})\n{tail(log_path)}")
        time.sleep(1)


@contextlib.contextmanager
def two_node_cluster(auth_env: dict):
    """A head and a worker node, 1 CPU each; yields the head's address and the nodes' temp folder."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))  # short: Ray puts unix sockets under it
    port = free_port()
    # The replicas are the nodes' workers: they take the nodes' environment, not the driver's. A
    # model cost per row (0.1 s a batch) keeps input waiting, as with a real model: with a free
    # model, one replica finishes each batch before the next is read, and Ray Data (which prefers
    # the replica on the node holding the block) rightly gives it all the work.
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", TAGIFAI_TEST_MODEL_S_PER_ROW="0.0004",
               **auth_env)  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    common = ["--num-cpus", "1", "--num-gpus", "0", "--object-store-memory", str(100 * 1024**2), "--block",
              "--disable-usage-stats"]  # fmt: skip
    head_args = [RAY, "start", "--head", "--port", port, "--temp-dir", temp_dir, "--include-dashboard=false", *common]
    worker_args = [RAY, "start", "--address", f"127.0.0.1:{port}", *common]
    try:
        with running(head_args, temp_dir / "head.log", env, cwd=temp_dir, grace_s=3) as head:
            wait_for(temp_dir / "head.log", "Ray runtime started", head)
            with running(worker_args, temp_dir / "worker.log", env, cwd=temp_dir, grace_s=3) as worker:
                wait_for(temp_dir / "worker.log", "Ray runtime started", worker)
                yield f"127.0.0.1:{port}", temp_dir
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_the_same_command_on_a_two_node_cluster_spreads_the_work_and_writes_the_local_output(tmp_path):
    registry = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register_keyword_model(registry)
    rows = make_rows(6000, seed=7)
    rows.to_csv(tmp_path / "in.csv", index=False)
    common = ["--input", str(tmp_path / "in.csv"), "--model-uri", f"models:/{TEST_MODEL_NAME}@champion",
              "--tracking-uri", registry, "--keep-columns", "source", "--chunk-rows", "1000",
              "--batch-rows", "250"]  # fmt: skip
    local = run_score(tmp_path, *common, "--output", str(tmp_path / "local.parquet"))
    assert local.returncode == 0, local.output[-3000:]

    token_path = tmp_path / "ray_auth_token"
    token_path.write_text(secrets.token_hex(32))
    auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    with two_node_cluster(auth_env) as (address, _):
        # Without the token the cluster refuses the driver: token authentication is really on.
        no_token = {**auth_env, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "none")}
        refused = run_score(tmp_path, *common, "--output", str(tmp_path / "refused.parquet"), timeout=300,
                            RAY_ADDRESS=address, **no_token)  # fmt: skip
        assert refused.returncode != 0 and not (tmp_path / "refused.parquet").exists()
        cluster_output = ["--output", str(tmp_path / "cluster.parquet"), "--results-fp", str(tmp_path / "cluster.json")]
        on_cluster = run_score(tmp_path, *common, *cluster_output, timeout=600, RAY_ADDRESS=address, **auth_env)
    assert on_cluster.returncode == 0, on_cluster.output[-5000:]
    assert "with 2 model replica(s)" in on_cluster.output, on_cluster.output[-5000:]  # both nodes' CPUs seen
    summary = json.loads((tmp_path / "cluster.json").read_text())
    print("two-node cluster run:", {key: summary[key] for key in ("rows_per_s", "seconds", "rows_by_node")})
    assert summary["engine"] == "ray" and summary["rows_scored"] == 6000
    assert len(summary["rows_by_node"]) == 2 and all(n > 0 for n in summary["rows_by_node"].values()), summary
    assert sum(summary["rows_by_node"].values()) == 6000
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "cluster.parquet"), pd.read_parquet(tmp_path / "local.parquet")
    )
