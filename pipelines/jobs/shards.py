"""Shards stage: corpus files -> MLM/NSP examples in `part-*.parquet` (DESIGN.md, "Shards dir").

Two passes of Ray tasks (`_map_tasks`), neither holding more than a batch of one file or one shard:

1. **Tokenize** — one task per run of consecutive input files (`file_blocks`: a few runs per
   CPU, of about equal text size). A task reads each file's documents (`bert.corpus`),
   tokenizes their sentences about 1 MiB of text at a time
   (`bert.pretraining_documents.encode_documents`: ids only, no Python object per token) and
   appends each document to the bucket of its shard: `_buckets/<shard>/<first file index of
   the run>.parquet`, flat columns (the document's tokens, its sentence lengths). A
   document's shard is a blake2b hash of its `doc_id`, so it does not depend on which worker
   read it; runs instead of single files keep the number of bucket files near
   runs x shards, not files x shards.
2. **Build** — one task per shard. A task reads its buckets in the canonical order (by first
   file index, then document order within the run) into one `DocumentSet`, creates the examples
   with `bert.pretraining_data.create_example_batches` and a generator seeded from
   `(seed, shard)`, `ROW_GROUP_ROWS` at a time as flat arrays that become Arrow columns
   without a Python object per example, and writes `part-<shard>.parquet` under a temporary
   name, then renames it.

Every random draw of a shard comes from its own generator, and every input to it is read in
an order fixed by the corpus alone, so the same corpus, config and shard count give
byte-identical part files whatever the number of workers, CPUs or blocks.

Memory: pass 1 holds one batch of a file's documents and flushes its buckets every
`_BUCKET_FLUSH_TOKENS` tokens; pass 2 holds one shard's token ids (4 bytes a token, 5 with
whole-word masking), its sentence offsets (8 bytes a sentence), its pairs (44 bytes a pair)
and one row group of examples. The default shard count keeps a shard near
`SHARD_TEXT_BYTES` of text, so the peak memory of a build depends on the shard size and the
number of concurrent tasks, not on the corpus size.

The output obeys the output rule (`pipelines.outdir.atomic_output`): it must be new and
disjoint from the inputs, is locked while the build runs, is built in a temporary sibling and
renamed into place; a killed run's temporary is removed by the next. `_manifest.json` (config,
input fingerprints, counts, skips and the names of skipped files, statistics, tokenizer
identity) is written last. Bad input is refused with a message naming the file: before Ray
starts where a look at the files tells (all empty or binary), else after the tokenize pass
(a corrupt or truncated input, a corpus that yields no token).
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bert.corpus import (
    CorpusConfig,
    InputFile,
    ReadStats,
    expand_inputs,
    probe_file,
)
from bert.errors import InputError
from bert.fsutil import sha256_file, write_json_atomic
from bert.pretraining_data import (
    PretrainingDataConfig,
)
from bert.pretraining_masking import SpecialTokens
from bert.shards import FORMAT, MANIFEST, TOKENIZER_DIR, example_schema
from pipelines.jobs.shard_tasks import (
    build_shard,
    tokenize_block,
)

JOB = "shards build"  # the command, as the output rule names it
SHARD_TEXT_BYTES = 32 << 20  # default shard size: about 32 MiB of text (~7M tokens), ~250 MB to build
HISTOGRAM_BINS = 16
def text_bytes(file: InputFile) -> int:
    """A file's text size, estimated without reading it.

    A gzip file's size is taken from its trailer (the uncompressed size modulo 4 GiB); a
    parquet file's text is estimated at three times its size.
    """
    size = file.path.stat().st_size
    with open(file.path, "rb") as fh:
        magic = fh.read(2)
        if magic == b"\x1f\x8b" and size >= 18:
            fh.seek(-4, os.SEEK_END)
            size = max(size, struct.unpack("<I", fh.read(4))[0])
    return size * 3 if file.path.name.lower().endswith(".parquet") else size


def default_num_shards(files: Sequence[InputFile]) -> int:
    """One shard per `SHARD_TEXT_BYTES` of text, estimated from the files without reading them."""
    return max(1, math.ceil(sum(map(text_bytes, files)) / SHARD_TEXT_BYTES))


def file_blocks(sizes: Sequence[int], blocks: int) -> list[range]:
    """The file list cut into at most `blocks` contiguous runs of about equal text size (none empty)."""
    blocks = max(1, min(blocks, len(sizes)))
    total = sum(sizes) or 1
    runs: list[range] = []
    start, seen = 0, 0
    for i, size in enumerate(sizes):
        seen += size
        left = len(sizes) - i - 1  # files after this one
        if len(runs) < blocks - 1 and (seen * blocks >= total * (len(runs) + 1) or left == blocks - 1 - len(runs)):
            runs.append(range(start, i + 1))
            start = i + 1
    if start < len(sizes):
        runs.append(range(start, len(sizes)))
    return runs


def load_tokenizer(path: str | os.PathLike[str], lowercase: bool = True) -> Any:
    """A tokenizer dir (`Tokenizer.load`) or a BERT `vocab.txt` (WordPiece).

    A checkpoint dir is a tokenizer dir: ours carries its tokenizer's files, a Hugging Face BERT
    dir its `vocab.txt` and `tokenizer_config.json` (`do_lower_case`), so the shards take the
    checkpoint's vocabulary and casing from it (`lowercase` applies to a bare `vocab.txt` only).
    """
    from bert.tokenizer import Tokenizer

    path = Path(path)
    if not path.exists():
        raise InputError(f"tokenizer path does not exist: {path}")
    if path.is_dir():
        return Tokenizer.load(path)
    return Tokenizer.from_vocab_file(path, lowercase=lowercase)


def build_shards(
    corpus: Sequence[str | os.PathLike[str]],
    tokenizer: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: PretrainingDataConfig = PretrainingDataConfig(),
    corpus_config: CorpusConfig = CorpusConfig(),
    *,
    lowercase: bool = True,
    num_workers: int | None = None,
    read_blocks: int | None = None,
) -> dict[str, Any]:
    """Build the shards dir `out` from the corpus paths; returns the manifest.

    `num_workers` caps the concurrent Ray tasks of each pass (None: as many as Ray has CPUs)
    and `read_blocks` the number of runs of consecutive files the tokenize pass is cut into,
    one task each (None: four per Ray CPU, or one per `SHARD_TEXT_BYTES` of text if that is
    more); neither changes a byte of the output. `out` obeys the output rule (`pipelines.outdir`):
    it must not exist nor overlap an input, it is locked while the build runs, built in a
    temporary sibling and renamed into place; a killed run's temporaries are removed.

    Raises `InputError` before any work (Ray is not even started) for a missing corpus or
    tokenizer path, an existing or overlapping `out`, or a corpus whose files are all empty
    or binary; and, naming the file, for a corrupt or truncated input (unless
    `corpus_config.skip_unreadable`) or a corpus that yields no token at all.
    """
    from pipelines.outdir import atomic_output, check_disjoint, check_new_output
    from pipelines.ray_runtime import ensure_ray

    files = expand_inputs(corpus, corpus_config)
    tok = load_tokenizer(tokenizer, lowercase=lowercase)
    out = Path(out)
    inputs = [*corpus, tokenizer]
    check_disjoint(out, inputs, "output")
    check_new_output(out, JOB)
    _check_some_text(files)
    num_shards = config.num_shards or default_num_shards(files)
    config = dataclasses.replace(config, num_shards=num_shards)
    special = SpecialTokens.of(tok)

    with atomic_output(out, JOB, inputs=inputs) as tmp:
        ensure_ray()  # the caller's runtime if there is one, else RAY_ADDRESS's cluster or a local one
        tok.save(tmp / TOKENIZER_DIR)
        buckets = tmp / "_buckets"
        buckets.mkdir()
        file_rows = _run_tokenize_pass(files, tmp / TOKENIZER_DIR, buckets, config, corpus_config, num_workers, read_blocks)
        _check_tokenize_pass(file_rows)
        shard_rows = _run_build_pass(buckets, tmp, config, special, num_workers)
        shutil.rmtree(buckets)
        manifest = _manifest(config, corpus_config, tok, tmp / TOKENIZER_DIR, file_rows, shard_rows)
        write_json_atomic(tmp / MANIFEST, manifest)
    return manifest


def _check_some_text(files: Sequence[InputFile]) -> None:
    """Refuse, before any work, a corpus whose every file is empty or binary (a look at each file's head)."""
    kinds = [probe_file(f.path) for f in files]
    if all(k != "text" for k in kinds):
        raise InputError(
            f"no text in the corpus: {len(files)} file(s), all empty or binary ({_name_list(files, kinds)}); "
            "expected one-sentence-per-line text, WikiExtractor, JSONL or parquet files (.gz too)"
        )


def _name_list(files: Sequence[InputFile], kinds: Sequence[str], limit: int = 10) -> str:
    shown = [f"{f.path} ({k})" for f, k in zip(files, kinds)][:limit]
    return ", ".join(shown) + (f", and {len(files) - limit} more" if len(files) > limit else "")


def _check_tokenize_pass(file_rows: list[dict[str, Any]]) -> None:
    """Raise the first input error a tokenize task met, or refuse a corpus that gave no token."""
    for row in file_rows:
        if row.get("error"):
            raise InputError(row["error"])
    if sum(r["tokens"] for r in file_rows) == 0:
        raise InputError(
            f"no text in the corpus: {len(file_rows)} file(s) gave no token "
            f"({_name_list([InputFile(Path(r['path']), r['name']) for r in file_rows], [_why_empty(r) for r in file_rows])}); "
            "expected one-sentence-per-line text, WikiExtractor, JSONL or parquet files (.gz too)"
        )


def _why_empty(row: dict[str, Any]) -> str:
    reasons = [k for k in ("binary_files", "empty_files", "unreadable_files") if row.get(k)]
    if reasons:
        return reasons[0].removesuffix("_files")
    if row.get("bad_records"):
        return f"{row['bad_records']} bad records"
    return "no document with a token"


def skipped_files(manifest: dict[str, Any]) -> dict[str, list[str]]:
    """The input names a build skipped, by reason ("unreadable", "binary", "empty"), from its manifest."""
    return {k: list(v) for k, v in manifest.get("skipped_files", {}).items() if v}


def _map_tasks(fn: Any, items: Sequence[dict[str, Any]], num_workers: int | None, **kwargs: Any) -> list[Any]:
    """`fn(item, **kwargs)` for every item as Ray tasks of one CPU, at most `num_workers` (None: all CPUs) at a time.

    Plain tasks, not Ray Data: each task reads and writes its own files and returns a small
    dict, so Ray Data's executor, stats and autoscaling actors would add only their start-up
    (about 10 CPU seconds and as many wall seconds per build on 2 cores) and nothing else.
    """
    import ray

    task = ray.remote(num_cpus=1)(fn)
    limit = num_workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    shared = {k: ray.put(v) for k, v in kwargs.items()}
    pending: list[Any] = []
    results: list[Any] = []
    for item in items:
        if len(pending) >= limit:
            done, pending = ray.wait(pending, num_returns=1)
            results += ray.get(done)
        pending.append(task.remote(item, **shared))
    return results + ray.get(pending)


def _run_tokenize_pass(
    files: Sequence[InputFile],
    tokenizer_dir: Path,
    buckets: Path,
    config: PretrainingDataConfig,
    corpus_config: CorpusConfig,
    num_workers: int | None,
    read_blocks: int | None,
) -> list[dict[str, Any]]:
    import ray

    if read_blocks is None:  # a few tasks per CPU, and no more than one per shard's worth of text
        cpus = int(ray.cluster_resources().get("CPU", 1))
        read_blocks = max(4 * cpus, math.ceil(sum(map(text_bytes, files)) / SHARD_TEXT_BYTES))
    runs = file_blocks([text_bytes(f) for f in files], read_blocks)
    items = [{"files": [{"file_index": i, "path": str(files[i].path), "name": files[i].name} for i in run]}
             for run in runs]
    blocks = _map_tasks(tokenize_block, items, num_workers, tokenizer_dir=str(tokenizer_dir), buckets=str(buckets),
                        num_shards=config.num_shards, word_starts=config.whole_word_masking,
                        corpus_config=corpus_config)
    return sorted((file_row for block in blocks for file_row in block["files"]), key=lambda r: r["file_index"])


def _run_build_pass(
    buckets: Path, out: Path, config: PretrainingDataConfig, special: SpecialTokens, num_workers: int | None
) -> list[dict[str, Any]]:
    assert config.num_shards is not None
    rows = _map_tasks(build_shard, [{"shard": k} for k in range(config.num_shards)], num_workers,
                      buckets=str(buckets), out=str(out), config=config, special=special)
    return sorted(rows, key=lambda r: r["shard"])


# ---------------------------------------------------------------------------------------------
# the manifest


def _manifest(
    config: PretrainingDataConfig,
    corpus_config: CorpusConfig,
    tok: Any,
    tokenizer_dir: Path,
    file_rows: list[dict[str, Any]],
    shard_rows: list[dict[str, Any]],
) -> dict[str, Any]:
    def total(rows: list[dict[str, Any]], key: str) -> int:
        return int(sum(r[key] for r in rows))

    skip_keys = [f.name for f in dataclasses.fields(ReadStats) if f.name not in ("files", "documents", "sentences")]
    masked = total(shard_rows, "masked")
    examples = total(shard_rows, "examples")
    length_counts = np.sum([r["length_counts"] for r in shard_rows], axis=0)
    lengths = np.arange(len(length_counts))
    edges = np.linspace(0, config.max_seq_length, HISTOGRAM_BINS + 1)
    histogram = np.histogram(lengths, bins=edges, weights=length_counts)[0].astype(int).tolist()
    return {
        "format": FORMAT,
        "config": dataclasses.asdict(config),
        "corpus_config": dataclasses.asdict(corpus_config),
        "tokenizer": {
            "dir": TOKENIZER_DIR,
            "vocab_size": tok.vocab_size,
            "vocab_sha256": tok.fingerprint(),
            "files_sha256": {
                p.relative_to(tokenizer_dir).as_posix(): sha256_file(p)
                for p in sorted(tokenizer_dir.rglob("*"))
                if p.is_file()
            },
            "special_ids": {k: getattr(tok, k) for k in ("cls_id", "sep_id", "mask_id", "pad_id")},
        },
        "inputs": [{k: r[k] for k in ("name", "path", "bytes", "sha256")} for r in file_rows],
        "counts": {
            "files": len(file_rows),
            "documents": total(file_rows, "tokenized_documents"),
            "sentences": total(shard_rows, "sentences"),
            "tokens": total(file_rows, "tokens"),
            "examples": examples,
            "example_tokens": total(shard_rows, "example_tokens"),
        },
        "skipped": {k: total(file_rows, k) for k in [*skip_keys, "documents_without_tokens"]},
        "skipped_files": {
            kind: [r["name"] for r in file_rows if r[f"{kind}_files"]] for kind in ("unreadable", "binary", "empty")
        },
        "statistics": {
            "masked_fraction": masked / max(1, total(shard_rows, "predictable_tokens")),
            "masked_split": {
                k: total(shard_rows, f"masked_{k}") / max(1, masked) for k in ("mask", "random", "keep")
            },
            "next_sentence_random_fraction": (total(shard_rows, "random_next") / max(1, examples)
                                              if config.next_sentence_prediction else None),  # None: NSP off
            "mean_length": total(shard_rows, "example_tokens") / max(1, examples),
            "length_histogram": {"edges": edges.tolist(), "counts": histogram},
        },
        "parts": [
            {k: r[k] for k in ("part", "bytes", "sha256", "documents", "tokens", "examples")} for r in shard_rows
        ],
        "columns": example_schema(config.whole_word_masking).names,
    }
