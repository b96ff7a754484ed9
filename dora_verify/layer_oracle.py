"""The whole DoRA layer, end to end: its exact result, the bound of an implementation made of stated steps, and
where an implementation's error comes from.

**What is exact.** For the rounded inputs x [T, d_in], W [d_out, d_in], bias [d_out] (or none), A [r, d_in],
B [d_out, r], m [d_out], the fp32-representable s and ε (taken as the fp32 value the kernels clamp with), the
oracle is the exact real-number DoRA layer

    ν = ‖W + s·BA‖_row,   g = m / max(ν, ε),   h = x Wᵀ + s·(x Aᵀ) Bᵀ,   y = g ⊙ h + bias

— no intermediate rounding anywhere: the down-projection x Aᵀ is the exact [T, r] product, not a value rounded
to the adapter dtype (an implementation's rounding of xa is one of its *steps*, and its cost is charged to it
by :func:`layer_step_bounds` and measured by :func:`error_decomposition`). The backward is that of the same
function with ν detached (DoRA §4.3: no gradient flows through ν), for a given dy [T, d_out]:

    dh = g ⊙ dy,   dx = dh W + s·(dh B) A,   dA = s·(dh B)ᵀ x,   dB = s·dhᵀ (x Aᵀ),   dm = Σ_T dy ⊙ h / max(ν, ε)

(W and bias are frozen: no dW, no dbias; where ν < ε, ∂g/∂m = 1/ε.)

**Tier 1** (:func:`layer_truth`; vectorised float64, CPU or GPU): every sum is a compensated one from error-free
transformations (:mod:`dora_verify.eft`): bf16/fp16/fp32 products are exact in float64, x Wᵀ and x Aᵀ are
pairwise TwoSum trees (double-double results), xa·Bᵀ splits its products with TwoProduct, h and y are
double-doubles. ν comes from :func:`dora_verify.oracles.row_norm_truth` (its own tier 2 for ill-conditioned
rows) and, where m lies inside ν's enclosure, an exact check of ν² = m² (g = 1 exactly, a fresh adapter).
Every value carries a rigorous bound on |exact − tier-1 value|; y's correct rounding and enclosing grid points
come from :func:`dora_verify.oracles.certified_round`. The gradients are float64 GEMMs of the same exact
inputs with running bounds (γ64 of the magnitudes): the gate grades them by (|error| − oracle bound)⁺, which
needs no rounding decision.

**Tier 2** (:class:`ExactLayer`; Python integers): h is an exact rational, ν² is exact
(:class:`dora_verify.exact.ExactRowNorm`), and y = m·h/√ν² + bias is irrational unless ν² is a square, so the
rounding of y is decided by enclosing √ν² between integer square roots, refined until both ends round alike —
which terminates for every irrational y, and is exact arithmetic for a rational one. :func:`layer_truth` sends
it every element tier 1 cannot decide (up to ``tier2_limit``). The gradients' tier 2 (intervals of rationals
around each 1/ν_j, any width) serves tests and :func:`crosscheck_mpmath`, which recomputes sampled elements in
mpmath at high precision as a third, independent evaluation.

**Bounds.** :func:`layer_step_bounds` bounds an implementation described by :class:`LayerSteps` (its GEMMs with
their accumulation and output rounding, the norm's bound, the scale, the compose) for y and — for this
project's DoRALinear — every gradient; ``only=STEP`` gives one step's share. :func:`faithful_layer_bounds` is the
contract a user's layer is held to (docs/gate.md, proofs/bounds.md "The whole layer"). :func:`error_decomposition`
measures how much of y's error each step of an implementation added. Derivations: proofs/bounds.md.

Assumptions: finite inputs; no float64 overflow or underflow in the products (inputs of bf16/fp16/fp32 tensors of
moderate range); s and ε fp32-representable (ε is rounded to fp32, as the kernels' clamp does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Optional

import numpy as np
import torch

from .bounds import FAITHFUL_NORM_REL, factored_norm_bound, kernel_norm_bound
from .bounds import gamma as _gam
from .eft import two_prod, two_sum
from .exact import ExactRowNorm, _dyadic_ints, round_fraction
from .formats import FloatFormat, parse_format, round_to, ulp
from .oracles import NormTruth, Rounded, certified_round, check_scalar_s, row_norm_truth

F64 = torch.float64
U64 = 2.0**-53
U32 = 2.0**-24
ETA32 = 2.0**-150
SAFETY = 1 + 2.0**-40
DEFAULT_EPS = 1e-12
MAX_TIER2_ELEMENTS = 4000
CHUNK_ELEMS = 1 << 20
GRADS = ("dx", "dA", "dB", "dm")
STEPS = ("base", "xa", "lora", "norm", "scale", "compose", "backward")


def _f64(t) -> torch.Tensor:
    return t.detach().to(F64)


def eps32(eps: float) -> float:
    """ε as the fp32 value the kernels clamp ν with (``torch.clamp(ν_fp32, min=eps)``)."""
    return float(np.float32(eps))


# ----------------------------------------------------------------------------- tier 1: compensated sums
def _sum_dd(terms: torch.Tensor):
    """Σ over dim 0 of float64 ``terms`` as a normalised double-double: (hi, lo, bound), |Σ − (hi + lo)| ≤ bound.

    A pairwise TwoSum tree of depth L keeps every rounding error e exactly; the errors are summed in float64 in
    whatever order torch uses (at most n additions: ≤ γ_n·Σ|e|), and Σ|e| ≤ u·L·(1 + u)^L·Σ|terms| (each level's
    partial sums are bounded by Σ|terms|·(1 + u)^level). The bound uses the Σ|e| actually met (float64, inflated
    by γ_n for its own evaluation), so a sum whose TwoSums were all exact has bound 0. A final TwoSum normalises."""
    n = terms.shape[0]
    if n == 0:
        z = torch.zeros(terms.shape[1:], dtype=F64, device=terms.device)
        return z, z.clone(), z.clone()
    x = terms
    err = torch.zeros_like(x[0])
    err_abs = torch.zeros_like(x[0])
    while x.shape[0] > 1:
        if x.shape[0] % 2:
            x = torch.cat([x, torch.zeros_like(x[:1])])
        s, e = two_sum(x[0::2], x[1::2])
        err = err + e.sum(0)
        err_abs = err_abs + e.abs().sum(0)
        x = s
    hi, lo = two_sum(x[0], err)
    bound = _gam(n + 1, U64) * err_abs * (1 + _gam(n + 1, U64)) * 2
    return hi, lo, bound


def _dd_matmul_t(a: torch.Tensor, b: torch.Tensor, chunk_elems: int = CHUNK_ELEMS):
    """a bᵀ for float64 a [M, K], b [N, K] whose elementwise products are exact in float64 (bf16/fp16/fp32
    values: ≤ 48 significant bits): (hi, lo, bound), compensated, chunked over N."""
    M, K = a.shape
    N = b.shape[0]
    out = [torch.empty(M, N, dtype=F64, device=a.device) for _ in range(3)]
    step = max(1, chunk_elems // max(1, M * K))
    at = a.t()[:, :, None]
    for j0 in range(0, N, step):
        terms = at * b[j0 : j0 + step].t()[:, None, :]  # [K, M, n]: exact products
        for o, v in zip(out, _sum_dd(terms)):
            o[:, j0 : j0 + step] = v
        del terms
    return tuple(out)


def _dd_times_matrix_t(
    hi: torch.Tensor, lo: torch.Tensor, bnd: torch.Tensor, b: torch.Tensor, chunk_elems: int = CHUNK_ELEMS
):
    """(hi + lo ± bnd) bᵀ for a double-double [M, r] and float64 b [N, r] (≤ 24 significant bits): (hi, lo, bound).
    hi·b is split exactly (TwoProduct), lo·b rounded once (u of it), the uncertainty bnd propagates through |b|."""
    M, r = hi.shape
    N = b.shape[0]
    out = [torch.empty(M, N, dtype=F64, device=hi.device) for _ in range(3)]
    step = max(1, chunk_elems // max(1, 3 * M * max(r, 1)))
    for j0 in range(0, N, step):
        bc = b[j0 : j0 + step]
        p, e = two_prod(hi.t()[:, :, None], bc.t()[:, None, :])  # [r, M, n]
        q = lo.t()[:, :, None] * bc.t()[:, None, :]
        h_, l_, b_ = _sum_dd(torch.cat([p, e, q], 0))
        out[0][:, j0 : j0 + step], out[1][:, j0 : j0 + step] = h_, l_
        out[2][:, j0 : j0 + step] = b_ + U64 * q.abs().sum(0) + bnd @ bc.abs().t()
    return tuple(out)


def _mm(a, ea, b, eb):
    """c = a @ b in float64 for approximations a, b of exact values (|a − a*| ≤ ea, |b − b*| ≤ eb, elementwise;
    None: exact): (c, bound) with |c − a* b*| ≤ bound (propagation plus γ64_{n+1} of Σ|a||b|)."""
    n = a.shape[-1]
    c = a @ b
    mag = a.abs() @ b.abs()
    bound = _gam(n + 1, U64) * mag
    if ea is not None:
        bound = bound + ea @ (b.abs() + (eb if eb is not None else 0))
    if eb is not None:
        bound = bound + a.abs() @ eb
    return c, bound * (1 + 2 * _gam(n + 2, U64))


# ----------------------------------------------------------------------------- the truth
@dataclass
class LayerTruth:
    """The exact layer of the rounded inputs (tier 1 + tier 2). Tensors are float64 on the inputs' device.

    y = y_hi + y_lo ± y_bound, rounded into ``fmt`` (certified: ``y_round``); the parts b = x Wᵀ, xa = x Aᵀ,
    l = xa Bᵀ, h = b + s·l as double-doubles with bounds; ν (``norm``), ν_c = max(ν, ε), g = m/ν_c with
    ``g_bound`` and ``inv_err`` ≥ |1/ν_c − 1/ν̂_c|. ``grads`` (when dy was given): name → (value, bound) for
    dx [T, d_in], dA [r, d_in], dB [d_out, r], dm [d_out]. ``tier2_elements``: y elements settled exactly;
    ``uncertified``: elements left undecided (beyond ``tier2_limit``); ``exact_g_rows``: rows where g was
    proved exact (ν² = m²·…)."""

    y_hi: torch.Tensor
    y_lo: torch.Tensor
    y_bound: torch.Tensor
    fmt: FloatFormat
    y_round: Rounded
    b: tuple
    xa: tuple
    l: tuple
    h: tuple
    norm: NormTruth
    nu_c: torch.Tensor
    g: torch.Tensor
    g_bound: torch.Tensor
    inv_err: torch.Tensor
    s: float
    eps: float
    grads: dict = field(default_factory=dict)
    tier2_elements: int = 0
    uncertified: int = 0
    exact_g_rows: list = field(default_factory=list)

    @property
    def y(self) -> torch.Tensor:
        return self.y_hi + self.y_lo

    def value(self, name: str) -> torch.Tensor:
        """float64 value of 'y', 'b', 'xa', 'l', 'h' or a gradient."""
        if name == "y":
            return self.y
        if name in ("b", "xa", "l", "h"):
            t = getattr(self, name)
            return t[0] + t[1]
        return self.grads[name][0]


def _validate(x, W, A, B, m, s, bias, dy):
    for name, t in (("x", x), ("W", W), ("A", A), ("B", B)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor")
    T, K = x.shape
    N = W.shape[0]
    r = A.shape[0]
    if W.shape[1] != K or A.shape[1] != K or tuple(B.shape) != (N, r) or tuple(m.shape) != (N,):
        raise ValueError(
            f"shape mismatch: x {tuple(x.shape)}, W {tuple(W.shape)}, A {tuple(A.shape)}, "
            f"B {tuple(B.shape)}, m {tuple(m.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must be [d_out]={N}, got {tuple(bias.shape)}")
    if dy is not None and tuple(dy.shape) != (T, N):
        raise ValueError(f"dy must be [T, d_out]={(T, N)}, got {tuple(dy.shape)}")
    for name, t in (("x", x), ("W", W), ("A", A), ("B", B), ("m", m), ("bias", bias), ("dy", dy)):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN/Inf: the layer oracle is defined on finite inputs")
    return check_scalar_s(s)


def _exact_g_rows(nu: NormTruth, W, A, B, m64, s, eps):
    """Rows whose exact g = m/ν_c is 1 (m inside ν's enclosure and ν² = m² exactly): ν made exact there."""
    cand = torch.nonzero((nu.bound > 0) & ((m64 - nu.nu).abs() <= nu.bound) & (m64 > eps)).flatten().cpu().tolist()
    if not cand:
        return []
    ex = ExactRowNorm(_f64(A).cpu().numpy(), s)
    Wn, Bn = _f64(W).cpu().numpy(), _f64(B).cpu().numpy()
    mc = m64.cpu()
    rows = []
    for i in cand:
        _, nu_sq = ex.row(Wn[i], Bn[i])
        if nu_sq == Fraction(float(mc[i])) ** 2:
            nu.nu[i] = float(mc[i])
            nu.bound[i] = 0.0
            rows.append(i)
    return rows


def layer_truth(
    x,
    W,
    A,
    B,
    m,
    s: float,
    bias=None,
    eps: float = DEFAULT_EPS,
    dy=None,
    out_fmt=None,
    tier2_limit: int = MAX_TIER2_ELEMENTS,
    chunk_elems: int = CHUNK_ELEMS,
) -> LayerTruth:
    """Tier-1 truth of the layer (module docstring) with tier 2 for every y element tier 1 cannot round; with
    ``dy`` also the gradients dx, dA, dB, dm (ν detached). ``out_fmt``: the format y is rounded into (default x's
    dtype). Values are taken exactly as stored, in whatever dtypes (bf16/fp16/fp32) they come."""
    s = _validate(x, W, A, B, m, s, bias, dy)
    e32 = eps32(eps)
    fmt = parse_format(out_fmt if out_fmt is not None else x.dtype)
    x64, W64, A64, B64, m64 = (_f64(t) for t in (x, W, A, B, m))
    # ν, ν_c, 1/ν_c and g
    norm = row_norm_truth(W, A, B, s)
    exact_rows = _exact_g_rows(norm, W, A, B, m64, s, e32)
    nh, nb = norm.nu, norm.bound
    nuc = nh.clamp_min(e32)
    lo_c, hi_c = (nh - nb).clamp_min(e32), (nh + nb).clamp_min(e32)
    inv_err = torch.maximum((nuc - lo_c) / (lo_c * nuc), (hi_c - nuc) / (hi_c * nuc)) * (1 + 8 * U64)
    g = m64 / nuc
    p_, e_ = two_prod(g, nuc)
    div_exact = (p_ == m64) & (e_ == 0)
    g_bound = m64.abs() * inv_err + torch.where(div_exact, torch.zeros_like(g), U64 * g.abs())
    # h = x Wᵀ + s·(x Aᵀ) Bᵀ
    b = _dd_matmul_t(x64, W64, chunk_elems)
    xa = _dd_matmul_t(x64, A64, chunk_elems)
    l = _dd_times_matrix_t(*xa, B64, chunk_elems)
    p2, e2 = two_prod(torch.full_like(l[0], s), l[0])
    r2 = s * l[1]
    h1, c1 = two_sum(b[0], p2)
    tail = ((c1 + b[1]) + e2) + r2
    h_hi, h_lo = two_sum(h1, tail)
    h_b = (b[2] + abs(s) * l[2] + U64 * r2.abs() + _gam(4, U64) * (c1.abs() + b[1].abs() + e2.abs() + r2.abs())) * (
        1 + 1e-12
    )
    h = (h_hi, h_lo, h_b)
    # y = g h + bias
    gr = g[None, :]
    p, ep = two_prod(gr.expand_as(h_hi), h_hi)
    q = gr * h_lo
    if bias is None:
        t = ep + q
        y_hi, y_lo = two_sum(p, t)
        y_b = U64 * (q.abs() + t.abs())
    else:
        s1, e1 = two_sum(p, _f64(bias)[None, :].expand_as(p))
        t = (ep + q) + e1
        y_hi, y_lo = two_sum(s1, t)
        y_b = U64 * q.abs() + _gam(2, U64) * (ep.abs() + q.abs() + e1.abs())
    h_abs = h_hi.abs() + h_lo.abs() + h_b
    y_b = (y_b + gr.abs() * h_b + g_bound[None, :] * h_abs) * (1 + 1e-12)
    truth = LayerTruth(
        y_hi,
        y_lo,
        y_b,
        fmt,
        certified_round(y_hi, y_lo, y_b, fmt),
        b,
        xa,
        l,
        h,
        norm,
        nuc,
        g,
        g_bound,
        inv_err,
        s,
        e32,
        exact_g_rows=exact_rows,
    )
    _escalate_y(truth, x, W, A, B, m, s, bias, e32, tier2_limit)
    if dy is not None:
        truth.grads = _grad_truth(truth, x64, W64, A64, B64, _f64(dy), s)
    return truth


def _escalate_y(truth: LayerTruth, x, W, A, B, m, s, bias, eps, limit: int) -> None:
    idx = torch.nonzero(~truth.y_round.certain, as_tuple=False).cpu()
    n = int(idx.shape[0])
    truth.uncertified = max(0, n - limit)
    if n == 0:
        return
    idx = idx[:limit]
    ex = ExactLayer(x, W, A, B, m, s, bias, eps)
    vals = [ex.y_round(t, j, truth.fmt) for t, j in idx.tolist()]
    dev = truth.y_hi.device
    ti, ci = idx[:, 0].to(dev), idx[:, 1].to(dev)

    def put(tensor, k):
        tensor[ti, ci] = torch.tensor([v[k] for v in vals], dtype=F64, device=dev)

    put(truth.y_round.down, 0)
    put(truth.y_round.up, 1)
    put(truth.y_round.nearest, 2)
    put(truth.y_hi, 3)
    truth.y_lo[ti, ci] = 0.0
    truth.y_bound[ti, ci] = truth.y_hi[ti, ci].abs() * U64 * 2
    truth.y_round.certain[ti, ci] = True
    truth.tier2_elements = int(idx.shape[0])


def _grad_truth(tr: LayerTruth, x64, W64, A64, B64, dy, s: float) -> dict:
    """Tier-1 gradients (ν detached): float64 GEMMs of the exact inputs with running bounds."""
    g, gb = tr.g[None, :], tr.g_bound[None, :]
    dh = g * dy  # dy has ≤ 24 significant bits: one float64 rounding
    e_dh = dy.abs() * gb + U64 * dh.abs()
    dhB, e_dhB = _mm(dh, e_dh, B64, None)  # [T, r]
    dxW, e1 = _mm(dh, e_dh, W64, None)
    dxA, e2 = _mm(dhB, e_dhB, A64, None)
    dx = dxW + s * dxA
    e_dx = e1 + abs(s) * e2 + U64 * (dx.abs() + abs(s) * dxA.abs())
    dA0, e3 = _mm(dhB.t(), e_dhB.t(), x64, None)
    dA = s * dA0
    xa = tr.xa[0] + tr.xa[1]
    e_xa = tr.xa[2] + U64 * xa.abs()
    dB0, e4 = _mm(dh.t(), e_dh.t(), xa, e_xa)
    dB = s * dB0
    h_hi, h_lo, h_b = tr.h
    pp, pe = two_prod(dy, h_hi)
    qq = dy * h_lo
    S_hi, S_lo, S_b = _sum_dd(torch.cat([pp, pe, qq], 0))
    S = S_hi + S_lo
    S_b = S_b + U64 * (qq.abs().sum(0) + S.abs()) + (dy.abs() * h_b).sum(0) * (1 + _gam(dy.shape[0] + 1, U64))
    dm = S / tr.nu_c
    e_dm = S_b / tr.nu_c + (S.abs() + S_b) * tr.inv_err + U64 * dm.abs()
    k = 1 + 1e-12
    return {
        "dx": (dx, e_dx * k),
        "dA": (dA, (abs(s) * e3 + U64 * dA.abs()) * k),
        "dB": (dB, (abs(s) * e4 + U64 * dB.abs()) * k),
        "dm": (dm, e_dm * k),
    }


# ----------------------------------------------------------------------------- tier 2: exact rationals
def _pow2(k: int) -> Fraction:
    return Fraction(1 << k) if k >= 0 else Fraction(1, 1 << -k)


def _is_square(n: int) -> bool:
    return n >= 0 and math.isqrt(n) ** 2 == n


def sqrt_enclosure(q: Fraction, bits: int):
    """(lo, hi) Fractions with lo ≤ √q ≤ hi and hi − lo ≤ 2^-bits·√q (lo = hi when q is a square of a rational)."""
    if q < 0:
        raise ValueError("negative square")
    a, b = q.numerator, q.denominator
    if _is_square(a) and _is_square(b):
        v = Fraction(math.isqrt(a), math.isqrt(b))
        return v, v
    n = a * b  # √(a/b) = √(ab)/b
    k = max(0, bits - n.bit_length() // 2 + 2)
    root = math.isqrt(n << (2 * k))  # ⌊√n·2^k⌋ ≤ √n·2^k < root + 1
    return Fraction(root, b << k), Fraction(root + 1, b << k)


def _scale(c: Fraction, iv):
    lo, hi = c * iv[0], c * iv[1]
    return (lo, hi) if lo <= hi else (hi, lo)


class ExactLayer:
    """Tier 2 for selected elements: every sum and product exact (Python integers of the dyadic inputs), ν² exact,
    each √ enclosed by integer square roots. ``y_round`` decides y's rounding exactly; ``y_interval`` and
    ``grad_interval`` give Fraction enclosures [lo, hi] of width ≤ 2^-bits relative to the terms' magnitude."""

    def __init__(self, x, W, A, B, m, s: float, bias=None, eps: float = DEFAULT_EPS, dy=None):
        s = check_scalar_s(s)
        self.s = Fraction(s)
        arr = lambda t: _f64(t).cpu().numpy()  # noqa: E731
        self.xn, self.Wn, self.An, self.Bn = arr(x), arr(W), arr(A), arr(B)
        self.xi, self.ex = _dyadic_ints(self.xn)
        self.Wi, self.ew = _dyadic_ints(self.Wn)
        self.Ai, self.ea = _dyadic_ints(self.An)
        self.Bi, self.eb = _dyadic_ints(self.Bn)
        self.m = [Fraction(v) for v in arr(m).tolist()]
        self.bias = [Fraction(v) for v in arr(bias).tolist()] if bias is not None else None
        self.eps = Fraction(eps32(eps))
        self.dy = [[Fraction(v) for v in row] for row in arr(dy).tolist()] if dy is not None else None
        self._norm = ExactRowNorm(self.An, s)
        self._xa, self._nu_sq, self._h, self._v = {}, {}, {}, {}
        self.T, self.K = self.xn.shape
        self.N, self.r = self.Bn.shape

    # exact parts
    def _xa_int(self, t: int) -> list:
        """x_t Aᵀ as integers [r] (scale 2^(ex + ea))."""
        if t not in self._xa:
            self._xa[t] = [int(v) for v in np.dot(self.Ai, self.xi[t])] if self.r else []
        return self._xa[t]

    def xa(self, t: int) -> list:
        """x_t Aᵀ as Fractions [r]."""
        sc = _pow2(self.ex + self.ea)
        return [Fraction(v) * sc for v in self._xa_int(t)]

    def nu_sq(self, j: int) -> Fraction:
        if j not in self._nu_sq:
            self._nu_sq[j] = self._norm.row(self.Wn[j], self.Bn[j])[1]
        return self._nu_sq[j]

    def h(self, t: int, j: int) -> Fraction:
        key = (t, j)
        if key not in self._h:
            bi = int(np.dot(self.xi[t], self.Wi[j]))
            li = sum((a * int(b) for a, b in zip(self._xa_int(t), self.Bi[j])), 0)
            self._h[key] = Fraction(bi) * _pow2(self.ex + self.ew) + self.s * Fraction(li) * _pow2(
                self.ex + self.ea + self.eb
            )
        return self._h[key]

    def V(self, j: int, k: int) -> Fraction:
        """(W + s·BA)_jk exactly."""
        key = (j, k)
        if key not in self._v:
            p = sum((int(b) * int(a) for b, a in zip(self.Bi[j], self.Ai[:, k])), 0)
            self._v[key] = Fraction(self.Wn[j, k]) + self.s * Fraction(p) * _pow2(self.ea + self.eb)
        return self._v[key]

    def inv_nuc(self, j: int, bits: int):
        """Enclosure of 1/max(ν_j, ε): exact where ν_j < ε or ν_j² is a rational square."""
        q = self.nu_sq(j)
        if q < self.eps * self.eps:
            v = 1 / self.eps
            return v, v
        lo, hi = sqrt_enclosure(q, bits)
        return 1 / hi, 1 / lo

    # y
    def y_interval(self, t: int, j: int, bits: int = 200):
        P = self.m[j] * self.h(t, j)
        lo, hi = _scale(P, self.inv_nuc(j, bits))
        beta = self.bias[j] if self.bias is not None else Fraction(0)
        return lo + beta, hi + beta

    def y_round(self, t: int, j: int, fmt) -> tuple:
        """(down, up, nearest, value): y's enclosing grid points of ``fmt``, its RNE rounding, and float64(y)."""
        fmt = parse_format(fmt)
        bits = 2 * (fmt.p + 40)
        while True:
            lo, hi = self.y_interval(t, j, bits)
            r_lo, r_hi = round_fraction(lo, fmt), round_fraction(hi, fmt)
            if lo == hi or r_lo == r_hi:
                return (*r_lo, float((lo + hi) / 2))
            if bits > 1 << 16:  # y irrational always converges; a rational y has lo == hi
                raise RuntimeError(f"tier 2 did not converge for y[{t}, {j}]")
            bits *= 2

    # gradients (ν detached)
    def grad_interval(self, name: str, idx, bits: int = 200):
        """Enclosure (lo, hi) of one gradient element: name 'dx' (t, k), 'dA' (ρ, k), 'dB' (j, ρ), 'dm' (j,)."""
        if self.dy is None:
            raise ValueError("ExactLayer was built without dy")
        dy, s = self.dy, self.s
        if name == "dm":
            (j,) = idx
            S = sum((dy[t][j] * self.h(t, j) for t in range(self.T)), Fraction(0))
            return _scale(S, self.inv_nuc(j, bits))
        if name == "dB":
            j, rho = idx
            S = sum((dy[t][j] * self.xa(t)[rho] for t in range(self.T)), Fraction(0))
            return _scale(s * self.m[j] * S, self.inv_nuc(j, bits))
        lo = hi = Fraction(0)
        if name == "dx":
            t, k = idx
            for j in range(self.N):
                a, b = _scale(dy[t][j] * self.m[j] * self.V(j, k), self.inv_nuc(j, bits))
                lo, hi = lo + a, hi + b
            return lo, hi
        if name == "dA":
            rho, k = idx
            for j in range(self.N):
                c = sum((dy[t][j] * Fraction(self.xn[t, k]) for t in range(self.T)), Fraction(0))
                a, b = _scale(s * Fraction(self.Bn[j, rho]) * self.m[j] * c, self.inv_nuc(j, bits))
                lo, hi = lo + a, hi + b
            return lo, hi
        raise ValueError(f"unknown gradient {name!r}")


# ----------------------------------------------------------------------------- mpmath cross-check
def crosscheck_mpmath(
    x,
    W,
    A,
    B,
    m,
    s: float,
    bias=None,
    eps: float = DEFAULT_EPS,
    dy=None,
    samples: int = 6,
    dps: int = 60,
    seed: int = 0,
    fmt=None,
) -> dict:
    """Recompute ``samples`` sampled elements of y (and of dx, dA, dB, dm with ``dy``) in mpmath at ``dps``
    decimal digits, straight from the formulas (mpf of the stored values, mpmath's own √), and compare them with
    tier 2 (:class:`ExactLayer`): the mpmath value must lie inside tier 2's enclosure widened by mpmath's own
    error (10^(8 − dps) of the terms), and y's RNE rounding into ``fmt`` (default x's dtype) must be tier 2's.
    Returns {'checked': n, 'mismatches': [...], 'max_rel_gap': float}."""
    import mpmath

    fmt = parse_format(fmt if fmt is not None else x.dtype)
    s = check_scalar_s(s)
    ex = ExactLayer(x, W, A, B, m, s, bias, eps, dy)
    gen = np.random.default_rng(seed)
    T, K = ex.T, ex.K
    N, r = ex.N, ex.r
    out = {"checked": 0, "mismatches": [], "max_rel_gap": 0.0}
    with mpmath.workdps(dps):
        mp = mpmath.mpf
        X = [[mp(float(v)) for v in row] for row in ex.xn]
        Wm = [[mp(float(v)) for v in row] for row in ex.Wn]
        Am = [[mp(float(v)) for v in row] for row in ex.An]
        Bm = [[mp(float(v)) for v in row] for row in ex.Bn]
        M = [mp(float(v)) for v in ex.m]
        S = mp(s)
        E = mp(float(ex.eps))
        XA = [[mpmath.fsum(X[t][k] * Am[rho][k] for k in range(K)) for rho in range(r)] for t in range(T)]
        V = {}

        def v_row(j):
            if j not in V:
                V[j] = [Wm[j][k] + S * mpmath.fsum(Bm[j][q] * Am[q][k] for q in range(r)) for k in range(K)]
            return V[j]

        nuc = {}

        def inv(j):
            if j not in nuc:
                nu = mpmath.sqrt(mpmath.fsum(v * v for v in v_row(j)))
                nuc[j] = 1 / max(nu, E)
            return nuc[j]

        def hval(t, j):
            return mpmath.fsum(X[t][k] * Wm[j][k] for k in range(K)) + S * mpmath.fsum(
                XA[t][q] * Bm[j][q] for q in range(r)
            )

        def check(what, mpv, iv, mag, nearest=None):
            out["checked"] += 1
            tol = mpmath.mpf(10) ** (8 - dps) * (mag + abs(mpv))
            lo, hi = (mpmath.mpf(iv[0].numerator) / iv[0].denominator, mpmath.mpf(iv[1].numerator) / iv[1].denominator)
            gap = max(lo - mpv, mpv - hi, 0)
            scale = max(abs(mpv), mag, mpmath.mpf(2) ** -1000)
            out["max_rel_gap"] = max(out["max_rel_gap"], float(gap / scale))
            bad = gap > tol
            if nearest is not None:
                man, e = mpmath.mpf(mpv).man_exp  # |mpv| = man·2^e (the sign is not in man)
                rn = round_fraction((1 if mpv >= 0 else -1) * Fraction(int(man)) * _pow2(int(e)), fmt)[2]
                bad |= rn != nearest
            if bad:
                out["mismatches"].append(
                    f"{what}: mpmath {mpmath.nstr(mpv, 20)}, tier 2 [{float(iv[0])!r}, "
                    f"{float(iv[1])!r}]" + (f", RN {nearest!r}" if nearest is not None else "")
                )

        for _ in range(samples):
            t, j = int(gen.integers(T)), int(gen.integers(N))
            hv = hval(t, j)
            y = M[j] * hv * inv(j) + (mp(float(ex.bias[j])) if ex.bias is not None else 0)
            mag = abs(M[j] * inv(j)) * (
                mpmath.fsum(abs(X[t][k] * Wm[j][k]) for k in range(K))
                + abs(S) * mpmath.fsum(abs(XA[t][q] * Bm[j][q]) for q in range(r))
            )
            check(f"y[{t}, {j}]", y, ex.y_interval(t, j, 4 * dps), mag, ex.y_round(t, j, fmt)[2])
        if dy is not None:
            DY = [[mp(float(v)) for v in row] for row in _f64(dy).cpu().numpy()]
            G = lambda j: M[j] * inv(j)  # noqa: E731
            for _ in range(samples):
                t, k, j, rho = (int(gen.integers(n)) for n in (T, K, N, max(r, 1)))
                terms = [DY[t][jj] * G(jj) * v_row(jj)[k] for jj in range(N)]
                check(
                    f"dx[{t}, {k}]",
                    mpmath.fsum(terms),
                    ex.grad_interval("dx", (t, k), 4 * dps),
                    mpmath.fsum(abs(v) for v in terms),
                )
                if r:
                    terms = [S * Bm[jj][rho] * G(jj) * DY[tt][jj] * X[tt][k] for jj in range(N) for tt in range(T)]
                    check(
                        f"dA[{rho}, {k}]",
                        mpmath.fsum(terms),
                        ex.grad_interval("dA", (rho, k), 4 * dps),
                        mpmath.fsum(abs(v) for v in terms),
                    )
                    terms = [S * G(j) * DY[tt][j] * XA[tt][rho] for tt in range(T)]
                    check(
                        f"dB[{j}, {rho}]",
                        mpmath.fsum(terms),
                        ex.grad_interval("dB", (j, rho), 4 * dps),
                        mpmath.fsum(abs(v) for v in terms),
                    )
                terms = [DY[tt][j] * hval(tt, j) * inv(j) for tt in range(T)]
                check(
                    f"dm[{j}]",
                    mpmath.fsum(terms),
                    ex.grad_interval("dm", (j,), 4 * dps),
                    mpmath.fsum(abs(v) for v in terms),
                )
    return out


# ----------------------------------------------------------------------------- stated steps and their bound
@dataclass(frozen=True)
class Gemm:
    """A GEMM step: products accumulated in fp32 with relative error ``acc`` per addition (default 2u₃₂, the
    truncating-accumulator model that also covers tensor cores — Fasi et al. 2021; u₃₂ is IEEE round-to-nearest),
    in chains of at most ``chain`` products whose sums are combined in float64 (None: one fp32 accumulation over the
    whole sum), then rounded once to ``out`` (no rounding for an fp32 result of an fp32 accumulation).
    |ĉ − c| ≤ γ_c(acc)·Σ|a||b| (+ γ64_n across chains) + u_out·|ĉ| (proofs/bounds.md, "The whole layer")."""

    out: str = "fp32"
    acc: float = 2 * U32
    chain: Optional[int] = None

    def gamma(self, n: int) -> float:
        c = n if self.chain is None else min(n, self.chain)
        g = _gam(c, self.acc)
        if self.chain is not None and n > self.chain:
            g += _gam(n + 1, U64)
        return g

    @property
    def rounds(self) -> bool:
        return self.out != "fp32" or self.chain is not None


@dataclass(frozen=True)
class LayerSteps:
    """An implementation of the layer as stated steps: ``act`` (x, W, bias, y), ``adapter`` (A, B, xa, lora) and
    ``magnitude`` dtypes; the GEMMs ``base`` = x Wᵀ, ``xa`` = x Aᵀ (x cast to the adapter dtype first) and
    ``lora`` = xa Bᵀ; the norm (``norm``: 'kernel' — :func:`dora_verify.bounds.kernel_norm_bound` with
    ``norm_backend`` and the densely recomputed ``dense_rows`` —, 'factored_fp32' —
    :func:`dora_verify.bounds.factored_norm_bound` —, or 'rel' — ``nu_rel``·ν); the scale g = RN₃₂(m / max(ν̂, ε));
    the compose (``compose``: 'kernel' — kernels.compose's compensated epilogue and one rounding,
    :func:`dora_verify.bounds.compose_epilogue_slack` —, or 'fp32' — fl₃₂(g·fl₃₂(b + fl₃₂(s·l)) + β), one rounding);
    ``backward``: the autograd structure of this project's DoRALinear ('lora_compose' for bf16/fp16 adapters,
    'compose' for fp32 ones) or None (forward only)."""

    name: str
    act: str
    adapter: str
    magnitude: str = "fp32"
    base: Gemm = Gemm()
    xa: Gemm = Gemm()
    lora: Gemm = Gemm()
    norm: str = "kernel"
    nu_rel: float = FAITHFUL_NORM_REL
    norm_backend: str = "torch"
    dense_rows: tuple = ()
    compose: str = "kernel"
    backward: Optional[str] = None


def kernel_layer_steps(act, adapter, norm_backend: str = "torch", dense_rows=()) -> LayerSteps:
    """DoRALinear's steps (kernels/layer.py, default ``save='recompute'``, autocast off): base = F.linear(x, W) and
    xa = F.linear(x.to(adapter), A) with fp32 accumulation, rounded once to their dtypes; lora = xa Bᵀ accumulated in
    fp32 and not rounded further (a fused tile of lora_compose; materialised in fp32 for fp32 adapters);
    ν = factored_row_norm; g = RN₃₂(m/max(ν̂, ε)) (:func:`kernels.dora_scale`); the single-rounding compose; m in
    fp32. The GEMM accumulation model (2u₃₂ per addition, any order) covers CPU BLAS and GPU tensor cores alike —
    given fp32 accumulation: on CUDA torch's allow_{bf16,fp16}_reduced_precision_reduction must be off."""
    act, adapter = parse_format(act).name, parse_format(adapter).name
    return LayerSteps(
        "kernels",
        act,
        adapter,
        "fp32",
        Gemm(act),
        Gemm(adapter),
        Gemm("fp32"),
        "kernel",
        norm_backend=norm_backend,
        dense_rows=tuple(dense_rows),
        compose="kernel",
        backward="compose" if adapter == "fp32" else "lora_compose",
    )


@dataclass
class _EV:
    """A value of the step model: v ≈ the exact value (|v − exact| ≤ dv, float64's own evaluation error) and a bound
    e on |computed − exact| (the implementation's error so far)."""

    v: torch.Tensor
    dv: torch.Tensor
    e: torch.Tensor

    @property
    def mag(self):
        return self.v.abs() + self.dv

    @property
    def cmag(self):
        return self.v.abs() + self.dv + self.e

    @property
    def T(self):
        return _EV(self.v.t(), self.dv.t(), self.e.t())

    def __getitem__(self, idx):
        return _EV(self.v[idx], self.dv[idx], self.e[idx])


def _ev(t, dv=None) -> _EV:
    v = _f64(t) if isinstance(t, torch.Tensor) else torch.tensor(float(t), dtype=F64)
    z = torch.zeros_like(v)
    return _EV(v, z if dv is None else dv, z.clone())


def _fmt_ueta(name: str):
    f = parse_format(name)
    return f.u, f.min_normal * f.u


def _round(a: _EV, fmt: str, on: bool) -> _EV:
    """One rounding to ``fmt`` (round to nearest): + u·|computed| + η."""
    if not on:
        return a
    u, eta = _fmt_ueta(fmt)
    return _EV(a.v, a.dv, a.e + u * a.cmag + eta)


def _cast(a: _EV, src: str, dst: str, on: bool) -> _EV:
    """A conversion src → dst: exact when dst holds every src value (same format, or to fp32), else one rounding."""
    lossless = dst == src or dst == "fp32"
    return a if lossless else _round(a, dst, on)


def _mul(a: _EV, b: _EV) -> _EV:
    v = a.v * b.v
    dv = a.v.abs() * b.dv + a.dv * b.v.abs() + a.dv * b.dv + U64 * v.abs()
    return _EV(v, dv, a.e * b.cmag + a.mag * b.e)


def _add(a: _EV, b: _EV) -> _EV:
    v = a.v + b.v
    return _EV(v, a.dv + b.dv + U64 * v.abs(), a.e + b.e)


def _sum0(a: _EV, n: int, on: bool) -> _EV:
    """Σ over the first axis (n terms) in float64 (``on``: with its γ64_{n+1} of Σ|·| and n η)."""
    v = a.v.sum(0)
    dv = a.dv.sum(0) + _gam(n + 1, U64) * a.v.abs().sum(0)
    e = a.e.sum(0) + (_gam(n + 1, U64) * a.cmag.sum(0) + n * ETA32 if on else 0)
    return _EV(v, dv, e)


def _gemm(a: _EV, b: _EV, step: Gemm, on: bool) -> _EV:
    """c = a bᵀ (a [M, n], b [P, n]) computed by ``step`` (``on``) or exactly (errors propagated only)."""
    n = a.v.shape[-1]
    v = a.v @ b.v.t()
    dv = (a.dv @ b.mag.t() + a.v.abs() @ b.dv.t() + _gam(n + 1, U64) * (a.v.abs() @ b.v.abs().t())) * (1 + 1e-12)
    e = a.e @ b.cmag.t() + a.mag @ b.e.t()
    if on:
        e = e + step.gamma(n) * (a.cmag @ b.cmag.t()) + n * ETA32
        if step.rounds:
            u, eta = _fmt_ueta(step.out)
            e = e + u * (v.abs() + dv + e) + eta
    return _EV(v, dv, e * (1 + 1e-12))


def _norm_error(steps: LayerSteps, truth: LayerTruth, W, A, B, s) -> torch.Tensor:
    nu = truth.norm.nu
    if steps.norm == "kernel":
        return kernel_norm_bound(W, A, B, s, nu, steps.norm_backend, list(steps.dense_rows) or None).to(nu.device)
    if steps.norm == "factored_fp32":
        return factored_norm_bound(W, A, B, s, nu).to(nu.device)
    if steps.norm == "rel":
        return steps.nu_rel * nu
    raise ValueError(f"unknown norm step {steps.norm!r}")


def _inv_nuc(truth: LayerTruth, e_nu, on_norm: bool) -> _EV:
    """1/ν̂_c: value 1/ν_c (oracle), error e_ν/(ν_c·ν̂_c) ≤ e_ν/lo² with lo ≤ both clamped norms."""
    nu, nb = truth.norm.nu, truth.norm.bound
    e_nu = e_nu if on_norm else torch.zeros_like(nu)
    lo = (nu - nb - e_nu).clamp_min(truth.eps)
    v = 1 / truth.nu_c
    dv = truth.inv_err + U64 * v
    return _EV(v, dv, e_nu / (lo * lo) * (1 + 4 * U64))


def _scale_ev(truth: LayerTruth, m64, inv: _EV, on_scale: bool) -> _EV:
    """ĝ = RN₃₂(m / ν̂_c) (m exact): the norm's error through 1/ν̂_c, then one fp32 rounding."""
    g = _mul(_ev(m64), inv)
    return _round(g, "fp32", on_scale)


def layer_step_bounds(
    steps: LayerSteps,
    x,
    W,
    A,
    B,
    m,
    s: float,
    bias=None,
    eps: float = DEFAULT_EPS,
    dy=None,
    truth: "LayerTruth | None" = None,
    only: "str | None" = None,
    nu_error=None,
) -> dict:
    """Bounds on |computed − exact| of the implementation ``steps`` describes, for y and — with ``dy`` and
    ``steps.backward`` — dx, dA, dB, dm (ν detached), against the exact layer of the rounded inputs. ``only``: one of
    :data:`STEPS` — that step's local error alone, every other step exact (its share of the bound); None: all.
    ``nu_error``: a bound on |ν̂ − ν| to use instead of the norm step's. Returns name → float64 tensor."""
    s = check_scalar_s(s)
    if only is not None and only not in STEPS:
        raise ValueError(f"only must be one of {STEPS}, got {only!r}")
    on = lambda k: only is None or only == k  # noqa: E731
    truth = truth if truth is not None else layer_truth(x, W, A, B, m, s, bias, eps, dy)
    D, Ad = steps.act, steps.adapter
    X, Wv, Av, Bv = _ev(x), _ev(W), _ev(A), _ev(B)
    m64 = _f64(m).to(truth.g.device)
    xc = X
    if not bool(torch.equal(round_to(X.v, Ad), X.v)):
        xc = _round(X, Ad, on("xa"))
    b = _gemm(X, Wv, steps.base, on("base"))
    xa = _gemm(xc, Av, steps.xa, on("xa"))
    l = _gemm(xa, Bv, steps.lora, on("lora"))
    e_nu = nu_error if nu_error is not None else _norm_error(steps, truth, W, A, B, s)
    inv = _inv_nuc(truth, _f64(e_nu).to(m64.device), on("norm"))
    g = _scale_ev(truth, m64, inv, on("scale"))
    beta = _ev(bias)[None, :] if bias is not None else None
    sl = _EV(l.v * s, l.dv * abs(s) + U64 * (l.v * s).abs(), l.e * abs(s))
    h = _add(b, sl)
    c = _mul(g[None, :], h)
    if beta is not None:
        c = _add(c, beta)
    if on("compose"):
        G, H, L = g.cmag[None, :], h.cmag, sl.cmag
        if steps.compose == "kernel":
            u2 = U32 * U32 * (1 + 4 * U32)
            E = u2 * G * (4 * H + 3 * L) + (4 * G + 8) * ETA32
            if beta is not None:
                E = E + u2 * (G * (3 * H + L) + beta.cmag)
        elif steps.compose == "fp32":
            E = _gam(4, U32) * (G * (b.cmag + L) + (beta.cmag if beta is not None else 0)) + (2 * G + 3) * ETA32
        else:
            raise ValueError(f"unknown compose step {steps.compose!r}")
        u, eta = _fmt_ueta(D)
        ey = c.e + E
        ey = ey + u * (c.v.abs() + c.dv + ey) + eta
    else:
        ey = c.e
    out = {"y": ey * SAFETY}
    if dy is not None and steps.backward is not None:
        out.update(_backward_bounds(steps, X, xc, Wv, Av, Bv, _ev(dy), b, xa, l, g, inv, s, on("backward")))
    return out


def _backward_bounds(steps: LayerSteps, X, xc, Wv, Av, Bv, dy, b, xa, l, g, inv, s: float, on: bool) -> dict:
    """DoRALinear's autograd, step by step (proofs/bounds.md, "The whole layer", backward)."""
    D, Ad, Md = steps.act, steps.adapter, steps.magnitude
    f32 = "fp32"

    def muls(a: _EV, c: float) -> _EV:
        v = a.v * c
        return _EV(v, a.dv * abs(c) + U64 * v.abs(), a.e * abs(c))

    gr = g[None, :]
    db = _cast(_round(_mul(gr, dy), f32, on), f32, D, on)  # RN_D(RN₃₂(g·dy))
    gs = _round(muls(g, s), f32, on)  # RN₃₂(g·s)
    if steps.backward == "lora_compose":
        Bs = _cast(_round(_mul(gs[:, None], Bv), f32, on), f32, D, on)  # RN_D(RN₃₂(gs·B)) [N, r]
        dxa = _gemm(dy, Bs.T, Gemm(D), on)  # dy @ Bs, rounded to dy's dtype (then .to(xa): the same)
        dB_acc = _gemm(dy.T, xa.T, Gemm(f32), on)  # fp32 dyᵀ xa [N, r]
        dB = _cast(_round(_mul(gs[:, None], dB_acc), f32, on), f32, Ad, on)
        dxA = _gemm(dxa, Av.T, Gemm(Ad), on)  # F.linear(x, A) backward: dxa @ A [T, K], adapter dtype (= D)
        dxA = _cast(dxA, Ad, D, on)
    elif steps.backward == "compose":
        dl = _cast(_round(_mul(gs[None, :], dy), f32, on), f32, Ad, on)  # RN_lora(RN₃₂(gs·dy))
        dxa = _gemm(dl, Bv.T, Gemm(Ad), on)  # F.linear(xa, B) backward
        dB = _gemm(dl.T, xa.T, Gemm(Ad), on)
        dxA = _cast(_gemm(dxa, Av.T, Gemm(Ad), on), Ad, D, on)  # then x.to(adapter)'s backward: RN_D
    else:
        raise ValueError(f"unknown backward structure {steps.backward!r}")
    dA = _gemm(dxa.T, xc.T, Gemm(Ad), on)  # [r, K]
    dxW = _gemm(db, Wv.T, Gemm(D), on)  # [T, K]
    dx = _add(dxW, dxA)
    dx = _round(dx, D, on) if D == f32 else _cast(_round(dx, f32, on), f32, D, on)  # the two uses of x summed
    T = dy.v.shape[0]
    if steps.backward == "lora_compose":
        # d_g = Σ_T dy·b̂ + s·Σ_r B ⊙ M̂ in float64 (M̂ = dyᵀxâ the fp32 GEMM above), then RN₃₂
        dgb = _sum0(_mul(dy, b), T, on)
        lt = _sum0(_mul(Bv, dB_acc).T, Bv.v.shape[1], on)
        dg = _add(dgb, muls(lt, s))
    else:
        # d_g = Σ_T dy ⊙ (b̂ + s·l̂) in float64 on the materialised lora, then RN₃₂
        sl = muls(l, s)
        hh = _add(b, sl)
        dg_v = (dy.v * hh.v).sum(0)
        dg_dv = (dy.v.abs() * hh.dv).sum(0) + _gam(T + 1, U64) * (dy.v.abs() * hh.v.abs()).sum(0)
        dg_e = (dy.v.abs() * hh.e).sum(0)
        if on:
            dg_e = dg_e + _gam(T + 3, U64) * (dy.v.abs() * (b.cmag + sl.cmag)).sum(0) + T * ETA32
        dg = _EV(dg_v, dg_dv, dg_e)
    dg = _round(dg, f32, on)  # d_m = RN₃₂(d_g / ν̂_c) (+ RN_m)
    dm = _cast(_round(_mul(dg, inv), f32, on), f32, Md, on)
    return {"dx": dx.e * SAFETY, "dA": dA.e * SAFETY, "dB": dB.e * SAFETY, "dm": dm.e * SAFETY}


def layer_bound_decomposition(
    steps: LayerSteps,
    x,
    W,
    A,
    B,
    m,
    s: float,
    bias=None,
    eps: float = DEFAULT_EPS,
    truth: "LayerTruth | None" = None,
    nu_error=None,
) -> dict:
    """Each forward step's share of the bound on y (that step's local error alone) and the total: step → [T, d_out]."""
    truth = truth if truth is not None else layer_truth(x, W, A, B, m, s, bias, eps)
    out = {
        k: layer_step_bounds(steps, x, W, A, B, m, s, bias, eps, truth=truth, only=k, nu_error=nu_error)["y"]
        for k in STEPS[:-1]
    }
    out["total"] = layer_step_bounds(steps, x, W, A, B, m, s, bias, eps, truth=truth, nu_error=nu_error)["y"]
    return out


# ----------------------------------------------------------------------------- the faithful layer contract
def _ut(name: str) -> float:
    """ũ: an op on tensors of this format computed in fp32 and rounded to it (u + u₃₂ + u·u₃₂; u₃₂ for fp32)."""
    u = parse_format(name).u
    return U32 if u == U32 else u + U32 + u * U32


def faithful_layer_bounds(
    truth: LayerTruth, x, W, A, B, s: float, bias=None, dy=None, act=None, adapter=None, magnitude=None
) -> dict:
    """The 'faithful layer' contract a user's layer is held to (docs/gate.md; derivation: proofs/bounds.md, "The
    whole layer"): bounds on |computed − exact| for y and, with ``dy``, dx, dA, dB, dm, in the exact parts of the
    layer — b = x Wᵀ, xa = x Aᵀ, l = xa Bᵀ, g, dh = g ⊙ dy, dxa = s·dh B, dxW = dh W, dxA = dxa A — and the GEMM
    magnitudes P_W = |x||W|ᵀ, P_xa = |x||A|ᵀ, P_A = P_xa|B|ᵀ, X_B = |xa||B|ᵀ. With u_D, u_A, u_m the unit roundoffs
    of ``act`` (x's dtype), ``adapter`` (A's) and ``magnitude`` (m's), ũ = u + u₃₂ + u·u₃₂ (an eager op on such
    tensors; u₃₂ for fp32), γ_n = γ_n(2u₃₂) (fp32 accumulation, truncating model), ρ = 10⁻⁶ + 2u₃₂ (g: the faithful ν
    contract and the fp32 division), γ₄ = γ₄(u₃₂) (an fp32 compose), τ = 4(ũ_D + ũ_A + ρ) (the second-order terms),
    K = d_in, N = d_out, Q = |dh|:

        e_h = ũ_D(2|b| + |β|) + γ_K·P_W + |s|·(ũ_A(X_B + |l|) + γ_K·P_A + γ_r·X_B)      (the compose's inputs)
        y:  u_D|y| + (1+τ)[|g|·e_h + (ρ|g| + γ₄(|g| + 2))(|b| + |s||l|) + 2γ₄|β|]
        dx: ũ_D|dx| + (1+τ)[(ρ + ũ_D + γ_N)·Q|W| + ũ_D|dxW| + |s|(ρ + 2u₃₂ + ũ_A + γ_N)(Q|B|)|A|
                            + (ũ_A + γ_r)|dxa||A| + (ũ_A + ũ_D)|dxA|]
        dA: ũ_A|dA| + (1+τ)[|s|(ρ + 2u₃₂ + ũ_A + γ_N)(Q|B|)ᵀ|x| + (ũ_A + γ_T)|dxa|ᵀ|x|]
        dB: ũ_A|dB| + (1+τ)|s|[(ρ + 2u₃₂ + ũ_A + γ_T)·Qᵀ|xa| + Qᵀ(γ_K·P_xa + ũ_A|xa|)]
        dm: ũ_m|dm| + (1+τ)/ν_c·Σ_T |dy|·[e_h + (ρ + u₃₂ + γ_T)(|b| + |s||l|)]

    each plus a few η (half the smallest subnormal) of its formats. Any implementation made of these steps meets it:
    fp32-accumulated GEMMs each rounded once to its dtype (the base at most twice: PEFT's RN(RN(x Wᵀ + β) − β)), the
    adapter branch in the adapter dtype, g to ρ, an fp32 compose of any of the usual forms rounded once, and the
    gradients as autograd forms them from those steps (d̂h = RN_D(ĝ·dy), d̂l = RN_A(RN₃₂(ĝ·s)·dy), fp32-accumulated
    GEMMs rounded once, d̂m = RN_m(RN₃₂(Σ_T dy·ĥ / ν̂_c))). What it forbids: g rounded to a 16-bit format (an error
    u_16·|g h| the |y|-relative budget does not hold), a ν that loses accuracy on ill-conditioned rows, NaN/Inf."""
    act = parse_format(act if act is not None else x.dtype).name
    adapter = parse_format(adapter if adapter is not None else A.dtype).name
    magnitude = parse_format(magnitude if magnitude is not None else adapter).name
    s = check_scalar_s(s)
    dev = truth.y_hi.device
    xs, Ws, As, Bs = (_f64(t).to(dev) for t in (x, W, A, B))
    ax, aW, aA, aB = xs.abs(), Ws.abs(), As.abs(), Bs.abs()
    T, K = ax.shape
    N, r = aB.shape
    uD = parse_format(act).u
    tD, tA, tm = _ut(act), _ut(adapter), _ut(magnitude)
    gam = lambda n: _gam(n, 2 * U32)  # noqa: E731
    rho = FAITHFUL_NORM_REL + 2 * U32
    g4 = _gam(4, U32)
    tau = 4 * (tD + tA + rho)
    eta = lambda f: parse_format(f).min_normal * parse_format(f).u  # noqa: E731
    etaD, etaA, etam = eta(act), eta(adapter), eta(magnitude)
    g = truth.g.abs()[None, :]
    beta = _f64(bias).to(dev).abs()[None, :] if bias is not None else torch.zeros(1, N, dtype=F64, device=dev)
    b = truth.value("b").abs()
    xa = truth.value("xa").abs()
    l = truth.value("l").abs()
    PW, Pxa = ax @ aW.t(), ax @ aA.t()
    PA, XB = Pxa @ aB.t(), xa @ aB.t()
    e_h = tD * (2 * b + beta) + gam(K) * PW + abs(s) * (tA * (XB + l) + gam(K) * PA + gam(r) * XB)
    hm = b + abs(s) * l
    ey = uD * truth.y.abs() + (1 + tau) * (g * e_h + (rho * g + g4 * (g + 2)) * hm + 2 * g4 * beta)
    out = {"y": (ey + 8 * (g + 2) * (etaD + etaA)) * SAFETY}
    if dy is None:
        return out
    dy64 = _f64(dy).to(dev)
    dh = truth.g[None, :] * dy64
    Q = dh.abs()
    dxa = s * (dh @ Bs)
    dxW, dxA = dh @ Ws, dxa @ As
    QB = Q @ aB
    out["dx"] = (
        tD * truth.grads["dx"][0].abs()
        + (1 + tau)
        * (
            (rho + tD + gam(N)) * (Q @ aW)
            + tD * dxW.abs()
            + abs(s) * (rho + 2 * U32 + tA + gam(N)) * (QB @ aA)
            + (tA + gam(r)) * (dxa.abs() @ aA)
            + (tA + tD) * dxA.abs()
        )
        + 8 * (etaD + etaA)
    ) * SAFETY
    out["dA"] = (
        tA * truth.grads["dA"][0].abs()
        + (1 + tau) * (abs(s) * (rho + 2 * U32 + tA + gam(N)) * (QB.t() @ ax) + (tA + gam(T)) * (dxa.abs().t() @ ax))
        + 8 * etaA
    ) * SAFETY
    out["dB"] = (
        tA * truth.grads["dB"][0].abs()
        + (1 + tau) * abs(s) * ((rho + 2 * U32 + tA + gam(T)) * (Q.t() @ xa) + Q.t() @ (gam(K) * Pxa + tA * xa))
        + 8 * etaA
    ) * SAFETY
    out["dm"] = (
        tm * truth.grads["dm"][0].abs()
        + (1 + tau) * (dy64.abs() * (e_h + (rho + U32 + gam(T)) * hm)).sum(0) / truth.nu_c
        + 8 * etam
    ) * SAFETY
    return out


# ----------------------------------------------------------------------------- measured error decomposition
def error_decomposition(truth: LayerTruth, parts: dict, m, s: float, B, bias=None) -> dict:
    """How much of y's error each step of an implementation added, measured against the oracle. ``parts``: the
    implementation's intermediates — 'base' (x Wᵀ as it computed it, no bias) [T, d_out], 'xa' [T, r], 'lora'
    (from its own xa) [T, d_out], 'nu' [d_out], 'g' [d_out], 'y' [T, d_out]. Each step's share is y computed with
    every step exact except that one (its local error — its output minus the exact function of its own inputs —
    carried through the exact rest of the layer):

        base    g ⊙ (b̂ − b)                  xa     g ⊙ s·(x̂a − xa)Bᵀ         lora   g ⊙ s·(l̂ − x̂a Bᵀ)
        norm    (m/ν̂_c − g) ⊙ h              scale  (ĝ − m/ν̂_c) ⊙ h           compose ŷ − (ĝ ⊙ (b̂ + s l̂) + β)

    They add up to the total ŷ − y but for the one second-order term ``cross`` = (ĝ − g) ⊙ (ĥ − h): ``residual`` =
    total − Σ − cross is float64 rounding only. Returns float64 tensors (step names, 'total', 'cross', 'residual')
    and 'ulp' — step → max |share| / ulp(y) in y's format."""
    s = check_scalar_s(s)
    dev = truth.y_hi.device
    P = {k: _f64(v).to(dev) for k, v in parts.items()}
    g = truth.g[None, :]
    m64 = _f64(m).to(dev)
    B64 = _f64(B).to(dev)
    b_hat, xa_hat, l_hat, y_hat = P["base"], P["xa"], P["lora"], P["y"]
    h_ex = truth.h[0] + truth.h[1]
    xa_ex = truth.xa[0] + truth.xa[1]
    gn = (m64 / P["nu"].clamp_min(truth.eps))[None, :]
    g_hat = P["g"][None, :]
    beta = _f64(bias).to(dev)[None, :] if bias is not None else 0.0
    out = {
        "base": g * ((b_hat - truth.b[0]) - truth.b[1]),
        "xa": g * s * ((xa_hat - xa_ex) @ B64.t()),
        "lora": g * s * (l_hat - xa_hat @ B64.t()),
        "norm": (gn - g) * h_ex,
        "scale": (g_hat - gn) * h_ex,
        "compose": y_hat - (g_hat * (b_hat + s * l_hat) + beta),
    }
    total = (y_hat - truth.y_hi) - truth.y_lo
    cross = (g_hat - g) * ((b_hat + s * l_hat) - h_ex)
    out["total"] = total
    out["cross"] = cross
    out["residual"] = total - sum(out[k] for k in STEPS[:-1]) - cross
    u = ulp(truth.y, truth.fmt)
    out["ulp"] = {
        k: float((out[k].abs() / u).max()) if out[k].numel() else 0.0 for k in (*STEPS[:-1], "total", "cross")
    }
    return out


@torch.no_grad()
def doralinear_parts(layer, x: torch.Tensor) -> dict:
    """The intermediates of ``kernels.DoRALinear``'s forward on ``x`` (eval semantics, no dropout), computed with the
    calls its forward makes (the same bits): base, xa, lora, nu, g, y — for :func:`error_decomposition`."""
    import torch.nn.functional as F

    from .kernels import compose, lora_compose
    from .kernels.lora_compose import lora_compose_forward_eager

    W, bias = layer.base_layer.weight, layer.base_layer.bias
    xa = F.linear(x.to(layer.lora_A.dtype), layer.lora_A)
    base = F.linear(x, W)
    nu = layer.weight_norm()
    g, _ = layer.scale(g_minus_1=False)
    if layer.lora_B.dtype != torch.float32 and layer.save == "recompute":
        y = lora_compose(base, xa, layer.lora_B, g, layer.scaling, bias)
        if x.is_cuda:
            from .kernels.lora_compose import lora_compose_forward_fused

            lora = lora_compose_forward_fused(base, xa, layer.lora_B, g, bias, layer.scaling, write_lora=True)[1]
        else:
            lora = lora_compose_forward_eager(base, xa, layer.lora_B, g, bias, layer.scaling, write_lora=True)[1]
    else:
        lora = F.linear(xa, layer.lora_B)
        y = compose(base, lora, g, layer.scaling, bias)
    return {"base": base, "xa": xa, "lora": lora, "nu": nu, "g": g, "y": y}


# ----------------------------------------------------------------------------- layer cases
LAYER_REGIMES = {
    "trained": "B ≠ 0 (‖s·lora‖ ≈ 0.1‖base‖), g = 1 + δ, δ ~ N(0, 1.5e-3)",
    "exact_one": "B = 0 and rows with exactly representable norms, m = ν: g = 1 exactly",
    "fresh": "B = 0, m = RN_m(‖W_i‖) (a new adapter: |g − 1| ≤ u_m)",
    "below_bf16": "trained, |g − 1| < 2⁻¹⁰ (below bf16 resolution; in bf16 m, whatever RN_bf16 leaves)",
    "cancel": "trained, rows W_i ≈ −s·(BA)_i (ν_i ≪ ‖W_i‖)",
    "zero_rows": "trained, rows W_i = 0, B_i = 0, m_i = 0 (ν_i = 0 < ε)",
    "large": "trained, activations ×62 with a few ×16 outliers",
    "positive": "trained, every entry positive (no cancellation hides accumulation error)",
    "heavy": "trained, Student-t(2) x and W",
}


def layer_example(
    act: str,
    adapter: str,
    T: int,
    d_out: int,
    d_in: int,
    r: int,
    alpha: float,
    regime: str,
    seed: int,
    bias: bool = True,
):
    """One layer case (deterministic, the same bits on every CPU: elementwise ops, exact rounding and ordered sums):
    x [T, d_in], W [d_out, d_in], bias [d_out] and dy [T, d_out] in ``act``; A [r, d_in], B [d_out, r] and m
    [d_out] in ``adapter`` (PEFT's magnitude dtype); s = alpha / r, which must be exact in fp32. Regimes:
    :data:`LAYER_REGIMES`. Returns a :class:`dora_verify.strategies.Example` of kind 'layer'."""
    from .cases import _rows, _student_t2, ordered_matmul_t, ordered_norm
    from .strategies import Example

    if regime not in LAYER_REGIMES:
        raise ValueError(f"unknown layer regime {regime!r}; choose from {', '.join(LAYER_REGIMES)}")
    fd, fa = parse_format(act), parse_format(adapter)
    s = alpha / r
    if float(np.float32(s)) != s:
        raise ValueError(f"alpha / r = {s!r} is not fp32-representable: choose alpha, r with an exact ratio")
    gen = torch.Generator().manual_seed(int(seed) * 7919 + list(LAYER_REGIMES).index(regime))
    K, N = d_in, d_out
    x = torch.randn(T, K, generator=gen, dtype=F64)
    W = torch.randn(N, K, generator=gen, dtype=F64) / math.sqrt(K)
    A = (torch.rand(r, K, generator=gen, dtype=F64) * 2 - 1) / math.sqrt(K)
    B = torch.randn(N, r, generator=gen, dtype=F64) * (0.1 / (abs(s) * math.sqrt(r / 3.0)))
    g = 1 + torch.randn(N, generator=gen, dtype=F64) * 1.5e-3
    if regime in ("fresh", "exact_one"):
        B.zero_()
        g.fill_(1.0)
    elif regime == "below_bf16":
        g = 1 + (torch.rand(N, generator=gen, dtype=F64) * 2 - 1) * 2.0**-10
    elif regime == "large":
        x *= 62.0
        for t in range(min(T, 3)):
            x[t, (7 * t + 3) % K] *= 16.0
    elif regime == "positive":
        x, W, A, B = x.abs(), W.abs(), A.abs(), B.abs()
    elif regime == "heavy":
        x = _student_t2((T, K), gen)
        W = _student_t2((N, K), gen) / math.sqrt(K)
    rd = lambda t: round_to(t.clamp(-fd.max_finite, fd.max_finite), fd)  # noqa: E731
    ra = lambda t: round_to(t, fa)  # noqa: E731
    A, B = ra(A), ra(B)
    special: list = []
    exact_m = {}
    if regime == "exact_one":  # row i: c ∈ {1, 4, 16, 64} entries ±2^e: ν_i = 2^e·√c exactly
        counts = [c for c in (1, 4, 16, 64) if c <= K]
        W.zero_()
        for i in range(N):
            c = counts[i % len(counts)]
            e = -2 - (i % 5)
            pos = torch.randperm(K, generator=gen)[:c]
            sign = torch.randint(0, 2, (c,), generator=gen).to(F64) * 2 - 1
            W[i, pos] = sign * 2.0**e
            exact_m[i] = 2.0**e * math.isqrt(c)
    elif regime == "cancel":
        special = _rows(N, 4)
        for j, i in enumerate(special):
            eta = (0.0, 1e-6, 1e-4, 1e-2)[j % 4]
            target = -s * ordered_matmul_t(B[i : i + 1], A.t())[0]
            noise = torch.randn(K, generator=gen, dtype=F64) * ordered_norm(target) / math.sqrt(K)
            W[i] = target + eta * noise
    elif regime == "zero_rows":
        special = _rows(N, 4)
        W[special] = 0.0
        B[special] = 0.0
    W, x = rd(W), rd(x)
    V = W + s * ordered_matmul_t(B, A.t())
    nu = torch.tensor([ordered_norm(V[i]) for i in range(N)], dtype=F64)
    m = round_to(g * nu, fa)
    for i, v in exact_m.items():
        m[i] = v
    if regime == "zero_rows":
        m[special] = 0.0
    tensors = {
        "x": x.to(fd.torch_dtype),
        "W": W.to(fd.torch_dtype),
        "A": A.to(fa.torch_dtype),
        "B": B.to(fa.torch_dtype),
        "m": m.to(fa.torch_dtype),
        "dy": rd(torch.randn(T, N, generator=gen, dtype=F64)).to(fd.torch_dtype),
    }
    if bias:
        tensors["bias"] = rd(torch.randn(N, generator=gen, dtype=F64) * 0.1).to(fd.torch_dtype)
    params = {
        "T": T,
        "d_out": N,
        "d_in": K,
        "r": r,
        "alpha": alpha,
        "regime": regime,
        "seed": seed,
        "adapter": fa.name,
        "bias": bias,
        "special_rows": special,
    }
    return Example("layer", fd.name, tensors, {"s": s, "r": r, "alpha": alpha, "eps": DEFAULT_EPS}, params)


__all__ = [
    "DEFAULT_EPS",
    "GRADS",
    "LAYER_REGIMES",
    "STEPS",
    "ExactLayer",
    "Gemm",
    "LayerSteps",
    "LayerTruth",
    "crosscheck_mpmath",
    "doralinear_parts",
    "eps32",
    "error_decomposition",
    "faithful_layer_bounds",
    "kernel_layer_steps",
    "layer_bound_decomposition",
    "layer_example",
    "layer_step_bounds",
    "layer_truth",
    "sqrt_enclosure",
]
