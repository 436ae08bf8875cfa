"""`bertflow finetune`: one generic fine-tune for every row of the task table, on Ray Train, around `bert/finetune.py`.

Driver: check everything before a worker starts (task, data files, checkpoint config and weights,
tokenizer, sequence length), featurize once into the object store, claim and lock the output dir
(`pipelines/outdir.py`), then one Ray Train run that trains the seeds in turn. Each worker, per seed:

    restore  -> the newest complete epoch checkpoint of this seed (after a lost worker or a killed
                job), else the starting checkpoint with the task's head initialised from the seed
    build    -> freezing, layer-wise LR groups, AdamW, precision (bf16 where native and faster)
    step     -> `bert.finetune.train_step` over length-grouped batches; warmup then linear decay
    report   -> after every epoch: dev metrics (rank 0 logs them to MLflow), the best model so far
                when the primary metric improves, and an epoch checkpoint to Ray Train

With several workers each global batch of `batch_size` is split across ranks (`batch[rank::world]`),
so the optimisation is that of one worker with the same batch; evaluation splits the dev batches
across ranks and gathers the outputs on rank 0.

Output dir (DESIGN.md, "Fine-tune output dir"):
    metrics.json        best-epoch dev metrics, every epoch's history, skips, config (written last)
    predictions.jsonl   one line per eval example of the best epoch: split, id, prediction, gold
    checkpoint/         our checkpoint dir (weights, tokenizer files, labels, bertflow_task.json)
    mlflow_run.json     the MLflow run (a killed and re-run job logs into the same run)
    _job.json           which job and settings own the dir; _ray/, _best/, _tmp/: working state, removed at the end
With `--seeds 1,2,3`: one such dir per seed under `seed-<n>/`, and at the top a metrics.json with
the mean and sample standard deviation over seeds and copies of the best seed's predictions and
checkpoint. MLflow: with several seeds a parent run and one nested run per seed.

`--out` may be an object-store URI: the same layout lives under it (`bert/storage.py`). Epoch
checkpoints go to the store through Ray Train's storage, each committed by its run-state record
behind the output lease's fence (`pipelines/jobs/launch.py`); `_best/epoch-N/` is uploaded with
its `eval.json` last; metrics.json, written last, is the fenced commit of a seed's outputs. Staging
is a local temporary dir. `--checkpoint` and `--tokenizer` may be URIs (downloaded into the cache).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from bert import finetune, storage
from bert.checkpoint import from_pretrained, save_pretrained, write_checkpoint
from bert.finetune import (
    PREDICTIONS,
    FinetuneState,
    Prepared,
    Schedule,
    dropout_seed,
    epoch_batches,
    eval_splits,
    freeze,
    json_number,
    layerwise_groups,
    probe_loss,
    score,
    task_model,
    train_lengths,
    train_step,
)
from bert.inference import head_outputs, length_sorted_chunks, write_task_file
from bert.optim import adamw
from bert.precision import Precision, probe_step
from bert.run_state import load_optimizer_state, save_optimizer_state
from bert.tasks import get_task
from bert.tasks.featurize import MEGA_BATCH_FACTOR
from pipelines.jobs.configs import FinetuneConfig
from pipelines.jobs.finetune_outputs import BEST, EVAL_FILE, METRICS, summarize, write_seed_outputs
from pipelines.jobs.launch import (
    Worker,
    agree_precision,
    gather_to_rank0,
    record_worker,
    remove_torn_checkpoints,
    report_checkpoint,
    restore_dir,
    train_on_ray,
)
from pipelines.jobs.launch import latest_checkpoint as latest_in
from pipelines.jobs.skeleton import Claimed, Job, run_job
from pipelines.ray_runtime import worker_progress
from pipelines.tracking import RUN_FILE, MetricLogger, close_if_running, finish_run, last_logged_step, open_job_run

RAY_STORAGE = "_ray"
RAY_RUN = "train"  # the Ray Train run's name: its dir under RAY_STORAGE holds every seed's epoch checkpoints
STAGING = "_tmp"


def preflight(config: FinetuneConfig) -> Prepared:
    """Everything checkable, before any worker starts: the checkpoint, its tokenizer, the task's data, featurized."""
    spec = get_task(config.task)  # an unknown task lists the known ones
    tokenizer_dir = config.tokenizer or config.checkpoint  # a URI stays one: each worker copies it to its node
    checkpoint, tokenizer_copy = (storage.local_copy(p, "checkpoints") for p in (config.checkpoint, tokenizer_dir))
    with storage.named(config.checkpoint, checkpoint), storage.named(tokenizer_dir, tokenizer_copy):
        tokenizer, max_seq_length = finetune.check_model_inputs(checkpoint, tokenizer_copy, spec,
                                                                config.max_seq_length, config.freeze_layers)
    data = storage.local_copy(config.data, "inputs")  # a dataset dir on the store: read from a local copy
    with storage.named(config.data, data):
        return finetune.prepare(spec, data, tokenizer, tokenizer_dir, max_seq_length,
                                config.max_train_examples, config.max_eval_examples)


# ----------------------------------------------------------------------------- driver


class FinetuneJob(Job[FinetuneConfig]):
    """`run_job(FinetuneJob(), config)`: the skeleton's steps for fine-tuning (`pipelines/jobs/skeleton.py`).

    Its own MLflow run is the parent of the seeds' runs, opened only with several seeds (one seed logs
    into its own run). `ray_callbacks` go to the Ray Train run (a sweep passes Ray Tune's report callback).
    """

    name = "finetune"
    required = ("data", "checkpoint", "out")
    paths = ("data", "checkpoint", "out", "tokenizer")

    def __init__(self, ray_callbacks: Sequence[Any] = ()):
        self.ray_callbacks = ray_callbacks

    def finished(self, config: FinetuneConfig) -> dict[str, Any] | None:
        return _finished(storage.join(config.out, METRICS), config)

    def preflight(self, config: FinetuneConfig) -> Prepared:
        return preflight(config)

    def inputs(self, config: FinetuneConfig) -> list[Any]:
        return [config.data, config.checkpoint, config.tokenizer]

    def run_name(self, config: FinetuneConfig) -> str | None:
        return f"finetune-{config.task}" if len(config.seed_list) > 1 else None

    def tags(self, config: FinetuneConfig) -> dict[str, str]:
        return {"bertflow.stage": "finetune", "bertflow.task": config.task}

    def run(self, claimed: Claimed[FinetuneConfig], prepared: Prepared) -> dict[str, Any]:
        """Every seed still to train, in one Ray Train run; then the seeds' summary (several seeds)."""
        config, out, parent = claimed.config, claimed.out, claimed.run
        seeds = config.seed_list
        dirs = {seed: out if len(seeds) == 1 else storage.join(out, f"seed-{seed}") for seed in seeds}
        pending = []
        for seed in seeds:
            if _finished(storage.join(dirs[seed], METRICS), config.for_seed(seed)) is not None:
                print(f"[finetune] {dirs[seed]} is complete (seed {seed}); nothing to do", flush=True)
                close_if_running(dirs[seed])  # killed after its outputs, before closing its MLflow run
            else:
                pending.append(seed)
        if pending:
            _train_seeds(config, [(seed, str(dirs[seed])) for seed in pending], ray.put(prepared),
                         claimed.tracking_uri, parent.run_id if parent else config.parent_run_id, self.ray_callbacks,
                         claimed.lease.fence() if claimed.lease is not None else None)
        runs = [storage.read_json(storage.join(dirs[seed], METRICS)) for seed in seeds]
        return runs[0] if len(seeds) == 1 else summarize(config, prepared, runs, parent, claimed.lease)


def run_finetune(config: FinetuneConfig, ray_callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Check, claim the output dir, train every seed with Ray Train, write the output dir. Returns metrics.json.

    All the seeds still to train share one Ray Train run (one worker-group start): the workers train
    them one after another, each into its own dir, MLflow run and checkpoints, and resume a killed
    job at the seed and epoch where it stopped.
    """
    from pipelines.models import maybe_register  # --register-as: the (best seed's) model as a registry version

    return maybe_register(config, run_job(FinetuneJob(ray_callbacks), config))


def _finished(metrics_file: storage.Location, config: FinetuneConfig) -> dict[str, Any] | None:
    """A finished run of the same job and settings at `metrics_file` (its content), else None."""
    if not storage.is_file(metrics_file):
        return None
    done = storage.read_json(metrics_file)
    return done if done.get("identity") == config.identity() else None


def _train_seeds(config: FinetuneConfig, seeds: list[tuple[int, str]], prepared_ref, tracking_uri: str,
                 parent_run_id: str | None, ray_callbacks: Sequence[Any], fence=None) -> None:
    """One Ray Train run that trains `seeds` [(seed, its output dir)] in turn; the workers write each seed's outputs.

    A run that fails for good marks the MLflow run of every seed it left unfinished FAILED.
    """
    ray_storage = storage.join(config.out, RAY_STORAGE)
    for seed, seed_dir in seeds:
        if not storage.is_remote(seed_dir):
            Path(seed_dir).mkdir(parents=True, exist_ok=True)
            shutil.rmtree(Path(seed_dir) / STAGING, ignore_errors=True)
        remove_torn_checkpoints(seed_storage(config, seed), FinetuneState)  # a killed save, on an object store
        resume = latest_epoch_checkpoint(seed_storage(config, seed))
        if resume is not None:
            print(f"[finetune] seed {seed}: resuming after epoch {FinetuneState.read(resume).epoch} from {resume}",
                  flush=True)
    loop_config = {"config": config, "seeds": seeds, "prepared": prepared_ref,
                   "tracking_uri": tracking_uri, "parent_run_id": parent_run_id, "fence": fence}
    try:
        train_on_ray(train_loop, loop_config, name=RAY_RUN, storage=ray_storage, num_workers=config.num_workers,
                     use_gpu=config.use_gpu, cpus_per_worker=config.cpus_per_worker, max_failures=config.max_failures,
                     keep_checkpoints=1, callbacks=ray_callbacks)
    except Exception:
        for seed, seed_dir in seeds:
            unfinished = _finished(storage.join(seed_dir, METRICS), config.for_seed(seed)) is None
            if unfinished and storage.is_file(storage.join(seed_dir, RUN_FILE)):
                finish_run(_seed_run(config, seed, seed_dir, tracking_uri, parent_run_id), "FAILED")
        raise
    storage.remove(ray_storage)


def _seed_run(config: FinetuneConfig, seed: int, seed_dir: storage.Location, tracking_uri: str,
              parent_run_id: str | None):
    """The seed's MLflow run: created on its first start, re-opened (RUNNING again) by every later one."""
    return open_job_run(seed_dir, tracking_uri, config.experiment, run_name=f"{config.task}-seed{seed}",
                        parent_run_id=parent_run_id, tags={"bertflow.stage": "finetune", "bertflow.task": config.task,
                                                           "bertflow.seed": str(seed)})


def seed_storage(config: FinetuneConfig, seed: int) -> storage.Location:
    """Where a seed's epoch checkpoints live: inside the Ray Train run's dir, as Ray Train requires."""
    return storage.join(config.out, RAY_STORAGE, RAY_RUN, f"seed-{seed}")


def latest_epoch_checkpoint(directory: storage.Location) -> storage.Location | None:
    """The newest complete epoch checkpoint of a seed's Ray storage (a killed save is never taken)."""
    return latest_in(directory, FinetuneState)


# ----------------------------------------------------------------------------- worker


def train_loop(loop_config: dict) -> None:
    """Runs on every Ray Train worker: each seed in turn, restore -> build -> step -> report, epoch by epoch;
    once a seed's last epoch is reported rank 0 writes its output dir and closes its MLflow run."""

    config: FinetuneConfig = loop_config["config"]  # typed and checked once, on the driver
    worker = Worker.current(config.threads_per_worker)
    record_worker(config.out, worker.rank)
    prepared = ray.get(loop_config["prepared"])
    measured = None  # the first seed's precision probe serves the next ones: same model shape, same batches
    for seed, seed_dir in loop_config["seeds"]:
        seed_config = config.for_seed(seed)
        if _finished(storage.join(seed_dir, METRICS), seed_config) is not None:  # done before a lost worker restarted the run
            continue
        handle = (_seed_run(config, seed, seed_dir, loop_config["tracking_uri"], loop_config["parent_run_id"])
                  if worker.rank == 0 else None)
        start = time.time()
        try:
            run = _SeedRun.build(config, seed, seed_dir, prepared, worker, handle, measured, loop_config["fence"])
            measured = run.precision
            for epoch in range(run.state.epoch, math.ceil(config.epochs)):
                if run.state.final:
                    break
                run.train_epoch(epoch)
                run.end_epoch(epoch)
            run.logger.close()
            if worker.rank == 0:
                last = latest_epoch_checkpoint(seed_storage(config, seed))
                write_seed_outputs(seed_config, prepared, seed_dir, last, handle, time.time() - start,
                                   loop_config["fence"])
                storage.remove(storage.join(seed_dir, BEST))
                if not storage.is_remote(seed_dir):
                    shutil.rmtree(Path(seed_dir) / STAGING, ignore_errors=True)
                finish_run(handle)
        except BaseException:
            finish_run(handle, "FAILED")  # re-opened (RUNNING) if Ray Train restarts the workers
            raise


@dataclass
class _SeedRun:
    """One worker's model, optimiser, data and reporting for one seed: built by `build`, driven by `train_loop`."""
    config: FinetuneConfig
    seed: int
    worker: Any
    prepared: Prepared
    spec: Any
    model: Any
    raw_model: Any
    optimizer: Any
    trainable: list
    precision: Any
    schedule: Any
    state: FinetuneState
    logger: Any
    best_root: storage.Location  # _best/ of the seed's dir (a prefix on an object store)
    fence: Any = None  # the output lease's fence (pipelines/lease.py), checked before a checkpoint is committed
    epoch_loss: float = 0.0
    epoch_seconds: float = 0.0

    @property
    def length_grouping(self) -> int:
        """Batches per length-sorted mega-batch: the job's setting, else the default (`length_grouped_batches`)."""
        return self.config.length_grouping or MEGA_BATCH_FACTOR

    @classmethod
    def build(cls, config: FinetuneConfig, seed: int, seed_dir: storage.Location, prepared: Prepared, worker, handle,
              measured: Precision | None, fence=None) -> _SeedRun:
        """`handle`: the seed's MLflow run (rank 0); `measured`: the precision an earlier seed of the job probed."""
        spec, best_root = get_task(prepared.task), storage.join(seed_dir, BEST)
        resume = restore_dir(seed_storage(config, seed), FinetuneState)  # ---- restore
        state = FinetuneState.read(resume) if resume else FinetuneState()
        model = from_pretrained(resume) if resume else task_model(storage.local_copy(config.checkpoint, "checkpoints"),
                                                                  spec, prepared.labels, seed)
        if worker.rank == 0 and storage.is_dir(best_root):  # best models of epochs the restored state has not seen
            for stale in storage.list_dir(best_root):
                if stale.startswith("epoch-") and int(stale.split("-")[1]) > state.epoch:
                    storage.remove(storage.join(best_root, stale))
        freeze(model, encoder=config.freeze_encoder, layers=config.freeze_layers)  # ---- build
        model = model.to(worker.device)
        if state.precision is None and measured is not None and config.precision == "auto":  # no second probe
            precision = Precision(measured.name, measured.device_type, f"{measured.reason} (this job's first seed)")
        else:
            precision = agree_precision(config.precision, worker, _probe(config, model, prepared, worker), state.precision)
        state.precision = precision.name
        groups = layerwise_groups(model, config.weight_decay, config.layer_lr_decay)
        model, raw = worker.prepare(model)
        optimizer = adamw(groups, lr=config.learning_rate, eps=config.adam_eps)
        if resume is not None:

            load_optimizer_state(optimizer, resume, worker.device)
        trainable = [p for g in optimizer.param_groups for p in g["params"]]
        schedule = Schedule.of(len(prepared.train_features), config.batch_size, config.epochs, config.warmup_ratio,
                               worker.world, peak=config.learning_rate)
        logger = MetricLogger(handle, logged_through=last_logged_step(handle, "train/loss") if resume else None)
        if resume is None:
            logger.log_params({"finetune": config.for_seed(seed).to_dict(), "seed": seed, "world_size": worker.world,
                               "total_steps": schedule.total, "warmup_steps": schedule.warmup,
                               "train_examples": prepared.num_train_examples, "max_seq_length": prepared.max_seq_length,
                               "length_grouping": config.length_grouping or MEGA_BATCH_FACTOR,
                               "trainable_parameters": sum(p.numel() for p in trainable), "precision": precision.name,
                               "precision_reason": precision.reason})
        model.train()
        return cls(config, seed, worker, prepared, spec, model, raw, optimizer, trainable, precision, schedule, state,
                   logger, best_root, fence)

    def train_epoch(self, epoch: int) -> None:

        config, prepared, state, (rank, world) = self.config, self.prepared, self.state, (self.worker.rank, self.worker.world)
        lengths = train_lengths(prepared)
        started, window, losses = time.time(), [], []
        for batch in epoch_batches(lengths, config.batch_size, self.seed, epoch, world, self.length_grouping):
            if state.step == self.schedule.total:
                break
            lr = self.schedule.lr(state.step)
            loss, grad_norm = train_step(self.model, self.optimizer, [prepared.train_features[i] for i in batch[rank::world]],
                                         prepared.pad_id, lr=lr, max_grad_norm=config.max_grad_norm,
                                         precision=self.precision, dropout_seed=dropout_seed(self.seed, rank, state.step),
                                         trainable=self.trainable)
            state.step += 1
            window.append(loss)
            losses.append(loss)
            if state.step % config.log_every == 0:
                self.logger.log_metrics({"train/loss": sum(window) / len(window), "train/learning_rate": lr,
                                         "train/grad_norm": grad_norm}, state.step)
                eta = (time.time() - started) / max(len(losses), 1) * (self.schedule.total - state.step)
                self.progress(f"step {state.step}/{self.schedule.total} loss {sum(window) / len(window):.4f} "
                              f"lr {lr:.2e} {self.precision.name} eta {eta / 60:.1f} min")
                window = []
        self.epoch_loss = sum(losses) / max(len(losses), 1)
        self.epoch_seconds = time.time() - started

    def end_epoch(self, epoch: int) -> None:
        """Dev metrics; the best model so far (rank 0); the epoch checkpoint, reported to Ray Train."""
        metrics, records = self.evaluate()
        state = self.state
        state.epoch = epoch + 1
        state.final = state.epoch == math.ceil(self.config.epochs) or state.step == self.schedule.total
        report: dict[str, Any] = {"epoch": state.epoch, "step": state.step}
        if self.worker.rank == 0:

            entry = {"epoch": state.epoch, "step": state.step, "train_loss": self.epoch_loss,
                     "seconds": self.epoch_seconds, "metrics": {k: json_number(v) for k, v in metrics.items()}}
            state.history.append(entry)
            score = metrics.get(self.spec.primary_metric, math.nan)
            if state.best_epoch == 0 or (math.isfinite(score) and score > state.best_score):  # the first always
                state.best_score, state.best_epoch = (score if math.isfinite(score) else state.best_score), state.epoch
                self.save_best(entry, metrics, records)
            self.logger.log_metrics({**metrics, "epoch": state.epoch, "train/epoch_loss": self.epoch_loss}, state.step)
            shown = {k: v for k, v in metrics.items() if k == self.spec.primary_metric or "_" not in k}
            self.progress(f"epoch {state.epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
            report |= {k: v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)}
        self.save_checkpoint(report)
        if self.worker.rank == 0 and storage.is_dir(self.best_root):  # older best models are no longer needed
            for old in storage.list_dir(self.best_root):
                if old.startswith("epoch-") and old != f"epoch-{state.best_epoch:03d}":
                    storage.remove(storage.join(self.best_root, old))

    def evaluate(self) -> tuple[dict[str, float], list[dict]]:
        """Every rank scores its share of the dev batches; rank 0 gathers them and computes metrics and records."""
        outputs: dict[str, list] = {}
        rank, world = self.worker.rank, self.worker.world
        for split in eval_splits(self.spec, self.prepared):
            features = self.prepared.eval_features[split]
            chunks = length_sorted_chunks(features, self.config.eval_batch_size)
            mine = head_outputs(self.raw_model, features, self.prepared.pad_id, chunks[rank::world],
                                self.worker.device, self.precision)
            parts = gather_to_rank0(mine, rank, world)
            if parts is not None:
                merged = {i: out for part in parts for i, out in part.items()}
                outputs[split] = [merged[i] for i in range(len(features))]
        self.model.train()
        return score(self.spec, self.prepared, outputs) if rank == 0 else ({}, [])

    def save_best(self, entry: dict, metrics: dict, records: list[dict]) -> None:
        """The best model so far, with its predictions: `_best/epoch-N` (kept until the run ends; on an object
        store written locally, then uploaded with its eval.json last)."""
        target = storage.join(self.best_root, f"epoch-{entry['epoch']:03d}")
        if not storage.is_remote(target):
            self._write_best(Path(target), entry, metrics, records)
            return
        with tempfile.TemporaryDirectory(prefix="bertflow-best-") as tmp:
            directory = self._write_best(Path(tmp) / "best", entry, metrics, records)
            storage.remove(target)
            for item in sorted(directory.iterdir(), key=lambda p: p.name == EVAL_FILE):  # eval.json last
                storage.copy(item, storage.join(target, item.name))

    def _write_best(self, path: Path, entry: dict, metrics: dict, records: list[dict]) -> Path:
        directory = save_pretrained(self.raw_model, path,
                                    tokenizer_dir=storage.local_copy(self.prepared.tokenizer_dir, "checkpoints"))
        write_task_file(directory, self.prepared.task, self.prepared.max_seq_length,
                        threshold=metrics.get(f"{self.spec.primary_metric.split('/')[0]}/threshold"),
                        precision=self.precision.name)
        with open(directory / PREDICTIONS, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record, allow_nan=False) + "\n" for record in records)
        (directory / EVAL_FILE).write_text(json.dumps(entry, indent=2, allow_nan=False))
        return directory

    def save_checkpoint(self, report: dict[str, Any]) -> None:
        """Weights, optimizer and state after this epoch (rank 0 writes), reported to Ray Train as epoch-N."""
        def write(directory: Path) -> None:
            write_checkpoint(self.raw_model, directory)
            save_optimizer_state(self.optimizer, directory)
            self.state.write(directory)

        staging = None if storage.is_remote(self.best_root) else Path(self.best_root).with_name(STAGING)
        report_checkpoint(report, self.worker.rank, staging, seed_storage(self.config, self.seed),
                          f"epoch-{self.state.epoch:03d}", write, state=FinetuneState, fence=self.fence)

    def progress(self, message: str) -> None:
        if self.worker.rank == 0:

            worker_progress(f"[finetune {self.prepared.task} seed {self.seed}] {message}")


def _probe(config: FinetuneConfig, model, prepared: Prepared, worker):
    """The precision probe's step: a real batch of the longest training sequences (this rank's share)."""
    features, lengths = prepared.train_features, train_lengths(prepared)
    longest = sorted(range(len(features)), key=lambda i: -lengths[i])
    sample = [features[i] for i in longest[len(longest) // 4:][: max(1, config.batch_size // worker.world)]]
    return probe_step(model, probe_loss(sample, prepared.pad_id, worker.device))
