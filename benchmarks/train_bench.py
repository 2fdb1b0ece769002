"""Training speed: tagifai/train.py against the naive loop, the machine's matmul rate, and each lever.

Everything that is compared is interleaved in one process (optimized epoch, naive epoch, matmul
burst, ...), so load from other jobs on the machine hits both sides of every ratio alike.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.naive import NaiveTrial, full_padding_waste
from tagifai import model as model_module
from tagifai import train as train_module
from tagifai.batching import TokenizedData, TokenizedSplit, batch_order, iterate_batches, tokenize_splits
from tagifai.data import Splits
from tagifai.model import bf16_supported, build_classifier, encoder_layers, load_tokenizer, save_checkpoint
from tagifai.settings import DEFAULT_INITIAL_PARAMS
from tagifai.train import make_optimizer, train_classifier

CONFIG = dict(DEFAULT_INITIAL_PARAMS[0])  # the flow's first trial: dropout 0.5, lr 1e-4, ...


def median(values) -> float:
    return float(statistics.median(values))


def matmul_gflops(size: int, dtype=torch.float32, repeats: int = 3, clock=time.perf_counter) -> float:
    """Dense matmul rate at the current torch thread count (one warm-up call, then timed calls);
    `clock=time.process_time` gives the rate per CPU-second of this process instead."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    started = clock()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size**3 * repeats / (clock() - started) / 1e9


def flop_parameters(model: nn.Module) -> int:
    """Parameters that cost 6 FLOPs per token in training: all but the embedding tables and the
    pooler (which BERT runs once per sequence, not per token)."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if ".embeddings." not in f".{name}" and ".pooler." not in f".{name}"
    )


def training_flops_per_token(model: nn.Module, trainable_layers: int | None) -> int:
    """FLOPs per token of a training step that fine-tunes the top `trainable_layers` (None: all).

    Forward: 2 per parameter. Backward: 2 per trainable parameter for its weight gradient, and 2
    per parameter of each layer whose input gradient is needed: every layer above the lowest
    trainable one. Training everything, this is the usual 6 x N.
    """
    total = flop_parameters(model)
    if trainable_layers is None:
        return 6 * total
    layers = encoder_layers(model.backbone)
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    head = sum(p.numel() for p in model.head.parameters())
    trained = sum(per_layer[len(layers) - trainable_layers :]) + head
    lowest = per_layer[len(layers) - trainable_layers] if trainable_layers else head  # no input gradient below it
    return 2 * total + 2 * trained + 2 * (trained - lowest)


class LoopProbe:
    """Times our training loop from outside while active: wraps `train_epoch` and the batches it
    draws in tagifai.train, recording per epoch the training seconds (without validation) and the
    real and padded tokens. The loop itself carries no benchmark bookkeeping."""

    def __init__(self):
        self.epochs: list[dict] = []
        self.first_epoch_started: float | None = None
        self._tokens = self._padded = 0

    @contextlib.contextmanager
    def active(self):
        original_epoch, original_pad = train_module.train_epoch, train_module.pad_batch

        def train_epoch(*args, **kwargs):
            started = time.perf_counter()
            if self.first_epoch_started is None:
                self.first_epoch_started = started
            self._tokens = self._padded = 0
            loss = original_epoch(*args, **kwargs)
            self.epochs.append(
                {"train_time_s": time.perf_counter() - started, "tokens": self._tokens, "padded_tokens": self._padded}
            )
            return loss

        # Only the training loop pads through train.pad_batch (validation goes through the model's
        # predict_logits), so these are the training batches' real and padded tokens.
        def pad_batch(split, indices, pad_token_id):
            input_ids, attention_mask = original_pad(split, indices, pad_token_id)
            self._tokens += int(attention_mask.sum())
            self._padded += attention_mask.numel()
            return input_ids, attention_mask

        train_module.train_epoch, train_module.pad_batch = train_epoch, pad_batch
        try:
            yield self
        finally:
            train_module.train_epoch, train_module.pad_batch = original_epoch, original_pad


def compare_with_naive(
    splits: Splits,
    backbone: str,
    epochs: int,
    batch_size: int,
    max_length: int,
    seed: int,
    matmul_size: int,
    threads: int,
    trainable_layers: int | None = None,
):
    """Train both loops for `epochs` epochs at `threads` torch threads, interleaved epoch by epoch,
    with a matmul burst between epochs; returns (results, tokenized data, checkpoint writer)."""
    configured = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _compare_with_naive(
            splits, backbone, epochs, batch_size, max_length, seed, matmul_size, trainable_layers
        )
    finally:
        torch.set_num_threads(configured)


def _compare_with_naive(splits, backbone, epochs, batch_size, max_length, seed, matmul_size, trainable_layers):
    started = time.perf_counter()
    data = tokenize_splits(splits, backbone, max_length)
    tokenize_s = time.perf_counter() - started
    naive = NaiveTrial(splits, backbone, CONFIG, batch_size, max_length, seed)
    matmul = [matmul_gflops(matmul_size)]
    ours, theirs, ours_cpu, naive_cpu = [], [], [], []
    clock = [time.process_time()]

    def report(metrics: dict, save) -> None:
        ours_cpu.append(time.process_time() - clock[0])
        ours.append(metrics)
        if save is not None:
            report.final_save = save  # writes the model as it is when called: after training
        naive_started = time.process_time()
        theirs.append(naive.epoch())
        naive_cpu.append(time.process_time() - naive_started)
        matmul.append(matmul_gflops(matmul_size))
        clock[0] = time.process_time()

    report.final_save = None
    probe = LoopProbe()
    called = time.perf_counter()
    with probe.active():
        train_classifier(
            CONFIG,
            data,
            num_epochs=epochs,
            batch_size=batch_size,
            report=report,
            seed=seed,
            trainable_layers=trainable_layers,
            precision="fp32",
        )
    ours = [{**metrics, **timing} for metrics, timing in zip(ours, probe.epochs)]
    # Our loop's real work per token (it may leave lower layers frozen); the naive loop trains all.
    flops_per_token = training_flops_per_token(naive.model, trainable_layers)
    naive_flops_per_token = 6 * flop_parameters(naive.model)

    def tokens_per_s(rows):
        return [m["tokens"] / m["train_time_s"] for m in rows]

    ours_tps, naive_tps = tokens_per_s(ours), tokens_per_s(theirs)
    rows_per_epoch = len(data.train)
    # Each epoch against the mean of the matmul bursts just before and after it.
    efficiency = [flops_per_token * tps / 1e9 / ((matmul[i] + matmul[i + 1]) / 2) for i, tps in enumerate(ours_tps)]
    result = {
        "threads": torch.get_num_threads(),
        "epochs": epochs,
        "batch_size": batch_size,
        "train_rows": rows_per_epoch,
        "mean_tokens_per_row": float(data.train.lengths.mean()),
        "tokens_per_s": median(ours_tps),
        "samples_per_s": median([rows_per_epoch / m["train_time_s"] for m in ours]),
        "naive_tokens_per_s": median(naive_tps),
        "naive_samples_per_s": median([rows_per_epoch / m["train_time_s"] for m in theirs]),
        "speedup_vs_naive": median(ours_tps) / median(naive_tps),
        "speedup_per_epoch": [a / b for a, b in zip(ours_tps, naive_tps)],
        # Cross-check that load from other jobs cannot skew: CPU-seconds of this process per epoch
        # (train + validation) for each loop.
        "epoch_cpu_s": ours_cpu,
        "naive_epoch_cpu_s": naive_cpu,
        "speedup_vs_naive_cpu_time": median(naive_cpu) / median(ours_cpu),
        "padding_waste": 1 - sum(m["tokens"] for m in ours) / sum(m["padded_tokens"] for m in ours),
        "naive_padding_waste": full_padding_waste(data.train.lengths),
        "naive_padded_length": naive.padded_length,
        "val_f1": ours[-1]["val_f1"],
        "naive_val_f1": theirs[-1]["val_f1"],
        "val_f1_per_epoch": [m["val_f1"] for m in ours],
        "naive_val_f1_per_epoch": [m["val_f1"] for m in theirs],
        "val_loss": ours[-1]["val_loss"],
        "naive_val_loss": theirs[-1]["val_loss"],
        "epoch_time_s": [m["epoch_time_s"] for m in ours],
        "naive_epoch_time_s": [m["epoch_time_s"] for m in theirs],
        # A whole trial: what the naive loop does inside it (tokenize, build) plus its epochs,
        # against our trial (model build; tokenization happened once, before any trial).
        "trial_s": (probe.first_epoch_started - called) + sum(m["epoch_time_s"] for m in ours),
        "naive_trial_s": naive.setup_s + sum(m["epoch_time_s"] for m in theirs),
        "tokenize_once_s": tokenize_s,
        "naive_tokenize_in_trial_s": naive.tokenize_s,
        "trainable_layers": "all" if trainable_layers is None else trainable_layers,
        "flop_parameters": naive_flops_per_token // 6,
        "training_flops_per_token": flops_per_token,
        "naive_training_flops_per_token": naive_flops_per_token,
        "matmul_size": matmul_size,
        "matmul_gflops_fp32": median(matmul),
        "matmul_gflops_fp32_bursts": matmul,
        "model_gflops": flops_per_token * median(ours_tps) / 1e9,
        "efficiency_fp32": median(efficiency),
        "efficiency_fp32_per_epoch": efficiency,
        "naive_efficiency_fp32": naive_flops_per_token * median(naive_tps) / 1e9 / median(matmul),
    }
    result["speedup_vs_naive_trial"] = result["naive_trial_s"] / result["trial_s"]
    return result, data, report.final_save


def _fixed_batches(data: TokenizedData, count: int, batch_size: int, seed: int):
    batches = list(iterate_batches(data.train, batch_size, data.pad_token_id, np.random.default_rng(seed)))
    return batches[:count]


def _train_steps(model, optimizer, batches, precision: str = "fp32") -> float:
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    started = time.perf_counter()
    for input_ids, mask, labels in batches:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(input_ids, mask)
        loss_fn(logits.float(), labels).backward()
        optimizer.step()
    return time.perf_counter() - started


def optimizer_lever(data: TokenizedData, backbone: str, steps: int, batch_size: int, seed: int) -> dict:
    """Seconds per optimizer step: PyTorch's default AdamW on CPU (a per-tensor loop) vs fused."""
    torch.manual_seed(seed)
    model = build_classifier(backbone, len(data.class_to_index), 0.5)
    input_ids, mask, labels = _fixed_batches(data, 1, batch_size, seed)[0]
    nn.CrossEntropyLoss()(model(input_ids, mask), labels).backward()
    step_time = _train_steps(model, torch.optim.AdamW(model.parameters(), lr=1e-9), [(input_ids, mask, labels)])
    default, fused = torch.optim.AdamW(model.parameters(), lr=1e-9), make_optimizer(model.parameters(), 1e-9)
    times = {"default": [], "fused": []}
    for _ in range(steps + 1):  # the first round warms both up
        for name, optimizer in (("default", default), ("fused", fused)):
            started = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - started)
    default_s, fused_s = median(times["default"][1:]), median(times["fused"][1:])
    return {
        "default_adamw_step_s": default_s,
        "fused_adamw_step_s": fused_s,
        "optimizer_speedup": default_s / fused_s,
        "train_step_s": step_time,
        "default_share_of_step": default_s / step_time,
    }


def precision_lever(data: TokenizedData, backbone: str, batches: int, batch_size: int, seed: int) -> dict:
    """bf16 autocast against fp32 on the same batches, and the bf16 matmul rate."""
    torch.manual_seed(seed)
    model = build_classifier(backbone, len(data.class_to_index), 0.5)
    optimizer = make_optimizer(model.parameters(), 1e-9)
    work = _fixed_batches(data, batches, batch_size, seed)
    _train_steps(model, optimizer, work[:1])
    _train_steps(model, optimizer, work[:1], "bf16")
    fp32_s = _train_steps(model, optimizer, work)
    bf16_s = _train_steps(model, optimizer, work, "bf16")
    return {
        "bf16_native": bf16_supported(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "fp32_step_s": fp32_s / len(work),
        "bf16_step_s": bf16_s / len(work),
        "bf16_speedup": fp32_s / bf16_s,
        "matmul_gflops_fp32_1024": matmul_gflops(1024),
        "matmul_gflops_bf16_512": matmul_gflops(512, torch.bfloat16, repeats=1),
    }


def efficiency_lever(
    data: TokenizedData, backbone: str, batches: int, batch_size: int, seed: int, matmul_size: int, rounds: int = 2
) -> dict:
    """Compute efficiency of one training process at 1 thread (a tuning trial's setting) and at the
    configured thread count, each against the matmul rate at that thread count, interleaved."""
    configured = torch.get_num_threads()
    torch.manual_seed(seed)
    model = build_classifier(backbone, len(data.class_to_index), 0.5)
    optimizer = make_optimizer(model.parameters(), 1e-9)
    work = _fixed_batches(data, batches, batch_size, seed)
    tokens = sum(int(mask.sum()) for _, mask, _ in work)
    rates = {threads: {"tokens_per_s": [], "matmul": []} for threads in sorted({1, configured})}
    try:
        for round_ in range(rounds + 1):  # round 0 warms up
            for threads, rate in rates.items():
                torch.set_num_threads(threads)
                matmul = matmul_gflops(matmul_size)
                seconds = _train_steps(model, optimizer, work if round_ else work[:1])
                if round_:
                    rate["tokens_per_s"].append(tokens / seconds)
                    rate["matmul"].append(matmul)
    finally:
        torch.set_num_threads(configured)
    flops_per_token = 6 * flop_parameters(model)
    return {
        str(threads): {
            "tokens_per_s": median(rate["tokens_per_s"]),
            "matmul_gflops_fp32": median(rate["matmul"]),
            "efficiency_fp32": flops_per_token * median(rate["tokens_per_s"]) / 1e9 / median(rate["matmul"]),
        }
        for threads, rate in rates.items()
    }


def _thread_worker(backbone, data, threads, batches, batch_size, seed, barrier, results):
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = build_classifier(backbone, len(data.class_to_index), 0.5)
    optimizer = make_optimizer(model.parameters(), 1e-9)
    work = _fixed_batches(data, batches, batch_size, seed)
    _train_steps(model, optimizer, work[:1])
    barrier.wait()
    seconds = _train_steps(model, optimizer, work)
    results.put((sum(int(mask.sum()) for _, mask, _ in work), seconds))


def _run_processes(backbone, data, layout, batches, batch_size, seed) -> float:
    """Aggregate real tokens/s of `layout` (threads per process) training side by side."""
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(len(layout)), context.Queue()
    workers = [
        context.Process(
            target=_thread_worker, args=(backbone, data, threads, batches, batch_size, seed, barrier, results)
        )
        for threads in layout
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=3600) for _ in workers]
    for worker in workers:
        worker.join()
    return sum(tokens for tokens, _ in outcomes) / max(seconds for _, seconds in outcomes)


def threads_lever(data: TokenizedData, backbone: str, batches: int, batch_size: int, seed: int, rounds: int) -> dict:
    """The machine's total training rate for three layouts: one trial x two threads, two trials x
    one thread (the tuning default), and two trials x two threads (torch's default thread count
    in each of two concurrent trials: oversubscribed)."""
    layouts = {"one_trial_two_threads": [2], "two_trials_one_thread": [1, 1], "two_trials_two_threads": [2, 2]}
    rates = {name: [] for name in layouts}
    for _ in range(rounds):
        for name, layout in layouts.items():
            rates[name].append(_run_processes(backbone, data, layout, batches, batch_size, seed))
    result = {f"{name}_tokens_per_s": median(values) for name, values in rates.items()}
    result["two_by_one_over_one_by_two"] = median(rates["two_trials_one_thread"]) / median(
        rates["one_trial_two_threads"]
    )
    result["two_by_one_over_oversubscribed"] = median(rates["two_trials_one_thread"]) / median(
        rates["two_trials_two_threads"]
    )
    result["rounds"] = rounds
    return result


def padding_lever(split: TokenizedSplit, batch_size: int, seed: int) -> dict:
    """Pad share of one epoch: bucketed batches, per-batch padding of random batches, full padding."""
    lengths = split.lengths

    def waste(batches) -> float:
        padded = sum(len(indices) * int(lengths[indices].max()) for indices in batches)
        return 1 - lengths.sum() / padded

    permutation = np.random.default_rng(seed).permutation(len(split))
    random_batches = [permutation[i : i + batch_size] for i in range(0, len(split), batch_size)]
    return {
        "bucketed": waste(batch_order(split, batch_size, np.random.default_rng(seed))),
        "per_batch_random": waste(random_batches),
        "full": full_padding_waste(lengths),
    }


def loading_lever(data: TokenizedData, backbone: str, repeats: int) -> dict:
    """What each trial pays to start: checksum + load the backbone, load the tokenizer, write a checkpoint."""
    tokenizer = load_tokenizer(backbone)
    model = build_classifier(backbone, len(data.class_to_index), 0.5)

    def timed(action) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            action()
            times.append(time.perf_counter() - started)
        return median(times)

    args = {
        "backbone": backbone,
        "class_to_index": data.class_to_index,
        "max_length": data.max_length,
        "dropout_p": 0.5,
    }
    with tempfile.TemporaryDirectory(prefix="tagifai-bench-ckpt-") as folder:
        write_s = timed(lambda: save_checkpoint(model, tokenizer, Path(folder), args))
        size_mb = sum(path.stat().st_size for path in Path(folder).iterdir()) / 2**20
    return {
        "resolve_backbone_s": timed(lambda: model_module.resolve_backbone.__wrapped__(backbone)),
        "build_classifier_s": timed(lambda: build_classifier(backbone, len(data.class_to_index), 0.5)),
        "load_tokenizer_s": timed(lambda: load_tokenizer(backbone)),
        "checkpoint_write_s": write_s,
        "checkpoint_mb": size_mb,
    }
