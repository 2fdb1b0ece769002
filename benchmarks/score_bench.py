"""Batch scoring at two sizes: peak RSS of `python -m flows.score` at 10k and at 1M rows (the
issue's bound: within 300 MB), and its rows/s against the model's own batch throughput (target:
at least 0.8 of it), measured in the same run.

    python -m benchmarks.score_bench [--model-uri models:/tagifai@champion --tracking-uri URI]
                                     [--small-rows 10000] [--large-rows 1000000] [--engine-rows 5000]

Without --model-uri it registers the tests' keyword model (tests/scoring_model.py) in a temporary
store: that measures the scoring machinery, not a real model. Input rows repeat the real dataset's
texts (../shared/data/made-with-ml/dataset.csv) when it is there, synthetic texts otherwise, each
with a unique id. Each size runs in a fresh process that reports its own peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "made-with-ml" / "dataset.csv"
WRITE_ROWS = 50_000  # input written in slices: the benchmark itself stays small


def texts(path: Path) -> pd.DataFrame:
    if path.exists():
        return pd.read_csv(path)[["title", "description"]].fillna("")
    sys.path.insert(0, str(REPO / "tests"))
    from scoring_helpers import make_rows

    return make_rows(1000)[["title", "description"]]


def write_input(path: Path, rows: int, pool: pd.DataFrame) -> None:
    with open(path, "w") as handle:
        for start in range(0, rows, WRITE_ROWS):
            ids = range(start, min(rows, start + WRITE_ROWS))
            frame = pool.iloc[[i % len(pool) for i in ids]].reset_index(drop=True)
            frame.insert(0, "id", list(ids))
            frame.to_csv(handle, index=False, header=start == 0)


def engine_rows_per_s(model_uri: str, tracking_uri: str, pool: pd.DataFrame, rows: int, batch: int) -> float:
    """The model's own throughput: predict() on batches of `batch` rows, nothing else."""
    from tagifai.serving.batch import load_model

    model = load_model(model_uri, tracking_uri)
    frame = pool.iloc[[i % len(pool) for i in range(rows)]].reset_index(drop=True)
    model.predict(frame.iloc[:batch])  # warm-up
    started = time.perf_counter()
    for start in range(0, rows, batch):
        model.predict(frame.iloc[start : start + batch])
    return rows / (time.perf_counter() - started)


def score_in_fresh_process(arguments: list[str], folder: Path) -> dict:
    script = (
        "import json, resource, sys\n"
        "from flows.score import main\n"
        "summary = main(sys.argv[1:])\n"
        "print('BENCH', json.dumps({'summary': summary,"
        " 'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
    )
    started = time.perf_counter()
    env = {**os.environ, "PREFECT_HOME": str(folder / "prefect"), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script, *arguments, "--json"], cwd=REPO, capture_output=True,
                          text=True, env=env)  # fmt: skip
    if done.returncode:
        sys.exit(f"scoring failed:\n{done.stderr[-4000:]}")
    [line] = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
    return json.loads(line.removeprefix("BENCH ")) | {"command_s": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--small-rows", type=int, default=10_000)
    parser.add_argument("--large-rows", type=int, default=1_000_000)
    parser.add_argument("--engine-rows", type=int, default=5_000)
    parser.add_argument("--engine-batch", type=int, default=64)
    parser.add_argument("--batch-rows", type=int, default=1024)
    parser.add_argument("--texts", default=str(REAL_DATA), help="CSV whose title/description the rows repeat")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "score_results.json"))
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="score-bench-") as folder:
        folder = Path(folder)
        tracking_uri, model_uri = options.tracking_uri, options.model_uri
        if not model_uri:
            sys.path.insert(0, str(REPO / "tests"))
            from scoring_helpers import TEST_MODEL_NAME, register_keyword_model

            tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
            register_keyword_model(tracking_uri)
            model_uri = f"models:/{TEST_MODEL_NAME}@champion"
        from tagifai.lifecycle.tracking import resolve_tracking_uri

        tracking_uri = resolve_tracking_uri(tracking_uri)
        pool = texts(Path(options.texts))
        # The model's throughput at the scoring run's batch size (the fair bound) and at --engine-batch.
        engine = engine_rows_per_s(model_uri, tracking_uri, pool, options.engine_rows, options.batch_rows)
        engine_small = engine_rows_per_s(model_uri, tracking_uri, pool, options.engine_rows, options.engine_batch)
        runs = {}
        for label, rows in (("small", options.small_rows), ("large", options.large_rows)):
            write_input(folder / f"{label}.csv", rows, pool)
            arguments = ["--input", str(folder / f"{label}.csv"), "--output", str(folder / f"{label}.parquet"),
                         "--model-uri", model_uri, "--tracking-uri", tracking_uri,
                         "--batch-rows", str(options.batch_rows)]  # fmt: skip
            run = score_in_fresh_process(arguments, folder)
            runs[label] = {"rows": rows, "peak_rss_mb": round(run["peak_rss_mb"], 1),
                           "rows_per_s": run["summary"]["rows_per_s"], "command_s": run["command_s"]}  # fmt: skip
            print(label, runs[label], flush=True)
            (folder / f"{label}.csv").unlink()
    result = {
        "model_uri": model_uri,
        "texts": options.texts if Path(options.texts).exists() else "synthetic",
        "engine_rows_per_s": round(engine, 1),
        "engine_batch": options.batch_rows,
        f"engine_rows_per_s_batch_{options.engine_batch}": round(engine_small, 1),
        "runs": runs,
        "rss_growth_mb": round(runs["large"]["peak_rss_mb"] - runs["small"]["peak_rss_mb"], 1),
        "large_vs_engine": round(runs["large"]["rows_per_s"] / engine, 3),
    }
    result["targets_met"] = {"rss_growth_within_300_mb": result["rss_growth_mb"] <= 300,
                             "rows_per_s_at_least_0.8_of_engine": result["large_vs_engine"] >= 0.8}  # fmt: skip
    Path(options.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
