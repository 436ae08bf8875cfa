"""`bertflow predict`: run a fine-tuned checkpoint on new text with Ray Data.

The driver reads the input (TSV with a header, or JSONL), checks that every row has the
columns the task needs (naming file and line otherwise), and checks the checkpoint, before
anything runs on Ray. Rows then go through `ray.data.from_items(...).map_batches(...)` with a
callable class that holds one `Predictor` (the model) per actor; `concurrency` actors, `batch_size`
rows per call. The output is JSONL, one line per input row, in input order:
    {"row": 0-based row index, "id": the input's id column if it has one, ...the prediction's fields}
where the fields are those the MLflow model answers (`bert.inference.Predictor.predict_records`):
label and probabilities (classification), score (regression), answer, start, end and score (QA),
entities with spans and scores (NER).
The output is a new file (pipelines/outdir.py, `atomic_output(..., directory=False)`): an
existing output, or one that is the input or lies inside the input or the checkpoint, is
refused before anything is read; it is written under a temporary name, locked, and renamed
into place when complete. There is no default output path: a command never writes next to
its inputs unless told to.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bert.errors import InputError
from bert.inference import TASK_FILE

JOB = "predict"


@dataclass(frozen=True)
class PredictConfig:
    checkpoint: str
    input: str
    output: str  # a new JSONL file: never the input, never an existing file
    text_column: str = "text"
    pair_column: str | None = None  # default: "text_pair" for pair tasks
    question_column: str = "question"
    context_column: str = "context"
    tokens_column: str = "tokens"
    id_column: str | None = "id"  # copied to the output when present
    batch_size: int = 64
    concurrency: int = 1
    cpus_per_actor: int = 1
    threads_per_actor: int | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "concurrency", "cpus_per_actor"):
            if getattr(self, name) <= 0:
                raise InputError(f"predict: {name} must be positive, got {getattr(self, name)}")


def read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) for every row of a TSV file with a header, or of a JSONL file."""
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    rows: list[tuple[int, dict[str, Any]]] = []
    if path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"{path}:{line_no}: not valid JSON: {exc.msg}") from None
                if not isinstance(row, dict):
                    raise InputError(f"{path}:{line_no}: expected a JSON object per line")
                rows.append((line_no, row))
    else:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, None)
            if header is None:
                raise InputError(f"{path}: empty file, expected a header line")
            for fields in reader:
                if not fields:
                    continue
                if len(fields) != len(header):
                    raise InputError(f"{path}:{reader.line_num}: expected {len(header)} tab-separated fields "
                                     f"(as in the header), found {len(fields)}")
                rows.append((reader.line_num, dict(zip(header, fields))))
    if not rows:
        raise InputError(f"{path}: no rows to predict")
    return rows


def task_columns(config: PredictConfig, kind: str, pair: bool) -> dict[str, str]:
    """Model input field -> input column."""
    if kind == "span":
        return {"question": config.question_column, "context": config.context_column}
    if kind == "token_classification":
        return {"tokens": config.tokens_column, "text": config.text_column}
    columns = {"text": config.text_column}
    if pair:
        columns["text_pair"] = config.pair_column or "text_pair"
    return columns


def build_items(config: PredictConfig, rows, kind: str, pair: bool) -> list[dict[str, Any]]:
    path = config.input
    columns = task_columns(config, kind, pair)
    items = []
    for row_index, (line, row) in enumerate(rows):
        item: dict[str, Any] = {"row": row_index}
        if config.id_column and config.id_column in row:
            item["id"] = str(row[config.id_column])
        if kind == "token_classification":
            tokens = row.get(columns["tokens"])
            if isinstance(tokens, list) and tokens:
                item["tokens"] = [str(t) for t in tokens]
            elif columns["text"] in row:
                item["text"] = str(row[columns["text"]])
            else:
                raise InputError(f"{path}:{line}: needs a {columns['tokens']!r} list or a {columns['text']!r} column")
        else:
            for field, column in columns.items():
                if column not in row or row[column] is None:
                    raise InputError(f"{path}:{line}: no {column!r} column (the model reads {field!r} from it); "
                                     f"columns found: {sorted(row)}")
                item[field] = str(row[column])
        items.append(item)
    return items


class PredictBatch:
    """Ray Data callable class: one model per actor, loaded once."""

    def __init__(self, checkpoint: str, batch_size: int, threads: int | None):
        from bert.inference import Predictor

        self.predictor = Predictor(checkpoint, batch_size=batch_size, threads=threads)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        n = len(batch["row"])
        fields = [k for k in ("text", "text_pair", "question", "context", "tokens") if k in batch]
        records = [{k: _plain(batch[k][i]) for k in fields} for i in range(n)]
        predictions = self.predictor.predict_records(records)
        return {"row": batch["row"], "prediction": [json.dumps(p) for p in predictions],
                **({"id": batch["id"]} if "id" in batch else {})}


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def run_predict(config: PredictConfig) -> dict[str, Any]:
    """Check the output and the inputs, predict with Ray Data, write the JSONL output. Returns a summary."""
    from bert.checkpoint import read_checkpoint_info
    from bert.tasks import get_task
    from pipelines.outdir import atomic_output, check_disjoint, check_new_output

    output = Path(config.output)
    input_path = Path(config.input).resolve()
    check_disjoint(output, [config.input, config.checkpoint], "--output")
    check_new_output(output, JOB)
    checkpoint = Path(config.checkpoint).resolve()
    if not (checkpoint / TASK_FILE).is_file():
        if (checkpoint / "checkpoint" / TASK_FILE).is_file():  # a fine-tune output dir
            checkpoint = checkpoint / "checkpoint"
        else:
            raise InputError(f"{checkpoint}: not a fine-tuned bertflow checkpoint ({TASK_FILE} is missing)")
    read_checkpoint_info(checkpoint)
    spec = get_task(json.loads((checkpoint / TASK_FILE).read_text())["task"])
    rows = read_rows(input_path)
    items = build_items(config, rows, spec.kind, len(spec.text_fields) == 2)
    with atomic_output(output, JOB, directory=False, inputs=[config.input, config.checkpoint]) as tmp:
        results = _predict(config, checkpoint, items)
        with open(tmp, "w", encoding="utf-8") as f:
            for r in results:
                line = {"row": int(r["row"]), **({"id": str(r["id"])} if "id" in r else {}),
                        **json.loads(r["prediction"])}
                f.write(json.dumps(line) + "\n")
    return {"rows": len(results), "output": str(output), "task": spec.name}


def _predict(config: PredictConfig, checkpoint: Path, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The model's output rows for `items`, in input order, computed by Ray Data actors."""
    import ray

    from pipelines.ray_runtime import ensure_ray

    ensure_ray()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    dataset = ray.data.from_items(items).map_batches(
        PredictBatch,
        fn_constructor_kwargs={"checkpoint": str(checkpoint), "batch_size": config.batch_size,
                               "threads": config.threads_per_actor},
        batch_size=config.batch_size,
        concurrency=config.concurrency,
        num_cpus=config.cpus_per_actor,
        batch_format="numpy",
    )
    results = sorted(dataset.take_all(), key=lambda r: int(r["row"]))
    if [int(r["row"]) for r in results] != list(range(len(items))):
        raise RuntimeError(f"predict: {len(results)} predictions for {len(items)} rows")
    return results
