"""Seeded generators of DoRA layer inputs, one per numerical regime.

A ``LayerCase`` holds rounded inputs (W, A, B, x in the model dtype; g and m in fp32; s fp32-exact). The
same (regime, shape, dtype, seed) always yields the same tensors, on every device: everything is drawn
on the CPU from a ``torch.Generator`` and moved afterwards.

Regimes
  fresh              B = 0, g = 1 exactly, m = ν (a new adapter, step 0)
  trained            B ≠ 0 with ‖s·lora‖ ≈ ``adapter_ratio``·‖base‖; g = 1 + δ, δ ~ N(0, 1.5e-3) in fp32
  large_activations  trained, activations ×62 (Gemma's embedding scale)
  all_positive       trained with |·| of every entry: no cancellation in any dot product, so every
                     accumulation error adds up (zero-mean data hides it)
  heavy_tailed       trained with Student-t (2 degrees of freedom) W and x
  near_cancel        trained, with rows W_i = RN(−s(BA)_i + η·noise), η ∈ {0, 1e-6, 1e-4, 1e-2}: ν_i ≪ ‖W_i‖
  zero_rows          trained, with rows W_i = 0 and B_i = 0: ν_i = 0 exactly, g = m / ε
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from .formats import parse_format, round_to

REGIMES = {
    "fresh": "B = 0, m = ν: g = 1 exactly (a new adapter)",
    "trained": "B ≠ 0, g = 1 + δ with δ ~ N(0, 1.5e-3) in fp32",
    "large_activations": "trained, activations ×62 (Gemma's embedding scale)",
    "all_positive": "trained, every entry of x, W, A, B positive (no cancellation hides accumulation error)",
    "heavy_tailed": "trained, Student-t(2) entries in W and x",
    "near_cancel": "trained, some rows W_i ≈ −s(BA)_i (ν_i ≪ ‖W_i‖; ill-conditioned)",
    "zero_rows": "trained, some rows W_i = 0 and B_i = 0 (ν_i = 0)",
}
G_SPREAD = 1.5e-3
LARGE_ACTIVATION_SCALE = 62.0
NEAR_CANCEL_ETAS = (0.0, 1e-6, 1e-4, 1e-2)


def scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """LoRA scaling s = alpha / r (alpha / sqrt(r) with rsLoRA), rounded to fp32 (the kernels' s)."""
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    return float(np.float32(alpha / (math.sqrt(rank) if rslora else rank)))


G_GRID = (1e-6, 1e-1, 3)  # default --g-grid: |g − 1| from 1e-6 to 1e-1, 3 points a decade


def g_offsets(lo: float = G_GRID[0], hi: float = G_GRID[1], per_decade: int = G_GRID[2], dtype="bf16") -> list:
    """g − 1 values for a sweep across 1: ±log-spaced from ``lo`` to ``hi`` (``per_decade`` a decade), 0, the
    format's resolution threshold ±2^-(p+1) (:func:`dora_verify.formats.g_resolution`: bf16 ±2⁻⁹) and its
    representable offsets +ulp(1), +2·ulp(1), −ulp(1)/2, −ulp(1) (bf16: +2⁻⁷, +2⁻⁶, −2⁻⁸, −2⁻⁷)."""
    from .formats import parse_format

    if not (0 < lo < hi) or per_decade < 1:
        raise ValueError(f"g grid needs 0 < lo < hi and per_decade ≥ 1, got {lo}, {hi}, {per_decade}")
    decades = math.log10(hi / lo)
    n = max(2, int(round(decades * per_decade)) + 1)
    mags = [lo * 10 ** (k * decades / (n - 1)) for k in range(n)]
    p = parse_format(dtype).p
    u1 = 2.0 ** (1 - p)  # ulp(1)
    special = [u1 / 4, -u1 / 4, u1, 2 * u1, -u1 / 2, -u1]
    vals = {0.0, *special, *mags, *(-m for m in mags)}
    return sorted(vals)


@dataclass
class LayerCase:
    """Rounded inputs of one DoRA layer. ``special_rows`` lists the adversarial rows of the regime."""

    regime: str
    seed: int
    dtype: torch.dtype
    s: float
    x: torch.Tensor
    W: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    g: torch.Tensor  # fp32, the scale the compose applies
    special_rows: list = field(default_factory=list)
    _m: "torch.Tensor | None" = None

    @property
    def shape(self):
        return tuple(self.W.shape)

    def magnitude(self) -> torch.Tensor:
        """m = RN_fp32(g · ν_exact) (fp32), from the oracle's ν; computed once."""
        if self._m is None:
            from .oracles import row_norm_truth

            nu = row_norm_truth(self.W, self.A, self.B, self.s).nu
            self._m = (self.g.to(torch.float64) * nu).to(torch.float32)
        return self._m

    def compose_inputs(self, ordered: bool = False):
        """(base, lora) in the model dtype as a GEMM with fp32 accumulation and one rounding gives them:
        base = RN(x Wᵀ), lora = RN(RN(x Aᵀ) Bᵀ). ``ordered``: the sums in float64 in index order
        (:func:`ordered_matmul_t`, one rounding each) — the same bits on every machine, where a BLAS GEMM's
        summation order depends on the CPU (the gate's suite fingerprint must not); small shapes only."""
        if ordered:
            rnd = lambda t: round_to(t, parse_format(self.dtype)).to(self.dtype)  # noqa: E731
            xa = rnd(ordered_matmul_t(self.x, self.A))
            return rnd(ordered_matmul_t(self.x, self.W)), rnd(ordered_matmul_t(xa, self.B))
        f = torch.float32
        base = (self.x.to(f) @ self.W.to(f).t()).to(self.dtype)
        xa = (self.x.to(f) @ self.A.to(f).t()).to(self.dtype)
        lora = (xa.to(f) @ self.B.to(f).t()).to(self.dtype)
        return base, lora


def ordered_matmul_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a bᵀ in float64 with each dot product summed in index order (a cumulative sum: no BLAS, no vector-width
    dependent order), so the result's bits are the same on every CPU. bf16/fp16/fp32 products are exact in
    float64; the sums carry float64 rounding. Memory O(M·N·K): for generators of small cases only."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    if a.shape[-1] == 0:
        return a.new_zeros(a.shape[0], b.shape[0])
    return (a[:, None, :] * b[None, :, :]).cumsum(-1)[..., -1]


def ordered_norm(v: torch.Tensor) -> float:
    """‖v‖₂ of a float64 vector from a correctly rounded sum of squares (math.fsum): the same on every CPU."""
    return math.sqrt(math.fsum(x * x for x in v.tolist()))


PARALLEL_DRAW_MIN = 1 << 22  # elements: smaller tensors (the gate's and certify's cases) come straight from gen
DRAW_CHUNK = 1 << 20


def draw(kind: str, shape, gen: torch.Generator) -> torch.Tensor:
    """float64 ``torch.randn`` (``kind`` 'normal') or ``torch.rand`` ('uniform') of ``shape`` from ``gen``: the same
    numbers on every machine and thread count. A tensor of ``PARALLEL_DRAW_MIN`` elements or more is drawn in fixed
    chunks of ``DRAW_CHUNK`` elements, each from its own generator seeded from ``gen`` (one seed per chunk, drawn
    in order), on a thread pool — one generator's stream is sequential, and the sweep's 8192×2048 cases spent most
    of a GPU run drawing numbers on one core."""
    if kind not in ("normal", "uniform"):
        raise ValueError(f"kind must be 'normal' or 'uniform', got {kind!r}")
    shape = tuple(shape)
    n = math.prod(shape)
    if n < PARALLEL_DRAW_MIN:
        fn = torch.randn if kind == "normal" else torch.rand
        return fn(shape, generator=gen, dtype=torch.float64)
    chunks = -(-n // DRAW_CHUNK)
    seeds = torch.randint(0, 2**62, (chunks,), generator=gen).tolist()
    out = torch.empty(n, dtype=torch.float64)

    def fill(i):
        part = out[i * DRAW_CHUNK : min(n, (i + 1) * DRAW_CHUNK)]
        g = torch.Generator().manual_seed(seeds[i])
        part.normal_(generator=g) if kind == "normal" else part.uniform_(generator=g)

    with ThreadPoolExecutor(max(1, min(chunks, os.cpu_count() or 1))) as pool:
        list(pool.map(fill, range(chunks)))
    return out.view(shape)


def _student_t2(shape, gen):
    z = draw("normal", shape, gen)
    e = -torch.log(draw("uniform", shape, gen).clamp_min(1e-300))
    return z / torch.sqrt(e)


def _rows(d_out: int, count: int = 16):
    step = max(1, d_out // count)
    return list(range(step // 2, d_out, step))[:count]


def make_case(
    regime: str,
    d_out: int,
    d_in: int,
    rank: int,
    tokens: int,
    dtype="bf16",
    seed: int = 0,
    s: float = 2.0,
    adapter_ratio: float = 0.1,
    device="cpu",
) -> LayerCase:
    """Generate the inputs of one regime. Sizes must be positive; ``s`` must be fp32-representable."""
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; choose from {', '.join(REGIMES)}")
    for name, v in (("d_out", d_out), ("d_in", d_in), ("rank", rank), ("tokens", tokens)):
        if int(v) <= 0:
            raise ValueError(f"{name} must be positive, got {v}")
    fmt = parse_format(dtype)
    from .oracles import check_scalar_s

    s = check_scalar_s(s)
    gen = torch.Generator().manual_seed(int(seed) * 1000003 + sorted(REGIMES).index(regime))
    f64 = torch.float64
    x = draw("normal", (tokens, d_in), gen)
    W = draw("normal", (d_out, d_in), gen) / math.sqrt(d_in)
    A = (draw("uniform", (rank, d_in), gen) * 2 - 1) / math.sqrt(d_in)
    sigma_b = adapter_ratio / (abs(s) * math.sqrt(rank / 3.0))
    B = draw("normal", (d_out, rank), gen) * sigma_b
    g = 1 + torch.randn(d_out, generator=gen, dtype=f64) * G_SPREAD
    special: list = []
    if regime == "fresh":
        B.zero_()
        g.fill_(1.0)
    elif regime == "large_activations":
        x *= LARGE_ACTIVATION_SCALE
    elif regime == "all_positive":
        x, W, A, B = x.abs(), W.abs(), A.abs(), B.abs()
    elif regime == "heavy_tailed":
        x = _student_t2((tokens, d_in), gen)
        W = _student_t2((d_out, d_in), gen) / math.sqrt(d_in)
    rnd = lambda t: round_to(t, fmt)  # noqa: E731  exact RNE from float64 (no double rounding)
    A, B = rnd(A), rnd(B)
    if regime == "near_cancel":
        special = _rows(d_out)
        for j, i in enumerate(special):  # sums in a fixed order: the same W bits on every CPU
            eta = NEAR_CANCEL_ETAS[j % len(NEAR_CANCEL_ETAS)]
            target = -s * (B[i][:, None] * A).cumsum(0)[-1]
            noise = torch.randn(d_in, generator=gen, dtype=f64) * ordered_norm(target) / math.sqrt(d_in)
            W[i] = target + eta * noise
    elif regime == "zero_rows":
        special = _rows(d_out)
        W[special] = 0.0
        B[special] = 0.0
    W, x = rnd(W), rnd(x)
    dt = fmt.torch_dtype
    case = LayerCase(regime, int(seed), dt, s, x.to(dt), W.to(dt), A.to(dt), B.to(dt), g.to(torch.float32), special)
    if device != "cpu":
        for name in ("x", "W", "A", "B", "g"):
            setattr(case, name, getattr(case, name).to(device))
    return case
