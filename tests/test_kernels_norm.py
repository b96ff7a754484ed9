"""kernels.norm / kernels.scale against the row-norm oracle (float64 + exact rationals)."""

import os

import pytest
import torch

from dora_verify.cases import make_case
from dora_verify.oracles import row_norm_truth
from dora_verify.kernels import dora_scale, factored_row_norm, frozen_norms
from dora_verify.kernels.dispatch import HAS_TRITON

BACKENDS = ["torch"] + (["triton"] if HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1" else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("regime", ["fresh", "trained", "near_cancel", "zero_rows", "all_positive", "heavy_tailed"])
def test_row_norm_relative_error(backend, dtype, regime):
    if backend == "triton" and dtype != "fp32":
        pytest.skip("bf16/fp16 tl.dot is unreliable under the interpreter; checked on the GPU (reports/h100/kernels)")
    c = make_case(regime, 67, 130, 5, 2, dtype=dtype, seed=2)
    nu, info = factored_row_norm(c.W, c.A, c.B, c.s, return_info=True, backend=backend)
    truth = row_norm_truth(c.W, c.A, c.B, c.s)
    assert nu.dtype == torch.float32
    rel = torch.where(truth.nu > 0, (nu.double() - truth.nu).abs() / truth.nu, nu.double().abs())
    assert float(rel.max()) <= 1e-6  # the contract, ill-conditioned rows included
    if regime == "near_cancel":
        assert set(c.special_rows) <= set(info.recomputed_rows)  # detected and recomputed densely
    if regime == "zero_rows":
        assert torch.all(nu[c.special_rows] == 0)


def test_factored_alone_would_fail_near_cancel():
    """Without the dense recompute the factored fp32 sum misses the contract on cancelling rows: the
    detection is load-bearing, not decoration."""
    c = make_case("near_cancel", 67, 130, 5, 2, dtype="bf16", seed=2)
    truth = row_norm_truth(c.W, c.A, c.B, c.s)
    nu = factored_row_norm(c.W, c.A, c.B, c.s, kappa_max=float("inf"), backend="torch")
    rel = ((nu.double() - truth.nu).abs() / truth.nu)[c.special_rows]
    assert float(rel.max()) > 1e-6


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (interpreter on CPU)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_weight_row_sq_triton_within_float64_bound(dtype):
    """The Triton ‖W‖² pass (ragged 67×1000: one off neither block size) against exact sums of the rounded W:
    |error| ≤ γ64_K·Σw² (squares exact in float64, float64 sums); rows of zeros give 0; bitwise reproducible."""
    from fractions import Fraction

    from dora_verify.bounds import U64, gamma
    from dora_verify.kernels.norm import weight_row_sq

    g = torch.Generator().manual_seed(3)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (conftest)
    W = (torch.rand(67, 1000, generator=g) * 2 - 1).mul(8.0).to(dtype).to(dev)
    W[5] = 0
    W[9] = W[9].abs()  # all-positive row
    got = weight_row_sq(W, use_triton=True)
    assert got.dtype == torch.float64 and float(got[5]) == 0.0
    assert torch.equal(got, weight_row_sq(W, use_triton=True))
    w64 = W.to(torch.float64).cpu()
    exact = [float(sum(Fraction(v) ** 2 for v in row.tolist())) for row in w64]
    err = (got.cpu() - torch.tensor(exact, dtype=torch.float64)).abs()
    assert bool((err <= gamma(W.shape[1], U64) * torch.tensor(exact, dtype=torch.float64)).all())


def test_scale_fp32_and_g_minus_1():
    nu = torch.tensor([1.0, 3.0, 0.0, 2.0])
    m = torch.tensor([1.0 + 2**-20, 3.0, 0.0, 2.0 * (1 - 2**-23)])
    g, gm1 = dora_scale(m, nu)
    assert g.dtype == gm1.dtype == torch.float32
    assert float(gm1[0]) == 2**-20 and float(g[1]) == 1.0 and float(gm1[1]) == 0.0
    assert float(g[2]) == 0.0 and float(gm1[2]) == -1.0  # zero row, m = ν = 0: output 0
    assert float(gm1[3]) == -(2**-23)  # below fp32 resolution of g itself: kept by (m − ν)/ν
    g_only, none = dora_scale(m, nu, g_minus_1=False)  # the y path skips g − 1: the same g
    assert none is None and torch.equal(g_only, g)


@pytest.mark.parametrize("bad", ["shape", "dtype", "nan", "s", "empty"])
def test_norm_bad_inputs(bad):
    W, A, B = torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    kw = {"W": W, "A": A, "B": B, "s": 2.0}
    if bad == "shape":
        kw["A"] = torch.randn(2, 7)
    elif bad == "dtype":
        kw["W"] = W.double()
    elif bad == "nan":
        kw["B"] = B.clone()
        kw["B"][1, 1] = float("nan")
    elif bad == "s":
        kw["s"] = 0.1
    else:
        kw["A"], kw["B"] = torch.randn(0, 8), torch.randn(6, 0)
    with pytest.raises((ValueError, TypeError)):
        factored_row_norm(kw["W"], kw["A"], kw["B"], kw["s"])


def _adapter_case(device, a_dtype=torch.bfloat16):
    c = make_case("near_cancel", 96, 200, 8, 1, dtype="bf16", seed=5, device=device)
    return c.W, c.A.to(a_dtype), c.B.to(a_dtype), c.s


def _fused_adamw_step(t: torch.Tensor) -> None:
    """One step of ``torch.optim.AdamW(fused=True)`` on a parameter sharing t's storage (gradient of ones)."""
    p = torch.nn.Parameter(t.detach())
    p.grad = torch.ones_like(p)
    torch.optim.AdamW([p], lr=1e-3, fused=True).step()  # moves each entry by ~1e-3: cancelling rows stay so


def _writers():
    """Every way a parameter's values change between calls, each (name, fn(t)) writing t in place. Only the first
    bumps the version counter, which a cache keyed on (address, _version) would see."""
    return [
        ("in-place op", lambda t: t.mul_(1.5)),
        (".data edit", lambda t: t.data.mul_(1.5)),
        ("fused AdamW", _fused_adamw_step),
        ("copy into the same buffer", lambda t: t.detach().copy_(t.detach() * 1.5)),
    ]


@pytest.mark.parametrize("writer", [w[0] for w in _writers()])
@pytest.mark.parametrize("which", ["W", "A", "B"])
def test_row_norm_runner_reads_the_current_values_whatever_wrote_them(writer, which):
    """ν from RowNormRunner equals factored_row_norm of the current values after every writer — including the
    fused optimiser and ``.data`` edits, which write without bumping ``_version`` (a cache keyed on it misses
    them: ν off by ~9e-2 after 5 fused-AdamW steps before RowNormRunner)."""
    from dora_verify.kernels.norm import RowNormRunner

    W, A, B, s = _adapter_case("cpu", torch.float32)
    runner = RowNormRunner()
    nu0 = runner.get(W, A, B, s)
    t = {"W": W, "A": A, "B": B}[which]
    with torch.no_grad():
        dict(_writers())[writer](t)
    nu1 = runner.get(W, A, B, s)
    assert not torch.equal(nu1, nu0), "the writer must change ν for the test to mean anything"
    assert torch.equal(nu1, factored_row_norm(W, A, B, s))


def test_frozen_norms_reuses_only_inside_the_block_with_grad_off():
    """frozen_norms(): ν computed once per scope with grad mode off; a version bump or a new storage inside
    recomputes; grad mode on, or leaving the block, computes fresh."""
    from dora_verify.kernels.norm import RowNormRunner

    W, A, B, s = _adapter_case("cpu")
    runner = RowNormRunner()
    with frozen_norms(), torch.no_grad():
        nu = runner.get(W, A, B, s)
        assert runner.get(W, A, B, s) is nu and runner.computes == 1
        B.mul_(1.5)  # version bump: seen
        nu2 = runner.get(W, A, B, s)
        assert runner.computes == 2 and torch.equal(nu2, factored_row_norm(W, A, B, s))
        assert runner.get(W, A.clone(), B, s) is not nu2 and runner.get(W, A, B, 2 * s) is not nu2
    with torch.no_grad():
        B.data.mul_(2.0)  # outside the block: never reused
        assert torch.equal(runner.get(W, A, B, s), factored_row_norm(W, A, B, s))
    with frozen_norms():  # grad mode on: not reused
        n = runner.computes
        runner.get(W, A, B, s), runner.get(W, A, B, s)
        assert runner.computes == n + 2


def test_norm_keeps_its_contract_under_autocast():
    """An enclosing autocast never turns the norm's fp32/float64 GEMMs into bf16 ones: the same bits as without
    (under CPU autocast an fp32 GEMM would return bf16: ν off by ~1e-3 relative)."""
    c = make_case("trained", 67, 130, 5, 2, dtype="fp32", seed=2)
    ref = factored_row_norm(c.W, c.A, c.B, c.s)
    for dt in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dt):
            assert torch.equal(factored_row_norm(c.W, c.A, c.B, c.s), ref)


@pytest.mark.parametrize("kappa_max", [float("nan"), 0.0, -1.0])
def test_bad_kappa_max_is_refused(kappa_max):
    """κ_max = NaN would silently turn the dense recompute of cancelling rows off (κ > NaN is always false)."""
    c = make_case("near_cancel", 67, 130, 5, 2, dtype="bf16", seed=2)
    with pytest.raises(ValueError, match="kappa_max"):
        factored_row_norm(c.W, c.A, c.B, c.s, kappa_max=kappa_max)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("a_dtype", [torch.bfloat16, torch.float32])
def test_row_norm_runner_graph_replay_gives_the_eager_bits(a_dtype):
    """On CUDA ν is recomputed by replaying the captured graph: the same bits as an eager call after every update
    of A and B — in place, through ``.data`` and through the fused AdamW kernel, which bumps no version —
    (near-cancelling rows included: the dense-recompute kernel runs in the graph), a fresh copy each time, and a
    new storage captures again."""
    from dora_verify.kernels.norm import RowNormRunner

    W, A, B, s = _adapter_case("cuda", a_dtype)
    cache = RowNormRunner()
    first = cache.get(W, A, B, s)
    assert cache.graph_error is None and cache.replays == cache.captures == 0  # first sighting: eager only
    outs = []
    writers = dict(_writers())
    for step, how in enumerate(("in-place op", ".data edit", "fused AdamW", "copy into the same buffer")):
        with torch.no_grad():
            A.add_(1e-3 * torch.randn_like(A))
            writers[how](B)
        nu = cache.get(W, A, B, s)
        _, info = factored_row_norm(W, A, B, s, return_info=True)
        assert info.recomputed_rows, "the case must exercise the dense-recompute kernel"
        assert torch.equal(nu, factored_row_norm(W, A, B, s)), step
        outs.append(nu)
    assert cache.captures == 1 and cache.replays == 3  # captured on the second sighting, replayed after
    assert not torch.equal(outs[0], outs[-1]) and not torch.equal(first, outs[0])
    for i in range(3):  # storages that change every call (FSDP2's re-gathered parameters): never captured
        A2 = A.clone()
        assert torch.equal(cache.get(W, A2, B, s), factored_row_norm(W, A2, B, s))
    assert cache.captures == 1 and cache.replays == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_row_norm_runner_captures_after_earlier_graphs_died():
    """Layers come and go: a capture after every earlier graph was freed still works (the shared pool lives)."""
    import gc

    from dora_verify.kernels.norm import RowNormRunner

    W, A, B, s = _adapter_case("cuda")
    for _ in range(3):
        cache = RowNormRunner()
        for _ in range(3):
            with torch.no_grad():
                B.mul_(1.01)
            assert torch.equal(cache.get(W, A, B, s), factored_row_norm(W, A, B, s))
        assert cache.graph_error is None and cache.captures == 1 and cache.replays == 1
        del cache
        gc.collect()
    torch.randn(4, device="cuda")  # the RNG is untouched by the captures


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (interpreter on CPU)")
@pytest.mark.parametrize("shape", [(67, 1000, 5), (130, 2056, 19), (96, 1040, 50)])
def test_wa_product_tma_kernel_is_the_pointer_kernel(shape):
    """U = W Aᵀ through TMA loads (zero fill past d_in, rows and r) against the pointer-load kernel (same chains:
    the same bits) and against float64 under the chain bound |Û − U| ≤ (γ_chain(2u₃₂) + γ64)·|W||A|ᵀ + u₃₂|U|.
    fp16 on the CPU (the interpreter's bf16 dot is unreliable); bf16 and fp32 adapters on the GPU test below."""
    from dora_verify.bounds import U32, U64, gamma
    from dora_verify.kernels.norm import U_CHAIN, wa_product

    d_out, d_in, r = shape
    g = torch.Generator().manual_seed(11)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    W = (torch.rand(d_out, d_in, generator=g) - 0.25).to(torch.float16).to(dev)
    A = (torch.rand(r, d_in, generator=g) - 0.25).to(torch.float16).to(dev)
    tma = wa_product(W, A, use_triton=True, use_tma=True)
    assert torch.equal(tma, wa_product(W, A, use_triton=True, use_tma=False))
    (tu, tsq), (pu, psq) = (wa_product(W, A, use_triton=True, use_tma=t, row_sq=True) for t in (True, False))
    assert torch.equal(tu, tma) and torch.equal(pu, tma) and torch.equal(tsq, psq)  # ‖W‖² fused: the same bits too
    if dev == "cuda":  # bf16 W with fp32 A: split in registers (pointer kernel) or beforehand (TMA), same chains
        Wb = W.to(torch.bfloat16)
        A32 = A.float() * 1.0009765625
        assert torch.equal(
            wa_product(Wb, A32, use_triton=True, use_tma=True), wa_product(Wb, A32, use_triton=True, use_tma=False)
        )
    W64, A64 = W.double().cpu(), A.double().cpu()
    exact = W64 @ A64.t()
    bound = (gamma(U_CHAIN, 2 * U32) + gamma(d_in, U64)) * (W64.abs() @ A64.abs().t()) + U32 * exact.abs()
    assert bool(((tma.double().cpu() - exact).abs() <= bound).all())


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (interpreter on CPU)")
@pytest.mark.parametrize("shape", [(67, 1000, 5), (130, 2056, 19), (20, 2600, 16), (96, 1040, 50), (67, 1100, 70)])
@pytest.mark.parametrize("regime", ["trained", "near_cancel", "zero_rows", "all_positive"])
def test_triton_norm_pipeline_within_bound(shape, regime):
    """The Triton pipeline as it runs on CUDA — at r ≤ 64 ‖W‖² from the U kernel's own pass over W, the split
    partials of U, G and ‖W‖² summed in the assembly kernel (d_in 2056: 4 U splits; 2600: 5, and G 4) and B·G formed
    there (BLOCK_R 16, 32, 64); at r 70 the separate passes — within ``kernel_norm_bound`` of the exact ν, cancelling
    rows recomputed; with ‖W‖² given (``wsq=``, strided too) as well. The fused ‖W‖² within γ64_{d_in} of the exact sum
    of squares, and U unchanged by fusing it. fp16 (the interpreter's bf16 dot is unreliable; bf16 on the GPU)."""
    import math

    from dora_verify.bounds import U64, gamma, kernel_norm_bound
    from dora_verify.kernels.norm import wa_product, weight_row_sq

    d_out, d_in, r = shape
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    c = make_case(regime, d_out, d_in, r, 2, dtype="fp16", seed=3, device=dev)
    nu, info = factored_row_norm(c.W, c.A, c.B, c.s, return_info=True, backend="triton")
    truth = row_norm_truth(c.W, c.A, c.B, c.s)
    err = ((nu.double() - truth.nu).abs() - truth.bound).clamp_min(0)
    nb = kernel_norm_bound(c.W, c.A, c.B, c.s, truth.nu, "triton", info.recomputed_rows)
    assert float((err / nb).max()) <= 1.0
    if regime == "near_cancel":
        assert set(c.special_rows) <= set(info.recomputed_rows)
    given = weight_row_sq(c.W)
    strided = torch.stack([given, torch.full_like(given, 1e9)], 1)[:, 0]
    nu_given = factored_row_norm(c.W, c.A, c.B, c.s, wsq=given, backend="triton")
    assert torch.equal(nu_given, factored_row_norm(c.W, c.A, c.B, c.s, wsq=strided, backend="triton"))
    assert float((((nu_given.double() - truth.nu).abs() - truth.bound).clamp_min(0) / nb).max()) <= 1.0
    U, wsq = wa_product(c.W, c.A, use_triton=True, row_sq=True)
    assert torch.equal(U, wa_product(c.W, c.A, use_triton=True))
    exact = torch.tensor([math.fsum(v * v for v in row) for row in c.W.double().cpu().tolist()], dtype=torch.float64)
    assert bool(((wsq.cpu() - exact).abs() <= gamma(d_in, U64) * exact).all())


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (interpreter on CPU)")
@pytest.mark.parametrize("r", [16, 50])
def test_triton_norm_rows_carried_by_the_gram_term(r):
    """Rows of W that are zero: ν = |s|·‖B_i A‖ comes from the assembly's B·G alone, so its fp32 accuracy shows — ≤ 1e-6
    relative (a TF32 B·G, ~2⁻¹¹, would fail this on the GPU; the interpreter computes the dot in fp32 anyway)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    c = make_case("trained", 96, 1040, r, 2, dtype="fp16", seed=4, device=dev)
    W = c.W.clone()
    W[:24] = 0
    nu = factored_row_norm(W, c.A, c.B, c.s, backend="triton")
    truth = row_norm_truth(W, c.A, c.B, c.s)
    rel = ((nu.double() - truth.nu).abs() - truth.bound).clamp_min(0) / truth.nu
    assert float(truth.nu[:24].min()) > 0 and float(rel.max()) <= 1e-6


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the Triton norm on the GPU (CPU: the interpreter test above)"
)
@pytest.mark.parametrize("d_in", [1024, 1009])  # TMA-addressable rows, and a prime d_in (pointer loads)
@pytest.mark.parametrize("r", [24, 70])  # B·G in the assembly kernel, or by the U kernel
@pytest.mark.parametrize("adapters", ["bf16", "fp32"])
@pytest.mark.parametrize("regime", ["trained", "near_cancel", "zero_rows", "all_positive", "heavy_tailed", "fresh"])
def test_triton_norm_on_gpu_within_bound_and_contract(d_in, r, adapters, regime):
    """The production (Triton) norm on the GPU: ν within ``kernel_norm_bound`` of the exact ν and ≤ 1e-6 relative —
    through TMA loads (inside ``tma_loads()``, as RowNormRunner's graphs run it) where d_in allows, pointer loads
    else."""
    from dora_verify.bounds import kernel_norm_bound
    from dora_verify.kernels.norm import tma_loads

    c = make_case(regime, 257, d_in, r, 4, dtype="bf16", seed=8, device="cuda")
    A, B = (c.A, c.B) if adapters == "bf16" else (c.A.float() * 1.0009765625, c.B.float())
    with tma_loads():
        nu, info = factored_row_norm(c.W, A, B, c.s, return_info=True)
    truth = row_norm_truth(c.W, A, B, c.s)
    err = ((nu.double() - truth.nu).abs() - truth.bound).clamp_min(0)
    nb = kernel_norm_bound(c.W, A, B, c.s, truth.nu, "triton", info.recomputed_rows)
    assert float((err / nb).max()) <= 1.0
    rel = torch.where(truth.nu > 0, err / truth.nu, nu.double().abs())
    assert float(rel.max()) <= 1e-6


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_triton_backend_refuses_the_interpreters_bf16_dot(monkeypatch):
    """Under TRITON_INTERPRET=1 the interpreter multiplies bf16's raw uint16 bits in tl.dot (ν off by ~2e4
    relative): an explicit backend='triton' refuses with the reason; fp16 and fp32 still run."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    c = make_case("trained", 9, 20, 3, 2, dtype="bf16", seed=2)
    with pytest.raises(ValueError, match="tl.dot"):
        factored_row_norm(c.W, c.A, c.B, c.s, backend="triton")
    with pytest.raises(ValueError, match="tl.dot"):
        factored_row_norm(c.W, c.A.float(), c.B.float(), c.s, backend="triton")
    assert factored_row_norm(c.W, c.A, c.B, c.s).dtype == torch.float32  # the default takes torch


def test_row_norm_op_keeps_one_runner_per_storage_and_reads_current_values():
    """The op compiled graphs call: one RowNormRunner per set of storages (a compiled training step replays the
    norm's graph on CUDA), ν of the values at each call (a ``.data`` edit between calls is seen), and each call's
    ν a tensor of its own (a compiled graph may reuse an op output's memory)."""
    from dora_verify.kernels.norm import _OP_RUNNERS, row_norm_op

    g = torch.Generator().manual_seed(5)
    W, A, B = (torch.randn(shape, generator=g) for shape in ((24, 40), (4, 40), (24, 4)))
    nu1 = row_norm_op(W, A, B, 0.5)
    entries = len(_OP_RUNNERS)  # (a freed tensor's address may come back: its entry is reused, not duplicated)
    nu1.zero_()  # the caller's copy: the next call must not see this
    B.data.add_(0.25)
    nu2 = row_norm_op(W, A, B, 0.5)
    assert len(_OP_RUNNERS) == entries
    assert torch.equal(nu2, factored_row_norm(W, A, B, 0.5)) and nu2.data_ptr() != nu1.data_ptr()
