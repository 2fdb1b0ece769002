"""The one builder of the `python -m flows.tune` command line in the tests, and what tests that run
it as a separate process share: starting it, and reading its trials' MLflow runs back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from processes import REPO


def settings_options(settings) -> list[str]:
    """The command-line options for the explicitly set fields of a TuneSettings."""
    options = []
    for name, value in settings.model_dump(mode="json", exclude_unset=True).items():
        option = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            options += [option] if value else []
        elif value is None:  # the settings hold `--trainable-layers all` as None
            options += [option, "all"] if name == "trainable_layers" else []
        else:
            options += [option, json.dumps(value) if isinstance(value, list) else str(value)]
    return options


def tune_command(*options, settings=None) -> list[str]:
    """`python -m flows.tune` with `settings`' explicitly set fields, then `options`, as options."""
    from_settings = settings_options(settings) if settings is not None else []
    return [sys.executable, "-m", "flows.tune", *from_settings, *(str(option) for option in options)]


def local_store_options(workdir: Path) -> list[str]:
    """A SQLite MLflow store and a Ray results folder inside `workdir`."""
    (workdir / "mlruns").mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"
    return ["--tracking-uri", tracking_uri, "--storage-path", str(workdir / "ray_results")]


def flow_environment(**overrides: str) -> dict:
    """This session's environment, with the project importable and the flow's log at INFO."""
    return {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_LOGGING_LEVEL": "INFO", **overrides}


def start_flow(command: list[str], log: Path) -> subprocess.Popen:
    """The command in a session of its own (killable with its whole process group), output to `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(
            command, cwd=REPO, env=flow_environment(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def run_flow(command: list[str], timeout_s: float = 600) -> tuple[int, str]:
    """Run the command to its end: its exit code and its output (stdout then stderr)."""
    done = subprocess.run(command, cwd=REPO, env=flow_environment(), capture_output=True, text=True, timeout=timeout_s)
    return done.returncode, done.stdout + done.stderr


def runs_by_trial(client, experiment: str) -> dict[str, list]:
    """The experiment's MLflow runs grouped by trial, each trial's attempts oldest first."""
    from tagifai.lifecycle import tracking

    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    grouped: dict[str, list] = {}
    for run in client.search_runs([experiment_id], order_by=["attributes.start_time ASC"]):
        grouped.setdefault(run.data.tags[tracking.TAG_TRIAL], []).append(run)
    return grouped
