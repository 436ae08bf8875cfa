"""Shards stage: corpus files -> MLM/NSP examples in `part-*.parquet` (DESIGN.md, "Shards dir"), on Ray Data.

Two Ray Data executions, neither holding more than a batch of files or one shard in a task:

1. **Tokenize** — `ray.data.read_binary_files` reads the input files (local paths or object-store
   URIs, through the `pyarrow.fs` file system `bert.storage.resolve` gives: one client for the
   reads, the writes and the listing) in blocks of `files_per_task` consecutive files, and
   `map_batches` runs `shard_tasks.tokenize_files` on each block on the CPU workers (Ray Data
   fuses the read into the same task, as both ask for the same CPUs and neither caps its
   concurrency, `_task_cpus`: no read runs ahead into the object store): decompress and parse
   each file (`bert.corpus`), tokenize its sentences about 1 MiB of text at a time
   (`bert.pretraining_documents.encode_documents`: ids only, no Python object per token) and
   append each document to the bucket of its shard, `<out>/_work/<attempt>/<shard>/<first file
   index>.parquet`, with its canonical key (file index, ordinal). A document's shard is a
   blake2b hash of its `doc_id`, so it does not depend on which worker read it.
2. **Build** — `ray.data.range(num_shards)` and `map_batches` running `shard_tasks.build_parts`,
   one shard a call: read the shard's buckets, order its documents by their keys (so neither
   the blocks nor the workers of pass 1 leave a trace), create the examples with
   `bert.pretraining_data.create_example_batches` and a generator seeded from `(seed, shard)`,
   `ROW_GROUP_ROWS` at a time as flat arrays that become Arrow columns, and write
   `part-<shard>.parquet` complete or not at all (a local rename, or one upload).

Every random draw of a shard comes from its own generator, and every input to it is put in an
order fixed by the corpus alone, so the same corpus, config and shard count give byte-identical
part files whatever the number of workers, CPUs or blocks, and whether the corpus and the output
are local or on an object store. The part files are written by our own `pq.ParquetWriter`, not
`Dataset.write_parquet`, because their names, row groups and bytes are part of that contract.

Memory: pass 1 holds one block of compressed files, one file's documents, and its pending
buckets up to `_BUCKET_FLUSH_TOKENS`; pass 2 holds one shard's token ids (4 bytes a token, 5
with whole-word masking), its sentence offsets, its pairs and one row group of examples. The
default shard count keeps a shard near `SHARD_TEXT_BYTES` of text, so the peak memory of a
build depends on the shard size and the number of concurrent tasks, not on the corpus size.
Ray Data streams pass 1 with backpressure; the blocks in its object store are file bytes only.

The output rule: `out` must be absent, or an unfinished run of this job with the same identity
(config, inputs' names and sizes, tokenizer), which the build resumes; anything else (a finished
shards dir, another job's output, files bertflow did not write) is refused before any work,
naming what it holds. The build runs through the job skeleton (`ShardsJob`, a RESUMABLE output of
`pipelines/jobs/skeleton.run_job`), so the claim is every job dir's (`pipelines.outdir.claim_dir`): one writer
at a time (a local `flock`, or on S3 `_lease.json` with a fencing generation), `_job.json`
written first; `_manifest.json` last, through the lease's fence: the output is complete only
when the manifest exists. A resumed run keeps pass 1 if it finished (`_work/tokenized.json` names its
attempt's buckets) and every part already built (`_work/parts/<part>.json`), and builds the rest
to the same bytes. Bad input is refused with a message naming the file, before Ray starts where
a look at the files tells (all empty or binary), else after the tokenize pass (a corrupt or
truncated input, a corpus that yields no token); the output is then removed. An interrupted
build (Ctrl-C) removes its output too unless pass 1 had finished, which a re-run reuses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import struct
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bert import storage
from bert.corpus import CorpusConfig, InputFile, ReadStats, expand_inputs, probe_file
from bert.errors import InputError
from bert.fsutil import sha256_file
from bert.pretraining_data import PretrainingDataConfig
from bert.pretraining_masking import SpecialTokens
from bert.shards import FORMAT, MANIFEST, TOKENIZER_DIR, example_schema
from pipelines.jobs.shard_tasks import build_parts, tokenize_files
from pipelines.jobs.skeleton import RESUMABLE, Claimed, Job, run_job

JOB = "shards build"  # the command, as the output rule names it
WORK = "_work"  # buckets and per-part rows while the build runs; removed when it is done
SHARD_TEXT_BYTES = 32 << 20  # default shard size: about 32 MiB of text (~7M tokens), ~250 MB to build
HISTOGRAM_BINS = 16


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """How a build runs (not what it computes: no byte of the output depends on these)."""

    num_workers: int | None = None  # concurrent Ray Data tasks; None: the machine's physical cores
    files_per_task: int | None = None  # input files per tokenize task (Ray Data block); None: from the corpus

    def __post_init__(self) -> None:
        for name in ("num_workers", "files_per_task"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"{name} must be >= 1 (or unset), got {value}")


def text_bytes(file: InputFile) -> int:
    """A file's text size, estimated without reading it.

    A gzip file's size is taken from its trailer (the uncompressed size modulo 4 GiB); a
    parquet file's text is estimated at three times its size.
    """
    fs, path = storage.resolve(file.path)
    with fs.open_input_file(path) as fh:
        size = fh.size()
        magic = fh.read(2)
        if magic == b"\x1f\x8b" and size >= 18:
            fh.seek(size - 4)
            size = max(size, struct.unpack("<I", fh.read(4))[0])
    return size * 3 if file.basename.lower().endswith(".parquet") else size


def default_num_shards(sizes: Sequence[int]) -> int:
    """One shard per `SHARD_TEXT_BYTES` of text."""
    return max(1, math.ceil(sum(sizes) / SHARD_TEXT_BYTES))


def default_files_per_task(sizes: Sequence[int], cpus: int) -> int:
    """Input files per tokenize task: a few tasks per CPU, and none above about a shard's worth of text.

    Fewer, larger tasks mean fewer bucket files (tasks x shards); more tasks keep every CPU busy to the end.
    """
    tasks = max(4 * cpus, math.ceil(sum(sizes) / SHARD_TEXT_BYTES))
    return max(1, math.ceil(len(sizes) / tasks))


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


@dataclasses.dataclass(frozen=True)
class ShardsBuild:
    """One `shards build`: its inputs, output and settings (what `build_shards` takes, as one value)."""

    corpus: tuple[str, ...]  # files or dirs, local or URIs
    tokenizer: str  # a tokenizer dir, a checkpoint dir or a BERT vocab.txt
    out: str
    data: PretrainingDataConfig = dataclasses.field(default_factory=PretrainingDataConfig)
    corpus_config: CorpusConfig = dataclasses.field(default_factory=CorpusConfig)
    lowercase: bool = True  # a bare vocab.txt only: a dir brings its own casing
    options: BuildOptions = dataclasses.field(default_factory=BuildOptions)


@dataclasses.dataclass(frozen=True)
class Checked:
    """What preflight found: the corpus files, their text sizes, the tokenizer, the settings with the shard count."""

    files: list[InputFile]
    sizes: list[int]
    tok: Any
    data: PretrainingDataConfig


class ShardsJob(Job[ShardsBuild]):
    """`run_job(ShardsJob(), build)`: the skeleton's steps for a shards build (`pipelines/jobs/skeleton.py`);
    a RESUMABLE output: the output rule of the module docstring."""

    name = JOB
    required = ("corpus", "tokenizer", "out")
    paths = ("out",)
    output = RESUMABLE
    out_flag = "output"
    logs = False

    def inputs(self, build: ShardsBuild) -> list[Any]:
        return [*build.corpus, build.tokenizer]

    def preflight(self, build: ShardsBuild) -> Checked:
        """Missing corpus or tokenizer paths, a corpus whose files are all empty or binary: before any work."""
        files = expand_inputs(build.corpus, build.corpus_config)
        tok = load_tokenizer(build.tokenizer, lowercase=build.lowercase)
        sizes = [text_bytes(f) for f in files]
        data = dataclasses.replace(build.data, num_shards=build.data.num_shards or default_num_shards(sizes))
        _check_some_text(files)
        return Checked(files, sizes, tok, data)

    def claim_identity(self, build: ShardsBuild, checked: Checked) -> dict[str, Any]:
        """What defines this build's output: a run with the same identity may resume it."""
        return {
            "config": dataclasses.asdict(checked.data),
            "corpus_config": dataclasses.asdict(build.corpus_config),
            "inputs": [[f.name, size] for f, size in zip(checked.files, checked.sizes)],
            "tokenizer_sha256": checked.tok.fingerprint(),
            "lowercase": getattr(checked.tok, "lowercase", None),
        }

    def run(self, claimed: Claimed[ShardsBuild], checked: Checked) -> dict[str, Any]:
        """Both passes (resuming what a killed run finished), then the manifest, last: the output is complete."""
        out = str(claimed.out)
        manifest = _build(checked, out, claimed.config)
        storage.remove(storage.join(out, WORK, "buckets"))
        claimed.lease.commit(storage.join(out, MANIFEST), manifest)  # last: the output is complete
        storage.remove(storage.join(out, WORK))
        return manifest

    def failed(self, claimed: Claimed[ShardsBuild], error: BaseException) -> None:
        """Remove the output if the build failed on bad input, or stopped before pass 1 finished (nothing to
        resume). A build killed outright cannot clean up: its re-run resumes or restarts it (module docstring)."""
        from pipelines.lease import clear_unfinished

        out = str(claimed.out)
        if storage.exists(storage.join(out, MANIFEST)):
            return  # complete: only the work dir's removal failed
        if isinstance(error, InputError) or not storage.exists(storage.join(out, WORK, "tokenized.json")):
            with contextlib.suppress(Exception):  # the error in hand is the one to report
                clear_unfinished(claimed.lease)
                if storage.local_path(out) is not None:
                    storage.remove(out)


def build_shards(
    corpus: Sequence[str | os.PathLike[str]],
    tokenizer: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: PretrainingDataConfig = PretrainingDataConfig(),
    corpus_config: CorpusConfig = CorpusConfig(),
    *,
    lowercase: bool = True,
    num_workers: int | None = None,
    files_per_task: int | None = None,
) -> dict[str, Any]:
    """Build the shards dir `out` (a local path or an object-store URI) from the corpus; returns the manifest.

    `num_workers` caps the concurrent Ray Data tasks (None: the physical cores of a one-machine
    runtime, else every Ray CPU) and `files_per_task` the input files a tokenize task reads
    (None: a few tasks per CPU); neither changes a byte of the output. `out` obeys the output
    rule of the module docstring.

    Raises `InputError` before any work (Ray is not even started) for a missing corpus or
    tokenizer path, an `out` that is neither new nor this build's unfinished run, an output
    overlapping an input, or a corpus whose files are all empty or binary; and, naming the
    file, for a corrupt or truncated input (unless `corpus_config.skip_unreadable`) or a
    corpus that yields no token at all.
    """
    build = ShardsBuild(tuple(os.fspath(c) for c in corpus), os.fspath(tokenizer), os.fspath(out), config,
                        corpus_config, lowercase, BuildOptions(num_workers, files_per_task))
    return run_job(ShardsJob(), build)


def _build(checked: Checked, out: str, build: ShardsBuild) -> dict[str, Any]:
    """Both passes into `out` (resuming what a killed run finished); returns the manifest."""
    files, sizes, tok, config = checked.files, checked.sizes, checked.tok, checked.data
    tokenizer_dir = _save_tokenizer(tok, out)
    work = storage.join(out, WORK)
    with _quiet_ray_data():
        start = time.monotonic()
        file_rows = _tokenized(work)
        if file_rows is None:
            buckets = str(storage.join(work, "buckets", uuid.uuid4().hex[:12]))  # this attempt's
            file_rows = _run_tokenize_pass(files, sizes, tok, buckets, config, build.corpus_config, build.options)
            _check_tokenize_pass(file_rows)
            storage.write_json(storage.join(work, "tokenized.json"), {"buckets": buckets, "files": file_rows})
            _say(f"tokenized {len(file_rows)} files, {sum(r['tokens'] for r in file_rows):,} tokens "
                 f"in {time.monotonic() - start:.0f} s")
        else:
            _say(f"resuming {out}: its tokenize pass is kept ({len(file_rows)} files)")
        _check_tokenize_pass(file_rows)
        buckets = storage.read_json(storage.join(work, "tokenized.json"))["buckets"]
        start = time.monotonic()
        shard_rows = _run_build_pass(buckets, work, out, config, SpecialTokens.of(tok), build.options)
        _say(f"built {len(shard_rows)} parts, {sum(r['examples'] for r in shard_rows):,} examples "
             f"in {time.monotonic() - start:.0f} s")
    return _manifest(config, build.corpus_config, tok, tokenizer_dir, file_rows, shard_rows)


def _say(message: str) -> None:
    print(f"[{JOB}] {message}", flush=True)


def _save_tokenizer(tok: Any, out: str) -> Path:
    """The tokenizer into `<out>/tokenizer`; returns a local copy of it (for the manifest's checksums)."""
    target = storage.join(out, TOKENIZER_DIR)
    if not storage.is_remote(out):
        return tok.save(target)
    local = Path(tempfile.mkdtemp(prefix="bertflow-tokenizer-")) / TOKENIZER_DIR
    tok.save(local)
    storage.upload_dir(local, target)
    return local


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
            f"({_name_list([InputFile(r['path'], r['name']) for r in file_rows], [_why_empty(r) for r in file_rows])}); "
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


# ---------------------------------------------------------------------------------------------
# the two passes on Ray Data


def default_num_workers() -> int:
    """Concurrent tasks: the physical cores when Ray runs on this machine alone, else every Ray CPU.

    A local runtime is given more logical CPUs than the machine has cores (Ray Data and Ray Train
    wait on each other otherwise); CPU-bound tasks beyond the cores only take turns.
    """
    import ray

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) == 1 and nodes[0].get("NodeID") == ray.get_runtime_context().get_node_id():
        return min(cpus, len(os.sched_getaffinity(0)))
    return cpus


def _task_cpus(workers: int) -> float:
    """CPUs per task so that about `workers` tasks run at once: Ray's CPUs / workers, at most the smallest
    node's CPUs (a task must fit on one node; then more than `workers` may run)."""
    import ray

    nodes = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU")]
    total = sum(nodes) or 1.0
    return round(min(total / workers, min(nodes, default=1.0)), 4)


@contextlib.contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """No progress bars or per-execution banners from Ray Data on the command's terminal (restored after)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.enable_auto_log_stats
    ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.enable_auto_log_stats = False, False, False
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.enable_auto_log_stats = saved


def _tokenized(work: str | Path) -> list[dict[str, Any]] | None:
    """The file rows of a finished pass 1 of an earlier attempt, or None."""
    marker = storage.join(work, "tokenized.json")
    return storage.read_json(marker)["files"] if storage.exists(marker) else None


def _stored_bytes_source(paths: list[str], fs: Any) -> Any:
    """`read_binary_files`' datasource (rows `bytes`, `path`), reading each file's bytes as stored.

    `read_binary_files` decompresses a `.gz` file by its name, with no way to say no (a
    `compression` of None means "infer"). The build needs the stored bytes: their sha256 is the
    input's fingerprint in the manifest, and `bert.corpus` tells gzip by its magic bytes and
    names a truncated file (keeping what precedes the fault with `--skip-unreadable`).
    """
    from ray.data._internal.datasource.binary_datasource import BinaryDatasource

    class StoredBytes(BinaryDatasource):
        def resolve_compression(self, path: str, open_args: dict[str, Any]) -> None:
            return None

    return StoredBytes(paths, filesystem=fs, include_paths=True)


def _run_tokenize_pass(files: Sequence[InputFile], sizes: Sequence[int], tok: Any, buckets: str,
                       config: PretrainingDataConfig, corpus_config: CorpusConfig,
                       options: BuildOptions) -> list[dict[str, Any]]:
    import ray

    workers = options.num_workers or default_num_workers()
    per_task = options.files_per_task or default_files_per_task(sizes, workers)
    fs, _ = storage.resolve(files[0].path)
    located = {storage.resolve(f.path)[1]: (i, f.name, os.fspath(f.path)) for i, f in enumerate(files)}
    if len({type(storage.resolve(f.path)[0]) for f in files}) > 1:
        raise InputError("the corpus mixes local files and object-store URIs: copy it to one place")
    # Read and tokenize fuse into one task (same resources, no concurrency cap of their own), so a task reads
    # the files it tokenizes: no read runs ahead into the object store (unfused, the reads of a 1B-token
    # corpus outran the tokenizer by 1.1 GB). The number of tasks at once comes from their CPUs.
    cpus = _task_cpus(workers)
    ds = ray.data.read_datasource(_stored_bytes_source(list(located), fs),
                                  override_num_blocks=math.ceil(len(files) / per_task),
                                  num_cpus=cpus)
    out_fs, buckets_path = storage.resolve(buckets)
    ds = ds.map_batches(tokenize_files, batch_size=None, batch_format="pyarrow", num_cpus=cpus,
                        fn_kwargs={"files": located, "tokenizer": tok, "fingerprint": tok.fingerprint(),
                                   "filesystem": out_fs, "buckets": buckets_path, "num_shards": config.num_shards,
                                   "word_starts": config.whole_word_masking, "corpus_config": corpus_config})
    rows = [json.loads(r["result"]) for r in ds.take_all()]
    return sorted(rows, key=lambda r: r["file_index"])


def _run_build_pass(buckets: str, work: str | Path, out: str, config: PretrainingDataConfig, special: SpecialTokens,
                    options: BuildOptions) -> list[dict[str, Any]]:
    import ray

    assert config.num_shards is not None
    done = {}
    parts_dir = storage.join(work, "parts")
    if storage.exists(parts_dir):  # a resumed build: the parts a killed run finished
        names = {n.removesuffix(".json") for n in storage.list_dir(parts_dir)}
        done = {row["shard"]: row for n in sorted(names) if storage.exists(storage.join(out, n))
                for row in [storage.read_json(storage.join(parts_dir, n + ".json"))]}
    todo = [k for k in range(config.num_shards) if k not in done]
    rows = list(done.values())
    if done:
        _say(f"{len(done)} of {config.num_shards} parts kept from the killed run")
    if todo:
        fs, out_path = storage.resolve(out)
        workers = options.num_workers or default_num_workers()
        ds = ray.data.from_items([{"shard": k} for k in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(build_parts, batch_size=1, batch_format="pyarrow",
                            compute=ray.data.TaskPoolStrategy(size=min(workers, len(todo))),
                            fn_kwargs={"filesystem": fs, "buckets": storage.resolve(buckets)[1],
                                       "parts": storage.resolve(parts_dir)[1], "out": out_path, "config": config,
                                       "special": special})
        rows += [json.loads(r["result"]) for r in ds.take_all()]
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
