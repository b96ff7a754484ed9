"""Host cost per call of the kernels' launchers and glue at tiny shapes (GPU work ≪ host work, so wall time per
call = host time per call). Prints µs per call; the numbers attribute the eager layer's host-bound time.

    python3 bench/experiments/launch_overhead.py
"""

import time

import torch
import torch.nn.functional as F

from dora_verify.kernels import compose, dora_scale, lora_compose
from dora_verify.kernels.compose import RED_BLOCK, _sum_splits_kernel
from dora_verify.kernels.lora_compose import adapter_grads, lora_compose_backward_fused, lora_compose_forward_fused


def host_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def main():
    import triton

    T, N, R = 64, 512, 16
    d = dict(device="cuda", dtype=torch.bfloat16)
    base, dy = torch.randn(T, N, **d), torch.randn(T, N, **d)
    xa, B = torch.randn(T, R, **d), torch.randn(N, R, **d)
    g = torch.ones(N, device="cuda")
    lora = torch.randn(T, N, **d)
    partial = torch.zeros(4, N, device="cuda", dtype=torch.float64)
    out = torch.empty(N, device="cuda")
    m = torch.ones(N, device="cuda", requires_grad=True)
    nu = torch.ones(N, device="cuda")
    rows = {
        "torch.add (one aten op)": lambda: base + base,
        "F.linear bf16 (one GEMM)": lambda: F.linear(xa, B),
        "bare Triton launch (_sum_splits_kernel)": lambda: _sum_splits_kernel[(triton.cdiv(N, RED_BLOCK),)](
            partial, out, N, 4, BLOCK=RED_BLOCK
        ),
        "lora_compose_forward_fused (launcher)": lambda: lora_compose_forward_fused(base, xa, B, g, None, 2.0),
        "lora_compose_backward_fused (launcher)": lambda: lora_compose_backward_fused(
            dy, base, xa, B, g, 2.0, False, True
        ),
        "adapter_grads (the eager tier's adapter gradients)": lambda: adapter_grads(dy, xa, B, g, 2.0, True, True),
        "lora_compose (public, no grad)": lambda: lora_compose(base, xa, B, g, 2.0),
        "compose (public, no grad)": lambda: compose(base, lora, g, 2.0),
        "dora_scale (with grad)": lambda: dora_scale(m, nu),
    }
    from dora_verify.kernels.norm import factored_row_norm, tma_loads, weight_row_sq

    Wn = torch.randn(N, N, **d)
    An, Bn = torch.randn(R, N, **d), torch.randn(N, R, **d)
    wsq = weight_row_sq(Wn)

    def norm_tma():
        with tma_loads():
            return factored_row_norm(Wn, An, Bn, 2.0, wsq=wsq, validate=False)

    rows["factored_row_norm (eager, pointer loads)"] = lambda: factored_row_norm(
        Wn, An, Bn, 2.0, wsq=wsq, validate=False
    )
    rows["factored_row_norm (eager, TMA loads: descriptors encoded per launch)"] = norm_tma
    for name, fn in rows.items():
        print(f"{host_us(fn):9.1f} µs  {name}")
    b_, x_, B_ = base.clone().requires_grad_(), xa.clone().requires_grad_(), B.clone().requires_grad_()
    gg = g.clone().requires_grad_()
    y = lora_compose(b_, x_, B_, gg, 2.0)
    print(
        f"{host_us(lambda: torch.autograd.grad(y, (x_, B_, gg), dy, retain_graph=True)):9.1f} µs  "
        "lora_compose backward through autograd (d_xa, d_B, d_g)"
    )


def attribute_backward():
    """Split the host time of one lora_compose backward through autograd into its Python pieces."""
    import importlib

    lc = importlib.import_module("dora_verify.kernels.lora_compose")

    T, N, R = 64, 512, 16
    d = dict(device="cuda", dtype=torch.bfloat16)
    base, dy = torch.randn(T, N, **d), torch.randn(T, N, **d)
    x_ = torch.randn(T, R, **d).requires_grad_()
    B_ = torch.randn(N, R, **d).requires_grad_()
    gg = torch.ones(N, device="cuda").requires_grad_()
    spent = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
            return out

        return wrapper

    y = lora_compose(base, x_, B_, gg, 2.0)
    for _ in range(3):  # compile the kernels before anything is timed
        torch.autograd.grad(y, (x_, B_, gg), dy, retain_graph=True)
    lc._grads = timed("_grads (all of backward's Python)", lc._grads)
    lc.lora_compose_backward_fused_all = timed(
        "lora_compose_backward_fused_all (kernel, epilogues, d_xa GEMM)", lc.lora_compose_backward_fused_all
    )
    n = 300
    total = host_us(lambda: torch.autograd.grad(y, (x_, B_, gg), dy, retain_graph=True), n)
    k = n + 20
    print(f"{total:9.1f} µs  autograd.grad total per call")
    for name, sec in spent.items():
        print(f"{sec / k * 1e6:9.1f} µs  {name}")


if __name__ == "__main__":
    main()
    attribute_backward()
