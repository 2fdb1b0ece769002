"""Tune's saved study made consistent before it is restored.

Tune saves a study as three files: the experiment state (which trials exist), the search generator's
state (how many trials it has created) and the searcher's (HyperOpt's suggestions). It rewrites them
in a local folder and uploads that folder in the background; a snapshot taken while the previous
upload is still running (common on s3://, with a snapshot every 2 s) can leave the store with the
generator's count from one snapshot and the trial list from another. Restored as is, a study whose
generator counted a trial that the list lacks ends one trial short, and the opposite case runs one
trial too many. So before a restore the generator is told what the trial list says: its count is the
number of trials, and the concurrency limiter's live trials are the unfinished ones in the list.

This reads Tune 2.x internals (file names and state keys); a Tune that changes them makes
`reconcile` raise rather than guess.
"""

from __future__ import annotations

import fnmatch
import json

import pyarrow.fs as pafs
import ray.cloudpickle as cloudpickle

from tagifai.tuning import storage as storage_lib

EXPERIMENT_STATE = "experiment_state-*.json"
GENERATOR_STATE = "search_gen_state-*.json"  # cloudpickle, despite the name
LIMITER_KEY = "name:ConcurrencyLimiter"
DONE = "TERMINATED"  # errored trials are resumed (resume_errored), so they are live again


def _newest(filesystem: pafs.FileSystem, folder: str, pattern: str) -> str | None:
    """The newest file matching `pattern`, by name, as Tune picks it (names end in a timestamp)."""
    names = [info.base_name for info in filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))]
    matching = fnmatch.filter(names, pattern)
    return f"{folder}/{max(matching)}" if matching else None


def saved_trials(filesystem: pafs.FileSystem, folder: str) -> dict[str, str]:
    """{trial id: status} from the newest experiment state."""
    path = _newest(filesystem, folder, EXPERIMENT_STATE)
    if path is None:
        return {}
    with filesystem.open_input_stream(path) as stream:
        state = json.loads(stream.read())
    trials = {}
    for trial_json, _runtime in state["trial_data"]:
        trial = json.loads(trial_json)
        trials[trial["trial_id"]] = trial["status"]
    return trials


def reconcile(experiment_uri: str) -> str | None:
    """Make the saved search state agree with the saved trial list; says what changed, or None."""
    filesystem, folder = storage_lib.open_storage(experiment_uri)
    generator_path = _newest(filesystem, folder, GENERATOR_STATE)
    trials = saved_trials(filesystem, folder)
    if generator_path is None or not trials:
        return None
    with filesystem.open_input_stream(generator_path) as stream:
        generator = cloudpickle.loads(stream.read())
    created, limiter = generator["counter"], generator.get(LIMITER_KEY)
    unfinished = {trial_id for trial_id, status in trials.items() if status != DONE}
    if created == len(trials) and (limiter is None or limiter["live_trials"] == unfinished):
        return None

    generator["counter"] = len(trials)
    generator["finished"] = False  # is_finished() still holds once the count reaches num_samples
    if limiter is not None:
        limiter["live_trials"] = set(unfinished)
        limiter["num_unfinished_live_trials"] = len(unfinished)
    with filesystem.open_output_stream(generator_path) as stream:
        stream.write(cloudpickle.dumps(generator))
    return (
        f"the saved search state counted {created} trial(s), the saved trial list has {len(trials)}: "
        f"the search continues from {len(trials)}"
    )
