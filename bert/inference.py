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
Predictions per record, `Predictor.predict` (plain) and `Predictor.predict_records` (what `bertflow predict`
writes and the MLflow model answers; fields per kind in `OUTPUT_FIELDS`):
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
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bert.errors import InputError

TASK_FILE = "bertflow_task.json"
# Input fields (as `Predictor.input_fields` lists them) and `predict_records` output fields, per task kind.
OUTPUT_FIELDS = {"classification": ("label", "probabilities"), "regression": ("score",),
                 "span": ("answer", "start", "end", "score"), "token_classification": ("entities",)}
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
        # a regression head has no labels to read its width from: 1 output (`TaskSpec.head_arguments`)
        width = {"num_labels": 1} if self.spec.kind == "regression" else {}
        self.model = from_pretrained(checkpoint, **width).to(device).eval()
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
        """One plain prediction per record, in order: a label, a float, an answer text or an entity list."""
        if not records:
            return []
        run = self._run(records)
        if run.kind == "span":
            return [p.answer for p in run.predictions]
        if run.kind == "token_classification":
            return [[{k: e[k] for k in ("type", "start", "end", "text")} for e in entities]
                    for entities in self._entities(run, records)]
        return list(run.predictions)

    def predict_records(self, records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """One dict per record, in order, with the fields of `OUTPUT_FIELDS[kind]` (the module docstring)."""
        if not records:
            return []
        run = self._run(records)
        if run.kind == "classification":
            return [{"label": label, "probabilities": dict(zip(self.labels, map(float, _softmax(run.outputs[i]))))}
                    for i, label in enumerate(run.predictions)]
        if run.kind == "regression":
            return [{"score": float(value)} for value in run.predictions]
        if run.kind == "span":
            by_example: dict[int, list[int]] = {}
            for i, feature in enumerate(run.features):
                by_example.setdefault(feature.example_index, []).append(i)
            return [_answer_span(ex, [run.features[i] for i in by_example[n]], [run.outputs[i] for i in by_example[n]], p)
                    for n, (ex, p) in enumerate(zip(run.examples, run.predictions))]
        return [{"entities": entities} for entities in self._entities(run, records)]

    def _run(self, records: Sequence[Mapping[str, Any]]) -> _Run:
        """Featurize the records, run the model, post-process: everything both output forms are made of."""
        kind = self.spec.kind
        examples, offsets = self._examples(records)
        features = self.spec.featurize(examples, self.tokenizer, self.labels, self.max_seq_length)
        by_index = head_outputs(self.model, features, self.tokenizer.pad_id,
                                length_sorted_chunks(features, self.batch_size), self.device, self.precision)
        outputs = [by_index[i] for i in range(len(features))]
        predictions = self.spec.postprocess(examples, features, outputs, self.labels)
        if self.threshold is not None and self.spec.choose_threshold is not None:
            predictions = self.spec.apply_threshold(predictions, self.threshold)
        return _Run(kind, examples, offsets, features, outputs, predictions)

    def _examples(self, records: Sequence[Mapping[str, Any]]) -> tuple[list[Any], list[Any]]:
        """The task's examples for the records, and (NER) each record's word character spans (None: given words)."""
        from bert.tasks import SquadExample, TextExample, TokenExample

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
        return examples, offsets

    def _entities(self, run: _Run, records: Sequence[Mapping[str, Any]]) -> list[list[dict[str, Any]]]:
        """Entities of every record, each with the mean probability of its words' predicted tags as `score`."""
        confidence = [[0.0] * len(ex.words) for ex in run.examples]
        for feature, logits in zip(run.features, run.outputs):
            word_ids = feature.word_ids
            first_piece = (word_ids >= 0) & np.concatenate([[True], word_ids[1:] != word_ids[:-1]])
            positions = np.flatnonzero(first_piece)
            probabilities = _softmax(np.asarray(logits)[positions])
            for w, p in zip(word_ids[positions], probabilities.max(axis=-1)):
                confidence[feature.example_index][int(w)] = float(p)
        return [_entities(ex, tags, spans, r, conf) for ex, tags, spans, r, conf in
                zip(run.examples, run.predictions, run.offsets, records, confidence)]


@dataclass(frozen=True)
class _Run:
    """One `Predictor._run`: the examples, their features and head outputs, and the task's predictions."""

    kind: str
    examples: list[Any]
    offsets: list[Any]
    features: list[Any]
    outputs: list[np.ndarray]
    predictions: list[Any]


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis, computed in float64 (they sum to 1 to rounding)."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _answer_span(example, features: Sequence[Any], outputs: Sequence[np.ndarray], prediction) -> dict[str, Any]:
    """The answer with its character span in the context (end exclusive) and its probability.

    The span is the one `postprocess_squad` chose: the window and token pair whose start + end logits
    give its score and whose text is its text. `score` is softmax(start logits)[start] x
    softmax(end logits)[end] over that window's tokens. No answer (SQuAD 2.0 below the threshold,
    or no valid span): start = end = -1, and `score` is the probability of the null span ([CLS],
    [CLS]) in the first window.
    """
    if prediction.answer:
        for feature, output in zip(features, outputs):
            logits = np.asarray(output, dtype=np.float64)[: len(feature.input_ids)]
            chars = feature.token_to_char
            sums = logits[:, 0][:, None] + logits[:, 1][None, :]
            for s, e in np.argwhere(sums == prediction.score):
                if (chars[s, 0] >= 0 and chars[e, 0] >= 0 and e >= s
                        and example.context[chars[s, 0] : chars[e, 1]] == prediction.text):
                    score = _softmax(logits[:, 0])[s] * _softmax(logits[:, 1])[e]
                    return {"answer": prediction.answer, "start": int(chars[s, 0]), "end": int(chars[e, 1]),
                            "score": float(score)}
        raise RuntimeError(f"question {example.id}: the chosen answer {prediction.text!r} is in none of its windows")
    logits = np.asarray(outputs[0], dtype=np.float64)[: len(features[0].input_ids)]
    return {"answer": "", "start": -1, "end": -1,
            "score": float(_softmax(logits[:, 0])[0] * _softmax(logits[:, 1])[0])}


def _text(record: Mapping[str, Any], field: str, index: int) -> str:
    value = record.get(field)
    if value is None or (isinstance(value, float) and np.isnan(value)):
        raise InputError(f"input row {index}: missing {field!r}")
    return str(value)


def _entities(example, tags: Sequence[str], spans, record: Mapping[str, Any],
              confidence: Sequence[float]) -> list[dict[str, Any]]:
    from bert.tasks.metrics import conll_chunks

    entities = []
    for kind, first, last in conll_chunks(list(tags)):
        score = float(np.mean(confidence[first : last + 1]))
        if spans is None:  # word indices into the given tokens
            entities.append({"type": kind, "start": first, "end": last + 1,
                             "text": " ".join(example.words[first : last + 1]), "score": score})
        else:  # character offsets into the given text
            start, end = spans[first][0], spans[last][1]
            entities.append({"type": kind, "start": start, "end": end, "text": str(record["text"])[start:end],
                             "score": score})
    return entities
