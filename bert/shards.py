"""The shards dir as its readers see it (DESIGN.md, "Shards dir"): typed manifest, verified parts, streams.

    <shards dir>/
        part-00000.parquet ...  examples (columns: `example_schema`), written once
        tokenizer/              the tokenizer the examples were built with
        _manifest.json          config, tokenizer identity, inputs, counts, statistics (written last)

`ShardsManifest.read` parses `_manifest.json` once into typed fields; every consumer (the
pretraining job, `bertflow shards inspect`, the pipeline) uses it instead of reading the JSON
itself. `ShardSet.open` also checks every part file against the manifest (parquet footer
readable, row count as recorded), naming the file that is truncated, missing or foreign.
`WorkerStream` is one rank's endless, seeded, resumable stream of rows. Building shards is
`pipelines/jobs/shards.py`'s business; this module only reads them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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

    dir: Path
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

    path: Path  # the shards dir
    data: PretrainingDataConfig  # how the examples were made (sequence length, masking, ...)
    tokenizer: TokenizerInfo
    parts: tuple[PartInfo, ...]
    counts: Mapping[str, int]  # files, documents, sentences, tokens, examples, example_tokens
    statistics: Mapping[str, Any]
    skipped: Mapping[str, int]
    raw: Mapping[str, Any] = field(repr=False, compare=False)

    @classmethod
    def read(cls, shards_dir: str | Path, what: str = "shards") -> ShardsManifest:
        """The manifest of a finished shards dir; `InputError` naming the dir if it is not one."""
        path = Path(shards_dir)
        if not path.is_dir():
            raise InputError(f"{what} dir {path} does not exist")
        file = path / MANIFEST
        if not file.is_file():
            raise InputError(f"not a finished shards dir (no {MANIFEST}): {path}")
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
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
                path=path.resolve(),
                data=PretrainingDataConfig(**raw["config"]),
                tokenizer=TokenizerInfo(
                    dir=path.resolve() / tok.get("dir", TOKENIZER_DIR),
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


# ----------------------------------------------------------------------------- verified parts


def verify_part(path: Path, part: PartInfo) -> None:
    """The part file exists, has a readable parquet footer, and holds the rows the manifest records."""
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


@dataclass(frozen=True)
class ShardSet:
    """A finished shards dir with every part file checked against its manifest."""

    manifest: ShardsManifest

    @classmethod
    def open(cls, path: str | Path, what: str = "shards") -> ShardSet:
        manifest = ShardsManifest.read(path, what)
        for part in manifest.parts:
            verify_part(manifest.path / part.name, part)
        listed = {p.name for p in manifest.parts}
        strays = sorted(p.name for p in manifest.path.glob("part-*.parquet") if p.name not in listed)
        if strays:
            raise InputError(f"{what} dir {manifest.path}: part files not listed in {MANIFEST}: {', '.join(strays)}")
        if not manifest.parts:
            raise InputError(f"{what} dir {manifest.path} has no part-*.parquet files")
        if sum(p.examples for p in manifest.parts) == 0:
            raise InputError(f"{what} dir {manifest.path} holds no examples (all part files are empty)")
        return cls(manifest)

    @property
    def path(self) -> Path:
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


def _rows_of(table: pa.Table) -> list[dict[str, Any]]:
    columns = table.to_pydict()
    n = table.num_rows
    return [{k: v[i] for k, v in columns.items()} for i in range(n)]


def read_rows(shards: ShardSet, limit: int) -> list[dict[str, Any]]:
    """The first `limit` rows of a shard set, in file order (deterministic)."""
    rows: list[dict[str, Any]] = []
    for name in shards.files:
        rows.extend(_rows_of(pq.read_table(shards.path / name)))
        if len(rows) >= limit:
            break
    return rows[:limit]


class WorkerStream:
    """The rows of one rank, epoch after epoch, in a seeded order; resumable at any sample.

    Rank r reads the part files `files[r::world]`; every epoch visits them in an order drawn from
    (seed, rank, epoch) and the rows of each file in an order drawn from (seed, rank, epoch, file).
    The position in the stream is one number, the samples consumed, so resuming needs nothing else.
    """

    def __init__(self, shards: ShardSet, rank: int, world_size: int, seed: int):
        self.shards = shards
        self.files = list(shards.files[rank::world_size])
        self.rows = list(shards.rows[rank::world_size])
        self.rank, self.seed = rank, seed
        self.epoch_size = sum(self.rows)
        if self.epoch_size == 0:
            raise InputError(f"rank {rank}: its part files of {shards.path} hold no examples")

    def _epoch_order(self, epoch: int) -> list[int]:
        rng = np.random.default_rng([self.seed, self.rank, epoch])
        return list(rng.permutation(len(self.files)))

    def batches(self, batch_size: int, start: int) -> Iterator[list[dict[str, Any]]]:
        """Yield lists of `batch_size` row dicts, starting at sample `start` of this rank's stream."""
        epoch, offset = divmod(start, self.epoch_size)
        pending: list[dict[str, Any]] = []
        while True:
            for file_index in self._epoch_order(epoch):
                n = self.rows[file_index]
                if offset >= n:
                    offset -= n
                    continue
                table = pq.read_table(self.shards.path / self.files[file_index])
                order = np.random.default_rng([self.seed, self.rank, epoch, int(file_index)]).permutation(n)
                columns = table.to_pydict()
                for i in order[offset:]:
                    pending.append({k: v[i] for k, v in columns.items()})
                    if len(pending) == batch_size:
                        yield pending
                        pending = []
                offset = 0
            epoch += 1
