"""Does the fast launch (kernels/launch.py) shorten the model step? One process: PEFT LoRA and the integration's
model, the integration stepped with DORA_VERIFY_FAST_LAUNCH=0 and =1 in turn (the switch is read at each launch),
interleaved in rounds by ``bench_model.interleaved_ms``; Llama-3-8B widths, 4 layers, r 16. Run on a GPU from
outside the repository root: python3 fast_launch_ab.py [ADAPTERS:SETTING ...] (default: the four rows below)"""

import importlib
import os
import sys
import time

import torch

bm = importlib.import_module("dora_verify.bench_model")
ROWS = [("bf16", "eager"), ("bf16", "checkpointing"), ("fp32", "checkpointing"), ("bf16", "compile")]


def main():
    base = bm.llama_base("llama3-8b", 4, 0)
    ids = torch.randint(0, bm.VOCAB, (bm.BATCH, bm.SEQ), device="cuda")
    rows = [tuple(a.split(":")) for a in sys.argv[1:]] or ROWS
    for adapters, setting in rows:
        torch._dynamo.reset()
        t0 = time.time()
        lora = bm.ModelUnderTest(base, "lora", 16, adapters, setting, ids, 0)
        ours = bm.ModelUnderTest(base, "ours", 16, adapters, setting, ids, 0)

        def stepped(unit, switch):
            def step():
                os.environ["DORA_VERIFY_FAST_LAUNCH"] = switch
                unit.step()

            return step

        with torch._dynamo.config.patch(cache_size_limit=64):
            lora.step()
            ours.step()
            t = bm.interleaved_ms({"lora": lora.step, "slow": stepped(ours, "0"), "fast": stepped(ours, "1")}, 2, 7, 3)
        ms = {k: v["ms"] for k, v in t.items()}
        print(
            f"{adapters} {setting}: LoRA {ms['lora']:.1f} ms; ours slow launch {ms['slow']:.1f} "
            f"({ms['slow'] / ms['lora']:.3f}), fast launch {ms['fast']:.1f} ({ms['fast'] / ms['lora']:.3f})  "
            f"p10-p90 fast {t['fast']['p10']:.1f}-{t['fast']['p90']:.1f} [{time.time() - t0:.0f} s]",
            flush=True,
        )
        del lora, ours
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
