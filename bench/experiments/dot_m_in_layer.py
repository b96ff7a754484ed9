"""Where should the lora-compose backward form M = dyᵀxa from its own dots when the kernels run inside a training
step (host time, launches and the extra pass of cuBLAS's GEMM over dy included)? The PEFT integration's layer inside
a model (bf16, 8192 tokens, r 16, the input requiring grad) and the 4-layer Llama-3-8B-width model step (eager,
checkpointing), each with M from cuBLAS below d_out 8192 (the shipped rule) and from the dots at every d_out, flipped
per call in one process, interleaved by ``bench_model.interleaved_ms``. Run on a GPU from outside the repository
root: python3 dot_m_in_layer.py"""

import importlib

import torch

bm = importlib.import_module("dora_verify.bench_model")
lc = importlib.import_module("dora_verify.kernels.lora_compose")
SHIPPED = lc.DOT_M_MIN_N


def with_min_n(fn, n):
    def call():
        lc.DOT_M_MIN_N = n
        try:
            return fn()
        finally:
            lc.DOT_M_MIN_N = SHIPPED

    return call


def layer_rows():
    for d_in, d_out in ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)):
        gen = torch.Generator(device="cuda").manual_seed(3)
        x = torch.randn(bm.LAYER_TOKENS, d_in, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
        dy = torch.randn(bm.LAYER_TOKENS, d_out, device="cuda", dtype=torch.bfloat16, generator=gen)
        calls = {}
        for impl in ("lora", "ours_peft"):
            layer, params = bm.layer_under_test(impl, d_in, d_out, 16, 0)

            def call(layer=layer, params=params, impl=impl):
                bm.use_integration(impl == "ours_peft")
                return torch.autograd.grad(layer(x), [x] + params, dy)

            calls[impl] = call
        calls = {"lora": calls["lora"], "cublas": with_min_n(calls["ours_peft"], SHIPPED),
                 "dots": with_min_n(calls["ours_peft"], 1)}  # fmt: skip
        t = bm.interleaved_ms(calls, 3, 9, 10)
        ms = {k: v["ms"] for k, v in t.items()}
        print(f"layer {d_in}->{d_out} r16 eager: LoRA {ms['lora']:.3f} ms; ours, M from cuBLAS below 8192 "
              f"{ms['cublas']:.3f} ({ms['cublas'] / ms['lora']:.3f}), M from dots {ms['dots']:.3f} "
              f"({ms['dots'] / ms['lora']:.3f})", flush=True)  # fmt: skip


def model_rows():
    base = bm.llama_base("llama3-8b", 4, 0)
    ids = torch.randint(0, bm.VOCAB, (bm.BATCH, bm.SEQ), device="cuda")
    for setting in ("eager", "checkpointing"):
        lora = bm.ModelUnderTest(base, "lora", 16, "bf16", setting, ids, 0)
        ours = bm.ModelUnderTest(base, "ours", 16, "bf16", setting, ids, 0)
        lora.step()
        ours.step()
        calls = {"lora": lora.step, "cublas": with_min_n(ours.step, SHIPPED), "dots": with_min_n(ours.step, 1)}
        t = bm.interleaved_ms(calls, 2, 7, 3)
        ms = {k: v["ms"] for k, v in t.items()}
        print(f"model bf16 {setting}: LoRA {ms['lora']:.1f} ms; ours, M from cuBLAS below 8192 {ms['cublas']:.1f} "
              f"({ms['cublas'] / ms['lora']:.3f}), M from dots {ms['dots']:.1f} ({ms['dots'] / ms['lora']:.3f})",
              flush=True)  # fmt: skip
        del lora, ours
        torch.cuda.empty_cache()


if __name__ == "__main__":
    layer_rows()
    model_rows()
