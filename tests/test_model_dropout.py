"""The CPU dropout and attention of `bert/model.py`: the same distribution and maths as torch's, cheaper."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bert.kernels import attention, dropout


def test_dropout_keeps_one_minus_p_and_scales():
    torch.manual_seed(0)
    x = torch.ones(1_000_003)  # not a multiple of 4: the last word is cut
    y = dropout(x, 0.1, training=True)
    kept = y != 0
    n = x.numel()
    sd = math.sqrt(n * 0.1 * 0.9)
    assert abs(int((~kept).sum()) - 0.1 * n) < 5 * sd  # Bernoulli(0.1) drops, within 5 standard deviations
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.9))
    # neighbouring elements are independent: pairs (i, i+1) drop together about p^2 of the time
    both = (~kept[:-1] & ~kept[1:]).float().mean().item()
    assert abs(both - 0.01) < 0.002
    assert torch.equal(dropout(x, 0.1, training=False), x) and torch.equal(dropout(x, 0.0, training=True), x)


def test_dropout_is_seeded_and_its_gradient_is_the_mask():
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(7)
    a = dropout(x, 0.25, training=True)
    torch.manual_seed(7)
    b = dropout(x, 0.25, training=True)
    assert torch.equal(a, b)
    a.sum().backward()
    assert torch.equal(x.grad, (a != 0).float() / 0.75)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_written_out_attention_equals_the_fused_kernel(dtype):
    torch.manual_seed(0)
    B, N, T, Dh = 3, 4, 17, 8
    q, k, v = (torch.randn(B, N, T, Dh, dtype=dtype) for _ in range(3))
    key_mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
    key_mask[1, ..., 11:] = False  # padding
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
    # a drop probability below 1/65536 drops nothing: the written-out path, with nothing dropped
    ours = attention(q, k, v, key_mask, dropout_p=1e-9, training=True)
    assert torch.allclose(ours.float(), reference.float(), atol=1e-5 if dtype == torch.float32 else 3e-2)


def test_attention_dropout_drops_probabilities_not_outputs():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 2, 9, 4) for _ in range(3))
    v = torch.eye(9).expand(2, 2, 9, 9)  # with V = I the output rows are the (dropped, rescaled) probabilities
    key_mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    out = attention(q, k, v, key_mask, dropout_p=0.5, training=True)
    probs = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1)
    kept = out != 0
    assert 0.3 < kept.float().mean() < 0.7
    assert torch.allclose(out[kept], 2 * probs[kept], atol=1e-6)
