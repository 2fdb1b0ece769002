"""What the CLIs report: the tuning run's results (the JSON of --json and --results-fp), its log
lines, and the short human summaries printed at the end."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

from tagifai.behavioural import summary_line
from tagifai.lifecycle.database import redact
from tagifai.tuning.display import format_params, format_seconds


def process_started_at() -> Optional[float]:
    """When this process started (Unix time), from /proc on Linux; None elsewhere."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        import os

        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return None


def data_facts(data, data_key: str, splits=None) -> dict:
    """The results' `data`: where the rows came from, their key (under the name the results JSON has
    always given it, "fingerprint"), and, once split, the split sizes."""
    facts = {"source": data.source, "fingerprint": data_key, "rows": len(data.frame)}
    if splits is not None:
        facts.update(train_rows=len(splits.train), val_rows=len(splits.val), test_rows=len(splits.test))
    return facts


def skipped_results(reason: str, champion, data: dict, cached: dict) -> dict:
    """The results of a run that ended early (--skip-if-unchanged)."""
    return {"skipped": True, "reason": reason, "champion_version": str(champion.version), "cached": cached,
            "data": data}  # fmt: skip


def tune_results(
    settings, tracking_uri: str, study: dict, best: dict, evaluation: dict, version: str, decision: dict,
    plots: dict, data: dict, cached: dict, timings: dict,
) -> dict:  # fmt: skip
    """The results of a tuning run: the best trial, its test and behavioural results, the gate's
    decision, every trial, and where the data, the study and the time went."""
    return {
        "skipped": False,
        "run_id": best["run_id"],
        "experiment_name": settings.experiment_name,
        "tracking_uri": redact(tracking_uri),
        "registered_model": settings.registered_model_name,
        "model_version": version,
        "params": best["params"],
        "val_loss": best["val_loss"],
        "test": evaluation["test"],
        "behavioural": evaluation["behavioural"],
        "promotion": decision,
        "trials": [{k: v for k, v in t.items() if k != "checkpoint_dir"} for t in study["trials"]],
        "plots": plots,
        "data": data,
        "cached": cached,
        "ray_experiment_dir": study["experiment_dir"],
        "ray_log_file": study["log_file"],
        "resumed": study["resumed"],
        "timings": timings,
    }


def data_line(data, splits, cached: dict) -> str:
    hits = ", ".join(name for name, hit in cached.items() if hit) or "none"
    return (
        f"data: {len(data.frame)} rows of {data.source} -> {len(splits.train)} train / {len(splits.val)} validation"
        f" / {len(splits.test)} test, tags {', '.join(splits.class_to_index)} (cached: {hits})"
    )


def tuning_line(settings, tracking_uri: str) -> str:
    return (
        f"tuning: {settings.num_runs} trials x up to {settings.num_epochs} epochs, {settings.max_concurrent} at a "
        f"time; MLflow {redact(tracking_uri)}, experiment {settings.experiment_name!r}"
    )


def best_line(best: dict, test: dict) -> str:
    return (
        f"best run {best['run_id']}: val_loss {best['val_loss']:.4f}, test F1 {test['f1']:.3f} | "
        f"{format_params(best['params'])}"
    )


def per_class_table(per_class: dict) -> list[str]:
    width = max(len(tag) for tag in per_class)
    lines = [f"  {'tag':<{width}}  precision  recall     F1  support"]
    for tag, m in per_class.items():
        lines.append(f"  {tag:<{width}}  {m['precision']:9.3f}  {m['recall']:6.3f}  {m['f1']:5.3f}  {m['support']:7d}")
    return lines


def tune_summary(summary: dict, finished_at: float, started_at: Optional[float]) -> str:
    if summary.get("skipped"):
        return f"Skipped: {summary['reason']}. Nothing was tuned (drop --skip-if-unchanged to tune anyway)."
    test, timings, promotion = summary["test"], summary["timings"], summary["promotion"]
    statuses = [t["status"] for t in summary["trials"]]
    counts = ", ".join(f"{statuses.count(s)} {s}" for s in ("completed", "pruned", "error") if s in statuses)
    lines = [
        f"Best of {len(statuses)} trials ({counts}): run {summary['run_id']}",
        f"  val_loss {summary['val_loss']:.4f} | {format_params(summary['params'])}",
        f"Test, {test['num_samples']} rows: precision {test['precision']:.3f}  recall {test['recall']:.3f}  "
        f"F1 {test['f1']:.3f}",
        *per_class_table(test["per_class"]),
        f"Behavioural checks: {summary_line(summary['behavioural'])}",
        f"Promotion: version {promotion['challenger_version']} "
        + ("is now the champion" if promotion["promoted"] else "was not promoted")
        + f" ({promotion['reason']})",
    ]
    stages = {"data": timings["data_s"], "tuning": timings["tuning_s"], "evaluation": timings["evaluation_s"]}
    if started_at:  # start-up: Python, imports, Prefect's temporary server; then what the flow's stages did not cover
        stages = {"start-up": timings["flow_started_at"] - started_at, **stages}
        stages["wrap-up"] = finished_at - started_at - sum(stages.values())
    total = sum(stages.values())
    lines.append(f"Time: {format_seconds(total)} = " + " + ".join(f"{k} {v:.0f} s" for k, v in stages.items()))
    python = shlex.quote(sys.executable)
    uri = summary["tracking_uri"]
    lines += [
        "Next:",
        f"  {shlex.quote(str(Path(sys.executable).with_name('mlflow')))} ui --backend-store-uri {shlex.quote(uri)}",
        f"  {python} -m demo.app --tracking-uri {shlex.quote(uri)}",
        f"  {python} -m flows.predict --run-id {summary['run_id']} --tracking-uri {shlex.quote(uri)} "
        "--title 'Object detection in drone video'",
    ]
    return "\n".join(lines)


def evaluate_summary(result: dict) -> str:
    test = result["test"]
    return "\n".join(
        [
            f"Run {result['run_id']} on {result['dataset_loc']}, {test['num_samples']} rows: "
            f"precision {test['precision']:.3f}  recall {test['recall']:.3f}  F1 {test['f1']:.3f}",
            *per_class_table(test["per_class"]),
            f"Behavioural checks: {summary_line(result['behavioural'])}",
        ]
    )


def predict_summary(result: dict) -> str:
    ranked = sorted(result["probabilities"].items(), key=lambda item: -item[1])
    others = ", ".join(f"{tag} {p:.2f}" for tag, p in ranked[1:])
    return f"{result['prediction']} ({ranked[0][1]:.2f}; {others}) from run {result['run_id']}"
