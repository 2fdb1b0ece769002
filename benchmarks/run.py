"""Benchmark: training against a naive loop, core utilisation of whole CLI runs, inference against
the CPU's fp32 peak, the Optuna peer side by side, memory.

    python -m benchmarks.run --dataset-loc ../shared/data/made-with-ml/dataset.csv --out results.json
    python -m benchmarks.run --dataset-loc data.csv --quick            # minutes, not tens of minutes

Every ratio is measured inside this one run (the two sides interleaved where they can be), because
the machine it runs on may be shared. `python -m flows.tune` runs as a child process, measured from
outside (benchmarks/cli_run.py): with the defaults (bundled sample, 4 trials x 4 epochs) and, given
--dataset-loc, on that data with 4 x 5; the Optuna peer (benchmarks/peer_optuna.py, needs the
`bench` extra) runs the same study as the last of those. Results are printed as a table and
written as JSON (--out).
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

import torch

from benchmarks import cli_run, inference_bench, train_bench
from benchmarks.proctree import LoadSampler
from tagifai.data import load_dataset, split_dataset
from tagifai.settings import DEFAULT_BACKBONE, DEFAULT_SEED, TuneSettings

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {  # metric path, comparison, threshold: issues 5, 15 and 23's targets for a 2-core CPU
    "speedup_vs_naive": (("train", "speedup_vs_naive"), ">=", 2.5),
    "efficiency_fp32": (("train", "efficiency_fp32"), ">=", 0.5),
    # Issue 23: fixed cost (CLI wall minus the study's) of the defaults, and against the import floor.
    "fixed_cost_s": (("tuning", "fixed_cost_s"), "<=", 10.0),
    "fixed_cost_over_import_baseline": (("tuning", "fixed_cost_over_import_baseline"), "<=", 2.0),
    "batch64_fraction_of_peak": (("inference", "batch64_fraction_of_peak"), ">=", 0.6),
    "single_p50_over_floor": (("inference", "single_p50_over_floor"), "<=", 2.0),
    "peer_wall_ratio": (("peer", "optuna_over_flow_wall"), ">", 1.0),  # the flow is faster
    "peer_f1_margin": (("peer", "flow_minus_optuna_test_f1"), ">=", 0.0),  # and at least as accurate
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


def tuning(options, workdir: Path, dataset_loc, trials: int, epochs: int, prefect_api: bool = False):
    """One `python -m flows.tune` run measured from outside (benchmarks/cli_run.py); (result, memory).

    `prefect_api`: run it against a Prefect server started beforehand (as with deployments or a
    long-lived `prefect server start`) instead of Prefect's temporary server; the server is then
    not part of the sampled process tree.
    """
    extra = ["--holdout-loc", options.holdout_loc] if options.holdout_loc and dataset_loc else []
    arguments = dict(
        workdir=workdir,
        num_runs=trials,
        num_epochs=epochs,
        dataset_loc=dataset_loc,
        model=options.model,
        extra_args=tuple(extra),
        warm=not options.cold_stores,
    )
    if not prefect_api:
        return cli_run.run_cli(**arguments)
    workdir.mkdir(parents=True, exist_ok=True)
    with prefect_server(cli_run.child_env(workdir), workdir / "prefect-server.log") as api_url:
        return cli_run.run_cli(**arguments, extra_env={"PREFECT_API_URL": api_url})


def peer(options, workdir: Path, flow_run: dict, dataset_loc, trials: int, epochs: int) -> dict:
    """The Optuna + MLflow peer on the same study as `flow_run`, timed from process start to exit."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        return {"skipped": "optuna is not installed: pip install -c constraints.txt -e '.[bench]'"}
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "benchmarks.peer_optuna", "--trials", str(trials), "--epochs", str(epochs)]
    command += ["--model", options.model, "--batch-size", str(options.batch_size), "--seed", str(options.seed)]
    command += ["--workdir", str(workdir), "--out", str(workdir / "peer.json")]
    if dataset_loc:
        command += ["--dataset-loc", dataset_loc]
    if options.holdout_loc and dataset_loc:
        command += ["--holdout-loc", options.holdout_loc]
    with open(workdir / "peer.log", "w") as log:
        started = time.time()
        code = subprocess.run(command, cwd=ROOT, env=cli_run.child_env(workdir), stdout=log, stderr=subprocess.STDOUT)
        wall = time.time() - started
    if code.returncode != 0:  # recorded, not raised: the runs before it keep their figures
        return {"failed": f"exit {code.returncode} after {wall:.0f} s", "log": str(workdir / "peer.log")}
    result = json.loads((workdir / "peer.json").read_text())
    return {
        "flow_wall_s": flow_run["wall_s"],
        "flow_test_f1": flow_run["test_f1"],
        "optuna_wall_s": wall,
        "optuna_test_f1": result["test_f1"],
        "optuna_over_flow_wall": wall / flow_run["wall_s"],
        "flow_minus_optuna_test_f1": flow_run["test_f1"] - result["test_f1"],
        "study": {"dataset": dataset_loc or "bundled sample", "trials": trials, "epochs": epochs},
        "optuna": result,
        "log": str(workdir / "peer.log"),
    }


def check_targets(results: dict) -> dict:
    checks = {}
    for name, (path, comparison, threshold) in TARGETS.items():
        value = results
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if not isinstance(value, (int, float)):
            checks[name] = {"value": None, "target": f"{comparison} {threshold}", "met": None}
            continue
        met = {">=": value >= threshold, "<=": value <= threshold, "<": value < threshold, ">": value > threshold}[
            comparison
        ]
        checks[name] = {"value": value, "target": f"{comparison} {threshold}", "met": bool(met)}
    return checks


def _rows(rows, width: int) -> None:
    for name, value, fmt in rows:
        values = value if isinstance(value, tuple) else (value,)
        text = "-" if any(v is None for v in values) else fmt.format(*values)
        print(f"  {name:<{width}}  {text}")


def print_tuning(name: str, tune: dict, width: int) -> None:
    if not tune or "wall_s" not in tune:
        return
    print(f"{name}: {tune.get('command', '')}")
    _rows(
        [
            ("wall s (process start to exit)", tune.get("wall_s"), "{:.1f}"),
            (
                "fixed cost s (wall - study) / import floor s",
                (tune.get("fixed_cost_s"), tune.get("import_baseline_s")),
                "{:.1f} / {:.1f}",
            ),
            (
                "trial compute s (core-s, 1 CPU per trial)",
                (tune.get("trial_compute_s"), tune.get("trial_compute_core_s")),
                "{:.1f} ({:.1f})",
            ),
            (
                "fixed cost CPU floor s (busy core-s / cores)",
                tune.get("cpu", {}).get("fixed_cost_cpu_floor_s"),
                "{:.1f}",
            ),
            (
                "cores busy before the first epoch (share)",
                tune.get("cpu", {}).get("busy_share", {}).get("before_first_epoch"),
                "{:.2f}",
            ),
            ("CLI core utilisation", tune.get("cli_core_utilisation"), "{:.2f}"),
            ("study-only core utilisation", tune.get("study_core_utilisation"), "{:.2f}"),
            ("test F1", tune.get("test_f1"), "{:.3f}"),
        ],
        width,
    )
    cores = tune.get("usable_cores", 1)
    for part, core_s in tune.get("idle_breakdown_core_s", {}).items():
        print(f"    idle: {part:<{width - 10}}  {core_s:6.1f} core-s ({core_s / cores:.1f} s of wall x {cores} cores)")
    for role, seconds in tune.get("cpu", {}).get("cpu_s_by_role", {}).get("before_first_epoch", {}).items():
        print(f"    CPU before first epoch: {role:<{width - 24}}  {seconds:6.1f} s")
    for label, key in (("before first epoch", "before_first_epoch_s"), ("after last epoch", "after_last_epoch_s")):
        for part, seconds in tune.get(key, {}).items():
            if isinstance(seconds, (int, float)):
                print(f"      {label}: {part:<{width - 14 - len(label)}}  {seconds:6.1f} s")


def print_table(results: dict) -> None:
    train, infer, memory, peer_ = (results.get(k, {}) for k in ("train", "inference", "memory", "peer"))
    machine = results["machine"]
    print(
        f"\nmachine: {machine['nproc']} CPUs, {machine['cpu_model']}, torch {machine['torch']} "
        f"({machine['torch_cpu_capability']}), {machine['threads']} threads (training comparison: "
        f"{train.get('threads', '-')}), load avg {results['load']['load_avg_1m_mean']:.1f}"
    )
    width = 46
    _rows(
        [
            ("train tokens/s (real tokens)", train.get("tokens_per_s"), "{:.0f}"),
            ("naive tokens/s", train.get("naive_tokens_per_s"), "{:.0f}"),
            ("speed-up vs naive (per epoch)", train.get("speedup_vs_naive"), "{:.2f}x"),
            ("speed-up vs naive (CPU time/epoch)", train.get("speedup_vs_naive_cpu_time"), "{:.2f}x"),
            (
                "padding waste / naive",
                (train.get("padding_waste"), train.get("naive_padding_waste")),
                "{:.1%} / {:.1%}",
            ),
            ("val F1 / naive val F1", (train.get("val_f1"), train.get("naive_val_f1")), "{:.3f} / {:.3f}"),
            ("matmul fp32 GFLOP/s (training threads)", train.get("matmul_gflops_fp32"), "{:.1f}"),
            ("efficiency vs fp32 matmul", train.get("efficiency_fp32"), "{:.2f}"),
        ],
        width,
    )
    print_tuning("tuning CLI, defaults", results.get("tuning", {}), width)
    print_tuning("tuning CLI, --dataset-loc", results.get("tuning_real_data", {}), width)
    print_tuning("tuning CLI, running Prefect server", results.get("tuning_prefect_server", {}), width)
    if "by_engine" in infer:
        bound = infer["bound"]
        print(
            f"inference (default engine {infer['engine']}; targets: batch at {infer['batch_threads']} thread(s), "
            f"single at {infer['single_threads']}; bound: {bound['flop_parameters'] / 1e6:.2f}M parameters x "
            f"2 x {bound['batch64_mean_tokens']:.1f} tokens = {bound['flops_per_example'] / 1e9:.3f} GFLOP/example)"
        )
        for threads, b in bound["by_threads"].items():
            peak = bound["cpu_peak"]["by_threads"][threads]
            print(
                f"  {threads} thread(s): fp32 peak {b['peak_gflops']:.0f} GFLOP/s ({peak['source']}; best GEMM "
                f"{peak['best_gemm_gflops']:.0f}: {peak['best_gemm']}) -> batch bound "
                f"{b['batch64_bound_examples_per_s']:.0f} examples/s, single floor {b['single_floor_ms']:.1f} ms "
                f"({bound['single_median_tokens']:.0f} tokens)"
            )
        for engine, by_threads in infer["by_engine"].items():
            for threads, m in by_threads.items():
                cpu = (
                    f"; in CPU time: {m['batch64_cpu_fraction_of_peak']:.2f} of peak, "
                    f"{m['single_cpu_p50_over_floor']:.2f}x floor"
                    if "batch64_cpu_fraction_of_peak" in m
                    else ""
                )
                print(
                    f"  {engine:<17} {threads} thread(s): batch64 {m['batch64_examples_per_s']:6.0f}/s "
                    f"{m['batch64_gflops']:5.0f} GFLOP/s ({m['batch64_fraction_of_peak']:.2f} of peak), "
                    f"single p50 {m['single_p50_ms']:5.1f} ms ({m['single_p50_over_floor']:.2f}x floor){cpu}"
                )
        costs = infer["load_costs"]
        print(
            f"  load: torch {costs['torch_load_s']:.2f} s; onnx cold {costs['onnx_cold_load_s']:.2f} s / warm "
            f"{costs['onnx_warm_load_s']:.2f} s; int8 cold {costs['onnx-int8_cold_load_s']:.2f} s / warm "
            f"{costs['onnx-int8_warm_load_s']:.2f} s"
        )
        f1 = ", ".join(f"{engine} {value:.4f}" for engine, value in infer["test_f1"].items())
        print(f"  test F1 ({infer['test_rows']} rows): {f1}; int8 change {infer['int8_f1_change']:+.4f}")
    if "optuna_wall_s" in peer_:
        print(
            f"peer ({peer_['study']['dataset']}, {peer_['study']['trials']} x {peer_['study']['epochs']}): "
            f"flow {peer_['flow_wall_s']:.1f} s / F1 {peer_['flow_test_f1']:.3f}; Optuna + MLflow "
            f"{peer_['optuna_wall_s']:.1f} s / F1 {peer_['optuna_test_f1']:.3f}"
        )
    elif peer_:
        print(f"peer: {peer_}")
    if memory:
        _rows([("peak RSS MB (PSS)", (memory.get("peak_rss_mb"), memory.get("peak_pss_mb")), "{:.0f} ({:.0f})")], width)
    print("targets:")
    for name, check in results["targets"].items():
        status = "skipped" if check["met"] is None else ("met" if check["met"] else "MISSED")
        value = "-" if check["value"] is None else f"{check['value']:.3g}"
        print(f"  {name:<26} {value:>10} (target {check['target']}): {status}")


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
    parser.add_argument("--holdout-loc", default=None, help="labelled test CSV for the CLI runs on --dataset-loc")
    parser.add_argument("--model", default=DEFAULT_BACKBONE, help=f"backbone (default: {DEFAULT_BACKBONE})")
    parser.add_argument("--quick", action="store_true", help="fewer epochs, trials and calls")
    parser.add_argument("--out", default=None, help="write the JSON results here")
    parser.add_argument("--num-samples", type=int, default=None, help="use only this many rows of the dataset")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of each training loop (3; quick: 2)")
    parser.add_argument("--trials", type=int, default=None, help="tuning trials of each CLI run (4; quick: 2)")
    parser.add_argument("--tune-epochs", type=int, default=None, help="epochs per trial, defaults run (4; quick: 1)")
    parser.add_argument("--real-epochs", type=int, default=None, help="epochs per trial on --dataset-loc (5; quick: 1)")
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
    parser.add_argument("--skip-tuning", action="store_true", help="skip the CLI runs and the peer")
    parser.add_argument("--skip-peer", action="store_true", help="skip the Optuna peer")
    parser.add_argument("--skip-levers", action="store_true", help="skip the per-lever measurements")
    parser.add_argument("--skip-train", action="store_true", help="skip training, levers and inference")
    parser.add_argument(
        "--cold-stores",
        action="store_true",
        help="time the CLI as a first run (no MLflow store, Prefect database or exported graph yet); default: warm",
    )
    parser.add_argument(
        "--prefect-server",
        action="store_true",
        help="also time the defaults run against a Prefect server started beforehand (deployment setup)",
    )
    parser.add_argument("--workdir", default=None, help="folder for the CLI runs' stores (default: temporary)")
    options = parser.parse_args(argv)
    quick = options.quick
    options.epochs = options.epochs or (2 if quick else 3)
    options.trials = options.trials or (2 if quick else 4)
    options.tune_epochs = options.tune_epochs or (1 if quick else 4)
    options.real_epochs = options.real_epochs or (1 if quick else 5)
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
        print("inference: torch, ONNX Runtime fp32 and int8, at 1 and configured threads ...", flush=True)
        results["inference"] = inference_bench.measure(
            save, splits, options.calls, options.warmup, options.repeats, options.quick
        )

    memories = []
    if options.skip_tuning:
        results["tuning"] = {"skipped": True}
        memories.append(
            {
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "source": "this benchmark process (tuning skipped)",
            }
        )
    else:
        workdir = Path(options.workdir or tempfile.mkdtemp(prefix="tagifai-bench-tuning-")).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        print(
            f"tuning CLI, defaults: sample data, {options.trials} trials x {options.tune_epochs} epochs ...", flush=True
        )
        results["tuning"], memory = tuning(options, workdir / "defaults", None, options.trials, options.tune_epochs)
        memories.append(memory)
        reference = (results["tuning"], None, options.tune_epochs)
        if options.dataset_loc:
            print(
                f"tuning CLI, {options.dataset_loc}: {options.trials} trials x {options.real_epochs} epochs ...",
                flush=True,
            )
            results["tuning_real_data"], memory = tuning(
                options, workdir / "real-data", options.dataset_loc, options.trials, options.real_epochs
            )
            memories.append(memory)
            reference = (results["tuning_real_data"], options.dataset_loc, options.real_epochs)
        if options.prefect_server:
            print("tuning CLI, defaults, against a running Prefect server ...", flush=True)
            results["tuning_prefect_server"], _ = tuning(
                options, workdir / "prefect-server", None, options.trials, options.tune_epochs, prefect_api=True
            )
        if not options.skip_peer:
            flow_run, dataset_loc, epochs = reference
            print(f"peer: Optuna + MLflow, {options.trials} trials x {epochs} epochs ...", flush=True)
            results["peer"] = peer(options, workdir / "peer", flow_run, dataset_loc, options.trials, epochs)
    results["memory"] = max(memories, key=lambda m: m["peak_rss_mb"])
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
