"""The CPU's fp32 peak: the physical limit the inference bound is taken from.

Two independent figures, and the larger is the peak, so that no measured rate can exceed it:

- theoretical: cores x FMA pipes x fp32 lanes per pipe x 2 FLOPs x clock. The lanes come from the
  CPU's flags (avx512f: 16, avx2/fma: 8) and, where a micro-architecture splits 512-bit operations
  into two 256-bit halves (AMD Zen 4), from its family; every x86 core since Haswell/Zen 2 has at
  most 2 FMA pipes. The clock is measured: a chain of dependent integer adds retires one add per
  cycle on every x86-64 core, so adds per second is the clock the core runs at now (turbo
  included, which /proc/cpuinfo's nominal MHz is not); the best of many short timings, since load
  from other processes can only slow a timing down. Where that cannot run (not x86-64 Linux), the
  largest MHz /proc/cpuinfo or cpufreq reports is used, and the source says so.
- measured: the best GEMM rate any engine here reaches (torch.mm and ONNX Runtime's MatMul) over a
  sweep of shapes, the model's own included.

int8 has its own peak: an int8 multiply-add instruction (vpdpbusd with VNNI, vpmaddubsw without)
does 4 multiply-adds per 32-bit lane where an fp32 FMA does 1, so 4x the fp32 peak bounds it (an
int8 engine does beat the fp32 peak: measured here, 1.35x in CPU time).

Where an estimate is uncertain it errs high (a SMT sibling counted as a core, 2 FMA pipes on a
part with one): a peak set too high is still a bound; one set too low is not.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

ADDS_PER_LOOP = 16
# x86-64, System V (count in rdi): rax = 0; rcx = 1; loop: 16 x `add rax, rcx` (each waits for
# the previous: 1 cycle apiece); dec rdi; jnz loop; ret. The loop counter runs beside the chain.
_ADD_RAX_RCX = b"\x48\x01\xc8"
_LOOP_BODY = _ADD_RAX_RCX * ADDS_PER_LOOP + b"\x48\xff\xcf"  # + dec rdi
_ADD_CHAIN = (
    b"\x48\x31\xc0"  # xor rax, rax
    + b"\x48\xc7\xc1\x01\x00\x00\x00"  # mov rcx, 1
    + _LOOP_BODY
    + b"\x75"
    + bytes([(-(len(_LOOP_BODY) + 2)) & 0xFF])  # jnz back to the first add
    + b"\xc3"  # ret
)

GEMM_SQUARE_SIZES = (256, 512, 1024, 2048)
INT8_OPS_PER_FP32_FLOP = 4  # int8 multiply-adds per 32-bit lane per instruction, against 1 fp32 FMA


def cpuinfo() -> dict:
    """Vendor, family, flags and the largest MHz /proc/cpuinfo lists (empty off Linux)."""
    info: dict = {"flags": set(), "mhz": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "vendor_id":
            info.setdefault("vendor", value)
        elif key == "cpu family":
            info.setdefault("family", int(value))
        elif key == "model":
            info.setdefault("model", int(value))
        elif key == "flags" and not info["flags"]:
            info["flags"] = set(value.split())
        elif key == "cpu MHz":
            info["mhz"].append(float(value))
    return info


def fp32_flops_per_cycle(info: dict) -> tuple[Optional[int], str]:
    """fp32 FLOPs one core can retire per cycle, and why; None where no table entry applies."""
    flags = info.get("flags", set())
    if platform.machine() not in ("x86_64", "AMD64") or not flags:
        return None, f"no FMA table for {platform.machine()}"
    pipes = 2
    if "avx512f" in flags:
        zen4 = info.get("vendor") == "AuthenticAMD" and info.get("family") == 25
        lanes, isa = (8, "avx512f on AMD Zen 4: 512-bit ops run as two 256-bit halves") if zen4 else (16, "avx512f")
    elif "fma" in flags or "avx2" in flags:
        lanes, isa = 8, "avx2/fma"
    elif "avx" in flags:  # no FMA: one add pipe and one multiply pipe, as many FLOPs as one FMA pipe
        pipes, lanes, isa = 1, 8, "avx: an add and a multiply pipe, no FMA"
    else:
        pipes, lanes, isa = 1, 4, "sse: an add and a multiply pipe"
    return pipes * lanes * 2, f"{pipes} FMA pipe(s) x {lanes} fp32 lanes ({isa}) x 2 FLOP"


def measured_clock_ghz(repeats: int = 30, loops: int = 500_000) -> Optional[float]:
    """The core's clock from a timed dependent-add chain (best of `repeats`); None off x86-64 Linux
    or where executable memory is refused."""
    if platform.machine() != "x86_64" or not hasattr(mmap, "PROT_EXEC"):
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, PermissionError):
        return None
    try:
        page.write(_ADD_CHAIN)
        buffer = ctypes.c_char.from_buffer(page)
        chain = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64)(ctypes.addressof(buffer))
        chain(loops)  # warm-up: the core leaves any idle state
        best = 0.0
        for _ in range(repeats):
            started = time.perf_counter()
            adds = chain(loops)
            best = max(best, adds / (time.perf_counter() - started))
        del chain, buffer
        return best / 1e9
    finally:
        page.close()


def reported_clock_ghz(info: dict) -> Optional[float]:
    """The largest clock the OS reports: cpufreq's maximum if present, else /proc/cpuinfo's MHz."""
    candidates = [mhz / 1000 for mhz in info.get("mhz", [])]
    try:
        candidates.append(int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1e6)
    except (OSError, ValueError):
        pass
    return max(candidates, default=None)


def _best_rate(run, flops: float, repeats: int, budget_flops: float = 2e9) -> float:
    run()
    calls = max(1, int(budget_flops / flops))
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            run()
        best = max(best, flops * calls / (time.perf_counter() - started))
    return best / 1e9


def _onnx_matmul(m: int, k: int, n: int, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    inputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in (("A", [m, k]), ("B", [k, n]))
    ]
    output = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["Y"])], "matmul", inputs, [output])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {"A": np.random.randn(m, k).astype(np.float32), "B": np.random.randn(k, n).astype(np.float32)}
    return lambda: session.run(None, feeds)


def gemm_sweep(threads: int, shapes: list[tuple[int, int, int]], repeats: int = 3) -> dict:
    """Best fp32 GEMM GFLOP/s per engine and shape at `threads` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    rates: dict[str, dict[str, float]] = {"torch.mm": {}, "onnxruntime MatMul": {}}
    try:
        for m, k, n in shapes:
            a, b = torch.randn(m, k), torch.randn(k, n)
            flops = 2.0 * m * k * n
            rates["torch.mm"][f"{m}x{k}x{n}"] = _best_rate(lambda a=a, b=b: torch.mm(a, b), flops, repeats)
            rates["onnxruntime MatMul"][f"{m}x{k}x{n}"] = _best_rate(_onnx_matmul(m, k, n, threads), flops, repeats)
    finally:
        torch.set_num_threads(previous)
    return rates


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def peak(thread_counts: list[int], model_shapes: list[tuple[int, int, int]], quick: bool = False) -> dict:
    """The fp32 peak per thread count: max(theoretical, best GEMM), with both and the source."""
    info = cpuinfo()
    per_cycle, why = fp32_flops_per_cycle(info)
    measured, reported = measured_clock_ghz(), reported_clock_ghz(info)
    clock = max(filter(None, (measured, reported)), default=None)
    clock_source = (
        f"measured {measured:.2f} GHz by a dependent-add chain"
        if measured and clock == measured
        else f"reported {reported:.2f} GHz (cpufreq max / /proc/cpuinfo MHz)"
        if reported
        else None
    )
    squares = GEMM_SQUARE_SIZES[1:3] if quick else GEMM_SQUARE_SIZES
    shapes = [(s, s, s) for s in squares] + list(model_shapes)
    by_threads = {}
    for threads in thread_counts:
        cores = min(threads, usable_cores())
        theoretical = per_cycle * clock * cores if per_cycle and clock else None
        sweep = gemm_sweep(threads, shapes, repeats=2 if quick else 3)
        best_engine, best_shape = max(((e, s) for e in sweep for s in sweep[e]), key=lambda es: sweep[es[0]][es[1]])
        best = sweep[best_engine][best_shape]
        if theoretical is not None and theoretical >= best:
            source = f"theoretical: {cores} core(s) x {why} x {clock_source}"
        else:
            source = f"best measured GEMM: {best_engine} at {best_shape}" + (
                f" (above the theoretical {theoretical:.0f}: {why} x {clock_source})" if theoretical else f" ({why})"
            )
        by_threads[str(threads)] = {
            "peak_gflops": max(filter(None, (theoretical, best))),
            "peak_int8_gops": INT8_OPS_PER_FP32_FLOP * max(filter(None, (theoretical, best))),
            "source": source,
            "theoretical_gflops": theoretical,
            "best_gemm_gflops": best,
            "best_gemm": f"{best_engine} {best_shape}",
            "best_gemm_fraction_of_peak": best / max(filter(None, (theoretical, best))),
            "gemm_gflops": sweep,
        }
    return {
        "fp32_flops_per_cycle_per_core": per_cycle,
        "flops_per_cycle_source": why,
        "clock_ghz": clock,
        "clock_measured_ghz": measured,
        "clock_reported_ghz": reported,
        "clock_source": clock_source,
        "by_threads": by_threads,
    }
