"""Fine-tuning tasks: readers, features, post-processing and metrics, driven by one task table.

`TASKS` / `get_task(name)` give a task's row (`TaskSpec`); see `bert.tasks.table` for how the
generic fine-tune job uses it.
"""

from bert.tasks.featurize import PairFeature, collate, length_grouped_batches
from bert.tasks.ner import TokenFeature
from bert.tasks.readers import (
    SquadAnswer,
    SquadExample,
    TaskData,
    TextExample,
    TokenExample,
    TsvColumns,
)
from bert.tasks.squad import SpanFeature, SpanPrediction
from bert.tasks.table import TASKS, TaskSpec, get_task, tsv_task

__all__ = [
    "TASKS",
    "PairFeature",
    "SpanFeature",
    "SpanPrediction",
    "SquadAnswer",
    "SquadExample",
    "TaskData",
    "TaskSpec",
    "TextExample",
    "TokenExample",
    "TokenFeature",
    "TsvColumns",
    "collate",
    "get_task",
    "length_grouped_batches",
    "tsv_task",
]
