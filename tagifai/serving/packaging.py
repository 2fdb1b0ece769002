"""Turn a checkpoint into the MLflow Model that is registered: a `python_function` model whose code
is tagifai/serving/pyfunc_model.py, logged in the trial's run.

Its artifacts: the fp32 ONNX graph with its weights (onnx_engine.export_inference_graph), the
tokenizer files and the tag list. Its code: pyfunc_model.py and the text cleaning it carries. Its
signature declares both input columns, so `mlflow models serve` answers a request without them
with a 400. The safetensors checkpoint stays in the run as the training artifact.
"""

from __future__ import annotations

import json
import tempfile
from importlib.metadata import version as installed_version
from pathlib import Path

from tagifai import text_cleaning
from tagifai.model import file_sha256, load_checkpoint
from tagifai.serving.loader import without_type_hint_advice

MODEL_NAME = "model"  # the logged model's name in its run
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
# Rows per call: a bound on one request's latency and memory (5,000 rows take ~8 s with MiniLM on 2
# cores), above the 1,024 rows per call of batch scoring (flows.score's --batch-rows default); larger
# inputs are split by the caller. Stored in classes.json, not as MLflow's model_config, which MLflow
# would also log as run params (and without which MLflow ignores a model_config given at load).
MAX_ROWS = 5_000
# What loading needs, pinned to the versions it was logged and tested with.
REQUIREMENTS = ("mlflow", "onnxruntime", "tokenizers", "numpy", "pandas")
METADATA_KEY = "tagifai"  # the checkpoint's arguments (backbone, hyperparameters, epoch...) in MLmodel


def pip_requirements() -> list[str]:
    return [f"{name}=={installed_version(name)}" for name in REQUIREMENTS]


def signature(classes: list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string", "title"), ColSpec("string", "description")])
    outputs = Schema([ColSpec("string", "prediction")] + [ColSpec("double", f"probability_{tag}") for tag in classes])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example():
    import pandas as pd

    return pd.DataFrame(
        {
            "title": ["Transfer learning with transformers", "Real-time object detection"],
            "description": ["Fine-tune BERT to classify text.", ""],
        }
    )


def write_code(folder: Path) -> list[str]:
    """The files the model's code needs beside pyfunc_model.py: the text cleaning and the stop-word
    list it was trained with (so that loading needs no scikit-learn)."""
    folder.mkdir(parents=True, exist_ok=True)
    stop_words = folder / text_cleaning.STOP_WORDS_FILE
    stop_words.write_text("\n".join(sorted(text_cleaning.STOP_WORDS)) + "\n", encoding="utf-8")
    return [text_cleaning.__file__, str(stop_words)]


def write_artifacts(checkpoint_dir: Path, folder: Path) -> tuple[dict[str, str], dict]:
    """The model's artifact files in `folder`: {artifact name: path}, and the checkpoint's arguments."""
    from tagifai.serving.onnx_engine import export_inference_graph

    model, tokenizer, args = load_checkpoint(checkpoint_dir)
    classes = sorted(args["class_to_index"], key=args["class_to_index"].get)
    pad_token_id = int(tokenizer.pad_token_id or 0)
    export_inference_graph(model, pad_token_id, folder / "model.onnx")
    tokenizer.save_pretrained(folder / "tokenizer")
    config = {
        "classes": classes,
        "max_length": int(args.get("max_length", 128)),
        "pad_token_id": pad_token_id,
        "max_rows": MAX_ROWS,
        "onnx_sha256": file_sha256(folder / "model.onnx"),  # checked at every load: a damaged graph is refused
    }
    (folder / "classes.json").write_text(json.dumps(config, indent=2))
    artifacts = {
        "onnx_model": folder / "model.onnx",
        "tokenizer": folder / "tokenizer",
        "classes": folder / "classes.json",
    }
    return {name: str(path) for name, path in artifacts.items()}, args


def log_model(tracking_uri: str, run_id: str, checkpoint_dir: Path):
    """Log the checkpoint's MLflow Model into `run_id`; returns MLflow's ModelInfo (model_uri,
    model_id)."""
    import mlflow
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    # Created here, in the run's experiment: left to Model.log, MLflow 3.17 files the model under
    # the active (else the Default) experiment, whose artifact root may be ./mlruns of whichever
    # directory logs, not the experiment's --artifact-location.
    logged = client.create_logged_model(run.info.experiment_id, MODEL_NAME, run_id, params=run.data.params)
    with tempfile.TemporaryDirectory(prefix="tagifai-mlflow-model-") as folder:
        artifacts, args = write_artifacts(Path(checkpoint_dir), Path(folder))
        classes = json.loads(Path(artifacts["classes"]).read_text())["classes"]
        provenance = {k: args[k] for k in ("backbone", "hyperparameters", "epoch", "val_loss", "val_f1") if k in args}
        # Model.log rather than pyfunc.log_model: it takes the run id, so no global active run is
        # started; MLflow reads the store from its global URI, set here for this call only.
        with _use_tracking_uri(tracking_uri), without_type_hint_advice():
            return Model.log(
                artifact_path=None,
                name=MODEL_NAME,
                flavor=mlflow.pyfunc,
                run_id=run_id,
                model_id=logged.model_id,
                python_model=str(MODEL_CODE),
                artifacts=artifacts,
                code_paths=write_code(Path(folder) / "code"),
                signature=signature(classes),
                input_example=input_example(),
                pip_requirements=pip_requirements(),
                metadata={METADATA_KEY: provenance},
            )
