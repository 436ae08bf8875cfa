"""Checks a command makes before a job starts: before anything is written, before Ray or MLflow start.

Each takes the job's settings as the command line gave them and raises `InputError` (one line on the
command line) naming the real cause:

* the tracking store can be used (`pipelines.tracking.check_tracking_store`: a server that answers, a
  SQLite store that is whole and writable or can be created) — the same rule for every job;
* the output is none of the inputs, nor inside or around one (before the output is looked at, so an
  output that is an input is refused as such, not as "another run's output");
* what the inputs are: a `--data` that is a file, a model that is neither a preset nor a checkpoint,
  labels outside the task's label set (`bert.tasks.labels`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bert.config import PRESETS, check_model_name
from bert.errors import InputError
from pipelines.outdir import check_disjoint
from pipelines.tracking import check_tracking_store, default_tracking_uri


def check_tracking(config: Any) -> None:
    """The job's tracking store (`--tracking-uri`, else MLFLOW_TRACKING_URI, else SQLite under --out) can be used."""
    if getattr(config, "out", None):
        check_tracking_store(config.tracking_uri or default_tracking_uri(config.out))


def check_pretrain_start(config: Any) -> None:
    """`bertflow pretrain`: the model names a preset or a checkpoint, --out is no input, the tracking store works."""
    check_model_name(config.model)
    if config.out:
        model = None if config.model in PRESETS else config.model
        check_disjoint(config.out, [config.shards, config.val_shards, model])
    check_tracking(config)


def check_finetune_start(config: Any, allow_new_labels: bool = False) -> None:
    """`bertflow finetune` / `sweep`: --data is the task's folder, its labels lie in the task's label set,
    --out is no input, the tracking store works."""
    from bert.tasks import get_task
    from bert.tasks.labels import check_task_labels

    spec = get_task(config.task)  # an unknown task lists the known ones
    if config.data:
        data = Path(config.data)
        if data.is_file():
            raise InputError(f"--data {data} is a file; give the task's folder (for {spec.name}: the folder that "
                             f"holds its train and eval files) or a datasets root that holds {spec.subdir or 'it'}")
        if not data.is_dir():
            raise InputError(f"--data {data} does not exist")
        nested = data / spec.subdir
        check_task_labels(spec, nested if spec.subdir and nested.is_dir() else data, allow_new_labels)
    if config.out:
        check_disjoint(config.out, [config.data, config.checkpoint, config.tokenizer])
    check_tracking(config)

