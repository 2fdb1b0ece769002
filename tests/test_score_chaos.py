"""Chaos: `python -m flows.score` is SIGKILLed at random moments, then the same command is run to
the end; the output must be exactly an uninterrupted run's, and written chunks are not scored again.

Each kill takes down the command's whole process group at once (the CLI, its temporary Prefect
server), as a crash would. The first kill lands at a uniform moment after the start (start-up,
checks, or scoring); later ones at a uniform delay after the run has recorded its job (so that
they land while chunks are scored and parts written). The delays come from a seeded generator
whose seed is printed; TAGIFAI_SCORE_CHAOS_SEED=<seed> replays a failing sequence. The test model
sleeps per row (TAGIFAI_TEST_MODEL_S_PER_ROW) so that scoring lasts long enough to be cut.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time

import pandas as pd
import pytest
from scoring_helpers import TEST_MODEL_NAME, make_rows, register_keyword_model, run_score, score_command, score_env

import tagifai.serving.batch as batch
from processes import REPO
from tagifai.serving.batch_io import MANIFEST
from tagifai.settings import ScoreSettings

pytestmark = pytest.mark.slow

ROWS, CHUNK_ROWS, S_PER_ROW = 30_000, 1_000, 0.0004  # 30 chunks of ~0.4 s of model time each
# Scoring alone takes ROWS x S_PER_ROW = 12 s, more than any delay: every kill lands on a running command.
KILLS, FIRST_KILL_MAX_S, LATER_KILL_MAX_S, RUN_S = 3, 15.0, 4.0, 600


def test_sigkill_at_random_moments_then_the_same_command_gives_the_uninterrupted_output(tmp_path):
    seed = int(os.environ.get("TAGIFAI_SCORE_CHAOS_SEED") or random.SystemRandom().randrange(10**6))
    print(f"chaos seed {seed} (TAGIFAI_SCORE_CHAOS_SEED={seed} replays it)")
    rng = random.Random(seed)
    registry = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register_keyword_model(registry)
    make_rows(ROWS, seed=8).to_csv(tmp_path / "in.csv", index=False)
    model_uri = f"models:/{TEST_MODEL_NAME}@champion"
    reference = ScoreSettings(input=str(tmp_path / "in.csv"), output=str(tmp_path / "reference.parquet"),
                              model_uri=model_uri, chunk_rows=CHUNK_ROWS)  # fmt: skip
    batch.score_batch(reference, registry, lambda line: None)

    output, parts = tmp_path / "out.parquet", tmp_path / ".out.parquet.parts"
    arguments = ("--input", str(tmp_path / "in.csv"), "--output", str(output), "--model-uri", model_uri,
                 "--tracking-uri", registry, "--chunk-rows", str(CHUNK_ROWS),
                 "--results-fp", str(tmp_path / "summary.json"))  # fmt: skip
    command = score_command(*arguments)
    env = score_env(tmp_path, TAGIFAI_TEST_MODEL_S_PER_ROW=str(S_PER_ROW))
    kills = []
    for attempt in range(KILLS):
        with open(tmp_path / "runs.log", "ab") as log:
            process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True)
        if attempt == 0:
            delay = rng.uniform(0, FIRST_KILL_MAX_S)
            time.sleep(delay)
        else:
            deadline = time.monotonic() + RUN_S
            while not (parts / MANIFEST).exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            delay = rng.uniform(0, LATER_KILL_MAX_S)
            time.sleep(delay)
        finished = process.poll() is not None
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        written = len(list(parts.glob("part-*.parquet")))
        kills.append((round(delay, 2), written, finished))
        assert not finished, f"a run finished before its kill (the test is sized wrong); seed {seed}: {kills}"
    print("kills (delay s, parts written so far, run had finished):", kills)

    written_before = sorted(p.name for p in parts.glob("part-*.parquet"))
    final = run_score(tmp_path, *arguments, timeout=RUN_S, TAGIFAI_TEST_MODEL_S_PER_ROW=str(S_PER_ROW))
    assert final.returncode == 0, f"seed {seed}\n{final.output[-4000:]}"
    summary = json.loads((tmp_path / "summary.json").read_text())
    out = pd.read_parquet(output)
    assert len(out) == ROWS and out["id"].is_unique, f"seed {seed}"
    pd.testing.assert_frame_equal(out, pd.read_parquet(tmp_path / "reference.parquet"))
    # written chunks were not scored again: the last run scored only the others
    assert summary["chunks_resumed"] == len(written_before), (seed, summary)
    assert summary["rows_scored_this_run"] == ROWS - CHUNK_ROWS * len(written_before), (seed, summary)
    assert not parts.exists()
