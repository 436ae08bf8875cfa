"""The Ray Data side of `bertflow predict`: the input as a stream of row blocks, a model per actor, parts written.

    PredictInput   a `Datasource` reading one input file (JSONL, TSV, CSV or parquet; `.gz` for the text
                   forms) through the `pyarrow.fs` file system `bert.storage.resolve` gave the driver, so a
                   local path and an `s3://` URI are read alike, by the same client and credentials. One read
                   task streams the file and yields blocks of rows: `row` (0-based index of the data row),
                   `id` and the model's input fields. A line that does not parse, or a row without a column
                   the model reads, raises an `InputError` naming the file and its line.
    PredictBatch   the callable class of `map_batches`: one `Predictor` per actor, loaded once; each call
                   predicts one block (sorted by length inside, `batch_size` rows per forward pass) and
                   answers `row` and `line`, the output's JSON line.
    PartsSink      a `Datasink`: each block becomes `part-<its first row, 12 digits>.jsonl`, so the parts'
                   names sort in input order; a block whose rows are not consecutive is refused. The driver
                   gets every part's (name, first row, rows) back and checks that they tile 0..rows-1.

Input order is kept by Ray Data's `preserve_order` (blocks leave every operator in the order they
entered) and checked, not assumed: by the sink per block and by the driver over all parts.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from ray.data import Datasink, Datasource, ReadTask
from ray.data.block import BlockAccessor, BlockMetadata

from bert.errors import InputError

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".tsv": "tsv", ".csv": "csv", ".parquet": "parquet"}
READ_ROWS = 4096  # rows per table the read task yields (Ray Data joins them into blocks)
PART = "part-{:012d}.jsonl"


def input_format(name: str) -> str:
    """jsonl, tsv, csv or parquet, from the file name (`.gz` aside); anything else is TSV with a header, as before."""
    stem = name.lower().removesuffix(".gz")
    return FORMATS.get(stem[stem.rfind("."):] if "." in stem else "", "tsv")


# ----------------------------------------------------------------------------- rows of one file


def iter_rows(fs, path: str, label: str, fmt: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for every data row of the file: where is "<label>:<line>" ("<label>: row <n>" for parquet)."""
    if fmt == "parquet":
        yield from _parquet_rows(fs, path, label)
        return
    with _open_binary(fs, path, label) as f:
        lines = _decoded_lines(f, label)
        yield from _json_rows(lines, label) if fmt == "jsonl" else _delimited_rows(lines, label, fmt)


@contextlib.contextmanager
def _open_binary(fs, path: str, label: str) -> Iterator[io.BufferedReader]:
    try:
        raw = fs.open_input_stream(path, compression="gzip" if path.endswith(".gz") else None)
    except FileNotFoundError:
        raise InputError(f"{label}: file not found") from None
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{label}: cannot read: {' '.join(str(exc).split())[:300]}") from None
    with io.BufferedReader(raw, 1 << 20) as f:
        yield f


def _decoded_lines(f, label: str) -> Iterator[str]:
    """The file's lines as text, decoded one by one so that bytes that are not UTF-8 are named by line."""
    for line_no, raw in enumerate(f, start=1):
        try:
            yield raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{label}:{line_no}: not UTF-8 text ({exc.reason} at byte {exc.start} of the line)") \
                from None


def _json_rows(lines: Iterator[str], label: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{label}:{line_no}: not valid JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise InputError(f"{label}:{line_no}: expected a JSON object per line")
        yield f"{label}:{line_no}", row


def _delimited_rows(lines: Iterator[str], label: str, fmt: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """TSV as GLUE writes it (no quoting: a quote is text) or CSV (quoted fields); the first line names the columns."""
    reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else csv.reader(lines)
    kind = "tab-separated" if fmt == "tsv" else "comma-separated"
    try:
        header = next(reader, None)
        if header is None:
            raise InputError(f"{label}: empty file, expected a header line")
        for fields in reader:
            if not fields:
                continue
            if len(fields) != len(header):
                raise InputError(f"{label}:{reader.line_num}: expected {len(header)} {kind} fields "
                                 f"(as in the header), found {len(fields)}")
            yield f"{label}:{reader.line_num}", dict(zip(header, fields))
    except csv.Error as exc:
        raise InputError(f"{label}:{reader.line_num}: {exc}") from None


def _parquet_rows(fs, path: str, label: str) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    n = 0
    try:
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=READ_ROWS):
                for row in batch.to_pylist():
                    n += 1
                    yield f"{label}: row {n}", row
    except FileNotFoundError:
        raise InputError(f"{label}: file not found") from None
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{label}: not a readable parquet file (after row {n}): {' '.join(str(exc).split())[:300]}") \
            from None


# ----------------------------------------------------------------------------- rows -> model input


@dataclass(frozen=True)
class Columns:
    """Which input column feeds which model field: the task's inputs (`TaskSpec.inputs`, from its kind), each
    a tuple of alternatives (model field, input column, whether it is a list of strings); a row fills each
    input from the first alternative it has (a list: non-empty)."""

    inputs: tuple[tuple[tuple[str, str, bool], ...], ...]
    id_column: str | None

    @property
    def fields(self) -> tuple[tuple[str, str], ...]:
        """(model field, input column) for every field the model may read."""
        return tuple((field, column) for slot in self.inputs for field, column, _ in slot)

    def schema(self) -> pa.Schema:
        model = [pa.field(f, pa.list_(pa.string()) if is_list else pa.string())
                 for slot in self.inputs for f, _, is_list in slot]
        return pa.schema([pa.field("row", pa.int64()), pa.field("id", pa.string()), *model])

    def item(self, index: int, where: str, row: dict[str, Any]) -> dict[str, Any]:
        """The model's input for one row, with its index and id; an InputError naming `where` if a column is missing."""
        item: dict[str, Any] = {"row": index, "id": None}
        if self.id_column and row.get(self.id_column) is not None:
            item["id"] = str(row[self.id_column])
        for slot in self.inputs:
            item |= {field: None for field, _, _ in slot}
            found = next(((f, c, is_list) for f, c, is_list in slot if _present(row.get(c), is_list)), None)
            if found is None and len(slot) == 1:
                (field, column, _), = slot
                raise InputError(f"{where}: no {column!r} column (the model reads {field!r} from it); "
                                 f"columns found: {sorted(row)}")
            if found is None:
                wanted = " or ".join(f"a {c!r} {'list' if is_list else 'column'}" for _, c, is_list in slot)
                raise InputError(f"{where}: needs {wanted}; columns found: {sorted(row)}")
            field, column, is_list = found
            item[field] = [str(w) for w in row[column]] if is_list else str(row[column])
        return item


def _present(value: Any, is_list: bool) -> bool:
    """A list input takes a non-empty list; any other input any value but null."""
    return isinstance(value, list) and len(value) > 0 if is_list else value is not None


class PredictInput(Datasource):
    """The rows of one input file as Ray Data blocks (see the module docstring)."""

    def __init__(self, fs, path: str, label: str, columns: Columns):
        super().__init__()
        self.fs, self.path, self.label, self.columns = fs, path, label, columns

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        fs, path, label, columns = self.fs, self.path, self.label, self.columns
        meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=[label], exec_stats=None)
        return [ReadTask(lambda: read_blocks(fs, path, label, columns), meta, schema=columns.schema())]

    def get_name(self) -> str:
        return "PredictInput"


def read_blocks(fs, path: str, label: str, columns: Columns) -> Iterator[pa.Table]:
    """The read task: the file's rows as model inputs, `READ_ROWS` to a table."""
    schema, items = columns.schema(), []
    for index, (where, row) in enumerate(iter_rows(fs, path, label, input_format(label))):
        items.append(columns.item(index, where, row))
        if len(items) == READ_ROWS:
            yield pa.Table.from_pylist(items, schema)
            items = []
    if items:
        yield pa.Table.from_pylist(items, schema)


def first_item(fs, path: str, label: str, columns: Columns) -> dict[str, Any]:
    """The first row as model input: checks the file, its format and its columns before any work starts."""
    rows = iter_rows(fs, path, label, input_format(label))
    try:
        for where, row in rows:
            return columns.item(0, where, row)
    finally:
        rows.close()
    raise InputError(f"{label}: no rows to predict")


# ----------------------------------------------------------------------------- the model and the parts


class PredictBatch:
    """Ray Data callable class: one model per actor, loaded once; one block in, its JSON lines out."""

    def __init__(self, checkpoint: str, batch_size: int, threads: int | None, fields: tuple[str, ...],
                 env: dict[str, str]):
        import os

        from bert import storage
        from bert.inference import Predictor

        os.environ.update(env)  # the driver's store and credentials (`storage.environment()`), for a checkpoint URI
        self.predictor = Predictor(storage.local_copy(checkpoint), batch_size=batch_size, threads=threads)
        self.fields = list(fields)

    def __call__(self, batch: pa.Table) -> pa.Table:
        records = [{k: v for k, v in r.items() if v is not None} for r in batch.select(self.fields).to_pylist()]
        predictions = self.predictor.predict_records(records)
        rows, ids = batch["row"].to_pylist(), batch["id"].to_pylist()
        lines = [json.dumps({"row": row, **({"id": i} if i is not None else {}), **p})
                 for row, i, p in zip(rows, ids, predictions)]
        return pa.table({"row": batch["row"], "line": pa.array(lines, pa.string())})


class PartsSink(Datasink):
    """The parts writer (see the module docstring); `.parts` holds (name, first row, rows) after the write."""

    def __init__(self, fs, directory: str):
        self.fs, self.directory = fs, directory
        self.parts: list[tuple[str, int, int]] = []

    def write(self, blocks: Iterable[Any], ctx: Any) -> list[tuple[str, int, int]]:
        tables = (BlockAccessor.for_block(block).to_arrow() for block in blocks)
        return [write_part(self.fs, self.directory, table) for table in tables if table.num_rows]

    def on_write_complete(self, write_result: Any) -> None:  # on the driver
        self.parts = sorted((p for task in write_result.write_returns for p in task), key=lambda p: p[1])

    def get_name(self) -> str:
        return "PredictionParts"


def write_part(fs, directory: str, table: pa.Table) -> tuple[str, int, int]:
    """One block as a part file named by its first row; (name, first row, rows)."""
    rows = table["row"].to_pylist()
    first = rows[0]
    if rows != list(range(first, first + len(rows))):
        raise RuntimeError(f"predict: a block holds rows {rows[:3]}...{rows[-1:]}, not consecutive rows: "
                           "input order was not kept")
    name = PART.format(first)
    data = ("\n".join(table["line"].to_pylist()) + "\n").encode("utf-8")
    with fs.open_output_stream(f"{directory}/{name}") as f:
        f.write(data)
    return name, first, len(rows)


def check_tiling(parts: list[tuple[str, int, int]]) -> int:
    """The number of rows, once the parts are seen to hold rows 0, 1, ... each exactly once, in name order."""
    expected = 0
    for name, first, rows in parts:
        if first != expected:
            raise RuntimeError(f"predict: part {name} starts at row {first}, expected row {expected}: "
                               f"{'a gap' if first > expected else 'rows twice'} in the output")
        expected += rows
    return expected
