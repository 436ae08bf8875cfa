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
trimmed to fit (`truncate_seq_pair`) and masked (`mask_sequence`).

Per shard (`create_examples`): the documents are shuffled, `dupe_factor` passes are made over
them, and the examples of all passes are shuffled, as in the original.

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
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple, Protocol

import numpy as np

from bert.errors import InputError

RANDOM_NEXT_PROB = 0.5  # the original's fixed share of random-next pairs
MASK_PROB = 0.8  # of the chosen positions (or words): replaced by [MASK]
RANDOM_TOKEN_PROB = 0.1  # ... by a random token; the remaining 10% are left unchanged


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
        """Tokens left for A and B once [CLS], [SEP], [SEP] are in."""
        return self.max_seq_length - 3


class _TokenizerLike(Protocol):
    cls_id: int
    sep_id: int
    mask_id: int
    pad_id: int
    vocab_size: int
    special_ids: Sequence[int] | frozenset[int]


@dataclass(frozen=True)
class SpecialTokens:
    """The ids masking and example assembly need; `special_ids` are never masked nor drawn."""

    cls_id: int
    sep_id: int
    mask_id: int
    pad_id: int
    vocab_size: int
    special_ids: frozenset[int]

    @classmethod
    def of(cls, tokenizer: _TokenizerLike) -> SpecialTokens:
        return cls(
            cls_id=tokenizer.cls_id,
            sep_id=tokenizer.sep_id,
            mask_id=tokenizer.mask_id,
            pad_id=tokenizer.pad_id,
            vocab_size=tokenizer.vocab_size,
            special_ids=frozenset(int(i) for i in tokenizer.special_ids)
            | {tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id, tokenizer.pad_id},
        )

    @cached_property
    def is_special(self) -> np.ndarray:
        """(vocab_size,) bool lookup table: `is_special[ids]` marks the special positions."""
        table = np.zeros(self.vocab_size, dtype=bool)
        table[sorted(self.special_ids)] = True
        return table

    @cached_property
    def replacement_ids(self) -> np.ndarray:
        """The ids a position may be replaced by in the 10% random case."""
        return np.flatnonzero(~self.is_special).astype(np.int32)


@dataclass(frozen=True)
class TokenizedDocument:
    """A document as token ids: its sentences concatenated, with the offsets between them.

    Sentence `i` is `tokens[sentence_offsets[i]:sentence_offsets[i + 1]]`; a run of whole
    sentences is one slice. `word_starts` (True where a token begins a word) is kept for
    whole-word masking and is None otherwise.
    """

    doc_id: str
    tokens: np.ndarray  # (L,) int32
    sentence_offsets: np.ndarray  # (S + 1,) int64, starts at 0, strictly increasing
    word_starts: np.ndarray | None = None  # (L,) bool

    @classmethod
    def from_sentences(
        cls,
        doc_id: str,
        sentences: Sequence[Sequence[int]],
        word_starts: Sequence[Sequence[bool]] | None = None,
    ) -> TokenizedDocument:
        """Build from per-sentence id lists; sentences with no token are left out."""
        keep = [i for i, s in enumerate(sentences) if len(s)]
        lengths = np.array([len(sentences[i]) for i in keep], dtype=np.int64)
        offsets = np.zeros(len(keep) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.fromiter((t for i in keep for t in sentences[i]), dtype=np.int32, count=int(offsets[-1]))
        starts = None
        if word_starts is not None:
            starts = np.fromiter((w for i in keep for w in word_starts[i]), dtype=bool, count=int(offsets[-1]))
        return cls(doc_id, tokens, offsets, starts)

    @property
    def num_sentences(self) -> int:
        return len(self.sentence_offsets) - 1


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
    next_sentence_label: int  # 1 = B is a random next (from another document)
    word_starts: np.ndarray | None  # (T,) bool, with whole-word masking
    a_doc_id: str
    b_doc_id: str
    span: PairSpan  # document indices refer to the (shuffled) list the example was built from


@dataclass(frozen=True)
class MaskedBatch:
    """A batch masked at training time, in the original BERT feature layout."""

    input_ids: np.ndarray  # (B, T) int32, padded with pad_id
    masked_lm_positions: np.ndarray  # (B, P) int32, P = max_predictions_per_seq, 0-padded
    masked_lm_ids: np.ndarray  # (B, P) int32, 0-padded
    masked_lm_weights: np.ndarray  # (B, P) float32: 1.0 for a real prediction, 0.0 for padding


def truncate_seq_pair(
    a: tuple[int, int], b: tuple[int, int], max_num_tokens: int, rng: np.random.Generator
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Trim two [start, end) slices until their lengths add up to at most `max_num_tokens`.

    As the original: one token at a time from the longer one (B on a tie), from its front or
    its back with probability one half each.
    """
    (a_start, a_end), (b_start, b_end) = a, b
    excess = (a_end - a_start) + (b_end - b_start) - max_num_tokens
    if excess <= 0:
        return a, b
    for from_front in (rng.random(excess) < 0.5).tolist():
        if a_end - a_start > b_end - b_start:
            if from_front:
                a_start += 1
            else:
                a_end -= 1
        elif from_front:
            b_start += 1
        else:
            b_end -= 1
    return (a_start, a_end), (b_start, b_end)


def create_pair_spans(
    documents: Sequence[TokenizedDocument],
    doc_index: int,
    config: PretrainingDataConfig,
    rng: np.random.Generator,
) -> list[PairSpan]:
    """The sentence pairs of one document (the original `create_instances_from_document`)."""
    doc = documents[doc_index]
    offsets = doc.sentence_offsets
    max_num_tokens = config.max_num_tokens
    target_seq_length = max_num_tokens
    if rng.random() < config.short_seq_prob:
        target_seq_length = int(rng.integers(2, max_num_tokens + 1))

    spans: list[PairSpan] = []
    chunk_start = 0  # first sentence of the current chunk
    i = 0
    while i < doc.num_sentences:
        chunk_len = i + 1 - chunk_start
        chunk_tokens = int(offsets[i + 1] - offsets[chunk_start])
        at_doc_end = i == doc.num_sentences - 1
        if not (at_doc_end or (chunk_tokens >= target_seq_length and chunk_len >= 2)):
            i += 1
            continue
        a_end = chunk_start + 1
        if chunk_len >= 2:
            a_end = chunk_start + int(rng.integers(1, chunk_len))
        a_tokens = (int(offsets[chunk_start]), int(offsets[a_end]))
        is_random_next = rng.random() < RANDOM_NEXT_PROB
        if (is_random_next and len(documents) == 1) or (not is_random_next and chunk_len == 1):
            chunk_start = i = i + 1  # the drawn kind of B is impossible here: no pair from this chunk
            continue
        if is_random_next:
            target_b_length = target_seq_length - (a_tokens[1] - a_tokens[0])
            b_doc = int(rng.integers(0, len(documents) - 1))
            b_doc += b_doc >= doc_index  # uniform over the other documents
            other = documents[b_doc]
            b_start = int(rng.integers(0, other.num_sentences))
            b_end = b_start + 1
            while b_end < other.num_sentences and other.sentence_offsets[b_end] - other.sentence_offsets[b_start] < target_b_length:
                b_end += 1
            b_tokens = (int(other.sentence_offsets[b_start]), int(other.sentence_offsets[b_end]))
            i = a_end - 1  # the chunk's unused sentences go back for the next example
        else:
            b_doc, b_start, b_end = doc_index, a_end, i + 1
            b_tokens = (int(offsets[a_end]), int(offsets[i + 1]))
        a_tokens, b_tokens = truncate_seq_pair(a_tokens, b_tokens, max_num_tokens, rng)
        spans.append(
            PairSpan(doc_index, chunk_start, a_end, *a_tokens, b_doc, b_start, b_end, *b_tokens, is_random_next)
        )
        chunk_start = i = i + 1
    return spans


def mask_sequence(
    input_ids: np.ndarray,
    config: PretrainingDataConfig,
    special: SpecialTokens,
    rng: np.random.Generator,
    word_starts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask one sequence; returns (masked ids, masked positions increasing, original ids there).

    `min(max_predictions_per_seq, max(1, round(n * masked_lm_prob)))` positions are chosen
    among the n non-special tokens (special ids, padding included, are never chosen); each is
    replaced by [MASK] 80% of the time, by a random non-special token 10%, and left as it is
    10%. With `config.whole_word_masking`, `word_starts` groups the pieces of a word: words are
    taken in random order, a word only if all its pieces fit under the cap, and the
    80/10/10 choice is made once for the whole word.
    """
    ids = np.asarray(input_ids)
    candidates = np.flatnonzero(~special.is_special[ids])
    masked = ids.astype(np.int32, copy=True)
    n = len(candidates)
    if n == 0:
        return masked, np.zeros(0, np.int32), np.zeros(0, np.int32)
    num_to_predict = min(config.max_predictions_per_seq, max(1, round(n * config.masked_lm_prob)))

    if config.whole_word_masking:
        if word_starts is None:
            raise InputError("whole-word masking needs the word_starts of the sequence")
        starts = np.asarray(word_starts, dtype=bool)[candidates]
        starts[0] = True
        starts[1:] |= np.diff(candidates) != 1  # a word never continues across a special token
        word_first = np.flatnonzero(starts)  # index into candidates of each word's first piece
        word_len = np.diff(np.append(word_first, n))
        chosen_words: list[int] = []
        total = 0
        for w in rng.permutation(len(word_first)).tolist():
            if total + word_len[w] <= num_to_predict:
                chosen_words.append(w)
                total += int(word_len[w])
                if total == num_to_predict:
                    break
        word_choice = rng.random(len(chosen_words))
        pieces = [candidates[word_first[w] : word_first[w] + word_len[w]] for w in chosen_words]
        positions = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
        choice = np.repeat(word_choice, [len(p) for p in pieces])
    else:
        positions = candidates[rng.permutation(n)[:num_to_predict]]
        choice = rng.random(len(positions))

    to_mask = choice < MASK_PROB
    to_random = (choice >= MASK_PROB) & (choice < MASK_PROB + RANDOM_TOKEN_PROB)
    masked[positions[to_mask]] = special.mask_id
    replacement = special.replacement_ids[rng.integers(0, len(special.replacement_ids), int(to_random.sum()))]
    masked[positions[to_random]] = replacement
    order = np.argsort(positions, kind="stable")
    positions = positions[order].astype(np.int32)
    return masked, positions, ids[positions].astype(np.int32)


def mask_batch(
    input_ids: np.ndarray | Sequence[Sequence[int]],
    config: PretrainingDataConfig,
    special: SpecialTokens,
    rng: np.random.Generator,
    word_starts: np.ndarray | Sequence[Sequence[bool]] | None = None,
) -> MaskedBatch:
    """Mask a batch at training time (dynamic masking): one `mask_sequence` per row, in order.

    `input_ids` is a (B, T) array padded with `pad_id` or a list of unpadded id lists (padded
    here). `word_starts`, laid out the same way, is needed with whole-word masking.
    """
    rows = [np.asarray(r) for r in input_ids]
    width = max((len(r) for r in rows), default=0)
    p = config.max_predictions_per_seq
    out = MaskedBatch(
        input_ids=np.full((len(rows), width), special.pad_id, dtype=np.int32),
        masked_lm_positions=np.zeros((len(rows), p), dtype=np.int32),
        masked_lm_ids=np.zeros((len(rows), p), dtype=np.int32),
        masked_lm_weights=np.zeros((len(rows), p), dtype=np.float32),
    )
    for b, row in enumerate(rows):
        starts = None if word_starts is None else np.asarray(word_starts[b], dtype=bool)
        masked, positions, labels = mask_sequence(row, config, special, rng, starts)
        out.input_ids[b, : len(row)] = masked
        out.masked_lm_positions[b, : len(positions)] = positions
        out.masked_lm_ids[b, : len(labels)] = labels
        out.masked_lm_weights[b, : len(labels)] = 1.0
    return out


def build_example(
    documents: Sequence[TokenizedDocument],
    span: PairSpan,
    config: PretrainingDataConfig,
    special: SpecialTokens,
    rng: np.random.Generator,
) -> Example:
    """Assemble `[CLS] A [SEP] B [SEP]` for one span, masked unless masking is dynamic."""
    a_doc, b_doc = documents[span.a_doc], documents[span.b_doc]
    a = a_doc.tokens[span.a_token_start : span.a_token_end]
    b = b_doc.tokens[span.b_token_start : span.b_token_end]
    ids = np.concatenate(([special.cls_id], a, [special.sep_id], b, [special.sep_id])).astype(np.int32)
    token_types = np.zeros(len(ids), dtype=np.int8)
    token_types[len(a) + 2 :] = 1
    word_starts = None
    if config.whole_word_masking:
        assert a_doc.word_starts is not None and b_doc.word_starts is not None
        word_starts = np.concatenate(
            (
                [True],
                a_doc.word_starts[span.a_token_start : span.a_token_end],
                [True],
                b_doc.word_starts[span.b_token_start : span.b_token_end],
                [True],
            )
        ).astype(bool)
        word_starts[[1, len(a) + 2]] = True  # a trimmed segment may start inside a word
    if config.dynamic_masking:
        positions = labels = np.zeros(0, np.int32)
    else:
        ids, positions, labels = mask_sequence(ids, config, special, rng, word_starts)
    return Example(
        ids, token_types, positions, labels, int(span.is_random_next), word_starts, a_doc.doc_id, b_doc.doc_id, span
    )


def create_examples(
    documents: Sequence[TokenizedDocument],
    config: PretrainingDataConfig,
    special: SpecialTokens,
    rng: np.random.Generator,
) -> Iterator[Example]:
    """All examples of a set of documents (one shard), in their final, shuffled order.

    Documents are shuffled, `dupe_factor` passes each draw new pairs, the pairs of all passes
    are shuffled, and each is assembled and masked in that order. Only the pair spans (eleven
    integers each) are held for the whole shard; examples are produced one at a time.
    """
    if config.whole_word_masking and any(d.word_starts is None for d in documents):
        raise InputError("whole-word masking needs word_starts on every document")
    order = rng.permutation(len(documents))
    shuffled = [documents[i] for i in order]
    chunks = [np.zeros((0, len(PairSpan._fields)), dtype=np.int64)]
    for _ in range(config.dupe_factor):
        for doc_index in range(len(shuffled)):
            spans = create_pair_spans(shuffled, doc_index, config, rng)
            if spans:
                chunks.append(np.array(spans, dtype=np.int64))
    packed = np.concatenate(chunks)  # (pairs, 11) int64: 88 bytes a pair
    for k in rng.permutation(len(packed)).tolist():
        *fields, is_random_next = packed[k].tolist()
        yield build_example(shuffled, PairSpan(*fields, bool(is_random_next)), config, special, rng)
