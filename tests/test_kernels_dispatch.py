"""kernels.dispatch: the tier choice refuses what is known to be wrong (the Triton interpreter's bf16 tl.dot),
and autocast stays out of the ops' torch math."""

import os
import types

import pytest
import torch

from dora_verify.kernels import lora_compose
from dora_verify.kernels.dispatch import (
    DOT_OPS,
    HAS_TRITON,
    OPS,
    Tier,
    autocast_off,
    fused_supported,
    no_autocast,
    select_tier,
)

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
interp = pytest.mark.skipif(
    not (HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs the Triton interpreter (TRITON_INTERPRET=1)",
)


def _lora_inputs(dtype, T=4, N=8, r=4, base_dtype=None):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(T, N, generator=gen).to(base_dtype or dtype)
    xa = torch.randn(T, r, generator=gen).to(dtype)
    B = torch.randn(N, r, generator=gen).to(dtype)
    g = torch.rand(N, generator=gen) + 0.5
    ref = g.double() * (base.double() + 0.5 * (xa.double() @ B.double().t()))
    return base, xa, B, g, ref


def _fake_cuda(dtype):
    """What select_tier reads of a [4, 4] CUDA tensor, without a GPU (FakeTensorMode takes ~4 s to make one)."""
    return types.SimpleNamespace(dtype=dtype, device=torch.device("cuda", 0), is_cuda=True, numel=lambda: 16)


@interp
def test_forced_fused_bf16_lora_compose_is_refused_under_the_interpreter(monkeypatch):
    """Was: ~3e9 absolute error (the interpreter's tl.dot multiplies bf16's uint16 bits); now a one-line ValueError,
    from the argument and from DORA_VERIFY_TIER, also for an fp32 base with bf16 adapters."""
    for base_dtype in (BF16, FP32):
        base, xa, B, g, ref = _lora_inputs(BF16, base_dtype=base_dtype)
        assert (lora_compose(base, xa, B, g, 0.5, tier="eager").double() - ref).abs().max() < 0.1
        with pytest.raises(ValueError, match="tl.dot") as e:
            lora_compose(base, xa, B, g, 0.5, tier="fused")
        assert "\n" not in str(e.value)
        with pytest.raises(ValueError, match="tl.dot"):
            lora_compose(base, xa, B, g, 0.5, tier=Tier.FUSED_INFER)
        monkeypatch.setenv("DORA_VERIFY_TIER", "fused")
        with pytest.raises(ValueError, match="tl.dot"):
            lora_compose(base, xa, B, g, 0.5)
        monkeypatch.delenv("DORA_VERIFY_TIER")


@interp
def test_fp16_tl_dot_under_the_interpreter_is_right():
    """fp16 tl.dot is evaluated correctly by the interpreter (numpy float16): the fused tier stays available and
    agrees with the eager tier bit for bit here (one rounding of a short fp32 sum, then the same epilogue)."""
    base, xa, B, g, ref = _lora_inputs(FP16)
    y = lora_compose(base, xa, B, g, 0.5, tier="fused")
    assert torch.equal(y, lora_compose(base, xa, B, g, 0.5, tier="eager"))
    assert (y.double() - ref).abs().max() < 1e-2


@interp
def test_layer_with_forced_fused_tier_refuses_bf16_under_the_interpreter(monkeypatch):
    """DoRALinear (bf16, save='recompute' → lora_compose) with DORA_VERIFY_TIER=fused: was off by ~1e10, now refused."""
    from dora_verify.kernels import DoRALinear

    torch.manual_seed(0)
    layer = DoRALinear(torch.nn.Linear(16, 8).to(BF16), r=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 16).to(BF16)
    y = layer(x)  # automatic choice on CPU: the eager tier
    assert torch.isfinite(y).all() and y.abs().max() < 1e3
    monkeypatch.setenv("DORA_VERIFY_TIER", "fused")
    with pytest.raises(ValueError, match="tl.dot"):
        layer(x)


def test_fused_supported_table(monkeypatch):
    with pytest.raises(ValueError, match="op must be"):
        fused_supported("matmul", FP32, "cpu")
    assert DOT_OPS == {"lora_compose", "row_norm"} and OPS == DOT_OPS | {"compose"}
    ok, why = fused_supported("compose", torch.float64, "cuda")
    assert not ok and "float64" in why
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = fused_supported("compose", FP32, "cpu")
    assert not ok and "CUDA" in why
    if not HAS_TRITON:
        assert not fused_supported("compose", FP32, "cuda")[0]
        return
    for op in OPS:  # compiled kernels on a GPU: every dtype
        assert all(fused_supported(op, d, "cuda") == (True, "") for d in (BF16, FP16, FP32))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for dev in ("cpu", "cuda"):  # the interpreter runs CUDA tensors too (through host copies)
        assert fused_supported("compose", BF16, dev)[0]  # elementwise: runs (its casts truncate; logic checks)
        for op in DOT_OPS:
            ok, why = fused_supported(op, BF16, dev)
            assert not ok and "tl.dot" in why and "\n" not in why
            assert fused_supported(op, FP16, dev)[0] and fused_supported(op, FP32, dev)[0]
        assert not fused_supported("row_norm", (FP32, BF16), dev)[0]  # any bf16 operand of the norm's GEMMs


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_select_tier_auto_falls_back_to_eager_and_forced_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("DORA_VERIFY_TIER", raising=False)
    t = _fake_cuda(BF16)
    assert select_tier(t, False) == Tier.FUSED_INFER  # compose: elementwise
    assert select_tier(t, True, op="lora_compose", dtype=FP16) == Tier.FUSED_TRAIN  # base read elementwise
    assert select_tier(t, False, op="lora_compose", dtype=BF16) == Tier.EAGER
    assert select_tier(_fake_cuda(FP32), True, op="lora_compose", dtype=BF16) == Tier.EAGER
    with pytest.raises(ValueError, match="tl.dot"):
        select_tier(t, False, "fused", op="lora_compose", dtype=BF16)
    with pytest.raises(ValueError, match="tl.dot"):
        select_tier(t, True, Tier.FUSED_TRAIN, op="lora_compose", dtype=BF16)
    assert select_tier(t, False, "eager", op="lora_compose", dtype=BF16) == Tier.EAGER
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # compiled kernels: bf16 tl.dot is fine
    assert select_tier(t, False, op="lora_compose", dtype=BF16) == Tier.FUSED_INFER
    with pytest.raises(ValueError, match="tier must be"):
        select_tier(t, False, 3)


def test_gate_cpu_impls_never_run_what_dispatch_refuses():
    """dora_verify.gate.cpu_impls (no bf16 on the interpreter at all) is at least as strict as fused_supported."""
    from dora_verify.adapter import kernels_impl
    from dora_verify.formats import parse_format
    from dora_verify.gate import cpu_impls

    for im in cpu_impls([kernels_impl()]):
        if im.tier == "fused":
            for d in im.dtypes:
                assert all(fused_supported(op, parse_format(d).torch_dtype, "cpu")[0] for op in OPS), (im.name, d)


def test_no_autocast():
    @no_autocast
    def mm(a, b):
        return a @ b

    a = torch.randn(3, 3)
    with torch.autocast("cpu", dtype=BF16):
        assert (a @ a).dtype == BF16  # what autocast does to the eager tier's GEMMs
        assert mm(a, a).dtype == FP32 and mm.__wrapped__(a, a).dtype == BF16
        with autocast_off():
            assert not torch.is_autocast_enabled("cpu")
        assert torch.is_autocast_enabled("cpu")
    assert torch.equal(mm(a, a), a @ a)


def test_getenv_follows_every_write_to_the_environment(monkeypatch):
    """dispatch.getenv reads os.environ's own mapping: it sees what setenv, delenv, item writes and patch.dict do,
    exactly as os.environ.get does."""
    import os
    import unittest.mock

    from dora_verify.kernels.dispatch import getenv

    name = "DORA_VERIFY_TEST_GETENV"
    monkeypatch.delenv(name, raising=False)
    assert getenv(name) is None and getenv(name, "d") == "d"
    monkeypatch.setenv(name, "1")
    assert getenv(name) == os.environ.get(name) == "1"
    os.environ[name] = "é2"
    assert getenv(name) == "é2"
    with unittest.mock.patch.dict(os.environ, {name: "3"}):
        assert getenv(name) == "3"
    assert getenv(name) == "é2"
    del os.environ[name]
    assert getenv(name, "gone") == "gone"
