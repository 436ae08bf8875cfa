"""Stages of continued (domain- or task-adaptive) pretraining from an existing BERT (`pipelines/adapt.yaml`).

| kind | reads | writes (its output dir) |
|---|---|---|
| `checkpoint` | a checkpoint dir (ours or Hugging Face), by path | `checkpoint/` (the model in our layout, its tokenizer files); its tokenizer files at the top too |
| `task_text` | a task's data, by path | `corpus/text.txt`: the task's training text without labels |

A `checkpoint` stage is where a public model enters a spec once: its output is at the same time a
tokenizer dir (a `shards` stage's `tokenizer` input: the shards get the checkpoint's vocabulary and
casing), a pretraining stage's `init` input and a fine-tune stage's `checkpoint` input (the
original model, the baseline of the adapted one). Its key fingerprints the checkpoint's files, so
replacing them re-runs what depends on them.

A `task_text` stage turns a task's training examples into unlabeled text, the corpus of
task-adaptive pretraining (Gururangan et al., 2020): one example's text per line (both sentences of
a pair, one line each; a CoNLL sentence's words joined by spaces), a blank line after every
`per_document` examples so the shards stage has documents to spread over its parts. Labels are
never written. Without NSP (`next_sentence_prediction: false` in the shards stage) consecutive
lines of a document are packed into one segment up to the sequence length.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bert import storage
from bert.errors import InputError

TEXT_FILE = "text.txt"


# ----------------------------------------------------------------------------- task text


def task_lines(task: str, data: str | Path, max_examples: int | None = None) -> list[list[str]]:
    """The text of a task's training examples, one list of lines per example, in file order (no labels)."""
    from bert.finetune import resolve_data_dir
    from bert.tasks import get_task

    spec = get_task(task)
    examples = spec.reader(resolve_data_dir(spec, data)).train[:max_examples]
    lines = []
    for example in examples:
        if hasattr(example, "words"):  # a token-level (NER) example
            lines.append([" ".join(example.words)])
        elif hasattr(example, "text_a"):
            lines.append([t for t in (example.text_a, example.text_b) if t])
        else:  # a span (QA) example: its question and its context
            lines.append([example.question, example.context])
    return lines


def write_task_text(task: str, data: str | Path, out: str | Path, max_examples: int | None = None,
                    per_document: int = 25) -> dict[str, int]:
    """Write `task_lines` as one-sentence-per-line text, a blank line after every `per_document` examples."""
    if per_document < 1:
        raise InputError(f"per_document must be >= 1, got {per_document}")
    examples = task_lines(task, data, max_examples)
    if not examples:
        raise InputError(f"task {task}: no training examples in {data}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for i, lines in enumerate(examples):
        if i and i % per_document == 0:
            written.append("")
        written += [" ".join(line.split()) for line in lines]  # one line each, whatever the text held
    out.write_text("\n".join(written) + "\n", encoding="utf-8")
    return {"examples": len(examples), "lines": sum(map(len, examples)),
            "documents": (len(examples) + per_document - 1) // per_document}


@dataclass(frozen=True)
class TaskTextConfig:
    """A task's training text without labels: `task` (a task-table name), `data` (its dir or a datasets root)."""

    task: str | None = None
    data: str | None = None
    max_examples: int | None = None  # the first N training examples (all by default)
    per_document: int = 25  # examples per document (a blank line between documents)


def configure_task_text(w) -> list:
    from pipelines.config_args import split_section
    from pipelines.dag.graph import path_fingerprint, require_paths
    from pipelines.dag.spec import expand_path

    (values,) = split_section(w.spec.config, [TaskTextConfig], w.text)
    config = TaskTextConfig(**values)
    if not config.task or not config.data:
        raise InputError(f"{w.text}: needs task (e.g. sst2) and data (the task's dir or a datasets root)")
    try:
        from bert.tasks import get_task

        get_task(config.task)
    except InputError as exc:
        raise InputError(f"{w.text}: {exc}") from None
    if config.per_document < 1 or (config.max_examples is not None and config.max_examples < 1):
        raise InputError(f"{w.text}: per_document and max_examples must be >= 1")
    config = dataclasses.replace(config, data=expand_path(config.data))
    require_paths([config.data], w.text)
    fields = dataclasses.asdict(config) | {"files": path_fingerprint([config.data])}
    return [w.stage(config, fields)]


def task_text_stage(ctx) -> dict[str, Any]:
    config: TaskTextConfig = ctx.config
    counts = write_task_text(config.task, storage.local_copy(config.data), Path(ctx.out) / "corpus" / TEXT_FILE,
                             config.max_examples, config.per_document)
    ctx.log(f"{counts['examples']} {config.task} training examples, {counts['lines']} lines, no labels")
    return counts


# ----------------------------------------------------------------------------- checkpoint


@dataclass(frozen=True)
class CheckpointStageConfig:
    """An existing checkpoint dir (ours or Hugging Face BERT, with its tokenizer files) entering the spec."""

    path: str | None = None


def configure_checkpoint(w) -> list:
    from bert.checkpoint import read_checkpoint_info
    from bert.tokenizer import Tokenizer
    from pipelines.config_args import split_section
    from pipelines.dag.graph import path_fingerprint, require_paths
    from pipelines.dag.spec import expand_path

    (values,) = split_section(w.spec.config, [CheckpointStageConfig], w.text)
    config = CheckpointStageConfig(**values)
    if not config.path:
        raise InputError(f"{w.text}: needs path (a bertflow or Hugging Face BERT checkpoint dir)")
    config = CheckpointStageConfig(expand_path(config.path))
    require_paths([config.path], w.text)
    local = storage.metadata_copy(config.path, "checkpoints")  # itself on disk; a URI's configs, not its weights
    with storage.named(config.path, local):
        read_checkpoint_info(local)  # a clear error now if it is not a BERT checkpoint
    if not Tokenizer.is_tokenizer_dir(local):
        raise InputError(f"{w.text}: {config.path} has no tokenizer files (vocab.txt or tokenizer_config.json): "
                         "continued pretraining takes its vocabulary and casing from the checkpoint")
    return [w.stage(config, {"path": config.path, "files": path_fingerprint([config.path])})]


def checkpoint_stage(ctx) -> dict[str, Any]:
    """The model in our layout under `checkpoint/` (with its tokenizer), and the tokenizer at the top."""
    from bert.checkpoint import copy_tokenizer_files, from_pretrained, save_pretrained
    from bert.tokenizer import Tokenizer

    config: CheckpointStageConfig = ctx.config
    local = storage.local_copy(config.path, "checkpoints")  # itself on disk; a cached copy of a URI
    model = from_pretrained(local, init_seed=0)  # a head the checkpoint half has (MLM, no NSP): seeded
    save_pretrained(model, Path(ctx.out) / "checkpoint", tokenizer_dir=local)
    copy_tokenizer_files(local, ctx.out)
    tokenizer = Tokenizer.load(ctx.out)
    head = getattr(model, "head", None)
    ctx.log(f"{config.path}: {type(model).__name__}, {tokenizer!r}")
    return {"model": type(model).__name__, "head": head, "vocab_size": tokenizer.vocab_size,
            "lowercase": tokenizer.lowercase}
