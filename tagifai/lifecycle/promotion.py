"""The promotion gate: does this run's best model (the challenger) replace the `champion`?

Both are scored on the same test rows in the same run (the champion's stored test F1 came from
other data). The challenger takes the alias only if its weighted F1 beats the champion's by at
least `min_improvement` (a tie keeps the champion), no tag's F1 drops by more than
`max_class_drop`, and its behavioural checks pass. How large the difference is against the test
set's noise is told by a paired bootstrap (see `paired_bootstrap`); it informs, it does not decide.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import pandas as pd

from tagifai.errors import UserError
from tagifai.evaluate import classification_metrics
from tagifai.lifecycle import registry
from tagifai.metrics import weighted_f1
from tagifai.serving.loader import LoadedModel, load_model
from tagifai.serving.predictor import top_tags

BOOTSTRAP_SAMPLES = 2000


@dataclass(frozen=True)
class GateRules:
    min_improvement: float = 0.0
    max_class_drop: float = 0.05
    force: bool = False


def paired_bootstrap(labels: np.ndarray, challenger: np.ndarray, champion: np.ndarray, seed: int) -> dict:
    """The weighted-F1 difference (challenger - champion) resampled over the same test rows.

    Each resample draws rows with replacement and scores both models on the very same draw, so
    what the rows happen to be cancels out and only the models' difference varies. Returns the
    observed difference, its 95% interval and the share of resamples where the challenger is not
    better (a one-sided p-value): an interval that straddles 0 means the test set cannot tell them apart.
    """
    rng = np.random.default_rng(seed)
    rows = len(labels)
    differences = np.empty(BOOTSTRAP_SAMPLES)
    for i in range(BOOTSTRAP_SAMPLES):
        draw = rng.integers(0, rows, rows)
        differences[i] = weighted_f1(labels[draw], challenger[draw]) - weighted_f1(labels[draw], champion[draw])
    low, high = np.percentile(differences, [2.5, 97.5])
    return {
        "method": f"paired bootstrap, {BOOTSTRAP_SAMPLES} resamples of {rows} test rows",
        "f1_difference": weighted_f1(labels, challenger) - weighted_f1(labels, champion),
        "ci95": [float(low), float(high)],
        "p_not_better": float(np.mean(differences <= 0)),
    }


def decide(
    challenger: dict,
    champion: Optional[dict],
    behavioural_passed: bool,
    rules: GateRules,
    incompatible: Optional[str] = None,
    noise: Optional[dict] = None,
) -> tuple[bool, str]:
    """(promote?, reason). `challenger`/`champion` hold "f1" and "per_class" {tag: {"f1"}} on the
    same rows; `incompatible` says why a champion cannot be compared (then only force promotes)."""
    reasons = []
    if incompatible:
        reasons.append(f"the champion cannot be compared: {incompatible}")
    if not behavioural_passed:
        reasons.append("the challenger failed its behavioural checks")
    if champion is not None and not incompatible:
        difference = challenger["f1"] - champion["f1"]
        noise_note = ""
        if noise:
            low, high = noise["ci95"]
            noise_note = f" (95% CI {low:+.3f} to {high:+.3f}, {noise['method']})"
        if difference <= 0 or difference < rules.min_improvement:
            reasons.append(
                f"F1 {challenger['f1']:.3f} vs champion {champion['f1']:.3f}: {difference:+.3f}{noise_note}, "
                f"needs more than 0 and at least {rules.min_improvement:+.3f}"
            )
        drops = {
            tag: champion["per_class"][tag]["f1"] - scores["f1"]
            for tag, scores in challenger["per_class"].items()
            if tag in champion["per_class"]
        }
        worst = max(drops, key=drops.get, default=None)
        if worst is not None and drops[worst] > rules.max_class_drop:
            reasons.append(f"F1 of tag {worst!r} drops by {drops[worst]:.3f} (at most {rules.max_class_drop:.3f})")
        if not reasons:
            return True, (
                f"F1 {challenger['f1']:.3f} beats champion {champion['f1']:.3f} by {difference:+.3f}{noise_note}; "
                f"no tag drops more than {rules.max_class_drop:.3f}; behavioural checks passed"
            )
    if not reasons:
        return True, "no champion yet; behavioural checks passed"
    if rules.force:
        return True, "forced (--force-promote) although " + "; ".join(reasons)
    return False, ("kept the champion: " if champion is not None or incompatible else "not promoted: ") + "; ".join(
        reasons
    )


def verdict(rules: GateRules, evidence: dict) -> tuple[bool, bool, str]:
    """(promote?, forced?, reason) from `evidence`, the arguments of `decide` but the rules. The
    gate first decides on its own rules, so that a forced promotion is told apart from one the
    challenger earned (and a needless --force-promote is said)."""
    passes, reason = decide(rules=replace(rules, force=False), **evidence)
    forced = not passes and rules.force
    if forced:
        _, reason = decide(rules=rules, **evidence)
    elif passes and rules.force:
        reason += " (--force-promote was given but not needed)"
    return passes or forced, forced, reason


def run_gate(
    client, model_name: str, challenger_version: str, evaluation: dict, test: pd.DataFrame, rules: GateRules, seed: int
) -> dict:
    """Score the champion on the challenger's test rows, decide, and move the alias if the
    challenger wins. Returns the decision record (the results JSON's `promotion`)."""
    before = registry.champion(client, model_name)
    before_version = str(before.version) if before else None
    challenger = {k: evaluation["test"][k] for k in ("f1", "per_class")}
    champion_scores, incompatible, noise = None, None, None
    if before is not None and before_version != challenger_version:
        predictor, incompatible = load_champion(client, before)
        if predictor is not None:
            compared = compare(challenger, evaluation["predicted"], predictor, test, seed)
            incompatible = compared.get("incompatible")
            champion_scores, noise = compared.get("scores"), compared.get("noise")
    behavioural = evaluation["behavioural"]
    evidence = {"challenger": challenger, "champion": champion_scores, "behavioural_passed": behavioural["passed"],
                "incompatible": incompatible, "noise": noise}  # fmt: skip
    promoted, forced, reason = verdict(rules, evidence)
    if promoted:
        registry.move_alias(client, model_name, challenger_version, reason, "forced" if forced else "gate")
    return {
        "promoted": promoted,
        "reason": reason,
        "forced": forced,
        "champion_version_before": before_version,
        "champion_version_after": challenger_version if promoted else before_version,
        "challenger_version": challenger_version,
        "challenger": challenger,
        "champion": {k: champion_scores[k] for k in ("f1", "per_class")} if champion_scores else None,
        "noise": noise,
        "behavioural": {"passed": behavioural["passed"], "failures": behavioural["failures"]},
    }


def score_on(predictor, test: pd.DataFrame) -> tuple[dict, list[str]]:
    """Weighted and per-class metrics of `predictor` on the labelled `test` rows, and its predicted tags."""
    probabilities = predictor.predict_proba(list(test["title"]), list(test["description"]))
    predicted = top_tags(probabilities, predictor.classes)
    return classification_metrics(list(test["tag"]), predicted, predictor.classes), predicted


def load_champion(client, version) -> tuple[Optional[LoadedModel], Optional[str]]:
    """The champion's registered model, or why it cannot be loaded (a damaged or missing model or
    checkpoint, a backbone that no longer loads): then it is not compared."""
    from mlflow.exceptions import MlflowException

    try:
        return load_model(client.tracking_uri, f"models:/{version.name}/{version.version}"), None
    except (UserError, MlflowException, OSError, ValueError, KeyError) as error:
        return None, f"version {version.version} does not load ({error})"


def compare(challenger_scores: dict, challenger_predicted: list[str], champion, test: pd.DataFrame, seed: int) -> dict:
    """The champion re-scored on the challenger's test rows, with the paired bootstrap of the
    difference; or why they cannot be compared (another tag set)."""
    known = sorted(challenger_scores["per_class"])
    if sorted(champion.classes) != known:
        return {"incompatible": f"it knows the tags {sorted(champion.classes)}, the challenger {known}"}
    scores, predicted = score_on(champion, test)
    index = {tag: i for i, tag in enumerate(known)}

    def as_index(tags) -> np.ndarray:
        return np.array([index[tag] for tag in tags])

    noise = paired_bootstrap(as_index(test["tag"]), as_index(challenger_predicted), as_index(predicted), seed)
    return {"scores": scores, "noise": noise}
