"""Precision and compilation of a training step on CPU (no Ray): the policy, bf16 against fp32, and exactness.

- fp32 is plain float32 code: a step through `bert.finetune.train_step` / `bert.pretrain.train_step`
  equals, bit for bit, the same step written out by hand without any autocast.
- bf16 autocast keeps float32 master weights and optimizer state and lands close to fp32 after a
  few steps (losses within a few percent, and the two models' dev logits within 5% of each other).
- `torch.compile` runs the pretraining step and agrees with eager mode.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from bert.config import preset
from bert.finetune import dropout_seed, layerwise_groups, prepare, task_model, train_step
from bert.model import BertForPreTraining
from bert.optim import adamw, build_optimizer, clip_grad_norm
from bert.precision import PRECISIONS, Precision, choose_precision, cpu_has_native_bf16
from bert.pretrain import StepConfig, collate
from bert.pretrain import train_step as pretrain_step
from bert.example_order import GlobalStream
from bert.shards import ShardSet
from bert.tasks import collate as task_collate
from bert.tasks import get_task
from bert.tokenizer import Tokenizer

FP32, BF16 = Precision("fp32", "cpu"), Precision("bf16", "cpu")


@pytest.fixture(scope="module")
def mrpc(datasets_dir, minilm_dir):
    spec = get_task("mrpc")
    prepared = prepare(spec, datasets_dir / "glue" / "MRPC", Tokenizer.load(minilm_dir), minilm_dir, 128, max_train=64,
                       max_eval=8)
    return spec, prepared


def finetune_steps(minilm_dir: Path, spec, prepared, precision: Precision, steps: int = 3):
    torch.manual_seed(0)
    model = task_model(minilm_dir, spec, prepared.labels, seed=1).train()
    optimizer = adamw(layerwise_groups(model, 0.01, 1.0), lr=5e-5)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    losses = []
    for step in range(steps):
        batch = prepared.train_features[16 * step : 16 * (step + 1)]
        loss, _ = train_step(model, optimizer, batch, prepared.pad_id, lr=5e-5, max_grad_norm=1.0,
                             precision=precision, dropout_seed=dropout_seed(1, 0, step), trainable=trainable)
        losses.append(loss)
    return model, losses


def test_precision_policy():
    assert PRECISIONS == ("auto", "bf16", "fp32")
    cpu = torch.device("cpu")
    assert choose_precision("fp32", cpu).name == "fp32"
    assert choose_precision("bf16", cpu).name == "bf16"
    assert choose_precision("auto", cpu, previous="fp32").name == "fp32"  # a resumed run keeps its precision
    calls = []
    chosen = choose_precision("auto", cpu, probe=lambda p: calls.append(p.name))
    if cpu_has_native_bf16():
        assert set(calls) == {"fp32", "bf16"} and chosen.name in ("fp32", "bf16") and "probe" in chosen.reason
    else:
        assert calls == [] and chosen.name == "fp32"  # no native bf16: never emulated by default
    with pytest.raises(Exception, match="precision must be one of"):
        choose_precision("fp16", cpu)


def test_fp32_finetune_step_is_plain_float32_code(minilm_dir, mrpc):
    """Turning bf16 off gives exactly the numerics of the step written out without autocast."""
    spec, prepared = mrpc
    ours, _ = finetune_steps(minilm_dir, spec, prepared, FP32, steps=2)
    torch.manual_seed(0)
    model = task_model(minilm_dir, spec, prepared.labels, seed=1).train()
    optimizer = adamw(layerwise_groups(model, 0.01, 1.0), lr=5e-5)
    for group in optimizer.param_groups:
        group["lr"] = 5e-5 * group["lr_scale"]
    for step in range(2):
        inputs = task_collate(prepared.train_features[16 * step : 16 * (step + 1)], prepared.pad_id)
        torch.manual_seed(dropout_seed(1, 0, step))
        optimizer.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        clip_grad_norm(model.parameters(), 1.0)
        optimizer.step()
    for (name, a), b in zip(ours.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.slow  # the default run's 30-minute budget; run with -m slow
def test_bf16_finetune_steps_match_fp32_within_tolerance(minilm_dir, mrpc):
    spec, prepared = mrpc
    fp32_model, fp32_losses = finetune_steps(minilm_dir, spec, prepared, FP32)
    bf16_model, bf16_losses = finetune_steps(minilm_dir, spec, prepared, BF16)
    assert all(np.isfinite(bf16_losses))
    assert np.allclose(bf16_losses, fp32_losses, rtol=0.05)
    for name, p16 in bf16_model.state_dict().items():
        assert p16.dtype == torch.float32, name  # master weights stay float32
    # the two models, evaluated in float32 on held-out pairs, predict nearly the same logits
    inputs = task_collate(prepared.eval_features["dev"], prepared.pad_id)
    inputs.pop("labels")
    with torch.no_grad():
        a, b = fp32_model.eval()(**inputs).logits, bf16_model.eval()(**inputs).logits
    assert ((a - b).norm() / a.norm()).item() < 0.05


@pytest.fixture(scope="module")
def pretrain_rows(small_shards):
    shards = ShardSet.open(small_shards)
    stream = GlobalStream(shards, seed=3).rank_batches(8, 0, 0, 1)
    return shards, [next(stream) for _ in range(6)]


def pretrain_steps(shards, rows, precision: Precision, compile_model: bool = False, steps: int = 3):
    torch.manual_seed(0)
    raw = BertForPreTraining(preset("tiny", vocab_size=shards.tokenizer.vocab_size)).train()
    model = torch.compile(raw, dynamic=True) if compile_model else raw
    optimizer = build_optimizer(raw, "adamw", lr=1e-3, weight_decay=0.01)
    config = StepConfig(accumulation=2, micro_batch_size=8, learning_rate=1e-3, warmup_steps=1, total_steps=steps,
                        seed=5, max_predictions=shards.data.max_predictions_per_seq)
    batches = iter(rows)
    losses = [float(pretrain_step(model, optimizer, batches, config, step, 0, precision)[0][0]) / 2
              for step in range(steps)]
    return raw, losses


def test_bf16_pretraining_steps_match_fp32_within_tolerance(pretrain_rows):
    shards, rows = pretrain_rows
    _, fp32_losses = pretrain_steps(shards, rows, FP32)
    _, bf16_losses = pretrain_steps(shards, rows, BF16)
    assert all(np.isfinite(bf16_losses)) and np.allclose(bf16_losses, fp32_losses, rtol=0.03)


def test_compiled_pretraining_step_agrees_with_eager(pretrain_rows):
    import torch._inductor.config

    shards, rows = pretrain_rows
    eager_model, eager = pretrain_steps(shards, rows, FP32)
    with torch._inductor.config.patch(fallback_random=True):  # the compiled graph draws dropout masks as eager does
        compiled_model, compiled = pretrain_steps(shards, rows, FP32, compile_model=True)
    assert all(np.isfinite(compiled)) and np.allclose(compiled, eager, rtol=1e-3)
    for name, p in eager_model.state_dict().items():
        assert torch.allclose(compiled_model.state_dict()[name], p, atol=1e-4), name


def test_pretraining_collate_pads_and_masks(pretrain_rows):
    shards, rows = pretrain_rows
    batch = collate(rows[0], 0, shards.data.max_predictions_per_seq)
    lengths = [len(r["input_ids"]) for r in rows[0]]
    assert batch.input_ids.shape == (8, max(lengths))
    assert batch.attention_mask.sum(1).tolist() == lengths
    assert (batch.masked_lm_ids != -100).sum(1).tolist() == [len(r["masked_lm_ids"]) for r in rows[0]]
    assert copy.copy(batch).to(torch.device("cpu")).input_ids.equal(batch.input_ids)
