"""Three-tier dispatch (DESIGN.md §6); every tier obeys the same numerical contract.

1. ``FUSED_TRAIN``: fused Triton forward (saving ``inner``) and fused backward — CUDA, Triton, gradients
   needed, T·d_out ≥ ``TRAIN_MIN_ELEMENTS``;
2. ``FUSED_INFER``: fused forward only — nothing requires grad, T·d_out ≥ ``INFER_MIN_ELEMENTS``;
3. ``EAGER``: float64 torch — CPU, no Triton, below the crossover, or forced.

The crossovers are measured on the GPU (``bench/kernels_gpu.py``, part "perf", recorded in
``reports/kernels-h100/report.md``), not guessed. ``DORA_VERIFY_TIER=eager|fused`` overrides the choice
globally; a ``tier=`` argument overrides it per call. Under ``TRITON_INTERPRET=1`` the fused kernels
also run on CPU tensors (logic checks only: see REFERENCES.md).
"""
from __future__ import annotations

import enum
import os

import torch

try:  # Triton is optional: CPU-only installs and non-Linux platforms get the eager tier
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the platform
    HAS_TRITON = False

# Measured on one H100 (reports/kernels-h100/report.md, crossover table): smallest T·d_out where fused is
# not slower than the eager tier. The eager tier computes in float64, so the fused path wins almost
# everywhere on a GPU; below these sizes launch overhead dominates both.
INFER_MIN_ELEMENTS = 1
TRAIN_MIN_ELEMENTS = 1


class Tier(enum.IntEnum):
    FUSED_TRAIN = 1
    FUSED_INFER = 2
    EAGER = 3


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable(t: torch.Tensor) -> bool:
    """Can the fused kernels run on tensors like ``t``?"""
    if not HAS_TRITON or t.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    return t.is_cuda or (interpreting() and t.device.type == "cpu")


def select_tier(base: torch.Tensor, needs_grad: bool, force: "Tier | str | None" = None) -> Tier:
    """Pick the tier for a compose of ``base``'s shape; ``force`` ('fused', 'eager' or a Tier) overrides."""
    force = force if force is not None else os.environ.get("DORA_VERIFY_TIER") or None
    if isinstance(force, str):
        if force not in ("fused", "eager"):
            raise ValueError(f"tier must be 'fused' or 'eager', got {force!r}")
        if force == "eager":
            return Tier.EAGER
        if not triton_usable(base):
            raise ValueError(f"tier='fused' needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 on CPU); "
                             f"got a {base.device} tensor of {base.dtype}")
        return Tier.FUSED_TRAIN if needs_grad else Tier.FUSED_INFER
    if isinstance(force, Tier):
        if force != Tier.EAGER and not triton_usable(base):
            raise ValueError(f"tier {force.name} needs Triton and a CUDA tensor; got {base.device}")
        return force
    if not triton_usable(base) or not base.is_cuda:
        return Tier.EAGER
    n = base.numel()
    if needs_grad:
        return Tier.FUSED_TRAIN if n >= TRAIN_MIN_ELEMENTS else Tier.EAGER
    return Tier.FUSED_INFER if n >= INFER_MIN_ELEMENTS else Tier.EAGER


__all__ = ["HAS_TRITON", "INFER_MIN_ELEMENTS", "TRAIN_MIN_ELEMENTS", "Tier", "interpreting", "select_tier",
           "triton_usable"]
