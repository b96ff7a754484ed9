import sys, torch, time
from torch.profiler import profile, ProfilerActivity
from dora_verify import bench_model as bm
from dora_verify.bench_model import layer_under_test, integration

d_in, d_out, r, T = 4096, 4096, 16, 8192
gen = torch.Generator(device="cuda").manual_seed(0)
x = torch.randn(T, d_in, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
dy = torch.randn(T, d_out, device="cuda", dtype=torch.bfloat16, generator=gen)
for setting in ("eager", "compile"):
    for impl in ("lora", "ours_peft", "dora_linear", "peft_dora"):
        torch._dynamo.reset()
        layer, params = layer_under_test(impl, d_in, d_out, r, 0)
        fn = torch.compile(layer) if setting == "compile" else layer
        def call():
            with integration(impl == "ours_peft"):
                return torch.autograd.grad(fn(x), [x] + params, dy)
        for _ in range(5): call()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20): call()
        host = (time.perf_counter() - t) / 20  # host time per call when not waiting
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / 20
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5): call()
            torch.cuda.synchronize()
        ev = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA or e.self_device_time_total > 0]
        gpu = sum(e.self_device_time_total for e in prof.key_averages()) / 5 / 1e3
        nk = sum(e.count for e in prof.key_averages() if e.self_device_time_total > 0) / 5
        print(f"=== {setting} {impl}: host {host*1e3:.3f} ms/call, wall {wall*1e3:.3f}, GPU busy {gpu:.3f} ms, ~{nk:.0f} kernels/call")
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:14]
        for e in rows:
            if e.self_device_time_total > 0:
                print(f"   {e.self_device_time_total/5/1e3:8.3f} ms  x{e.count/5:4.1f}  {e.key[:110]}")
        syncs = [e for e in prof.key_averages() if "Synchronize" in e.key or "item" in e.key or "local_scalar" in e.key]
        for e in syncs: print("   SYNC?", e.key, e.count/5)
