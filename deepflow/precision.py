"""The one precision policy: what ``precision: auto`` means on a device, and the warning for emulated bf16.

``auto`` is bf16 where the device computes it natively, else fp32:

- CUDA: bf16 when ``torch.cuda.is_bf16_supported()`` (Ampere and newer), else fp32;
- CPU: bf16 when the CPU has native bf16 instructions (AVX512-BF16 or AMX tiles, through torch's own capability
  queries ``torch.cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported``), else fp32: without them oneDNN
  and autocast emulate bf16 with fp32 conversions around every op, which is several times *slower* than fp32
  (:data:`EMULATED_BF16_SLOWDOWN`, ``bench/bench_precision.py``);
- any other device: fp32.

An explicit ``bf16`` is honoured everywhere; on a CPU without native bf16 the choice carries a one-line
:attr:`PrecisionChoice.warning` that the job prints once (rank 0).

    choice = choose_precision("auto", torch.device("cpu"))
    choice.precision   # "fp32" on an AVX2-only CPU
    choice.describe()  # "fp32 (auto: this CPU has no native bf16 (AVX512-BF16/AMX))"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["EMULATED_BF16_SAMPLING_SLOWDOWN", "EMULATED_BF16_SLOWDOWN", "PRECISIONS", "PrecisionChoice", "choose_precision", "native_bf16"]

Precision = Literal["fp32", "bf16", "fp16"]
#: what a config may ask for; ``auto`` resolves through :func:`choose_precision`
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: bf16 autocast / fp32 time of the demo model's training step (batch 64) on a 2-core AMD EPYC with AVX2 only
#: (``python bench/bench_precision.py``, 2026-12-07, median of interleaved runs: 7.71 vs 0.48 s)
EMULATED_BF16_SLOWDOWN = 16
#: the same for its sampling forward pass (1.02 vs 0.13 s)
EMULATED_BF16_SAMPLING_SLOWDOWN = 7.6


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a job runs in, what was asked for and why."""

    precision: Precision
    requested: str
    reason: str
    warning: str | None = None

    def describe(self) -> str:
        """``"bf16 (auto: CUDA device with bf16 support)"`` / ``"fp32"`` (asked for explicitly)."""
        if self.requested == "auto":
            return f"{self.precision} (auto: {self.reason})"
        return self.precision


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` computes bf16 natively, and the reason in words."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return True, f"{torch.cuda.get_device_name(device)} supports bf16"
        return False, f"{torch.cuda.get_device_name(device)} has no bf16 support"
    if device.type == "cpu":
        features = [name for name, query in (("AVX512-BF16", "_is_avx512_bf16_supported"),
                                             ("AMX", "_is_amx_tile_supported"))
                    if getattr(torch.cpu, query, lambda: False)()]
        if features:
            return True, f"this CPU has native bf16 ({', '.join(features)})"
        return False, "this CPU has no native bf16 (AVX512-BF16/AMX)"
    return False, f"no native bf16 known for device type {device.type!r}"


def choose_precision(requested: str, device: torch.device) -> PrecisionChoice:
    """Resolve ``requested`` (one of :data:`PRECISIONS`) for ``device``; the choice carries a warning when bf16 is
    forced on a CPU that only emulates it."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision: must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    native, reason = native_bf16(device)
    if requested == "auto":
        return PrecisionChoice("bf16" if native else "fp32", requested, reason)
    if requested == "bf16" and device.type == "cpu" and not native:
        warning = (f"precision: bf16 on a CPU without native bf16 instructions is emulated: "
                   f"{EMULATED_BF16_SLOWDOWN:g}x slower than fp32 in training, {EMULATED_BF16_SAMPLING_SLOWDOWN:g}x in "
                   "sampling on a 2-core AVX2 CPU (bench/bench_precision.py); precision auto picks fp32 here")
        return PrecisionChoice("bf16", requested, reason, warning)
    return PrecisionChoice(requested, requested, "asked for")  # type: ignore[arg-type]
