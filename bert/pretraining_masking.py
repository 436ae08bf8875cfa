"""Masking for MLM: many rows at once at build time (`mask_rows`), one batch at training time
(`mask_batch`, dynamic masking). The rules are described in `bert.pretraining_data`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import numpy as np

from bert.errors import InputError

MASK_PROB = 0.8  # of the chosen positions (or words): replaced by [MASK]
RANDOM_TOKEN_PROB = 0.1  # ... by a random token; the remaining 10% are left unchanged


class MaskingConfig(Protocol):
    """What masking reads of `bert.pretraining_data.PretrainingDataConfig` (no import: that module imports this one)."""

    max_predictions_per_seq: int
    masked_lm_prob: float
    whole_word_masking: bool


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
class MaskedBatch:
    """A batch masked at training time, in the original BERT feature layout."""

    input_ids: np.ndarray  # (B, T) int32, padded with pad_id
    masked_lm_positions: np.ndarray  # (B, P) int32, P = max_predictions_per_seq, 0-padded
    masked_lm_ids: np.ndarray  # (B, P) int32, 0-padded
    masked_lm_weights: np.ndarray  # (B, P) float32: 1.0 for a real prediction, 0.0 for padding


# ----------------------------------------------------------------------------- masking


@dataclass(frozen=True)
class MaskedRows:
    """Many rows masked at once, flat: row `r` is `input_ids[row_offsets[r]:row_offsets[r + 1]]`, its
    predictions `masked_lm_*[mask_offsets[r]:mask_offsets[r + 1]]` (positions within the row, increasing)."""

    input_ids: np.ndarray  # (N,) int32
    masked_lm_positions: np.ndarray  # (M,) int32
    masked_lm_ids: np.ndarray  # (M,) int32
    mask_offsets: np.ndarray  # (B + 1,) int64


def mask_rows(
    input_ids: np.ndarray,
    row_offsets: np.ndarray,
    config: MaskingConfig,
    special: SpecialTokens,
    rng: np.random.Generator,
    word_starts: np.ndarray | None = None,
) -> MaskedRows:
    """Mask many rows at once, with `mask_sequence`'s rules (and its distribution) for each row.

    Per row, `min(max_predictions_per_seq, max(1, round(n * masked_lm_prob)))` of its n
    non-special tokens are chosen uniformly: those with the smallest random keys. With
    whole-word masking, words are visited in a random order and a word is taken if all its
    pieces still fit. Each chosen token (or word) becomes [MASK] 80% of the time, a random
    non-special token 10%, and stays 10%.
    """
    ids = np.asarray(input_ids, dtype=np.int32)
    row_offsets = np.asarray(row_offsets, dtype=np.int64)
    rows = len(row_offsets) - 1
    candidate = ~special.is_special[ids]
    running = np.concatenate(([0], np.cumsum(candidate)))
    n = running[row_offsets[1:]] - running[row_offsets[:-1]]
    k = np.minimum(config.max_predictions_per_seq, np.maximum(1, np.round(n * config.masked_lm_prob))).astype(np.int64)
    k[n == 0] = 0

    if config.whole_word_masking:
        if word_starts is None:
            raise InputError("whole-word masking needs the word_starts of the rows")
        row_of = np.repeat(np.arange(rows), np.diff(row_offsets))
        chosen, choice = _choose_words(
            np.flatnonzero(candidate), row_of, np.asarray(word_starts, dtype=bool), k, rows, rng
        )
        chosen_rows = row_of[chosen]
    else:
        chosen_rows, chosen = _choose_tokens(candidate, row_offsets, k, rng)
        choice = rng.random(len(chosen))

    to_mask = choice < MASK_PROB
    to_random = (choice >= MASK_PROB) & (choice < MASK_PROB + RANDOM_TOKEN_PROB)
    labels = ids[chosen]
    masked = ids.copy()
    masked[chosen[to_mask]] = special.mask_id
    masked[chosen[to_random]] = special.replacement_ids[
        rng.integers(0, len(special.replacement_ids), int(to_random.sum()))
    ]
    mask_offsets = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(chosen_rows, minlength=rows), out=mask_offsets[1:])
    positions = (chosen - row_offsets[chosen_rows]).astype(np.int32)
    return MaskedRows(masked, positions, labels.astype(np.int32), mask_offsets)


_KEY_BITS = 54  # random part of a selection key; the low 7+ bits hold the column, which makes keys distinct


def _choose_tokens(
    candidate: np.ndarray, row_offsets: np.ndarray, k: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Rows and flat positions (increasing) of k[r] uniformly chosen candidates of each row r.

    Rows are laid out in a (rows, longest) table of keys: a random number above the column
    (so no two keys of a row are equal), or for a non-candidate or padding a key above every
    random one. A row's chosen tokens are those with its k[r] smallest keys.
    """
    lengths = np.diff(row_offsets)
    rows, width = len(lengths), int(lengths.max(initial=0))
    most = int(k.max(initial=0))
    if most == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    column_bits = max(7, int(width - 1).bit_length())
    inside = np.arange(width)[None, :] < lengths[:, None]
    draws = rng.integers(0, 1 << _KEY_BITS, size=len(candidate), dtype=np.int64)
    draws[~candidate] = 1 << _KEY_BITS
    keys = np.full((rows, width), 1 << _KEY_BITS, dtype=np.int64)
    keys[inside] = draws
    keys <<= column_bits
    keys |= np.arange(width, dtype=np.int64)[None, :]
    smallest = np.sort(np.partition(keys, most - 1, axis=1)[:, :most] if most < width else keys, axis=1)
    threshold = smallest[np.arange(rows), np.maximum(k - 1, 0)]
    chosen = (keys <= threshold[:, None]) & (k > 0)[:, None]
    chosen_rows, columns = np.nonzero(chosen)
    return chosen_rows, row_offsets[chosen_rows] + columns


def _choose_words(
    cand: np.ndarray, row_of: np.ndarray, word_starts: np.ndarray, k: np.ndarray, rows: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Whole words: flat positions of the chosen pieces (increasing), and each piece's word's 80/10/10 draw."""
    if len(cand) == 0:
        return cand, np.zeros(0)
    cand_row = row_of[cand]
    starts = word_starts[cand].copy()
    starts[0] = True
    starts[1:] |= (np.diff(cand) != 1) | (cand_row[1:] != cand_row[:-1])  # a word never continues across a special
    word_first = np.flatnonzero(starts)  # index into cand of each word's first piece
    word_len = np.diff(np.append(word_first, len(cand)))
    word_row = cand_row[word_first]
    words_per_row = np.bincount(word_row, minlength=rows)
    row_first_word = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(words_per_row, out=row_first_word[1:])
    # each row's words in a random order: sort by (row, key)
    order = np.lexsort((rng.random(len(word_first)), word_row))
    width = int(words_per_row.max())
    column = np.arange(len(order)) - row_first_word[word_row[order]]
    length = np.zeros((rows, width), dtype=np.int64)
    length[word_row[order], column] = word_len[order]
    taken = np.zeros((rows, width), dtype=bool)
    total = np.zeros(rows, dtype=np.int64)
    for c in range(width):  # greedy, as mask_sequence: a word is taken if all its pieces still fit
        fits = (length[:, c] > 0) & (total + length[:, c] <= k)
        total += np.where(fits, length[:, c], 0)
        taken[:, c] = fits
        if (total == k).all():
            break
    words = order[taken[word_row[order], column]]  # chosen words, row by row in their random order
    word_choice = rng.random(len(words))
    chosen = np.zeros(len(cand), dtype=bool)
    draw = np.zeros(len(cand))
    pieces = np.repeat(word_first[words], word_len[words]) + _ranges(word_len[words])
    chosen[pieces] = True
    draw[pieces] = np.repeat(word_choice, word_len[words])
    return cand[chosen], draw[chosen]


def _ranges(lengths: np.ndarray) -> np.ndarray:
    """`[0, 1, ..., l0 - 1, 0, 1, ..., l1 - 1, ...]` for the given lengths."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(total, dtype=np.int64) - starts


# ----------------------------------------------------------------------------- one sequence (training time)


def mask_sequence(
    input_ids: np.ndarray,
    config: MaskingConfig,
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
    config: MaskingConfig,
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
