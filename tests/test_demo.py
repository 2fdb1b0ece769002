"""The Gradio demo against the tiny tuning run: model choice, predictor, trials, a real server over HTTP, bad input."""

from __future__ import annotations

import math
from urllib.parse import urljoin

import numpy as np
import pandas as pd
import pytest

from demo.app import EXAMPLES, MAX_FIELD_CHARS, main, score_frame
from demo.experiment import PARAMETERS, read_experiment
from demo.serving import load_served


@pytest.fixture(scope="module")
def store(tuned_store) -> dict:
    return {
        "tracking_uri": tuned_store["settings"].tracking_uri,
        "experiment_name": tuned_store["settings"].experiment_name,
        "run_id": tuned_store["summary"]["run_id"],
    }


@pytest.fixture(scope="module")
def client(demo_url):
    """A gradio_client talking to the server."""
    from gradio_client import Client

    return Client(demo_url, verbose=False)


def test_champion_is_served_with_its_provenance(served, store):
    predictor, provenance = served.predictor, served.provenance
    assert provenance.run_id == store["run_id"]
    assert "champion" in provenance.chosen_by
    assert provenance.experiment_name == store["experiment_name"]
    assert provenance.test_f1 is not None and provenance.val_loss is not None
    assert set(provenance.hyperparameters) >= {"dropout_p", "lr"}
    assert provenance.trained_at.endswith("UTC")
    assert store["run_id"] in provenance.to_markdown()
    assert sorted(predictor.classes) == predictor.classes and len(predictor.classes) >= 2


def test_best_run_is_served_when_no_model_is_registered(store):
    provenance = load_served(store["tracking_uri"], None, store["experiment_name"], "unregistered").provenance
    assert provenance.run_id == store["run_id"]
    assert "lowest validation loss" in provenance.chosen_by


def test_experiment_lists_the_session_trials_and_draws_the_plots(experiment, tuned_store, store):
    trials = tuned_store["summary"]["trials"]
    table = experiment.trials
    assert sorted(table["trial_id"]) == sorted(t["trial_id"] for t in trials) and len(table) == 2
    assert table["best_val_loss"].is_monotonic_increasing
    best = table.iloc[0]
    assert best["note"] == "served, best" and store["run_id"].startswith(best["run_id"])
    assert best["best_val_loss"] == pytest.approx(tuned_store["summary"]["val_loss"], rel=1e-6)
    assert (table["note"] == "").sum() == 1
    assert set(table["status"]) == {"FINISHED"} and (table["epochs"] >= 1).all()
    assert table[list(PARAMETERS)].notna().all().all() and table["val_f1_at_best"].notna().all()
    for image in (experiment.parallel_coordinates, experiment.learning_curves):
        assert image.read_bytes().startswith(b"\x89PNG") and image.stat().st_size > 5_000
    assert "tuning session" in experiment.note


def test_a_retried_trial_is_one_row_and_untagged_runs_fall_back_to_the_experiment(tmp_path):
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from tagifai.lifecycle import tracking

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("old", artifact_location=(tmp_path / "artifacts").as_uri())
    params = [Param(name, "0.5") for name in PARAMETERS]

    def run(trial: str, status: str, losses: dict) -> str:
        run_id = client.create_run(experiment_id, tags={tracking.TAG_TRIAL: trial}).info.run_id
        metrics = [
            Metric(key, value, 0, epoch)
            for epoch, loss in losses.items()
            for key, value in (("val_loss", loss), ("train_loss", loss + 0.1), ("val_f1", 1 - loss))
        ]
        client.log_batch(run_id, metrics=metrics, params=params)
        client.set_terminated(run_id, status=status)
        return run_id

    run("t1", "FAILED", {1: 0.9, 2: 0.8})
    retried = run("t1", "FINISHED", {3: 0.4})  # resumed from the epoch-2 checkpoint
    served = run("t2", "FINISHED", {1: 0.7})
    experiment = read_experiment(client, served, tmp_path / "plots")
    rows = experiment.trials.set_index("trial_id")
    assert list(rows.index) == ["t1", "t2"] and "whole experiment" in experiment.note
    assert rows.loc["t1", ["status", "attempts", "epochs", "run_id"]].tolist() == ["FINISHED", 2, 3, retried[:8]]
    assert rows.loc["t1", "best_val_loss"] == pytest.approx(0.4) and rows.loc["t1", "val_f1_at_best"] == pytest.approx(
        0.6
    )
    assert rows.loc["t2", "note"] == "served" and rows.loc["t1", "note"] == ""
    assert experiment.parallel_coordinates.stat().st_size > 5_000 and experiment.learning_curves.stat().st_size > 5_000


def test_batch_and_single_predictions_agree(served):
    predictor = served.predictor
    titles, descriptions = [t for t, _ in EXAMPLES], [d for _, d in EXAMPLES]
    batch = predictor.predict_proba(titles, descriptions)
    single = np.vstack([predictor.predict_proba([t], [d]) for t, d in zip(titles, descriptions)])
    np.testing.assert_allclose(batch, single, atol=1e-5)
    np.testing.assert_allclose(batch.sum(axis=1), 1.0, atol=1e-5)


def test_score_frame_keeps_rows_and_leaves_textless_rows_blank(served):
    predictor = served.predictor
    frame = pd.DataFrame(
        {"id": ["007", "8", "9"], "title": ["Drone birds", "", "Model rollback"], "description": ["", "", "Canary"]}
    )
    scored, blank = score_frame(predictor, frame)
    assert blank == 1
    assert scored["id"].tolist() == ["007", "8", "9"]
    assert scored.loc[1, "prediction"] == "" and scored.loc[0, "prediction"] in predictor.classes
    probabilities = scored[[f"probability_{tag}" for tag in predictor.classes]]
    assert math.isnan(probabilities.iloc[1].sum(min_count=1))
    np.testing.assert_allclose(probabilities.iloc[[0, 2]].sum(axis=1), 1.0, atol=1e-5)


def test_page_config_carries_the_trials_and_serves_the_plots(demo_url, experiment):
    import httpx

    config = httpx.get(f"{demo_url.rstrip('/')}/config", timeout=30).json()
    by_id = {c["props"].get("elem_id"): c["props"] for c in config["components"] if c["props"].get("elem_id")}
    rows = by_id["trials-table"]["value"]["data"]
    assert sorted(row[1] for row in rows) == sorted(experiment.trials["trial_id"])
    for elem_id in ("parallel-coordinates", "learning-curves"):
        image = httpx.get(urljoin(demo_url, by_id[elem_id]["value"]["url"]), timeout=30)
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")


def test_api_predicts_one_project(client, served):
    predictor = served.predictor
    title, description = EXAMPLES[0]
    result = client.predict(title, description, api_name="/predict")
    expected = predictor.predict_proba([title], [description])[0]
    confidences = {item["label"]: item["confidence"] for item in result["confidences"]}
    assert set(confidences) == set(predictor.classes)
    assert result["label"] == predictor.classes[int(expected.argmax())]
    for tag, probability in zip(predictor.classes, expected):
        assert confidences[tag] == pytest.approx(float(probability), abs=1e-5)


def test_api_answers_very_long_text(client, served):
    predictor = served.predictor
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

    predictor = served.predictor
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


def test_missing_store_exits_non_zero_with_the_train_command(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    # The command's own entry point, in-process (a subprocess spent ~8 s importing): it must end
    # through its user-error path, a SystemExit carrying the message, not an exception.
    with pytest.raises(SystemExit) as exit_info:
        main(["--tracking-uri", uri])
    assert exit_info.value.code not in (0, None)
    message = str(exit_info.value.code) + capsys.readouterr().err
    assert "python -m flows.tune" in message
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()


def test_other_users_get_answers_while_a_20000_row_file_is_scored(client, served, tmp_path):
    from gradio_client import handle_file

    upload = tmp_path / "big.csv"
    titles = [title for title, _ in EXAMPLES] * 5_000
    pd.DataFrame({"title": titles, "description": [d for _, d in EXAMPLES] * 5_000}).to_csv(upload, index=False)
    job = client.submit(handle_file(str(upload)), api_name="/score_csv")
    answered_meanwhile = 0
    while not job.done():
        result = client.predict("Object detection in drone video", "", api_name="/predict")
        answered_meanwhile += not job.done() and result["label"] in served.predictor.classes
    scored = pd.read_csv(job.result())
    assert len(scored) == 20_000 and scored["prediction"].isin(served.predictor.classes).all()
    assert answered_meanwhile >= 1, "no prediction was answered while the file was being scored"


def test_a_file_over_the_time_limit_is_refused_up_front(served, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from conftest import launched
    from demo.app import build_app
    from demo.serving import ModelHolder

    upload = tmp_path / "projects.csv"
    pd.DataFrame({"title": [t for t, _ in EXAMPLES] * 50, "description": [d for _, d in EXAMPLES] * 50}).to_csv(
        upload, index=False
    )
    with launched(build_app(ModelHolder(served), max_scoring_s=0.001)) as url:
        with pytest.raises(AppError, match=r"200 rows, about .* s of scoring here; the limit is 0.001 s"):
            Client(url, verbose=False).predict(handle_file(str(upload)), api_name="/score_csv")


def test_concurrent_requests_share_forward_passes_and_get_the_one_at_a_time_answers(served):
    """24 concurrent API requests (and one empty one among them) against a demo whose first batch is held
    until all of them are queued: they are answered in batches, each with its one-at-a-time answer."""
    import threading
    import time

    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from conftest import launched
    from demo.app import MAX_BATCH_ROWS, batch_predictor, build_app
    from demo.micro_batch import MicroBatcher
    from demo.serving import ModelHolder
    from tagifai.data import sample_dataset_path

    holder, open_gate = ModelHolder(served), threading.Event()
    open_gate.set()
    predict_batch = batch_predictor(holder)

    def gated(projects):
        assert open_gate.wait(120), "the test never released the held batch"
        return predict_batch(projects)

    batcher = MicroBatcher(gated, MAX_BATCH_ROWS)
    projects = pd.read_csv(sample_dataset_path()).head(8)
    requests = [(row.title, row.description) for row in projects.itertuples()] * 3
    with launched(build_app(holder, batcher=batcher)) as url:
        client = Client(url, verbose=False)
        alone = {project: client.predict(*project, api_name="/predict") for project in set(requests)}
        assert set(batcher.batch_sizes) == {1}
        batches_before = len(batcher.batch_sizes)
        open_gate.clear()
        jobs = [client.submit(*project, api_name="/predict") for project in requests]
        empty = client.submit(" ", "", api_name="/predict")
        deadline = time.monotonic() + 120
        while not (len(batcher.batch_sizes) > batches_before and batcher.batch_sizes[-1] + batcher.waiting == 24):
            assert time.monotonic() < deadline, f"requests never queued: {batcher.waiting} waiting"
            time.sleep(0.02)
        open_gate.set()
        answers = [job.result(timeout=120) for job in jobs]
        with pytest.raises(AppError, match="Enter a title or a description"):
            empty.result(timeout=120)
    sizes = list(batcher.batch_sizes)[batches_before:]
    assert sum(sizes) == len(requests) and max(sizes) > 1, sizes
    for project, answer in zip(requests, answers):
        expected = alone[project]
        assert answer["label"] == expected["label"]
        got = {item["label"]: item["confidence"] for item in answer["confidences"]}
        want = {item["label"]: item["confidence"] for item in expected["confidences"]}
        assert got.keys() == want.keys() == set(served.predictor.classes)
        for tag in want:
            assert got[tag] == pytest.approx(want[tag], abs=1e-5)
