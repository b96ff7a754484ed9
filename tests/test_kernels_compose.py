"""kernels.compose against the oracles: eager tier everywhere, fused tier under the Triton interpreter
(logic checks only: the interpreter truncates fp32→bf16 instead of rounding, so bf16 outputs are held
to the faithful bound, which truncation of a value within 2⁻²³ of y also meets)."""

import math
import os

import pytest
import torch

from dora_verify import bounds
from dora_verify.cases import make_case
from dora_verify.formats import parse_format
from dora_verify.metrics import ulp_error
from dora_verify.oracles import compose_truth
from dora_verify.kernels import compose, dora_scale
from dora_verify.kernels.compose import round_from_f64
from dora_verify.strategies import f32
from dora_verify.kernels.dispatch import HAS_TRITON, Tier, select_tier

TIERS = ["eager"] + (["fused"] if HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1" else [])


def _inputs(regime, dtype, T=24, N=67, seed=0):
    c = make_case(regime, N, 40, 4, T, dtype=dtype, seed=seed)
    base, lora = c.compose_inputs()
    return c, base, lora


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize(
    "regime", ["fresh", "trained", "large_activations", "all_positive", "heavy_tailed", "zero_rows"]
)
def test_y_faithful(tier, dtype, regime):
    c, base, lora = _inputs(regime, dtype)
    if not (torch.isfinite(base).all() and torch.isfinite(lora).all()):
        pytest.skip("the case overflows fp16")
    fmt = parse_format(dtype)
    bias = torch.randn(base.shape[1], generator=torch.Generator().manual_seed(1)).to(base.dtype)
    for g in (c.g, torch.ones_like(c.g), torch.full_like(c.g, 1 + 2**-12), torch.full_like(c.g, 1 - 3e-3)):
        for b in (None, bias):
            y = compose(base, lora, g, c.s, b, tier=tier)
            truth = compose_truth(base, lora, g, c.s, b)
            assert truth.uncertified == 0
            assert y.dtype == base.dtype and y.shape == base.shape
            # contract: ≤ 1 ulp of the output dtype from the exact y of the rounded inputs ...
            assert float(ulp_error(y.double(), truth.y, fmt).max()) <= 1.0
            # ... and correctly rounded away from the epilogue's slack around rounding boundaries
            if not (tier == "fused" and dtype == "bf16"):  # the interpreter truncates fp32 → bf16
                _assert_correctly_rounded(y, truth, base, lora, g, c.s, b, fmt)


def _assert_correctly_rounded(y, truth, base, lora, g, s, bias, fmt):
    """y = RN(exact y) wherever the exact y lies farther than E (bounds.compose_epilogue_slack) from a midpoint
    of the output format's grid (at one, the unrounded v' may fall on either side)."""
    _, slack = bounds.compose_epilogue_slack(base, lora, g, s, bias)
    x = truth.y_hi + truth.y_lo
    wrong = y.double() != truth.y_round.nearest
    near_tie = ((truth.y_hi - (truth.y_round.down + truth.y_round.up) / 2) + truth.y_lo).abs() <= slack + truth.y_bound
    assert not bool((wrong & ~near_tie).any()), (y[wrong & ~near_tie], x[wrong & ~near_tie])


@pytest.mark.parametrize("tier", TIERS)
def test_no_double_rounding(tier):
    """Exact y a hair above a 16-bit midpoint: fp32 rounds it onto the midpoint and a second rounding would
    go to even (the wrong way). Round-to-odd in fp32 keeps the sticky bit. Also the fp16 overflow edge: exact
    |y| just below 65520 (the fp16 overflow threshold) must give ±65504, not ±Inf (a plain fp32 intermediate
    rounds it up to 65520)."""
    s = 1 + 2.0**-22  # s·2⁻¹¹ = 2⁻¹¹ + 2⁻³³: fp32 drops the 2⁻³³
    for dtype, half in ((torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8)):
        if tier == "fused" and dtype == torch.bfloat16:
            continue  # the interpreter truncates fp32 → bf16
        base = torch.tensor([[1.0, -1.0, 2.0]], dtype=dtype)
        lora = torch.tensor([[half, -half, 2 * half]], dtype=dtype)
        one = torch.ones(3)
        y = compose(base, lora, one, s, tier=tier)
        assert y.tolist() == [[1 + 2 * half, -1 - 2 * half, 2 + 4 * half]]
        d = compose(base, lora, one, s, g_minus_1=one, output="delta", tier=tier)  # Δ as given: 1·base + s·lora
        assert d.tolist() == [[1 + 2 * half, -1 - 2 * half, 2 + 4 * half]]
    s = f32(16 / 384**0.5)
    base = torch.tensor([[65504.0, -65504.0]], dtype=torch.float16)
    lora = torch.tensor([[19.59375, -19.59375]], dtype=torch.float16)  # exact y = ±65519.998…
    assert compose(base, lora, torch.ones(2), s, tier=tier).tolist() == [[65504.0, -65504.0]]


def test_round_from_f64_single_rounding():
    v = torch.tensor(
        [
            1 + 2.0**-8 + 2.0**-30,
            -(1 + 2.0**-8 + 2.0**-30),
            1 + 2.0**-8 - 2.0**-30,
            1 + 2.0**-8,
            3.0,
            0.0,
            -0.0,
            math.inf,
            -math.inf,
            1e300,
            2.0**-133 * 1.5,
        ],
        dtype=torch.float64,
    )
    r = round_from_f64(v, torch.bfloat16).double()
    want = [1 + 2.0**-7, -(1 + 2.0**-7), 1.0, 1.0, 3.0, 0.0, -0.0, math.inf, -math.inf, math.inf, 2.0**-132]
    assert r.tolist() == want and math.copysign(1, float(r[6])) == -1
    assert bool(round_from_f64(torch.tensor([math.nan], dtype=torch.float64), torch.bfloat16).isnan().all())
    # below fp32's subnormals: the fp32 value is ±0 but inexact (found by `dora-verify gate`: was NaN)
    tiny = torch.tensor([2.0**-151, -(2.0**-151), 2.0**-149 * 3], dtype=torch.float64)
    for dt in (torch.bfloat16, torch.float16):
        r = round_from_f64(tiny, dt)
        assert r.double().tolist() == [0.0, 0.0, 0.0] and r.view(torch.int16).tolist()[:2] == [0, -32768]
    assert v.to(torch.bfloat16).double()[0] == 1.0  # the plain cast rounds twice (why the helper exists)
    assert torch.equal(round_from_f64(v, torch.float32), v.float())


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_delta_faithful_and_exact_zero(tier, dtype):
    c, base, lora = _inputs("trained", dtype)
    fmt = parse_format(dtype)
    g = c.g
    gm1 = (g.double() - 1).float()  # exact for fp32 g near 1
    d = compose(base, lora, g, c.s, g_minus_1=gm1, output="delta", tier=tier)
    truth = compose_truth(base, lora, g, c.s)
    assert float(ulp_error(d.double(), truth.delta, fmt).max()) <= 1.0
    # fresh adapter: g = 1, lora = 0 -> Δ is exactly 0 and y is exactly base
    z = torch.zeros_like(lora)
    one = torch.ones_like(g)
    assert torch.equal(
        compose(base, z, one, c.s, g_minus_1=torch.zeros_like(g), output="delta", tier=tier), torch.zeros_like(base)
    )
    assert torch.equal(compose(base, z, one, c.s, tier=tier), base)


@pytest.mark.parametrize("tier", TIERS)
def test_sub_resolution_g_is_not_lost(tier):
    """|g − 1| below bf16 resolution still moves y where the exact answer moves (stable_gcast loses it)."""
    T, N = 64, 16
    gen = torch.Generator().manual_seed(3)
    base = (torch.randn(T, N, generator=gen) * 100).to(torch.bfloat16)
    lora = torch.zeros_like(base)
    g = torch.full((N,), 1 + 2**-9 + 2**-10)  # rounds to 1.0 in bf16 (half-spacing there is 2⁻⁸)
    assert float(g[0].to(torch.bfloat16)) == 1.0
    y = compose(base, lora, g, 1.0, tier=tier)
    truth = compose_truth(base, lora, g, 1.0)
    assert float(ulp_error(y.double(), truth.y, parse_format("bf16")).max()) <= 1.0
    if tier == "eager":  # (the interpreter truncates fp32→bf16, which undoes upward moves: logic check only)
        assert not torch.equal(y, base)  # rounding g to bf16 would give g = 1 and y = base


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("save", ["inputs", "activation"])
def test_backward_against_oracle(tier, save):
    c, base, lora = _inputs("trained", "bf16", T=40, N=33)
    m = c.magnitude().clone().requires_grad_()
    nu = c.magnitude() / c.g  # any positive ν works here; g = m/ν
    b_, l_ = base.clone().requires_grad_(), lora.clone().requires_grad_()
    g, _ = dora_scale(m, nu)
    y = compose(b_, l_, g, c.s, save=save, tier=tier)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y.dtype)
    y.backward(dy)
    fmt = parse_format("bf16")
    g64 = g.detach().double()
    assert float(ulp_error(b_.grad.double(), g64 * dy.double(), fmt).max()) <= 1.0  # faithful g·dy
    assert float(ulp_error(l_.grad.double(), g64 * c.s * dy.double(), fmt).max()) <= 1.0
    dg = (dy.double() * (base.double() + c.s * lora.double())).sum(0)
    dm = dg / nu.double().clamp_min(1e-12)
    rel = ((m.grad.double() - dm).abs() / dm.abs()).max()
    if save == "inputs":
        assert rel <= 1e-6  # float64 accumulation of exact products, then fp32 roundings
    else:  # inner rounded to bf16: ≤ 2⁻⁸ Σ|dy·inner| / |d_g|
        bound = (2.0**-8 * (dy.double() * (base.double() + c.s * lora.double())).abs().sum(0) / dg.abs()).max()
        assert rel <= bound


@pytest.mark.parametrize("tier", TIERS)
def test_fp16_activation_save_survives_inner_beyond_fp16_range(tier):
    """fp16 inputs with base + s·lora > 65504 and a small g: y is finite, so d_g must be too. An fp16 saved
    inner would overflow to Inf (found by `dora-verify certify` on the H100); it is kept in bf16."""
    base = torch.tensor([[60000.0, -60000.0, 3.0], [1.0, 2.0, -4.0]], dtype=torch.float16)
    lora = torch.tensor([[30000.0, -30000.0, 1.0], [0.5, 0.25, 2.0]], dtype=torch.float16)
    dy = torch.tensor([[1.0, 0.5, -2.0], [3.0, -1.0, 0.25]], dtype=torch.float16)
    g = torch.tensor([1e-3, 2e-3, 0.75]).requires_grad_()
    y = compose(base, lora, g, 1.0, save="activation", tier=tier)
    assert bool(torch.isfinite(y).all())
    y.backward(dy)
    assert bool(torch.isfinite(g.grad).all()), g.grad
    _, _, eg = bounds.compose_backward_bounds(dy, base, lora, g.detach(), 1.0, save="activation")
    exact = (dy.double() * (base.double() + lora.double())).sum(0)
    if tier == "eager":  # (the interpreter truncates fp32 → bf16: logic check only)
        assert bool(((g.grad.double() - exact).abs() <= eg).all())


@pytest.mark.parametrize("tier", TIERS)
def test_backward_bitwise_reproducible(tier):
    c, base, lora = _inputs("heavy_tailed", "bf16", T=70, N=45)
    dy = torch.randn(base.shape, generator=torch.Generator().manual_seed(4)).to(base.dtype)
    outs = []
    for _ in range(5):
        g = c.g.clone().requires_grad_()
        b_, l_ = base.clone().requires_grad_(), lora.clone().requires_grad_()
        compose(b_, l_, g, c.s, tier=tier).backward(dy)
        outs.append((b_.grad, l_.grad, g.grad))
    for o in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(o, outs[0]))


def test_tiers_agree_fp32():
    if len(TIERS) < 2:
        pytest.skip("fused tier needs TRITON_INTERPRET=1 on CPU")
    c, base, lora = _inputs("trained", "fp32")
    res = {}
    for tier in TIERS:
        g = c.g.clone().requires_grad_()
        b_, l_ = base.clone().requires_grad_(), lora.clone().requires_grad_()
        y = compose(b_, l_, g, c.s, tier=tier)
        y.backward(torch.ones_like(y))
        res[tier] = (y, b_.grad, l_.grad, g.grad)
    for a, b in zip(res["eager"], res["fused"]):
        assert ((a.double() - b.double()).abs() / b.double().abs().max()).max() <= 1e-6


def test_leading_dims_noncontiguous_and_empty():
    c, base, lora = _inputs("trained", "bf16", T=12, N=10)
    y = compose(base, lora, c.g, c.s, tier="eager")
    y3 = compose(base.view(3, 4, 10), lora.view(3, 4, 10), c.g, c.s, tier="eager")
    assert torch.equal(y3.view(12, 10), y)
    nc_b = torch.empty(10, 12, dtype=base.dtype).t().copy_(base)  # non-contiguous view of the same values
    assert not nc_b.is_contiguous()
    assert torch.equal(compose(nc_b, lora, c.g, c.s, tier="eager"), y)
    e = base[:0]
    assert compose(e, lora[:0], c.g, c.s, tier="eager").shape == (0, 10)


def test_nonfinite_propagates_elementwise():
    c, base, lora = _inputs("trained", "bf16", T=6, N=5)
    base = base.clone()
    base[2, 3] = float("nan")
    base[4, 1] = float("inf")
    for tier in TIERS:
        y = compose(base, lora, c.g, c.s, tier=tier)
        assert torch.isnan(y[2, 3]) and torch.isinf(y[4, 1])
        fin = torch.ones_like(y, dtype=torch.bool)
        fin[2, 3] = fin[4, 1] = False
        assert torch.isfinite(y[fin]).all()


def test_bad_inputs_raise():
    c, base, lora = _inputs("trained", "bf16", T=4, N=6)
    with pytest.raises(ValueError, match="one shape"):
        compose(base, lora[:, :5], c.g, c.s)
    with pytest.raises(ValueError, match=r"shape \[6\]"):
        compose(base, lora, c.g[:5], c.s)
    with pytest.raises(TypeError, match="float32"):
        compose(base, lora, c.g.double(), c.s)
    with pytest.raises(TypeError, match="bf16, fp16 or fp32"):
        compose(base.double(), lora.double(), c.g, c.s)
    with pytest.raises(ValueError, match="fp32-representable"):
        compose(base, lora, c.g, 0.1)
    with pytest.raises(ValueError, match="g_minus_1"):
        compose(base, lora, c.g, c.s, output="delta")
    with pytest.raises(ValueError, match="output"):
        compose(base, lora, c.g, c.s, output="z")
    with pytest.raises(ValueError, match="tier"):
        compose(base, lora, c.g, c.s, tier="fast")


def test_dispatch():
    x = torch.zeros(4, 4, dtype=torch.bfloat16)
    assert select_tier(x, True) == Tier.EAGER  # CPU tensors never take the fused tiers by default
    assert select_tier(x, False, "eager") == Tier.EAGER
    if not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="needs Triton"):
            select_tier(x, False, "fused")


def test_torch_compile_fullgraph():
    c, base, lora = _inputs("trained", "bf16", T=8, N=6)
    g = c.g.clone().requires_grad_()

    def f(b, l, g):
        return compose(b, l, g, c.s)

    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    y = cf(base, lora, g)
    assert torch.equal(y, f(base, lora, g))
    y.float().sum().backward()
    assert g.grad is not None and torch.isfinite(g.grad).all()


@pytest.mark.parametrize(
    "tier", ["eager"] + (["fused"] if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available() else [])
)
def test_nd_output_is_not_a_view_and_backward_keeps_the_shape(tier):
    """compose and lora_compose on [2, 3, N]: outputs are tensors of their own (not views) with the input's shape,
    and the gradients have the inputs' shapes and the 2-D call's values."""
    from dora_verify.kernels import lora_compose

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(2, 3, 40, generator=gen).to(torch.float16).to(dev)
    lora = torch.randn(2, 3, 40, generator=gen).to(torch.float16).to(dev)
    xa = torch.randn(2, 3, 8, generator=gen).to(torch.float16).to(dev)
    B = torch.randn(40, 8, generator=gen).to(torch.float16).to(dev)
    g = (1 + 0.01 * torch.randn(40, generator=gen)).to(dev)
    dy = torch.randn(2, 3, 40, generator=gen).to(torch.float16).to(dev)
    for fn, first in (
        (lambda b, l, gg: compose(b, l, gg, 2.0, tier=tier), lora),
        (lambda b, l, gg: lora_compose(b, l, B, gg, 2.0, tier=tier), xa),
    ):
        grads = []
        for shape in ((2, 3), (6,)):
            b_ = base.reshape(*shape, 40).clone().requires_grad_()
            l_ = first.reshape(*shape, first.shape[-1]).clone().requires_grad_()
            g_ = g.clone().requires_grad_()
            y = fn(b_, l_, g_)
            assert y._base is None and y.shape == b_.shape
            y.backward(dy.reshape(*shape, 40))
            assert b_.grad.shape == b_.shape and l_.grad.shape == l_.shape
            grads.append((y.detach().reshape(6, 40), b_.grad.reshape(6, 40), l_.grad.reshape(6, -1), g_.grad))
        assert all(torch.equal(u, v) for u, v in zip(*grads))


# ----------------------------------------------------------------------------- validation at call
def test_s_must_be_a_float_or_a_tensor_without_grad():
    c, base, lora = _inputs("trained", "bf16", T=4, N=6)
    y = compose(base, lora, c.g, c.s, tier="eager")
    assert torch.equal(compose(base, lora, c.g, torch.tensor(c.s), tier="eager"), y)  # read once, documented
    with pytest.raises(TypeError, match="no gradient for s"):
        compose(base, lora, c.g, torch.tensor(c.s, requires_grad=True))
    with pytest.raises(ValueError, match="scalar"):
        compose(base, lora, c.g, torch.tensor([c.s, c.s]))
    for bad in (float("inf"), float("-inf"), float("nan"), torch.tensor(float("nan"))):
        with pytest.raises(ValueError, match="finite"):
            compose(base, lora, c.g, bad)


def test_g_minus_1_with_grad_refused_unless_from_g():
    c, base, lora = _inputs("trained", "bf16", T=5, N=7)
    m = c.magnitude().clone().requires_grad_()
    nu = c.magnitude() / c.g
    g, gm1 = dora_scale(m, nu)
    leaf = gm1.detach().clone().requires_grad_()  # an independent parameter: compose computes no gradient for it
    with pytest.raises(ValueError, match="leaf"):
        compose(base, lora, g, c.s, g_minus_1=leaf, output="delta")
    with pytest.raises(ValueError, match="g does not"):  # its gradient would be credited to a g without one
        compose(base, lora, g.detach(), c.s, g_minus_1=gm1, output="delta")
    with torch.no_grad():  # nothing is differentiated: accepted
        compose(base, lora, g.detach(), c.s, g_minus_1=leaf, output="delta")
    # documented: (g, g − 1) from one dora_scale call — the gradient of g − 1 credited to g is the exact chain rule
    for tier in TIERS:
        m.grad = None
        g, gm1 = dora_scale(m, nu)
        d = compose(base, lora, g, c.s, g_minus_1=gm1, output="delta", tier=tier)
        dy = torch.randn(d.shape, generator=torch.Generator().manual_seed(3)).to(d.dtype)
        d.backward(dy)
        dm = (dy.double() * (base.double() + c.s * lora.double())).sum(0) / nu.double()
        assert ((m.grad.double() - dm).abs() / dm.abs()).max() <= 1e-6


def test_bias_dtype_device_and_type_errors():
    c, base, lora = _inputs("trained", "bf16", T=4, N=6)
    for bad in (torch.ones(6, dtype=torch.bool), torch.ones(6, dtype=torch.int32), torch.ones(6, dtype=torch.float64)):
        with pytest.raises(TypeError, match="bias dtype"):
            compose(base, lora, c.g, c.s, bad)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        compose(base, lora, c.g, c.s, [0.0] * 6)
    with pytest.raises(TypeError, match="g_minus_1 must be a torch.Tensor"):
        compose(base, lora, c.g, c.s, g_minus_1=0.5, output="delta")
    meta = {"lora": lora.to("meta"), "g": c.g.to("meta"), "bias": base[0].to("meta")}
    with pytest.raises(ValueError, match="lora is on meta"):
        compose(base, meta["lora"], c.g, c.s)
    with pytest.raises(ValueError, match="g is on meta"):
        compose(base, lora, meta["g"], c.s)
    with pytest.raises(ValueError, match="bias is on meta"):
        compose(base, lora, c.g, c.s, meta["bias"])
    with pytest.raises(ValueError, match="g_minus_1 is on meta"):
        compose(base, lora, c.g, c.s, g_minus_1=meta["g"], output="delta")


def test_nan_in_g_propagates_to_its_column():
    c, base, lora = _inputs("trained", "bf16", T=6, N=5)
    g = c.g.clone()
    g[2] = float("nan")
    for tier in TIERS:
        y = compose(base, lora, g, c.s, tier=tier)
        assert torch.isnan(y[:, 2]).all() and torch.isfinite(y[:, [0, 1, 3, 4]]).all()


def test_mixed_base_and_lora_dtypes_are_supported():
    """An fp32 lora (PEFT's fp32 adapters) with a bf16 base: y in base's dtype, the contract as usual."""
    c, base, lora = _inputs("trained", "bf16", T=8, N=9)
    lora32 = lora.float() * (1 + 2.0**-12)  # not representable in bf16
    for tier in TIERS:
        y = compose(base, lora32, c.g, c.s, tier=tier)
        assert y.dtype == torch.bfloat16
        assert float(ulp_error(y.double(), compose_truth(base, lora32, c.g, c.s).y, parse_format("bf16")).max()) <= 1.0


# ----------------------------------------------------------------------------- autocast
AUTOCAST = ["bf16", "fp16"]


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("cast", AUTOCAST)
@pytest.mark.parametrize("output", ["y", "delta"])
def test_autocast_leaves_the_bits_alone(tier, dtype, cast, output):
    """Under torch.autocast('cpu') compose's outputs and gradients are the same bits as outside it."""
    c, base, lora = _inputs("trained", dtype, T=6, N=10)
    m = c.magnitude()
    nu = m / c.g
    bias = None if output == "delta" else base[0].clone()
    dy = torch.randn(base.shape, generator=torch.Generator().manual_seed(4)).to(base.dtype)

    def run():
        m_ = m.clone().requires_grad_()
        b_, l_ = base.clone().requires_grad_(), lora.clone().requires_grad_()
        g, gm1 = dora_scale(m_, nu)
        y = compose(b_, l_, g, c.s, bias, g_minus_1=gm1, output=output, tier=tier)
        y.backward(dy)
        return y, b_.grad, l_.grad, m_.grad

    ref = run()
    with torch.autocast("cpu", dtype=parse_format(cast).torch_dtype):
        got = run()
    for a, b in zip(ref, got):
        assert a.dtype == b.dtype and torch.equal(a, b)
