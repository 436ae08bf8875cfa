"""Pretraining BERT (MLM + NSP) on one device: batches, dynamic masking, the step, evaluation, checkpoints.

The Ray job (`pipelines/jobs/pretrain.py`) runs this on every worker; read top to bottom, one
optimiser step is:

    lr = peak x lr_multiplier(step)                   warmup, then linear / poly decay to 0
    for micro in range(accumulation):                 this rank's micro-batches: blocks micro x world + rank
        seed dropout (torch) and dynamic masks (numpy) from (seed, step, block)
        rows -> collate (pad to the longest row; mask now if the shards are unmasked)
        loss = MLM (masked positions only) + NSP, under the precision policy
        (loss / accumulation).backward()              DDP all-reduces on the last micro-batch only
    head-only steps (the first `head_only_steps`): drop the encoder's gradients (the heads alone learn)
    clip the global gradient norm; optimizer.step()

Every random draw of a step comes from (seed, step, block), and the data position is one number
(samples consumed, step x global batch: `bert.example_order.GlobalStream`), so a checkpoint needs no
RNG state: resuming at step k reproduces an uninterrupted run bit for bit on CPU (same precision,
same number of workers), and on another number of workers it computes the same global batches
with the same masks and dropout (sums in another order: equal to rounding, not to the bit).

A training checkpoint dir (DESIGN.md, "Checkpoint dir"): the model checkpoint files, the
tokenizer, `optimizer.pt` (loaded with `weights_only=True`) and `train_state.json` (step,
tokens seen, samples per rank, world size, precision, and the size of every file, so a
half-written checkpoint is never taken for a complete one).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from bert.checkpoint import write_checkpoint
from bert.optim import clip_grad_norm, lr_multiplier, set_lr
from bert.precision import Precision
from bert.pretraining_data import PretrainingDataConfig
from bert.pretraining_masking import MaskedBatch, SpecialTokens, mask_batch
from bert.run_state import RunState, save_optimizer_state
from bert.shards import ShardSet, read_rows

TRAIN_STATE = "train_state.json"
IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- batches


class PretrainBatch(NamedTuple):
    """One padded micro-batch, in `BertForPreTraining.forward`'s argument order."""

    input_ids: Tensor  # (B, T)
    token_type_ids: Tensor  # (B, T)
    attention_mask: Tensor  # (B, T) 1 = real token
    masked_lm_positions: Tensor  # (B, P)
    masked_lm_ids: Tensor  # (B, P) IGNORE_INDEX where there is no prediction
    next_sentence_label: Tensor  # (B,) 1 = random next

    def to(self, device: torch.device) -> PretrainBatch:
        return PretrainBatch(*(t.to(device) for t in self))


class Masker:
    """Dynamic masking: the shards' own masking config applied at training time (with word starts for WWM)."""

    def __init__(self, data: PretrainingDataConfig, special: SpecialTokens):
        self.data, self.special = data, special

    @classmethod
    def of(cls, shards: ShardSet) -> Masker | None:
        """A masker for unmasked (dynamic-masking) shards, None for statically masked ones."""
        if not shards.data.dynamic_masking:
            return None
        from bert.tokenizer import Tokenizer

        return cls(shards.data, SpecialTokens.of(Tokenizer.load(shards.tokenizer_dir())))

    def __call__(self, rows: Sequence[dict[str, Any]], rng: np.random.Generator) -> MaskedBatch:
        starts = [r["word_starts"] for r in rows] if self.data.whole_word_masking else None
        return mask_batch([r["input_ids"] for r in rows], self.data, self.special, rng, starts)


def collate(rows: Sequence[dict[str, Any]], pad_id: int, max_predictions: int,
            masker: Masker | None = None, rng: np.random.Generator | None = None) -> PretrainBatch:
    """Pad a micro-batch: ids and types to its longest row, masked positions to `max_predictions`."""
    lengths = [len(r["input_ids"]) for r in rows]
    B, T = len(rows), max(lengths)
    ids = np.full((B, T), pad_id, dtype=np.int64)
    types = np.zeros((B, T), dtype=np.int64)
    attention = np.arange(T)[None, :] < np.asarray(lengths)[:, None]
    positions = np.zeros((B, max_predictions), dtype=np.int64)
    labels = np.full((B, max_predictions), IGNORE_INDEX, dtype=np.int64)
    masked = masker(rows, rng) if masker is not None else None  # dynamic masking: mask now
    for b, (r, n) in enumerate(zip(rows, lengths)):
        types[b, :n] = r["token_type_ids"]
        if masked is not None:
            ids[b, :n] = masked.input_ids[b, :n]
            k = int(masked.masked_lm_weights[b].sum())
            pos, lab = masked.masked_lm_positions[b, :k], masked.masked_lm_ids[b, :k]
        else:
            ids[b, :n] = r["input_ids"]
            pos, lab = r["masked_lm_positions"], r["masked_lm_ids"]
        positions[b, : len(pos)] = pos
        labels[b, : len(lab)] = lab
    nsp = np.asarray([int(r["next_sentence_label"]) for r in rows], dtype=np.int64)
    return PretrainBatch(*(torch.from_numpy(a) for a in (ids, types, attention.astype(np.int64), positions, labels, nsp)))


# ----------------------------------------------------------------------------- the step


def step_seed(*parts: int) -> int:
    """A 32-bit seed from integers (seed, step, block): independent streams for every micro-batch."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


@dataclass(frozen=True)
class StepConfig:
    """What one optimiser step needs to know, fixed for a run."""

    accumulation: int  # micro-batches per rank per step: global micro-batches / world
    micro_batch_size: int
    learning_rate: float  # peak
    warmup_steps: int
    total_steps: int
    schedule: str = "linear"
    poly_power: float = 1.0
    max_grad_norm: float = 1.0
    seed: int = 12345
    max_predictions: int = 20
    pad_id: int = 0
    world: int = 1  # the ranks sharing each step: rank r's micro-batch m is the step's block m x world + r
    # the first N steps train the heads only (a new MLM head learns before its gradients reach the encoder);
    # the encoder then warms up over warmup_steps from 0 (optimizer groups marked "encoder": True)
    head_only_steps: int = 0

    def lr(self, step: int) -> float:
        return self.learning_rate * lr_multiplier(step, warmup_steps=self.warmup_steps, total_steps=self.total_steps,
                                                  schedule=self.schedule, power=self.poly_power)

    def encoder_factor(self, step: int) -> float:
        """The encoder's share of `lr(step)`: 0 in the head-only steps, then a linear warmup of its own."""
        if step < self.head_only_steps:
            return 0.0
        return min(1.0, (step - self.head_only_steps + 1) / max(self.warmup_steps, 1)) if self.head_only_steps else 1.0


# Sums over a step's micro-batches (one float64 vector, so a job can all-reduce it in one call).
STATS = ("loss", "mlm_loss", "nsp_loss", "mlm_correct", "mlm_count", "nsp_correct", "nsp_count", "examples",
         "tokens")  # nsp_count: examples with an NSP label (none from shards built without NSP)


def batch_stats(out, batch: PretrainBatch) -> Tensor:
    real = batch.masked_lm_ids != IGNORE_INDEX
    return torch.tensor([
        float(out.loss), float(out.mlm_loss), float(out.nsp_loss),
        float((out.mlm_logits.argmax(-1) == batch.masked_lm_ids)[real].sum()), float(real.sum()),
        float((out.nsp_logits.argmax(-1) == batch.next_sentence_label).sum()),
        float((batch.next_sentence_label != IGNORE_INDEX).sum()),
        float(len(batch.next_sentence_label)), float(batch.attention_mask.sum()),
    ], dtype=torch.float64)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, rows: Iterator[list[dict[str, Any]]],
               config: StepConfig, step: int, rank: int, precision: Precision,
               masker: Masker | None = None) -> tuple[Tensor, float]:
    """One optimiser step over `config.accumulation` micro-batches from `rows`; returns (STATS sums, grad norm).

    `model` may be wrapped for data parallelism: a wrapper with `no_sync()` (DDP) synchronises
    gradients only on the last micro-batch.
    """
    raw = getattr(model, "module", model)
    device = next(raw.parameters()).device
    set_lr(optimizer, config.lr(step))
    encoder = [g for g in optimizer.param_groups if g.get("encoder")] if config.head_only_steps else []
    for group in encoder:
        group["lr"] *= config.encoder_factor(step)
    optimizer.zero_grad(set_to_none=True)
    stats = torch.zeros(len(STATS), dtype=torch.float64)
    for micro in range(config.accumulation):
        block = micro * config.world + rank  # the step's micro-batch number, whatever the number of ranks
        torch.manual_seed(step_seed(config.seed, step, block))
        rng = np.random.default_rng([config.seed, step, block])
        batch = collate(next(rows), config.pad_id, config.max_predictions, masker, rng).to(device)
        last = micro == config.accumulation - 1
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            with precision.autocast():
                out = model(*batch)
            (out.loss / config.accumulation).backward()
        with torch.no_grad():
            stats += batch_stats(out, batch)
    if step < config.head_only_steps:  # no update, no optimizer state, no part in the clipped norm
        for group in encoder:
            for param in group["params"]:
                param.grad = None
    grad_norm = clip_grad_norm(raw.parameters(), config.max_grad_norm)
    optimizer.step()
    return stats, grad_norm


def window_metrics(sums: Tensor, micro_batches: float) -> dict[str, float]:
    """Training metrics from STATS sums over a logging window (all ranks)."""
    s = dict(zip(STATS, sums.tolist()))
    metrics = {
        "loss": s["loss"] / max(micro_batches, 1.0),
        "mlm_loss": s["mlm_loss"] / max(micro_batches, 1.0),
        "mlm_accuracy": s["mlm_correct"] / max(s["mlm_count"], 1.0),
    }
    if s["nsp_count"]:  # no NSP metrics from shards without NSP
        metrics |= {"nsp_loss": s["nsp_loss"] / max(micro_batches, 1.0), "nsp_accuracy": s["nsp_correct"] / s["nsp_count"]}
    return metrics


def probe_loss(rows: list[dict[str, Any]], config: StepConfig, masker: Masker | None, device: torch.device):
    """`loss(model)` of one micro-batch of `rows` at the real shape (fixed masks): what a precision probe times."""
    batch = collate(rows, config.pad_id, config.max_predictions, masker, np.random.default_rng(0)).to(device)
    return lambda model: model(*batch).loss


# ----------------------------------------------------------------------------- held-out evaluation


@dataclass
class Evaluator:
    """Held-out MLM and NSP accuracy and MLM loss on fixed examples with fixed masks (this rank's share)."""

    batches: list[PretrainBatch]

    @classmethod
    def build(cls, val: ShardSet, examples: int, rank: int, world: int, config: StepConfig,
              device: torch.device) -> Evaluator:
        rows, size = read_rows(val, examples), config.micro_batch_size
        masker = Masker.of(val)
        batches = []
        for block in range(rank, -(-len(rows) // size), world):  # the same blocks and masks on any number of ranks
            rng = np.random.default_rng([config.seed, 7, block])  # and at every evaluation
            batches.append(collate(rows[block * size : (block + 1) * size], config.pad_id,
                                   val.data.max_predictions_per_seq, masker, rng).to(device))
        return cls(batches)

    @torch.no_grad()
    def counts(self, model: nn.Module, precision: Precision) -> Tensor:
        """(MLM correct, MLM count, NSP correct, NSP-labelled examples, MLM loss sum) over this rank's share; sum over ranks."""
        raw = getattr(model, "module", model)
        was_training = raw.training
        raw.eval()
        counts = torch.zeros(5, dtype=torch.float64)
        for batch in self.batches:
            with precision.autocast():
                out = raw(*batch)
            real = batch.masked_lm_ids != IGNORE_INDEX
            counts += torch.tensor([
                float((out.mlm_logits.argmax(-1) == batch.masked_lm_ids)[real].sum()), float(real.sum()),
                float((out.nsp_logits.argmax(-1) == batch.next_sentence_label).sum()),
                float((batch.next_sentence_label != IGNORE_INDEX).sum()),
                float(out.mlm_loss) * float(real.sum()),
            ], dtype=torch.float64)
        raw.train(was_training)
        return counts

    @staticmethod
    def metrics(counts: Tensor) -> dict[str, float]:
        mlm_correct, mlm_count, nsp_correct, nsp_count, mlm_loss_sum = counts.tolist()
        nsp = {"val_nsp_accuracy": nsp_correct / nsp_count} if nsp_count else {}  # none without NSP
        return {"val_mlm_accuracy": mlm_correct / max(mlm_count, 1.0), **nsp,
                "val_mlm_loss": mlm_loss_sum / max(mlm_count, 1.0)}


def most_frequent_token_baseline(shards: ShardSet, examples: int, seed: int) -> float:
    """MLM accuracy of always predicting the most frequent masked token, on the held-out examples and masks."""
    rows = read_rows(shards, examples)
    masker = Masker.of(shards)
    counts: dict[int, int] = {}
    for i in range(0, len(rows), 256):
        chunk = rows[i : i + 256]
        if masker is not None:
            masked = masker(chunk, np.random.default_rng([seed, 8, i]))
            ids = masked.masked_lm_ids[masked.masked_lm_weights > 0]
        else:
            ids = [t for r in chunk for t in r["masked_lm_ids"]]
        for t in ids:
            counts[int(t)] = counts.get(int(t), 0) + 1
    total = sum(counts.values())
    return max(counts.values()) / total if total else 0.0


def measure_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """Achievable dense matmul FLOP/s on this device in `dtype` (the MFU denominator)."""
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


# ----------------------------------------------------------------------------- checkpoints


@dataclass
class TrainState(RunState):
    """Where a run is: what `train_state.json` records next to the weights and optimizer state."""

    STATE_FILE = TRAIN_STATE

    step: int = 0
    tokens_seen: int = 0
    samples_per_rank: int = 0
    world_size: int = 1
    precision: str | None = None
    final: bool = False
    files: dict[str, int] = field(default_factory=dict)  # name -> size: a complete checkpoint has them all
    rng: dict[str, Any] = field(default_factory=lambda: {"scheme": "seeded per (seed, step, block)"})


def save_training_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                             state: TrainState, tokenizer_dir: Path | None) -> Path:
    """Model, tokenizer, optimizer and train_state.json in `directory` (new, or empty); train_state.json last."""
    directory.mkdir(parents=True, exist_ok=True)
    write_checkpoint(getattr(model, "module", model), directory, tokenizer_dir=tokenizer_dir)
    save_optimizer_state(optimizer, directory)
    state.write(directory)
    return directory
