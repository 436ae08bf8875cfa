"""The shards dir as its readers see it (DESIGN.md, "Shards dir"): typed manifest, verified parts, streams.

    <shards dir>/
        part-00000.parquet ...  examples (columns: `example_schema`), written once
        tokenizer/              the tokenizer the examples were built with
        _manifest.json          config, tokenizer identity, inputs, counts, statistics (written last)

`ShardsManifest.read` parses `_manifest.json` once into typed fields; every consumer (the
pretraining job, `bertflow shards inspect`, the pipeline) uses it instead of reading the JSON
itself. `ShardSet.open` also checks every part file against the manifest (parquet footer
readable, row count as recorded), naming the file that is truncated, missing or foreign.
The order in which training reads the rows is `bert/example_order.py`'s (one global order, split
across ranks). Building shards is `pipelines/jobs/shards.py`'s business; this module only reads them.

A shards dir may be local or on an object store (`s3://...`, through `bert/storage.py`). Remote
part files are read through a `PartCache`: a local directory of downloaded parts, named by the
sha256 the manifest records (so a cached file is never confused with another part, and every
download is checked against the manifest before use), capped in bytes with least-recently-used
eviction, and filled ahead of the reader: while a rank reads one part, the next part of its
stream downloads in a background thread. The rows, their order and the resume position are
those of the same shards on local disk.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import shutil
import threading
import uuid
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bert import storage
from bert.errors import InputError
from bert.pretraining_data import PretrainingDataConfig

MANIFEST = "_manifest.json"
TOKENIZER_DIR = "tokenizer"
FORMAT = "bertflow-shards/1"


def example_schema(whole_word_masking: bool) -> pa.Schema:
    """The part files' schema; `word_starts` only with whole-word masking (for dynamic WWM)."""
    fields = [
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("token_type_ids", pa.list_(pa.int8())),
        pa.field("masked_lm_positions", pa.list_(pa.int32())),
        pa.field("masked_lm_ids", pa.list_(pa.int32())),
        pa.field("next_sentence_label", pa.int8()),
        pa.field("length", pa.int32()),
    ]
    if whole_word_masking:
        fields.append(pa.field("word_starts", pa.list_(pa.bool_())))
    fields += [  # provenance, for auditing: the documents and sentence ranges A and B come from
        pa.field("a_doc_id", pa.string()),
        pa.field("a_sentence_start", pa.int32()),
        pa.field("a_sentence_end", pa.int32()),
        pa.field("b_doc_id", pa.string()),
        pa.field("b_sentence_start", pa.int32()),
        pa.field("b_sentence_end", pa.int32()),
    ]
    return pa.schema(fields)


# ----------------------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class TokenizerInfo:
    """The tokenizer a shards dir was built with."""

    dir: Path | str  # a URI when the shards are on an object store (storage.download it to load)
    vocab_size: int
    fingerprint: str  # `Tokenizer.fingerprint()`: sha256 of the vocabulary and special ids
    special_ids: Mapping[str, int]


@dataclass(frozen=True)
class PartInfo:
    name: str  # part-00000.parquet
    examples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardsManifest:
    """`_manifest.json` of a finished shards dir, parsed once."""

    path: Path | str  # the shards dir: an absolute Path, or a URI ("s3://bucket/shards")
    data: PretrainingDataConfig  # how the examples were made (sequence length, masking, ...)
    tokenizer: TokenizerInfo
    parts: tuple[PartInfo, ...]
    counts: Mapping[str, int]  # files, documents, sentences, tokens, examples, example_tokens
    statistics: Mapping[str, Any]
    skipped: Mapping[str, int]
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def read(cls, shards_dir: storage.Location, what: str = "shards") -> ShardsManifest:
        """The manifest of a finished shards dir; `InputError` naming the dir if it is not one."""
        local = storage.local_path(shards_dir)
        path: Path | str = local.resolve() if local is not None else os.fspath(shards_dir).rstrip("/")
        if not storage.is_dir(path):
            raise InputError(f"{what} dir {path} does not exist")
        file = storage.join(path, MANIFEST)
        if not storage.is_file(file):
            raise InputError(f"not a finished shards dir (no {MANIFEST}): {path}")
        try:
            raw = json.loads(storage.read_bytes(file).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{file}: unreadable manifest ({exc})") from None
        if raw.get("format") != FORMAT:
            raise InputError(f"{file}: format {raw.get('format')!r}, expected {FORMAT!r}")
        try:
            known = {f.name for f in dataclasses.fields(PretrainingDataConfig)}
            unknown = set(raw["config"]) - known
            if unknown:
                raise InputError(f"{file}: unknown config fields {sorted(unknown)} (built by a newer bertflow?)")
            tok = raw["tokenizer"]
            return cls(
                path=path,
                data=PretrainingDataConfig(**raw["config"]),
                tokenizer=TokenizerInfo(
                    dir=storage.join(path, tok.get("dir", TOKENIZER_DIR)),
                    vocab_size=int(tok["vocab_size"]),
                    fingerprint=str(tok["vocab_sha256"]),
                    special_ids=dict(tok.get("special_ids", {})),
                ),
                parts=tuple(PartInfo(p["part"], int(p["examples"]), int(p["bytes"]), str(p["sha256"])) for p in raw["parts"]),
                counts=dict(raw["counts"]),
                statistics=dict(raw.get("statistics", {})),
                skipped=dict(raw.get("skipped", {})),
                raw=raw,
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, InputError):
                raise
            raise InputError(f"{file}: malformed manifest ({type(exc).__name__}: {exc})") from None


# ----------------------------------------------------------------------------- remote parts on local disk

CACHE_DIR_ENV, CACHE_GB_ENV = "BERTFLOW_SHARD_CACHE", "BERTFLOW_SHARD_CACHE_GB"


class PartCache:
    """Remote part files on local disk: named by sha256, at most `max_bytes`, least recently used evicted.

    A part is downloaded once (to a temporary name, checked against the manifest's size and
    sha256, then renamed into place), so a truncated or overwritten object is named, never read.
    The part being returned and the one being read ahead are never evicted, so the cap may be
    exceeded by at most those two. Several processes may share the directory: recency is the
    file's mtime, and a part evicted by another process under a reader is downloaded again.
    """

    def __init__(self, directory: str | Path, max_bytes: int):
        self.directory, self.max_bytes = Path(directory), int(max_bytes)
        self._init_runtime()

    @classmethod
    def default(cls) -> PartCache:
        """$BERTFLOW_SHARD_CACHE (default ~/.cache/bertflow/shards), $BERTFLOW_SHARD_CACHE_GB (default 20)."""
        directory = os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "bertflow" / "shards"
        return cls(directory, int(float(os.environ.get(CACHE_GB_ENV, "20")) * 2**30))

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, Future] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-read-ahead")

    def __getstate__(self) -> dict[str, Any]:  # sent to Ray workers: no threads, no locks
        return {"directory": self.directory, "max_bytes": self.max_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def file(self, part: PartInfo) -> Path:
        return self.directory / f"{part.sha256}.parquet"

    def prefetch(self, location: str, part: PartInfo) -> None:
        with self._lock:
            if part.sha256 not in self._pending and not self.file(part).is_file():
                self._pending[part.sha256] = self._pool.submit(self._fetch, location, part)

    def local(self, location: str, part: PartInfo) -> Path:
        """The verified local copy of a part: from the cache, the read-ahead, or downloaded now."""
        with self._lock:
            pending = self._pending.pop(part.sha256, None)
        path = pending.result() if pending is not None else self.file(part)
        if not path.is_file():
            path = self._fetch(location, part)
        os.utime(path)  # most recently used
        return path

    def local_dir(self, location: str, key: str) -> Path:
        """A small remote directory (a tokenizer) downloaded once to `<cache>/<key>/`; never evicted."""
        final = self.directory / key
        if not final.is_dir():
            tmp = self.directory / f".{key}.tmp-{uuid.uuid4().hex[:12]}"
            try:
                storage.download(location, tmp)
                os.replace(tmp, final)
            except OSError:  # another process put it there first
                if not final.is_dir():
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    def read_table(self, location: str, part: PartInfo) -> pa.Table:
        try:
            return pq.read_table(self.local(location, part))
        except FileNotFoundError:  # evicted by another process between the two lines above
            return pq.read_table(self._fetch(location, part))

    def _fetch(self, location: str, part: PartInfo) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{part.sha256}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            storage.download(location, tmp)
            size, digest = tmp.stat().st_size, _sha256(tmp)
            if size != part.bytes or digest != part.sha256:
                raise InputError(f"{location}: {size:,} bytes with sha256 {digest[:12]}..., {MANIFEST} records "
                                 f"{part.bytes:,} bytes, {part.sha256[:12]}...: truncated or overwritten; rebuild the shards")
            os.replace(tmp, self.file(part))
        finally:
            tmp.unlink(missing_ok=True)
        self._evict(keep={self.file(part)})
        return self.file(part)

    def _evict(self, keep: set[Path]) -> None:
        with self._lock:
            keep = keep | {self.directory / f"{sha}.parquet" for sha in self._pending}
        files = []
        for path in self.directory.glob("*.parquet"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            files.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.max_bytes:
                break
            if path not in keep:
                path.unlink(missing_ok=True)
                total -= size


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- verified parts


def verify_part(path: Path, part: PartInfo) -> None:
    """The local part file exists, has a readable parquet footer, and holds the rows the manifest records."""
    if not path.is_file():
        raise InputError(f"{path}: part file listed in {MANIFEST} is missing; rebuild the shards")
    size = path.stat().st_size
    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: not a readable parquet file ({size:,} bytes, {part.bytes:,} recorded in "
                         f"{MANIFEST}; {exc}): truncated or overwritten; rebuild the shards") from None
    if rows != part.examples:
        raise InputError(f"{path}: holds {rows} rows, {MANIFEST} records {part.examples}; rebuild the shards")
    if size != part.bytes:
        raise InputError(f"{path}: {size:,} bytes, {MANIFEST} records {part.bytes:,}; rebuild the shards")


def verify_remote_parts(shards_dir: str, parts: tuple[PartInfo, ...], sizes: Mapping[str, int]) -> None:
    """Every remote part object exists with the size the manifest records (one listing, no download).

    Content is checked when a part is downloaded: its sha256 against the manifest (`PartCache`).
    """
    for part in parts:
        location = storage.join(shards_dir, part.name)
        if part.name not in sizes:
            raise InputError(f"{location}: part file listed in {MANIFEST} is missing; rebuild the shards")
        if sizes[part.name] != part.bytes:
            raise InputError(f"{location}: {sizes[part.name]:,} bytes, {MANIFEST} records {part.bytes:,}: "
                             "truncated or overwritten; rebuild the shards")


@dataclass(frozen=True)
class ShardSet:
    """A finished shards dir with every part file checked against its manifest.

    `read_part` reads a part as a table: straight from local disk, or for remote shards through
    `cache` (downloaded once, verified, evicted least-recently-used); `prefetch` starts the
    download of a part the reader will need next.
    """

    manifest: ShardsManifest
    cache: PartCache | None = field(default=None, repr=False, compare=False)

    @classmethod
    def open(cls, path: storage.Location, what: str = "shards", cache: PartCache | None = None) -> ShardSet:
        manifest = ShardsManifest.read(path, what)
        remote = storage.is_remote(manifest.path)
        if remote:
            sizes = {name: size for name, size in storage.walk_files(manifest.path) if "/" not in name}
            verify_remote_parts(str(manifest.path), manifest.parts, sizes)
            present = sizes.keys()
        else:
            for part in manifest.parts:
                verify_part(Path(manifest.path) / part.name, part)
            present = storage.list_dir(manifest.path)
        listed = {p.name for p in manifest.parts}
        strays = sorted(n for n in present if fnmatch.fnmatch(n, "part-*.parquet") and n not in listed)
        if strays:
            raise InputError(f"{what} dir {manifest.path}: part files not listed in {MANIFEST}: {', '.join(strays)}")
        if not manifest.parts:
            raise InputError(f"{what} dir {manifest.path} has no part-*.parquet files")
        if sum(p.examples for p in manifest.parts) == 0:
            raise InputError(f"{what} dir {manifest.path} holds no examples (all part files are empty)")
        return cls(manifest, (cache or PartCache.default()) if remote else None)

    @property
    def path(self) -> Path | str:
        return self.manifest.path

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.manifest.parts)

    @property
    def rows(self) -> tuple[int, ...]:
        return tuple(p.examples for p in self.manifest.parts)

    @property
    def data(self) -> PretrainingDataConfig:
        return self.manifest.data

    @property
    def tokenizer(self) -> TokenizerInfo:
        return self.manifest.tokenizer

    def tokenizer_dir(self) -> Path:
        """A local dir holding the tokenizer the shards were built with (`Tokenizer.load` it).

        For remote shards it is downloaded once into the cache, keyed by its fingerprint.
        """
        if self.cache is None:
            return Path(self.tokenizer.dir)
        return self.cache.local_dir(str(self.tokenizer.dir), f"tokenizer-{self.tokenizer.fingerprint}")

    def part_location(self, name: str) -> Path | str:
        return storage.join(self.manifest.path, name)

    def _part(self, name: str) -> PartInfo:
        return next(p for p in self.manifest.parts if p.name == name)

    def read_part(self, name: str) -> pa.Table:
        """The rows of one part file, as a table."""
        if self.cache is None:
            return pq.read_table(self.part_location(name))
        return self.cache.read_table(str(self.part_location(name)), self._part(name))

    def prefetch(self, name: str) -> None:
        """Start downloading a remote part in the background (nothing to do for local shards)."""
        if self.cache is not None:
            self.cache.prefetch(str(self.part_location(name)), self._part(name))


def _rows_of(table: pa.Table) -> list[dict[str, Any]]:
    columns = table.to_pydict()
    n = table.num_rows
    return [{k: v[i] for k, v in columns.items()} for i in range(n)]


def read_rows(shards: ShardSet, limit: int) -> list[dict[str, Any]]:
    """The first `limit` rows of a shard set, in file order (deterministic)."""
    rows: list[dict[str, Any]] = []
    for name in shards.files:
        rows.extend(_rows_of(shards.read_part(name)))
        if len(rows) >= limit:
            break
    return rows[:limit]
