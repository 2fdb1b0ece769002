"""The demo's Experiment tab: the trials of the served run's tuning session, read from MLflow once at start.

Each Ray Tune trial is one MLflow run per attempt (a failed attempt, then its retry). The table
shows one row per trial, the latest attempt's status, with the epochs of all attempts merged: a
retry resumes from the last checkpoint, so its own run holds only the epochs after it. The plots
are drawn fresh from these runs, so runs tuned before the flow logged plots get them too.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import gradio as gr
import pandas as pd

from tagifai import plots
from tagifai.lifecycle import tracking
from tagifai.search_space import NAMES as PARAMETERS

MAX_RUNS = 500  # the whole-experiment fallback must stay quick to read at start
COLUMNS = ["note", "trial_id", "run_id", "status", "attempts", "epochs", "best_val_loss", "val_f1_at_best", *PARAMETERS]
NUMBER_COLUMNS = {"attempts", "epochs", "best_val_loss", "val_f1_at_best", *PARAMETERS}


@dataclass
class Experiment:
    """What the Experiment tab shows; `note` says what was read (or why nothing was)."""

    note: str
    trials: pd.DataFrame
    parallel_coordinates: Optional[Path] = None
    learning_curves: Optional[Path] = None


def as_float(value) -> Optional[float]:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def merged_history(client, runs) -> dict:
    """Per-epoch metrics of a trial's attempts (oldest first), a later attempt winning an epoch."""
    keys = ("train_loss", "val_loss", "val_f1")
    by_epoch: dict[int, dict] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time or 0):
        history = tracking.metric_histories(client, run.info.run_id, keys)
        for i, epoch in enumerate(history["epoch"]):
            values = {key: history[key][i] for key in keys if history[key][i] is not None}
            by_epoch.setdefault(epoch, {}).update(values)
    epochs = sorted(by_epoch)
    return {"epoch": epochs, **{key: [by_epoch[e].get(key) for e in epochs] for key in keys}}


def summarize_trial(trial_id: str, runs: list, history: dict, served_run_id: str) -> dict:
    """One table row: the latest attempt's status and params, the best epoch over all attempts."""
    latest = max(runs, key=lambda r: r.info.start_time or 0)
    scored = [(loss, f1) for loss, f1 in zip(history["val_loss"], history["val_f1"]) if loss is not None]
    best_loss, best_f1 = min(scored, key=lambda pair: pair[0]) if scored else (None, None)
    if best_loss is None:
        best_loss = as_float(latest.data.metrics.get("best_val_loss"))
    ids = {run.info.run_id for run in runs}
    marks = [
        name
        for name, hit in (
            ("served", served_run_id in ids),
            ("best", any(r.data.tags.get(tracking.TAG_BEST) == "true" for r in runs)),
        )
        if hit
    ]
    return {
        "note": ", ".join(marks),
        "trial_id": trial_id,
        "run_id": (served_run_id if served_run_id in ids else latest.info.run_id)[:8],
        "status": latest.info.status,
        "attempts": len(runs),
        "epochs": max(history["epoch"], default=0),
        "best_val_loss": best_loss,
        "val_f1_at_best": best_f1,
        **{name: as_float(latest.data.params.get(name)) for name in PARAMETERS},
    }


def session_runs(client, served_run) -> tuple[list, str]:
    """The runs of the served run's tuning session, else (untagged run) of its whole experiment."""
    experiment_id = served_run.info.experiment_id
    session = served_run.data.tags.get(tracking.TAG_SESSION)
    if session:
        runs = tracking.find_runs(client, experiment_id, session, max_results=MAX_RUNS)
        return runs, f"tuning session `{session}`"
    runs = client.search_runs([experiment_id], max_results=MAX_RUNS)
    return runs, "the whole experiment (the served run has no tuning-session tag)"


def read_experiment(client, served_run_id: str, folder: Path) -> Experiment:
    """The trials table and the two tuning plots (PNGs written into `folder`)."""
    served = client.get_run(served_run_id)
    runs, scope = session_runs(client, served)
    # Trials a resumed study never knew (started just before a kill, replaced by new ones) are left out.
    orphaned = [run for run in runs if run.data.tags.get(tracking.TAG_ORPHANED) == "true"]
    runs = [run for run in runs if run not in orphaned]
    if served_run_id not in {run.info.run_id for run in runs}:
        runs.append(served)
    attempts: dict[str, list] = {}
    for run in runs:
        trial_id = run.data.tags.get(tracking.TAG_TRIAL) or run.info.run_name or run.info.run_id
        attempts.setdefault(trial_id, []).append(run)
    histories = {trial_id: merged_history(client, trial_runs) for trial_id, trial_runs in attempts.items()}
    rows = [summarize_trial(t, attempts[t], histories[t], served_run_id) for t in attempts]
    table = pd.DataFrame(rows, columns=COLUMNS).sort_values("best_val_loss", na_position="last", ignore_index=True)

    ranked = [row for row in rows if row["best_val_loss"] is not None]
    tagged = [row for row in ranked if "best" in row["note"]]  # several when a whole experiment is shown
    best = min(tagged or ranked, key=lambda row: row["best_val_loss"], default=None)
    best_trial_id = best["trial_id"] if best else ""
    folder.mkdir(parents=True, exist_ok=True)
    trials = [
        {"trial_id": row["trial_id"], "val_loss": row["best_val_loss"], "params": {p: row[p] for p in PARAMETERS}}
        for row in ranked
        if all(row[p] is not None for p in PARAMETERS)
    ]
    curves = {t: h for t, h in histories.items() if h["epoch"] and any(v is not None for v in h["val_loss"])}
    parallel = (
        plots.plot_parallel_coordinates(trials, best_trial_id, folder / "parallel_coordinates.png") if trials else None
    )
    learning = plots.plot_learning_curves(curves, best_trial_id, folder / "learning_curves.png") if curves else None
    note = (
        f"{len(rows)} trial(s) ({len(runs)} MLflow run(s)) of {scope}, best validation loss first. "
        "One row per trial: the latest attempt's status; `attempts` counts its runs. "
        "`note` marks the run served on this page and the tuning's best run."
        + (f" {len(orphaned)} run(s) of trials replaced after a kill are not shown." if orphaned else "")
    )
    return Experiment(note=note, trials=table, parallel_coordinates=parallel, learning_curves=learning)


def load_experiment(tracking_uri: str, served_run_id: str, folder: Optional[Path] = None) -> Experiment:
    """Read once at start; an MLflow failure here leaves predictions working and says why in the tab."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    folder = folder or Path(tempfile.mkdtemp(prefix="tagifai-experiment-"))
    try:
        return read_experiment(MlflowClient(tracking_uri), served_run_id, folder)
    except MlflowException as error:
        return Experiment(
            note=f"Could not read the tuning trials from MLflow: {error}", trials=pd.DataFrame(columns=COLUMNS)
        )


def trials_table(experiment: Optional[Experiment]) -> pd.DataFrame:
    """The table as shown: numbers to 4 significant digits."""
    if experiment is None:
        return pd.DataFrame(columns=COLUMNS)
    table = experiment.trials.copy()
    for column in NUMBER_COLUMNS - {"attempts", "epochs"}:
        table[column] = table[column].map(lambda v: None if v is None or pd.isna(v) else float(f"{v:.4g}"))
    return table


def experiment_tab(current: Callable[[], Optional[Experiment]], every=None) -> None:
    """The tab's components, inside the caller's `gr.Tab`. Each reads `current()` when the page
    loads and, with `every` (a gr.Timer), again on each tick, so the tab follows a new champion."""

    def note() -> str:
        experiment = current()
        return experiment.note if experiment else "No tuning data was loaded for this model."

    def plot(name: str):
        experiment = current()
        path = getattr(experiment, name, None) if experiment else None
        return str(path) if path else None

    gr.Markdown(note, every=every, elem_id="experiment-note")
    gr.Dataframe(
        lambda: trials_table(current()),
        every=every,
        label="Trials (sort or filter from a column header's ⋮ menu)",
        datatype=["number" if column in NUMBER_COLUMNS else "str" for column in COLUMNS],
        interactive=False,
        elem_id="trials-table",
    )
    with gr.Row():
        for name, label, elem_id in (
            ("parallel_coordinates", "Parallel coordinates: hyperparameters -> val_loss", "parallel-coordinates"),
            ("learning_curves", "Learning curves (no trial has the data to draw them when empty)", "learning-curves"),
        ):
            gr.Image(
                lambda name=name: plot(name),
                every=every,
                type="filepath",
                label=label,
                interactive=False,
                buttons=["download", "fullscreen"],
                elem_id=elem_id,
            )
