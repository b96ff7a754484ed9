"""What holds the lora-compose kernels at ~0.47 of copy bandwidth, and the compose forward at 0.82? Variants of the
forward and backward with one cost removed or replaced each, timed under CUDA-graph replays (20 launches a replay,
variants interleaved, medians of 9 rounds) beside a device copy, with each compiled kernel's registers, spills and
layout conversions; bits against the shipped kernels where a variant computes the same function.

Forward (bf16 base, xa, B; T × N, r): ``dot`` (the shipped tile: tl.dot), ``fma`` (the lora tile as r fp32 FMAs of
exact products in the blocked layout), ``zero`` (no lora: memory and epilogue only); each with the shipped
error-free epilogue (``eft``) or a plain fp32 one (``plain``). Backward (d_base, d_g): d_g's products and sums in
float64 as shipped (``f64``), fp32 exact products summed in float64 (``p32``), fp32 sums per row tile then float64
(``t32``), or none (``none``: the d_base pass alone). Compose forward at 8192²: tile shapes.

Run on a GPU from outside the repository root: python3 lora_compose_limits.py [OUT_DIR]. ``--check`` runs the
variants' bits checks on small shapes only (CPU with TRITON_INTERPRET=1, fp16)."""

import importlib
import json
import statistics
import sys

import torch
import triton
import triton.language as tl

from dora_verify.kernels.compose import _y_value
from dora_verify.kernels.lora_compose import _lora_tile

lc = importlib.import_module("dora_verify.kernels.lora_compose")
cm = importlib.import_module("dora_verify.kernels.compose")
LO_DOT, LO_FMA, LO_ZERO = 0, 1, 2
DG_NONE, DG_F64, DG_P32, DG_T32 = 0, 1, 2, 3


@triton.jit
def _fma_tile(xa_ptr, b_ptr, rows, cols, T, N, RC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """RN_adapter(Σ_k xa[rows, k]·B[cols, k]) as fp32: products exact (16-bit operands), fp32 sums in k order."""
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    for k in tl.static_range(RC):
        xk = tl.load(xa_ptr + rows.to(tl.int64) * RC + k, mask=rows < T, other=0.0).to(tl.float32)
        bk = tl.load(b_ptr + cols.to(tl.int64) * RC + k, mask=cols < N, other=0.0).to(tl.float32)
        acc = acc + xk[:, None] * bk[None, :]
    return acc.to(xa_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _fwd_variant(
    base_ptr,
    xa_ptr,
    b_ptr,
    g_ptr,
    out_ptr,
    T,
    N,
    R,
    s,
    LO: tl.constexpr,
    PLAIN: tl.constexpr,
    RC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    n_n = tl.cdiv(N, BLOCK_N)
    rows = (tl.program_id(0) // n_n) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = (tl.program_id(0) % n_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    mask = (rows < T)[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if LO == 0:
        lo = _lora_tile(xa_ptr, b_ptr, rows, cols, T, N, R, BLOCK_T, BLOCK_N, BLOCK_R)
    elif LO == 1:
        lo = _fma_tile(xa_ptr, b_ptr, rows, cols, T, N, RC, BLOCK_T, BLOCK_N)
    else:
        lo = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    g = tl.load(g_ptr + cols, mask=cmask, other=0.0)[None, :]
    if PLAIN:
        v = g * (b + lo * s)
    else:
        v = _y_value(b, lo, g, g_ptr, cols, cmask, s, False, True)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_variant(
    dy_ptr,
    base_ptr,
    xa_ptr,
    b_ptr,
    g_ptr,
    dbase_ptr,
    partial_ptr,
    T,
    N,
    R,
    s,
    rows_per_split,
    LO: tl.constexpr,
    DG: tl.constexpr,
    RC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    g = tl.load(g_ptr + cols, mask=cmask, other=0.0)[None, :]
    acc = tl.zeros([BLOCK_N], dtype=tl.float64)
    t0 = pid_s * rows_per_split
    t_end = tl.minimum(t0 + rows_per_split, T)
    for start in range(t0, t_end, BLOCK_T):
        rows = start + tl.arange(0, BLOCK_T)
        mask = (rows < t_end)[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dbase_ptr + offs, (g * dy).to(dbase_ptr.dtype.element_ty), mask=mask)
        if DG != 0:
            if LO == 0:
                lo = _lora_tile(xa_ptr, b_ptr, rows, cols, T, N, R, BLOCK_T, BLOCK_N, BLOCK_R)
            else:
                lo = _fma_tile(xa_ptr, b_ptr, rows, cols, T, N, RC, BLOCK_T, BLOCK_N)
            bb = tl.load(base_ptr + offs, mask=mask, other=0.0)
            if DG == 1:
                inner = bb.to(tl.float64) + lo.to(tl.float64) * s
                acc += tl.sum(dy.to(tl.float64) * inner, axis=0)
            elif DG == 2:
                acc += tl.sum((dy * bb.to(tl.float32)).to(tl.float64) + (dy * lo).to(tl.float64) * s, axis=0)
            else:
                acc += tl.sum(dy * bb.to(tl.float32), axis=0).to(tl.float64)
                acc += tl.sum(dy * lo, axis=0).to(tl.float64) * s
    tl.store(partial_ptr + pid_s.to(tl.int64) * N + cols, acc, mask=cmask)


def kernel_card(compiled) -> dict:
    """Registers, spills, shared memory and layout conversions of a compiled kernel (what launch returns)."""
    ttgir = compiled.asm.get("ttgir", "")
    return {
        "regs": getattr(compiled, "n_regs", None),
        "spills": getattr(compiled, "n_spills", None),
        "shared": compiled.metadata.shared,
        "convert_layout": ttgir.count("ttg.convert_layout"),
        "local_alloc": ttgir.count("ttg.local_alloc"),
        "wgmma": ttgir.count("warp_group_dot"),
    }


def fwd(base, xa, B, g, s, lo, plain, bt, bn, warps, stages=3):
    T, N = base.shape
    R = xa.shape[1]
    out = torch.empty_like(base)
    k = _fwd_variant[(triton.cdiv(T, bt) * triton.cdiv(N, bn),)](
        base, xa, B, g, out, T, N, R, s, LO=lo, PLAIN=plain, RC=R, BLOCK_T=bt, BLOCK_N=bn,
        BLOCK_R=lc.lc_block_r(R), num_warps=warps, num_stages=stages, enable_fp_fusion=False,
    )  # fmt: skip
    return out, k


def bwd(dy, base, xa, B, g, s, lo, dg, bt, bn, warps, stages=3):
    T, N = dy.shape
    R = xa.shape[1]
    rows, splits = lc._splits(T, N)
    d_base = torch.empty_like(dy)
    partial = torch.empty((splits, N), dtype=torch.float64, device=dy.device)
    k = _bwd_variant[(triton.cdiv(N, bn), splits)](
        dy, base, xa, B, g, d_base, partial, T, N, R, s, rows, LO=lo, DG=dg, RC=R, BLOCK_T=bt, BLOCK_N=bn,
        BLOCK_R=lc.lc_block_r(R), num_warps=warps, num_stages=stages, enable_fp_fusion=False,
    )  # fmt: skip
    return d_base, partial.sum(0), k


def inputs(T, N, R, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    kw = dict(device=device, generator=gen)
    base = torch.randn(T, N, **kw).to(dtype)
    dy = torch.randn(T, N, **kw).to(dtype)
    xa = torch.randn(T, R, **kw).to(dtype)
    B = (torch.randn(N, R, **kw) * 0.05).to(dtype)
    g = 1 + torch.randn(N, **kw) * 1e-3
    return base, dy, xa, B, g, 0.5


def fma_reference(xa, B):
    """The fma tile's lora on the CPU: exact products, fp32 sums in k order, one rounding (its bits)."""
    acc = torch.zeros(xa.shape[0], B.shape[0], dtype=torch.float32)
    for k in range(xa.shape[1]):
        acc = acc + xa[:, k : k + 1].float().cpu() * B[:, k].float().cpu()[None, :]
    return acc.to(xa.dtype)


def check(device, dtype):
    """Bits: dot/eft variant = the shipped forward; fma variant's lora = fma_reference; d_base of every variant =
    shipped; d_g of each variant against float64 (relative to Σ|dy·inner|)."""
    rows = []
    for T, N, R in ((67, 130, 16), (128, 257, 64)):
        base, dy, xa, B, g, s = inputs(T, N, R, dtype, device)
        y_ship, _ = lc.lora_compose_forward_fused(base, xa, B, g, None, s)
        y_dot, _ = fwd(base, xa, B, g, s, LO_DOT, 0, lc.LC_BLOCK_T, lc.LC_BLOCK_N, lc.LC_WARPS)
        y_ref, _ = lc.lora_compose_forward_eager(base, xa, B, g, None, s)
        lora_fma = fma_reference(xa, B)
        y_fma_ref, _ = cm.compose_forward_eager(base.cpu(), lora_fma, g.cpu(), None, None, s, False, cm.SAVE_NONE)
        y_fma, _ = fwd(base, xa, B, g, s, LO_FMA, 0, 16, 256, 8)
        db_ship, dg_ship = lc.lora_compose_backward_fused(dy, base, xa, B, g, s, True, True)
        exact, scale = {}, {}
        for lo, lora in ((LO_DOT, torch.nn.functional.linear(xa, B)), (LO_FMA, lora_fma.to(device))):
            terms = dy.double() * (base.double() + lora.double() * s)  # the rounded lora each variant uses
            exact[lo], scale[lo] = terms.sum(0), terms.abs().sum(0)
        row = {"shape": [T, N, R], "fwd dot = shipped": torch.equal(y_dot, y_ship),
               "fwd dot vs eager tier bits": int((y_dot != y_ref).sum()),
               "fwd fma = compose(fma lora)": torch.equal(y_fma.cpu(), y_fma_ref)}  # fmt: skip
        variants = (("f64 dot", LO_DOT, DG_F64, 64, 128, 4), ("p32 dot", LO_DOT, DG_P32, 64, 128, 4),
                    ("t32 dot", LO_DOT, DG_T32, 64, 128, 4), ("f64 fma", LO_FMA, DG_F64, 16, 256, 8),
                    ("p32 fma", LO_FMA, DG_P32, 16, 256, 8))  # fmt: skip
        for name, lo, dg, bt, bn, w in variants:
            d_base, d_g, _ = bwd(dy, base, xa, B, g, s, lo, dg, bt, bn, w)
            row[f"bwd {name}: d_base = shipped"] = torch.equal(d_base, db_ship)
            row[f"bwd {name}: d_g err / Σ|dy·inner|"] = float(((d_g.double() - exact[lo]).abs() / scale[lo]).max())
        row["shipped d_g err / Σ|dy·inner|"] = float(((dg_ship.double() - exact[LO_DOT]).abs() / scale[LO_DOT]).max())
        rows.append(row)
    return rows


def graph_of(fn, n):
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(n):
            fn()
    return graph


def timed(calls: dict, n=20, rounds=9) -> dict:
    """µs per call of each entry, CUDA-graph replays of n calls, interleaved rounds, medians."""
    graphs = {k: graph_of(f, n) for k, f in calls.items()}
    times = {k: [] for k in calls}
    for _ in range(rounds):
        for k, graph in graphs.items():
            graph.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times[k].append(start.elapsed_time(end) / n * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


FWD_VARIANTS = [  # name, lo, plain, BLOCK_T, BLOCK_N, warps
    ("dot eft 64x128 w4 (shipped)", LO_DOT, 0, 64, 128, 4),
    ("dot plain 64x128 w4", LO_DOT, 1, 64, 128, 4),
    ("zero eft 64x128 w4", LO_ZERO, 0, 64, 128, 4),
    ("zero plain 64x128 w4", LO_ZERO, 1, 64, 128, 4),
    ("zero eft 16x256 w8", LO_ZERO, 0, 16, 256, 8),
    ("fma eft 16x256 w8", LO_FMA, 0, 16, 256, 8),
    ("fma eft 32x128 w4", LO_FMA, 0, 32, 128, 4),
    ("fma eft 8x256 w4", LO_FMA, 0, 8, 256, 4),
    ("fma plain 16x256 w8", LO_FMA, 1, 16, 256, 8),
]
BWD_VARIANTS = [  # name, lo, dg, BLOCK_T, BLOCK_N, warps
    ("dot f64 64x128 w4 (shipped)", LO_DOT, DG_F64, 64, 128, 4),
    ("dot p32 64x128 w4", LO_DOT, DG_P32, 64, 128, 4),
    ("dot t32 64x128 w4", LO_DOT, DG_T32, 64, 128, 4),
    ("none 64x128 w4", LO_DOT, DG_NONE, 64, 128, 4),
    ("none 32x128 w8", LO_DOT, DG_NONE, 32, 128, 8),
    ("fma f64 16x256 w8", LO_FMA, DG_F64, 16, 256, 8),
    ("fma p32 16x256 w8", LO_FMA, DG_P32, 16, 256, 8),
    ("fma t32 16x256 w8", LO_FMA, DG_T32, 16, 256, 8),
    ("fma t32 32x128 w4", LO_FMA, DG_T32, 32, 128, 4),
    ("fma p32 32x128 w4", LO_FMA, DG_P32, 32, 128, 4),
]
COMPOSE_TILES = [(16, 256, 8), (8, 512, 8), (32, 256, 8), (16, 512, 8), (16, 256, 4), (32, 128, 4), (8, 256, 4),
                 (64, 128, 8), (32, 512, 16)]  # fmt: skip


def gpu(out_dir):
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    lines = []
    for T, N, R in ((4096, 4096, 16), (4096, 14336, 16), (4096, 4096, 64), (8192, 8192, 16)):
        base, dy, xa, B, g, s = inputs(T, N, R, torch.bfloat16, "cuda")
        src, dst = torch.empty_like(base), torch.empty_like(base)
        calls, cards = {"copy": lambda: dst.copy_(src)}, {}
        y_ship, _ = lc.lora_compose_forward_fused(base, xa, B, g, None, s)
        calls["shipped fwd"] = lambda: lc.lora_compose_forward_fused(base, xa, B, g, None, s)
        calls["shipped bwd"] = lambda: lc.lora_compose_backward_fused(dy, base, xa, B, g, s, True, True)
        same = {}
        for name, lo, plain, bt, bn, w in FWD_VARIANTS:
            y, k = fwd(base, xa, B, g, s, lo, plain, bt, bn, w)
            cards["fwd " + name] = kernel_card(k)
            same["fwd " + name] = bool(torch.equal(y, y_ship)) if (lo, plain) == (LO_DOT, 0) else None
            calls["fwd " + name] = lambda a=(lo, plain, bt, bn, w): fwd(base, xa, B, g, s, *a)
        db_ship, _ = lc.lora_compose_backward_fused(dy, base, xa, B, g, s, True, True)
        for name, lo, dg, bt, bn, w in BWD_VARIANTS:
            d_base, _, k = bwd(dy, base, xa, B, g, s, lo, dg, bt, bn, w)
            cards["bwd " + name] = kernel_card(k)
            same["bwd " + name] = bool(torch.equal(d_base, db_ship))
            calls["bwd " + name] = lambda a=(lo, dg, bt, bn, w): bwd(dy, base, xa, B, g, s, *a)
        us = timed(calls)
        copy = us["copy"]  # one read + one write of T·N
        head = f"## T={T} N={N} r={R}: copy {copy:.1f} µs"
        lines.append(head)
        for k, t in us.items():
            passes = 2 if "fwd" in k else 3
            frac = copy * passes / 2 / t
            card = cards.get(k, {})
            lines.append(f"   {k:34s} {t:8.1f} µs  {frac:.2f} of copy  {card}  same bits: {same.get(k)}")
        results[f"{T}x{N}x{R}"] = {"us": us, "cards": cards, "same": same}
        print("\n".join(lines[-len(us) - 1 :]), flush=True)
    T = N = 8192
    base, lora = (torch.randn(T, N, device="cuda").to(torch.bfloat16) for _ in range(2))
    g = 1 + torch.randn(N, device="cuda") * 1e-3
    dst = torch.empty_like(base)
    calls = {"copy": lambda: dst.copy_(base)}
    for bt, bn, w in COMPOSE_TILES:
        out = torch.empty_like(base)

        def launch(bt=bt, bn=bn, w=w, out=out):
            cm._compose_fwd_kernel[(triton.cdiv(T, bt) * triton.cdiv(N, bn),)](
                base, lora, g, g, g, out, out, T, N, 0.5, DELTA=False, HAS_BIAS=False, SAVE_INNER=False, ODD=True,
                ODD_INNER=False, BLOCK_T=bt, BLOCK_N=bn, num_warps=w, enable_fp_fusion=False,
            )  # fmt: skip

        calls[f"compose fwd {bt}x{bn} w{w}"] = launch
    us = timed(calls)
    lines.append(f"## compose forward 8192x8192 bf16: copy {us['copy']:.1f} µs")
    for k, t in us.items():
        lines.append(f"   {k:34s} {t:8.1f} µs  {us['copy'] * 1.5 / t:.2f} of copy")
    results["compose 8192"] = us
    print("\n".join(lines[-len(us) - 1 :]), flush=True)
    if out_dir:
        with open(f"{out_dir}/lora_compose_limits.json", "w") as f:
            json.dump(results, f, indent=1, default=str)
        with open(f"{out_dir}/lora_compose_limits.txt", "w") as f:
            f.write("\n".join(lines) + "\n")


def main():
    args = sys.argv[1:]
    if "--check" in args or not torch.cuda.is_available():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float16
        for row in check(device, dtype):
            print(row, flush=True)
        return
    for row in check("cuda", torch.bfloat16):
        print(row, flush=True)
    gpu(args[0] if args else None)


if __name__ == "__main__":
    main()
