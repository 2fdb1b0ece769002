"""Prefect task: load and validate a dataset (file or URL), cached on the bytes it reads."""

from __future__ import annotations

import uuid
from typing import Optional

from prefect import task
from prefect.cache_policies import TASK_SOURCE, CacheKeyFnPolicy

import tagifai.data
from tagifai.data import LoadedData, load_dataset, source_fingerprint
from tagifai.errors import DataError, SourceUnavailableError
from tasks.cache import key, module_source_digest
from tasks.retries import raised


def load_key(context, parameters) -> str:
    """The data's content (a URL is fetched, revalidated with its ETag where the server gives one),
    whether labels are required, and the parsing and validation code."""
    try:
        content = source_fingerprint(parameters.get("loc"))
    except DataError:
        # Unreadable now: the task itself retries or reports why. A key no other run can have
        # makes sure nothing cached earlier is served in its place.
        return f"unreadable-{uuid.uuid4()}"
    return key("load", content, parameters.get("labelled", True), module_source_digest(tagifai.data))


def retry_if_transient(task, task_run, state) -> bool:
    """Only a source that did not answer is tried again; bad data would fail the same way."""
    return isinstance(raised(state), SourceUnavailableError)


@task(
    name="load-dataset",
    retries=2,
    retry_delay_seconds=[3, 10],
    retry_condition_fn=retry_if_transient,
    cache_policy=CacheKeyFnPolicy(cache_key_fn=load_key) + TASK_SOURCE,
    persist_result=True,
)
def load_data(loc: Optional[str], labelled: bool = True) -> LoadedData:
    return load_dataset(loc, labelled=labelled)
