"""Hypothesis strategies for DoRA inputs: the search space of ``dora-verify certify``.

Each strategy draws an :class:`Example` — exact CPU tensors plus the JSON-ready parameters that produced
them — so a found case can be saved as ``.npz`` + ``.json`` and replayed without hypothesis.

What is drawn (hypothesis shrinks and targets every choice):
* shapes from primes and block sizes ± 1 of the kernels (compose 16×256 forward, 32×128 backward, U-kernel
  64/128 blocks, lora tiles 64×128×64) — masks and tails are where off-by-one errors live;
* a regime for the bulk values (seeded torch generator: a drawn 32-bit seed), with drawn binary exponents
  so the magnitudes move under targeting;
* up to 8 *planted* elements given as raw 16-bit (or 32-bit for fp32) patterns — hypothesis has no bf16, so
  values are drawn as bit patterns and viewed; non-finite patterns are folded to finite ones;
* g (fp32) in the modes that matter: exactly 1 (a fresh adapter), 1 ± k·2⁻²⁴, |g − 1| below bf16
  resolution, DoRA's training spread, far from 1; g − 1 separately (its sub-2⁻²⁴ part is what the Δ output
  keeps); s from common LoRA scalings or any fp32 in [2⁻⁸, 16].
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import torch
from hypothesis import assume
from hypothesis import strategies as st

from .cases import _student_t2, ordered_matmul_t, ordered_norm
from .formats import parse_format, round_to

F32, F64 = torch.float32, torch.float64
PRIME_DIMS = (1, 2, 3, 5, 7, 13, 31, 61, 67, 127, 131, 257)
COMPOSE_T = tuple(sorted({*PRIME_DIMS[:9], 15, 16, 17, 31, 32, 33, 63, 64, 65}))
COMPOSE_N = tuple(sorted({*PRIME_DIMS, 127, 128, 129, 255, 256, 257, 509}))
NORM_D_OUT = (1, 3, 7, 63, 64, 65, 127, 128, 129, 131)
NORM_D_IN = (1, 5, 31, 127, 128, 129, 255, 256, 257, 263, 511, 513)
RANKS = (1, 2, 3, 4, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65)
COMMON_S = (2.0, 1.0, 0.5, 0.25, 0.0625, 16 / math.sqrt(384), 1 / 3, 2 / math.sqrt(8))
COMPOSE_REGIMES = ("fresh", "normal", "positive", "cancel", "heavy", "wide", "tiny")
NORM_REGIMES = ("fresh", "trained", "large_activations", "all_positive", "heavy_tailed", "near_cancel", "zero_rows")
G_MODES = ("one", "ulp", "below_bf16", "spread", "far", "sub_ulp_delta")


@dataclass
class Example:
    """One drawn input: ``kind`` ('compose' | 'norm' | 'lora'), the activation/weight ``dtype`` name,
    exact CPU ``tensors``, scalars (s, eps) and the drawn ``params`` (JSON-ready)."""

    kind: str
    dtype: str
    tensors: dict
    scalars: dict
    params: dict = field(default_factory=dict)


def f32(x: float) -> float:
    """x rounded to fp32 (the kernels hold s and g in fp32)."""
    return struct.unpack("f", struct.pack("f", float(x)))[0]


def _fold_finite(bits: int, width: int) -> int:
    """A 32-bit pattern with an all-ones exponent (Inf/NaN) gets its top exponent bit cleared: finite."""
    return bits & ~0x40000000 if (bits & 0x7F800000) == 0x7F800000 else bits


def value_from_bits(bits: int, dtype: str) -> float:
    """The value of a 16-bit (bf16/fp16) or 32-bit (fp32) pattern, folded to a finite one."""
    fmt = parse_format(dtype)
    if fmt.name == "fp32":
        return struct.unpack("f", struct.pack("I", _fold_finite(bits & 0xFFFFFFFF, 32)))[0]
    b = bits & 0xFFFF
    inf_mask, top = (0x7F80, 0x4000) if fmt.name == "bf16" else (0x7C00, 0x4000)
    if (b & inf_mask) == inf_mask:
        b &= ~top
    return float(torch.tensor([b - 0x10000 if b >= 0x8000 else b], dtype=torch.int16).view(fmt.torch_dtype)[0])


def _bits(dtype: str):
    return st.integers(0, 0xFFFFFFFF if parse_format(dtype).name == "fp32" else 0xFFFF)


def _bulk(regime: str, shape, gen, fmt, exp: int) -> torch.Tensor:
    """float64 values of one regime at scale 2^exp (not yet rounded)."""
    if regime == "positive":
        return torch.randn(shape, generator=gen, dtype=F64).abs() * 2.0**exp
    if regime == "heavy":
        return _student_t2(shape, gen) * 2.0**exp
    if regime == "wide":  # every binade a result can stay finite in, subnormals included
        lo, hi = fmt.emin - fmt.p + 1, fmt.emax - 8
        e = torch.randint(lo, hi, shape, generator=gen).to(F64)
        sign = torch.randint(0, 2, shape, generator=gen).to(F64) * 2 - 1
        return sign * (1 + torch.rand(shape, generator=gen, dtype=F64)) * torch.pow(2.0, e)
    if regime == "tiny":
        return torch.randn(shape, generator=gen, dtype=F64) * fmt.min_normal * 2.0 ** (exp % 6 - 3)
    return torch.randn(shape, generator=gen, dtype=F64) * 2.0**exp


def _rounded(t: torch.Tensor, fmt) -> torch.Tensor:
    """float64 values rounded to ``fmt``, saturated at its largest finite value (heavy tails at a drawn scale
    would otherwise overflow fp16 now and then: the examples are finite by construction)."""
    return round_to(t.clamp(-fmt.max_finite, fmt.max_finite), fmt).to(fmt.torch_dtype)


def _g_values(mode: str, n: int, gen, k: int):
    """(g, g − 1) fp32 [n] for a g mode; g − 1 is exact unless the mode gives it extra precision."""
    if mode == "one":
        g64 = torch.ones(n, dtype=F64)
    elif mode == "ulp":
        g64 = 1 + torch.randint(-k - 1, k + 2, (n,), generator=gen).to(F64) * 2.0**-24
    elif mode == "below_bf16":
        g64 = 1 + (torch.rand(n, generator=gen, dtype=F64) * 2 - 1) * 2.0**-9
    elif mode == "spread":
        g64 = 1 + torch.randn(n, generator=gen, dtype=F64) * 1.5e-3
    elif mode == "far":
        g64 = torch.pow(2.0, torch.rand(n, generator=gen, dtype=F64) * 6 - 3)
    else:  # sub_ulp_delta: g rounds to 1 in fp32, g − 1 keeps δ (what dora_scale gives for m ≈ ν)
        d = torch.randn(n, generator=gen, dtype=F64) * 2.0 ** (-26 - (k % 20))
        return torch.ones(n, dtype=F32), d.to(F32)
    g = g64.to(F32)
    return g, (g.to(F64) - 1).to(F32)  # exact in fp32 for g in [1/2, 2] (Sterbenz); else one rounding


SCALINGS = st.one_of(st.sampled_from(COMMON_S), st.floats(2.0**-8, 16.0, width=32)).map(f32)


def _plant(t: torch.Tensor, planted, dtype: str, which: int):
    for entry in planted:
        i, j = entry[0] % t.shape[0], entry[1] % t.shape[1]
        t[i, j] = value_from_bits(entry[2 + which], dtype)


def compose_example(
    dtype: str,
    s: float,
    T: int,
    N: int,
    regime: str,
    seed: int,
    exp_base: int,
    exp_lora: int,
    g_mode: str,
    k: int,
    planted=(),
    bias: bool = False,
) -> Example:
    """The compose example of these parameters (deterministic: what :func:`compose_examples` draws, and what
    ``dora-verify gate`` enumerates): [T, N] base, lora, dy (activation dtype), g and g − 1 (fp32), optional bias."""
    fmt = parse_format(dtype)
    s = f32(s)
    g_mode = "one" if regime == "fresh" else g_mode
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda t: _rounded(t, fmt)  # noqa: E731
    base = _bulk(regime if regime != "cancel" else "normal", (T, N), gen, fmt, exp_base)
    if regime == "fresh":
        lora = torch.zeros(T, N, dtype=F64)
    elif regime == "cancel":  # base ≈ −s·lora: base + s·lora cancels to a few bits
        lora = -round_to(base, fmt) / s * (1 + torch.randn(T, N, generator=gen, dtype=F64) * 2.0 ** -(k % 16 + 4))
    else:
        lora = _bulk(regime, (T, N), gen, fmt, exp_lora)
    base, lora = rnd(base), rnd(lora)
    _plant(base, planted, dtype, 0)
    _plant(lora, planted, dtype, 1)
    g, gm1 = _g_values(g_mode, N, gen, k)
    tensors = {
        "base": base,
        "lora": lora,
        "g": g,
        "g_minus_1": gm1,
        "dy": rnd(torch.randn(T, N, generator=gen, dtype=F64) * 2.0 ** (-exp_base % 8)),
    }
    if bias:
        tensors["bias"] = rnd(torch.randn(N, generator=gen, dtype=F64) * 2.0**exp_base)
    params = {
        "T": T,
        "N": N,
        "regime": regime,
        "seed": seed,
        "exp_base": exp_base,
        "exp_lora": exp_lora,
        "g_mode": g_mode,
        "k": k,
        "planted": [list(p) for p in planted],
        "bias": bias,
    }
    return Example("compose", fmt.name, tensors, {"s": s}, params)


@st.composite
def compose_examples(draw, dtype: str = "bf16"):
    """Hypothesis strategy of :func:`compose_example`."""
    T = draw(st.sampled_from(COMPOSE_T))
    N = draw(st.sampled_from(COMPOSE_N))
    regime = draw(st.sampled_from(COMPOSE_REGIMES))
    seed = draw(st.integers(0, 2**32 - 1))
    eb = draw(st.integers(-12, 12))
    el = draw(st.integers(-12, 12))
    s = draw(SCALINGS)
    g_mode = "one" if regime == "fresh" else draw(st.sampled_from(G_MODES))
    k = draw(st.integers(0, 64))
    planted = draw(
        st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 1 << 16), _bits(dtype), _bits(dtype)), max_size=8)
    )
    has_bias = draw(st.booleans())
    return compose_example(dtype, s, T, N, regime, seed, eb, el, g_mode, k, planted, has_bias)


@st.composite
def lora_examples(draw, dtype: str = "bf16"):
    """base [T, N], xa [T, r], B [N, r] (adapter dtype = activation dtype), g fp32, optional bias."""
    fmt = parse_format(dtype)
    T = draw(st.sampled_from(COMPOSE_T))
    N = draw(st.sampled_from(COMPOSE_N))
    r = draw(st.sampled_from(RANKS))
    regime = draw(st.sampled_from(("normal", "positive", "heavy", "cancel")))
    seed = draw(st.integers(0, 2**32 - 1))
    eb = draw(st.integers(-8, 8))
    s = draw(SCALINGS)
    g_mode = draw(st.sampled_from(G_MODES[:5]))
    k = draw(st.integers(0, 64))
    has_bias = draw(st.booleans())
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda t: _rounded(t, fmt)  # noqa: E731
    bulk = "normal" if regime == "cancel" else regime
    xa = rnd(_bulk(bulk, (T, r), gen, fmt, 0))
    B = rnd(_bulk(bulk, (N, r), gen, fmt, -3) / math.sqrt(r))
    if regime == "cancel":  # base ≈ −s·lora
        lora = ordered_matmul_t(xa, B)
        base = rnd(-s * lora * (1 + torch.randn(T, N, generator=gen, dtype=F64) * 2.0 ** -(k % 16 + 4)))
    else:
        base = rnd(_bulk(regime, (T, N), gen, fmt, eb))
    g, _ = _g_values(g_mode, N, gen, k)
    tensors = {"base": base, "xa": xa, "B": B, "g": g}
    if has_bias:
        tensors["bias"] = rnd(torch.randn(N, generator=gen, dtype=F64))
    params = {
        "T": T,
        "N": N,
        "r": r,
        "regime": regime,
        "seed": seed,
        "exp_base": eb,
        "g_mode": g_mode,
        "k": k,
        "bias": has_bias,
    }
    return Example("lora", fmt.name, tensors, {"s": s}, params)


def norm_example(
    dtype: str,
    s: float,
    d_out: int,
    d_in: int,
    r: int,
    T: int,
    regime: str,
    seed: int,
    cancel_rows=(),
    m_mode: str = "spread",
    k: int = 0,
) -> "Example | None":
    """The norm example of these parameters (deterministic; None when its fp16 GEMMs overflow): W [d_out, d_in],
    A [r, d_in], B [d_out, r] from a case-generator regime, extra near-cancelling rows, and base, lora, dy
    [T, d_out] for the d_m check."""
    from .cases import make_case

    fmt = parse_format(dtype)
    s = f32(s)
    c = make_case(regime, d_out, d_in, r, T, dtype=fmt.name, seed=seed, s=s)
    W = c.W.clone()
    gen = torch.Generator().manual_seed(seed + 17)
    for row, e in cancel_rows:  # W_i = RN(−s(BA)_i + 2^e·noise·‖s(BA)_i‖/√d_in)
        i = row % d_out
        target = -s * ordered_matmul_t(c.B[i : i + 1], c.A.t())[0]
        noise = torch.randn(d_in, generator=gen, dtype=F64) * ordered_norm(target) / math.sqrt(d_in)
        W[i] = round_to(target + 2.0**e * noise, fmt).to(fmt.torch_dtype)
    c.W = W
    base, lora = c.compose_inputs(ordered=True)  # the same bits on every CPU: the gate fingerprints them
    if not bool(torch.isfinite(base).all() and torch.isfinite(lora).all()):  # fp16 GEMMs can overflow
        return None
    dy = round_to(torch.randn(T, d_out, generator=gen, dtype=F64), fmt).to(fmt.torch_dtype)
    tensors = {"W": W, "A": c.A, "B": c.B, "g_case": c.g, "base": base, "lora": lora, "dy": dy}
    params = {
        "d_out": d_out,
        "d_in": d_in,
        "r": r,
        "T": T,
        "regime": regime,
        "seed": seed,
        "cancel_rows": [list(x) for x in cancel_rows],
        "m_mode": m_mode,
        "k": k,
    }
    return Example("norm", fmt.name, tensors, {"s": s, "eps": 1e-12}, params)


@st.composite
def norm_examples(draw, dtype: str = "bf16"):
    """Hypothesis strategy of :func:`norm_example`."""
    d_out = draw(st.sampled_from(NORM_D_OUT))
    d_in = draw(st.sampled_from(NORM_D_IN))
    r = draw(st.sampled_from(RANKS))
    T = draw(st.sampled_from((1, 3, 16, 33)))
    regime = draw(st.sampled_from(NORM_REGIMES))
    seed = draw(st.integers(0, 2**31 - 1))
    s = f32(draw(st.one_of(st.sampled_from(COMMON_S), st.floats(2.0**-6, 8.0, width=32))))
    cancel = draw(st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(-30, 0)), max_size=4))
    m_mode = draw(st.sampled_from(("fresh", "spread", "ulp")))
    k = draw(st.integers(-64, 64))
    ex = norm_example(dtype, s, d_out, d_in, r, T, regime, seed, cancel, m_mode, k)
    assume(ex is not None)
    return ex


LAYER_T = (1, 3, 7, 16, 33)
LAYER_D_OUT = (1, 3, 17, 64, 65)
LAYER_D_IN = (1, 5, 31, 64, 129)
LAYER_RANKS = (1, 2, 4, 7, 16)
LAYER_ADAPTERS = {"bf16": ("bf16", "fp32"), "fp16": ("fp16",), "fp32": ("fp32",)}  # the gate's dtype mixes


@st.composite
def layer_examples(draw, dtype: str = "bf16"):
    """Hypothesis strategy of :func:`dora_verify.layer_oracle.layer_example`: W, x, bias, dy in ``dtype``, adapters
    in one of the gate's mixes for it (bf16 W with bf16 or fp32 adapters), a regime of ``LAYER_REGIMES``, s = alpha/r
    an fp32 value (alpha = s·r, so alpha / r is exact)."""
    from .layer_oracle import LAYER_REGIMES, layer_example

    adapter = draw(st.sampled_from(LAYER_ADAPTERS[parse_format(dtype).name]))
    T = draw(st.sampled_from(LAYER_T))
    d_out = draw(st.sampled_from(LAYER_D_OUT))
    d_in = draw(st.sampled_from(LAYER_D_IN))
    r = draw(st.sampled_from(LAYER_RANKS))
    s = draw(SCALINGS)
    regime = draw(st.sampled_from(tuple(LAYER_REGIMES)))
    seed = draw(st.integers(0, 2**31 - 1))
    bias = draw(st.booleans())
    return layer_example(dtype, adapter, T, d_out, d_in, r, s * r, regime, seed, bias=bias)


__all__ = [
    "Example",
    "compose_example",
    "compose_examples",
    "f32",
    "layer_examples",
    "lora_examples",
    "norm_example",
    "norm_examples",
    "value_from_bits",
]
