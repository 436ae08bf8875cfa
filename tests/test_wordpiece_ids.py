"""`bert.wordpiece_ids.WordPieceIds` gives exactly the ids of the `tokenizers` pipeline it reads from.

The reference is the library object itself (`encode_batch(..., add_special_tokens=False)`), whose
output the tokenizer tests check against transformers' BertTokenizer; here: Wikipedia text, every
kind of character the normalizer and pre-tokenizer treat specially, every normalizer setting,
and a cache emptied as it fills.
"""

import gzip

import numpy as np
import pytest

from bert.pretraining_documents import encode_documents
from bert.tokenizer import Tokenizer
from bert.wordpiece_ids import WordPieceIds
from tests.conftest import DATASETS

VOCAB = DATASETS / "bert-base-uncased" / "vocab.txt"
WIKI = DATASETS / "wikipedia_en_extract" / "AA"

ODD = [
    "",
    "   ",
    "\t\n\r",
    "Hello, World!",
    "state-of-the-art (SOTA) models: 3.14% of $5_000 at 12:30pm; e-mail me@x.org #tag ~home `q` {a|b} [c]\\d^",
    "ctrl\x00chars\x01inside\x07words\x0bhere\x0c\x1c\x1d\x1e\x1f\x7fend",
    "zero\u200bwidth\u200dand\ufeffbom and \ufffd replacement",
    "Café déjà vu — naïve Æsir façade Ōsaka İstanbul ß ﬁ ligature",
    "decomposed e\u0301 and o\u0308 and a lone \u0301 mark",
    "Chinese 中文字符 mixed with 日本語 and 한국어 text",
    "emoji 😀🚀 and non-BMP 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and \U00010100 Aegean",
    "non-breaking\xa0space, thin\u2009space, ideographic\u3000space, \u2028line\u2029para \x85next",
    "Arabic العربية and Hebrew עברית and Thai ภาษาไทย and Devanagari हिन्दी",
    "quotes «guillemets» „low“ ‘single’ “double” ¿que? ¡si! … · • ‰ ‹›",
    "symbols € £ ¥ © ® ™ ° ± × ÷ ½ ² µ ¶ § ¦ ¬ ¯ ´ ¸ ¨",
    "a" * 99 + " " + "b" * 100 + " " + "c" * 101 + " " + "é" * 101,
    "unknownchars ☃☃ ⌘⌘x qq\U0001f9ffqq",
    "[CLS] [SEP] [MASK] [PAD] [UNK] ##ing ##",
    "MiXeD CaSe WORDS and UPPER CASE",
    "lone surrogate \ud800 here",
]


def _library_ids(tokenizer: Tokenizer, sentences: list[str]) -> list[list[int]]:
    library = tokenizer._backend._library
    texts = [s if s.isascii() else "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in s) for s in sentences]
    return [e.ids for e in library.encode_batch(texts, add_special_tokens=False)]


def _split(ids: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    assert ids.dtype == np.int32 and lengths.dtype == np.int64 and int(lengths.sum()) == len(ids)
    ends = np.cumsum(lengths)
    return [ids[end - n : end].tolist() for n, end in zip(lengths.tolist(), ends.tolist())]


def _wiki_lines(files: int) -> list[str]:
    lines = []
    for path in sorted(WIKI.glob("wiki_*.gz"))[:files]:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines += [line.rstrip("\n") for line in f if line.strip() and not line.startswith("<")]
    return lines


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"lowercase": False},
        {"lowercase": True, "strip_accents": False},
        {"lowercase": False, "strip_accents": True},
        {"tokenize_chinese_chars": False},
    ],
    ids=["uncased", "cased", "uncased-keep-accents", "cased-strip-accents", "no-chinese-split"],
)
def test_the_ids_are_the_librarys_on_every_kind_of_character(settings):
    tokenizer = Tokenizer.from_vocab_file(VOCAB, **settings)
    ids = WordPieceIds(tokenizer._backend._library)
    texts = ODD + [" ".join(ODD)] + [chr(c) for c in range(128)] + [f"x{chr(c)}y" for c in range(0x80, 0x3100)]
    assert _split(*ids(texts)) == _library_ids(tokenizer, texts)
    assert _split(*ids(list(reversed(texts)))) == _library_ids(tokenizer, list(reversed(texts)))  # from the cache


def test_the_ids_are_the_librarys_on_wikipedia_with_a_cache_emptied_as_it_fills():
    tokenizer = Tokenizer.from_vocab_file(VOCAB)
    lines = _wiki_lines(3)
    expected = _library_ids(tokenizer, lines)
    assert sum(map(len, expected)) > 500_000 and any(not line.isascii() for line in lines)
    small = WordPieceIds(tokenizer._backend._library, cache_words=5_000)
    for start in range(0, len(lines), 500):
        batch = lines[start : start + 500]
        assert _split(*small(batch)) == expected[start : start + 500]
        assert len(small._cache) <= max(5_000, len(set(" ".join(batch).split())) * 3)
    assert _split(*WordPieceIds(tokenizer._backend._library)(lines)) == expected


def test_documents_are_encoded_as_the_tokenizer_encodes_them():
    tokenizer = Tokenizer.from_vocab_file(VOCAB)
    documents = [("a", ["Café déjà vu.", "", "Second sentence here!"]), ("b", ["   "]), ("c", ODD)]
    docs, without_tokens = encode_documents(tokenizer, documents, word_starts=True)
    sentences = [s for _, doc in documents for s in doc]
    encodings = tokenizer.encode_batch(sentences, add_special_tokens=False)
    kept = [e for e in encodings if len(e.ids)]
    assert docs.tokens.tolist() == [i for e in kept for i in e.ids]
    assert docs.word_starts.tolist() == [w for e in kept for w in e.word_starts]
    assert np.diff(docs.sentence_offsets).tolist() == [len(e.ids) for e in kept]
    assert list(docs.doc_ids) == ["a", "c"] and without_tokens == 1
