"""Metrics against their references: scikit-learn, scipy, seqeval (conlleval-compatible mode), and
hand-computed cases for the conlleval chunk rules and the official SQuAD v1.1 / v2.0 scripts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics

from bert.errors import InputError
from bert.tasks import get_task
from bert.tasks.metrics import (
    accuracy,
    average_ranks,
    binary_f1,
    conll_chunks,
    conlleval,
    find_best_thresh,
    matthews_corrcoef,
    normalize_answer,
    pearson,
    spearman,
    squad_exact,
    squad_f1_v1,
    squad_f1_v2,
    squad_v1_scores,
    squad_v2_scores,
)

# ----------------------------------------------------------------------------- GLUE vs sklearn / scipy


def label_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    cases = []
    for n, classes in ((50, 2), (408, 2), (1000, 3), (7, 2)):
        gold = rng.integers(0, classes, n)
        noisy = np.where(rng.random(n) < 0.3, rng.integers(0, classes, n), gold)
        cases += [(noisy, gold), (gold, gold), (1 - gold if classes == 2 else gold[::-1], gold)]
    gold = rng.integers(0, 2, 30)
    cases += [(np.zeros(30, int), gold), (np.ones(30, int), gold), (np.zeros(30, int), np.zeros(30, int))]
    return cases


@pytest.mark.filterwarnings("ignore:A single label was found")  # sklearn, on the all-one-class case
@pytest.mark.parametrize("case", range(len(label_cases())))
def test_classification_metrics_match_sklearn(case: int) -> None:
    predictions, references = label_cases()[case]
    assert accuracy(predictions, references) == pytest.approx(sklearn.metrics.accuracy_score(references, predictions))
    assert matthews_corrcoef(predictions, references) == pytest.approx(
        sklearn.metrics.matthews_corrcoef(references, predictions), abs=1e-12
    )
    if max(predictions.max(), references.max()) <= 1:
        expected = sklearn.metrics.f1_score(references, predictions, pos_label=1, zero_division=0.0)
        assert binary_f1(predictions, references, positive=1) == pytest.approx(expected)


def test_string_labels_as_read_from_files() -> None:
    gold = ["1", "0", "1", "1", "0", "1"]
    pred = ["1", "1", "1", "0", "0", "1"]
    assert binary_f1(pred, gold, positive="1") == pytest.approx(sklearn.metrics.f1_score(gold, pred, pos_label="1"))
    assert matthews_corrcoef(pred, gold) == pytest.approx(sklearn.metrics.matthews_corrcoef(gold, pred))
    nli = ["entailment", "neutral", "contradiction", "neutral"]
    assert matthews_corrcoef(nli[::-1], nli) == pytest.approx(sklearn.metrics.matthews_corrcoef(nli, nli[::-1]))


def test_correlations_match_scipy_on_real_stsb_scores(datasets_dir: Path) -> None:
    data = get_task("stsb").reader(datasets_dir / "glue" / "STS-B")
    gold = np.array([ex.label for ex in data.evals["dev"]])  # 1500 scores with many ties
    rng = np.random.default_rng(1)
    for predictions in (
        gold + rng.normal(0, 1.0, gold.size),
        np.round(gold + rng.normal(0, 0.5, gold.size)),
        gold[::-1],
    ):
        assert pearson(predictions, gold) == pytest.approx(scipy.stats.pearsonr(predictions, gold)[0], abs=1e-12)
        assert spearman(predictions, gold) == pytest.approx(scipy.stats.spearmanr(predictions, gold)[0], abs=1e-12)
    assert np.array_equal(average_ranks(gold), scipy.stats.rankdata(gold, method="average"))


def test_correlation_edge_cases() -> None:
    assert math.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    assert spearman([1, 2, 2, 3], [10, 20, 20, 30]) == pytest.approx(1.0)
    assert average_ranks([3, 1, 3, 2]).tolist() == [3.5, 1.0, 3.5, 2.0]
    with pytest.raises(InputError):
        pearson([1.0], [2.0])
    with pytest.raises(InputError):
        accuracy([1, 0], [1])


# ----------------------------------------------------------------------------- conlleval


def test_conll_chunk_rules() -> None:
    assert conll_chunks(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    # I- after O starts a chunk; I- after another type ends that one and starts its own.
    assert conll_chunks(["O", "I-LOC", "I-LOC"]) == [("LOC", 1, 2)]
    assert conll_chunks(["B-PER", "I-LOC", "I-LOC", "O"]) == [("PER", 0, 0), ("LOC", 1, 2)]
    assert conll_chunks(["I-MISC", "I-PER"]) == [("MISC", 0, 0), ("PER", 1, 1)]
    # B- always starts a new chunk, even inside one of the same type (IOB1 adjacency).
    assert conll_chunks(["I-ORG", "I-ORG", "B-ORG", "I-ORG"]) == [("ORG", 0, 1), ("ORG", 2, 3)]
    assert conll_chunks(["B-ORG", "B-ORG"]) == [("ORG", 0, 0), ("ORG", 1, 1)]
    assert conll_chunks(["O", "O"]) == []
    with pytest.raises(InputError, match="not an IOB tag"):
        conll_chunks(["E-PER"])


def test_conlleval_hand_computed() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-MISC", "I-MISC"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O", "B-MISC", "O"]]
    # gold chunks PER(0,1) LOC(3) | ORG(0) MISC(2,3); predicted PER(0,1) ORG(3) | ORG(0) MISC(2):
    # correct PER and the ORG of sentence 2 -> P = 2/4, R = 2/4, F1 = 1/2; tokens 6/8 correct.
    scores = conlleval(pred, gold)
    assert (scores.overall.correct, scores.overall.predicted, scores.overall.gold) == (2, 4, 4)
    assert (scores.overall.precision, scores.overall.recall, scores.overall.f1) == (0.5, 0.5, 0.5)
    assert scores.accuracy == 0.75
    assert scores.per_type["PER"].f1 == 1.0
    assert (scores.per_type["ORG"].precision, scores.per_type["ORG"].recall) == (0.5, 1.0)
    assert scores.per_type["ORG"].f1 == pytest.approx(2 / 3)
    assert (scores.per_type["LOC"].predicted, scores.per_type["LOC"].f1) == (0, 0.0)
    assert scores.per_type["MISC"].f1 == 0.0


def test_conlleval_boundaries_count() -> None:
    # A chunk started by I- after O has the wrong start: no credit.
    assert conlleval([["O", "I-LOC"]], [["B-LOC", "I-LOC"]]).overall.correct == 0
    # A sentence boundary ends a chunk: two predicted chunks, not one spanning both sentences.
    scores = conlleval([["B-PER"], ["I-PER"]], [["B-PER"], ["B-PER"]])
    assert (scores.overall.correct, scores.overall.predicted) == (2, 2)
    # The same chunks in IOB1 and IOB2 score the same.
    assert conlleval([["I-PER", "B-PER", "O"]], [["B-PER", "B-PER", "O"]]).overall.f1 == 1.0


def test_conlleval_matches_seqeval_on_corrupted_conll2003(datasets_dir: Path) -> None:
    seqeval = pytest.importorskip("seqeval.metrics")
    data = get_task("conll2003").reader(datasets_dir / "conll2003")
    gold = [list(ex.tags) for ex in data.evals["valid"]]
    rng = np.random.default_rng(2)
    tags = np.array(data.labels)
    pred = [[str(rng.choice(tags)) if rng.random() < 0.15 else tag for tag in sentence] for sentence in gold]
    scores = conlleval(pred, gold)
    assert scores.overall.precision == pytest.approx(seqeval.precision_score(gold, pred))
    assert scores.overall.recall == pytest.approx(seqeval.recall_score(gold, pred))
    assert scores.overall.f1 == pytest.approx(seqeval.f1_score(gold, pred))
    assert scores.accuracy == pytest.approx(seqeval.accuracy_score(gold, pred))
    report = seqeval.classification_report(gold, pred, output_dict=True)
    for kind in ("LOC", "MISC", "ORG", "PER"):
        assert scores.per_type[kind].precision == pytest.approx(report[kind]["precision"])
        assert scores.per_type[kind].recall == pytest.approx(report[kind]["recall"])
        assert scores.per_type[kind].f1 == pytest.approx(report[kind]["f1-score"])
        assert scores.per_type[kind].gold == report[kind]["support"]


# ----------------------------------------------------------------------------- SQuAD


def test_normalize_answer() -> None:
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("theater at the Theatre") == "theater at theatre"
    assert normalize_answer("Denver's") == "denvers"
    assert normalize_answer("  «Élan»  ") == "«élan»"  # only ASCII punctuation is removed


def test_exact_and_f1_hand_computed() -> None:
    assert squad_exact("Denver Broncos", "the Denver Broncos.") == 1
    assert squad_exact("Broncos", "Denver Broncos") == 0
    assert squad_f1_v1("Denver Broncos won", "Denver Broncos") == pytest.approx(0.8)  # P 2/3, R 1
    assert squad_f1_v1("x y y", "y y z") == pytest.approx(2 / 3)  # overlap counts multiplicity
    assert squad_f1_v1("x y y", "y z z") == pytest.approx(1 / 3)  # one shared y: P = R = 1/3
    assert squad_f1_v1("cat", "dog") == 0.0
    # Empty answers: v1.1 gives F1 0 even when both normalise to nothing; v2.0 gives 1.
    assert (squad_exact("the", ""), squad_f1_v1("the", ""), squad_f1_v2("the", "")) == (1, 0.0, 1.0)
    assert squad_f1_v2("", "Paris") == 0.0


def test_squad_v1_scores_max_over_gold_answers() -> None:
    gold = {"q1": ["Denver Broncos", "The Broncos"], "q2": ["1990", "the 1990s"]}
    predictions = {"q1": "Denver Broncos", "q2": "in 1990s"}
    # q1: EM 1, F1 1. q2: EM 0; F1 vs "1990s" = 2/3 (P 1/2, R 1), vs "1990" = 0.
    scores = squad_v1_scores(predictions, gold)
    assert scores == {"exact_match": 50.0, "f1": pytest.approx(100 * (1 + 2 / 3) / 2)}
    with pytest.raises(InputError, match="no prediction for 1 of 2 questions"):
        squad_v1_scores({"q1": "x"}, gold)


def test_squad_v1_scores_real_dev_gold_answers(datasets_dir: Path) -> None:
    data = get_task("squad_v1_dev_split").reader(datasets_dir / "squad_v1.1")
    examples = data.train + data.evals["dev"]
    gold = {ex.id: [a.text for a in ex.answers] for ex in examples}
    assert squad_v1_scores({ex.id: "The " + ex.answers[0].text + "." for ex in examples}, gold) == {
        "exact_match": 100.0,
        "f1": 100.0,
    }
    # Three real questions list "." among their answers. Answering "." is an exact match, yet
    # v1.1 F1 is 0: both sides normalise to nothing and nothing overlaps.
    qid = "5730b7ce069b5314008322c4"
    assert squad_v1_scores({qid: "."}, {qid: gold[qid]}) == {"exact_match": 100.0, "f1": 0.0}


V2_GOLD = {"q1": ["Paris"], "q2": ["Lyon"], "q3": [], "q4": []}
V2_PRED = {"q1": "Paris", "q2": "Nice", "q3": "Rome", "q4": ""}
V2_NA = {"q1": 0.1, "q2": 0.5, "q3": 0.3, "q4": 0.8}


def test_find_best_thresh_hand_computed() -> None:
    has_answer = {qid: bool(g) for qid, g in V2_GOLD.items()}
    exact = {"q1": 1.0, "q2": 0.0, "q3": 0.0, "q4": 1.0}
    # Start: everything "no answer" -> q3, q4 right = 2. Ascending na: q1 +1 = 3 (thr 0.1, best),
    # q3 -1 (non-empty answer to an unanswerable) = 2, q2 +0 = 2, q4 +0 (empty answer) = 2.
    assert find_best_thresh(V2_PRED, exact, V2_NA, has_answer) == (75.0, 0.1)
    # Nothing beats the start: threshold stays 0.0, as in the official script.
    assert find_best_thresh({"q3": "Rome"}, {"q3": 0.0}, {"q3": 0.4}, {"q3": False}) == (100.0, 0.0)


def test_squad_v2_scores_hand_computed() -> None:
    raw = squad_v2_scores(V2_PRED, V2_GOLD)
    assert raw["exact"] == 50.0 and raw["f1"] == 50.0 and raw["total"] == 4.0
    assert (raw["HasAns_exact"], raw["NoAns_exact"], raw["HasAns_total"]) == (50.0, 50.0, 2.0)
    assert "best_f1" not in raw
    # Threshold 0.2: q2 (0.5), q3 (0.3), q4 (0.8) become "no answer" -> q1 1, q2 0, q3 1, q4 1.
    scores = squad_v2_scores(V2_PRED, V2_GOLD, na_probs=V2_NA, na_prob_thresh=0.2)
    assert (scores["exact"], scores["HasAns_exact"], scores["NoAns_exact"]) == (75.0, 50.0, 100.0)
    assert (scores["best_exact"], scores["best_exact_thresh"], scores["best_f1"], scores["best_f1_thresh"]) == (
        75.0,
        0.1,
        75.0,
        0.1,
    )
    # Gold answers that normalise to nothing are dropped; none left means [""].
    assert squad_v2_scores({"q": ""}, {"q": ["the", "."]})["exact"] == 100.0
