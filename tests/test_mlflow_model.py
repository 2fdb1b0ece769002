"""The registered MLflow Model, as an MLflow user meets it: its MLmodel, loading it where this
project cannot be imported, and `mlflow models serve` over HTTP. All on the champion of the
session's one tiny tuning run (conftest.py's `tuned_store`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from processes import free_port, running, tail

ROWS = pd.DataFrame(
    {
        "title": ["Object detection in drone video", "Transformers for text", "Feature store for ML pipelines"],
        "description": ["YOLO on aerial footage.", "", "Serving features online and offline, https://example.com"],
    }
)
SERVE_START_S = 300  # a cold `mlflow models serve` on 2 busy cores imports MLflow, pandas, ONNX Runtime


@pytest.fixture(scope="module")
def champion(tuned_store):
    settings = tuned_store["settings"]
    client = MlflowClient(settings.tracking_uri)
    version = client.get_model_version_by_alias(settings.registered_model_name, "champion")
    return {"settings": settings, "client": client, "version": version,
            "uri": f"models:/{settings.registered_model_name}@champion"}  # fmt: skip


@pytest.fixture(scope="module")
def expected(champion, tmp_path_factory):
    """flows.predict's probabilities for ROWS, row by row: what every other path must reproduce.
    flows.predict loads the MLflow Model too, so they are first checked against the training
    checkpoint scored by the project's own Predictor."""
    from flows import predict
    from tagifai.lifecycle.tracking import download_checkpoint
    from tagifai.serving.predictor import Predictor

    settings, run_id = champion["settings"], champion["version"].run_id
    base = ["--tracking-uri", settings.tracking_uri, "--run-id", run_id, "--json"]
    results = [predict.main(["--title", t, "--description", d, *base]) for t, d in zip(ROWS.title, ROWS.description)]
    classes = sorted(results[0]["probabilities"])
    probabilities = np.array([[r["probabilities"][tag] for tag in classes] for r in results])
    checkpoint = Predictor(download_checkpoint(champion["client"], run_id, tmp_path_factory.mktemp("checkpoint")))
    assert checkpoint.classes == classes
    assert np.abs(checkpoint.predict_proba(ROWS.title, ROWS.description) - probabilities).max() < 1e-5
    return classes, probabilities


def test_the_champion_is_an_mlflow_model_with_signature_example_and_few_requirements(champion, tmp_path):
    from mlflow.models import Model

    from tagifai.serving.loader import download_model

    version, client = champion["version"], champion["client"]
    assert version.source.startswith("models:/m-")
    local = Path(download_model(client, version.source, str(tmp_path)))
    model = Model.load(local)
    assert "python_function" in model.flavors
    assert model.signature.inputs.input_names() == ["title", "description"]
    assert all(spec.required for spec in model.signature.inputs.inputs)
    outputs = model.signature.outputs.input_names()
    assert outputs[0] == "prediction" and all(name.startswith("probability_") for name in outputs[1:])
    assert json.loads((local / "serving_input_example.json").read_text())
    requirements = (local / "requirements.txt").read_text().split()
    assert sorted(r.split("==")[0] for r in requirements) == ["mlflow", "numpy", "onnxruntime", "pandas", "tokenizers"]
    assert {p.name for p in (local / "code").iterdir()} >= {"text_cleaning.py", "stop_words.txt"}
    assert (local / "artifacts" / "model.onnx").stat().st_size > 1_000_000  # the weights are inside
    # In the run's experiment, under its artifact location (not ./mlruns of the current directory).
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    run = client.get_run(version.run_id)
    assert logged.experiment_id == run.info.experiment_id and logged.source_run_id == run.info.run_id
    experiment_root = client.get_experiment(run.info.experiment_id).artifact_location
    assert logged.artifact_location.startswith(experiment_root), (logged.artifact_location, experiment_root)
    # The safetensors checkpoint stays in the run: the training artifact, for resume and warm start.
    assert client.list_artifacts(version.run_id, "checkpoint")


def test_tokenization_gives_the_projects_ids(champion, tmp_path):
    """The served model tokenizes with the `tokenizers` library alone; the project with
    transformers' fast tokenizer (truncation at the checkpoint's max_length). Same ids."""
    from tagifai.batching import tokenize_texts
    from tagifai.data import load_dataset
    from tagifai.lifecycle.tracking import download_checkpoint
    from tagifai.serving.predictor import Predictor
    from tagifai.text_cleaning import project_texts

    model = load(champion)
    served = model.scorer.model.unwrap_python_model()
    frame = load_dataset(None).frame
    titles = [*frame.title, "", "naïve café – ünïcode ✓ 東京", "word " * 500]
    descriptions = [*frame.description, "", "emoji 🚀 and tabs\tand\nnewlines", "long " * 500]
    texts = project_texts(titles, descriptions)
    predictor = Predictor(download_checkpoint(champion["client"], champion["version"].run_id, tmp_path))
    ours = tokenize_texts(texts, [-1] * len(texts), predictor.tokenizer, predictor.max_length)
    theirs = [e.ids for e in served.tokenizer.encode_batch(served.project_texts(titles, descriptions))]
    assert max(len(ids) for ids in theirs) == predictor.max_length  # the long rows were truncated
    assert [ours.token_ids[a:b].tolist() for a, b in zip(ours.offsets[:-1], ours.offsets[1:])] == theirs


def load(champion):
    from tagifai.serving.loader import load_model

    return load_model(champion["settings"].tracking_uri, champion["uri"])


def test_the_loader_serves_the_mlflow_model_and_the_gate_flows_agree(champion, expected):
    model = load(champion)
    classes, probabilities = expected
    assert model.is_mlflow_model and model.version == str(champion["version"].version)
    assert model.classes == classes and model.args["backbone"] and model.args["hyperparameters"]
    assert np.abs(model.predict_proba(ROWS.title, ROWS.description) - probabilities).max() < 1e-5
    # Over the row limit, the loader splits the input; the model itself refuses it.
    many = pd.concat([ROWS] * 1700, ignore_index=True)
    assert len(many) > model.scorer.max_rows
    assert model.predict_proba(many.title, many.description).shape == (len(many), len(classes))


def test_a_version_registered_before_mlflow_models_loads_from_its_checkpoint(champion, expected, caplog):
    """A version registered the old way (its source the run's checkpoint folder, no MLmodel)."""
    from tagifai.lifecycle.tracking import CHECKPOINT_ARTIFACT
    from tagifai.serving.loader import load_model

    client, run_id = champion["client"], champion["version"].run_id
    name = champion["settings"].registered_model_name
    source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/" + CHECKPOINT_ARTIFACT
    old = client.create_model_version(name, source=source, run_id=run_id)
    with caplog.at_level("WARNING", logger="tagifai.serving.loader"):
        model = load_model(champion["settings"].tracking_uri, f"models:/{name}/{old.version}")
    notices = [r.getMessage() for r in caplog.records if r.name == "tagifai.serving.loader"]
    assert len(notices) == 1 and "no MLflow Model" in notices[0] and "\n" not in notices[0]
    assert not model.is_mlflow_model and model.version == str(old.version) and model.args["hyperparameters"]
    classes, probabilities = expected
    assert model.classes == classes
    assert np.abs(model.predict_proba(ROWS.title, ROWS.description) - probabilities).max() < 1e-5


GUARD = """
import importlib.abc, json, sys
BLOCKED = {"tagifai", "flows", "tasks", "demo"}

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the model must load without this project")

sys.meta_path.insert(0, Blocked())
for name in BLOCKED:
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"the guard failed: {name} imported")

import mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
output = model.predict(pd.DataFrame(json.loads(sys.argv[3])))
assert not BLOCKED & {name.split(".")[0] for name in sys.modules}
print(json.dumps(output.to_dict(orient="split")))
"""


def test_it_loads_and_predicts_where_the_project_cannot_be_imported(champion, expected, tmp_path):
    script = tmp_path / "outside.py"
    script.write_text(GUARD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-I", str(script), champion["settings"].tracking_uri, champion["uri"], ROWS.to_json()],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    output = json.loads(done.stdout.strip().splitlines()[-1])
    classes, probabilities = expected
    assert output["columns"] == ["prediction", *(f"probability_{tag}" for tag in classes)]
    got = np.array([row[1:] for row in output["data"]])
    assert np.abs(got - probabilities).max() < 1e-5
    assert [row[0] for row in output["data"]] == [classes[i] for i in probabilities.argmax(axis=1)]


@pytest.fixture(scope="module")
def server(champion, tmp_path_factory):
    """One real `mlflow models serve` of the champion on a loopback port: its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": champion["settings"].tracking_uri, "NO_PROXY": "127.0.0.1"}
    bin_dir = Path(sys.executable).parent  # as in an activated virtualenv: the server execs `uvicorn`
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    mlflow_cli = bin_dir / "mlflow"
    args = [mlflow_cli, "models", "serve", "-m", champion["uri"], "--env-manager", "local",
            "-h", "127.0.0.1", "-p", port]  # fmt: skip
    with running(args, log, env, cwd=log.parent) as process:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + SERVE_START_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow models serve did not answer /ping\n{tail(log)}")
            time.sleep(0.5)
        yield url


def post(url: str, payload) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}/invocations", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.mark.slow  # a real `mlflow models serve` process (about 30 s to start)
@pytest.mark.parametrize(
    "payload",
    [
        {"dataframe_split": {"columns": ["title", "description"], "data": ROWS.values.tolist()}},
        {"dataframe_records": ROWS.to_dict(orient="records")},
        {"inputs": {"title": list(ROWS.title), "description": list(ROWS.description)}},
    ],
    ids=["dataframe_split", "dataframe_records", "inputs"],
)
def test_mlflow_models_serve_agrees_with_flows_predict(server, expected, payload):
    status, body = post(server, payload)
    assert status == 200, body
    classes, probabilities = expected
    rows = body["predictions"]
    assert [row["prediction"] for row in rows] == [classes[i] for i in probabilities.argmax(axis=1)]
    got = np.array([[row[f"probability_{tag}"] for tag in classes] for row in rows])
    assert np.abs(got - probabilities).max() < 1e-5


@pytest.mark.slow  # a real `mlflow models serve` process (about 30 s to start)
@pytest.mark.parametrize(
    "payload, named",
    [
        ({"dataframe_records": [{"title": "Only a title"}]}, "description"),
        ({"dataframe_split": {"columns": ["title", "description"], "data": [[42, "a number as title"]]}}, "title"),
        # An empty list of records has no columns either: MLflow's schema check names them.
        ({"dataframe_records": []}, "missing inputs ['title', 'description']"),
        ({"dataframe_split": {"columns": ["title", "description"], "data": []}}, "no rows"),
        ({"dataframe_split": {"columns": ["title", "description"], "data": [["t", "d"]] * 10_000}}, "10000 rows"),
    ],
    ids=["missing column", "number for text", "empty records", "empty split", "10,000 rows"],
)
def test_bad_payloads_get_a_4xx_that_names_the_problem(server, payload, named):
    status, body = post(server, payload)
    assert 400 <= status < 500, (status, body)
    assert named in body.get("message", ""), body
