"""dora_verify.bounds: every a-priori bound holds (error/bound ≤ 1) on the case generators, is not vacuous
(the worst ratio is within a few orders of 1), and has teeth (a form's output checked against a tighter
form's bound fails)."""

import pytest
import torch

from dora_verify import bounds
from dora_verify.cases import make_case
from dora_verify.forms import COMPOSE_FORMS, factored_fp32
from dora_verify.kernels import compose
from dora_verify.oracles import compose_truth, row_norm_truth

REGIMES = ["fresh", "trained", "large_activations", "all_positive", "heavy_tailed", "zero_rows"]
G_SHIFTS = [None, 0.0, 2.0**-12, 1e-6, -3e-3]


def _cases(dtype):
    for regime in REGIMES:
        c = make_case(regime, 67, 40, 4, 48, dtype=dtype, seed=3)
        base, lora = c.compose_inputs()
        if not (torch.isfinite(base).all() and torch.isfinite(lora).all()):
            continue
        bias = torch.randn(67, generator=torch.Generator().manual_seed(2)).to(base.dtype)
        for shift in G_SHIFTS:
            g = c.g if shift is None else torch.full_like(c.g, 1 + shift)
            yield regime, shift, base, lora, g, c.s, bias


def _ratio(got, hi, lo, oracle_bound, bound):
    err = (got.double() - hi - lo).abs() - oracle_bound  # the oracle's own error is given to the form
    return torch.where(err <= 0, torch.zeros_like(err), err / bound).max().item()


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("form", sorted(COMPOSE_FORMS))
def test_compose_form_bounds_hold(form, dtype):
    worst = 0.0
    for regime, shift, base, lora, g, s, bias in _cases(dtype):
        for b in (None, bias):
            y, d = COMPOSE_FORMS[form].fn(base, lora, g, s, b)
            t = compose_truth(base, lora, g, s, b)
            bd, by = bounds.compose_form_bounds(form, base, lora, g, s, b)
            rd = _ratio(d, t.d_hi, t.d_lo, t.d_bound, bd)
            ry = _ratio(y, t.y_hi, t.y_lo, t.y_bound, by)
            assert rd <= 1.0 and ry <= 1.0, (form, regime, shift, b is not None, rd, ry)
            worst = max(worst, rd, ry)
    assert worst >= 1e-3, f"{form}: the bound is vacuous on these cases (worst ratio {worst:.2e})"


@pytest.mark.parametrize("tier", ["eager"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_compose_kernel_bound_holds(tier, dtype):
    for regime, shift, base, lora, g, s, bias in _cases(dtype):
        y = compose(base, lora, g, s, bias, tier=tier)
        t = compose_truth(base, lora, g, s, bias)
        _, by = bounds.compose_kernel_bounds(base, lora, g, s, bias)
        assert _ratio(y, t.y_hi, t.y_lo, t.y_bound, by) <= 1.0, (regime, shift)


def test_bounds_have_teeth():
    """The naive form's Δ at g ≈ 1 violates the stable fp32 form's bound: the check can fail."""
    c = make_case("trained", 67, 40, 4, 48, dtype="bf16", seed=3)
    base, lora = c.compose_inputs()
    g = torch.full_like(c.g, 1 + 2.0**-12)
    _, d = COMPOSE_FORMS["naive"].fn(base, lora, g, c.s)
    t = compose_truth(base, lora, g, c.s)
    bd, _ = bounds.compose_form_bounds("stable_fp32", base, lora, g, c.s)
    assert _ratio(d, t.d_hi, t.d_lo, t.d_bound, bd) > 1.0


def test_bound_is_not_relative_at_exact_zero():
    """Fresh adapter (g = 1, lora = 0): Δ is exactly 0; the stable forms' bounds allow only underflow-size
    error there, and the forms return exactly 0."""
    c = make_case("fresh", 67, 40, 4, 48, dtype="bf16", seed=3)
    base, _ = c.compose_inputs()
    z = torch.zeros_like(base)
    one = torch.ones_like(c.g)
    for form in ("stable_fp32", "stable_gcast"):
        _, d = COMPOSE_FORMS[form].fn(base, z, one, c.s)
        bd, _ = bounds.compose_form_bounds(form, base, z, one, c.s)
        assert torch.equal(d, torch.zeros_like(d))
        assert float(bd.max()) < 1e-30


@pytest.mark.parametrize("kind", ["worst", "probabilistic"])
@pytest.mark.parametrize("regime", ["trained", "all_positive", "heavy_tailed", "near_cancel", "zero_rows"])
def test_factored_norm_bound_holds(kind, regime):
    c = make_case(regime, 64, 96, 8, 4, dtype="bf16", seed=5)
    nu = factored_fp32(c.W, c.A, c.B, c.s)
    tr = row_norm_truth(c.W, c.A, c.B, c.s)
    bound = bounds.factored_norm_bound(c.W, c.A, c.B, c.s, tr.nu, kind)
    err = ((nu.double() - tr.nu).abs() - tr.bound).clamp_min(0)
    assert bool((err <= bound).all()), float((err / bound).max())
    if kind == "probabilistic":  # tighter than the worst case
        assert bool((bound <= bounds.factored_norm_bound(c.W, c.A, c.B, c.s, tr.nu, "worst") * (1 + 1e-12)).all())


def test_gamma():
    assert bounds.gamma(1, 2.0**-24) == pytest.approx(2.0**-24, rel=1e-6)
    assert bounds.gamma(2**24, 2.0**-24) == float("inf")
    assert bounds.gamma_prob(10000, 2.0**-24) < bounds.gamma(10000, 2.0**-24)


def test_bad_kind_raises():
    c = make_case("trained", 8, 16, 2, 4, dtype="bf16", seed=1)
    with pytest.raises(ValueError, match="kind"):
        bounds.factored_norm_bound(c.W, c.A, c.B, c.s, torch.ones(8, dtype=torch.float64), "typical")
    with pytest.raises(ValueError, match="form"):
        bounds.compose_form_bounds("fancy", *c.compose_inputs(), c.g, c.s)


# ----------------------------------------------------------------------------- production kernels beyond the compose
def _norm_case(regime, dtype="bf16"):
    from dora_verify.kernels import factored_row_norm

    c = make_case(regime, 64, 96, 8, 40, dtype=dtype, seed=5)
    nu, info = factored_row_norm(c.W, c.A, c.B, c.s, return_info=True)
    tr = row_norm_truth(c.W, c.A, c.B, c.s)
    return c, nu, info, tr


@pytest.mark.parametrize("regime", ["trained", "all_positive", "heavy_tailed", "near_cancel", "zero_rows"])
def test_kernel_norm_scale_and_dm_bounds_hold(regime):
    """ν (torch backend here; the GPU run certifies the Triton one), g, g − 1 and d_m under their bounds."""
    from dora_verify.kernels import dora_scale
    from dora_verify.kernels.compose import SAVE_INPUTS, compose_backward_eager
    from dora_verify.oracles import compose_grad_truth

    c, nu, info, tr = _norm_case(regime)
    nb = bounds.kernel_norm_bound(c.W, c.A, c.B, c.s, tr.nu, "torch", info.recomputed_rows)
    err = ((nu.double() - tr.nu).abs() - tr.bound).clamp_min(0)
    assert float((err / nb).max()) <= 1.0
    if regime == "near_cancel":  # the dense rows' bound is the tight one (the fp32 store dominates it)
        assert info.recomputed_rows and float((err / nb)[info.recomputed_rows].max()) > 0.1
    eps32 = float(torch.tensor(1e-12, dtype=torch.float32))
    nux = tr.nu.clamp_min(eps32)
    base, lora = c.compose_inputs()
    dy = torch.randn(base.shape, generator=torch.Generator().manual_seed(7)).to(base.dtype)
    for m in (nu.clone(), (tr.nu * (1 + 1e-3)).float(), (tr.nu * (1 + 1e-7)).float()):
        g, gm1 = dora_scale(m, nu)
        bg, bgm1 = bounds.scale_bounds(m, nu, tr.nu, nb + tr.bound, 1e-12)
        assert float(((g.double() - m.double() / nux).abs() / bg).max()) <= 1.0
        assert float(((gm1.double() - (m.double() - nux) / nux).abs() / bgm1).max()) <= 1.0
        _, _, dg = compose_backward_eager(
            dy, base, lora, None, g, None, c.s, False, SAVE_INPUTS, base.dtype, lora.dtype, False, False, True
        )
        mm = m.clone().requires_grad_()
        dora_scale(mm, nu)[0].backward(dg)  # d_m as autograd forms it from d_g
        gt = compose_grad_truth(dy, base, lora, g, c.s)
        _, _, eg = bounds.compose_backward_bounds(dy, base, lora, g, c.s)
        bd = bounds.dm_bound(dg, eg + gt.d_g_bound, nu, tr.nu, nb + tr.bound, 1e-12)
        assert float(((mm.grad.double() - gt.d_g / nux).abs() / bd).max()) <= 1.0


def test_kernel_norm_bound_has_teeth():
    """The paper's norm (fp32 factored, result cast to bf16) violates the kernel's bound: the check can fail."""
    from dora_verify.forms import NORM_FORMS

    c, nu, info, tr = _norm_case("trained")
    nb = bounds.kernel_norm_bound(c.W, c.A, c.B, c.s, tr.nu, "torch", info.recomputed_rows)
    bad = NORM_FORMS["factored_fp32_castout"].fn(c.W, c.A, c.B, c.s).double()
    assert float(((bad - tr.nu).abs() / nb).max()) > 1.0


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("save", ["inputs", "activation"])
def test_compose_backward_bounds_hold(dtype, save):
    from dora_verify.kernels.compose import SAVE_ACTIVATION, SAVE_INPUTS, compose_backward_eager
    from dora_verify.oracles import compose_grad_truth

    worst = 0.0
    for regime, shift, base, lora, g, s, _ in _cases(dtype):
        dy = torch.randn(base.shape, generator=torch.Generator().manual_seed(11)).to(base.dtype)
        inner = (base.double() + lora.double() * s).to(base.dtype) if save == "activation" else None
        db, dl, dg = compose_backward_eager(
            dy,
            base,
            lora,
            inner,
            g,
            None,
            s,
            False,
            SAVE_INPUTS if save == "inputs" else SAVE_ACTIVATION,
            base.dtype,
            lora.dtype,
            True,
            True,
            True,
        )
        t = compose_grad_truth(dy, base, lora, g, s)
        eb, el, eg = bounds.compose_backward_bounds(dy, base, lora, g, s, save=save)
        rb = float(((db.double() - t.d_base).abs() / eb).max())
        rl = float((((dl.double() - t.d_lora_hi) - t.d_lora_lo).abs() / el).max())
        rg = float((((dg.double() - t.d_g).abs() - t.d_g_bound).clamp_min(0) / eg).max())
        assert max(rb, rl, rg) <= 1.0, (regime, shift, rb, rl, rg)
        worst = max(worst, rb, rl, rg)
    assert worst > 0.3  # tight: the final roundings reach their bound


def test_lora_compose_bound_holds():
    from dora_verify.kernels import lora_compose

    for regime in ("trained", "all_positive", "large_activations", "heavy_tailed"):
        c = make_case(regime, 64, 96, 8, 40, dtype="bf16", seed=5)
        base, _ = c.compose_inputs()
        xa = (c.x.float() @ c.A.float().t()).to(torch.bfloat16)
        y = lora_compose(base, xa, c.B, c.g, c.s, tier="eager")
        lora_hat = torch.nn.functional.linear(xa, c.B)
        bd = bounds.lora_compose_bounds(base, xa, c.B, c.g, c.s, lora_hat)
        yt = c.g.double() * (base.double() + c.s * (xa.double() @ c.B.double().t()))
        assert float(((y.double() - yt).abs() / bd).max()) <= 1.0, regime
