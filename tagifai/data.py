"""Load, validate, clean and split the project listings.

Every function here is plain Python: tasks/ wraps them in Prefect tasks, tests call them as is.
Errors are `DataError`s whose message names the problem and what to do about it. URLs are
downloaded through a small on-disk cache revalidated with the server's ETag (or an old enough
Last-Modified), so an unchanged remote file costs one 304 answer, and a changed one is read anew.
"""

from __future__ import annotations

import email.utils
import hashlib
import io
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

import pandas as pd
from sklearn.model_selection import train_test_split

from tagifai.errors import DataError, SourceUnavailableError
from tagifai.settings import DEFAULT_SEED, user_cache_dir
from tagifai.text_cleaning import MAX_TEXT_CHARS, clean_text, project_texts  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("id", "created_on", "title", "description", "tag")
TEXT_COLUMNS = ("title", "description")
MIN_ROWS_PER_TAG = 5  # below this a tag cannot land in train, validation and test alike
URL_TIMEOUT_S = 30


@dataclass(frozen=True)
class LoadedData:
    frame: pd.DataFrame
    fingerprint: str  # sha256 of the raw bytes: a cache key that changes when the data does
    source: str


def sample_dataset_path() -> Path:
    """The sample dataset bundled with the package (original text written for this project)."""
    return Path(str(resources.files("tagifai").joinpath("sample_projects.csv")))


def is_url(loc: str) -> bool:
    return loc.startswith(("http://", "https://"))


def download_dir() -> Path:
    """Where downloaded datasets are kept for revalidation: $XDG_CACHE_HOME/tagifai/downloads."""
    return user_cache_dir() / "downloads"


def _write_atomically(path: Path, content: bytes) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        handle.write(content)
    os.replace(handle.name, path)


def _validators(response_headers) -> dict:
    """The response's validators that are safe to revalidate with. An ETag always is. A
    Last-Modified within a minute of the response's Date is not: a file replaced in the same
    second keeps the same timestamp, so the server would answer "not modified" for new bytes."""
    validators = {}
    if response_headers.get("ETag"):
        validators["etag"] = response_headers["ETag"]
    modified, date = response_headers.get("Last-Modified"), response_headers.get("Date")
    if modified and date:
        try:
            age_s = (
                email.utils.parsedate_to_datetime(date) - email.utils.parsedate_to_datetime(modified)
            ).total_seconds()
        except (TypeError, ValueError):
            age_s = 0
        if age_s >= 60:
            validators["last_modified"] = modified
    return validators


def download(url: str, folder: Optional[Path] = None) -> bytes:
    """The bytes behind `url`, revalidated against a cached copy when the server offers validators."""
    folder = folder or download_dir()
    name = hashlib.sha256(url.encode()).hexdigest()[:32]
    body_path, meta_path = folder / f"{name}.body", folder / f"{name}.json"
    cached: dict = {}
    if meta_path.exists() and body_path.exists():
        try:
            cached = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            cached = {}
    headers = {}
    if cached.get("etag"):
        headers["If-None-Match"] = cached["etag"]
    if cached.get("last_modified"):
        headers["If-Modified-Since"] = cached["last_modified"]
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=URL_TIMEOUT_S) as response:
            body, validators = response.read(), _validators(response.headers)
    except urllib.error.HTTPError as error:
        if error.code == 304 and cached:
            body = body_path.read_bytes()
            if hashlib.sha256(body).hexdigest() == cached.get("sha256"):
                return body
            meta_path.unlink(missing_ok=True)  # the cached copy is damaged: fetch it whole
            return download(url, folder)
        kind = SourceUnavailableError if error.code >= 500 else DataError
        raise kind(f"could not download {url}: HTTP {error.code} {error.reason}; check the URL") from None
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise SourceUnavailableError(
            f"could not download {url}: {reason}; check the network or pass a local file with --dataset-loc"
        ) from None
    if validators:
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(body_path, body)
        _write_atomically(
            meta_path, json.dumps({**validators, "sha256": hashlib.sha256(body).hexdigest(), "url": url}).encode()
        )
    return body


def read_source_bytes(loc: str) -> bytes:
    """The raw bytes of a local file or an http(s) URL."""
    if is_url(loc):
        return download(loc)
    path = Path(loc).expanduser()
    if not path.exists():
        raise DataError(f"dataset file not found: {path}; pass an existing CSV/Parquet path or an http(s) URL")
    if path.is_dir():
        raise DataError(f"{path} is a folder; pass the CSV/Parquet file inside it")
    return path.read_bytes()


def source_fingerprint(loc: Optional[str]) -> str:
    """sha256 of the data's bytes (the bundled sample when `loc` is None), for files and URLs alike."""
    return hashlib.sha256(read_source_bytes(str(loc) if loc else str(sample_dataset_path()))).hexdigest()


def parse_table(raw: bytes, loc: str) -> pd.DataFrame:
    """Parse CSV (or Parquet, by extension or magic bytes) into a DataFrame of strings."""
    if not raw.strip():
        raise DataError(f"{loc} is empty; it needs a header row ({', '.join(REQUIRED_COLUMNS)}) and data rows")
    if raw[:4] == b"PAR1" or loc.lower().endswith(".parquet"):
        try:
            return pd.read_parquet(io.BytesIO(raw))
        except Exception as error:  # pyarrow raises several types for a bad file
            raise DataError(f"{loc} is not a readable Parquet file: {error}") from None
    if b"\x00" in raw[:4096]:
        raise DataError(f"{loc} looks like a binary file, not a CSV; pass a UTF-8 CSV or a Parquet file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{loc} is not UTF-8 (bad byte at offset {error.start}); re-save it as UTF-8 CSV") from None
    try:
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.ParserError as error:
        raise DataError(f"{loc} is not a well-formed CSV: {error}") from None


def validate_dataset(frame: pd.DataFrame, loc: str, labelled: bool = True) -> pd.DataFrame:
    """Check columns and rows; drop rows without text and exact duplicates, with a warning.

    Rows with neither title nor description carry no signal, and duplicates would leak between
    train and test splits, so both are dropped rather than rejected: real listings have a few.
    """
    required = REQUIRED_COLUMNS if labelled else TEXT_COLUMNS
    missing = [column for column in required if column not in frame.columns]
    if missing:
        found = ", ".join(map(str, frame.columns[:8]))
        hint = " (is it ';'- or tab-separated? use commas)" if len(frame.columns) == 1 else ""
        raise DataError(
            f"{loc} is missing required column(s) {', '.join(missing)}; found: {found}{hint}. "
            f"Expected header: {','.join(required)}"
        )
    if frame.empty:
        raise DataError(f"{loc} has a header but no data rows")
    frame = frame.copy()
    for column in required:
        frame[column] = frame[column].fillna("").astype(str).str.strip()

    no_text = (frame["title"] == "") & (frame["description"] == "")
    if no_text.any():
        logger.warning("dropping %d row(s) of %s with empty title and description", int(no_text.sum()), loc)
        frame = frame[~no_text]
    if labelled:
        no_tag = frame["tag"] == ""
        if no_tag.any():
            logger.warning("dropping %d row(s) of %s with an empty tag", int(no_tag.sum()), loc)
            frame = frame[~no_tag]
    duplicated = frame.duplicated(subset=[c for c in required if c != "id"], keep="first")
    if duplicated.any():
        logger.warning("dropping %d duplicate row(s) of %s", int(duplicated.sum()), loc)
        frame = frame[~duplicated]
    if frame.empty:
        raise DataError(f"{loc} has no usable rows (every row lacks text or a tag)")
    return frame.reset_index(drop=True)


def check_trainable(frame: pd.DataFrame, loc: str) -> None:
    """A stratified three-way split needs at least two tags and a few rows of each."""
    counts = frame["tag"].value_counts()
    if len(counts) < 2:
        raise DataError(f"{loc} has only one tag ({counts.index[0]!r}); a classifier needs at least two")
    rare = counts[counts < MIN_ROWS_PER_TAG]
    if not rare.empty:
        listed = ", ".join(f"{tag!r} ({n})" for tag, n in rare.items())
        raise DataError(
            f"{loc}: tag(s) {listed} have fewer than {MIN_ROWS_PER_TAG} rows, too few to stratify; "
            "add examples or merge them into 'other'"
        )


def load_dataset(loc: str | None, labelled: bool = True) -> LoadedData:
    """Read and validate a dataset from a path or URL (default: the bundled sample)."""
    loc = str(loc) if loc else str(sample_dataset_path())
    raw = read_source_bytes(loc)
    frame = validate_dataset(parse_table(raw, loc), loc, labelled=labelled)
    return LoadedData(frame=frame, fingerprint=hashlib.sha256(raw).hexdigest(), source=loc)


@dataclass(frozen=True)
class Splits:
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    class_to_index: dict[str, int]


def split_dataset(
    frame: pd.DataFrame,
    holdout: pd.DataFrame | None = None,
    test_size: float = 0.2,
    seed: int = DEFAULT_SEED,
    num_samples: int | None = None,
) -> Splits:
    """Stratified train/validation split; the test split is `holdout` or carved out the same way."""
    if num_samples is not None and num_samples < len(frame):
        frame = frame.sample(n=num_samples, random_state=seed)
    check_trainable(frame, "dataset" if num_samples is None else f"dataset (first {num_samples} shuffled rows)")
    if holdout is None:
        frame, test = train_test_split(frame, test_size=test_size, stratify=frame["tag"], random_state=seed)
    else:
        test = holdout
    train, val = train_test_split(frame, test_size=test_size, stratify=frame["tag"], random_state=seed)
    class_to_index = {tag: index for index, tag in enumerate(sorted(train["tag"].unique()))}
    unseen = sorted(set(test["tag"]) - set(class_to_index))
    if unseen:
        raise DataError(
            f"the test data has tag(s) {unseen} that the training data lacks; "
            f"known tags: {sorted(class_to_index)}. Relabel them or add training examples"
        )
    return Splits(
        train=train.reset_index(drop=True),
        val=val.reset_index(drop=True),
        test=test.reset_index(drop=True),
        class_to_index=class_to_index,
    )
