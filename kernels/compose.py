"""DoRA compose: y = g ⊙ (base + s·lora) + bias, or Δ = (g−1) ⊙ base + g ⊙ (s·lora), with its backward.

One op, laid out like the Triton tutorials / Liger-Kernel ops: Triton kernels, their launchers, the eager
torch fallback, the ``torch.library`` custom ops (so ``torch.compile`` traces them without graph breaks)
and the autograd glue, together.

Numerical contract (base, lora, dy in bf16/fp16/fp32; g, g−1 fp32; s fp32-representable; u = 2⁻²⁴):

* Forward, y output. The fused kernel evaluates g·(base + s·lora) + bias in fp32 registers with
  error-free transformations (s·lora and g·hi split exactly with FMA, base + s·lora and + bias with
  TwoSum) into an unrounded pair v' = hi + tail with |v' − y| ≤ E = u²|g|(4|base + s·lora| + 3|s·lora|)(1 + 4u)
  (+ u²(|g|(3|base + s·lora| + |s·lora|) + |bias|) with bias; ``bounds.compose_epilogue_slack``, derivation in
  proofs/bounds.md). For 16-bit outputs hi + tail is rounded to fp32 by round-to-odd (TwoSum's residual is the
  sticky bit), so the one conversion to bf16/fp16 equals RN(v') — no double rounding: a plain fp32 sum
  followed by a cast would put values just off a 16-bit midpoint onto it and then round to even (the wrong way),
  and turns exact fp16 results in (65504, 65520) into +Inf. Hence the output is **correctly rounded**
  (RN of the exact y of the rounded inputs) unless y lies within E of a rounding boundary of the output format,
  and always faithful (≤ 1 ulp); exact whenever y is representable (g = 1 and lora = 0, a fresh adapter).
* Forward, Δ output (for callers that add Δ to an existing ``base + bias``): the same construction
  gives |v' − Δ| ≤ E_Δ = u²(4|(g−1)·base| + 7|g·s·lora|)(1 + 4u), then the same single rounding; Δ is exactly 0
  when g − 1 = 0 and lora = 0. (A plain fp32 evaluation would add u·(|(g−1)·base| + |g·s·lora|).)
* The eager tier computes the same quantities in float64 (error ≤ 3·2⁻⁵³ of the terms, below E) and rounds
  once to the output dtype (:func:`round_from_f64`: round-to-odd into fp32, then RN; torch's own float64 →
  bf16 cast rounds twice). Same guarantee; tiers can differ only where y lies within E of a boundary.
* Backward (y output): d_base = RN(RN32(g·dy)) and d_lora = RN(RN32(RN32(g·s)·dy)) are faithful (two
  fp32 roundings of ≤ 2u each, then one output rounding); identical bits in every tier.
  d_g = Σ_T dy ⊙ (base + s·lora) is accumulated in float64 in a fixed two-stage order (per column block
  and row split, then over splits): bitwise reproducible, no atomics. By default (save='inputs') the
  backward reads base and lora themselves (kept alive, no new tensor): s·lora and dy·inner products are
  exact or within one float64 rounding, so d_g's error is γ64_T·Σ|dy·inner| plus one fp32 rounding.
  save='activation' keeps only inner = base + s·lora rounded once to the activation dtype (bf16 for fp16
  activations: fp16's range cannot hold it where y is finite only thanks to a small g; :func:`inner_dtype`)
  — half the memory; error ≤ u_inner·Σ_T|dy·inner|, ~2⁻⁸ relative.
  Δ output: d_base = RN(RN32((g−1)·dy)) (the caller's residual path carries the other dy); d_g as above
  (∂Δ/∂g and ∂Δ/∂(g−1) are credited to g, exact when g−1 is computed from the same m as g).
* Domain: |s·lora| and |base + s·lora| below fp32's largest value (≈3.4e38; only bf16 inputs near their own
  range limit can leave it: the fp32 epilogue then overflows to ±Inf/NaN where the exact y may be finite).
  The exhaustive check (dora_verify/exhaustive.py) counts those pairs separately.
* Non-finite inputs propagate elementwise as in IEEE arithmetic (the kernel falls back to the plain
  fp32 expression where it is not finite; a NaN/Inf in g or g−1 reaches its whole column); nothing is
  raised inside the hot path.
* Checked at call (one-line TypeError/ValueError): shapes, dtypes (base and lora each bf16/fp16/fp32 — they may
  differ, e.g. an fp32 lora with a bf16 base; y takes base's dtype; bias bf16/fp16/fp32), devices, and s finite
  and fp32-representable — a Python float or a one-element tensor that does not require grad (no gradient for s
  is computed). g − 1 for output='delta': its gradient is credited to g (as above), which is the exact chain rule
  whenever ∂(g−1)/∂θ = ∂g/∂θ for all upstream θ (g and g − 1 from one :func:`dora_scale` call, or g − 1
  computed from g); a g_minus_1 that is a grad-requiring leaf, or requires grad while g does not, is refused.
* Autocast: the ops run with autocast disabled (``no_autocast``), so their results are the same bits inside and
  outside ``torch.autocast`` regions.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .launch import fast_launch
from .dispatch import HAS_TRITON, Tier, no_autocast, select_tier
from .scale import check_scaling

if HAS_TRITON:
    import triton
    import triton.language as tl

_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SAVE_NONE, SAVE_INPUTS, SAVE_ACTIVATION = 0, 1, 2
# 4 warps: 0.94 of copy bandwidth at 8192² bf16 on an H200 where 8 gave 0.87
# (reports/h200/bench/probes/lora_compose_limits.txt)
FWD_BLOCK_T, FWD_BLOCK_N, FWD_WARPS = 16, 256, 4
BWD_BLOCK_T, BWD_BLOCK_N, BWD_WARPS = 32, 128, 8
BWD_TARGET_PROGRAMS = 1024  # fixed (shape-only) split rule: bitwise reproducible on any device
RED_BLOCK = 512


# ----------------------------------------------------------------------------- Triton kernels
if HAS_TRITON:

    @triton.jit
    def _two_sum(a, b):
        s = a + b
        bb = s - a
        return s, (a - (s - bb)) + (b - bb)

    @triton.jit
    def _sum_odd(a, b, ODD: tl.constexpr):
        """RN32(a + b); with ODD, its round-to-odd instead: when a + b is inexact and the nearest fp32 value
        has an even last bit, step one ulp towards a + b. A later rounding to a format with ≤ 22 significant
        bits then equals the direct rounding of a + b (no double rounding)."""
        v, r = _two_sum(a, b)  # a + b = v + r exactly
        if ODD:
            bits = v.to(tl.int32, bitcast=True)
            fix = (r != 0.0) & ((bits & 1) == 0) & ((v - v) == 0.0)
            step = tl.where((r > 0.0) == (v > 0.0), 1, -1)  # +1 on the bits moves away from zero
            v = tl.where(fix, (bits + step).to(tl.float32, bitcast=True), v)
        return v

    @triton.jit
    def _y_value(b, lo, g, bias_ptr, cols, cmask, s, HAS_BIAS: tl.constexpr, ODD: tl.constexpr):
        """fp32 value of g·(b + s·lo) + bias before the final rounding: v' = q + tail within 4u²(…) of y (module
        contract), then RN32(v') or, with ODD (16-bit outputs), its round-to-odd; non-finite results take the
        plain fp32 form (IEEE propagation)."""
        p = lo * s
        ep = tl.fma(lo, s, -p)  # s·lora = p + ep exactly
        h, e1 = _two_sum(b, p)  # base + p = h + e1 exactly
        t_lo = e1 + ep
        q = g * h
        eq = tl.fma(g, h, -q)  # g·h = q + eq exactly
        tail = eq + g * t_lo
        plain = g * (b + p)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
            y1, e2 = _two_sum(q, bias)
            v = _sum_odd(y1, e2 + tail, ODD)
            plain = plain + bias
        else:
            v = _sum_odd(q, tail, ODD)
        return tl.where((plain - plain) == 0.0, v, plain)

    @fast_launch
    @triton.jit
    def _compose_fwd_kernel(
        base_ptr,
        lora_ptr,
        g_ptr,
        gm1_ptr,
        bias_ptr,
        out_ptr,
        inner_ptr,
        T,
        N,
        s,
        DELTA: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        SAVE_INNER: tl.constexpr,
        ODD: tl.constexpr,
        ODD_INNER: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # one flat grid, column blocks fastest: the programs in flight stream contiguous memory (5–7% faster on
        # an H100 than rows fastest, whose programs in flight touch one 256-column strip of many rows)
        n_n = tl.cdiv(N, BLOCK_N)
        rows = (tl.program_id(0) // n_n) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = (tl.program_id(0) % n_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        mask = (rows < T)[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        lo = tl.load(lora_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + cols, mask=cmask, other=0.0)[None, :]
        p = lo * s
        ep = tl.fma(lo, s, -p)  # s·lora = p + ep exactly
        if DELTA:
            gm1 = tl.load(gm1_ptr + cols, mask=cmask, other=0.0)[None, :]
            a = g * p
            ea = tl.fma(g, p, -a)  # g·p = a + ea exactly
            c = gm1 * b
            ec = tl.fma(gm1, b, -c)  # (g-1)·base = c + ec exactly
            d, e3 = _two_sum(a, c)
            v = _sum_odd(d, e3 + ((ea + ec) + g * ep), ODD)
            plain = c + g * p
            v = tl.where((plain - plain) == 0.0, v, plain)  # non-finite: IEEE propagation of the plain form
        else:
            v = _y_value(b, lo, g, bias_ptr, cols, cmask, s, HAS_BIAS, ODD)
        tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)
        if SAVE_INNER:
            hh, ee = _two_sum(b, p)
            tl.store(inner_ptr + offs, _sum_odd(hh, ee + ep, ODD_INNER).to(inner_ptr.dtype.element_ty), mask=mask)

    @fast_launch
    @triton.jit
    def _compose_bwd_kernel(
        dy_ptr,
        base_ptr,
        lora_ptr,
        inner_ptr,
        g_ptr,
        gm1_ptr,
        dbase_ptr,
        dlora_ptr,
        partial_ptr,
        T,
        N,
        s,
        rows_per_split,
        SAVED: tl.constexpr,
        DELTA: tl.constexpr,
        WRITE_DBASE: tl.constexpr,
        WRITE_DLORA: tl.constexpr,
        WRITE_DG: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < N
        g = tl.load(g_ptr + cols, mask=cmask, other=0.0)[None, :]
        if DELTA:
            gb = tl.load(gm1_ptr + cols, mask=cmask, other=0.0)[None, :]
        else:
            gb = g
        gs = g * s
        acc = tl.zeros([BLOCK_N], dtype=tl.float64)
        t0 = pid_s * rows_per_split
        t_end = tl.minimum(t0 + rows_per_split, T)
        for start in range(t0, t_end, BLOCK_T):
            rows = start + tl.arange(0, BLOCK_T)
            mask = (rows < t_end)[:, None] & cmask[None, :]
            offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if WRITE_DBASE:
                tl.store(dbase_ptr + offs, (gb * dy).to(dbase_ptr.dtype.element_ty), mask=mask)
            if WRITE_DLORA:
                tl.store(dlora_ptr + offs, (gs * dy).to(dlora_ptr.dtype.element_ty), mask=mask)
            if WRITE_DG:
                if SAVED == 1:  # base + s·lora in float64: s·lora exact, one float64 rounding
                    b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float64)
                    lo = tl.load(lora_ptr + offs, mask=mask, other=0.0).to(tl.float64)
                    inner = b + lo * s
                else:
                    inner = tl.load(inner_ptr + offs, mask=mask, other=0.0).to(tl.float64)
                acc += tl.sum(dy.to(tl.float64) * inner, axis=0)
        if WRITE_DG:
            tl.store(partial_ptr + pid_s.to(tl.int64) * N + cols, acc, mask=cmask)

    @triton.jit
    def _sum_of_splits(partial_ptr, cols, cmask, N, n_splits, BLOCK: tl.constexpr):
        """Σ_k partial[k] of columns ``cols`` (float64 partials): a float64 sum over the splits in order."""
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        for k in range(0, n_splits):
            acc += tl.load(partial_ptr + k * N + cols, mask=cmask, other=0.0)
        return acc

    @triton.jit
    def _d_g_of_splits(partial_ptr, cols, cmask, N, n_splits, BLOCK: tl.constexpr):
        """d_g = RN32(Σ_k partial[k]) of columns ``cols``: a float64 sum over the splits in order."""
        return _sum_of_splits(partial_ptr, cols, cmask, N, n_splits, BLOCK).to(tl.float32)

    @fast_launch
    @triton.jit
    def _sum_splits_kernel(partial_ptr, out_ptr, N, n_splits, BLOCK: tl.constexpr):
        """d_g of the backward's float64 partials (:func:`_d_g_of_splits`)."""
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        cmask = cols < N
        tl.store(out_ptr + cols, _d_g_of_splits(partial_ptr, cols, cmask, N, n_splits, BLOCK), mask=cmask)


def inner_dtype(act: torch.dtype) -> torch.dtype:
    """dtype of the saved inner = base + s·lora in save='activation' mode: the activation dtype, except bf16 for
    fp16 activations — fp16's range (65504) cannot hold base + s·lora where it exceeds it while y = g·(…) is
    finite (small g), and an overflowed inner would turn d_g into ±Inf. Same 2 bytes, bf16's precision."""
    return torch.bfloat16 if act == torch.float16 else act


def _save_dtype(code: int, act: torch.dtype) -> "torch.dtype | None":
    """dtype of the ``inner`` tensor the forward writes (only in SAVE_ACTIVATION mode)."""
    return inner_dtype(act) if code == SAVE_ACTIVATION else None


def bwd_splits(T: int, N: int) -> Tuple[int, int]:
    """(rows per split, number of splits) of the backward's first stage: a function of the shape only."""
    col_blocks = triton.cdiv(N, BWD_BLOCK_N) if HAS_TRITON else -(-N // BWD_BLOCK_N)
    want = max(1, min(-(-T // BWD_BLOCK_T), -(-BWD_TARGET_PROGRAMS // col_blocks)))
    rows = -(-T // want)
    rows = -(-rows // BWD_BLOCK_T) * BWD_BLOCK_T
    return rows, -(-T // rows)


# ----------------------------------------------------------------------------- launchers
def _rows_cols(t: torch.Tensor):
    """(T, N) of a contiguous [..., N] tensor read as T rows of N: the kernels index it so, whatever its leading
    dims."""
    N = t.shape[-1]
    return (t.numel() // N if N else 0), N


def compose_forward_fused(base, lora, g, g_minus_1, bias, s: float, delta: bool, save: int):
    """Triton forward on contiguous [..., N] tensors; returns (out, inner or empty), out shaped like base."""
    T, N = _rows_cols(base)
    out = torch.empty_like(base)
    sd = _save_dtype(save, base.dtype)
    inner = torch.empty(base.shape if sd is not None else (0,), dtype=sd or torch.float32, device=base.device)
    if T and N:
        grid = (triton.cdiv(T, FWD_BLOCK_T) * triton.cdiv(N, FWD_BLOCK_N),)
        _compose_fwd_kernel[grid](
            base,
            lora,
            g,
            g_minus_1 if delta else g,
            bias if bias is not None else g,
            out,
            inner if sd is not None else out,
            T,
            N,
            s,
            DELTA=delta,
            HAS_BIAS=bias is not None,
            SAVE_INNER=sd is not None,
            ODD=base.dtype != torch.float32,
            ODD_INNER=sd is not None and sd != torch.float32,
            BLOCK_T=FWD_BLOCK_T,
            BLOCK_N=FWD_BLOCK_N,
            num_warps=FWD_WARPS,
            enable_fp_fusion=False,
        )
    return out, inner


def compose_backward_fused(
    dy,
    base,
    lora,
    inner,
    g,
    g_minus_1,
    s: float,
    delta: bool,
    saved: int,
    base_dtype,
    lora_dtype,
    need_base: bool,
    need_lora: bool,
    need_g: bool,
):
    """Triton backward on contiguous [..., N] tensors: (d_base, d_lora, d_g) with empties for what is not needed."""
    T, N = _rows_cols(dy)
    dev = dy.device
    d_base = torch.empty(dy.shape if need_base else (0,), dtype=base_dtype, device=dev)
    d_lora = torch.empty(dy.shape if need_lora else (0,), dtype=lora_dtype, device=dev)
    d_g = torch.empty(N if need_g else 0, dtype=torch.float32, device=dev)
    if not (need_base or need_lora or need_g) or N == 0:
        return d_base, d_lora, d_g
    if T == 0:
        d_g.zero_()
        return d_base, d_lora, d_g
    rows, splits = bwd_splits(T, N)
    partial = torch.empty((splits, N) if need_g else (0,), dtype=torch.float64, device=dev)
    grid = (triton.cdiv(N, BWD_BLOCK_N), splits)
    sv = saved if need_g else SAVE_ACTIVATION
    _compose_bwd_kernel[grid](
        dy,
        base if sv == SAVE_INPUTS else dy,
        lora if sv == SAVE_INPUTS else dy,
        inner if (need_g and sv == SAVE_ACTIVATION) else dy,
        g,
        g_minus_1 if delta else g,
        d_base if need_base else dy,
        d_lora if need_lora else dy,
        partial if need_g else g,
        T,
        N,
        s,
        rows,
        SAVED=sv,
        DELTA=delta,
        WRITE_DBASE=need_base,
        WRITE_DLORA=need_lora,
        WRITE_DG=need_g,
        BLOCK_T=BWD_BLOCK_T,
        BLOCK_N=BWD_BLOCK_N,
        num_warps=BWD_WARPS,
        enable_fp_fusion=False,
    )
    if need_g:
        _sum_splits_kernel[(triton.cdiv(N, RED_BLOCK),)](partial, d_g, N, splits, BLOCK=RED_BLOCK)
    return d_base, d_lora, d_g


# ----------------------------------------------------------------------------- eager fallback (tier 3)
def round_from_f64(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 → ``dtype`` with a single rounding to nearest: through fp32 by round-to-odd (the float64 residual
    v − RN32(v) is exact and gives the sticky bit), so the 16-bit result equals RN(v) — a plain cast may round
    twice (float64 → fp32 → 16-bit)."""
    if dtype in (torch.float64, torch.float32):
        return v.to(dtype)
    v32 = v.to(torch.float32)
    r = v - v32.to(torch.float64)  # exact; non-zero also where v underflowed to ±0 in fp32
    fix = (r != 0) & ((v32.view(torch.int32) & 1) == 0) & torch.isfinite(v32)
    towards = torch.where(r > 0, math.inf, -math.inf).to(torch.float32)
    return torch.where(fix, torch.nextafter(v32, towards), v32).to(dtype)


@no_autocast
def compose_forward_eager(base, lora, g, g_minus_1, bias, s: float, delta: bool, save: int):
    """Float64 evaluation, one rounding to the output dtype (see contract)."""
    f64 = torch.float64
    b, sl = base.to(f64), lora.to(f64) * s
    if delta:
        v = g_minus_1.to(f64) * b + g.to(f64) * sl
    else:
        v = g.to(f64) * (b + sl)
        if bias is not None:
            v = v + bias.to(f64)
    sd = _save_dtype(save, base.dtype)
    inner = round_from_f64(b + sl, sd) if sd is not None else base.new_empty(0, dtype=torch.float32)
    return round_from_f64(v, base.dtype), inner


@no_autocast
def compose_backward_eager(
    dy,
    base,
    lora,
    inner,
    g,
    g_minus_1,
    s: float,
    delta: bool,
    saved: int,
    base_dtype,
    lora_dtype,
    need_base: bool,
    need_lora: bool,
    need_g: bool,
):
    f32 = torch.float32
    dy32 = dy.to(f32)

    def empty(dt):  # a fresh tensor per output: custom ops may not return aliases
        return dy.new_empty(0, dtype=dt)

    d_base = ((g_minus_1 if delta else g).to(f32) * dy32).to(base_dtype) if need_base else empty(base_dtype)
    d_lora = ((g.to(f32) * s) * dy32).to(lora_dtype) if need_lora else empty(lora_dtype)
    if need_g:
        f64 = torch.float64
        inner64 = base.to(f64) + lora.to(f64) * s if saved == SAVE_INPUTS else inner.to(f64)
        d_g = (dy.to(f64) * inner64).reshape(-1, dy.shape[-1]).sum(dim=0).to(f32)
    else:
        d_g = empty(f32)
    return d_base, d_lora, d_g


# ----------------------------------------------------------------------------- torch.library custom ops
@torch.library.custom_op("dora_verify::compose_fwd", mutates_args=())
def _compose_fwd_op(
    base: torch.Tensor,
    lora: torch.Tensor,
    g: torch.Tensor,
    g_minus_1: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    s: float,
    delta: bool,
    save: int,
    fused: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    fn = compose_forward_fused if fused else compose_forward_eager
    return fn(base, lora, g, g_minus_1, bias, s, delta, save)


@_compose_fwd_op.register_fake
def _(base, lora, g, g_minus_1, bias, s, delta, save, fused):
    sd = _save_dtype(save, base.dtype)
    inner = base.new_empty(base.shape, dtype=sd) if sd is not None else base.new_empty((0,), dtype=torch.float32)
    return torch.empty_like(base), inner


@torch.library.custom_op("dora_verify::compose_bwd", mutates_args=())
def _compose_bwd_op(
    dy: torch.Tensor,
    base: torch.Tensor,
    lora: torch.Tensor,
    inner: torch.Tensor,
    g: torch.Tensor,
    g_minus_1: Optional[torch.Tensor],
    s: float,
    delta: bool,
    saved: int,
    base_dtype: torch.dtype,
    lora_dtype: torch.dtype,
    need_base: bool,
    need_lora: bool,
    need_g: bool,
    fused: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = compose_backward_fused if fused else compose_backward_eager
    return fn(
        dy.contiguous(),
        base,
        lora,
        inner,
        g,
        g_minus_1,
        s,
        delta,
        saved,
        base_dtype,
        lora_dtype,
        need_base,
        need_lora,
        need_g,
    )


@_compose_bwd_op.register_fake
def _(
    dy, base, lora, inner, g, g_minus_1, s, delta, saved, base_dtype, lora_dtype, need_base, need_lora, need_g, fused
):
    N = dy.shape[-1]
    return (
        dy.new_empty(dy.shape if need_base else (0,), dtype=base_dtype),
        dy.new_empty(dy.shape if need_lora else (0,), dtype=lora_dtype),
        dy.new_empty((N,) if need_g else (0,), dtype=torch.float32),
    )


def _save(ctx, base, lora, inner, g, g_minus_1, bias, s, delta, save, fused):
    keep = save == SAVE_INPUTS
    ctx.save_for_backward(base if keep else None, lora if keep else None, inner, g, g_minus_1)
    ctx.s, ctx.delta, ctx.fused, ctx.saved = s, delta, fused, save
    ctx.base_dtype, ctx.lora_dtype = base.dtype, lora.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _grads(ctx, dy, backward):
    base, lora, inner, g, g_minus_1 = ctx.saved_tensors
    need_base, need_lora, need_g, _, need_bias = ctx.needs_input_grad[:5]
    if need_g and ctx.saved == SAVE_NONE and dy.numel() != 0:
        raise RuntimeError("compose: g requires grad but the forward saved nothing for it (save=SAVE_NONE)")
    e = dy.new_empty(0)
    d_base, d_lora, d_g = backward(
        dy.contiguous(),
        base if base is not None else e,
        lora if lora is not None else e,
        inner,
        g,
        g_minus_1,
        ctx.s,
        ctx.delta,
        ctx.saved,
        ctx.base_dtype,
        ctx.lora_dtype,
        need_base,
        need_lora,
        need_g,
    )
    d_bias = (
        dy.to(torch.float32).reshape(-1, dy.shape[-1]).sum(dim=0).to(ctx.bias_dtype)
        if need_bias and not ctx.delta
        else None
    )
    return (
        d_base if need_base else None,
        d_lora if need_lora else None,
        d_g if need_g else None,
        None,
        d_bias,
        None,
        None,
        None,
        None,
    )


def _setup_context(ctx, inputs, output):
    base, lora, g, g_minus_1, bias, s, delta, save, fused = inputs
    _save(ctx, base, lora, output[1], g, g_minus_1, bias, s, delta, save, fused)


def _backward_op(ctx, dy, _d_inner):
    def bwd(*args):
        return torch.ops.dora_verify.compose_bwd(*args, ctx.fused)

    return _grads(ctx, dy, bwd)


_compose_fwd_op.register_autograd(_backward_op, setup_context=_setup_context)


class _ComposeFunction(torch.autograd.Function):
    """The same forward/backward without the custom-op dispatcher (eager mode: ~20 µs less per call)."""

    @staticmethod
    def forward(ctx, base, lora, g, g_minus_1, bias, s, delta, save, fused):
        fn = compose_forward_fused if fused else compose_forward_eager
        out, inner = fn(base, lora, g, g_minus_1, bias, s, delta, save)
        _save(ctx, base, lora, inner, g, g_minus_1, bias, s, delta, save, fused)
        ctx.mark_non_differentiable(inner)
        return out, inner

    @staticmethod
    def backward(ctx, dy, _d_inner):
        return _grads(ctx, dy, compose_backward_fused if ctx.fused else compose_backward_eager)


# ----------------------------------------------------------------------------- public entry point
def check_s(s) -> float:
    """``s`` as a float (:func:`check_scaling`: finite, fp32-representable). A one-element tensor is read once;
    one that requires grad raises TypeError — the kernels compute no gradient for s."""
    if isinstance(s, torch.Tensor):
        if s.requires_grad:
            raise TypeError("s must be a float: the kernels compute no gradient for s, got a tensor that requires grad")
        if s.numel() != 1:
            raise ValueError(f"s must be a scalar, got a tensor of shape {tuple(s.shape)}")
    return check_scaling(s)


def check_bias(bias, n: int) -> None:
    """bias: None or a bf16/fp16/fp32 tensor [n] (TypeError / ValueError otherwise)."""
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias.dtype not in _ACT_DTYPES:
        raise TypeError(f"bias dtype must be bf16, fp16 or fp32, got {bias.dtype}")
    if bias.shape != (n,):
        raise ValueError(f"bias must have shape [{n}] (d_out), got {tuple(bias.shape)}")


def _check(base, lora, g, g_minus_1, bias, s, output):
    if output not in ("y", "delta"):
        raise ValueError(f"output must be 'y' or 'delta', got {output!r}")
    for name, t in (("base", base), ("lora", lora), ("g", g)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if g_minus_1 is not None and not isinstance(g_minus_1, torch.Tensor):
        raise TypeError(f"g_minus_1 must be a torch.Tensor or None, got {type(g_minus_1).__name__}")
    if base.dtype not in _ACT_DTYPES or lora.dtype not in _ACT_DTYPES:
        raise TypeError(f"base/lora dtypes must be bf16, fp16 or fp32, got {base.dtype}/{lora.dtype}")
    if base.shape != lora.shape or base.dim() < 1:
        raise ValueError(
            f"base and lora must have one shape [..., d_out], got {tuple(base.shape)} and {tuple(lora.shape)}"
        )
    N = base.shape[-1]
    check_bias(bias, N)
    vecs = (("g", g), ("g_minus_1", g_minus_1), ("bias", bias))
    for name, t in vecs:
        if t is None:
            continue
        if t.shape != (N,):
            raise ValueError(f"{name} must have shape [{N}] (d_out), got {tuple(t.shape)}")
        if t.device != base.device:
            raise ValueError(f"{name} is on {t.device} but base is on {base.device}")
    if lora.device != base.device:
        raise ValueError(f"lora is on {lora.device} but base is on {base.device}")
    if g.dtype != torch.float32 or (g_minus_1 is not None and g_minus_1.dtype != torch.float32):
        raise TypeError("g and g_minus_1 must be float32 (the contract keeps the scale in fp32; see dora_scale)")
    if output == "delta" and g_minus_1 is None:
        raise ValueError("output='delta' needs g_minus_1 (from dora_scale): g - 1 formed from a rounded g loses it")
    if output == "delta" and bias is not None:
        raise ValueError("output='delta' excludes the bias (the caller's base result already has it)")
    if output == "delta" and g_minus_1.requires_grad and torch.is_grad_enabled():
        if not g.requires_grad:  # its gradient is credited to g (contract): it would be lost
            raise ValueError(
                "g_minus_1 requires grad but g does not: compose credits the gradient of g - 1 to g "
                "(pass both from dora_scale, or detach g_minus_1)"
            )
        if g_minus_1.is_leaf:
            raise ValueError(
                "g_minus_1 is a leaf that requires grad: compose computes no gradient of its own for "
                "it (it credits it to g; pass g - 1 computed from g's graph, as dora_scale returns it)"
            )
    return check_s(s)


def compose(
    base: torch.Tensor,
    lora: torch.Tensor,
    g: torch.Tensor,
    s: float,
    bias: "torch.Tensor | None" = None,
    *,
    g_minus_1: "torch.Tensor | None" = None,
    output: str = "y",
    save: str = "inputs",
    tier: "Tier | str | None" = None,
) -> torch.Tensor:
    """DoRA compose of ``base`` = x Wᵀ (bias excluded) and ``lora`` = (x Aᵀ) Bᵀ, [..., d_out].

    output='y': g ⊙ (base + s·lora) + bias (one rounding); output='delta': (g−1) ⊙ base + g ⊙ s·lora
    (needs ``g_minus_1``; no bias). Differentiable in base, lora, g (and bias). ``save``: what backward
    keeps for d_g when g requires grad: 'inputs' (default: base and lora themselves, no new tensor, d_g
    from exact float64 products) or 'activation' (the forward also writes inner = base + s·lora in the
    activation dtype so base and lora can be freed: error ≤ 2⁻⁸·Σ_T|dy·inner| in bf16). ``tier``:
    force 'fused' or 'eager' (default: :func:`select_tier`). Non-contiguous inputs are copied."""
    s = _check(base, lora, g, g_minus_1, bias, s, output)
    delta = output == "delta"
    b2, l2 = base.contiguous(), lora.contiguous()  # [..., N]: the kernels read T·N rows, the output keeps the shape
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (base, lora, g, bias))
    chosen = select_tier(b2, needs_grad, tier)
    if save not in ("inputs", "activation"):
        raise ValueError(f"save must be 'inputs' or 'activation', got {save!r}")
    mode = SAVE_NONE
    if needs_grad and g.requires_grad:
        mode = SAVE_INPUTS if save == "inputs" else SAVE_ACTIVATION
    gm1 = g_minus_1.detach().contiguous() if g_minus_1 is not None else None
    args = (
        b2,
        l2,
        g.contiguous(),
        gm1,
        bias.contiguous() if bias is not None else None,
        s,
        delta,
        mode,
        chosen != Tier.EAGER,
    )
    if torch.compiler.is_compiling():
        out, _ = torch.ops.dora_verify.compose_fwd(*args)
    elif needs_grad:
        out, _ = _ComposeFunction.apply(*args)
    else:
        out, _ = (compose_forward_fused if args[-1] else compose_forward_eager)(*args[:-1])
    return out  # shaped like base and not a view (FSDP2 warns about views: an in-place op on one skips its hooks)


__all__ = [
    "SAVE_ACTIVATION",
    "SAVE_INPUTS",
    "SAVE_NONE",
    "bwd_splits",
    "compose",
    "compose_backward_eager",
    "compose_backward_fused",
    "compose_forward_eager",
    "compose_forward_fused",
]
