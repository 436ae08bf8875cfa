"""Running a fine-tuned checkpoint: head outputs for features, predictions for raw inputs, MLflow pyfunc.

Used by three callers: the fine-tune job's evaluation (`head_outputs`), `bertflow predict`
(`Predictor`, one per Ray Data actor) and the MLflow model (`BertflowPyfunc`, which wraps
`Predictor` around the checkpoint dir logged as an artifact).

A fine-tuned checkpoint dir carries, next to the weights and tokenizer files, `bertflow_task.json`
(the task row's name and the sequence length it was trained with), so a predictor knows how to
featurize raw input and how to read the head's outputs.

Input records (dicts, or DataFrame rows) per task kind:
    classification / regression   text (and text_pair for pair tasks)
    token_classification (NER)    tokens (a list of words) or text (split into words and punctuation)
    span (SQuAD)                  question, context
Predictions per record:
    classification: the label name; regression: a float; span: the answer text;
    NER: entities [{"type", "start", "end", "text"}] where start/end are character offsets into
    `text` (end exclusive), or word indices (end exclusive) when the input gave `tokens`.

This module imports `bert`, numpy and torch; never ray or mlflow (the pyfunc wrapper is `pipelines/pyfunc_model.py`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bert.errors import InputError

TASK_FILE = "bertflow_task.json"
_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)  # words and single punctuation marks, as BERT's basic tokenizer


def length_sorted_chunks(features: Sequence[Any], batch_size: int) -> list[list[int]]:
    """Feature indices cut into batches of similar length (longest first): little padding at inference."""
    order = sorted(range(len(features)), key=lambda i: -len(features[i].input_ids))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def head_outputs(model, features: Sequence[Any], pad_id: int, batches: Sequence[Sequence[int]], device=None,
                 precision=None) -> dict[int, np.ndarray]:
    """The head's output for the features in `batches` (lists of indices into `features`).

    Returns {feature index: output}: logits (C,) for sequence heads, (T_i, C) / (T_i, 2) for
    token and span heads cut to the feature's own length, in float32 whatever the `precision`
    (a `bert.precision.Precision`; default fp32) the model ran in. The model is put in eval mode.
    """
    import contextlib

    import torch

    from bert.tasks import collate

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
                outputs[i] = logits[row] if logits.ndim == 2 else logits[row, : len(features[i].input_ids)]
    return outputs


def write_task_file(directory: str | Path, task: str, max_seq_length: int, threshold: float | None = None,
                    precision: str = "fp32") -> None:
    """`bertflow_task.json`: the task row, the sequence length, the precision the model was evaluated in
    (predictions reproduce the dev scores only in it), and a decision threshold chosen on dev (if any)."""
    meta: dict[str, Any] = {"task": task, "max_seq_length": max_seq_length, "precision": precision}
    if threshold is not None:
        meta["threshold"] = float(threshold)
    (Path(directory) / TASK_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def words_with_offsets(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Split raw text into CoNLL-style words (punctuation separate) with their character spans."""
    matches = list(_WORD.finditer(text))
    return [m.group() for m in matches], [(m.start(), m.end()) for m in matches]


class Predictor:
    """A fine-tuned checkpoint dir, ready to predict on raw records (single device, no Ray)."""

    def __init__(self, checkpoint: str | Path, batch_size: int = 64, device: str = "cpu", threads: int | None = None):
        import torch

        from bert.checkpoint import from_pretrained, read_checkpoint_info
        from bert.tasks import get_task
        from bert.tokenizer import Tokenizer

        checkpoint = Path(checkpoint)
        task_file = checkpoint / TASK_FILE
        if not task_file.is_file():
            raise InputError(f"{checkpoint}: not a fine-tuned bertflow checkpoint ({TASK_FILE} is missing)")
        meta = json.loads(task_file.read_text())
        self.spec = get_task(meta["task"])
        self.max_seq_length = int(meta["max_seq_length"])
        self.threshold: float | None = meta.get("threshold")  # SQuAD 2.0: no-answer threshold chosen on dev
        from bert.precision import Precision

        self.precision = Precision(meta.get("precision", "fp32"), torch.device(device).type, "as evaluated in training")
        info = read_checkpoint_info(checkpoint)
        if info.head != self.spec.head:
            raise InputError(f"{checkpoint}: head {info.head!r} does not fit task {self.spec.name} ({self.spec.kind})")
        if threads:
            torch.set_num_threads(threads)
        self.tokenizer = Tokenizer.load(checkpoint)
        self.model = from_pretrained(checkpoint).to(device).eval()
        self.labels: tuple[str, ...] = tuple(getattr(self.model, "labels", None) or ())
        self.batch_size = batch_size
        self.device = torch.device(device)

    @property
    def input_fields(self) -> tuple[str, ...]:
        kind = self.spec.kind
        if kind == "span":
            return ("question", "context")
        if kind == "token_classification":
            return ("tokens|text",)
        return ("text", "text_pair") if len(self.spec.text_fields) == 2 else ("text",)

    def predict(self, records: Sequence[Mapping[str, Any]]) -> list[Any]:
        """One prediction per record, in order (see the module docstring for the formats)."""
        from bert.tasks import SquadExample, TextExample, TokenExample

        if not records:
            return []
        kind = self.spec.kind
        offsets: list[list[tuple[int, int]] | None] = []
        if kind in ("classification", "regression"):
            pair = len(self.spec.text_fields) == 2
            dummy: str | float = self.labels[0] if kind == "classification" else 0.0
            examples = [
                TextExample(str(i), _text(r, "text", i), _text(r, "text_pair", i) if pair else None, dummy)
                for i, r in enumerate(records)
            ]
        elif kind == "token_classification":
            examples = []
            for i, r in enumerate(records):
                tokens = r.get("tokens")
                if tokens is not None and not isinstance(tokens, str) and len(tokens) > 0:
                    words, spans = [str(t) for t in tokens], None
                else:
                    words, spans = words_with_offsets(_text(r, "text", i))
                offsets.append(spans)
                examples.append(TokenExample(str(i), tuple(words) or ("[UNK]",), ("O",) * max(len(words), 1)))
        else:
            examples = [
                SquadExample(str(i), "", _text(r, "context", i), _text(r, "question", i), ()) for i, r in enumerate(records)
            ]
        features = self.spec.featurize(examples, self.tokenizer, self.labels, self.max_seq_length)
        by_index = head_outputs(self.model, features, self.tokenizer.pad_id,
                                length_sorted_chunks(features, self.batch_size), self.device, self.precision)
        outputs = [by_index[i] for i in range(len(features))]
        predictions = self.spec.postprocess(examples, features, outputs, self.labels)
        if self.threshold is not None and self.spec.choose_threshold is not None:
            predictions = self.spec.apply_threshold(predictions, self.threshold)
        if kind == "span":
            return [p.answer for p in predictions]
        if kind == "token_classification":
            return [_entities(ex, tags, spans, r) for ex, tags, spans, r in zip(examples, predictions, offsets, records)]
        return list(predictions)


def _text(record: Mapping[str, Any], field: str, index: int) -> str:
    value = record.get(field)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        raise InputError(f"input row {index}: missing {field!r}")
    return str(value)


def _entities(example, tags: Sequence[str], spans, record: Mapping[str, Any]) -> list[dict[str, Any]]:
    from bert.tasks.metrics import conll_chunks

    entities = []
    for kind, first, last in conll_chunks(list(tags)):
        if spans is None:  # word indices into the given tokens
            entities.append({"type": kind, "start": first, "end": last + 1, "text": " ".join(example.words[first : last + 1])})
        else:  # character offsets into the given text
            start, end = spans[first][0], spans[last][1]
            entities.append({"type": kind, "start": start, "end": end, "text": str(record["text"])[start:end]})
    return entities
