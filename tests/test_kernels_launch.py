"""kernels/launch.py: the fast launch's key is at least as fine as Triton's specialisation, and on a GPU its launches
give the bits of Triton's own launch (compose and lora-compose kernels, odd shapes and misaligned views), switch off
under a launch hook and with DORA_VERIFY_FAST_LAUNCH=0."""

import importlib
import itertools

import pytest
import torch

launch = importlib.import_module("dora_verify.kernels.launch")
compose_mod = importlib.import_module("dora_verify.kernels.compose")
lc = importlib.import_module("dora_verify.kernels.lora_compose")

CUDA = torch.cuda.is_available()


def _triton_specialiser():
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend
        from triton.runtime.jit import native_specialize_impl
    except Exception as e:  # noqa: BLE001 - another Triton layout: nothing to compare with
        pytest.skip(f"Triton's specialiser is not importable here: {e}")
    backend = CUDABackend(GPUTarget("cuda", 90, 32))
    return lambda a: native_specialize_impl(backend, a, False, True, True)


def _samples():
    ints = [v + d for v in (0, 1, 16, 4096, 2**31, 2**32, 2**63) for d in (-1, 0, 1)] + [-16, -17, -(2**31) - 1]
    ints = [v for v in ints if -(2**63) <= v < 2**64]
    store = torch.zeros(64, dtype=torch.float64)
    tensors = [
        store.view(dt)[k:]
        for dt in (torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int32)
        for k in (0, 1, 8, 16)
    ]
    return ints + [True, False, None, 0.0, 1.0, -2.5, float("inf")] + tensors


def test_key_is_at_least_as_fine_as_tritons_specialisation():
    """Any two arguments with one key get one Triton specialisation (type and attribute), so a cached compiled kernel
    is the one Triton would pick for either."""
    spec = _triton_specialiser()
    samples = _samples()
    for a, b in itertools.combinations(samples, 2):
        if launch._arg_key(a) == launch._arg_key(b) and type(a) is type(b):
            assert spec(a) == spec(b), (a, b, spec(a), spec(b))
    assert launch._arg_key(1) != launch._arg_key(2) and launch._arg_key(16) != launch._arg_key(17)
    assert launch._arg_key(2**31 - 16) != launch._arg_key(2**31)  # i32 and i64 widths
    assert launch._arg_key((1, 2)) is launch._UNCACHED and launch._arg_key(object()) is launch._UNCACHED


def test_keys_of_different_types_never_collide():
    keys = {}
    for a in _samples():
        k = launch._arg_key(a)
        kind = "tensor" if isinstance(a, torch.Tensor) else type(a).__name__
        keys.setdefault(k, set()).add(kind)
    assert all(len(kinds) == 1 for kinds in keys.values()), keys


def test_the_kernels_are_wrapped():
    for k in (
        compose_mod._compose_fwd_kernel,
        compose_mod._compose_bwd_kernel,
        compose_mod._sum_splits_kernel,
        lc._lora_compose_fwd_kernel,
        lc._lora_compose_bwd_kernel,
        lc._lora_sum_kernel,
    ):
        assert isinstance(k, launch.FastLaunch)


def test_constexprs_must_come_as_keywords():
    """A constexpr passed positionally would be keyed by its type (two block sizes, one key): such a call takes
    Triton's own launch. Every kernel's runtime parameters come first."""
    k = compose_mod._sum_splits_kernel
    assert k._positional_max == 4 and k._names[4] == "BLOCK"
    assert lc._lora_sum_kernel._names[lc._lora_sum_kernel._positional_max] == "HAS_DG"


def test_keyword_values_are_keyed_by_type():
    """1, 1.0 and True are equal as dictionary keys but compile three kernels in Triton; keyword order and
    positional values are part of the key as well."""
    x = torch.zeros(4)
    keys = {launch.FastLaunch.key(0, (x, 7), {"X": v}) for v in (1, 1.0, True)}
    assert len(keys) == 3
    assert launch.FastLaunch.key(0, (x, 7), {"X": 1}) == launch.FastLaunch.key(0, (x, 9), {"X": 1})  # both i32, odd
    assert launch.FastLaunch.key(0, (x, 7), {"X": 1}) != launch.FastLaunch.key(0, (x, 16), {"X": 1})
    assert launch.FastLaunch.key(0, (x,), {}) != launch.FastLaunch.key(1, (x,), {})  # the device


def test_off_switch(monkeypatch):
    monkeypatch.setenv("DORA_VERIFY_FAST_LAUNCH", "0")
    assert not launch.fast_launch_enabled()


# ----------------------------------------------------------------------------- GPU: the same bits as Triton's launch
gpu = pytest.mark.skipif(not CUDA, reason="the fast path launches compiled kernels on a GPU")


def _lora_compose_all(base, xa, B, m, nu, s, dy):
    y, _ = lc.lora_compose_forward_fused(base, xa, B, nu, None, s, m=m)
    grads = lc.lora_compose_backward_fused_all(dy, base, xa, B, nu, s, True, True, True, True, m=m)
    return (y,) + tuple(grads)


def _compose_all(base, lora, g, s, dy):
    y, inner = compose_mod.compose_forward_fused(base, lora, g, None, None, s, False, compose_mod.SAVE_INPUTS)
    grads = compose_mod.compose_backward_fused(
        dy, base, lora, inner, g, None, s, False, compose_mod.SAVE_INPUTS, base.dtype, lora.dtype, True, True, True
    )
    return (y,) + tuple(grads)


def _cases():
    """(T, N, r, offset): prime and block ± 1 shapes; offset 1 makes every activation a misaligned view."""
    return [(1, 1, 1, 0), (97, 131, 7, 0), (64, 128, 16, 1), (65, 129, 17, 1), (300, 257, 64, 0)]


def _operands(T, N, r, off, dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(T * 1000 + N)
    big = lambda n: torch.randn(n + off, device="cuda", dtype=dtype, generator=gen)[off:]  # noqa: E731
    base = big(T * N).view(T, N)
    lora = big(T * N).view(T, N)
    dy = big(T * N).view(T, N)
    xa = big(T * r).view(T, r)
    B = torch.randn(N, r, device="cuda", dtype=dtype, generator=gen)
    m = torch.rand(N, device="cuda", generator=gen) + 0.5
    nu = torch.rand(N, device="cuda", generator=gen) + 0.5
    return base, lora, dy, xa, B, m.to(dtype), nu


def _both_paths(monkeypatch, fn):
    monkeypatch.setenv("DORA_VERIFY_FAST_LAUNCH", "0")
    slow = fn()
    monkeypatch.setenv("DORA_VERIFY_FAST_LAUNCH", "1")
    fn()  # the first launch of a key goes through Triton's own launch
    before = lc._lora_compose_fwd_kernel.fast_launches + compose_mod._compose_fwd_kernel.fast_launches
    fast = fn()
    after = lc._lora_compose_fwd_kernel.fast_launches + compose_mod._compose_fwd_kernel.fast_launches
    return slow, fast, after - before


@gpu
@pytest.mark.parametrize("T,N,r,off", _cases())
def test_fast_launches_give_tritons_bits(monkeypatch, T, N, r, off):
    base, lora, dy, xa, B, m, nu = _operands(T, N, r, off)
    s = 0.5
    torch.cuda.synchronize()
    for fn in (lambda: _lora_compose_all(base, xa, B, m, nu, s, dy), lambda: _compose_all(base, lora, nu, s, dy)):
        slow, fast, n_fast = _both_paths(monkeypatch, fn)
        torch.cuda.synchronize()
        assert n_fast == 1, "the second launch of a key did not take the fast path"
        for a, b in zip(slow, fast):
            if a is None:
                assert b is None
                continue
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a.view(torch.uint8) if a.numel() else a, b.view(torch.uint8) if b.numel() else b)


@gpu
def test_a_launch_hook_takes_tritons_launch(monkeypatch):
    from triton import knobs

    base, lora, dy, xa, B, m, nu = _operands(64, 128, 16, 0)
    lc.lora_compose_forward_fused(base, xa, B, nu, None, 0.5, m=m)
    seen = []
    hook = lambda metadata: seen.append(metadata)  # noqa: E731
    chain = knobs.runtime.launch_enter_hook
    if hasattr(chain, "add"):
        chain.add(hook)
        undo = lambda: chain.remove(hook)  # noqa: E731
    else:
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", hook)
        undo = lambda: None  # noqa: E731
    try:
        before = lc._lora_compose_fwd_kernel.fast_launches
        lc.lora_compose_forward_fused(base, xa, B, nu, None, 0.5, m=m)
        assert lc._lora_compose_fwd_kernel.fast_launches == before and seen
    finally:
        undo()
