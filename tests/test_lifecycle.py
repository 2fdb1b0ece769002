"""The model lifecycle for real: the promotion gate, the alias history with rollback, skipping an
unchanged re-tune, and the demo following the champion, all on tiny real runs (Prefect, Ray Tune,
MLflow and the tiny BERT; nothing mocked).

One registry goes through the issue's scenario: a good model becomes the champion; a weak one is
rejected (the decision recorded in four places); a weak one forced through; a good one beats it
through the gate; two rollbacks; an unchanged re-tune skipped.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from conftest import GOOD_TINY, tiny_settings
from tagifai.lifecycle import registry
from tagifai.lifecycle.promotion import GateRules, decide, paired_bootstrap
from tune_runs import run_flow, tune_command

REPO = Path(__file__).resolve().parents[1]
WEAK = dict(
    num_epochs=1, batch_size=16, initial_params=[{"dropout_p": 0.9, "lr": 1e-5, "lr_factor": 0.5, "lr_patience": 1}]
)


def per_class(**f1s) -> dict:
    return {tag: {"f1": f1} for tag, f1 in f1s.items()}


def test_gate_rules():
    champion = {"f1": 0.80, "per_class": per_class(a=0.8, b=0.8)}
    better = {"f1": 0.85, "per_class": per_class(a=0.9, b=0.78)}
    assert decide(better, champion, True, GateRules())[0]
    tie = {"f1": 0.80, "per_class": per_class(a=0.8, b=0.8)}
    promoted, reason = decide(tie, champion, True, GateRules())
    assert not promoted and "+0.000" in reason  # a tie keeps the champion
    assert not decide(better, champion, True, GateRules(min_improvement=0.1))[0]
    drop = {"f1": 0.85, "per_class": per_class(a=1.0, b=0.70)}
    promoted, reason = decide(drop, champion, True, GateRules())
    assert not promoted and "'b' drops by 0.100" in reason
    promoted, reason = decide(better, champion, False, GateRules())
    assert not promoted and "behavioural" in reason
    assert decide(better, None, True, GateRules()) == (True, "no champion yet; behavioural checks passed")
    assert not decide(better, None, False, GateRules())[0]
    promoted, reason = decide(better, None, True, GateRules(), incompatible="another tag set")
    assert not promoted and "cannot be compared: another tag set" in reason
    promoted, reason = decide(drop, champion, False, GateRules(force=True))
    assert promoted and reason.startswith("forced (--force-promote) although")


def test_paired_bootstrap_separates_noise_from_a_real_difference():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    same = paired_bootstrap(labels, labels.copy(), labels.copy(), seed=1)
    assert same["f1_difference"] == 0 and same["ci95"] == [0.0, 0.0]
    noisy = np.where(rng.random(200) < 0.3, rng.integers(0, 4, 200), labels)  # 30% of rows scrambled
    better = paired_bootstrap(labels, labels, noisy, seed=1)
    assert better["ci95"][0] > 0 and better["p_not_better"] == 0.0
    flips = np.where(rng.random(200) < 0.02, (labels + 1) % 4, labels)  # a 2% difference on 200 rows
    close = paired_bootstrap(labels, flips, labels, seed=1)
    assert close["ci95"][0] < 0 < close["ci95"][1] or close["ci95"][1] <= 0


def test_rollback_pops_the_history_and_bad_requests_exit_2(tmp_path, capsys):
    from flows import promote

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    for _ in range(3):
        registry.register_version(client, "m", client.create_run(experiment).info.run_id)
    base = ["--model-name", "m", "--tracking-uri", uri]
    with pytest.raises(SystemExit) as no_history:
        promote.main(["--rollback", *base])
    assert no_history.value.code == 2 and "nothing to roll back to" in capsys.readouterr().err
    for version in ("1", "2", "3"):
        promote.main(["--version", version, "--reason", f"try {version}", *base])
    assert "version 2 -> version 3" in capsys.readouterr().out
    assert promote.main(["--rollback", *base])["to"] == "2"
    assert promote.main(["--rollback", *base])["to"] == "1"  # two rollbacks go two champions back
    with pytest.raises(SystemExit) as exhausted:
        promote.main(["--rollback", *base])
    assert exhausted.value.code == 2
    moves = promote.main(["--history", *base])
    assert [(m["from"], m["to"], m["kind"]) for m in moves] == [
        (None, "1", "manual"), ("1", "2", "manual"), ("2", "3", "manual"),
        ("3", "2", "rollback"), ("2", "1", "rollback"),
    ]  # fmt: skip
    assert all(m["by"] and m["at"].endswith("Z") for m in moves) and moves[1]["reason"] == "try 2"
    with pytest.raises(SystemExit) as unknown:
        promote.main(["--version", "9", *base])
    assert unknown.value.code == 2 and "has no version '9'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as nothing:
        promote.main(base)
    assert nothing.value.code == 2


def test_behavioural_checks_flag_a_model_that_always_predicts_one_tag(tmp_path, tiny_backbone):
    import torch

    from tagifai.behavioural import load_checks, run_checks
    from tagifai.model import build_classifier, load_tokenizer, save_checkpoint
    from tagifai.serving.predictor import Predictor

    tags = {"computer-vision": 0, "mlops": 1, "natural-language-processing": 2, "other": 3}
    model = build_classifier(str(tiny_backbone), 4, 0.1)
    with torch.no_grad():  # whatever the text, the head says mlops
        model.head.weight.zero_()
        model.head.bias.copy_(torch.tensor([0.0, 5.0, 0.0, 0.0]))
    args = {"backbone": str(tiny_backbone), "class_to_index": tags, "max_length": 64, "dropout_p": 0.1}
    save_checkpoint(model, load_tokenizer(str(tiny_backbone)), tmp_path / "one-tag", args)
    report = run_checks(Predictor(tmp_path / "one-tag"), load_checks())
    assert not report["passed"]
    assert report["kinds"]["invariance"]["passed"]  # a constant model is perfectly invariant...
    assert not report["kinds"]["directional"]["passed"] and not report["kinds"]["minimum"]["passed"]  # ...and useless
    assert {f["predicted"] for f in report["failures"]} == {"mlops"}
    assert all(f["expected"] != "mlops" for f in report["failures"] if f["kind"] == "minimum")


def promotion_artifacts() -> list[str]:
    """The markdown of every `promotion` artifact in this test session's Prefect database."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["promotion"])))
    return [artifact.data for artifact in found]


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory, tiny_backbone):
    """The scenario's first step: a good tiny model, promoted because there was no champion."""
    from conftest import start_shared_ray
    from flows.tune import tune_classifier

    start_shared_ray()
    workdir = tmp_path_factory.mktemp("lifecycle")
    good = tiny_settings(workdir, tiny_backbone, experiment_name="life", num_runs=1, **GOOD_TINY)
    summary = tune_classifier(good)
    return {"workdir": workdir, "good": good, "first": summary, "client": MlflowClient(good.tracking_uri)}


@pytest.mark.slow  # tuning runs on one registry, one through the CLI
def test_gate_scenario_weak_rejected_forced_better_rolled_back_and_skipped(lifecycle, tiny_backbone):
    """The issue's scenario, one step after the other on one registry."""
    from flows import promote
    from flows.tune import tune_classifier
    from tagifai.settings import training_fingerprint

    first, client, workdir, good = lifecycle["first"], lifecycle["client"], lifecycle["workdir"], lifecycle["good"]
    assert first["promotion"]["promoted"] and first["model_version"] == "1"

    # A weak model, through the CLI: rejected, and the decision recorded in four places.
    weak = tiny_settings(workdir, tiny_backbone, experiment_name="life", num_runs=1,
                         results_fp=str(workdir / "weak.json"), **WEAK)  # fmt: skip
    code, output = run_flow(tune_command(settings=weak))
    assert code == 0, output[-3000:]
    decision = json.loads((workdir / "weak.json").read_text())["promotion"]  # 1. the results JSON
    assert decision["promoted"] is False and decision["forced"] is False
    assert decision["champion_version_before"] == decision["champion_version_after"] == "1"
    assert decision["challenger_version"] == "2" and decision["champion"]["f1"] > decision["challenger"]["f1"]
    assert decision["reason"].startswith("kept the champion") and "95% CI" in decision["reason"]
    assert set(decision["noise"]) == {"method", "f1_difference", "ci95", "p_not_better"}
    assert str(registry.champion(client, "tagifai").version) == "1"
    challenger = client.get_model_version("tagifai", "2").tags  # 2. tags on both versions
    assert challenger["tagifai.gate.decision"] == "rejected" and challenger["tagifai.gate.reason"] == decision["reason"]
    assert client.get_model_version("tagifai", "1").tags["tagifai.gate.challenged_by"] == "version 2: rejected"
    assert any("Not promoted" in markdown and "version 2" in markdown for markdown in promotion_artifacts())  # 3.
    assert "promotion: version 2 not promoted; the champion stays 1" in output  # 4. the log

    # Forced through: the decision says so.
    forced = tune_classifier(weak.model_copy(update={"force_promote": True, "results_fp": None}))["promotion"]
    assert forced["promoted"] and forced["forced"] and forced["reason"].startswith("forced (--force-promote)")
    weak_champion = forced["challenger_version"]
    assert str(registry.champion(client, "tagifai").version) == weak_champion

    # A better model beats the weak champion through the gate.
    better = tune_classifier(good.model_copy(update={"results_fp": str(workdir / "better.json")}))["promotion"]
    assert better["promoted"] and not better["forced"], better["reason"]
    assert better["champion_version_before"] == weak_champion and "beats champion" in better["reason"]

    # Two rollbacks go two champions back; the history lists every move.
    base = ["--model-name", "tagifai", "--tracking-uri", good.tracking_uri]
    assert promote.main(["--rollback", *base])["to"] == weak_champion
    assert promote.main(["--rollback", *base])["to"] == "1"
    moves = [(m["from"], m["to"], m["kind"]) for m in promote.main(["--history", *base])]
    assert moves == [
        (None, "1", "gate"), ("1", weak_champion, "forced"), (weak_champion, better["challenger_version"], "gate"),
        (better["challenger_version"], weak_champion, "rollback"), (weak_champion, "1", "rollback"),
    ]  # fmt: skip

    # Version 1 is the champion again, trained on these bytes with these settings: nothing to do.
    skipped = tune_classifier(good.model_copy(update={"skip_if_unchanged": True}))
    assert skipped["skipped"] is True and skipped["champion_version"] == "1", skipped
    assert "same data with the same settings" in skipped["reason"]
    changed = good.model_copy(update={"num_epochs": 5})
    assert registry.trained_on(registry.champion(client, "tagifai")) != (skipped["data"]["fingerprint"],
                                                                         training_fingerprint(changed))  # fmt: skip


@pytest.mark.slow
def test_warm_start_adds_the_champions_hyperparameters(lifecycle):
    from flows.tune import starting_from_champion

    client, good = lifecycle["client"], lifecycle["good"]
    champion = client.get_model_version("tagifai", "1")
    assert starting_from_champion(good, client, champion) is good  # its point is the configured one already
    other = good.model_copy(
        update={"initial_params": [{"dropout_p": 0.6, "lr": 2e-4, "lr_factor": 0.5, "lr_patience": 2}]}
    )
    extended = starting_from_champion(other, client, champion).initial_params
    assert extended == [*other.initial_params, good.initial_params[0]]


@pytest.mark.slow
def test_demo_follows_the_champion_without_failing_a_request(lifecycle):
    """A demo following the alias every 0.3 s; the alias moves while predictions stream in."""
    from gradio_client import Client

    from conftest import launched
    from demo.app import build_app
    from demo.serving import holder_for
    from flows import promote

    good, client = lifecycle["good"], lifecycle["client"]
    base = ["--model-name", "tagifai", "--tracking-uri", good.tracking_uri]
    promote.main(["--version", "1", *base])
    # The version the alias will move to: another registration of the same run is enough here.
    new_version = registry.register_version(client, "tagifai", client.get_model_version("tagifai", "1").run_id)
    holder = holder_for(good.tracking_uri, None, "life", "tagifai", reload_interval_s=0.3)
    holder.start()
    try:
        with launched(build_app(holder)) as url:
            demo = Client(url, verbose=False)
            assert demo.predict(api_name="/model_info")["version"] == "1"
            outcomes, stop = [], threading.Event()

            def stream():
                caller = Client(url, verbose=False)
                while not stop.is_set():
                    try:
                        caller.predict("Object detection in drone video", "", api_name="/predict")
                        outcomes.append("ok")
                    except Exception as error:  # noqa: BLE001 - every failure is counted and shown
                        outcomes.append(repr(error))

            streamer = threading.Thread(target=stream)
            streamer.start()
            time.sleep(1.0)
            moved_at = len(outcomes)
            promote.main(["--version", new_version, *base])
            deadline = time.monotonic() + 60
            info = demo.predict(api_name="/model_info")
            while info["version"] != new_version and time.monotonic() < deadline:
                time.sleep(0.2)
                info = demo.predict(api_name="/model_info")
            time.sleep(1.0)
            stop.set()
            streamer.join(timeout=60)
    finally:
        holder.stop()
    assert info["version"] == new_version and info["alias"] == "champion" and info["model_name"] == "tagifai"
    assert info["run_id"] == client.get_model_version("tagifai", new_version).run_id
    assert len(outcomes) > moved_at + 2, "no prediction was made while the champion was being swapped"
    assert set(outcomes) == {"ok"}, [o for o in outcomes if o != "ok"][:3]
