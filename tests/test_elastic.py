"""Elastic determinism: the global batches of a pretraining run do not depend on its number of workers.

`bert.example_order.GlobalStream` splits one seeded order across ranks by micro-batch, and
`bert.pretrain.train_step` seeds masks and dropout by the step's micro-batch number, so a step on
N workers sees the examples, masks and dropout of the same step on 1 worker; only the order of the
floating-point sums differs. Checked here on the real Wikipedia shards: the example ids per step for
1, 2 and 4 workers, and one optimiser step's weights on 1 worker against 2 and 4 simulated ranks
(their gradients averaged as DDP does), within a float32 rounding tolerance.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from bert.config import preset
from bert.example_order import GlobalStream
from bert.model import BertForPreTraining
from bert.optim import build_optimizer
from bert.precision import Precision
from bert.pretrain import Masker, StepConfig, train_step
from bert.shards import ShardSet
from pipelines.jobs.configs import PretrainConfig


def _key(row: dict) -> str:
    return json.dumps(row["input_ids"])  # an example's identity: its tokens


def _steps(stream: GlobalStream, micro: int, per_step: int, world: int, start_step: int, steps: int) -> list[list[str]]:
    """The examples of each global step, as the `world` ranks read them (block m x world + r from rank r)."""
    ranks = [stream.rank_batches(micro, start_step * per_step * micro, rank, world) for rank in range(world)]
    out = []
    for _ in range(steps):
        blocks: dict[int, list[str]] = {}
        for rank, batches in enumerate(ranks):
            for m in range(per_step // world):
                blocks[m * world + rank] = [_key(r) for r in next(batches)]
        out.append([key for j in sorted(blocks) for key in blocks[j]])
    return out


def test_the_examples_of_every_step_are_the_same_for_any_worker_count(small_shards):
    shards = ShardSet.open(small_shards)
    stream = GlobalStream(shards, seed=5)
    micro, per_step = 4, 4  # global batch 16
    steps = -(-stream.epoch_size // 16) + 2  # across an epoch boundary
    one = _steps(stream, micro, per_step, 1, 0, steps)
    assert _steps(stream, micro, per_step, 2, 0, steps) == one
    assert _steps(stream, micro, per_step, 4, 0, steps) == one
    # resumed at step k on another count: the steps an uninterrupted run has
    assert _steps(stream, micro, per_step, 2, 5, 3) == one[5:8]
    # every example once per epoch, in an order that is not the files' own
    first_epoch = [k for step in one for k in step][: stream.epoch_size]
    assert len(set(first_epoch)) == len(first_epoch) == stream.epoch_size
    ids = stream.block_ids(micro, 0, per_step)
    assert [len(b) for b in ids] == [micro] * per_step and ids[0] != sorted(ids[0])


def _one_step(model, shards: ShardSet, world: int, micro: int, per_step: int) -> dict[str, torch.Tensor]:
    """One optimiser step with `world` simulated ranks: each rank's gradients, averaged as DDP all-reduces them."""
    model = copy.deepcopy(model)
    optimizer = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-6)
    # no clipping inside a rank's step (DDP clips the all-reduced gradient: done below, after the average)
    config = StepConfig(accumulation=per_step // world, micro_batch_size=micro, learning_rate=1e-3, warmup_steps=0,
                        total_steps=10, max_grad_norm=1e12, seed=11,
                        max_predictions=shards.data.max_predictions_per_seq, world=world)
    stream = GlobalStream(shards, seed=5)
    grads = None
    for rank in range(world):
        rank_model = copy.deepcopy(model)
        rank_optimizer = build_optimizer(rank_model, "adamw", lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-6)
        rows = stream.rank_batches(micro, 0, rank, world)
        rank_model.train()
        train_step(rank_model, rank_optimizer, rows, config, 0, rank, Precision("fp32", "cpu"), Masker.of(shards))
        # the rank's own optimizer step moved its copy only; its gradients are what it computed
        g = [p.grad.detach().clone() for p in rank_model.parameters()]
        grads = g if grads is None else [a + b for a, b in zip(grads, g)]
    for p, g in zip(model.parameters(), grads):
        p.grad = g / world
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_one_step_on_one_two_and_four_ranks_gives_the_same_weights_to_rounding(small_shards):
    shards = ShardSet.open(small_shards)
    torch.manual_seed(0)
    model = BertForPreTraining(preset("tiny", vocab_size=shards.tokenizer.vocab_size))
    one, two, four = (_one_step(model, shards, world, micro=4, per_step=4) for world in (1, 2, 4))
    worst = max(max(float((one[k] - other[k]).abs().max()) for k in one) for other in (two, four))
    assert worst < 1e-5, worst  # float32 sums in another order; a different batch would move weights by ~1e-3
    moved = max(float((one[k] - model.state_dict()[k]).abs().max()) for k in one)
    assert moved > 1e-4  # the step did something


@pytest.mark.parametrize("value, expected", [(2, (2, 2)), ("3", (3, 3)), ("1-4", (1, 4)), (" 2-2 ", (2, 2))])
def test_num_workers_is_a_count_or_an_elastic_range(value, expected):
    config = PretrainConfig(num_workers=value, global_batch_size=96, micro_batch_size=8)
    assert config.worker_range == expected


@pytest.mark.parametrize("value, message", [("0", "1 <= MIN <= MAX"), ("3-1", "1 <= MIN <= MAX"), ("two", "N or MIN-MAX"),
                                            ("1-3", "every worker count of 1-3 must divide it")])
def test_bad_worker_counts_are_refused(value, message):
    from bert.errors import InputError

    with pytest.raises(InputError, match=message):
        PretrainConfig(num_workers=value, global_batch_size=32, micro_batch_size=8)


def test_masks_and_dropout_follow_the_block_not_the_rank():
    """Rank r's micro-batch m is block m x world + r: its seed is the same as block j's on one rank."""
    from bert.pretrain import step_seed

    world, rank, micro = 2, 1, 1
    block = micro * world + rank
    assert step_seed(11, 0, block) == step_seed(11, 0, 3)
    assert np.random.default_rng([11, 0, block]).integers(1 << 30) == np.random.default_rng([11, 0, 3]).integers(1 << 30)
