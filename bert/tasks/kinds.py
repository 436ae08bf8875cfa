"""Task kinds: one row per kind holds everything that differs between classification, regression, token
classification (NER) and span extraction (SQuAD), so that nothing outside the table switches on a kind.

A task row (`bert.tasks.table.TaskSpec`) names its kind; the kind's row (`KindSpec`) says

    training    head (a name in `bert.model.HEADS`), head_arguments(labels) for `from_pretrained`, the
                head's output width num_outputs(labels), the least number of labels (min_labels), the
                feature type its featurizers make and its collate(features, pad_id) -> model keyword
                arguments, feature_length(feature) (what length grouping sorts on), and whether a
                majority-class baseline means anything (majority_baseline)
    evaluation  prediction_record(example, prediction) -> the fields of a `predictions.jsonl` line
    inference   inputs: the record fields a model reads (each a tuple of alternatives, the first present
                one taken; `pair` fields only for sentence-pair tasks), outputs: the fields it answers,
                input_example: one record, examples(records, fields, labels) -> (examples, extras),
                answers(run, records, labels) -> one dict of `outputs` per record, plain(...) -> one
                plain prediction per record, load_arguments for `from_pretrained` of a saved checkpoint

`bert.inference.Predictor`, `bertflow predict`'s columns, the MLflow signature and input example
(`pipelines/models.py`) and the fine-tune job read these rows. A new kind is one `register_kind(KindSpec(...))`
with its head in `bert.model.HEADS` (and `bert.checkpoint`'s head map); tests/test_tasks_kinds.py adds
multiple choice that way, in one place. Field types, for the MLflow signature: "string", "long", "double",
("array", T), ("object", ((name, T), ...)), or ("per_label", T) (an object with one T per label).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from bert.errors import InputError
from bert.tasks import featurize, ner, squad
from bert.tasks.featurize import PairFeature
from bert.tasks.ner import TokenFeature
from bert.tasks.squad import SpanFeature


@dataclass(frozen=True)
class Field:
    """A named value of a record: an input the model reads or an output it answers."""

    name: str
    type: Any = "string"
    pair: bool = False  # an input only sentence-pair tasks read


@dataclass(frozen=True)
class InferenceRun:
    """Raw records run through a task: examples (and the kind's extras), features, head outputs, predictions."""

    examples: list[Any]
    extras: list[Any]
    features: list[Any]
    outputs: list[np.ndarray]
    predictions: list[Any]


def input_length(feature: Any) -> int:
    """Tokens of a feature with (T,) inputs."""
    return len(feature.input_ids)


@dataclass(frozen=True)
class KindSpec:
    """One row of the kind table (module docstring)."""

    name: str
    head: str
    head_arguments: Callable[[Sequence[str]], dict[str, Any]]
    num_outputs: Callable[[Sequence[str]], int]
    feature_type: type
    collate: Callable[[Sequence[Any], int], dict[str, torch.Tensor]]
    prediction_record: Callable[[Any, Any], dict[str, Any]]
    inputs: tuple[tuple[Field, ...], ...]
    outputs: tuple[Field, ...]
    input_example: Mapping[str, Any]
    examples: Callable[..., tuple[list[Any], list[Any]]]
    answers: Callable[..., list[dict[str, Any]]]
    plain: Callable[..., list[Any]]
    feature_length: Callable[[Any], int] = input_length
    load_arguments: Mapping[str, Any] = field(default_factory=dict)
    min_labels: int = 0
    majority_baseline: bool = False

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.outputs)


def _labels(labels: Sequence[str]) -> dict[str, Any]:
    return {"labels": tuple(labels)}


_TEXT = ((Field("text"),), (Field("text_pair", pair=True),))
_PAIR_EXAMPLE = "The movie delighted its audience from the first scene to the last."

KINDS: dict[str, KindSpec] = {}


def register_kind(kind: KindSpec) -> KindSpec:
    """Add a kind to the table; every consumer (fine-tuning, inference, predict, MLflow models) reads it from here."""
    if kind.name in KINDS:
        raise InputError(f"task kind {kind.name!r} is already registered")
    KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> KindSpec:
    try:
        return KINDS[name]
    except KeyError:
        raise InputError(f"unknown task kind {name!r}; known kinds: {', '.join(KINDS)}") from None


def kind_of_feature(feature: Any) -> KindSpec:
    """The (first registered) kind whose featurizers make features of this type: its collate and length serve."""
    for kind in KINDS.values():
        if type(feature) is kind.feature_type:
            return kind
    raise InputError(f"no task kind makes features of type {type(feature).__name__}")


def collate(features: Sequence[Any], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest sequence and stack it into the model's keyword arguments (the kind's collate).

    Always `input_ids`, `token_type_ids`, `attention_mask`; then the training targets of the kind:
    `labels` (B,) for sentence tasks (long, or float for regression), `labels` (B, T) padded with
    IGNORE_INDEX for token tasks, `start_positions` / `end_positions` (B,) for spans.
    """
    if not features:
        raise InputError("collate: empty batch")
    types = {type(f) for f in features}
    if len(types) != 1:
        raise InputError(f"collate: a batch mixes feature types {sorted(t.__name__ for t in types)}")
    return kind_of_feature(features[0]).collate(features, pad_id)


def feature_length(feature: Any) -> int:
    """What length grouping and inference batching sort a feature by (its kind's `feature_length`)."""
    return kind_of_feature(feature).feature_length(feature)


def _sentence_kind(name: str, **row: Any) -> KindSpec:
    return KindSpec(name=name, head="sequence_classification", feature_type=PairFeature,
                    collate=featurize.collate_pairs, inputs=_TEXT, examples=featurize.text_examples, **row)


register_kind(_sentence_kind(
    "classification", head_arguments=_labels, num_outputs=len, prediction_record=featurize.class_record,
    outputs=(Field("label"), Field("probabilities", ("per_label", "double"))),
    input_example={"text": "The film was a delight from start to finish.", "text_pair": _PAIR_EXAMPLE},
    answers=featurize.label_answers, plain=featurize.plain_predictions, min_labels=2, majority_baseline=True))
register_kind(_sentence_kind(
    "regression", head_arguments=lambda labels: {"num_labels": 1}, num_outputs=lambda labels: 1,
    prediction_record=featurize.value_record, outputs=(Field("score", "double"),),
    input_example={"text": "A man is playing a guitar.", "text_pair": _PAIR_EXAMPLE},
    answers=featurize.score_answers, plain=featurize.plain_predictions, load_arguments={"num_labels": 1}))
_ENTITY = ("object", (("type", "string"), ("start", "long"), ("end", "long"), ("text", "string"), ("score", "double")))
register_kind(KindSpec(
    "token_classification", head="token_classification", head_arguments=_labels, num_outputs=len,
    feature_type=TokenFeature, collate=ner.collate_tokens, prediction_record=ner.tags_record,
    inputs=((Field("tokens", ("array", "string")), Field("text")),),  # words, or a text split into words
    outputs=(Field("entities", ("array", _ENTITY)),),
    input_example={"text": "Peter Blackburn reports from Brussels for the European Commission."},
    examples=ner.word_examples, answers=ner.entity_answers, plain=ner.plain_entities, min_labels=2))
register_kind(KindSpec(
    "span", head="question_answering", head_arguments=lambda labels: {}, num_outputs=lambda labels: 2,
    feature_type=SpanFeature, collate=squad.collate_spans, prediction_record=squad.span_record,
    inputs=((Field("question"),), (Field("context"),)),
    outputs=(Field("answer"), Field("start", "long"), Field("end", "long"), Field("score", "double")),
    input_example={"question": "Who gave their name to Normandy?",
                   "context": "The Normans were the people who in the 10th and 11th centuries gave their name to "
                              "Normandy."},
    examples=squad.question_examples, answers=squad.answer_spans, plain=squad.plain_answers))
