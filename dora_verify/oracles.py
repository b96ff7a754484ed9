"""The truth: exact results of the *rounded* inputs, each with a bound on the oracle's own error.

Tier 1 (vectorised float64, any device)
  * compose: ``y = g (base + s·lora) + bias`` and ``Δ = (g-1) base + g s·lora`` as double-doubles
    ``hi + lo`` built from error-free transformations (TwoSum, Dekker TwoProduct), with a rigorous
    bound ``b`` on ``|exact - (hi + lo)|``. ``b`` is exactly 0 whenever every step was exact (g = 1,
    lora = 0, ...), so grid-point results are certified without tier 2.
  * row norm ``ν_i = ‖W_i + s (BA)_i‖₂``: float64 BLAS (bf16/fp16/fp32 products are exact in float64),
    with the per-row bound ``γ_{n+4} ν̂_i + γ_{r+4} ‖|W_i| + s |B_i||A|‖₂`` (Higham's standard model,
    valid for any summation order, FMA or not). The second term is the row's conditioning: it is what
    grows on rows with W_i ≈ -s (BA)_i.
Tier 2 (exact rationals, ``dora_verify.exact``) takes over automatically:
  * compose: for each element whose correct rounding or enclosing grid points tier 1 cannot decide
    (its value lies within ``b`` of a rounding boundary);
  * norm: for each row whose tier-1 relative bound exceeds ``escalate_rel`` (default 2**-40, i.e. far
    below the 1e-6..1e-8 relative errors the kernels are held to).
Assumptions: finite inputs, no float64 overflow/underflow of intermediate products (inputs from
bf16/fp16/fp32 tensors and |s|, |g| < 2**100 satisfy this), ``s`` an fp32-representable scalar.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .eft import gamma, sum2, two_prod, two_sum
from .exact import ExactRowNorm, compose_exact, round_fraction
from .formats import FP32, FloatFormat, bracket, parse_format, round_to, ulp

U64 = 2.0**-53
DEFAULT_ESCALATE_REL = 2.0**-40
MAX_TIER2_ELEMENTS = 20000
MAX_TIER2_ROWS = 64


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def check_scalar_s(s: float) -> float:
    """``s`` must be finite and exactly representable in fp32 (the kernels hold it in fp32)."""
    s = float(s)
    if not np.isfinite(s):
        raise ValueError(f"scaling s must be finite, got {s}")
    if float(np.float32(s)) != s:
        raise ValueError(f"scaling s={s!r} is not fp32-representable; round it first: float(np.float32(s))")
    return s


# ----------------------------------------------------------------------------- certified rounding
@dataclass
class Rounded:
    """Certified facts about the exact values x (given as hi + lo ± b) with respect to a format."""

    nearest: torch.Tensor  # correctly rounded (RNE) value of the exact x, float64
    down: torch.Tensor  # largest fmt value <= x
    up: torch.Tensor  # smallest fmt value >= x
    certain: torch.Tensor  # bool: tier 1 decided; where False, tier 2 must fill in


def certified_round(hi: torch.Tensor, lo: torch.Tensor, b: torch.Tensor, fmt: FloatFormat) -> Rounded:
    """Decide RNE rounding and the enclosing grid points of x = hi + lo + θ, |θ| <= b, into ``fmt``.

    Sound whenever |lo| <= ulp64(hi) (normalised double-double) and b << ulp_fmt(hi). Elements it
    cannot decide (x within b of a rounding boundary) come back with ``certain`` False."""
    dn, up = bracket(hi, fmt)
    on_grid = dn == up
    slack = lo.abs() + b
    # hi strictly between two grid points: compare x with the midpoint (exact in float64: p+1 bits).
    mid = (dn + up) / 2
    t = (hi - mid) + lo  # hi - mid is exact (Sterbenz)
    tie = (t == 0) & (b == 0)
    decided = (t.abs() > b + U64 * t.abs()) | tie
    inside = ((hi - dn) > 1.0000001 * slack) & ((up - hi) > 1.0000001 * slack)
    nearest = torch.where(t > 0, up, dn)
    certain = inside & decided
    down, upv = dn.clone(), up.clone()
    if bool(tie.any()):  # exact ties go to the even neighbour
        nearest[tie] = round_to(mid[tie], fmt)
    # hi on the grid: x is hi itself, or within |lo| + b of it on one side.
    nearest = torch.where(on_grid, hi, nearest)
    exact_pt = on_grid & (lo == 0) & (b == 0)
    certain = torch.where(on_grid, exact_pt, certain)
    off = on_grid & ~exact_pt
    if bool(off.any()):
        h, l_, bb = hi[off], lo[off], b[off]
        q = ulp(h, fmt)
        above, below = l_ > bb, l_ < -bb
        nxt_up = bracket(h + q / 8, fmt)[1]
        nxt_dn = bracket(h - q / 8, fmt)[0]
        down[off] = torch.where(below, nxt_dn, h)
        upv[off] = torch.where(above, nxt_up, h)
        certain[off] = (above | below) & ((l_.abs() + bb) < q / 4)
    certain = certain | ~torch.isfinite(hi)
    return Rounded(nearest, down, upv, certain)


# ----------------------------------------------------------------------------- compose (tier 1 + 2)
@dataclass
class ComposeTruth:
    """Exact y and Δ of the rounded inputs, as hi + lo with oracle bounds, and their certified
    rounding into the output format. ``tier2_elements`` counts elements settled by exact rationals;
    ``uncertified`` those left undecided (only if more than MAX_TIER2_ELEMENTS needed tier 2)."""

    y_hi: torch.Tensor
    y_lo: torch.Tensor
    y_bound: torch.Tensor
    d_hi: torch.Tensor
    d_lo: torch.Tensor
    d_bound: torch.Tensor
    fmt: FloatFormat
    y_round: Rounded
    d_round: Rounded
    tier2_elements: int = 0
    uncertified: int = 0

    @property
    def y(self) -> torch.Tensor:
        return self.y_hi + self.y_lo

    @property
    def delta(self) -> torch.Tensor:
        return self.d_hi + self.d_lo


def _validate_compose(base, lora, g, s, bias):
    if base.shape != lora.shape or base.dim() != 2:
        raise ValueError(
            f"base and lora must be [T, d_out] of one shape, got {tuple(base.shape)} and {tuple(lora.shape)}"
        )
    if g.shape != (base.shape[1],):
        raise ValueError(f"g must be [d_out]={base.shape[1]}, got {tuple(g.shape)}")
    if bias is not None and bias.shape != (base.shape[1],):
        raise ValueError(f"bias must be [d_out]={base.shape[1]}, got {tuple(bias.shape)}")
    for name, t in (("base", base), ("lora", lora), ("g", g)) + ((("bias", bias),) if bias is not None else ()):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN/Inf: the oracle is defined on finite inputs")
    return check_scalar_s(s)


def compose_truth(
    base, lora, g, s, bias=None, out_fmt=None, tier2_limit: int = MAX_TIER2_ELEMENTS, g_minus_1=None
) -> ComposeTruth:
    """Tier-1 truth of y and Δ for [T, d_out] ``base``/``lora`` and [d_out] ``g`` (any float dtypes; the
    values are taken exactly as stored), escalating undecided elements to exact rationals.

    ``out_fmt`` (default: base's dtype) is the format results are rounded into. ``g_minus_1`` (fp32 [d_out],
    optional): Δ = g_minus_1·base + g·s·lora with the given value (a kernel's Δ input), instead of g − 1
    from g; y does not use it."""
    s = _validate_compose(base, lora, g, s, bias)
    fmt = parse_format(out_fmt if out_fmt is not None else base.dtype)
    b64, l64, g64 = _f64(base), _f64(lora), _f64(g).unsqueeze(0)
    sl = l64 * s  # exact: <= 24 + 24 significant bits
    h1, l1 = two_sum(b64, sl)  # inner = h1 + l1 exactly
    p, ep = two_prod(g64, h1)  # g*h1 = p + ep exactly
    q = g64 * l1  # error <= u|q|
    if bias is None:
        t = ep + q
        y_hi, y_lo = two_sum(p, t)
        y_b = U64 * (q.abs() + t.abs())
    else:
        s1, e1 = two_sum(p, _f64(bias).unsqueeze(0))
        t = (ep + q) + e1
        y_hi, y_lo = two_sum(s1, t)
        y_b = U64 * q.abs() + gamma(2) * (ep.abs() + q.abs() + e1.abs())
    # Δ = (g-1) base + g sl
    if g_minus_1 is None:
        gm1, egm = two_sum(g64, torch.full_like(g64, -1.0))  # g - 1 = gm1 + egm exactly
    else:
        gm1 = _f64(g_minus_1).unsqueeze(0)
        egm = torch.zeros_like(gm1)
    a1, ea1 = two_prod(gm1, b64)
    a2 = egm * b64
    c1, ec1 = two_prod(g64, sl)
    dh0, de0 = two_sum(a1, c1)
    td = ((ea1 + ec1) + de0) + a2
    d_hi, d_lo = two_sum(dh0, td)
    d_b = U64 * a2.abs() + gamma(3) * (ea1.abs() + ec1.abs() + de0.abs() + a2.abs())
    y_b, d_b = y_b * (1 + 1e-12), d_b * (1 + 1e-12)  # dominate the bound's own evaluation error
    truth = ComposeTruth(
        y_hi,
        y_lo,
        y_b,
        d_hi,
        d_lo,
        d_b,
        fmt,
        certified_round(y_hi, y_lo, y_b, fmt),
        certified_round(d_hi, d_lo, d_b, fmt),
    )
    _escalate_compose(truth, base, lora, g, s, bias, tier2_limit, g_minus_1)
    return truth


def _escalate_compose(truth: ComposeTruth, base, lora, g, s, bias, limit: int, g_minus_1=None) -> None:
    todo = (~truth.y_round.certain) | (~truth.d_round.certain)
    idx = torch.nonzero(todo, as_tuple=False).cpu()
    n = int(idx.shape[0])
    truth.uncertified = max(0, n - limit)
    if n == 0:
        return
    idx = idx[:limit]
    bc, lc, gc = base.detach().cpu().double(), lora.detach().cpu().double(), g.detach().cpu().double()
    bic = bias.detach().cpu().double() if bias is not None else None
    gmc = g_minus_1.detach().cpu().double() if g_minus_1 is not None else None
    updates = {k: [] for k in ("y_hi", "d_hi", "yn", "yd", "yu", "dn", "dd", "du")}
    for t_i, c_i in idx.tolist():
        y, d = compose_exact(
            float(bc[t_i, c_i]),
            float(lc[t_i, c_i]),
            float(gc[c_i]),
            s,
            float(bic[c_i]) if bic is not None else 0.0,
            float(gmc[c_i]) if gmc is not None else None,
        )
        ydn, yup, ynear = round_fraction(y, truth.fmt)
        ddn, dup, dnear = round_fraction(d, truth.fmt)
        for k, v in zip(updates, (float(y), float(d), ynear, ydn, yup, dnear, ddn, dup)):
            updates[k].append(v)
    dev = truth.y_hi.device
    ti, ci = idx[:, 0].to(dev), idx[:, 1].to(dev)

    def put(t, key):
        t[ti, ci] = torch.tensor(updates[key], dtype=torch.float64, device=dev)

    put(truth.y_hi, "y_hi")
    put(truth.d_hi, "d_hi")
    for t in (truth.y_lo, truth.d_lo):
        t[ti, ci] = 0.0
    # after float(Fraction) the residual is <= half an ulp64 of the value
    truth.y_bound[ti, ci] = truth.y_hi[ti, ci].abs() * U64
    truth.d_bound[ti, ci] = truth.d_hi[ti, ci].abs() * U64
    for rounded, prefix in ((truth.y_round, "y"), (truth.d_round, "d")):
        put(rounded.nearest, prefix + "n")
        put(rounded.down, prefix + "d")
        put(rounded.up, prefix + "u")
    truth.y_round.certain[ti, ci] = True
    truth.d_round.certain[ti, ci] = True
    truth.tier2_elements = int(idx.shape[0])


@dataclass
class ComposeGradTruth:
    """Exact gradients of y = g ⊙ (base + s·lora) + bias (ν detached): d_base = g·dy (exact in float64),
    d_lora = g·s·dy as hi + lo (exact), d_g = Σ_T dy ⊙ (base + s·lora) with its oracle bound."""

    d_base: torch.Tensor
    d_lora_hi: torch.Tensor
    d_lora_lo: torch.Tensor
    d_g: torch.Tensor
    d_g_bound: torch.Tensor


def compose_grad_truth(dy, base, lora, g, s, g_minus_1=None) -> ComposeGradTruth:
    """Tier-1 truth of the compose backward (``g_minus_1`` given: the Δ output, d_base = (g − 1)·dy).
    dy·base and s·lora are exact in float64 (≤ 48 significant bits), dy·(s·lora) is split exactly by
    TwoProduct, and the T-sum is compensated (:func:`dora_verify.eft.sum2`)."""
    s = check_scalar_s(s)
    if dy.shape != base.shape or base.shape != lora.shape or dy.dim() != 2:
        raise ValueError(
            f"dy, base, lora must be [T, d_out] of one shape, got {tuple(dy.shape)}, "
            f"{tuple(base.shape)}, {tuple(lora.shape)}"
        )
    for name, t in (("dy", dy), ("base", base), ("lora", lora), ("g", g)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN/Inf: the oracle is defined on finite inputs")
    d, b, l = _f64(dy), _f64(base), _f64(lora)
    g64 = _f64(g).unsqueeze(0)
    gb = g64 if g_minus_1 is None else _f64(g_minus_1).unsqueeze(0)
    gs_hi, gs_lo = two_prod(g64, torch.full_like(g64, s))
    p1, e1 = two_prod(gs_hi, d)
    dl_hi, dl_lo = two_sum(p1, e1 + gs_lo * d)
    sl = l * s
    q, eq = two_prod(d, sl)
    terms = torch.cat([d * b, q, eq], dim=0)
    dg, bound = sum2(terms, 0)
    return ComposeGradTruth(gb * d, dl_hi, dl_lo, dg, bound * (1 + 1e-12))


# ----------------------------------------------------------------------------- row norm (tier 1 + 2)
@dataclass
class NormTruth:
    """ν per row (float64) with a per-row bound on |ν - ν_exact|; ``tier2_rows`` lists rows recomputed
    exactly, ``uncertified_rows`` rows that needed tier 2 beyond the row budget."""

    nu: torch.Tensor
    bound: torch.Tensor
    cond: torch.Tensor  # ‖|W_i| + s|B_i||A|‖₂ / ν_i : the row's condition number for the sum W + sBA
    tier2_rows: list = field(default_factory=list)
    uncertified_rows: list = field(default_factory=list)

    @property
    def rel_bound(self) -> torch.Tensor:
        return torch.where(self.bound == 0, torch.zeros_like(self.bound), self.bound / self.nu)


def _validate_norm(W, A, B, s):
    if W.dim() != 2 or A.dim() != 2 or B.dim() != 2:
        raise ValueError("W [d_out, d_in], A [r, d_in] and B [d_out, r] must be 2-D")
    d_out, d_in = W.shape
    r = A.shape[0]
    if A.shape[1] != d_in or B.shape != (d_out, r):
        raise ValueError(f"shape mismatch: W {tuple(W.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}")
    for name, t in (("W", W), ("A", A), ("B", B)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN/Inf: the oracle is defined on finite inputs")
    return check_scalar_s(s)


def row_norm_truth(
    W,
    A,
    B,
    s,
    escalate_rel: float = DEFAULT_ESCALATE_REL,
    max_tier2_rows: int = MAX_TIER2_ROWS,
    chunk_elems: int = 1 << 24,
) -> NormTruth:
    """Truth of ν_i = ‖W_i + s (B A)_i‖₂ for every row (values of W, A, B taken exactly as stored).

    Rows whose tier-1 relative bound exceeds ``escalate_rel`` are recomputed exactly (tier 2), up to
    ``max_tier2_rows`` rows (the rest are reported in ``uncertified_rows``)."""
    s = _validate_norm(W, A, B, s)
    d_out, d_in = W.shape
    r = A.shape[0]
    A64, B64, W64 = _f64(A), _f64(B), _f64(W)
    absA = A64.abs()
    rows = max(1, chunk_elems // max(1, d_in))
    nus, sens = [], []
    for i0 in range(0, d_out, rows):
        Bc = B64[i0 : i0 + rows]
        V = W64[i0 : i0 + rows] + s * (Bc @ A64)
        nus.append(torch.linalg.vector_norm(V, dim=1))
        sens.append(torch.linalg.vector_norm(W64[i0 : i0 + rows].abs() + abs(s) * (Bc.abs() @ absA), dim=1))
        del V
    nu = torch.cat(nus) if nus else torch.zeros(0, dtype=torch.float64, device=W64.device)
    sen = torch.cat(sens) if sens else torch.zeros_like(nu)
    bound = (gamma(d_in + 4) * nu + gamma(r + 4) * sen) * (1 + 1e-12)
    cond = torch.where(nu > 0, sen / nu, torch.where(sen > 0, torch.full_like(sen, float("inf")), torch.ones_like(sen)))
    truth = NormTruth(nu, bound, cond)
    rel = torch.where(bound == 0, torch.zeros_like(bound), bound / nu)
    todo = torch.nonzero(rel > escalate_rel).flatten().cpu().tolist()
    if todo:
        todo.sort(key=lambda i: -float(rel[i]))
        exact = ExactRowNorm(A64.cpu().numpy(), s)
        Wn, Bn = W64.cpu().numpy(), B64.cpu().numpy()
        for i in todo[:max_tier2_rows]:
            v, _ = exact.row(Wn[i], Bn[i])
            truth.nu[i] = v
            truth.bound[i] = v * U64
            truth.tier2_rows.append(i)
        truth.uncertified_rows = todo[max_tier2_rows:]
    return truth


@dataclass
class ScaleTruth:
    """g = m / max(ν, ε) and g - 1 in float64 with relative bounds inherited from ν."""

    g: torch.Tensor
    g_minus_1: torch.Tensor
    g_bound: torch.Tensor


def scale_truth(m: torch.Tensor, nu: NormTruth, eps: float) -> ScaleTruth:
    """Truth of the DoRA scale from a norm truth. |g - g_exact| <= |g| (rel(ν) + 3u) to first order;
    g - 1 = (m - ν)/ν is formed in float64 from exact m and ν to the same relative accuracy."""
    m64 = _f64(m)
    den = torch.clamp(nu.nu, min=eps)
    g = m64 / den
    gm1 = (m64 - den) / den
    rel = torch.where(nu.nu > eps, nu.rel_bound, torch.zeros_like(nu.nu))
    return ScaleTruth(g, gm1, g.abs() * (rel * (1 + 2 * rel) + 3 * U64))


def quantisation_floor(truth_hi: torch.Tensor, truth_lo: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
    """|RN_fmt(x) - x| per element: the error of the best possible output in the format."""
    return ((nearest - truth_hi) - truth_lo).abs()


__all__ = [
    "ComposeGradTruth",
    "ComposeTruth",
    "NormTruth",
    "compose_grad_truth",
    "Rounded",
    "ScaleTruth",
    "certified_round",
    "check_scalar_s",
    "compose_truth",
    "quantisation_floor",
    "row_norm_truth",
    "scale_truth",
    "FP32",
]
