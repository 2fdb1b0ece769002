"""A tiny deterministic MLflow Model for the batch-scoring tests, logged as code (models from code):
keyword counts in the title and description give each tag's probability.

It keeps to the scoring contract only: predict(frame with title, description) returns one row per
input row, in order, with `prediction` then `probability_<tag>` columns.
TAGIFAI_TEST_MODEL_S_PER_ROW makes it take that long per row (a model's cost, for the kill tests).
"""

from __future__ import annotations

import os
import time

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

KEYWORDS = {
    "computer-vision": ("image", "vision", "pixel", "detection"),
    "mlops": ("deploy", "pipeline", "monitoring", "serving"),
    "natural-language-processing": ("text", "language", "token", "translation"),
    "other": (),
}


class KeywordModel(PythonModel):
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        delay = float(os.environ.get("TAGIFAI_TEST_MODEL_S_PER_ROW", "0"))
        if delay:
            time.sleep(delay * len(model_input))
        texts = (model_input["title"].astype(str) + " " + model_input["description"].astype(str)).str.lower()
        counts = np.array([[sum(text.count(k) for k in words) + 0.5 for words in KEYWORDS.values()] for text in texts])
        counts = counts.reshape(len(texts), len(KEYWORDS))
        probabilities = counts / counts.sum(axis=1, keepdims=True)
        tags = list(KEYWORDS)
        out = pd.DataFrame({"prediction": [tags[i] for i in probabilities.argmax(axis=1)]})
        for column, tag in enumerate(tags):
            out[f"probability_{tag}"] = probabilities[:, column]
        return out


mlflow.models.set_model(KeywordModel())
