"""The two tokenizer backends behind `bert.tokenizer.Tokenizer`, and what they share.

`_WordPieceBackend` wraps the `tokenizers` library's WordPiece pipeline (BERT's normalizer and
pre-tokenizer), `_SentencePieceBackend` a `sentencepiece` model trained by bertflow. Each turns
texts into `_Segment`s (ids, character offsets, word starts) without special tokens; the
`Tokenizer` lays them out as `[CLS] A [SEP] B [SEP]`. Also here: the constants of a tokenizer
dir, the truncation rule, and the file helpers (reading `vocab.txt` and `tokenizer_config.json`,
atomic writes).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import sentencepiece as spm
import tokenizers
from tokenizers import decoders, normalizers, pre_tokenizers
from tokenizers.models import WordPiece

from bert.errors import InputError

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


# ------------------------------------------------------------------------------ Hugging Face export

HF_TOKENIZER_FILE = "tokenizer.json"
HF_SPECIAL_TOKENS_FILE = "special_tokens_map.json"
_CONTROL_SCORE = -1e9  # control pieces ([PAD], [CLS], ...) are never matched in text: below any [UNK] path


def sentencepiece_as_tokenizers(model: bytes) -> tokenizers.Tokenizer:
    """A `tokenizers` pipeline that gives a bertflow SentencePiece model's ids, `[CLS] A [SEP] B [SEP]` included.

    Built from the model file itself (read with sentencepiece's own protobuf): the pieces and scores
    (Unigram) or the merges the piece order implies (BPE: the pairs whose concatenation is a piece,
    ranked by that piece), the normalizer's precompiled character map (NFKC, and case folding for a
    lower-casing model) with SentencePiece's whitespace rules, "▁" word marks, and the BERT layout as
    post-processor. Special tokens are "added tokens" with their ids 0..4, so `transformers` knows them.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, processors
    from tokenizers.models import BPE, Unigram

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    pieces = [(p.piece, p.score, p.type == p.CONTROL) for p in proto.pieces]
    unk_id = proto.trainer_spec.unk_id
    if proto.trainer_spec.model_type == proto.trainer_spec.UNIGRAM:
        library = tokenizers.Tokenizer(Unigram([(piece, _CONTROL_SCORE if control else score)
                                                for piece, score, control in pieces], unk_id=unk_id))
    elif proto.trainer_spec.model_type == proto.trainer_spec.BPE:
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        library = tokenizers.Tokenizer(BPE(vocab, _bpe_merges(pieces, vocab), unk_token=pieces[unk_id][0],
                                           fuse_unk=True))
    else:
        raise InputError(f"SentencePiece model type {proto.trainer_spec.model_type} is neither unigram nor BPE")
    spec = proto.normalizer_spec
    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Strip()]
    library.normalizer = normalizers.Sequence(steps)
    scheme = "always" if spec.add_dummy_prefix else "never"
    library.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_WORD_BOUNDARY, prepend_scheme=scheme)
    library.decoder = decoders.Metaspace(replacement=_WORD_BOUNDARY, prepend_scheme=scheme)
    cls, sep = SPECIAL_TOKENS["cls"], SPECIAL_TOKENS["sep"]
    library.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, list(SPECIAL_TOKENS).index("cls")), (sep, list(SPECIAL_TOKENS).index("sep"))])
    library.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS.values()])
    return library


def _bpe_merges(pieces: list[tuple[str, float, bool]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """SentencePiece BPE as merges: every split of a piece into two pieces, ranked by the merged piece's id."""
    merges = []
    for merged_id, (piece, _, control) in enumerate(pieces):
        if control or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((merged_id, vocab[left], vocab[right], left, right))
    return [(left, right) for *_, left, right in sorted(merges)]


def transformers_config(special_ids: dict[str, int], lowercase: bool, model_max_length: int,
                        fast_only: bool) -> dict[str, Any]:
    """The `tokenizer_config.json` keys `transformers` reads (special tokens, length, class)."""
    config: dict[str, Any] = {f"{role}_token": SPECIAL_TOKENS[role] for role in special_ids}
    config |= {"model_max_length": model_max_length, "do_lower_case": lowercase,
               "clean_up_tokenization_spaces": False,
               "model_input_names": ["input_ids", "token_type_ids", "attention_mask"]}
    if fast_only:  # tokenizer.json is the whole tokenizer: no sentencepiece-specific slow class
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    return config
