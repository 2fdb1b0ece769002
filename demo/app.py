"""The Gradio demo: one tuned checkpoint from MLflow, single and CSV predictions, and where it came from.

    python -m demo.app [--run-id RUN] [--experiment-name tagifai] [--model-name tagifai]
                       [--tracking-uri URI] [--host 127.0.0.1] [--port 7860] [--threads N]

The model is loaded once at start: the run given by --run-id, else the registered model's
`champion` alias, else the experiment's best run; so are its tuning session's trials, shown in the
Experiment tab. The page works offline (system fonts, no CDN).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import gradio as gr
import pandas as pd
import torch

from demo.experiment import Experiment, experiment_tab, load_experiment
from tagifai import tracking
from tagifai.data import TEXT_COLUMNS, parse_table
from tagifai.errors import DataError, TrackingError, UserError
from tagifai.predict import Predictor
from tagifai.settings import DEFAULT_EXPERIMENT_NAME, DEFAULT_MODEL_NAME
from tagifai.storage import redact

TRAIN_COMMAND = "python -m flows.tune"
MAX_FIELD_CHARS = 5_000  # far beyond the tokenizer's max_length; keeps huge pastes cheap
MAX_UPLOAD_SIZE = "5mb"
MAX_CSV_ROWS = 20_000
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


@dataclass
class Provenance:
    """What the page says about the served model, so a prediction can be traced to its run."""

    run_id: str
    experiment_name: str
    chosen_by: str
    backbone: str
    hyperparameters: dict = field(default_factory=dict)
    epoch: Optional[int] = None
    val_loss: Optional[float] = None
    val_f1: Optional[float] = None
    test_f1: Optional[float] = None
    trained_at: str = "unknown"

    def to_markdown(self) -> str:
        def number(value: Optional[float]) -> str:
            return "not recorded" if value is None else f"{value:.4f}"

        params = ", ".join(f"{k}={v:.4g}" for k, v in sorted(self.hyperparameters.items())) or "not recorded"
        rows = [
            ("MLflow run", f"`{self.run_id}`"),
            ("Experiment", self.experiment_name),
            ("Chosen as", self.chosen_by),
            ("Backbone", f"`{self.backbone}`"),
            ("Hyperparameters", params),
            ("Best epoch", "not recorded" if self.epoch is None else str(self.epoch)),
            ("Validation loss", number(self.val_loss)),
            ("Validation F1", number(self.val_f1)),
            ("Test F1", number(self.test_f1)),
            ("Trained", self.trained_at),
        ]
        return "\n".join(f"- **{name}**: {value}" for name, value in rows)


def existing_store_uri(tracking_uri: Optional[str]) -> str:
    """The URI to serve from, as training resolves it, but never created: an empty store has no model."""
    uri = tracking.configured_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.exists():
            command = TRAIN_COMMAND + (f" --tracking-uri {uri}" if tracking_uri else "")
            raise TrackingError(
                f"no MLflow store at {path}: no model has been trained there yet. Train one first: {command}"
            )
    return uri


def choose_run(client, run_id: Optional[str], experiment_name: str, model_name: str) -> tuple[str, str]:
    """The run to serve and why it was chosen: explicit id, then the champion alias, then the best run."""
    if run_id:
        return run_id, "--run-id"
    champion = tracking.champion_run_id(client, model_name)
    if champion:
        return champion, f"registered model {model_name!r}, alias {tracking.CHAMPION_ALIAS!r}"
    return tracking.best_run_id(client, experiment_name), f"lowest validation loss in experiment {experiment_name!r}"


def describe_run(client, run, args: dict, chosen_by: str) -> Provenance:
    metrics = run.data.metrics
    experiment = client.get_experiment(run.info.experiment_id)
    started = datetime.fromtimestamp(run.info.start_time / 1000, tz=timezone.utc) if run.info.start_time else None
    return Provenance(
        run_id=run.info.run_id,
        experiment_name=experiment.name if experiment else run.info.experiment_id,
        chosen_by=chosen_by,
        backbone=str(args.get("backbone", "unknown")),
        hyperparameters=dict(args.get("hyperparameters") or {}),
        epoch=args.get("epoch"),
        val_loss=metrics.get("best_val_loss", args.get("val_loss")),
        val_f1=args.get("val_f1"),
        test_f1=metrics.get("test_f1"),
        trained_at=started.strftime("%Y-%m-%d %H:%M UTC") if started else "unknown",
    )


def load_model(
    tracking_uri: str,
    run_id: Optional[str] = None,
    experiment_name: str = DEFAULT_EXPERIMENT_NAME,
    model_name: str = DEFAULT_MODEL_NAME,
) -> tuple[Predictor, Provenance]:
    """The predictor of the chosen run (held in memory) and its provenance."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    run_id, chosen_by = choose_run(client, run_id, experiment_name, model_name)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise TrackingError(
            f"MLflow run {run_id!r} does not exist in {redact(tracking_uri)}; check the id "
            "(mlflow ui lists the runs) or leave out --run-id to serve the best run"
        ) from None
    with tempfile.TemporaryDirectory(prefix="tagifai-demo-") as folder:
        predictor = Predictor(tracking.download_checkpoint(client, run_id, Path(folder)))
    return predictor, describe_run(client, run, predictor.args, chosen_by)


def clip(text: Optional[str]) -> str:
    return (text or "")[:MAX_FIELD_CHARS].strip()


def probabilities_by_tag(predictor: Predictor, title: str, description: str) -> dict[str, float]:
    """The tag probabilities of one project; gr.Label shows the most likely tag on top."""
    title, description = clip(title), clip(description)
    if not (title or description):
        raise gr.Error("Enter a title or a description (or both) to get a tag.", print_exception=False)
    row = predictor.predict_proba([title], [description])[0]
    return {tag: float(p) for tag, p in zip(predictor.classes, row)}


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


def score_frame(predictor: Predictor, frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The rows with `prediction` and one probability column per tag; rows without text stay blank."""
    frame = frame.reset_index(drop=True)
    titles = [clip(value) for value in frame["title"].fillna("").astype(str)]
    descriptions = [clip(value) for value in frame["description"].fillna("").astype(str)]
    has_text = [bool(t or d) for t, d in zip(titles, descriptions)]
    scored = frame.copy()
    scored["prediction"] = ""
    for tag in predictor.classes:
        scored[f"probability_{tag}"] = float("nan")
    rows = [i for i, keep in enumerate(has_text) if keep]
    if rows:
        probabilities = predictor.predict_proba([titles[i] for i in rows], [descriptions[i] for i in rows])
        scored.loc[rows, "prediction"] = [predictor.classes[k] for k in probabilities.argmax(axis=1)]
        for column, tag in enumerate(predictor.classes):
            scored.loc[rows, f"probability_{tag}"] = probabilities[:, column]
    return scored, len(frame) - len(rows)


def offline_theme() -> gr.themes.Base:
    """Gradio's default look with system fonts only, so the page never asks a font CDN."""
    return gr.themes.Default(font=SANS_FONTS, font_mono=MONO_FONTS)


def launch_options() -> dict:
    """Options for `Blocks.launch` (Gradio 6 takes the theme there): offline theme, capped uploads, no share link."""
    return {"theme": offline_theme(), "max_file_size": MAX_UPLOAD_SIZE, "share": False}


def build_app(predictor: Predictor, provenance: Provenance, experiment: Optional[Experiment] = None) -> gr.Blocks:
    """The page; `predict` (title, description → tag probabilities) is also the named API endpoint.

    `experiment` (from `load_experiment`, read once at start) fills the Experiment tab."""
    output_dir = Path(tempfile.mkdtemp(prefix="tagifai-scored-"))

    def predict(title: str, description: str) -> dict[str, float]:
        """Probability of every tag for one project (title and/or description)."""
        return probabilities_by_tag(predictor, title, description)

    def score_csv(csv_path: Optional[str]) -> str:
        """A CSV of projects (title, description) scored: the same rows plus prediction and probabilities."""
        if not csv_path:
            raise gr.Error("Upload a CSV file with title and description columns first.", print_exception=False)
        scored, blank = score_frame(predictor, read_upload(csv_path))
        if blank:
            gr.Warning(f"{blank} row(s) have neither title nor description; their prediction is left empty.")
        destination = output_dir / f"{Path(csv_path).stem}-predictions.csv"
        scored.to_csv(destination, index=False, float_format="%.6f")
        return str(destination)

    with gr.Blocks(title="tagifai demo", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# tagifai\nPredict the tag of a machine-learning project from its title and description: "
            + ", ".join(f"`{tag}`" for tag in predictor.classes)
            + "."
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
                            label="Predicted tag", num_top_classes=len(predictor.classes), elem_id="prediction"
                        )
                        with gr.Accordion("Model provenance", open=True):
                            gr.Markdown(provenance.to_markdown(), elem_id="provenance")
                gr.Examples(
                    EXAMPLES,
                    inputs=[title, description],
                    outputs=label,
                    fn=predict,
                    run_on_click=True,
                    cache_examples=False,
                )
                with gr.Accordion("Score a CSV file", open=False):
                    gr.Markdown(
                        f"Upload a CSV with `title` and `description` columns "
                        f"(up to {MAX_CSV_ROWS} rows, {MAX_UPLOAD_SIZE}); "
                        "download the same rows with `prediction` and one `probability_<tag>` column per tag."
                    )
                    with gr.Row():
                        upload = gr.File(
                            label="CSV to score", file_types=[".csv"], type="filepath", elem_id="csv-upload"
                        )
                        scored_file = gr.File(label="Scored CSV", interactive=False, elem_id="csv-scored")
                    score_button = gr.Button("Score CSV", elem_id="score-button")
            with gr.Tab("Experiment", id="experiment"):
                experiment_tab(experiment)

        predict_button.click(predict, [title, description], label, api_name="predict")
        title.submit(predict, [title, description], label, api_visibility="private")
        score_button.click(score_csv, upload, scored_file, api_name="score_csv")
    return demo


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m demo.app", description="Serve the tuned tag classifier as a web demo."
    )
    parser.add_argument("--run-id", help="MLflow run to serve (default: the champion model, else the best run)")
    parser.add_argument(
        "--experiment-name",
        default=DEFAULT_EXPERIMENT_NAME,
        help=f"experiment searched for the best run (default: {DEFAULT_EXPERIMENT_NAME})",
    )
    parser.add_argument(
        "--model-name",
        default=DEFAULT_MODEL_NAME,
        help=f"registered model whose 'champion' alias is served (default: {DEFAULT_MODEL_NAME})",
    )
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./mlruns)")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 exposes it to the network (default: 127.0.0.1)",
    )
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per prediction; 1 keeps latency steady on a busy shared machine (default: torch's choice)",
    )
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        tracking_uri = existing_store_uri(args.tracking_uri)
        tracking.check_reachable(tracking_uri)
        predictor, provenance = load_model(tracking_uri, args.run_id, args.experiment_name, args.model_name)
    except UserError as error:
        sys.exit(f"error: {error}")
    print(f"serving run {provenance.run_id} ({provenance.chosen_by}) from {redact(tracking_uri)}")
    experiment = load_experiment(tracking_uri, provenance.run_id)
    try:
        build_app(predictor, provenance, experiment).launch(
            server_name=args.host, server_port=args.port, **launch_options()
        )
    except OSError as error:  # port taken, or an address this machine does not have
        reason = str(error).split(". ")[0]
        sys.exit(f"error: cannot serve on {args.host}:{args.port} ({reason}); pass a free --port or another --host")


if __name__ == "__main__":
    main(sys.argv[1:])
