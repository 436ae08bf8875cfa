"""The shards stage's Ray Data functions (`pipelines.jobs.shards` runs them in `map_batches`): pass 1
tokenizes a batch of input files (their bytes, as `read_binary_files` gives them) into per-shard
buckets (`tokenize_files`), pass 2 turns each shard's buckets into its part file (`build_parts`).
A call holds no more than one batch of files' documents or one shard.

Everything is written through a `pyarrow.fs.FileSystem` (`bert.storage.resolve`), so the output,
its buckets included, may be a local dir or an object-store prefix. Plain functions of their
inputs: no Ray import here; Ray Data calls them with keyword arguments it ships to the workers.
"""

import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bert import storage
from bert.corpus import (
    CorpusConfig,
    InputFile,
    ReadStats,
    read_documents,
)
from bert.errors import InputError
from bert.fsutil import sha256_file
from bert.pretraining_data import (
    ExampleBatch,
    PretrainingDataConfig,
    create_example_batches,
)
from bert.pretraining_documents import DocumentSet, encode_documents
from bert.pretraining_masking import SpecialTokens
from bert.shards import example_schema

ROW_GROUP_ROWS = 4096  # examples per parquet row group
PARQUET_OPTIONS: dict[str, Any] = {  # of the part files: zstd, dictionaries only where they pay, no min/max statistics
    "compression": "zstd",
    "compression_level": 1,
    "use_dictionary": ["a_doc_id", "b_doc_id"],
    "write_statistics": False,
}
_BUCKET_FLUSH_TOKENS = 1 << 22  # pass 1 writes its pending documents out at this many tokens (~16 MB)
_ENCODE_BATCH_CHARS = 1 << 20  # pass 1 tokenizes a file's documents about 1 MiB of text at a time


def shard_of(doc_id: str, num_shards: int) -> int:
    """The shard a document belongs to: a stable hash of its id (not Python's salted hash())."""
    digest = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return struct.unpack("<Q", digest)[0] % num_shards


# ---------------------------------------------------------------------------------------------
# pass 1: one input file -> its documents, tokenized, in per-shard buckets


_tokenizers: dict[str, Any] = {}  # fingerprint -> tokenizer: one per worker process, reused by the calls it runs


def _worker_tokenizer(tokenizer: Any, fingerprint: str) -> Any:
    """The tokenizer shipped with the call, kept by the worker process for the calls after it."""
    if fingerprint not in _tokenizers:
        _tokenizers.clear()
        _tokenizers[fingerprint] = tokenizer
    return _tokenizers[fingerprint]


def _bucket_schema(word_starts: bool) -> pa.Schema:
    fields = [
        pa.field("doc_id", pa.string()),
        pa.field("doc_key", pa.int64()),  # file index << 32 | ordinal: the canonical order of documents
        pa.field("tokens", pa.list_(pa.int32())),  # the document's tokens, back to back
        pa.field("sentence_lengths", pa.list_(pa.int32())),  # tokens per sentence
    ]
    if word_starts:
        fields.append(pa.field("word_starts", pa.list_(pa.bool_())))
    return pa.schema(fields)


def _list_array(values: np.ndarray, lengths: np.ndarray, dtype: pa.DataType) -> pa.Array:
    """A list array from flat values and the list lengths (no Python object per element)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=dtype))


class _BucketWriter:
    """Appends a batch of files' tokenized documents to per-shard bucket files.

    Each document carries its canonical key (`doc_key`: file index, ordinal), by which the build
    pass orders a shard's documents whatever batch or worker wrote them. Documents wait in memory
    until `_BUCKET_FLUSH_TOKENS` tokens are pending over all shards, then every shard's pending
    documents become a row group of its bucket file `<buckets>/<shard>/<first file index>.parquet`.
    """

    def __init__(self, fs: pafs.FileSystem, buckets: str, file_index: int, num_shards: int, word_starts: bool) -> None:
        self.fs, self.buckets = fs, buckets
        self.file_index = file_index
        self.num_shards = num_shards
        self.schema = _bucket_schema(word_starts)
        self.pending: dict[int, list[tuple[DocumentSet, np.ndarray]]] = {}
        self.pending_tokens = 0
        self.writers: dict[int, pq.ParquetWriter] = {}

    def add(self, docs: DocumentSet, keys: np.ndarray) -> None:
        """Route each document of `docs` (with its key) to its shard's bucket."""
        shards = np.array([shard_of(doc_id, self.num_shards) for doc_id in docs.doc_ids], dtype=np.int64)
        for shard in np.unique(shards).tolist():
            index = np.flatnonzero(shards == shard)
            self.pending.setdefault(shard, []).append((_select(docs, index), keys[index]))
        self.pending_tokens += len(docs.tokens)
        if self.pending_tokens >= _BUCKET_FLUSH_TOKENS:
            self._flush()

    def close(self) -> None:
        self._flush()
        for writer in self.writers.values():
            writer.close()

    def _flush(self) -> None:
        for shard, parts in sorted(self.pending.items()):
            docs = _concat([d for d, _ in parts])
            sentences_per_doc = np.diff(docs.doc_sentences)
            columns = [
                pa.array(docs.doc_ids, pa.string()),
                pa.array(np.concatenate([k for _, k in parts]), pa.int64()),
                _list_array(docs.tokens, np.diff(docs.doc_tokens), pa.int32()),
                _list_array(np.diff(docs.sentence_offsets).astype(np.int32), sentences_per_doc, pa.int32()),
            ]
            if docs.word_starts is not None:
                columns.append(_list_array(docs.word_starts, np.diff(docs.doc_tokens), pa.bool_()))
            if shard not in self.writers:
                directory = f"{self.buckets}/{shard:05d}"
                self.fs.create_dir(directory, recursive=True)
                self.writers[shard] = pq.ParquetWriter(f"{directory}/{self.file_index:06d}.parquet", self.schema,
                                                       filesystem=self.fs, compression="none", use_dictionary=False)
            self.writers[shard].write_table(pa.Table.from_arrays(columns, schema=self.schema))
        self.pending.clear()
        self.pending_tokens = 0


def _select(docs: DocumentSet, index: np.ndarray) -> DocumentSet:
    """The documents `index` (increasing) of `docs`, as a new set."""
    tok_first, tok_last = docs.doc_tokens[index], docs.doc_tokens[index + 1]
    sent_first, sent_last = docs.doc_sentences[index], docs.doc_sentences[index + 1]
    tokens = np.concatenate([docs.tokens[a:b] for a, b in zip(tok_first.tolist(), tok_last.tolist())])
    lengths = np.diff(docs.sentence_offsets)
    sentence_lengths = np.concatenate([lengths[a:b] for a, b in zip(sent_first.tolist(), sent_last.tolist())])
    starts = None
    if docs.word_starts is not None:
        starts = np.concatenate([docs.word_starts[a:b] for a, b in zip(tok_first.tolist(), tok_last.tolist())])
    return DocumentSet.from_lengths([docs.doc_ids[i] for i in index.tolist()], tokens, sentence_lengths,
                                    sent_last - sent_first, starts)


def _concat(sets: Sequence[DocumentSet]) -> DocumentSet:
    """Document sets one after the other."""
    if len(sets) == 1:
        return sets[0]
    starts = None
    if sets[0].word_starts is not None:
        starts = np.concatenate([s.word_starts for s in sets])  # type: ignore[misc]
    return DocumentSet.from_lengths(
        [doc_id for s in sets for doc_id in s.doc_ids],
        np.concatenate([s.tokens for s in sets]),
        np.concatenate([np.diff(s.sentence_offsets) for s in sets]),
        np.concatenate([np.diff(s.doc_sentences) for s in sets]),
        starts,
    )


def tokenize_files(
    batch: pa.Table,
    *,
    files: dict[str, tuple[int, str, str]],
    tokenizer: Any,
    fingerprint: str,
    filesystem: pafs.FileSystem,
    buckets: str,
    num_shards: int,
    word_starts: bool,
    corpus_config: CorpusConfig,
) -> pa.Table:
    """Pass 1 for a batch of input files (`read_binary_files` rows: `bytes`, `path`).

    `files` maps the path Ray Data reports to (file index, name, location). The buckets go under
    `buckets` in `filesystem` (the driver's, shipped as it is: a worker's environment need not know
    the store), named by the batch's first file index. Returns one row per file (`result`: JSON of its
    fingerprint and counts, and the input error met, if any: the batch stops at a file that
    raises it).
    """
    tok = _worker_tokenizer(tokenizer, fingerprint)
    paths = batch.column("path").to_pylist()
    order = sorted(range(len(paths)), key=lambda k: files[paths[k]][0])
    data = batch.column("bytes")
    writer = _BucketWriter(filesystem, buckets, files[paths[order[0]]][0], num_shards, word_starts)
    results = []
    for k in order:
        file_index, name, location = files[paths[k]]
        raw = data[k].as_py()
        result = _tokenize_file(InputFile(location, name), file_index, raw, tok, writer, word_starts, corpus_config)
        results.append(json.dumps({"file_index": file_index, **result}))
        del raw
        if result["error"]:
            break
    writer.close()
    return pa.table({"result": pa.array(results, pa.string())})


def _tokenize_file(
    file: InputFile, file_index: int, data: bytes, tok: Any, writer: _BucketWriter, word_starts: bool,
    corpus_config: CorpusConfig,
) -> dict[str, Any]:
    """One input file's documents, tokenized, into `writer`; returns its fingerprint and counts."""
    stats = ReadStats()
    counts = {"tokens": 0, "tokenized_documents": 0, "documents_without_tokens": 0}

    def encode(batch: list[tuple[str, tuple[str, ...]]]) -> None:
        docs, without_tokens = encode_documents(tok, batch, word_starts)
        counts["documents_without_tokens"] += without_tokens
        counts["tokens"] += len(docs.tokens)
        counts["tokenized_documents"] += len(docs)
        ordinals = np.array([int(d.rsplit(":", 1)[1]) for d in docs.doc_ids], dtype=np.int64)
        writer.add(docs, (np.int64(file_index) << 32) | ordinals)

    batch: list[tuple[str, tuple[str, ...]]] = []
    batch_chars = 0
    error = ""
    try:
        for doc in read_documents(file, stats, corpus_config, data=data):
            batch.append((doc.doc_id, doc.sentences))
            batch_chars += sum(map(len, doc.sentences))
            if batch_chars >= _ENCODE_BATCH_CHARS:
                encode(batch)
                batch, batch_chars = [], 0
    except InputError as exc:  # reported by the driver as it is: Ray would wrap it beyond recognition
        error = str(exc)
    if batch:
        encode(batch)
    return {
        "name": file.name,
        "path": str(file.path),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "error": error,
        **stats.as_dict(),
        **counts,
    }


# ---------------------------------------------------------------------------------------------
# pass 2: one shard's buckets -> its examples in part-<shard>.parquet


def read_bucket_documents(fs: pafs.FileSystem, paths: Sequence[str], word_starts: bool) -> DocumentSet:
    """The documents of bucket files as one set, in their canonical order (by `doc_key`).

    The order is that of the corpus alone (file index, then ordinal), not of the batches or
    workers that wrote the buckets.
    """
    doc_ids: list[str] = []
    keys, tokens, sentence_lengths, sentences_per_doc, starts = [], [], [], [], []
    for path in paths:
        table = pq.read_table(path, filesystem=fs)
        doc_ids += table.column("doc_id").to_pylist()
        keys.append(table.column("doc_key").to_numpy())
        tokens.append(table.column("tokens").combine_chunks().flatten().to_numpy())
        column = table.column("sentence_lengths").combine_chunks()
        sentence_lengths.append(column.flatten().to_numpy())
        sentences_per_doc.append(column.value_lengths().to_numpy())
        if word_starts:
            starts.append(table.column("word_starts").combine_chunks().flatten().to_numpy(zero_copy_only=False))
    if not doc_ids:
        return DocumentSet.from_lengths([], np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64),
                                        np.zeros(0, bool) if word_starts else None)
    docs = DocumentSet.from_lengths(
        doc_ids,
        np.concatenate(tokens),
        np.concatenate(sentence_lengths),
        np.concatenate(sentences_per_doc),
        np.concatenate(starts) if word_starts else None,
    )
    order = np.argsort(np.concatenate(keys), kind="stable")
    return docs if (np.diff(order) > 0).all() else _select(docs, order)


def _examples_table(batch: ExampleBatch, doc_ids: pa.Array, schema: pa.Schema) -> pa.Table:
    """A batch as an Arrow table of the part schema, straight from its flat arrays."""
    lengths = batch.lengths
    predictions = np.diff(batch.mask_offsets)
    columns: dict[str, pa.Array] = {
        "input_ids": _list_array(batch.input_ids, lengths, pa.int32()),
        "token_type_ids": _list_array(batch.token_type_ids, lengths, pa.int8()),
        "masked_lm_positions": _list_array(batch.masked_lm_positions, predictions, pa.int32()),
        "masked_lm_ids": _list_array(batch.masked_lm_ids, predictions, pa.int32()),
        "next_sentence_label": pa.array(batch.next_sentence_label, pa.int8()),
        "length": pa.array(lengths.astype(np.int32), pa.int32()),
    }
    if "word_starts" in schema.names:
        assert batch.word_starts is not None
        columns["word_starts"] = _list_array(batch.word_starts, lengths, pa.bool_())
    columns |= {
        "a_doc_id": doc_ids.take(pa.array(batch.a_doc)),
        "a_sentence_start": pa.array(batch.a_sentence_start.astype(np.int32), pa.int32()),
        "a_sentence_end": pa.array(batch.a_sentence_end.astype(np.int32), pa.int32()),
        "b_doc_id": doc_ids.take(pa.array(batch.b_doc)),
        "b_sentence_start": pa.array(batch.b_sentence_start.astype(np.int32), pa.int32()),
        "b_sentence_end": pa.array(batch.b_sentence_end.astype(np.int32), pa.int32()),
    }
    return pa.table(columns, schema=schema)


class _ShardStats:
    """Counts over one shard's examples, for the manifest."""

    def __init__(self, config: PretrainingDataConfig, special: SpecialTokens) -> None:
        self.special = special
        self.counts = dict.fromkeys(
            ("examples", "example_tokens", "predictable_tokens", "masked", "masked_mask", "masked_random",
             "masked_keep", "random_next"),
            0,
        )
        self.length_counts = np.zeros(config.max_seq_length + 1, dtype=np.int64)

    def add(self, batch: ExampleBatch) -> None:
        c = self.counts
        lengths = batch.lengths
        c["examples"] += len(batch)
        c["example_tokens"] += int(lengths.sum())
        c["random_next"] += int((batch.next_sentence_label == 1).sum())  # NSP off: every label is NO_NSP_LABEL
        self.length_counts += np.bincount(lengths, minlength=len(self.length_counts))
        row = np.repeat(np.arange(len(batch)), np.diff(batch.mask_offsets))
        got = batch.input_ids[batch.row_offsets[:-1][row] + batch.masked_lm_positions]
        is_mask = got == self.special.mask_id
        is_keep = got == batch.masked_lm_ids
        # the tokens that could be masked: non-special now, or non-special before being masked
        c["predictable_tokens"] += int((~self.special.is_special[batch.input_ids]).sum() + is_mask.sum())
        c["masked"] += len(got)
        c["masked_mask"] += int(is_mask.sum())
        c["masked_keep"] += int(is_keep.sum())
        c["masked_random"] += int((~is_mask & ~is_keep).sum())


def build_parts(
    batch: pa.Table, *, filesystem: pafs.FileSystem, buckets: str, parts: str, out: str,
    config: PretrainingDataConfig, special: SpecialTokens
) -> pa.Table:
    """Pass 2 for a batch of shards (`shard` column): each one's part file, and its row (JSON) for the manifest.

    Paths are inside `filesystem`. Each shard's row is also written to `<parts>/<part>.json` once
    its part file is in place, so a resumed build skips the shards already built.
    """
    rows = []
    for shard in batch.column("shard").to_pylist():
        row = build_shard(int(shard), filesystem, buckets=buckets, out=out, config=config, special=special)
        rows.append(json.dumps(row))
        _write_whole(filesystem, f"{parts}/{row['part']}.json", rows[-1].encode("utf-8"))
    return pa.table({"result": pa.array(rows, pa.string())})


def build_shard(
    shard: int, fs: pafs.FileSystem, *, buckets: str, out: str, config: PretrainingDataConfig, special: SpecialTokens
) -> dict[str, Any]:
    """One shard: read its buckets, create its examples, write its part file (complete or not at all)."""
    found = fs.get_file_info(pafs.FileSelector(f"{buckets}/{shard:05d}", allow_not_found=True))
    paths = sorted(f.path for f in found if f.path.endswith(".parquet"))
    docs = read_bucket_documents(fs, paths, config.whole_word_masking)
    doc_ids = pa.array(docs.doc_ids, pa.string())
    rng = np.random.default_rng([config.seed, shard])
    schema = example_schema(config.whole_word_masking)
    name = f"part-{shard:05d}.parquet"
    stats = _ShardStats(config, special)
    is_local = isinstance(fs, pafs.LocalFileSystem)
    spool = None if is_local else tempfile.mkdtemp(prefix="bertflow-part-")
    local = Path(out if is_local else spool) / f".{name}.tmp"
    try:
        with pq.ParquetWriter(local, schema, **PARQUET_OPTIONS) as writer:
            for batch in create_example_batches(docs, config, special, rng, batch_rows=ROW_GROUP_ROWS):
                stats.add(batch)
                writer.write_table(_examples_table(batch, doc_ids, schema), row_group_size=ROW_GROUP_ROWS)
            if stats.counts["examples"] == 0:
                writer.write_table(schema.empty_table())
        size, digest = local.stat().st_size, sha256_file(local)
        _publish(local, fs, f"{out}/{name}")
    finally:
        if spool:
            shutil.rmtree(spool, ignore_errors=True)
    return {
        "shard": shard,
        "part": name,
        "bytes": size,
        "sha256": digest,
        "documents": len(docs),
        "sentences": len(docs.sentence_offsets) - 1,
        "tokens": len(docs.tokens),
        **stats.counts,
        "length_counts": stats.length_counts.tolist(),
    }


def _publish(local: Path, fs: pafs.FileSystem, path: str) -> None:
    """Put a finished local file at `path`: a rename beside it, or one upload (S3 shows it only complete)."""
    if isinstance(fs, pafs.LocalFileSystem):
        os.replace(local, path)
        return
    pafs.copy_files(str(local), path, source_filesystem=storage.LOCAL, destination_filesystem=fs,
                    chunk_size=8 << 20, use_threads=False)


def _write_whole(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """A small file that is there whole or not at all: a renamed temporary, or one PUT."""
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(os.path.dirname(path), recursive=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path, compression=None) as f:
        f.write(data)
