"""Loading, validation, cleaning and splitting of project listings."""

from __future__ import annotations

import pandas as pd
import pytest

from tagifai.data import (
    check_trainable,
    clean_text,
    load_dataset,
    parse_table,
    sample_dataset_path,
    split_dataset,
    validate_dataset,
)
from tagifai.errors import DataError

TAGS = ["computer-vision", "mlops", "natural-language-processing", "other"]


def make_frame(rows_per_tag: int = 20) -> pd.DataFrame:
    rows = []
    for t, tag in enumerate(TAGS):
        for i in range(rows_per_tag):
            rows.append(
                {
                    "id": str(t * 1000 + i),
                    "created_on": "2020-01-01 00:00:00",
                    "title": f"{tag} project {i}",
                    "description": f"A {tag} description number {i}",
                    "tag": tag,
                }
            )
    return pd.DataFrame(rows)


def test_clean_text_lowercases_and_strips_links_punctuation_and_stop_words():
    text = "The BEST Transformers!!  See https://example.com/x?y=1 and www.foo.org, for   NLP."
    assert clean_text(text) == "best transformers nlp"


def test_clean_text_keeps_numbers_and_handles_empty():
    assert clean_text("YOLOv5 in 2021") == "yolov5 2021"
    assert clean_text("") == ""


def test_a_registered_model_carries_scikit_learns_stop_words(tmp_path):
    """A served model reads its stop words from the list logged beside its cleaning code (so it needs
    no scikit-learn); that list must be exactly the one the project trains with."""
    import importlib.util
    import shutil

    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    from tagifai.serving.packaging import write_code

    code = tmp_path / "code"
    cleaning, stop_words = write_code(code)
    assert stop_words == str(code / "stop_words.txt")
    shutil.copy(cleaning, code / "text_cleaning.py")  # as MLflow lays out the model's code folder
    spec = importlib.util.spec_from_file_location("carried_cleaning", code / "text_cleaning.py")
    carried = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(carried)
    assert carried.STOP_WORDS == frozenset(ENGLISH_STOP_WORDS)


def test_cleaning_module_imports_nothing_of_the_project():
    """The registered MLflow Model carries tagifai/text_cleaning.py as its own code."""
    import ast

    import tagifai.text_cleaning

    tree = ast.parse(open(tagifai.text_cleaning.__file__).read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    # scikit-learn only where no stop-word list is carried beside the file (in the project itself)
    assert imported <= {"__future__", "re", "collections.abc", "pathlib", "sklearn.feature_extraction.text"}


def test_bundled_sample_dataset_is_valid_and_large_enough():
    data = load_dataset(None)
    frame = data.frame
    assert data.source == str(sample_dataset_path())
    assert len(frame) >= 240
    assert set(frame["tag"]) == set(TAGS)
    assert frame["id"].is_unique
    assert len(data.fingerprint) == 64


def test_missing_column_is_named():
    frame = make_frame().drop(columns=["tag"])
    with pytest.raises(DataError, match="missing required column.*tag"):
        validate_dataset(frame, "x.csv")


def test_validation_drops_rows_without_text_and_duplicates():
    frame = make_frame(5)
    extra = pd.DataFrame(
        [
            {"id": "9001", "created_on": "", "title": "", "description": "", "tag": "mlops"},
            {**frame.iloc[0].to_dict(), "id": "9002"},  # same content, new id: a duplicate
        ]
    )
    cleaned = validate_dataset(pd.concat([frame, extra]), "x.csv")
    assert len(cleaned) == len(frame)


def test_unreadable_inputs_get_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(str(tmp_path / "nope.csv"))
    with pytest.raises(DataError, match="empty"):
        parse_table(b"", "empty.csv")
    with pytest.raises(DataError, match="not UTF-8"):
        parse_table("id,title\n1,caf\xe9\n".encode("latin-1"), "latin1.csv")


def test_one_tag_or_rare_tags_cannot_be_trained():
    frame = make_frame(10)
    with pytest.raises(DataError, match="only one tag"):
        check_trainable(frame[frame["tag"] == "mlops"], "x.csv")
    rare = pd.concat([frame[frame["tag"] != "other"], frame[frame["tag"] == "other"].head(2)])
    with pytest.raises(DataError, match="'other' \\(2\\)"):
        check_trainable(rare, "x.csv")


def test_split_is_stratified_disjoint_and_deterministic():
    frame = make_frame(25)
    first = split_dataset(frame, seed=1234)
    second = split_dataset(frame, seed=1234)
    other_seed = split_dataset(frame, seed=7)
    assert list(first.train["id"]) == list(second.train["id"])
    assert list(first.train["id"]) != list(other_seed.train["id"])
    ids = [set(s["id"]) for s in (first.train, first.val, first.test)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert sum(map(len, ids)) == len(frame)
    assert len(first.test) == 20  # 20% of 100
    for split in (first.train, first.val, first.test):
        counts = split["tag"].value_counts()
        assert counts.max() - counts.min() <= 1  # balanced input stays balanced
    assert first.class_to_index == {tag: i for i, tag in enumerate(TAGS)}


def test_holdout_is_used_as_test_and_unknown_holdout_tags_are_rejected():
    frame, holdout = make_frame(20), make_frame(3)
    splits = split_dataset(frame, holdout=holdout)
    assert len(splits.test) == len(holdout)
    assert len(splits.train) + len(splits.val) == len(frame)
    bad = holdout.assign(tag="robotics")
    with pytest.raises(DataError, match="robotics"):
        split_dataset(frame, holdout=bad)


def test_num_samples_subsamples_before_splitting():
    splits = split_dataset(make_frame(25), num_samples=60)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 60
