"""Reading pretraining text: input files -> documents (ordered lists of sentences).

A document is what DESIGN.md's "Documents" contract says: an ordered list of sentences with
a stable `doc_id`. The id is `<input name>:<ordinal>`, where the input name is the file's
path relative to the corpus argument it came from (prefixed with that argument's own name)
and the ordinal counts the documents of the file from 0. It depends only on the corpus
layout, never on the machine, the absolute path or the number of workers.

Formats, detected per file (so a directory may mix them):

* **lines** — the original BERT input: one sentence per line, blank lines between documents.
  Lines are taken as sentences as they are (no further splitting), as in the original.
* **wiki** — WikiExtractor output: `<doc id=.. url=.. title=..>` … `</doc>` blocks. The title
  line repeated as the first body line is dropped, empty lines are skipped and every other
  line is a paragraph, split into sentences.
* **jsonl** (`.jsonl`, `.ndjson`, `.json`) — one JSON object per line; its text field is split
  into paragraphs at newlines and each paragraph into sentences.
* **parquet** (`.parquet`) — a text column, read in record batches, split like jsonl.

Files may be local paths or object-store URIs (`s3://...`, through `bert/storage.py`); a reader
may also hand over a file's bytes already read (`read_documents(..., data=...)`, as the shards
build's Ray Data read does). `.gz` files (recognised by their magic bytes, not their name) are
decompressed: bytes in memory in one call, falling back to the streaming reader only to find how
far a corrupt or truncated file reads.
A file whose first 8 KiB are more than 5% NUL or other control bytes is binary and skipped whole
(`probe_file` says why); in a text file, NUL bytes (a damaged line) are replaced like invalid UTF-8.
Undecodable UTF-8 bytes are replaced (U+FFFD) and the lines counted. Bad content is skipped
and counted in `ReadStats`, which the shards manifest records, with one exception: a corrupt
or truncated gzip or parquet file is an `InputError` naming it, unless
`CorpusConfig.skip_unreadable` (then the documents before the fault are kept and the file
counted). A missing path or a parquet file without the text column is an `InputError`, raised
by `expand_inputs` before any work starts; `probe_file` tells an empty or binary file from its
head, so a corpus with no text at all can be refused before any work too.

Sentences are split with `sentencex` (Wikimedia's rule-based segmenter, a compiled Rust
extension whose abbreviation rules ship in the wheel): ~80 MB/s on the Wikipedia extract,
against ~10-15 MB/s for blingfire and nupunkt and ~0.2 MB/s for pysbd, with the same
handling of abbreviations ("Dr.", "U.S.", "Mt.", initials) on the paragraphs checked.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from bert import storage
from bert.errors import InputError

GZIP_MAGIC = b"\x1f\x8b"
BINARY_SNIFF_BYTES = 8192
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
PARQUET_SUFFIXES = (".parquet",)
WIKI_DOC_OPEN = re.compile(r'^<doc\b[^>]*>\s*$')
WIKI_TITLE = re.compile(r'\btitle="([^"]*)"')


@dataclass(frozen=True)
class CorpusConfig:
    """How input files are read: the text field of jsonl/parquet records, the language of the
    sentence splitter, and the longest sentence kept in one piece.

    `max_sentence_chars` bounds the work per sentence: a longer "sentence" (a 5 MB line with no
    full stop, a table flattened into one line) is cut at whitespace into pieces of at most this
    many characters. Any piece is still far longer than a 512-token sequence, so no example
    changes; only the tokenizer and the truncation loop are spared megabyte-long inputs.
    """

    text_column: str = "text"
    language: str = "en"
    max_sentence_chars: int = 10_000
    skip_unreadable: bool = False  # a corrupt .gz / parquet file: an error naming it (default), or counted and skipped

    def __post_init__(self) -> None:
        if not self.text_column:
            raise InputError("CorpusConfig.text_column must name a field, got an empty string")
        if self.max_sentence_chars < 100:
            raise InputError(f"CorpusConfig.max_sentence_chars must be >= 100, got {self.max_sentence_chars}")


@dataclass(frozen=True)
class Document:
    """One document: a stable id and its sentences, in order, none empty."""

    doc_id: str
    sentences: tuple[str, ...]


@dataclass(frozen=True)
class InputFile:
    """One file to read: where it is (a local `Path` or an object-store URI), and the name its documents'
    ids are built from."""

    path: Path | str
    name: str

    @property
    def basename(self) -> str:
        return storage.name(self.path)


@dataclass
class ReadStats:
    """What reading met, summed over files; every skip is counted, nothing is skipped silently."""

    files: int = 0
    documents: int = 0
    sentences: int = 0
    empty_files: int = 0  # no document in it (zero bytes, only blank lines, empty records)
    binary_files: int = 0  # more than 5% control bytes in the first 8 KiB: skipped whole
    unreadable_files: int = 0  # corrupt gzip or parquet; the documents read before the fault are kept
    empty_documents: int = 0  # a document with no sentence (e.g. a wiki article with only its title)
    undecodable_lines: int = 0  # lines with invalid UTF-8 or NUL bytes, replaced by U+FFFD
    bad_records: int = 0  # jsonl lines that are not a JSON object with a string text field
    long_sentences_cut: int = 0  # sentences longer than max_sentence_chars, cut into pieces

    def add(self, other: ReadStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def expand_inputs(paths: Sequence[str | os.PathLike[str]], config: CorpusConfig = CorpusConfig()) -> list[InputFile]:
    """The files under `paths`, in a canonical order, each with its stable name.

    A directory expands to its files, recursively and sorted; hidden files (`.name`) are left
    out. A file's name is the argument's own name joined with the path below it, so the same
    corpus laid out the same way gives the same names on any machine. Raises `InputError`,
    naming the path, for a missing path, an empty directory, two inputs with the same name,
    or a parquet file without the text column, before anything is read.
    """
    if not paths:
        raise InputError("no corpus path given")
    files: list[InputFile] = []
    for raw in paths:
        files.extend(_remote_inputs(os.fspath(raw)) if storage.is_remote(raw) else _local_inputs(Path(raw)))
    seen: dict[str, Path | str] = {}
    for f in files:
        if f.name in seen:
            raise InputError(
                f"two corpus inputs have the same name {f.name!r} ({seen[f.name]} and {f.path}); "
                "document ids would collide: rename one or pass its parent directory"
            )
        seen[f.name] = f.path
        if _format_of_name(f.path) == "parquet":
            _check_parquet_column(f.path, config.text_column)
    return files


def _local_inputs(root: Path) -> list[InputFile]:
    if not root.exists():
        raise InputError(f"corpus path does not exist: {root}")
    if not root.is_dir():
        return [InputFile(root, root.name)]
    found = sorted(_walk(root))
    if not found:
        raise InputError(f"corpus directory has no files: {root}")
    return [InputFile(p, f"{root.name}/{p.relative_to(root).as_posix()}") for p in found]


def _remote_inputs(uri: str) -> list[InputFile]:
    """An object-store file, or every object under a prefix (hidden names left out), like a local dir."""
    found = storage.info(uri)
    if found.type == storage.pafs.FileType.NotFound:
        raise InputError(f"corpus path does not exist: {uri}")
    root = uri.rstrip("/")
    if found.type == storage.pafs.FileType.File:
        return [InputFile(root, storage.name(root))]
    names = [rel for rel, _ in storage.walk_files(root) if not any(p.startswith(".") for p in rel.split("/"))]
    if not names:
        raise InputError(f"corpus directory has no files: {uri}")
    return [InputFile(f"{root}/{rel}", f"{storage.name(root)}/{rel}") for rel in names]


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                yield Path(dirpath) / name


def _format_of_name(path: Path | str) -> str:
    name = storage.name(path).lower()
    if name.endswith(".gz"):
        name = name[: -len(".gz")]
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "text"


def _check_parquet_column(path: Path | str, column: str) -> None:
    try:
        fs, inside = storage.resolve(path)
        names = pq.read_schema(inside, filesystem=fs).names
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{path}: not a readable parquet file ({exc})") from exc
    if column not in names:
        raise InputError(f"{path}: parquet file has no text column {column!r} (columns: {', '.join(names)})")


def split_sentences(paragraph: str, language: str = "en") -> list[str]:
    """The sentences of one paragraph, stripped, empty ones left out."""
    from sentencex import segment

    return [s for s in (piece.strip() for piece in segment(language, paragraph)) if s]


def read_documents(file: InputFile, stats: ReadStats, config: CorpusConfig = CorpusConfig(),
                   data: bytes | None = None) -> Iterator[Document]:
    """The non-empty documents of one file, in file order; counts what it meets into `stats`.

    `data`: the file's bytes, already read (else the file is opened). Ordinals count every
    document the file holds, empty ones included, so an id never shifts when a neighbouring
    document turns out empty.
    """
    stats.files += 1
    before = stats.documents
    try:
        docs = _raw_documents(file, stats, config, data)
        if docs is None:  # binary: skipped whole
            stats.binary_files += 1
            return
        for ordinal, (kind, texts) in enumerate(docs):
            sentences = _sentences(kind, texts, config, stats)
            if not sentences:
                stats.empty_documents += 1
                continue
            stats.documents += 1
            stats.sentences += len(sentences)
            yield Document(f"{file.name}:{ordinal}", tuple(sentences))
    except (OSError, EOFError, zlib.error, pa.ArrowException) as exc:  # corrupt or truncated gzip / parquet
        if not config.skip_unreadable:
            raise InputError(
                f"{file.path}: unreadable after {stats.documents - before} document(s) ({type(exc).__name__}: {exc}); "
                "the file is corrupt or truncated: fix or remove it, or pass --skip-unreadable to keep what was read "
                "and go on"
            ) from None
        stats.unreadable_files += 1  # the documents read before the fault are kept
        return
    if stats.documents == before:
        stats.empty_files += 1


def _raw_documents(file: InputFile, stats: ReadStats, config: CorpusConfig,
                   data: bytes | None) -> Iterator[tuple[str, list[str]]] | None:
    """(kind, paragraphs or lines) per document of the file, or None for a binary file."""
    fmt = _format_of_name(file.path)
    if fmt == "parquet":
        return _parquet_paragraph_docs(file.path, config.text_column, data)
    lines = _file_lines(file.path, stats) if data is None else _bytes_lines(data, stats)
    if lines is None:
        return None
    return _jsonl_paragraph_docs(lines, config.text_column, stats) if fmt == "jsonl" else _text_docs(lines)


def _file_lines(path: Path | str, stats: ReadStats) -> Iterator[str] | None:
    """The decoded lines of a file, streamed; None if its head says binary."""
    raw = _open_bytes(path)
    if binary_reason(raw.peek(BINARY_SNIFF_BYTES)[:BINARY_SNIFF_BYTES]):
        raw.close()
        return None
    return _decoded_lines(raw, stats)


def _bytes_lines(data: bytes, stats: ReadStats) -> Iterator[str] | None:
    """The decoded lines of a file's bytes (gzip decompressed in one call); None if its head says binary.

    A corrupt or truncated gzip is read again by the streaming reader, which yields the lines
    before the fault and then raises, as reading the file would.
    """
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error):
            raw = io.BufferedReader(gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb"), buffer_size=1 << 16)
            if binary_reason(raw.peek(BINARY_SNIFF_BYTES)[:BINARY_SNIFF_BYTES]):
                return None
            return _decoded_lines(raw, stats)
    if binary_reason(data[:BINARY_SNIFF_BYTES]):
        return None
    return _text_lines(data, stats)


def _text_lines(content: bytes, stats: ReadStats) -> Iterator[str]:
    """Lines of decompressed bytes, decoded in one call when they are clean UTF-8 (else line by line)."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        yield from _decoded_lines(io.BytesIO(content), stats)
        return
    lines = text.split("\n")  # as iterating the bytes splits them: at b"\n" only
    if lines[-1] == "":
        lines.pop()
    for line in lines:
        yield line.rstrip("\r")


def probe_file(path: Path | str) -> str:
    """A cheap look at a file before reading it: "empty", "binary" or "text".

    Only the first `BINARY_SNIFF_BYTES` of the (decompressed) content are read. "binary: <why>" is
    what `read_documents` skips (`binary_reason`); "empty" is a file whose whole content fits in
    them and is whitespace only. Anything else, a corrupt gzip or a parquet file included, is
    "text": reading it tells the rest.
    """
    if _format_of_name(path) == "parquet":
        return "text"
    try:
        with _open_bytes(path) as raw:
            head = raw.read(BINARY_SNIFF_BYTES + 1)
    except (OSError, EOFError, zlib.error):
        return "text"
    reason = binary_reason(head[:BINARY_SNIFF_BYTES])
    if reason:
        return f"binary: {reason}"
    if len(head) <= BINARY_SNIFF_BYTES and not head.strip():
        return "empty"
    return "text"


# bytes no text holds (tab, newline, vertical tab, form feed and carriage return are text)
CONTROL_BYTES = bytes([*range(0, 9), *range(14, 32), 127])
BINARY_CONTROL_FRACTION = 0.05


def binary_reason(head: bytes) -> str | None:
    """Why a file whose content starts with `head` is binary (None: it is text).

    Binary: more than 5% of the bytes are NUL or other control bytes. A text file with a few NUL
    bytes (a damaged line) is text: `read_documents` replaces them (U+FFFD) and counts their lines.
    """
    controls = len(head) - len(head.translate(None, CONTROL_BYTES))
    if head and controls > BINARY_CONTROL_FRACTION * len(head):
        return (f"{controls / len(head):.0%} of its first {len(head):,} bytes are NUL or other control bytes "
                f"(text has none; more than {BINARY_CONTROL_FRACTION:.0%} means binary)")
    return None


def _open_bytes(path: Path | str) -> io.BufferedReader:
    """A buffered binary reader of the file's content (local or on an object store), decompressed if it is gzip."""
    fs, inside = storage.resolve(path)
    raw = open(inside, "rb") if fs is storage.LOCAL else io.BufferedReader(
        fs.open_input_stream(inside, compression=None), 1 << 20)  # type: ignore[arg-type]
    if raw.peek(2)[:2] == GZIP_MAGIC:
        return io.BufferedReader(gzip.GzipFile(fileobj=raw, mode="rb"), buffer_size=1 << 16)
    return raw


def _decoded_lines(raw: BinaryIO, stats: ReadStats) -> Iterator[str]:
    """Lines without their line break; invalid UTF-8 and NUL bytes (damaged text) are replaced by U+FFFD and
    the line counted."""
    with raw:
        for line in raw:
            damaged = False
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                text, damaged = line.decode("utf-8", errors="replace"), True
            if "\x00" in text:
                text, damaged = text.replace("\x00", "\ufffd"), True
            stats.undecodable_lines += damaged
            yield text.rstrip("\r\n")


def _text_docs(lines: Iterable[str]) -> Iterator[tuple[str, list[str]]]:
    """(kind, lines) per document of a plain-text file: WikiExtractor blocks, or BERT format.

    The format is decided by the first non-empty line: `<doc …>` means WikiExtractor.
    """
    it = iter(lines)
    for first in it:
        if first.strip():
            break
    else:
        return
    if WIKI_DOC_OPEN.match(first.strip()):
        yield from _wiki_docs(first, it)
    else:
        yield from _bert_format_docs(first, it)


def _bert_format_docs(first: str, rest: Iterator[str]) -> Iterator[tuple[str, list[str]]]:
    doc = [first]
    for line in rest:
        if line.strip():
            doc.append(line)
        elif doc:
            yield "lines", doc
            doc = []
    if doc:
        yield "lines", doc


def _wiki_docs(first: str, rest: Iterator[str]) -> Iterator[tuple[str, list[str]]]:
    """Paragraphs per `<doc>` block, the repeated title line dropped; text outside blocks is ignored."""
    header: str | None = first.strip()
    body: list[str] = []
    for line in rest:
        stripped = line.strip()
        if header is None:
            if WIKI_DOC_OPEN.match(stripped):
                header, body = stripped, []
        elif stripped == "</doc>":
            yield "paragraphs", _drop_title(header, body)
            header = None
        elif stripped:
            body.append(stripped)
    if header is not None:  # a file cut off inside a block: keep what it has
        yield "paragraphs", _drop_title(header, body)


def _drop_title(header: str, body: list[str]) -> list[str]:
    title = WIKI_TITLE.search(header)
    if body and title is not None and body[0] == title.group(1).strip():
        return body[1:]
    return body


def _jsonl_paragraph_docs(lines: Iterable[str], column: str, stats: ReadStats) -> Iterator[tuple[str, list[str]]]:
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        text = record.get(column) if isinstance(record, dict) else None
        if not isinstance(text, str):
            stats.bad_records += 1
            continue
        yield "paragraphs", text.splitlines()


def _parquet_paragraph_docs(path: Path | str, column: str,
                            data: bytes | None = None) -> Iterator[tuple[str, list[str]]]:
    source = pa.BufferReader(data) if data is not None else storage.open_random(path)
    with pq.ParquetFile(source) as pf:
        for batch in pf.iter_batches(columns=[column], batch_size=1024):
            for text in batch.column(0).to_pylist():
                yield "paragraphs", (text.splitlines() if isinstance(text, str) else [])


def _sentences(kind: str, texts: list[str], config: CorpusConfig, stats: ReadStats) -> list[str]:
    if kind == "lines":
        sentences = [t.strip() for t in texts if t.strip()]
    else:
        from sentencex import segment  # once per document, not per paragraph

        language = config.language
        sentences = [s for p in texts if p.strip() for s in (piece.strip() for piece in segment(language, p)) if s]
    out: list[str] = []
    for s in sentences:
        if len(s) > config.max_sentence_chars:
            stats.long_sentences_cut += 1
            out.extend(_cut(s, config.max_sentence_chars))
        else:
            out.append(s)
    return out


def _cut(text: str, limit: int) -> list[str]:
    """`text` in pieces of at most `limit` characters, cut at the last space where there is one."""
    pieces = []
    start = 0
    while len(text) - start > limit:
        cut = text.rfind(" ", start + limit // 2, start + limit)
        cut = start + limit if cut < 0 else cut
        pieces.append(text[start:cut].strip())
        start = cut
    pieces.append(text[start:].strip())
    return [p for p in pieces if p]
