"""Error-free transformations in float64 (vectorised, any torch device).

``two_sum(a, b) -> (s, e)`` with ``s = fl(a + b)`` and ``a + b = s + e`` exactly (Knuth; no ordering
requirement). ``two_prod(a, b) -> (p, e)`` with ``p = fl(a * b)`` and ``a * b = p + e`` exactly (Dekker,
Veltkamp splitting; no FMA needed). Both are exact barring overflow, and ``two_prod`` barring underflow
of the partial products (|a*b| above ~2**-969); callers state where their inputs live.
"""
from __future__ import annotations

import torch

_SPLITTER = 134217729.0  # 2**27 + 1


def two_sum(a: torch.Tensor, b: torch.Tensor):
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, e


def _split(a: torch.Tensor):
    c = _SPLITTER * a
    hi = c - (c - a)
    return hi, a - hi


def two_prod(a: torch.Tensor, b: torch.Tensor):
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    return p, e


def gamma(n: int, u: float = 2.0 ** -53) -> float:
    """Higham's gamma_n = n u / (1 - n u): the bound on the relative error of n chained roundings."""
    if n * u >= 1:
        raise ValueError("gamma_n undefined for n*u >= 1")
    return n * u / (1 - n * u)
