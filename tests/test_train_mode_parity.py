"""Training-mode parity with Hugging Face `transformers` (issue 33): the eval-mode parity tests say nothing
about dropout, attention dropout or gradients, which only act in training.

- With dropout off, a training-mode forward and backward of `BertForSequenceClassification` gives the
  same loss and the same gradient for every parameter as transformers' (same weights).
- With dropout on and torch's kernels (`F.dropout`, SDPA) in place of `bert.kernels`' CPU ones, the same
  seed gives the same masks in the same places, hence the same loss and gradients as transformers': the
  model in training differs from transformers' in nothing but the kernels' random draws.
- With dropout on, the noise dropout puts on the outputs has the same size as transformers' (dropout at
  the same places, at the same rate and scale), and `bert.kernels` draws masks independently across batch
  rows, heads and positions, like `F.dropout`.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from bert.config import BertConfig
from bert.kernels import attention, cpu_kernels, dropout
from bert.model import BertForSequenceClassification

SMALL = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
             max_position_embeddings=64)


def twin_models(dropout_prob: float):
    """transformers' and our sequence classifier with the same weights, in training mode."""
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(**SMALL, num_labels=2, hidden_dropout_prob=dropout_prob,
                                        attention_probs_dropout_prob=dropout_prob, attn_implementation="sdpa")
    hf = transformers.BertForSequenceClassification(hf_config)
    ours = BertForSequenceClassification(BertConfig(**SMALL, hidden_dropout_prob=dropout_prob,
                                                    attention_probs_dropout_prob=dropout_prob), num_labels=2)
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not missing and set(unexpected) <= {"bert.embeddings.position_ids"}
    return hf.train(), ours.train()


def batch(B: int = 8, T: int = 19, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, SMALL["vocab_size"], (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for i in range(B):
        mask[i, T - i :] = 0  # rows of different lengths
    ids[mask == 0] = 0
    return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": mask,
            "labels": torch.randint(0, 2, (B,), generator=g)}


def test_training_forward_and_backward_equal_transformers_without_dropout():
    hf, ours = twin_models(0.0)
    inputs = batch()
    hf_loss = hf(**inputs).loss
    our_loss = ours(**inputs).loss
    hf_loss.backward()
    our_loss.backward()
    assert torch.allclose(our_loss, hf_loss, atol=1e-6)
    grads = dict(ours.named_parameters())
    for name, param in hf.named_parameters():
        scale = param.grad.abs().max().item()
        if scale < 1e-8:  # key biases: their exact gradient is 0 (softmax ignores a per-row constant)
            continue
        assert torch.allclose(grads[name].grad, param.grad, atol=1e-5 * scale, rtol=1e-4), name


def test_with_torch_kernels_the_same_seed_gives_transformers_loss_and_gradients_with_dropout_on():
    """Every dropout where transformers has one, in the same order (so each draws the same mask from the same
    generator state), at the same rate: a missing, extra or reordered dropout changes the loss."""
    with cpu_kernels("torch"):
        hf, ours = twin_models(0.1)
        inputs = batch()
        for seed in (1, 2):
            torch.manual_seed(seed)
            hf_loss = hf(**inputs).loss
            torch.manual_seed(seed)
            our_loss = ours(**inputs).loss
            torch.manual_seed(seed + 100)
            other_draw = ours(**inputs).loss
            assert not torch.allclose(other_draw, our_loss, atol=1e-4)  # dropout is on: another draw, another loss
            assert torch.allclose(our_loss, hf_loss, atol=1e-6), seed
            hf.zero_grad()
            ours.zero_grad()
            hf_loss.backward()
            our_loss.backward()
            grads = dict(ours.named_parameters())
            for name, param in hf.named_parameters():
                scale = param.grad.abs().max().item()
                if scale < 1e-8:  # key biases (exact gradient 0)
                    continue
                assert torch.allclose(grads[name].grad, param.grad, atol=1e-5 * scale, rtol=1e-4), (seed, name)


@torch.no_grad()
def output_noise(model, inputs, draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element standard deviation of (pooled output, logits) over dropout draws."""
    pooled, logits = [], []
    hook = model.bert.pooler.register_forward_hook(lambda module, args, output: pooled.append(output))
    for i in range(draws):
        torch.manual_seed(100 + i)
        logits.append(model(**inputs).logits)
    hook.remove()
    return torch.stack(pooled).std(0), torch.stack(logits).std(0)


def test_dropout_noise_has_the_size_of_transformers():
    """Dropout placed as transformers places it (after embeddings, attention probabilities, each sublayer, before
    the classifier) at the same rate and scale moves the outputs by the same amount; a missing, doubled or
    misplaced dropout changes this by far more than the 15% allowed here."""
    hf, ours = twin_models(0.1)
    inputs = batch(B=6, T=15)
    hf_pooled, hf_logits = output_noise(hf, inputs, 64)
    our_pooled, our_logits = output_noise(ours, inputs, 64)
    assert hf_pooled.mean() > 0.01  # the noise is there to compare
    assert abs(our_pooled.mean() / hf_pooled.mean() - 1) < 0.15
    assert abs(our_logits.mean() / hf_logits.mean() - 1) < 0.15


def test_dropout_masks_are_independent_across_rows_heads_and_positions():
    """Identical rows and heads get their own masks: the fraction of positions dropped in both of two copies
    is p^2, as for two independent masks (a shared mask would give p)."""
    torch.manual_seed(3)
    p = 0.1
    x = torch.ones(64, 12, 34, 34)  # (B, N, T, T) like attention probabilities
    kept = dropout(x, p, training=True) != 0
    for a, b in ((kept[0::2], kept[1::2]), (kept[:, 0::2], kept[:, 1::2]), (kept[:, :, 0::2], kept[:, :, 1::2])):
        both_dropped = (~a & ~b).float().mean().item()
        assert abs(both_dropped - p * p) < 0.003
    assert abs((~kept).float().mean().item() - p) < 0.003


@pytest.mark.parametrize("rows_equal", [True, False])
def test_attention_dropout_differs_between_equal_rows_and_heads(rows_equal):
    """With V = I the attention output is the dropped probability matrix: equal inputs in two batch rows and
    in two heads must not come out equally dropped."""
    torch.manual_seed(5)
    q = torch.randn(1, 1, 16, 8).expand(4, 6, 16, 8) if rows_equal else torch.randn(4, 6, 16, 8)
    k = q.clone()
    v = torch.eye(16).expand(4, 6, 16, 16)
    key_mask = torch.ones(4, 1, 1, 16, dtype=torch.bool)
    dropped = attention(q, k, v, key_mask, dropout_p=0.1, training=True) == 0
    assert not torch.equal(dropped[0], dropped[1])
    assert not torch.equal(dropped[:, 0], dropped[:, 1])


@pytest.mark.integration
def test_the_finetune_job_trains_what_a_plain_transformers_loop_trains(ray_local, datasets_dir, minilm_dir, tmp_path):
    """With dropout off (the checkpoint's config says 0), `bertflow finetune` on MRPC pairs ends with the weights of a
    plain loop around transformers' `BertForSequenceClassification`: transformers' tokenizer, AdamW on every
    parameter with weight decay on matrices only, clipping at 1.0, a linear warmup whose i-th step (0-based) has
    lr x (i + 1) / warmup then linear decay to 0, given the job's head draw and its batch order. Every part of the
    job's recipe (schedule, decay groups, eps, clipping, padding, labels, the DDP wrapper) is pinned here to an
    independent loop, without the noise dropout adds; the dropout draws themselves are the tests above."""
    import csv
    import math
    import shutil

    from safetensors.torch import load_file

    from bert.finetune import task_model
    from bert.tasks import get_task, length_grouped_batches
    from pipelines.jobs.finetune import FinetuneConfig, run_finetune

    checkpoint = tmp_path / "minilm-no-dropout"
    shutil.copytree(minilm_dir, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "hidden_dropout_prob": 0.0,
                                                        "attention_probs_dropout_prob": 0.0}))
    seed, n, lr, weight_decay, batch_size = 7, 320, 5e-5, 0.1, 32  # decay 0.1: its groups move weights visibly
    out = tmp_path / "job"
    data = datasets_dir / "glue" / "MRPC"
    run_finetune(FinetuneConfig(task="mrpc", data=str(data), checkpoint=str(checkpoint), out=str(out), seed=seed,
                                epochs=1, learning_rate=lr, weight_decay=weight_decay, batch_size=batch_size,
                                max_train_examples=n, max_eval_examples=32, precision="fp32", log_model=False))
    job = load_file(out / "checkpoint" / "model.safetensors")
    labels = json.loads((out / "metrics.json").read_text())["labels"]

    with open(data / "train.tsv", encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:n]
    tokenizer = transformers.BertTokenizerFast.from_pretrained(checkpoint)
    encoded = [tokenizer(r["#1 String"], r["#2 String"], truncation=True, max_length=128) for r in rows]
    targets = [labels.index(r["Quality"]) for r in rows]
    model = transformers.BertForSequenceClassification.from_pretrained(checkpoint, num_labels=2,
                                                                       attn_implementation="sdpa").train()
    model.classifier.load_state_dict(task_model(checkpoint, get_task("mrpc"), labels, seed).classifier.state_dict())
    plain = [n.endswith("bias") or "LayerNorm" in n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    decayed = [p for p, nd in zip(params, plain) if not nd]
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": weight_decay},
                                   {"params": [p for p, nd in zip(params, plain) if nd], "weight_decay": 0.0}],
                                  lr=lr, eps=1e-6)
    total = math.ceil(n / batch_size)
    warmup = int(0.1 * total)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: (i + 1) / warmup if i < warmup else (total - i) / (total - warmup))
    for indices in length_grouped_batches([len(e["input_ids"]) for e in encoded], batch_size, seed, 0):
        inputs = tokenizer.pad([encoded[i] for i in indices], return_tensors="pt")
        loss = model(**inputs, labels=torch.tensor([targets[i] for i in indices])).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
    assert schedule.last_epoch == total
    start = load_file(checkpoint / "model.safetensors")
    for name, param in model.state_dict().items():
        if name == "bert.embeddings.position_ids":
            continue
        moved = (param - start[name.removeprefix("bert.")]).abs().max() if name.removeprefix("bert.") in start else 1
        assert moved > 0 and torch.allclose(job[name], param, atol=2e-6, rtol=0), (
            name, (job[name] - param).abs().max().item(), float(moved))
