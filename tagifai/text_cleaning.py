"""The text cleaning every model input goes through: in training, evaluation, prediction, and inside
the registered MLflow Model, which carries this file (and stop_words.txt beside it) as its code.

So it imports nothing of the project and nothing beyond the standard library: a model loaded where
this project is not installed cleans text exactly as the model was trained on. The stop words are
scikit-learn's English list (ENGLISH_STOP_WORDS), stored as data so that loading needs no
scikit-learn; tests/test_data.py checks that the two lists are the same.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

MAX_TEXT_CHARS = 10_000  # longer texts are cut before cleaning; the tokenizer truncates anyway
STOP_WORDS_FILE = Path(__file__).with_name("stop_words.txt")

_LINK = re.compile(r"https?://\S+|www\.\S+")
_NON_ALNUM = re.compile(r"[^a-z0-9]+")
STOP_WORDS = frozenset(STOP_WORDS_FILE.read_text(encoding="utf-8").split())


def clean_text(text: str) -> str:
    """Lower-case, drop links, punctuation, stop words and extra spaces."""
    text = text[:MAX_TEXT_CHARS].lower()
    text = _LINK.sub(" ", text)
    text = _NON_ALNUM.sub(" ", text)
    return " ".join(word for word in text.split() if word not in STOP_WORDS)


def project_texts(titles: Iterable[str], descriptions: Iterable[str]) -> list[str]:
    """The model's input: title and description joined, then cleaned."""
    return [clean_text(f"{title} {description}") for title, description in zip(titles, descriptions)]
