"""`bertflow predict`: run a fine-tuned checkpoint on new text, streamed through Ray Data.

    check       --out new (or, on an object store, this job's unfinished run with the same settings), the
                checkpoint a fine-tuned one, the input's first row readable and holding the model's columns:
                each refused with one line naming the file (and line) before any work starts
    claim       through the job skeleton (`PredictJob`, `pipelines/jobs/skeleton.run_job`): local, a NEW
                output, a temporary sibling `.<out>.tmp-<id>/`, locked, renamed to --out when complete
                (`pipelines/outdir.atomic_output`); object store, a RESUMABLE one, the one-writer lease and
                `_job.json` (`pipelines/outdir.claim_dir`), a killed run's parts removed
    stream      read the input (one read task, `pipelines/jobs/predict_data.PredictInput`) -> blocks of
                `block_rows` rows (`repartition(target_num_rows_per_block=...)`) -> `map_batches` over
                `concurrency` actors, one `Predictor` each -> each block written as one part by the actor
                pool's successor, a write task (`PartsSink`); `preserve_order` keeps blocks in input order
    publish     the parts checked to tile rows 0..n-1, then `_manifest.json`, written last (the rename of
                the local temporary follows it)

The driver holds no rows: its memory does not grow with the input (`benchmarks/predict.py` measures it).

The output is a dir:
    part-000000000000.jsonl, part-000000010000.jsonl, ...   one JSON line per input row, in input order
                                                             (the names sort in row order: `cat part-*`)
    _manifest.json                                           rows, parts (name, first row, rows), task,
                                                             checkpoint, input, settings; written last
Each line is {"row": 0-based row index, "id": the input's id column if the row has one, ...the prediction's
fields}, the fields an MLflow model of the checkpoint answers (`bert.inference.Predictor.predict_records`):
label and probabilities (classification), score (regression), answer, start, end and score (QA), entities
with spans and scores (NER). `read_predictions(out)` yields them in order.

Inputs: JSONL, TSV or CSV with a header (`.gz` too), or parquet; a local path or an object-store URI
(`bert.storage`); so may the checkpoint be (each actor loads it from a copy in its node's cache, downloaded
once). There is no default output path: a command never writes next to its inputs unless told to.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from bert import storage
from bert.errors import InputError
from bert.inference import TASK_FILE
from pipelines.jobs.skeleton import NEW, RESUMABLE, Claimed, Job, run_job

JOB = "predict"
MANIFEST = "_manifest.json"
FORMAT = "bertflow-predictions/1"
RUN_ONLY = ("concurrency", "cpus_per_actor", "threads_per_actor")  # settings that do not change the output


@dataclass(frozen=True)
class PredictConfig:
    checkpoint: str
    input: str
    out: str  # a new output dir: never the input, never an existing path
    text_column: str = "text"
    pair_column: str | None = None  # default: "text_pair" for pair tasks
    question_column: str = "question"
    context_column: str = "context"
    tokens_column: str = "tokens"
    id_column: str | None = "id"  # copied to the output when present
    batch_size: int = 64  # rows per forward pass (an actor sorts its block by length first)
    block_rows: int = 10_000  # rows per Ray Data block: per actor call, and per output part
    concurrency: int = 1
    cpus_per_actor: int = 1
    threads_per_actor: int | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "block_rows", "concurrency", "cpus_per_actor"):
            if getattr(self, name) <= 0:
                raise InputError(f"predict: {name} must be positive, got {getattr(self, name)}")

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RUN_ONLY}


class PredictJob(Job[PredictConfig]):
    """`run_job(PredictJob(), config)`: the skeleton's steps for predict (`pipelines/jobs/skeleton.py`): a NEW
    output on a local path, a RESUMABLE one on an object store (module docstring)."""

    name = JOB
    required = ("checkpoint", "input", "out")
    paths = ("checkpoint", "input", "out")
    logs = False

    def output_kind(self, config: PredictConfig) -> str:
        return RESUMABLE if storage.is_remote(config.out) else NEW

    def inputs(self, config: PredictConfig) -> list[Any]:
        return [config.input, config.checkpoint]

    def finished(self, config: PredictConfig) -> None:
        if storage.is_remote(config.out) and storage.exists(storage.join(config.out, MANIFEST)):
            raise InputError(f"{config.out} already holds a finished output ({MANIFEST}); `bertflow {JOB}` writes "
                             "only a new output: choose another --out (nothing was changed)")
        return super().finished(config)

    def preflight(self, config: PredictConfig) -> tuple[str, Any, Any]:
        """(checkpoint dir, its task row, the input's columns): the checkpoint a fine-tuned one, the input's first
        row readable and holding the model's columns."""
        from pipelines.jobs.predict_data import first_item

        checkpoint, spec = find_checkpoint(config.checkpoint)
        columns = task_columns(config, spec)
        in_fs, in_path = storage.resolve(config.input)
        first_item(in_fs, in_path, config.input, columns)
        return checkpoint, spec, columns

    def run(self, claimed: Claimed[PredictConfig], checked: tuple[str, Any, Any]) -> dict[str, Any]:
        """Stream the input through the model into parts, then publish the manifest. Returns a summary."""
        from pipelines.jobs.predict_data import check_tiling

        config, (checkpoint, spec, columns) = claimed.config, checked
        started = time.time()
        out_fs, directory, publish = destination(claimed)
        parts = stream_predictions(config, checkpoint, columns, out_fs, directory)
        rows = check_tiling(parts)
        publish({"format": FORMAT, "job": JOB, "rows": rows, "task": spec.name, "checkpoint": config.checkpoint,
                 "input": config.input, "identity": config.identity(), "seconds": round(time.time() - started, 3),
                 "parts": [{"name": name, "first_row": first, "rows": n} for name, first, n in parts]})
        return {"rows": rows, "parts": len(parts), "output": config.out, "task": spec.name}


def run_predict(config: PredictConfig) -> dict[str, Any]:
    """Check, claim --out, stream the input through the model into parts, publish. Returns a summary."""
    return run_job(PredictJob(), config)


def find_checkpoint(location: str) -> tuple[str, Any]:
    """(checkpoint location, its task row): a fine-tuned checkpoint dir, or a `bertflow finetune` output dir, on
    disk or on an object store. A URI is checked on a copy in the local cache; every model actor loads it from
    its own node's cache (`storage.local_copy`: downloaded once per node)."""
    from bert.checkpoint import read_checkpoint_info
    from bert.tasks import get_task
    from bert.tokenizer import Tokenizer

    if not storage.is_file(storage.join(location, TASK_FILE)):
        if not storage.is_file(storage.join(location, "checkpoint", TASK_FILE)):
            raise InputError(f"{location}: not a fine-tuned bertflow checkpoint ({TASK_FILE} is missing)")
        location = str(storage.join(location, "checkpoint"))
    local = storage.local_copy(location)
    read_checkpoint_info(local)
    Tokenizer.load(local)  # what every actor loads, checked once here
    return str(location), get_task(json.loads((local / TASK_FILE).read_text())["task"])


# Model input fields whose column option is not "<field>_column".
COLUMN_OPTIONS = {"text_pair": "pair_column"}


def task_columns(config: PredictConfig, spec):
    """Model input field -> input column, for every input the task's kind reads (`TaskSpec.inputs`): the
    `--<field>-column` option where there is one, else the field's own name."""
    from pipelines.jobs.predict_data import Columns

    def column(name: str) -> str:
        return getattr(config, COLUMN_OPTIONS.get(name, f"{name}_column"), None) or name

    inputs = tuple(tuple((f.name, column(f.name), isinstance(f.type, tuple) and f.type[0] == "array") for f in slot)
                   for slot in spec.inputs)
    return Columns(inputs, config.id_column)


def destination(claimed: Claimed[PredictConfig]) -> tuple[Any, str, Callable[[dict[str, Any]], Any]]:
    """(file system, dir to write the parts into, publish(manifest)) of the claimed output (module docstring)."""
    if claimed.into is not None:  # local: the temporary, renamed to --out when the job returns
        tmp = claimed.into
        return storage.LOCAL, str(tmp), lambda manifest: storage.write_json(tmp / MANIFEST, manifest)
    from pipelines.lease import clear_unfinished
    from pipelines.outdir import JOB_FILE

    out, lease = claimed.out, claimed.lease
    if claimed.resuming:
        removed = clear_unfinished(lease, keep=(JOB_FILE,))
        print(f"[{JOB}] {out}: an unfinished run of the same settings; removed {len(removed)} of its "
              "entries, predicting again", flush=True)
    fs, directory = storage.resolve(out)
    return fs, directory, lambda manifest: lease.commit(storage.join(out, MANIFEST), manifest)


def stream_predictions(config: PredictConfig, checkpoint: str, columns, out_fs, directory: str) -> list:
    """Read -> blocks -> model actors -> parts, in input order; [(part name, first row, rows)] sorted by row."""
    import ray

    from pipelines.jobs.predict_data import PartsSink, PredictBatch, PredictInput

    in_fs, in_path = storage.resolve(config.input)
    dataset = ray.data.read_datasource(PredictInput(in_fs, in_path, config.input, columns), override_num_blocks=1)
    dataset.context.execution_options.preserve_order = True  # this dataset's own context, not the process's
    dataset = dataset.repartition(target_num_rows_per_block=config.block_rows).map_batches(
        PredictBatch,
        fn_constructor_kwargs={"checkpoint": str(checkpoint), "batch_size": config.batch_size,
                               "threads": config.threads_per_actor, "fields": tuple(f for f, _ in columns.fields),
                               "env": storage.environment()},
        batch_size=None,  # a whole block per call: the actor sorts it by length, little padding
        compute=ray.data.ActorPoolStrategy(size=config.concurrency),
        num_cpus=config.cpus_per_actor,
        batch_format="pyarrow",
    )
    sink = PartsSink(out_fs, directory)
    try:
        dataset.write_datasink(sink)
    except Exception as exc:
        named = input_error(exc)
        if named is None:
            raise
        raise named from None
    return sink.parts


def input_error(exc: BaseException) -> InputError | None:
    """The InputError (bad input, named by file and line) a Ray task raised, as one plain error; None if none."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError
        if isinstance(cause, InputError):
            return InputError(str(cause.args[0]) if cause.args else str(cause))
        if isinstance(exc, InputError) and exc.args:
            return InputError(str(exc.args[0]))
        exc = exc.__cause__ or exc.__context__
    return None


def read_predictions(out: str) -> Iterator[dict[str, Any]]:
    """The lines of a finished predict output, in input order (its manifest's parts)."""
    manifest = storage.read_json(storage.join(out, MANIFEST))
    for part in manifest["parts"]:
        with storage.open_read(storage.join(out, part["name"]), "r") as f:
            for line in f:
                yield json.loads(line)
