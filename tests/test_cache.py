"""Cached steps never serve a result computed from other data or other code.

A loopback HTTP server stands in for a dataset URL: it answers with an ETag (or a Last-Modified)
and honours conditional requests, and counts what it sent, so the tests see when the flow
revalidated, re-downloaded or reused.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.server
import shutil
import threading
import time
from collections import Counter

import pandas as pd
import pytest

import tagifai.data
from conftest import tiny_settings
from tagifai.data import download, sample_dataset_path
from tasks.load import load_key


class DatasetServer:
    """Serves `content` at /data.csv with the validators chosen; counts responses by status."""

    def __init__(self, content: bytes, etag: bool = True, last_modified_age_s: float | None = None):
        self.content, self.etag, self.last_modified_age_s = content, etag, last_modified_age_s
        self.modified_at = time.time()
        self.answers: Counter = Counter()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                tag = '"' + hashlib.sha256(server.content).hexdigest()[:16] + '"'
                modified = email.utils.formatdate(server.modified_at - (server.last_modified_age_s or 0), usegmt=True)
                if server.etag and self.headers.get("If-None-Match") == tag:
                    return self._answer(304)
                if server.last_modified_age_s is not None and self.headers.get("If-Modified-Since") == modified:
                    return self._answer(304)
                headers = {"ETag": tag} if server.etag else {}
                if server.last_modified_age_s is not None:
                    headers["Last-Modified"] = modified
                self._answer(200, headers, server.content)

            def _answer(self, status, headers=None, body=b""):
                server.answers[status] += 1
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}/data.csv"

    def replace(self, content: bytes) -> None:
        self.content, self.modified_at = content, time.time()

    def close(self) -> None:
        self._http.shutdown()


def usable_rows(content: bytes) -> int:
    """Rows left after validation (the sample has a few rows that differ only by id)."""
    return len(tagifai.data.validate_dataset(tagifai.data.parse_table(content, "data.csv"), "data.csv"))


def sample_rows(count: int) -> bytes:
    frame = pd.read_csv(sample_dataset_path())
    return frame.groupby("tag", group_keys=False).head(count // 4).to_csv(index=False).encode()


@pytest.fixture
def server():
    served = DatasetServer(sample_rows(240))
    yield served
    served.close()


def test_an_unchanged_url_is_revalidated_not_downloaded_again(server, tmp_path):
    first = download(server.url, tmp_path)
    again = download(server.url, tmp_path)
    assert first == again == server.content
    assert server.answers == {200: 1, 304: 1}  # the second request was conditional, answered "not modified"
    server.replace(sample_rows(200))
    assert download(server.url, tmp_path) == server.content
    assert server.answers == {200: 2, 304: 1}


def test_a_recent_last_modified_is_not_trusted_to_revalidate(tmp_path):
    """A file replaced within the same second keeps its Last-Modified: such a date is never sent back."""
    recent = DatasetServer(sample_rows(240), etag=False, last_modified_age_s=0)
    old = DatasetServer(sample_rows(240), etag=False, last_modified_age_s=3600)
    try:
        for _ in range(2):
            download(recent.url, tmp_path)
            download(old.url, tmp_path)
        assert recent.answers == {200: 2}
        assert old.answers == {200: 1, 304: 1}
        recent.replace(sample_rows(200))  # same second, same Last-Modified: still read anew
        assert download(recent.url, tmp_path) == recent.content
    finally:
        recent.close()
        old.close()


def test_a_damaged_cached_copy_is_downloaded_again(server, tmp_path):
    download(server.url, tmp_path)
    [body] = tmp_path.glob("*.body")
    body.write_bytes(b"id,title\n")
    assert download(server.url, tmp_path) == server.content
    assert server.answers == {200: 2, 304: 1}


def test_load_key_follows_the_content_behind_a_url(server):
    parameters = {"loc": server.url, "labelled": True}
    first = load_key(None, parameters)
    assert load_key(None, parameters) == first
    server.replace(sample_rows(200))
    assert load_key(None, parameters) != first
    assert load_key(None, {"loc": server.url, "labelled": False}) != load_key(None, parameters)


@pytest.mark.slow  # tuning runs in a row
def test_changed_data_behind_the_same_url_is_trained_on(server, tmp_path, tiny_backbone, shared_ray):
    """The scenario of a scheduled re-tune: same URL, new bytes."""
    from flows.tune import tune_classifier

    settings = tiny_settings(tmp_path, tiny_backbone, dataset_loc=server.url, num_runs=1, num_epochs=1)
    first = tune_classifier(settings)
    assert first["cached"] == {"load": False, "split": False, "tokenize": False}
    assert first["data"]["rows"] == usable_rows(server.content)

    server.replace(sample_rows(300))  # up to 75 rows per tag instead of 60
    second = tune_classifier(settings)
    assert second["cached"] == {"load": False, "split": False, "tokenize": False}
    assert second["data"]["rows"] == usable_rows(server.content) > first["data"]["rows"]


@pytest.mark.slow  # tuning runs in a row
def test_edited_cleaning_code_misses_the_tokenize_cache(tmp_path, tiny_backbone, monkeypatch, shared_ray):
    """The same data twice; between the runs the cleaning in tagifai/text_cleaning.py is edited
    (title only). The edit is made in a copy of the module's source, which the cache keys read, and
    the running code follows it, as it would after editing the file and starting a new process.
    Loading and splitting do not clean text, so they stay cached."""
    import tagifai.text_cleaning
    from flows.tune import tune_classifier

    dataset = tmp_path / "projects.csv"
    pd.read_csv(sample_dataset_path()).sample(frac=1.0, random_state=7).to_csv(dataset, index=False)
    settings = tiny_settings(tmp_path, tiny_backbone, dataset_loc=str(dataset), num_runs=1, num_epochs=1)
    tune_classifier(settings)
    again = tune_classifier(settings)
    assert again["cached"] == {"load": True, "split": True, "tokenize": True}  # nothing changed: all reused

    edited = tmp_path / "text_cleaning.py"
    shutil.copy(tagifai.text_cleaning.__file__, edited)
    source = edited.read_text()
    original_line = (
        '    return [clean_text(f"{title} {description}") for title, description in zip(titles, descriptions)]'
    )
    assert original_line in source
    edited.write_text(source.replace(original_line, "    return [clean_text(title) for title in titles]"))
    monkeypatch.setattr(tagifai.text_cleaning, "__file__", str(edited))
    monkeypatch.setattr(
        tagifai.text_cleaning,
        "project_texts",
        lambda titles, descriptions: [tagifai.text_cleaning.clean_text(t) for t in titles],
    )

    edited_run = tune_classifier(settings)
    assert edited_run["cached"] == {"load": True, "split": True, "tokenize": False}
