"""GPU evidence for the production kernels (issue 3): accuracy against the oracles, determinism, tier
parity, and profiles. Speed and memory side by side with eager torch, PEFT DoRA and PEFT LoRA: `dora-verify bench`.

    DORA_VERIFY_COMMIT=<hash> python3 bench/kernels_gpu.py --out DIR [--quick] [--parts acc,profile]

Writes DIR/report.json (provenance and every number; bench/summarise.py renders it); the U-kernel tile
timings of part "profile" are triton.testing.do_bench medians.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

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
                    rows.append(
                        {
                            "dtype": dt,
                            "regime": regime,
                            "g": gname,
                            "output": output,
                            "max_ulp": float(u.max()),
                            "worst": {
                                "base": float(base.flatten()[wi]),
                                "lora": float(lora.flatten()[wi]),
                                "g": float(g[wi % d_out]),
                                "bias": float(b[wi % d_out]) if b is not None else None,
                                "got": float(got.flatten()[wi]),
                                "exact": float(exact.flatten()[wi]),
                            },
                            "frac_correctly_rounded": float((got.double() == near).float().mean()),
                            "uncertified": tr.uncertified,
                        }
                    )
        log(f"compose acc {dt}: worst ulp {max(x.get('max_ulp', 0) for x in rows if x['dtype'] == dt):.4f}")
    return rows


def acc_norm(quick):
    rows = []
    shapes = [(1024, 1024, 16)] if quick else [(2048, 2048, 64), (8192, 8192, 384)]
    for d_out, d_in, r in shapes:
        big = d_out * d_in > 2**24
        for dt in ("bf16",) if big else ("bf16", "fp16", "fp32"):
            for regime in (
                ("trained", "all_positive")
                if big
                else ("trained", "near_cancel", "zero_rows", "all_positive", "heavy_tailed", "fresh")
            ):
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
                rows.append(
                    {
                        "shape": [d_out, d_in, r],
                        "dtype": dt,
                        "regime": regime,
                        "nu_max_rel": float(rel.max()),
                        "g_max_rel": float(grel),
                        "gm1_err_rel_to_g": float(gm1err),
                        "recomputed_rows": len(info.recomputed_rows),
                        "max_kappa": float(info.kappa[torch.isfinite(info.kappa)].max()),
                        "oracle_tier2_rows": len(tr.tier2_rows),
                    }
                )
            # adapters in fp32 on a bf16 W (PEFT's default): the exact bf16 split of A
            if dt == "bf16":
                c = make_case("trained", d_out, d_in, r, 4, dtype="bf16", seed=4, device="cuda")
                A32 = c.A.float() * (1 + 1e-3 * torch.randn_like(c.A.float()))
                B32 = c.B.float() * (1 + 1e-3 * torch.randn_like(c.B.float()))
                nu = factored_row_norm(c.W, A32, B32, c.s)
                tr = row_norm_truth(c.W, A32, B32, c.s)
                rows.append(
                    {
                        "shape": [d_out, d_in, r],
                        "dtype": "bf16 W, fp32 A/B",
                        "regime": "trained",
                        "nu_max_rel": float(((nu.double() - tr.nu).abs() / tr.nu).max()),
                    }
                )
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
                rel_dm = (d_m.double() - dm_t).abs() / dm_t.abs().clamp_min(1e-300)
                rows.append(
                    {
                        "dtype": dt,
                        "regime": regime,
                        "save": save,
                        "d_base_max_ulp": u_db,
                        "d_lora_max_ulp": u_dl,
                        "d_m_max_rel": float(rel_dm.max()),
                        "d_m_median_rel": float(rel_dm.median()),
                        "bitwise_identical_20_runs": bool(same),
                    }
                )
                del g64
        log(f"backward acc {dt} done")
    return rows


def acc_lora_compose(quick):
    """kernels.lora_compose on the GPU: the lora it used vs the exact xa Bᵀ (GEMM bound), y ≤ 1 ulp of the
    exact compose of that lora, d_m vs the oracle, d_B / d_xa against their bounds, 20-run determinism."""
    from dora_verify.kernels import lora_compose
    from dora_verify.bounds import lora_compose_dg_bound
    from dora_verify.kernels.lora_compose import lora_compose_forward_fused, m_chain

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
            lora_ratio = float(  # the fp32 tensor-core sum, not rounded to the adapter dtype: γ_r(2u₃₂) of Σ|xa||B|
                ((lora.double() - exact).abs() / (2 * (r + 1) * u32 * mag).clamp_min(1e-300)).max()
            )
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
            gk = c.magnitude() / nu
            dg, dg_bound = lora_compose_dg_bound(dy, base, xa, c.B, c.s, m_chain(T, d_out, r, dy.dtype, xa.dtype))
            dg_ratio = float(  # d_m = RN32(d_g / ν) with the layer's ν: d_g within its bound, plus d_m's rounding
                (
                    (d_m.double() * nu.double() - dg).abs() / (dg_bound + 2 * u32 * (d_m.double() * nu.double()).abs())
                ).max()
            )
            dm_t = dg / row_norm_truth(c.W, c.A, c.B, c.s).nu
            rel_dm = float(((d_m.double() - dm_t).abs() / dm_t.abs().clamp_min(1e-300)).max())
            gs = (gk * c.s).double()
            ex_B = gs[:, None] * (dy.double().t() @ xa.double())
            mag_B = gs.abs()[:, None] * (dy.double().abs().t() @ xa.double().abs())
            ratio_B = float(
                ((d_B.double() - ex_B).abs() / (fmt.u * ex_B.abs() + (T + 2) * u32 * mag_B).clamp_min(1e-300)).max()
            )
            ex_x = dy.double() @ (gs[:, None] * c.B.double())
            mag_x = dy.double().abs() @ (gs.abs()[:, None] * c.B.double().abs())
            ratio_x = float(
                (
                    (d_xa.double() - ex_x).abs()
                    / (fmt.u * ex_x.abs() + (fmt.u + (d_out + 2) * u32) * mag_x).clamp_min(1e-300)
                ).max()
            )
            rows.append(
                {
                    "dtype": dt,
                    "regime": regime,
                    "T": T,
                    "d_out": d_out,
                    "r": r,
                    "lora_over_gemm_bound": lora_ratio,
                    "y_max_ulp": y_ulp,
                    "d_m_max_rel": rel_dm,
                    "d_g_over_bound": dg_ratio,
                    "d_B_over_bound": ratio_B,
                    "d_xa_over_bound": ratio_x,
                    "bitwise_identical_20_runs": bool(same),
                }
            )
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
            rows.append(
                {
                    "pair": f"{a} vs {b}",
                    "output": n,
                    "max_rel": float(((x.double() - z.double()).abs().max() / z.double().abs().max())),
                    "max_elementwise_rel": float(
                        ((x.double() - z.double()).abs() / z.double().abs().clamp_min(1e-30)).quantile(0.999)
                    )
                    if x.numel() < 2**24
                    else None,
                }
            )
    return rows


# ----------------------------------------------------------------------------- profiling (speed: `dora-verify bench`)
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
            rows.append(
                {
                    "mode": 0,
                    "config": "cublas mm out_dtype=fp32",
                    "ms": t_cublas,
                    "max_rel": float(
                        ((torch.mm(W, A.t(), out_dtype=torch.float32).double() - ref).abs() / ref.abs()).max()
                    ),
                }
            )
            log(rows[-1])
        cands = (
            [
                (64, 128, 128, 2, 4, 3),
                (128, 128, 128, 1, 8, 3),
                (64, 128, 64, 4, 4, 4),
                (128, 128, 128, 2, 8, 3),
                (64, 128, 128, 2, 4, 4),
                (64, 128, 64, 4, 4, 5),
            ]
            if mode == 0
            else [
                (128, 128, 64, 1, 8, 2),
                (64, 128, 64, 1, 4, 3),
                (64, 128, 32, 2, 4, 4),
                (128, 128, 32, 2, 8, 3),
                (64, 64, 64, 1, 4, 3),
                (64, 128, 64, 1, 4, 4),
                (128, 64, 64, 1, 4, 3),
                (64, 128, 64, 1, 4, 5),
                (128, 128, 64, 1, 8, 3),
                (64, 256, 64, 1, 8, 3),
            ]
        )
        for tma, table in ((False, nm.WA_CONFIG), (True, nm.WA_TMA_CONFIG)):
            keep = table[mode]
            for cfg in cands:
                table[mode] = cfg
                try:
                    t = bench_ms(lambda: nm.wa_product(W, A, use_tma=tma))
                    err = float(((nm.wa_product(W, A, use_tma=tma).double() - ref).abs() / ref.abs()).max())
                except Exception as e:  # noqa: BLE001
                    t, err = None, repr(e)[:120]
                rows.append({"mode": mode, "tma": tma, "config": list(cfg), "ms": t, "max_rel": err})
                log(rows[-1])
            table[mode] = keep
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
    for name, fn in (
        ("norm", lambda: factored_row_norm(W, A, B, 2.0, wsq=wsq, validate=False)),
        ("layer_fwd", lambda: layer(x)),
        ("layer_fwdbwd", lambda: layer(x).sum().backward()),
    ):
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
    ap.add_argument("--parts", default="acc")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    parts = set(a.parts.split(","))
    torch.manual_seed(0)
    rep = {
        "provenance": provenance.provenance(torch.device("cuda")),
        "seed": 0,
        "quick": a.quick,
        "has_mm_out_dtype": None,
    }
    try:
        torch.mm(
            torch.ones(2, 2, device="cuda", dtype=torch.bfloat16),
            torch.ones(2, 2, device="cuda", dtype=torch.bfloat16),
            out_dtype=torch.float32,
        )
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
    if parts & {"perf", "layer"}:
        log("speed and memory moved to `dora-verify bench` (dora_verify/bench.py)")
    rep["seconds"] = time.time() - t0
    with open(os.path.join(a.out, "report.json"), "w") as f:
        json.dump(rep, f, indent=1, default=str)
    log(f"done in {rep['seconds']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
