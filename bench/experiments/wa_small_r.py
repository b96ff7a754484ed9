"""Which tiles should the U = W Aᵀ kernel take at the ranks people train with (r ≤ 64), and what do ‖W‖² from U's own
pass over W and the four-launch norm pipeline save? One process on one GPU:

1. a sweep of the TMA U kernel's tiles (BLOCK_R = r rounded up to a power of two; BLOCK_M, BLOCK_K with the chain
   kept at 256 products, warps, stages) and of the d_in split rule, ‖W‖² fused, at Llama-3-8B's projection shapes,
   against the previous tree's U kernel plus its separate ‖W‖² pass and a device copy of W; every candidate's U and
   ‖W‖² checked against float64 on all-positive data;
2. the whole norm (``factored_row_norm`` as RowNormRunner's graphs run it, inside ``tma_loads()``) of the previous
   tree against this tree's, with ν's error against float64 for both, and its kernels' GPU time one by one.

CUDA-graph replays of 20 calls, interleaved rounds, medians (``lora_compose_limits.timed``). The previous tree is a
copy of ``kernels/`` at OLD_COMMIT with its custom ops renamed (``git archive OLD_COMMIT kernels`` unpacked into
out/gpu/old_kernels, ``dora_verify::`` renamed). Run: PYTHONPATH=out/gpu python3 wa_small_r.py [OUT_DIR [PARTS]]
(from bench/experiments). Kernels are compiled first in a pool of processes (Triton's disk cache)."""

import concurrent.futures as cf
import importlib
import itertools
import json
import multiprocessing as mp
import statistics
import sys

import torch

new = importlib.import_module("dora_verify.kernels.norm")
OLD_COMMIT = "8d371c7"
SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336))  # q/o, k/v, gate/up, down of Llama-3-8B
# Round 1 (r 16 and 32 of MODE 0; it ran out of time at r 64): BLOCK_M 64/128/256, stages 3/5, five split rules.
# Round 2 (the default): what round 1 left in the running, r 64 and MODE 1.
ROUNDS = {
    1: dict(ranks={0: (16, 32, 64), 1: (16, 64)}, bms=(64, 128, 256), stages=(3, 5),
            rules=((256, 1024), (132, 1024), (264, 512), (528, 512), (1, 1 << 30))),
    2: dict(ranks={0: (64,), 1: (16, 64)}, bms=(32, 64), stages=(2, 3), rules=((264, 512), (528, 512), (256, 1024))),
}  # fmt: skip
RANKS, BMS, STAGES, SPLIT_RULES = (ROUNDS[2][k] for k in ("ranks", "bms", "stages", "rules"))  # (MIN_PROGRAMS, SPLIT_K)


def candidates(mode):
    """(BLOCK_M, BLOCK_K, FLUSH, warps, pointer stages, TMA stages): chains of 256 products (MODE 0) or 3·64."""
    kf = ((128, 2), (256, 1)) if mode == 0 else ((64, 1),)
    return [(bm, bk, f, w, 3, st) for bm, (bk, f), w, st in itertools.product(BMS, kf, (4, 8), STAGES)]


def _operands(d_out, d_in, r, mode, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    W = torch.rand(d_out, d_in, device="cuda", generator=gen).to(torch.bfloat16)  # all positive: the hard case
    A = torch.rand(r, d_in, device="cuda", generator=gen)
    return W, (A.to(torch.bfloat16) if mode == 0 else A)


def _with_config(mode, r, cfg, rule=None):
    new.WA_SMALL_R_CONFIG[(mode, new.rank_block(r))] = cfg
    if rule is not None:
        new.WA_SMALL_R_SPLIT = {**new.WA_SMALL_R_SPLIT, mode: rule}


def _compile(jobs):
    """Worker: run each (mode, r, cfg) once so that Triton's disk cache holds its kernels."""
    for mode, r, cfg in jobs:
        _with_config(mode, r, cfg)
        W, A = _operands(1024, 4096, r, mode)
        try:
            new._wa_launch(W, A, mode, True, True)
            new._wa_launch(W, A, mode, False, True)
        except Exception as e:  # noqa: BLE001 - a config Triton cannot build: reported by the sweep
            print("compile failed", mode, r, cfg, repr(e)[:200], flush=True)
    torch.cuda.synchronize()
    return len(jobs)


def warm_cache(workers=12):
    jobs = [(mode, r, cfg) for mode, rs in RANKS.items() for r in rs for cfg in candidates(mode)]
    chunks = [jobs[i::workers] for i in range(workers)]
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        return sum(pool.map(_compile, chunks))


def sweep(old, timed, log):
    rows = []
    keep = (dict(new.WA_SMALL_R_CONFIG), dict(new.WA_SMALL_R_SPLIT))
    for mode, rs in RANKS.items():
        for r in rs:
            per_shape = {}
            for d_out, d_in in SHAPES:
                W, A = _operands(d_out, d_in, r, mode)
                W64, A64 = W.double(), A.double()
                exact_u, mag = W64 @ A64.t(), W64.abs() @ A64.abs().t()
                exact_sq = (W64 * W64).sum(1)
                src, dst = torch.empty_like(W), torch.empty_like(W)
                calls = {
                    "copy W": lambda: dst.copy_(src),
                    "old U + ‖W‖²": lambda: (old.wa_product(W, A, use_tma=True), old.weight_row_sq(W)),
                }
                errs, cfg_of = {}, {}
                for cfg, rule in itertools.product(candidates(mode), SPLIT_RULES):
                    name = f"{cfg} split{rule}"

                    def call(cfg=cfg, rule=rule):
                        _with_config(mode, r, cfg, rule)
                        return new._wa_launch(W, A, mode, True, True)

                    try:
                        call()
                    except Exception as e:  # noqa: BLE001 - a config that does not build or launch
                        log(f"  {name}: {repr(e)[:160]}")
                        continue
                    if rule == SPLIT_RULES[0]:  # the chains do not depend on the split rule's programs
                        _with_config(mode, r, cfg, rule)
                        U, sq = new.wa_product(W, A, use_tma=True, row_sq=True)
                        errs[cfg] = (
                            float(((U.double() - exact_u).abs() / mag).max()),
                            float(((sq - exact_sq).abs() / exact_sq).max()),
                        )
                    calls[name], cfg_of[name] = call, cfg
                us = timed(calls)
                copy_bw = 2 * W.numel() * W.element_size() / us["copy W"] * 1e-3  # GB/s: read + write
                for name, t in us.items():
                    frac = W.numel() * W.element_size() / t * 1e-3 / copy_bw
                    err = errs.get(cfg_of.get(name))
                    per_shape.setdefault(name, {})[f"{d_out}x{d_in}"] = (round(t, 2), round(frac, 3), err)
                log(f"mode {mode} r {r} {d_out}x{d_in}: copy {us['copy W']:.1f} µs, old {us['old U + ‖W‖²']:.1f} µs, "
                    f"best {min((v, k) for k, v in us.items() if k.startswith('('))}")  # fmt: skip
            ranked = sorted(
                (statistics.geometric_mean([v[0] for v in d.values()]), name)
                for name, d in per_shape.items()
                if name.startswith("(")
            )
            old_gm = statistics.geometric_mean([v[0] for v in per_shape["old U + ‖W‖²"].values()])
            log(f"mode {mode} r {r}: old geomean {old_gm:.1f} µs; best 8:")
            for gm, name in ranked[:8]:
                log(f"    {gm:7.1f} µs  {name}  {per_shape[name]}")
            rows.append({"mode": mode, "r": r, "per_shape": per_shape, "ranked": ranked[:20], "old_geomean": old_gm})
    new.WA_SMALL_R_CONFIG.clear()
    new.WA_SMALL_R_CONFIG.update(keep[0])
    new.WA_SMALL_R_SPLIT = keep[1]
    return rows


def whole_norm(old, timed, log):
    rows = []
    for (d_out, d_in), r, a_dtype in itertools.product(SHAPES, (16, 64, 384), (torch.bfloat16, torch.float32)):
        if a_dtype == torch.float32 and r == 384:
            continue
        gen = torch.Generator(device="cuda").manual_seed(1)
        W = (torch.randn(d_out, d_in, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
        A = (torch.randn(r, d_in, device="cuda", generator=gen) * 0.02).to(a_dtype)
        B = (torch.randn(d_out, r, device="cuda", generator=gen) * 0.02).to(a_dtype)
        s = 2.0

        def norm_of(mod):
            def call():
                with mod.tma_loads():
                    return mod.factored_row_norm(W, A, B, s, validate=False)

            return call

        exact = torch.linalg.vector_norm(W.double() + s * (B.double() @ A.double()), dim=1)
        calls = {"old": norm_of(old), "new": norm_of(new)}
        err = {k: float(((f().double() - exact).abs() / exact).max()) for k, f in calls.items()}
        us = timed(calls)
        row = {"shape": [d_out, d_in], "r": r, "adapters": str(a_dtype), "us": us, "max_rel_err": err}
        log(f"norm {d_out}x{d_in} r {r} {a_dtype}: old {us['old']:.1f} µs, new {us['new']:.1f} µs "
            f"({us['new'] / us['old']:.3f}×); max rel err old {err['old']:.2e} new {err['new']:.2e}")  # fmt: skip
        rows.append(row)
    return rows


PROFILE_CASES = (((4096, 4096), 16, torch.bfloat16), ((1024, 4096), 64, torch.bfloat16),
                 ((4096, 4096), 64, torch.bfloat16), ((14336, 4096), 384, torch.bfloat16),
                 ((4096, 4096), 16, torch.float32))  # fmt: skip


def profile(old, log, calls=20):
    """GPU time per norm call, kernel by kernel (torch.profiler), of the previous tree's norm and this one's."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    rows = []
    for (d_out, d_in), r, a_dtype in PROFILE_CASES:
        gen = torch.Generator(device="cuda").manual_seed(1)
        W = (torch.randn(d_out, d_in, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
        A = (torch.randn(r, d_in, device="cuda", generator=gen) * 0.02).to(a_dtype)
        B = (torch.randn(d_out, r, device="cuda", generator=gen) * 0.02).to(a_dtype)
        for name, mod in (("old", old), ("new", new)):
            with mod.tma_loads():
                mod.factored_row_norm(W, A, B, 2.0, validate=False)
                torch.cuda.synchronize()
                with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(calls):
                        mod.factored_row_norm(W, A, B, 2.0, validate=False)
                    torch.cuda.synchronize()
            kernels = sorted(
                ((e.device_time_total / calls, e.count // calls, e.key[:60]) for e in prof.key_averages()
                 if e.device_time_total > 0), reverse=True)  # fmt: skip
            total = sum(k[0] for k in kernels)
            log(f"profile {d_out}x{d_in} r {r} {a_dtype} {name}: {total:.1f} µs of kernels per call")
            for us, n, key in kernels:
                log(f"      {us:7.2f} µs x{n}  {key}")
            rows.append({"shape": [d_out, d_in], "r": r, "adapters": str(a_dtype), "tree": name, "kernels": kernels})
    return rows


def main():
    from lora_compose_limits import timed  # this folder is on sys.path when run as a script

    old = importlib.import_module("old_kernels.norm")
    out_dir = sys.argv[1] if len(sys.argv) > 1 else None
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    parts = sys.argv[2].split(",") if len(sys.argv) > 2 else ["whole", "profile", "sweep"]
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "old": OLD_COMMIT}
    if "whole" in parts:
        results["whole_norm"] = whole_norm(old, timed, log)
    if "profile" in parts:
        results["profile"] = profile(old, log)
    if "sweep" in parts:
        log(f"compiled {warm_cache()} configurations in worker processes")
        results["sweep"] = sweep(old, timed, log)
    if out_dir:
        with open(f"{out_dir}/wa_small_r.json", "w") as f:
            json.dump(results, f, indent=1, default=str)
        with open(f"{out_dir}/wa_small_r.txt", "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
