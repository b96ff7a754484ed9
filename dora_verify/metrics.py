"""Error metrics of an approximation against an oracle reference.

Every metric compares the approximation with the *exact* value of the rounded inputs (``hi + lo`` from an
oracle), never with another low-precision result. Definitions (x exact, a approximation, fmt the format
the approximation is stored in):

* ``max_abs``, ``rmse``: of a - x. ``normwise_rel``: ‖a - x‖₂ / ‖x‖₂ (0 when both vanish).
* ``max_rel``: componentwise max |a - x| / max(|x|, floor), floor = fmt's smallest normal by default.
* ``ulp_error``: |a - x| / ulp_fmt(x) with Goldberg's ulp at the exact value; ``max_ulp``, ``p99_ulp``,
  ``mean_signed_ulp`` (the bias, in ulps) derive from it. 0.5 means correctly rounded at worst.
* ``frac_correctly_rounded``: a equals RN_fmt(x) (certified by the oracle); ``frac_faithful``: a is one
  of the two fmt values enclosing x.
* ``bits_lost``: log2(max_ulp / 0.5), clipped at 0: bits lost beyond correct rounding.
* ``cosine``: ⟨a, x⟩ / (‖a‖ ‖x‖).
* ``floor_ratio``: max_abs / max |RN_fmt(x) - x| (the FlashAttention-paper convention: 1 = as good as
  storing the exact answer in fmt).
* ``bound_ratio``: |a - x| / bound per element for an a-priori bound; reported as max and p99.
* ``nonfinite_mismatch``: elements where a and x disagree on being finite (NaN/Inf handling).
* ``max_ulp_terms`` (given the magnitude of the summands, ``terms``): |a − x| / ulp_fmt(max(|x|,
  terms)) — the error in ulps of the largest quantity the computation handles. Where x is near 0 by cancellation the
  plain ulp error grows without bound (and with the number of elements sampled) while this one stays put.
* ``ulp_hist`` (with ``histograms``): counts of the ulp error in the bins ≤ 0.5, (0.5, 1], (1, 2], ... of
  :data:`ULP_BIN_EDGES`, the last bin open; ``ulp_terms_hist`` the same of the terms-relative ulp error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .formats import FloatFormat, parse_format, ulp, ulp_distance  # noqa: F401  (re-export)
from .oracles import Rounded


ULP_BIN_EDGES = (0.5, 1.0, 2.0, 4.0, 16.0, 64.0, 256.0, 4096.0)  # ulp-error histogram bins (last bin: > 4096)


def ulp_histogram(uerr: torch.Tensor) -> list:
    """Counts of ``uerr`` in (-inf, 0.5], (0.5, 1], …, (256, 4096], (4096, inf) — len(ULP_BIN_EDGES) + 1 bins."""
    edges = torch.tensor(ULP_BIN_EDGES, dtype=torch.float64, device=uerr.device)
    idx = torch.bucketize(uerr.flatten().to(torch.float64), edges, right=False)
    return [int(c) for c in torch.bincount(idx, minlength=len(ULP_BIN_EDGES) + 1).cpu()]


@dataclass
class Reference:
    """An oracle value x = hi + lo (float64), its own error bound, and (optionally) its certified
    rounding into ``fmt``."""

    hi: torch.Tensor
    lo: torch.Tensor
    oracle_bound: torch.Tensor
    fmt: FloatFormat
    rounded: "Rounded | None" = None

    @property
    def value(self) -> torch.Tensor:
        return self.hi + self.lo


def abs_error(approx: torch.Tensor, ref: Reference) -> torch.Tensor:
    """|a - x| in float64 (a - hi first: both close, so the difference is nearly exact)."""
    return ((approx.to(torch.float64) - ref.hi) - ref.lo).abs()


def excess_error(approx: torch.Tensor, hi: torch.Tensor, lo, oracle_bound) -> torch.Tensor:
    """(|a − (hi + lo)| − oracle bound)⁺ in float64: the error certainly made, beyond the oracle's own uncertainty."""
    return (((approx.to(torch.float64) - hi) - lo).abs() - oracle_bound).clamp_min(0)


def bound_ratio(approx: torch.Tensor, ref: "Reference", bound: torch.Tensor) -> float:
    """max_i (|a_i − x_i| − oracle bound_i)⁺ / bound_i over the elements whose exact value x is finite and within
    the format's range: ≤ 1 means every element is within its a-priori ``bound``; 0 where no error was certainly
    made (a zero bound included); inf where a non-finite value stands for a finite x, or an error exceeds a zero
    bound."""
    x = ref.value
    in_range = torch.isfinite(x) & (x.abs() <= ref.fmt.max_finite)
    if bool((in_range & ~torch.isfinite(approx.to(torch.float64))).any()):
        return math.inf
    err = excess_error(approx, ref.hi, ref.lo, ref.oracle_bound)
    ratios = torch.where(err == 0, torch.zeros_like(err), err / bound.to(torch.float64))[in_range]
    return float(ratios.max()) if ratios.numel() else 0.0


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (−0 ≠ +0, NaN payloads compared): what a determinism claim promises."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)) if a.numel() else True


def ulp_error(approx: torch.Tensor, exact: torch.Tensor, fmt) -> torch.Tensor:
    """|a - x| / ulp_fmt(x) (float64). ``exact`` is a float64 tensor of exact values."""
    fmt = parse_format(fmt)
    return (approx.to(torch.float64) - exact).abs() / ulp(exact, fmt)


def bits_lost(max_ulp: float) -> float:
    """Bits lost beyond correct rounding: log2(max_ulp / 0.5), 0 when within half an ulp."""
    if math.isnan(max_ulp):
        return float("nan")
    return max(0.0, math.log2(max_ulp / 0.5)) if max_ulp > 0 else 0.0


def cosine(a: torch.Tensor, x: torch.Tensor) -> float:
    a, x = a.to(torch.float64).flatten(), x.to(torch.float64).flatten()
    na, nx = torch.linalg.vector_norm(a), torch.linalg.vector_norm(x)
    if na == 0 and nx == 0:
        return 1.0
    if na == 0 or nx == 0:
        return 0.0
    return float(torch.dot(a / na, x / nx))


def quantile(t: torch.Tensor, q: float) -> float:
    """The q-quantile (nearest rank) of a tensor of any size (torch.quantile is limited to 2**24)."""
    flat = t.flatten()
    n = flat.numel()
    if n == 0:
        return float("nan")
    k = min(n, max(1, math.ceil(q * n)))
    if flat.is_cuda:  # a sort on the device (CUDA's kthvalue of one huge slice is slow, a copy to the host more so)
        return float(torch.sort(flat).values[k - 1])
    return float(torch.kthvalue(flat, k).values)


def ratio(num: float, den: float) -> float:
    """num / den with 0/0 = 0 and x/0 = inf."""
    if den == 0:
        return 0.0 if num == 0 else float("inf")
    return num / den


def compare(
    approx: torch.Tensor,
    ref: Reference,
    bound: "torch.Tensor | None" = None,
    rel_floor: "float | None" = None,
    terms: "torch.Tensor | None" = None,
    histograms: bool = False,
) -> dict:
    """All metrics of ``approx`` against ``ref`` as a flat dict of floats (JSON-ready). Elements where
    approximation or truth is non-finite are counted in ``nonfinite_mismatch`` (when they disagree)
    and left out of the other metrics. ``terms``: the magnitude of the summands (float64, like ``approx``), for the
    terms-relative ulp metrics; ``histograms``: add the ulp histograms."""
    fmt = ref.fmt
    a64 = approx.to(torch.float64)
    x = ref.value
    finite_a, finite_x = torch.isfinite(a64), torch.isfinite(x)
    all_finite = bool(finite_a.all()) and bool(finite_x.all())
    mismatch = 0 if all_finite else int((finite_a != finite_x).sum())
    diff = (a64 - ref.hi) - ref.lo
    a_given = a64  # NaN/Inf kept: the rounding fractions below count a NaN only where the truth is NaN
    if not all_finite:
        both = finite_a & finite_x
        zero = torch.zeros_like(diff)
        diff, x, a64 = torch.where(both, diff, zero), torch.where(both, x, zero), torch.where(both, a64, zero)
        n = max(1, int(both.sum()))
    else:
        n = max(1, diff.numel())
    err = diff.abs()
    floor = fmt.min_normal if rel_floor is None else rel_floor
    u = ulp(x, fmt)
    uerr = err / u
    empty = err.numel() == 0
    out = {
        "n": int(approx.numel()),
        "max_abs": 0.0 if empty else float(err.max()),
        "rmse": float(torch.sqrt((err * err).sum() / n)),
        "normwise_rel": ratio(float(torch.linalg.vector_norm(err)), float(torch.linalg.vector_norm(x))),
        "max_rel": 0.0 if empty else float((err / torch.clamp(x.abs(), min=floor)).max()),
        "max_ulp": 0.0 if empty else float(uerr.max()),
        "p99_ulp": quantile(uerr, 0.99),
        "mean_ulp": float(uerr.sum() / n),
        "mean_signed_ulp": float((diff / u).sum() / n),
        "cosine": cosine(a64, x),
        "nonfinite_mismatch": mismatch,
        "oracle_bound_max": float(ref.oracle_bound.max()) if ref.oracle_bound.numel() else 0.0,
    }
    out["bits_lost"] = bits_lost(out["max_ulp"])
    no_bins = [0] * (len(ULP_BIN_EDGES) + 1)
    if histograms:
        out["ulp_hist"] = ulp_histogram(uerr) if not empty else no_bins
    if terms is not None:
        t = terms.to(torch.float64)
        if not all_finite:
            t = torch.where(both, t, torch.zeros_like(t))
        ut = err / ulp(torch.maximum(x.abs(), t.abs()), fmt)
        out["max_ulp_terms"] = 0.0 if empty else float(ut.max())
        if histograms:
            out["ulp_terms_hist"] = ulp_histogram(ut) if not empty else no_bins
    if ref.rounded is not None:
        r = ref.rounded
        both_nan = torch.isnan(a_given) & torch.isnan(r.nearest)
        out["frac_correctly_rounded"] = float(((a_given == r.nearest) | both_nan).sum()) / max(1, a64.numel())
        out["frac_faithful"] = float(((a_given == r.down) | (a_given == r.up) | both_nan).sum()) / max(1, a64.numel())
        floor_err = ((r.nearest - ref.hi) - ref.lo).abs()
        out["floor_max_abs"] = float(floor_err.max()) if floor_err.numel() else 0.0
        out["floor_ratio"] = ratio(out["max_abs"], out["floor_max_abs"])
    if bound is not None:
        br = torch.where(err == 0, torch.zeros_like(err), err / bound.to(torch.float64))
        out["bound_ratio_max"] = 0.0 if empty else float(br.max())
        out["bound_ratio_p99"] = quantile(br, 0.99)
    if not empty:
        k = int(uerr.argmax())
        out["worst_index"] = list(divmod(k, approx.shape[-1])) if approx.dim() == 2 else [k]
    return out


def flash_ratio(err_kernel: float, err_baseline: float) -> float:
    """FlashAttention-style ratio: the kernel's error over a plain low-precision baseline's error."""
    return ratio(err_kernel, err_baseline)


def effective_scale_error(approx: torch.Tensor, ref: Reference, inner: torch.Tensor) -> torch.Tensor:
    """Per output column i, the least-squares error of the scale the approximation effectively applied:
    β_i = Σ_t (a − x)_ti · inner_ti / Σ_t inner_ti², for y = g ⊙ inner. Unbiased rounding noise gives
    mean_i β_i ≈ 0; a form that drops the correction (g − 1) gives β_i ≈ −(g_i − 1)."""
    err = (approx.to(torch.float64) - ref.hi) - ref.lo
    inner = inner.to(torch.float64)
    den = (inner * inner).sum(dim=0)
    return torch.where(den > 0, (err * inner).sum(dim=0) / den, torch.zeros_like(den))
