import torch, time
from torch.profiler import profile, ProfilerActivity
from dora_verify import bench_model as bm
from dora_verify.bench import BenchConfig

def kernel_ms(prof, n):
    tot = 0.0; ours = 0.0; cats = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            tot += e.device_time
            k = e.name
            c = ("dora" if any(s in k for s in ("_lora_compose", "_compose", "_wa_", "_row_sq", "_assemble", "_dense_rows", "_sum_splits"))
                 else "gemm" if ("nvjet" in k or "gemm" in k or "cutlass" in k or "sm90" in k) else "attn" if "flash" in k or "fmha" in k else "other")
            cats[c] = cats.get(c, 0) + e.device_time
    return tot / n / 1e3, {k: round(v / n / 1e3, 2) for k, v in cats.items()}

base = bm.llama_base("llama3-8b", 2, 0)
ids = torch.randint(0, bm.VOCAB, (bm.BATCH, bm.SEQ), device="cuda")
for setting in ("eager", "checkpointing"):
    for impl in bm.MODEL_IMPLS:
        u = bm.ModelUnderTest(base, impl, 16, "bf16", setting, ids, 0)
        for _ in range(3): u.step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5): u.step()
        torch.cuda.synchronize(); wall = (time.perf_counter() - t) / 5 * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3): u.step()
            torch.cuda.synchronize()
        k, cats = kernel_ms(prof, 3)
        print(f"{setting:14s} {impl:10s} wall {wall:7.2f} ms  kernels {k:7.2f} ms  {cats}")
        if impl == "ours" :
            rows = {}
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    rows.setdefault(e.name[:70], [0, 0]); rows[e.name[:70]][0] += e.device_time / 3e3; rows[e.name[:70]][1] += 1/3
            for name, (ms, c) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:25]:
                print(f"      {ms:7.3f} ms x{c:5.1f} {name}")
        del u; torch.cuda.empty_cache()

# host micro-costs
from dora_verify.kernels.lora_compose import lora_compose_forward_fused, lora_compose
from dora_verify.kernels.norm import RowNormRunner, factored_row_norm, row_norm_op
W = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16); A = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16); B = torch.randn(4096, 16, device="cuda", dtype=torch.bfloat16)*1e-3
base = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16); xa = torch.randn(64, 16, device="cuda", dtype=torch.bfloat16); g = torch.ones(4096, device="cuda")
run = RowNormRunner()
def host(f, n=200):
    for _ in range(10): f()
    torch.cuda.synchronize(); t = time.perf_counter()
    for i in range(n):
        f()
        if i % 20 == 19: torch.cuda.synchronize()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n * 1e6
print("host us: launcher fwd", host(lambda: lora_compose_forward_fused(base, xa, B, g, None, 2.0)))
print("host us: custom op fwd", host(lambda: torch.ops.dora_verify.lora_compose_fwd(base, xa, B, g, None, 2.0, True)))
print("host us: lora_compose() no grad", host(lambda: lora_compose(base, xa, B, g, 2.0)))
print("host us: runner.get replay", host(lambda: run.get(W, A, B, 2.0)))
print("host us: factored_row_norm eager", host(lambda: factored_row_norm(W, A, B, 2.0, validate=False)))
print("host us: row_norm_op", host(lambda: row_norm_op(W, A, B, 2.0)))
print("host us: torch add", host(lambda: base + base))
