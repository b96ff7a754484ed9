"""DoRA compose with the LoRA up-projection fused in: y = g ⊙ (base + s·xa Bᵀ) + bias, and its backward.

``xa`` = dropout(x) Aᵀ is the LoRA down-projection [T, r]; the up-projection lora = xa Bᵀ [T, d_out] is
never written to memory. The forward computes each lora tile on tensor cores (exact products, fp32 accumulation
over r) and composes it with ``base`` in the same registers, without rounding it to the adapter dtype first. The
backward never forms lora again: d_g's lora term Σ_T dy ⊙ lora is Σ_r B ⊙ M with M = dyᵀxa, the product d_B needs
anyway, so it is one pass over dy and base. What the layer keeps for backward is ``base`` and ``xa`` (one
activation-sized tensor and a [T, r] one) instead of ``base`` and ``lora``, and one pass over lora (its write and
read) disappears from both directions. Kernels, launchers, eager fallback, custom ops and autograd glue of the op
live here together (layout of kernels/compose.py).

Numerical contract (base in bf16/fp16/fp32; xa, B in bf16/fp16 on the fused tier; g fp32):

* lora = Σ_r xa·B with fp32 accumulation (error ≤ γ_r(2u₃₂)·Σ|xa||B|, the tensor-core model of a cuBLAS GEMM), kept
  in fp32: the compose reads it unrounded (a materialised ``F.linear(xa, B)`` would round it to the adapter dtype,
  2⁻⁹ relative for bf16).
* y: the compose's single-rounding epilogue (kernels/compose.py): ≤ 1 ulp from the exact
  g·(base + s·lora) + bias of the rounded base and lora.
* d_g = Σ_T dy ⊙ (base + s·lora) = Σ_T dy·base + s·Σ_r B ⊙ M, M = dyᵀxa accumulated in fp32 (16-bit products exact): the
  first term in float64 per column block and row split, then over the splits in order; M from the backward kernel's
  tile dots (:func:`dot_m_applies`: fp32 chains of one row split, the splits summed in float64) or from cuBLAS's
  fp32-output GEMM (one chain of T; also the eager tier's); the sum with s·Σ_r B ⊙ M in float64, one fp32
  rounding. Bitwise reproducible; error within ``bounds.lora_compose_dg_bound`` — γ64 of Σ|dy·base|, γ_c(2u₃₂) of
  |s|·Σ_r|B|·(|dy|ᵀ|xa|) for M, u₃₂|d_g| — of the exact d_g, and so within γ_r(2u₃₂)·|s|·Σ|dy||xa||B| more of the
  gradient of the function the forward evaluated (its lora is the fp32 sum). Under cancellation (base ≈ −s·lora)
  this is M's fp32 accuracy relative to the lora term, not float64's relative to |base + s·lora|: the price of a
  backward that never recomputes lora (reports/h200/bench/probes/lora_compose_limits.txt). d_base = RN(RN32(g·dy))
  (faithful), only when base requires grad.
* Adapter gradients are GEMMs with fp32 accumulation: d_B = RN(RN32(g·s) ⊙ RN32(M)) (error ≤ γ_T·Σ|dy||xa|, as any
  fp32-accumulated GEMM), and d_xa = dy (RN_adapter(g·s ⊙ B)): the one extra rounding sits on the [d_out, r]
  operand where PEFT's autograd puts it on d_lora = RN(g·s·dy) — the same 2⁻⁹ (bf16) relative perturbation of one
  GEMM operand. The kernel's M and cuBLAS's may differ in the last bits of d_B, each within the bound.
* fp32 adapters (PEFT's default autocast): a Triton fp32 dot would run in TF32, so lora = F.linear(xa, B) is formed
  by torch's GEMM for kernels/compose.py's compose (either tier) and freed; the backward forms it again (the same GEMM
  on the same operands: the same bits) — y and every gradient are compose's on that lora, and what is kept is base,
  xa and B as for bf16 adapters (not a [T, d_out] fp32 lora). Compiled graphs take the eager tier here.
* :func:`dora_lora_compose` takes the magnitude m and the detached ν instead of g: the kernels form
  g = RN(m₃₂ / max(ν, ε)) (IEEE division, NaN propagating: :func:`dora_scale`'s bits) and the backward's reduction
  writes d_m = RN_m(RN32(d_g / max(ν, ε))) (autograd's through dora_scale): y and every gradient are those of
  ``lora_compose(…, dora_scale(m, ν)[0], …)`` bit for bit, in one autograd node with four fewer host ops (what the
  layers call; the eager tier, fp32 adapters and compiled graphs take that composition itself).
* Non-finite inputs propagate elementwise as in kernels/compose.py (same epilogue); shapes, dtypes, devices
  and ``s`` are checked by :func:`lora_compose` as by :func:`compose` (base's dtype may differ from the
  adapter's; s a float or a one-element tensor that does not require grad).
* Tiers: bf16 adapters never take the fused tier under TRITON_INTERPRET=1 (the interpreter's bf16 tl.dot is
  garbage: ``dispatch.fused_supported``); forcing it there raises ValueError. Autocast is disabled inside the
  ops (``no_autocast``): the eager tier's F.linear and the adapter-gradient GEMMs keep their dtypes under
  ``torch.autocast``, and the results are the same bits inside and outside autocast regions.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .norm import _NoTF32
from .compose import (
    SAVE_INPUTS,
    SAVE_NONE,
    _rows_cols,
    bwd_splits,
    check_bias,
    check_s,
    compose_backward_eager,
    compose_backward_fused,
    compose_forward_eager,
    compose_forward_fused,
)
from .launch import fast_launch
from .dispatch import HAS_TRITON, KERNEL_DTYPES, Tier, autocast_off, fused_supported, no_autocast, select_tier
from .scale import DEFAULT_EPS, dora_scale

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .compose import _sum_of_splits, _y_value

# The forward's lora tile and the backward's column blocks (the backward's row splits are whole forward row tiles).
LC_BLOCK_T, LC_BLOCK_N, LC_BLOCK_R, LC_WARPS, LC_STAGES = 64, 128, 64, 4, 3


def lc_block_r(R: int) -> int:
    """The r-block of the lora tile and of M's: the next power of two ≥ r between 16 (the MMA's k) and LC_BLOCK_R. A
    smaller block only drops masked zero products: fp32 accumulation from +0 of the same nonzero products in the
    same order, then of exact zeros, gives the same bits."""
    return max(16, min(LC_BLOCK_R, 1 << max(0, int(R) - 1).bit_length()))


_FUSED_ADAPTER_DTYPES = (torch.bfloat16, torch.float16)
LC_SUM_BLOCK_N = 64  # columns per program of the backward's second stage (× the r-block for d_B)
# Where the backward kernel forms M = dyᵀxa from its own tile dots (its [BLOCK_N, r] fp32 accumulator costs registers;
# its split partials a second-stage pass): r ≤ DOT_M_MAX_R and d_out ≥ DOT_M_MIN_N. Measured on an H200 against
# cuBLAS's GEMM plus its launch (reports/h200/bench/probes/lora_compose_ab.txt, T 4096, bf16): 0.92–0.93× the time at
# r 16 with d_out 8192 and 14336; 1.12×, 1.35× and 1.64× at d_out 4096 with r 16, 32 and 64; 1.49× at d_out 1024.
DOT_M_MAX_R = 16
DOT_M_MIN_N = 8192


assert DOT_M_MAX_R <= LC_BLOCK_R  # the kernel's M accumulator holds one r-block


def dot_m_applies(R: int, N: int, dy_dtype, xa_dtype, device="cuda") -> bool:
    """Whether the backward kernel forms M = dyᵀxa from its own tile dots: r ≤ DOT_M_MAX_R, d_out ≥ DOT_M_MIN_N,
    dy and xa of one bf16/fp16 dtype (tensor-core operands, exact products; a bf16 base with fp16 adapters, or the
    reverse, takes :func:`_mm_fp32`'s fp32 GEMM instead of rounding xa to dy's dtype) and a tl.dot on it that
    :func:`~dispatch.fused_supported` accepts (not bf16 under the Triton interpreter) — else M is a torch GEMM with an
    fp32 result, one more launch."""
    return (
        R <= DOT_M_MAX_R
        and N >= DOT_M_MIN_N
        and dy_dtype == xa_dtype
        and dy_dtype in _FUSED_ADAPTER_DTYPES
        and fused_supported("lora_compose", dy_dtype, device)[0]
    )


if HAS_TRITON:

    @triton.jit
    def _lora_tile(
        xa_ptr, b_ptr, rows, cols, T, N, R, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr
    ):
        """xa[rows] B[cols]ᵀ in fp32: exact products, fp32 tensor-core accumulation over r, not rounded further."""
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            xa = tl.load(
                xa_ptr + rows.to(tl.int64)[:, None] * R + rr[None, :],
                mask=(rows < T)[:, None] & (rr < R)[None, :],
                other=0.0,
            )
            b = tl.load(
                b_ptr + cols.to(tl.int64)[:, None] * R + rr[None, :],  # B's rows as stored: coalesced
                mask=(cols < N)[:, None] & (rr < R)[None, :],
                other=0.0,
            )
            acc = tl.dot(xa, tl.trans(b), acc, out_dtype=tl.float32)
        return acc

    @triton.jit
    def _g_cols(g_ptr, m_ptr, cols, cmask, eps, FROM_M: tl.constexpr):
        """g of columns ``cols``: loaded from g_ptr, or (FROM_M) g = RN(m₃₂ / max(ν, ε)) with ν at g_ptr —
        :func:`dora_scale`'s bits (IEEE division; a NaN ν or m gives a NaN g, as torch.clamp does)."""
        if FROM_M:
            nu = tl.load(g_ptr + cols, mask=cmask, other=1.0)
            m = tl.load(m_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            return tl.math.div_rn(m, tl.maximum(nu, eps, propagate_nan=tl.PropagateNan.ALL))
        return tl.load(g_ptr + cols, mask=cmask, other=0.0)

    @fast_launch
    @triton.jit
    def _lora_compose_fwd_kernel(
        base_ptr,
        xa_ptr,
        b_ptr,
        g_ptr,
        mag_ptr,
        bias_ptr,
        out_ptr,
        lora_ptr,
        T,
        N,
        R,
        s,
        eps,
        HAS_BIAS: tl.constexpr,
        WRITE_LORA: tl.constexpr,
        ODD: tl.constexpr,
        G_FROM_M: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        n_n = tl.cdiv(N, BLOCK_N)  # one flat grid, column blocks fastest (as the compose forward)
        rows = (tl.program_id(0) // n_n) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = (tl.program_id(0) % n_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        mask = (rows < T)[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # issued before the tile's dot
        lo = _lora_tile(xa_ptr, b_ptr, rows, cols, T, N, R, BLOCK_T, BLOCK_N, BLOCK_R)
        g = _g_cols(g_ptr, mag_ptr, cols, cmask, eps, G_FROM_M)[None, :]
        v = _y_value(b, lo, g, bias_ptr, cols, cmask, s, HAS_BIAS, ODD)
        tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)
        if WRITE_LORA:  # for tests: the lora the forward used
            tl.store(lora_ptr + offs, lo.to(lora_ptr.dtype.element_ty), mask=mask)

    @fast_launch
    @triton.jit
    def _lora_compose_bwd_kernel(
        dy_ptr,
        base_ptr,
        xa_ptr,
        b_ptr,
        g_ptr,
        mag_ptr,
        dbase_ptr,
        partial_ptr,
        partial_m_ptr,
        gsb_ptr,
        T,
        N,
        R,
        s,
        eps,
        rows_per_split,
        WRITE_DBASE: tl.constexpr,
        WRITE_DG: tl.constexpr,
        DOT_M: tl.constexpr,
        WRITE_GSB: tl.constexpr,
        G_FROM_M: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        """Per column block and row split, one pass over dy (and base): d_base = RN(g·dy); float64 partials of
        Σ_T dy·base (d_g's base term); (DOT_M: r ≤ BLOCK_R) fp32 partials of M = dyᵀxa from tile dots (exact
        products); the first split also writes gsB = RN(RN32(RN32(g·s)·B)) (:func:`adapter_grads`' operand). No
        lora tile: d_g's lora term is s·Σ_r B ⊙ M, formed by the second stage."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        if WRITE_GSB:
            if pid_s == 0:
                gs = _g_cols(g_ptr, mag_ptr, cols, cmask, eps, G_FROM_M) * s
                for r0 in range(0, R, BLOCK_R):
                    rr = r0 + tl.arange(0, BLOCK_R)
                    m2 = cmask[:, None] & (rr < R)[None, :]
                    o2 = cols.to(tl.int64)[:, None] * R + rr[None, :]
                    bb = tl.load(b_ptr + o2, mask=m2, other=0.0).to(tl.float32)
                    tl.store(gsb_ptr + o2, (gs[:, None] * bb).to(gsb_ptr.dtype.element_ty), mask=m2)
        g = _g_cols(g_ptr, mag_ptr, cols, cmask, eps, G_FROM_M)[None, :]
        acc = tl.zeros([BLOCK_N], dtype=tl.float64)
        rr = tl.arange(0, BLOCK_R)
        if DOT_M:
            acc_m = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
        t0 = pid_s * rows_per_split
        t_end = tl.minimum(t0 + rows_per_split, T)
        for start in range(t0, t_end, BLOCK_T):
            rows = start + tl.arange(0, BLOCK_T)
            mask = (rows < t_end)[:, None] & cmask[None, :]
            offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
            dy_raw = tl.load(dy_ptr + offs, mask=mask, other=0.0)
            if DOT_M:  # M += dy_tileᵀ xa_tile: exact products, fp32 accumulation (as cuBLAS's GEMM, in tile order)
                xa_t = tl.load(
                    xa_ptr + rows.to(tl.int64)[:, None] * R + rr[None, :],
                    mask=(rows < t_end)[:, None] & (rr < R)[None, :],
                    other=0.0,
                ).to(dy_raw.dtype)
                acc_m = tl.dot(tl.trans(dy_raw), xa_t, acc_m, out_dtype=tl.float32)
            if WRITE_DBASE:
                tl.store(dbase_ptr + offs, (g * dy_raw.to(tl.float32)).to(dbase_ptr.dtype.element_ty), mask=mask)
            if WRITE_DG:
                base = tl.load(base_ptr + offs, mask=mask, other=0.0)
                acc += tl.sum(dy_raw.to(tl.float64) * base.to(tl.float64), axis=0)
        if WRITE_DG:
            tl.store(partial_ptr + pid_s.to(tl.int64) * N + cols, acc, mask=cmask)
        if DOT_M:
            o2 = pid_s.to(tl.int64) * N * R + cols.to(tl.int64)[:, None] * R + rr[None, :]
            tl.store(partial_m_ptr + o2, acc_m, mask=cmask[:, None] & (rr < R)[None, :])

    @fast_launch
    @triton.jit
    def _lora_sum_kernel(
        partial_ptr,
        partial_m_ptr,
        m_ptr,
        b_ptr,
        dg_ptr,
        db_ptr,
        g_ptr,
        mag_ptr,
        N,
        R,
        n_splits,
        s,
        eps,
        HAS_DG: tl.constexpr,
        HAS_DB: tl.constexpr,
        M_SPLITS: tl.constexpr,
        G_FROM_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        """The backward's second stage, per column block. M = dyᵀxa: the float64 sum of the first stage's fp32 split
        partials in split order (M_SPLITS; r ≤ BLOCK_R), or cuBLAS's fp32 M at m_ptr. d_B = RN_B(RN32(g·s)·RN32(M));
        d_g = RN32(Σ_k partial[k] + s·Σ_r B ⊙ M), all in float64 (B·M within one float64 rounding) — with G_FROM_M
        d_m = RN_m(RN32(d_g / max(ν, ε))) instead, autograd's DivBackward (IEEE division) then ToCopyBackward of
        g = m₃₂ / max(ν, ε)."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        if HAS_DB:
            gs = _g_cols(g_ptr, mag_ptr, cols, cmask, eps, G_FROM_M) * s
        lora_term = tl.zeros([BLOCK_N], dtype=tl.float64)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            m2 = cmask[:, None] & (rr < R)[None, :]
            o2 = cols.to(tl.int64)[:, None] * R + rr[None, :]
            if M_SPLITS:
                mm = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float64)
                ptrs = partial_m_ptr + o2
                for _ in range(0, n_splits):
                    mm += tl.load(ptrs, mask=m2, other=0.0).to(tl.float64)
                    ptrs += N * R  # one split: B's size, far below 2³¹
            else:
                mm = tl.load(m_ptr + o2, mask=m2, other=0.0).to(tl.float64)
            if HAS_DB:
                tl.store(db_ptr + o2, (gs[:, None] * mm.to(tl.float32)).to(db_ptr.dtype.element_ty), mask=m2)
            if HAS_DG:
                lora_term += tl.sum(tl.load(b_ptr + o2, mask=m2, other=0.0).to(tl.float64) * mm, axis=1)
        if HAS_DG:
            d = (_sum_of_splits(partial_ptr, cols, cmask, N, n_splits, BLOCK_N) + lora_term * s).to(tl.float32)
            if G_FROM_M:
                nu = tl.load(g_ptr + cols, mask=cmask, other=1.0)
                d = tl.math.div_rn(d, tl.maximum(nu, eps, propagate_nan=tl.PropagateNan.ALL))
            tl.store(dg_ptr + cols, d.to(dg_ptr.dtype.element_ty), mask=cmask)


def _splits(T: int, N: int) -> Tuple[int, int]:
    """(rows per split, splits): the compose backward's shape-only rule, rounded to whole forward row tiles."""
    rows, _ = bwd_splits(T, N)
    rows = -(-rows // LC_BLOCK_T) * LC_BLOCK_T
    return rows, -(-T // rows)


def m_chain(T: int, N: int, R: int, dy_dtype, xa_dtype, device="cuda") -> Optional[int]:
    """The longest fp32 accumulation chain of the backward's M = dyᵀxa: the rows of one split where the kernel forms
    M (:func:`dot_m_applies`; the splits are then summed in float64), None where cuBLAS's GEMM does (one chain of T)."""
    return _splits(T, N)[0] if dot_m_applies(R, N, dy_dtype, xa_dtype, device) else None


# ----------------------------------------------------------------------------- launchers
def lora_compose_forward_fused(
    base, xa, B, g, bias, s: float, write_lora: bool = False, m=None, eps: float = DEFAULT_EPS
):
    """Triton forward on contiguous [T, N] base, [T, r] xa, [N, r] B; returns (y, lora or None). With ``m``
    (the magnitude), ``g`` holds ν and the kernel forms g = m / max(ν, ε) itself (:func:`dora_lora_compose`)."""
    T, N = _rows_cols(base)
    R = xa.shape[-1]
    out = torch.empty_like(base)
    lora = torch.empty(base.shape, dtype=torch.float32, device=base.device) if write_lora else None  # None: host time
    if T and N:
        grid = (triton.cdiv(T, LC_BLOCK_T) * triton.cdiv(N, LC_BLOCK_N),)
        _lora_compose_fwd_kernel[grid](
            base,
            xa,
            B,
            g,
            m if m is not None else g,
            bias if bias is not None else g,
            out,
            lora if write_lora else out,
            T,
            N,
            R,
            s,
            eps,
            HAS_BIAS=bias is not None,
            WRITE_LORA=write_lora,
            ODD=out.dtype != torch.float32,
            G_FROM_M=m is not None,
            BLOCK_T=LC_BLOCK_T,
            BLOCK_N=LC_BLOCK_N,
            BLOCK_R=lc_block_r(R),
            num_warps=LC_WARPS,
            num_stages=LC_STAGES,
            enable_fp_fusion=False,
        )
    return out, lora


def lora_compose_backward_fused(dy, base, xa, B, g, s: float, need_base: bool, need_g: bool):
    """Triton backward: (d_base or empty, d_g or empty)."""
    return lora_compose_backward_fused_all(dy, base, xa, B, g, s, need_base, need_g, False, False)[:2]


@no_autocast
def lora_compose_backward_fused_all(
    dy,
    base,
    xa,
    B,
    g,
    s: float,
    need_base: bool,
    need_g: bool,
    need_xa: bool,
    need_B: bool,
    m=None,
    eps: float = DEFAULT_EPS,
):
    """Triton backward with the adapter gradients: (d_base, d_g, d_xa, d_B), empties / None for what is not
    needed. The first stage reads dy (and base for d_g) once: d_base, d_g's base-term partials, RN(g·s)-scaled B and
    (:func:`dot_m_applies`) M = dyᵀxa's partials from its tile dots — else M is cuBLAS's GEMM, run first; the second
    stage forms d_B = RN(g·s)·M and d_g = Σ dy·base + s·Σ_r B ⊙ M; then d_xa = dy·gsB (:func:`adapter_grads`' bits).
    Three launches where autograd's composition takes nine. With ``m``, ``g`` holds ν (g = m / max(ν, ε) formed in
    the kernels) and the second result is d_m (m's dtype) in place of d_g."""
    T, N = _rows_cols(dy)
    R = xa.shape[-1]
    dev = dy.device
    d_base = torch.empty(dy.shape if need_base else (0,), dtype=base.dtype, device=dev)
    d_g = torch.empty(N if need_g else 0, dtype=torch.float32 if m is None else m.dtype, device=dev)
    if T == 0 or N == 0:
        g_of = dora_scale(m, g, eps, g_minus_1=False)[0] if m is not None else g  # g holds ν when m is given
        d_xa, d_B = adapter_grads(dy, xa, B, g_of, s, need_xa, need_B)
        return d_base, d_g.zero_(), d_xa, d_B
    if not (need_base or need_g or need_xa or need_B):
        return d_base, d_g, None, None
    rows, splits = _splits(T, N)
    need_m = need_B or need_g
    dot_m = need_m and dot_m_applies(R, N, dy.dtype, xa.dtype, dev)
    partial = torch.empty((splits, N) if need_g else (0,), dtype=torch.float64, device=dev)
    partial_m = torch.empty((splits, N, R) if dot_m else (0,), dtype=torch.float32, device=dev)
    M = _mm_fp32(dy.reshape(T, N).t(), xa.reshape(T, R)) if need_m and not dot_m else None
    d_B = torch.empty((N, R), dtype=B.dtype, device=dev) if need_B else None
    gsB = torch.empty((N, R), dtype=dy.dtype, device=dev) if need_xa else None
    if need_base or need_g or need_xa or dot_m:
        _lora_compose_bwd_kernel[(triton.cdiv(N, LC_BLOCK_N), splits)](
            dy,
            base if need_g else dy,
            xa,
            B,
            g,
            m if m is not None else g,
            d_base if need_base else dy,
            partial if need_g else g,
            partial_m if dot_m else g,
            gsB if need_xa else g,
            T,
            N,
            R,
            s,
            eps,
            rows,
            WRITE_DBASE=need_base,
            WRITE_DG=need_g,
            DOT_M=dot_m,
            WRITE_GSB=need_xa,
            G_FROM_M=m is not None,
            BLOCK_T=LC_BLOCK_T,
            BLOCK_N=LC_BLOCK_N,
            BLOCK_R=lc_block_r(R),
            num_warps=LC_WARPS,
            num_stages=LC_STAGES,
            enable_fp_fusion=False,
        )
    if need_m:
        _lora_sum_kernel[(triton.cdiv(N, LC_SUM_BLOCK_N),)](
            partial if need_g else g,
            partial_m if dot_m else g,
            M if M is not None else g,
            B,
            d_g if need_g else g,
            d_B if need_B else g,
            g,
            m if m is not None else g,
            N,
            R,
            splits,
            s,
            eps,
            HAS_DG=need_g,
            HAS_DB=need_B,
            M_SPLITS=dot_m,
            G_FROM_M=m is not None,
            BLOCK_N=LC_SUM_BLOCK_N,
            BLOCK_R=lc_block_r(R),
            enable_fp_fusion=False,
        )
    d_xa = (dy @ gsB).to(xa.dtype) if need_xa else None
    return d_base, d_g, d_xa, d_B


@no_autocast
def lora_compose_forward_eager(base, xa, B, g, bias, s: float, write_lora: bool = False):
    """Eager tier: lora = xa Bᵀ from torch's GEMM with an fp32 result (not rounded to the adapter dtype, as the
    fused tile), then the float64 compose of kernels/compose.py."""
    lora = _lora_fp32(xa, B)
    y, _ = compose_forward_eager(base, lora, g, None, bias, s, False, SAVE_NONE)
    return y, (lora if write_lora else base.new_empty(0, dtype=torch.float32))


def _lora_fp32(xa, B):
    """xa Bᵀ [..., N] in fp32 (fp32 accumulation, no rounding to the adapter dtype)."""
    return _mm_fp32(_2d(xa), B.t()).reshape(*xa.shape[:-1], B.shape[0])


@no_autocast
def lora_compose_backward_eager(dy, base, xa, B, g, s: float, need_base: bool, need_g: bool):
    """Eager tier: d_base = RN(RN32(g·dy)) (kernels/compose.py's); d_g = RN32(Σ_T dy·base + s·Σ_r B ⊙ M) in float64
    with M = dyᵀxa from torch's fp32-output GEMM — the fused tier's formula (module contract)."""
    d_base = (g * dy.to(torch.float32)).to(base.dtype) if need_base else dy.new_empty(0, dtype=base.dtype)
    if not need_g:
        return d_base, dy.new_empty(0, dtype=torch.float32)
    N, R = B.shape
    dy2 = _2d(dy)
    M = _mm_fp32(dy2.t(), _2d(xa)).double()
    d_g = (dy2.double() * _2d(base).double()).sum(0) + s * (B.double() * M).sum(1)
    return d_base, d_g.to(torch.float32)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result and fp32 accumulation, products exact for bf16/fp16 operands (rounded once for fp32
    ones): two 16-bit operands of one dtype through torch's fp32-output GEMM; any other pair upcast to fp32 (exactly)
    and multiplied in IEEE fp32 (TF32 off). Within the 2u₃₂-per-addition model either way."""
    if a.is_cuda and a.dtype == b.dtype and a.dtype in _FUSED_ADAPTER_DTYPES:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass
    with _NoTF32():
        return a.to(torch.float32) @ b.to(torch.float32)


def _2d(t: torch.Tensor) -> torch.Tensor:
    """[..., n] as [rows, n] (rows the product of the leading dims; no -1, so empty tensors reshape too)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


@no_autocast
def adapter_grads(dy, xa, B, g, s: float, need_xa: bool, need_B: bool):
    """(d_xa, d_B) of lora = xa Bᵀ under y = g ⊙ (… + s·lora): see the contract (module docstring)."""
    gs = g.to(torch.float32) * s  # RN32(g·s), as the compose's d_lora
    d_xa = dy @ (gs[:, None] * B.to(torch.float32)).to(dy.dtype) if need_xa else None
    d_B = (gs[:, None] * _mm_fp32(_2d(dy).t(), _2d(xa))).to(B.dtype) if need_B else None
    return (d_xa.to(xa.dtype) if d_xa is not None else None), d_B


# ----------------------------------------------------------------------------- custom ops (torch.compile)
@torch.library.custom_op("dora_verify::lora_compose_fwd", mutates_args=())
def _lora_compose_fwd_op(
    base: torch.Tensor,
    xa: torch.Tensor,
    B: torch.Tensor,
    g: torch.Tensor,
    bias: Optional[torch.Tensor],
    s: float,
    fused: bool,
) -> torch.Tensor:
    fn = lora_compose_forward_fused if fused else lora_compose_forward_eager
    return fn(base, xa, B, g, bias, s)[0]


@_lora_compose_fwd_op.register_fake
def _(base, xa, B, g, bias, s, fused):
    return torch.empty_like(base)


def lora_compose_backward_eager_all(
    dy, base, xa, B, g, s: float, need_base: bool, need_g: bool, need_xa: bool, need_B: bool
):
    """Eager tier of :func:`lora_compose_backward_fused_all`: (d_base, d_g, d_xa or None, d_B or None)."""
    d_base, d_g = lora_compose_backward_eager(dy, base, xa, B, g, s, need_base, need_g)
    return (d_base, d_g) + adapter_grads(dy, xa, B, g, s, need_xa, need_B)


@torch.library.custom_op("dora_verify::lora_compose_bwd", mutates_args=())
def _lora_compose_bwd_op(
    dy: torch.Tensor,
    base: torch.Tensor,
    xa: torch.Tensor,
    B: torch.Tensor,
    g: torch.Tensor,
    s: float,
    need_base: bool,
    need_g: bool,
    need_xa: bool,
    need_B: bool,
    fused: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = lora_compose_backward_fused_all if fused else lora_compose_backward_eager_all
    d_base, d_g, d_xa, d_B = fn(dy.contiguous(), base, xa, B, g, s, need_base, need_g, need_xa, need_B)
    empty = dy.new_empty(0)
    return d_base, d_g, d_xa if d_xa is not None else empty, d_B if d_B is not None else empty


@_lora_compose_bwd_op.register_fake
def _(dy, base, xa, B, g, s, need_base, need_g, need_xa, need_B, fused):
    N = dy.shape[-1]
    return (
        dy.new_empty(dy.shape if need_base else (0,), dtype=base.dtype),
        dy.new_empty((N,) if need_g else (0,), dtype=torch.float32),
        dy.new_empty(xa.shape if need_xa else (0,), dtype=xa.dtype if need_xa else dy.dtype),
        dy.new_empty(B.shape if need_B else (0,), dtype=B.dtype if need_B else dy.dtype),
    )


def _save(ctx, base, xa, B, g, bias, s, fused):
    ctx.save_for_backward(base if g.requires_grad else None, xa, B, g)
    ctx.s, ctx.fused = s, fused
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _grads(ctx, dy, backward_all):
    """The five input gradients from ``backward_all(dy, base, xa, B, g, s, need_base, need_g, need_xa, need_B)``
    (the fused tier's one kernel pass with the adapter epilogues, or the eager tier's)."""
    base, xa, B, g = ctx.saved_tensors
    need_base, need_xa, need_B, need_g, need_bias = ctx.needs_input_grad[:5]
    dy = dy.contiguous()
    base = base if base is not None else dy.new_empty(0)
    d_base, d_g, d_xa, d_B = backward_all(dy, base, xa, B, g, ctx.s, need_base, need_g, need_xa, need_B)
    d_bias = dy.to(torch.float32).reshape(-1, dy.shape[-1]).sum(dim=0).to(ctx.bias_dtype) if need_bias else None
    return (
        d_base if need_base else None,
        d_xa if need_xa else None,
        d_B if need_B else None,
        d_g if need_g else None,
        d_bias,
        None,
        None,
    )


def _setup_context(ctx, inputs, output):
    base, xa, B, g, bias, s, fused = inputs
    _save(ctx, base, xa, B, g, bias, s, fused)


def _backward_op(ctx, dy):
    return _grads(ctx, dy, lambda *a: torch.ops.dora_verify.lora_compose_bwd(*a, ctx.fused))  # one op, four grads


_lora_compose_fwd_op.register_autograd(_backward_op, setup_context=_setup_context)


class _LoRAComposeFunction(torch.autograd.Function):
    """The same forward/backward without the custom-op dispatcher (eager mode)."""

    @staticmethod
    def forward(ctx, base, xa, B, g, bias, s, fused):
        y, _ = (lora_compose_forward_fused if fused else lora_compose_forward_eager)(base, xa, B, g, bias, s)
        _save(ctx, base, xa, B, g, bias, s, fused)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _grads(ctx, dy, lora_compose_backward_fused_all if ctx.fused else lora_compose_backward_eager_all)


class _LoRARecomputeFunction(torch.autograd.Function):
    """fp32 adapters: lora = F.linear(xa, B) is formed for kernels/compose.py's compose (fused or eager tier) and
    freed; the backward forms it again — the same GEMM on the same operands, so the same bits — for d_g, and returns
    d_xa = d_lora B and d_B = d_loraᵀ xa as autograd through ``F.linear`` does. The forward keeps base, xa and B
    (what the bf16 path keeps), not an activation-sized fp32 lora."""

    @staticmethod
    def forward(ctx, base, xa, B, g, bias, s, fused):
        fwd = compose_forward_fused if fused else compose_forward_eager
        with autocast_off():  # the GEMMs keep the adapters' fp32 under torch.autocast (module contract)
            y, _ = fwd(base, F.linear(xa, B), g, None, bias, s, False, SAVE_NONE)
        ctx.save_for_backward(base if g.requires_grad else None, xa, B, g)
        ctx.s, ctx.fused, ctx.bias_dtype = s, fused, (bias.dtype if bias is not None else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        base, xa, B, g = ctx.saved_tensors
        need_base, need_xa, need_B, need_g, need_bias = ctx.needs_input_grad[:5]
        dy = dy.contiguous()
        N, R = B.shape
        with autocast_off():
            return _LoRARecomputeFunction._grads(
                ctx, dy, base, xa, B, g, N, R, need_base, need_xa, need_B, need_g, need_bias
            )

    @staticmethod
    def _grads(ctx, dy, base, xa, B, g, N, R, need_base, need_xa, need_B, need_g, need_bias):
        lora = F.linear(xa, B) if need_g else dy.new_empty(0)
        bwd = compose_backward_fused if ctx.fused else compose_backward_eager
        d_base, d_lora, d_g = bwd(
            dy,
            base if base is not None else dy.new_empty(0),
            lora,
            dy.new_empty(0),
            g,
            None,
            ctx.s,
            False,
            SAVE_INPUTS if need_g else SAVE_NONE,
            dy.dtype,
            xa.dtype,
            need_base,
            need_xa or need_B,
            need_g,
        )
        d_lora2 = d_lora.reshape(-1, N) if (need_xa or need_B) else None
        d_xa = (d_lora2 @ B).reshape(xa.shape) if need_xa else None
        d_B = d_lora2.t() @ xa.reshape(-1, R) if need_B else None
        d_bias = dy.to(torch.float32).reshape(-1, N).sum(dim=0).to(ctx.bias_dtype) if need_bias else None
        return d_base if need_base else None, d_xa, d_B, d_g if need_g else None, d_bias, None, None


class _DoRAComposeFunction(torch.autograd.Function):
    """:class:`_LoRAComposeFunction` with the DoRA scale inside: inputs m and ν instead of g, the kernels form
    g = m / max(ν, ε), the backward's reduction writes d_m (one autograd node where the separate scale adds two,
    and three fewer ops in each direction; fused tier, bf16/fp16 adapters, eager mode).

    With ``x`` and ``W`` (the low-memory mode) base is not kept: the backward forms it again as the forward's caller
    did, ``F.linear(x, W, b) − b`` (b = ``base_bias``; plain ``F.linear(x, W)`` without one) — the same GEMM on the
    same operands, so the same bits — and what the node keeps is x (which LoRA's own down-projection keeps too),
    xa, B, m and ν: nothing activation-sized beyond LoRA's. It costs one more base-sized GEMM in the backward."""

    @staticmethod
    def forward(ctx, base, xa, B, m, nu, bias, s, eps, x=None, W=None, base_bias=None):
        y, _ = lora_compose_forward_fused(base, xa, B, nu, bias, s, m=m, eps=eps)
        ctx.low_memory = x is not None
        kept = (x, W, base_bias) if ctx.low_memory else (base if m.requires_grad else None, None, None)
        ctx.save_for_backward(xa, B, m, nu, *kept)
        ctx.s, ctx.eps, ctx.bias_dtype = s, eps, (bias.dtype if bias is not None else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        xa, B, m, nu, base, W, base_bias = ctx.saved_tensors
        need_base, need_xa, need_B, need_m, _, need_bias = ctx.needs_input_grad[:6]
        dy = dy.contiguous()
        if ctx.low_memory:
            base = _form_base(base, W, base_bias) if need_m else None
        base = base if base is not None else dy.new_empty(0)
        d_base, d_m, d_xa, d_B = lora_compose_backward_fused_all(
            dy, base, xa, B, nu, ctx.s, need_base, need_m, need_xa, need_B, m=m, eps=ctx.eps
        )
        d_bias = dy.to(torch.float32).reshape(-1, dy.shape[-1]).sum(dim=0).to(ctx.bias_dtype) if need_bias else None
        return (
            d_base if need_base else None,
            d_xa if need_xa else None,
            d_B if need_B else None,
            d_m if need_m else None,
            None,
            d_bias,
            None,
            None,
            None,
            None,
            None,
        )


@torch.no_grad()
def _form_base(x, W, b):
    """base as the low-memory callers form it in the forward: ``F.linear(x, W, b) − b``, or ``F.linear(x, W)``."""
    with autocast_off():
        return (F.linear(x, W, b) - b).contiguous() if b is not None else F.linear(x, W).contiguous()


# ----------------------------------------------------------------------------- public entry point
def _check(base, xa, B, g, bias, s):
    for name, t in (("base", base), ("xa", xa), ("B", B), ("g", g)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if base.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"base dtype must be bf16, fp16 or fp32, got {base.dtype}")
    if xa.dtype != B.dtype or xa.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"xa and B must share one dtype (bf16, fp16 or fp32), got {xa.dtype} and {B.dtype}")
    if base.dim() < 1 or B.dim() != 2:
        raise ValueError(f"base must be [..., d_out] and B [d_out, r], got {tuple(base.shape)} and {tuple(B.shape)}")
    N, R = B.shape
    if base.shape[-1] != N or tuple(xa.shape) != tuple(base.shape[:-1]) + (R,):
        raise ValueError(
            f"shape mismatch: base {tuple(base.shape)}, xa {tuple(xa.shape)} (want [..., {R}]), B {tuple(B.shape)}"
        )
    if g.dtype != torch.float32 or g.shape != (N,):
        raise TypeError(f"g must be float32 [{N}], got {g.dtype} {tuple(g.shape)}")
    check_bias(bias, N)
    for name, t in (("xa", xa), ("B", B), ("g", g), ("bias", bias)):
        if t is not None and t.device != base.device:
            raise ValueError(f"{name} is on {t.device} but base is on {base.device}")
    return check_s(s)


def lora_compose(
    base: torch.Tensor,
    xa: torch.Tensor,
    B: torch.Tensor,
    g: torch.Tensor,
    s: float,
    bias: "torch.Tensor | None" = None,
    *,
    tier: "Tier | str | None" = None,
) -> torch.Tensor:
    """y = g ⊙ (base + s·(xa Bᵀ)) + bias without materialising xa Bᵀ (contract: module docstring).

    ``base`` = x Wᵀ [..., d_out] (bias excluded), ``xa`` = dropout(x) Aᵀ [..., r], ``B`` [d_out, r], ``g``
    fp32 [d_out]. Differentiable in base, xa, B, g and bias. ``tier``: as :func:`compose`; the fused tier
    needs bf16/fp16 adapters (fp32 ones take the eager tier). Non-contiguous inputs are copied."""
    s = _check(base, xa, B, g, bias, s)
    b2, x2 = base.contiguous(), xa.contiguous()  # [..., N], [..., R]: the kernels read T rows
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (base, xa, B, g, bias))
    if xa.dtype == torch.float32 and not torch.compiler.is_compiling():  # fp32 adapters: compose, lora recomputed
        fused = select_tier(b2, needs_grad, tier) != Tier.EAGER
        bias = bias.contiguous() if bias is not None else None
        if needs_grad:
            return _LoRARecomputeFunction.apply(b2, x2, B.contiguous(), g.contiguous(), bias, s, fused)
        fwd = compose_forward_fused if fused else compose_forward_eager
        with autocast_off():
            return fwd(b2, F.linear(x2, B), g.contiguous(), None, bias, s, False, SAVE_NONE)[0]
    fused = (
        select_tier(b2, needs_grad, tier, op="lora_compose", dtype=xa.dtype) != Tier.EAGER
        and xa.dtype in _FUSED_ADAPTER_DTYPES
    )
    args = (b2, x2, B.contiguous(), g.contiguous(), bias.contiguous() if bias is not None else None, s, fused)
    if torch.compiler.is_compiling():
        out = torch.ops.dora_verify.lora_compose_fwd(*args)
    elif needs_grad:
        out = _LoRAComposeFunction.apply(*args)
    else:
        out = (lora_compose_forward_fused if fused else lora_compose_forward_eager)(*args[:-1])[0]
    return out  # shaped like base and not a view (FSDP2 warns about views: an in-place op on one skips its hooks)


def dora_lora_compose(
    base: torch.Tensor,
    xa: torch.Tensor,
    B: torch.Tensor,
    m: torch.Tensor,
    nu: torch.Tensor,
    s: float,
    bias: "torch.Tensor | None" = None,
    *,
    eps: float = DEFAULT_EPS,
    tier: "Tier | str | None" = None,
) -> torch.Tensor:
    """``lora_compose(base, xa, B, dora_scale(m, nu, eps)[0], s, bias)`` — the same function and the same bits
    (y and the gradients of base, xa, B, m and bias) — with the scale g = m / max(ν, ε) formed inside the kernels.

    ``m`` [d_out] the magnitude (bf16/fp16/fp32, differentiable), ``nu`` fp32 [d_out] the detached row norm. On the
    fused tier with bf16/fp16 adapters outside compiled graphs this is one autograd node and saves the separate
    scale's host ops (the layer step is host-bound at small shapes); elsewhere it is the composition above."""
    if not (isinstance(m, torch.Tensor) and isinstance(nu, torch.Tensor)):
        raise TypeError("m and nu must be torch.Tensors")
    if nu.requires_grad:
        raise ValueError("nu must be detached (DoRA's ν carries no gradient)")
    if isinstance(B, torch.Tensor) and B.dim() == 2 and (nu.dtype != torch.float32 or nu.shape != B.shape[:1]):
        raise TypeError(f"nu must be float32 [{B.shape[0]}], got {nu.dtype} {tuple(nu.shape)}")
    s = _check(base, xa, B, nu, bias, s)
    N = B.shape[0]
    if m.shape != (N,) or m.dtype not in KERNEL_DTYPES or m.device != base.device:
        raise ValueError(
            f"m must be [{N}] (bf16, fp16 or fp32) on {base.device}, got {m.dtype} {tuple(m.shape)} on {m.device}"
        )
    return dora_lora_compose_unchecked(base, xa, B, m, nu, s, bias, float(eps), tier)


def dora_lora_compose_unchecked(
    base, xa, B, m, nu, s: float, bias, eps: float, tier=None, base_from=None
) -> torch.Tensor:
    """:func:`dora_lora_compose` without its argument checks, for the layers (kernels/layer.py, kernels/peft.py),
    whose operands are consistent by construction: base = x Wᵀ and xa = x Aᵀ from their own GEMMs, B, m their
    parameters, ν from their norm runner (fp32 [d_out], detached), s an fp32 float, one device (checked there).
    The checks cost as much host time as a kernel launch, on every layer call.

    ``base_from`` = (x, W, b): the low-memory mode — base was formed as ``F.linear(x, W, b) − b`` (``F.linear(x, W)``
    for b None) and the fused training path keeps x instead of base, forming base again in the backward
    (:class:`_DoRAComposeFunction`); elsewhere it changes nothing."""
    if xa.dtype in _FUSED_ADAPTER_DTYPES and not torch.compiler.is_compiling():
        needs_grad = torch.is_grad_enabled() and (
            base.requires_grad
            or xa.requires_grad
            or B.requires_grad
            or m.requires_grad
            or (bias is not None and bias.requires_grad)
        )
        b2 = base.contiguous()
        if select_tier(b2, needs_grad, tier, op="lora_compose", dtype=xa.dtype) != Tier.EAGER:
            args = (
                b2,
                xa.contiguous(),
                B.contiguous(),
                m.contiguous(),
                nu.contiguous(),
                bias.contiguous() if bias is not None else None,
                s,
                eps,
            )
            if needs_grad:
                return _DoRAComposeFunction.apply(*args, *(base_from or ()))
            return lora_compose_forward_fused(*args[:3], args[4], args[5], s, m=args[3], eps=eps)[0]
    return lora_compose(base, xa, B, dora_scale(m, nu, eps, g_minus_1=False)[0], s, bias, tier=tier)


__all__ = [
    "adapter_grads",
    "dora_lora_compose",
    "dora_lora_compose_unchecked",
    "lora_compose",
    "lora_compose_backward_eager",
    "lora_compose_backward_eager_all",
    "lora_compose_backward_fused",
    "lora_compose_backward_fused_all",
    "lora_compose_forward_eager",
    "lora_compose_forward_fused",
]
