"""The Ray Tune callback behind the study's progress display.

`StudyProgress` is pickled with the experiment and restored when a study resumes: it therefore
holds only the study's shape, and reaches the screen through the display made active by
`tagifai.tuning.display.showing(...)` in this process.
"""

from __future__ import annotations

from ray import tune

from tagifai.tuning import display
from tagifai.tuning.display import StudyState, TrialState


class StudyProgress(tune.Callback):
    """Feeds the active display from Tune's trial events (see the module docstring)."""

    def __init__(self, num_trials: int, num_epochs: int):
        self.num_trials, self.num_epochs = num_trials, num_epochs
        self.study = StudyState(num_trials, num_epochs)

    def __getstate__(self):
        return {"num_trials": self.num_trials, "num_epochs": self.num_epochs}

    def __setstate__(self, state):
        self.__init__(**state)

    def _trial(self, trial) -> TrialState:
        if trial.trial_id not in self.study.trials:
            params = {k: float(v) for k, v in trial.config.items() if isinstance(v, (int, float))}
            self.study.trials[trial.trial_id] = TrialState(trial.trial_id, params)
        return self.study.trials[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._trial(trial).status = "running"
        running = sum(t.status == "running" for t in self.study.trials.values())
        self.study.lanes = max(self.study.lanes, running)

    on_trial_restore = on_trial_start

    def on_trial_result(self, iteration, trials, trial, result, **info):
        state = self._trial(trial)
        state.status = "running"
        state.epoch = int(result.get("epoch", state.epoch + 1))
        state.last_loss = result.get("val_loss")
        if state.last_loss is not None and (state.best_loss is None or state.last_loss < state.best_loss):
            state.best_loss = state.last_loss
        if "epoch_time_s" in result and not result.get("replayed"):
            state.epoch_seconds.append(float(result["epoch_time_s"]))
        active = display.active()
        if active is not None:
            active.epoch(self.study, state)

    def _ended(self, trial, status: str) -> None:
        state = self._trial(trial)
        state.status = status
        active = display.active()
        if active is not None:
            active.ended(self.study, state)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._ended(trial, "done" if self._trial(trial).epoch >= self.num_epochs else "pruned")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial, "error")
