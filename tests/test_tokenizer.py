"""bert.tokenizer and `bertflow tokenizer`: parity with transformers' BERT tokenizer on real data,
offsets, SentencePiece training on the Wikipedia extract, bad input, tokenizer dirs, the CLI."""

from __future__ import annotations

import gzip
import json
import pickle
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import tokenizers
from tokenizers import pre_tokenizers, processors
from tokenizers.models import WordLevel

from bert.errors import InputError
from bert.tokenizer import CONFIG_FILE, SPECIAL_TOKENS, Encoding, Tokenizer
from pipelines.cli import main

ROOT = Path(__file__).resolve().parents[1]
LITERAL_SPECIAL = re.compile(r"\[(PAD|UNK|CLS|SEP|MASK)\]", re.IGNORECASE)


# ------------------------------------------------------------------------------ real datasets


def _tsv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a GLUE tsv (tabs only, no quoting; the MRPC header starts with a BOM)."""
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    return lines[0].split("\t"), [line.split("\t") for line in lines[1:] if line]


def _glue_singles(datasets: Path) -> list[str]:
    header, rows = _tsv_rows(datasets / "glue/SST-2/dev.tsv")
    return [row[header.index("sentence")] for row in rows]


def _glue_pairs(datasets: Path) -> list[tuple[str, str]]:
    pairs = []
    for split in ("train", "dev"):
        header, rows = _tsv_rows(datasets / f"glue/MRPC/{split}.tsv")
        a, b = header.index("#1 String"), header.index("#2 String")
        pairs += [(row[a], row[b]) for row in rows]
    header, rows = _tsv_rows(datasets / "glue/STS-B/dev.tsv")
    a, b = header.index("sentence1"), header.index("sentence2")
    return pairs + [(row[a], row[b]) for row in rows]


def _conll_tokens(datasets: Path) -> list[str]:
    """Every distinct CoNLL-2003 token (first column), each tokenized as a text of its own."""
    tokens: dict[str, None] = {}
    for split in ("train", "valid", "test"):
        for line in (datasets / f"conll2003/{split}.txt").read_text(encoding="utf-8").splitlines():
            word = line.split(" ")[0]
            if word and word != "-DOCSTART-":
                tokens[word] = None
    return list(tokens)


def _squad(datasets: Path) -> tuple[list[str], list[str]]:
    """SQuAD v1.1 dev: the 2067 distinct contexts and the 10570 questions."""
    data = json.loads((datasets / "squad_v1.1/dev-v1.1.json").read_text(encoding="utf-8"))["data"]
    paragraphs = [p for article in data for p in article["paragraphs"]]
    return list(dict.fromkeys(p["context"] for p in paragraphs)), [q["question"] for p in paragraphs for q in p["qas"]]


@pytest.fixture(scope="module")
def real_texts(datasets_dir: Path) -> dict[str, tuple[list[str], list[str] | None]]:
    """name -> (texts, pairs or None); texts holding a literal "[MASK]"-like string are left out
    (the reference tokenizer treats those as special tokens, ours as text: see the module docs)."""
    contexts, questions = _squad(datasets_dir)
    pairs = _glue_pairs(datasets_dir)
    sets = {
        "sst2_dev": (_glue_singles(datasets_dir), None),
        "mrpc_stsb_pairs": ([a for a, _ in pairs], [b for _, b in pairs]),
        "conll_tokens": (_conll_tokens(datasets_dir), None),
        "squad_questions": (questions, None),
        "squad_contexts": (contexts, None),
    }
    clean = {}
    for name, (texts, pair_texts) in sets.items():
        keep = [i for i, t in enumerate(texts) if not LITERAL_SPECIAL.search(t + (pair_texts[i] if pair_texts else ""))]
        assert len(keep) >= len(texts) - 5, name
        clean[name] = ([texts[i] for i in keep], None if pair_texts is None else [pair_texts[i] for i in keep])
    return clean


# --------------------------------------------------------------------------------- tokenizers


def _slow_bert_tokenizer_class():
    """transformers' pure-Python BERT tokenizer (the reference): `BertTokenizerLegacy` since v5."""
    try:
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

        return BertTokenizerLegacy
    except ImportError:  # transformers 4.x: BertTokenizer is the Python one
        from transformers import BertTokenizer

        return BertTokenizer


@pytest.fixture(scope="module")
def wordpiece(vocab_txt: Path) -> Tokenizer:
    return Tokenizer.from_vocab_file(vocab_txt)


@pytest.fixture(scope="module")
def wordpiece_cased(vocab_txt: Path) -> Tokenizer:
    return Tokenizer.from_vocab_file(vocab_txt, lowercase=False)


@pytest.fixture(scope="module")
def wiki_files(datasets_dir: Path) -> list[Path]:
    files = sorted((datasets_dir / "wikipedia_en_extract").rglob("wiki_*.gz"))
    assert len(files) == 100
    return files


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory, wiki_files) -> Path:
    """Unigram, 2000 pieces asked (rounded to 2048), trained on a sample of 3 Wikipedia shards."""
    out = tmp_path_factory.mktemp("spm") / "tok"
    Tokenizer.train_sentencepiece(wiki_files[:3], 2000, out, sample_sentences=12_000)
    return out


@pytest.fixture(scope="module")
def sentencepiece(sentencepiece_dir) -> Tokenizer:
    return Tokenizer.load(sentencepiece_dir)


@pytest.fixture(scope="module", params=["wordpiece", "sentencepiece"])
def any_tokenizer(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


def _wiki_lines(path: Path, limit: int) -> list[str]:
    """Text lines of one WikiExtractor shard (not in any training sample below)."""
    with gzip.open(path, "rt", encoding="utf-8") as reader:
        lines = [line.strip() for line in reader if line.strip() and not line.startswith(("<doc", "</doc"))]
    return lines[:limit]


# ------------------------------------------------------------------ WordPiece parity, offsets


@pytest.mark.parametrize("name", ["sst2_dev", "mrpc_stsb_pairs", "conll_tokens", "squad_questions", "squad_contexts"])
@pytest.mark.parametrize("lowercase", [True, False], ids=["uncased", "cased"])
def test_wordpiece_ids_equal_transformers_bert_tokenizer(
    name, lowercase, real_texts, vocab_txt, wordpiece, wordpiece_cased
):
    texts, pairs = real_texts[name]
    ours = (wordpiece if lowercase else wordpiece_cased).encode_batch(texts, pairs)
    reference = _slow_bert_tokenizer_class()(str(vocab_txt), do_lower_case=lowercase)
    mismatches = []
    for i, encoding in enumerate(ours):
        expected = reference.encode(texts[i], pairs[i] if pairs else None)
        if encoding.ids != expected:
            mismatches.append((texts[i], encoding.tokens, reference.convert_ids_to_tokens(expected)))
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ; first: {mismatches[0]}"


@pytest.mark.parametrize("name", ["sst2_dev", "mrpc_stsb_pairs", "squad_contexts"])
def test_wordpiece_ids_equal_transformers_fast_tokenizer(name, real_texts, vocab_txt, wordpiece):
    """transformers' tokenizers-backed BertTokenizerFast (what `BertTokenizer` is since v5) agrees too."""
    from transformers import BertTokenizerFast

    texts, pairs = real_texts[name]
    reference = BertTokenizerFast.from_pretrained(str(vocab_txt.parent))
    expected = reference(texts, pairs)["input_ids"]
    assert [e.ids for e in wordpiece.encode_batch(texts, pairs)] == expected


@pytest.mark.parametrize("name", ["sst2_dev", "mrpc_stsb_pairs", "conll_tokens", "squad_questions", "squad_contexts"])
def test_wordpiece_offsets_point_at_the_token_text(name, real_texts, wordpiece):
    """Every token's offsets select, in its own segment, the characters it was made from."""
    texts, pairs = real_texts[name]
    checked = 0
    for i, encoding in enumerate(wordpiece.encode_batch(texts, pairs)):
        segments = (texts[i], pairs[i] if pairs else None)
        for token, (start, end), sequence in zip(encoding.tokens, encoding.offsets, encoding.sequence_ids):
            if sequence is None:
                assert (start, end) == (0, 0)
                continue
            piece = segments[sequence][start:end]
            if token == "[UNK]":
                assert piece.strip(), (token, segments[sequence])
            else:
                assert wordpiece.normalize(piece).strip() == token.removeprefix("##"), (token, piece, i)
            checked += 1
    assert checked > 1000


@pytest.mark.parametrize("name", ["sst2_dev", "squad_questions", "squad_contexts"])
def test_wordpiece_word_starts_are_the_reference_words(name, real_texts, vocab_txt, wordpiece):
    """A token starts a word exactly where the reference's basic tokenizer starts one (BERT's
    whole-word masking unit: punctuation is a word of its own)."""
    reference = _slow_bert_tokenizer_class()(str(vocab_txt))
    texts, _ = real_texts[name]
    for text, encoding in zip(texts, wordpiece.encode_batch(texts)):
        expected = [True]
        for word in reference.basic_tokenizer.tokenize(text):
            expected += [True] + [False] * (len(reference.wordpiece_tokenizer.tokenize(word)) - 1)
        assert encoding.word_starts == expected + [True], text


def test_wordpiece_pair_layout(wordpiece):
    encoding = wordpiece.encode("Hello, world!", "Ünïcode  text")
    assert encoding.tokens == ["[CLS]", "hello", ",", "world", "!", "[SEP]", "unicode", "text", "[SEP]"]
    assert encoding.ids[0] == wordpiece.cls_id and encoding.ids[5] == encoding.ids[-1] == wordpiece.sep_id
    assert encoding.token_type_ids == [0] * 6 + [1] * 3
    assert encoding.sequence_ids == [None, 0, 0, 0, 0, None, 1, 1, None]
    assert encoding.offsets == [(0, 0), (0, 5), (5, 6), (7, 12), (12, 13), (0, 0), (0, 7), (9, 13), (0, 0)]
    assert encoding.word_starts == [True] * 9
    assert wordpiece.encode("unaffable").tokens == ["[CLS]", "una", "##ffa", "##ble", "[SEP]"]
    assert wordpiece.encode("unaffable").word_starts == [True, True, False, False, True]


@pytest.mark.parametrize("lowercase, strip_accents", [(True, None), (False, None), (True, False), (False, True)])
def test_wordpiece_cjk_accents_and_nfc(lowercase, strip_accents, vocab_txt):
    ours = Tokenizer.from_vocab_file(vocab_txt, lowercase=lowercase, strip_accents=strip_accents)
    reference = _slow_bert_tokenizer_class()(str(vocab_txt), do_lower_case=lowercase, strip_accents=strip_accents)
    for text in ["日本語のテキスト", "Café Déjà vu", "cafe\u0301 NAI\u0308VE", "Straße İstanbul ﬁne"]:
        assert ours.encode(text).ids == reference.encode(text), text
    assert ours.tokenize("cafe\u0301") == ours.tokenize("café")  # NFC first, as the reference does


def test_wordpiece_splits_cjk_characters(wordpiece, vocab_txt):
    assert wordpiece.tokenize("日本語") == ["日", "本", "語"]
    assert wordpiece.tokenize("Café Déjà") == ["cafe", "de", "##ja"]
    kept = Tokenizer.from_vocab_file(vocab_txt, tokenize_chinese_chars=False)
    assert kept.tokenize("日本語") == ["日", "##本", "##語"]


def test_literal_special_token_text_is_plain_text(any_tokenizer):
    for text in ["[MASK]", "a [CLS] b [SEP] c [PAD]"]:
        encoding = any_tokenizer.encode(text)
        inner = encoding.ids[1:-1]
        assert not any_tokenizer.special_ids & set(inner), (text, encoding.tokens)


# ------------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("strategy", ["longest_first", "only_second"])
def test_truncation_follows_the_tokenizers_library(strategy, wordpiece, sentencepiece):
    """Both backends cut pairs exactly as a plain `tokenizers` pipeline with truncation enabled does."""
    library = tokenizers.Tokenizer(WordLevel({"a": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}, unk_token="[UNK]"))
    library.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    library.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    word = {"wordpiece": "a ", "sentencepiece": "the "}  # one token each
    for tokenizer in (wordpiece, sentencepiece):
        assert len(tokenizer.tokenize(word[tokenizer.backend] * 7)) == 7
    for max_length in (4, 5, 8, 11, 14, 19):
        library.enable_truncation(max_length, strategy=strategy)
        for n_first in range(9):
            for n_second in range(9):
                try:
                    reference = library.encode("a " * n_first, "a " * n_second)
                    expected = (reference.sequence_ids.count(0), reference.sequence_ids.count(1))
                except Exception:  # the library refuses (only_second, text A too long)
                    expected = None
                for tokenizer in (wordpiece, sentencepiece):
                    args = (word[tokenizer.backend] * n_first, word[tokenizer.backend] * n_second)
                    if expected is None:
                        with pytest.raises(InputError, match="only_second"):
                            tokenizer.encode(*args, max_length=max_length, truncation=strategy)
                        continue
                    encoding = tokenizer.encode(*args, max_length=max_length, truncation=strategy)
                    got = (encoding.sequence_ids.count(0), encoding.sequence_ids.count(1))
                    assert got == expected, (tokenizer.backend, n_first, n_second, max_length)


def test_truncation_keeps_a_prefix_and_checks_bounds(any_tokenizer):
    text, pair = "The quick brown fox jumps over the lazy dog. " * 4, "A second, shorter text."
    full = any_tokenizer.encode(text, pair)
    cut = any_tokenizer.encode(text, pair, max_length=20)
    assert len(cut) == 20 and cut.tokens[-1] == "[SEP]"
    n_first = cut.sequence_ids.count(0)
    assert cut.ids[: n_first + 1] == full.ids[: n_first + 1]
    assert any_tokenizer.encode(text, max_length=10).ids[:9] == any_tokenizer.encode(text).ids[:9]
    only_second = any_tokenizer.encode(pair, text, max_length=20, truncation="only_second")
    assert only_second.sequence_ids.count(0) == len(any_tokenizer.tokenize(pair))
    with pytest.raises(InputError, match="only_second"):
        any_tokenizer.encode(text, pair, max_length=20, truncation="only_second")
    with pytest.raises(InputError, match="only_second"):
        any_tokenizer.encode(text, max_length=20, truncation="only_second")
    with pytest.raises(InputError, match="max_length=20"):
        any_tokenizer.encode(text, pair, max_length=20, truncation=None)
    assert any_tokenizer.encode(text, pair, max_length=len(full), truncation=None).ids == full.ids
    with pytest.raises(InputError, match="max_length=3"):
        any_tokenizer.encode(text, pair, max_length=3)
    with pytest.raises(InputError, match="truncation"):
        any_tokenizer.encode(text, max_length=8, truncation="longest")
    bare = any_tokenizer.encode(text, pair, add_special_tokens=False, max_length=12)
    assert len(bare) == 12 and not any_tokenizer.special_ids & set(bare.ids)
    assert bare.token_type_ids == [0] * bare.sequence_ids.count(0) + [1] * bare.sequence_ids.count(1)


# ----------------------------------------------------------------------------- SentencePiece


def test_sentencepiece_dir_declares_special_ids(sentencepiece, sentencepiece_dir):
    config = json.loads((sentencepiece_dir / CONFIG_FILE).read_text())
    assert config["backend"] == "sentencepiece" and Tokenizer.is_tokenizer_dir(sentencepiece_dir)
    assert config["special_ids"] == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert config["vocab_size"] == sentencepiece.vocab_size == 2048  # 2000 rounded up to a multiple of 64
    assert config["training"]["sentences_sampled"] == 12_000 < config["training"]["sentences_seen"]
    for role, token in SPECIAL_TOKENS.items():
        assert sentencepiece.id_to_token(config["special_ids"][role]) == token
        assert getattr(sentencepiece, f"{role}_id") == config["special_ids"][role]
    encoding = sentencepiece.encode("Hello world.", "Again.")
    assert encoding.ids[0] == sentencepiece.cls_id and encoding.ids.count(sentencepiece.sep_id) == 2
    assert (sentencepiece.backend, sentencepiece.lowercase) == ("sentencepiece", True)


def test_sentencepiece_decode_returns_the_normalised_input(sentencepiece, wiki_files):
    lines = _wiki_lines(wiki_files[50], 3000)
    clean = 0
    for line, encoding in zip(lines, sentencepiece.encode_batch(lines)):
        if sentencepiece.unk_id in encoding.ids:
            continue
        assert sentencepiece.decode(encoding.ids) == sentencepiece.normalize(line), line
        clean += 1
    assert clean > 0.8 * len(lines)
    assert sentencepiece.decode(sentencepiece.encode("Hello world", "again").ids, skip_special_tokens=False) == (
        "[CLS] hello world [SEP] again [SEP]"
    )


def test_sentencepiece_offsets_and_word_starts(sentencepiece, wiki_files):
    """Offsets select each piece's characters; pieces that NFKC made from one character ("½" -> "1⁄2")
    have empty offsets, and the last of them spans the character."""
    lines = _wiki_lines(wiki_files[51], 1500)
    pairs = lines[1:] + lines[:1]
    checked = 0
    for i, encoding in enumerate(sentencepiece.encode_batch(lines, pairs)):
        segments = (lines[i], pairs[i])
        expanded = ""
        for token, (start, end), sequence, starts_word in zip(
            encoding.tokens, encoding.offsets, encoding.sequence_ids, encoding.word_starts
        ):
            if sequence is None:
                continue
            text = segments[sequence][start:end]
            punctuation = all(unicodedata.category(c).startswith("P") for c in token)
            assert starts_word == (token.startswith("▁") or punctuation), token
            if token == "[UNK]":
                assert text.strip(), (token, segments[sequence])
            elif start == end:
                expanded += token.replace("▁", "")
            else:
                assert sentencepiece.normalize(text) == expanded + token.replace("▁", " ").strip(), (token, text)
                expanded = ""
            checked += 1
    assert checked > 10_000


def test_sentencepiece_training_is_deterministic(tmp_path, wiki_files):
    models = []
    for run in range(2):
        Tokenizer.train_sentencepiece(wiki_files[7:8], 400, tmp_path / str(run), sample_sentences=2500, seed=3)
        models.append((tmp_path / str(run) / "spm.model").read_bytes())
    assert models[0] == models[1]


def test_sentencepiece_training_memory_is_bounded_by_the_sample(tmp_path, wiki_files):
    """Peak memory depends on --sample-sentences, not on the corpus size (measured in a subprocess)."""
    script = (
        "import resource, sys\n"
        "from pipelines.cli import main\n"
        "code = main(['tokenizer', 'train', '--corpus', *sys.argv[2:], '--vocab-size', '500', '--out', sys.argv[1],"
        " '--sample-sentences', '3000'])\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n"
        "sys.exit(code)\n"
    )
    peaks = []
    for n_files in (1, 12):
        result = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / f"tok{n_files}"), *map(str, wiki_files[:n_files])],
            capture_output=True, text=True, cwd=ROOT, check=True,
        )
        peaks.append(int(result.stdout.strip().splitlines()[-1]))
    small, large = peaks
    print(f"peak RSS training on 1 file: {small} MiB, on 12 files: {large} MiB")
    assert large < small + 64, peaks


@pytest.mark.slow
def test_sentencepiece_32k_on_the_whole_wikipedia_extract(tmp_path, datasets_dir):
    """The full run: 32000 pieces on all 100 shards; prints the peak memory."""
    script = (
        "import resource, sys\n"
        "from pipelines.cli import main\n"
        "code = main(['tokenizer', 'train', '--corpus', sys.argv[2], '--vocab-size', '32000', '--out', sys.argv[1]])\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n"
        "sys.exit(code)\n"
    )
    out = tmp_path / "tok"
    result = subprocess.run(
        [sys.executable, "-c", script, str(out), str(datasets_dir / "wikipedia_en_extract")],
        capture_output=True, text=True, cwd=ROOT, check=True,
    )
    peak = int(result.stdout.strip().splitlines()[-1])
    print(f"peak RSS training 32000 pieces on the Wikipedia extract: {peak} MiB")
    tokenizer = Tokenizer.load(out)
    assert tokenizer.vocab_size == 32000 and tokenizer.special_ids == frozenset(range(5))
    assert peak < 4096


# ------------------------------------------------------------------------------- robustness


ODD_TEXTS = [
    "",
    "   ",
    "\t\n\r\u3000\u00a0",
    "\x00\x07\x1b\x7f control",
    "\ud800",
    "lone \udfff surrogate \ud83d",
    "\ufffd replacement",
    "日本語のテキストと漢字",
    "مرحبا بالعالم",
    "😀👍🏽 family 👨\u200d👩\u200d👧",
    "x" * 150 + " tail",
]


def test_odd_input_does_not_crash_and_is_deterministic(any_tokenizer):
    batch = any_tokenizer.encode_batch(ODD_TEXTS, ODD_TEXTS[::-1])
    for text, pair, encoding in zip(ODD_TEXTS, ODD_TEXTS[::-1], batch):
        assert isinstance(encoding, Encoding)
        assert encoding == any_tokenizer.encode(text, pair) == any_tokenizer.encode(text, pair)
        assert len(encoding.ids) == len(encoding.token_type_ids) == len(encoding.tokens) == len(encoding.offsets)
        assert len(encoding.ids) == len(encoding.sequence_ids) == len(encoding.word_starts)
        for (start, end), sequence in zip(encoding.offsets, encoding.sequence_ids):
            if sequence is not None:
                assert 0 <= start <= end <= len((text, pair)[sequence])
        any_tokenizer.decode(encoding.ids)
    assert any_tokenizer.encode("").ids == [any_tokenizer.cls_id, any_tokenizer.sep_id]
    assert any_tokenizer.encode("   ", "").ids == [any_tokenizer.cls_id, any_tokenizer.sep_id, any_tokenizer.sep_id]
    assert any_tokenizer.encode("\ud800 a") == any_tokenizer.encode("\ufffd a")


def test_five_megabyte_line(any_tokenizer):
    line = "Anarchism is a political philosophy, 1844-2015. " * 105_000
    encoding = any_tokenizer.encode(line)
    assert len(encoding) > 500_000 and encoding.offsets[-2][1] == len(line.rstrip())


def test_five_megabyte_word_is_one_unknown_token(wordpiece):
    """WordPiece gives up on a word over 100 characters at once, as BERT does."""
    assert wordpiece.encode("a" * 5_000_000).tokens == ["[CLS]", "[UNK]", "[SEP]"]


def test_batch_input_is_checked(wordpiece):
    with pytest.raises(InputError, match="single str"):
        wordpiece.encode_batch("not a list")
    with pytest.raises(InputError, match="2 texts but 1 pairs"):
        wordpiece.encode_batch(["a", "b"], ["c"])
    with pytest.raises(InputError, match="must be a str"):
        wordpiece.encode(None)
    with pytest.raises(InputError, match="outside"):
        wordpiece.decode([5, 30522])
    assert wordpiece.encode_batch([]) == []


def test_token_lookups(any_tokenizer):
    assert any_tokenizer.token_to_id("[MASK]") == any_tokenizer.mask_id
    assert any_tokenizer.token_to_id("no such token ##zz") is None
    ids = any_tokenizer.encode("Hello world").ids
    assert any_tokenizer.convert_ids_to_tokens(ids) == any_tokenizer.encode("Hello world").tokens
    assert [any_tokenizer.id_to_token(i) for i in ids] == any_tokenizer.convert_ids_to_tokens(ids)
    assert any_tokenizer.tokenize("Hello world") == any_tokenizer.encode("Hello world").tokens[1:-1]
    assert any_tokenizer.decode(ids) == "hello world"
    assert any_tokenizer.special_ids == frozenset(
        [any_tokenizer.pad_id, any_tokenizer.unk_id, any_tokenizer.cls_id, any_tokenizer.sep_id, any_tokenizer.mask_id]
    )


def test_pickles_for_ray_workers(any_tokenizer):
    copy = pickle.loads(pickle.dumps(any_tokenizer))
    assert copy.encode_batch(ODD_TEXTS) == any_tokenizer.encode_batch(ODD_TEXTS)


# ---------------------------------------------------------------------------- tokenizer dirs


def test_wordpiece_dir_round_trip_and_transformers_loads_it(tmp_path, vocab_txt, wordpiece, real_texts):
    directory = tmp_path / "checkpoint"
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    wordpiece.save(directory)
    assert (directory / "config.json").read_text() == "{}"  # a checkpoint's files are left alone
    assert (directory / "vocab.txt").read_bytes() == vocab_txt.read_bytes()
    assert Tokenizer.is_tokenizer_dir(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    assert config["backend"] == "wordpiece" and config["lowercase"] is True
    assert config["special_ids"] == {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}
    texts, _ = real_texts["sst2_dev"]
    loaded = Tokenizer.load(directory)
    assert loaded.encode_batch(texts) == wordpiece.encode_batch(texts)

    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(directory))
    assert hf(texts)["input_ids"] == [e.ids for e in wordpiece.encode_batch(texts)]


def test_loads_a_hugging_face_bert_dir(minilm_dir, real_texts):
    from transformers import AutoTokenizer

    texts, pairs = real_texts["mrpc_stsb_pairs"]
    tokenizer = Tokenizer.load(minilm_dir)
    assert Tokenizer.is_tokenizer_dir(minilm_dir) and tokenizer.backend == "wordpiece" and tokenizer.lowercase
    hf = AutoTokenizer.from_pretrained(str(minilm_dir))
    expected = hf(texts[:500], pairs[:500], padding=False, truncation=False)["input_ids"]
    assert [e.ids for e in tokenizer.encode_batch(texts[:500], pairs[:500])] == expected


def test_cased_from_vocab_cli(tmp_path, vocab_txt):
    out = tmp_path / "cased"
    assert main(["tokenizer", "from-vocab", "--vocab", str(vocab_txt), "--out", str(out), "--cased"]) == 0
    tokenizer = Tokenizer.load(out)
    assert not tokenizer.lowercase and tokenizer.tokenize("Hello") == ["[UNK]"]


# ------------------------------------------------------------------------------- bad input


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_bad_vocab_files(tmp_path):
    missing = tmp_path / "nope" / "vocab.txt"
    with pytest.raises(InputError, match=re.escape(str(missing))):
        Tokenizer.from_vocab_file(missing)
    empty = _write(tmp_path / "empty.txt", "")
    with pytest.raises(InputError, match="empty vocabulary"):
        Tokenizer.from_vocab_file(empty)
    partial = _write(tmp_path / "partial.txt", "[PAD]\n[UNK]\nhello\n[SEP]\n")
    with pytest.raises(InputError, match=r"partial.txt: vocabulary lacks \[CLS\], \[MASK\]"):
        Tokenizer.from_vocab_file(partial)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"[PAD]\n\xff\xfe\n")
    with pytest.raises(InputError, match="not UTF-8"):
        Tokenizer.from_vocab_file(binary)
    with pytest.raises(InputError, match="is a directory"):
        Tokenizer.from_vocab_file(tmp_path)


def test_bad_tokenizer_dirs(tmp_path, wordpiece, sentencepiece):
    for directory in (tmp_path, tmp_path / "missing"):
        assert not Tokenizer.is_tokenizer_dir(directory)
        with pytest.raises(InputError, match=re.escape(str(directory))):
            Tokenizer.load(directory)
    _write(tmp_path / CONFIG_FILE, "{not json")
    with pytest.raises(InputError, match="cannot read the tokenizer config"):
        Tokenizer.load(tmp_path)
    _write(tmp_path / CONFIG_FILE, json.dumps({"backend": "bytes"}))
    with pytest.raises(InputError, match="not a tokenizer config"):
        Tokenizer.load(tmp_path)

    sp_dir = sentencepiece.save(tmp_path / "sp")
    (sp_dir / "spm.model").unlink()
    assert not Tokenizer.is_tokenizer_dir(sp_dir)
    with pytest.raises(InputError, match="spm.model"):
        Tokenizer.load(sp_dir)
    (sp_dir / "spm.model").write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a SentencePiece model"):
        Tokenizer.load(sp_dir)

    wp_dir = wordpiece.save(tmp_path / "wp")
    config = json.loads((wp_dir / CONFIG_FILE).read_text())
    _write(wp_dir / CONFIG_FILE, json.dumps({**config, "special_ids": {**config["special_ids"], "mask": 4}}))
    with pytest.raises(InputError, match="declares special ids"):
        Tokenizer.load(wp_dir)


def test_bad_corpus(tmp_path):
    with pytest.raises(InputError, match="missing.txt"):
        Tokenizer.train_sentencepiece([tmp_path / "missing.txt"], 1000, tmp_path / "out")
    only_tags = _write(tmp_path / "tags.txt", '<doc id="1" url="u" title="t">\n\n</doc>\n')
    with pytest.raises(InputError, match="no text in the corpus"):
        Tokenizer.train_sentencepiece([only_tags], 1000, tmp_path / "out")
    tiny = _write(tmp_path / "tiny.txt", "a few words only.\n")
    with pytest.raises(InputError, match="sentencepiece could not train"):
        Tokenizer.train_sentencepiece([tiny], 1000, tmp_path / "out")
    with pytest.raises(InputError, match="model_type"):
        Tokenizer.train_sentencepiece([tiny], 1000, tmp_path / "out", model_type="word")
    assert not (tmp_path / "out").exists()


def test_cli_train_bpe_cased_unrounded_on_gz_and_invalid_utf8(tmp_path, wiki_files):
    """`bertflow tokenizer train` on a .gz WikiExtractor shard plus a plain file holding invalid UTF-8."""
    broken = tmp_path / "broken.txt"
    broken.write_bytes(b"Caf\xe9 au lait \xff\xfe is fine.\nAnother line, valid.\n\nA new document \xc3 here.\n")
    out = tmp_path / "bpe"
    code = main([
        "tokenizer", "train", "--corpus", str(wiki_files[5]), str(broken), "--vocab-size", "1000", "--out", str(out),
        "--model-type", "bpe", "--sample-sentences", "4000", "--no-round", "--cased",
    ])
    assert code == 0
    tokenizer = Tokenizer.load(out)
    config = json.loads((out / CONFIG_FILE).read_text())
    assert (tokenizer.vocab_size, tokenizer.lowercase, config["training"]["model_type"]) == (1000, False, "bpe")
    assert config["training"]["read"]["undecodable_lines"] == 2
    assert tokenizer.tokenize("The")[0] == "▁The"
    assert tokenizer.encode("Caf\ufffd au lait").ids[0] == tokenizer.cls_id


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    missing = tmp_path / "vocab.txt"
    assert main(["tokenizer", "from-vocab", "--vocab", str(missing), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err and err.startswith("bertflow tokenizer: error:")
    assert main(["tokenizer", "train", "--corpus", str(missing), "--vocab-size", "100",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err and err.startswith("bertflow tokenizer: error:")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_bert_tokenizer_imports_no_distributed_or_reference_code():
    probe = "import sys, bert.tokenizer; print([m for m in ('ray', 'mlflow', 'transformers') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == "[]"
