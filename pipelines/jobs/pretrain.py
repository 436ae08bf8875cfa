"""`bertflow pretrain`: MLM + NSP pretraining as a Ray Train `TorchTrainer` job (DDP).

The driver validates everything it can before a worker starts (shards, vocabulary, sequence
length, batch arithmetic, MLflow), opens the MLflow run, and runs the trainer. Each worker:

    restore  -> the latest reported checkpoint (after a worker failure or a driver restart)
    build    -> model, DDP, optimiser, its own slice of the shard files
    step     -> micro-batches with gradient accumulation, clipping, schedule
    report   -> metrics to MLflow (rank 0, batched, asynchronous); checkpoints to Ray Train

Data: each rank reads its own part files (`files[rank::world]`); every epoch visits them in a
seeded order and the rows of each file in a seeded order, so a rank's stream is a pure function
of (seed, rank, world size) and the data position is one number: samples consumed per rank.
Randomness inside a step (dropout, dynamic masking) is seeded from (seed, rank, step), so an
exact resume needs no RNG state beyond the step. Resuming at step k therefore reproduces an
uninterrupted run bit for bit on CPU with the same number of workers.

Output dir:
    _ray/           Ray Train storage: step-XXXXXXXX checkpoints (config.json, model.safetensors,
                    tokenizer, optimizer.pt, train_state.json)
    mlflow_run.json the MLflow run this output dir logs into (a restart re-opens it)
    checkpoint/     the final checkpoint, copied out of _ray/ when training completes
    _manifest.json  written last: marks the job done
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from bert.config import PRESETS, BertConfig, preset
from bert.errors import InputError
from bert.fsutil import atomic_directory, write_json_atomic
from bert.shards import ShardSet, WorkerStream, read_rows

MANIFEST = "_manifest.json"
TRAIN_STATE = "train_state.json"
OPTIMIZER_STATE = "optimizer.pt"
RAY_STORAGE = "_ray"
RUN_NAME = "train"


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class PretrainConfig:
    """One pretraining phase. Defaults follow the BERT paper where it gives them."""

    shards: str
    out: str
    model: str = "tiny"  # preset name, or a checkpoint dir to start from (phase 2)
    val_shards: str | None = None
    num_workers: int = 1
    cpus_per_worker: int = 1
    use_gpu: bool = False
    placement_strategy: str = "PACK"  # SPREAD / STRICT_SPREAD: one worker per node
    global_batch_size: int = 256
    micro_batch_size: int = 32
    max_steps: int = 1000
    optimizer: str = "adamw"
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-6
    warmup_steps: int = 100
    schedule: str = "linear"  # linear | poly | constant
    poly_power: float = 1.0
    max_grad_norm: float = 1.0
    bf16: bool = True  # autocast on GPU; ignored on CPU
    compile: bool = False
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    eval_every: int = 200
    eval_examples: int = 2048
    log_every: int = 10
    seed: int = 12345
    stop_at_step: int | None = None  # stop early with a checkpoint (resume by re-running)
    time_limit_minutes: float | None = None  # same, after this much training time
    max_failures: int = 3
    experiment: str = "bertflow-pretrain"
    tracking_uri: str | None = None
    parent_run_id: str | None = None

    def __post_init__(self) -> None:
        for name in ("num_workers", "cpus_per_worker", "global_batch_size", "micro_batch_size", "max_steps",
                     "checkpoint_every", "eval_every", "log_every", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise InputError(f"pretrain: {name} must be positive, got {getattr(self, name)}")
        per_step = self.micro_batch_size * self.num_workers
        if self.global_batch_size % per_step:
            raise InputError(
                f"pretrain: global batch {self.global_batch_size} is not divisible by "
                f"workers x micro-batch = {self.num_workers} x {self.micro_batch_size} = {per_step}"
            )
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise InputError(f"pretrain: unknown placement_strategy {self.placement_strategy!r}")
        if self.optimizer not in ("adamw", "lamb"):
            raise InputError(f"pretrain: unknown optimizer {self.optimizer!r}; known: adamw, lamb")
        if self.schedule not in ("linear", "poly", "constant"):
            raise InputError(f"pretrain: unknown schedule {self.schedule!r}; known: linear, poly, constant")
        if not 0 <= self.warmup_steps < self.max_steps:
            raise InputError(f"pretrain: warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        if self.learning_rate <= 0:
            raise InputError(f"pretrain: learning_rate must be positive, got {self.learning_rate}")

    @property
    def accumulation_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.num_workers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- model


def resolve_model_config(config: PretrainConfig, shards: ShardSet) -> tuple[BertConfig, Path | None]:
    """The model to train, checked against the shards. Returns (config, init checkpoint dir or None)."""
    from bert.checkpoint import read_checkpoint_info
    from bert.tokenizer import Tokenizer

    if config.model in PRESETS:
        model_config = preset(config.model, vocab_size=shards.tokenizer.vocab_size)
        init = None
    else:
        init = Path(config.model)
        info = read_checkpoint_info(init)  # a clear error if it is neither a preset nor a checkpoint
        model_config = info.config
        if model_config.vocab_size != shards.tokenizer.vocab_size:
            raise InputError(
                f"shards {shards.path} were built with a {shards.tokenizer.vocab_size}-token vocabulary but checkpoint "
                f"{init} has vocab_size {model_config.vocab_size}: build the shards with the checkpoint's tokenizer"
            )
        fingerprint = Tokenizer.load(init).fingerprint() if Tokenizer.is_tokenizer_dir(init) else None
        if fingerprint and fingerprint != shards.tokenizer.fingerprint:
            raise InputError(
                f"shards {shards.path} were built with a different tokenizer than checkpoint {init} "
                f"(fingerprints {shards.tokenizer.fingerprint[:12]} vs {fingerprint[:12]})"
            )
    if shards.data.max_seq_length > model_config.max_position_embeddings:
        raise InputError(
            f"shards {shards.path} hold sequences of up to {shards.data.max_seq_length} tokens, above the model's "
            f"max_position_embeddings ({model_config.max_position_embeddings})"
        )
    return model_config, init


# ----------------------------------------------------------------------------- training loop (per worker)


def _step_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def collate(rows: list[dict], pad_id: int, max_predictions: int, masker=None, rng=None):
    """Pad a micro-batch: ids/types to its longest row, masked positions to `max_predictions`."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    B = len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    types = torch.zeros((B, width), dtype=torch.long)
    attention = torch.zeros((B, width), dtype=torch.long)
    positions = torch.zeros((B, max_predictions), dtype=torch.long)
    labels = torch.full((B, max_predictions), -100, dtype=torch.long)
    if masker is not None:  # dynamic masking: mask now, with this step's generator
        masked = masker([r["input_ids"] for r in rows], rng)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        if masker is not None:
            ids[b, :n] = torch.as_tensor(masked.input_ids[b, :n], dtype=torch.long)
            k = int(masked.masked_lm_weights[b].sum())
            pos, lab = masked.masked_lm_positions[b, :k], masked.masked_lm_ids[b, :k]
        else:
            ids[b, :n] = torch.as_tensor(r["input_ids"], dtype=torch.long)
            pos, lab = r["masked_lm_positions"], r["masked_lm_ids"]
        types[b, :n] = torch.as_tensor(r["token_type_ids"], dtype=torch.long)
        attention[b, :n] = 1
        k = len(pos)
        positions[b, :k] = torch.as_tensor(pos, dtype=torch.long)
        labels[b, :k] = torch.as_tensor(lab, dtype=torch.long)
    nsp = torch.as_tensor([int(r["next_sentence_label"]) for r in rows], dtype=torch.long)
    return ids, types, attention, positions, labels, nsp


def make_masker(shards: ShardSet):
    """Dynamic masking with the shards' own masking config, or None for statically masked shards."""
    if not shards.data.dynamic_masking:
        return None
    from bert.pretraining_data import SpecialTokens, mask_batch
    from bert.tokenizer import Tokenizer

    special = SpecialTokens.of(Tokenizer.load(shards.tokenizer.dir))
    return lambda ids, rng: mask_batch(ids, shards.data, special, rng)


def measure_peak_flops(device, dtype, seconds: float = 0.5) -> float:
    """Achievable dense matmul FLOP/s on this worker's device (the MFU denominator)."""
    import torch

    n = 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * count / (time.perf_counter() - start)


def checkpoint_complete(directory: Path) -> bool:
    """A training checkpoint is usable when train_state.json lists files that all exist at their sizes."""
    state_file = directory / TRAIN_STATE
    if not state_file.is_file():
        return False
    try:
        files = json.loads(state_file.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return False
    return all((directory / name).is_file() and (directory / name).stat().st_size == size for name, size in files.items())


def latest_checkpoint(out: Path) -> Path | None:
    root = out / RAY_STORAGE / RUN_NAME
    candidates = sorted(root.glob("step-*")) if root.is_dir() else []
    for directory in reversed(candidates):
        if checkpoint_complete(directory):
            return directory
    return None


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from bert.checkpoint import from_pretrained, save_pretrained
    from bert.model import BertForPreTraining, flops_per_token
    from bert.optim import build_optimizer, clip_grad_norm, lr_multiplier
    from pipelines.ray_runtime import worker_progress
    from pipelines.tracking import MetricLogger, RunHandle

    config = PretrainConfig(**loop_config["config"])
    model_config = BertConfig(**loop_config["model_config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(config.cpus_per_worker)
    out = Path(config.out)
    (out / "_workers").mkdir(parents=True, exist_ok=True)
    # who is doing the work, for operators (and the fault and multi-node tests)
    write_json_atomic(out / "_workers" / f"rank{rank}.json",
                      {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()})

    shards = ShardSet.open(config.shards)
    tokenizer_dir = shards.tokenizer.dir

    # ---- restore
    checkpoint = ray.train.get_checkpoint()
    resume_dir = None
    state: dict[str, Any] = {"step": 0, "tokens_seen": 0, "samples_per_rank": 0}
    if checkpoint is not None:
        resume_dir = Path(checkpoint.to_directory())
    elif loop_config.get("resume_from"):
        resume_dir = Path(loop_config["resume_from"])
    if resume_dir is not None:
        state = json.loads((resume_dir / TRAIN_STATE).read_text())
        model = from_pretrained(resume_dir, head="pretraining")
    elif loop_config.get("init_checkpoint"):
        model = from_pretrained(loop_config["init_checkpoint"], head="pretraining")
    else:
        torch.manual_seed(config.seed)
        model = BertForPreTraining(model_config)
    if resume_dir is not None and state.get("world_size", world) != world:
        warnings.warn(
            f"resuming a run trained with {state['world_size']} workers on {world}: data order differs from an "
            "uninterrupted run"
        )

    # ---- build
    model = ray.train.torch.prepare_model(model)
    raw_model = model.module if hasattr(model, "module") else model
    if config.compile:
        model = torch.compile(model)
    optimizer = build_optimizer(
        raw_model, config.optimizer, lr=config.learning_rate, weight_decay=config.weight_decay,
        betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
    )
    if resume_dir is not None:
        optimizer.load_state_dict(torch.load(resume_dir / OPTIMIZER_STATE, map_location=device, weights_only=True))
    for group in optimizer.param_groups:
        group["initial_lr"] = config.learning_rate
    autocast_dtype = torch.bfloat16 if (device.type == "cuda" and config.bf16) else None
    peak = measure_peak_flops(device, autocast_dtype or torch.float32)
    stream = WorkerStream(shards, rank, world, config.seed)
    batches = stream.batches(config.micro_batch_size, state["samples_per_rank"])
    masker = make_masker(shards)
    handle = RunHandle(**loop_config["mlflow"]) if (rank == 0 and loop_config.get("mlflow")) else None
    logger = MetricLogger(handle)
    if state["step"] == 0:
        logger.log_params({"pretrain": config.to_dict(), "model": model_config.to_dict(),
                           "world_size": world, "accumulation_steps": config.accumulation_steps})
    evaluator = Evaluator.build(config, rank, world, device, raw_model.config.pad_token_id) if config.val_shards else None
    flops_tok = flops_per_token(raw_model.config, shards.data.max_seq_length, shards.data.max_predictions_per_seq)

    def save_checkpoint(step: int, final: bool) -> None:
        import tempfile

        metrics = {"step": step, "tokens_seen": state["tokens_seen"]}
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            directory = save_pretrained(raw_model, Path(tmp) / "ckpt", tokenizer_dir=tokenizer_dir)
            torch.save(optimizer.state_dict(), directory / OPTIMIZER_STATE)
            files = {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file()}
            train_state = {**state, "step": step, "world_size": world, "files": files, "final": final,
                           "rng": {"scheme": "seeded per (seed, rank, step)", "seed": config.seed}}
            (directory / TRAIN_STATE).write_text(json.dumps(train_state, indent=2))
            if final and logger.active:
                logger.log_artifacts(directory, "checkpoint")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                             checkpoint_dir_name=f"step-{step:08d}")

    # ---- step
    model.train()
    start_time, last_log_time, last_log_tokens = time.time(), time.time(), state["tokens_seen"]
    step = state["step"]
    window = torch.zeros(6, dtype=torch.float64)  # loss, mlm_loss, nsp_loss, mlm correct, mlm count, nsp correct
    window_examples = 0
    stop_reason = None
    while step < config.max_steps:
        lr = config.learning_rate * lr_multiplier(step, warmup_steps=config.warmup_steps, total_steps=config.max_steps,
                                                  schedule=config.schedule, power=config.poly_power)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        step_tokens = 0
        for micro in range(config.accumulation_steps):
            torch.manual_seed(_step_seed(config.seed, rank, step, micro))
            rng = np.random.default_rng([config.seed, rank, step, micro])
            ids, types, attention, positions, labels, nsp = (
                t.to(device) for t in collate(next(batches), raw_model.config.pad_token_id,
                                              shards.data.max_predictions_per_seq, masker, rng)
            )
            sync = micro == config.accumulation_steps - 1
            context = model.no_sync() if (world > 1 and not sync and hasattr(model, "no_sync")) else contextlib.nullcontext()
            with context, torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = model(ids, types, attention, positions, labels, nsp)
                (out.loss / config.accumulation_steps).backward()
            with torch.no_grad():
                real = labels != -100
                window += torch.tensor([
                    float(out.loss), float(out.mlm_loss), float(out.nsp_loss),
                    float((out.mlm_logits.argmax(-1) == labels)[real].sum()), float(real.sum()),
                    float((out.nsp_logits.argmax(-1) == nsp).sum()),
                ], dtype=torch.float64)
            window_examples += len(nsp)
            step_tokens += int(attention.sum())
            state["samples_per_rank"] += len(nsp)
        grad_norm = clip_grad_norm(raw_model.parameters(), config.max_grad_norm)
        optimizer.step()
        step += 1
        if world > 1:  # real (non-padding) tokens of all ranks
            step_tokens_t = torch.tensor([step_tokens], dtype=torch.int64)
            dist.all_reduce(step_tokens_t)
            step_tokens = int(step_tokens_t.item())
        state["tokens_seen"] += step_tokens

        if step % config.log_every == 0 or step == config.max_steps:
            if world > 1:
                dist.all_reduce(window)
                stats = torch.tensor([window_examples], dtype=torch.float64)
                dist.all_reduce(stats)
                examples = float(stats[0])
            else:
                examples = float(window_examples)
            micro_batches = examples / config.micro_batch_size
            now = time.time()
            tokens_per_s = (state["tokens_seen"] - last_log_tokens) / max(now - last_log_time, 1e-9)
            metrics = {
                "loss": window[0].item() / micro_batches,
                "mlm_loss": window[1].item() / micro_batches,
                "nsp_loss": window[2].item() / micro_batches,
                "mlm_accuracy": window[3].item() / max(window[4].item(), 1.0),
                "nsp_accuracy": window[5].item() / max(examples, 1.0),
                "learning_rate": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_s,
                "tokens_per_s_per_worker": tokens_per_s / world,
                "mfu": tokens_per_s / world * flops_tok / peak,
                "tokens_seen": float(state["tokens_seen"]),
            }
            logger.log_metrics(metrics, step)
            if rank == 0:
                elapsed = now - start_time
                done = step - loop_config["start_step"]
                eta = elapsed / max(done, 1) * (config.max_steps - step)
                worker_progress(f"[pretrain] step {step}/{config.max_steps} loss {metrics['loss']:.4f} "
                                f"mlm_acc {metrics['mlm_accuracy']:.3f} nsp_acc {metrics['nsp_accuracy']:.3f} "
                                f"lr {lr:.2e} {tokens_per_s:,.0f} tok/s mfu {metrics['mfu']:.1%} eta {eta / 60:.1f} min")
            window.zero_()
            window_examples = 0
            last_log_time, last_log_tokens = now, state["tokens_seen"]
            if config.time_limit_minutes is not None:
                over = torch.tensor([float(now - start_time > config.time_limit_minutes * 60)])
                if world > 1:
                    dist.all_reduce(over, op=dist.ReduceOp.MAX)
                if over.item():
                    stop_reason = "time limit"

        # a one-shot stop: a re-run that resumes at or past it trains on to the end
        if config.stop_at_step is not None and loop_config["start_step"] < config.stop_at_step <= step < config.max_steps:
            stop_reason = f"stop_at_step={config.stop_at_step}"
        final = step == config.max_steps
        if evaluator is not None and (step % config.eval_every == 0 or final or stop_reason):
            logger.log_metrics(evaluator.evaluate(raw_model, autocast_dtype), step)
            model.train()
        if final or stop_reason or step % config.checkpoint_every == 0:
            save_checkpoint(step, final)
        if stop_reason:
            if rank == 0:
                worker_progress(f"[pretrain] stopping at step {step} ({stop_reason}); re-run the same command to resume")
            break
    logger.close()


@dataclass
class Evaluator:
    """Held-out MLM and NSP accuracy on a fixed set of validation examples, split across ranks."""

    batches: list
    world: int

    @classmethod
    def build(cls, config: PretrainConfig, rank: int, world: int, device, pad_id: int) -> Evaluator:
        val = ShardSet.open(config.val_shards, "validation shards")
        rows = read_rows(val, config.eval_examples)[rank::world]
        masker = make_masker(val)
        batches = []
        for i in range(0, len(rows), config.micro_batch_size):
            rng = np.random.default_rng([config.seed, 7, rank, i])  # fixed masks for every evaluation
            batch = collate(rows[i : i + config.micro_batch_size], pad_id, val.data.max_predictions_per_seq, masker, rng)
            batches.append(tuple(t.to(device) for t in batch))
        return cls(batches, world)

    def evaluate(self, model, autocast_dtype) -> dict[str, float]:
        import torch
        import torch.distributed as dist

        model.eval()
        counts = torch.zeros(4, dtype=torch.float64)  # mlm correct, mlm total, nsp correct, nsp total
        device = next(model.parameters()).device
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            for ids, types, attention, positions, labels, nsp in self.batches:
                out = model(ids, types, attention, positions)
                real = labels != -100
                counts += torch.tensor([
                    float((out.mlm_logits.argmax(-1) == labels)[real].sum()), float(real.sum()),
                    float((out.nsp_logits.argmax(-1) == nsp).sum()), float(len(nsp)),
                ], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(counts)
        return {"val_mlm_accuracy": counts[0].item() / max(counts[1].item(), 1.0),
                "val_nsp_accuracy": counts[2].item() / max(counts[3].item(), 1.0)}


def majority_baseline(shards: ShardSet, limit: int, seed: int) -> float:
    """Accuracy of always predicting the most frequent masked token, on the evaluator's examples and masks."""
    rows = read_rows(shards, limit)
    masker = make_masker(shards)
    counts: dict[int, int] = {}
    for i in range(0, len(rows), 256):
        chunk = rows[i : i + 256]
        if masker is not None:
            masked = masker([r["input_ids"] for r in chunk], np.random.default_rng([seed, 8, i]))
            ids = masked.masked_lm_ids[masked.masked_lm_weights > 0]
        else:
            ids = [t for r in chunk for t in r["masked_lm_ids"]]
        for t in ids:
            counts[int(t)] = counts.get(int(t), 0) + 1
    total = sum(counts.values())
    return max(counts.values()) / total if total else 0.0


# ----------------------------------------------------------------------------- driver


def absolute_paths(config: PretrainConfig) -> PretrainConfig:
    """Path fields made absolute for the workers; `model` too when it names a checkpoint, not a preset."""
    from pipelines.config_args import resolve_paths

    return resolve_paths(config, ("shards", "out", "val_shards") + (() if config.model in PRESETS else ("model",)))


def run_pretraining(config: PretrainConfig) -> dict[str, Any]:
    """Validate, open the MLflow run, train with Ray Train, export the final checkpoint. Returns the manifest."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.ray_runtime import ensure_ray
    from pipelines.tracking import default_tracking_uri, finish_run, open_run

    config = absolute_paths(config)
    out = Path(config.out)
    if (out / MANIFEST).is_file():
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("config") == config.to_dict():
            print(f"[pretrain] {out} is complete (step {manifest['step']}); nothing to do")
            return manifest
        raise InputError(f"{out} holds a finished pretraining run with a different config; choose another --out")

    # Everything checkable is checked here, before any worker starts.
    shards = ShardSet.open(config.shards)
    if len(shards.files) < config.num_workers:
        raise InputError(
            f"shards dir {shards.path} has {len(shards.files)} part file(s) for {config.num_workers} workers; "
            f"each worker reads its own files: rebuild with --num-shards >= {config.num_workers}"
        )
    model_config, init = resolve_model_config(config, shards)
    val = None
    if config.val_shards:
        val = ShardSet.open(config.val_shards, "validation shards")
        if val.tokenizer.fingerprint != shards.tokenizer.fingerprint:
            raise InputError(f"validation shards {val.path} were built with a different tokenizer than {shards.path}")
        if val.data.max_seq_length > model_config.max_position_embeddings:
            raise InputError(f"validation shards {val.path} hold sequences longer than max_position_embeddings")

    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = config.tracking_uri or default_tracking_uri(out)
    run_file = out / "mlflow_run.json"
    previous = json.loads(run_file.read_text()) if run_file.is_file() else None
    handle = open_run(
        tracking_uri, config.experiment, run_name=f"pretrain-{out.name}",
        run_id=previous["run_id"] if previous and previous.get("tracking_uri") == tracking_uri else None,
        parent_run_id=config.parent_run_id, tags={"bertflow.stage": "pretrain", "bertflow.out": str(out)},
    )
    if handle is not None:
        write_json_atomic(run_file, {"tracking_uri": handle.tracking_uri, "run_id": handle.run_id})
    baseline = majority_baseline(val, config.eval_examples, config.seed) if val else None

    resume = latest_checkpoint(out)
    start_step = json.loads((resume / TRAIN_STATE).read_text())["step"] if resume else 0
    if resume:
        print(f"[pretrain] resuming from {resume} (step {start_step})", flush=True)
    loop_config = {
        "config": config.to_dict(),
        "model_config": model_config.to_dict(),
        "init_checkpoint": str(init) if init else None,
        "resume_from": str(resume) if resume else None,
        "start_step": start_step,
        "mlflow": {"tracking_uri": handle.tracking_uri, "run_id": handle.run_id} if handle else None,
    }
    ensure_ray()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})},
            placement_strategy=config.placement_strategy,
        ),
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if config.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=RUN_NAME,
            storage_path=str(out / RAY_STORAGE),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
        ),
    )
    try:
        trainer.fit()
    except Exception:
        finish_run(handle, "FAILED")
        raise
    last = latest_checkpoint(out)
    state = json.loads((last / TRAIN_STATE).read_text())
    if not state.get("final"):
        finish_run(handle, "KILLED")
        return {"complete": False, "step": state["step"], "checkpoint": str(last)}
    with atomic_directory(out / "checkpoint") as tmp:
        for item in last.iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
    manifest = {
        "complete": True,
        "config": config.to_dict(),
        "model": model_config.to_dict(),
        "step": state["step"],
        "tokens_seen": state["tokens_seen"],
        "checkpoint": str(out / "checkpoint"),
        "val_mlm_majority_baseline": baseline,
        "mlflow": {"tracking_uri": handle.tracking_uri, "run_id": handle.run_id} if handle else None,
    }
    if handle is not None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(handle.tracking_uri)
        history = {}
        for key in ("val_mlm_accuracy", "val_nsp_accuracy", "loss"):
            values = client.get_metric_history(handle.run_id, key)
            if values:
                history[key] = max(values, key=lambda m: m.step).value
        manifest["final_metrics"] = history
        if baseline is not None:
            client.log_metric(handle.run_id, "val_mlm_majority_baseline", baseline)
    write_json_atomic(out / MANIFEST, manifest)
    finish_run(handle)
    return manifest


def describe_finish(manifest: dict) -> str:
    if not manifest.get("complete"):
        return f"stopped at step {manifest['step']}; re-run the same command to resume from {manifest['checkpoint']}"
    metrics = manifest.get("final_metrics", {})
    parts = [f"done: step {manifest['step']}, {manifest['tokens_seen']:,} tokens, checkpoint {manifest['checkpoint']}"]
    if "val_mlm_accuracy" in metrics:
        parts.append(f"val MLM acc {metrics['val_mlm_accuracy']:.4f} (majority baseline "
                     f"{manifest['val_mlm_majority_baseline']:.4f}), val NSP acc {metrics.get('val_nsp_accuracy', math.nan):.4f}")
    return "; ".join(parts)
