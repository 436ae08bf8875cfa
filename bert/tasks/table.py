"""The task table: every fine-tuning task is one row, and one generic fine-tune function reads it.

A row says how to read the task's directory, which text fields it encodes, what kind of labels
it has, how to turn examples into features and model outputs back into predictions, and how to
score them. The fine-tune job does, for any row:

    spec = get_task(name)
    data = spec.reader(data_dir)                       # TaskData: train, evals, labels, skipped
    train = spec.featurize(data.train, tokenizer, data.labels, spec.max_seq_length)
    head width = spec.num_outputs(data.labels); model inputs per batch = collate(batch, pad_id)
    ... train ...
    for split, examples in data.evals.items():
        features = spec.featurize(examples, tokenizer, data.labels, spec.max_seq_length)
        outputs = [one head output per feature, in feature order]
        predictions = spec.postprocess(examples, features, outputs, data.labels)   # one per example
        if spec.choose_threshold:  # SQuAD 2.0: the no-answer threshold, chosen on the primary split
            predictions = spec.apply_threshold(predictions, threshold)
        metrics |= spec.score(split, predictions, examples)  # {"<split>/<metric>": value}
    best checkpoint: the highest metrics[spec.primary_metric]

Primary metrics follow the BERT paper's GLUE table: F1 for MRPC and QQP, Spearman for STS-B,
Matthews correlation for CoLA, matched accuracy for MNLI, accuracy elsewhere; entity F1 on the
validation file for CoNLL-2003; F1 for SQuAD.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Literal

from bert.errors import InputError
from bert.tasks import metrics
from bert.tasks.featurize import class_predictions, featurize_pairs, regression_predictions
from bert.tasks.kinds import KINDS, Field, KindSpec
from bert.tasks.ner import featurize_ner, word_predictions
from bert.tasks.readers import (
    SquadExample,
    TaskData,
    TextExample,
    TokenExample,
    TsvColumns,
    read_conll_task,
    read_squad_dev_split_task,
    read_squad_task,
    read_tsv_task,
)
from bert.tasks.squad import SpanPrediction, featurize_squad, postprocess_squad, with_null_threshold

# The SQuAD 2.0 "no answer" margin (null score - best span score) before one is chosen on dev.
SQUAD_V2_NULL_THRESHOLD = 0.0


@dataclass(frozen=True)
class TaskSpec:
    """One row of the task table.

    reader: task directory -> TaskData. text_fields: the fields encoded as segment A (and B).
    featurize: (examples, tokenizer, labels, max_seq_length) -> features, one or more per example.
    postprocess: (examples, features, outputs, labels) -> one prediction per example.
    metric: (predictions, examples) -> {metric name: value}.
    primary_metric: "<eval split>/<metric name>", the number that picks the best checkpoint
    (higher is better). subdir: the task's folder under a datasets root (GLUE download layout).
    choose_threshold: (predictions, examples) -> a decision threshold picked on the primary
    eval split and applied with `apply_threshold` (SQuAD 2.0: the no-answer threshold); None
    for tasks without one. positive_label: the class whose F1 the metric reports (MRPC, QQP: "1").
    """

    name: str
    kind: str  # a row of `bert.tasks.kinds.KINDS`
    subdir: str
    reader: Callable[[str | Path], TaskData]
    text_fields: tuple[str | int, ...]
    featurize: Callable[..., list[Any]]
    postprocess: Callable[..., list[Any]]
    metric: Callable[[Sequence[Any], Sequence[Any]], dict[str, float]]
    primary_metric: str
    max_seq_length: int
    choose_threshold: Callable[[Sequence[Any], Sequence[Any]], float] | None = None
    positive_label: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"task {self.name}: kind {self.kind!r} is not one of {tuple(KINDS)}")
        if "/" not in self.primary_metric:
            raise InputError(f"task {self.name}: primary_metric {self.primary_metric!r} must be '<split>/<metric>'")

    @property
    def kind_spec(self) -> KindSpec:
        """The row of this task's kind: head, collate, records, inference adapters (`bert.tasks.kinds`)."""
        return KINDS[self.kind]

    @property
    def head(self) -> str:
        """The model head this task trains (`bert.model.HEADS`)."""
        return self.kind_spec.head

    def head_arguments(self, labels: Sequence[str]) -> dict[str, Any]:
        """What `bert.checkpoint.from_pretrained` needs to build the head: the labels, or its width."""
        return self.kind_spec.head_arguments(labels)

    def num_outputs(self, labels: Sequence[str]) -> int:
        """Width of the task head: one logit per label, 1 for regression, 2 (start, end) for spans."""
        return self.kind_spec.num_outputs(labels)

    @property
    def inputs(self) -> tuple[tuple[Field, ...], ...]:
        """The record fields this task's model reads (each a tuple of alternatives): the kind's, less the
        second text of a single-sentence task."""
        pair = len(self.text_fields) == 2
        return tuple(slot for slot in self.kind_spec.inputs if pair or not slot[0].pair)

    @property
    def input_names(self) -> tuple[str, ...]:
        """Every input field name this task's model may read."""
        return tuple(f.name for slot in self.inputs for f in slot)

    def input_example(self) -> dict[str, Any]:
        """One input record for this task (the kind's example, the fields this task reads)."""
        return {k: v for k, v in self.kind_spec.input_example.items() if k in self.input_names}

    def apply_threshold(self, predictions: Sequence[Any], threshold: float) -> list[Any]:
        """Predictions re-decided at `threshold` (only for rows with `choose_threshold`)."""
        if self.choose_threshold is None:
            raise InputError(f"task {self.name} has no decision threshold")
        return with_null_threshold(predictions, threshold)

    def score(self, split: str, predictions: Sequence[Any], examples: Sequence[Any]) -> dict[str, float]:
        """The task's metrics on one eval split, named "<split>/<metric>"."""
        if len(predictions) != len(examples):
            raise InputError(
                f"task {self.name}, split {split}: {len(predictions)} predictions for {len(examples)} examples"
            )
        return {f"{split}/{name}": value for name, value in self.metric(predictions, examples).items()}


# ----------------------------------------------------------------------------- metric adapters


def accuracy_metric(predictions: Sequence[str], examples: Sequence[TextExample]) -> dict[str, float]:
    """{"accuracy"} of predicted labels."""
    return {"accuracy": metrics.accuracy(predictions, [ex.label for ex in examples])}


def f1_accuracy_metric(
    predictions: Sequence[str], examples: Sequence[TextExample], positive: str = "1"
) -> dict[str, float]:
    """{"f1", "accuracy"}: F1 of the `positive` class ("1": MRPC paraphrase, QQP duplicate) and accuracy."""
    gold = [ex.label for ex in examples]
    return {"f1": metrics.binary_f1(predictions, gold, positive=positive), "accuracy": metrics.accuracy(predictions, gold)}


def matthews_metric(predictions: Sequence[str], examples: Sequence[TextExample]) -> dict[str, float]:
    """{"matthews_corrcoef"} (CoLA)."""
    return {"matthews_corrcoef": metrics.matthews_corrcoef(predictions, [ex.label for ex in examples])}


def correlation_metric(predictions: Sequence[float], examples: Sequence[TextExample]) -> dict[str, float]:
    """{"pearson", "spearman"} of predicted and gold scores (STS-B)."""
    gold = [float(ex.label) for ex in examples]
    return {"pearson": metrics.pearson(predictions, gold), "spearman": metrics.spearman(predictions, gold)}


def entity_metric(predictions: Sequence[Sequence[str]], examples: Sequence[TokenExample]) -> dict[str, float]:
    """conlleval scores: overall "precision", "recall", "f1", token "accuracy", and "<TYPE>_f1" etc."""
    scores = metrics.conlleval(predictions, [ex.tags for ex in examples])
    result = {
        "precision": scores.overall.precision,
        "recall": scores.overall.recall,
        "f1": scores.overall.f1,
        "accuracy": scores.accuracy,
    }
    for kind, chunk in scores.per_type.items():
        result |= {f"{kind}_precision": chunk.precision, f"{kind}_recall": chunk.recall, f"{kind}_f1": chunk.f1}
    return result


def squad_v1_metric(predictions: Sequence[SpanPrediction], examples: Sequence[SquadExample]) -> dict[str, float]:
    """Official SQuAD v1.1 {"exact_match", "f1"} (0-100)."""
    return metrics.squad_v1_scores(
        {ex.id: p.answer for ex, p in zip(examples, predictions)},
        {ex.id: [a.text for a in ex.answers] for ex in examples},
    )


def squad_v2_metric(predictions: Sequence[SpanPrediction], examples: Sequence[SquadExample]) -> dict[str, float]:
    """Official SQuAD v2.0 scores (0-100) of the predictions' answers, plus the script's threshold search.

    "exact", "f1", HasAns_* and NoAns_* score each prediction's `answer` (already decided at its
    no-answer threshold). "best_exact"/"best_f1" and their "_thresh" values score the best
    non-null texts with the null odds as the script's na_probs, so the search sees every
    question's span whatever threshold decided the answers.
    """
    gold = {ex.id: [a.text for a in ex.answers] for ex in examples}
    scores = metrics.squad_v2_scores({ex.id: p.answer for ex, p in zip(examples, predictions)}, gold)
    search = metrics.squad_v2_scores(
        {ex.id: p.text for ex, p in zip(examples, predictions)},
        gold,
        na_probs={ex.id: p.null_odds for ex, p in zip(examples, predictions)},
        na_prob_thresh=math.inf,
    )
    return scores | {k: search[k] for k in ("best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh")}


def choose_null_threshold(predictions: Sequence[SpanPrediction], examples: Sequence[SquadExample]) -> float:
    """The SQuAD 2.0 no-answer threshold (on null odds) with the best official F1 on these examples.

    The official script's search (`find_best_thresh` over the null odds). Where answering no
    question beats every threshold it tries, the script reports 0.0, which for null odds (any
    real number, not a probability) need not mean "no answer everywhere"; here the threshold is
    then put below every question's null odds, so that applying it reproduces the best score.
    """
    texts = {ex.id: p.text for ex, p in zip(examples, predictions)}
    odds = {ex.id: p.null_odds for ex, p in zip(examples, predictions)}
    has_answer, _, f1_raw = metrics.squad_v2_raw_scores(texts, {ex.id: [a.text for a in ex.answers] for ex in examples})
    best, threshold = metrics.find_best_thresh(texts, f1_raw, odds, has_answer)
    start = 100.0 * sum(not has for has in has_answer.values()) / len(has_answer)
    if best == start:
        threshold = min(odds.values()) - 1.0
    return float(threshold)


# ----------------------------------------------------------------------------- the table


def tsv_task(
    name: str,
    subdir: str,
    columns: TsvColumns,
    *,
    kind: Literal["classification", "regression"] = "classification",
    metric: Callable[[Sequence[Any], Sequence[Any]], dict[str, float]] = accuracy_metric,
    primary_metric: str = "dev/accuracy",
    train_file: str = "train.tsv",
    eval_files: Sequence[str] = ("dev.tsv",),
    max_seq_length: int = 128,
    positive_label: str | None = None,
) -> TaskSpec:
    """A row for any sentence(-pair) task stored as GLUE-style TSV files, with your column mapping.

    The eval splits are named after the eval file stems ("dev.tsv" -> "dev").
    """
    return TaskSpec(
        name=name,
        kind=kind,
        subdir=subdir,
        reader=partial(read_tsv_task, columns=columns, kind=kind, train_file=train_file, eval_files=tuple(eval_files)),
        text_fields=(columns.text_a,) if columns.text_b is None else (columns.text_a, columns.text_b),
        featurize=featurize_pairs,
        postprocess=regression_predictions if kind == "regression" else class_predictions,
        metric=metric,
        primary_metric=primary_metric,
        max_seq_length=max_seq_length,
        positive_label=positive_label,
    )


def _squad_row(name: str, subdir: str, reader: Callable[[str | Path], TaskData], version_2: bool) -> TaskSpec:
    return TaskSpec(
        name=name,
        kind="span",
        subdir=subdir,
        reader=reader,
        text_fields=("question", "context"),
        featurize=partial(featurize_squad, doc_stride=128, max_query_length=64),
        postprocess=partial(
            postprocess_squad,
            n_best_size=20,
            max_answer_length=30,
            version_2_with_negative=version_2,
            null_score_diff_threshold=SQUAD_V2_NULL_THRESHOLD,
        ),
        metric=squad_v2_metric if version_2 else squad_v1_metric,
        primary_metric="dev/f1",
        max_seq_length=384,
        choose_threshold=choose_null_threshold if version_2 else None,
    )


_ROWS = (
    # GLUE, in the official TSV layouts (download_glue_data.py). CoLA train/dev have no header:
    # source, label, original label, sentence.
    tsv_task(
        "cola",
        "glue/CoLA",
        TsvColumns(text_a=3, label=1, header=False),
        metric=matthews_metric,
        primary_metric="dev/matthews_corrcoef",
    ),
    tsv_task("sst2", "glue/SST-2", TsvColumns(text_a="sentence", label="label")),
    tsv_task(
        "mrpc",
        "glue/MRPC",
        TsvColumns(text_a="#1 String", text_b="#2 String", label="Quality"),
        metric=f1_accuracy_metric,
        primary_metric="dev/f1",
        positive_label="1",
    ),
    tsv_task(
        "stsb",
        "glue/STS-B",
        TsvColumns(text_a="sentence1", text_b="sentence2", label="score", id="index"),
        kind="regression",
        metric=correlation_metric,
        primary_metric="dev/spearman",
    ),
    tsv_task(
        "qqp",
        "glue/QQP",
        TsvColumns(text_a="question1", text_b="question2", label="is_duplicate", id="id"),
        metric=f1_accuracy_metric,
        primary_metric="dev/f1",
        positive_label="1",
    ),
    tsv_task(
        "mnli",
        "glue/MNLI",
        TsvColumns(text_a="sentence1", text_b="sentence2", label="gold_label", id="index"),
        eval_files=("dev_matched.tsv", "dev_mismatched.tsv"),
        primary_metric="dev_matched/accuracy",
    ),
    tsv_task("qnli", "glue/QNLI", TsvColumns(text_a="question", text_b="sentence", label="label", id="index")),
    tsv_task("rte", "glue/RTE", TsvColumns(text_a="sentence1", text_b="sentence2", label="label", id="index")),
    tsv_task("wnli", "glue/WNLI", TsvColumns(text_a="sentence1", text_b="sentence2", label="label", id="index")),
    # CoNLL-2003 English NER: word in the first column, tag in the last; scored on valid and test.
    TaskSpec(
        name="conll2003",
        kind="token_classification",
        subdir="conll2003",
        reader=read_conll_task,
        text_fields=("words",),
        featurize=featurize_ner,
        postprocess=word_predictions,
        metric=entity_metric,
        primary_metric="valid/f1",
        max_seq_length=128,
    ),
    # SQuAD: the standard train/dev files, and this project's split of the v1.1 dev file by article
    # (v1.1 train is not available here): first 24 articles train, the other 24 eval.
    _squad_row(
        "squad_v1",
        "squad_v1.1",
        partial(read_squad_task, train_file="train-v1.1.json", eval_file="dev-v1.1.json"),
        False,
    ),
    _squad_row("squad_v1_dev_split", "squad_v1.1", read_squad_dev_split_task, False),
    _squad_row(
        "squad_v2",
        "squad_v2.0",
        partial(read_squad_task, train_file="train-v2.0.json", eval_file="dev-v2.0.json"),
        True,
    ),
)

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in _ROWS}

# ----------------------------------------------------------------------------- your own TSV task, by name

TSV_PREFIX = "tsv:"
TSV_TASK_HELP = (
    "a TSV task is named 'tsv:text=COL[,pair=COL],label=COL[,id=COL][,kind=classification|regression]"
    "[,metric=accuracy|f1|matthews|correlation][,positive=LABEL][,header=yes|no][,train=FILE][,eval=FILE[+FILE...]]' "
    "where COL is a header name or a 0-based column index"
)
_TSV_KEYS = ("text", "pair", "label", "id", "kind", "metric", "positive", "header", "train", "eval")
_TSV_METRICS: dict[str, tuple[Callable[..., dict[str, float]], str, str]] = {
    # name: (metric, primary metric name, label kind it scores)
    "accuracy": (accuracy_metric, "accuracy", "classification"),
    "f1": (f1_accuracy_metric, "f1", "classification"),
    "matthews": (matthews_metric, "matthews_corrcoef", "classification"),
    "correlation": (correlation_metric, "spearman", "regression"),
}


@lru_cache(maxsize=64)
def parse_tsv_task(name: str) -> TaskSpec:
    """The row of a TSV dataset in GLUE's shapes with your column mapping, described by its name.

    `tsv:text=#1 String,pair=#2 String,label=Quality,metric=f1` is MRPC's row; the name is the
    whole description, so it travels wherever a task name does (configs, pipeline specs, Ray
    workers, the fine-tuned checkpoint's `bertflow_task.json`, `bertflow predict`). Defaults:
    classification, accuracy (correlation for regression), header=yes, train=train.tsv,
    eval=dev.tsv; the primary metric is the first eval file's. A column given as digits is a
    0-based index; with header=no every column must be one.
    """
    fields: dict[str, str] = {}
    for item in name[len(TSV_PREFIX) :].split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not value:
            raise InputError(f"task {name!r}: {item!r} is not KEY=VALUE; {TSV_TASK_HELP}")
        if key not in _TSV_KEYS:
            raise InputError(f"task {name!r}: unknown key {key!r}; known keys: {', '.join(_TSV_KEYS)}")
        if key in fields:
            raise InputError(f"task {name!r}: {key!r} given twice")
        fields[key] = value
    for key in ("text", "label"):
        if key not in fields:
            raise InputError(f"task {name!r}: no {key}=COL; {TSV_TASK_HELP}")
    header = fields.get("header", "yes")
    if header not in ("yes", "no"):
        raise InputError(f"task {name!r}: header must be yes or no, got {header!r}")
    kind = fields.get("kind", "classification")
    if kind not in ("classification", "regression"):
        raise InputError(f"task {name!r}: kind must be classification or regression, got {kind!r}")
    metric_name = fields.get("metric", "accuracy" if kind == "classification" else "correlation")
    if metric_name not in _TSV_METRICS:
        raise InputError(f"task {name!r}: unknown metric {metric_name!r}; known: {', '.join(_TSV_METRICS)}")
    metric, primary, scores_kind = _TSV_METRICS[metric_name]
    if scores_kind != kind:
        raise InputError(f"task {name!r}: metric {metric_name} scores {scores_kind} labels, but kind={kind}")
    positive = fields.get("positive")
    if positive is not None:
        if metric_name != "f1":
            raise InputError(f"task {name!r}: positive=LABEL only goes with metric=f1")
        metric = partial(f1_accuracy_metric, positive=positive)
    elif metric_name == "f1":
        positive = "1"

    def column(key: str) -> str | int | None:
        value = fields.get(key)
        return int(value) if value is not None and value.isdigit() else value

    columns = TsvColumns(text_a=column("text"), label=column("label"), text_b=column("pair"), id=column("id"),
                         header=header == "yes")
    eval_files = tuple(fields.get("eval", "dev.tsv").split("+"))
    if any(not f for f in eval_files) or len({Path(f).stem for f in eval_files}) != len(eval_files):
        raise InputError(f"task {name!r}: eval files must be named, with distinct stems, got {fields.get('eval')!r}")
    return tsv_task(name, "", columns, kind=kind, metric=metric, primary_metric=f"{Path(eval_files[0]).stem}/{primary}",
                    train_file=fields.get("train", "train.tsv"), eval_files=eval_files, positive_label=positive)


def get_task(name: str) -> TaskSpec:
    """The row for `name` (a table row, or a `tsv:` description); an unknown name is an InputError listing the known tasks."""
    if name.startswith(TSV_PREFIX):
        return parse_tsv_task(name)
    try:
        return TASKS[name]
    except KeyError:
        raise InputError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}, or {TSV_TASK_HELP}") from None
