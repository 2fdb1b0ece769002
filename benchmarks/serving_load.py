"""Serving under load: requests/s and p50/p95 latency at 1, 8 and 32 concurrent HTTP clients, for the
demo before micro-batching (commit c380fee), the demo now, and `mlflow models serve`, on one model.

    python -m benchmarks.serving_load --tracking-uri sqlite:///mlruns/mlflow.db [--run-id RUN]
        [--model-uri models:/tagifai@champion] [--old-commit c380fee] [--clients 1 8 32]
        [--seconds 10] [--rounds 2] [--json benchmarks/serving_load.json]

The clients are plain `http.client` connections in threads (gradio_client would burn the cores the
servers need): a demo request is Gradio's HTTP API, POST /gradio_api/call/predict then GET its event
stream; an MLflow request is one POST /invocations. All servers run at once; while one is measured
the others are paused (SIGSTOP), and the order alternates between rounds, so that a shared, busy
machine weighs on all of them alike. The old demo runs from `git archive` of --old-commit in a
temporary folder. The MLflow server is skipped, saying why, when --model-uri has no MLmodel.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

import pandas as pd

from benchmarks.http_load import REQUEST_TIMEOUT_S, Server, load, markdown, start, stop, summary
from tagifai.data import sample_dataset_path

REPO = Path(__file__).resolve().parents[1]
TARGET_SPEEDUP, TARGET_P95_S = 3.0, 1.0


def gradio_predict(conn: http.client.HTTPConnection, title: str, description: str) -> str:
    conn.request(
        "POST",
        "/gradio_api/call/predict",
        json.dumps({"data": [title, description]}),
        {"Content-Type": "application/json"},
    )
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"POST {response.status}: {body[:200]!r}")
    conn.request("GET", f"/gradio_api/call/predict/{json.loads(body)['event_id']}")
    response = conn.getresponse()
    event = None
    for line in response.read().decode().splitlines():  # the stream ends after its last event
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: ") and event in ("complete", "error"):
            if event == "error":
                raise RuntimeError(f"demo error: {line[6:200]}")
            return json.loads(line.removeprefix("data: "))[0]["label"]
    raise RuntimeError(f"event stream ended without a result (HTTP {response.status})")


def mlflow_predict(conn: http.client.HTTPConnection, title: str, description: str) -> str:
    payload = {"dataframe_split": {"columns": ["title", "description"], "data": [[title, description]]}}
    conn.request("POST", "/invocations", json.dumps(payload), {"Content-Type": "application/json"})
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"POST /invocations {response.status}: {body[:200]!r}")
    return str(json.loads(body)["predictions"][0]["prediction"])


def mlflow_model_missing(model_uri: Optional[str], tracking_uri: str) -> Optional[str]:
    """Why `mlflow models serve` cannot be measured on `model_uri`, or None when it can."""
    if not model_uri:
        return "no --model-uri given"
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import get_model_info

    mlflow.set_tracking_uri(tracking_uri)
    try:
        get_model_info(model_uri)
    except (MlflowException, OSError) as error:
        return f"{model_uri} is not an MLflow Model here ({str(error).splitlines()[0][:200]})"
    return None


def served_run_id(tracking_uri: str, run_id: Optional[str], model_name: str) -> str:
    from mlflow.tracking import MlflowClient

    from tagifai.lifecycle import registry

    if run_id:
        return run_id
    version = registry.champion(MlflowClient(tracking_uri), model_name)
    if version is None:
        sys.exit(f"error: no --run-id and no champion of {model_name!r} in {tracking_uri}")
    return version.run_id


def unpack_commit(commit: str, folder: Path) -> Path:
    archive = subprocess.run(["git", "archive", commit], cwd=REPO, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serving_load", description=__doc__.split("\n")[0])
    parser.add_argument("--tracking-uri", required=True, help="MLflow store holding the model")
    parser.add_argument("--run-id", help="run whose checkpoint the demos serve (default: the champion's run)")
    parser.add_argument("--model-name", default="tagifai", help="registered model (default: tagifai)")
    parser.add_argument("--model-uri", help="MLflow Model for `mlflow models serve` (default: models:/NAME@champion)")
    parser.add_argument("--old-commit", default="c380fee", help="the demo before this change (default: c380fee)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=10, help="length of one measurement (default: 10)")
    parser.add_argument("--max-requests", type=int, default=5_000, help="cap on one measurement's requests")
    parser.add_argument("--rounds", type=int, default=2, help="measurements per server and client count")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "serving_load.json")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    run_id = served_run_id(args.tracking_uri, args.run_id, args.model_name)
    model_uri = args.model_uri or f"models:/{args.model_name}@champion"
    skipped = mlflow_model_missing(model_uri, args.tracking_uri)
    frame = pd.read_csv(sample_dataset_path())
    projects = list(zip(frame["title"].astype(str), frame["description"].fillna("").astype(str)))
    env = {
        **os.environ,
        "GRADIO_ANALYTICS_ENABLED": "False",
        "MLFLOW_TRACKING_URI": args.tracking_uri,
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "no_proxy": "127.0.0.1,localhost",
    }
    demo = [
        sys.executable,
        "-m",
        "demo.app",
        "--tracking-uri",
        args.tracking_uri,
        "--run-id",
        run_id,
        "--reload-interval",
        "0",
    ]
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="tagifai-serving-load-") as scratch:
        scratch = Path(scratch)
        old_tree = unpack_commit(args.old_commit, scratch / "old")
        try:
            servers.append(
                start(
                    f"demo {args.old_commit}",
                    demo,
                    "/config",
                    gradio_predict,
                    old_tree,
                    {**env, "PYTHONPATH": str(old_tree)},
                    scratch,
                )
            )
            servers.append(
                start("demo now", demo, "/config", gradio_predict, REPO, {**env, "PYTHONPATH": str(REPO)}, scratch)
            )
            if skipped:
                print(f"mlflow models serve: skipped: {skipped}")
            else:
                command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
                # MLflow starts `uvicorn` by name: this interpreter's scripts must be on PATH.
                scripts = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
                servers.append(start("mlflow models serve", command, "/ping", mlflow_predict, REPO, scripts, scratch))
            answers = {}
            for server in servers:  # a warm-up, and a check that they serve the same model
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_TIMEOUT_S)
                answers[server.name] = [server.call(conn, *project) for project in projects[:16]]
                conn.close()
                server.signal(signal.SIGSTOP)
                print(f"{server.name}: up on port {server.port}", flush=True)
            if len({tuple(tags) for tags in answers.values()}) > 1:
                print(f"warning: the servers disagree on the first 16 projects: {answers}")
            runs: dict[tuple[str, int], list[dict]] = {}
            for round_ in range(args.rounds):
                for clients in args.clients:
                    for server in servers if round_ % 2 == 0 else servers[::-1]:
                        server.signal(signal.SIGCONT)
                        result = load(server, projects, clients, args.seconds, args.max_requests)
                        server.signal(signal.SIGSTOP)
                        runs.setdefault((server.name, clients), []).append(result)
                        print(
                            f"round {round_ + 1}, {clients:>2} clients, {server.name}: "
                            f"{len(result['latencies_s']) / result['wall_s']:.1f} req/s",
                            flush=True,
                        )
        finally:
            for server in servers:
                stop(server)
    rows = [
        summary(name, clients, results) for (name, clients), results in sorted(runs.items(), key=lambda kv: kv[0][1])
    ]
    old = {r["clients"]: r for r in rows if r["server"] == servers[0].name}
    new = {r["clients"]: r for r in rows if r["server"] == "demo now"}
    top = max(args.clients)
    speedup = new[top]["req_per_s"] / old[top]["req_per_s"] if old[top]["req_per_s"] else float("inf")
    met = speedup >= TARGET_SPEEDUP and (new[top]["p95_ms"] or 1e9) < TARGET_P95_S * 1000
    print(markdown(rows))
    verdict = "met" if met else "missed"
    print(
        f"\nat {top} clients: {speedup:.1f}x the old demo's throughput, p95 {new[top]['p95_ms']} ms "
        f"(target >= {TARGET_SPEEDUP:g}x, p95 < {TARGET_P95_S * 1000:.0f} ms): {verdict}"
    )
    report = {
        "run_id": run_id, "model_uri": model_uri, "mlflow_serve_skipped": skipped, "old_commit": args.old_commit,
        "same_answers": len({tuple(tags) for tags in answers.values()}) == 1, "seconds": args.seconds,
        "rounds": args.rounds, "cpus": os.cpu_count(), "rows": rows, "speedup_at_max_clients": round(speedup, 2),
        "target_met": met,
    }  # fmt: skip
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
