"""Batch scoring (tagifai.serving.batch): every row once, in order, resumable, bad input refused
before any scoring. The model is a tiny keyword model logged as an MLflow Model (tests/scoring_model.py)."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pandas as pd
import pytest
from scoring_helpers import TEST_MODEL_NAME, make_rows, register_keyword_model, run_score

import tagifai.serving.batch as batch
from tagifai.errors import UserError
from tagifai.serving.batch_io import MANIFEST, SUCCESS
from tagifai.settings import ScoreSettings

MODEL_URI = f"models:/{TEST_MODEL_NAME}@champion"


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> str:
    """A SQLite MLflow store holding the keyword model as version 1, alias champion."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"
    register_keyword_model(uri)
    return uri


def settings(tmp_path: Path, input_loc, output: str = "out.parquet", **options) -> ScoreSettings:
    return ScoreSettings(input=str(input_loc), output=str(tmp_path / output), model_uri=MODEL_URI, **options)


def score(registry: str, options: ScoreSettings, lines: list | None = None) -> dict:
    return batch.score_batch(options, registry, (lines if lines is not None else []).append)


def expected_scores(registry: str, rows: pd.DataFrame) -> pd.DataFrame:
    """The model's own predictions for `rows`, in one call."""
    model = batch.load_model(MODEL_URI, registry)
    return model.predict(rows[["title", "description"]].fillna("")).reset_index(drop=True)


def test_every_row_once_in_input_order_with_kept_columns_and_the_version(registry, tmp_path):
    rows = make_rows(2500, seed=1)
    rows.to_csv(tmp_path / "in.csv", index=False)
    lines: list[str] = []
    summary = score(registry, settings(tmp_path, tmp_path / "in.csv", keep_columns="source", chunk_rows=1000,
                                       batch_rows=64), lines)  # fmt: skip
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert list(out["id"]) == list(rows["id"]) and list(out["source"]) == list(rows["source"])
    expected = expected_scores(registry, rows)
    assert list(out.columns[2:]) == [*expected.columns, "model_version"]
    pd.testing.assert_frame_equal(out[expected.columns].reset_index(drop=True), expected, check_dtype=False)
    assert set(out["model_version"]) == {"1"}
    assert summary["rows_read"] == summary["rows_scored"] == 2500 and summary["rows_rejected"] == 0
    assert summary["chunks"] == 3 and summary["output"] == str(tmp_path / "out.parquet")
    # progress: one line per chunk with rows done/total, rows/s and time left
    progress = [line for line in lines if line.startswith("scored ")]
    assert len(progress) == 3 and progress[-1].startswith("scored 2,500/2,500 rows (100%)"), lines
    assert all("rows/s" in line and "left" in line for line in progress)
    assert not (tmp_path / ".out.parquet.parts").exists()  # the parts folder goes once the file is whole


def test_a_folder_of_parquet_and_csv_parts_in_name_order_to_csv_and_to_a_folder(registry, tmp_path):
    rows = make_rows(900, seed=2)
    (tmp_path / "in").mkdir()
    rows.iloc[:400].to_parquet(tmp_path / "in" / "a.parquet")
    rows.iloc[400:].to_csv(tmp_path / "in" / "b.csv", index=False)
    (tmp_path / "in" / "_SUCCESS").write_text("")  # markers and hidden files are not data
    score(registry, settings(tmp_path, tmp_path / "in", "out.csv", chunk_rows=256))
    score(registry, settings(tmp_path, tmp_path / "in", "out_parts", chunk_rows=256))
    as_csv = pd.read_csv(tmp_path / "out.csv")
    as_parts = pd.read_parquet(tmp_path / "out_parts")
    assert sorted(p.name for p in (tmp_path / "out_parts").iterdir()) == sorted(
        [MANIFEST, SUCCESS, *(f"part-{i:06d}.parquet" for i in range(4))]
    )
    assert list(as_csv["id"]) == list(rows["id"]) == list(as_parts["id"])
    pd.testing.assert_frame_equal(as_csv.drop(columns="model_version"), as_parts.drop(columns="model_version"),
                                  check_dtype=False)  # fmt: skip


def test_rows_with_no_text_are_rejected_in_place_and_listed(registry, tmp_path):
    rows = pd.DataFrame({
        "id": [1, 2, 3, 4, 5, 6],
        "title": ["an image model", "", None, "   ", None, "text"],
        "description": ["", "", None, "\t", "pipeline to deploy", None],
    })  # fmt: skip
    rows.to_parquet(tmp_path / "in.parquet")
    summary = score(registry, settings(tmp_path, tmp_path / "in.parquet", chunk_rows=4))
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert list(out["id"]) == [1, 2, 3, 4, 5, 6]
    rejected = out["prediction"].isna()
    assert list(out.loc[rejected, "id"]) == [2, 3, 4] == summary["rejected_ids"]
    assert out.loc[rejected, "probability_mlops"].isna().all()
    assert list(out.loc[~rejected, "prediction"]) == ["computer-vision", "mlops", "natural-language-processing"]
    assert summary["rows_scored"] == 3 and summary["rows_rejected"] == 3 and summary["rows_read"] == 6


def test_numbers_in_text_columns_are_scored_as_their_text(registry, tmp_path):
    pd.DataFrame({"id": ["a", "b"], "title": [7, 8], "description": [1.5, None]}).to_parquet(tmp_path / "in.parquet")
    summary = score(registry, settings(tmp_path, tmp_path / "in.parquet"))
    assert summary["rows_scored"] == 2 and list(pd.read_parquet(tmp_path / "out.parquet")["id"]) == ["a", "b"]


class Interrupted(Exception):
    pass


def test_a_rerun_after_an_interruption_scores_only_the_missing_chunks(registry, tmp_path, monkeypatch):
    rows = make_rows(1000, seed=3)
    rows.to_csv(tmp_path / "in.csv", index=False)
    score(registry, settings(tmp_path, tmp_path / "in.csv", "whole.parquet", chunk_rows=100))

    def stop_after_three_chunks(line: str) -> None:
        if line.startswith("scored 300/"):
            raise Interrupted

    options = settings(tmp_path, tmp_path / "in.csv", chunk_rows=100)
    with pytest.raises(Interrupted):
        batch.score_batch(options, registry, stop_after_three_chunks)
    parts = tmp_path / ".out.parquet.parts"
    assert len(list(parts.glob("part-*.parquet"))) == 3 and not (tmp_path / "out.parquet").exists()
    (parts / ".part-000003.parquet.999.tmp").write_bytes(b"half a part")  # a write cut by the kill

    scored_rows = []
    real_score_table = batch.score_table
    monkeypatch.setattr(batch, "score_table", lambda model, table, *a: scored_rows.append(table.num_rows)
                        or real_score_table(model, table, *a))  # fmt: skip
    summary = score(registry, options)
    assert sum(scored_rows) == 700 and summary["chunks_resumed"] == 3 and summary["rows_scored_this_run"] == 700
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "out.parquet"), pd.read_parquet(tmp_path / "whole.parquet")
    )
    assert not parts.exists()


def test_a_resumed_run_keeps_the_version_that_scored_its_first_parts(registry, tmp_path):
    """The alias moving between the kill and the rerun must not mix two versions in one output."""
    rows = make_rows(300, seed=4)
    rows.to_csv(tmp_path / "in.csv", index=False)
    options = settings(tmp_path, tmp_path / "in.csv", "parts", chunk_rows=100)

    def stop_after_one_chunk(line: str) -> None:
        if line.startswith("scored 100/"):
            raise Interrupted

    with pytest.raises(Interrupted):
        batch.score_batch(options, registry, stop_after_one_chunk)
    new_version = register_keyword_model(registry)  # now the champion
    lines: list[str] = []
    summary = score(registry, options, lines)
    assert summary["model_version"] == "1" != new_version
    assert set(pd.read_parquet(tmp_path / "parts")["model_version"]) == {"1"}
    assert any(line.startswith("resuming with version 1") for line in lines), lines
    # a fresh run follows the alias
    assert score(registry, settings(tmp_path, tmp_path / "in.csv", "fresh.parquet"))["model_version"] == new_version
    from mlflow.tracking import MlflowClient

    MlflowClient(registry).set_registered_model_alias(TEST_MODEL_NAME, "champion", "1")


def test_a_completed_output_is_refused_unless_overwrite(registry, tmp_path):
    make_rows(50).to_csv(tmp_path / "in.csv", index=False)
    score(registry, settings(tmp_path, tmp_path / "in.csv", "parts"))
    with pytest.raises(UserError, match="exists .* pass --overwrite"):
        score(registry, settings(tmp_path, tmp_path / "in.csv", "parts"))
    make_rows(60).to_csv(tmp_path / "in.csv", index=False)
    summary = score(registry, settings(tmp_path, tmp_path / "in.csv", "parts", overwrite=True))
    assert summary["rows_read"] == 60 and len(pd.read_parquet(tmp_path / "parts")) == 60


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_title", "has no 'title' column"),
        ("unreadable", "cannot read"),
        ("missing_file", "does not exist"),
        ("no_model", "is not in the registry"),
        ("output_exists", "exists"),
        ("foreign_folder", "exists and is not empty"),
    ],
)
def test_bad_input_is_refused_before_any_scoring(registry, tmp_path, monkeypatch, case, message):
    make_rows(20).to_csv(tmp_path / "in.csv", index=False)
    options = dict(input=str(tmp_path / "in.csv"), output=str(tmp_path / "out.parquet"), model_uri=MODEL_URI)
    if case == "no_title":
        make_rows(20).drop(columns="title").to_csv(tmp_path / "in.csv", index=False)
    elif case == "unreadable":
        (tmp_path / "in.parquet").write_bytes(b"PAR1 not really parquet")
        options["input"] = str(tmp_path / "in.parquet")
    elif case == "missing_file":
        options["input"] = str(tmp_path / "nope.csv")
    elif case == "no_model":
        options["model_uri"] = "models:/no-such-model@champion"
    elif case == "output_exists":
        (tmp_path / "out.parquet").write_text("someone's file")
    else:
        options["output"] = str(tmp_path / "folder")
        (tmp_path / "folder").mkdir()
        (tmp_path / "folder" / "notes.txt").write_text("not ours")
    monkeypatch.setattr(batch, "score_table", lambda *a: pytest.fail("scored despite bad input"))
    with pytest.raises(UserError, match=message) as raised:
        batch.score_batch(ScoreSettings(**options), registry, lambda line: None)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / ".out.parquet.parts").exists()


def test_an_http_url_input(registry, tmp_path):
    rows = make_rows(120, seed=5)
    (tmp_path / "site").mkdir()
    rows.to_csv(tmp_path / "site" / "rows.csv", index=False)
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path / "site"), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/rows.csv"
        summary = score(registry, settings(tmp_path, url, chunk_rows=50))
    finally:
        server.shutdown()
    assert summary["rows_scored"] == 120 and list(pd.read_parquet(tmp_path / "out.parquet")["id"]) == list(rows["id"])


@pytest.mark.slow
def test_the_cli_scores_a_file_and_says_what_is_wrong_in_one_line(registry, tmp_path):
    rows = make_rows(3000, seed=6)
    rows.to_csv(tmp_path / "in.csv", index=False)
    common = ["--model-uri", MODEL_URI, "--tracking-uri", registry]
    done = run_score(tmp_path, "--input", str(tmp_path / "in.csv"), "--output", str(tmp_path / "out.parquet"),
                     "--results-fp", str(tmp_path / "r.json"), "--json", *common)  # fmt: skip
    assert done.returncode == 0, done.output[-3000:]
    assert len(pd.read_parquet(tmp_path / "out.parquet")) == 3000
    assert '"rows_scored": 3000' in done.output and '"rows_scored": 3000' in (tmp_path / "r.json").read_text()
    again = run_score(tmp_path, "--input", str(tmp_path / "in.csv"), "--output", str(tmp_path / "out.parquet"), *common)
    assert again.returncode == 1
    errors = [line for line in again.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "pass --overwrite" in errors[0], again.output[-3000:]
    assert "Traceback" not in again.output


@pytest.mark.slow
def test_an_s3_folder_of_parts_as_the_storage_path_reaches_it(registry, tmp_path, monkeypatch):
    from services import seaweedfs

    rows = make_rows(700, seed=9)
    with seaweedfs(tmp_path / "weed") as server:
        for name, value in server.env.items():
            monkeypatch.setenv(name, value)
        bucket = server.create_bucket("listings")
        client = server.client()
        for index, start in enumerate(range(0, 700, 300)):
            rows.iloc[start : start + 300].to_parquet(tmp_path / "part.parquet")
            client.upload_file(str(tmp_path / "part.parquet"), bucket, f"daily/part-{index}.parquet")
        summary = score(registry, settings(tmp_path, f"s3://{bucket}/daily", chunk_rows=128))
    assert summary["rows_scored"] == 700
    assert list(pd.read_parquet(tmp_path / "out.parquet")["id"]) == list(rows["id"])


def test_a_run_that_died_while_assembling_the_file_completes_without_scoring(registry, tmp_path, monkeypatch):
    make_rows(500, seed=10).to_csv(tmp_path / "in.csv", index=False)
    options = settings(tmp_path, tmp_path / "in.csv", "out.csv", chunk_rows=200)
    monkeypatch.setattr(batch.OutputStore, "commit", lambda self, n, summary: (_ for _ in ()).throw(Interrupted))
    with pytest.raises(Interrupted):
        score(registry, options)
    monkeypatch.undo()
    (tmp_path / ".out.csv.4242.tmp").write_text("id,prediction\n1,half")  # the assembly the kill cut short
    assert not (tmp_path / "out.csv").exists()
    summary = score(registry, options)
    assert summary["chunks_resumed"] == 3 and summary["rows_scored_this_run"] == 0 and summary["rows_scored"] == 500
    assert len(pd.read_csv(tmp_path / "out.csv")) == 500 and not list(tmp_path.glob(".out.csv*"))
