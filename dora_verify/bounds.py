"""A-priori error bounds, per element, for each form under study and each production kernel.

Derivations: ``proofs/bounds.md``. Model (Higham, *Accuracy and Stability*, §2.2): every floating-point
operation returns fl(a ∘ b) = (a ∘ b)(1 + δ) + η with |δ| ≤ u of its format and |η| ≤ half the smallest
subnormal (η only matters under gradual underflow; it is carried as an absolute term per rounding).
Round to nearest; no FMA contraction in the forms (eager torch does not contract; the production kernels
launch with ``enable_fp_fusion=False`` and use FMA only where written). An op on bf16/fp16 tensors in
eager torch computes in fp32 and rounds to the tensor dtype: a double rounding, whose error is at most
ũ = u_D + u_32 + u_D·u_32 relative.

All bounds are evaluated in float64 from the (rounded) inputs and the exact result x supplied by the
oracle, and are then inflated by (1 + 2⁻⁴⁰) so their own float64 evaluation error cannot make a true
bound look violated. Each returns a tensor of the broadcast shape: ``|computed − exact| ≤ bound``.
A bound is relative to the *terms* (|base|, |g·s·lora|, …), never to the result alone, so it stays
meaningful where the exact Δ is 0 (g = 1, lora = 0) — a relative tolerance cannot.

Norm bounds come in two kinds (``kind``): 'worst' uses γ_n = n·u/(1 − n·u); 'probabilistic' uses
Higham–Mary's γ̃_n(λ) = exp(λ·√n·u + n·u²/(1 − u)) − 1 with λ = 5 (holds with probability
≥ 1 − 2n·exp(−λ²/2)… per inner product for independent mean-zero rounding errors; a model, not a proof).
"""
from __future__ import annotations

import math

import torch

from .formats import parse_format

F64 = torch.float64
U32 = 2.0**-24
ETA32 = 2.0**-150
SAFETY = 1 + 2.0**-40
LAMBDA = 5.0


def gamma(n: float, u: float) -> float:
    """γ_n = n u / (1 − n u): the relative error bound of n chained roundings of unit roundoff u."""
    nu = n * u
    if nu >= 1:
        return math.inf
    return nu / (1 - nu)


def gamma_prob(n: float, u: float, lam: float = LAMBDA) -> float:
    """Higham–Mary probabilistic γ̃_n(λ) = exp(λ√n·u + n u²/(1 − u)) − 1."""
    return math.expm1(lam * math.sqrt(n) * u + n * u * u / (1 - u))


def _fmt_params(dtype):
    fmt = parse_format(dtype)
    u = fmt.u
    eta = fmt.min_normal * u  # half the smallest subnormal: (2^emin · 2^(1-p)) / 2
    ut = u if fmt.name == "fp32" else u + U32 + u * U32  # eager op on D tensors: fp32 result, then D
    return u, ut, eta


def _t(*xs):
    return [x.to(F64) if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=F64) for x in xs]


# ----------------------------------------------------------------------------- compose forms (Δ and y)
def compose_form_bounds(form: str, base, lora, g, s: float, bias=None, dtype=None):
    """(Δ bound, y bound) per element for ``dora_verify.forms.COMPOSE_FORMS[form]`` computed in ``dtype``
    (default base's dtype). Exact references: Δ = (g−1)·base + g·s·lora, y = base + Δ (+ bias), with the
    fp32 g as given (rounding g to the activation dtype is part of the forms that do it)."""
    dtype = dtype or base.dtype
    uD, ut, etaD = _fmt_params(dtype)
    b, l, g64 = _t(base, lora, g)
    g64 = g64.reshape(1, -1)
    sl = s * l
    gsl = (g64 * sl).abs()
    gm1b = ((g64 - 1) * b).abs()
    delta = (g64 - 1) * b + g64 * sl
    gd = g.to(dtype).to(F64).reshape(1, -1) if isinstance(g, torch.Tensor) else g64
    dg = (gd - g64).abs()  # the rounding of g to D, exactly (0 when g is representable, e.g. g = 1)
    if form == "stable_gcast":
        # Δ̂ = fl(fl(fl(gd − 1)·b) + fl(gd·fl(l·s))), gd = RN_D(g): the g rounding costs |gd − g|·(|b| + |s·l|)
        e = (b.abs() * (dg + (gd - 1).abs() * gamma(2, ut)) + sl.abs() * (dg + gd.abs() * gamma(2, ut))
             + 3 * etaD)
        eD = e * (1 + ut) + ut * delta.abs() + etaD
    elif form == "naive":
        # Δ̂ = fl(fl(gd·fl(fl(l·s) + b)) − b): error ∝ |g|·|base + s·lora|, however small Δ is
        inner = (b + sl).abs()
        e = dg * inner + gd.abs() * (gamma(2, ut) * inner + (1 + gamma(2, ut)) * ut * sl.abs()) + 3 * etaD
        eD = e * (1 + ut) + ut * delta.abs() + etaD
    elif form == "naive_fp32":
        inner = (b + sl).abs()
        e = g64.abs() * (gamma(2, U32) * inner + (1 + gamma(2, U32)) * U32 * sl.abs()) + 3 * ETA32
        e = e * (1 + U32) + U32 * delta.abs() + ETA32
        eD = e * (1 + uD) + uD * delta.abs() + etaD
    elif form == "stable_fp32":
        e = gamma(3, U32) * (gm1b + gsl) + 4 * ETA32
        eD = e * (1 + uD) + uD * delta.abs() + etaD
    elif form == "single_rounding":
        y = b + delta + (_t(bias)[0].reshape(1, -1) if bias is not None else 0)
        inner = (b + sl).abs()
        e = g64.abs() * (gamma(2, U32) * inner + (1 + gamma(2, U32)) * U32 * sl.abs()) + 2 * ETA32
        if bias is not None:
            e = e * (1 + U32) + U32 * y.abs() + ETA32
        ey = e * (1 + uD) + uD * y.abs() + etaD
        # Δ reported as fl(ŷ − base) [then fl(· − bias)] in eager D arithmetic
        if bias is None:
            eD = ey * (1 + ut) + ut * delta.abs() + etaD
        else:
            et = ey * (1 + ut) + ut * (delta + _t(bias)[0].reshape(1, -1)).abs() + etaD
            eD = et * (1 + ut) + ut * delta.abs() + etaD
        return eD * SAFETY, ey * SAFETY
    else:
        raise ValueError(f"no bound for compose form {form!r}")
    # y = fl(base + Δ̂) (+ fl(… + bias)) in D
    y = b + delta
    ey = eD * (1 + ut) + ut * y.abs() + etaD
    if bias is not None:
        yb = y + _t(bias)[0].reshape(1, -1)
        ey = ey * (1 + ut) + ut * yb.abs() + etaD
    return eD * SAFETY, ey * SAFETY


# ----------------------------------------------------------------------------- production compose kernel
def compose_kernel_bounds(base, lora, g, s: float, bias=None, dtype=None):
    """(Δ bound, y bound) of kernels.compose (fused tier), from its contract: the fp32 value before the
    final rounding is within u32|x| + 4u32²·(terms) of x, then one rounding to ``dtype``."""
    dtype = dtype or base.dtype
    uD, _, etaD = _fmt_params(dtype)
    b, l, g64 = _t(base, lora, g)
    g64 = g64.reshape(1, -1)
    sl = s * l
    delta = (g64 - 1) * b + g64 * sl
    y = b + delta
    terms_y = g64.abs() * (b.abs() + sl.abs())
    if bias is not None:
        bb = _t(bias)[0].reshape(1, -1)
        y = y + bb
        terms_y = terms_y + bb.abs()
    ev_y = U32 * y.abs() + 4 * U32 * U32 * terms_y + 4 * ETA32
    ev_d = U32 * delta.abs() + 4 * U32 * U32 * ((g64 - 1).abs() * b.abs() + (g64 * sl).abs()) + 4 * ETA32
    ey = ev_y * (1 + uD) + uD * y.abs() + etaD
    eD = ev_d * (1 + uD) + uD * delta.abs() + etaD
    return eD * SAFETY, ey * SAFETY


# ----------------------------------------------------------------------------- factored norm
def factored_norm_bound(W, A, B, s: float, nu, kind: str = "worst"):
    """Bound on |ν̂ − ν| per row for ``forms.factored_fp32`` (fp32 everything, eager torch GEMMs with fp32
    accumulation of exact or rounded products), given the exact ν. ``kind``: 'worst' or 'probabilistic'.

    ν² = ‖W‖² + 2s·Σ_j B_ij U_ij + s²·Σ_jk B_ij G_jk B_ik. With n = d_in, r = rank:
    |δ‖W‖²| ≤ γ_{n+1}‖W‖², |δcross| ≤ γ_{n+r+1}·Σ_j|B_ij|(|W_i|·|A_j|), |δgram| ≤ γ_{n+2r+2}·‖|B_i||A|‖²,
    the final two adds and the scalings γ_3 of the magnitudes; then |ν̂ − ν| ≤ E/(ν̂ + ν) + u32·ν̂ ≤
    E/ν (for E ≤ ν²; else √E) plus the square root's rounding."""
    if kind not in ("worst", "probabilistic"):
        raise ValueError(f"kind must be 'worst' or 'probabilistic', got {kind!r}")
    gam = gamma if kind == "worst" else gamma_prob
    n, r = W.shape[1], A.shape[0]
    W64, A64, B64 = (t.to(F64) for t in (W, A, B))
    aW, aA, aB = W64.abs(), A64.abs(), B64.abs()
    w2 = (W64 * W64).sum(1)
    cross_mag = (aB * (aW @ aA.t())).sum(1)
    gram_mag = ((aB @ aA) ** 2).sum(1)
    E = (gam(n + 1, U32) * w2 + 2 * abs(s) * gam(n + r + 1, U32) * cross_mag
         + s * s * gam(n + 2 * r + 2, U32) * gram_mag)
    E = E + gamma(3, U32) * (w2 + 2 * abs(s) * cross_mag + s * s * gram_mag)
    nu = nu.to(F64)
    lin = torch.where(nu > 0, E / nu.clamp_min(1e-300), torch.full_like(nu, math.inf))
    err = torch.minimum(lin, E.sqrt())  # |√a − √b| ≤ min(|a − b|/√b, √|a − b|)
    return (err * (1 + U32) + U32 * nu + ETA32) * SAFETY


__all__ = ["compose_form_bounds", "compose_kernel_bounds", "factored_norm_bound", "gamma", "gamma_prob"]
