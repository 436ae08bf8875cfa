"""Dropout and attention for `bert.model`: torch's fused kernels where the hardware has them; on CPU in
training, a cheaper dropout (16-bit slices of 64-bit random words) and attention written out around it,
because torch's scaled_dot_product_attention falls back to an unfused bernoulli path there.

`with cpu_kernels("torch"):` runs torch's own `F.dropout` and SDPA on CPU as well (what `transformers`
runs, draw for draw): the benchmarks' and parity tests' peer. Jobs run the default, "fast".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CpuKernels = Literal["fast", "torch"]
_cpu_kernels: CpuKernels = "fast"


@contextlib.contextmanager
def cpu_kernels(kind: CpuKernels) -> Iterator[None]:
    """Inside the block this process runs `kind`'s dropout and training attention on CPU: "fast" (below) or
    "torch" (torch's own); after it, the previous choice again."""
    global _cpu_kernels
    if kind not in get_args(CpuKernels):
        raise ValueError(f"cpu kernels: expected one of {get_args(CpuKernels)}, got {kind!r}")
    previous, _cpu_kernels = _cpu_kernels, kind
    try:
        yield
    finally:
        _cpu_kernels = previous


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout: keep each element with probability 1 - p and scale it by 1 / (1 - p).

    On CPU, torch's `F.dropout` draws one random double per element (`bernoulli_`), which costs
    more than the matmuls around it in a small BERT. Here the keep mask comes from 16-bit slices
    of 64-bit random words (four elements per draw, from the same seeded generator): an element
    is kept when its slice is at least round(p * 65536), so p holds to within 1/65536. Elsewhere
    (CUDA) torch's fused kernel is used as it is.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or _cpu_kernels == "torch":
        return F.dropout(x, p, training=True)
    words = torch.randint(-(2**63), 2**63 - 1, ((x.numel() + 3) // 4,), dtype=torch.int64)
    keep = words.view(torch.int16)[: x.numel()].view(x.shape) >= round(p * 65536) - 32768
    return torch.where(keep, x * (1.0 / (1.0 - p)), 0.0)


class Dropout(nn.Module):
    """`dropout` as a module, in place of `nn.Dropout` (same name in checkpoints: it has no parameters)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, dropout_p: float, training: bool) -> Tensor:
    """softmax(q k^T / sqrt(Dh), keys masked) v, with dropout on the attention probabilities in training.

    `scaled_dot_product_attention` runs a fused kernel, except on CPU with dropout, where torch
    falls back to an unfused reference path with `bernoulli_` masks (measured many times slower
    than the fused kernel at BERT's shapes). There the same computation is written out here,
    with the cheaper `dropout`: softmax in float32, matmuls in the autocast dtype.
    """
    if not training or dropout_p == 0.0 or q.device.type != "cpu" or _cpu_kernels == "torch":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p if training else 0.0)
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)  # (B, N, T, T)
    scores = scores.masked_fill(~key_mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)  # (B, N, T, T)
    return dropout(probs, dropout_p, True) @ v  # (B, N, T, Dh)
