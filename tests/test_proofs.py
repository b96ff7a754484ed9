"""Machine checks of proofs/compose_forms.md."""

import random
from fractions import Fraction

import sympy as sp
import torch

from dora_verify.eft import two_prod, two_sum


def test_forms_identity():
    g, s, lora, base, bias = sp.symbols("g s lora base bias")
    naive = g * (s * lora + base) - base
    stable = (g - 1) * base + g * s * lora
    single = g * (base + s * lora) + bias
    assert sp.simplify(naive - stable) == 0
    assert sp.simplify(base + stable + bias - single) == 0


def test_factored_norm_identity():
    d_in, r = 3, 2
    W = sp.Matrix(1, d_in, sp.symbols(f"w0:{d_in}"))
    A = sp.Matrix(r, d_in, sp.symbols(f"a0:{r * d_in}"))
    B = sp.Matrix(1, r, sp.symbols(f"b0:{r}"))
    s = sp.Symbol("s")
    V = W + s * B * A
    lhs = (V * V.T)[0]
    U = W * A.T
    G = A * A.T
    rhs = (W * W.T)[0] + 2 * s * (B * U.T)[0] + s**2 * (B * G * B.T)[0]
    assert sp.expand(lhs - rhs) == 0


def test_sharded_norm_identity():
    """proofs/bounds.md, "Sharded norm": the column partition splits every term of ν² (and the dense row) into a
    sum of per-shard terms; the row partition leaves each row's terms untouched."""
    d_in, r, cut = 5, 2, 2
    W = sp.Matrix(1, d_in, sp.symbols(f"w0:{d_in}"))
    A = sp.Matrix(r, d_in, sp.symbols(f"a0:{r * d_in}"))
    B = sp.Matrix(1, r, sp.symbols(f"b0:{r}"))
    s = sp.Symbol("s")
    parts = [(W[:, :cut], A[:, :cut]), (W[:, cut:], A[:, cut:])]
    assert sp.expand((W * W.T)[0] - sum((w * w.T)[0] for w, _ in parts)) == 0
    assert sp.expand(W * A.T - sum((w * a.T for w, a in parts), sp.zeros(1, r))) == sp.zeros(1, r)
    assert sp.expand(A * A.T - sum((a * a.T for _, a in parts), sp.zeros(r, r))) == sp.zeros(r, r)
    V = W + s * B * A
    dense_parts = [w + s * B * a for w, a in parts]
    assert sp.expand((V * V.T)[0] - sum((v * v.T)[0] for v in dense_parts)) == 0


def test_eft_exact():
    rng = random.Random(0)
    vals = [rng.uniform(-1, 1) * 2.0 ** rng.randint(-60, 60) for _ in range(4000)]
    vals += [1.0, 2.0**-53, -(2.0**52), 3.0, 1 + 2.0**-52, 0.0]
    a = torch.tensor(vals, dtype=torch.float64)
    b = torch.tensor(vals[::-1], dtype=torch.float64)
    s, e = two_sum(a, b)
    p, f = two_prod(a, b)
    for i in range(len(vals)):
        x, y = Fraction(vals[i]), Fraction(vals[::-1][i])
        assert Fraction(s[i].item()) + Fraction(e[i].item()) == x + y
        assert Fraction(p[i].item()) + Fraction(f[i].item()) == x * y


def test_backward_formulas_with_detached_norm():
    """proofs/bounds.md §Backward: with ν detached, ∂y/∂base = g, ∂y/∂lora = g·s, ∂y/∂m = (base + s·lora)/ν,
    and the Δ form gives the same d_m (∂Δ/∂g = base + s·lora when g − 1 comes from the same m)."""
    m, nu, s, base, lora, bias, dy = sp.symbols("m nu s base lora bias dy")
    g = m / nu  # ν is a constant (detached): no ∂ν/∂A, ∂ν/∂B terms
    y = g * (base + s * lora) + bias
    delta = (g - 1) * base + g * s * lora
    assert sp.simplify(sp.diff(y, base) - g) == 0
    assert sp.simplify(sp.diff(y, lora) - g * s) == 0
    assert sp.simplify(sp.diff(y, m) - (base + s * lora) / nu) == 0
    assert sp.simplify(sp.diff(delta, m) - sp.diff(y, m)) == 0
    assert sp.simplify(sp.diff(dy * y, m) - dy * (base + s * lora) / nu) == 0


def test_stable_bound_derivation_terms():
    """proofs/bounds.md §Stable fp32: the first-order error of fl(fl(fl(g−1)·b) + fl(g·fl(s·l))) is
    Σ δ_i·(term_i) with |coefficients| summing to ≤ 3 per unit of |(g−1)b| + |g s l| (γ_3 at first order)."""
    g, b, s, l = sp.symbols("g b s l", real=True)
    d = sp.symbols("d1:6", real=True)
    t1 = (g - 1) * (1 + d[0])
    t2 = t1 * b * (1 + d[1])
    t3 = s * l * (1 + d[2])
    t4 = g * t3 * (1 + d[3])
    v = (t2 + t4) * (1 + d[4])
    exact = (g - 1) * b + g * s * l
    first = sum(sp.diff(v, di).subs({dj: 0 for dj in d}) * di for di in d)
    assert sp.simplify(v.subs({dj: 0 for dj in d}) - exact) == 0
    # δ1, δ2, δ5 multiply (g−1)b; δ3, δ4, δ5 multiply g·s·l: three per term, coefficient 1 each
    assert all(
        sp.simplify(sp.diff(first, di) - ((g - 1) * b * cb + g * s * l * cl)) == 0
        for di, cb, cl in zip(d, [1, 1, 0, 0, 1], [0, 0, 1, 1, 1])
    )
