"""The text cleaning every model input goes through: in training, evaluation, prediction, and inside
the registered MLflow Model, which carries this file as its code.

So it imports nothing of the project: a model loaded where this project is not installed cleans
text exactly as the model was trained on. The stop words are scikit-learn's English list; a
registered model carries that list beside this file (stop_words.txt, written when the model is
logged), so that loading it needs no scikit-learn.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

MAX_TEXT_CHARS = 10_000  # longer texts are cut before cleaning; the tokenizer truncates anyway
STOP_WORDS_FILE = "stop_words.txt"  # beside this file in a registered model's code folder

_LINK = re.compile(r"https?://\S+|www\.\S+")
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def _stop_words() -> frozenset[str]:
    carried = Path(__file__).with_name(STOP_WORDS_FILE)
    if carried.exists():  # inside a registered model
        return frozenset(carried.read_text(encoding="utf-8").split())
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


STOP_WORDS = _stop_words()


def clean_text(text: str) -> str:
    """Lower-case, drop links, punctuation, stop words and extra spaces."""
    text = text[:MAX_TEXT_CHARS].lower()
    text = _LINK.sub(" ", text)
    text = _NON_ALNUM.sub(" ", text)
    return " ".join(word for word in text.split() if word not in STOP_WORDS)


def project_texts(titles: Iterable[str], descriptions: Iterable[str]) -> list[str]:
    """The model's input: title and description joined, then cleaned."""
    return [clean_text(f"{title} {description}") for title, description in zip(titles, descriptions)]
