"""Factored DoRA row norm ν_i = ‖W_i + s·(BA)_i‖₂ without the dense product BA.

    ν_i² = ‖W_i‖² + 2s·Σ_j B_ij U_ij + s²·Σ_jk B_ij G_jk B_ik,    U = W Aᵀ [d_out, r],  G = A Aᵀ [r, r]

Numerical contract (W, A, B in bf16/fp16/fp32, ``s`` fp32-representable; result **fp32**):

* ``‖W‖²_row`` is accumulated in float64 from exactly squared inputs (relative error ≤ γ64_{d_in}, i.e.
  ~1e-12 at d_in = 8192), on every call — on CUDA at r ≤ 64 by the U kernel below, from the W tiles it reads anyway
  (elsewhere a pass of its own): no value of ν or of its terms outlives the forward that computed it and that
  forward's own backward (:class:`RowNormRunner`), so no writer of W, A or B can leave a stale one behind.
* ``U = W Aᵀ``: on CUDA a Triton GEMM whose tensor-core products are summed in fp32 only within chains
  of ≤ 256 products along d_in and across chains in float64 (a long tensor-core accumulation truncates: it measured
  3.1e-5 relative error in U on all-positive 8192×8192 data with cuBLAS, 4.1e-7 here). bf16/fp16 products are exact in
  fp32; fp32 adapters on a bf16 W are split exactly into three bf16 terms (A = A₁ + A₂ + A₃) so the
  products stay exact on tensor cores. fp32 weights, and everything off CUDA: IEEE fp32 GEMMs (TF32
  forced off; FMA accumulation rounds to nearest) over d_in chunks of ``chunk_bytes``.
* G = A Aᵀ and BG = B·G: on CUDA fp32 — G from the U kernel's chains (or an IEEE fp32 GEMM for fp32 A), rounded to
  fp32; BG by IEEE fp32 FMAs over the r terms in the assembly kernel (r ≤ 64) or the U kernel / an fp32 GEMM (r > 64);
  off CUDA both float64. The row sums and the assembly of ν² are float64; ν = RN_fp32(√ν²).
* Conditioning: ``κ_i = (‖W_i‖² + 2|s|·Σ_j|B_ij U_ij| + s²·gram_i) / ν̂_i²``. Every term is computed to a
  relative accuracy ρ (ρ ≈ 1e-7 for the fp32 GEMMs on realistic data, ≤ 1e-12 for the float64 terms), so
  the relative error of ν̂ is about ½·κ_i·ρ + 2⁻²⁴. Rows with κ_i > ``kappa_max`` (default 2: ν² is less
  than half the sum of the magnitudes of its parts, i.e. W_i ≈ −s(BA)_i) are recomputed densely in
  float64, ‖W_i + s(B_i A)‖ with B_i A formed from exact products: relative error ≤ γ64_{r+d_in+2}·cond_i,
  negligible until the row's condition number passes ~1e9. Zero rows give ν = 0 exactly.
* Transient memory: O(splits·(d_out·r + d_out + r²) + chunk) — U (fp32, or float64 split partials), the ‖W‖² and
  G partials, B·G at r > 64, one W chunk where needed.
* Autocast: the norm runs with autocast off (``torch.autocast(enabled=False)``), so an enclosing
  ``torch.autocast`` region never turns its fp32/float64 GEMMs into bf16/fp16 ones.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import math
from dataclasses import dataclass, field

import torch

from .dispatch import HAS_TRITON, KERNEL_DTYPES, autocast_off, fused_supported, getenv, interpreting
from .scale import check_scaling

if HAS_TRITON:
    import triton
    import triton.language as tl

    try:
        from triton.tools.tensor_descriptor import TensorDescriptor

        HAS_TMA = True
    except ImportError:  # older Triton: pointer loads only
        HAS_TMA = False
else:
    HAS_TMA = False

DEFAULT_KAPPA_MAX = 2.0
DEFAULT_CHUNK_BYTES = 256 << 20


def check_norm_inputs(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> float:
    """Validate shapes, dtypes, devices and finiteness; return ``s`` as a float. Raises ValueError/TypeError."""
    for name, t in (("W", W), ("A", A), ("B", B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: bfloat16, float16, float32")
        if t.device != W.device:
            raise ValueError(f"{name} is on {t.device} but W is on {W.device}")
    d_out, d_in = W.shape
    r = A.shape[0]
    if A.shape[1] != d_in or tuple(B.shape) != (d_out, r):
        raise ValueError(
            f"shape mismatch: W {tuple(W.shape)}, A {tuple(A.shape)} (want [r, {d_in}]), "
            f"B {tuple(B.shape)} (want [{d_out}, r])"
        )
    if d_out == 0 or d_in == 0 or r == 0:
        raise ValueError(f"empty operand: W {tuple(W.shape)}, A {tuple(A.shape)}")
    s = check_scaling(s)
    for name, t in (("W", W), ("A", A), ("B", B)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN/Inf")
    return s


def _row_chunks(n_rows: int, row_bytes: int, chunk_bytes: int):
    step = max(1, chunk_bytes // max(1, row_bytes))
    for i in range(0, n_rows, step):
        yield i, min(n_rows, i + step)


if HAS_TRITON:

    @triton.jit
    def _row_sq_kernel(w_ptr, out_ptr, M, K, stride_w, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[i] = Σ_k W[i, k]² in float64: each square is exact in float64 (≤ 48 significant bits), the
        sum runs in a fixed order (per-lane sequential over K blocks, then a fixed tree) — reproducible."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float64)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + ks
            w = tl.load(
                w_ptr + rows.to(tl.int64)[:, None] * stride_w + kk[None, :],
                mask=(rows < M)[:, None] & (kk < K)[None, :],
                other=0.0,
            ).to(tl.float64)
            acc += w * w
        tl.store(out_ptr + rows, tl.sum(acc, axis=1), mask=rows < M)


def weight_row_sq(
    W: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES, use_triton: "bool | None" = None
) -> torch.Tensor:
    """‖W_i‖² for every row, float64 (exact squares, float64 sums: relative error ≤ γ64_{d_in}). On CUDA one
    bandwidth-bound Triton pass over W (no float64 copy of W); elsewhere float64 torch ops chunked over rows."""
    out = torch.empty(W.shape[0], dtype=torch.float64, device=W.device)
    if (use_triton if use_triton is not None else (HAS_TRITON and W.is_cuda)) and W.numel():
        W = W if W.stride(1) == 1 else W.contiguous()
        _row_sq_kernel[(triton.cdiv(W.shape[0], 4),)](
            W, out, W.shape[0], W.shape[1], W.stride(0), BLOCK_M=4, BLOCK_K=256, num_warps=4
        )
        return out
    for i0, i1 in _row_chunks(W.shape[0], W.shape[1] * 8, chunk_bytes):
        w = W[i0:i1].to(torch.float64)
        out[i0:i1] = (w * w).sum(dim=1)
    return out


class _NoTF32:
    """Force IEEE fp32 GEMMs (no TF32) inside the block; restores the caller's setting."""

    def __enter__(self):
        self._old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self._old


if HAS_TRITON:

    @triton.jit
    def _wa_chain_step(part, acc, w, a, a2, a3, i, MODE: tl.constexpr, FLUSH: tl.constexpr):
        """One BLOCK_K slice of U's tile: ``part`` += w·a on the tensor cores, products exact — MODE 0: W and A
        bf16/fp16; MODE 1: bf16 W, fp32 ``a`` split here exactly into three bf16 terms; MODE 2: the same three
        terms split beforehand (``a``, ``a2``, ``a3``). Small terms first. At the end of a chain of FLUSH slices
        ``part`` is added into the float64 ``acc`` and restarted. Returns (part, acc)."""
        if MODE == 0:
            part = tl.dot(w, a, part, out_dtype=tl.float32)
        else:
            if MODE == 1:
                a1 = a.to(tl.bfloat16)
                r1 = a - a1.to(tl.float32)
                a2 = r1.to(tl.bfloat16)
                a3 = (r1 - a2.to(tl.float32)).to(tl.bfloat16)
            else:
                a1 = a
            part = tl.dot(w, a3, part, out_dtype=tl.float32)
            part = tl.dot(w, a2, part, out_dtype=tl.float32)
            part = tl.dot(w, a1, part, out_dtype=tl.float32)
        if i % FLUSH == FLUSH - 1:  # end of a chain: into float64, restart the MMA accumulator
            acc += part.to(tl.float64)
            part = tl.zeros_like(part)
        return part, acc

    @triton.jit
    def _wa_store(out_ptr, acc, rows, rr, M, R, pid_k, SPLIT: tl.constexpr):
        offs = rows.to(tl.int64)[:, None] * R + rr[None, :]
        msk = (rows < M)[:, None] & (rr < R)[None, :]
        if SPLIT == 1:
            tl.store(out_ptr + offs, acc.to(tl.float32), mask=msk)
        else:
            tl.store(out_ptr + pid_k.to(tl.int64) * M * R + offs, acc, mask=msk)

    @triton.jit
    def _wsq_step(sq, w, pid_r):
        """sq += Σ_k w² per row of the W tile, in float64 (each square exact), by the first r-block's programs only."""
        if pid_r == 0:
            wf = w.to(tl.float64)
            sq += tl.sum(wf * wf, axis=1)
        return sq

    @triton.jit
    def _wsq_store(wsq_ptr, sq, rows, M, pid_r, pid_k):
        if pid_r == 0:
            tl.store(wsq_ptr + pid_k.to(tl.int64) * M + rows, sq, mask=rows < M)

    @triton.jit
    def _wa_kernel(
        w_ptr,
        a_ptr,
        out_ptr,
        M,
        R,
        K,
        stride_w,
        stride_a,
        k_per_split,
        wsq_ptr,
        MODE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
        FLUSH: tl.constexpr,
        SPLIT: tl.constexpr,
        WSQ: tl.constexpr,
    ):
        """U[m, j] = Σ_k W[m, k] A[j, k] over the d_in range of split ``program_id(1)``, in chains of
        BLOCK_K·FLUSH exact products summed in fp32 on the tensor cores and across chains in float64
        (:func:`_wa_chain_step`), so the (truncating) tensor-core accumulation never runs longer than a chain
        and the error does not grow with K as a long tensor-core accumulation's does. SPLIT = 1 stores fp32 U;
        SPLIT > 1 stores float64 partials [SPLIT, M, R] (summed by the caller in a fixed order). WSQ: the programs of
        the first r-block also sum the squares of the W tiles they read, in float64 (exact squares), into
        ``wsq_ptr[split, M]`` (:func:`_wsq_store`): ‖W‖² from the same pass over W."""
        n_r = tl.cdiv(R, BLOCK_R)
        pid = tl.program_id(0)
        pid_m = pid // n_r  # the r-blocks of one row block run together and share W through L2
        pid_r = pid % n_r
        pid_k = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        ks = tl.arange(0, BLOCK_K)
        k_begin = pid_k * k_per_split
        k_end = tl.minimum(K, k_begin + k_per_split)
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float64)
        part = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        sq = tl.zeros([BLOCK_M], dtype=tl.float64)
        for i in range(0, tl.cdiv(k_end - k_begin, BLOCK_K)):
            kk = k_begin + i * BLOCK_K + ks
            w = tl.load(
                w_ptr + rows.to(tl.int64)[:, None] * stride_w + kk[None, :],
                mask=(rows < M)[:, None] & (kk < k_end)[None, :],
                other=0.0,
            )
            a = tl.load(
                a_ptr + rr.to(tl.int64)[None, :] * stride_a + kk[:, None],
                mask=(rr < R)[None, :] & (kk < k_end)[:, None],
                other=0.0,
            )
            part, acc = _wa_chain_step(part, acc, w, a, a, a, i, MODE, FLUSH)
            if WSQ:
                sq = _wsq_step(sq, w, pid_r)
        acc += part.to(tl.float64)
        _wa_store(out_ptr, acc, rows, rr, M, R, pid_k, SPLIT)
        if WSQ:
            _wsq_store(wsq_ptr, sq, rows, M, pid_r, pid_k)

    @triton.jit
    def _wa_tma_kernel(
        w_desc,
        a_desc,
        a2_desc,
        a3_desc,
        out_ptr,
        M,
        R,
        K,
        k_per_split,
        wsq_ptr,
        MODE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
        FLUSH: tl.constexpr,
        SPLIT: tl.constexpr,
        WSQ: tl.constexpr,
    ):
        """:func:`_wa_kernel` with TMA tile loads (host tensor descriptors; reads past K are zeros); MODE 0 or 2
        (fp32 A as three bf16 matrices A₁ + A₂ + A₃ split by the caller). Splits start on BLOCK_K boundaries, so a
        split's last block never reaches into the next split. Same chains, same float64 sums: the contract of
        :func:`_wa_kernel`."""
        n_r = tl.cdiv(R, BLOCK_R)
        pid = tl.program_id(0)
        pid_m = pid // n_r
        pid_r = pid % n_r
        pid_k = tl.program_id(1)
        k_begin = pid_k * k_per_split
        k_end = tl.minimum(K, k_begin + k_per_split)
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float64)
        part = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        sq = tl.zeros([BLOCK_M], dtype=tl.float64)
        for i in range(0, tl.cdiv(k_end - k_begin, BLOCK_K)):
            k0 = k_begin + i * BLOCK_K
            w = w_desc.load([pid_m * BLOCK_M, k0])
            a = a_desc.load([pid_r * BLOCK_R, k0]).T
            if MODE == 2:
                part, acc = _wa_chain_step(
                    part,
                    acc,
                    w,
                    a,
                    a2_desc.load([pid_r * BLOCK_R, k0]).T,
                    a3_desc.load([pid_r * BLOCK_R, k0]).T,
                    i,
                    MODE,
                    FLUSH,
                )
            else:
                part, acc = _wa_chain_step(part, acc, w, a, a, a, i, MODE, FLUSH)
            if WSQ:
                sq = _wsq_step(sq, w, pid_r)
        acc += part.to(tl.float64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        _wa_store(out_ptr, acc, rows, rr, M, R, pid_k, SPLIT)
        if WSQ:
            _wsq_store(wsq_ptr, sq, rows, M, pid_r, pid_k)


# Tiles (BLOCK_M, BLOCK_R, BLOCK_K, FLUSH, num_warps, num_stages) of the U kernel. r > 64: per mode, tuned on an H100 at
# r = 384 (bench/experiments/wa_variants.py): chains of 256 products (MODE 0) and 3·64 (MODE 1) measured 4.1e-7 max
# relative error of U on all-positive data.
# TMA loads (inside tma_loads(): CUDA-graph captures) where the operands allow them (16-byte aligned rows): U at
# 8192², r = 384 in 0.123 ms vs 0.161 ms; fp32 adapters 0.445 ms vs 0.58 ms (bench/kernels_gpu.py --parts profile).
WA_CONFIG = {0: (64, 128, 128, 2, 4, 3), 1: (128, 128, 64, 1, 8, 2)}
WA_TMA_CONFIG = {0: (64, 128, 128, 2, 4, 4), 1: (128, 128, 64, 1, 8, 3)}
# r ≤ 64 (the ranks people train with): BLOCK_R = r rounded up to a power of two (≥ 16), so the tensor cores do no
# zero work, with the other tiles per (mode, BLOCK_R): (BLOCK_M, BLOCK_K, FLUSH, num_warps, pointer stages, TMA stages),
# the TMA kernel's measured on an H200 (bench/experiments/wa_small_r.py; MODE 1 at r 16 and 64, BLOCK_R 32 taking
# their common tiles). The pointer kernel (eager calls: a layer's first, FSDP2's re-gathered parameters) is untimed.
WA_SMALL_R_CONFIG = {
    (0, 16): (64, 128, 2, 4, 3, 3),
    (0, 32): (64, 256, 1, 4, 3, 3),
    (0, 64): (32, 128, 2, 4, 3, 3),
    (1, 16): (64, 64, 1, 4, 3, 2),
    (1, 32): (64, 64, 1, 4, 3, 2),
    (1, 64): (64, 64, 1, 4, 3, 2),
}
WA_SMALL_R_MAX = 64
# (WA_MIN_PROGRAMS, WA_MIN_SPLIT_K) below, per mode, at r ≤ 64: two (MODE 1: four) programs per H200 SM, splits ≥ 512
WA_SMALL_R_SPLIT = {0: (264, 512), 1: (528, 512)}
G_SPLIT = (4, 512)  # G = A Aᵀ (one r×r tile): four splits, so that the assembly kernel reads few partials


def rank_block(R: int) -> int:
    """BLOCK_R for rank R ≤ WA_SMALL_R_MAX: R rounded up to a power of two, at least 16 (the MMA's k)."""
    return max(16, 1 << (max(R, 1) - 1).bit_length())


def wa_tiles(mode: int, R: int, tma: bool = False):
    """(BLOCK_M, BLOCK_R, BLOCK_K, FLUSH, num_warps, num_stages) of the U kernel for ``mode`` and rank ``R``. The TMA
    and pointer kernels differ only in their pipeline depth: same tiles, warps and chains, hence the same bits."""
    if R <= WA_SMALL_R_MAX:
        br = rank_block(R)
        bm, bk, flush, warps, stages, tma_stages = WA_SMALL_R_CONFIG[(mode, br)]
        return bm, br, bk, flush, warps, tma_stages if tma else stages
    return (WA_TMA_CONFIG if tma else WA_CONFIG)[mode]


assert all(WA_TMA_CONFIG[m][:5] == WA_CONFIG[m][:5] for m in WA_CONFIG)
# The longest chain of products one fp32 tensor-core accumulator sums before it is flushed to float64
# (MODE 1 issues three dots per K block): what dora_verify.bounds.kernel_norm_bound charges γ_chain for.
U_CHAIN = max(
    [cfg[2] * cfg[3] * (1 if mode == 0 else 3) for mode, cfg in WA_CONFIG.items()]
    + [cfg[1] * cfg[2] * (1 if mode == 0 else 3) for (mode, _), cfg in WA_SMALL_R_CONFIG.items()]
)
assert U_CHAIN <= 256
WA_MIN_PROGRAMS = 256  # below this many output tiles (e.g. G = A Aᵀ, r×r) d_in is split across programs
WA_MIN_SPLIT_K = 1024  # ... but each split keeps at least this much of d_in


def wa_splits(M: int, R: int, K: int, mode: int, rule: "tuple | None" = None) -> int:
    """Number of d_in splits of the U kernel: a function of the shape only (results are reproducible, and the
    same chains whether the pointer or the TMA kernel runs: both take their tiles from :func:`wa_tiles`). ``rule``:
    (fewest programs, least d_in per split) in place of the rank's default."""
    bm, br = wa_tiles(mode, R)[:2]
    tiles = -(-M // bm) * -(-R // br)
    if rule is None:
        rule = WA_SMALL_R_SPLIT[mode] if R <= WA_SMALL_R_MAX else (WA_MIN_PROGRAMS, WA_MIN_SPLIT_K)
    programs, min_k = rule
    return max(1, min(-(-programs // tiles), K // min_k))


def split_bf16x3(A: torch.Tensor):
    """fp32 A as three bf16 matrices, A = A₁ + A₂ + A₃ exactly (each the bf16 rounding of what is left; exact for
    normal fp32 values, whose 24 significant bits the three 8-bit terms cover), the split ``_wa_chain_step``'s MODE 1
    does in registers."""
    a1 = A.to(torch.bfloat16)
    r1 = A - a1.to(torch.float32)
    a2 = r1.to(torch.bfloat16)
    return a1, a2, (r1 - a2.to(torch.float32)).to(torch.bfloat16)


_TMA_LOADS = contextvars.ContextVar("dora_verify_tma_loads", default=False)


@contextlib.contextmanager
def tma_loads():
    """Inside the block the U kernel takes TMA loads where the operands allow them. Outside it takes pointer loads:
    Triton encodes a host tensor descriptor on every launch (~0.1 ms of host time per norm call on an H100 host),
    which a CUDA graph pays once at capture — :class:`RowNormRunner` captures (and warms up) inside this block.
    Both kernels run the same tiles and chains: the same bits (tests/test_kernels_norm.py)."""
    token = _TMA_LOADS.set(True)
    try:
        yield
    finally:
        _TMA_LOADS.reset(token)


def _tma_ok(W: torch.Tensor, A: torch.Tensor, mode: int) -> bool:
    """Can TMA descriptors address W and A (CUDA, Hopper or newer, 16-byte aligned base and row stride; for
    MODE 1 the contiguous bf16 thirds of A)?"""
    if not (W.is_cuda and HAS_TMA) or torch.cuda.get_device_capability(W.device)[0] < 9:
        return False
    a_ok = (
        (A.shape[1] * 2) % 16 == 0
        if mode == 1
        else A.data_ptr() % 16 == 0 and (A.stride(0) * A.element_size()) % 16 == 0
    )
    return a_ok and W.data_ptr() % 16 == 0 and (W.stride(0) * W.element_size()) % 16 == 0


def _wa_mode(W: torch.Tensor, A: torch.Tensor) -> "int | None":
    """The U kernel's MODE for these operands: 0 (W, A one 16-bit dtype), 1 (bf16 W, fp32 A), None (no kernel: fp32
    W, or fp16 W with fp32 A — an IEEE fp32 GEMM)."""
    if W.dtype == A.dtype and W.dtype != torch.float32:
        return 0
    if W.dtype == torch.bfloat16 and A.dtype == torch.float32:
        return 1
    return None


def _wa_launch(W: torch.Tensor, A: torch.Tensor, mode: int, use_tma: "bool | None", row_sq: bool, rule=None):
    """Run the U kernel on contiguous-row W, A: (U, wsq) as the kernel leaves them — U fp32 [M, R] with one split,
    else float64 partials [split, M, R]; wsq (``row_sq``) float64 partials [split, M], else None. The caller sums
    the partials (:func:`_sum_splits` or the assembly kernel, each in a fixed order). ``rule``: see
    :func:`wa_splits`."""
    d_out, d_in = W.shape
    r = A.shape[0]
    tma = use_tma if use_tma is not None else (_TMA_LOADS.get() and _tma_ok(W, A, mode))
    bm, br, bk, flush, warps, stages = wa_tiles(mode, r, tma)
    split = wa_splits(d_out, r, d_in, mode, rule)
    k_per = triton.cdiv(triton.cdiv(d_in, split), bk) * bk  # whole K blocks per split
    split = -(-d_in // k_per)
    out = torch.empty(
        (d_out, r) if split == 1 else (split, d_out, r),
        dtype=torch.float32 if split == 1 else torch.float64,
        device=W.device,
    )
    wsq = torch.empty((split, d_out), dtype=torch.float64, device=W.device) if row_sq else out
    grid = (triton.cdiv(d_out, bm) * triton.cdiv(r, br), split)
    meta = dict(BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, FLUSH=flush, SPLIT=split, WSQ=row_sq)
    if tma:
        a_parts = split_bf16x3(A.contiguous()) if mode == 1 else (A, A, A)  # MODE 0 reads only the first
        a_descs = [TensorDescriptor.from_tensor(t, [br, bk]) for t in a_parts]
        _wa_tma_kernel[grid](
            TensorDescriptor.from_tensor(W, [bm, bk]),
            *a_descs,
            out,
            d_out,
            r,
            d_in,
            k_per,
            wsq,
            MODE=2 if mode == 1 else 0,
            num_warps=warps,
            num_stages=stages,
            **meta,
        )
    else:
        _wa_kernel[grid](
            W,
            A,
            out,
            d_out,
            r,
            d_in,
            W.stride(0),
            A.stride(0),
            k_per,
            wsq,
            MODE=mode,
            num_warps=warps,
            num_stages=stages,
            **meta,
        )
    return out, (wsq if row_sq else None)


def _sum_splits(parts: torch.Tensor) -> torch.Tensor:
    """float64 partials [split, ...] summed over the splits (torch's reduction: a fixed order, reproducible)."""
    return parts.sum(dim=0)


def wa_product(
    W: torch.Tensor,
    A: torch.Tensor,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    use_triton: "bool | None" = None,
    use_tma: "bool | None" = None,
    row_sq: bool = False,
):
    """U = W Aᵀ in fp32 (module contract): on CUDA the Triton kernel above (fp32 sums of exact products
    within short K chains, float64 across chains and splits; TMA loads inside :func:`tma_loads` where the operands
    allow them, or as ``use_tma`` says); elsewhere fp32 GEMMs (TF32 off) over d_in chunks. ``row_sq``: returns
    (U, ‖W‖²_row float64) — on the kernel's path from the same pass over W (exact squares, float64 sums: the
    contract of :func:`weight_row_sq`), else :func:`weight_row_sq`."""
    d_out, d_in = W.shape
    r = A.shape[0]
    if use_triton if use_triton is not None else (HAS_TRITON and W.is_cuda):
        W = W if W.stride(1) == 1 else W.contiguous()
        A = A if A.stride(1) == 1 else A.contiguous()
        mode = _wa_mode(W, A)
        if mode is not None:
            out, wsq = _wa_launch(W, A, mode, use_tma, row_sq)
            U = out if out.dim() == 2 else _sum_splits(out).to(torch.float32)
            return (U, _sum_splits(wsq)) if row_sq else U
    U = torch.zeros(d_out, r, dtype=torch.float32, device=W.device)
    A32 = A.to(torch.float32)
    with _NoTF32():
        for k0, k1 in _row_chunks(d_in, d_out * 4, chunk_bytes):
            U += W[:, k0:k1].to(torch.float32) @ A32[:, k0:k1].t()
    return (U, weight_row_sq(W, chunk_bytes)) if row_sq else U


@dataclass
class NormInfo:
    """What the norm did: κ per row (float64) and the rows recomputed densely."""

    kappa: torch.Tensor
    recomputed_rows: list = field(default_factory=list)


def _dense_rows(W, A, B, s, rows: torch.Tensor, chunk_bytes: int) -> torch.Tensor:
    A64 = A.to(torch.float64)
    out = torch.empty(rows.numel(), dtype=torch.float64, device=W.device)
    for i0, i1 in _row_chunks(rows.numel(), W.shape[1] * 16, chunk_bytes):
        idx = rows[i0:i1]
        V = W[idx].to(torch.float64) + s * (B[idx].to(torch.float64) @ A64)
        out[i0:i1] = torch.linalg.vector_norm(V, dim=1)
    return out


if HAS_TRITON:

    @triton.jit
    def _sum_of_parts(ptr, offs, mask, n, stride):
        """Σ_{p < n} ptr[p·stride + offs] in float64, added in index order p = 0, 1, … from 0 (the bits of a plain
        loop) with four loads in flight at a time: a split kernel's partials, whose sum is load-latency-bound."""
        acc = tl.zeros_like(offs).to(tl.float64)
        ptr += offs
        for _ in range(0, n // 4):
            p0 = tl.load(ptr, mask=mask, other=0.0).to(tl.float64)
            p1 = tl.load(ptr + stride, mask=mask, other=0.0).to(tl.float64)
            p2 = tl.load(ptr + 2 * stride, mask=mask, other=0.0).to(tl.float64)
            p3 = tl.load(ptr + 3 * stride, mask=mask, other=0.0).to(tl.float64)
            acc = (((acc + p0) + p1) + p2) + p3
            ptr += 4 * stride
        for _ in range(0, n % 4):
            acc += tl.load(ptr, mask=mask, other=0.0).to(tl.float64)
            ptr += stride
        return acc

    @triton.jit
    def _assemble_kernel(
        u_ptr,
        u_splits,
        b_ptr,
        g_ptr,
        g_splits,
        bg_ptr,
        wsq_ptr,
        wsq_splits,
        nu_ptr,
        kappa_ptr,
        M,
        R,
        s,
        GRAM_FROM_G: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        """Per row: U = RN32(Σ of its split partials), ‖W‖² (partials summed in float64); cross = Σ B·U,
        |cross| = Σ|B·U| and gram = Σ (BG)·B in float64 — with GRAM_FROM_G (R ≤ BLOCK_R) BG = B·G is formed here by
        IEEE fp32 FMAs (an r-term fp32 sum, as the U kernel's chains) from G = RN32(Σ of G's partials), else read from
        ``bg_ptr``; ν² and κ; ν = RN32(√ν²)."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        cross = tl.zeros([BLOCK_M], dtype=tl.float64)
        cabs = tl.zeros([BLOCK_M], dtype=tl.float64)
        gram = tl.zeros([BLOCK_M], dtype=tl.float64)
        for j0 in range(0, R, BLOCK_R):
            jj = j0 + tl.arange(0, BLOCK_R)
            m2 = rmask[:, None] & (jj < R)[None, :]
            offs = rows.to(tl.int64)[:, None] * R + jj[None, :]
            b = tl.load(b_ptr + offs, mask=m2, other=0.0).to(tl.float64)
            u = _sum_of_parts(u_ptr, offs, m2, u_splits, M * R).to(tl.float32).to(tl.float64)
            bu = b * u
            cross += tl.sum(bu, axis=1)
            cabs += tl.sum(tl.abs(bu), axis=1)
            if GRAM_FROM_G:  # one r-block: b holds the rows of B whole, G fits one tile
                gmask = (jj < R)[:, None] & (jj < R)[None, :]
                G = _sum_of_parts(g_ptr, jj[:, None] * R + jj[None, :], gmask, g_splits, R * R).to(tl.float32)
                bg = tl.dot(b.to(tl.float32), G, input_precision="ieee")  # IEEE fp32 FMAs (no tensor cores)
                gram += tl.sum(b * bg.to(tl.float64), axis=1)
            else:
                gram += tl.sum(b * tl.load(bg_ptr + offs, mask=m2, other=0.0).to(tl.float64), axis=1)
        wsq = _sum_of_parts(wsq_ptr, rows, rmask, wsq_splits, M)
        nu2 = (wsq + (2.0 * s) * cross) + (s * s) * gram
        mag = (wsq + (2.0 * tl.abs(s)) * cabs) + (s * s) * tl.abs(gram)
        kappa = tl.where(nu2 > 0, mag / tl.where(nu2 > 0, nu2, 1.0), tl.where(mag > 0, float("inf"), 1.0))
        tl.store(kappa_ptr + rows, kappa, mask=rmask)
        tl.store(nu_ptr + rows, tl.sqrt(tl.maximum(nu2, 0.0)).to(tl.float32), mask=rmask)

    @triton.jit
    def _dense_rows_kernel(
        w_ptr,
        a_ptr,
        b_ptr,
        kappa_ptr,
        nu_ptr,
        K,
        R,
        s,
        stride_w,
        stride_a,
        kappa_max,
        BLOCK_K: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        """Rows with κ > kappa_max: ν = ‖W_i + s·(B_i A)‖ in float64 from exact products; other rows return
        at once (no host synchronisation to find the rows)."""
        i = tl.program_id(0)
        kap = tl.load(kappa_ptr + i)
        if kap > kappa_max:
            acc = tl.zeros([BLOCK_K], dtype=tl.float64)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                kmask = kk < K
                v = tl.zeros([BLOCK_K], dtype=tl.float64)
                for j0 in range(0, R, BLOCK_R):
                    jj = j0 + tl.arange(0, BLOCK_R)
                    bj = tl.load(b_ptr + i.to(tl.int64) * R + jj, mask=jj < R, other=0.0).to(tl.float64)
                    a = tl.load(
                        a_ptr + jj.to(tl.int64)[:, None] * stride_a + kk[None, :],
                        mask=(jj < R)[:, None] & kmask[None, :],
                        other=0.0,
                    ).to(tl.float64)
                    v += tl.sum(bj[:, None] * a, axis=0)
                w = tl.load(w_ptr + i.to(tl.int64) * stride_w + kk, mask=kmask, other=0.0).to(tl.float64)
                v = w + s * v
                acc += v * v
            tl.store(nu_ptr + i, tl.sqrt(tl.sum(acc, axis=0)).to(tl.float32))


GRAM_IN_ASSEMBLY_MAX_R = 64  # up to this rank the assembly kernel forms B·G itself (IEEE fp32 FMAs, d_out·r² of them)


def _norm_triton(W, A, B, s, wsq, kappa_max):
    """ν and κ. r ≤ 64 with the U kernel: four launches — U with ‖W‖² (one pass over W; ``wsq`` if given), G = A Aᵀ,
    the assembly (split partials summed and B·G formed there), the dense recompute. r > 64: ‖W‖², U, G and B·G each
    their own pass (splits summed by torch), then the assembly and the dense recompute."""
    d_out, d_in = W.shape
    r = A.shape[0]
    W = W if W.stride(1) == 1 else W.contiguous()
    A = A if A.stride(1) == 1 else A.contiguous()
    B = B if B.is_contiguous() else B.contiguous()
    mode = _wa_mode(W, A)
    small_r = r <= WA_SMALL_R_MAX  # one r-block: ‖W‖² in U's pass, U's partials summed in the assembly
    if mode is not None and small_r:
        U, wsq_parts = _wa_launch(W, A, mode, None, row_sq=wsq is None)
    else:  # r > 64: several r-blocks read each W tile, and U's float64 partials would not fit the assembly's registers
        U, wsq_parts = wa_product(W, A, use_triton=True), None
    wsq_parts = wsq.contiguous() if wsq is not None else (wsq_parts if wsq_parts is not None else weight_row_sq(W))
    gram_here = r <= GRAM_IN_ASSEMBLY_MAX_R
    g_mode = _wa_mode(A, A)
    if gram_here and g_mode is not None:
        G, _ = _wa_launch(A, A, g_mode, None, row_sq=False, rule=G_SPLIT)
    else:
        G = wa_product(A, A, use_triton=True)  # r×r, fp32 from exact products
    BG = None if gram_here else wa_product(B, G, use_triton=True)  # G is symmetric: B Gᵀ = B G
    nu = torch.empty(d_out, dtype=torch.float32, device=W.device)
    kappa = torch.empty(d_out, dtype=torch.float64, device=W.device)
    bm, br = (32, rank_block(r)) if gram_here else (64, 64)  # gram here: B·G by tl.dot
    _assemble_kernel[(triton.cdiv(d_out, bm),)](
        U,
        U.shape[0] if U.dim() == 3 else 1,
        B,
        G,
        G.shape[0] if G.dim() == 3 else 1,
        BG if BG is not None else G,
        wsq_parts,
        wsq_parts.shape[0] if wsq_parts.dim() == 2 else 1,
        nu,
        kappa,
        d_out,
        r,
        s,
        GRAM_FROM_G=gram_here,
        BLOCK_M=bm,
        BLOCK_R=br,
    )
    _dense_rows_kernel[(d_out,)](
        W, A, B, kappa, nu, d_in, r, s, W.stride(0), A.stride(0), float(kappa_max), BLOCK_K=128, BLOCK_R=32
    )
    return nu, kappa


def assemble_norm(wsq: torch.Tensor, U: torch.Tensor, G: torch.Tensor, B: torch.Tensor, s: float):
    """(ν float64, κ float64) per row from the three terms: ‖W‖² [d_out] and G = A Aᵀ [r, r] float64, U = W Aᵀ
    [d_out, r] (fp32 or float64); cross, gram, ν² and κ in float64 (module contract). ν is not yet rounded to
    fp32 and rows with κ > κ_max are not yet recomputed: the caller does both."""
    B64 = B.to(torch.float64)
    gram = ((B64 @ G) * B64).sum(dim=1)
    BU = B64 * U.to(torch.float64)
    cross = BU.sum(dim=1)
    cross_abs = BU.abs().sum(dim=1)
    del BU
    nu2 = (wsq + (2.0 * s) * cross) + (s * s) * gram
    mag = (wsq + (2.0 * abs(s)) * cross_abs) + (s * s) * gram.abs()
    pos = nu2 > 0
    kappa = torch.where(
        pos,
        mag / torch.where(pos, nu2, torch.ones_like(nu2)),
        torch.where(mag > 0, torch.full_like(mag, math.inf), torch.ones_like(mag)),
    )
    return torch.sqrt(torch.clamp(nu2, min=0.0)), kappa


def _norm_torch(W, A, B, s, wsq, kappa_max, chunk_bytes):
    A64 = A.to(torch.float64)
    nu, kappa = assemble_norm(wsq, wa_product(W, A, chunk_bytes), A64 @ A64.t(), B, s)
    bad = torch.nonzero(kappa > kappa_max).flatten()
    if bad.numel():
        nu[bad] = _dense_rows(W, A, B, s, bad, chunk_bytes)
    return nu.to(torch.float32), kappa


def check_kappa_max(kappa_max: float) -> float:
    """``kappa_max`` as a float; raises ValueError for NaN or a value ≤ 0 (NaN would silently turn the recompute
    of cancelling rows off: every comparison κ > NaN is false). ∞ turns the recompute off on purpose."""
    k = float(kappa_max)
    if not k > 0:
        raise ValueError(f"kappa_max must be a positive number (inf turns the dense recompute off), got {kappa_max!r}")
    return k


def factored_row_norm(
    W: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    s: float,
    *,
    wsq: "torch.Tensor | None" = None,
    kappa_max: float = DEFAULT_KAPPA_MAX,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    return_info: bool = False,
    validate: bool = True,
    backend: "str | None" = None,
):
    """ν = ‖W + s·BA‖ per row, fp32, without materialising BA (contract: module docstring).

    ``wsq``: precomputed float64 ‖W‖²_row of this very W (the caller vouches for it); computed if None.
    ``backend``: 'triton' (default on CUDA: the U kernel — with ‖W‖² at r ≤ 64, a pass of its own above —, G = A Aᵀ, for
    r > 64 B·G, one assembly kernel and one dense-recompute kernel, no host synchronisation) or 'torch' (default
    elsewhere; float64 torch ops). Autocast is off inside. Returns ν, or (ν, :class:`NormInfo`) with ``return_info``.
    Never differentiable (DoRA detaches ν)."""
    s = check_norm_inputs(W, A, B, s) if validate else float(s)
    kappa_max = check_kappa_max(kappa_max) if validate else float(kappa_max)
    ok, why = fused_supported("row_norm", (W.dtype, A.dtype, B.dtype), W.device) if HAS_TRITON else (False, "")
    if backend is None:
        backend = "triton" if (W.is_cuda and ok) else "torch"  # the interpreter's bf16 tl.dot: torch instead
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    if backend == "triton" and not HAS_TRITON:
        raise ValueError("backend='triton' needs Triton installed")
    if backend == "triton" and not ok:
        raise ValueError(f"backend='triton' refused: {why}")
    with torch.no_grad(), autocast_off():
        W, A, B = W.detach(), A.detach(), B.detach()
        if wsq is not None and (wsq.shape != (W.shape[0],) or wsq.dtype != torch.float64):
            raise ValueError(f"wsq must be float64 [{W.shape[0]}], got {wsq.dtype} {tuple(wsq.shape)}")
        if backend == "triton":  # ‖W‖² from the U kernel's pass over W where it runs
            nu, kappa = _norm_triton(W, A, B, s, wsq, kappa_max)
        else:
            wsq = weight_row_sq(W, chunk_bytes) if wsq is None else wsq
            nu, kappa = _norm_torch(W, A, B, s, wsq, kappa_max, chunk_bytes)
    if return_info:
        return nu, NormInfo(kappa, torch.nonzero(kappa > kappa_max).flatten().cpu().tolist())
    return nu


# ----------------------------------------------------------------------------- per-layer runner, CUDA-graph replay
_GRAPH_POOLS: dict = {}  # device index -> (memory pool, capture stream, anchor graph), shared by every norm graph


def _graph_pool_and_stream(device: torch.device):
    """The device's shared capture pool and stream. A pool lives only while some graph captured into it does
    (PyTorch frees it with its last graph, and a capture into a freed pool id fails an allocator assert), so a
    one-op anchor graph captured at creation keeps it alive for the process."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _GRAPH_POOLS:
        pool, stream, anchor = torch.cuda.graph_pool_handle(), torch.cuda.Stream(idx), torch.cuda.CUDAGraph()
        with torch.cuda.device(idx):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                anchor.capture_begin(pool=pool)
                try:
                    torch.zeros(1, device=f"cuda:{idx}")
                finally:
                    anchor.capture_end()
        _GRAPH_POOLS[idx] = (pool, stream, anchor)
    return _GRAPH_POOLS[idx][:2]


def norm_graphs_enabled() -> bool:
    """CUDA-graph replay of the norm (:class:`RowNormRunner`); ``DORA_VERIFY_NORM_GRAPHS=0`` turns it off."""
    return HAS_TRITON and not interpreting() and getenv("DORA_VERIFY_NORM_GRAPHS", "1") != "0"


_FROZEN_SCOPE = contextvars.ContextVar("dora_verify_frozen_norms", default=None)


@contextlib.contextmanager
def frozen_norms():
    """Inference only: inside the block, with grad mode off, each layer computes ν once and reuses it.

    Outside this block ν is computed on every call (nothing can be stale). Inside it, a layer's ν is reused
    while grad mode is off and its W, A, B keep their storage, shape, dtype and in-place version and s and
    κ_max are unchanged; anything else recomputes. Writers that change values without a version bump — a fused
    optimiser step, ``.data`` edits, PEFT's merge/unmerge, a re-gather into the same buffer — are not seen:
    the block is the caller's promise that none runs inside it (e.g. around ``model.generate``). Leaving the
    block forgets every reused ν. Blocks nest; each entry is a new scope."""
    token = _FROZEN_SCOPE.set(object())  # compared by identity: a new key for every entry
    try:
        yield
    finally:
        _FROZEN_SCOPE.reset(token)


def _tensor_key(t: torch.Tensor):
    return (t.data_ptr(), t.dtype, t.shape, t.stride(), t.device)


class RowNormRunner:
    """ν of one layer's (W, A, B, s), computed from the values it reads on every forward (a checkpointed forward's
    recomputation inside the backward reuses its forward's ν; nothing else outlives a call).

    Nothing is cached between steps, so no writer can leave ν stale: autograd-visible in-place ops, for-loop, foreach
    and fused optimisers (the fused ones write without bumping ``_version``), ``.data`` edits, ``load_state_dict``,
    swapped or re-gathered parameters, ``.to()`` moves. ‖W‖² is recomputed too (at r ≤ 64 in U's pass over W). The
    exceptions: checkpointing's recomputation (below) and the opt-in :func:`frozen_norms` (inference, grad off).

    What it does keep is *how* to compute: on CUDA the computation is a CUDA graph of :func:`factored_row_norm`'s
    launches (the Triton backend: four kernels at r ≤ 64, six and torch's split sums above, a few small torch ops with
    fp32 adapters; no host synchronisation), replayed whenever W, A and B are the tensors at the same addresses with the
    same shapes, strides and dtypes as at the capture. A replay reads whatever those addresses hold now — the current
    values — and runs the same chains on them as an eager call: the same bits (the graph's U kernel takes TMA loads,
    whose descriptors it encodes once; an eager call pointer loads). An eager call costs ~0.3 ms of Python and launch
    time per layer on an H100 host, a replay one graph launch. The graph is captured the second time in a row a set of
    storages comes back (an optimiser updates W, A, B in place, so a training run captures once per layer, on its second
    call; parameters re-gathered into fresh buffers every step never pay for a capture); a new storage, shape, dtype, s
    or ``kappa_max`` captures again. Every layer's graph allocates its temporaries (‖W‖², U, G, κ: O(d_out·r)) from one
    shared pool per device, which is safe while replays run one at a time in one stream's order — the layers of a model
    do; layers run concurrently on several streams would share those temporaries: set ``DORA_VERIFY_NORM_GRAPHS=0``
    there. Each graph keeps only its ν (d_out fp32), copied out on every replay. Inside another capture, on the CPU,
    under the Triton interpreter or with ``DORA_VERIFY_NORM_GRAPHS=0`` the norm runs eagerly; a failed capture falls
    back to eager for good (``graph_error`` says why).

    Gradient checkpointing (``torch.utils.checkpoint``, reentrant or not; Hugging Face's
    ``gradient_checkpointing_enable``) reruns the forward inside the backward. That recomputation reads the ν of
    the forward it repeats instead of computing it again, the way a tensor saved for backward is read: the ν of the
    last forward run outside a backward is kept (d_out fp32) and returned to a forward run *inside* a backward
    whose W, A, B are the same storages, shapes, strides, dtypes and in-place versions, with the same s and κ_max;
    anything else computes. This is exactly the ν the original forward used — the recomputation is bitwise the
    forward, as checkpointing requires. It could differ from the current values only if a writer ran between a
    forward and its own backward, which autograd's own saved tensors (W, A, B among them) do not survive either."""

    def __init__(self):
        self._graph = self._graph_key = self._graph_nu = None
        self._seen_key = None
        self._frozen = None  # (key, ν) reused inside one frozen_norms() scope only
        self._forward = None  # (key, ν) of the last forward outside a backward: what its recomputation reads
        self.graph_error: "str | None" = None
        self.computes = self.replays = self.captures = self.recompute_reuses = 0

    def __deepcopy__(self, memo):  # a copied layer owns new tensors: it starts with no graph of its own
        return RowNormRunner()

    def __getstate__(self):  # pickling a layer (torch.save of a module) keeps no graph or device state
        return {}

    def __setstate__(self, state):
        self.__init__()

    def get(
        self, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float, kappa_max: float = DEFAULT_KAPPA_MAX
    ) -> torch.Tensor:
        """ν = ‖W + s·BA‖_row, fp32, detached, of the current values (the contract of :func:`factored_row_norm`;
        no input validation). Autocast is off inside."""
        s, kappa_max = float(s), float(kappa_max)
        where = (_tensor_key(W), _tensor_key(A), _tensor_key(B), s, kappa_max)  # storages, layouts, s, κ_max
        scope = _FROZEN_SCOPE.get()
        if scope is None or torch.is_grad_enabled():
            self._frozen = None
            key = (where, W._version, A._version, B._version)
            if torch._C._current_graph_task_id() != -1:  # a forward inside a backward: checkpointing's recompute
                if self._forward is not None and self._forward[0] == key:
                    self.recompute_reuses += 1
                    return self._forward[1]
                return self._compute(W, A, B, s, kappa_max, where)
            nu = self._compute(W, A, B, s, kappa_max, where)
            self._forward = (key, nu)
            return nu
        key = (scope, where, W._version, A._version, B._version)
        if self._frozen is None or self._frozen[0] != key:
            self._frozen = (key, self._compute(W, A, B, s, kappa_max, where))
        return self._frozen[1]

    def _compute(self, W, A, B, s, kappa_max, gkey):
        """ν of the current values: a replay of this layer's graph if ``gkey`` (storages, layouts, s, κ_max) is the
        captured one, else eager (capturing on the second sighting in a row of the same ``gkey``)."""
        self.computes += 1
        if gkey == self._graph_key and norm_graphs_enabled() and not torch.cuda.is_current_stream_capturing():
            self._graph.replay()
            self.replays += 1
            return self._graph_nu.clone()
        W, A, B = W.detach(), A.detach(), B.detach()
        eager = lambda: factored_row_norm(W, A, B, s, kappa_max=kappa_max, validate=False)  # noqa: E731
        if (
            not (W.is_cuda and self.graph_error is None and norm_graphs_enabled())
            or torch.cuda.is_current_stream_capturing()
        ):
            return eager()
        nu = eager()  # this call's ν (and the kernels compiled before the capture)
        if gkey != self._seen_key:  # storages seen for the first time: capture only if they come back
            self._seen_key = gkey
            return nu
        try:
            self._graph, self._graph_nu = self._capture(eager, W.device)
            self._graph_key = gkey
            self.captures += 1
        except Exception as e:  # noqa: BLE001 - any capture failure: stay eager, say why
            self._graph = self._graph_key = self._graph_nu = None
            self.graph_error = f"{type(e).__name__}: {e}"[:300]
        return nu

    @staticmethod
    def _capture(fn, device):
        """Capture ``fn``'s launches on the device's capture stream after one warm-up run there (cuBLAS
        creates its per-stream handle and workspace lazily, and Triton compiles, which a capture cannot do), both
        with TMA loads (:func:`tma_loads`: their descriptors are encoded once, at capture)."""
        graph = torch.cuda.CUDAGraph()
        pool, side = _graph_pool_and_stream(device)
        with torch.cuda.device(device), tma_loads():
            main = torch.cuda.current_stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                fn()
                graph.capture_begin(pool=pool)
                try:
                    out = fn()
                finally:
                    graph.capture_end()
            main.wait_stream(side)
        return graph, out


# ----------------------------------------------------------------------------- torch.library custom op
_OP_RUNNERS: "collections.OrderedDict" = collections.OrderedDict()  # (W, A, B storages and layouts, s) -> runner
OP_RUNNERS_MAX = 1024  # least recently used first out: parameters re-gathered into fresh buffers make new keys


def _op_runner(W, A, B, s) -> RowNormRunner:
    key = (_tensor_key(W), _tensor_key(A), _tensor_key(B), s)
    runner = _OP_RUNNERS.get(key)
    if runner is None:
        runner = _OP_RUNNERS[key] = RowNormRunner()
        if len(_OP_RUNNERS) > OP_RUNNERS_MAX:
            _OP_RUNNERS.popitem(last=False)
    else:
        _OP_RUNNERS.move_to_end(key)
    return runner


@torch.library.custom_op("dora_verify::row_norm", mutates_args=())
def _row_norm_op(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """What a compiled graph runs: the :class:`RowNormRunner` of these storages (a CUDA-graph replay once it has
    captured; a checkpointed region's recomputation reuses its forward's ν), its ν copied into a tensor the graph
    owns (inductor may reuse an extern output's memory)."""
    return _op_runner(W, A, B, float(s)).get(W, A, B, s).clone()


@_row_norm_op.register_fake
def _(W, A, B, s):
    return W.new_empty((W.shape[0],), dtype=torch.float32)


def row_norm_op(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """ν of the current W, A, B as a ``torch.library`` op (no validation): what compiled graphs call. One
    :class:`RowNormRunner` per set of storages, kept in a bounded least-recently-used table (the runner keeps no
    value between steps: nothing can be stale), so compiled training replays the norm's CUDA graph as eager does."""
    return torch.ops.dora_verify.row_norm(W.detach(), A.detach(), B.detach(), float(s))


__all__ = [
    "DEFAULT_KAPPA_MAX",
    "NormInfo",
    "RowNormRunner",
    "U_CHAIN",
    "assemble_norm",
    "check_kappa_max",
    "check_norm_inputs",
    "factored_row_norm",
    "frozen_norms",
    "row_norm_op",
    "tma_loads",
    "wa_product",
    "wa_splits",
    "weight_row_sq",
]
