"""Fine-tuning BERT on one row of the task table, on one device: data, model, parameter groups, step, evaluation.

The Ray job (`pipelines/jobs/finetune.py`) runs this on every worker; read top to bottom:

    prepared = prepare(spec, data_dir, tokenizer, ...)   read, cut, check and featurize once (the driver)
    model = task_model(checkpoint, spec, labels, seed)    the encoder + the task's head, initialised from the seed
    freeze(model, encoder=..., layers=...)                feature extraction, or the bottom layers
    optimizer = adamw(layerwise_groups(model, ...))       no decay on bias/LayerNorm; layer-wise LR decay
    for epoch:
        for batch in epoch_batches(lengths, ...):         length-grouped, padded to their longest row
            train_step(...)                               warmup + linear decay, dropout seeded per step,
                                                          forward under the precision policy, clip, step
        metrics, records = evaluate(...)                  dev metrics and one prediction record per example
    the best epoch by the task's primary metric is kept

Dropout is seeded from (seed, rank, step), and batches are a pure function of (seed, epoch), so
a run resumed from the checkpoint of a finished epoch reproduces an uninterrupted run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bert.errors import InputError
from bert.optim import clip_grad_norm, lr_multiplier, param_groups, set_lr
from bert.precision import Precision
from bert.pretrain import step_seed
from bert.run_state import OPTIMIZER_STATE, RunState  # noqa: F401 - OPTIMIZER_STATE re-exported
from bert.tasks import TaskSpec, collate, feature_length, length_grouped_batches
from bert.tasks.featurize import json_number  # noqa: F401 - re-exported for the fine-tune job
from bert.tokenizer import Tokenizer

FINETUNE_STATE = "finetune_state.json"
PREDICTIONS = "predictions.jsonl"


# ----------------------------------------------------------------------------- data


@dataclass
class Prepared:
    """A task's data, read, checked and featurized once; shipped to the workers."""

    task: str
    labels: tuple[str, ...]
    max_seq_length: int
    pad_id: int
    tokenizer_dir: str
    train_features: list
    eval_examples: dict[str, tuple]
    eval_features: dict[str, list]
    skipped: dict[str, int]
    num_train_examples: int


def resolve_data_dir(spec: TaskSpec, data: str | Path) -> Path:
    """The task directory itself, or `<datasets root>/<task subdir>` when given a root."""
    data = Path(data)
    if not data.is_dir():
        raise InputError(f"data dir {data} does not exist")
    nested = data / spec.subdir
    return nested if spec.subdir and nested.is_dir() else data


def check_model_inputs(checkpoint: str | Path, tokenizer_dir: str | Path, spec: TaskSpec,
                       max_seq_length: int | None, freeze_layers: int = 0) -> tuple[Tokenizer, int]:
    """The checkpoint (config and weights), its tokenizer and the sequence length agree.

    Returns (tokenizer, max_seq_length). Loads the weights once, so a corrupt or refused
    weights file is reported here, before any training starts.
    """
    from bert.checkpoint import from_pretrained, read_checkpoint_info

    info = read_checkpoint_info(checkpoint)
    tokenizer_dir = Path(tokenizer_dir)
    if not Tokenizer.is_tokenizer_dir(tokenizer_dir):
        raise InputError(f"{tokenizer_dir}: no tokenizer files (vocab.txt, or tokenizer_config.json with its "
                         "model file); pass --tokenizer DIR")
    tokenizer = Tokenizer.load(tokenizer_dir)
    if tokenizer.vocab_size != info.config.vocab_size:
        raise InputError(f"checkpoint {info.path} has vocab_size {info.config.vocab_size} but the tokenizer in "
                         f"{tokenizer_dir} has {tokenizer.vocab_size} tokens: use the tokenizer the checkpoint "
                         "was trained with")
    if tokenizer.pad_id != info.config.pad_token_id:
        raise InputError(f"checkpoint {info.path} has pad_token_id {info.config.pad_token_id} but the tokenizer in "
                         f"{tokenizer_dir} pads with id {tokenizer.pad_id}")
    max_seq_length = max_seq_length or spec.max_seq_length
    info.config.check_sequence_length(max_seq_length, "--max-seq-length asks for sequences")
    if freeze_layers > info.config.num_hidden_layers:
        raise InputError(f"--freeze-layers {freeze_layers}: the checkpoint has only "
                         f"{info.config.num_hidden_layers} layers")
    from_pretrained(info.path, head=None)  # the weights load (safetensors, or a tensors-only pickle)
    return tokenizer, max_seq_length


def prepare(spec: TaskSpec, data_dir: str | Path, tokenizer: Tokenizer, tokenizer_dir: str | Path,
            max_seq_length: int, max_train: int | None = None, max_eval: int | None = None) -> Prepared:
    """Read, cut (the first N examples), check and featurize the task's data."""
    data = spec.reader(resolve_data_dir(spec, data_dir))
    train = tuple(data.train[:max_train])
    evals = {split: tuple(examples[:max_eval]) for split, examples in data.evals.items()}
    if not train:
        raise InputError(f"task {spec.name}: no training examples in {data_dir}")
    for split, examples in evals.items():
        if not examples:
            raise InputError(f"task {spec.name}: eval split {split!r} in {data_dir} has no examples")
    primary_split = spec.primary_metric.split("/")[0]
    if primary_split not in evals:
        raise InputError(f"task {spec.name}: primary metric {spec.primary_metric} needs eval split "
                         f"{primary_split!r}, found {sorted(evals)}")
    if len(data.labels) < spec.kind_spec.min_labels:
        raise InputError(f"task {spec.name}: the train file of {data_dir} has {len(data.labels)} label(s) "
                         f"{list(data.labels)}; {spec.kind} needs at least {spec.kind_spec.min_labels}")
    if spec.positive_label is not None and spec.positive_label not in data.labels:
        raise InputError(f"task {spec.name}: F1 is of the class {spec.positive_label!r}, but the train file of "
                         f"{data_dir} has labels {list(data.labels)} (name the positive class: positive=LABEL)")
    return Prepared(
        task=spec.name, labels=tuple(data.labels), max_seq_length=max_seq_length, pad_id=tokenizer.pad_id,
        tokenizer_dir=str(tokenizer_dir),
        train_features=spec.featurize(train, tokenizer, data.labels, max_seq_length),
        eval_examples=evals,
        eval_features={s: spec.featurize(ex, tokenizer, data.labels, max_seq_length) for s, ex in evals.items()},
        skipped=dict(data.skipped), num_train_examples=len(train),
    )


# ----------------------------------------------------------------------------- model


def task_model(checkpoint: str | Path, spec: TaskSpec, labels: Sequence[str], seed: int) -> nn.Module:
    """The checkpoint's encoder with the task's head; a new head is initialised from `seed`."""
    from bert.checkpoint import from_pretrained

    torch.manual_seed(seed)
    return from_pretrained(checkpoint, head=spec.head, **spec.head_arguments(labels))


def freeze(model: nn.Module, *, encoder: bool, layers: int) -> None:
    """`encoder`: every `bert.*` parameter (embeddings, layers, pooler). `layers`: embeddings + bottom K layers."""
    if encoder:
        for param in model.bert.parameters():
            param.requires_grad_(False)
    elif layers:
        for param in model.bert.embeddings.parameters():
            param.requires_grad_(False)
        for layer in model.bert.encoder.layer[:layers]:
            for param in layer.parameters():
                param.requires_grad_(False)


def layerwise_groups(model: nn.Module, weight_decay: float, decay: float) -> list[dict]:
    """Parameter groups with an `lr_scale`: head (and pooler) decay^0, top layer decay^1 ... embeddings decay^(L+1).

    Each part is split by `bert.optim.param_groups` into weight matrices (weight decay) and
    biases / LayerNorm (none). Frozen parameters are left out.
    """
    layers = model.bert.encoder.layer
    L = len(layers)
    head = nn.ModuleList(m for name, m in model.named_children() if name != "bert")  # classifier / qa_outputs
    if getattr(model.bert, "pooler", None) is not None:
        head.append(model.bert.pooler)
    parts: list[tuple[nn.Module, float]] = [(head, 1.0), (model.bert.embeddings, decay ** (L + 1))]
    parts += [(layer, decay ** (L - i)) for i, layer in enumerate(layers)]
    return [{**group, "lr_scale": scale} for module, scale in parts
            for group in param_groups(module, weight_decay) if group["params"]]


# ----------------------------------------------------------------------------- schedule and batches


@dataclass(frozen=True)
class Schedule:
    """The fine-tune schedule: global batches per epoch, total optimiser steps, warmup steps, peak learning rate.

    `lr(step)` is the peak times pretraining's multiplier (`bert.optim.lr_multiplier`: linear warmup, then
    linear decay to 0); `train_step` gives each parameter group that times its `lr_scale` (`layerwise_groups`).
    """

    per_epoch: int
    total: int
    warmup: int
    peak: float

    @classmethod
    def of(cls, num_train: int, batch_size: int, epochs: float, warmup_ratio: float, world: int,
           peak: float) -> Schedule:
        # a final batch smaller than the number of workers is dropped (each rank needs a row)
        per_epoch = num_train // batch_size + (1 if num_train % batch_size >= world else 0)
        total = max(1, round(epochs * per_epoch))
        return cls(per_epoch, total, int(warmup_ratio * total), peak)

    def lr(self, step: int) -> float:
        return self.peak * lr_multiplier(step, warmup_steps=self.warmup, total_steps=self.total)


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, world: int,
                  length_grouping: int) -> list[list[int]]:
    """The global batches of an epoch (feature indices), a pure function of (seed, epoch, length_grouping)."""
    return [b for b in length_grouped_batches(lengths, batch_size, seed, epoch, length_grouping) if len(b) >= world]


# ----------------------------------------------------------------------------- the step


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, features: Sequence[Any], pad_id: int, *,
               lr: float, max_grad_norm: float, precision: Precision, dropout_seed: int,
               trainable: Sequence[nn.Parameter]) -> tuple[float, float]:
    """One optimiser step on one (local) batch; returns (loss, gradient norm before clipping)."""
    raw = getattr(model, "module", model)
    device = next(raw.parameters()).device
    set_lr(optimizer, lr)
    inputs = {k: v.to(device) for k, v in collate(features, pad_id).items()}
    torch.manual_seed(dropout_seed)
    optimizer.zero_grad(set_to_none=True)
    with precision.autocast():
        loss = model(**inputs).loss
    loss.backward()
    grad_norm = clip_grad_norm(trainable, max_grad_norm)
    optimizer.step()
    return loss.item(), grad_norm


def dropout_seed(seed: int, rank: int, step: int) -> int:
    return step_seed(seed, rank, step, 1)


def probe_loss(features: Sequence[Any], pad_id: int, device: torch.device):
    """`loss(model)` of one batch of `features` at the real shape: what a precision probe times."""
    inputs = {k: v.to(device) for k, v in collate(features, pad_id).items()}
    return lambda model: model(**inputs).loss


# ----------------------------------------------------------------------------- evaluation


def prediction_records(spec: TaskSpec, split: str, examples: Sequence[Any], predictions: Sequence[Any]) -> list[dict]:
    """One JSON-ready line per eval example: split, id, and the kind's prediction and gold fields."""
    record = spec.kind_spec.prediction_record
    return [{"split": split, "id": ex.id, **record(ex, p)} for ex, p in zip(examples, predictions)]


def train_lengths(prepared: Prepared) -> list[int]:
    """The length of every training feature, as its kind measures it (what length grouping sorts on)."""
    return [feature_length(f) for f in prepared.train_features]


def eval_splits(spec: TaskSpec, prepared: Prepared) -> list[str]:
    """Eval splits in evaluation order: the primary split first (a decision threshold is chosen there)."""
    primary = spec.primary_metric.split("/")[0]
    return sorted(prepared.eval_features, key=lambda name: name != primary)


def score(spec: TaskSpec, prepared: Prepared, outputs: dict[str, list[np.ndarray]]) -> tuple[dict[str, float], list[dict]]:
    """Dev metrics and prediction records from the head's outputs (one per feature, per split)."""
    metrics: dict[str, float] = {}
    records: list[dict] = []
    primary = spec.primary_metric.split("/")[0]
    threshold = None
    for split in eval_splits(spec, prepared):
        examples = prepared.eval_examples[split]
        predictions = spec.postprocess(examples, prepared.eval_features[split], outputs[split], prepared.labels)
        if spec.choose_threshold is not None:
            if threshold is None:
                threshold = spec.choose_threshold(predictions, examples)
                metrics[f"{primary}/threshold"] = threshold  # reported, and saved with the checkpoint
            predictions = spec.apply_threshold(predictions, threshold)
        metrics |= spec.score(split, predictions, examples)
        records += prediction_records(spec, split, examples, predictions)
    return metrics, records


def majority_baseline(spec: TaskSpec, prepared: Prepared) -> dict[str, float] | None:
    """Dev metrics of always predicting the most frequent training label (classification tasks; else None).

    What a model that learned nothing about the inputs scores: the floor a fine-tuned model is read against.
    """
    if not spec.kind_spec.majority_baseline:
        return None
    counts = np.bincount([int(f.label) for f in prepared.train_features], minlength=len(prepared.labels))
    constant = np.eye(len(prepared.labels), dtype=np.float32)[int(np.argmax(counts))]  # ties: the first label
    outputs = {split: [constant] * len(features) for split, features in prepared.eval_features.items()}
    metrics, _ = score(spec, prepared, outputs)
    return metrics


# ----------------------------------------------------------------------------- state and summaries


@dataclass
class FinetuneState(RunState):
    """Where a seed's run is: written with every epoch's checkpoint (`finetune_state.json`)."""

    STATE_FILE = FINETUNE_STATE
    NULL_FLOATS = {"best_score": -math.inf}

    epoch: int = 0  # epochs finished
    step: int = 0
    best_score: float = -math.inf
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)  # one entry per finished epoch: losses, metrics, time
    precision: str | None = None
    final: bool = False
    files: dict[str, int] = field(default_factory=dict)


def aggregate(runs: Sequence[dict[str, Any]], primary: str) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1) over seeds of every metric; the best seed by `primary`."""
    names = sorted({k for run in runs for k in run["metrics"]})
    mean, std = {}, {}
    for name in names:
        values = [v for v in (run["metrics"].get(name) for run in runs) if v is not None]
        if values:
            mean[name] = float(np.mean(values))
            std[name] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    best = max(runs, key=lambda r: r["metrics"].get(primary) if r["metrics"].get(primary) is not None else -math.inf)
    return {"mean": mean, "std": std, "best_seed": best["seed"]}
