"""The formulas under study, as eager torch, in any dtype.

Compose forms take ``base``, ``lora`` ([T, d_out], activation dtype D), ``g`` ([d_out], fp32) and the
scalar ``s`` and return ``(y, delta)`` in D, where y = base + Δ (+ bias) is what the layer outputs. In
eager torch every elementwise op on D tensors computes in fp32 and rounds its result to D once; the
forms below spell out which ops happen in which precision:

====================  ============================================================================
``naive``             Δ = g·(s·lora + base) − base, every op in D, g rounded to D first (eager code in
                      a bf16 model); y = base + Δ in D. Cancels catastrophically when g ≈ 1.
``stable_gcast``      Δ = (g − 1)·base + g·(s·lora), every op in D, g rounded to D first: PEFT with
                      bf16 adapters, torchtune, axolotl and the paper's fused paths. Loses every
                      |g − 1| < 2⁻⁹ in bf16.
``stable_fp32``       Δ = (g − 1)·base + g·s·lora in fp32 registers with fp32 g and g − 1, rounded
                      once to D; y = base + Δ rounded in D. The contract's Δ output path.
``naive_fp32``        Δ = g·(s·lora + base) − base in fp32 registers, rounded once to D; y = base + Δ.
``single_rounding``   y = g·(base + s·lora) (+ bias) in fp32 registers, rounded once to D (the
                      contract's y output; Δ = that y − base, rounded in D, for reference).
====================  ============================================================================

Norm forms take W [d_out, d_in], A [r, d_in], B [d_out, r] (weight dtype) and ``s`` and return ν:

=======================  =========================================================================
``peft_dense``           PEFT: BA through an identity matrix ``eye(d_in)`` and the two adapter
                         matmuls, W + s·BA and the row norm, all in the weight dtype.
``dense_fp32``           ‖W + s·(B @ A)‖ with every operand upcast to fp32 (dense, fp32).
``factored_fp32``        ‖W‖² + 2s·rowsum(B ⊙ WAᵀ) + s²·rowsum((B AAᵀ) ⊙ B), fp32 accumulation and
                         fp32 result (the project's choice).
``factored_fp32_castout``  as factored_fp32, result cast to the weight dtype (the paper's code).
``factored_wdtype_partials_fp32_accum``
                         the factored sum as eager torch computes it in the weight dtype: every
                         product, partial (WAᵀ, AAᵀ, B·AAᵀ, the row sums) and step of the assembly
                         rounded to the weight dtype, every reduction *accumulated in fp32* (torch's
                         accumulator for bf16/fp16 sums and GEMMs, on CPU and in cuBLAS). Formerly
                         ``factored_lowp``; it is not a low-precision accumulator — those are
                         emulated exactly in ``dora_verify.accumulation``.
=======================  =========================================================================

``LEGACY_NAMES`` maps the names older reports used to the current ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

F32 = torch.float32


@dataclass(frozen=True)
class Form:
    name: str
    fn: Callable
    summary: str


def _bias_add(y: torch.Tensor, bias):
    return y if bias is None else y + bias.to(y.dtype)


def naive(base, lora, g, s, bias=None):
    dt = base.dtype
    gd = g.to(dt)
    inner = lora * s + base
    delta = gd * inner - base
    return _bias_add(base + delta, bias), delta


def stable_gcast(base, lora, g, s, bias=None):
    dt = base.dtype
    gd = g.to(dt)
    delta = (gd - 1) * base + gd * (lora * s)
    return _bias_add(base + delta, bias), delta


def stable_fp32(base, lora, g, s, bias=None):
    dt = base.dtype
    g32 = g.to(F32)
    delta = ((g32 - 1) * base.to(F32) + g32 * (s * lora.to(F32))).to(dt)
    return _bias_add(base + delta, bias), delta


def naive_fp32(base, lora, g, s, bias=None):
    dt = base.dtype
    b32 = base.to(F32)
    delta = (g.to(F32) * (s * lora.to(F32) + b32) - b32).to(dt)
    return _bias_add(base + delta, bias), delta


def single_rounding(base, lora, g, s, bias=None):
    dt = base.dtype
    y32 = g.to(F32) * (base.to(F32) + s * lora.to(F32))
    if bias is not None:
        y32 = y32 + bias.to(F32)
    y = y32.to(dt)
    return y, (y - base if bias is None else y - base - bias.to(dt))


COMPOSE_FORMS = {
    f.name: f
    for f in (
        Form("naive", naive, "g·(s·lora+base)−base in the activation dtype, g rounded to it"),
        Form(
            "stable_gcast",
            stable_gcast,
            "(g−1)·base+g·s·lora in the activation dtype, g rounded to it "
            "(PEFT bf16, torchtune, axolotl, paper's fused)",
        ),
        Form("naive_fp32", naive_fp32, "naive Δ in fp32 registers, rounded once"),
        Form("stable_fp32", stable_fp32, "stable Δ in fp32 registers with fp32 g, rounded once; y = base + Δ"),
        Form("single_rounding", single_rounding, "y = g·(base+s·lora) in fp32, rounded once"),
    )
}


# ----------------------------------------------------------------------------- norm forms
def peft_dense(W, A, B, s):
    dt = W.dtype
    eye = torch.eye(A.shape[1], dtype=dt, device=W.device)
    lora_weight = ((eye @ A.t()) @ B.t()).t()  # lora_B(lora_A(I)).T
    weight = W + s * lora_weight
    return torch.linalg.norm(weight, dim=1).to(dt)


def dense_fp32(W, A, B, s):
    return torch.linalg.vector_norm(W.to(F32) + s * (B.to(F32) @ A.to(F32)), dim=1)


def _factored(W, A, B, s, dt):
    W_, A_, B_ = W.to(dt), A.to(dt), B.to(dt)
    w2 = (W_ * W_).sum(dim=1)
    U = W_ @ A_.t()
    G = A_ @ A_.t()
    cross = (B_ * U).sum(dim=1)
    gram = ((B_ @ G) * B_).sum(dim=1)
    return torch.sqrt(torch.clamp(w2 + (2 * s) * cross + (s * s) * gram, min=0))


def factored_fp32(W, A, B, s):
    return _factored(W, A, B, s, F32)


def factored_fp32_castout(W, A, B, s):
    return _factored(W, A, B, s, F32).to(W.dtype)


def factored_wdtype_partials_fp32_accum(W, A, B, s):
    """ν by the factored sum in W's dtype, op by op in eager torch: every product, partial and step of the
    assembly rounded to W's dtype; every reduction (row sums, GEMMs) accumulated in fp32 by torch."""
    return _factored(W, A, B, s, W.dtype)


factored_lowp = factored_wdtype_partials_fp32_accum  # the name before it said what it computes


NORM_FORMS = {
    f.name: f
    for f in (
        Form("peft_dense", peft_dense, "PEFT: identity-matrix BA, W+s·BA and norm in the weight dtype"),
        Form("dense_fp32", dense_fp32, "dense W+s·(B@A) in fp32"),
        Form("factored_fp32", factored_fp32, "factored, fp32 accumulation, fp32 result"),
        Form("factored_fp32_castout", factored_fp32_castout, "factored fp32, result cast to the weight dtype (paper)"),
        Form(
            "factored_wdtype_partials_fp32_accum",
            factored_wdtype_partials_fp32_accum,
            "factored, every product and partial rounded to the weight dtype, every reduction accumulated in fp32",
        ),
    )
}
LEGACY_NAMES = {"factored_lowp": "factored_wdtype_partials_fp32_accum"}  # report keys of earlier versions
