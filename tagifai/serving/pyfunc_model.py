"""The registered MLflow Model's code. MLflow runs this file when it loads the model ("models from
code"), so it imports nothing of this project: a model loads where only MLflow and its own
requirements are installed. The text cleaning it needs is carried beside it as code
(tagifai/text_cleaning.py and its stop-word list, in the model's code/ folder).
This project never imports this file; tagifai/serving/packaging.py logs it.

The contract (README, "The registered MLflow Model"):
- input: a pandas DataFrame with string columns `title` and `description` (description may be
  empty); a missing column is an error that names it; at most `max_rows` rows per call (set at
  logging in classes.json);
- output: a DataFrame, one row per input row in input order: `prediction` (the tag), then
  `probability_<tag>` (float) for every tag, in the model's class order.
Bad input raises MlflowException(INVALID_PARAMETER_VALUE), which `mlflow models serve` answers
with HTTP 400 and the message.

Artifacts: `onnx_model` (the fp32 graph with its weights), `tokenizer` (the tokenizer files;
tokenizer.json is what runs), `classes` (JSON: the tags in class order, max_length, pad token id,
max_rows, the graph's sha256, checked at load).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

INPUT_COLUMNS = ("title", "description")
# Rows per ONNX Runtime call, and padded tokens per call: rows sorted by length and cut into runs
# of similar length waste little compute on padding (tagifai/serving/onnx_engine.py measured 512).
ROWS_PER_RUN = 64
TOKENS_PER_RUN = 512


def invalid(message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(message)


class TagClassifier(PythonModel):
    def load_context(self, context) -> None:
        import onnxruntime
        from text_cleaning import project_texts  # the model's code/ folder, on sys.path once loading
        from tokenizers import Tokenizer

        config = json.loads(Path(context.artifacts["classes"]).read_text())
        graph_path = Path(context.artifacts["onnx_model"])
        graph = graph_path.read_bytes()  # read once: checked here, then handed to ONNX Runtime
        if "onnx_sha256" in config and hashlib.sha256(graph).hexdigest() != config["onnx_sha256"]:
            raise MlflowException(
                f"the model's graph {graph_path.name} is corrupted (its sha256 differs from the logged one)"
            )
        self.classes = list(config["classes"])
        self.pad_token_id = int(config["pad_token_id"])
        self.max_rows = int(config["max_rows"])
        self.project_texts = project_texts
        # The same tokenization as transformers' fast tokenizer with truncation=True,
        # max_length=max_length (tests/test_mlflow_model.py compares the ids).
        self.tokenizer = Tokenizer.from_file(str(Path(context.artifacts["tokenizer"]) / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(int(config["max_length"]))
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def checked_texts(self, model_input) -> tuple[list[str], list[str]]:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        missing = [column for column in INPUT_COLUMNS if column not in frame.columns]
        if missing:
            raise invalid(
                f"the input lacks the column(s) {', '.join(missing)}; "
                "send string columns title and description (description may be empty)"
            )
        if len(frame) == 0:
            raise invalid("the input has no rows; send at least one row with a title and a description")
        if len(frame) > self.max_rows:
            raise invalid(
                f"the input has {len(frame)} rows, more than the {self.max_rows} allowed per request; split it"
            )
        columns = []
        for column in INPUT_COLUMNS:
            values = frame[column].tolist()
            for row, value in enumerate(values):
                if (
                    value is not None
                    and not isinstance(value, str)
                    and not (isinstance(value, float) and np.isnan(value))
                ):
                    raise invalid(f"column {column} must hold text; row {row} holds {type(value).__name__} {value!r}")
            columns.append(["" if value is None or isinstance(value, float) else value for value in values])
        return columns[0], columns[1]

    def probabilities(self, titles: list[str], descriptions: list[str]) -> np.ndarray:
        encoded = [e.ids for e in self.tokenizer.encode_batch(self.project_texts(titles, descriptions))]
        lengths = np.array([len(ids) for ids in encoded])
        runs, current = [], []
        for row in np.argsort(lengths, kind="stable"):  # shortest first: a run's last row is its longest
            if current and (len(current) == ROWS_PER_RUN or (len(current) + 1) * lengths[row] > TOKENS_PER_RUN):
                runs.append(current)
                current = []
            current.append(row)
        runs.append(current)
        logits = np.empty((len(encoded), len(self.classes)), dtype=np.float32)
        for rows in runs:
            input_ids = np.full((len(rows), lengths[rows[-1]]), self.pad_token_id, dtype=np.int64)
            attention_mask = np.zeros_like(input_ids)
            for i, row in enumerate(rows):
                input_ids[i, : lengths[row]] = encoded[row]
                attention_mask[i, : lengths[row]] = 1
            feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
            logits[rows] = self.session.run(["logits"], feeds)[0]
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        probabilities = self.probabilities(*self.checked_texts(model_input))
        output = pd.DataFrame({"prediction": [self.classes[i] for i in probabilities.argmax(axis=1)]})
        for column, tag in enumerate(self.classes):
            output[f"probability_{tag}"] = probabilities[:, column].astype(np.float64)
        return output


mlflow.models.set_model(TagClassifier())
