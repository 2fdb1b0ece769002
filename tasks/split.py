"""Prefect task: the stratified train/validation/test split, cached on the data and the code."""

from __future__ import annotations

from typing import Optional

from prefect import task
from prefect.cache_policies import TASK_SOURCE, CacheKeyFnPolicy

import tagifai.data
from tagifai.data import LoadedData, Splits, split_dataset
from tasks.cache import key, module_source_digest


def split_key(context, parameters) -> str:
    """`data_key` names the data (dataset and holdout bytes, seed, row sample); the splitting and
    cleaning code is tagifai/data.py."""
    return key("split", parameters["data_key"], module_source_digest(tagifai.data))


@task(name="split-dataset", cache_policy=CacheKeyFnPolicy(cache_key_fn=split_key) + TASK_SOURCE, persist_result=True)
def split_data(
    data: LoadedData, holdout: Optional[LoadedData], data_key: str, seed: int, num_samples: Optional[int]
) -> Splits:
    return split_dataset(data.frame, holdout.frame if holdout else None, seed=seed, num_samples=num_samples)
