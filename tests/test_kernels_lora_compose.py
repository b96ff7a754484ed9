"""kernels.lora_compose (compose with the LoRA up-projection fused) against the oracles: eager tier
everywhere, fused tier under the Triton interpreter with fp16 adapters (the interpreter's bf16 tl.dot is
unreliable; bf16 is checked on the GPU, bench/kernels_gpu.py)."""

import importlib
import os

import pytest
import torch

from dora_verify.bounds import lora_compose_dg_bound
from dora_verify.cases import make_case
from dora_verify.formats import parse_format, ulp
from dora_verify.metrics import ulp_error
from dora_verify.oracles import compose_truth
from dora_verify.kernels import dora_scale, lora_compose
from dora_verify.kernels.dispatch import HAS_TRITON

lc = importlib.import_module("dora_verify.kernels.lora_compose")
TIERS = ["eager"] + (["fused"] if HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1" else [])
U32 = 2.0**-24


def _inputs(regime, dtype, T=70, N=131, r=8, seed=0):
    """base = RN(x Wᵀ), xa = RN(x Aᵀ) as the layer forms them; B and g from the case (B ≠ 0, g ≠ 1)."""
    c = make_case(regime, N, 40, r, T, dtype=dtype, seed=seed)
    f = torch.float32
    base = (c.x.to(f) @ c.W.to(f).t()).to(c.dtype)
    xa = (c.x.to(f) @ c.A.to(f).t()).to(c.dtype)
    return c, base, xa


def _forward_with_lora(tier, base, xa, B, g, s, bias=None):
    fn = lc.lora_compose_forward_fused if tier == "fused" else lc.lora_compose_forward_eager
    return fn(base, xa, B, g, bias, s, write_lora=True)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("regime", ["fresh", "trained", "large_activations", "heavy_tailed", "zero_rows"])
def test_y_faithful_and_lora_is_the_gemm(tier, dtype, regime):
    if tier == "fused" and dtype == "bf16":
        pytest.skip("bf16 tl.dot under the interpreter: checked on the GPU")
    c, base, xa = _inputs(regime, dtype)
    if not (torch.isfinite(base).all() and torch.isfinite(xa).all()):
        pytest.skip("the case overflows fp16")
    fmt = parse_format(dtype)
    bias = torch.randn(base.shape[1], generator=torch.Generator().manual_seed(1)).to(base.dtype)
    for g in (c.g, torch.ones_like(c.g), torch.full_like(c.g, 1 + 2**-12)):
        for b in (None, bias):
            y, lora = _forward_with_lora(tier, base, xa, c.B, g, c.s, b)
            # the lora the kernel used is xa Bᵀ with fp32 accumulation over r, not rounded to the adapter dtype:
            # |lora − xa Bᵀ| ≤ γ_r(2u₃₂)·(|xa| |B|ᵀ) (the tensor-core model), and no coarser
            exact = xa.double() @ c.B.double().t()
            mag = xa.double().abs() @ c.B.double().abs().t()
            assert lora.dtype == torch.float32
            assert bool(((lora.double() - exact).abs() <= 2 * (c.B.shape[1] + 1) * U32 * mag).all())
            # contract: y ≤ 1 ulp from the exact g·(base + s·lora) + bias of that lora
            truth = compose_truth(base, lora, g, c.s, b)
            assert float(ulp_error(y.double(), truth.y, fmt).max()) <= 1.0
            # and the public entry point returns the same y
            assert torch.equal(lora_compose(base, xa, c.B, g, c.s, b, tier=tier), y)


@pytest.mark.parametrize("tier", TIERS)
def test_fresh_adapter_returns_base_exactly(tier):
    c, base, xa = _inputs("fresh", "fp16")
    assert torch.equal(lora_compose(base, xa, torch.zeros_like(c.B), torch.ones_like(c.g), c.s, tier=tier), base)


@pytest.fixture(params=["kernel-M", "cublas-M"])
def m_source(request, monkeypatch):
    """Where the fused backward's M = dyᵀxa comes from: the kernel's dots (any d_out) or cuBLAS (any r)."""
    if request.param == "kernel-M":
        monkeypatch.setattr(lc, "DOT_M_MIN_N", 1)
    else:
        monkeypatch.setattr(lc, "DOT_M_MAX_R", 0)
    return request.param


@pytest.mark.parametrize("tier", TIERS)
def test_backward_against_oracle(tier, m_source):
    c, base, xa = _inputs("trained", "fp16", T=90, N=67)
    assert lc.dot_m_applies(8, 67, torch.float16, torch.float16, "cpu") == (m_source == "kernel-M" and "fused" in TIERS)
    m = c.magnitude().clone().requires_grad_()
    nu = c.magnitude() / c.g
    g, _ = dora_scale(m, nu)
    b_, x_, B_ = base.clone().requires_grad_(), xa.clone().requires_grad_(), c.B.clone().requires_grad_()
    y = lora_compose(b_, x_, B_, g, c.s, tier=tier)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y.dtype)
    y.backward(dy)
    _, lora = _forward_with_lora(tier, base, xa, c.B, g.detach(), c.s)
    fmt = parse_format("fp16")
    g64, dy64, s = g.detach().double(), dy.double(), c.s
    # d_base = RN(RN32(g·dy)): faithful
    assert float(ulp_error(b_.grad.double(), g64 * dy64, fmt).max()) <= 1.0
    # d_g = Σ dy·base + s·Σ_r B ⊙ M̂ in float64 (M̂ = dyᵀxa, fp32 chains): within lora_compose_dg_bound of the exact
    # Σ dy ⊙ (base + s·xa Bᵀ); then d_m = RN32(d_g / ν) (m fp32 here: one more u₃₂ of |d_m|)
    chain = lc.m_chain(*dy.shape, xa.shape[1], dy.dtype, xa.dtype, dy.device) if tier == "fused" else None
    dg, bound_dg = lora_compose_dg_bound(dy, base, xa, c.B, s, chain)
    dm = dg / nu.double()
    assert bool(((m.grad.double() * nu.double() - dg).abs() <= bound_dg + 2 * U32 * dm.abs() * nu.double()).all())
    # and that lora is the forward's: the gradient of the function evaluated, within γ_r(2u₃₂) of its products
    dg_fwd = (dy64 * (base.double() + s * lora.double())).sum(0)
    mag = dy64.abs().t() @ xa.double().abs()
    tol_fwd = 2 * (xa.shape[1] + 1) * U32 * abs(s) * (c.B.double().abs() * mag).sum(1)
    assert bool(((dg - dg_fwd).abs() <= tol_fwd + bound_dg).all())
    # d_B = RN(RN32(g s) ⊙ (dyᵀ xa)): fp32 GEMM over T, then two roundings
    gs = (g.detach() * s).double()
    dB = gs[:, None] * (dy64.t() @ xa.double())
    magB = gs.abs()[:, None] * (dy64.abs().t() @ xa.double().abs())
    tolB = fmt.u * dB.abs() + (dy.shape[0] + 2) * U32 * magB
    assert bool(((B_.grad.double() - dB).abs() <= tolB * (1 + 1e-6)).all())
    # d_xa = dy · RN_act(g s ⊙ B): the rounded [d_out, r] operand adds u_act per term
    dx = dy64 @ (gs[:, None] * c.B.double())
    magx = dy64.abs() @ (gs.abs()[:, None] * c.B.double().abs())
    tolx = fmt.u * dx.abs() + (fmt.u + (dy.shape[1] + 2) * U32) * magx
    assert bool(((x_.grad.double() - dx).abs() <= tolx * (1 + 1e-6)).all())


@pytest.mark.parametrize("tier", TIERS)
def test_backward_bitwise_reproducible(tier):
    c, base, xa = _inputs("heavy_tailed", "fp16", T=75, N=45)
    dy = torch.randn(base.shape, generator=torch.Generator().manual_seed(4)).to(base.dtype)
    outs = []
    for _ in range(4):
        g = c.g.clone().requires_grad_()
        b_, x_, B_ = base.clone().requires_grad_(), xa.clone().requires_grad_(), c.B.clone().requires_grad_()
        lora_compose(b_, x_, B_, g, c.s, tier=tier).backward(dy)
        outs.append((b_.grad, x_.grad, B_.grad, g.grad))
    for o in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(o, outs[0]))


def test_matches_compose_on_an_fp32_lora():
    """The fused up-projection and compose on an fp32 lora = xa Bᵀ (fp32 adapters' route) agree within the bound:
    both are faithful to g·(base + s·lora), and their fp32 loras differ only by accumulation order."""
    from dora_verify.kernels import compose

    c, base, xa = _inputs("trained", "fp16")
    tier = TIERS[-1]
    y1 = lora_compose(base, xa, c.B, c.g, c.s, tier=tier)
    lora = xa.float() @ c.B.float().t()
    y2 = compose(base, lora, c.g, c.s, tier=tier)
    fmt = parse_format("fp16")
    # each y within 1 ulp of its exact value; the exact values differ by ≤ |g·s|·2γ_r(2u₃₂)·|xa||B|ᵀ
    mag = xa.double().abs() @ c.B.double().abs().t()
    tol = 2 * ulp(y2.double(), fmt) + 4 * (c.B.shape[1] + 1) * U32 * (c.g.double() * abs(c.s)).abs() * mag
    assert bool(((y1.double() - y2.double()).abs() <= tol * (1 + 1e-9)).all())


def test_leading_dims_noncontiguous_and_empty():
    c, base, xa = _inputs("trained", "fp16", T=24, N=40)
    y = lora_compose(base.view(4, 6, 40), xa.view(4, 6, -1), c.B, c.g, c.s, tier="eager")
    assert torch.equal(y.reshape(24, 40), lora_compose(base, xa, c.B, c.g, c.s, tier="eager"))
    bt = base.t().contiguous().t()  # non-contiguous view of the same values
    assert torch.equal(
        lora_compose(bt, xa, c.B, c.g, c.s, tier="eager"), lora_compose(base, xa, c.B, c.g, c.s, tier="eager")
    )
    e = lora_compose(base[:0], xa[:0], c.B, c.g, c.s, tier=TIERS[-1])
    assert e.shape == (0, 40)


def test_bad_inputs_raise():
    c, base, xa = _inputs("trained", "fp16", T=8, N=40)
    with pytest.raises(ValueError):
        lora_compose(base, xa[:, :-1], c.B, c.g, c.s)
    with pytest.raises(ValueError):
        lora_compose(base[:, :-1], xa, c.B, c.g, c.s)
    with pytest.raises(TypeError):
        lora_compose(base, xa.float(), c.B, c.g, c.s)  # xa and B must share a dtype
    with pytest.raises(TypeError):
        lora_compose(base, xa, c.B, c.g.half(), c.s)
    with pytest.raises(ValueError):
        lora_compose(base, xa, c.B, c.g, float("nan"))
    with pytest.raises(ValueError):
        lora_compose(base, xa, c.B, c.g, c.s, torch.zeros(3))


def test_torch_compile_fullgraph():
    c, base, xa = _inputs("trained", "fp16", T=16, N=40)

    def f(b, x, B, g):
        return lora_compose(b, x, B, g, c.s, tier=TIERS[-1])

    g = c.g.clone().requires_grad_()
    B_ = c.B.clone().requires_grad_()
    y = f(base, xa, B_, g)
    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    g2 = c.g.clone().requires_grad_()
    B2 = c.B.clone().requires_grad_()
    y2 = cf(base, xa, B2, g2)
    assert torch.equal(y, y2)
    y.sum().backward()
    y2.sum().backward()
    assert torch.equal(g.grad, g2.grad) and torch.equal(B_.grad, B2.grad)


def _d_B_exact_and_bound(dy, xa, g, s, fmt):
    """(exact d_B, its bound) for d_B = RN_B(RN32(RN32(g·s)·M)), M = dyᵀxa from exact products accumulated in fp32:
    RN_B, then γ_T·Σ|dy||xa| for the accumulation and the RN32 of g·s·M — with gs = RN32(g·s) exact in float64."""
    gs = (g.to(torch.float32) * s).double()
    dy64, xa64 = dy.double(), xa.double()
    exact = gs[:, None] * (dy64.t() @ xa64)
    mag = gs.abs()[:, None] * (dy64.abs().t() @ xa64.abs())
    return exact, fmt.u * exact.abs() + (dy.shape[0] + 2) * U32 * mag + fmt.min_normal * fmt.u  # η: subnormal d_B


@pytest.mark.skipif(not (torch.cuda.is_available() or "fused" in TIERS), reason="needs the fused tier")
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("r", [12, 16, 20, 80])
def test_fused_adapter_gradients(dtype, need, r, monkeypatch):
    """The backward kernel's adapter gradients: d_xa is adapter_grads' bits; d_B is within the fp32-GEMM bound of
    the exact RN32(g·s)·dyᵀxa — from the kernel's own dots at r ≤ DOT_M_MAX_R (dot_m_applies; here at any d_out),
    adapter_grads' bits (cuBLAS's M) above. bf16 only on the GPU (the interpreter's bf16 casts)."""
    monkeypatch.setattr(lc, "DOT_M_MIN_N", 1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "bf16" and dev == "cpu":
        pytest.skip("bf16 conversions under the interpreter: checked on the GPU")
    c, base, xa = _inputs("heavy_tailed", dtype, T=200, N=131, r=r)
    base, xa, B, g = (t.to(dev) for t in (base, xa, c.B, c.g))
    dy = torch.randn(base.shape, generator=torch.Generator().manual_seed(5)).to(base.dtype).to(dev)
    need_xa, need_B = need
    assert lc.dot_m_applies(r, 131, dy.dtype, xa.dtype, dev) == (r <= lc.DOT_M_MAX_R)
    _, d_g, d_xa, d_B = lc.lora_compose_backward_fused_all(dy, base, xa, B, g, c.s, False, True, need_xa, need_B)
    ref_xa, ref_B = lc.adapter_grads(dy, xa, B, g, c.s, need_xa, need_B)
    assert (d_xa is None) == (not need_xa) and (d_B is None) == (not need_B)
    if need_xa:
        assert torch.equal(d_xa, ref_xa)
    if need_B:
        exact, tol = _d_B_exact_and_bound(dy, xa, g, c.s, parse_format(dtype))
        assert bool(((d_B.double() - exact).abs() <= tol * (1 + 1e-6)).all())
        if r > lc.DOT_M_MAX_R:
            assert torch.equal(d_B, ref_B)
    assert torch.equal(d_g, lc.lora_compose_backward_fused(dy, base, xa, B, g, c.s, False, True)[1])
    dg, bound = lora_compose_dg_bound(dy, base, xa, B, c.s, lc.m_chain(200, 131, r, dy.dtype, xa.dtype, dev))
    assert bool(((d_g.double() - dg).abs() <= bound).all())  # at r 80 the second stage sums d_g over two r-blocks


@pytest.mark.parametrize("mix", ["bf16-base-fp16-adapters", "fp16-base-bf16-adapters"])
@pytest.mark.parametrize("xa_scale", [1.0, 1e-6, 1e5])
def test_mixed_base_and_adapter_dtypes(mix, xa_scale, monkeypatch):
    """A base of one 16-bit format with adapters of the other: M = dyᵀxa from exact products (xa is not rounded to
    dy's format: an fp16 rounding of bf16 xa would underflow at 1e-6 and overflow at 1e5), so d_B and d_g are within
    their fp32-GEMM bounds and finite — on the eager tier, and on the fused one where it runs (fp16 adapters under
    the interpreter; both on a GPU)."""
    monkeypatch.setattr(lc, "DOT_M_MIN_N", 1)  # the kernel's M wherever it applies
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    base_dt, ad_dt = (torch.bfloat16, torch.float16) if mix.startswith("bf16") else (torch.float16, torch.bfloat16)
    c, base, xa = _inputs("heavy_tailed", "fp32", T=70, N=131, r=8)
    gen = torch.Generator().manual_seed(6)
    if ad_dt == torch.float16 and xa_scale > 1:
        pytest.skip("fp16 adapters hold no xa that large (nor d_B = gs·dyᵀxa from it)")
    base, xa, B, g = base.to(base_dt).to(dev), (xa * xa_scale).to(ad_dt).to(dev), c.B.to(ad_dt).to(dev), c.g.to(dev)
    assert bool(torch.isfinite(xa).all())
    if xa_scale > 1:
        B = B * 1e-4
    dy = torch.randn(base.shape, generator=gen).to(base_dt).to(dev)
    fused = dev == "cuda" or ("fused" in TIERS and ad_dt == torch.float16)
    fns = [lc.lora_compose_backward_eager_all] + ([lc.lora_compose_backward_fused_all] if fused else [])
    for fn in fns:
        _, d_g, _, d_B = fn(dy, base, xa, B, g, c.s, False, True, False, True)
        assert bool(torch.isfinite(d_B).all() and torch.isfinite(d_g).all())
        exact, tol = _d_B_exact_and_bound(dy, xa, g, c.s, parse_format(ad_dt))
        assert bool(((d_B.double() - exact).abs() <= tol * (1 + 1e-6)).all())
        chain = lc.m_chain(70, 131, 8, dy.dtype, xa.dtype, dev) if fn is lc.lora_compose_backward_fused_all else None
        dg, bound = lora_compose_dg_bound(dy, base, xa, B, c.s, chain)
        assert bool(((d_g.double() - dg).abs() <= bound).all())


def test_the_kernels_m_fails_the_bound_when_wrong():
    """The d_B bound above rejects an M off by one bf16 rounding of dy (the check can fail)."""
    c, base, xa = _inputs("heavy_tailed", "fp16", T=200, N=131, r=20)
    dy = torch.randn(base.shape, generator=torch.Generator().manual_seed(5)).to(base.dtype)
    exact, tol = _d_B_exact_and_bound(dy, xa, c.g, c.s, parse_format("fp16"))
    gs = (c.g.to(torch.float32) * c.s).double()
    wrong = gs[:, None] * (dy.to(torch.bfloat16).double().t() @ xa.double())
    assert not bool(((wrong.to(torch.float16).double() - exact).abs() <= tol).all())


# ----------------------------------------------------------------------------- validation at call
def test_bad_inputs_raise_one_line_errors():
    c, base, xa = _inputs("trained", "fp16", T=4, N=40)
    y = lora_compose(base, xa, c.B, c.g, c.s, tier="eager")
    assert torch.equal(lora_compose(base, xa, c.B, c.g, torch.tensor(c.s), tier="eager"), y)
    cases = [
        (TypeError, "no gradient for s", dict(s=torch.tensor(c.s, requires_grad=True))),
        (ValueError, "finite", dict(s=float("inf"))),
        (TypeError, "bias dtype", dict(bias=torch.ones(40, dtype=torch.bool))),
        (TypeError, "bias dtype", dict(bias=torch.ones(40, dtype=torch.int64))),
        (ValueError, r"shape \[40\]", dict(bias=torch.ones(39, dtype=torch.float16))),
        (ValueError, "B is on meta", dict(B=c.B.to("meta"))),
        (ValueError, "xa is on meta", dict(xa=xa.to("meta"))),
        (ValueError, "g is on meta", dict(g=c.g.to("meta"))),
        (ValueError, "bias is on meta", dict(bias=base[0].to("meta"))),
    ]
    for exc, msg, kw in cases:
        args = dict(base=base, xa=xa, B=c.B, g=c.g, s=c.s, bias=None) | kw
        with pytest.raises(exc, match=msg) as e:
            lora_compose(**args)
        assert "\n" not in str(e.value)


def test_nan_in_g_propagates_to_its_column():
    c, base, xa = _inputs("trained", "fp16", T=6, N=40)
    g = c.g.clone()
    g[7] = float("nan")
    for tier in TIERS:
        y = lora_compose(base, xa, c.B, g, c.s, tier=tier)
        fin = torch.ones(40, dtype=torch.bool)
        fin[7] = False
        assert torch.isnan(y[:, 7]).all() and torch.isfinite(y[:, fin]).all()


# ----------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("adapter", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("act", ["bf16", "fp32"])
@pytest.mark.parametrize("cast", ["bf16", "fp16"])
def test_autocast_leaves_the_bits_alone(adapter, act, cast):
    """Under torch.autocast('cpu') the outputs and gradients are the bits of the same call outside it: the eager
    tier's F.linear and the adapter-gradient GEMMs are not downcast (fp32 adapters would run in bf16)."""
    c, base, xa = _inputs("trained", adapter, T=6, N=24, r=4)
    base = base.to(parse_format(act).torch_dtype)
    nu = c.magnitude() / c.g
    dy = torch.randn(base.shape, generator=torch.Generator().manual_seed(4)).to(base.dtype)
    tiers = [t for t in TIERS if t == "eager" or adapter == "fp16"]  # fused: fp16 tl.dot under the interpreter

    def run(tier):
        m_ = c.magnitude().clone().requires_grad_()
        b_, x_, B_ = base.clone().requires_grad_(), xa.clone().requires_grad_(), c.B.clone().requires_grad_()
        g, _ = dora_scale(m_, nu, g_minus_1=False)
        y = lora_compose(b_, x_, B_, g, c.s, base[0].clone(), tier=tier)
        y.backward(dy)
        return y, b_.grad, x_.grad, B_.grad, m_.grad

    for tier in tiers:
        ref = run(tier)
        with torch.autocast("cpu", dtype=parse_format(cast).torch_dtype):
            got = run(tier)
        for a, b in zip(ref, got):
            assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.skipif("fused" not in TIERS and not torch.cuda.is_available(), reason="needs the fused tier")
@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float32], ids=["bf16-base", "fp32-base"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_fp32_adapters_recompute_lora_and_match_compose_bit_for_bit(base_dtype, bias):
    """fp32 adapters on the fused tier: y and every gradient bitwise those of compose() on the materialised
    F.linear(xa, B) (the same kernels, the same GEMMs), and of the [T, d_out] tensors only base kept for backward."""
    from dora_verify.kernels import compose

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(21)
    T, N, R = 70, 131, 8
    leaves = [
        torch.randn(T, N, generator=gen).to(base_dtype),
        torch.randn(T, R, generator=gen),
        torch.randn(N, R, generator=gen) * 0.1,
        1 + 0.01 * torch.randn(N, generator=gen),
    ]
    leaves += [torch.randn(N, generator=gen).to(base_dtype)] if bias else [None]
    dy = torch.randn(T, N, generator=gen).to(base_dtype).to(dev)

    def run(fn):
        ts = [t.to(dev).requires_grad_() if t is not None else None for t in leaves]
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = fn(*ts)
        grads = torch.autograd.grad(y, [t for t in ts if t is not None], dy)
        return y, grads, saved

    y1, g1, saved = run(lambda b, xa, B, g, bias: lora_compose(b, xa, B, g, 2.0, bias, tier="fused"))
    y2, g2, _ = run(lambda b, xa, B, g, bias: compose(b, torch.nn.functional.linear(xa, B), g, 2.0, bias, tier="fused"))
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    big = [(t.dtype, tuple(t.shape)) for t in saved if t.shape == (T, N)]
    assert big == [(base_dtype, (T, N))], big  # base only: lora is formed again in the backward


# ----------------------------------------------------------------------------- dora_lora_compose (scale inside)
@pytest.mark.skipif("fused" not in TIERS and not torch.cuda.is_available(), reason="needs the fused tier")
@pytest.mark.parametrize("adapter", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("m_dtype", [torch.float32, "adapter"], ids=["fp32-m", "adapter-m"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("special", ["none", "zero-and-nan-rows"])
def test_dora_lora_compose_is_scale_then_lora_compose_bit_for_bit(adapter, m_dtype, bias, special, m_source):
    """y and the gradients of base, xa, B, m and bias: dora_lora_compose (g = m / max(ν, ε) inside the kernels,
    d_m from the reduction kernel) gives exactly lora_compose(…, dora_scale(m, ν)[0], …) with autograd through
    dora_scale — including ν = 0 (g = m/ε), ν = NaN and m = NaN columns. bf16 only on the GPU (the interpreter)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if adapter == torch.bfloat16 and dev == "cpu":
        pytest.skip("bf16 tl.dot under the interpreter: checked on the GPU")
    m_dtype = adapter if m_dtype == "adapter" else m_dtype
    gen = torch.Generator().manual_seed(31)
    T, N, R = 67, 133, 12
    nu = (1 + torch.rand(N, generator=gen)) * 3
    m = (nu * (1 + 0.01 * torch.randn(N, generator=gen))).to(m_dtype)
    if special != "none":
        nu[5], m[5], nu[9], m[17] = 0.0, 0.0, float("nan"), float("nan")  # a zero row (m = ν = 0: g = 0)
    leaves = [
        torch.randn(T, N, generator=gen).to(adapter),
        torch.randn(T, R, generator=gen).to(adapter),
        (torch.randn(N, R, generator=gen) * 0.1).to(adapter),
        m,
    ]
    leaves += [torch.randn(N, generator=gen).to(adapter)] if bias else [None]
    dy = torch.randn(T, N, generator=gen).to(adapter).to(dev)
    nu = nu.to(dev)

    def run(fn):
        ts = [t.to(dev).requires_grad_() if t is not None else None for t in leaves]
        y = fn(*ts)
        return y, torch.autograd.grad(y, [t for t in ts if t is not None], dy)

    y1, g1 = run(lambda b, xa, B, m, bias: lc.dora_lora_compose(b, xa, B, m, nu, 2.0, bias, tier="fused"))
    y2, g2 = run(
        lambda b, xa, B, m, bias: lora_compose(b, xa, B, dora_scale(m, nu, g_minus_1=False)[0], 2.0, bias, tier="fused")
    )

    def eq(a, b):  # the same bits, NaN where NaN
        return (
            a.dtype == b.dtype
            and torch.equal(a.isnan(), b.isnan())
            and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))
        )

    assert eq(y1, y2)
    assert all(eq(a, b) for a, b in zip(g1, g2))
    if special != "none":
        assert y1[:, 9].isnan().all() and y1[:, 17].isnan().all() and torch.isfinite(y1[:, 5]).all()
    with torch.no_grad():
        ts = [t.to(dev) if t is not None else None for t in leaves]
        assert eq(lc.dora_lora_compose(ts[0], ts[1], ts[2], ts[3], nu, 2.0, ts[4], tier="fused"), y1)


def test_dora_lora_compose_eager_tier_and_bad_inputs():
    """The eager tier (and fp32 adapters) is the composition itself; a ν that requires grad, a ν of the wrong
    dtype or shape and a bad m are one-line errors."""
    c, base, xa = _inputs("trained", "fp16", T=5, N=40)
    nu = (c.g * 0 + 2.0).float()
    m = nu * 1.01
    y = lc.dora_lora_compose(base, xa, c.B, m, nu, c.s, tier="eager")
    assert torch.equal(y, lora_compose(base, xa, c.B, dora_scale(m, nu, g_minus_1=False)[0], c.s, tier="eager"))
    for exc, msg, kw in [
        (ValueError, "detached", dict(nu=nu.clone().requires_grad_())),
        (TypeError, "nu must be float32", dict(nu=nu.half())),
        (TypeError, "nu must be float32", dict(nu=nu[:39])),
        (ValueError, "m must be", dict(m=m[:39])),
        (ValueError, "m must be", dict(m=m.double())),
    ]:
        args = dict(base=base, xa=xa, B=c.B, m=m, nu=nu, s=c.s) | kw
        with pytest.raises(exc, match=msg) as e:
            lc.dora_lora_compose(**args, tier="fused" if "fused" in TIERS else None)
        assert "\n" not in str(e.value)


def test_the_dg_bound_fails_a_lora_rounded_to_the_adapter():
    """lora_compose_dg_bound rejects the d_g of a forward that rounded lora to bf16 (the check can fail): the
    backward's Σ_r B ⊙ M is only the gradient of a forward whose lora is the fp32 sum."""
    c, base, xa = _inputs("trained", "bf16", T=256, N=64, r=16)
    dy = torch.randn(base.shape, generator=torch.Generator().manual_seed(8)).to(base.dtype)
    dg, bound = lora_compose_dg_bound(dy, base, xa, c.B, c.s)
    rounded = torch.nn.functional.linear(xa, c.B).double()  # RN_bf16(xa Bᵀ)
    wrong = (dy.double() * (base.double() + c.s * rounded)).sum(0).float().double()
    assert not bool(((wrong - dg).abs() <= bound).all())
    eager = lc.lora_compose_backward_eager(dy, base, xa, c.B, c.g, c.s, False, True)[1]
    assert bool(((eager.double() - dg).abs() <= bound).all())


def test_the_dg_bound_fails_an_m_rounded_to_fp16():
    """Where the lora term carries d_g (base = 0), lora_compose_dg_bound rejects an M rounded to fp16 before the sum
    over r: the bound is tight enough to tell fp32 accumulation from a 16-bit intermediate."""
    c, _, xa = _inputs("trained", "fp16", T=90, N=67)
    base = torch.zeros(90, 67, dtype=torch.float16)
    dy = torch.randn(base.shape, generator=torch.Generator().manual_seed(9)).to(base.dtype)
    dg, bound = lora_compose_dg_bound(dy, base, xa, c.B, c.s)
    M16 = (dy.double().t() @ xa.double()).to(torch.float16).double()
    wrong = (c.s * (c.B.double() * M16).sum(1)).float().double()
    assert not bool(((wrong - dg).abs() <= bound).all())
    eager = lc.lora_compose_backward_eager(dy, base, xa, c.B, c.g, c.s, False, True)[1]
    assert bool(((eager.double() - dg).abs() <= bound).all())


def test_no_tokens_with_the_scale_inside():
    """T = 0 with m and ν (dora_lora_compose's backward): d_B, d_xa are adapter_grads' of g = m / max(ν, ε) — zeros,
    NaN only where g is — and d_m is zero; ν = ∞ gives g = 0, not the NaN of ν used as g."""
    N, R = 5, 3
    nu = torch.tensor([1.0, float("inf"), 0.0, 2.0, float("nan")])
    m = torch.ones(N)
    dy, base, xa = torch.zeros(0, N, dtype=torch.float16), torch.zeros(0, N, dtype=torch.float16), torch.zeros(0, R)
    B = torch.ones(N, R, dtype=torch.float16)
    d_base, d_m, d_xa, d_B = lc.lora_compose_backward_fused_all(
        dy, base, xa.half(), B, nu, 0.5, True, True, True, True, m=m
    )
    g = dora_scale(m, nu, g_minus_1=False)[0]
    ref_xa, ref_B = lc.adapter_grads(dy, xa.half(), B, g, 0.5, True, True)
    assert torch.equal(d_B.isnan(), ref_B.isnan()) and torch.equal(torch.nan_to_num(d_B), torch.nan_to_num(ref_B))
    assert d_B.isnan().tolist() == [[False] * R, [False] * R, [False] * R, [False] * R, [True] * R]
    assert d_xa.shape == (0, R) and torch.equal(d_m, torch.zeros(N)) and d_base.shape == (0, N)


@pytest.mark.parametrize("tier", TIERS)
def test_backward_dg_where_the_lora_term_carries_it(tier, m_source):
    """base = 0: d_g is all lora term, so the kernels' M must be fp32-accurate to stay within lora_compose_dg_bound —
    an M rounded to fp16 fails this bound (test_the_dg_bound_fails_an_m_rounded_to_fp16), here on the kernels."""
    c, _, xa = _inputs("trained", "fp16", T=90, N=67)
    base = torch.zeros(90, 67, dtype=torch.float16)
    dy = torch.randn(base.shape, generator=torch.Generator().manual_seed(9)).to(base.dtype)
    fn = lc.lora_compose_backward_fused_all if tier == "fused" else lc.lora_compose_backward_eager_all
    d_g = fn(dy, base, xa, c.B, c.g, c.s, False, True, False, False)[1]
    chain = lc.m_chain(90, 67, xa.shape[1], dy.dtype, xa.dtype, "cpu") if tier == "fused" else None
    dg, bound = lora_compose_dg_bound(dy, base, xa, c.B, c.s, chain)
    assert bool(((d_g.double() - dg).abs() <= bound).all())
