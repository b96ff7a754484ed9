import cProfile, pstats, io, torch, time
from dora_verify.bench_model import layer_under_test, integration
d_in, d_out, r, T = 4096, 4096, 16, 8192
x = torch.randn(T, d_in, device="cuda", dtype=torch.bfloat16).requires_grad_()
dy = torch.randn(T, d_out, device="cuda", dtype=torch.bfloat16)
for setting in ("eager", "compile"):
    for impl in ("lora", "ours_peft", "dora_linear"):
        torch._dynamo.reset()
        layer, params = layer_under_test(impl, d_in, d_out, r, 0)
        fn = torch.compile(layer) if setting == "compile" else layer
        def call():
            with integration(impl == "ours_peft"):
                return torch.autograd.grad(fn(x), [x] + params, dy)
        for _ in range(5): call()
        torch.cuda.synchronize()
        # host time: make GPU not the bottleneck by timing host only
        t = time.perf_counter(); [call() for _ in range(50)]; host = (time.perf_counter() - t) / 50
        torch.cuda.synchronize()
        print(f"=== {setting} {impl}: host {host*1e6:.0f} us/call")
        if impl == "lora": continue
        pr = cProfile.Profile(); pr.enable()
        for _ in range(50): call()
        pr.disable(); torch.cuda.synchronize()
        s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22); 
        print("\n".join(l for l in s.getvalue().splitlines()[6:40] if l.strip()))
