"""Tokenized documents for example creation: a shard's documents back to back (`DocumentSet`), and
encoding sentences to ids with the `tokenizers` library directly where it can (`encode_documents`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from bert.errors import InputError
from bert.wordpiece_ids import WordPieceIds


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


# ----------------------------------------------------------------------------- documents


@dataclass(frozen=True)
class DocumentSet:
    """Many tokenized documents in flat arrays: one shard's worth, with no object per sentence.

    Document `d` holds sentences `doc_sentences[d]:doc_sentences[d + 1]`; sentence `s` is
    `tokens[sentence_offsets[s]:sentence_offsets[s + 1]]`. Every sentence has at least one token.
    """

    doc_ids: Sequence[str]
    tokens: np.ndarray  # (L,) int32
    sentence_offsets: np.ndarray  # (S + 1,) int64, from 0, strictly increasing
    doc_sentences: np.ndarray  # (D + 1,) int64, from 0, strictly increasing
    word_starts: np.ndarray | None = None  # (L,) bool

    @classmethod
    def from_lengths(
        cls,
        doc_ids: Sequence[str],
        tokens: np.ndarray,
        sentence_lengths: np.ndarray,
        sentences_per_doc: np.ndarray,
        word_starts: np.ndarray | None = None,
    ) -> DocumentSet:
        """Build from the token counts of the sentences and the sentence counts of the documents."""
        sentence_offsets = np.zeros(len(sentence_lengths) + 1, dtype=np.int64)
        np.cumsum(sentence_lengths, out=sentence_offsets[1:])
        doc_sentences = np.zeros(len(sentences_per_doc) + 1, dtype=np.int64)
        np.cumsum(sentences_per_doc, out=doc_sentences[1:])
        if (np.asarray(sentence_lengths) <= 0).any() or (np.asarray(sentences_per_doc) <= 0).any():
            raise InputError("every sentence needs a token and every document a sentence (leave empty ones out)")
        if sentence_offsets[-1] != len(tokens) or doc_sentences[-1] != len(sentence_lengths):
            raise InputError(
                f"inconsistent document arrays: {len(tokens)} tokens, sentence lengths summing to "
                f"{sentence_offsets[-1]}, {len(sentence_lengths)} sentences, documents holding {doc_sentences[-1]}"
            )
        return cls(list(doc_ids), np.asarray(tokens, dtype=np.int32), sentence_offsets, doc_sentences, word_starts)

    @classmethod
    def of(cls, documents: Sequence[TokenizedDocument]) -> DocumentSet:
        """The documents' arrays concatenated, in order."""
        starts = None
        if documents and all(d.word_starts is not None for d in documents):
            starts = np.concatenate([d.word_starts for d in documents])  # type: ignore[misc]
        return cls.from_lengths(
            [d.doc_id for d in documents],
            np.concatenate([d.tokens for d in documents]) if documents else np.zeros(0, np.int32),
            np.concatenate([np.diff(d.sentence_offsets) for d in documents]) if documents else np.zeros(0, np.int64),
            np.array([d.num_sentences for d in documents], dtype=np.int64),
            starts,
        )

    def __len__(self) -> int:
        return len(self.doc_ids)

    @cached_property
    def doc_tokens(self) -> np.ndarray:
        """(D + 1,) int64: document `d` holds `tokens[doc_tokens[d]:doc_tokens[d + 1]]`."""
        return self.sentence_offsets[self.doc_sentences]

    def document(self, d: int) -> TokenizedDocument:
        """Document `d` as a `TokenizedDocument` (views, no copy)."""
        s0, s1 = self.doc_sentences[d], self.doc_sentences[d + 1]
        t0, t1 = self.sentence_offsets[s0], self.sentence_offsets[s1]
        starts = None if self.word_starts is None else self.word_starts[t0:t1]
        return TokenizedDocument(self.doc_ids[d], self.tokens[t0:t1], self.sentence_offsets[s0 : s1 + 1] - t0, starts)


_ENCODE_BATCH_SENTENCES = 4096  # sentences per tokenizer call


def encode_documents(
    tokenizer: Any, documents: Sequence[tuple[str, Sequence[str]]], word_starts: bool = False
) -> tuple[DocumentSet, int]:
    """Tokenize `(doc_id, sentences)` pairs into a `DocumentSet`; also returns how many documents had no token.

    Sentences without a token are left out, and so are documents left with no sentence. The ids
    are those of `tokenizer.encode_batch(sentences, add_special_tokens=False)`. A WordPiece
    `bert.tokenizer.Tokenizer` is asked through `bert.wordpiece_ids.WordPieceIds` (the same ids from its
    `tokenizers` library object, each distinct word tokenized once), for the ids only (no offsets, no
    tokens, no Python object per token), on the calling thread.
    """
    sentences = [s for _, doc in documents for s in doc]
    fast = _library_encoder(tokenizer)
    if fast is not None:
        ids, lengths = fast(sentences)
        starts = fast.word_start_table[ids] if word_starts else None
    else:
        ids, lengths, starts = _encode_with(tokenizer, sentences, word_starts)
    per_doc = np.array([len(doc) for _, doc in documents], dtype=np.int64)
    doc_of_sentence = np.repeat(np.arange(len(documents)), per_doc)
    kept = lengths > 0
    per_doc = np.bincount(doc_of_sentence[kept], minlength=len(documents))
    doc_ids = [documents[d][0] for d in np.flatnonzero(per_doc).tolist()]
    empty = int((per_doc == 0).sum())
    return DocumentSet.from_lengths(doc_ids, ids, lengths[kept], per_doc[per_doc > 0], starts), empty


def _encode_with(
    tokenizer: Any, sentences: list[str], word_starts: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Ids (and word starts) through the tokenizer's public `encode_batch`."""
    ids: list[int] = []
    starts: list[bool] = []
    lengths = np.zeros(len(sentences), dtype=np.int64)
    for b in range(0, len(sentences), _ENCODE_BATCH_SENTENCES):
        batch = tokenizer.encode_batch(sentences[b : b + _ENCODE_BATCH_SENTENCES], add_special_tokens=False)
        for k, encoding in enumerate(batch):
            lengths[b + k] = len(encoding.ids)
            ids += encoding.ids
            if word_starts:
                starts += encoding.word_starts
    return np.array(ids, dtype=np.int32), lengths, np.array(starts, dtype=bool) if word_starts else None


class _LibraryEncoder:
    """A WordPiece tokenizer's `tokenizers.Tokenizer`, asked for ids only, through a cache of words' pieces."""

    def __init__(self, library: Any, vocabulary: list[str]) -> None:
        self.ids = WordPieceIds(library)
        # BERT's whole-word rule, as bert.tokenizer applies it: a "##" piece continues a word
        self.word_start_table = np.array([not t.startswith("##") for t in vocabulary], dtype=bool)

    def __call__(self, sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All token ids back to back, and each sentence's number of tokens."""
        return self.ids(sentences)


_encoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its encoder (one vocabulary scan)


def _library_encoder(tokenizer: Any) -> _LibraryEncoder | None:
    """The fast path for a WordPiece `bert.tokenizer.Tokenizer`, else None; built once per tokenizer.

    `bert.tokenizer` has no public call for ids alone, so this reaches its library object; if
    that changes shape, the public `encode_batch` is used.
    """
    try:
        if tokenizer in _encoders:
            return _encoders[tokenizer]
    except TypeError:  # not weakly referable: build it each time
        return _new_library_encoder(tokenizer)
    encoder = _encoders[tokenizer] = _new_library_encoder(tokenizer)
    return encoder


def _new_library_encoder(tokenizer: Any) -> _LibraryEncoder | None:
    try:
        import tokenizers
    except ImportError:
        return None
    library = getattr(getattr(tokenizer, "_backend", None), "_library", None)
    if getattr(tokenizer, "backend", None) != "wordpiece" or not isinstance(library, tokenizers.Tokenizer):
        return None
    return _LibraryEncoder(library, tokenizer.convert_ids_to_tokens(range(tokenizer.vocab_size)))
