"""PNG plots of an evaluation and of a tuning study.

Uses matplotlib's object API (`Figure`), which needs no global backend or pyplot state, so the
flow, the demo and tests can draw from any thread.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from tagifai.search_space import SEARCH_SPACE


def plot_confusion_matrix(matrix: list[list[int]], labels: list[str], path: Path) -> Path:
    counts = np.asarray(matrix)
    figure = Figure(figsize=(6, 5), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(counts, cmap="Blues")
    figure.colorbar(image, ax=axes)
    axes.set(
        xticks=range(len(labels)),
        yticks=range(len(labels)),
        xlabel="predicted",
        ylabel="true",
        title="Confusion matrix (test)",
    )
    axes.set_xticklabels(labels, rotation=30, ha="right")
    axes.set_yticklabels(labels)
    for (row, column), value in np.ndenumerate(counts):
        axes.text(
            column, row, str(value), ha="center", va="center", color="white" if value > counts.max() / 2 else "black"
        )
    figure.savefig(path, dpi=100)
    return path


def plot_per_class_f1(per_class: dict, path: Path) -> Path:
    tags = list(per_class)
    figure = Figure(figsize=(6, 3.5), layout="constrained")
    axes = figure.subplots()
    bars = axes.barh(tags, [per_class[t]["f1"] for t in tags], color="tab:blue")
    axes.bar_label(bars, labels=[f"{per_class[t]['f1']:.2f} (n={per_class[t]['support']})" for t in tags])
    axes.set(xlim=(0, 1.15), xlabel="F1", title="Per-class F1 (test)")
    figure.savefig(path, dpi=100)
    return path


def plot_parallel_coordinates(trials: list[dict], best_trial_id: str, path: Path) -> Path:
    """Each trial a line through its hyperparameters to its val_loss; the best one highlighted.
    One axis per row of the search-space table, log-scaled where the search samples on a log scale."""
    axes_labels = [f"log10 {p.name}" if p.log_scale else p.name for p in SEARCH_SPACE] + ["val_loss"]
    rows = [t for t in trials if t.get("val_loss") is not None]
    values = np.array([[*(t["params"][p.name] for p in SEARCH_SPACE), t["val_loss"]] for t in rows], dtype=float)
    for column, parameter in enumerate(SEARCH_SPACE):
        if parameter.log_scale:
            values[:, column] = np.log10(values[:, column])
    low, high = values.min(axis=0), values.max(axis=0)
    scaled = (values - low) / np.where(high > low, high - low, 1.0)
    figure = Figure(figsize=(8, 4), layout="constrained")
    axes = figure.subplots()
    for trial, line in zip(rows, scaled):
        best = trial["trial_id"] == best_trial_id
        axes.plot(
            range(len(axes_labels)),
            line,
            color="tab:red" if best else "tab:gray",
            linewidth=3 if best else 1,
            alpha=1.0 if best else 0.6,
            marker="o",
            label=f"best ({trial['trial_id']})" if best else None,
            zorder=3 if best else 2,
        )
    axes.set_xticks(range(len(axes_labels)))
    axes.set_xticklabels([f"{name}\n[{lo:.3g}, {hi:.3g}]" for name, lo, hi in zip(axes_labels, low, high)])
    axes.set(yticks=[], title=f"Trials: hyperparameters -> val_loss ({len(rows)} trials)")
    axes.legend(loc="best")
    figure.savefig(path, dpi=100)
    return path


def plot_learning_curves(histories: dict[str, dict], best_trial_id: str, path: Path) -> Path:
    """Train (dashed) and validation (solid) loss per epoch of every trial on one chart."""
    figure = Figure(figsize=(8, 4.5), layout="constrained")
    axes = figure.subplots()
    colors = [f"C{i % 10}" for i in range(len(histories))]
    for color, (trial_id, history) in zip(colors, histories.items()):
        best = trial_id == best_trial_id
        width = 2.5 if best else 1.2
        label = f"{trial_id}{' (best)' if best else ''} - {len(history['epoch'])} epochs"
        axes.plot(history["epoch"], history["val_loss"], color=color, linewidth=width, marker="o", label=label)
        axes.plot(history["epoch"], history["train_loss"], color=color, linewidth=width, linestyle="--")
    max_epoch = max((max(h["epoch"]) for h in histories.values() if h["epoch"]), default=1)
    axes.set(
        xlabel="epoch",
        ylabel="loss",
        title="Learning curves: val (solid), train (dashed)",
        xticks=range(1, max_epoch + 1) if max_epoch <= 30 else None,
    )
    axes.legend(fontsize="small", ncols=max(1, math.ceil(len(histories) / 8)))
    figure.savefig(path, dpi=100)
    return path
