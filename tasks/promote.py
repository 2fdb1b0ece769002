"""Prefect task: the promotion gate. The challenger (this run's registered best) takes the
`champion` alias only if it beats the champion re-scored on the same test rows (tagifai/lifecycle/promotion.py).
The decision is recorded in four places: the returned dict (the results JSON's `promotion`), tags
on both model versions, the `promotion` markdown artifact, and a log line."""

from __future__ import annotations

import time

import pandas as pd
from mlflow.tracking import MlflowClient
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tagifai.lifecycle import promotion
from tagifai.lifecycle.promotion import GateRules
from tagifai.lifecycle.tracking import with_retries

TAG_DECISION = "tagifai.gate.decision"  # on the challenger: promoted / rejected
TAG_REASON = "tagifai.gate.reason"
TAG_CHALLENGED_BY = "tagifai.gate.challenged_by"  # on the champion: the last challenger's version and outcome


@task(name="promotion-gate", cache_policy=NO_CACHE)
def promote_if_better(
    tracking_uri: str,
    model_name: str,
    challenger_version: str,
    evaluation: dict,
    test: pd.DataFrame,
    rules: GateRules,
    seed: int,
) -> dict:
    """The gate's decision (tagifai/lifecycle/promotion.py run_gate), timed, tagged on both
    versions, published as the `promotion` artifact and logged."""
    started = time.perf_counter()
    client = MlflowClient(tracking_uri)
    decision = promotion.run_gate(client, model_name, challenger_version, evaluation, test, rules, seed)
    decision["gate_seconds"] = round(time.perf_counter() - started, 2)
    _tag_versions(client, model_name, decision)
    create_markdown_artifact(key="promotion", markdown=decision_markdown(model_name, decision),
                             description="Did this run's best model become the champion, and why")  # fmt: skip
    before_version = decision["champion_version_before"]
    if decision["promoted"]:
        outcome = f"version {challenger_version} is the champion now (before: {before_version or 'none'})"
    else:
        outcome = f"version {challenger_version} not promoted; the champion stays {before_version or 'none'}"
    get_run_logger().info("promotion: %s: %s", outcome, decision["reason"])
    return decision


def _tag_versions(client: MlflowClient, model_name: str, decision: dict) -> None:
    outcome = "promoted" if decision["promoted"] else "rejected"
    if decision["forced"]:
        outcome = "forced"
    challenger = decision["challenger_version"]
    for key, value in ((TAG_DECISION, outcome), (TAG_REASON, decision["reason"][:4000])):
        with_retries(lambda key=key, value=value: client.set_model_version_tag(model_name, challenger, key, value))
    before = decision["champion_version_before"]
    if before and before != challenger:
        value = f"version {challenger}: {outcome}"
        with_retries(lambda: client.set_model_version_tag(model_name, before, TAG_CHALLENGED_BY, value))


def decision_markdown(model_name: str, decision: dict) -> str:
    champion = decision["champion"]
    rows = "\n".join(
        f"| {tag} | {scores['f1']:.3f} | " + (f"{champion['per_class'][tag]['f1']:.3f} |" if champion else "- |")
        for tag, scores in decision["challenger"]["per_class"].items()
    )
    failures = "\n".join(
        f"- {f['kind']}: {f['text']!r} -> {f['predicted']}" for f in decision["behavioural"]["failures"]
    )
    return (
        f"# {'Promoted' if decision['promoted'] else 'Not promoted'}: `{model_name}` version "
        f"{decision['challenger_version']}\n\n{decision['reason']}\n\n"
        f"Champion before: {decision['champion_version_before'] or 'none'}, after: "
        f"{decision['champion_version_after'] or 'none'}{' (forced)' if decision['forced'] else ''}\n\n"
        f"| tag | challenger F1 | champion F1 (same rows) |\n|---|---|---|\n{rows}\n"
        f"| **weighted** | **{decision['challenger']['f1']:.3f}** | "
        + (f"**{champion['f1']:.3f}** |" if champion else "- |")
        + f"\n\nBehavioural checks: {'passed' if decision['behavioural']['passed'] else 'FAILED'}\n{failures}\n"
    )
