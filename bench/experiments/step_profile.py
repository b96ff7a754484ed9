"""Where the GPU time of one layer step goes, kernel by kernel (torch.profiler, CUDA activity).

    python3 bench/experiments/step_profile.py [--d 8192 --r 384 --tokens 4096] [--out DIR]

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
from dora_verify.bench import _build_layer, time_ms


def kernel_table(fn, steps=10):
    """{kernel name: µs per step} and the sum, from the profiler's device-side events."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    per = collections.Counter()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name[:90]] += (
                ev.device_time_total / steps if hasattr(ev, "device_time_total") else ev.cuda_time_total / steps
            )
    return dict(per.most_common()), sum(per.values())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=8192)
    ap.add_argument("--r", type=int, default=384)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(a.tokens, a.d, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    res = {"provenance": provenance.provenance(torch.device("cuda")), "shape": vars(a), "runs": {}}
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
                ms = time_ms(lambda i: fn(), 1, 10, 30)["ms"]
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
