"""Where the host time of one DoRALinear training step goes (torch.profiler, CPU self time per op).

    python3 bench/host_profile.py [--d 4096 --r 64 --tokens 2048] [--adapters bf16|fp32]

Small shapes make the step host-bound: the table shows which Python/launch pieces dominate.
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from dora_verify.kernels import DoRALinear


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--adapters", default="bf16", choices=["bf16", "fp32"])
    a = ap.parse_args()
    lin = torch.nn.Linear(a.d, a.d, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = DoRALinear(lin, a.r, 2 * a.r, adapter_dtype=torch.float32 if a.adapters == "fp32" else None)
    with torch.no_grad():
        layer.lora_B.normal_(0, 1e-3)
    x = torch.randn(a.tokens, a.d, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    params = [layer.lora_A, layer.lora_B, layer.magnitude]

    def step():
        return torch.autograd.grad(layer(x), params, dy)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=55))


if __name__ == "__main__":
    main()
