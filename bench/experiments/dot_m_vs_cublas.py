"""Should the lora-compose backward form M = dyᵀxa from its own tile dots, and up to which r? Times the backward
(d_base, d_m, d_xa, d_B) with M from the kernel's dots against M from cuBLAS's fp32-output GEMM plus its launch,
interleaved CUDA-event timing of back-to-back calls, medians of 9 rounds; checks d_base, d_m and d_xa are the same
bits either way and reports d_B's largest difference relative to its largest value. The answer set
``kernels/lora_compose.py``'s DOT_M_MAX_R. Run on a GPU from outside the repository root: python3 dot_m_vs_cublas.py"""

import importlib
import statistics

import torch

lc = importlib.import_module("dora_verify.kernels.lora_compose")
SHAPES = ((8192, 8192, 16), (8192, 8192, 32), (8192, 8192, 64), (4096, 14336, 16), (4096, 14336, 32), (4096, 14336, 64))


def main():
    shipped = lc.dot_m_applies
    try:
        for T, N, R in SHAPES:
            gen = torch.Generator(device="cuda").manual_seed(0)
            kw = dict(device="cuda", generator=gen)
            base = torch.randn(T, N, dtype=torch.bfloat16, **kw)
            dy = torch.randn(T, N, dtype=torch.bfloat16, **kw)
            xa = torch.randn(T, R, dtype=torch.bfloat16, **kw)
            B = torch.randn(N, R, dtype=torch.bfloat16, **kw) * 0.01
            m = torch.rand(N, **kw).to(torch.bfloat16) + 1
            nu = torch.rand(N, **kw) + 1

            def run(dot):
                lc.dot_m_applies = lambda r, dtype, device=None: dot  # R ≤ 64 here: one r-block, as the kernel requires
                return lc.lora_compose_backward_fused_all(dy, base, xa, B, nu, 0.5, True, True, True, True, m=m)

            a, b = run(True), run(False)
            same = all(torch.equal(x, y) for x, y in zip(a[:3], b[:3]))
            rel = ((a[3].float() - b[3].float()).abs().max() / b[3].float().abs().max()).item()
            times = {True: [], False: []}
            for _ in range(9):
                for dot in (True, False):
                    for _ in range(3):
                        run(dot)
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(20):
                        run(dot)
                    end.record()
                    torch.cuda.synchronize()
                    times[dot].append(start.elapsed_time(end) / 20 * 1e3)
            print(
                f"T={T} N={N} r={R}: backward µs, M from the kernel {statistics.median(times[True]):.1f}, "
                f"from cuBLAS {statistics.median(times[False]):.1f}; d_base/d_m/d_xa bits same {same}; "
                f"d_B max rel diff {rel:.1e}",
                flush=True,
            )
    finally:
        lc.dot_m_applies = shipped


if __name__ == "__main__":
    main()
