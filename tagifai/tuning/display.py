"""Progress of a tuning study, as a person wants to follow it: one live table on a terminal, or
plain lines (one per finished epoch, one per finished trial) in a pipe, a file or a Prefect log.

Free of Ray: the summaries of flows.predict and flows.evaluate format with it too. The Tune
callback that feeds it is `tagifai.tuning.progress.StudyProgress`.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Optional

from tagifai.search_space import NAMES


@dataclass
class TrialState:
    trial_id: str
    params: dict
    status: str = "pending"
    epoch: int = 0
    last_loss: Optional[float] = None
    best_loss: Optional[float] = None
    epoch_seconds: list[float] = field(default_factory=list)


@dataclass
class StudyState:
    """What the display shows; updated from Tune's callbacks on the driver."""

    num_trials: int
    num_epochs: int
    started: float = field(default_factory=time.monotonic)
    trials: dict[str, TrialState] = field(default_factory=dict)
    lanes: int = 1  # the most trials seen running at once

    @property
    def finished(self) -> int:
        return sum(t.status in ("pruned", "done", "error") for t in self.trials.values())

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def eta_s(self) -> Optional[float]:
        """Seconds left if every unfinished trial ran all its epochs (pruning makes it shorter):
        the epochs left times the mean epoch so far, shared among the trials that run side by side."""
        seconds = [s for t in self.trials.values() for s in t.epoch_seconds]
        if not seconds:
            return None
        unstarted = self.num_trials - len(self.trials)
        left = unstarted * self.num_epochs + sum(
            self.num_epochs - t.epoch for t in self.trials.values() if t.status in ("pending", "running")
        )
        return left * (sum(seconds) / len(seconds)) / self.lanes

    def headline(self) -> str:
        eta = self.eta_s()
        eta_text = "estimating" if eta is None else f"at most ~{format_seconds(eta)} left"
        return f"{self.finished}/{self.num_trials} trials done, {format_seconds(self.elapsed_s())} elapsed, {eta_text}"


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def format_params(params: dict) -> str:
    return " ".join(f"{name}={params[name]:.3g}" for name in NAMES if name in params)


def format_loss(value: Optional[float]) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


class PlainLines:
    """One line per finished epoch and per finished trial, through `emit` (a logger's info)."""

    def __init__(self, emit: Callable[[str], None]):
        self.emit = emit

    def start(self) -> None:
        pass

    def epoch(self, study: StudyState, trial: TrialState) -> None:
        self.emit(
            f"trial {trial.trial_id} epoch {trial.epoch}/{study.num_epochs}: val_loss {format_loss(trial.last_loss)} "
            f"(best {format_loss(trial.best_loss)}) | {format_params(trial.params)} | {study.headline()}"
        )

    def ended(self, study: StudyState, trial: TrialState) -> None:
        self.emit(
            f"trial {trial.trial_id} {trial.status} after {trial.epoch} epoch(s), best val_loss "
            f"{format_loss(trial.best_loss)} | {study.headline()}"
        )

    def close(self) -> None:
        pass


class LiveTable:
    """A table redrawn in place on a terminal (rich), plus plain lines to `also` (the Prefect API)."""

    def __init__(self, console, also: Optional[PlainLines] = None):
        from rich.live import Live

        self.study: Optional[StudyState] = None
        self.also = also
        self.live = Live(self, console=console, refresh_per_second=2, transient=False)

    def start(self) -> None:
        self.live.start()

    def __rich__(self):
        from rich.table import Table

        study = self.study
        table = Table(title=study.headline() if study else "starting trials...", title_justify="left")
        for column in ("trial", "status", "epoch", "val_loss", "best", "hyperparameters"):
            table.add_column(column, no_wrap=column != "hyperparameters")
        for trial in study.trials.values() if study else []:
            epoch = f"{trial.epoch}/{study.num_epochs}"
            losses = format_loss(trial.last_loss), format_loss(trial.best_loss)
            table.add_row(trial.trial_id, trial.status, epoch, *losses, format_params(trial.params))
        return table

    def epoch(self, study: StudyState, trial: TrialState) -> None:
        self.study = study
        if self.also:
            self.also.epoch(study, trial)

    def ended(self, study: StudyState, trial: TrialState) -> None:
        self.study = study
        if self.also:
            self.also.ended(study, trial)

    def close(self) -> None:
        self.live.stop()


_active: dict = {"display": None}
_lock = threading.Lock()


@contextlib.contextmanager
def showing(display) -> Iterator[None]:
    """Make `display` the one that StudyProgress callbacks of this process draw on, for the duration."""
    if display is not None:
        display.start()
    with _lock:
        _active["display"] = display
    try:
        yield
    finally:
        with _lock:
            _active["display"] = None
        if display is not None:
            display.close()


def active():
    """The display that `showing(...)` made active in this process, or None."""
    return _active["display"]
