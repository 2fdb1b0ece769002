"""A restored study whose saved files come from two different snapshots (tagifai/tuning/snapshot.py).

Tune uploads its experiment state and its search state one file at a time, while the next snapshot
may already be rewriting them; the chaos test on s3:// once resumed a study one trial short this way.
Here the mix is made on purpose, on the files of a real (tiny) Tune study with the project's search
set-up (HyperOpt under a concurrency limit): first without the repair, to show the fault is real,
then with it.
"""

from __future__ import annotations

import json

import pytest
import ray.cloudpickle as cloudpickle
from ray import tune
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.hyperopt import HyperOptSearch

from tagifai.tuning import snapshot

pytestmark = pytest.mark.slow  # three real Tune studies and their restores: ~30 s

NUM_SAMPLES = 3


def run_study(storage, name: str, restore: bool = False) -> int:
    """Runs (or restores and finishes) the study; returns how many trials it ended with."""

    def quadratic(config):  # defined here so that Ray ships it by value (workers can't import tests/)
        tune.report({"loss": (config["x"] - 0.3) ** 2})

    if restore:
        tuner = tune.Tuner.restore(str(storage / name), quadratic, resume_unfinished=True, resume_errored=True)
    else:
        search = HyperOptSearch(metric="loss", mode="min", random_state_seed=0, points_to_evaluate=[{"x": 0.5}])
        tuner = tune.Tuner(
            quadratic,
            param_space={"x": tune.uniform(-1, 1)},
            tune_config=tune.TuneConfig(
                search_alg=ConcurrencyLimiter(search, max_concurrent=1),
                num_samples=NUM_SAMPLES,
                metric="loss",
                mode="min",
            ),  # fmt: skip
            run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0),
        )
    return len(tuner.fit())


def only(folder, pattern: str):
    (path,) = folder.glob(pattern)
    return path


def drop_last_trial(folder) -> None:
    """The trial list of a snapshot taken before the last trial was created."""
    path = only(folder, snapshot.EXPERIMENT_STATE)
    state = json.loads(path.read_text())
    state["trial_data"] = state["trial_data"][:-1]
    path.write_text(json.dumps(state))


def count_one_less(folder) -> None:
    """The search state of a snapshot taken before the last trial was created."""
    path = only(folder, snapshot.GENERATOR_STATE)
    state = cloudpickle.loads(path.read_bytes())
    state["counter"] -= 1
    path.write_bytes(cloudpickle.dumps(state))


@pytest.mark.parametrize(
    "mix, restored_unrepaired",
    [(drop_last_trial, NUM_SAMPLES - 1), (count_one_less, NUM_SAMPLES + 1)],
    ids=["list-behind-search", "search-behind-list"],
)
def test_a_restored_study_ends_with_num_samples_trials_however_its_snapshot_was_mixed(
    tmp_path, shared_ray, mix, restored_unrepaired
):
    for name, repair in (("unrepaired", False), ("repaired", True)):
        assert run_study(tmp_path, name) == NUM_SAMPLES
        mix(tmp_path / name)
        if repair:
            note = snapshot.reconcile(str(tmp_path / name))
            assert note and f"has {NUM_SAMPLES - 1 if mix is drop_last_trial else NUM_SAMPLES}" in note
            assert snapshot.reconcile(str(tmp_path / name)) is None  # consistent now: nothing more to do
            assert run_study(tmp_path, name, restore=True) == NUM_SAMPLES
        else:  # the fault, shown on Tune as it is
            assert run_study(tmp_path, name, restore=True) == restored_unrepaired


def test_a_consistent_study_is_left_alone(tmp_path, shared_ray):
    run_study(tmp_path, "whole")
    before = {path.name: path.read_bytes() for path in (tmp_path / "whole").iterdir() if path.is_file()}
    assert snapshot.reconcile(str(tmp_path / "whole")) is None
    assert before == {path.name: path.read_bytes() for path in (tmp_path / "whole").iterdir() if path.is_file()}
    assert snapshot.reconcile(str(tmp_path / "missing")) is None  # nothing saved yet: nothing to do
