"""Evaluation metrics, in numpy, each written from the definition of a reference implementation.

* GLUE: accuracy, binary F1, Matthews correlation (as `sklearn.metrics`), Pearson and Spearman
  correlation (as `scipy.stats`; Spearman ranks ties by their average rank). Scale: fractions
  and correlations, as the references return them.
* NER: entity-level precision / recall / F1 as CoNLL `conlleval` counts them (chunk starts and
  ends by its rules, an entity counts as correct only with the same type, start and end), plus
  conlleval's token accuracy. Scale: fractions (conlleval prints the same numbers times 100).
* SQuAD: exact match and F1 as the official v1.1 and v2.0 evaluation scripts define them,
  including the v2.0 best no-answer threshold search. Scale: 0-100, as the scripts print.

All functions take (predictions, references) in that order.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from bert.errors import InputError


def _pair(predictions: Sequence, references: Sequence, what: str) -> tuple[np.ndarray, np.ndarray]:
    p, r = np.asarray(predictions), np.asarray(references)
    if p.shape != r.shape or p.ndim != 1:
        raise InputError(f"{what}: predictions {p.shape} and references {r.shape} must be 1-D of equal length")
    if p.size == 0:
        raise InputError(f"{what}: no predictions to score")
    return p, r


# ----------------------------------------------------------------------------- classification


def accuracy(predictions: Sequence, references: Sequence) -> float:
    """Fraction of predictions equal to their reference."""
    p, r = _pair(predictions, references, "accuracy")
    return float(np.mean(p == r))


def binary_f1(predictions: Sequence, references: Sequence, positive: object = 1) -> float:
    """F1 of the `positive` class: 2TP / (2TP + FP + FN); 0.0 when there is no positive at all."""
    p, r = _pair(predictions, references, "binary_f1")
    tp = int(np.sum((p == positive) & (r == positive)))
    fp = int(np.sum((p == positive) & (r != positive)))
    fn = int(np.sum((p != positive) & (r == positive)))
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def matthews_corrcoef(predictions: Sequence, references: Sequence) -> float:
    """Matthews correlation, multiclass form (Gorodkin 2004); binary MCC is the 2-class case.

    From the confusion matrix: (c*s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)) with c correct, s
    samples, t / p the per-class reference / prediction counts; 0.0 when undefined.
    """
    p, r = _pair(predictions, references, "matthews_corrcoef")
    classes, codes = np.unique(np.concatenate([r, p]), return_inverse=True)
    ref_codes, pred_codes = codes[: r.size], codes[r.size :]
    t = np.bincount(ref_codes, minlength=classes.size).astype(np.float64)
    q = np.bincount(pred_codes, minlength=classes.size).astype(np.float64)
    s = float(r.size)
    c = float(np.sum(ref_codes == pred_codes))
    cov_tp = c * s - t @ q
    cov_pp = s * s - q @ q
    cov_tt = s * s - t @ t
    if cov_pp * cov_tt == 0:
        return 0.0
    return float(cov_tp / math.sqrt(cov_tt * cov_pp))


# ----------------------------------------------------------------------------- regression


def pearson(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Pearson correlation coefficient; NaN when either input is constant (as scipy)."""
    x, y = _pair(predictions, references, "pearson")
    if x.size < 2:
        raise InputError("pearson: needs at least 2 values")
    x = x.astype(np.float64) - np.mean(x, dtype=np.float64)
    y = y.astype(np.float64) - np.mean(y, dtype=np.float64)
    norm_x, norm_y = np.linalg.norm(x), np.linalg.norm(y)
    if norm_x == 0 or norm_y == 0:
        return math.nan
    return float(np.clip((x / norm_x) @ (y / norm_y), -1.0, 1.0))


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks; tied values all get the mean of the ranks they span (scipy's "average")."""
    x = np.asarray(values)
    order = np.argsort(x, kind="stable")
    ordered = x[order]
    starts_group = np.concatenate([[True], ordered[1:] != ordered[:-1]])
    group = np.cumsum(starts_group) - 1
    first = np.flatnonzero(starts_group)
    last = np.concatenate([first[1:], [x.size]]) - 1
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = ((first + last) / 2.0 + 1.0)[group]
    return ranks


def spearman(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson correlation of the average ranks."""
    x, y = _pair(predictions, references, "spearman")
    return pearson(average_ranks(x), average_ranks(y))


# ----------------------------------------------------------------------------- CoNLL entities


def _split_tag(tag: str) -> tuple[str, str]:
    if tag == "O":
        return "O", ""
    if len(tag) > 2 and tag[0] in "BI" and tag[1] == "-":
        return tag[0], tag[2:]
    raise InputError(f"tag {tag!r} is not an IOB tag (expected O, B-TYPE or I-TYPE)")


def conll_chunks(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Chunks of one sentence as (type, first index, last index), by the conlleval rules.

    A chunk starts at every B-X, and at an I-X that follows O or a tag of another type (IOB1
    and broken IOB2 alike). It ends before O, before any B-, and before a tag of another type.
    """
    chunks: list[tuple[str, int, int]] = []
    open_type, open_start = "", -1
    previous, previous_type = "O", ""
    for i, tag in enumerate(tags):
        prefix, kind = _split_tag(tag)
        ends = previous != "O" and (prefix in ("B", "O") or kind != previous_type)
        starts = prefix == "B" or (prefix == "I" and (previous == "O" or kind != previous_type))
        if ends and open_start >= 0:
            chunks.append((open_type, open_start, i - 1))
            open_start = -1
        if starts:
            open_type, open_start = kind, i
        previous, previous_type = prefix, kind
    if open_start >= 0:
        chunks.append((open_type, open_start, len(tags) - 1))
    return chunks


@dataclass(frozen=True)
class ChunkScore:
    """Counts and scores for one entity type (or all): conlleval's precision, recall and FB1."""

    correct: int
    predicted: int
    gold: int

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.correct / self.gold if self.gold else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


@dataclass(frozen=True)
class ConllScores:
    """conlleval's report: overall entity scores, the same per type, and token accuracy."""

    overall: ChunkScore
    per_type: Mapping[str, ChunkScore]
    accuracy: float


def conlleval(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> ConllScores:
    """Entity-level scores over sentences of IOB tags, counted as CoNLL `conlleval` does.

    Sentences are scored separately (a sentence boundary closes every chunk). An entity is
    correct when a predicted and a gold chunk have the same type, first and last token. Token
    accuracy counts every token, O included.
    """
    if len(predictions) != len(references):
        raise InputError(f"conlleval: {len(predictions)} predicted sentences for {len(references)} gold ones")
    correct: Counter[str] = Counter()
    predicted: Counter[str] = Counter()
    gold: Counter[str] = Counter()
    tokens = correct_tokens = 0
    for i, (pred_tags, gold_tags) in enumerate(zip(predictions, references)):
        if len(pred_tags) != len(gold_tags):
            raise InputError(f"conlleval: sentence {i} has {len(pred_tags)} predicted tags for {len(gold_tags)} words")
        pred_chunks, gold_chunks = set(conll_chunks(pred_tags)), set(conll_chunks(gold_tags))
        predicted.update(kind for kind, _, _ in pred_chunks)
        gold.update(kind for kind, _, _ in gold_chunks)
        correct.update(kind for kind, _, _ in pred_chunks & gold_chunks)
        tokens += len(gold_tags)
        correct_tokens += sum(p == g for p, g in zip(pred_tags, gold_tags))
    if tokens == 0:
        raise InputError("conlleval: no tokens to score")
    per_type = {
        kind: ChunkScore(correct[kind], predicted[kind], gold[kind]) for kind in sorted(set(predicted) | set(gold))
    }
    overall = ChunkScore(sum(correct.values()), sum(predicted.values()), sum(gold.values()))
    return ConllScores(overall, per_type, correct_tokens / tokens)


# ----------------------------------------------------------------------------- SQuAD

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """The official normalisation: lower case, drop ASCII punctuation, drop a/an/the, squeeze spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def squad_exact(prediction: str, gold: str) -> int:
    """1 if the normalised strings are equal, else 0 (v1.1 and v2.0 alike)."""
    return int(normalize_answer(prediction) == normalize_answer(gold))


def _token_overlap_f1(prediction_tokens: list[str], gold_tokens: list[str]) -> float:
    same = sum((Counter(prediction_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_f1_v1(prediction: str, gold: str) -> float:
    """v1.1 token F1: bag-of-words overlap of the normalised tokens; 0 when nothing overlaps."""
    return _token_overlap_f1(normalize_answer(prediction).split(), normalize_answer(gold).split())


def squad_f1_v2(prediction: str, gold: str) -> float:
    """v2.0 token F1: as v1.1, except that an empty side scores 1 if both are empty, else 0."""
    prediction_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not prediction_tokens or not gold_tokens:
        return float(prediction_tokens == gold_tokens)
    return _token_overlap_f1(prediction_tokens, gold_tokens)


def _check_predictions(predictions: Mapping[str, str], gold: Mapping[str, Sequence[str]], what: str) -> None:
    missing = [qid for qid in gold if qid not in predictions]
    if missing:
        raise InputError(f"{what}: no prediction for {len(missing)} of {len(gold)} questions, e.g. {missing[:3]}")
    if not gold:
        raise InputError(f"{what}: no questions to score")


def squad_v1_scores(predictions: Mapping[str, str], gold: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Official v1.1 scores: per question the best EM / F1 over its gold answers; mean times 100."""
    _check_predictions(predictions, gold, "squad_v1_scores")
    exact = [max(squad_exact(predictions[qid], g) for g in golds) for qid, golds in gold.items()]
    f1 = [max(squad_f1_v1(predictions[qid], g) for g in golds) for qid, golds in gold.items()]
    return {"exact_match": 100.0 * sum(exact) / len(exact), "f1": 100.0 * sum(f1) / len(f1)}


def find_best_thresh(
    predictions: Mapping[str, str],
    scores: Mapping[str, float],
    na_probs: Mapping[str, float],
    has_answer: Mapping[str, bool],
) -> tuple[float, float]:
    """The v2.0 script's search for the no-answer threshold; returns (best score * 100, threshold).

    A question is answered "no answer" when its `na_probs` value exceeds the threshold. With the
    threshold below every value all questions get "no answer", scoring the unanswerable ones.
    Raising it past each question in ascending `na_probs` order switches that question to its
    predicted text: an answerable one gains its raw score, an unanswerable one loses 1 if the
    prediction is non-empty. The best running total wins (first one on ties; 0.0 if none beats
    the start), as in the official script.
    """
    running = best = sum(1 for qid in scores if not has_answer[qid])
    threshold = 0.0
    for qid in sorted(na_probs, key=na_probs.__getitem__):
        if qid not in scores:
            continue
        if has_answer[qid]:
            running += scores[qid]
        elif predictions[qid]:
            running -= 1
        if running > best:
            best, threshold = running, na_probs[qid]
    return 100.0 * best / len(scores), threshold


def squad_v2_raw_scores(
    predictions: Mapping[str, str], gold: Mapping[str, Sequence[str]]
) -> tuple[dict[str, bool], dict[str, float], dict[str, float]]:
    """The v2.0 script's per-question (has answer, exact, F1) before any no-answer threshold."""
    has_answer = {qid: bool(golds) for qid, golds in gold.items()}
    exact_raw: dict[str, float] = {}
    f1_raw: dict[str, float] = {}
    for qid, golds in gold.items():
        candidates = [g for g in golds if normalize_answer(g)] or [""]
        exact_raw[qid] = float(max(squad_exact(predictions[qid], g) for g in candidates))
        f1_raw[qid] = max(squad_f1_v2(predictions[qid], g) for g in candidates)
    return has_answer, exact_raw, f1_raw


def squad_v2_scores(
    predictions: Mapping[str, str],
    gold: Mapping[str, Sequence[str]],
    na_probs: Mapping[str, float] | None = None,
    na_prob_thresh: float = 1.0,
) -> dict[str, float]:
    """Official v2.0 scores: exact / f1 overall, on answerable (HasAns_) and unanswerable (NoAns_).

    `gold[qid]` lists the annotated answer texts; an empty list marks an unanswerable question,
    and answers that normalise to nothing are dropped ([""] if none is left). With `na_probs`,
    a question whose value exceeds `na_prob_thresh` counts as answered "no answer", and the
    best thresholds for EM and F1 are searched (`best_exact`, `best_exact_thresh`, ...).
    """
    _check_predictions(predictions, gold, "squad_v2_scores")
    has_answer, exact_raw, f1_raw = squad_v2_raw_scores(predictions, gold)

    def thresholded(raw: dict[str, float]) -> dict[str, float]:
        if na_probs is None:
            return raw
        return {qid: float(not has_answer[qid]) if na_probs[qid] > na_prob_thresh else s for qid, s in raw.items()}

    exact, f1 = thresholded(exact_raw), thresholded(f1_raw)
    result = {
        "exact": 100.0 * sum(exact.values()) / len(exact),
        "f1": 100.0 * sum(f1.values()) / len(f1),
        "total": float(len(exact)),
    }
    for prefix, wanted in (("HasAns", True), ("NoAns", False)):
        subset = [qid for qid in gold if has_answer[qid] == wanted]
        if subset:
            result[f"{prefix}_exact"] = 100.0 * sum(exact[q] for q in subset) / len(subset)
            result[f"{prefix}_f1"] = 100.0 * sum(f1[q] for q in subset) / len(subset)
            result[f"{prefix}_total"] = float(len(subset))
    if na_probs is not None:
        result["best_exact"], result["best_exact_thresh"] = find_best_thresh(
            predictions, exact_raw, na_probs, has_answer
        )
        result["best_f1"], result["best_f1_thresh"] = find_best_thresh(predictions, f1_raw, na_probs, has_answer)
    return result
