"""Checks of what only the command line knows, made before a job starts (nothing written, no Ray or MLflow).

Each takes the job's settings as the command line gave them and raises `InputError` (one line on the
command line) naming the real cause: a `--data` that is a file, a model that is neither a preset nor a
checkpoint, labels outside the task's label set (`bert.tasks.labels`, with `--allow-new-labels`). The
checks every job makes however it is started (output = input, the tracking store) are the job
skeleton's (`pipelines/jobs/skeleton.py`).
"""

from __future__ import annotations

from typing import Any

from bert import storage
from bert.config import check_model_name
from bert.errors import InputError


def check_pretrain_start(config: Any) -> None:
    """`bertflow pretrain`: the model names a preset or a checkpoint (a dir, or a prefix on an object store)."""
    check_model_name(config.model)


def check_finetune_start(config: Any, allow_new_labels: bool = False) -> None:
    """`bertflow finetune` / `sweep`: --data is the task's folder, its labels lie in the task's label set."""
    from bert.tasks import get_task
    from bert.tasks.labels import check_task_labels

    spec = get_task(config.task)  # an unknown task lists the known ones
    if config.data:
        if storage.is_file(config.data):
            raise InputError(f"--data {config.data} is a file; give the task's folder (for {spec.name}: the folder "
                             f"that holds its train and eval files) or a datasets root that holds "
                             f"{spec.subdir or 'it'}")
        if not storage.is_dir(config.data):
            raise InputError(f"--data {config.data} does not exist")
        # a dir on an object store: checked on the local copy the job reads (`storage.local_copy`, made once)
        data = storage.local_copy(config.data, "inputs")
        nested = data / spec.subdir
        check_task_labels(spec, nested if spec.subdir and nested.is_dir() else data, allow_new_labels)

