"""Benchmark: training speed against a naive loop, compute efficiency, tuning overhead, latency, memory.

    python -m benchmarks.run --dataset-loc ../shared/data/made-with-ml/dataset.csv --out results.json
    python -m benchmarks.run --dataset-loc data.csv --quick            # minutes, not tens of minutes

Every ratio is measured inside this one run (the two sides interleaved where they can be), because
the machine it runs on may be shared. The tuning flow runs in a child process, so its memory is
that of its own process tree. Results are printed as a table and written as JSON (--out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from benchmarks import train_bench
from benchmarks.predict_latency import batch_throughput, single_latencies_ms
from benchmarks.proctree import LoadSampler, TreeSampler
from tagifai.data import load_dataset, split_dataset
from tagifai.predict import Predictor
from tagifai.settings import DEFAULT_BACKBONE, DEFAULT_SEED, TuneSettings

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {  # metric path, comparison, threshold: the targets for a 2-core CPU
    "speedup_vs_naive": (("train", "speedup_vs_naive"), ">=", 2.5),
    "efficiency_fp32": (("train", "efficiency_fp32"), ">=", 0.5),
    "overhead_share": (("tuning", "overhead_share"), "<=", 0.10),
    "single_p50_ms": (("inference", "single_p50_ms"), "<", 15.0),
    "batch64_examples_per_s": (("inference", "batch64_examples_per_s"), ">=", 1500.0),
    "peak_rss_mb": (("memory", "peak_rss_mb"), "<", 4096.0),
}


def machine_info() -> dict:
    model, family = "unknown", {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model == "unknown":
                model = value.strip()
            if key in ("cpu family", "model") and key not in family:
                family[key] = value.strip()
    except OSError:
        model = platform.processor() or "unknown"
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": model,
        "cpu_family_model": family,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": train_bench.bf16_supported(),
        "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_avg_at_start": os.getloadavg(),
    }


def inference(save_checkpoint, splits, calls: int, warmup: int, repeats: int) -> dict:
    """Predictor latency with torch's thread count as configured, and with 1 thread (interleaved)."""
    titles, descriptions = list(splits.test["title"]), list(splits.test["description"])
    with tempfile.TemporaryDirectory(prefix="tagifai-bench-predictor-") as folder:
        save_checkpoint(Path(folder))
        predictor = Predictor(Path(folder))
    configured = torch.get_num_threads()
    latencies, throughputs = {1: [], configured: []}, {1: [], configured: []}
    for _ in range(2):
        for threads in latencies:
            torch.set_num_threads(threads)
            single_latencies_ms(predictor, titles, descriptions, warmup)
            latencies[threads].extend(single_latencies_ms(predictor, titles, descriptions, calls // 2))
            throughputs[threads].append(batch_throughput(predictor, titles, descriptions, 64, repeats))
    torch.set_num_threads(configured)
    by_threads = {
        str(threads): {
            "single_p50_ms": float(np.percentile(latencies[threads], 50)),
            "single_p95_ms": float(np.percentile(latencies[threads], 95)),
            "batch64_examples_per_s": float(np.median(throughputs[threads])),
        }
        for threads in latencies
    }
    return {
        **by_threads[str(configured)],
        "threads": configured,
        "by_threads": by_threads,
        "single_calls": calls,
        "batch_repeats": repeats,
        "text_source": "test split of --dataset-loc",
    }


@contextlib.contextmanager
def prefect_server(env: dict, log_path: Path):
    """A `prefect server start` on a free loopback port for the duration; yields its API URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            command, env=dict(env, PREFECT_SERVER_UI_ENABLED="false"), stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not start; see {log_path}")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def tuning(options, workdir: Path, with_prefect_server: bool = False) -> tuple[dict, dict]:
    """The instrumented flow in a child process; its process tree's memory sampled from here.

    `with_prefect_server`: run the flow against a Prefect server started beforehand (as with
    deployments or a long-lived `prefect server start`) instead of Prefect's temporary server.
    The server is not part of the sampled process tree then.
    """
    env = dict(os.environ)
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        env.pop(name, None)  # measure the default: a local Ray, SQLite MLflow, Prefect's temporary server
    env.update(PREFECT_HOME=str(workdir / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false", HF_HUB_OFFLINE="1")
    env.setdefault("RAY_AUTH_MODE", "disabled")
    # Prefect gives its temporary server 20 s to start; a busy 2-core machine can take longer.
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    out = workdir / "probe.json"
    if with_prefect_server:
        with prefect_server(env, workdir / "prefect-server.log") as api_url:
            env["PREFECT_API_URL"] = api_url
            return _run_probe(options, workdir, env, out)
    return _run_probe(options, workdir, env, out)


def _run_probe(options, workdir: Path, env: dict, out: Path) -> tuple[dict, dict]:
    command = [
        sys.executable,
        "-m",
        "benchmarks.tuning_probe",
        "--model",
        options.model,
        "--trials",
        str(options.trials),
        "--epochs",
        str(options.tune_epochs),
        "--workdir",
        str(workdir),
        "--out",
        str(out),
    ]
    if options.dataset_loc:
        command += ["--dataset-loc", options.dataset_loc]
    if options.num_samples:
        command += ["--num-samples", str(options.num_samples)]
    if options.cold_stores:
        command += ["--cold"]
    with open(workdir / "tuning.log", "w") as log:
        child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = TreeSampler(child.pid)
        sampler.start()
        code = child.wait()
        memory = sampler.stop()
    if code != 0:
        tail = (workdir / "tuning.log").read_text()[-3000:]
        raise RuntimeError(f"the tuning flow failed (exit {code}); log {workdir / 'tuning.log'}:\n{tail}")
    result = json.loads(out.read_text())
    result.update(trials=options.trials, epochs=options.tune_epochs, log=str(workdir / "tuning.log"))
    memory["source"] = "tuning flow process tree (driver, Prefect server, Ray processes, trials)"
    return result, memory


def check_targets(results: dict) -> dict:
    checks = {}
    for name, (path, comparison, threshold) in TARGETS.items():
        value = results.get(path[0], {}).get(path[1])
        if value is None:
            checks[name] = {"value": None, "target": f"{comparison} {threshold}", "met": None}
            continue
        met = {">=": value >= threshold, "<=": value <= threshold, "<": value < threshold}[comparison]
        checks[name] = {"value": value, "target": f"{comparison} {threshold}", "met": bool(met)}
    return checks


def print_table(results: dict) -> None:
    train, tune, infer, memory, served = (
        results.get(k, {}) for k in ("train", "tuning", "inference", "memory", "tuning_prefect_server")
    )
    machine = results["machine"]
    print(
        f"\nmachine: {machine['nproc']} CPUs, {machine['cpu_model']}, torch {machine['torch']} "
        f"({machine['torch_cpu_capability']}), {machine['threads']} threads (training comparison: "
        f"{train.get('threads', '-')}), load avg {results['load']['load_avg_1m_mean']:.1f}"
    )
    rows = [
        ("train tokens/s (real tokens)", train.get("tokens_per_s"), "{:.0f}"),
        ("train samples/s", train.get("samples_per_s"), "{:.1f}"),
        ("naive tokens/s", train.get("naive_tokens_per_s"), "{:.0f}"),
        ("speed-up vs naive (per epoch)", train.get("speedup_vs_naive"), "{:.2f}x"),
        ("speed-up vs naive (CPU time/epoch)", train.get("speedup_vs_naive_cpu_time"), "{:.2f}x"),
        ("speed-up vs naive (whole trial)", train.get("speedup_vs_naive_trial"), "{:.2f}x"),
        ("padding waste / naive", (train.get("padding_waste"), train.get("naive_padding_waste")), "{:.1%} / {:.1%}"),
        ("val F1 / naive val F1", (train.get("val_f1"), train.get("naive_val_f1")), "{:.3f} / {:.3f}"),
        ("matmul fp32 GFLOP/s", train.get("matmul_gflops_fp32"), "{:.1f}"),
        ("trained layers (ours; naive: all)", train.get("trainable_layers"), "{}"),
        ("model GFLOP/s (real FLOPs/token x tokens/s)", train.get("model_gflops"), "{:.1f}"),
        ("efficiency vs fp32 matmul", train.get("efficiency_fp32"), "{:.2f}"),
        ("tuning wall s", tune.get("wall_s"), "{:.1f}"),
        (
            "trial compute s (sum / critical path)",
            (tune.get("trial_compute_s"), tune.get("critical_path_compute_s")),
            "{:.1f} / {:.1f}",
        ),
        ("orchestration overhead s (share)", (tune.get("overhead_s"), tune.get("overhead_share")), "{:.1f} ({:.1%})"),
        ("  same, running Prefect server: wall s", served.get("wall_s"), "{:.1f}"),
        (
            "  same, running Prefect server: overhead",
            (served.get("overhead_s"), served.get("overhead_share")),
            "{:.1f} ({:.1%})",
        ),
        (
            "predict p50 / p95 ms (1 example)",
            (infer.get("single_p50_ms"), infer.get("single_p95_ms")),
            "{:.1f} / {:.1f}",
        ),
        ("predict batch of 64, examples/s", infer.get("batch64_examples_per_s"), "{:.0f}"),
        ("peak RSS MB (PSS)", (memory.get("peak_rss_mb"), memory.get("peak_pss_mb")), "{:.0f} ({:.0f})"),
    ]
    width = max(len(name) for name, _, _ in rows)
    for name, value, fmt in rows:
        values = value if isinstance(value, tuple) else (value,)
        text = "-" if any(v is None for v in values) else fmt.format(*values)
        print(f"  {name:<{width}}  {text}")
    for name, seconds in tune.get("overhead_breakdown", {}).items():
        if seconds >= 0.05:
            print(f"    overhead: {name:<{width - 14}}  {seconds:.1f} s")
    print("targets:")
    for name, check in results["targets"].items():
        status = "skipped" if check["met"] is None else ("met" if check["met"] else "MISSED")
        value = "-" if check["value"] is None else f"{check['value']:.3g}"
        print(f"  {name:<24} {value:>10} (target {check['target']}): {status}")


def levers(options, data) -> dict:
    args = (data, options.model)
    batches, batch_size, seed = options.lever_batches, options.batch_size, options.seed
    return {
        "padding_waste": train_bench.padding_lever(data.train, batch_size, seed),
        "optimizer": train_bench.optimizer_lever(*args, batches, batch_size, seed),
        "efficiency_by_threads": train_bench.efficiency_lever(*args, batches, batch_size, seed, options.matmul_size),
        "precision": train_bench.precision_lever(*args, min(2, batches), batch_size, seed),
        "threads": train_bench.threads_lever(*args, batches, batch_size, seed, options.thread_rounds),
        "trial_loading": train_bench.loading_lever(*args, repeats=3),
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset-loc", default=None, help="labelled CSV (default: the bundled sample)")
    parser.add_argument("--model", default=DEFAULT_BACKBONE, help=f"backbone (default: {DEFAULT_BACKBONE})")
    parser.add_argument("--quick", action="store_true", help="fewer epochs, trials and calls")
    parser.add_argument("--out", default=None, help="write the JSON results here")
    parser.add_argument("--num-samples", type=int, default=None, help="use only this many rows of the dataset")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of each training loop (3; quick: 2)")
    parser.add_argument("--trials", type=int, default=None, help="tuning trials (4; quick: 2)")
    parser.add_argument("--tune-epochs", type=int, default=None, help="epochs per tuning trial (3; quick: 1)")
    parser.add_argument("--batch-size", type=int, default=TuneSettings().batch_size)
    parser.add_argument(
        "--trainable-layers",
        default=TuneSettings().trainable_layers,
        type=lambda text: None if text == "all" else int(text),
        help="top encoder layers our loop fine-tunes (default: the flow's; 'all' trains every layer)",
    )
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--train-threads",
        type=int,
        default=1,
        help="torch threads of the training comparison (default 1: a tuning trial's, 2 trials x 1 CPU)",
    )
    parser.add_argument("--skip-tuning", action="store_true", help="skip the end-to-end flow (no Prefect/Ray)")
    parser.add_argument("--skip-levers", action="store_true", help="skip the per-lever measurements")
    parser.add_argument("--skip-train", action="store_true", help="skip training, levers and inference")
    parser.add_argument(
        "--cold-stores",
        action="store_true",
        help="time the tuning flow as a first run (no MLflow store or Prefect database yet); default: warm",
    )
    parser.add_argument(
        "--prefect-server",
        action="store_true",
        help="also time the tuning flow against a Prefect server started beforehand (deployment setup)",
    )
    parser.add_argument("--workdir", default=None, help="folder for the tuning run's stores (default: temporary)")
    options = parser.parse_args(argv)
    quick = options.quick
    options.epochs = options.epochs or (2 if quick else 3)
    options.trials = options.trials or (2 if quick else 4)
    options.tune_epochs = options.tune_epochs or (1 if quick else 3)
    options.calls, options.warmup, options.repeats = (20, 5, 2) if quick else (100, 10, 5)
    options.lever_batches, options.thread_rounds = (2, 1) if quick else (6, 2)
    options.matmul_size = 1024 if quick else 2048
    return options


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    options = parse_args(argv)
    if options.threads:
        torch.set_num_threads(options.threads)
    load = LoadSampler()
    load.start()
    results = {"command": "python -m benchmarks.run " + shlex.join(argv), "machine": machine_info()}
    frame = load_dataset(options.dataset_loc).frame
    splits = split_dataset(frame, seed=options.seed, num_samples=options.num_samples)
    started = time.perf_counter()

    if options.skip_train:
        results["train"] = results["inference"] = {"skipped": True}
    else:
        print(
            f"training: ours vs naive, {options.epochs} epochs each at {options.train_threads} thread(s), "
            "interleaved ...",
            flush=True,
        )
        results["train"], data, save = train_bench.compare_with_naive(
            splits,
            options.model,
            options.epochs,
            options.batch_size,
            options.max_length,
            options.seed,
            options.matmul_size,
            options.train_threads,
            options.trainable_layers,
        )
        if not options.skip_levers:
            print("levers ...", flush=True)
            results["levers"] = levers(options, data)
        print("inference ...", flush=True)
        results["inference"] = inference(save, splits, options.calls, options.warmup, options.repeats)

    if options.skip_tuning:
        results["tuning"] = {"skipped": True}
        results["memory"] = {
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "source": "this benchmark process (tuning skipped)",
        }
    else:
        print(f"tuning flow: {options.trials} trials x {options.tune_epochs} epochs ...", flush=True)
        workdir = Path(options.workdir or tempfile.mkdtemp(prefix="tagifai-bench-tuning-")).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        results["tuning"], results["memory"] = tuning(options, workdir)
        if options.prefect_server:
            print("tuning flow again, against a running Prefect server ...", flush=True)
            server_dir = workdir / "with-prefect-server"
            server_dir.mkdir(exist_ok=True)
            results["tuning_prefect_server"], _ = tuning(options, server_dir, with_prefect_server=True)
    results["benchmark_s"] = time.perf_counter() - started
    results["load"] = load.stop()
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    results["targets"] = check_targets(results)
    print_table(results)
    if options.out:
        Path(options.out).write_text(json.dumps(results, indent=2, default=float))
        print(f"wrote {options.out}")
    return results


if __name__ == "__main__":
    main()
