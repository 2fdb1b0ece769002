"""Behavioural checks of a classifier: invariance, directional and minimum-functionality cases
from a small data file (tagifai/behavioural_checks.yaml by default), each kind with a pass rate.

Aggregate F1 can hide a model that learned a shortcut (a single tag for everything, a proper
noun as a signal); these cases test what the model should and should not respond to.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Optional, Protocol

import yaml

from tagifai.errors import DataError
from tagifai.serving.predictor import top_tags

KINDS = ("invariance", "directional", "minimum")


class TagPredictor(Protocol):
    classes: list[str]

    def predict_proba(self, titles, descriptions): ...


def default_checks_path() -> Path:
    return Path(str(resources.files("tagifai").joinpath("behavioural_checks.yaml")))


def load_checks(path: Optional[str] = None) -> dict:
    """The checks file as a dict, validated: every kind a list of cases, a pass rate per kind."""
    source = Path(path) if path else default_checks_path()
    try:
        checks = yaml.safe_load(source.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise DataError(f"cannot read behavioural checks from {source}: {error}") from None
    needed = {"invariance": ("text", "changed"), "directional": ("text", "changed", "expected"),
              "minimum": ("text", "expected")}  # fmt: skip
    if not isinstance(checks, dict) or not all(isinstance(checks.get(kind, []), list) for kind in KINDS):
        raise DataError(f"{source}: expected lists named {', '.join(KINDS)} and a pass_rate mapping")
    for kind, fields in needed.items():
        for number, case in enumerate(checks.get(kind, []), start=1):
            missing = [name for name in fields if not isinstance(case, dict) or not case.get(name)]
            if missing:
                raise DataError(f"{source}: {kind} case {number} lacks {', '.join(missing)}")
    rates = checks.get("pass_rate") or {}
    if set(rates) - set(KINDS) or not all(0 <= float(rate) <= 1 for rate in rates.values()):
        raise DataError(f"{source}: pass_rate must map {', '.join(KINDS)} to numbers between 0 and 1")
    return checks


def run_checks(predictor: TagPredictor, checks: dict) -> dict:
    """Every case's outcome and a verdict per kind: {"passed", "kinds": {...}, "failures": [...]}."""
    known = set(predictor.classes)
    applicable = {
        "invariance": checks.get("invariance", []),
        "directional": [c for c in checks.get("directional", []) if c["expected"] in known],
        "minimum": [c for c in checks.get("minimum", []) if c["expected"] in known],
    }
    texts = [c["text"] for cases in applicable.values() for c in cases]
    texts += [c["changed"] for kind in ("invariance", "directional") for c in applicable[kind]]
    predicted = dict(zip(texts, _predict(predictor, texts))) if texts else {}

    kinds, failures = {}, []
    for kind, cases in applicable.items():
        outcomes = []
        for case in cases:
            before, after = predicted[case["text"]], predicted.get(case.get("changed", ""))
            passed = {
                "invariance": before == after,
                "directional": after == case.get("expected") and before != after,
                "minimum": before == case.get("expected"),
            }[kind]
            outcome = {"kind": kind, **case, "predicted": before, "passed": passed}
            if after is not None:
                outcome["predicted_changed"] = after
            outcomes.append(outcome)
            if not passed:
                failures.append(outcome)
        rate = float(checks.get("pass_rate", {}).get(kind, 1.0))
        share = sum(o["passed"] for o in outcomes) / len(outcomes) if outcomes else 1.0
        skipped = len(checks.get(kind, [])) - len(cases)
        kinds[kind] = {"pass_rate": share, "required": rate, "passed": share >= rate, "cases": outcomes,
                       "skipped": skipped}  # fmt: skip
    return {"passed": all(k["passed"] for k in kinds.values()), "kinds": kinds, "failures": failures}


def _predict(predictor: TagPredictor, texts: list[str]) -> list[str]:
    return top_tags(predictor.predict_proba(texts, [""] * len(texts)), predictor.classes)


def summary_line(report: dict) -> str:
    """e.g. 'passed (invariance 6/6, directional 3/4, minimum 11/12)'."""
    parts = []
    for kind, result in report["kinds"].items():
        total = len(result["cases"])
        parts.append(f"{kind} {sum(c['passed'] for c in result['cases'])}/{total}")
    return ("passed" if report["passed"] else "FAILED") + " (" + ", ".join(parts) + ")"
