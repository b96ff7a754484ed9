"""The DoRA scale: g = m / max(ν, ε) and g − 1 = (m − max(ν, ε)) / max(ν, ε), both fp32.

Numerical contract: with ν̂ the fp32 norm (relative error ρ_ν) and m upcast exactly to fp32,
* g = RN(m / ν_c) with ν_c = max(ν̂, ε): relative error ≤ ρ_ν + 2⁻²⁴ (IEEE division; torch's ``/`` is
  correctly rounded on CPU and CUDA);
* g − 1 = RN(RN(m − ν_c) / ν_c): the subtraction is exact whenever ν_c/2 ≤ m ≤ 2ν_c (Sterbenz), so the
  relative error of g − 1 is ≤ 2⁻²⁴ + 2⁻²⁴ + κ_sub·ρ_ν, where κ_sub = ν/|m − ν|: no cancellation beyond
  what ν's own error implies. Computing g − 1 as RN(g) − 1 instead would lose everything below 2⁻²⁴.
* Zero rows (ν = 0): ν_c = ε, so g = m/ε and g − 1 = (m − ε)/ε; with m initialised to ν (= 0) the row's
  output is 0, as the exact DoRA output of a zero row with a fresh adapter is.
Differentiable in m (ν is detached): ∂g/∂m = ∂(g−1)/∂m = 1/ν_c, carried by torch's autograd.
"""

from __future__ import annotations

import math
import struct

import torch

DEFAULT_EPS = 1e-12


def round_to_fp32(s: float) -> float:
    """``s`` rounded to the nearest fp32 value (ties to even), as a Python float."""
    return struct.unpack("f", struct.pack("f", float(s)))[0]


def check_scaling(s: float) -> float:
    """``s`` as a float; raises ValueError unless finite and exactly representable in fp32 (the kernels
    hold s in fp32, so any other value would silently be a different s)."""
    s = float(s)
    if not math.isfinite(s) or round_to_fp32(s) != s:
        raise ValueError(f"scaling s={s!r} must be finite and fp32-representable")
    return s


def dora_scale(m: torch.Tensor, nu: torch.Tensor, eps: float = DEFAULT_EPS, g_minus_1: bool = True):
    """Return (g, g − 1), fp32 [d_out]; ``nu`` is detached, ``m`` keeps its autograd graph. ``g_minus_1=False``
    returns (g, None): callers that compose y need no g − 1, and each skipped op is host time (the eager layer
    step is host-bound)."""
    if m.dim() != 1 or nu.shape != m.shape:
        raise ValueError(f"m and nu must be 1-D of one length, got {tuple(m.shape)} and {tuple(nu.shape)}")
    if m.device != nu.device:
        raise ValueError(f"m is on {m.device} but nu is on {nu.device}")
    if not (eps > 0):
        raise ValueError(f"eps must be positive, got {eps}")
    nu_c = torch.clamp(nu.detach().to(torch.float32), min=eps)
    m32 = m.to(torch.float32)
    return m32 / nu_c, ((m32 - nu_c) / nu_c if g_minus_1 else None)


__all__ = ["DEFAULT_EPS", "check_scaling", "dora_scale", "round_to_fp32"]
