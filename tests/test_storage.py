"""Small pure helpers of the storage edge: secrets hidden in URIs, local paths versus URIs."""

from __future__ import annotations

import pytest

from tagifai.lifecycle.database import redact
from tagifai.tuning.storage import is_remote, join, resolve


@pytest.mark.parametrize(
    "uri, shown",
    [
        ("postgresql://mlflow:s3cr%40t@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
        (
            "postgresql+psycopg://mlflow:pw@db/mlflow?sslmode=require",
            "postgresql+psycopg://mlflow:***@db/mlflow?sslmode=require",
        ),
        ("postgresql://mlflow@db/mlflow", "postgresql://mlflow@db/mlflow"),
        ("http://user:pw@mlflow-host:5000", "http://user:***@mlflow-host:5000"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("sqlite:////tmp/mlruns/mlflow.db", "sqlite:////tmp/mlruns/mlflow.db"),
        ("s3://bucket/prefix", "s3://bucket/prefix"),
    ],
)
def test_redact_hides_only_the_password(uri, shown):
    assert redact(uri) == shown


def test_local_paths_and_uris(tmp_path):
    assert not is_remote(str(tmp_path)) and not is_remote(f"file://{tmp_path}")
    assert is_remote("s3://bucket/prefix")
    assert resolve("s3://bucket/prefix/") == "s3://bucket/prefix"
    assert resolve(f"file://{tmp_path}/x") == str(tmp_path / "x")
    assert join("s3://bucket/prefix/", "/study-1", "trial_records") == "s3://bucket/prefix/study-1/trial_records"


def test_the_trial_tracker_pickles_no_password_and_gets_it_back_in_the_driver():
    """Ray Tune pickles its callbacks into the experiment state, in the bucket."""
    import pickle

    from tagifai.tuning.study import TrialTracker

    uri = "postgresql://mlflow:hunter2@db/mlflow"
    tracker = TrialTracker(uri, "1", "study-1", "s3://bucket/ray/study-1")
    pickled = pickle.dumps(tracker)
    assert b"hunter2" not in pickled and b"mlflow:***@db" in pickled
    assert pickle.loads(pickled).tracking_uri == uri  # this process (the driver) knows the real one
