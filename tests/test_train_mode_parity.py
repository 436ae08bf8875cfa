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
