"""Precision of a training or evaluation step on one device: a policy, chosen by measurement.

`bf16` runs the forward pass under `torch.autocast(dtype=bfloat16)`: matrix multiplies in
bfloat16, while the weights, their gradients and the optimizer state stay float32 (the master
copy), and autocast keeps LayerNorm, softmax and the losses in float32 (the model also casts
logits to float32 before every loss). `fp32` runs everything in float32, with no autocast at
all, so its numerics are exactly those of plain float32 code.

`auto` picks bf16 where the hardware has native bf16 arithmetic and it pays:
* CUDA: bf16 when the GPU supports it (Ampere and newer), else fp32;
* CPU: only with native bf16 instructions (x86 AVX512-BF16 or AMX-BF16, Arm BF16), and only if
  a probe of the actual training step at the actual shape runs faster in bf16; on this 2-core
  AVX512-BF16 machine an L6/H384 step ran 1.5-1.9x faster, while small shapes (H128-H256) can
  run slower, as casting costs more than the matmuls gain. Without native instructions bf16 is
  emulated and always slower.
The choice is recorded with the run and kept when it resumes.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from bert.errors import InputError

if TYPE_CHECKING:  # torch is imported where it is used: job configs read PRECISIONS without it
    import torch

PrecisionName = Literal["auto", "bf16", "fp32"]  # what a job asks for: auto = bf16 where native and faster
PRECISIONS: tuple[str, ...] = get_args(PrecisionName)
PROBE_MIN_GAIN = 1.10  # bf16 must be at least this much faster in the probe to be chosen on CPU


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 arithmetic instructions (read from /proc/cpuinfo on Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return platform.machine() == "arm64" and platform.system() == "Darwin"  # Apple M2 and newer
    flags = set()
    for line in cpuinfo.read_text(errors="replace").splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[-1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def native_bf16(device: torch.device) -> bool:
    import torch

    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


@dataclass(frozen=True)
class Precision:
    """How a step computes: `name` is "bf16" or "fp32" (never "auto": that is resolved first)."""

    name: str
    device_type: str
    reason: str = ""

    @property
    def dtype(self) -> torch.dtype | None:
        import torch

        return torch.bfloat16 if self.name == "bf16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context a forward pass runs in: bf16 autocast, or nothing at all for fp32."""
        import torch

        if self.name == "bf16":
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def choose_precision(requested: str, device: torch.device, probe: Callable[[Precision], None] | None = None,
                     previous: str | None = None) -> Precision:
    """Resolve `requested` (auto | bf16 | fp32) for `device`.

    `previous` is the precision a resumed run used: kept, so a resume never switches numerics.
    `probe(precision)` runs one training step at the real shape; with `auto` on a CPU with
    native bf16 it is timed in both precisions and bf16 is chosen if it is PROBE_MIN_GAIN
    times faster.
    """
    if requested not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    kind = device.type
    if previous is not None:
        return Precision(previous, kind, "kept from the run being resumed")
    if requested == "fp32":
        return Precision("fp32", kind, "requested")
    if requested == "bf16":
        if not native_bf16(device):
            return Precision("bf16", kind, "requested (no native bf16 on this device: emulated, slow)")
        return Precision("bf16", kind, "requested")
    if not native_bf16(device):
        return Precision("fp32", kind, f"auto: no native bf16 on {kind}")
    if kind != "cpu" or probe is None:
        return Precision("bf16", kind, f"auto: native bf16 on {kind}")
    fp32_s, bf16_s = (_time_step(probe, Precision(name, kind)) for name in ("fp32", "bf16"))
    gain = fp32_s / bf16_s
    name = "bf16" if gain >= PROBE_MIN_GAIN else "fp32"
    return Precision(name, kind, f"auto: probe step fp32 {fp32_s * 1e3:.0f} ms, bf16 {bf16_s * 1e3:.0f} ms "
                                 f"(x{gain:.2f}; bf16 needs x{PROBE_MIN_GAIN:.2f})")


def _time_step(probe: Callable[[Precision], None], precision: Precision, repeats: int = 3) -> float:
    probe(precision)  # warm-up: allocator, kernels, autocast caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        probe(precision)
        times.append(time.perf_counter() - start)
    return min(times)


def probe_step(model: torch.nn.Module, loss: Callable[[torch.nn.Module], torch.Tensor]) -> Callable[[Precision], None]:
    """A forward + backward of `loss(model)` that changes nothing (weights, gradients, RNG streams): the step
    `choose_precision` times. `model` may be DDP-wrapped: the probe runs on the raw module (no collective)."""
    raw = getattr(model, "module", model)

    def probe(precision: Precision) -> None:
        import torch

        with torch.random.fork_rng(devices=[]):
            with precision.autocast():
                value = loss(raw)
            value.backward()
        raw.zero_grad(set_to_none=True)

    return probe
