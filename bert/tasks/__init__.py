"""Fine-tuning tasks: readers, features, post-processing and metrics, driven by one task table.

`TASKS` / `get_task(name)` give a task's row (`TaskSpec`); see `bert.tasks.table` for how the
generic fine-tune job uses it. Each task row names its kind, a row of `KINDS` (`bert.tasks.kinds`):
what differs between classification, regression, token classification and spans.
"""

from bert.tasks.featurize import PairFeature, length_grouped_batches
from bert.tasks.kinds import KINDS, KindSpec, collate, feature_length, get_kind, register_kind
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
    "KINDS",
    "TASKS",
    "KindSpec",
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
    "feature_length",
    "get_kind",
    "get_task",
    "length_grouped_batches",
    "register_kind",
    "tsv_task",
]
