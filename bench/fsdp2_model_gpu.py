"""FSDP2 at model scale: a Llama-3-8B-width decoder (8 layers by default, random bf16 weights, adapters r = 16 on all
seven projections, bf16 adapters) under ``fully_shard`` on two GPUs of one host (NCCL), in eager mode, with Hugging
Face gradient checkpointing and under ``torch.compile``: PEFT LoRA, stock PEFT DoRA and the PEFT integration side by
side, every decoder layer and the root sharded, fused AdamW (the Trainer's default).

    DORA_VERIFY_COMMIT=<hash> torchrun --nproc_per_node 2 bench/fsdp2_model_gpu.py --out DIR \\
        [--layers 8] [--steps 6] [--settings eager,checkpointing,compile]
    torchrun --nproc_per_node 2 bench/fsdp2_model_gpu.py --cpu --out DIR    # gloo, a tiny model: the logic only

Per setting and implementation: the first step's loss and the gradients of A, B and m against the same model in fp32
(stock PEFT DoRA, sharded, the same rounded weights; relative errors max-abs normalised) and the FlashAttention-style
criterion of the toolkit (ours' error ≤ 2× stock PEFT DoRA's); the loss of every step (ν is computed from the
re-gathered parameters each step: a stale ν would move ours off stock's trajectory, which the CPU test
``tests/test_kernels_distributed.py::test_peft_llama_under_fully_shard_matches_one_process`` pins exactly); the
median step time after two lead-in steps (host clock around a synchronised step); each rank's peak memory over the
steps (transient: above what was allocated before the run, the unsharded bf16 base included); the layers that took
the kernels (eager: those with a norm runner; compiled: the project's ops counted in inductor's graphs). A failure
ends the job (run settings one call each with ``--settings``).
Rank 0 writes DIR/fsdp2_model.json and DIR/fsdp2_model.md."""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
import torch.distributed as dist

import dora_verify.kernels.peft as dv_peft
from dora_verify import provenance
from dora_verify.bench_model import GraphRecorder
from fsdp2_gpu import full_grads, log, rel, shard_model, write_report  # bench/ is the script's folder: on sys.path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IMPLS = ("lora", "stock", "ours")
SETTINGS = ("eager", "checkpointing", "compile")
DEV = "cuda"


def llama(layers: int, cpu: bool):
    """The random base model in bf16 (Llama-3-8B widths; a tiny one with ``cpu``), made on the device."""
    import transformers

    widths = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    if not cpu:
        widths = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      vocab_size=32000)  # fmt: skip
    cfg = transformers.LlamaConfig(num_hidden_layers=layers, max_position_embeddings=4096, **widths)
    torch.manual_seed(0)
    with torch.device(DEV):
        return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)


def with_adapters(base, impl: str, dtype):
    """PEFT LoRA or DoRA (r 16, α 32) on a copy of the bf16 ``base``, made in bf16 from one seed — A as PEFT draws it,
    B ≠ 0 and m off the norm (a fresh adapter tests nothing) — then cast to ``dtype``: every implementation and the
    fp32 reference hold the same rounded values."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)  # PEFT draws A from the global generator
    model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=16, lora_alpha=32, use_dora=impl != "lora", target_modules=TARGETS),
        autocast_adapter_dtype=False,
    )
    g = torch.Generator(device=DEV).manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, device=DEV, generator=g) * 1e-3)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 1e-2 * torch.randn(p.shape, device=DEV, generator=g))
    return model.to(dtype)


def grad_errors(grads: dict, ref: dict) -> dict:
    common = sorted(set(grads) & set(ref))
    return {k: max(rel(grads[n], ref[n]) for n in common if k in n) for k in ("lora_A", "lora_B", "magnitude")}


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def run(base, impl, setting, ids, steps) -> dict:
    """``steps`` training steps of one implementation in one setting: losses, first-step gradients, times, peaks."""
    model = shard_model(with_adapters(base, impl, torch.bfloat16))
    if setting == "checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    aot = torch._dynamo.lookup_backend("aot_eager") if DEV == "cpu" else None  # --cpu: no C compiler needed
    recorder = GraphRecorder(aot) if setting == "compile" else None  # inductor, counting the project's ops
    if recorder is not None:
        torch._dynamo.reset()  # each implementation compiles its own graphs (no shared cache, no recompile limit)
    fn = torch.compile(model, backend=recorder) if recorder is not None else model
    (dv_peft.enable if impl == "ours" else dv_peft.disable)()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=DEV == "cuda")
    if DEV == "cuda":
        torch.cuda.empty_cache()
        sync()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if DEV == "cuda" else 0
    losses, times, grads = [], [], None
    for i in range(steps):
        sync()
        t0 = time.perf_counter()
        loss = fn(input_ids=ids, labels=ids).loss
        loss.backward()
        if i == 0:
            grads = full_grads(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
        losses.append(float(loss))
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if DEV == "cuda" else 0.0
    peaks = [torch.zeros(1, device=DEV) for _ in range(dist.get_world_size())]
    dist.all_gather(peaks, torch.tensor([peak], device=DEV))
    dv_peft.disable()
    lead = min(2, steps - 1)
    out = {
        "losses": losses,
        "step_ms_median": sorted(times[lead:])[len(times[lead:]) // 2],
        "peak_mib_per_rank": [float(p) for p in peaks],
        "routed_layers": sum("_dora_verify_norm" in m.__dict__ for m in model.modules()),
        "compiled_dora_ops": recorder.dora_ops if recorder is not None else None,
        "_grads": grads,
    }
    del model, fn, opt
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return out


def main():
    global DEV
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--cpu", action="store_true", help="gloo on the CPU, a tiny model: checks this script's logic only")
    a = ap.parse_args()
    settings = a.settings.split(",")
    if bad := [x for x in settings if x not in SETTINGS]:
        ap.error(f"--settings: unknown {', '.join(bad)} (choose from {', '.join(SETTINGS)})")
    if a.layers < 1 or a.steps < 1:
        ap.error(f"--layers and --steps must be ≥ 1, got {a.layers} and {a.steps}")
    DEV = "cpu" if a.cpu else "cuda"
    if a.cpu:
        dist.init_process_group("gloo")
    else:
        local = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=local)
    t_start = time.time()
    seq, batch = (16, 2) if a.cpu else (1024, 2)
    base = llama(a.layers, a.cpu)
    vocab = base.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(7 + dist.get_rank())).to(DEV)
    rep = {
        "world": dist.get_world_size(),
        "provenance": provenance.provenance(torch.device(DEV)),
        "model": {"layers": a.layers, "hidden": base.config.hidden_size, "intermediate": base.config.intermediate_size,
                  "seq": seq, "batch_per_rank": batch, "r": 16, "adapters": "bf16", "model_dtype": "bf16"},
        "settings": {},
    }  # fmt: skip
    ref_model = shard_model(with_adapters(base, "stock", torch.float32))  # the same rounded weights, in fp32
    dv_peft.disable()
    loss = ref_model(input_ids=ids, labels=ids).loss
    loss.backward()
    rep["fp32_loss"], ref = float(loss), full_grads(ref_model)
    del ref_model
    for setting in settings:
        res = {}
        for impl in IMPLS:  # no try: a failure on one rank would leave the other in a collective (torchrun ends both)
            res[impl] = run(base, impl, setting, ids, a.steps)
            log(setting, impl, {k: v for k, v in res[impl].items() if k != "_grads"})
        for impl in ("stock", "ours"):
            res[impl]["loss_err_vs_fp32"] = abs(res[impl]["losses"][0] - rep["fp32_loss"]) / abs(rep["fp32_loss"])
            res[impl]["grad_err_vs_fp32"] = grad_errors(res[impl]["_grads"], ref)
        e_o, e_s = res["ours"]["grad_err_vs_fp32"], res["stock"]["grad_err_vs_fp32"]
        res["fa_criterion"] = {k: e_o[k] <= 2 * e_s[k] for k in e_o}
        for impl in IMPLS:
            res[f"{impl}_ms_over_lora"] = res[impl]["step_ms_median"] / res["lora"]["step_ms_median"]
            res[f"{impl}_peak_over_lora"] = max(res[impl]["peak_mib_per_rank"]) / max(
                max(res["lora"]["peak_mib_per_rank"]), 1e-9
            )
        for impl in IMPLS:
            res[impl].pop("_grads", None)
        rep["settings"][setting] = res
    rep["seconds"] = time.time() - t_start
    write_report(rep, a.out, "fsdp2_model", markdown)
    dist.destroy_process_group()


def _cell(d: dict, key: str, fmt: str) -> str:
    return format(d[key], fmt) if key in d else "–"


def markdown(rep) -> str:
    p, m = rep["provenance"], rep["model"]
    L = [
        "# FSDP2 at model scale: LoRA, stock PEFT DoRA and the integration under fully_shard",
        "",
        f"{p['device'].get('name')} × {rep['world']}, commit `{(p['git'].get('commit') or '?')[:12]}`, torch "
        f"{p['versions'].get('torch')}, peft {p['versions'].get('peft')}, transformers "
        f"{p['versions'].get('transformers')}; {p['time_utc']}. Produced by `bench/fsdp2_model_gpu.py` ("
        f"{rep['seconds']:.0f} s). Model: {m['layers']} Llama layers, hidden {m['hidden']}, intermediate "
        f"{m['intermediate']}, {m['seq']} tokens × {m['batch_per_rank']} per rank, r {m['r']} on all seven "
        "projections, bf16 model and adapters, fused AdamW; errors against the same model in fp32 (stock PEFT DoRA, "
        "first step).",
        "",
        "| setting | impl | step ms | / LoRA | transient peak MiB per rank | / LoRA | loss rel err | grad A | grad B "
        "| grad m | layers routed (compiled: ops) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting, res in rep["settings"].items():
        for impl in IMPLS:
            x = res[impl]
            e = x.get("grad_err_vs_fp32", {})
            peaks = ", ".join(f"{v:.0f}" for v in x["peak_mib_per_rank"])
            cells = [
                _cell(res, f"{impl}_ms_over_lora", ".3f"),
                peaks,
                _cell(res, f"{impl}_peak_over_lora", ".3f"),
                _cell(x, "loss_err_vs_fp32", ".3g"),
                *(_cell(e, k, ".3g") for k in ("lora_A", "lora_B", "magnitude")),
            ]
            routed = x["routed_layers"] if x["compiled_dora_ops"] is None else f"({x['compiled_dora_ops']} ops)"
            L.append(f"| {setting} | {impl} | {x['step_ms_median']:.1f} | {' | '.join(cells)} | {routed} |")
        L += ["", f"{setting}: FlashAttention-style criterion (ours' gradient error ≤ 2× stock's): "
              f"{res['fa_criterion']}; losses stock {', '.join(f'{v:.5f}' for v in res['stock']['losses'])}, "
              f"ours {', '.join(f'{v:.5f}' for v in res['ours']['losses'])}.", ""]  # fmt: skip
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
