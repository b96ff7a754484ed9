"""GPU evidence for the PEFT integration (issue 6): parity at bf16 on a mid-size random Llama-style model,
and the time and peak memory of a training step with and without the integration.

    DORA_VERIFY_COMMIT=<hash> python3 bench/peft_gpu.py --out DIR [--quick]

Parity: the same model and batch through stock PEFT and through the integration, both compared with a
float64 reference (the same rounded weights, stock PEFT in float64): relative error of logits (max-abs
normalised) and of the gradients of A, B and m, plus ours vs stock. Speed: one optimiser step (forward,
backward, AdamW) timed with CUDA events, median of repeats after warm-up; peak memory = allocator peak
during the step minus memory allocated before it. Both for PEFT's default fp32 adapters and bf16 adapters.
Writes DIR/peft_gpu.json and DIR/peft_gpu.md.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import time

import torch

from dora_verify import provenance
from dora_verify.kernels import peft as dv_peft

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_with_dora(hidden, intermediate, layers, adapters, dtype=torch.bfloat16, seed=0, via_bf16=False):
    """A random Llama-style model (CPU) with PEFT DoRA r = 64 on every projection, B ≠ 0 and m off the norm (a fresh
    adapter tests nothing). ``adapters``: 'fp32' (PEFT's autocast default) or the model dtype; ``via_bf16``: round
    the weights to bf16 first (a higher-precision copy of a bf16 model)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=4096,
    )
    model = transformers.LlamaForCausalLM(cfg)
    model = (model.to(torch.bfloat16) if via_bf16 else model).to(dtype)
    model = get_peft_model(
        model,
        LoraConfig(r=64, lora_alpha=128, use_dora=True, target_modules=TARGETS),
        autocast_adapter_dtype=adapters == "fp32",
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 1e-3).to(p.dtype))
            elif "lora_magnitude_vector" in name:
                p.mul_((1 + 1e-2 * torch.randn(p.shape, generator=g)).to(p.dtype))
    return model


def build(quick, adapters, dtype=torch.bfloat16, seed=0):
    return llama_with_dora(
        1024 if quick else 2048, 2816 if quick else 5632, 2 if quick else 4, adapters, dtype, seed
    ).cuda()


def run_step(model, ids, opt=None):
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out


def grads(model):
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


def parity(quick, log):
    rows = []
    bs, T = (2, 256) if quick else (2, 1024)
    ids = torch.randint(0, 32000, (bs, T), generator=torch.Generator().manual_seed(3)).cuda()
    for adapters in ("fp32", "bf16"):
        model = build(quick, adapters)
        ref = copy.deepcopy(model).double()  # same rounded weights, stock PEFT in float64
        res = {}
        for name, m, use in (("ref64", ref, False), ("stock", model, False), ("ours", model, True)):
            m.zero_grad(set_to_none=True)
            with dv_peft.enabled() if use else torch.enable_grad():
                out = run_step(m, ids)
            res[name] = (out.logits.detach().double(), float(out.loss), grads(m))
        rec = {"adapters": adapters, "tokens": bs * T}
        for name in ("stock", "ours"):
            rec[f"{name}_logits_rel_err"] = rel(res[name][0], res["ref64"][0])
            rec[f"{name}_loss_abs_err"] = abs(res[name][1] - res["ref64"][1])
            for kind in ("lora_A", "lora_B", "lora_magnitude_vector"):
                errs = [rel(res[name][2][n], res["ref64"][2][n]) for n in res["ref64"][2] if kind in n]
                rec[f"{name}_grad_{kind}_rel_err_max"] = max(errs)
        rec["ours_vs_stock_logits_rel"] = rel(res["ours"][0], res["stock"][0])
        rows.append(rec)
        log(rec)
        del model, ref
        torch.cuda.empty_cache()
    return rows


def speed(quick, log):
    import triton.testing

    rows = []
    bs, T = (2, 512) if quick else (4, 2048)
    ids = torch.randint(0, 32000, (bs, T), generator=torch.Generator().manual_seed(4)).cuda()
    for adapters in ("fp32", "bf16"):
        rec = {"adapters": adapters, "batch": bs, "seq": T}
        for name, use in (("stock", False), ("ours", True)):
            model = build(quick, adapters)
            model.train()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            with dv_peft.enabled() if use else torch.enable_grad():
                step = functools.partial(run_step, model, ids, opt)
                for _ in range(3):
                    step()
                rec[f"{name}_step_ms"] = float(triton.testing.do_bench(step, warmup=5, rep=200, return_mode="median"))
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                step()
                torch.cuda.synchronize()
                rec[f"{name}_peak_gib"] = (torch.cuda.max_memory_allocated() - before) / 2**30
            del model, opt
            torch.cuda.empty_cache()
        rec["speedup"] = rec["stock_step_ms"] / rec["ours_step_ms"]
        rec["peak_ratio"] = rec["ours_peak_gib"] / rec["stock_peak_gib"]
        rows.append(rec)
        log(rec)
    return rows


def markdown(res):
    p = res["provenance"]
    lines = [
        "# PEFT integration on one GPU: parity and training-step speed\n",
        f"Commit `{p.get('git', {}).get('commit')}`; device {p.get('device', {}).get('name')}; "
        f"torch {p.get('versions', {}).get('torch')}, peft {res['peft']}, transformers {res['transformers']}; "
        f"produced by `python3 bench/peft_gpu.py` in {res['seconds']:.0f} s.\n",
        f"Model: random Llama-style ({res['model']}), DoRA r = 64 on all seven projections, B ~ N(0, 1e-3), "
        "m perturbed by 1%. Errors against the same model in float64 (stock PEFT), max-abs normalised.\n",
        "## Parity (bf16 base model)\n",
        "| adapters | logits err: stock / ours | grad A err: stock / ours | grad B: stock / ours "
        "| grad m: stock / ours | ours vs stock logits |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["parity"]:
        lines.append(
            f"| {r['adapters']} | {r['stock_logits_rel_err']:.3g} / {r['ours_logits_rel_err']:.3g} | "
            f"{r['stock_grad_lora_A_rel_err_max']:.3g} / {r['ours_grad_lora_A_rel_err_max']:.3g} | "
            f"{r['stock_grad_lora_B_rel_err_max']:.3g} / {r['ours_grad_lora_B_rel_err_max']:.3g} | "
            f"{r['stock_grad_lora_magnitude_vector_rel_err_max']:.3g} / "
            f"{r['ours_grad_lora_magnitude_vector_rel_err_max']:.3g} | "
            f"{r['ours_vs_stock_logits_rel']:.3g} |"
        )
    lines += [
        "\n## Training step (forward, backward, AdamW; median of CUDA-event timings)\n",
        "| adapters | batch × seq | stock PEFT ms | with integration ms | speed-up | peak GiB stock / ours |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["speed"]:
        lines.append(
            f"| {r['adapters']} | {r['batch']}×{r['seq']} | {r['stock_step_ms']:.2f} | {r['ours_step_ms']:.2f} | "
            f"{r['speedup']:.2f}× | {r['stock_peak_gib']:.2f} / {r['ours_peak_gib']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main():
    import peft
    import transformers

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    res = {
        "provenance": provenance.provenance(torch.device("cuda")),
        "seed": 0,
        "quick": args.quick,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "model": "hidden 1024, 2 layers" if args.quick else "hidden 2048, intermediate 5632, 4 layers, vocab 32000",
    }
    res["parity"] = parity(args.quick, log)
    res["speed"] = speed(args.quick, log)
    res["seconds"] = time.time() - t0
    with open(os.path.join(args.out, "peft_gpu.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(args.out, "peft_gpu.md"), "w") as f:
        f.write(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
