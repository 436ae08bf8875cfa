"""WordPiece ids for many sentences at once, several times faster than the `tokenizers` pipeline they equal.

`tokenizers` encodes every word of every sentence through its WordPiece model, though a corpus
repeats the same words over and over. `WordPieceIds` splits each sentence into the words BERT's
pre-tokenizer would cut (whitespace removed, each punctuation character alone), looks each word
up in a cache of its pieces, and asks the library's own WordPiece model only for words it has
not met. The ids are those of `library.encode_batch(sentences, add_special_tokens=False)`
exactly, by construction:

* normalization is the library's: an ASCII sentence goes through a table built by asking the
  library's normalizer for each ASCII character (BertNormalizer and NFC act on ASCII one
  character at a time: cleaning, lowercasing), any other sentence through
  `library.normalizer.normalize_str` itself;
* the characters the pre-tokenizer removes or isolates are learnt from the pre-tokenizer: all
  of ASCII at the start, and every other character the first time a normalized sentence holds
  it; a character it neither removes nor isolates stays inside a word, as there;
* a word's pieces are `library.model.tokenize(word)`: the model the pipeline runs, with its
  unknown token and its 100-character limit.

The cache holds at most `cache_words` words and is emptied when full: a corpus's frequent words
come back at once, and memory stays bounded on any corpus.
"""

from __future__ import annotations

import re
from itertools import chain
from typing import Any

import numpy as np

from bert.tokenizer_backends import _sanitize  # lone surrogates as `Tokenizer` sends them: U+FFFD

_PROBE = "a"  # a letter: joins with any character that is neither whitespace nor punctuation

CACHE_WORDS = 1 << 18


class WordPieceIds:
    """Token ids of sentences through a `tokenizers.Tokenizer` with BERT's WordPiece pipeline.

    Only for the pipeline `bert.tokenizer_backends._WordPieceBackend` builds: a normalizer, the
    `BertPreTokenizer`, a `WordPiece` model, no added tokens. Not thread-safe (one per worker).
    """

    def __init__(self, library: Any, cache_words: int = CACHE_WORDS) -> None:
        self.library = library
        self._normalize = library.normalizer.normalize_str
        self._model = library.model
        self.cache_words = cache_words
        self._cache: dict[str, tuple[int, ...]] = {}
        # per character met: "w" (inside a word), "p" (punctuation, a word alone), "s" (whitespace, removed)
        self._kinds: dict[str, str] = {}
        ascii_chars = [chr(c) for c in range(128)]
        self._ascii_table = str.maketrans({c: self._normalize(c) or None for c in ascii_chars})
        self._learn(ascii_chars)
        self._ascii_words = self._words_pattern(ascii_only=True)
        self._words = self._words_pattern(ascii_only=False)

    def __call__(self, sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All token ids back to back (int32), and each sentence's number of tokens (int64)."""
        words: list[str] = []
        word_counts = np.zeros(len(sentences), dtype=np.int64)
        ascii_words, table = self._ascii_words.findall, self._ascii_table
        for k, sentence in enumerate(sentences):
            if sentence.isascii():
                found = ascii_words(sentence.translate(table))
            else:
                found = self._split(self._normalize(_sanitize(sentence, "sentence")))
            word_counts[k] = len(found)
            words += found
        cache = self._cache
        new = set(words).difference(cache)
        if len(cache) + len(new) > self.cache_words:
            cache.clear()
            new = set(words)
        tokenize = self._model.tokenize
        for word in new:
            cache[word] = tuple(token.id for token in tokenize(word))
        pieces = [cache[word] for word in words]
        piece_counts = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        ids = np.fromiter(chain.from_iterable(pieces), dtype=np.int32, count=int(piece_counts.sum()))
        word_ends = np.cumsum(word_counts)
        token_ends = np.concatenate([[0], np.cumsum(piece_counts)])[word_ends]
        return ids, np.diff(token_ends, prepend=0)

    def _split(self, normalized: str) -> list[str]:
        """The words of a normalized sentence holding non-ASCII characters."""
        unknown = set(normalized).difference(self._kinds)
        if unknown and self._learn(sorted(unknown)):
            self._words = self._words_pattern(ascii_only=False)
        return self._words.findall(normalized)

    def _learn(self, chars: list[str]) -> bool:
        """Ask the pre-tokenizer what each of `chars` is; True if any is whitespace or punctuation."""
        chars = [c for c in chars if c != _PROBE]
        text = _PROBE + _PROBE.join(chars) + _PROBE
        pieces = [piece for piece, _ in self.library.pre_tokenizer.pre_tokenize_str(text)]
        isolated = {p for p in pieces if len(p) == 1 and p != _PROBE}
        kept = set("".join(pieces))
        splits = False
        for c in chars:
            kind = "p" if c in isolated else "w" if c in kept else "s"
            self._kinds[c] = kind
            splits |= kind != "w"
        self._kinds.setdefault(_PROBE, "w")
        return splits

    def _words_pattern(self, ascii_only: bool) -> re.Pattern[str]:
        """Runs of word characters, or one punctuation character (whitespace between them dropped)."""
        kinds = [(c, k) for c, k in self._kinds.items() if c.isascii() or not ascii_only]
        punct = _char_class(c for c, k in kinds if k == "p")
        split = _char_class(c for c, k in kinds if k != "w")
        return re.compile(f"[^{split}]+|[{punct}]" if punct else f"[^{split}]+")


def _char_class(chars: Any) -> str:
    """The inside of a regex character class holding `chars`, as ranges of consecutive code points."""
    points = sorted(set(map(ord, chars)))
    parts, i = [], 0
    while i < len(points):
        j = i
        while j + 1 < len(points) and points[j + 1] == points[j] + 1:
            j += 1
        first, last = re.escape(chr(points[i])), re.escape(chr(points[j]))
        parts.append(first if i == j else f"{first}-{last}")
        i = j + 1
    return "".join(parts)
