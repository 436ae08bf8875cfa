"""Running a fine-tuned checkpoint: head outputs for features, predictions for raw inputs, MLflow pyfunc.

Used by three callers: the fine-tune job's evaluation (`head_outputs`), `bertflow predict`
(`Predictor`, one per Ray Data actor) and the MLflow model (`BertflowPyfunc`, which wraps
`Predictor` around the checkpoint dir logged as an artifact).

A fine-tuned checkpoint dir carries, next to the weights and tokenizer files, `bertflow_task.json`
(the task row's name and the sequence length it was trained with), so a predictor knows how to
featurize raw input and how to read the head's outputs.

Input records (dicts, or DataFrame rows) per task kind (each kind's `inputs` in `bert.tasks.kinds`):
    classification / regression   text (and text_pair for pair tasks)
    token_classification (NER)    tokens (a list of words) or text (split into words and punctuation)
    span (SQuAD)                  question, context
Predictions per record, `Predictor.predict` (plain) and `Predictor.predict_records` (what `bertflow predict`
writes and the MLflow model answers; fields per kind: its `outputs` in `bert.tasks.kinds`):
    classification  plain: the label name; records: {"label", "probabilities": {label: p}} (softmax, sums to 1)
    regression      plain: a float;        records: {"score"}
    span (QA)       plain: the answer text; records: {"answer", "start", "end", "score"}: character offsets of
                    the answer in `context` (end exclusive; -1 for no answer) and its probability
                    (softmax start x softmax end in its window)
    NER             plain: entities [{"type", "start", "end", "text"}]; records: {"entities": [... + "score"]},
                    the score being the mean probability of the entity's word tags. start/end are character
                    offsets into `text` (end exclusive), or word indices (end exclusive) when the input gave `tokens`.

This module imports `bert`, numpy and torch; never ray or mlflow (the pyfunc wrapper is `pipelines/pyfunc_model.py`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bert.errors import InputError

if TYPE_CHECKING:
    from bert.tasks.kinds import InferenceRun

TASK_FILE = "bertflow_task.json"


def length_sorted_chunks(features: Sequence[Any], batch_size: int) -> list[list[int]]:
    """Feature indices cut into batches of similar length (longest first): little padding at inference."""
    from bert.tasks import feature_length

    order = sorted(range(len(features)), key=lambda i: -feature_length(features[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def head_outputs(model, features: Sequence[Any], pad_id: int, batches: Sequence[Sequence[int]], device=None,
                 precision=None) -> dict[int, np.ndarray]:
    """The head's output for the features in `batches` (lists of indices into `features`).

    Returns {feature index: output}: logits (C,) for sequence heads, (T_i, C) / (T_i, 2) for
    token and span heads (per-position outputs) cut to the feature's own length
    (`bert.tasks.feature_length`), in float32 whatever the `precision`
    (a `bert.precision.Precision`; default fp32) the model ran in. The model is put in eval mode.
    """
    import contextlib

    import torch

    from bert.tasks import collate, feature_length

    device = device or next(model.parameters()).device
    model.eval()
    outputs: dict[int, np.ndarray] = {}
    with torch.inference_mode():
        for batch in batches:
            inputs = collate([features[i] for i in batch], pad_id)
            with precision.autocast() if precision is not None else contextlib.nullcontext():
                logits = model(**{k: inputs[k].to(device) for k in ("input_ids", "token_type_ids", "attention_mask")}).logits
            logits = logits.float().cpu().numpy()
            for row, i in enumerate(batch):
                outputs[i] = logits[row] if logits.ndim == 2 else logits[row, : feature_length(features[i])]
    return outputs


def write_task_file(directory: str | Path, task: str, max_seq_length: int, threshold: float | None = None,
                    precision: str = "fp32") -> None:
    """`bertflow_task.json`: the task row, the sequence length, the precision the model was evaluated in
    (predictions reproduce the dev scores only in it), and a decision threshold chosen on dev (if any)."""
    meta: dict[str, Any] = {"task": task, "max_seq_length": max_seq_length, "precision": precision}
    if threshold is not None:
        meta["threshold"] = float(threshold)
    (Path(directory) / TASK_FILE).write_text(json.dumps(meta, indent=2) + "\n")


class Predictor:
    """A fine-tuned checkpoint dir, ready to predict on raw records (single device, no Ray)."""

    def __init__(self, checkpoint: str | Path, batch_size: int = 64, device: str = "cpu", threads: int | None = None):
        import torch

        from bert.checkpoint import from_pretrained, read_checkpoint_info
        from bert.precision import Precision
        from bert.tasks import get_task
        from bert.tokenizer import Tokenizer

        checkpoint = Path(checkpoint)
        task_file = checkpoint / TASK_FILE
        if not task_file.is_file():
            raise InputError(f"{checkpoint}: not a fine-tuned bertflow checkpoint ({TASK_FILE} is missing)")
        meta = json.loads(task_file.read_text())
        self.spec = get_task(meta["task"])
        self.kind = self.spec.kind_spec
        self.max_seq_length = int(meta["max_seq_length"])
        self.threshold: float | None = meta.get("threshold")  # SQuAD 2.0: no-answer threshold chosen on dev
        self.precision = Precision(meta.get("precision", "fp32"), torch.device(device).type, "as evaluated in training")
        info = read_checkpoint_info(checkpoint)
        if info.head != self.spec.head:
            raise InputError(f"{checkpoint}: head {info.head!r} does not fit task {self.spec.name} ({self.spec.kind})")
        if threads:
            torch.set_num_threads(threads)
        self.tokenizer = Tokenizer.load(checkpoint)
        # what the saved head does not say itself (a regression head's width: `KindSpec.load_arguments`)
        self.model = from_pretrained(checkpoint, **self.kind.load_arguments).to(device).eval()
        self.labels: tuple[str, ...] = tuple(getattr(self.model, "labels", None) or ())
        self.batch_size = batch_size
        self.device = torch.device(device)

    @property
    def input_fields(self) -> tuple[str, ...]:
        """The record fields the model reads; "a|b" where either one will do."""
        return tuple("|".join(f.name for f in slot) for slot in self.spec.inputs)

    @property
    def output_fields(self) -> tuple[str, ...]:
        """The fields of every `predict_records` answer."""
        return self.kind.output_names

    def predict(self, records: Sequence[Mapping[str, Any]]) -> list[Any]:
        """One plain prediction per record, in order: a label, a float, an answer text or an entity list."""
        if not records:
            return []
        return self.kind.plain(self._run(records), records, self.labels)

    def predict_records(self, records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """One dict per record, in order, with the fields of `output_fields` (the module docstring)."""
        if not records:
            return []
        return self.kind.answers(self._run(records), records, self.labels)

    def _run(self, records: Sequence[Mapping[str, Any]]) -> InferenceRun:
        """Featurize the records, run the model, post-process: everything both output forms are made of."""
        from bert.tasks.kinds import InferenceRun

        examples, extras = self.kind.examples(records, self.spec.input_names, self.labels)
        features = self.spec.featurize(examples, self.tokenizer, self.labels, self.max_seq_length)
        by_index = head_outputs(self.model, features, self.tokenizer.pad_id,
                                length_sorted_chunks(features, self.batch_size), self.device, self.precision)
        outputs = [by_index[i] for i in range(len(features))]
        predictions = self.spec.postprocess(examples, features, outputs, self.labels)
        if self.threshold is not None and self.spec.choose_threshold is not None:
            predictions = self.spec.apply_threshold(predictions, self.threshold)
        return InferenceRun(examples, extras, features, outputs, predictions)
