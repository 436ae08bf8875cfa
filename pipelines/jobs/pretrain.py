"""`bertflow pretrain`: MLM + NSP pretraining as a Ray Train job (DDP), around `bert/pretrain.py`.

Driver: check everything checkable (shards and their part files, vocabulary, sequence length,
batch arithmetic, the starting checkpoint) before a worker starts; claim and lock the output
dir (`pipelines/outdir.py`: absent, or an unfinished run with the same settings); open or
re-open the job's MLflow run; launch; copy the final checkpoint out. Each worker:

    restore  -> the newest complete checkpoint on disk (or Ray's, where storage is remote)
    build    -> model (DDP), optimiser, precision (bf16 where native and faster), its data stream
    step     -> `bert.pretrain.train_step` until max_steps, a stop step or the time limit
    report   -> metrics to MLflow (rank 0; steps a killed run logged are not logged again);
                held-out evaluation; checkpoints to Ray Train every `checkpoint_every` steps

Output dir:
    _job.json           which job and settings own the dir
    _ray/train/step-XXXXXXXX/  training checkpoints (model, tokenizer, optimizer.pt, train_state.json)
    _tmp/               checkpoint staging (emptied on every start)
    mlflow_run.json     the MLflow run this dir logs into
    checkpoint/         the final checkpoint, copied out when training completes
    _manifest.json      written last: marks the job done

`--out` may be an object-store URI (`s3://bucket/runs/x`): the same layout lives under it. Ray Train
stores there (`storage_filesystem`), bertflow uploads each checkpoint itself with its run-state record
last, behind the output lease's fence (`pipelines/jobs/launch.py` says why); a worker resumes from the
newest complete checkpoint on the store, downloaded into its node's cache, so a resume from the store
is bit-exact as one from disk. `_tmp/` is then a local temporary dir, and a killed run's torn
checkpoints are removed by the next run before its workers start. `--shards` and `--model` may be
URIs too (shards stream through `bert/shards.py`'s bounded cache; a checkpoint is downloaded once).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bert import storage
from bert.checkpoint import from_pretrained, read_checkpoint_info, tokenizer_mismatch
from bert.config import PRESETS, BertConfig, preset
from bert.errors import InputError
from bert.model import BertForPreTraining, flops_per_token
from bert.optim import build_optimizer
from bert.precision import probe_step
from bert.pretrain import (
    STATS,
    Evaluator,
    Masker,
    StepConfig,
    TrainState,
    measure_peak_flops,
    most_frequent_token_baseline,
    probe_loss,
    save_training_checkpoint,
    train_step,
    window_metrics,
)
from bert.run_state import load_optimizer_state
from bert.example_order import GlobalStream
from bert.shards import ShardSet, read_rows
from pipelines.jobs.configs import PretrainConfig, recorded_settings
from pipelines.jobs.launch import (
    Worker,
    agree_precision,
    all_reduce_sum,
    any_rank,
    copy_checkpoint_out,
    record_worker,
    remove_torn_checkpoints,
    report_checkpoint,
    restore_dir,
    train_on_ray,
)
from pipelines.jobs.launch import latest_checkpoint as latest_in
from pipelines.jobs.skeleton import Claimed, Job, run_job
from pipelines.ray_runtime import worker_progress
from pipelines.tracking import MetricLogger, final_metric_values, finish_run, last_logged_step

MANIFEST = "_manifest.json"
RAY_STORAGE = "_ray"
RUN_NAME = "train"
STAGING = "_tmp"


# ----------------------------------------------------------------------------- checks (driver)


def resolve_model_config(config: PretrainConfig, shards: ShardSet) -> tuple[BertConfig, storage.Location | None]:
    """The model to train, checked against the shards. Returns (config, init checkpoint dir or URI, or None)."""
    vocab = shards.tokenizer.vocab_size
    if config.model in PRESETS:
        model_config, init = preset(config.model, vocab_size=vocab), None
    else:
        init = config.model if storage.is_remote(config.model) else Path(config.model)
        with storage.named(init, local := storage.local_copy(init, "checkpoints")):
            model_config = read_checkpoint_info(local).config  # a clear error if it is neither a preset nor a checkpoint
        if model_config.vocab_size != vocab:
            raise InputError(f"shards {shards.path} were built with a {vocab}-token vocabulary but checkpoint "
                             f"{init} has vocab_size {model_config.vocab_size}: build the shards with the "
                             "checkpoint's tokenizer")
        mismatch = tokenizer_mismatch(local, shards.tokenizer_dir())  # vocabulary and casing
        if mismatch:
            raise InputError(f"shards {shards.path} were built with a different tokenizer than checkpoint {init}: "
                             f"{mismatch}; build them with --tokenizer {init}")
    model_config.check_sequence_length(shards.data.max_seq_length, f"shards {shards.path} hold sequences")
    return model_config, init


def preflight(config: PretrainConfig) -> tuple[ShardSet, ShardSet | None, BertConfig, storage.Location | None]:
    """Everything checkable, before any worker starts: (shards, validation shards, model config, init checkpoint)."""
    shards = ShardSet.open(config.shards)  # every worker reads the one global order (bert/example_order.py)
    model_config, init = resolve_model_config(config, shards)
    val = None
    if config.val_shards:
        val = ShardSet.open(config.val_shards, "validation shards")
        if val.tokenizer.fingerprint != shards.tokenizer.fingerprint:
            raise InputError(f"validation shards {val.path} were built with a different tokenizer than {shards.path}")
        model_config.check_sequence_length(val.data.max_seq_length, f"validation shards {val.path} hold sequences")
    return shards, val, model_config, init


# ----------------------------------------------------------------------------- checkpoints on disk


def checkpoints(out: storage.Location) -> storage.Location:
    """Where the training checkpoints of output `out` live (a dir, or a prefix on an object store)."""
    return storage.join(out, RAY_STORAGE, RUN_NAME)


def latest_checkpoint(out: storage.Location) -> storage.Location | None:
    """The newest complete training checkpoint under `out` (a killed save is never taken)."""
    return latest_in(checkpoints(out), TrainState)


# ----------------------------------------------------------------------------- driver


class PretrainJob(Job[PretrainConfig]):
    """`run_job(PretrainJob(), config)`: the skeleton's steps for pretraining (`pipelines/jobs/skeleton.py`)."""

    name = "pretrain"
    required = ("shards", "out")
    paths = ("shards", "out", "val_shards")

    def path_fields(self, config: PretrainConfig) -> tuple[str, ...]:
        return self.paths + (() if config.model in PRESETS else ("model",))  # a checkpoint dir, not a preset

    def finished(self, config: PretrainConfig) -> dict[str, Any] | None:
        return _finished(config.out, config)

    def preflight(self, config: PretrainConfig):
        return preflight(config)

    def inputs(self, config: PretrainConfig) -> list[Any]:
        return [config.shards, config.val_shards, None if config.model in PRESETS else config.model]

    def run_name(self, config: PretrainConfig) -> str:
        return f"pretrain-{storage.name(config.out)}"

    def run(self, claimed: Claimed[PretrainConfig], checked) -> dict[str, Any]:
        """Train with Ray Train from the newest checkpoint, then export the final checkpoint."""
        config, out, handle = claimed.config, claimed.out, claimed.run
        shards, val, model_config, init = checked
        _clear_staging(out)
        torn = remove_torn_checkpoints(checkpoints(out), TrainState)  # an object store's leftovers of a killed save
        if torn:
            print(f"[pretrain] removed {len(torn)} unfinished checkpoint(s) of a killed run: {', '.join(torn)}", flush=True)
        resume = latest_checkpoint(out)
        start = TrainState.read(resume) if resume else TrainState()
        if resume:
            print(f"[pretrain] resuming from {resume} (step {start.step})", flush=True)
        loop_config = {
            "config": config, "model_config": model_config, "init_checkpoint": init, "start_step": start.step,
            "mlflow": handle, "logged_through": last_logged_step(handle, "loss") if resume else None,
            "fence": claimed.lease.fence() if claimed.lease is not None else None,
        }
        try:
            low, high = config.worker_range
            train_on_ray(train_loop, loop_config, name=RUN_NAME, storage=storage.join(out, RAY_STORAGE),
                         num_workers=low if low == high else (low, high), use_gpu=config.use_gpu, cpus_per_worker=config.cpus_per_worker,
                         max_failures=config.max_failures, keep_checkpoints=config.keep_checkpoints,
                         placement_strategy=config.placement_strategy)
        finally:
            _clear_staging(out)
        baseline = most_frequent_token_baseline(val, config.eval_examples, config.seed) if val else None
        return _finish(out, config, model_config, handle, baseline, claimed.lease)


def run_pretraining(config: PretrainConfig) -> dict[str, Any]:
    """Check, claim the output dir, train with Ray Train, export the final checkpoint. Returns the manifest."""
    return run_job(PretrainJob(), config)


def accumulation(config: PretrainConfig, world: int) -> int:
    """Micro-batches per rank per step on `world` workers (the config checked that every count divides)."""
    return config.micro_batches_per_step // world


def run_progress(worker, message: str) -> None:
    if worker.rank == 0:
        worker_progress(f"[pretrain] {message}")


def _clear_staging(out: storage.Location) -> None:
    if not storage.is_remote(out):  # on an object store, checkpoints are staged in local temporary dirs
        shutil.rmtree(Path(out) / STAGING, ignore_errors=True)


def _finished(out: storage.Location, config: PretrainConfig) -> dict[str, Any] | None:
    """The manifest of a finished run of this config in `out` (nothing to do), else None."""
    if not storage.is_file(storage.join(out, MANIFEST)):
        return None
    manifest = storage.read_json(storage.join(out, MANIFEST))
    if recorded_settings(PretrainConfig, manifest.get("config", {})) != config.identity():
        raise InputError(f"{out} holds a finished pretraining run with other settings; choose another --out")
    return manifest


def _finish(out: storage.Location, config: PretrainConfig, model_config: BertConfig, handle, baseline: float | None,
            lease) -> dict:
    """After training: export the final checkpoint and write the manifest, last and behind the output's lease
    (or report where it stopped)."""
    last = latest_checkpoint(out)
    state = TrainState.read(last)
    if handle is not None and baseline is not None:  # a property of the held-out data: logged however training ended
        logger = MetricLogger(handle)
        logger.log_metrics({"val_mlm_majority_baseline": baseline}, state.step)
        logger.close()
    if not state.final:
        finish_run(handle, "KILLED")
        return {"complete": False, "step": state.step, "checkpoint": str(last), "val_mlm_majority_baseline": baseline}
    final = copy_checkpoint_out(last, storage.join(out, "checkpoint"))
    manifest = {
        "complete": True, "config": config.to_dict(), "model": model_config.to_dict(), "step": state.step,
        "tokens_seen": state.tokens_seen, "precision": state.precision, "checkpoint": str(final),
        "val_mlm_majority_baseline": baseline,
        "mlflow": dataclasses.asdict(handle) if handle else None,
        "final_metrics": final_metric_values(handle, ("val_mlm_accuracy", "val_nsp_accuracy", "val_mlm_loss", "loss")),
    }
    lease.commit(storage.join(out, MANIFEST), manifest)
    finish_run(handle)
    return manifest


def describe_finish(manifest: dict) -> str:
    if not manifest.get("complete"):
        return f"stopped at step {manifest['step']}; re-run the same command to resume from {manifest['checkpoint']}"
    metrics = manifest.get("final_metrics") or {}
    parts = [f"done: step {manifest['step']}, {manifest['tokens_seen']:,} tokens, checkpoint {manifest['checkpoint']}"]
    if "val_mlm_accuracy" in metrics:
        parts.append(f"val MLM acc {metrics['val_mlm_accuracy']:.4f} (majority baseline "
                     f"{manifest['val_mlm_majority_baseline']:.4f}), val NSP acc {metrics.get('val_nsp_accuracy', math.nan):.4f}")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- worker


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker: restore -> build -> step -> report."""
    config: PretrainConfig = loop_config["config"]  # typed and checked once, on the driver
    worker = Worker.current(config.threads_per_worker)
    run = _WorkerRun.build(config, loop_config["model_config"], loop_config, worker)
    steps: StepConfig = run.step_config
    state: TrainState = run.state
    started, window_start = time.time(), (time.time(), state.tokens_seen)
    window, stop_reason = None, None
    while state.step < config.max_steps:
        stats, grad_norm = run.step()
        window = stats if window is None else window + stats
        state.step += 1
        state.samples_per_rank += steps.accumulation * steps.micro_batch_size
        state.tokens_seen += int(all_reduce_sum(stats[-1:].clone(), worker.world).item())
        if state.step % config.log_every == 0 or state.step == config.max_steps:
            window = all_reduce_sum(window, worker.world)
            metrics = window_metrics(window, window[STATS.index("examples")].item() / steps.micro_batch_size)
            window_start = run.log_window(metrics, grad_norm, window_start, started, loop_config["start_step"])
            window = None
            stop_reason = run.time_limit_reached(started)
        if config.stop_at_step is not None and loop_config["start_step"] < config.stop_at_step <= state.step < config.max_steps:
            stop_reason = f"stop_at_step={config.stop_at_step}"  # one-shot: a resumed run goes on
        final = state.step == config.max_steps
        if run.evaluator is not None and (state.step % config.eval_every == 0 or final or stop_reason):
            run.evaluate()
        if final or stop_reason or state.step % config.checkpoint_every == 0:
            run.save_checkpoint(final)
        if stop_reason:
            run.progress(f"stopping at step {state.step} ({stop_reason}); re-run the same command to resume")
            break
    run.logger.close()


@dataclass
class _WorkerRun:
    """One worker's model, optimiser, data and reporting: built once by `build`, used by `train_loop`."""
    config: PretrainConfig
    worker: Any
    model: Any
    raw_model: Any
    optimizer: Any
    precision: Any
    step_config: Any
    state: Any
    batches: Any
    masker: Any
    evaluator: Any
    logger: Any
    tokenizer_dir: Path
    flops_per_token: float
    peak_flops: float
    fence: Any = None  # the output lease's fence (pipelines/lease.py), checked before a checkpoint is committed

    @classmethod
    def build(cls, config: PretrainConfig, model_config: BertConfig, loop_config: dict, worker) -> _WorkerRun:

        out, shards = config.out, ShardSet.open(config.shards)
        record_worker(out, worker.rank)
        resume = restore_dir(checkpoints(out), TrainState)  # ---- restore (downloaded, from a store)
        state = TrainState.read(resume) if resume else TrainState()
        if resume is not None:
            model = from_pretrained(resume, head="pretraining")
            if state.world_size != worker.world:  # the same global batches: only the sums' order differs
                run_progress(worker, f"resuming step {state.step} of a run on {state.world_size} worker(s) on "
                                     f"{worker.world}: same global batches (bert/example_order.py)")
        elif loop_config.get("init_checkpoint"):
            model = from_pretrained(storage.local_copy(loop_config["init_checkpoint"], "checkpoints"), head="pretraining",
                                    init_seed=config.seed)
        else:
            torch.manual_seed(config.seed)
            model = BertForPreTraining(model_config)
        model = model.to(worker.device)  # ---- build
        steps = StepConfig(accumulation=accumulation(config, worker.world), micro_batch_size=config.micro_batch_size,
                           learning_rate=config.learning_rate, warmup_steps=config.warmup_steps,
                           total_steps=config.max_steps, schedule=config.schedule, poly_power=config.poly_power,
                           max_grad_norm=config.max_grad_norm, seed=config.seed,
                           max_predictions=shards.data.max_predictions_per_seq, pad_id=model_config.pad_token_id,
                           world=worker.world, head_only_steps=config.head_only_steps)
        masker = Masker.of(shards)
        probe = probe_step(model, probe_loss(read_rows(shards, config.micro_batch_size), steps, masker, worker.device))
        precision = agree_precision(config.precision, worker, probe, state.precision)
        state.precision, state.world_size = precision.name, worker.world
        model, raw = worker.prepare(model)
        optimizer = build_optimizer(raw, config.optimizer, lr=config.learning_rate, weight_decay=config.weight_decay,
                                    betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
                                    split_encoder=config.head_only_steps > 0,
                                    head_lr_scale=(config.head_learning_rate or config.learning_rate)
                                    / config.learning_rate)
        if resume is not None:
            load_optimizer_state(optimizer, resume, worker.device)
        batches = GlobalStream(shards, config.seed).rank_batches(config.micro_batch_size,
                                                                 state.step * config.global_batch_size,
                                                                 worker.rank, worker.world)
        if config.compile:
            model = torch.compile(model, dynamic=True)
        handle = loop_config["mlflow"] if worker.rank == 0 else None
        logger = MetricLogger(handle, logged_through=loop_config.get("logged_through"))
        if state.step == 0:
            logger.log_params({"pretrain": config.to_dict(), "model": model_config.to_dict(), "world_size": worker.world,
                               "accumulation_steps": steps.accumulation, "precision": precision.name,
                               "precision_reason": precision.reason})
        evaluator = (Evaluator.build(ShardSet.open(config.val_shards, "validation shards"), config.eval_examples,
                                     worker.rank, worker.world, steps, worker.device) if config.val_shards else None)
        model.train()
        return cls(config, worker, model, raw, optimizer, precision, steps, state, batches, masker, evaluator, logger,
                   shards.tokenizer_dir(),
                   flops_per_token(raw.config, shards.data.max_seq_length, shards.data.max_predictions_per_seq),
                   measure_peak_flops(worker.device, precision.dtype or torch.float32), loop_config.get("fence"))

    def step(self):

        return train_step(self.model, self.optimizer, self.batches, self.step_config, self.state.step,
                          self.worker.rank, self.precision, self.masker)

    def log_window(self, metrics: dict, grad_norm: float, window_start: tuple[float, int], started: float,
                   start_step: int):
        now, tokens = time.time(), self.state.tokens_seen
        tokens_per_s = (tokens - window_start[1]) / max(now - window_start[0], 1e-9)
        world = self.worker.world
        metrics |= {"learning_rate": self.step_config.lr(self.state.step - 1), "grad_norm": grad_norm,
                    "tokens_per_s": tokens_per_s, "tokens_per_s_per_worker": tokens_per_s / world,
                    "mfu": tokens_per_s / world * self.flops_per_token / self.peak_flops,
                    "tokens_seen": float(tokens), "elapsed_s": now - started}
        self.logger.log_metrics(metrics, self.state.step)
        eta = (now - started) / max(self.state.step - start_step, 1) * (self.config.max_steps - self.state.step)
        self.progress(f"step {self.state.step}/{self.config.max_steps} loss {metrics['loss']:.4f} "
                      f"mlm_acc {metrics['mlm_accuracy']:.3f} nsp_acc {metrics.get('nsp_accuracy', math.nan):.3f} "
                      f"lr {metrics['learning_rate']:.2e} {tokens_per_s:,.0f} tok/s mfu {metrics['mfu']:.1%} "
                      f"{self.precision.name} eta {eta / 60:.1f} min")
        return now, tokens

    def time_limit_reached(self, started: float) -> str | None:

        if self.config.time_limit_minutes is None:
            return None
        over = time.time() - started > self.config.time_limit_minutes * 60
        return "time limit" if any_rank(over, self.worker.world) else None  # one rank over: all stop together

    def evaluate(self) -> None:

        started = time.time()
        counts = all_reduce_sum(self.evaluator.counts(self.model, self.precision), self.worker.world)
        # eval_seconds: what this evaluation took, so that curves against time can leave it out
        self.logger.log_metrics(Evaluator.metrics(counts) | {"eval_seconds": time.time() - started}, self.state.step)

    def save_checkpoint(self, final: bool) -> None:
        """Rank 0 writes the checkpoint in the output dir's staging area; Ray Train stores it as step-N."""
        state = self.state
        state.final = final

        def write(directory: Path) -> None:
            save_training_checkpoint(directory, self.raw_model, self.optimizer, state, self.tokenizer_dir)
            if final and self.logger.active:
                self.logger.log_artifacts(directory, "checkpoint")

        out, started = self.config.out, time.time()
        report_checkpoint({"step": state.step, "tokens_seen": state.tokens_seen}, self.worker.rank,
                          None if storage.is_remote(out) else Path(out) / STAGING, checkpoints(out),
                          f"step-{state.step:08d}", write, state=TrainState, fence=self.fence)
        self.logger.log_metrics({"checkpoint_seconds": time.time() - started}, state.step)  # write, store, commit

    def progress(self, message: str) -> None:
        if self.worker.rank == 0:

            worker_progress(f"[pretrain] {message}")
