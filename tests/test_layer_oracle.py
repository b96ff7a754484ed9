"""dora_verify.layer_oracle: the exact whole DoRA layer (tier 1, tier 2, an mpmath cross-check), the bound of
DoRALinear's stated steps across regimes and dtype mixes, the faithful layer contract, and the error decomposition."""

import decimal
import itertools
from fractions import Fraction

import pytest
import sympy as sp
import torch
from torch import nn

from dora_verify.exact import round_fraction
from dora_verify.kernels import DoRALinear, factored_row_norm
from dora_verify.layer_oracle import (
    GRADS,
    LAYER_REGIMES,
    STEPS,
    ExactLayer,
    crosscheck_mpmath,
    doralinear_parts,
    error_decomposition,
    faithful_layer_bounds,
    kernel_layer_steps,
    layer_bound_decomposition,
    layer_example,
    layer_step_bounds,
    layer_truth,
)

MIXES = [("bf16", "bf16"), ("bf16", "fp32"), ("fp16", "fp16"), ("fp32", "fp32")]


def _inputs(ex):
    t = ex.tensors
    return t["x"], t["W"], t["A"], t["B"], t["m"], ex.scalars["s"], t.get("bias"), t["dy"]


# ----------------------------------------------------------------------------- an independent exact layer
def _independent(x, W, A, B, m, s, bias, dy, eps=1e-12, digits=60):
    """The layer in Fractions, with √ in the decimal module (an evaluation independent of dora_verify.exact)."""
    F = lambda t: [[Fraction(v) for v in row] for row in t.double().tolist()]  # noqa: E731
    X, Wf, Af, Bf, DY = F(x), F(W), F(A), F(B), F(dy)
    M = [Fraction(v) for v in m.double().tolist()]
    beta = [Fraction(v) for v in bias.double().tolist()] if bias is not None else [Fraction(0)] * len(M)
    s, eps = Fraction(s), Fraction(float(torch.tensor(eps, dtype=torch.float32)))
    T, K, N, r = len(X), len(X[0]), len(Wf), len(Af)
    V = [[Wf[j][k] + s * sum(Bf[j][q] * Af[q][k] for q in range(r)) for k in range(K)] for j in range(N)]
    ctx = decimal.Context(prec=digits)
    inv = []
    for j in range(N):
        nu2 = sum(v * v for v in V[j])
        nu = Fraction(ctx.sqrt(ctx.divide(decimal.Decimal(nu2.numerator), decimal.Decimal(nu2.denominator))))
        inv.append(1 / max(nu, eps))
    xa = [[sum(X[t][k] * Af[q][k] for k in range(K)) for q in range(r)] for t in range(T)]
    h = [
        [sum(X[t][k] * Wf[j][k] for k in range(K)) + s * sum(xa[t][q] * Bf[j][q] for q in range(r)) for j in range(N)]
        for t in range(T)
    ]
    g = [M[j] * inv[j] for j in range(N)]
    y = [[g[j] * h[t][j] + beta[j] for j in range(N)] for t in range(T)]
    dh = [[g[j] * DY[t][j] for j in range(N)] for t in range(T)]
    dx = [[sum(dh[t][j] * V[j][k] for j in range(N)) for k in range(K)] for t in range(T)]
    dA = [
        [s * sum(Bf[j][q] * dh[t][j] * X[t][k] for j in range(N) for t in range(T)) for k in range(K)] for q in range(r)
    ]
    dB = [[s * sum(dh[t][j] * xa[t][q] for t in range(T)) for q in range(r)] for j in range(N)]
    dm = [sum(DY[t][j] * h[t][j] for t in range(T)) * inv[j] for j in range(N)]
    return {"y": y, "dx": dx, "dA": dA, "dB": dB, "dm": dm}


def _tiny(act, adapter, regime, seed):
    ex = layer_example(act, adapter, 3, 5, 6, 2, 4.0, regime, seed)
    return _inputs(ex)


@pytest.mark.parametrize("act,adapter", MIXES)
@pytest.mark.parametrize("regime", ["trained", "exact_one", "zero_rows", "cancel"])
def test_oracle_matches_an_independent_exact_computation(act, adapter, regime):
    """Tiny cases: every tier-1 value within its bound of the Fraction/decimal layer (ν detached), and y's certified
    rounding equal to the rounding of the independent value."""
    x, W, A, B, m, s, bias, dy = _tiny(act, adapter, regime, 3)
    tr = layer_truth(x, W, A, B, m, s, bias, dy=dy)
    ref = _independent(x, W, A, B, m, s, bias, dy)
    slack = Fraction(1, 10**40)
    for name in ("y", *GRADS):
        val, bound = (tr.y_hi + tr.y_lo, tr.y_bound) if name == "y" else tr.grads[name]
        exact = ref[name]
        for idx in itertools.product(*(range(n) for n in val.shape)):
            e = exact
            for i in idx:
                e = e[i]
            v = (
                Fraction(float(tr.y_hi[idx])) + Fraction(float(tr.y_lo[idx]))
                if name == "y"
                else Fraction(float(val[idx]))
            )
            assert abs(v - e) <= Fraction(float(bound[idx])) + slack * (1 + abs(e)), (name, idx, float(v), float(e))
            if name == "y":
                assert round_fraction(e, act)[2] == float(tr.y_round.nearest[idx]), (idx, float(e))
    assert bool(tr.y_round.certain.all()) and tr.uncertified == 0


def test_g_is_exactly_one_for_a_fresh_adapter_on_exact_norms():
    x, W, A, B, m, s, bias, dy = _inputs(layer_example("bf16", "bf16", 4, 9, 20, 3, 6.0, "exact_one", 0))
    tr = layer_truth(x, W, A, B, m, s, bias, dy=dy)
    assert tr.exact_g_rows == list(range(9))
    assert bool((tr.g == 1).all()) and bool((tr.g_bound == 0).all())
    y = x.double() @ W.double().t() + bias.double()  # g = 1, B = 0: y = x Wᵀ + bias exactly
    assert torch.equal(tr.y_hi + tr.y_lo, y) and bool(tr.y_round.certain.all())


def test_tier2_decides_what_tier1_cannot():
    """Elements tier 1 leaves undecided (its bound straddles a rounding boundary) go to ExactLayer, whose rounding is
    exact; forcing every element through tier 2 gives the same roundings tier 1 certified."""
    x, W, A, B, m, s, bias, dy = _inputs(layer_example("fp32", "fp32", 3, 6, 9, 2, 2.0, "trained", 1))
    tr = layer_truth(x, W, A, B, m, s, bias)
    ex = ExactLayer(x, W, A, B, m, s, bias)
    for t, j in itertools.product(range(3), range(6)):
        down, up, near, val = ex.y_round(t, j, "fp32")
        assert near == float(tr.y_round.nearest[t, j]) and down == float(tr.y_round.down[t, j])
        assert abs(val - float(tr.y[t, j])) <= float(tr.y_bound[t, j]) + 2.0**-52 * abs(val)
    # a case with undecided elements: widen tier 1's bound artificially, then the escalation must settle them
    from dora_verify import layer_oracle as lo

    tr2 = layer_truth(x, W, A, B, m, s, bias, tier2_limit=0)
    assert tr2.uncertified == int((~tr2.y_round.certain).sum())
    orig = lo.certified_round
    try:
        lo.certified_round = lambda hi, lo_, b, fmt: orig(hi, lo_, b * 2.0**40, fmt)
        tr3 = layer_truth(x, W, A, B, m, s, bias)
    finally:
        lo.certified_round = orig
    assert tr3.tier2_elements > 0 and tr3.uncertified == 0
    assert torch.equal(tr3.y_round.nearest, tr.y_round.nearest)


@pytest.mark.parametrize("act,adapter", [("bf16", "bf16"), ("fp32", "fp32"), ("bf16", "fp32")])
def test_mpmath_agrees_with_tier2(act, adapter):
    """mpmath (a declared dependency) at 60 digits, straight from the formulas, agrees with tier 2 to its rounding:
    inside tier 2's enclosures, and the same correctly rounded y."""
    x, W, A, B, m, s, bias, dy = _inputs(layer_example(act, adapter, 4, 7, 11, 3, 6.0, "trained", 5))
    res = crosscheck_mpmath(x, W, A, B, m, s, bias, dy=dy, samples=4, dps=60)
    assert res["checked"] == 4 * 5 and res["mismatches"] == [], res
    assert res["max_rel_gap"] < 1e-50


def test_backward_formulas_with_the_detached_norm():
    """sympy: the oracle's dx, dA, dB, dm are the gradients of Σ dy ⊙ y with ν a constant; leaving ν in the graph adds
    −(m/ν²)(Σ_T dy·h)·∂ν/∂A to dA (what the planted nu_not_detached layer computes)."""
    K, r = 2, 1
    x = sp.Matrix(1, K, sp.symbols("x0:2"))
    W = sp.Matrix(1, K, sp.symbols("w0:2"))
    A = sp.Matrix(r, K, sp.symbols("a0:2"))
    B = sp.Matrix(1, r, [sp.Symbol("b0")])
    m, s, dy, beta, nu_c = sp.symbols("m s dy beta nu_c", positive=True)
    h = (x * W.T + s * (x * A.T) * B.T)[0]
    L = dy * ((m / nu_c) * h + beta)
    dh = dy * m / nu_c
    V = W + s * B * A
    for k in range(K):
        assert sp.simplify(sp.diff(L, x[k]) - dh * V[k]) == 0
        assert sp.simplify(sp.diff(L, A[0, k]) - s * B[0] * dh * x[k]) == 0
    assert sp.simplify(sp.diff(L, B[0]) - s * dh * (x * A.T)[0]) == 0
    assert sp.simplify(sp.diff(L, m) - dy * h / nu_c) == 0
    nu = sp.sqrt((V * V.T)[0])
    L_att = dy * ((m / nu) * h + beta)
    extra = sp.diff(L_att, A[0, 0]) - (s * B[0] * dy * m / nu * x[0])
    assert sp.simplify(extra - (-m / nu**2) * dy * h * sp.diff(nu, A[0, 0])) == 0


# ----------------------------------------------------------------------------- DoRALinear against its derived bound
def _doralinear(ex):
    t, sc = ex.tensors, ex.scalars
    W = t["W"]
    lin = nn.Linear(W.shape[1], W.shape[0], bias="bias" in t, dtype=W.dtype)
    with torch.no_grad():
        lin.weight.copy_(W)
        if "bias" in t:
            lin.bias.copy_(t["bias"])
    layer = DoRALinear(lin, sc["r"], sc["alpha"], adapter_dtype=t["A"].dtype)
    with torch.no_grad():
        layer.lora_A.copy_(t["A"])
        layer.lora_B.copy_(t["B"])
        layer.magnitude.copy_(t["m"])
    return layer


def _run(layer, x, dy):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return {"y": y.detach(), "dx": x.grad, "dA": layer.lora_A.grad, "dB": layer.lora_B.grad, "dm": layer.magnitude.grad}


def _ratios(outs, tr, bounds):
    res = {}
    for name in ("y", *GRADS):
        ref, ob = (tr.y, tr.y_bound) if name == "y" else tr.grads[name]
        err = ((outs[name].double() - ref).abs() - ob).clamp_min(0)
        res[name] = float((err / bounds[name]).max())
    return res


@pytest.mark.parametrize("act,adapter", MIXES)
@pytest.mark.parametrize("regime", ["exact_one", "below_bf16", "cancel", "zero_rows", "large", "positive"])
def test_doralinear_within_its_derived_layer_bound(act, adapter, regime):
    """DoRALinear (CPU: eager tier) forward and backward within layer_step_bounds of its stated steps, in every dtype
    mix and regime — g = 1 exactly, g − 1 below bf16 resolution, near-cancelling rows W ≈ −s·BA, zero rows, large
    activations, all-positive data — and within the faithful layer contract too."""
    ex = layer_example(act, adapter, 9, 33, 65, 4, 8.0, regime, 11)
    x, W, A, B, m, s, bias, dy = _inputs(ex)
    outs = _run(_doralinear(ex), x, dy)
    tr = layer_truth(x, W, A, B, m, s, bias, dy=dy)
    _, info = factored_row_norm(W, A, B, s, return_info=True)
    steps = kernel_layer_steps(act, adapter, "torch", info.recomputed_rows)
    derived = _ratios(outs, tr, layer_step_bounds(steps, x, W, A, B, m, s, bias, dy=dy, truth=tr))
    faithful = _ratios(outs, tr, faithful_layer_bounds(tr, x, W, A, B, s, bias, dy, act, adapter, "fp32"))
    assert max(derived.values()) <= 1.0, derived
    assert max(faithful.values()) <= 1.0, faithful
    if regime == "cancel":
        assert info.recomputed_rows  # the near-cancelling rows took the dense float64 recompute


def test_the_derived_bound_is_not_vacuous():
    """In bf16 the bound is dominated by roundings a round-to-nearest result reaches: the worst y ratio over a few
    cases is above 1/2; a coarser compose step (plain fp32) only widens it; an output off by 2⁻⁶ relative fails."""
    import dataclasses

    worst = 0.0
    for seed in range(3):
        ex = layer_example("bf16", "bf16", 17, 64, 96, 8, 16.0, "trained", seed)
        x, W, A, B, m, s, bias, dy = _inputs(ex)
        tr = layer_truth(x, W, A, B, m, s, bias)
        steps = kernel_layer_steps("bf16", "bf16")
        bound = layer_step_bounds(steps, x, W, A, B, m, s, bias, truth=tr)["y"]
        with torch.no_grad():
            y = _doralinear(ex)(x)
        worst = max(worst, float((((y.double() - tr.y).abs() - tr.y_bound).clamp_min(0) / bound).max()))
    assert 0.5 < worst <= 1.0
    coarse = dataclasses.replace(steps, compose="fp32")
    assert bool((layer_step_bounds(coarse, x, W, A, B, m, s, bias, truth=tr)["y"] >= bound).all())
    off = (y.double() * (1 + 2.0**-6)).to(torch.bfloat16)
    assert float((((off.double() - tr.y).abs() - tr.y_bound).clamp_min(0) / bound).max()) > 1


# ----------------------------------------------------------------------------- decomposition
@pytest.mark.parametrize("act,adapter", [("bf16", "bf16"), ("bf16", "fp32"), ("fp32", "fp32")])
def test_error_decomposition_adds_up_and_each_share_is_within_its_bound(act, adapter):
    """Measured: the steps' shares (every step exact but one) add up to the total error but for the second-order
    cross term, to float64 rounding; each share is within that step's share of the bound; the bound's shares add up
    to the total bound but for second-order terms."""
    ex = layer_example(act, adapter, 16, 48, 96, 8, 16.0, "trained", 2)
    x, W, A, B, m, s, bias, _ = _inputs(ex)
    layer = _doralinear(ex)
    parts = doralinear_parts(layer, x)
    with torch.no_grad():
        assert torch.equal(parts["y"], layer(x))  # the intermediates are what the forward computed
    tr = layer_truth(x, W, A, B, m, s, bias)
    dec = error_decomposition(tr, parts, m, s, B, bias)
    u = tr.y.abs().max() * 2.0**-50
    assert float(dec["residual"].abs().max()) <= float(u)
    assert float(dec["cross"].abs().max()) <= 1e-3 * float(dec["total"].abs().max())
    assert set(dec["ulp"]) >= set(STEPS[:-1]) | {"total"}
    _, info = factored_row_norm(W, A, B, s, return_info=True)
    steps = kernel_layer_steps(act, adapter, "torch", info.recomputed_rows)
    shares = layer_bound_decomposition(steps, x, W, A, B, m, s, bias, truth=tr)
    for k in STEPS[:-1]:
        assert bool((dec[k].abs() <= shares[k] * (1 + 2.0**-6) + tr.y_bound).all()), k
    total = shares["total"]
    summed = sum(shares[k] for k in STEPS[:-1])
    assert bool((total <= summed * (1 + 2.0**-6) + 1e-300).all()) and bool((total >= summed * (1 - 2.0**-6)).all())
    if act == "bf16":  # where bf16's error comes from: the roundings to bf16 of base and y, not the norm or g
        big = {k: float(dec[k].abs().max()) for k in STEPS[:-1]}
        assert big["compose"] > 100 * big["norm"] and big["base"] > 100 * big["scale"]


def test_layer_cases_are_deterministic_and_in_their_regimes():
    a = layer_example("bf16", "fp32", 5, 12, 16, 2, 4.0, "zero_rows", 7)
    b = layer_example("bf16", "fp32", 5, 12, 16, 2, 4.0, "zero_rows", 7)
    for k in a.tensors:
        assert torch.equal(a.tensors[k], b.tensors[k])
    assert a.tensors["A"].dtype == torch.float32 and a.tensors["x"].dtype == torch.bfloat16
    rows = a.params["special_rows"]
    assert rows and bool((a.tensors["W"][rows] == 0).all()) and bool((a.tensors["m"][rows] == 0).all())
    with pytest.raises(ValueError, match="fp32-representable"):
        layer_example("bf16", "bf16", 2, 3, 4, 3, 1.0, "trained", 0)
    with pytest.raises(ValueError, match="unknown layer regime"):
        layer_example("bf16", "bf16", 2, 3, 4, 2, 1.0, "nope", 0)
    assert set(LAYER_REGIMES) >= {"exact_one", "below_bf16", "cancel", "zero_rows", "large"}
