"""The Gradio demo against the tiny tuning run: model choice, predictor, a real server over HTTP, bad input."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from demo.app import EXAMPLES, MAX_FIELD_CHARS, build_app, launch_options, load_model, main, score_frame

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def store(tuned_store) -> dict:
    return {
        "tracking_uri": tuned_store["settings"].tracking_uri,
        "experiment_name": tuned_store["settings"].experiment_name,
        "run_id": tuned_store["summary"]["run_id"],
    }


@pytest.fixture(scope="module")
def served(store):
    """The champion's predictor and provenance, as `python -m demo.app` would load them."""
    return load_model(store["tracking_uri"], experiment_name=store["experiment_name"])


@pytest.fixture(scope="module")
def client(served):
    """The app as a real server on a free loopback port, and a gradio_client talking to it."""
    from gradio_client import Client

    predictor, provenance = served
    demo = build_app(predictor, provenance)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("no_proxy", "localhost,127.0.0.1")
        env.setenv("NO_PROXY", "localhost,127.0.0.1")
        try:
            _, url, _ = demo.launch(
                prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True, **launch_options()
            )
            yield Client(url, verbose=False)
        finally:
            demo.close()


def test_champion_is_served_with_its_provenance(served, store):
    predictor, provenance = served
    assert provenance.run_id == store["run_id"]
    assert "champion" in provenance.chosen_by
    assert provenance.experiment_name == store["experiment_name"]
    assert provenance.test_f1 is not None and provenance.val_loss is not None
    assert set(provenance.hyperparameters) >= {"dropout_p", "lr"}
    assert provenance.trained_at.endswith("UTC")
    assert store["run_id"] in provenance.to_markdown()
    assert sorted(predictor.classes) == predictor.classes and len(predictor.classes) >= 2


def test_best_run_is_served_when_no_model_is_registered(store):
    _, provenance = load_model(store["tracking_uri"], experiment_name=store["experiment_name"], model_name="unregistered")
    assert provenance.run_id == store["run_id"]
    assert "lowest validation loss" in provenance.chosen_by


def test_batch_and_single_predictions_agree(served):
    predictor, _ = served
    titles, descriptions = [t for t, _ in EXAMPLES], [d for _, d in EXAMPLES]
    batch = predictor.predict_proba(titles, descriptions)
    single = np.vstack([predictor.predict_proba([t], [d]) for t, d in zip(titles, descriptions)])
    np.testing.assert_allclose(batch, single, atol=1e-5)
    np.testing.assert_allclose(batch.sum(axis=1), 1.0, atol=1e-5)


def test_score_frame_keeps_rows_and_leaves_textless_rows_blank(served):
    predictor, _ = served
    frame = pd.DataFrame({"id": ["007", "8", "9"], "title": ["Drone birds", "", "Model rollback"], "description": ["", "", "Canary"]})
    scored, blank = score_frame(predictor, frame)
    assert blank == 1
    assert scored["id"].tolist() == ["007", "8", "9"]
    assert scored.loc[1, "prediction"] == "" and scored.loc[0, "prediction"] in predictor.classes
    probabilities = scored[[f"probability_{tag}" for tag in predictor.classes]]
    assert math.isnan(probabilities.iloc[1].sum(min_count=1))
    np.testing.assert_allclose(probabilities.iloc[[0, 2]].sum(axis=1), 1.0, atol=1e-5)


def test_api_predicts_one_project(client, served):
    predictor, _ = served
    title, description = EXAMPLES[0]
    result = client.predict(title, description, api_name="/predict")
    expected = predictor.predict_proba([title], [description])[0]
    confidences = {item["label"]: item["confidence"] for item in result["confidences"]}
    assert set(confidences) == set(predictor.classes)
    assert result["label"] == predictor.classes[int(expected.argmax())]
    for tag, probability in zip(predictor.classes, expected):
        assert confidences[tag] == pytest.approx(float(probability), abs=1e-5)


def test_api_answers_very_long_text(client, served):
    predictor, _ = served
    title, description = "Detecting seabirds " * 2_000, "drone video " * 50_000
    result = client.predict(title, description, api_name="/predict")
    clipped = predictor.predict([title[:MAX_FIELD_CHARS].strip()], [description[:MAX_FIELD_CHARS].strip()])[0]
    assert result["label"] == clipped["prediction"]


def test_api_rejects_empty_input_with_a_message(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="Enter a title or a description"):
        client.predict("  ", "", api_name="/predict")


def test_api_scores_a_csv(client, served, tmp_path):
    from gradio_client import handle_file

    predictor, _ = served
    upload = tmp_path / "projects.csv"
    pd.DataFrame(
        {"id": ["a1", "a2", "a3"], "title": [t for t, _ in EXAMPLES[:3]], "description": [d for _, d in EXAMPLES[:3]]}
    ).to_csv(upload, index=False)
    scored = pd.read_csv(client.predict(handle_file(str(upload)), api_name="/score_csv"), dtype={"id": str})
    assert scored["id"].tolist() == ["a1", "a2", "a3"]
    assert scored.columns.tolist() == ["id", "title", "description", "prediction"] + [
        f"probability_{tag}" for tag in predictor.classes
    ]
    expected = predictor.predict([t for t, _ in EXAMPLES[:3]], [d for _, d in EXAMPLES[:3]])
    assert scored["prediction"].tolist() == [row["prediction"] for row in expected]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"id,title\n1,Counting birds\n", "missing the column\\(s\\) description"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary file, not a CSV"),
        (b"caf\xe9,title,description\n", "not UTF-8"),
        (b"title,description\n", "no data rows"),
    ],
)
def test_api_explains_a_bad_csv(client, tmp_path, content, message):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    upload = tmp_path / "upload.csv"
    upload.write_bytes(content)
    with pytest.raises(AppError, match=message):
        client.predict(handle_file(str(upload)), api_name="/score_csv")


def test_upload_over_the_size_cap_is_refused(client, tmp_path):
    from gradio_client import handle_file

    upload = tmp_path / "huge.csv"
    upload.write_bytes(b"title,description\n" + b"a,b\n" * (6 * 1024 * 1024 // 4))
    with pytest.raises(Exception, match="(?i)size|large|413"):
        client.predict(handle_file(str(upload)), api_name="/score_csv")


def test_unknown_run_id_stops_with_a_clear_error(store):
    with pytest.raises(SystemExit) as stopped:
        main(["--tracking-uri", store["tracking_uri"], "--run-id", "0" * 32])
    assert "does not exist" in str(stopped.value.code)


def test_experiment_without_runs_names_the_train_command(store):
    with pytest.raises(SystemExit) as stopped:
        main(["--tracking-uri", store["tracking_uri"], "--experiment-name", "never-tuned", "--model-name", "none"])
    assert "python -m flows.tune" in str(stopped.value.code)


def test_missing_store_exits_non_zero_with_the_train_command(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    finished = subprocess.run(
        [sys.executable, "-m", "demo.app", "--tracking-uri", uri],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert finished.returncode != 0
    assert "python -m flows.tune" in finished.stderr
    assert "Traceback" not in finished.stderr
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()
