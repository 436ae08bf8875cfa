"""The MLflow pyfunc wrapper of a fine-tuned checkpoint (kept apart so that only logging or loading
a model imports MLflow; logging and registering are `pipelines/models.py`).

`mlflow.pyfunc.load_model(uri).predict(pandas.DataFrame)` takes the columns that
`bert.inference.Predictor` reads (`text` / `text_pair`, `question` / `context`, `tokens` or `text`)
and returns a DataFrame, one row per input row, with the output fields of the task's kind
(`bert.tasks.kinds`): label and probabilities, score, answer / start / end / score, or entities.
`mlflow models serve` answers `{"predictions": [one object per row with those fields]}`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import mlflow.pyfunc

from bert.inference import Predictor

with warnings.catch_warnings():  # mlflow asks for type hints; inputs are DataFrames, dicts or lists of dicts
    warnings.simplefilter("ignore", UserWarning)

    class BertflowPyfunc(mlflow.pyfunc.PythonModel):
        """`mlflow.pyfunc` model around a fine-tuned checkpoint dir logged as the artifact "checkpoint"."""

        def load_context(self, context) -> None:
            self.predictor = Predictor(context.artifacts["checkpoint"])

        def predict(self, context, model_input, params=None):
            import pandas as pd

            if isinstance(model_input, pd.DataFrame):
                records = model_input.to_dict(orient="records")
            elif isinstance(model_input, Mapping):
                records = pd.DataFrame(model_input).to_dict(orient="records")
            else:
                records = list(model_input)
            rows = self.predictor.predict_records(records)
            return pd.DataFrame(rows, columns=list(self.predictor.output_fields))
