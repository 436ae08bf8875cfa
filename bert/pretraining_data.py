"""MLM/NSP example creation: tokenized documents -> masked sentence-pair examples.

The algorithm of google-research/bert `create_pretraining_data.py`, as pure functions: every
random choice is drawn from the `numpy.random.Generator` passed in, in a fixed order, so the
same documents, config and generator state give the same examples on any machine.

Per document (`create_pair_spans`): a target length of `max_seq_length - 3` tokens, or with
probability `short_seq_prob` a random length in [2, max_seq_length - 3]; sentences are
gathered into a chunk until it reaches the target; segment A is the chunk's first
`randint(1, len - 1)` sentences; segment B is the rest of the chunk (`next_sentence_label` 0)
or, with probability 0.5, text from a random position of a different document (label 1),
in which case the chunk's unused sentences are put back for the next example. The pair is
trimmed to fit (`truncate_seq_pairs`) and masked (`mask_rows`).

Per shard (`create_example_batches`): the documents are shuffled, `dupe_factor` passes are
made over them, and the examples of all passes are shuffled, as in the original; they are
then assembled and masked a batch of rows at a time.

How it is computed (the same distributions as the original, drawn in bulk):

* A shard's documents live in one `DocumentSet`: all token ids back to back, sentence and
  document offsets into them. No Python object per sentence or per example is made on the
  way from the buckets to the part file.
* Pair spans are drawn per document in plain Python over lists of offsets; the document's
  random numbers come from one `rng.random` call, and each integer draw is `lo + ⌊u·(hi-lo)⌋`.
* Trimming (`truncate_seq_pairs`) is the original's one-token-at-a-time rule in closed form:
  the longer segment loses tokens first (B on a tie), so the final lengths follow from the
  two lengths alone, and the number of tokens taken from the front of a segment is
  Binomial(trimmed, 1/2), as the original's coin per trimmed token makes it.
* Masking (`mask_rows`) works on many rows at once: a uniform random subset of k candidates
  per row is the k smallest of random keys; whole words are taken greedily in a random order,
  one column of that order at a time for all rows together.

Deviations from the original, each on purpose:

* B is random with probability 0.5 for every chunk, and a chunk whose drawn kind of B is
  impossible yields no pair: a one-sentence chunk has no contiguous B, a shard with a
  single document has no random B. The original instead forces B to be random for a
  one-sentence chunk, and closes a chunk at the target length even when it holds one
  sentence (frequent with the 10% short targets): on 10 files of the Wikipedia extract that
  makes 54.5% of the pairs random-next. Here a chunk closes only once it holds two sentences
  (or the document ends), so one-sentence chunks only happen at a document's end, and the
  share is 50.1% on the same files.
* The random document is drawn uniformly among the *other* documents, instead of re-drawing
  up to 10 times and keeping a possibly-same document: a label-1 pair never has A and B from
  the same document.
* The number of predictions is taken over the non-special tokens, not the whole sequence,
  and the random replacement token is drawn from the non-special ids.
* Whole-word masking decides 80% [MASK] / 10% random / 10% unchanged once per word, not once
  per piece (the original decided per piece), and a word continues only across pieces that
  are adjacent (a word never spans a [SEP]).
* Dynamic masking (`config.dynamic_masking`) writes examples unmasked; the trainer masks them
  with `mask_batch` at training time, with a fresh draw each epoch.

Without next-sentence prediction (`config.next_sentence_prediction=False`, for single-sentence
task text, as RoBERTa and task-adaptive pretraining do): each example is one segment,
`[CLS] A [SEP]` with token type 0, where A is the most whole sentences of one document that fit
the target length (`max_seq_length - 2`, or a short target with `short_seq_prob`), and at least
one: a sentence longer than the room alone is trimmed. Its `next_sentence_label` is `NO_NSP_LABEL` (-100, the ignore index
of the losses): the trainer computes no NSP loss and no NSP accuracy from such examples.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from bert.errors import InputError
from bert.pretraining_documents import DocumentSet, TokenizedDocument
from bert.pretraining_masking import MaskedRows, SpecialTokens, mask_rows

RANDOM_NEXT_PROB = 0.5  # the original's fixed share of random-next pairs
BATCH_ROWS = 4096  # examples assembled and masked together
NO_NSP_LABEL = -100  # next_sentence_label of a single-segment example (NSP off): the losses' ignore index


@dataclass(frozen=True)
class PretrainingDataConfig:
    """Settings of example creation; the defaults are the original BERT's (sequence length 128).

    `num_shards` None lets the shards stage pick it from the corpus size (it bounds the memory
    one shard needs); it is part of the config because a different shard count gives
    different examples (random-next segments come from the same shard).
    """

    max_seq_length: int = 128
    max_predictions_per_seq: int = 20
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    dupe_factor: int = 5
    seed: int = 12345
    whole_word_masking: bool = False
    dynamic_masking: bool = False
    num_shards: int | None = None
    next_sentence_prediction: bool = True  # False: single-segment examples, no NSP label

    def __post_init__(self) -> None:
        if self.max_seq_length < 5:
            raise InputError(f"max_seq_length must be >= 5 ([CLS] A [SEP] B [SEP]), got {self.max_seq_length}")
        if self.max_predictions_per_seq < 1:
            raise InputError(f"max_predictions_per_seq must be >= 1, got {self.max_predictions_per_seq}")
        if not 0.0 < self.masked_lm_prob < 1.0:
            raise InputError(f"masked_lm_prob must be in (0, 1), got {self.masked_lm_prob}")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise InputError(f"short_seq_prob must be in [0, 1], got {self.short_seq_prob}")
        if self.dupe_factor < 1:
            raise InputError(f"dupe_factor must be >= 1, got {self.dupe_factor}")
        if self.seed < 0:
            raise InputError(f"seed must be >= 0, got {self.seed}")
        if self.num_shards is not None and self.num_shards < 1:
            raise InputError(f"num_shards must be >= 1 (or None to choose from the corpus size), got {self.num_shards}")

    @property
    def max_num_tokens(self) -> int:
        """Tokens left for A and B once [CLS], [SEP], [SEP] are in (for A once [CLS], [SEP] are in, without NSP)."""
        return self.max_seq_length - (3 if self.next_sentence_prediction else 2)


class PairSpan(NamedTuple):
    """Where one example's segments come from, before masking.

    Sentence ranges are of the chunk as drawn (before trimming); token ranges are the trimmed
    slices of the documents' `tokens` that go into the example.
    """

    a_doc: int
    a_sentence_start: int
    a_sentence_end: int
    a_token_start: int
    a_token_end: int
    b_doc: int
    b_sentence_start: int
    b_sentence_end: int
    b_token_start: int
    b_token_end: int
    is_random_next: bool


@dataclass(frozen=True)
class Example:
    """One training example, unpadded. `masked_lm_*` are empty under dynamic masking."""

    input_ids: np.ndarray  # (T,) int32: [CLS] A [SEP] B [SEP], masked
    token_type_ids: np.ndarray  # (T,) int8: 0 for [CLS] A [SEP], 1 for B [SEP]
    masked_lm_positions: np.ndarray  # (P,) int32, increasing
    masked_lm_ids: np.ndarray  # (P,) int32: the original ids at those positions
    next_sentence_label: int  # 1 = B is a random next (from another document); NO_NSP_LABEL without NSP
    word_starts: np.ndarray | None  # (T,) bool, with whole-word masking
    a_doc_id: str
    b_doc_id: str
    span: PairSpan  # document indices refer to the documents the example was built from

# ----------------------------------------------------------------------------- pairs


def truncate_seq_pairs(
    a_length: np.ndarray, b_length: np.ndarray, max_num_tokens: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """How many tokens to trim from the front and the back of A and of B, for many pairs at once.

    The original's rule: while the pair is too long, one token goes from the longer segment
    (B on a tie), from its front or its back with probability one half each. In closed form:
    if the excess is at most the difference of the lengths, the longer segment loses it all;
    otherwise both end up at half the room, A keeping the odd token. The fronts are
    Binomial(trimmed, 1/2). Returns (a_front, a_back, b_front, b_back).
    """
    a_length = np.asarray(a_length, dtype=np.int64)
    b_length = np.asarray(b_length, dtype=np.int64)
    excess = np.maximum(a_length + b_length - max_num_tokens, 0)
    a_longer = a_length > b_length
    gap = np.abs(a_length - b_length)
    one_sided = excess <= gap
    b_keep_half = max_num_tokens // 2
    a_trim = np.where(one_sided, np.where(a_longer, excess, 0), a_length - (max_num_tokens - b_keep_half))
    b_trim = np.where(one_sided, np.where(a_longer, 0, excess), b_length - b_keep_half)
    a_front = rng.binomial(a_trim, 0.5)
    b_front = rng.binomial(b_trim, 0.5)
    return a_front, a_trim - a_front, b_front, b_trim - b_front


def truncate_seq_pair(
    a: tuple[int, int], b: tuple[int, int], max_num_tokens: int, rng: np.random.Generator
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Trim two [start, end) slices until their lengths add up to at most `max_num_tokens` (see `truncate_seq_pairs`)."""
    (a_start, a_end), (b_start, b_end) = a, b
    if (a_end - a_start) + (b_end - b_start) <= max_num_tokens:
        return a, b
    af, ab, bf, bb = (int(x[0]) for x in truncate_seq_pairs(
        np.array([a_end - a_start]), np.array([b_end - b_start]), max_num_tokens, rng))
    return (a_start + af, a_end - ab), (b_start + bf, b_end - bb)


_PAIR_FIELDS = 7  # a_doc, a_sentence_start, a_sentence_end, b_doc, b_sentence_start, b_sentence_end, is_random_next


def _document_pairs(
    d: int,
    num_docs: int,
    sentence_offsets: list[int],
    doc_sentences: list[int],
    max_num_tokens: int,
    short_seq_prob: float,
    u: list[float],
) -> list[tuple[int, int, int, int, int, int, int]]:
    """The chunks of document `d` as sentence ranges (global sentence indices), from the uniforms `u`.

    At most 2 + 4 per sentence of the document are used: the target length, then per chunk
    the split point, the kind of B, and for a random B its document and first sentence.
    """
    first, last = doc_sentences[d], doc_sentences[d + 1]
    k = 1
    target = max_num_tokens
    if u[0] < short_seq_prob:
        target = 2 + int(u[1] * (max_num_tokens - 1))  # integers(2, max_num_tokens + 1)
        k = 2
    pairs = []
    chunk_start = first
    while chunk_start < last:
        # the chunk ends at the first sentence i that brings it to the target with two sentences or more,
        # or at the document's end: i + 1 is the first end in [chunk_start + 2, last) reaching the target
        reach = bisect_left(sentence_offsets, sentence_offsets[chunk_start] + target, chunk_start + 2, last)
        i = min(reach, last) - 1
        chunk_len = i + 1 - chunk_start
        a_end = chunk_start + 1
        if chunk_len >= 2:
            a_end += int(u[k] * (chunk_len - 1))  # integers(1, chunk_len)
            k += 1
        is_random_next = u[k] < RANDOM_NEXT_PROB
        k += 1
        if (is_random_next and num_docs == 1) or (not is_random_next and chunk_len == 1):
            chunk_start = i + 1  # the drawn kind of B is impossible here: no pair from this chunk
            continue
        if is_random_next:
            target_b = target - (sentence_offsets[a_end] - sentence_offsets[chunk_start])
            b = int(u[k] * (num_docs - 1))
            b += b >= d  # uniform over the other documents
            b_first, b_last = doc_sentences[b], doc_sentences[b + 1]
            b_start = b_first + int(u[k + 1] * (b_last - b_first))
            k += 2
            # the first end whose text reaches the target, else the document's end
            b_end = bisect_left(sentence_offsets, sentence_offsets[b_start] + target_b, b_start + 1, b_last)
            pairs.append((d, chunk_start, a_end, b, b_start, b_end, 1))
            i = a_end - 1  # the chunk's unused sentences go back for the next example
        else:
            pairs.append((d, chunk_start, a_end, d, a_end, i + 1, 0))
        chunk_start = i + 1
    return pairs


def _document_segments(
    d: int, sentence_offsets: list[int], doc_sentences: list[int], max_num_tokens: int, short_seq_prob: float,
    u: list[float],
) -> list[tuple[int, int, int, int, int, int, int]]:
    """Without NSP: document `d` cut into runs of whole sentences up to the target length (one segment each).

    The target is drawn once per document from `u[0]`, `u[1]`, as in `_document_pairs`; a run
    holds the most whole sentences that fit it, and at least one (a sentence longer than the
    room alone is trimmed). Rows are in `_document_pairs`' layout with an empty B right after A.
    """
    first, last = doc_sentences[d], doc_sentences[d + 1]
    target = max_num_tokens
    if u[0] < short_seq_prob:
        target = 2 + int(u[1] * (max_num_tokens - 1))
    rows = []
    start = first
    while start < last:
        # the most whole sentences that fit the target, at least one (trimmed later if it is too long alone)
        end = max(start + 1, bisect_right(sentence_offsets, sentence_offsets[start] + target, start + 1, last + 1) - 1)
        rows.append((d, start, end, d, end, end, 0))
        start = end
    return rows


class _Pairs(NamedTuple):
    """Pairs as int32 columns: documents, sentence ranges (global sentence indices), trimmed token ranges (global)."""

    a_doc: np.ndarray
    a_sentence_start: np.ndarray
    a_sentence_end: np.ndarray
    a_token_start: np.ndarray
    a_token_end: np.ndarray
    b_doc: np.ndarray
    b_sentence_start: np.ndarray
    b_sentence_end: np.ndarray
    b_token_start: np.ndarray
    b_token_end: np.ndarray
    is_random_next: np.ndarray

    def take(self, index: np.ndarray) -> _Pairs:
        return _Pairs(*(column[index] for column in self))


def _draw_pairs(
    docs: DocumentSet, order: Sequence[int], config: PretrainingDataConfig, rng: np.random.Generator, passes: int
) -> _Pairs:
    """`passes` passes over the documents in `order`: their pairs, trimmed."""
    sentence_offsets = docs.sentence_offsets.tolist()
    doc_sentences = docs.doc_sentences.tolist()
    tables = [np.zeros((0, _PAIR_FIELDS), dtype=np.int32)]
    for _ in range(passes):  # each pass's Python tuples become an int32 table at once: memory stays ~28 bytes a pair
        rows: list[tuple[int, ...]] = []
        for d in order:
            n = doc_sentences[d + 1] - doc_sentences[d]
            u = rng.random(2 + 4 * n).tolist()
            if config.next_sentence_prediction:
                rows += _document_pairs(d, len(docs), sentence_offsets, doc_sentences, config.max_num_tokens,
                                        config.short_seq_prob, u)
            else:
                rows += _document_segments(d, sentence_offsets, doc_sentences, config.max_num_tokens,
                                           config.short_seq_prob, u)
        tables.append(np.array(rows, dtype=np.int32).reshape(-1, _PAIR_FIELDS))
    del rows
    table = np.concatenate(tables)
    del tables
    a_doc, a_s0, a_s1, b_doc, b_s0, b_s1, is_random_next = table.T
    offsets = docs.sentence_offsets
    a_t0, a_t1, b_t0, b_t1 = offsets[a_s0], offsets[a_s1], offsets[b_s0], offsets[b_s1]
    af, ab, bf, bb = truncate_seq_pairs(a_t1 - a_t0, b_t1 - b_t0, config.max_num_tokens, rng)
    columns = (a_doc, a_s0, a_s1, a_t0 + af, a_t1 - ab, b_doc, b_s0, b_s1, b_t0 + bf, b_t1 - bb, is_random_next)
    return _Pairs(*(c.astype(np.int32) for c in columns))  # 44 bytes a pair for the whole shard


def create_pair_spans(
    documents: Sequence[TokenizedDocument],
    doc_index: int,
    config: PretrainingDataConfig,
    rng: np.random.Generator,
) -> list[PairSpan]:
    """The sentence pairs of one document (the original `create_instances_from_document`), trimmed."""
    docs = DocumentSet.of(documents)
    pairs = _draw_pairs(docs, [doc_index], config, rng, passes=1)
    return [_pair_span(docs, pairs, r) for r in range(len(pairs.a_doc))]


def _pair_span(docs: DocumentSet, pairs: _Pairs, r: int) -> PairSpan:
    """Row `r` of `pairs` with sentence and token ranges relative to their documents."""
    a, b = int(pairs.a_doc[r]), int(pairs.b_doc[r])
    sa, sb = int(docs.doc_sentences[a]), int(docs.doc_sentences[b])
    ta, tb = int(docs.doc_tokens[a]), int(docs.doc_tokens[b])
    return PairSpan(
        a, int(pairs.a_sentence_start[r]) - sa, int(pairs.a_sentence_end[r]) - sa,
        int(pairs.a_token_start[r]) - ta, int(pairs.a_token_end[r]) - ta,
        b, int(pairs.b_sentence_start[r]) - sb, int(pairs.b_sentence_end[r]) - sb,
        int(pairs.b_token_start[r]) - tb, int(pairs.b_token_end[r]) - tb,
        bool(pairs.is_random_next[r]),
    )


# ----------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class ExampleBatch:
    """Examples in flat arrays: row `r` is `input_ids[row_offsets[r]:row_offsets[r + 1]]` ([CLS] A [SEP] B [SEP], or [CLS] A [SEP] without NSP).

    `masked_lm_*` are empty under dynamic masking; `word_starts` is there with whole-word masking.
    Document indices refer to the `DocumentSet` the batch was built from; sentence indices are
    relative to their documents.
    """

    input_ids: np.ndarray  # (N,) int32, masked
    row_offsets: np.ndarray  # (B + 1,) int64
    token_type_ids: np.ndarray  # (N,) int8
    word_starts: np.ndarray | None  # (N,) bool
    masked_lm_positions: np.ndarray  # (M,) int32, increasing within a row
    masked_lm_ids: np.ndarray  # (M,) int32
    mask_offsets: np.ndarray  # (B + 1,) int64
    next_sentence_label: np.ndarray  # (B,) int8
    a_doc: np.ndarray  # (B,) int64
    a_sentence_start: np.ndarray
    a_sentence_end: np.ndarray
    b_doc: np.ndarray
    b_sentence_start: np.ndarray
    b_sentence_end: np.ndarray
    pairs: _Pairs  # the rows' pairs (global sentence and token indices)

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.row_offsets)

    def examples(self, docs: DocumentSet) -> Iterator[Example]:
        """The rows as `Example`s (one Python object each: for tests and inspection, not for building)."""
        for r in range(len(self)):
            t0, t1 = self.row_offsets[r], self.row_offsets[r + 1]
            m0, m1 = self.mask_offsets[r], self.mask_offsets[r + 1]
            span = _pair_span(docs, self.pairs, r)
            yield Example(
                self.input_ids[t0:t1],
                self.token_type_ids[t0:t1],
                self.masked_lm_positions[m0:m1],
                self.masked_lm_ids[m0:m1],
                int(self.next_sentence_label[r]),
                None if self.word_starts is None else self.word_starts[t0:t1],
                docs.doc_ids[span.a_doc],
                docs.doc_ids[span.b_doc],
                span,
            )


def _assemble(
    docs: DocumentSet,
    pairs: _Pairs,
    config: PretrainingDataConfig,
    special: SpecialTokens,
    rng: np.random.Generator,
    source: tuple[np.ndarray, np.ndarray | None] | None = None,
) -> ExampleBatch:
    """`[CLS] A [SEP] B [SEP]` for every pair, masked unless masking is dynamic.

    Each row is five runs of `source` (the shard's tokens followed by [CLS] and [SEP]): [CLS],
    A, [SEP], B, [SEP]; one gather over the concatenated runs' indices makes every row at once.
    """
    tokens, starts = source or _sources(docs, special)
    cls_at, sep_at = len(tokens) - 2, len(tokens) - 1
    rows = len(pairs.a_doc)
    runs = 5 if config.next_sentence_prediction else 3  # [CLS] A [SEP] (B [SEP])
    a_len = (pairs.a_token_end - pairs.a_token_start).astype(np.int64)
    b_len = (pairs.b_token_end - pairs.b_token_start).astype(np.int64)
    run_start = np.empty((rows, runs), dtype=np.int64)
    run_start[:, 0], run_start[:, 1], run_start[:, 2] = cls_at, pairs.a_token_start, sep_at
    run_len = np.ones((rows, runs), dtype=np.int64)
    run_len[:, 1] = a_len
    if runs == 5:
        run_start[:, 3], run_start[:, 4] = pairs.b_token_start, sep_at
        run_len[:, 3] = b_len
    row_offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(run_len.sum(axis=1), out=row_offsets[1:])
    run_start, run_len = run_start.ravel(), run_len.ravel()
    # index = run start + position in the run: a running sum of ones, jumping at each run's start
    step = np.ones(int(row_offsets[-1]), dtype=np.int64)
    run_first = np.zeros(len(run_len), dtype=np.int64)
    np.cumsum(run_len[:-1], out=run_first[1:])
    step[run_first] = run_start - np.concatenate(([0], run_start[:-1] + run_len[:-1] - 1))
    index = np.cumsum(step)
    ids = tokens[index]
    token_types = np.repeat(np.tile(np.array([0, 0, 0, 1, 1][:runs], dtype=np.int8), rows), run_len)
    word_starts = None
    if config.whole_word_masking:
        assert starts is not None
        word_starts = starts[index]
        word_starts[run_first] = True  # a trimmed segment may start inside a word
    if config.dynamic_masking:
        masked = MaskedRows(ids, np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(rows + 1, np.int64))
    else:
        masked = mask_rows(ids, row_offsets, config, special, rng, word_starts)
    a_first = docs.doc_sentences[pairs.a_doc]
    b_first = docs.doc_sentences[pairs.b_doc]
    return ExampleBatch(
        masked.input_ids, row_offsets, token_types, word_starts,
        masked.masked_lm_positions, masked.masked_lm_ids, masked.mask_offsets,
        pairs.is_random_next.astype(np.int8) if runs == 5 else np.full(rows, NO_NSP_LABEL, dtype=np.int8),
        pairs.a_doc.astype(np.int64), pairs.a_sentence_start - a_first, pairs.a_sentence_end - a_first,
        pairs.b_doc.astype(np.int64), pairs.b_sentence_start - b_first, pairs.b_sentence_end - b_first,
        pairs,
    )


def _sources(docs: DocumentSet, special: SpecialTokens) -> tuple[np.ndarray, np.ndarray | None]:
    """The shard's tokens followed by [CLS] and [SEP] (and its word starts, followed by two Trues)."""
    tokens = np.concatenate((docs.tokens, np.array([special.cls_id, special.sep_id], dtype=np.int32)))
    starts = None if docs.word_starts is None else np.concatenate((docs.word_starts, [True, True]))
    return tokens, starts


def create_example_batches(
    docs: DocumentSet,
    config: PretrainingDataConfig,
    special: SpecialTokens,
    rng: np.random.Generator,
    batch_rows: int = BATCH_ROWS,
) -> Iterator[ExampleBatch]:
    """All examples of a set of documents (one shard), in their final, shuffled order, `batch_rows` at a time.

    Documents are shuffled, `dupe_factor` passes each draw new pairs, the pairs of all passes
    are shuffled, and each batch is assembled and masked in that order. Only the pairs (eleven
    int32 each) are held for the whole shard; examples are made a batch at a time.
    """
    if config.whole_word_masking and docs.word_starts is None:
        raise InputError("whole-word masking needs word_starts on every document")
    order = rng.permutation(len(docs)).tolist()
    pairs = _draw_pairs(docs, order, config, rng, passes=config.dupe_factor)
    pairs = pairs.take(rng.permutation(len(pairs.a_doc)))
    source = _sources(docs, special)
    for start in range(0, len(pairs.a_doc), batch_rows):
        yield _assemble(docs, pairs.take(np.s_[start : start + batch_rows]), config, special, rng, source)


def create_examples(
    documents: Sequence[TokenizedDocument] | DocumentSet,
    config: PretrainingDataConfig,
    special: SpecialTokens,
    rng: np.random.Generator,
) -> Iterator[Example]:
    """`create_example_batches`, one `Example` at a time (document indices refer to `documents`)."""
    if not isinstance(documents, DocumentSet):
        if config.whole_word_masking and any(d.word_starts is None for d in documents):
            raise InputError("whole-word masking needs word_starts on every document")
        documents = DocumentSet.of(documents)
    for batch in create_example_batches(documents, config, special, rng):
        yield from batch.examples(documents)
