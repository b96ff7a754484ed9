"""Where the host time of one PEFT-integration layer step goes: wall time per forward and forward+backward of
PEFT LoRA and the integration at a shape whose GPU work is negligible (so the wall time is host time), then the
integration's functions timed by wrappers. Run on a GPU from outside the repository root:

    python3 /path/to/bench/layer_host_time.py [--tokens 256 --d 4096 --r 16]
"""

import argparse
import collections
import functools
import importlib
import time

import torch

from dora_verify import bench_model as bm


def host_us(fn, n=300):
    for _ in range(30):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) / n * 1e6)
    return sorted(ts)[2]


def main():
    import peft.tuners.lora.layer as peft_layer

    import dora_verify.kernels.peft as dvp

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--r", type=int, default=16)
    a = ap.parse_args()
    lc = importlib.import_module("dora_verify.kernels.lora_compose")
    x = torch.randn(a.tokens, a.d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn(a.tokens, a.d, device="cuda", dtype=torch.bfloat16)
    for impl in ("lora", "ours_peft"):
        layer, params = bm.layer_under_test(impl, a.d, a.d, a.r, 0)
        bm.use_integration(impl == "ours_peft")
        fwd = host_us(lambda: layer(x))
        step = host_us(lambda: torch.autograd.grad(layer(x), [x] + params, dy))
        print(f"{impl}: forward {fwd:.0f} µs, forward+backward {step:.0f} µs (host)")
    spent = collections.Counter()

    def wrap(owner, name, label):
        raw = owner.__dict__[name]
        fn = raw.__func__ if isinstance(raw, staticmethod) else raw

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - t

        setattr(owner, name, staticmethod(timed) if isinstance(raw, staticmethod) else timed)

    wrap(peft_layer.Linear, "forward", "PEFT Linear.forward (the layer's forward)")
    wrap(dvp, "_norm", "  ν (norm runner)")
    wrap(dvp, "dora_lora_compose_unchecked", "  dora_lora_compose (forward)")
    wrap(lc, "lora_compose_forward_fused", "    forward launcher")
    wrap(lc._DoRAComposeFunction, "backward", "backward of the compose node")
    wrap(lc, "lora_compose_backward_fused_all", "  backward launcher")
    layer, params = bm.layer_under_test("ours_peft", a.d, a.d, a.r, 0)
    bm.use_integration(True)
    for _ in range(30):
        torch.autograd.grad(layer(x), [x] + params, dy)
    torch.cuda.synchronize()
    spent.clear()
    n, grad_s, t0 = 300, 0.0, time.perf_counter()
    for _ in range(n):
        y = layer(x)
        t = time.perf_counter()
        torch.autograd.grad(y, [x] + params, dy)
        grad_s += time.perf_counter() - t
    torch.cuda.synchronize()
    print(
        f"wrapped: {(time.perf_counter() - t0) / n * 1e6:.0f} µs per forward+backward, of which "
        f"autograd.grad {grad_s / n * 1e6:.0f}"
    )
    for label, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {label:44s} {s / n * 1e6:7.1f} µs")
    bm.use_integration(False)


if __name__ == "__main__":
    main()
