"""Errors whose message is the answer: what is wrong and what to do. The CLIs and the demo print
them without a traceback; anything else is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """Base of every error caused by input, configuration or environment, not by a bug."""


class DataError(UserError, ValueError):
    """The dataset cannot be used."""


class SourceUnavailableError(DataError):
    """A download failed in a way that may pass (timeout, 5xx): worth retrying."""


class ModelError(UserError, ValueError):
    """A backbone or checkpoint cannot be used."""


class TrackingError(UserError, RuntimeError):
    """The MLflow store cannot be used."""


class ResourceError(UserError, RuntimeError):
    """A trial asks for more than the Ray cluster has: it would stay PENDING forever."""


class StorageError(UserError, RuntimeError):
    """The --storage-path cannot be used (object store unreachable, bucket missing, credentials refused)."""
