"""MLflow tracking straight into PostgreSQL (a `postgresql://` URI, no mlflow server), with the
artifacts in an S3 bucket: the flow, flows.evaluate, flows.predict and the demo all work against it,
the password in the URI shows up nowhere, and flows opening a brand-new database at once all start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import tiny_settings
from processes import REPO


@pytest.mark.slow  # a PostgreSQL server, flows in separate processes
def test_flows_opening_a_new_database_at_once_all_start(postgres_server, tmp_path):
    """Four processes create MLflow's tables in one empty database at the same moment; without the
    advisory lock, concurrent schema migrations fail on duplicate tables or types."""
    uri = postgres_server.create_database(f"fresh_{uuid.uuid4().hex[:8]}")
    script = (
        "import sys\nfrom tagifai.lifecycle.tracking import resolve_tracking_uri\nresolve_tracking_uri(sys.argv[1])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    starters = [
        subprocess.Popen([sys.executable, "-c", script, uri], env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    errors = [starter.communicate(timeout=300)[1] for starter in starters]
    assert [starter.returncode for starter in starters] == [0] * 4, "\n".join(errors)[-4000:]
    assert MlflowClient(uri).search_experiments()[0].name == "Default"


@pytest.mark.integration
@pytest.mark.slow
def test_flow_evaluate_predict_and_demo_track_straight_into_postgresql(
    postgres_server, s3_bucket, tiny_backbone, tmp_path, capsys, caplog, own_ray
):
    from demo.serving import load_served
    from flows import evaluate, predict
    from flows.tune import tune_classifier
    from tagifai.data import sample_dataset_path

    uri = postgres_server.create_database("mlflow_direct")
    assert postgres_server.password in uri
    settings = tiny_settings(
        tmp_path, tiny_backbone, experiment_name="direct", registered_model_name="direct", tracking_uri=uri,
        artifact_location=f"s3://{s3_bucket}/mlflow", force_promote=True,  # the gate is tested in test_lifecycle
    )  # fmt: skip
    summary = tune_classifier(settings)
    assert summary["tracking_uri"] == postgres_server.uri("mlflow_direct").replace(postgres_server.password, "***")

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("direct").experiment_id])
    assert {run.info.run_id for run in runs} == {t["run_id"] for t in summary["trials"]}
    assert all(run.info.artifact_uri.startswith(f"s3://{s3_bucket}/mlflow/") for run in runs)
    assert postgres_server.query("mlflow_direct", "SELECT count(*) FROM runs") == [(2,)]

    result = predict.main(["--tracking-uri", uri, "--experiment-name", "direct", "--title", "text transformers"])
    assert result["run_id"] == summary["run_id"]
    metrics = evaluate.main(
        ["--tracking-uri", uri, "--run-id", summary["run_id"], "--dataset-loc", str(sample_dataset_path())]
    )
    assert metrics["run_id"] == summary["run_id"]
    provenance = load_served(uri, None, "direct", "direct").provenance
    assert provenance.run_id == summary["run_id"] and "champion" in provenance.chosen_by

    # The password is in none of: the results file, the output, the logs, any run's params or tags.
    shown = (tmp_path / "results.json").read_text() + json.dumps(summary) + caplog.text + "".join(capsys.readouterr())
    for run in runs:
        shown += json.dumps(run.data.params) + json.dumps(run.data.tags)
    assert postgres_server.password not in shown
    # Nor in Ray Tune's experiment state (it pickles the MLflow callback) or the trial records.
    for path in Path(settings.storage_path).rglob("*"):
        assert not path.is_file() or postgres_server.password.encode() not in path.read_bytes(), path
