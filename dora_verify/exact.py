"""Tier 2 of the oracle: exact rational arithmetic on the rounded inputs.

Every binary floating-point value is a dyadic rational, so DoRA's compose (products and sums) is exact
in Python's ``Fraction``/``int``, and the row norm is exact up to one square root, which is taken with
``math.isqrt`` on a 240-bit-or-more integer (relative error < 2**-119 before the final rounding to
float64). This tier is slow (Python integers) and used on sampled rows, small cases and every element
that tier 1 could not certify.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from .formats import FloatFormat, parse_format


def round_fraction(y: Fraction, fmt: "FloatFormat | str"):
    """Exact round-to-nearest-even of a rational into ``fmt``: returns floats (down, up, nearest),
    the two enclosing ``fmt`` values and the correctly rounded one (±inf on overflow)."""
    fmt = parse_format(fmt)
    if y == 0:
        return 0.0, 0.0, 0.0
    sign = 1 if y > 0 else -1
    a = abs(y)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:  # e = floor(log2 a)
        e -= 1
    e = max(e, fmt.emin)
    scale = Fraction(2) ** (e - fmt.p + 1)
    q = a / scale
    fl = q.numerator // q.denominator
    frac = q - fl
    lo, hi = fl, fl if frac == 0 else fl + 1
    if frac > Fraction(1, 2) or (frac == Fraction(1, 2) and fl % 2 == 1):
        near = fl + 1
    else:
        near = fl

    def to_float(k: int) -> float:
        v = Fraction(k) * scale
        return math.inf if v > Fraction(fmt.max_finite) else float(v)

    vals = [sign * to_float(k) for k in (lo, hi, near)]
    down, up = (vals[0], vals[1]) if sign > 0 else (vals[1], vals[0])
    return down, up, vals[2]


def compose_exact(base: float, lora: float, g: float, s: float, bias: float = 0.0, g_minus_1: "float | None" = None):
    """Exact (y, Δ) of one element as Fractions: y = g (base + s lora) + bias, Δ = (g-1) base + g s lora
    (with ``g_minus_1`` in place of g − 1 when given)."""
    fb, fl_, fg, fs = Fraction(base), Fraction(lora), Fraction(g), Fraction(s)
    inner = fb + fs * fl_
    gm1 = fg - 1 if g_minus_1 is None else Fraction(g_minus_1)
    return fg * inner + Fraction(bias), gm1 * fb + fg * fs * fl_


def _dyadic_ints(values: np.ndarray):
    """Exact integers n_j and one exponent E with values_j = n_j * 2**E (Python ints, object array)."""
    v = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(v)):
        raise ValueError("exact arithmetic needs finite inputs")
    mant, ex = np.frexp(v)
    m53 = (mant * 2.0**53).astype(np.int64)  # exact: |mant| < 1 has <= 53 significant bits
    ex = ex.astype(np.int64) - 53
    nz = m53 != 0
    E = int(ex[nz].min()) if nz.any() else 0
    out = np.empty(v.shape, dtype=object)
    flat_m, flat_e, flat_o = m53.ravel(), ex.ravel(), out.reshape(-1)
    for j in range(flat_m.size):
        m = int(flat_m[j])
        flat_o[j] = (m << int(flat_e[j] - E)) if m else 0
    return out, E


class ExactRowNorm:
    """Exact ν_i = ‖W_i + s (B A)_i‖₂ for selected rows, with A (and s) prepared once.

    ``row(w_row, b_row)`` returns ``(nu, nu_sq)``: ``nu`` is float64 within one float64 rounding of the
    exact value (relative error <= 2**-52), ``nu_sq`` the exact square as a Fraction."""

    def __init__(self, A: np.ndarray, s: float):
        A = np.asarray(A, dtype=np.float64)
        self.r, self.d_in = A.shape
        self.a_int, self.ea = _dyadic_ints(A)
        (s_int,), self.es = _dyadic_ints(np.array([s]))
        self.s_int = s_int

    def row(self, w_row: np.ndarray, b_row: np.ndarray):
        w_int, ew = _dyadic_ints(np.asarray(w_row, dtype=np.float64))
        b_int, eb = _dyadic_ints(np.asarray(b_row, dtype=np.float64))
        p_int = np.dot(b_int, self.a_int) if self.r else np.zeros(self.d_in, dtype=object)
        e_p = self.es + self.ea + eb  # exponent of s * P
        e0 = min(ew, e_p)
        sw, sp = ew - e0, e_p - e0
        n = 0
        for wj, pj in zip(w_int, p_int):
            vj = (int(wj) << sw) + ((self.s_int * int(pj)) << sp)
            n += vj * vj
        nu_sq = Fraction(n) * Fraction(2) ** (2 * e0)
        return _sqrt_scaled(n, e0), nu_sq


def _sqrt_scaled(n: int, e: int) -> float:
    """sqrt(n) * 2**e as float64 (n >= 0 integer), from an integer square root of >= 240 bits."""
    if n == 0:
        return 0.0
    k = max(0, (240 - n.bit_length()) // 2 + 1)
    root = math.isqrt(n << (2 * k))  # floor(sqrt(n) * 2**k)
    return math.ldexp(float(root), e - k)
