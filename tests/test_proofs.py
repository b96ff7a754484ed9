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
    rhs = (W * W.T)[0] + 2 * s * (B * U.T)[0] + s ** 2 * (B * G * B.T)[0]
    assert sp.expand(lhs - rhs) == 0


def test_eft_exact():
    rng = random.Random(0)
    vals = [rng.uniform(-1, 1) * 2.0 ** rng.randint(-60, 60) for _ in range(4000)]
    vals += [1.0, 2.0 ** -53, -(2.0 ** 52), 3.0, 1 + 2.0 ** -52, 0.0]
    a = torch.tensor(vals, dtype=torch.float64)
    b = torch.tensor(vals[::-1], dtype=torch.float64)
    s, e = two_sum(a, b)
    p, f = two_prod(a, b)
    for i in range(len(vals)):
        x, y = Fraction(vals[i]), Fraction(vals[::-1][i])
        assert Fraction(s[i].item()) + Fraction(e[i].item()) == x + y
        assert Fraction(p[i].item()) + Fraction(f[i].item()) == x * y
