"""The Gradio demo: the champion model from MLflow, single and CSV predictions, and where it came from.

    python -m demo.app [--run-id RUN] [--experiment-name tagifai] [--model-name tagifai]
                       [--tracking-uri URI] [--reload-interval 60] [--host 127.0.0.1] [--port 7860]

Serves the run given by --run-id (never reloaded), else the registered model's `champion` alias
(checked every --reload-interval seconds; a new champion is loaded in the background and swapped in
without failing a request), else the experiment's best run. The Experiment tab shows the served
run's tuning session. The page works offline (system fonts, no CDN).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import gradio as gr
import numpy as np
import pandas as pd
import torch

from demo.experiment import experiment_tab
from demo.micro_batch import MicroBatcher
from demo.serving import ModelHolder, holder_for
from flows.cli import parse_settings
from tagifai.data import TEXT_COLUMNS, parse_table
from tagifai.errors import DataError, UserError
from tagifai.lifecycle.database import redact
from tagifai.serving.loader import LoadedModel
from tagifai.serving.predictor import tag_probabilities, top_tags
from tagifai.settings import DEFAULT_MAX_SCORING_S, DemoSettings

MAX_FIELD_CHARS = 5_000  # far beyond the tokenizer's max_length; keeps huge pastes cheap
MAX_UPLOAD_SIZE = "5mb"
MAX_CSV_ROWS = 20_000
SCORING_CHUNK_ROWS = 256  # progress is reported after each chunk
# Concurrent predictions answered by one forward pass; Gradio runs at most 40 events at once
# (launch's max_threads), so this leaves some to CSV scoring and the page.
MAX_BATCH_ROWS = 32
SANS_FONTS = ["Segoe UI", "Roboto", "Helvetica Neue", "Arial", "DejaVu Sans", "sans-serif"]
MONO_FONTS = ["SFMono-Regular", "Menlo", "Consolas", "DejaVu Sans Mono", "monospace"]

EXAMPLES = [
    [
        "Counting Birds in Drone Footage",
        "Detect and track seabirds in aerial video of nesting colonies to estimate population size each season.",
    ],
    [
        "Rolling Back a Bad Model Release",
        "Shadow deployment, canary traffic and automatic rollback when live accuracy drifts below the last release.",
    ],
    [
        "Summarising Court Rulings",
        "Fine-tune a sequence-to-sequence transformer to write short plain-language summaries "
        "of long legal judgements.",
    ],
    [
        "A Visual Guide to Gradient Descent",
        "Interactive notebooks that animate optimisers on toy loss surfaces to build intuition for learning rates.",
    ],
]


def clip(text: Optional[str]) -> str:
    return (text or "")[:MAX_FIELD_CHARS].strip()


def checked_project(title: Optional[str], description: Optional[str]) -> tuple[str, str]:
    """The clipped title and description of one request, refused with a message when both are empty."""
    title, description = clip(title), clip(description)
    if not (title or description):
        raise gr.Error("Enter a title or a description (or both) to get a tag.", print_exception=False)
    return title, description


def batch_predictor(holder: ModelHolder) -> Callable[[list[tuple[str, str]]], list[dict[str, float]]]:
    """Tag probabilities of several projects in one forward pass, all on the model served when it starts;
    gr.Label shows each project's most likely tag on top."""

    def probabilities(projects: list[tuple[str, str]]) -> list[dict[str, float]]:
        predictor = holder.current.predictor  # one model for the whole batch, even if a new champion lands
        rows = predictor.predict_proba([t for t, _ in projects], [d for _, d in projects])
        return [tag_probabilities(row, predictor.classes) for row in rows]

    return probabilities


def read_upload(path: str) -> pd.DataFrame:
    """The uploaded table, checked for the text columns; other columns ride along untouched."""
    name = Path(path).name
    try:
        frame = parse_table(Path(path).read_bytes(), name)
    except DataError as error:
        raise gr.Error(f"{error}", print_exception=False) from None
    missing = [column for column in TEXT_COLUMNS if column not in frame.columns]
    if missing:
        found = ", ".join(map(str, frame.columns[:8])) or "nothing"
        raise gr.Error(
            f"{name} is missing the column(s) {', '.join(missing)}; found: {found}. "
            "Upload a CSV whose header row has title and description.",
            print_exception=False,
        )
    if frame.empty:
        raise gr.Error(f"{name} has a header but no data rows.", print_exception=False)
    if len(frame) > MAX_CSV_ROWS:
        raise gr.Error(
            f"{name} has {len(frame)} rows; split it into files of at most {MAX_CSV_ROWS}.", print_exception=False
        )
    return frame


def rows_per_second(predictor: LoadedModel) -> float:
    """Scoring speed measured on the examples (a warm-up, then a timed batch of 64 rows)."""
    titles, descriptions = [t for t, _ in EXAMPLES] * 16, [d for _, d in EXAMPLES] * 16
    predictor.predict_proba(titles[:8], descriptions[:8])
    started = time.perf_counter()
    predictor.predict_proba(titles, descriptions)
    return len(titles) / max(time.perf_counter() - started, 1e-6)


def score_frame(predictor: LoadedModel, frame: pd.DataFrame, on_progress=None) -> tuple[pd.DataFrame, int]:
    """The rows with `prediction` and one probability column per tag; rows without text stay blank.
    Scored in chunks; `on_progress(done, total)` after each."""
    frame = frame.reset_index(drop=True)
    titles = [clip(value) for value in frame["title"].fillna("").astype(str)]
    descriptions = [clip(value) for value in frame["description"].fillna("").astype(str)]
    rows = [i for i, (t, d) in enumerate(zip(titles, descriptions)) if t or d]
    probabilities = np.zeros((len(rows), len(predictor.classes)))
    for start in range(0, len(rows), SCORING_CHUNK_ROWS):
        chunk = rows[start : start + SCORING_CHUNK_ROWS]
        probabilities[start : start + len(chunk)] = predictor.predict_proba(
            [titles[i] for i in chunk], [descriptions[i] for i in chunk]
        )
        if on_progress:
            on_progress(start + len(chunk), len(rows))
    scored = frame.copy()
    scored["prediction"] = ""
    for tag in predictor.classes:
        scored[f"probability_{tag}"] = float("nan")
    if rows:
        scored.loc[rows, "prediction"] = top_tags(probabilities, predictor.classes)
        for column, tag in enumerate(predictor.classes):
            scored.loc[rows, f"probability_{tag}"] = probabilities[:, column]
    return scored, len(frame) - len(rows)


def offline_theme() -> gr.themes.Base:
    """Gradio's default look with system fonts only, so the page never asks a font CDN."""
    return gr.themes.Default(font=SANS_FONTS, font_mono=MONO_FONTS)


def launch_options() -> dict:
    """Options for `Blocks.launch` (Gradio 6 takes the theme there): offline theme, capped uploads, no share link."""
    return {"theme": offline_theme(), "max_file_size": MAX_UPLOAD_SIZE, "share": False}


def build_app(
    holder: ModelHolder, max_scoring_s: float = DEFAULT_MAX_SCORING_S, batcher: Optional[MicroBatcher] = None
) -> gr.Blocks:
    """The page. Named API endpoints: `predict` (title, description -> tag probabilities),
    `score_csv` (a CSV file -> the scored CSV) and `model_info` (what is served). Concurrent
    `predict` requests share forward passes through `batcher` (default: one of MAX_BATCH_ROWS)."""
    output_dir = Path(tempfile.mkdtemp(prefix="tagifai-scored-"))
    speed = {"version": None, "rows_per_s": None}
    batcher = batcher or MicroBatcher(batch_predictor(holder), MAX_BATCH_ROWS)

    # Not named `predict`: gr.Examples' run-on-click event takes its fn's name as API name, and would take
    # `/predict` from the button's event (whose concurrency limit then never applied to API callers).
    async def predict_tags(title: str, description: str) -> dict[str, float]:
        """Probability of every tag for one project (title and/or description)."""
        # Awaited on the event loop, not in a worker thread: waiting requests hold no thread.
        return await asyncio.wrap_future(batcher.submit(checked_project(title, description)))

    def score_csv(csv_path: Optional[str], progress=gr.Progress()) -> str:
        """A CSV of projects (title, description) scored: the same rows plus prediction and probabilities."""
        if not csv_path:
            raise gr.Error("Upload a CSV file with title and description columns first.", print_exception=False)
        served = holder.current  # one model for the whole file, even if the champion moves meanwhile
        frame = read_upload(csv_path)
        if speed["version"] != served.loaded_at:
            speed.update(version=served.loaded_at, rows_per_s=rows_per_second(served.predictor))
        estimate_s = len(frame) / speed["rows_per_s"]
        if estimate_s > max_scoring_s:
            raise gr.Error(
                f"{Path(csv_path).name} has {len(frame)} rows, about {estimate_s:.0f} s of scoring here; the limit "
                f"is {max_scoring_s:g} s. Split it into smaller files.",
                print_exception=False,
            )
        progress((0, len(frame)), desc="Scoring", unit="rows")
        scored, blank = score_frame(
            served.predictor, frame, lambda done, total: progress((done, total), desc="Scoring", unit="rows")
        )
        if blank:
            gr.Warning(f"{blank} row(s) have neither title nor description; their prediction is left empty.")
        destination = output_dir / f"{Path(csv_path).stem}-predictions.csv"
        scored.to_csv(destination, index=False, float_format="%.6f")
        return str(destination)

    def model_info() -> dict:
        """The served model: run_id, model_name, version, alias, loaded_at."""
        return holder.current.info()

    timer = gr.Timer(holder.interval_s) if holder.follows else None
    with gr.Blocks(title="tagifai demo", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            lambda: (
                "# tagifai\nPredict the tag of a machine-learning project from its title and description: "
                + ", ".join(f"`{tag}`" for tag in holder.current.predictor.classes)
                + "."
            ),
            every=timer,
        )
        with gr.Tabs():
            with gr.Tab("Predict", id="predict"):
                with gr.Row():
                    with gr.Column():
                        title = gr.Textbox(label="Title", max_lines=2, max_length=MAX_FIELD_CHARS, elem_id="title")
                        description = gr.Textbox(
                            label="Description", lines=4, max_length=MAX_FIELD_CHARS, elem_id="description"
                        )
                        predict_button = gr.Button("Predict tag", variant="primary", elem_id="predict-button")
                    with gr.Column():
                        label = gr.Label(
                            label="Predicted tag",
                            num_top_classes=len(holder.current.predictor.classes),
                            elem_id="prediction",
                        )
                        with gr.Accordion("Model provenance", open=True):
                            gr.Markdown(
                                lambda: holder.current.provenance.to_markdown(), every=timer, elem_id="provenance"
                            )
                gr.Examples(
                    EXAMPLES,
                    inputs=[title, description],
                    outputs=label,
                    fn=predict_tags,
                    run_on_click=True,
                    cache_examples=False,
                )
                with gr.Accordion("Score a CSV file", open=False):
                    gr.Markdown(
                        f"Upload a CSV with `title` and `description` columns (up to {MAX_CSV_ROWS} rows, "
                        f"{MAX_UPLOAD_SIZE}, about {max_scoring_s:.0f} s of scoring); download the same rows "
                        "with `prediction` and one `probability_<tag>` column per tag."
                    )
                    with gr.Row():
                        upload = gr.File(
                            label="CSV to score", file_types=[".csv"], type="filepath", elem_id="csv-upload"
                        )
                        scored_file = gr.File(label="Scored CSV (download)", interactive=False, elem_id="csv-scored")
                    score_button = gr.Button("Score CSV", elem_id="score-button")
            with gr.Tab("Experiment", id="experiment"):
                experiment_tab(lambda: holder.current.experiment, every=timer)

        # Up to MAX_BATCH_ROWS predictions in flight at once (Gradio's default is 1), so that concurrent
        # requests reach the batcher together; both triggers share the limit.
        predict_button.click(
            predict_tags, [title, description], label, api_name="predict",
            concurrency_limit=MAX_BATCH_ROWS, concurrency_id="predict",
        )  # fmt: skip
        title.submit(
            predict_tags, [title, description], label, api_visibility="private",
            concurrency_limit=MAX_BATCH_ROWS, concurrency_id="predict",
        )  # fmt: skip
        score_button.click(score_csv, upload, scored_file, api_name="score_csv")
        gr.api(model_info, api_name="model_info")
    return demo


def main(argv: Optional[list[str]] = None) -> None:
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    args = parse_settings(
        DemoSettings, argv, prog="python -m demo.app", description="Serve the tuned tag classifier as a web demo."
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from demo.serving import existing_store_uri
        from tagifai.lifecycle import tracking

        tracking_uri = existing_store_uri(args.tracking_uri)
        tracking.check_reachable(tracking_uri)
        holder = holder_for(tracking_uri, args.run_id, args.experiment_name, args.model_name, args.reload_interval)
    except UserError as error:
        sys.exit(f"error: {error}")
    provenance = holder.current.provenance
    following = f"; following the champion every {args.reload_interval:g} s" if holder.follows else ""
    print(f"serving run {provenance.run_id} ({provenance.chosen_by}) from {redact(tracking_uri)}{following}")
    holder.start()
    try:
        build_app(holder, args.max_scoring_seconds).launch(
            server_name=args.host, server_port=args.port, **launch_options()
        )
    except OSError as error:  # port taken, or an address this machine does not have
        reason = str(error).split(". ")[0]
        sys.exit(f"error: cannot serve on {args.host}:{args.port} ({reason}); pass a free --port or another --host")
    finally:
        holder.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
