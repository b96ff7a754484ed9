"""GPU evidence for the production kernels (issue 3): accuracy against the oracles, determinism, tier
parity, and side-by-side timings/memory against eager torch, PEFT DoRA and PEFT LoRA.

    DORA_VERIFY_COMMIT=<hash> python3 bench/kernels_gpu.py --out DIR [--quick] [--parts acc,profile,perf,layer]

Writes DIR/report.json and DIR/report.md (provenance, every number, the commands). Timings: CUDA-event
medians from triton.testing.do_bench after warm-up; inputs larger than L2 (or rotated) so caches do not
flatter; transient peak memory = allocator peak − memory allocated before the call.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from dora_verify import provenance
from dora_verify.cases import REGIMES, make_case
from dora_verify.formats import parse_format
from dora_verify.metrics import ulp_error
from dora_verify.oracles import compose_truth, row_norm_truth
from dora_verify.kernels import DoRALinear, compose, dora_scale, factored_row_norm
import importlib
from dora_verify.kernels.norm import weight_row_sq

compose_mod = importlib.import_module("dora_verify.kernels.compose")

DT = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def log(*a):
    print(*a, flush=True)


def bench_ms(fn, warmup=25, rep=100):
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def peak_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak / 2**20


# ----------------------------------------------------------------------------- accuracy
def acc_compose(quick):
    rows = []
    d_out, d_in, r, T = (1024, 512, 16, 256) if quick else (4096, 1024, 32, 1024)
    for dt in ("bf16", "fp16", "fp32"):
        fmt = parse_format(dt)
        for regime in REGIMES:
            c = make_case(regime, d_out, d_in, r, T, dtype=dt, seed=7, device="cuda")
            base, lora = c.compose_inputs()
            if not (torch.isfinite(base).all() and torch.isfinite(lora).all()):
                rows.append({"dtype": dt, "regime": regime, "skipped": "base/lora overflow the format"})
                continue
            gvals = {"case_g": c.g}
            for off in (0.0, 2**-12, -(2**-10), 1e-6, 1e-4, -3e-3):
                gvals[f"g=1{off:+.3g}"] = torch.full_like(c.g, 1.0 + off)
            for gname, g in gvals.items():
                gm1 = (g.double() - 1).float()  # exact: g fp32 near 1
                bias = torch.randn(d_out, device="cuda").to(c.dtype)
                for output in ("y", "delta"):
                    b = bias if output == "y" else None
                    got = compose(base, lora, g, c.s, b, g_minus_1=gm1, output=output, tier="fused")
                    tr = compose_truth(base, lora, g, c.s, b)
                    exact = tr.y if output == "y" else tr.delta
                    near = (tr.y_round if output == "y" else tr.d_round).nearest
                    u = ulp_error(got.double(), exact, fmt)
                    wi = int(u.flatten().argmax())
                    rows.append({"dtype": dt, "regime": regime, "g": gname, "output": output,
                                 "max_ulp": float(u.max()), "worst": {"base": float(base.flatten()[wi]), "lora": float(lora.flatten()[wi]),
                                 "g": float(g[wi % d_out]), "bias": float(b[wi % d_out]) if b is not None else None,
                                 "got": float(got.flatten()[wi]), "exact": float(exact.flatten()[wi])}, "frac_correctly_rounded": float((got.double() == near).float().mean()),
                                 "uncertified": tr.uncertified})
        log(f"compose acc {dt}: worst ulp {max(x.get('max_ulp', 0) for x in rows if x['dtype'] == dt):.4f}")
    return rows


def acc_norm(quick):
    rows = []
    shapes = [(1024, 1024, 16)] if quick else [(2048, 2048, 64), (8192, 8192, 384)]
    for (d_out, d_in, r) in shapes:
        big = d_out * d_in > 2**24
        for dt in (("bf16",) if big else ("bf16", "fp16", "fp32")):
            for regime in (("trained", "all_positive") if big else
                           ("trained", "near_cancel", "zero_rows", "all_positive", "heavy_tailed", "fresh")):
                c = make_case(regime, d_out, d_in, r, 4, dtype=dt, seed=3, device="cuda")
                nu, info = factored_row_norm(c.W, c.A, c.B, c.s, return_info=True)
                tr = row_norm_truth(c.W, c.A, c.B, c.s)
                rel = torch.where(tr.nu > 0, (nu.double() - tr.nu).abs() / tr.nu, nu.double().abs())
                m = c.magnitude()
                g, gm1 = dora_scale(m, nu)
                g_t = m.double() / tr.nu.clamp_min(1e-12)
                grel = ((g.double() - g_t).abs() / g_t.abs().clamp_min(1e-300)).max()
                gm1_t = (m.double() - tr.nu.clamp_min(1e-12)) / tr.nu.clamp_min(1e-12)
                gm1err = ((gm1.double() - gm1_t).abs() / g_t.abs()).max()  # relative to g: |g-1| can be 0
                rows.append({"shape": [d_out, d_in, r], "dtype": dt, "regime": regime,
                             "nu_max_rel": float(rel.max()), "g_max_rel": float(grel), "gm1_err_rel_to_g": float(gm1err),
                             "recomputed_rows": len(info.recomputed_rows), "max_kappa": float(info.kappa[torch.isfinite(info.kappa)].max()),
                             "oracle_tier2_rows": len(tr.tier2_rows)})
            # adapters in fp32 on a bf16 W (PEFT's default): the exact bf16 split of A
            if dt == "bf16":
                c = make_case("trained", d_out, d_in, r, 4, dtype="bf16", seed=4, device="cuda")
                A32 = (c.A.float() * (1 + 1e-3 * torch.randn_like(c.A.float())))
                B32 = c.B.float() * (1 + 1e-3 * torch.randn_like(c.B.float()))
                nu = factored_row_norm(c.W, A32, B32, c.s)
                tr = row_norm_truth(c.W, A32, B32, c.s)
                rows.append({"shape": [d_out, d_in, r], "dtype": "bf16 W, fp32 A/B", "regime": "trained",
                             "nu_max_rel": float(((nu.double() - tr.nu).abs() / tr.nu).max())})
        log(f"norm acc {d_out}x{d_in} r={r}: worst rel {max(x['nu_max_rel'] for x in rows):.3e}")
    return rows


def acc_backward(quick):
    rows = []
    T, d_out, d_in, r = (512, 1024, 512, 16) if quick else (4096, 4096, 1024, 32)
    for dt in ("bf16", "fp16", "fp32"):
        for regime in ("trained", "large_activations", "all_positive", "heavy_tailed", "near_cancel"):
            c = make_case(regime, d_out, d_in, r, T, dtype=dt, seed=11, device="cuda")
            base, lora = c.compose_inputs()
            if not (torch.isfinite(base).all() and torch.isfinite(lora).all()):
                rows.append({"dtype": dt, "regime": regime, "skipped": "base/lora overflow the format"})
                continue
            tr = row_norm_truth(c.W, c.A, c.B, c.s)
            m = c.magnitude().clone().requires_grad_()
            nu = factored_row_norm(c.W, c.A, c.B, c.s)
            dy = torch.randn_like(base)
            for save in ("inputs", "activation"):
                res = []
                for _ in range(20):
                    b_, l_ = base.clone().requires_grad_(), lora.clone().requires_grad_()
                    m.grad = None
                    g, _ = dora_scale(m, nu)
                    y = compose(b_, l_, g, c.s, save=save, tier="fused")
                    y.backward(dy)
                    res.append((b_.grad, l_.grad, m.grad.clone()))
                same = all(torch.equal(a, b) for rr in res[1:] for a, b in zip(rr, res[0]))
                d_base, d_lora, d_m = res[0]
                g64 = c.magnitude().double() / nu.double()  # the g the kernel applied (fp32 g of fp32 ν)
                gk = (c.magnitude() / nu).double()
                ex_db = gk[None, :] * dy.double()
                ex_dl = gk[None, :] * c.s * dy.double()
                fmt = parse_format(dt)
                u_db = float(ulp_error(d_base.double(), ex_db, fmt).max())
                u_dl = float(ulp_error(d_lora.double(), ex_dl, fmt).max())
                dg = (dy.double() * (base.double() + c.s * lora.double())).sum(0)
                dm_t = dg / tr.nu
                rel_dm = ((d_m.double() - dm_t).abs() / dm_t.abs().clamp_min(1e-300))
                rows.append({"dtype": dt, "regime": regime, "save": save, "d_base_max_ulp": u_db,
                             "d_lora_max_ulp": u_dl, "d_m_max_rel": float(rel_dm.max()),
                             "d_m_median_rel": float(rel_dm.median()), "bitwise_identical_20_runs": bool(same)})
                del g64
        log(f"backward acc {dt} done")
    return rows


def acc_lora_compose(quick):
    """kernels.lora_compose on the GPU: the lora it used vs the exact xa Bᵀ (GEMM bound), y ≤ 1 ulp of the
    exact compose of that lora, d_m vs the oracle, d_B / d_xa against their bounds, 20-run determinism."""
    from dora_verify.kernels import lora_compose
    from dora_verify.kernels.lora_compose import lora_compose_forward_fused

    rows = []
    T, d_out, d_in, r = (512, 1024, 512, 16) if quick else (4096, 4096, 1024, 384)
    u32 = 2.0**-24
    for dt in ("bf16", "fp16"):
        for regime in ("fresh", "trained", "large_activations", "heavy_tailed", "near_cancel"):
            c = make_case(regime, d_out, d_in, r, T, dtype=dt, seed=13, device="cuda")
            f = torch.float32
            base = (c.x.to(f) @ c.W.to(f).t()).to(c.dtype)
            xa = (c.x.to(f) @ c.A.to(f).t()).to(c.dtype)
            if not (torch.isfinite(base).all() and torch.isfinite(xa).all()):
                rows.append({"dtype": dt, "regime": regime, "skipped": "overflows the format"})
                continue
            fmt = parse_format(dt)
            bias = torch.randn(d_out, device="cuda").to(c.dtype)
            y, lora = lora_compose_forward_fused(base, xa, c.B, c.g, bias, c.s, write_lora=True)
            exact = xa.double() @ c.B.double().t()
            mag = xa.double().abs() @ c.B.double().abs().t()
            lora_ratio = float(((lora.double() - exact).abs() / (fmt.u * exact.abs() + (r + 1) * u32 * mag)
                                .clamp_min(1e-300)).max())
            y_ulp = float(ulp_error(y.double(), compose_truth(base, lora, c.g, c.s, bias).y, fmt).max())
            m = c.magnitude().clone().requires_grad_()
            nu = factored_row_norm(c.W, c.A, c.B, c.s)
            dy = torch.randn_like(base)
            res = []
            for _ in range(20):
                m.grad = None
                x_, B_ = xa.clone().requires_grad_(), c.B.clone().requires_grad_()
                g, _ = dora_scale(m, nu)
                lora_compose(base, x_, B_, g, c.s, bias, tier="fused").backward(dy)
                res.append((x_.grad, B_.grad, m.grad.clone()))
            same = all(torch.equal(a, b) for rr in res[1:] for a, b in zip(rr, res[0]))
            d_xa, d_B, d_m = res[0]
            gk = (c.magnitude() / nu)
            dg = (dy.double() * (base.double() + c.s * lora.double())).sum(0)
            dm_t = dg / row_norm_truth(c.W, c.A, c.B, c.s).nu
            rel_dm = float(((d_m.double() - dm_t).abs() / dm_t.abs().clamp_min(1e-300)).max())
            gs = (gk * c.s).double()
            ex_B = gs[:, None] * (dy.double().t() @ xa.double())
            mag_B = gs.abs()[:, None] * (dy.double().abs().t() @ xa.double().abs())
            ratio_B = float(((d_B.double() - ex_B).abs() / (fmt.u * ex_B.abs() + (T + 2) * u32 * mag_B).clamp_min(1e-300)).max())
            ex_x = dy.double() @ (gs[:, None] * c.B.double())
            mag_x = dy.double().abs() @ (gs.abs()[:, None] * c.B.double().abs())
            ratio_x = float(((d_xa.double() - ex_x).abs() / (fmt.u * ex_x.abs() + (fmt.u + (d_out + 2) * u32) * mag_x)
                             .clamp_min(1e-300)).max())
            rows.append({"dtype": dt, "regime": regime, "T": T, "d_out": d_out, "r": r, "lora_over_gemm_bound": lora_ratio,
                         "y_max_ulp": y_ulp, "d_m_max_rel": rel_dm, "d_B_over_bound": ratio_B, "d_xa_over_bound": ratio_x,
                         "bitwise_identical_20_runs": bool(same)})
            log(rows[-1])
    return rows


def acc_parity():
    """fp32: fused vs eager tier vs PEFT's formula (eager, fp32) — y, and all gradients."""
    rows = []
    c = make_case("trained", 2048, 1024, 32, 1024, dtype="fp32", seed=5, device="cuda")
    base, lora = c.compose_inputs()
    m = c.magnitude()
    nu = factored_row_norm(c.W, c.A, c.B, c.s)
    dy = torch.randn_like(base)
    bias = torch.randn(2048, device="cuda")
    outs = {}
    for tier in ("fused", "eager", "peft"):
        b_, l_, m_ = base.clone().requires_grad_(), lora.clone().requires_grad_(), m.clone().requires_grad_()
        if tier == "peft":  # PEFT: (mag/‖w‖ - 1)*base + mag/‖w‖*lora*scaling, base_result + bias after
            sc = (m_ / nu).view(1, -1)
            y = (b_ + bias) + ((sc - 1) * b_ + sc * l_ * c.s)
        else:
            g, _ = dora_scale(m_, nu)
            y = compose(b_, l_, g, c.s, bias, tier=tier)
        y.backward(dy)
        outs[tier] = (y.detach(), b_.grad, l_.grad, m_.grad)
    names = ("y", "d_base", "d_lora", "d_m")
    for a, b in (("fused", "eager"), ("fused", "peft"), ("eager", "peft")):
        for n, x, z in zip(names, outs[a], outs[b]):
            rows.append({"pair": f"{a} vs {b}", "output": n,
                         "max_rel": float(((x.double() - z.double()).abs().max() / z.double().abs().max())),
                         "max_elementwise_rel": float(((x.double() - z.double()).abs() / z.double().abs().clamp_min(1e-30)).quantile(0.999)) if x.numel() < 2**24 else None})
    return rows


# ----------------------------------------------------------------------------- performance
def copy_bandwidth():
    n = 1 << 29  # 1 GiB of bf16
    a = torch.randn(n // 2, device="cuda", dtype=torch.float32).view(torch.bfloat16)
    b = torch.empty_like(a)
    ms = bench_ms(lambda: b.copy_(a))
    return 2 * a.numel() * a.element_size() / (ms * 1e-3) / 1e12


def eager_stable(base, lora, g, s):
    """PEFT-style stable compose in the activation dtype: four elementwise passes (g rounded to D)."""
    gd = g.to(base.dtype)
    return base + ((gd - 1) * base + gd * lora * s)


def perf_compose(bw, quick):
    rows = []
    shapes = [(4096, 4096)] if quick else [(8192, 8192), (16384, 8192), (4096, 28672)]
    for (T, N) in shapes:
        base = torch.randn(T, N, device="cuda", dtype=torch.bfloat16)
        lora = torch.randn(T, N, device="cuda", dtype=torch.bfloat16)
        g = (1 + 1e-3 * torch.randn(N, device="cuda")).float()
        dy = torch.randn_like(base)
        elems = T * N
        t_fwd = bench_ms(lambda: compose(base, lora, g, 2.0, tier="fused"))
        t_eager = bench_ms(lambda: eager_stable(base, lora, g, 2.0))
        t_eager_tier = bench_ms(lambda: compose(base, lora, g, 2.0, tier="eager"))
        inner_holder = {}

        def fwd_save():
            out, inner = compose_mod.compose_forward_fused(base, lora, g, None, None, 2.0, False, compose_mod.SAVE_ACTIVATION)
            inner_holder["i"] = inner
            return out
        t_fwd_save = bench_ms(fwd_save)
        inner = inner_holder["i"]
        e = base.new_empty(0)
        t_bwd = bench_ms(lambda: compose_mod.compose_backward_fused(dy, base, lora, e, g, None, 2.0, False, compose_mod.SAVE_INPUTS,
                                                                   torch.bfloat16, torch.bfloat16, True, True, True))
        t_bwd_act = bench_ms(lambda: compose_mod.compose_backward_fused(dy, e, e, inner, g, None, 2.0, False, compose_mod.SAVE_ACTIVATION,
                                                                       torch.bfloat16, torch.bfloat16, True, True, True))
        # eager autograd of the stable form (the baseline the issue names): backward incl. d_g
        b_, l_, g_ = base.clone().requires_grad_(), lora.clone().requires_grad_(), g.clone().requires_grad_()

        def eager_bwd():
            y = b_ + ((g_ - 1) * b_ + g_ * l_ * 2.0)
            return torch.autograd.grad(y, (b_, l_, g_), dy)
        t_eager_fb = bench_ms(eager_bwd)

        def eager_fwd_only():
            return b_ + ((g_ - 1) * b_ + g_ * l_ * 2.0)
        t_eager_f = bench_ms(eager_fwd_only)
        t_eager_bwd = t_eager_fb - t_eager_f
        byt_fwd = elems * 2 * 3
        byt_save = elems * (2 * 4)
        byt_bwd = elems * (2 * 5)
        byt_bwd_act = elems * (2 * 4)
        rows.append({"T": T, "d_out": N, "fused_fwd_ms": t_fwd, "fused_fwd_bw_frac": byt_fwd / (t_fwd * 1e-3) / 1e12 / bw,
                     "fused_fwd_save_ms": t_fwd_save, "fused_fwd_save_bw_frac": byt_save / (t_fwd_save * 1e-3) / 1e12 / bw,
                     "fused_bwd_ms": t_bwd, "fused_bwd_bw_frac": byt_bwd / (t_bwd * 1e-3) / 1e12 / bw,
                     "fused_bwd_saved_inner_ms": t_bwd_act, "fused_bwd_saved_inner_bw_frac": byt_bwd_act / (t_bwd_act * 1e-3) / 1e12 / bw,
                     "eager_stable_fwd_bf16_ms": t_eager, "eager_tier_fp64_fwd_ms": t_eager_tier,
                     "eager_autograd_fwd_ms": t_eager_f, "eager_autograd_bwd_ms": t_eager_bwd,
                     "fwd_speedup_vs_eager": t_eager / t_fwd, "bwd_speedup_vs_eager_autograd": t_eager_bwd / t_bwd})
        log(f"compose {T}x{N}: fwd {t_fwd:.3f} ms ({rows[-1]['fused_fwd_bw_frac']:.2%} of copy bw), "
            f"bwd {t_bwd:.3f} ms vs eager {t_eager_bwd:.3f} ({rows[-1]['bwd_speedup_vs_eager_autograd']:.2f}x)")
        del base, lora, dy, inner, b_, l_, g_
        inner_holder.clear()
        torch.cuda.empty_cache()
    return rows


def crossover():
    """Fused vs eager tier (and vs eager bf16 stable form) for growing T·d_out: where does fused win?"""
    rows = []
    for (T, N) in [(1, 512), (1, 4096), (16, 4096), (128, 4096), (512, 4096), (2048, 4096), (2048, 8192), (8192, 8192)]:
        base = torch.randn(T, N, device="cuda", dtype=torch.bfloat16)
        lora = torch.randn_like(base)
        g = (1 + 1e-3 * torch.randn(N, device="cuda")).float()
        gr = g.clone().requires_grad_()
        dy = torch.randn_like(base)
        f = bench_ms(lambda: compose(base, lora, g, 2.0, tier="fused"), rep=50)
        e = bench_ms(lambda: compose(base, lora, g, 2.0, tier="eager"), rep=50)
        eb = bench_ms(lambda: eager_stable(base, lora, g, 2.0), rep=50)

        def fb(tier):
            def run():
                b_, l_ = base.requires_grad_(), lora.requires_grad_()
                y = compose(b_, l_, gr, 2.0, tier=tier)
                return torch.autograd.grad(y, (b_, l_, gr), dy)
            return run
        ff = bench_ms(fb("fused"), rep=50)
        ef = bench_ms(fb("eager"), rep=50)
        base.requires_grad_(False); lora.requires_grad_(False)
        rows.append({"T": T, "d_out": N, "elements": T * N, "fwd_fused_ms": f, "fwd_eager_tier_ms": e,
                     "fwd_eager_bf16_stable_ms": eb, "train_fused_ms": ff, "train_eager_tier_ms": ef})
    return rows


def norm_perf(quick):
    rows = []
    d = 4096 if quick else 8192
    for r in ((64,) if quick else (64, 384, 768)):
        for wdt in (torch.bfloat16, torch.float32):
            W = (torch.randn(d, d, device="cuda") / math.sqrt(d)).to(wdt)
            A = (torch.randn(r, d, device="cuda") / math.sqrt(d)).to(wdt)
            B = (torch.randn(d, r, device="cuda") * 0.01).to(wdt)
            s = 2.0
            wsq = weight_row_sq(W)

            def ours_cached():
                return factored_row_norm(W, A, B, s, wsq=wsq, validate=False)

            def ours_cold():
                return factored_row_norm(W, A, B, s, validate=False)

            def peft_dense():  # PEFT: BA through eye(d_in) and the two adapter layers, then the row norm
                eye = torch.eye(d, device="cuda", dtype=wdt)
                lora_weight = F.linear(F.linear(eye, A), B).T
                return torch.linalg.norm(W + s * lora_weight, dim=1).to(wdt)

            def dense_fp32():
                return torch.linalg.norm(W.float() + s * (B.float() @ A.float()), dim=1)
            rec = {"d": d, "r": r, "W_dtype": str(wdt).replace("torch.", "")}
            for name, fn in (("factored_cached", ours_cached), ("factored_cold", ours_cold),
                             ("peft_dense", peft_dense), ("dense_fp32", dense_fp32)):
                rec[name + "_ms"] = bench_ms(fn, rep=50)
                rec[name + "_peak_mib"] = peak_mib(fn)
            rec["speedup_vs_peft"] = rec["peft_dense_ms"] / rec["factored_cached_ms"]
            rec["memory_ratio_vs_peft"] = rec["factored_cached_peak_mib"] / rec["peft_dense_peak_mib"]
            rows.append(rec)
            log(f"norm d={d} r={r} {rec['W_dtype']}: ours {rec['factored_cached_ms']:.3f} ms/{rec['factored_cached_peak_mib']:.0f} MiB, "
                f"PEFT {rec['peft_dense_ms']:.3f} ms/{rec['peft_dense_peak_mib']:.0f} MiB")
            del W, A, B, wsq
            torch.cuda.empty_cache()
    return rows


def layer_perf(quick):
    from peft import LoraConfig, get_peft_model

    d, r, T = (4096, 64, 2048) if quick else (8192, 384, 4096)
    rows = []
    torch.manual_seed(0)
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    for adapters in ("fp32", "bf16"):
        rec = {"d": d, "r": r, "tokens": T, "adapters": adapters}
        impls = ("peft_lora", "peft_dora", "ours") + (("ours_save_inputs",) if adapters == "bf16" else ())
        for impl in impls:
            lin = torch.nn.Linear(d, d, bias=False, device="cuda", dtype=torch.bfloat16)
            if impl.startswith("ours"):
                layer = DoRALinear(lin, r, 2 * r, adapter_dtype=torch.float32 if adapters == "fp32" else None,
                                   save="inputs" if impl == "ours_save_inputs" else "recompute")
                with torch.no_grad():
                    layer.lora_B.normal_(0, 1e-3)
                    layer.magnitude.mul_(1.001)
                params = [layer.lora_A, layer.lora_B, layer.magnitude]

                def invalidate():
                    layer._nu_key = None  # training: A and B change every step, so ν is recomputed
            else:
                model = torch.nn.Sequential(lin)
                cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], use_dora=impl == "peft_dora")
                layer = get_peft_model(model, cfg, autocast_adapter_dtype=adapters == "fp32")
                for n, p in layer.named_parameters():
                    if "lora_B" in n:
                        with torch.no_grad():
                            p.normal_(0, 1e-3)
                params = [p for p in layer.parameters() if p.requires_grad]

                def invalidate():
                    pass
            xr = x.clone().requires_grad_(False)

            def fwd_train():
                invalidate()
                return layer(xr)

            def fwd_bwd():
                invalidate()
                y = layer(xr)
                return torch.autograd.grad(y, params, dy)

            def fwd_infer():
                with torch.no_grad():
                    return layer(xr)
            rec[impl + "_fwd_ms"] = bench_ms(fwd_train, rep=50)
            rec[impl + "_fwdbwd_ms"] = bench_ms(fwd_bwd, rep=50)
            rec[impl + "_infer_ms"] = bench_ms(fwd_infer, rep=50)
            rec[impl + "_fwd_peak_mib"] = peak_mib(fwd_train)
            rec[impl + "_fwdbwd_peak_mib"] = peak_mib(fwd_bwd)
            del layer, lin, params
            torch.cuda.empty_cache()
        for k in ("fwd", "fwdbwd", "infer"):
            rec[f"ours_over_lora_{k}"] = rec[f"ours_{k}_ms"] / rec[f"peft_lora_{k}_ms"]
            rec[f"peft_dora_over_lora_{k}"] = rec[f"peft_dora_{k}_ms"] / rec[f"peft_lora_{k}_ms"]
        for k in ("fwd", "fwdbwd"):
            rec[f"ours_mem_over_lora_{k}"] = rec[f"ours_{k}_peak_mib"] / rec[f"peft_lora_{k}_peak_mib"]
            if "ours_save_inputs_fwd_ms" in rec:
                rec[f"ours_save_inputs_over_lora_{k}"] = rec[f"ours_save_inputs_{k}_ms"] / rec[f"peft_lora_{k}_ms"]
                rec[f"ours_save_inputs_mem_over_lora_{k}"] = (rec[f"ours_save_inputs_{k}_peak_mib"]
                                                              / rec[f"peft_lora_{k}_peak_mib"])
        rows.append(rec)
        log(f"layer adapters={adapters}: ours/LoRA fwd {rec['ours_over_lora_fwd']:.3f} fwd+bwd {rec['ours_over_lora_fwdbwd']:.3f} "
            f"mem {rec['ours_mem_over_lora_fwd']:.3f}/{rec['ours_mem_over_lora_fwdbwd']:.3f}; PEFT DoRA/LoRA {rec['peft_dora_over_lora_fwd']:.3f}")
    return rows


def tune_wa():
    """Tile configurations of the U = W Aᵀ kernel at 8192×8192, r = 384 (bf16 W; bf16 and fp32 A)."""
    from dora_verify.kernels import norm as nm

    d, r = 8192, 384
    W = (torch.rand(d, d, device="cuda") / math.sqrt(d)).to(torch.bfloat16)  # all-positive: exposes accumulation error
    rows = []
    for mode, adt in ((0, torch.bfloat16), (1, torch.float32)):
        A = (torch.rand(r, d, device="cuda") / math.sqrt(d)).to(adt)
        ref = W.double() @ A.double().t()
        if mode == 0:
            t_cublas = bench_ms(lambda: torch.mm(W, A.t(), out_dtype=torch.float32))
            rows.append({"mode": 0, "config": "cublas mm out_dtype=fp32", "ms": t_cublas,
                         "max_rel": float(((torch.mm(W, A.t(), out_dtype=torch.float32).double() - ref).abs() / ref.abs()).max())})
            log(rows[-1])
        keep = nm.WA_CONFIG[mode]
        cands = ([(64, 128, 128, 2, 4, 3), (128, 128, 128, 1, 8, 3), (64, 128, 64, 4, 4, 4), (128, 128, 128, 2, 8, 3)]
                 if mode == 0 else
                 [(128, 128, 64, 1, 8, 2), (64, 128, 64, 1, 4, 3), (64, 128, 32, 2, 4, 4), (128, 128, 32, 2, 8, 3),
                  (64, 64, 64, 1, 4, 3)])
        for cfg in cands:
            nm.WA_CONFIG[mode] = cfg
            try:
                t = bench_ms(lambda: nm.wa_product(W, A))
                err = float(((nm.wa_product(W, A).double() - ref).abs() / ref.abs()).max())
            except Exception as e:  # noqa: BLE001
                t, err = None, repr(e)[:120]
            rows.append({"mode": mode, "config": list(cfg), "ms": t, "max_rel": err})
            log(rows[-1])
        nm.WA_CONFIG[mode] = keep
    return rows


def profile_pieces():
    """Where the time goes in the norm and the layer forward (torch.profiler, CUDA kernel totals)."""
    from torch.profiler import ProfilerActivity, profile

    d, r, T = 8192, 384, 4096
    W = (torch.randn(d, d, device="cuda") / math.sqrt(d)).to(torch.bfloat16)
    A = (torch.randn(r, d, device="cuda") / math.sqrt(d)).to(torch.bfloat16)
    B = (torch.randn(d, r, device="cuda") * 0.01).to(torch.bfloat16)
    wsq = weight_row_sq(W)
    lin = torch.nn.Linear(d, d, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = DoRALinear(lin, r, 2 * r)
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    tables = {}
    for name, fn in (("norm", lambda: factored_row_norm(W, A, B, 2.0, wsq=wsq, validate=False)),
                     ("layer_fwd", lambda: (setattr(layer, "_nu_key", None), layer(x))),
                     ("layer_fwdbwd", lambda: (setattr(layer, "_nu_key", None), layer(x).sum().backward()))):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
        log(f"--- {name}")
        log(table)
        tables[name] = table
    return tables


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="acc,perf")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    parts = set(a.parts.split(","))
    torch.manual_seed(0)
    rep = {"provenance": provenance.provenance(torch.device("cuda")), "seed": 0, "quick": a.quick, "has_mm_out_dtype": None}
    try:
        torch.mm(torch.ones(2, 2, device="cuda", dtype=torch.bfloat16), torch.ones(2, 2, device="cuda", dtype=torch.bfloat16), out_dtype=torch.float32)
        rep["has_mm_out_dtype"] = True
    except Exception as e:  # noqa: BLE001
        rep["has_mm_out_dtype"] = repr(e)[:200]
    t0 = time.time()
    def part(name, fn, *args):
        try:
            rep[name] = fn(*args)
        except Exception as e:  # noqa: BLE001 - record and go on: one failure must not lose the rest
            import traceback
            rep[name] = {"error": traceback.format_exc()}
            log(f"PART {name} FAILED: {e!r}")
        with open(os.path.join(a.out, "report.json"), "w") as f:  # after every part: a timeout keeps the rest
            json.dump(rep, f, indent=1, default=str)
    if "acc" in parts:
        part("compose_accuracy", acc_compose, a.quick)
        for x in rep["compose_accuracy"] if isinstance(rep["compose_accuracy"], list) else []:
            if x.get("max_ulp", 0) > 1:
                log("OVER 1 ULP:", json.dumps(x))
        part("norm_accuracy", acc_norm, a.quick)
        part("backward_accuracy", acc_backward, a.quick)
        part("lora_compose_accuracy", acc_lora_compose, a.quick)
        part("tier_parity_fp32", acc_parity)

    if "profile" in parts:
        part("wa_tuning", tune_wa)
        part("profile", profile_pieces)
    if "perf" in parts:
        bw = copy_bandwidth()
        rep["copy_bandwidth_TBps"] = bw
        log(f"copy bandwidth {bw:.3f} TB/s")
        part("compose_perf", perf_compose, bw, a.quick)
        part("norm_perf", norm_perf, a.quick)
        part("layer_perf", layer_perf, a.quick)
        part("crossover", crossover)
    if "layer" in parts and "perf" not in parts:
        part("layer_perf", layer_perf, a.quick)
    rep["seconds"] = time.time() - t0
    with open(os.path.join(a.out, "report.json"), "w") as f:
        json.dump(rep, f, indent=1, default=str)
    log(f"done in {rep['seconds']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
