"""Where the model step's time goes, per setting: wall time against the sum of GPU kernel time (torch.profiler),
the kernels that take it, and the integration's host functions (cProfile). Llama-3-8B widths, 4 layers, r 16.
Run on a GPU from outside the repository root: python3 model_step_profile.py bf16:eager bf16:checkpointing ..."""

import collections
import cProfile
import importlib
import io
import pstats
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

bm = importlib.import_module("dora_verify.bench_model")


def kernel_table(unit, steps=3):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            unit.step()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by, count = collections.Counter(), collections.Counter()
    for e in events:
        by[e.name[:70]] += e.device_time / steps
        count[e.name[:70]] += 1
    return sum(e.device_time for e in events) / steps / 1e3, len(events) // steps, by, count


def main():
    base = bm.llama_base("llama3-8b", 4, 0)
    ids = torch.randint(0, bm.VOCAB, (bm.BATCH, bm.SEQ), device="cuda")
    for arg in sys.argv[1:]:
        adapters, setting = arg.split(":")
        torch._dynamo.reset()
        units = {impl: bm.ModelUnderTest(base, impl, 16, adapters, setting, ids, 0) for impl in ("lora", "ours")}
        with torch._dynamo.config.patch(cache_size_limit=64):
            for u in units.values():
                for _ in range(3):
                    u.step()
            torch.cuda.synchronize()
            for impl, u in units.items():
                t = time.perf_counter()
                for _ in range(5):
                    u.step()
                torch.cuda.synchronize()
                wall = (time.perf_counter() - t) / 5 * 1e3
                gpu, n, by, count = kernel_table(u)
                print(
                    f"== {adapters} {setting} {impl}: wall {wall:.1f} ms/step, GPU kernels {gpu:.1f} ms/step, "
                    f"{n} kernels/step"
                )
                for name, us in by.most_common(14):
                    print(f"   {us / 1e3:7.2f} ms  x{count[name] // 3:4d}  {name}")
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(5):
                units["ours"].step()
            torch.cuda.synchronize()
            pr.disable()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
            print(s.getvalue()[:6000], flush=True)
        del units
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
