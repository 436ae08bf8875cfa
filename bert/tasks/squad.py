"""SQuAD features and answer extraction, following the original BERT `run_squad.py`.

Featurization: the question is tokenized and cut to `max_query_length` tokens; the context is
tokenized once, with character offsets, and a window of `max_seq_length - len(question) - 3`
context tokens slides over it, each window starting `doc_stride` tokens after the previous one
(as in the original: the stride is the step, so consecutive windows overlap). Each window is
one feature `[CLS] question [SEP] context window [SEP]`, with the answer's start and end token
inside it, or 0 ([CLS]) when the answer is not wholly inside it or the question has none.
The answer's tokens are found from its character span: the first token ending after its start,
the last token beginning before its end. Every feature keeps, for each token, the character
span it covers in the context, and whether this window gives the token its most context.

Post-processing: for each feature the `n_best_size` highest start and end logits form candidate
spans; a span counts if both ends are context tokens, start <= end, it is at most
`max_answer_length` tokens long and its start has its most context in this window. The best
span over all the example's features is cut from the original context by character offsets.
For SQuAD 2.0 its score is compared with the null score (the lowest [CLS] start + end over the
windows): "no answer" when null score - best score > `null_score_diff_threshold`. The original
leaves that threshold to a flag tuned by hand on dev; the fine-tune job chooses it on dev after
every epoch (`bert.tasks.table.choose_null_threshold`) and stores it with the checkpoint.

Deviations from the original, both deliberate: answer tokens come from character offsets
rather than whitespace tokens plus `_improve_answer_span`, and an example with no valid span at
all predicts "" (the original writes the text "empty").
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bert.errors import InputError
from bert.tasks.featurize import json_number, pad_inputs, record_text, softmax
from bert.tasks.readers import SquadExample
from bert.tokenizer import Encoding, Tokenizer

ENCODE_CHUNK = 1024  # questions or contexts per tokenizer call: bounds the memory of full encodings


@dataclass(frozen=True, eq=False)
class SpanFeature:
    """One window of a SQuAD example.

    `token_to_char[t]` is the (start, end) character span of token t in the example's context,
    (-1, -1) for question and special tokens; `max_context[t]` says whether this window is the
    one where context token t has the most context on both sides (the original's rule).
    """

    example_index: int
    input_ids: np.ndarray  # (T,) int32
    token_type_ids: np.ndarray  # (T,) int8
    start_position: int
    end_position: int
    token_to_char: np.ndarray  # (T, 2) int32
    max_context: np.ndarray  # (T,) bool


def _windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int]]:
    """The original's doc spans: (start, length) windows over the context tokens."""
    spans = []
    start = 0
    while True:
        length = min(n_tokens - start, window)
        spans.append((start, length))
        if start + length >= n_tokens:
            return spans
        start += min(length, stride)


def _max_context(spans: list[tuple[int, int]], n_tokens: int) -> np.ndarray:
    """For each context token, the index of the span where min(left, right context) + 0.01 * length is largest."""
    position = np.arange(n_tokens)
    scores = np.full((len(spans), n_tokens), -np.inf)
    for i, (start, length) in enumerate(spans):
        inside = (position >= start) & (position < start + length)
        left, right = position - start, start + length - 1 - position
        scores[i, inside] = np.minimum(left, right)[inside] + 0.01 * length
    return np.argmax(scores, axis=0)  # first best span on ties, as the original


def _answer_tokens(offsets: np.ndarray, start_char: int, end_char: int) -> tuple[int, int] | None:
    """First token ending after `start_char` and last token starting before `end_char`, or None."""
    first = int(np.searchsorted(offsets[:, 1], start_char, side="right"))
    last = int(np.searchsorted(offsets[:, 0], end_char, side="left")) - 1
    if first >= len(offsets) or last < first:
        return None
    return first, last


def _encode(tokenizer: Tokenizer, texts: list[str]) -> Iterator[Encoding]:
    """Encodings of `texts` without special tokens, ENCODE_CHUNK texts per tokenizer call."""
    for start in range(0, len(texts), ENCODE_CHUNK):
        yield from tokenizer.encode_batch(texts[start : start + ENCODE_CHUNK], add_special_tokens=False)


def featurize_squad(
    examples: Sequence[SquadExample],
    tokenizer: Tokenizer,
    labels: Sequence[str] = (),
    max_seq_length: int = 384,
    *,
    doc_stride: int = 128,
    max_query_length: int = 64,
) -> list[SpanFeature]:
    """Encode questions and sliding context windows; the answer position uses the first answer.

    `labels` is unused (span tasks have no label set); it keeps the task table's signature.
    """
    if doc_stride < 1 or max_query_length < 1 or max_seq_length - max_query_length - 3 < 1:
        raise InputError(
            f"need doc_stride >= 1 and max_seq_length > max_query_length + 3; got doc_stride={doc_stride}, "
            f"max_query_length={max_query_length}, max_seq_length={max_seq_length}"
        )
    if not examples:
        return []
    queries = [enc.ids[:max_query_length] for enc in _encode(tokenizer, [ex.question for ex in examples])]
    contexts = list(dict.fromkeys(ex.context for ex in examples))  # each paragraph is tokenized once
    encoded = {
        context: (np.asarray(enc.ids, dtype=np.int32), np.asarray(enc.offsets, dtype=np.int32).reshape(-1, 2))
        for context, enc in zip(contexts, _encode(tokenizer, contexts))
    }
    sep = np.asarray([tokenizer.sep_id], dtype=np.int32)
    features: list[SpanFeature] = []
    for index, (ex, query) in enumerate(zip(examples, queries)):
        context_ids, offsets = encoded[ex.context]
        prefix = np.asarray([tokenizer.cls_id, *query, tokenizer.sep_id], dtype=np.int32)
        answer = None
        if ex.answers:
            first = ex.answers[0]
            answer = _answer_tokens(offsets, first.start, first.start + len(first.text))
        spans = _windows(len(context_ids), max_seq_length - len(query) - 3, doc_stride)
        best_span = _max_context(spans, len(context_ids))
        for span_index, (start, length) in enumerate(spans):
            n = len(prefix) + length + 1
            input_ids = np.concatenate([prefix, context_ids[start : start + length], sep])
            token_type_ids = np.zeros(n, dtype=np.int8)
            token_type_ids[len(prefix) :] = 1
            token_to_char = np.full((n, 2), -1, dtype=np.int32)
            token_to_char[len(prefix) : len(prefix) + length] = offsets[start : start + length]
            max_context = np.zeros(n, dtype=bool)
            max_context[len(prefix) : len(prefix) + length] = best_span[start : start + length] == span_index
            start_position = end_position = 0
            if answer is not None and start <= answer[0] and answer[1] < start + length:
                start_position = len(prefix) + answer[0] - start
                end_position = len(prefix) + answer[1] - start
            features.append(
                SpanFeature(index, input_ids, token_type_ids, start_position, end_position, token_to_char, max_context)
            )
    return features


@dataclass(frozen=True)
class SpanPrediction:
    """The answer for one example.

    `text` is the best non-null span (start + end logit `score`; "" and -inf when no span is
    valid); `null_odds` = null score - `score` (SQuAD 2.0's "na_prob"); `answer` is what the
    model answers: `text`, or "" for SQuAD 2.0 when `null_odds` exceeds the threshold.
    """

    text: str
    score: float
    null_odds: float
    answer: str


def postprocess_squad(
    examples: Sequence[SquadExample],
    features: Sequence[SpanFeature],
    outputs: Sequence[np.ndarray],
    labels: Sequence[str] = (),
    *,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    version_2_with_negative: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> list[SpanPrediction]:
    """Pick each example's best answer span over all its windows.

    `outputs[i]` is the (T', 2) start / end logits of `features[i]` (T' >= its length; padding
    ignored). `labels` is unused; it keeps the task table's signature.
    """
    if len(outputs) != len(features):
        raise InputError(f"{len(outputs)} outputs for {len(features)} features: pass one output per feature, in order")
    by_example: dict[int, list[int]] = defaultdict(list)
    for i, feature in enumerate(features):
        by_example[feature.example_index].append(i)
    predictions = []
    for index, ex in enumerate(examples):
        if index not in by_example:
            raise InputError(f"question {ex.id}: no feature")
        best_score, best_text = -math.inf, ""
        null_score = math.inf
        for i in by_example[index]:
            feature = features[i]
            logits = np.asarray(outputs[i], dtype=np.float64)[: len(feature.input_ids)]
            start_logits, end_logits = logits[:, 0], logits[:, 1]
            null_score = min(null_score, start_logits[0] + end_logits[0])
            starts = np.argsort(-start_logits, kind="stable")[:n_best_size]
            ends = np.argsort(-end_logits, kind="stable")[:n_best_size]
            for s in starts:
                if feature.token_to_char[s, 0] < 0 or not feature.max_context[s]:
                    continue
                for e in ends:
                    if feature.token_to_char[e, 0] < 0 or e < s or e - s + 1 > max_answer_length:
                        continue
                    score = start_logits[s] + end_logits[e]
                    if score > best_score:
                        best_score = float(score)
                        best_text = ex.context[feature.token_to_char[s, 0] : feature.token_to_char[e, 1]]
        null_odds = float(null_score) - best_score
        answer = "" if version_2_with_negative and null_odds > null_score_diff_threshold else best_text
        predictions.append(SpanPrediction(best_text, best_score, null_odds, answer))
    return predictions


def with_null_threshold(predictions: Sequence[SpanPrediction], threshold: float) -> list[SpanPrediction]:
    """SQuAD 2.0 answers re-decided at another threshold: "" where `null_odds` > `threshold`, else the best span."""
    return [
        SpanPrediction(p.text, p.score, p.null_odds, "" if p.null_odds > threshold else p.text) for p in predictions
    ]


# ----------------------------------------------------------------------------- batches, records and raw input


def collate_spans(features: Sequence[SpanFeature], pad_id: int) -> dict[str, torch.Tensor]:
    """The padded inputs and the answer's `start_positions` / `end_positions` (B,) token indices."""
    batch = pad_inputs(features, pad_id)
    batch["start_positions"] = torch.tensor([f.start_position for f in features], dtype=torch.long)
    batch["end_positions"] = torch.tensor([f.end_position for f in features], dtype=torch.long)
    return batch


def span_record(example: SquadExample, prediction: SpanPrediction) -> dict[str, Any]:
    return {"prediction": prediction.answer, "best_span": prediction.text, "score": json_number(prediction.score),
            "null_odds": json_number(prediction.null_odds), "answers": [a.text for a in example.answers]}


def question_examples(records: Sequence[Mapping[str, Any]], fields: Sequence[str],
                      labels: Sequence[str]) -> tuple[list[SquadExample], list]:
    """Examples of raw `question` + `context` records (no gold answers)."""
    return [SquadExample(str(i), "", record_text(r, "context", i), record_text(r, "question", i), ())
            for i, r in enumerate(records)], []


def answer_spans(run, records: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> list[dict[str, Any]]:
    """{"answer", "start", "end", "score"} per record (`_answer_span`)."""
    by_example: dict[int, list[int]] = defaultdict(list)
    for i, feature in enumerate(run.features):
        by_example[feature.example_index].append(i)
    return [_answer_span(ex, [run.features[i] for i in by_example[n]], [run.outputs[i] for i in by_example[n]], p)
            for n, (ex, p) in enumerate(zip(run.examples, run.predictions))]


def plain_answers(run, records: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> list[str]:
    """The answer text per record ("" for no answer)."""
    return [p.answer for p in run.predictions]


def _answer_span(example: SquadExample, features: Sequence[SpanFeature], outputs: Sequence[np.ndarray],
                 prediction: SpanPrediction) -> dict[str, Any]:
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
                    score = softmax(logits[:, 0])[s] * softmax(logits[:, 1])[e]
                    return {"answer": prediction.answer, "start": int(chars[s, 0]), "end": int(chars[e, 1]),
                            "score": float(score)}
        raise RuntimeError(f"question {example.id}: the chosen answer {prediction.text!r} is in none of its windows")
    logits = np.asarray(outputs[0], dtype=np.float64)[: len(features[0].input_ids)]
    return {"answer": "", "start": -1, "end": -1,
            "score": float(softmax(logits[:, 0])[0] * softmax(logits[:, 1])[0])}
