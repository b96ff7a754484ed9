"""Exhaustive checks of the compose epilogue y = RN_D(g·(base + s·lora)) over every 16-bit input.

* :func:`epilogue_slice` (CPU or any device, torch): every finite value of one operand (base or lora;
  63 488 in fp16, 65 280 in bf16) against a grid of the other operand and of (g, s), through
  ``kernels.compose`` (eager tier, or the fused tier — the interpreter off CUDA), compared with the
  exact value (the tier-1 oracle, escalating to exact rationals). Run by the test suite.
* :func:`all_pairs` (CUDA): all 2³² (base, lora) bit patterns for each (g, s) of a grid, through the
  production epilogue itself (``kernels.compose._y_value``, the code the fused compose and lora_compose
  kernels inline) in a Triton kernel that also evaluates the exact result in-register: base + s·lora by
  TwoSum (exact in float64: s·lora has ≤ 32 significant bits), g·(…) by an FMA split, so y = y_hi + y_lo to
  ~2⁻¹⁰⁶ relative. Per element it scores the error against ``bounds.compose_kernel_bounds`` (written
  out in the kernel), the ULP error, correct rounding (|err| ≤ ½ ulp) and faithfulness (|err| < 1 ulp);
  results whose exact value overflows the format must come out as ±Inf of the right sign. Pairs with a
  NaN/Inf input are counted and skipped (IEEE propagation is tested in tests/test_kernels_compose.py); so are
  pairs outside the contract's domain (s·lora or base + s·lora beyond fp32's range: bf16 values near 3e38,
  where the fp32 epilogue itself overflows).
"""

from __future__ import annotations

import math
import time

import torch

from . import bounds
from .formats import parse_format, ulp
from .oracles import compose_truth
from .strategies import f32

F64 = torch.float64
U32, ETA32 = 2.0**-24, 2.0**-150
DEFAULT_G = (1.0, 1 + 2.0**-23, 1 - 2.0**-24, 1 + 2.0**-10, 1 - 2.0**-9, 1.0015, 0.999, 0.5, 2.0, 1 / 3, 3.7, 1e-3)
DEFAULT_S = (1.0, 2.0, 0.25, 16 / math.sqrt(384))
SLICE_GRID = (0.0, -0.0, 1.0, -1.5, 3.140625, -1e-3, 7e-6, 65504.0 / 64, -(2.0**-14), 2.0**-24)


def all_values(dtype) -> torch.Tensor:
    """Every finite value of a 16-bit format, in bit-pattern order (±0 both included)."""
    fmt = parse_format(dtype)
    if fmt.bits != 16:
        raise ValueError(f"exhaustive checks are for 16-bit formats, got {fmt.name}")
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    v = bits.view(fmt.torch_dtype)
    return v[torch.isfinite(v)]


def _score(y, base, lora, g, s, fmt) -> dict:
    tr = compose_truth(base, lora, g, s)
    x = tr.y
    ok = x.abs() <= fmt.max_finite  # exact result in range (beyond: RN gives ±Inf or max, not scored here)
    _, by = bounds.compose_kernel_bounds(base, lora, g, s)
    err = ((y.to(F64) - tr.y_hi) - tr.y_lo).abs() - tr.y_bound
    err = torch.where(ok, err.clamp_min(0), torch.zeros_like(err))
    ratio = torch.where(err == 0, torch.zeros_like(err), err / by)
    half_ulp = 0.5 * ulp(x, fmt)
    u = err / (2 * half_ulp)
    # correct rounding is owed except where x lies within the epilogue's slack E of a rounding boundary
    _, slack = bounds.compose_epilogue_slack(base, lora, g, s)
    not_cr = ok & (y.to(F64) != tr.y_round.nearest)
    return {
        "elements": int(ok.sum()),
        "out_of_range": int((~ok).sum()),
        "max_ratio": float(ratio.max()),
        "violations": int((ratio > 1).sum()),
        "max_ulp": float(u.max()),
        "not_correctly_rounded": int(not_cr.sum()),
        "not_cr_off_tie": int((not_cr & ((err - half_ulp).abs() > slack + tr.y_bound)).sum()),
        "not_faithful": int((ok & (y.to(F64) != tr.y_round.down) & (y.to(F64) != tr.y_round.up)).sum()),
        "uncertified": tr.uncertified,
    }


def epilogue_slice(
    dtype,
    sweep: str = "base",
    grid=SLICE_GRID,
    g_values=DEFAULT_G,
    s_values=(2.0, 0.25),
    tier: str = "eager",
    device="cpu",
) -> dict:
    """Every finite value of ``sweep`` ('base' or 'lora') × ``grid`` of the other × ``g_values`` × ``s_values``.
    Layout: the swept values run down the rows; each column is one (other value, g) pair, one launch per s."""
    from .kernels import compose

    fmt = parse_format(dtype)
    vals = all_values(fmt).to(device)
    other = torch.tensor(grid, dtype=F64).to(fmt.torch_dtype).to(device)
    gs = torch.tensor([f32(g) for g in g_values], dtype=torch.float32, device=device)
    col_other = other.repeat_interleave(len(g_values))
    col_g = gs.repeat(len(grid))
    swept = vals[:, None].expand(-1, col_other.numel()).contiguous()
    fixed = col_other[None, :].expand(vals.numel(), -1).contiguous()
    base, lora = (swept, fixed) if sweep == "base" else (fixed, swept)
    total: dict = {}
    for s in s_values:
        s = f32(s)
        y = compose(base, lora, col_g, s, tier=tier)
        sc = _score(y, base, lora, col_g, s, fmt)
        for k, v in sc.items():
            total[k] = max(total.get(k, 0), v) if k.startswith("max") else total.get(k, 0) + v
    return {
        "dtype": fmt.name,
        "sweep": sweep,
        "tier": tier,
        "values": int(vals.numel()),
        "grid": list(grid),
        "g": [f32(g) for g in g_values],
        "s": [f32(s) for s in s_values],
        **total,
    }


# ----------------------------------------------------------------------------- all 2³² pairs on the GPU
try:
    import triton
    import triton.language as tl

    from .kernels.compose import _y_value

    _HAS_TRITON = True
except ImportError:  # pragma: no cover - Triton is a dependency on Linux x86-64
    _HAS_TRITON = False

PAIRS_BLOCK = 4096
N_STATS = 9  # max ratio, max ulp, violations, not CR, not faithful, overflow mismatches, skipped, out of domain,
#             not CR although more than the slack away from a rounding boundary
FP32_MAX = 3.4028234663852886e38

if _HAS_TRITON:
    _U32 = tl.constexpr(U32)
    _ETA32 = tl.constexpr(ETA32)
    FP32_MAX_C = tl.constexpr(FP32_MAX)

    @triton.jit
    def _pairs_kernel(
        stats_ptr,
        g,
        s,
        start,
        IS_BF16: tl.constexpr,
        P: tl.constexpr,
        EMIN: tl.constexpr,
        MAX_FINITE: tl.constexpr,
        U_D: tl.constexpr,
        ETA_D: tl.constexpr,
        NS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        idx = start + pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        hb = ((idx >> 16) & 0xFFFF).to(tl.int32)
        lb = (idx & 0xFFFF).to(tl.int32)
        hb16 = tl.where(hb >= 32768, hb - 65536, hb).to(tl.int16)
        lb16 = tl.where(lb >= 32768, lb - 65536, lb).to(tl.int16)
        if IS_BF16:
            b = hb16.to(tl.bfloat16, bitcast=True).to(tl.float32)
            lo = lb16.to(tl.bfloat16, bitcast=True).to(tl.float32)
        else:
            b = hb16.to(tl.float16, bitcast=True).to(tl.float32)
            lo = lb16.to(tl.float16, bitcast=True).to(tl.float32)
        finite = ((b - b) == 0.0) & ((lo - lo) == 0.0)
        # the contract's domain: the fp32 epilogue's intermediates s·lora and base + s·lora stay finite
        sl_x = lo.to(tl.float64) * s
        domain = (tl.abs(sl_x) < FP32_MAX_C) & (tl.abs(b.to(tl.float64) + sl_x) < FP32_MAX_C)
        b = tl.where(finite, b, 0.0)
        lo = tl.where(finite, lo, 0.0)
        gg = tl.zeros([BLOCK], dtype=tl.float32) + g
        v = _y_value(b, lo, gg, stats_ptr, idx, finite, s, False, True)
        if IS_BF16:
            y = v.to(tl.bfloat16).to(tl.float64)
        else:
            y = v.to(tl.float16).to(tl.float64)
        # exact y = y_hi + y_lo in float64
        b64, sl = b.to(tl.float64), lo.to(tl.float64) * s
        h = b64 + sl
        bb = h - b64
        e = (b64 - (h - bb)) + (sl - bb)
        g64 = gg.to(tl.float64)
        y_hi = g64 * h
        y_lo = tl.fma(g64, h, -y_hi) + g64 * e
        ay = tl.abs(y_hi)
        # the kernel bound (bounds.compose_kernel_bounds), inflated by 2⁻⁴⁰ like the library's
        terms = tl.abs(g64) * (4 * tl.abs(h) + 3 * tl.abs(sl))  # bounds.compose_epilogue_slack (no bias)
        ev = _U32 * _U32 * (1 + 4 * _U32) * terms + (4 * tl.abs(g64) + 8) * _ETA32
        bound = (ev * (1 + U_D) + U_D * ay + ETA_D) * (1 + 2.0**-40)
        in_range = ay <= MAX_FINITE
        err = tl.abs((y - y_hi) - y_lo)
        bits = ay.to(tl.int64, bitcast=True)
        ex = ((bits >> 52) & 0x7FF).to(tl.int32) - 1023
        ex = tl.maximum(ex, EMIN) - (P - 1)
        ulp_ = ((ex + 1023).to(tl.int64) << 52).to(tl.float64, bitcast=True)
        scored = finite & domain & in_range
        ratio = tl.where(scored & (err > 0), err / bound, 0.0)
        uerr = tl.where(scored, err / ulp_, 0.0)
        # beyond the range: RN gives ±Inf from MAX_FINITE + ½ulp on, else ±MAX_FINITE; y must say so
        ovf_expect_inf = ay >= MAX_FINITE + 0.5 * ((ex + 1023).to(tl.int64) << 52).to(tl.float64, bitcast=True)
        y_inf = tl.abs(y) == float("inf")
        same_sign = (y > 0) == (y_hi > 0)
        ovf_bad = finite & domain & (~in_range) & ((ovf_expect_inf != y_inf) | (~same_sign))
        not_cr = scored & (uerr > 0.5)
        off_tie = tl.abs(err - 0.5 * ulp_) > ev
        out = stats_ptr + pid.to(tl.int64) * NS
        tl.store(out + 0, tl.max(ratio, axis=0).to(tl.float32))
        tl.store(out + 1, tl.max(uerr, axis=0).to(tl.float32))
        tl.store(out + 2, tl.sum((ratio > 1).to(tl.int32), axis=0).to(tl.float32))
        tl.store(out + 3, tl.sum(not_cr.to(tl.int32), axis=0).to(tl.float32))
        tl.store(out + 4, tl.sum((scored & (uerr >= 1.0)).to(tl.int32), axis=0).to(tl.float32))
        tl.store(out + 5, tl.sum(ovf_bad.to(tl.int32), axis=0).to(tl.float32))
        tl.store(out + 6, tl.sum((~finite).to(tl.int32), axis=0).to(tl.float32))
        tl.store(out + 7, tl.sum((finite & (~domain)).to(tl.int32), axis=0).to(tl.float32))
        tl.store(out + 8, tl.sum((not_cr & off_tie).to(tl.int32), axis=0).to(tl.float32))


def all_pairs(dtype, g: float, s: float, device="cuda", start: int = 0, count: int = 1 << 32) -> dict:
    """Score the production epilogue on (base, lora) pairs ``start … start + count`` of the 2³² patterns
    (base bits = index >> 16, lora bits = index & 0xFFFF) for one (g, s). ``count`` must be a multiple of
    PAIRS_BLOCK. Off CUDA it runs under the Triton interpreter (logic only; fp16 there — the interpreter
    truncates fp32 → bf16)."""
    if not _HAS_TRITON:
        raise RuntimeError("all_pairs needs Triton")
    fmt = parse_format(dtype)
    if fmt.name not in ("bf16", "fp16"):
        raise ValueError(f"all_pairs is for bf16/fp16, got {fmt.name}")
    if count % PAIRS_BLOCK or start % PAIRS_BLOCK or not 0 < start + count <= 1 << 32:
        raise ValueError(f"start and count must be multiples of {PAIRS_BLOCK} within 2**32")
    g, s = f32(g), f32(s)
    n_prog = count // PAIRS_BLOCK
    stats = torch.empty((n_prog, N_STATS), dtype=torch.float32, device=device)
    _pairs_kernel[(n_prog,)](
        stats,
        g,
        s,
        start,
        IS_BF16=fmt.name == "bf16",
        P=fmt.p,
        EMIN=fmt.emin,
        MAX_FINITE=fmt.max_finite,
        U_D=fmt.u,
        ETA_D=fmt.min_normal * fmt.u,
        NS=N_STATS,
        BLOCK=PAIRS_BLOCK,
        num_warps=8,
        enable_fp_fusion=False,
    )
    col = stats.to(F64)
    return {
        "dtype": fmt.name,
        "g": g,
        "s": s,
        "pairs": count,
        "max_ratio": float(col[:, 0].max()),
        "max_ulp": float(col[:, 1].max()),
        "violations": int(col[:, 2].sum()),
        "not_correctly_rounded": int(col[:, 3].sum()),
        "not_faithful": int(col[:, 4].sum()),
        "overflow_mismatch": int(col[:, 5].sum()),
        "skipped_nonfinite": int(col[:, 6].sum()),
        "out_of_domain": int(col[:, 7].sum()),
        "not_cr_off_tie": int(col[:, 8].sum()),
    }


def run_exhaustive(
    dtypes=("bf16", "fp16"), g_values=DEFAULT_G, s_values=DEFAULT_S, device="cuda", progress=None
) -> dict:
    """:func:`all_pairs` over the full 2³² range for every (dtype, g, s); the report dict."""
    from .provenance import provenance

    dev = torch.device(device)
    points = [(d, g, s) for d in dtypes for g in g_values for s in s_values]
    rows = []
    t0 = time.monotonic()
    for i, (d, g, s) in enumerate(points):
        if progress:
            progress(i, len(points), f"{d} g={g:.7g} s={s:.4g}")
        t = time.monotonic()
        r = all_pairs(d, g, s, device=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        r["seconds"] = round(time.monotonic() - t, 3)
        rows.append(r)
    if progress:
        progress(len(points), len(points), "done")
    bad = sum(r["violations"] + r["not_faithful"] + r["overflow_mismatch"] + r["not_cr_off_tie"] for r in rows)
    return {
        "kind": "exhaustive",
        "provenance": provenance(dev),
        "points": rows,
        "pairs": sum(r["pairs"] for r in rows),
        "max_ratio": max(r["max_ratio"] for r in rows),
        "max_ulp": max(r["max_ulp"] for r in rows),
        "certified": bad == 0,
        "seconds": round(time.monotonic() - t0, 2),
    }


def exhaustive_markdown(rep: dict) -> str:
    from .report import _fmt, _table

    p = rep["provenance"]
    lines = [
        "# dora-verify exhaustive: every (base, lora) pair through the compose epilogue",
        "",
        f"Device: {p.get('device', {}).get('name', '?')}; commit {p.get('git', {}).get('commit', '?')}; "
        f"torch {p.get('versions', {}).get('torch', '?')}, triton {p.get('versions', {}).get('triton', '?')}.",
        "",
        f"**{'CERTIFIED' if rep['certified'] else 'VIOLATION FOUND'}**: {rep['pairs']:.4e} pairs; largest "
        f"error/bound ratio {_fmt(rep['max_ratio'])}; largest error {_fmt(rep['max_ulp'], 7)} ulp; "
        f"{rep['seconds']} s.",
        "",
        "Per point: all 2³² bit patterns of (base, lora) (NaN/Inf inputs skipped), y = RN(g·(base + s·lora)) by "
        "kernels.compose._y_value, exact value in float64 double-double. 'not CR' = |err| > ½ ulp (not correctly "
        "rounded), 'not CR off tie' = not CR although the exact value is farther than the epilogue's slack E "
        "(bounds.compose_epilogue_slack) from a rounding boundary (the contract promises 0), 'not faithful' = "
        "|err| ≥ 1 ulp, 'overflow' = a result beyond the format's range that is not the right ±Inf/±max; "
        "'out of domain' = pairs where s·lora or base + s·lora exceeds fp32's range (≈3.4e38, bf16 only), "
        "which the fp32 epilogue cannot represent (the contract's stated domain).",
        "",
    ]
    rows = [
        [
            r["dtype"],
            f"{r['g']:.9g}",
            f"{r['s']:.7g}",
            r["max_ratio"],
            _fmt(r["max_ulp"], 7),
            r["violations"],
            r["not_correctly_rounded"],
            r.get("not_cr_off_tie", "—"),
            r["not_faithful"],
            r["overflow_mismatch"],
            r["skipped_nonfinite"],
            r["out_of_domain"],
            r["seconds"],
        ]
        for r in rep["points"]
    ]
    lines.append(
        _table(
            [
                "dtype",
                "g",
                "s",
                "max ratio",
                "max ulp",
                "ratio > 1",
                "not CR",
                "not CR off tie",
                "not faithful",
                "overflow",
                "skipped (NaN/Inf in)",
                "out of domain",
                "time s",
            ],
            rows,
        )
    )
    return "\n".join(lines) + "\n"


def write_exhaustive_report(rep: dict, out_dir) -> list:
    from .report import write_bundle

    return write_bundle(
        rep, out_dir, lambda files: exhaustive_markdown(rep), json_name="exhaustive.json", md_name="exhaustive.md"
    )


__all__ = [
    "DEFAULT_G",
    "DEFAULT_S",
    "all_pairs",
    "all_values",
    "epilogue_slice",
    "run_exhaustive",
    "write_exhaustive_report",
]
