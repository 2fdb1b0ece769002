"""End to end: the real flow (Prefect + Ray Tune + MLflow) on a tiny BERT, 2 trials x 2 epochs."""

from __future__ import annotations

import json

from mlflow.tracking import MlflowClient

from conftest import tiny_settings
from tagifai.lifecycle import tracking


def test_flow_tracks_every_trial_and_registers_the_best(tuned_store):
    settings, summary = tuned_store["settings"], tuned_store["summary"]
    client = MlflowClient(settings.tracking_uri)
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])

    # One finished MLflow run per trial, none left RUNNING.
    assert len(summary["trials"]) == 2
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert {t["run_id"] for t in summary["trials"]} == {r.info.run_id for r in runs}
    for run in runs:
        assert set(run.data.params) == {"dropout_p", "lr", "lr_factor", "lr_patience", "num_workers", "world_size"}
        assert run.data.params["num_workers"] == run.data.params["world_size"] == "1"  # one process per trial
        assert run.data.tags[tracking.TAG_TRIAL]
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in history] == list(range(1, len(history) + 1))
        assert {"train_loss", "val_f1", "lr", "best_val_loss"} <= set(run.data.metrics)
        names = {a.path.split("/")[-1] for a in client.list_artifacts(run.info.run_id, "checkpoint")}
        assert {"model.safetensors", "classifier.json", "config.json"} <= names

    # The seeded initial point was evaluated.
    assert {"dropout_p": 0.3, "lr": 5e-4, "lr_factor": 0.8, "lr_patience": 3.0} in [
        t["params"] for t in summary["trials"]
    ]

    # The best run: lowest val_loss, tagged, with test metrics, registered under the champion alias.
    best = client.get_run(summary["run_id"])
    assert summary["val_loss"] == min(t["val_loss"] for t in summary["trials"])
    assert best.data.tags[tracking.TAG_BEST] == "true"
    assert best.data.metrics["test_f1"] == summary["test"]["f1"]
    plots = {a.path for a in client.list_artifacts(summary["run_id"], "plots")}
    assert plots == {
        f"plots/{name}.png" for name in ("confusion_matrix", "per_class_f1", "parallel_coordinates", "learning_curves")
    }
    assert "evaluation.json" in {a.path for a in client.list_artifacts(summary["run_id"])}
    version = client.get_model_version_by_alias("tagifai", tracking.CHAMPION_ALIAS)
    assert version.run_id == summary["run_id"]

    # The JSON summary on disk has the documented shape.
    written = json.loads((tuned_store["workdir"] / "results.json").read_text())
    assert set(written) >= {"run_id", "experiment_name", "params", "val_loss", "test", "trials"}
    assert set(written["test"]) >= {
        "precision",
        "recall",
        "f1",
        "per_class",
        "confusion_matrix",
        "slices",
        "hardest_examples",
    }
    assert set(written["test"]["per_class"]) == {"computer-vision", "mlops", "natural-language-processing", "other"}
    assert sum(c["support"] for c in written["test"]["per_class"].values()) == 60
    for trial in written["trials"]:
        assert set(trial) >= {"trial_id", "run_id", "params", "val_loss", "epochs", "status"}
        assert 1 <= trial["epochs"] <= 6 and trial["status"] in {"completed", "pruned"}
    assert summary["cached"] == {"load": False, "split": False, "tokenize": False}

    # The first model of a registry: the gate promotes it because its behavioural checks pass.
    promotion = written["promotion"]
    assert promotion["promoted"] and promotion["champion_version_before"] is None
    assert promotion["champion_version_after"] == str(version.version) == summary["model_version"]
    assert promotion["behavioural"] == {"passed": True, "failures": []} and "no champion yet" in promotion["reason"]


def test_second_run_with_same_inputs_reuses_cached_steps(tuned_store, tiny_backbone, shared_ray):
    from flows.tune import tune_classifier

    workdir = tuned_store["workdir"]
    settings = tiny_settings(
        workdir,
        tiny_backbone,
        experiment_name="tiny-again",
        num_runs=1,
        num_epochs=1,
        dataset_loc=tuned_store["settings"].dataset_loc,
        results_fp=str(workdir / "again.json"),
    )
    summary = tune_classifier(settings)
    assert summary["cached"] == {"load": True, "split": True, "tokenize": True}
    assert len(summary["trials"]) == 1


def test_evaluate_and_predict_clis_read_the_tracked_run(tuned_store, tmp_path, capsys):
    from flows import evaluate, predict
    from tagifai.data import sample_dataset_path

    settings, summary = tuned_store["settings"], tuned_store["summary"]
    out = tmp_path / "eval.json"
    result = evaluate.main(
        [
            "--run-id",
            summary["run_id"],
            "--dataset-loc",
            str(sample_dataset_path()),
            "--tracking-uri",
            settings.tracking_uri,
            "--results-fp",
            str(out),
        ]
    )
    written = json.loads(out.read_text())
    human = capsys.readouterr().out  # a short summary, not the JSON
    assert (
        f"F1 {written['test']['f1']:.3f}" in human and "Behavioural checks:" in human and len(human.splitlines()) < 12
    )
    assert written["behavioural"]["kinds"].keys() == {"invariance", "directional", "minimum"}
    assert written["test"]["num_samples"] == 300 and 0.0 <= written["test"]["f1"] <= 1.0
    assert set(written["test"]["slices"]) == {"short_text_under_5_words", "mentions_vision_and_language"}
    assert result["run_id"] == summary["run_id"]

    argv = ["--title", "Real-time object detection", "--description", "YOLO on video streams",
            "--tracking-uri", settings.tracking_uri, "--experiment-name", "tiny"]  # fmt: skip
    prediction = predict.main(argv)
    assert capsys.readouterr().out.strip().startswith(prediction["prediction"] + " (")  # one line for a person
    predict.main([*argv, "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["prediction"] in printed["probabilities"]
    assert abs(sum(printed["probabilities"].values()) - 1.0) < 1e-5
    assert prediction["run_id"] == printed["run_id"]
