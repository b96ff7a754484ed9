"""Tile shapes of kernels/lora_compose.py at the layer benchmark's shape (T=4096, d_out=8192, r=384, bf16),
and the adapter-gradient GEMM layouts. Run on a GPU: python3 bench/experiments/lora_compose_tune.py"""

import importlib

import torch
import triton.testing

lc = importlib.import_module("dora_verify.kernels.lora_compose")


def ms(fn):
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def main():
    torch.manual_seed(0)
    T, N, R = 4096, 8192, 384
    dt = torch.bfloat16
    base = torch.randn(T, N, device="cuda", dtype=dt)
    xa = torch.randn(T, R, device="cuda", dtype=dt)
    B = (torch.randn(N, R, device="cuda") * 0.01).to(dt)
    g = 1 + 0.01 * torch.randn(N, device="cuda")
    dy = torch.randn(T, N, device="cuda", dtype=dt)
    rows = []
    y_ref, lora_ref = lc.lora_compose_forward_fused(base, xa, B, g, None, 2.0, write_lora=True)
    for cfg in [
        (64, 128, 64, 4, 3),
        (128, 128, 64, 8, 3),
        (128, 64, 64, 4, 3),
        (64, 256, 64, 8, 3),
        (128, 128, 32, 8, 4),
        (64, 128, 128, 4, 2),
        (128, 256, 64, 8, 3),
        (32, 128, 64, 4, 3),
    ]:
        keep = (lc.LC_BLOCK_T, lc.LC_BLOCK_N, lc.LC_BLOCK_R, lc.LC_WARPS, lc.LC_STAGES)
        lc.LC_BLOCK_T, lc.LC_BLOCK_N, lc.LC_BLOCK_R, lc.LC_WARPS, lc.LC_STAGES = cfg
        try:
            y, lora = lc.lora_compose_forward_fused(base, xa, B, g, None, 2.0, write_lora=True)
            same = bool(torch.equal(lora, lora_ref))
            tf = ms(lambda: lc.lora_compose_forward_fused(base, xa, B, g, None, 2.0))
            tb = ms(lambda: lc.lora_compose_backward_fused(dy, base, xa, B, g, 2.0, False, True))
            rows.append((str(cfg), tf, tb, same))
        except Exception as e:  # noqa: BLE001
            rows.append((str(cfg), float("nan"), float("nan"), repr(e)[:60]))
        lc.LC_BLOCK_T, lc.LC_BLOCK_N, lc.LC_BLOCK_R, lc.LC_WARPS, lc.LC_STAGES = keep
        print(rows[-1], flush=True)
    gs = g * 2.0
    print("| config (T,N,R,warps,stages) | fwd ms | bwd d_g ms | lora bits = default |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.4f} | {r[2]:.4f} | {r[3]} |")
    for name, fn in [
        ("mm(dy.t(), xa, out fp32)", lambda: torch.mm(dy.t(), xa, out_dtype=torch.float32)),
        ("mm(xa.t(), dy, out fp32)", lambda: torch.mm(xa.t(), dy, out_dtype=torch.float32)),
        ("mm(dy.t(), xa) bf16", lambda: torch.mm(dy.t(), xa)),
        ("dy @ gsB", lambda: dy @ (gs[:, None] * B.float()).to(dt)),
        ("adapter_grads", lambda: lc.adapter_grads(dy, xa, B, g, 2.0, True, True)),
        ("copy 64MB", lambda: dy.clone()),
    ]:
        print(f"| {name} | {ms(fn):.4f} |")


if __name__ == "__main__":
    main()
