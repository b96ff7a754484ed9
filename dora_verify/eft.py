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


def sum2(x: torch.Tensor, dim: int = 0):
    """Compensated sum of float64 ``x`` along ``dim`` (a pairwise TwoSum tree; the rounding errors are
    summed separately and added back). Returns (sum, bound) with |sum − exact| ≤ bound =
    u|sum| + γ_{L}²·Σ|x| (L = tree depth + 1; Ogita–Rump–Oishi, Sum2), vectorised over the other dims."""
    x = x.movedim(dim, 0)
    mag = x.abs().sum(0)
    err = torch.zeros_like(x[0]) if x.shape[0] else torch.zeros(x.shape[1:], dtype=x.dtype, device=x.device)
    depth = 0
    while x.shape[0] > 1:
        if x.shape[0] % 2:
            x = torch.cat([x, torch.zeros_like(x[:1])])
        s, e = two_sum(x[0::2], x[1::2])
        err = err + e.sum(0)
        x = s
        depth += 1
    total = (x[0] if x.shape[0] else torch.zeros_like(err)) + err
    L = depth + 2
    return total, 2.0**-53 * total.abs() + (gamma(L) ** 2 + gamma(L) * 2.0**-53) * mag * 2


def gamma(n: int, u: float = 2.0**-53) -> float:
    """Higham's gamma_n = n u / (1 - n u): the bound on the relative error of n chained roundings."""
    if n * u >= 1:
        raise ValueError("gamma_n undefined for n*u >= 1")
    return n * u / (1 - n * u)
