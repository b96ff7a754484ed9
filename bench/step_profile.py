"""Where the GPU time of one layer step goes, kernel by kernel (torch.profiler, CUDA activity).

    python3 bench/step_profile.py [--d 8192 --r 384 --tokens 4096] [--out DIR]

For DoRALinear and PEFT LoRA with bf16 and fp32 adapters, forward (training) and forward+backward: the event
time per step (median of 30 after warm-up) next to the sum of kernel times per step, and each kernel's share.
A step whose event time exceeds its kernel sum by much is waiting on the host. Writes DIR/step_profile.json.
"""
import argparse
import collections
import json
import os

import torch
from torch.profiler import ProfilerActivity, profile

from dora_verify import provenance
from dora_verify.bench import _build_layer


def kernel_table(fn, steps=10):
    """{kernel name: µs per step} and the sum, from the profiler's device-side events."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    per = collections.Counter()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name[:90]] += ev.device_time_total / steps if hasattr(ev, "device_time_total") \
                else ev.cuda_time_total / steps
    return dict(per.most_common()), sum(per.values())


def event_ms(fn, reps=30):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        ts.append((a, b))
    torch.cuda.synchronize()
    return sorted(a.elapsed_time(b) for a, b in ts)[reps // 2]


def norm_pieces(d, r, seed=0):
    """GPU time (CUDA-event medians) of each launch of the Triton norm at d×d, rank r, bf16."""
    import triton

    from dora_verify.kernels import norm as nm
    torch.manual_seed(seed)
    W = (torch.randn(d, d, device="cuda") / d ** 0.5).to(torch.bfloat16)
    A = (torch.randn(r, d, device="cuda") / d ** 0.5).to(torch.bfloat16)
    B = (torch.randn(d, r, device="cuda") * 1e-3).to(torch.bfloat16)
    wsq = nm.weight_row_sq(W)
    U = nm.wa_product(W, A)
    G = nm.wa_product(A, A)
    BG = nm.wa_product(B, G)
    nu = torch.empty(d, device="cuda")
    kappa = torch.empty(d, device="cuda", dtype=torch.float64)
    pieces = {
        "U = W A^T": lambda: nm.wa_product(W, A),
        "G = A A^T (split, sum)": lambda: nm.wa_product(A, A),
        "BG = B G (3 bf16 terms)": lambda: nm.wa_product(B, G),
        "assemble": lambda: nm._assemble_kernel[(triton.cdiv(d, 64),)](U, B, BG, wsq, nu, kappa, d, r, 2.0,
                                                                       BLOCK_M=64, BLOCK_R=64),
        "dense_rows (none flagged)": lambda: nm._dense_rows_kernel[(d,)](W, A, B, kappa, nu, d, r, 2.0, W.stride(0),
                                                                         A.stride(0), 2.0, BLOCK_K=128, BLOCK_R=32),
        "factored_row_norm (eager)": lambda: nm.factored_row_norm(W, A, B, 2.0, wsq=wsq, validate=False),
    }
    return {k: event_ms(f, reps=50) for k, f in pieces.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=8192)
    ap.add_argument("--r", type=int, default=384)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--out", default=None)
    ap.add_argument("--norm-only", action="store_true", help="only the norm's pieces")
    a = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(a.tokens, a.d, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    res = {"provenance": provenance.provenance(torch.device("cuda")), "shape": vars(a), "runs": {}}
    res["norm_pieces_ms"] = norm_pieces(a.d, a.r)
    for k, v in res["norm_pieces_ms"].items():
        print(f"norm piece {k}: {v:.4f} ms", flush=True)
    if a.norm_only:
        return _write(res, a.out)
    for adapters in ("bf16", "fp32"):
        for impl in ("ours", "peft_lora"):
            layer, params, step = _build_layer(impl, a.d, a.r, adapters, 0)

            def fwd():
                step()
                return layer(x)

            def fwd_bwd():
                step()
                return torch.autograd.grad(layer(x), params, dy)
            for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                ms = event_ms(fn)
                table, total = kernel_table(fn)
                key = f"{impl}/{adapters}/{name}"
                res["runs"][key] = {"event_ms": ms, "kernel_sum_ms": total / 1e3, "kernels_us": table}
                print(f"\n== {key}: event {ms:.3f} ms, kernel sum {total / 1e3:.3f} ms", flush=True)
                for k, v in list(table.items())[:14]:
                    print(f"  {v:8.1f} us  {k}")
            torch.cuda.empty_cache()
    _write(res, a.out)


def _write(res, out):
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "step_profile.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
