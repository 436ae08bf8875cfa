"""Example creation and masking on real Wikipedia text: the statistics the original BERT promises.

Six articles files of the extract (~1.3 M tokens) are tokenized with the bert-base-uncased
WordPiece vocabulary; one pass over them gives ~14 000 examples and ~250 000 masked positions,
enough for the tolerances below (the draws are seeded, so each check is exact and repeatable).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bert.corpus import ReadStats, expand_inputs, read_documents
from bert.errors import InputError
from bert.pretraining_data import (
    PairSpan,
    PretrainingDataConfig,
    create_examples,
    create_pair_spans,
    truncate_seq_pair,
    truncate_seq_pairs,
)
from bert.pretraining_documents import TokenizedDocument, encode_documents
from bert.pretraining_masking import SpecialTokens, mask_batch, mask_rows, mask_sequence
from bert.tokenizer import Tokenizer

WIKI_FILES = [f"wiki_{i:02d}.gz" for i in range(10, 16)]


@pytest.fixture(scope="module")
def tokenizer(vocab_txt: Path) -> Tokenizer:
    return Tokenizer.from_vocab_file(vocab_txt, lowercase=True)


@pytest.fixture(scope="module")
def special(tokenizer: Tokenizer) -> SpecialTokens:
    return SpecialTokens.of(tokenizer)


@pytest.fixture(scope="module")
def documents(datasets_dir: Path, tokenizer: Tokenizer) -> list[TokenizedDocument]:
    wiki = datasets_dir / "wikipedia_en_extract" / "AA"
    stats = ReadStats()
    docs = []
    for file in expand_inputs([wiki / name for name in WIKI_FILES]):
        for doc in read_documents(file, stats):
            encodings = tokenizer.encode_batch(list(doc.sentences), add_special_tokens=False)
            docs.append(
                TokenizedDocument.from_sentences(doc.doc_id, [e.ids for e in encodings], [e.word_starts for e in encodings])
            )
    return docs


def make_examples(documents, special, seed=0, **overrides):
    config = PretrainingDataConfig(dupe_factor=1, **overrides)
    return config, list(create_examples(documents, config, special, np.random.default_rng(seed)))


@pytest.fixture(scope="module")
def examples(documents, special):
    return make_examples(documents, special)


@pytest.fixture(scope="module")
def wwm_examples(documents, special):
    return make_examples(documents, special, whole_word_masking=True)


def maskable(ids: np.ndarray, special: SpecialTokens) -> int:
    return int((~special.is_special[ids]).sum())


def test_examples_are_well_formed(examples, documents, special) -> None:
    config, exs = examples
    assert len(exs) > 10_000
    for e in exs:
        n = len(e.input_ids)
        assert 5 <= n <= config.max_seq_length
        seps = np.flatnonzero(e.input_ids == special.sep_id)
        assert e.input_ids[0] == special.cls_id and len(seps) == 2 and seps[1] == n - 1
        assert not (e.input_ids == special.cls_id)[1:].any()
        assert e.token_type_ids.tolist() == [0] * (seps[0] + 1) + [1] * (n - seps[0] - 1)
    short = sum(len(e.input_ids) < config.max_seq_length - 16 for e in exs) / len(exs)
    assert 0.05 < short < 0.4  # short targets (10% of documents) and document ends


def test_masked_fraction_and_80_10_10(examples, special) -> None:
    config, exs = examples
    masked = total = 0
    kinds: Counter[str] = Counter()
    for e in exs:
        original = e.input_ids.copy()
        original[e.masked_lm_positions] = e.masked_lm_ids
        n = maskable(original, special)
        assert len(e.masked_lm_positions) == min(config.max_predictions_per_seq, max(1, round(n * config.masked_lm_prob)))
        assert np.all(np.diff(e.masked_lm_positions) > 0)
        assert not special.is_special[e.masked_lm_ids].any()  # no [CLS], [SEP] (nor [UNK]) is ever masked
        shown = e.input_ids[e.masked_lm_positions]
        kinds["mask"] += int((shown == special.mask_id).sum())
        kinds["keep"] += int((shown == e.masked_lm_ids).sum())
        kinds["random"] += int(((shown != special.mask_id) & (shown != e.masked_lm_ids)).sum())
        assert not special.is_special[shown[shown != special.mask_id]].any()  # random tokens are never special
        masked += len(e.masked_lm_positions)
        total += n
    assert abs(masked / total - 0.15) < 0.005
    share = {k: v / masked for k, v in kinds.items()}
    assert abs(share["mask"] - 0.8) < 0.01 and abs(share["random"] - 0.1) < 0.01 and abs(share["keep"] - 0.1) < 0.01


def test_next_sentence_labels(examples) -> None:
    _, exs = examples
    assert abs(np.mean([e.next_sentence_label for e in exs]) - 0.5) < 0.01
    for e in exs:
        s = e.span
        if e.next_sentence_label == 1:
            assert s.a_doc != s.b_doc and e.a_doc_id != e.b_doc_id  # B from another document
        else:
            assert e.a_doc_id == e.b_doc_id and s.b_sentence_start == s.a_sentence_end  # B continues A


def test_segments_are_the_documents_text(documents, special) -> None:
    """Unmasked (dynamic) examples: A and B are trimmed runs of the sentences they name, in order."""
    config, exs = make_examples(documents, special, dynamic_masking=True)
    by_id = {d.doc_id: d for d in documents}
    for e in exs[:2000]:
        assert len(e.masked_lm_positions) == 0 and len(e.masked_lm_ids) == 0
        s = e.span
        sep = int(np.flatnonzero(e.input_ids == special.sep_id)[0])
        a, b = e.input_ids[1:sep], e.input_ids[sep + 1 : -1]
        for doc, (first, last), seg in ((by_id[e.a_doc_id], (s.a_sentence_start, s.a_sentence_end), a),
                                        (by_id[e.b_doc_id], (s.b_sentence_start, s.b_sentence_end), b)):
            run = doc.tokens[doc.sentence_offsets[first] : doc.sentence_offsets[last]]
            assert contains(run, seg), "a segment is a contiguous piece of the sentences it names"
        assert len(a) + len(b) <= config.max_num_tokens


def contains(run: np.ndarray, piece: np.ndarray) -> bool:
    return any(np.array_equal(run[i : i + len(piece)], piece) for i in range(len(run) - len(piece) + 1))


def test_whole_word_masking(wwm_examples, special) -> None:
    config, exs = wwm_examples
    kinds: Counter[str] = Counter()
    masked = total = 0
    for e in exs:
        assert e.word_starts is not None
        positions = set(e.masked_lm_positions.tolist())
        original = e.input_ids.copy()
        original[e.masked_lm_positions] = e.masked_lm_ids
        candidates = np.flatnonzero(~special.is_special[original])
        words: list[list[int]] = []
        for p in candidates.tolist():
            if words and not e.word_starts[p] and words[-1][-1] == p - 1:
                words[-1].append(p)
            else:
                words.append([p])
        covered = 0
        for word in words:
            hit = [p in positions for p in word]
            assert all(hit) or not any(hit), "a word is masked in all its pieces or in none"
            if all(hit):
                covered += len(word)
                shown = e.input_ids[word]
                is_mask = shown == special.mask_id
                assert is_mask.all() or not is_mask.any(), "one 80/10/10 choice per word"
                if is_mask.all():
                    kinds["mask"] += 1
                elif np.array_equal(shown, original[word]):
                    kinds["keep"] += 1
                else:
                    kinds["random"] += 1
        assert covered == len(positions) <= config.max_predictions_per_seq
        masked += len(positions)
        total += len(candidates)
    assert abs(masked / total - 0.15) < 0.005
    n = sum(kinds.values())
    assert abs(kinds["mask"] / n - 0.8) < 0.01 and abs(kinds["random"] / n - 0.1) < 0.01
    assert abs(kinds["keep"] / n - 0.1) < 0.01


def test_same_seed_same_examples_other_seed_others(documents, special) -> None:
    few = documents[:40]
    _, first = make_examples(few, special, seed=7)
    _, again = make_examples(few, special, seed=7)
    _, other = make_examples(few, special, seed=8)
    assert [e.input_ids.tolist() for e in first] == [e.input_ids.tolist() for e in again]
    assert [e.input_ids.tolist() for e in first] != [e.input_ids.tolist() for e in other]


def test_dupe_factor_makes_new_pairs_and_masks(documents, special) -> None:
    few = documents[:20]
    config = PretrainingDataConfig(dupe_factor=3)
    exs = list(create_examples(few, config, special, np.random.default_rng(1)))
    one = list(create_examples(few, dataclasses.replace(config, dupe_factor=1), special, np.random.default_rng(1)))
    assert 2.5 < len(exs) / len(one) < 3.5
    distinct = {tuple(e.input_ids.tolist()) for e in exs}
    assert len(distinct) > 0.95 * len(exs)


def test_single_document_has_no_random_next(documents, special) -> None:
    config = PretrainingDataConfig()
    long_doc = max(documents, key=lambda d: d.num_sentences)
    spans = create_pair_spans([long_doc], 0, config, np.random.default_rng(0))
    assert spans and all(not s.is_random_next and s.b_sentence_start == s.a_sentence_end for s in spans)
    lone = TokenizedDocument.from_sentences("lone:0", [[2023, 2003, 2028, 6251, 1012]])
    assert create_pair_spans([lone], 0, config, np.random.default_rng(0)) == []
    assert list(create_examples([lone], config, special, np.random.default_rng(0))) == []


def test_one_sentence_document_pairs_only_with_another(documents, special) -> None:
    lone = TokenizedDocument.from_sentences("lone:0", [[2023, 2003, 2028, 6251, 1012], []])
    assert lone.num_sentences == 1  # the empty sentence is left out
    spans: list[PairSpan] = []
    for seed in range(20):
        spans += create_pair_spans([lone, documents[0]], 0, PretrainingDataConfig(), np.random.default_rng(seed))
    assert 0 < len(spans) < 20 and all(s.is_random_next and s.b_doc == 1 for s in spans)


def test_truncate_seq_pair_trims_the_longer_from_both_ends() -> None:
    rng = np.random.default_rng(0)
    fronts = backs = 0
    for _ in range(200):
        (a0, a1), (b0, b1) = truncate_seq_pair((0, 300), (1000, 1010), 125, rng)
        assert (a1 - a0) + (b1 - b0) == 125 and (b0, b1) == (1000, 1010)
        fronts += a0
        backs += 300 - a1
    assert 0.4 < fronts / (fronts + backs) < 0.6
    (a0, a1), (b0, b1) = truncate_seq_pair((0, 100), (0, 100), 11, rng)
    assert (a1 - a0, b1 - b0) == (6, 5)  # on a tie B is trimmed, as in the original: A keeps the odd token
    assert truncate_seq_pair((0, 3), (5, 9), 20, rng) == ((0, 3), (5, 9))


def test_mask_batch_for_dynamic_masking(examples, special) -> None:
    config, exs = examples
    rows = [e.input_ids.copy() for e in exs[:64]]
    for e, row in zip(exs[:64], rows):
        row[e.masked_lm_positions] = e.masked_lm_ids  # back to unmasked
    batch = mask_batch(rows, config, special, np.random.default_rng(3))
    width = max(map(len, rows))
    assert batch.input_ids.shape == (64, width)
    assert batch.masked_lm_positions.shape == (64, config.max_predictions_per_seq)
    for b, row in enumerate(rows):
        k = int(batch.masked_lm_weights[b].sum())
        assert k == min(config.max_predictions_per_seq, max(1, round(maskable(row, special) * 0.15)))
        positions = batch.masked_lm_positions[b, :k]
        assert np.array_equal(batch.masked_lm_ids[b, :k], row[positions])
        assert (batch.input_ids[b, len(row) :] == special.pad_id).all()  # padding untouched
    padded = np.full((64, width), special.pad_id, dtype=np.int32)
    for b, row in enumerate(rows):
        padded[b, : len(row)] = row
    from_array = mask_batch(padded, config, special, np.random.default_rng(3))  # [PAD] is never masked
    for name in ("input_ids", "masked_lm_positions", "masked_lm_ids", "masked_lm_weights"):
        assert np.array_equal(getattr(from_array, name), getattr(batch, name))


def test_mask_sequence_whole_words_need_word_starts(special) -> None:
    config = PretrainingDataConfig(whole_word_masking=True)
    with pytest.raises(InputError, match="word_starts"):
        mask_sequence(np.array([101, 2023, 102]), config, special, np.random.default_rng(0))


@pytest.mark.parametrize(
    "field, value",
    [("max_seq_length", 4), ("max_predictions_per_seq", 0), ("masked_lm_prob", 1.0), ("short_seq_prob", -0.1),
     ("dupe_factor", 0), ("seed", -1), ("num_shards", 0)],
)
def test_config_is_validated(field: str, value: float) -> None:
    with pytest.raises(InputError, match=field):
        PretrainingDataConfig(**{field: value})


def test_encode_documents_gives_the_tokenizers_ids(datasets_dir: Path, tokenizer: Tokenizer) -> None:
    """The shards stage's fast path (ids only, from the library) against `Tokenizer.encode_batch`, sentence by sentence."""
    wiki = datasets_dir / "wikipedia_en_extract" / "AA"
    stats = ReadStats()
    docs = [(d.doc_id, d.sentences) for f in expand_inputs([wiki / "wiki_17.gz", wiki / "wiki_18.gz"])
            for d in read_documents(f, stats)]
    odd = ("odd:0", ("\u200b", "Caf\u00e9 na\u00efve \u00c5ngstr\u00f6m.", "\ud800 lone surrogate", "\u4e2d\u6587\u5b57",
                     "x" * 150 + " long word", "\x00\x01", "[MASK] is text here."))
    docs += [odd, ("nothing:0", ("\u200b", "\x00"))]
    got, without_tokens = encode_documents(tokenizer, docs, word_starts=True)
    assert without_tokens == 1 and got.doc_ids == [d for d, _ in docs[:-1]]
    ids, starts = [], []
    for _, sentences in docs[:-1]:
        for e in tokenizer.encode_batch(list(sentences), add_special_tokens=False):
            if e.ids:
                ids.append(e.ids)
                starts.append(e.word_starts)
    assert np.diff(got.sentence_offsets).tolist() == [len(i) for i in ids]
    assert got.tokens.tolist() == [t for i in ids for t in i]
    assert got.word_starts is not None and got.word_starts.tolist() == [w for s in starts for w in s]
    assert got.document(len(got) - 1).num_sentences == 5  # "\u200b" and "\x00\x01" have no token


def test_truncate_seq_pairs_is_the_one_token_at_a_time_rule() -> None:
    """The closed form ends where the original's loop ends, for every pair of lengths up to 40."""
    a, b = np.meshgrid(np.arange(1, 41), np.arange(1, 41))
    a, b = a.ravel(), b.ravel()
    af, ab, bf, bb = truncate_seq_pairs(a, b, 29, np.random.default_rng(0))
    for i in range(len(a)):
        la, lb = int(a[i]), int(b[i])
        while la + lb > 29:  # the original: the longer loses a token, B on a tie
            if la > lb:
                la -= 1
            else:
                lb -= 1
        assert (a[i] - af[i] - ab[i], b[i] - bf[i] - bb[i]) == (la, lb)
    fronts, trimmed = (af + bf).sum(), (af + ab + bf + bb).sum()
    assert abs(fronts / trimmed - 0.5) < 0.01  # front or back with probability one half


def test_mask_rows_chooses_uniformly(special) -> None:
    """Each non-special position of a row is chosen equally often; the count per row is the rule's."""
    config = PretrainingDataConfig(max_predictions_per_seq=5)
    row = np.array([special.cls_id, *range(2000, 2030), special.sep_id, *range(3000, 3010), special.sep_id])
    rows = np.tile(row, 4000)
    offsets = np.arange(4001) * len(row)
    masked = mask_rows(rows, offsets, config, special, np.random.default_rng(0))
    assert (np.diff(masked.mask_offsets) == 5).all()  # min(5, round(40 * 0.15)) = 5
    positions = masked.masked_lm_positions.reshape(4000, 5)
    assert (np.diff(positions, axis=1) > 0).all()
    hits = np.bincount(positions.ravel(), minlength=len(row))
    assert hits[[0, 31, 42]].sum() == 0
    expected = 4000 * 5 / 40
    assert np.abs(hits[np.r_[1:31, 32:42]] / expected - 1).max() < 0.2
    assert np.array_equal(masked.masked_lm_ids, rows[(offsets[:-1, None] + positions).ravel()])


def test_without_nsp_examples_are_single_segments_of_whole_sentences(documents, special) -> None:
    """NSP off: `[CLS] A [SEP]`, token type 0, label NO_NSP_LABEL; A is a run of its document's whole
    sentences (one sentence longer than the room alone is trimmed), as many as fit the target."""
    from bert.pretraining_data import NO_NSP_LABEL

    config, exs = make_examples(documents, special, dynamic_masking=True, next_sentence_prediction=False)
    assert config.max_num_tokens == config.max_seq_length - 2
    by_id = {d.doc_id: d for d in documents}
    full = 0
    for e in exs:
        n = len(e.input_ids)
        assert e.next_sentence_label == NO_NSP_LABEL and e.a_doc_id == e.b_doc_id
        assert e.input_ids[0] == special.cls_id and e.input_ids[-1] == special.sep_id
        assert (e.input_ids == special.sep_id).sum() == 1 and e.token_type_ids.tolist() == [0] * n
        doc, s = by_id[e.a_doc_id], e.span
        run = doc.tokens[doc.sentence_offsets[s.a_sentence_start] : doc.sentence_offsets[s.a_sentence_end]]
        if len(run) <= config.max_num_tokens:
            assert np.array_equal(e.input_ids[1:-1], run)  # whole sentences, untrimmed
        else:
            assert s.a_sentence_end - s.a_sentence_start == 1  # only a lone sentence is ever trimmed
            assert len(e.input_ids) == config.max_seq_length and contains(run, e.input_ids[1:-1])
        full += n >= config.max_seq_length - 32
    assert full / len(exs) > 0.5  # most examples fill the sequence (NSP's halves would not matter here)
    # the same documents with NSP give about as many tokens in examples, in pairs
    _, pairs = make_examples(documents, special, dynamic_masking=True)
    ratio = sum(len(e.input_ids) for e in exs) / sum(len(e.input_ids) for e in pairs)
    assert 0.7 < ratio < 1.3


def test_without_nsp_masking_keeps_its_rates(documents, special) -> None:
    config, exs = make_examples(documents, special, next_sentence_prediction=False, whole_word_masking=True)
    masked = total = 0
    for e in exs:
        original = e.input_ids.copy()
        original[e.masked_lm_positions] = e.masked_lm_ids
        assert not special.is_special[e.masked_lm_ids].any()
        masked += len(e.masked_lm_positions)
        total += maskable(original, special)
    assert abs(masked / total - 0.15) < 0.01
