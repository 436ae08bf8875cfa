"""`bertflow finetune`: one generic fine-tune function for every row of the task table, on Ray Train.

The driver reads and checks everything before a worker starts: the task name, the data files
(missing columns, ragged rows, unseen dev labels, empty splits: the readers name file and line),
the checkpoint, and whether the checkpoint's vocabulary matches its tokenizer. It featurizes
train and eval data once and puts them in the Ray object store. Then, for each seed, one
`TorchTrainer` run (1 worker by default, N with DDP). Each worker:

    restore  -> the starting checkpoint, with the task's head (initialised from the seed)
    build    -> freezing, parameter groups with layer-wise learning-rate decay, AdamW
    step     -> length-grouped, dynamically padded batches; warmup then linear decay; clipping
    report   -> after every epoch: dev metrics (rank 0 logs them to MLflow); a checkpoint, with
                the epoch's dev predictions, whenever the task's primary metric improves

With several workers every global batch of `batch_size` examples is split across the ranks
(`batch[rank::world]`), so the optimisation is that of one worker with the same batch size; a
final batch smaller than the number of workers is dropped. Evaluation splits the dev batches
across ranks and gathers the outputs on rank 0, which post-processes them in feature order.

Output dir (DESIGN.md, "Fine-tune output dir"):
    metrics.json        best-epoch dev metrics, per-epoch history, skipped examples, config (written last)
    predictions.jsonl   one line per eval example of the best epoch: split, id, prediction, gold
    checkpoint/         our checkpoint dir (weights, tokenizer files, labels, bertflow_task.json)
With `--seeds 1,2,3`: one such dir per seed under `seed-<n>/`, and at the top a metrics.json with
the mean and sample standard deviation over seeds; the top-level predictions.jsonl and
checkpoint/ are copies of the best seed's (highest primary metric).

MLflow: one run per (task, seed). With several seeds the job opens a parent run (nested under
`--parent-run-id` when given) and one nested run per seed; with one seed the run itself is
nested under `--parent-run-id`. Each seed's run gets params, per-epoch metrics, metrics.json,
predictions.jsonl and the model as an `mlflow.pyfunc` model (`bert.inference`).

Re-running a finished job does nothing; a seed whose `metrics.json` exists with the same
config is not trained again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bert.errors import InputError
from bert.fsutil import atomic_directory, write_json_atomic

RAY_STORAGE = "_ray"
EVAL_FILE = "eval.json"
PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning job. Defaults follow the BERT paper's GLUE recipe where it gives them."""

    task: str
    data: str  # the task's directory (e.g. glue/MRPC), or a datasets root holding the task's subdir
    checkpoint: str  # our checkpoint dir or a Hugging Face BERT dir
    out: str
    tokenizer: str | None = None  # tokenizer dir; default: the checkpoint dir
    learning_rate: float = 2e-5
    batch_size: int = 32  # global: split across workers
    eval_batch_size: int = 64
    epochs: float = 3.0
    max_seq_length: int | None = None  # default: the task row's
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    adam_eps: float = 1e-6
    seed: int = 42
    seeds: str | None = None  # "1,2,3": one training run per seed, mean +- std reported
    freeze_encoder: bool = False  # feature extraction: train the head only
    freeze_layers: int = 0  # freeze the embeddings and the bottom K Transformer layers
    layer_lr_decay: float = 1.0  # head lr x d^0, top layer d^1, ..., embeddings d^(L+1)
    max_train_examples: int | None = None  # the first N (deterministic)
    max_eval_examples: int | None = None  # the first N of every eval split
    num_workers: int = 1
    cpus_per_worker: int = 1
    threads_per_worker: int | None = None  # torch threads; default: this node's cores / workers
    use_gpu: bool = False
    log_every: int = 20
    experiment: str = "bertflow-finetune"
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    log_model: bool = True  # log the checkpoint as an mlflow.pyfunc model

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_batch_size", "num_workers", "cpus_per_worker", "log_every"):
            if getattr(self, name) <= 0:
                raise InputError(f"finetune: {name} must be positive, got {getattr(self, name)}")
        for name in ("max_train_examples", "max_eval_examples", "max_seq_length", "threads_per_worker"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise InputError(f"finetune: {name} must be positive, got {value}")
        if self.batch_size % self.num_workers:
            raise InputError(
                f"finetune: batch_size {self.batch_size} is not divisible by num_workers {self.num_workers} "
                "(each global batch is split evenly across workers)"
            )
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise InputError(f"finetune: learning_rate must be positive, got {self.learning_rate}")
        if not self.epochs > 0:
            raise InputError(f"finetune: epochs must be positive, got {self.epochs}")
        if not 0 <= self.warmup_ratio < 1:
            raise InputError(f"finetune: warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise InputError("finetune: weight_decay and max_grad_norm must be >= 0")
        if not 0 < self.layer_lr_decay <= 1:
            raise InputError(f"finetune: layer_lr_decay must be in (0, 1], got {self.layer_lr_decay}")
        if self.freeze_layers < 0:
            raise InputError(f"finetune: freeze_layers must be >= 0, got {self.freeze_layers}")
        if self.freeze_encoder and self.freeze_layers:
            raise InputError("finetune: --freeze-encoder already freezes every layer; drop --freeze-layers")
        self.seed_list  # parse --seeds now: a bad list is an input error before anything starts

    @property
    def seed_list(self) -> tuple[int, ...]:
        if self.seeds is None:
            return (self.seed,)
        try:
            seeds = tuple(int(s) for s in str(self.seeds).split(",") if s.strip())
        except ValueError:
            raise InputError(f"finetune: --seeds must be comma-separated integers, got {self.seeds!r}") from None
        if not seeds or len(set(seeds)) != len(seeds):
            raise InputError(f"finetune: --seeds must list distinct integers, got {self.seeds!r}")
        return seeds

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def absolute_paths(config: FinetuneConfig) -> FinetuneConfig:
    from pipelines.config_args import resolve_paths

    return resolve_paths(config, ("data", "checkpoint", "out", "tokenizer"))


# ----------------------------------------------------------------------------- data (driver side)


@dataclass
class Prepared:
    """A task's data, read, checked and featurized once on the driver; shipped to workers via the object store."""

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


def resolve_data_dir(spec, data: str | Path) -> Path:
    """The task directory itself, or `<datasets root>/<task subdir>` when given a root."""
    data = Path(data)
    if not data.is_dir():
        raise InputError(f"data dir {data} does not exist")
    nested = data / spec.subdir
    return nested if nested.is_dir() else data


def check_model_inputs(config: FinetuneConfig):
    """Checkpoint, tokenizer and sequence length agree. Returns (checkpoint info, tokenizer, max_seq_length)."""
    from bert.checkpoint import read_checkpoint_info
    from bert.tasks import get_task
    from bert.tokenizer import Tokenizer

    spec = get_task(config.task)
    info = read_checkpoint_info(config.checkpoint)
    tokenizer_dir = Path(config.tokenizer or config.checkpoint)
    if not Tokenizer.is_tokenizer_dir(tokenizer_dir):
        raise InputError(
            f"{tokenizer_dir}: no tokenizer files (vocab.txt, or tokenizer_config.json with its model file); "
            "pass --tokenizer DIR"
        )
    tokenizer = Tokenizer.load(tokenizer_dir)
    if tokenizer.vocab_size != info.config.vocab_size:
        raise InputError(
            f"checkpoint {info.path} has vocab_size {info.config.vocab_size} but the tokenizer in {tokenizer_dir} "
            f"has {tokenizer.vocab_size} tokens: use the tokenizer the checkpoint was trained with"
        )
    if tokenizer.pad_id != info.config.pad_token_id:
        raise InputError(
            f"checkpoint {info.path} has pad_token_id {info.config.pad_token_id} but the tokenizer in {tokenizer_dir} "
            f"pads with id {tokenizer.pad_id}"
        )
    max_seq_length = config.max_seq_length or spec.max_seq_length
    if max_seq_length > info.config.max_position_embeddings:
        raise InputError(
            f"max_seq_length {max_seq_length} is above the checkpoint's max_position_embeddings "
            f"({info.config.max_position_embeddings})"
        )
    layers = info.config.num_hidden_layers
    if config.freeze_layers > layers:
        raise InputError(f"--freeze-layers {config.freeze_layers}: the checkpoint has only {layers} layers")
    return info, tokenizer, tokenizer_dir, max_seq_length


def prepare(config: FinetuneConfig) -> Prepared:
    """Read, cut (`--max-*-examples`: the first N), check and featurize the task's data."""
    from bert.tasks import get_task

    spec = get_task(config.task)
    _, tokenizer, tokenizer_dir, max_seq_length = check_model_inputs(config)
    data = spec.reader(resolve_data_dir(spec, config.data))
    train = tuple(data.train[: config.max_train_examples])
    evals = {split: tuple(examples[: config.max_eval_examples]) for split, examples in data.evals.items()}
    if not train:
        raise InputError(f"task {spec.name}: no training examples in {config.data}")
    for split, examples in evals.items():
        if not examples:
            raise InputError(f"task {spec.name}: eval split {split!r} in {config.data} has no examples")
    split = spec.primary_metric.split("/")[0]
    if split not in evals:
        raise InputError(f"task {spec.name}: primary metric {spec.primary_metric} needs eval split {split!r}, "
                         f"found {sorted(evals)}")
    if spec.kind in ("classification", "token_classification") and len(data.labels) < 2:
        raise InputError(f"task {spec.name}: the train file of {config.data} has {len(data.labels)} label(s) "
                         f"{list(data.labels)}; classification needs at least 2")
    if spec.positive_label is not None and spec.positive_label not in data.labels:
        raise InputError(f"task {spec.name}: F1 is of the class {spec.positive_label!r}, but the train file of "
                         f"{config.data} has labels {list(data.labels)} (name the positive class: positive=LABEL)")
    return Prepared(
        task=spec.name,
        labels=tuple(data.labels),
        max_seq_length=max_seq_length,
        pad_id=tokenizer.pad_id,
        tokenizer_dir=str(tokenizer_dir),
        train_features=spec.featurize(train, tokenizer, data.labels, max_seq_length),
        eval_examples=evals,
        eval_features={s: spec.featurize(ex, tokenizer, data.labels, max_seq_length) for s, ex in evals.items()},
        skipped=dict(data.skipped),
        num_train_examples=len(train),
    )


# ----------------------------------------------------------------------------- model pieces (worker side)


def freeze(model, *, encoder: bool, layers: int) -> None:
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


def layerwise_groups(model, weight_decay: float, decay: float) -> list[dict]:
    """Parameter groups with an `lr_scale`: head (and pooler) decay^0, top layer decay^1 ... embeddings decay^(L+1).

    Each part is split by `bert.optim.param_groups` into weight matrices (weight decay) and
    biases / LayerNorm (none). Frozen parameters are left out.
    """
    from torch import nn

    from bert.optim import param_groups

    layers = model.bert.encoder.layer
    L = len(layers)
    head = nn.ModuleList(m for name, m in model.named_children() if name != "bert")  # classifier / qa_outputs
    if getattr(model.bert, "pooler", None) is not None:
        head.append(model.bert.pooler)
    parts: list[tuple[nn.Module, float]] = [(head, 1.0), (model.bert.embeddings, decay ** (L + 1))]
    parts += [(layer, decay ** (L - i)) for i, layer in enumerate(layers)]
    groups = []
    for module, scale in parts:
        for group in param_groups(module, weight_decay):
            if group["params"]:
                groups.append({**group, "lr_scale": scale})
    return groups


def schedule_steps(num_train: int, config: FinetuneConfig, world: int) -> tuple[int, int, int]:
    """(global batches per epoch, total optimiser steps, warmup steps)."""
    per_epoch = num_train // config.batch_size + (1 if num_train % config.batch_size >= world else 0)
    total = max(1, round(config.epochs * per_epoch))
    return per_epoch, total, int(config.warmup_ratio * total)


def epoch_batches(lengths: Sequence[int], config: FinetuneConfig, seed: int, epoch: int, world: int) -> list[list[int]]:
    from bert.tasks import length_grouped_batches

    batches = length_grouped_batches(lengths, config.batch_size, seed, epoch)
    return [b for b in batches if len(b) >= world]


def json_number(value: float | None) -> float | None:
    """Finite floats as they are; NaN and +-inf as null (JSON has no such numbers)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def prediction_records(kind: str, split: str, examples: Sequence[Any], predictions: Sequence[Any]) -> list[dict]:
    """One JSON-ready line per eval example: split, id, prediction and gold."""
    records = []
    for ex, p in zip(examples, predictions):
        if kind == "span":
            records.append({"split": split, "id": ex.id, "prediction": p.answer, "best_span": p.text,
                            "score": json_number(p.score), "null_odds": json_number(p.null_odds),
                            "answers": [a.text for a in ex.answers]})
        elif kind == "token_classification":
            records.append({"split": split, "id": ex.id, "prediction": list(p), "label": list(ex.tags)})
        elif kind == "regression":
            records.append({"split": split, "id": ex.id, "prediction": float(p), "label": float(ex.label)})
        else:
            records.append({"split": split, "id": ex.id, "prediction": p, "label": ex.label})
    return records


def evaluate(model, prepared: Prepared, rank: int, world: int, device, batch_size: int):
    """Dev metrics and prediction records on rank 0 ((None, None) on other ranks)."""
    import torch.distributed as dist

    from bert.tasks import get_task
    from bert.inference import head_outputs, length_sorted_chunks

    spec = get_task(prepared.task)
    metrics: dict[str, float] = {}
    records: list[dict] = []
    primary_split = spec.primary_metric.split("/")[0]
    threshold = None
    # the primary split first: a task's decision threshold (SQuAD 2.0 no-answer) is chosen there
    for split in sorted(prepared.eval_features, key=lambda name: name != primary_split):
        features = prepared.eval_features[split]
        chunks = length_sorted_chunks(features, batch_size)
        mine = head_outputs(model, features, prepared.pad_id, chunks[rank::world], device)
        if world > 1:
            parts: list = [None] * world
            dist.all_gather_object(parts, mine)
            mine = {i: out for part in parts for i, out in part.items()}
        if rank != 0:
            continue
        examples = prepared.eval_examples[split]
        predictions = spec.postprocess(examples, features, [mine[i] for i in range(len(features))], prepared.labels)
        if spec.choose_threshold is not None:
            if threshold is None:
                threshold = spec.choose_threshold(predictions, examples)
                metrics[f"{primary_split}/threshold"] = threshold  # reported, and saved with the checkpoint
            predictions = spec.apply_threshold(predictions, threshold)
        metrics |= spec.score(split, predictions, examples)
        records += prediction_records(spec.kind, split, examples, predictions)
    model.train()
    return (metrics, records) if rank == 0 else (None, None)


# ----------------------------------------------------------------------------- training loop (per worker)


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker: restore -> build -> step -> report."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from bert.checkpoint import from_pretrained, save_pretrained
    from bert.optim import adamw, clip_grad_norm, lr_multiplier
    from bert.tasks import collate, get_task
    from bert.inference import HEAD_OF_KIND, write_task_file
    from pipelines.ray_runtime import worker_progress
    from pipelines.tracking import MetricLogger, RunHandle

    config = FinetuneConfig(**loop_config["config"])
    seed = loop_config["seed"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(config.threads_per_worker or max(1, (os.cpu_count() or 1) // world))
    prepared: Prepared = ray.get(loop_config["prepared"])
    spec = get_task(prepared.task)

    # ---- restore: the starting checkpoint with the task's head, initialised from the seed
    torch.manual_seed(seed)
    if spec.kind == "classification":
        model = from_pretrained(config.checkpoint, head=HEAD_OF_KIND[spec.kind], labels=prepared.labels)
    elif spec.kind == "token_classification":
        model = from_pretrained(config.checkpoint, head=HEAD_OF_KIND[spec.kind], labels=prepared.labels)
    elif spec.kind == "regression":
        model = from_pretrained(config.checkpoint, head=HEAD_OF_KIND[spec.kind], num_labels=1)
    else:
        model = from_pretrained(config.checkpoint, head=HEAD_OF_KIND[spec.kind])
    torch.manual_seed(seed * 1000 + rank)  # dropout: a different stream per rank, the same per (seed, rank)

    # ---- build
    freeze(model, encoder=config.freeze_encoder, layers=config.freeze_layers)
    groups = layerwise_groups(model, config.weight_decay, config.layer_lr_decay)
    model = ray.train.torch.prepare_model(model)
    raw_model = model.module if hasattr(model, "module") else model
    optimizer = adamw(groups, lr=config.learning_rate, eps=config.adam_eps)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    train = prepared.train_features
    lengths = [len(f.input_ids) for f in train]
    per_epoch, total_steps, warmup_steps = schedule_steps(len(train), config, world)
    handle = RunHandle(**loop_config["mlflow"]) if (rank == 0 and loop_config.get("mlflow")) else None
    logger = MetricLogger(handle)
    logger.log_params({"finetune": {k: v for k, v in config.to_dict().items() if k != "seeds"}, "seed": seed,
                       "world_size": world, "total_steps": total_steps, "warmup_steps": warmup_steps,
                       "train_examples": prepared.num_train_examples, "max_seq_length": prepared.max_seq_length,
                       "trainable_parameters": sum(p.numel() for p in trainable)})

    # ---- step
    model.train()
    step, best, history = 0, -math.inf, []
    start = time.time()
    for epoch in range(math.ceil(config.epochs)):
        epoch_loss, epoch_batches_done = 0.0, 0
        window_loss, window_steps = 0.0, 0
        for batch in epoch_batches(lengths, config, seed, epoch, world):
            if step == total_steps:
                break
            lr = config.learning_rate * lr_multiplier(step, warmup_steps=warmup_steps, total_steps=total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            inputs = {k: v.to(device) for k, v in collate([train[i] for i in batch[rank::world]], prepared.pad_id).items()}
            optimizer.zero_grad(set_to_none=True)
            loss = model(**inputs).loss
            loss.backward()
            grad_norm = clip_grad_norm(trainable, config.max_grad_norm)
            optimizer.step()
            step += 1
            loss_value = loss.item()
            epoch_loss += loss_value
            epoch_batches_done += 1
            window_loss += loss_value
            window_steps += 1
            if step % config.log_every == 0:
                logger.log_metrics({"train/loss": window_loss / window_steps, "train/learning_rate": lr,
                                    "train/grad_norm": grad_norm}, step)
                if rank == 0:
                    eta = (time.time() - start) / step * (total_steps - step)  # evaluations included, pro rata
                    worker_progress(f"[finetune {prepared.task} seed {seed}] step {step}/{total_steps} "
                                    f"loss {window_loss / window_steps:.4f} lr {lr:.2e} eta {eta / 60:.1f} min")
                window_loss, window_steps = 0.0, 0

        # ---- report: dev metrics every epoch; a checkpoint (with its predictions) when the primary metric improves
        metrics, records = evaluate(raw_model, prepared, rank, world, device, config.eval_batch_size)
        report: dict[str, Any] = {"epoch": epoch + 1, "step": step}
        checkpoint = None
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                score = metrics.get(spec.primary_metric, math.nan)
                entry = {"epoch": epoch + 1, "step": step, "train_loss": epoch_loss / max(epoch_batches_done, 1),
                         "elapsed_s": time.time() - start, "metrics": {k: json_number(v) for k, v in metrics.items()}}
                history.append(entry)
                logger.log_metrics({**metrics, "epoch": epoch + 1, "train/epoch_loss": entry["train_loss"]}, step)
                shown = {k: v for k, v in metrics.items() if k == spec.primary_metric or "_" not in k}
                worker_progress(f"[finetune {prepared.task} seed {seed}] epoch {epoch + 1}: "
                                + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
                report["history"] = json.dumps(history)
                first = len(history) == 1  # always keep the first epoch, so a checkpoint exists
                if first or (math.isfinite(score) and score > best):
                    best = score if math.isfinite(score) else best
                    directory = save_pretrained(raw_model, Path(tmp) / "ckpt", tokenizer_dir=prepared.tokenizer_dir)
                    write_task_file(directory, prepared.task, prepared.max_seq_length,
                                    threshold=metrics.get(f"{spec.primary_metric.split('/')[0]}/threshold"))
                    with open(directory / PREDICTIONS, "w", encoding="utf-8") as f:
                        for record in records:
                            f.write(json.dumps(record, allow_nan=False) + "\n")
                    (directory / EVAL_FILE).write_text(json.dumps(entry, indent=2, allow_nan=False))
                    checkpoint = ray.train.Checkpoint.from_directory(str(directory))
            ray.train.report(report, checkpoint=checkpoint,
                             checkpoint_dir_name=f"epoch-{epoch + 1:03d}" if checkpoint else None)
        if step == total_steps:
            break
    logger.close()


# ----------------------------------------------------------------------------- driver


def _same_config(metrics_file: Path, config: FinetuneConfig, seed: int) -> bool:
    if not metrics_file.is_file():
        return False
    done = json.loads(metrics_file.read_text())
    mine = {k: v for k, v in config.to_dict().items() if k not in ("seeds", "seed", "parent_run_id", "tracking_uri")}
    theirs = {k: v for k, v in done.get("config", {}).items() if k in mine}
    return done.get("seed") == seed and theirs == mine


def run_seed(config: FinetuneConfig, seed: int, prepared_ref, prepared: Prepared, seed_dir: Path,
             tracking_uri: str, parent_run_id: str | None) -> dict[str, Any]:
    """Train one seed with Ray Train; write metrics.json, predictions.jsonl, checkpoint/ under `seed_dir`."""
    import ray.train
    import ray.train.torch
    from ray.train.torch import TorchTrainer

    from pipelines.tracking import MetricLogger, finish_run, open_run

    if _same_config(seed_dir / METRICS, config, seed):
        print(f"[finetune] {seed_dir} is complete (seed {seed}); nothing to do", flush=True)
        return json.loads((seed_dir / METRICS).read_text())
    seed_dir.mkdir(parents=True, exist_ok=True)
    handle = open_run(tracking_uri, config.experiment, run_name=f"{config.task}-seed{seed}",
                      parent_run_id=parent_run_id,
                      tags={"bertflow.stage": "finetune", "bertflow.task": config.task, "bertflow.seed": str(seed),
                            "bertflow.out": str(seed_dir)})
    storage = Path(config.out) / RAY_STORAGE
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": config.to_dict(),
            "seed": seed,
            "prepared": prepared_ref,
            "mlflow": {"tracking_uri": handle.tracking_uri, "run_id": handle.run_id} if handle else None,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})},
        ),
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=f"seed-{seed}",
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),  # reported only on improvement: the best
        ),
    )
    start = time.time()
    try:
        result = trainer.fit()
    except Exception:
        finish_run(handle, "FAILED")
        raise
    train_time = time.time() - start
    history = json.loads(result.metrics["history"])
    with result.checkpoint.as_directory() as best_dir:
        best_dir = Path(best_dir)
        best = json.loads((best_dir / EVAL_FILE).read_text())
        with atomic_directory(seed_dir / "checkpoint") as tmp:
            for item in best_dir.iterdir():
                if item.is_file() and item.name not in (EVAL_FILE, PREDICTIONS):
                    shutil.copy2(item, tmp / item.name)
        tmp_predictions = seed_dir / f".{PREDICTIONS}.tmp"
        shutil.copy2(best_dir / PREDICTIONS, tmp_predictions)
        os.replace(tmp_predictions, seed_dir / PREDICTIONS)
    model_uri = _log_model(handle, seed_dir / "checkpoint") if (handle is not None and config.log_model) else None
    metrics = {
        "task": config.task,
        "seed": seed,
        "primary_metric": _primary(config.task),
        "metrics": best["metrics"],
        "best_epoch": best["epoch"],
        "best_step": best["step"],
        "history": history,
        "skipped": prepared.skipped,
        "num_train_examples": prepared.num_train_examples,
        "num_eval_examples": {split: len(ex) for split, ex in prepared.eval_examples.items()},
        "labels": list(prepared.labels),
        "max_seq_length": prepared.max_seq_length,
        "train_time_s": train_time,
        "config": config.to_dict(),
        "mlflow": {"tracking_uri": handle.tracking_uri, "run_id": handle.run_id, "model_uri": model_uri}
        if handle else None,
    }
    write_json_atomic(seed_dir / METRICS, metrics)
    if handle is not None:
        logger = MetricLogger(handle)
        logger.log_metrics({f"best/{k}": v for k, v in best["metrics"].items() if v is not None}
                           | {"best/epoch": best["epoch"]}, step=best["step"])
        logger.log_artifact(seed_dir / METRICS)
        logger.log_artifact(seed_dir / PREDICTIONS)
        logger.close()
    finish_run(handle)
    shutil.rmtree(storage / f"seed-{seed}", ignore_errors=True)
    with contextlib.suppress(OSError):
        storage.rmdir()  # only when empty
    return metrics


def _log_model(handle, checkpoint: Path) -> str | None:
    """Log the checkpoint as an `mlflow.pyfunc` model into the seed's run; returns its URI (None on failure)."""
    import warnings

    import mlflow

    from pipelines.pyfunc_model import log_pyfunc_model
    from pipelines.tracking import fluent_tracking_uri

    try:
        with fluent_tracking_uri(handle.tracking_uri), mlflow.start_run(run_id=handle.run_id):
            return log_pyfunc_model(checkpoint)
    except Exception as exc:  # noqa: BLE001 - tracking must never fail the job
        warnings.warn(f"could not log the pyfunc model to MLflow run {handle.run_id}: {exc}", stacklevel=2)
        return None


def _primary(task: str) -> str:
    from bert.tasks import get_task

    return get_task(task).primary_metric


def aggregate(runs: Sequence[dict[str, Any]], primary: str) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1) over seeds of every metric; the best seed by `primary`."""
    names = sorted({k for run in runs for k in run["metrics"]})
    mean, std = {}, {}
    for name in names:
        values = [run["metrics"].get(name) for run in runs]
        values = [v for v in values if v is not None]
        if values:
            mean[name] = float(np.mean(values))
            std[name] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    best = max(runs, key=lambda r: r["metrics"].get(primary) if r["metrics"].get(primary) is not None else -math.inf)
    return {"mean": mean, "std": std, "best_seed": best["seed"]}


def run_finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Validate, featurize, train every seed with Ray Train, write the output dir. Returns metrics.json's content."""
    import ray

    from bert.tasks import get_task
    from pipelines.ray_runtime import ensure_ray
    from pipelines.tracking import MetricLogger, default_tracking_uri, finish_run, open_run

    config = absolute_paths(config)
    spec = get_task(config.task)  # unknown task: the error lists the known ones
    out = Path(config.out)
    if (out / METRICS).is_file() and len(config.seed_list) > 1:
        done = json.loads((out / METRICS).read_text())
        if done.get("seeds") == list(config.seed_list) and all(
            _same_config(out / f"seed-{s}" / METRICS, config, s) for s in config.seed_list
        ):
            print(f"[finetune] {out} is complete; nothing to do", flush=True)
            return done
    if len(config.seed_list) == 1 and _same_config(out / METRICS, config, config.seed_list[0]):
        print(f"[finetune] {out} is complete; nothing to do", flush=True)
        return json.loads((out / METRICS).read_text())

    # Everything checkable is checked here, before any worker starts.
    prepared = prepare(config)
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = config.tracking_uri or default_tracking_uri(out)
    ensure_ray()
    prepared_ref = ray.put(prepared)

    seeds = config.seed_list
    if len(seeds) == 1:
        return run_seed(config, seeds[0], prepared_ref, prepared, out, tracking_uri, config.parent_run_id)

    parent = open_run(tracking_uri, config.experiment, run_name=f"finetune-{config.task}",
                      parent_run_id=config.parent_run_id,
                      tags={"bertflow.stage": "finetune", "bertflow.task": config.task, "bertflow.out": str(out)})
    try:
        runs = [run_seed(config, seed, prepared_ref, prepared, out / f"seed-{seed}", tracking_uri,
                         parent.run_id if parent else config.parent_run_id) for seed in seeds]
    except Exception:
        finish_run(parent, "FAILED")
        raise
    summary = aggregate(runs, spec.primary_metric)
    best_dir = out / f"seed-{summary['best_seed']}"
    with atomic_directory(out / "checkpoint") as tmp:
        for item in (best_dir / "checkpoint").iterdir():
            shutil.copy2(item, tmp / item.name)
    shutil.copy2(best_dir / PREDICTIONS, out / f".{PREDICTIONS}.tmp")
    os.replace(out / f".{PREDICTIONS}.tmp", out / PREDICTIONS)
    result = {
        "task": config.task,
        "seeds": list(seeds),
        "primary_metric": spec.primary_metric,
        "metrics": summary["mean"],
        "std": summary["std"],
        "best_seed": summary["best_seed"],
        "per_seed": {str(run["seed"]): run["metrics"] for run in runs},
        "skipped": prepared.skipped,
        "num_train_examples": prepared.num_train_examples,
        "num_eval_examples": {split: len(ex) for split, ex in prepared.eval_examples.items()},
        "train_time_s": sum(run["train_time_s"] for run in runs),
        "outputs": "predictions.jsonl and checkpoint/ are the best seed's (highest primary metric)",
        "config": config.to_dict(),
        "mlflow": {"tracking_uri": parent.tracking_uri, "run_id": parent.run_id} if parent else None,
    }
    write_json_atomic(out / METRICS, result)
    if parent is not None:
        logger = MetricLogger(parent)
        logger.log_metrics({f"mean/{k}": v for k, v in summary["mean"].items()}
                           | {f"std/{k}": v for k, v in summary["std"].items()}, 0)
        logger.log_artifact(out / METRICS)
        logger.close()
    finish_run(parent)
    return result


def describe(result: dict[str, Any]) -> str:
    primary = result["primary_metric"]
    value = result["metrics"].get(primary)
    if "std" in result:
        return (f"{result['task']}: {primary} {value:.4f} +- {result['std'].get(primary, 0.0):.4f} over seeds "
                f"{result['seeds']} (best seed {result['best_seed']})")
    shown = "n/a" if value is None else f"{value:.4f}"
    return f"{result['task']}: {primary} {shown} (best epoch {result['best_epoch']}, seed {result['seed']})"
