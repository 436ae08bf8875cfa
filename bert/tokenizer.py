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

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bert.errors import InputError
from bert.tokenizer_backends import (  # noqa: F401 - constants re-exported for the tokenizer's users
    CONFIG_FILE,
    DEFAULT_SAMPLE_SENTENCES,
    SMALL_BATCH,
    SPECIAL_TOKENS,
    SPM_FILE,
    TRUNCATION_STRATEGIES,
    VOCAB_FILE,
    VOCAB_MULTIPLE,
    Backend,
    Encoding,
    SentencePieceModelType,
    Truncation,
    _atomic_write,
    _read_config,
    _read_vocab,
    _sanitize,
    _Segment,
    _SentencePieceBackend,
    _truncation_lengths,
    _WordPieceBackend,
)

if TYPE_CHECKING:
    from bert.corpus import CorpusConfig


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
        bounded by the sample, not by the corpus. Runs of more than `MAX_TRAINING_RUN_CHARS` (1000)
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
        from bert.sentencepiece_training import train_model

        model, training = train_model(corpus_paths, vocab_size, model_type, lowercase=lowercase,
                                      sample_sentences=sample_sentences, round_to=round_to,
                                      character_coverage=character_coverage, seed=seed, num_threads=num_threads,
                                      corpus_config=corpus_config, progress=progress)
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

    def save_for_transformers(self, directory: str | os.PathLike[str], model_max_length: int = 512) -> Path:
        """Make the tokenizer dir `directory` (written by `save`, or a checkpoint's) load with
        `transformers.AutoTokenizer` too, with the same ids: `bertflow convert --to-hf` calls it.

        WordPiece: `vocab.txt` and the keys BertTokenizer reads. SentencePiece: a `tokenizer.json`
        built from the model (`sentencepiece_as_tokenizers`), so a fast tokenizer loads with no
        sentencepiece-specific class. Both: `special_tokens_map.json` and the `transformers` keys in
        `tokenizer_config.json`, next to ours (`Tokenizer.load` reads the dir as before).
        """
        from bert.tokenizer_backends import (
            HF_SPECIAL_TOKENS_FILE,
            HF_TOKENIZER_FILE,
            sentencepiece_as_tokenizers,
            transformers_config,
        )

        directory = Path(directory)
        config = _read_config(directory)
        sentencepiece = self.backend == "sentencepiece"
        if sentencepiece:
            library = sentencepiece_as_tokenizers(self._backend.model_file()[1])
            _atomic_write(directory / HF_TOKENIZER_FILE, library.to_str(pretty=True).encode())
        hf = transformers_config(self._special, self.lowercase, model_max_length, fast_only=sentencepiece)
        specials = {f"{role}_token": SPECIAL_TOKENS[role] for role in self._special}
        _atomic_write(directory / HF_SPECIAL_TOKENS_FILE, (json.dumps(specials, indent=2) + "\n").encode())
        merged = {**hf, **config} if not sentencepiece else {**config, **hf}  # WordPiece keeps BertTokenizer
        _atomic_write(directory / CONFIG_FILE, (json.dumps(merged, indent=2, ensure_ascii=False) + "\n").encode())
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
