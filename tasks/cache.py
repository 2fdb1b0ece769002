"""Pieces of the cache keys: a digest of the code that computes a result.

Prefect's TASK_SOURCE hashes only the decorated function's own lines. A cached step also depends
on the library code it calls (cleaning, splitting, tokenizing), so each key adds the source of
those modules, read from disk: an edit to them is a cache miss, with no version number to bump.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from types import ModuleType


def module_source_digest(*modules: ModuleType) -> str:
    """sha256 over the source files of `modules`."""
    digest = hashlib.sha256()
    for module in sorted(modules, key=lambda m: m.__name__):
        digest.update(module.__name__.encode())
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def tokenizer_digest(backbone: str) -> str:
    """sha256 over the tokenizer's own files (vocabulary, merges, settings), as transformers writes
    them, so that a hub id and a local folder are treated alike."""
    from tagifai.model import load_tokenizer

    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory(prefix="tagifai-tokenizer-") as folder:
        load_tokenizer(backbone).save_pretrained(folder)
        for path in sorted(Path(folder).iterdir()):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def key(*parts: object) -> str:
    """One short key from the parts that decide a result."""
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()
