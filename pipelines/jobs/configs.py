"""The jobs' settings: frozen, typed, validated once, light to import (the CLI builds its options from them).

`PretrainConfig` and `FinetuneConfig` are what `bertflow pretrain` / `bertflow finetune` take
(one `--field-name` option per field), what a pipeline stage's config section holds (its paths
are set when it runs), and what the Ray workers receive (the object itself: typed and checked
once, on the driver). `identity()` is the part that defines a job's output: a re-run with the
same identity resumes into the same output dir. A field declared with `run_only(default)` says
how a job runs (logging, resources, stop points, tracking), not what it computes: it may differ
between a run and its resumption, and pipeline stage keys leave it out (`result_settings`),
both read from that one mark. A field declared with `added(default)` came after jobs had recorded
their identities: at its default it is left out the same way, so those jobs and keys still match.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from bert.errors import InputError
from bert.precision import PrecisionName
from pipelines.config_args import check_choices

Optimizer = Literal["adamw", "lamb"]
Schedule = Literal["linear", "poly", "constant"]  # after warmup: linear or polynomial decay to 0, or constant
Placement = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]  # SPREAD / STRICT_SPREAD: a worker per node

RUN_ONLY = "bertflow.run_only"


def run_only(default: Any) -> Any:
    """A field that says how a job runs, not what it computes (see the module docstring)."""
    return dataclasses.field(default=default, metadata={RUN_ONLY: True})


ADDED = "bertflow.added"


def added(default: Any) -> Any:
    """A field added after jobs and stage keys were recorded without it: at its default it is left out of
    `result_settings`, so a job dir from before resumes and a cached stage stays cached."""
    return dataclasses.field(default=default, metadata={ADDED: True})


def result_settings(config: Any) -> dict[str, Any]:
    """The settings of `config` that change what its job computes (every field not marked `run_only`)."""
    return recorded_settings(type(config), dataclasses.asdict(config))


def recorded_settings(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """`result_settings` of a config of `cls` recorded as a dict (`to_dict`, in a manifest)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if not (k in fields and (
        fields[k].metadata.get(RUN_ONLY) or (fields[k].metadata.get(ADDED) and v == fields[k].default)))}

# ----------------------------------------------------------------------------- pretraining


@dataclass(frozen=True)
class PretrainConfig:
    """One pretraining phase. Defaults follow the BERT paper where it gives them."""

    shards: str | None = None  # required to run (a pipeline stage sets it from its input)
    out: str | None = run_only(None)  # required to run
    model: str = "tiny"  # preset name, or a checkpoint dir to start from (phase 2)
    val_shards: str | None = None
    # N, or "MIN-MAX": elastic (start with what the cluster has, shrink when a node goes, grow when one
    # comes back); the global batches do not depend on it (bert/example_order.py), so a run may resume
    # on another count
    num_workers: str | int = run_only(1)
    cpus_per_worker: int = run_only(1)
    threads_per_worker: int | None = run_only(None)  # torch threads; default: this node's cores / its workers
    use_gpu: bool = False
    placement_strategy: Placement = run_only("PACK")  # SPREAD / STRICT_SPREAD: one worker per node
    global_batch_size: int = 256
    micro_batch_size: int = 32
    max_steps: int = 1000
    optimizer: Optimizer = "adamw"
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-6
    warmup_steps: int = 100
    # the first N steps train the heads only (for a checkpoint whose MLM head is new: its random gradients do
    # not reach the encoder); the encoder then warms up over warmup_steps
    head_only_steps: int = added(0)
    # the peak learning rate of the heads (MLM transform and bias, NSP), on the same schedule; default
    # learning_rate. A head new to the checkpoint learns little at an encoder's continued-pretraining rate
    head_learning_rate: float | None = added(None)
    schedule: Schedule = "linear"
    poly_power: float = 1.0
    max_grad_norm: float = 1.0
    precision: PrecisionName = "auto"  # auto: bf16 where native and faster
    compile: bool = run_only(False)
    checkpoint_every: int = run_only(200)
    keep_checkpoints: int = run_only(3)
    eval_every: int = 200
    eval_examples: int = 2048
    log_every: int = run_only(10)
    seed: int = 12345
    stop_at_step: int | None = run_only(None)  # stop early with a checkpoint (resume by re-running)
    time_limit_minutes: float | None = run_only(None)  # same, after this much training time
    max_failures: int = run_only(3)
    experiment: str = run_only("bertflow-pretrain")
    tracking_uri: str | None = run_only(None)
    parent_run_id: str | None = run_only(None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_workers", _worker_count(self.num_workers))  # 2 or "1-2", parsed once
        for name in ("cpus_per_worker", "global_batch_size", "micro_batch_size", "max_steps",
                     "checkpoint_every", "eval_every", "log_every", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise InputError(f"pretrain: {name} must be positive, got {getattr(self, name)}")
        if self.threads_per_worker is not None and self.threads_per_worker <= 0:
            raise InputError(f"pretrain: threads_per_worker must be positive, got {self.threads_per_worker}")
        low, high = self.worker_range
        for workers in range(low, high + 1):
            per_step = self.micro_batch_size * workers
            if self.global_batch_size % per_step:
                raise InputError(
                    f"pretrain: global batch {self.global_batch_size} is not divisible by "
                    f"workers x micro-batch = {workers} x {self.micro_batch_size} = {per_step}"
                    + (f" (every worker count of {self.num_workers} must divide it)" if low < high else ""))
        check_choices(self, "pretrain")
        if not 0 <= self.warmup_steps < self.max_steps:
            raise InputError(f"pretrain: warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        if self.learning_rate <= 0:
            raise InputError(f"pretrain: learning_rate must be positive, got {self.learning_rate}")
        if self.head_learning_rate is not None and not (self.head_learning_rate > 0
                                                        and math.isfinite(self.head_learning_rate)):
            raise InputError(f"pretrain: head_learning_rate must be positive, got {self.head_learning_rate}")
        if not 0 <= self.head_only_steps < self.max_steps:
            raise InputError(f"pretrain: head_only_steps ({self.head_only_steps}) must be from 0 to below max_steps "
                             f"({self.max_steps})")

    @property
    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers; equal unless elastic."""
        if isinstance(self.num_workers, int):
            return self.num_workers, self.num_workers
        low, high = self.num_workers.split("-")
        return int(low), int(high)

    @property
    def micro_batches_per_step(self) -> int:
        """Blocks of `micro_batch_size` in a global batch: split across the workers a step has."""
        return self.global_batch_size // self.micro_batch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The settings that define the output: a re-run must match them to resume into the same dir."""
        return result_settings(self)


def _worker_count(value: str | int) -> str | int:
    """`--num-workers`: N (an int) or "MIN-MAX" (elastic, 1 <= MIN < MAX), from the CLI or a spec."""
    text = str(value).strip()
    try:
        low, _, high = text.partition("-")
        low_n, high_n = int(low), int(high or low)
    except ValueError:
        raise InputError(f"pretrain: num_workers must be N or MIN-MAX (e.g. 2 or 1-4), got {value!r}") from None
    if not 1 <= low_n <= high_n:
        raise InputError(f"pretrain: num_workers {value!r}: need 1 <= MIN <= MAX")
    return low_n if low_n == high_n else f"{low_n}-{high_n}"


# ----------------------------------------------------------------------------- fine-tuning


def parse_seeds(text: str | Sequence[int] | None, default: int) -> tuple[int, ...]:
    """The one seeds representation: "1,2,3" or [1, 2, 3] -> (1, 2, 3), distinct integers; None -> (default,)."""
    if text is None:
        return (default,)
    try:
        seeds = tuple(int(s) for s in (text.split(",") if isinstance(text, str) else text) if str(s).strip())
    except ValueError:
        raise InputError(f"seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise InputError(f"seeds must list distinct integers, got {text!r}")
    return seeds


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning job. Defaults follow the BERT paper's GLUE recipe where it gives them."""

    task: str
    data: str | None = None  # the task's dir (e.g. glue/MRPC), or a datasets root holding it; required to run
    checkpoint: str | None = None  # our checkpoint dir or a Hugging Face BERT dir; required to run
    out: str | None = run_only(None)  # required to run
    tokenizer: str | None = None  # tokenizer dir; default: the checkpoint dir
    learning_rate: float = 2e-5
    batch_size: int = 32  # global: split across workers
    eval_batch_size: int = run_only(64)
    epochs: float = 3.0
    max_seq_length: int | None = None  # default: the task row's
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    adam_eps: float = 1e-6
    seed: int = 42
    # "1,2,3" (CLI) or [1, 2, 3]: one training run per seed (one Ray Train start for all), mean +- std;
    # parsed once, into a tuple
    seeds: str | tuple[int, ...] | None = None
    freeze_encoder: bool = False  # feature extraction: train the head only
    freeze_layers: int = 0  # freeze the embeddings and the bottom K Transformer layers
    layer_lr_decay: float = 1.0  # head lr x d^0, top layer d^1, ..., embeddings d^(L+1)
    length_grouping: int | None = None  # batches per length-sorted mega-batch (1: a plain shuffle); default 4
    max_train_examples: int | None = None  # the first N (deterministic)
    max_eval_examples: int | None = None  # the first N of every eval split
    precision: PrecisionName = "auto"  # auto: bf16 where native and faster
    num_workers: int = 1
    cpus_per_worker: int = run_only(1)
    threads_per_worker: int | None = run_only(None)  # torch threads; default: this node's cores / its workers
    use_gpu: bool = False
    max_failures: int = run_only(2)  # lost workers replaced (from the last finished epoch) before the job fails
    log_every: int = run_only(20)
    experiment: str = run_only("bertflow-finetune")
    tracking_uri: str | None = run_only(None)
    parent_run_id: str | None = run_only(None)
    log_model: bool = run_only(True)  # log the checkpoint as an mlflow.pyfunc model
    register_as: str | None = run_only(None)  # register the (best seed's) logged model as a version of this registered model

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_batch_size", "num_workers", "cpus_per_worker", "log_every"):
            if getattr(self, name) <= 0:
                raise InputError(f"finetune: {name} must be positive, got {getattr(self, name)}")
        for name in ("max_train_examples", "max_eval_examples", "max_seq_length", "threads_per_worker", "length_grouping"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise InputError(f"finetune: {name} must be positive, got {value}")
        if self.batch_size % self.num_workers:
            raise InputError(f"finetune: batch_size {self.batch_size} is not divisible by num_workers "
                             f"{self.num_workers} (each global batch is split evenly across workers)")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise InputError(f"finetune: learning_rate must be positive, got {self.learning_rate}")
        if not self.epochs > 0:
            raise InputError(f"finetune: epochs must be positive, got {self.epochs}")
        if not 0 <= self.warmup_ratio < 1:
            raise InputError(f"finetune: warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0 or self.max_grad_norm < 0 or self.max_failures < 0:
            raise InputError("finetune: weight_decay, max_grad_norm and max_failures must be >= 0")
        if not 0 < self.layer_lr_decay <= 1:
            raise InputError(f"finetune: layer_lr_decay must be in (0, 1], got {self.layer_lr_decay}")
        if self.freeze_layers < 0:
            raise InputError(f"finetune: freeze_layers must be >= 0, got {self.freeze_layers}")
        if self.freeze_encoder and self.freeze_layers:
            raise InputError("finetune: --freeze-encoder already freezes every layer; drop --freeze-layers")
        check_choices(self, "finetune")
        if self.register_as is not None and (not self.register_as.strip() or not self.log_model):
            raise InputError("finetune: --register-as needs a model name and the model logged (no --no-log-model)")
        if self.seeds is not None:
            try:  # a bad --seeds list is an input error before anything starts
                object.__setattr__(self, "seeds", parse_seeds(self.seeds, self.seed))
            except InputError as exc:
                raise InputError(f"finetune: --{exc}") from None

    @property
    def seed_list(self) -> tuple[int, ...]:
        return self.seeds if self.seeds is not None else (self.seed,)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The settings that define the output: a re-run must match them to resume into the same dir."""
        identity = {k: v for k, v in result_settings(self).items() if k not in ("seed", "seeds")}
        from bert.tasks.featurize import MEGA_BATCH_FACTOR  # here: it imports torch, which the CLI's options do not need

        if self.length_grouping in (None, MEGA_BATCH_FACTOR):
            del identity["length_grouping"]  # the default, spelled out or not: job dirs from before the option resume
        return identity | {"seeds": list(self.seed_list)}

    def for_seed(self, seed: int) -> FinetuneConfig:
        return dataclasses.replace(self, seed=seed, seeds=None)
