"""What a fresh ν costs on the GPU, and whether it is fresh: the evidence behind ``RowNormRunner``.

ν is computed from the current W, A, B on every forward (nothing cached between calls). Against the previous
design (‖W‖² cached on W's ``_version``, ν on A's and B's) the training step pays one more bandwidth pass over W
(the ‖W‖² pass) and a checkpointed step a second norm in its recomputed forward; inference pays the whole norm
per forward unless ``frozen_norms()`` is on. This script measures each of those side by side in one run
(CUDA events, interleaved rounds, medians), and checks freshness on the GPU: ν after 5 fused-AdamW steps
against float64, for ``DoRALinear`` and the PEFT integration, and HF gradient checkpointing bitwise.

    python3 bench/norm_freshness_gpu.py --out $OUT/freshness.json     # about 2 minutes on an H200
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dora_verify.kernels import DoRALinear, frozen_norms
from dora_verify.kernels.norm import weight_row_sq
from dora_verify.provenance import provenance


def events_ms(fn, reps: int) -> list:
    """Per-call milliseconds of ``fn()`` by CUDA events (host gaps included, as a training loop sees them)."""
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return out


def interleaved(fns: dict, rounds: int = 7, reps: int = 10, warmup: int = 5) -> dict:
    """Median ms of each callable, measured in interleaved rounds after a warm-up of each."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    torch.cuda.synchronize()
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            samples[k] += events_ms(f, reps)
    return {k: round(statistics.median(v), 4) for k, v in samples.items()}


def layer_costs(d_out: int, d_in: int, r: int, adapters: str, tokens: int) -> dict:
    torch.manual_seed(0)
    lin = nn.Linear(d_in, d_out, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = DoRALinear(lin, r, 2 * r, adapter_dtype=torch.float32 if adapters == "fp32" else None)
    with torch.no_grad():
        layer.lora_B.normal_(0, 1e-3)
    x = torch.randn(tokens, d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x1 = torch.randn(1, d_in, device="cuda", dtype=torch.bfloat16)
    params = [layer.lora_A, layer.lora_B, layer.magnitude]
    W = lin.weight

    def step():
        return torch.autograd.grad(layer(x).float().square().mean(), params + [x])

    def step_ckpt():
        y = checkpoint(layer, x, use_reentrant=False)
        return torch.autograd.grad(y.float().square().mean(), params + [x])

    def infer(t):
        with torch.no_grad():
            return layer(t)

    with torch.no_grad(), frozen_norms():  # a long-lived scope: every call after the first reuses ν
        layer(x1)
        frozen_decode = interleaved({"decode_frozen": lambda: layer(x1), "prefill_frozen": lambda: layer(x)})
    t = interleaved(
        {
            "wsq_pass": lambda: weight_row_sq(W),
            "norm": layer.weight_norm,
            "step": step,
            "step_ckpt": step_ckpt,
            "decode_fresh": lambda: infer(x1),
            "prefill_fresh": lambda: infer(x),
        }
    )
    t.update(frozen_decode)
    w_bytes = W.numel() * W.element_size()
    return {
        "d_out": d_out,
        "d_in": d_in,
        "r": r,
        "adapters": adapters,
        "tokens": tokens,
        "ms": t,
        "wsq_TBps": round(w_bytes / (t["wsq_pass"] * 1e-3) / 1e12, 3),
        "wsq_over_step": round(t["wsq_pass"] / t["step"], 4),
        "norm_over_step": round(t["norm"] / t["step"], 4),  # what the recompute's second norm costs
        "ckpt_step_over_step": round(t["step_ckpt"] / t["step"], 3),
        "decode_fresh_over_frozen": round(t["decode_fresh"] / t["decode_frozen"], 3),
        "prefill_fresh_over_frozen": round(t["prefill_fresh"] / t["prefill_frozen"], 3),
        "graph_captures": layer.row_norm.captures,
        "graph_error": layer.row_norm.graph_error,
    }


def nu_rel_err(W, A, B, s, nu) -> float:
    ref = torch.linalg.vector_norm(W.double() + s * (B.double() @ A.double()), dim=1)
    return float(((nu.double() - ref).abs() / ref).max())


def fused_adamw_layer(adapters: str) -> dict:
    """The issue's repro on the GPU: 5 fused-AdamW steps, then ν against float64 of the current parameters."""
    torch.manual_seed(0)
    lin = nn.Linear(4096, 4096, device="cuda", dtype=torch.bfloat16)
    layer = DoRALinear(lin, 16, 32, adapter_dtype=torch.float32 if adapters == "fp32" else None)
    nn.init.normal_(layer.lora_B, 0, 0.05)
    x = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16)
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2, fused=True)
    for _ in range(5):
        layer(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    nu = layer.weight_norm()
    return {
        "adapters": adapters,
        "nu_rel_err": nu_rel_err(lin.weight, layer.lora_A, layer.lora_B, layer.scaling, nu),
        "graph_replays": layer.row_norm.replays,
        "graph_error": layer.row_norm.graph_error,
    }


def _tiny_llama(dtype, seed=0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=128,
    )
    return transformers.LlamaForCausalLM(cfg).to(device="cuda", dtype=dtype)


def _peft_model(dtype, autocast_adapter_dtype):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        _tiny_llama(dtype),
        LoraConfig(r=16, lora_alpha=32, use_dora=True, target_modules=targets),
        autocast_adapter_dtype=autocast_adapter_dtype,
    )
    g = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, device="cuda") * 0.02)
    return model


def fused_adamw_peft(dtype, autocast_adapter_dtype) -> dict:
    """5 fused-AdamW steps through the PEFT integration, then every layer's ν (the integration's runner) against
    float64 of the current parameters."""
    import dora_verify.kernels.peft as dv_peft
    from dora_verify.kernels.peft import _kernel_weight, _norm

    model = _peft_model(dtype, autocast_adapter_dtype)
    ids = torch.randint(0, 256, (4, 128), device="cuda", generator=torch.Generator(device="cuda").manual_seed(2))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    with dv_peft.enabled():
        model.train()
        for _ in range(5):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        worst = 0.0
        for mod in model.modules():
            if hasattr(mod, "lora_magnitude_vector") and "default" in getattr(mod, "lora_magnitude_vector", {}):
                W = _kernel_weight(mod)
                A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                s = float(torch.tensor(mod.scaling["default"], dtype=torch.float32))
                nu = _norm(mod.lora_magnitude_vector["default"], W.detach(), A.detach(), B.detach(), s)
                worst = max(worst, nu_rel_err(W, A, B, s, nu))
    return {"model": str(dtype), "adapters": "fp32" if autocast_adapter_dtype else str(dtype), "nu_rel_err_max": worst}


def hf_checkpointing_bitwise(dtype, autocast_adapter_dtype) -> dict:
    """Two fused-AdamW steps with and without HF gradient checkpointing (reentrant and not): bitwise equal?"""
    import dora_verify.kernels.peft as dv_peft

    start = _peft_model(dtype, autocast_adapter_dtype)
    ids = torch.randint(0, 256, (4, 128), device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    res = {"model": str(dtype), "adapters": "fp32" if autocast_adapter_dtype else str(dtype)}
    for impl in ("stock", "integration"):
        runs = {}
        for mode in ("none", "reentrant", "non_reentrant"):
            model = copy.deepcopy(start)
            if mode != "none":
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"}
                )
                model.enable_input_require_grads()
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
            out = []
            with dv_peft.enabled() if impl == "integration" else _null():
                model.train()
                for _ in range(2):
                    loss = model(input_ids=ids, labels=ids).loss
                    loss.backward()
                    out.append((loss.detach().clone(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
                    opt.step()
                    opt.zero_grad()
            runs[mode] = out
        for mode in ("reentrant", "non_reentrant"):
            same = all(
                torch.equal(a[0], b[0]) and all(torch.equal(u, v) for u, v in zip(a[1], b[1]))
                for a, b in zip(runs["none"], runs[mode])
            )
            res[f"{impl}_{mode}_bitwise"] = same
            res[f"{impl}_{mode}_losses"] = [float(a[0]) for a in runs[mode]]
        res[f"{impl}_none_losses"] = [float(a[0]) for a in runs["none"]]
    return res


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="two shapes only")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("norm_freshness_gpu.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    shapes = [
        (4096, 4096, 16, "bf16"),
        (4096, 4096, 16, "fp32"),
        (14336, 4096, 16, "bf16"),
        (4096, 14336, 64, "bf16"),
        (8192, 8192, 64, "bf16"),
        (8192, 8192, 384, "bf16"),
    ]
    if args.quick:
        shapes = shapes[:2]
    rep = {"kind": "norm_freshness", "provenance": provenance(torch.device("cuda")), "tokens": 8192, "layers": []}
    for d_out, d_in, r, ad in shapes:
        row = layer_costs(d_out, d_in, r, ad, 8192)
        rep["layers"].append(row)
        print(json.dumps(row), flush=True)
    rep["fused_adamw_layer"] = [fused_adamw_layer(a) for a in ("bf16", "fp32")]
    rep["fused_adamw_peft"] = [
        fused_adamw_peft(torch.bfloat16, True),
        fused_adamw_peft(torch.bfloat16, False),
        fused_adamw_peft(torch.float32, True),
    ]
    rep["hf_checkpointing"] = [
        hf_checkpointing_bitwise(torch.bfloat16, True),
        hf_checkpointing_bitwise(torch.bfloat16, False),
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(rep, indent=1))
    tmp.replace(args.out)
    print("\n| shape | r | adapters | step ms | ‖W‖² pass ms | pass/step | norm/step | decode fresh/frozen |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rep["layers"]:
        t = row["ms"]
        print(
            f"| {row['d_out']}×{row['d_in']} | {row['r']} | {row['adapters']} | {t['step']:.3f} | {t['wsq_pass']:.4f} "
            f"| {row['wsq_over_step']:.2%} | {row['norm_over_step']:.2%} | {row['decode_fresh_over_frozen']:.2f} |"
        )
    for k in ("fused_adamw_layer", "fused_adamw_peft", "hf_checkpointing"):
        for row in rep[k]:
            print(k, json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
