"""Experiment (issue 3): does the compose forward's program order explain its bimodal time at 4096×28672?

    python3 bench/experiments/compose_order.py [--fresh-outputs]

The shipped forward walks a 2-D grid rows-fastest: the programs in flight share a 256-column strip across many
rows (addresses one row stride apart). The variant flattens the grid columns-fastest, so the programs in flight
read contiguous memory. Same tiles and arithmetic (`_y_value`): the same bits (checked). Times by CUDA events,
50 calls after warm-up, median (p10, p90), order A/B/A/B, as `dora-verify bench` times the compose.
"""

import torch
import triton
import triton.language as tl

from dora_verify.bench import time_ms
from dora_verify.kernels.compose import FWD_BLOCK_N, FWD_BLOCK_T, FWD_WARPS, _y_value


@triton.jit
def _fwd_ordered(
    base_ptr,
    lora_ptr,
    g_ptr,
    out_ptr,
    T,
    N,
    s,
    COLS_FASTEST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    if COLS_FASTEST:
        n_n = tl.cdiv(N, BLOCK_N)
        pid = tl.program_id(0)
        pid_t = pid // n_n
        pid_n = pid % n_n
    else:
        pid_t = tl.program_id(0)
        pid_n = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    mask = (rows < T)[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lo = tl.load(lora_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + cols, mask=cmask, other=0.0)[None, :]
    v = _y_value(b, lo, g, g_ptr, cols, cmask, s, False, True)
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


def run(base, lora, g, out, cols_fastest):
    T, N = base.shape
    nt, nn = triton.cdiv(T, FWD_BLOCK_T), triton.cdiv(N, FWD_BLOCK_N)
    grid = (nt * nn,) if cols_fastest else (nt, nn)
    _fwd_ordered[grid](
        base,
        lora,
        g,
        out,
        T,
        N,
        2.0,
        COLS_FASTEST=cols_fastest,
        BLOCK_T=FWD_BLOCK_T,
        BLOCK_N=FWD_BLOCK_N,
        num_warps=FWD_WARPS,
        enable_fp_fusion=False,
    )
    return out


def main():
    gen = torch.Generator(device="cuda").manual_seed(0)
    for T, N in ((4096, 28672), (8192, 14336), (8192, 8192), (8192, 28672), (2048, 14336)):
        base = torch.randn(T, N, device="cuda", dtype=torch.bfloat16, generator=gen)
        lora = torch.randn(T, N, device="cuda", dtype=torch.bfloat16, generator=gen)
        g = 1 + 1e-3 * torch.randn(N, device="cuda", generator=gen)
        out = torch.empty_like(base)
        same = torch.equal(run(base, lora, g, out, False).clone(), run(base, lora, g, out, True))
        gb = 3 * base.numel() * 2 / 1e9
        line = []
        for cf in (False, True, False, True):
            t = time_ms(lambda i: run(base, lora, g, out, cf), 1, 10, 50)
            line.append(
                f"{'cols' if cf else 'rows'} {t['ms']:.4f} ({t['p10']:.4f}, {t['p90']:.4f}) {gb / t['ms']:.2f} TB/s"
            )
        print(f"{T}x{N} same bits {same}: " + " | ".join(line), flush=True)
        torch.cuda.empty_cache()


def fresh_outputs(T=4096, N=28672, calls=40):
    """Per-call time of the production forward (a fresh output from the caching allocator every call) and the
    output's address: is the bimodal median at 4096×28672 a property of where the output lands?"""
    from dora_verify.kernels.compose import compose_forward_fused

    gen = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(T, N, device="cuda", dtype=torch.bfloat16, generator=gen)
    lora = torch.randn(T, N, device="cuda", dtype=torch.bfloat16, generator=gen)
    g = 1 + 1e-3 * torch.randn(N, device="cuda", generator=gen)
    for _ in range(5):
        compose_forward_fused(base, lora, g, None, None, 2.0, False, 0)
    rows = []
    for _ in range(calls):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out, _ = compose_forward_fused(base, lora, g, None, None, 2.0, False, 0)
        b.record()
        b.synchronize()
        rows.append((round(a.elapsed_time(b), 4), hex(out.data_ptr())))
        del out
    by_ptr = {}
    for ms, ptr in rows:
        by_ptr.setdefault(ptr, []).append(ms)
    for ptr, ts in by_ptr.items():
        print(
            f"output at {ptr}: {len(ts)} calls, ms min {min(ts):.4f} median {sorted(ts)[len(ts) // 2]:.4f} "
            f"max {max(ts):.4f}",
            flush=True,
        )


if __name__ == "__main__":
    import sys

    fresh_outputs() if "--fresh-outputs" in sys.argv else main()
