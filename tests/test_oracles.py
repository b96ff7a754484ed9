"""Oracles: tier 1 (float64 double-double + bounds) agrees with tier 2 (exact rationals) within its bound,
including g = 1 exactly, g = 1 + δ below bf16 resolution, fp32 inputs and ill-conditioned rows."""

from fractions import Fraction

import numpy as np
import pytest
import torch

from dora_verify.cases import make_case
from dora_verify.exact import ExactRowNorm, compose_exact, round_fraction
from dora_verify.oracles import certified_round, compose_truth, row_norm_truth, scale_truth


def _inputs(dtype, T=24, N=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(T, N, generator=g) * 3).to(dtype)
    lora = torch.randn(T, N, generator=g).to(dtype)
    return base, lora


G_CASES = {
    "g_is_1": lambda n, gen: torch.ones(n),
    "below_bf16": lambda n, gen: 1 + torch.randn(n, generator=gen) * 1e-6,
    "trained": lambda n, gen: 1 + torch.randn(n, generator=gen) * 1.5e-3,
    "wide": lambda n, gen: torch.rand(n, generator=gen) * 3,
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("gname", list(G_CASES))
@pytest.mark.parametrize("with_bias", [False, True])
def test_compose_tier1_within_bound_of_exact(dtype, gname, with_bias):
    base, lora = _inputs(dtype)
    gen = torch.Generator().manual_seed(1)
    g = G_CASES[gname](base.shape[1], gen).float()
    bias = torch.randn(base.shape[1], generator=gen).to(dtype) if with_bias else None
    s = 0.3125
    tr = compose_truth(base, lora, g, s, bias)
    for t in range(0, base.shape[0], 3):
        for c in range(0, base.shape[1], 3):
            y, d = compose_exact(
                base[t, c].item(), lora[t, c].item(), g[c].item(), s, bias[c].item() if bias is not None else 0.0
            )
            for hi, lo, b, rnd, exact in (
                (tr.y_hi, tr.y_lo, tr.y_bound, tr.y_round, y),
                (tr.d_hi, tr.d_lo, tr.d_bound, tr.d_round, d),
            ):
                assert abs(Fraction(hi[t, c].item()) + Fraction(lo[t, c].item()) - exact) <= Fraction(b[t, c].item())
                dn, up, near = round_fraction(exact, tr.fmt)
                assert (rnd.down[t, c].item(), rnd.up[t, c].item(), rnd.nearest[t, c].item()) == (dn, up, near)
    assert tr.uncertified == 0


def test_bf16_inputs_give_exact_tier1_at_g_1():
    base, lora = _inputs(torch.bfloat16)
    tr = compose_truth(base, lora, torch.ones(base.shape[1]), 0.5)
    assert float(tr.y_bound.max()) == 0.0 and float(tr.d_bound.max()) == 0.0
    assert bool(tr.y_round.certain.all())


def test_certified_round_escalates_ambiguous_elements():
    # x = hi + lo with hi exactly a bf16 midpoint and lo tiny but uncertain: tier 1 must not decide.
    hi = torch.tensor([1 + 2**-8, 1 + 2**-8, 1.5], dtype=torch.float64)
    lo = torch.tensor([2**-70, 2**-60, 0.0], dtype=torch.float64)
    b = torch.tensor([2**-60, 2**-70, 2**-80], dtype=torch.float64)
    r = certified_round(hi, lo, b, "bf16")
    assert r.certain.tolist() == [False, True, False]
    assert r.nearest[1].item() == 1 + 2**-7  # just above the midpoint


def test_exact_tie_is_decided_by_tier1_to_even():
    base = torch.tensor([[1 + 2**-8]], dtype=torch.float32)  # a bf16 midpoint, represented exactly
    tr = compose_truth(base, torch.zeros(1, 1), torch.ones(1), 1.0, out_fmt="bf16")
    assert tr.y_round.nearest.item() == 1.0 and tr.tier2_elements == 0


def test_undecided_elements_escalate_to_exact_rationals(monkeypatch):
    import dora_verify.oracles as O

    real = O.certified_round

    def undecided(hi, lo, b, fmt):
        r = real(hi, lo, b, fmt)
        r.certain[:] = False
        return r

    monkeypatch.setattr(O, "certified_round", undecided)
    base, lora = _inputs(torch.float32, T=4, N=6)
    g = 1 + torch.randn(6, generator=torch.Generator().manual_seed(2)) * 1e-3
    tr = O.compose_truth(base, lora, g, 0.75, out_fmt="bf16")
    assert tr.tier2_elements == 24 and tr.uncertified == 0
    for t in range(4):
        for c in range(6):
            y, d = compose_exact(base[t, c].item(), lora[t, c].item(), g[c].item(), 0.75)
            assert tr.y_hi[t, c].item() == float(y) and tr.d_hi[t, c].item() == float(d)
            assert (
                tr.y_round.down[t, c].item(),
                tr.y_round.up[t, c].item(),
                tr.y_round.nearest[t, c].item(),
            ) == round_fraction(y, "bf16")
    limited = O.compose_truth(base, lora, g, 0.75, out_fmt="bf16", tier2_limit=5)
    assert limited.tier2_elements == 5 and limited.uncertified == 19


def test_compose_rejects_bad_input():
    base, lora = _inputs(torch.bfloat16)
    g = torch.ones(base.shape[1])
    with pytest.raises(ValueError, match="one shape"):
        compose_truth(base, lora[:, :5], g, 0.5)
    with pytest.raises(ValueError, match="g must be"):
        compose_truth(base, lora, g[:3], 0.5)
    bad = base.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        compose_truth(bad, lora, g, 0.5)
    with pytest.raises(ValueError, match="fp32-representable"):
        compose_truth(base, lora, g, 0.1)


@pytest.mark.parametrize("regime", ["trained", "near_cancel", "zero_rows", "all_positive"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_norm_tier1_within_bound_of_exact(regime, dtype):
    case = make_case(regime, 48, 96, 8, 1, dtype, seed=3, s=2.0)
    tr = row_norm_truth(case.W, case.A, case.B, case.s, escalate_rel=1.0)  # tier 1 only
    ex = ExactRowNorm(case.A.double().numpy(), case.s)
    for i in list(range(0, 48, 5)) + case.special_rows:
        v, _ = ex.row(case.W[i].double().numpy(), case.B[i].double().numpy())
        assert abs(tr.nu[i].item() - v) <= tr.bound[i].item() + abs(v) * 2**-52, (i, tr.nu[i].item(), v)


def test_norm_escalates_ill_conditioned_rows_to_exact():
    case = make_case("near_cancel", 64, 128, 8, 1, "fp32", seed=1, s=2.0)
    tr = row_norm_truth(case.W, case.A, case.B, case.s)
    assert set(tr.tier2_rows) <= set(case.special_rows) and tr.tier2_rows, "near-cancelling fp32 rows need tier 2"
    ex = ExactRowNorm(case.A.double().numpy(), case.s)
    for i in tr.tier2_rows:
        v, _ = ex.row(case.W[i].double().numpy(), case.B[i].double().numpy())
        assert tr.nu[i].item() == v
    assert float(tr.rel_bound.max()) <= 2.0**-40


def test_exact_row_norm_hand_case():
    # W = [3, 0], A = [[0, 1]], B = [[2]], s = 2: row = [3, 4] -> 5
    ex = ExactRowNorm(np.array([[0.0, 1.0]]), 2.0)
    v, sq = ex.row(np.array([3.0, 0.0]), np.array([2.0]))
    assert v == 5.0 and sq == 25


def test_zero_rows_and_scale():
    case = make_case("zero_rows", 32, 64, 4, 1, "bf16", seed=0, s=2.0)
    tr = row_norm_truth(case.W, case.A, case.B, case.s)
    assert all(tr.nu[i].item() == 0.0 and tr.bound[i].item() == 0.0 for i in case.special_rows)
    m = torch.ones(32)
    sc = scale_truth(m, tr, eps=1e-12)
    assert all(sc.g[i].item() == 1e12 for i in case.special_rows)
    assert torch.allclose(sc.g_minus_1, sc.g - 1, rtol=1e-12, atol=0)
