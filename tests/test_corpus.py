"""Document readers: every input format, stable ids, and bad input counted rather than crashed on."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bert.corpus import CorpusConfig, ReadStats, expand_inputs, probe_file, read_documents, split_sentences
from bert.errors import InputError


@pytest.fixture(scope="module")
def wiki_dir(datasets_dir: Path) -> Path:
    return datasets_dir / "wikipedia_en_extract" / "AA"


def read_all(paths, config: CorpusConfig = CorpusConfig()):
    stats = ReadStats()
    docs = [d for f in expand_inputs(paths, config) for d in read_documents(f, stats, config)]
    return docs, stats


def test_wikiextractor_file(wiki_dir: Path) -> None:
    docs, stats = read_all([wiki_dir / "wiki_00.gz"])
    assert stats.documents == 38 and stats.empty_documents == 0  # 38 articles (datasets MANIFEST.md)
    assert [d.doc_id for d in docs[:2]] == ["wiki_00.gz:0", "wiki_00.gz:1"]
    anarchism = docs[0]
    # the title line repeated after <doc> is dropped; the first sentence is the article's
    assert anarchism.sentences[0].startswith("Anarchism is a political philosophy")
    assert anarchism.sentences[1] == "Anarchism holds the state to be undesirable, unnecessary, or harmful."
    for doc in docs:
        assert doc.sentences and all(s and s == s.strip() for s in doc.sentences)
        assert not any(s.startswith("<doc") or s == "</doc>" for s in doc.sentences)
    assert stats.sentences == sum(len(d.sentences) for d in docs)


def test_whole_extract_reads_every_article(wiki_dir: Path) -> None:
    docs, stats = read_all([wiki_dir])
    assert stats.files == 100
    # 6514 articles; 4 of them hold only their title line and are counted as empty
    assert stats.documents + stats.empty_documents == 6514
    assert stats.empty_documents == 4
    assert len({d.doc_id for d in docs}) == len(docs)
    assert docs[0].doc_id == "AA/wiki_00.gz:0" and docs[-1].doc_id.startswith("AA/wiki_99.gz:")


def test_sentence_splitter_keeps_abbreviations_together() -> None:
    text = "Dr. Smith went to Washington, D.C. on Jan. 5, 2001. He met J. R. R. Tolkien's son. Mt. Everest is tall."
    assert split_sentences(text) == [
        "Dr. Smith went to Washington, D.C. on Jan. 5, 2001.",
        "He met J. R. R. Tolkien's son.",
        "Mt. Everest is tall.",
    ]


def test_bert_format_text_one_sentence_per_line(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("First sentence. Not split.\nSecond one\n\n\n\nOther doc\r\n  \nThird doc\n", encoding="utf-8")
    docs, stats = read_all([path])
    assert [(d.doc_id, d.sentences) for d in docs] == [
        ("corpus.txt:0", ("First sentence. Not split.", "Second one")),
        ("corpus.txt:1", ("Other doc",)),
        ("corpus.txt:2", ("Third doc",)),
    ]
    assert stats.documents == 3 and stats.sentences == 4


def test_gzip_is_detected_by_content(tmp_path: Path) -> None:
    plain = tmp_path / "a.txt"
    plain.write_text("One.\nTwo.\n\nThree.\n", encoding="utf-8")
    packed = tmp_path / "b.data"  # no .gz suffix: recognised by its magic bytes
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert [d.sentences for d in read_all([plain])[0]] == [d.sentences for d in read_all([packed])[0]]


def test_jsonl_and_parquet_paragraphs_are_split(tmp_path: Path) -> None:
    text = "Paris is the capital of France. It is on the Seine.\nA second paragraph here."
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(
        "\n".join([json.dumps({"body": text}), "{not json", json.dumps({"other": 1}), json.dumps({"body": ""})]) + "\n",
        encoding="utf-8",
    )
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": [text, None, "Only one sentence"]}), parquet)
    config = CorpusConfig(text_column="body")
    docs, stats = read_all([jsonl, parquet], config)
    expected = ("Paris is the capital of France.", "It is on the Seine.", "A second paragraph here.")
    assert [(d.doc_id, d.sentences) for d in docs] == [
        ("docs.jsonl:0", expected),
        ("docs.parquet:0", expected),
        ("docs.parquet:2", ("Only one sentence",)),
    ]
    assert stats.bad_records == 2  # the broken line and the record without the field
    assert stats.empty_documents == 2  # the empty jsonl text and the null parquet cell


def test_parquet_without_text_column_is_an_error_up_front(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"content": ["x"]}), path)
    with pytest.raises(InputError, match=r"t\.parquet.*no text column 'text'.*content"):
        expand_inputs([path])


def test_missing_path_or_empty_directory_names_it(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("Hi.\n")
    with pytest.raises(InputError, match="does not exist: .*does-not-exist"):
        expand_inputs([tmp_path / "a.txt", tmp_path / "does-not-exist"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="has no files: .*empty"):
        expand_inputs([tmp_path / "empty"])


def test_same_name_from_two_arguments_is_an_error(tmp_path: Path) -> None:
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "a.txt").write_text("Hi.\n")
    with pytest.raises(InputError, match="same name 'a.txt'"):
        expand_inputs([tmp_path / "x" / "a.txt", tmp_path / "y" / "a.txt"])


def test_doc_ids_do_not_depend_on_where_the_corpus_lives(tmp_path: Path, wiki_dir: Path) -> None:
    for where in ("one", "two/deeper"):
        (tmp_path / where / "wiki").mkdir(parents=True)
        shutil.copy(wiki_dir / "wiki_01.gz", tmp_path / where / "wiki" / "wiki_01.gz")
    one, _ = read_all([tmp_path / "one" / "wiki"])
    two, _ = read_all([tmp_path / "two" / "deeper" / "wiki"])
    assert one == two and one[0].doc_id == "wiki/wiki_01.gz:0"


def test_bad_inputs_are_counted_not_fatal(tmp_path: Path, wiki_dir: Path) -> None:
    corpus = tmp_path / "mixed"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "empty.txt").write_bytes(b"")
    (corpus / "blank.txt").write_text("\n\n  \n")
    (corpus / "binary.bin").write_bytes(bytes(range(256)) * 64)
    (corpus / "latin1.txt").write_bytes("caf\xe9 au lait.\nA second line.\n".encode("latin-1"))
    (corpus / "long.txt").write_text("word " * 1_000_000 + "\n\nShort doc.\n")  # a 5 MB line
    (corpus / "truncated.gz").write_bytes((wiki_dir / "wiki_03.gz").read_bytes()[:100_000])
    (corpus / ".hidden").write_text("never read\n")
    (corpus / "sub" / "wiki.gz").write_bytes((wiki_dir / "wiki_02.gz").read_bytes())
    (corpus / "sub" / "one.jsonl").write_text(json.dumps({"text": "Just one sentence."}) + "\n")

    files = expand_inputs([corpus])
    assert [f.name for f in files] == [
        "mixed/binary.bin", "mixed/blank.txt", "mixed/empty.txt", "mixed/latin1.txt", "mixed/long.txt",
        "mixed/sub/one.jsonl", "mixed/sub/wiki.gz", "mixed/truncated.gz",
    ]
    truncated = next(f for f in files if f.name == "mixed/truncated.gz")
    with pytest.raises(InputError, match="truncated.gz: unreadable after .* corrupt or truncated.*--skip-unreadable"):
        list(read_documents(truncated, ReadStats()))  # an error by default, naming the file
    stats = ReadStats()
    lenient = CorpusConfig(skip_unreadable=True)
    docs = {d.doc_id: d for f in files for d in read_documents(f, stats, lenient)}
    assert stats.binary_files == 1
    assert stats.empty_files == 2
    assert stats.undecodable_lines == 1
    assert docs["mixed/latin1.txt:0"].sentences == ("caf\ufffd au lait.", "A second line.")
    assert stats.long_sentences_cut == 1
    long_doc = docs["mixed/long.txt:0"].sentences
    assert len(long_doc) >= 500 and max(map(len, long_doc)) <= CorpusConfig().max_sentence_chars
    assert docs["mixed/long.txt:1"].sentences == ("Short doc.",)
    assert docs["mixed/sub/one.jsonl:0"].sentences == ("Just one sentence.",)
    assert stats.unreadable_files == 1  # the truncated gzip; what came before the cut is kept
    assert any(doc_id.startswith("mixed/truncated.gz:") for doc_id in docs)
    assert sum(doc_id.startswith("mixed/sub/wiki.gz:") for doc_id in docs) == 40  # 40 articles
    assert stats.files == 8 and stats.documents == len(docs)


def test_probe_file_looks_at_the_head_only(tmp_path: Path, wiki_dir: Path) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.gz").write_bytes(gzip.compress(b"\n \n\t\n"))
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)) * 64)
    (tmp_path / "long-blank.txt").write_text("\n" * 20_000)  # beyond the head: only reading tells
    (tmp_path / "cut.gz").write_bytes((wiki_dir / "wiki_03.gz").read_bytes()[:100_000])
    kinds = {name: probe_file(tmp_path / name)
             for name in ("empty.txt", "blank.gz", "binary.bin", "long-blank.txt", "cut.gz")}
    assert kinds == {"empty.txt": "empty", "blank.gz": "empty", "long-blank.txt": "text", "cut.gz": "text",
                     "binary.bin": "binary: 11% of its first 8,192 bytes are NUL or other control bytes (text has none; "
                                   "more than 5% means binary)"}
    assert probe_file(wiki_dir / "wiki_00.gz") == "text"


def test_a_few_nul_bytes_are_replaced_not_the_file_dropped(tmp_path: Path) -> None:
    """Issue 32: a text file with NUL bytes in some lines was skipped whole as "binary", without a word why."""
    damaged = tmp_path / "damaged.txt"
    damaged.write_bytes(b"First sentence here.\nA damaged\x00\x00 line.\nThird sentence.\n\nSecond doc.\n")
    assert probe_file(damaged) == "text"
    stats = ReadStats()
    docs = list(read_documents(expand_inputs([damaged])[0], stats))
    assert [d.sentences for d in docs] == [("First sentence here.", "A damaged\ufffd\ufffd line.", "Third sentence."),
                                           ("Second doc.",)]
    assert (stats.undecodable_lines, stats.binary_files) == (1, 0)  # counted like invalid UTF-8
