"""The MLflow pyfunc wrapper of a fine-tuned checkpoint (kept apart so that only logging or loading
a model imports MLflow).

`mlflow.pyfunc.load_model(uri).predict(pandas.DataFrame)` takes the columns that
`bert.inference.Predictor` reads (`text` / `text_pair`, `question` / `context`, `tokens`)
and returns one prediction per row: labels, floats, answer texts or entity lists.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

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
            return self.predictor.predict(records)


def log_pyfunc_model(checkpoint: str | Path, name: str = "model") -> str:
    """Log `checkpoint` as an MLflow pyfunc model into the active run; returns the model URI.

    The `bert` and `pipelines` source trees travel with the model (`code_paths`), so it loads
    where bertflow is not installed.
    """
    root = Path(__file__).resolve().parents[1]
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=BertflowPyfunc(),
        artifacts={"checkpoint": str(checkpoint)},
        code_paths=[str(root / "bert"), str(root / "pipelines")],
        pip_requirements=["torch", "tokenizers", "safetensors", "sentencepiece", "numpy", "pandas", "mlflow"],
    )
    return info.model_uri
