"""GPU evidence for the factored norm under FSDP2 (issue 8), on two GPUs of one host through NCCL.

    DORA_VERIFY_COMMIT=<hash> torchrun --nproc_per_node 2 bench/fsdp2_gpu.py --out DIR [--quick]

1. The sharded norm (kernels.distributed) against the single-process oracle (dora_verify.distributed:
   exact ν of the full matrices, the production bound), row- and column-sharded, bf16, trained and
   near-cancelling rows; the column layout's all_reduce and deterministic (all_gather, rank-order) sums, each run
   twice: bitwise repeatability.
2. A random Llama-style model with PEFT DoRA adapters (bf16 model; PEFT's default fp32 adapters), every decoder
   layer and the root wrapped with ``fully_shard``: training steps with the integration off (stock PEFT) and on,
   from the same initial state. Both are compared with the same model in fp32 (stock PEFT; same rounded
   weights): loss and the gradients of A, B and m of the first step, as relative errors (max-abs normalised);
   the FlashAttention-style criterion of the toolkit on the gradients' elementwise errors: ours' error ≤ 2×
   stock PEFT's (not on the loss: one scalar mean over all tokens, whose error is a few 1e-6 either way and
   mostly luck of cancellation). Time per step (host clock
   around the step, synchronised; median of the steps after the first) and each rank's
   peak memory.

Rank 0 writes DIR/fsdp2_gpu.json and DIR/fsdp2_gpu.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
import torch.distributed as dist

from dora_verify import provenance
from dora_verify.cases import make_case
from dora_verify.distributed import check_sharded_norm, shard
from dora_verify.kernels import peft as dv_peft

DEV = "cuda"  # --cpu: gloo on the CPU with tiny sizes (a logic check of this script, no evidence)


def log(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


def sharded_norm_part(quick):
    rows = []
    shapes = [(64, 96, 8)] if DEV == "cpu" else [(2048, 2048, 64)] if quick else [(2048, 2048, 64), (4096, 4096, 384)]
    for d_out, d_in, r in shapes:
        for regime in ("trained", "near_cancel"):
            c = make_case(regime, d_out, d_in, r, 1, dtype="bf16", seed=3, device=DEV)
            for layout in ("rows", "cols"):
                for det in (False,) if layout == "rows" else (False, True):
                    rows.append(
                        dict(
                            check_sharded_norm(c.W, c.A, c.B, c.s, layout, deterministic=det),
                            shape=[d_out, d_in, r],
                            regime=regime,
                        )
                    )
                    log(rows[-1])
    from dora_verify.kernels.distributed import sharded_row_norm

    n = 64 if DEV == "cpu" else 4096
    c = make_case("trained", n, n, 128 if n > 64 else 8, 1, dtype="bf16", seed=4, device=DEV)
    rank, world = dist.get_rank(), dist.get_world_size()
    w, a = shard(c.W, 1, rank, world), shard(c.A, 1, rank, world)
    bits = {
        det: [sharded_row_norm(w, a, c.B, c.s, layout="cols", deterministic=det) for _ in range(3)]
        for det in (False, True)
    }
    same = {str(det): all(torch.equal(v[0], x) for x in v[1:]) for det, v in bits.items()}
    same["shape"] = list(c.W.shape) + [c.A.shape[0]]
    return rows, same


def build(dtype, adapters, seed=0, hidden=2048, layers=4):
    from peft_gpu import llama_with_dora  # bench/ is the script's folder: on sys.path

    return llama_with_dora(hidden, hidden * 11 // 4, layers, adapters, dtype, seed, via_bf16=True)


def shard_model(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def full_grads(model):
    from torch.distributed.tensor import DTensor

    return {
        n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).float().clone()
        for n, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }


def _empty_cache():
    if DEV == "cuda":
        torch.cuda.empty_cache()


def _reset_peak() -> int:
    if DEV != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def training_part(quick, adapters):
    steps = 4 if quick else 6
    hidden, layers, seq, batch = (64, 1, 16, 2) if DEV == "cpu" else (1024, 2, 512, 2) if quick else (2048, 4, 1024, 4)
    g = torch.Generator().manual_seed(7 + dist.get_rank())
    ids = torch.randint(0, 32000, (batch, seq), generator=g).to(DEV)
    base = build(torch.bfloat16, adapters, hidden=hidden, layers=layers)
    out = {
        "model": {
            "hidden": hidden,
            "layers": layers,
            "seq": seq,
            "batch_per_rank": batch,
            "r": 64,
            "adapters": adapters,
            "model_dtype": "bf16",
        }
    }
    ref = shard_model(build(torch.float32, "fp32", hidden=hidden, layers=layers).to(DEV))
    dv_peft.disable()
    loss = ref(input_ids=ids, labels=ids).loss
    loss.backward()
    out["fp32_loss"] = float(loss)
    ref_grads = full_grads(ref)
    del ref
    _empty_cache()
    for name, on in (("stock", False), ("ours", True)):
        model = shard_model(copy.deepcopy(base).to(DEV))
        (dv_peft.enable if on else dv_peft.disable)()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        before = _reset_peak()
        losses, times = [], []
        for i in range(steps):
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if i == 0:
                grads = full_grads(model)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if DEV == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
            losses.append(float(loss))
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if DEV == "cuda" else 0.0
        peaks = [torch.zeros(1, device=DEV) for _ in range(dist.get_world_size())]
        dist.all_gather(peaks, torch.tensor([peak], device=DEV))
        common = sorted(set(grads) & set(ref_grads))
        err = {k: max(rel(grads[n], ref_grads[n]) for n in common if k in n) for k in ("lora_A", "lora_B", "magnitude")}
        out[name] = {
            "losses": losses,
            "loss_err_vs_fp32": abs(losses[0] - out["fp32_loss"]) / abs(out["fp32_loss"]),
            "grad_err_vs_fp32": err,
            "step_ms_median": sorted(times[1:])[len(times[1:]) // 2],
            "peak_mib_per_rank": [float(p) for p in peaks],
            "routed_layers": sum("_dora_verify_norm" in m.__dict__ for m in model.modules()),
        }
        caches = [m.__dict__["_dora_verify_norm"] for m in model.modules() if "_dora_verify_norm" in m.__dict__]
        out[name]["norm_graph_captures"] = sum(c.captures for c in caches)
        out[name]["norm_graph_replays"] = sum(c.replays for c in caches)
        out[name]["_grads"] = grads
        log(name, {k: v for k, v in out[name].items() if k != "_grads"})
        dv_peft.disable()
        del model, opt
        _empty_cache()
    common = sorted(set(out["ours"]["_grads"]) & set(out["stock"]["_grads"]))
    out["ours_vs_stock_grad_rel"] = {
        k: max(rel(out["ours"]["_grads"][n], out["stock"]["_grads"][n]) for n in common if k in n)
        for k in ("lora_A", "lora_B", "magnitude")
    }
    for name in ("ours", "stock"):
        del out[name]["_grads"]
    out["fa_criterion"] = {
        k: out["ours"]["grad_err_vs_fp32"][k] <= 2 * out["stock"]["grad_err_vs_fp32"][k]
        for k in ("lora_A", "lora_B", "magnitude")
    }
    return out


def markdown(rep):
    p = rep["provenance"]
    L = [
        "# FSDP2: the factored norm on shards and the PEFT integration under fully_shard (2 GPUs, NCCL)",
        "",
        f"{p['device'].get('name')} × {rep['world']}, commit `{(p['git'].get('commit') or '?')[:12]}`, torch "
        f"{p['versions'].get('torch')}, triton {p['versions'].get('triton')}, peft {p['versions'].get('peft')}; "
        f"{p['time_utc']}. Produced by `torchrun --nproc_per_node 2 bench/fsdp2_gpu.py`.",
        "",
        "## Sharded norm vs the single-process oracle (bf16; ratio = excess error / the production bound, ≤ 1)",
        "",
        "| shape | regime | layout | deterministic | max ratio | max rel | dense rows | same ν on every rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rep["sharded_norm"]:
        L.append(
            f"| {'×'.join(map(str, r['shape']))} | {r['regime']} | {r['layout']} | {r['deterministic']} | "
            f"{r['max_ratio']:.3g} | {r['max_rel']:.3g} | {r['dense_rows']} | {r['identical_across_ranks']} |"
        )
    L += [
        "",
        f"Column layout, 3 repeats at {'×'.join(map(str, rep['repeat_bits']['shape']))}: "
        "bit-identical with all_reduce: "
        f"{rep['repeat_bits']['False']}; with deterministic (all_gather, rank order): {rep['repeat_bits']['True']}.",
        "",
    ]
    for adapters, t in rep["training"].items():
        L += [f"## Training under fully_shard, {adapters} adapters: integration off (stock PEFT) vs on", ""]
        if "error" in t:
            L += [f"Failed: `{t['error']}`", ""]
            continue
        m = t["model"]
        L += [
            f"Random Llama-style model, hidden {m['hidden']}, {m['layers']} layers, {m['seq']} tokens × "
            f"{m['batch_per_rank']} per rank, DoRA r = {m['r']} on every projection, bf16 model, {adapters} adapters; "
            "AdamW. Errors against the same model in fp32 (stock PEFT, same rounded weights), first step.",
            "",
            "| | loss rel err | grad A rel err | grad B rel err | grad m rel err "
            "| step ms (median) | peak MiB per rank "
            "| layers routed |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name in ("stock", "ours"):
            x = t[name]
            e = x["grad_err_vs_fp32"]
            L.append(
                f"| {name} | {x['loss_err_vs_fp32']:.3g} | {e['lora_A']:.3g} | {e['lora_B']:.3g} | "
                f"{e['magnitude']:.3g} | {x['step_ms_median']:.1f} | "
                f"{', '.join(f'{v:.0f}' for v in x['peak_mib_per_rank'])} | {x['routed_layers']} |"
            )
        L += [
            "",
            f"Ours: {t['ours']['norm_graph_captures']} norm-graph captures, {t['ours']['norm_graph_replays']} "
            f"replays over {len(t['ours']['losses'])} steps × {t['ours']['routed_layers']} layers.",
            "",
            "Ours vs stock, gradients (rel): "
            f"{', '.join(f'{k} {v:.3g}' for k, v in t['ours_vs_stock_grad_rel'].items())}. FlashAttention-style "
            f"criterion (ours' error ≤ 2× stock's): {t['fa_criterion']}.",
            f"Losses: stock {', '.join(f'{v:.5f}' for v in t['stock']['losses'])}; ours "
            f"{', '.join(f'{v:.5f}' for v in t['ours']['losses'])}.",
            "",
        ]
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="gloo on the CPU, tiny sizes: checks this script's logic only")
    a = ap.parse_args()
    global DEV
    DEV = "cpu" if a.cpu else "cuda"
    dist.init_process_group("gloo" if a.cpu else "nccl")
    if not a.cpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    t0 = time.time()
    rep = {"world": dist.get_world_size(), "provenance": provenance.provenance(torch.device(DEV)), "quick": a.quick}
    rep["sharded_norm"], rep["repeat_bits"] = sharded_norm_part(a.quick)
    rep["training"] = {}
    for adapters in ("fp32", "bf16"):
        try:
            rep["training"][adapters] = training_part(a.quick, adapters)
        except Exception as e:  # noqa: BLE001 - record, go on with the other adapter dtype
            import traceback

            rep["training"][adapters] = {"error": f"{type(e).__name__}: {e}"[:400]}
            log(traceback.format_exc())
            dv_peft.disable()
            _empty_cache()
    rep["seconds"] = time.time() - t0
    write_report(rep, a.out, "fsdp2_gpu", markdown)
    dist.destroy_process_group()


def write_report(rep: dict, out: str, name: str, render) -> None:
    """Rank 0 writes ``out/name.json`` and ``out/name.md`` (``render(rep)``) and prints the markdown."""
    if dist.get_rank() == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump(rep, f, indent=1, default=str)
        with open(os.path.join(out, f"{name}.md"), "w") as f:
            f.write(render(rep))
        print(render(rep))


if __name__ == "__main__":
    main()
