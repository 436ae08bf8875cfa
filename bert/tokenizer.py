"""BERT tokenizers: WordPiece from a `vocab.txt`, or SentencePiece trained by us on a corpus.

One interface, `Tokenizer`, over two backends. Neither tokenization algorithm is written here
(DESIGN.md, principle 7):

- **WordPiece** runs on the `tokenizers` library: `NFC` + `BertNormalizer` (control-character
  removal, CJK character splitting, lower-casing and accent stripping as configured),
  `BertPreTokenizer` (whitespace and punctuation splitting) and the `WordPiece` model (words
  longer than 100 characters become `[UNK]`, as in BERT), batches encoded in parallel by the
  library. Ids equal those of the reference Python `BertTokenizer` of `transformers` for any
  BERT `vocab.txt`, cased or uncased.
- **SentencePiece** (unigram or BPE) runs on the `sentencepiece` library (>= 0.2.2, for its
  character offsets); we train it on a reservoir sample of corpus sentences and reserve `[PAD]`,
  `[UNK]`, `[CLS]`, `[SEP]`, `[MASK]` as ids 0..4 (control pieces: never matched in text).

Both backends tokenize each text on its own; this module then truncates and lays out
`[CLS] A [SEP] B [SEP]` the same way for both, into an `Encoding`: ids, token type ids, tokens,
character offsets into each segment's own text, the segment of every token, and whether a token
starts a word (for whole-word masking).

Decisions and deviations, all deliberate:

- Literal text such as "[MASK]" typed by a user is plain text, never the special token: the
  special tokens are not registered as "added tokens" with the library (nor are SentencePiece's
  control pieces ever matched in text), and their ids are inserted by the layout step only. (The
  reference Python `BertTokenizer` does match them; that is the one known difference in ids.)
- WordPiece applies NFC before `BertNormalizer`, as the reference Python `BertTokenizer` does
  (the plain `tokenizers` pipeline of a fast BERT tokenizer does not). Without accent stripping,
  "e" + U+0301 therefore finds the vocabulary entry "é".
- Strings are sanitised before the libraries see them: lone surrogates (a `str` can hold them,
  UTF-8 cannot) become U+FFFD, which keeps every character offset valid.
- Word starts follow the whole-word masking of the reference implementations: a WordPiece token
  starts a word unless it is a `##` continuation (BERT; punctuation is a word of its own); a
  SentencePiece piece starts a word when it begins with "▁" or is all punctuation (ALBERT).
- Truncation follows the rules of the `tokenizers` library, done here rather than by the
  library: for a text pair the library also builds every combination of overflow windows of
  both texts, which for two long texts exhausts memory. `longest_first` keeps
  the shorter segment whole when it fits in half the room and cuts the longer one, or else cuts
  both to half (the longer one, on a tie the second, gets the odd token); `only_second` cuts
  the second segment only, and fails when text A leaves no room for at least one token of text
  B. `truncation=None` with a `max_length` is a checked bound: a longer encoding is an error.

A tokenizer directory is self-describing and travels inside every checkpoint directory::

    tokenizer_config.json   backend, model file, vocab_size, lowercase, special tokens and ids,
                            (SentencePiece) how it was trained; written last
    vocab.txt | spm.model   the backend's model file

The WordPiece `tokenizer_config.json` also carries the keys `transformers` reads
(`tokenizer_class`, `do_lower_case`, ...), so `AutoTokenizer.from_pretrained(dir)` loads the same
tokenizer; `Tokenizer.load` in turn accepts a Hugging Face BERT directory (`vocab.txt` next to
its `tokenizer_config.json`).
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import random
import re
import signal
import tempfile
import time
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import sentencepiece as spm
import tokenizers
from tokenizers import decoders, normalizers, pre_tokenizers
from tokenizers.models import WordPiece

from bert.errors import InputError

if TYPE_CHECKING:
    from bert.corpus import CorpusConfig

Backend = Literal["wordpiece", "sentencepiece"]
Truncation = Literal["longest_first", "only_second"] | None
SentencePieceModelType = Literal["unigram", "bpe"]

CONFIG_FILE = "tokenizer_config.json"
VOCAB_FILE = "vocab.txt"
SPM_FILE = "spm.model"

# Role -> token string. A SentencePiece model trained here has them as ids 0..4, in this order.
SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
TRUNCATION_STRATEGIES = ("longest_first", "only_second", None)

MAX_INPUT_CHARS_PER_WORD = 100  # WordPiece: longer words become [UNK], as in BERT
DEFAULT_SAMPLE_SENTENCES = 1_000_000
VOCAB_MULTIPLE = 64
SMALL_BATCH = 16  # SentencePiece encodes fewer texts than this one by one, without worker threads
# SentencePiece training: a run of more non-whitespace characters than this (base64, minified code, a
# flattened table, a 5 MB line without a space) is dropped from the sample. No word of any language
# comes near it (the longest run in the Wikipedia extract is 887, URL-encoded citation metadata), and
# such runs cost SentencePiece minutes per megabyte while teaching it nothing.
MAX_TRAINING_RUN_CHARS = 1000
TRAINING_HEARTBEAT_SECONDS = 30.0  # a progress line this often while SentencePiece trains

_SURROGATES = re.compile("[\ud800-\udfff]")
_WORD_BOUNDARY = "\u2581"  # "▁", SentencePiece's whitespace marker


@dataclass(frozen=True, slots=True)
class Encoding:
    """One encoded text or text pair.

    `offsets[i]` are character offsets into the token's own segment text (A or B), `(0, 0)` for
    special tokens; `sequence_ids[i]` is 0 for A, 1 for B and None for special tokens;
    `word_starts[i]` is True where a token starts a new word (and for special tokens).
    """

    ids: list[int]
    token_type_ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]
    sequence_ids: list[int | None]
    word_starts: list[bool]

    def __len__(self) -> int:
        return len(self.ids)


class _Segment(NamedTuple):
    """The tokens of one text (segment A or B), before special tokens are added."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    word_starts: list[bool]

    def head(self, n: int) -> _Segment:
        return _Segment(self.ids[:n], self.offsets[:n], self.word_starts[:n])


class Tokenizer:
    """WordPiece or SentencePiece tokenizer with one interface; see the module docstring."""

    def __init__(self, backend: _WordPieceBackend | _SentencePieceBackend) -> None:
        self._backend = backend
        self._special = backend.special_ids

    # ----------------------------------------------------------------- construction and I/O

    @classmethod
    def from_vocab_file(
        cls,
        path: str | os.PathLike[str],
        lowercase: bool = True,
        strip_accents: bool | None = None,
        tokenize_chinese_chars: bool = True,
    ) -> Tokenizer:
        """WordPiece tokenizer from a BERT `vocab.txt` (one token per line, the id is the line number).

        `strip_accents=None` strips accents exactly when lower-casing, as BERT does.
        """
        path = Path(path)
        tokens = _read_vocab(path)
        return cls(
            _WordPieceBackend(
                tokens,
                lowercase=lowercase,
                strip_accents=strip_accents,
                tokenize_chinese_chars=tokenize_chinese_chars,
                source=path,
            )
        )

    @classmethod
    def train_sentencepiece(
        cls,
        corpus_paths: Sequence[str | os.PathLike[str]],
        vocab_size: int,
        out_dir: str | os.PathLike[str],
        model_type: SentencePieceModelType = "unigram",
        *,
        lowercase: bool = True,
        sample_sentences: int = DEFAULT_SAMPLE_SENTENCES,
        round_to: int | None = VOCAB_MULTIPLE,
        character_coverage: float = 0.9999,
        seed: int = 0,
        num_threads: int = 16,
        corpus_config: CorpusConfig | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> Tokenizer:
        """Train a SentencePiece model on a corpus, write a tokenizer dir to `out_dir`, return it.

        The corpus is read by `bert.corpus` (plain one-sentence-per-line, WikiExtractor, JSONL or
        parquet files, `.gz` or not; a directory stands for the files under it; `corpus_config`
        says how, e.g. whether a corrupt `.gz` is an error or skipped) and streamed once
        through a reservoir: a uniform sample of at most `sample_sentences` sentences (seeded by
        `seed`) is all that is held in memory and all that SentencePiece sees, so memory is
        bounded by the sample, not by the corpus. Runs of more than `MAX_TRAINING_RUN_CHARS`
        characters without whitespace are dropped from the sentences first, and counted. The
        vocabulary size, special tokens included, is rounded up to a multiple of `round_to`
        (None: exactly `vocab_size`).

        SentencePiece trains in a child process: the caller stays responsive (Ctrl-C stops the
        training within a second; the child dies with its parent), a crash of the library is a
        message, not a dead process. `progress`, if given, receives a line at each step (corpus
        read, sample taken, training started and finished, and every 30 s while training).

        The same corpus and settings give the same model bytes. `num_threads` is one of the
        settings, not a machine property: sentencepiece splits its work by thread count, and the
        model changes with it (16 is sentencepiece's own default).
        """
        from bert.corpus import CorpusConfig

        if model_type not in ("unigram", "bpe"):
            raise InputError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
        if sample_sentences < 1:
            raise InputError(f"sample_sentences must be at least 1, got {sample_sentences}")
        if round_to is not None and round_to < 1:
            raise InputError(f"round_to must be a positive integer or None, got {round_to}")
        target_size = vocab_size if round_to is None else -(-vocab_size // round_to) * round_to
        if target_size <= len(SPECIAL_TOKENS):
            raise InputError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
        say = progress or (lambda message: None)

        sample, read = _sample_corpus(corpus_paths, sample_sentences, seed, corpus_config or CorpusConfig(), say)
        options = {
            "model_type": model_type,
            "vocab_size": target_size,
            "normalization_rule_name": "nmt_nfkc_cf" if lowercase else "nmt_nfkc",
            "pad_id": 0,
            "unk_id": 1,
            "bos_id": -1,
            "eos_id": -1,
            "pad_piece": SPECIAL_TOKENS["pad"],
            "unk_piece": SPECIAL_TOKENS["unk"],
            "control_symbols": [SPECIAL_TOKENS[role] for role in ("cls", "sep", "mask")],
            # the whole sample; sentencepiece refuses a size of 1..100, where 0 ("all") says the same
            "input_sentence_size": len(sample) if len(sample) > 100 else 0,
            "shuffle_input_sentence": False,
            "max_sentence_length": 4 * read["max_sentence_chars"],  # in bytes: keep every sentence we sampled
            "character_coverage": character_coverage,
            "num_threads": num_threads,
            "minloglevel": 1,
        }
        what = (f"a {target_size}-piece {model_type} model on {len(sample):,} sentences "
                f"({read['sample_chars']:,} characters)")
        say(f"training {what}")
        started = time.monotonic()
        try:
            model = _train_in_child(sample, options, say)
        except _TrainingFailed as exc:
            raise InputError(
                f"sentencepiece could not train {what} sampled from {read['corpus_files'][0]} and "
                f"{len(read['corpus_files']) - 1} more file(s): {exc}"
            ) from None
        del sample
        say(f"trained {target_size} pieces in {time.monotonic() - started:.0f} s")
        training = {
            "model_type": model_type,
            "requested_vocab_size": vocab_size,
            "round_to": round_to,
            "sample_sentences": sample_sentences,
            "seed": seed,
            "character_coverage": character_coverage,
            "num_threads": num_threads,
            **read,
        }
        tokenizer = cls(_SentencePieceBackend(model, lowercase=lowercase, training=training))
        tokenizer.save(out_dir)
        return tokenizer

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Tokenizer:
        """Load a tokenizer dir written by `save` (a checkpoint dir holds the same files).

        A Hugging Face BERT directory (`vocab.txt` and its `tokenizer_config.json`) loads too, with
        that config's `do_lower_case`, `strip_accents` and `tokenize_chinese_chars`.
        """
        directory = Path(directory)
        config = _read_config(directory)
        backend = config.get("backend")
        if backend == "sentencepiece":
            model_path = directory / str(config.get("model_file", SPM_FILE))
            try:
                model = model_path.read_bytes()
            except OSError as exc:
                raise InputError(
                    f"{model_path}: cannot read the SentencePiece model named by {CONFIG_FILE}: {exc}"
                ) from exc
            lowercase = bool(config.get("lowercase", True))
            tokenizer = cls(
                _SentencePieceBackend(model, lowercase=lowercase, training=config.get("training"), source=model_path)
            )
        elif backend == "wordpiece" or (directory / VOCAB_FILE).is_file():
            # Either our own WordPiece dir, or a Hugging Face BERT dir (their keys, our defaults).
            lowercase = config.get("lowercase", config.get("do_lower_case", True))
            tokenizer = cls.from_vocab_file(
                directory / str(config.get("model_file", VOCAB_FILE)),
                lowercase=bool(lowercase),
                strip_accents=config.get("strip_accents"),
                tokenize_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
            )
        else:
            raise InputError(
                f"{directory / CONFIG_FILE}: not a tokenizer config: expected \"backend\": \"wordpiece\" or "
                f"\"sentencepiece\" (or a {VOCAB_FILE} next to it), got backend {backend!r}"
            )
        declared = config.get("special_ids")
        if declared is not None and declared != tokenizer._special:
            raise InputError(
                f"{directory / CONFIG_FILE}: declares special ids {declared}, "
                f"but the model file has {tokenizer._special}"
            )
        return tokenizer

    @staticmethod
    def is_tokenizer_dir(directory: str | os.PathLike[str]) -> bool:
        """Whether `load` would find a tokenizer in `directory` (files present; contents not checked)."""
        directory = Path(directory)
        try:
            config = _read_config(directory)
        except InputError:
            return False
        if config.get("backend") in ("wordpiece", "sentencepiece"):
            default = VOCAB_FILE if config["backend"] == "wordpiece" else SPM_FILE
            return (directory / str(config.get("model_file", default))).is_file()
        return (directory / VOCAB_FILE).is_file()

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the model file and `tokenizer_config.json` (last) into `directory`; return it.

        Each file is written under a temporary name and renamed into place, so a reader never sees
        half a file; other files in the directory (a checkpoint's, say) are left alone.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model_file, model_bytes = self._backend.model_file()
        _atomic_write(directory / model_file, model_bytes)
        config = {
            "backend": self.backend,
            "model_file": model_file,
            "vocab_size": self.vocab_size,
            "lowercase": self.lowercase,
            "special_ids": dict(self._special),
            **{f"{role}_token": token for role, token in SPECIAL_TOKENS.items()},
            **self._backend.config(),
        }
        _atomic_write(directory / CONFIG_FILE, (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode())
        return directory

    # ----------------------------------------------------------------------------- properties

    @property
    def backend(self) -> Backend:
        return self._backend.name

    @property
    def vocab_size(self) -> int:
        """Number of ids (the embedding matrix's rows)."""
        return len(self._backend.tokens)

    @property
    def lowercase(self) -> bool:
        return self._backend.lowercase

    @property
    def pad_id(self) -> int:
        return self._special["pad"]

    @property
    def unk_id(self) -> int:
        return self._special["unk"]

    @property
    def cls_id(self) -> int:
        return self._special["cls"]

    @property
    def sep_id(self) -> int:
        return self._special["sep"]

    @property
    def mask_id(self) -> int:
        return self._special["mask"]

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self._special.values())

    def __repr__(self) -> str:
        return f"Tokenizer(backend={self.backend!r}, vocab_size={self.vocab_size}, lowercase={self.lowercase})"

    def fingerprint(self) -> str:
        """sha256 of the id -> token table and the special ids: equal iff the vocabularies are.

        Shards record it in their manifest, so a trainer refuses shards built with another
        vocabulary of the same size.
        """
        import hashlib

        digest = hashlib.sha256()
        for token in self.convert_ids_to_tokens(list(range(self.vocab_size))):
            digest.update(token.encode("utf-8") + b"\n")
        specials = {"cls_id": self.cls_id, "sep_id": self.sep_id, "mask_id": self.mask_id, "pad_id": self.pad_id}
        digest.update(json.dumps(specials, sort_keys=True).encode())
        return digest.hexdigest()

    # ------------------------------------------------------------------------------- encoding

    def encode(
        self,
        text: str,
        pair: str | None = None,
        *,
        add_special_tokens: bool = True,
        max_length: int | None = None,
        truncation: Truncation = "longest_first",
    ) -> Encoding:
        """Encode a text, or a text pair as `[CLS] A [SEP] B [SEP]`; see `encode_batch`."""
        return self.encode_batch(
            [text],
            None if pair is None else [pair],
            add_special_tokens=add_special_tokens,
            max_length=max_length,
            truncation=truncation,
        )[0]

    def encode_batch(
        self,
        texts: Sequence[str],
        pairs: Sequence[str] | None = None,
        *,
        add_special_tokens: bool = True,
        max_length: int | None = None,
        truncation: Truncation = "longest_first",
    ) -> list[Encoding]:
        """Encode many texts (or text pairs) at once, in parallel inside the library.

        `max_length` counts special tokens. With `truncation` "longest_first" or "only_second"
        longer encodings are cut (see the module docstring); with None, an encoding longer than
        `max_length` is an error, and without `max_length` nothing is cut.
        """
        if isinstance(texts, str) or (pairs is not None and isinstance(pairs, str)):
            raise InputError("encode_batch takes a list of texts (and of pairs); got a single str, use encode")
        texts = [_sanitize(text, "text") for text in texts]
        if pairs is not None:
            pairs = [_sanitize(pair, "pair") for pair in pairs]
            if len(pairs) != len(texts):
                raise InputError(
                    f"encode_batch got {len(texts)} texts but {len(pairs)} pairs; expected one pair per text"
                )
        if truncation not in TRUNCATION_STRATEGIES:
            raise InputError(f"truncation must be one of {TRUNCATION_STRATEGIES}, got {truncation!r}")
        if not texts:
            return []
        if max_length is not None:
            n_special = (3 if pairs is not None else 2) if add_special_tokens else 0
            if max_length <= n_special:
                raise InputError(f"max_length={max_length} leaves no room for text next to {n_special} special tokens")
            if truncation == "only_second" and pairs is None:
                raise InputError("truncation='only_second' needs text pairs; got single texts")
        segments = self._backend.encode_segments(texts if pairs is None else texts + pairs)
        firsts = segments[: len(texts)]
        seconds: list[_Segment | None] = [None] * len(texts) if pairs is None else segments[len(texts) :]
        encodings = []
        for index, (first, second) in enumerate(zip(firsts, seconds)):
            if max_length is not None and truncation is not None:
                try:
                    keep_first, keep_second = _truncation_lengths(
                        len(first.ids), None if second is None else len(second.ids), max_length - n_special, truncation
                    )
                except InputError as exc:
                    raise InputError(f"text #{index}: {exc}") from None
                first = first.head(keep_first)
                second = None if second is None else second.head(keep_second)
            encoding = self._assemble(first, second, add_special_tokens)
            if max_length is not None and len(encoding) > max_length:
                raise InputError(
                    f"text #{index} encodes to {len(encoding)} tokens, more than max_length={max_length}, "
                    "and truncation=None; pass truncation='longest_first' or 'only_second' to cut it"
                )
            encodings.append(encoding)
        return encodings

    def _assemble(self, first: _Segment, second: _Segment | None, add_special_tokens: bool) -> Encoding:
        """`[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]`; without special tokens, A or A B."""
        sequence_ids: list[int | None]
        if add_special_tokens:
            ids = [self.cls_id, *first.ids, self.sep_id]
            offsets = [(0, 0), *first.offsets, (0, 0)]
            word_starts = [True, *first.word_starts, True]
            sequence_ids = [None, *[0] * len(first.ids), None]
        else:
            ids, offsets, word_starts = list(first.ids), list(first.offsets), list(first.word_starts)
            sequence_ids = [0] * len(ids)
        type_ids = [0] * len(ids)
        if second is not None:
            end = [self.sep_id] if add_special_tokens else []
            ids += second.ids + end
            offsets += second.offsets + [(0, 0)] * len(end)
            word_starts += second.word_starts + [True] * len(end)
            sequence_ids += [1] * len(second.ids) + [None] * len(end)
            type_ids += [1] * (len(second.ids) + len(end))
        tokens = self._backend.tokens
        return Encoding(ids, type_ids, [tokens[i] for i in ids], offsets, sequence_ids, word_starts)

    def tokenize(self, text: str) -> list[str]:
        """Tokens of `text`, without special tokens."""
        return self.encode(text, add_special_tokens=False).tokens

    def normalize(self, text: str) -> str:
        """`text` as the backend's normaliser sees it (lower-cased, accents stripped, ... as configured).

        For SentencePiece this is what `decode(encode(text).ids)` returns when no piece is unknown.
        """
        return self._backend.normalize(_sanitize(text, "text"))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens are dropped, or kept as their token strings."""
        ids = self._check_ids(ids)
        if skip_special_tokens:
            special = self.special_ids
            ids = [i for i in ids if i not in special]
        return self._backend.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        """Id of `token`, or None when it is not in the vocabulary."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self._backend.tokens[self._check_ids([token_id])[0]]

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        tokens = self._backend.tokens
        return [tokens[i] for i in self._check_ids(ids)]

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids, size = list(ids), self.vocab_size
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise InputError(f"token ids {bad[:5]} are outside this tokenizer's vocabulary [0, {size})")
        return ids


# -------------------------------------------------------------------------------------- backends


class _WordPieceBackend:
    """BERT WordPiece on the `tokenizers` library."""

    name: Backend = "wordpiece"

    def __init__(
        self,
        tokens: list[str],
        *,
        lowercase: bool,
        strip_accents: bool | None,
        tokenize_chinese_chars: bool,
        source: Path,
    ) -> None:
        self.tokens = tokens
        self.lowercase = lowercase
        self.strip_accents = strip_accents
        self.tokenize_chinese_chars = tokenize_chinese_chars
        # Like transformers' load_vocab: a token repeated later in the file takes the later id.
        vocab = {token: index for index, token in enumerate(tokens)}
        missing = [token for token in SPECIAL_TOKENS.values() if token not in vocab]
        if missing:
            raise InputError(
                f"{source}: vocabulary lacks {', '.join(missing)}; a BERT vocab.txt must contain "
                f"{', '.join(SPECIAL_TOKENS.values())}"
            )
        self.special_ids = {role: vocab[token] for role, token in SPECIAL_TOKENS.items()}
        library = tokenizers.Tokenizer(
            WordPiece(vocab, unk_token=SPECIAL_TOKENS["unk"], max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD)
        )
        library.normalizer = normalizers.Sequence(
            [
                normalizers.NFC(),
                normalizers.BertNormalizer(
                    clean_text=True,
                    handle_chinese_chars=tokenize_chinese_chars,
                    strip_accents=strip_accents,
                    lowercase=lowercase,
                ),
            ]
        )
        library.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        library.decoder = decoders.WordPiece(prefix="##")
        self._library = library
        # BERT's whole-word rule: a token starts a word unless it is a "##" continuation.
        self._starts_word = [not token.startswith("##") for token in tokens]

    def encode_segments(self, texts: list[str]) -> list[_Segment]:
        """Tokens of each text, without special tokens, encoded in parallel by the library."""
        starts_word = self._starts_word
        return [
            _Segment(ids := encoding.ids, encoding.offsets, [starts_word[i] for i in ids])
            for encoding in self._library.encode_batch(texts, add_special_tokens=False)
        ]

    def normalize(self, text: str) -> str:
        return self._library.normalizer.normalize_str(text)

    def decode(self, ids: list[int]) -> str:
        return self._library.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._library.token_to_id(token)

    def model_file(self) -> tuple[str, bytes]:
        return VOCAB_FILE, "".join(f"{token}\n" for token in self.tokens).encode()

    def config(self) -> dict[str, Any]:
        return {
            "strip_accents": self.strip_accents,
            "tokenize_chinese_chars": self.tokenize_chinese_chars,
            "max_input_chars_per_word": MAX_INPUT_CHARS_PER_WORD,
            # What transformers reads, so that AutoTokenizer.from_pretrained(dir) gives the same ids.
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": self.lowercase,
        }


class _SentencePieceBackend:
    """A SentencePiece model trained by `Tokenizer.train_sentencepiece`, on the `sentencepiece` library."""

    name: Backend = "sentencepiece"

    def __init__(
        self,
        model: bytes,
        *,
        lowercase: bool,
        training: dict[str, Any] | None,
        source: Path | None = None,
    ) -> None:
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(model)
        except (RuntimeError, OSError) as exc:
            raise InputError(f"{source or 'model'}: not a SentencePiece model: {exc}") from exc
        self._processor = processor
        self.lowercase = lowercase
        self.training = training
        self.tokens = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
        self.special_ids = {role: processor.piece_to_id(token) for role, token in SPECIAL_TOKENS.items()}
        expected = {role: index for index, role in enumerate(SPECIAL_TOKENS)}
        if self.special_ids != expected:
            raise InputError(
                f"{source or 'model'}: special pieces are at ids {self.special_ids}; a bertflow SentencePiece model "
                f"has {', '.join(SPECIAL_TOKENS.values())} at ids 0..4"
            )
        self._starts_word = [_starts_word_piece(piece) for piece in self.tokens]

    def encode_segments(self, texts: list[str]) -> list[_Segment]:
        """Pieces of each text, without special tokens; offsets shed the whitespace a "▁" stands for."""
        if len(texts) < SMALL_BATCH:  # starting sentencepiece's worker threads costs more than a few texts
            results = [self._processor.encode(text, out_type="offset_mapping") for text in texts]
        else:
            results = self._processor.encode(texts, out_type="offset_mapping", num_threads=os.cpu_count() or 1)
        starts_word = self._starts_word
        segments = []
        for text, result in zip(texts, results):
            offsets = []
            for start, end in result["offsets"]:
                while start < end and text[start].isspace():
                    start += 1
                offsets.append((start, end))
            ids = result["ids"]
            segments.append(_Segment(ids, offsets, [starts_word[i] for i in ids]))
        return segments

    def normalize(self, text: str) -> str:
        return self._processor.normalize(text).replace(_WORD_BOUNDARY, " ").strip()

    def decode(self, ids: list[int]) -> str:
        # sentencepiece renders control ids ([CLS], [SEP], [MASK], [PAD]) as nothing; keep their strings.
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if self._processor.is_control(token_id):
                parts += [self._processor.decode(run), self.tokens[token_id]]
                run = []
            else:
                run.append(token_id)
        parts.append(self._processor.decode(run))
        return " ".join(part for part in parts if part)

    def token_to_id(self, token: str) -> int | None:
        token_id = self._processor.piece_to_id(token)
        return token_id if self.tokens[token_id] == token else None

    def model_file(self) -> tuple[str, bytes]:
        return SPM_FILE, self._processor.serialized_model_proto()

    def config(self) -> dict[str, Any]:
        return {"training": self.training}


def _starts_word_piece(piece: str) -> bool:
    """Whether a SentencePiece piece starts a word: "▁"-prefixed or all punctuation (as in ALBERT)."""
    return piece.startswith(_WORD_BOUNDARY) or all(unicodedata.category(c).startswith("P") for c in piece)


def _truncation_lengths(n_first: int, n_second: int | None, budget: int, strategy: Truncation) -> tuple[int, int]:
    """How many tokens of each segment to keep within `budget`, by the `tokenizers` library's rules."""
    if n_second is None:
        return min(n_first, budget), 0
    if n_first + n_second <= budget:
        return n_first, n_second
    if strategy == "only_second":
        if n_first >= budget:  # the library refuses to cut the second segment away entirely
            raise InputError(
                f"cannot truncate to {budget} text tokens with truncation='only_second': text A alone has {n_first} "
                "(it must leave room for at least one token of text B)"
            )
        return n_first, budget - n_first
    shorter = min(n_first, n_second)
    if 2 * shorter <= budget:  # longest_first: the shorter segment stays whole, the longer gets the rest
        keep_shorter, keep_longer = shorter, budget - shorter
    else:  # both are cut to half the budget; the longer one (on a tie, the second) gets the odd token
        keep_shorter, keep_longer = budget // 2, budget - budget // 2
    return (keep_longer, keep_shorter) if n_first > n_second else (keep_shorter, keep_longer)


# ---------------------------------------------------------------------------------- file helpers


def _sanitize(text: Any, what: str) -> str:
    """`text` with lone surrogates replaced by U+FFFD (UTF-8 cannot carry them); offsets stay valid."""
    if not isinstance(text, str):
        raise InputError(f"{what} must be a str, got {type(text).__name__}")
    return text if text.isascii() else _SURROGATES.sub("\ufffd", text)


def _read_vocab(path: Path) -> list[str]:
    """Tokens of a BERT `vocab.txt`, read exactly as transformers' `load_vocab` reads them."""
    if path.is_dir():
        raise InputError(
            f"{path}: is a directory; expected a BERT vocab.txt file (use Tokenizer.load for a tokenizer dir)"
        )
    try:
        with open(path, encoding="utf-8") as reader:
            tokens = [line.rstrip("\n") for line in reader]
    except FileNotFoundError as exc:
        raise InputError(f"{path}: vocabulary file not found; expected a BERT vocab.txt (one token per line)") from exc
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); expected a BERT vocab.txt"
        ) from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot read the vocabulary file: {exc}") from exc
    if not tokens:
        raise InputError(
            f"{path}: empty vocabulary; expected one WordPiece token per line, [PAD] [UNK] [CLS] [SEP] [MASK] included"
        )
    return tokens


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise InputError(f"{directory}: not a directory; expected a tokenizer dir holding {CONFIG_FILE}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(
            f"{directory}: not a tokenizer dir: {CONFIG_FILE} is missing (write one with Tokenizer.save, "
            "`bertflow tokenizer from-vocab` or `bertflow tokenizer train`)"
        ) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read the tokenizer config ({exc}); expected a JSON object") from exc
    if not isinstance(config, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory and a rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a tokenizer is shared, not secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------ the corpus


def _sample_corpus(
    paths: Sequence[str | os.PathLike[str]],
    size: int,
    seed: int,
    config: CorpusConfig,
    progress: Callable[[str], None],
) -> tuple[list[str], dict[str, Any]]:
    """A uniform sample of at most `size` corpus sentences, and what reading met.

    The corpus is read by `bert.corpus` (plain, BERT-format, WikiExtractor, JSONL or parquet
    files, `.gz` or not; invalid UTF-8 replaced; sentences longer than its `max_sentence_chars`
    cut) and streamed through a reservoir (Algorithm R, seeded), so only the sample is in memory.
    Runs of more than `MAX_TRAINING_RUN_CHARS` non-whitespace characters are dropped from each
    sentence before it enters the reservoir (a sentence left empty is dropped), and counted.
    """
    from bert.corpus import ReadStats, expand_inputs, read_documents

    files = expand_inputs(paths, config)
    stats = ReadStats()
    rng = random.Random(seed)
    sample: list[str] = []
    seen = 0
    runs_dropped = chars_dropped = sentences_dropped = 0
    unreadable: list[str] = []
    long_run = re.compile(rf"\S{{{MAX_TRAINING_RUN_CHARS + 1},}}")
    progress(f"reading {len(files)} corpus file(s) under {', '.join(map(str, paths))}")
    last_report = time.monotonic()
    for index, file in enumerate(files):
        before = stats.unreadable_files
        for document in read_documents(file, stats, config):
            for sentence in document.sentences:
                if len(sentence) > MAX_TRAINING_RUN_CHARS:
                    runs = long_run.findall(sentence)
                    if runs:
                        runs_dropped += len(runs)
                        chars_dropped += sum(map(len, runs))
                        sentence = long_run.sub(" ", sentence).strip()
                        if not sentence:
                            sentences_dropped += 1
                            continue
                seen += 1
                if len(sample) < size:
                    sample.append(sentence)
                else:
                    slot = rng.randrange(seen)
                    if slot < size:
                        sample[slot] = sentence
        if stats.unreadable_files > before:
            unreadable.append(str(file.path))
        if time.monotonic() - last_report >= 10 and index + 1 < len(files):
            progress(f"read {index + 1} of {len(files)} files: {seen:,} sentences")
            last_report = time.monotonic()
    dropped = (f"{runs_dropped:,} run(s) of more than {MAX_TRAINING_RUN_CHARS:,} characters without whitespace "
               f"({chars_dropped:,} characters; {sentences_dropped:,} sentence(s) left empty)")
    if not sample:
        raise InputError(
            f"no text in the corpus ({len(files)} file(s) starting with {files[0].path}; read: {stats.as_dict()}"
            + (f"; dropped {dropped}" if runs_dropped else "")
            + "); expected plain, BERT-format or WikiExtractor text"
        )
    sample_chars = sum(map(len, sample))
    progress(f"sampled {len(sample):,} of {seen:,} sentences ({sample_chars:,} characters) from {len(files)} file(s)"
             + (f"; dropped {dropped}" if runs_dropped else ""))
    return sample, {
        "corpus_files": [str(f.path) for f in files],
        "max_sentence_chars": config.max_sentence_chars,
        "sentences_seen": seen,
        "sentences_sampled": len(sample),
        "sample_chars": sample_chars,
        "max_run_chars": MAX_TRAINING_RUN_CHARS,
        "long_runs_dropped": runs_dropped,
        "long_run_chars_dropped": chars_dropped,
        "unreadable_files_skipped": unreadable,
        "read": stats.as_dict(),
    }


# ------------------------------------------------------------------------------- SentencePiece training


class _TrainingFailed(Exception):
    """SentencePiece refused the settings or the sample, or its process died."""


def _train_in_child(sample: list[str], options: dict[str, Any], progress: Callable[[str], None]) -> bytes:
    """The serialized model SentencePiece trains on `sample`, trained in a child process.

    The library's training is one long C++ call that never returns to Python, so in-process it
    ignores Ctrl-C until it is done. In a child, the parent waits in Python (a KeyboardInterrupt
    arrives at once; the child is killed on the way out) and reports progress meanwhile; the
    child asks the kernel to kill it when the parent dies. `spawn`, not `fork`: the caller may
    be a multithreaded process (a Ray worker).
    """
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_trainer_process, args=(sender, os.getpid(), sample, options),
                            name="sentencepiece-trainer", daemon=True)
    child.start()
    sender.close()
    started = last = time.monotonic()
    try:
        while not receiver.poll(0.5):
            now = time.monotonic()
            if now - last >= TRAINING_HEARTBEAT_SECONDS:
                progress(f"training... {now - started:.0f} s")
                last = now
        try:
            status, payload = receiver.recv()
        except EOFError:
            child.join(5)
            code = child.exitcode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            hint = "; out of memory? try fewer --sample-sentences" if code == -signal.SIGKILL else ""
            raise _TrainingFailed(f"the training process died ({how}{hint})") from None
    finally:
        if child.is_alive():
            child.kill()
        child.join(5)
        receiver.close()
    if status != "ok":
        raise _TrainingFailed(payload)
    return payload


def _trainer_process(sender: Any, parent_pid: int, sample: list[str], options: dict[str, Any]) -> None:
    """Child process: train, send ("ok", model bytes) or ("error", message) to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal reaches us too: the parent decides
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl
        return
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(sample), model_writer=model, **options)
    except (RuntimeError, ValueError, OSError) as exc:  # sentencepiece reports bad settings this way
        sender.send(("error", str(exc).strip() or type(exc).__name__))
    else:
        sender.send(("ok", model.getvalue()))
    sender.close()
