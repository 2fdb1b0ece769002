"""Prefect task: clean and tokenize train and validation once for every trial, cached on the data,
the tokenizer's files and the code."""

from __future__ import annotations

import hashlib

from prefect import task
from prefect.cache_policies import TASK_SOURCE, CacheKeyFnPolicy

import tagifai.batching
import tagifai.data
import tagifai.text_cleaning
from tagifai.batching import TokenizedData, tokenize_splits
from tagifai.data import Splits
from tasks.cache import key, module_source_digest, tokenizer_digest


def tokenize_key(context, parameters) -> str:
    """The split's data, the backbone's tokenizer files, max_length, the cleaning (tagifai/data.py,
    text_cleaning.py and its stop-word list) and tokenizing (tagifai/batching.py) code; not the
    training loop."""
    return key(
        "tokenize",
        parameters["data_key"],
        parameters["backbone"],
        tokenizer_digest(parameters["backbone"]),
        parameters["max_length"],
        module_source_digest(tagifai.data, tagifai.batching, tagifai.text_cleaning),
        hashlib.sha256(" ".join(sorted(tagifai.text_cleaning.STOP_WORDS)).encode()).hexdigest(),
    )


@task(name="tokenize", cache_policy=CacheKeyFnPolicy(cache_key_fn=tokenize_key) + TASK_SOURCE, persist_result=True)
def tokenize_data(splits: Splits, data_key: str, backbone: str, max_length: int) -> TokenizedData:
    return tokenize_splits(splits, backbone, max_length)
