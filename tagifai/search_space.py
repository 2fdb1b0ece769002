"""The hyperparameters the study searches: one table, read by everything that needs them.

Ray Tune's param_space (tagifai/tuning/study.py), the validation of --initial-params and its --help text
(tagifai/settings.py), the plots' axes and log scales (tagifai/plots.py) and the benchmark's peer
study all come from SEARCH_SPACE. Adding a hyperparameter means a row here and the training code
that reads it (tagifai/train.py), nothing else. Kept free of Ray so that plots and settings import
it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Hyperparameter:
    name: str
    distribution: Literal["uniform", "loguniform"]  # loguniform: sampled (and plotted) on a log scale
    low: float
    high: float
    default: float  # the known-good starting point of the search
    meaning: str

    @property
    def log_scale(self) -> bool:
        return self.distribution == "loguniform"


# The seed study's ranges, and the Made With ML course's known-good point as defaults.
SEARCH_SPACE = (
    Hyperparameter("dropout_p", "uniform", 0.3, 0.9, 0.5, "dropout before the linear head"),
    Hyperparameter("lr", "loguniform", 1e-5, 5e-4, 1e-4, "AdamW learning rate"),
    Hyperparameter("lr_factor", "uniform", 0.1, 0.9, 0.8, "ReduceLROnPlateau factor"),
    Hyperparameter("lr_patience", "uniform", 1, 10, 3, "ReduceLROnPlateau patience, in epochs"),
)
NAMES = tuple(parameter.name for parameter in SEARCH_SPACE)
BY_NAME = {parameter.name: parameter for parameter in SEARCH_SPACE}


def default_point() -> dict[str, float]:
    return {parameter.name: parameter.default for parameter in SEARCH_SPACE}


def check_point(point: dict) -> dict[str, float]:
    """An initial point as floats, or ValueError naming the unknown key or the value out of range."""
    unknown = set(point) - set(NAMES)
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} in initial_params; allowed: {list(NAMES)}")
    checked = {}
    for name, value in point.items():
        parameter = BY_NAME[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not parameter.low <= value <= parameter.high
        ):
            raise ValueError(
                f"initial_params {name}={value!r} is outside the search space [{parameter.low:g}, {parameter.high:g}]"
            )
        checked[name] = float(value)
    return checked


def describe() -> str:
    """One line per hyperparameter, for --help."""
    return "; ".join(
        f"{p.name} {p.distribution}[{p.low:g}, {p.high:g}] ({p.meaning}, default {p.default:g})" for p in SEARCH_SPACE
    )
