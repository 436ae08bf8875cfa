"""Optimisers and schedules (bert/optim.py)."""

from __future__ import annotations

import pytest
import torch

from bert.config import BertConfig
from bert.errors import InputError
from bert.model import BertForPreTraining
from bert.optim import Lamb, build_optimizer, lr_multiplier, param_groups

SMALL = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def test_weight_decay_skips_biases_and_layernorm():
    model = BertForPreTraining(SMALL)
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(not names[id(p)].endswith("bias") and "LayerNorm" not in names[id(p)] for p in decay["params"])
    assert all(names[id(p)].endswith("bias") or "LayerNorm" in names[id(p)] for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_schedule_warms_up_then_decays_to_zero():
    f = lambda step, **kw: lr_multiplier(step, warmup_steps=10, total_steps=110, **kw)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(110) == 0.0
    assert f(60, schedule="poly", power=2.0) == pytest.approx(0.25)
    assert f(100, schedule="constant") == 1.0
    with pytest.raises(InputError, match="unknown schedule"):
        f(5, schedule="cosine")


def test_lamb_first_step_moves_each_tensor_by_lr_times_its_norm():
    """LAMB's trust ratio ||w|| / ||update|| makes every tensor's step length lr * ||w||."""
    torch.manual_seed(0)
    weights = [torch.randn(8, 4, requires_grad=True), torch.randn(16, requires_grad=True)]
    before = [w.detach().clone() for w in weights]
    optimizer = Lamb(weights, lr=0.01, weight_decay=0.01)
    sum((w * torch.randn_like(w)).sum() for w in weights).backward()
    optimizer.step()
    for w, w0 in zip(weights, before):
        assert (w.detach() - w0).norm().item() == pytest.approx(0.01 * w0.norm().item(), rel=1e-5)


def test_lamb_trains_a_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.randn(128, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    optimizer = build_optimizer(model, "lamb", lr=0.05, weight_decay=0.0)
    losses = []
    for _ in range(200):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]


def test_unknown_optimizer():
    with pytest.raises(InputError, match="unknown optimizer 'sgd'"):
        build_optimizer(BertForPreTraining(SMALL), "sgd", lr=1e-3, weight_decay=0.0)


def test_adamw_is_fused_on_cpu_and_takes_the_same_steps_as_the_loop_implementation():
    """The fused kernel is an implementation choice, not another algorithm: 5 steps agree with torch's for-loop AdamW."""
    torch.manual_seed(0)
    models = [BertForPreTraining(SMALL) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    for model in models:
        model.eval()  # no dropout: both see the same gradients
    fused = build_optimizer(models[0], "adamw", lr=1e-2, weight_decay=0.01)
    loop = build_optimizer(models[1], "adamw", lr=1e-2, weight_decay=0.01, fused=False)
    assert fused.defaults["fused"] and not loop.defaults["fused"] and not loop.defaults["foreach"]
    ids = torch.randint(0, SMALL.vocab_size, (4, 12))
    for _ in range(5):
        for model, optimizer in zip(models, (fused, loop)):
            optimizer.zero_grad()
            out = model(input_ids=ids, token_type_ids=torch.zeros_like(ids), masked_lm_positions=ids[:, :3] % 12,
                        masked_lm_ids=ids[:, 3:6], next_sentence_label=torch.tensor([0, 1, 0, 1]))
            out.loss.backward()
            optimizer.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_finetune_schedule_is_pretrainings_and_set_lr_scales_each_group():
    """Fine-tuning's schedule (bert/finetune.py) and pretraining's (StepConfig.lr) are one function; `set_lr`
    gives each parameter group the step's rate times its layer-wise `lr_scale`."""
    from bert.finetune import Schedule
    from bert.optim import set_lr
    from bert.pretrain import StepConfig

    schedule = Schedule.of(num_train=100, batch_size=10, epochs=3, warmup_ratio=0.1, world=1, peak=1e-3)
    assert (schedule.per_epoch, schedule.total, schedule.warmup) == (10, 30, 3)
    pretraining = StepConfig(accumulation=1, micro_batch_size=10, learning_rate=1e-3, warmup_steps=3, total_steps=30)
    assert [schedule.lr(s) for s in range(31)] == [pretraining.lr(s) for s in range(31)]
    assert schedule.lr(0) == pytest.approx(1e-3 / 3) and schedule.lr(3) == pytest.approx(1e-3)
    assert schedule.lr(15) == pytest.approx(1e-3 * 15 / 27) and schedule.lr(30) == 0.0
    head, layer = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW([{"params": head.parameters()}, {"params": layer.parameters(), "lr_scale": 0.25}])
    set_lr(optimizer, schedule.lr(15))
    assert [g["lr"] for g in optimizer.param_groups] == [schedule.lr(15), schedule.lr(15) * 0.25]
