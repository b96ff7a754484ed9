"""``dora-verify sweep``: error sweeps of the DoRA forms against the oracle.

Experiments (each record holds the metrics of ``dora_verify.metrics.compare``):

* ``paper_figure1``    the paper's Figure 1 protocol (base, lora ~ N(0,1) of [tokens, d_out], s = 0.5,
                       constant g cast to the activation dtype, error of Δ), measured twice: against
                       the paper's float64 reference of the *unrounded* inputs, and against the exact
                       Δ of the rounded inputs (this toolkit's standard).
* ``compose_g_sweep``  every compose form on a trained-like layer with a constant fp32 g = 1 + δ, δ
                       from −0.1 to 0.1 through values far below bf16 resolution; y and Δ metrics.
* ``compose_regimes``  every compose form on each regime's own g (fresh, trained, ×62 activations,
                       all-positive, heavy-tailed, near-cancelling and zero rows).
* ``norm_regimes``     every norm form on each regime: relative error of ν per row.
* ``norm_rank``        the norm forms across ranks: does the error grow with r?

Optional experiments (``--experiments NAME[,NAME...]``, registry ``EXPERIMENTS`` below; none by default) add
one section each to report.json (``experiments[NAME]``) and report.md, plus their plots:

* ``accumulation``     fp32, bf16 and fp16 accumulators emulated exactly (sequential, blocked with fp32 block
                       sums, pairwise) in ν and the GEMMs, and what they do to g and y (``dora_verify.accumulation``).
* ``scaling``          each form's and the kernels' error across d_in, d_out, rank and tokens, the bounds
                       overlaid, growth exponents fitted (``dora_verify.scaling``).
"""

from __future__ import annotations

import importlib
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch

from . import bounds
from . import forms as F
from .cases import G_GRID, REGIMES, draw, g_offsets, make_case, scaling
from .formats import g_resolution, parse_format
from .formats import ulp
from .metrics import Reference, bound_ratio, compare, effective_scale_error, ratio
from .oracles import certified_round, compose_truth, row_norm_truth

SCHEMA_VERSION = "1.1"  # 1.1: headline.below_resolution (was below_bf16_resolution), strict JSON "nonfinite"
PAPER_SCALE = 0.5
MAX_SEED = 2**32 - 1  # numpy's legacy limit; every generator here (torch, hypothesis, numpy) takes 0 .. 2**32 - 1


@dataclass
class SweepConfig:
    """Everything that determines a sweep's numbers (recorded verbatim in the report)."""

    d_out: int = 8192
    d_in: int = 2048
    tokens: int = 2048  # activation rows of the paper-protocol headline (the paper used 2048)
    grid_tokens: int = 128  # activation rows per point of the g sweep and the regime grid
    rank: int = 16
    alpha: "float | None" = None  # default 2 * rank (s = 2)
    rslora: bool = False
    dtype: str = "bf16"
    seed: int = 0
    device: str = "cpu"
    ranks: tuple = (8, 32, 128, 384)
    regimes: tuple = tuple(REGIMES)
    adapter_ratio: float = 0.1
    impls: tuple = ()  # --impl specs (peft, kernels, module:callable) measured beside the forms (CLI default: kernels)
    experiments: tuple = ()  # optional experiments (names of EXPERIMENTS), run after the standard ones
    g_grid: tuple = G_GRID  # (lo, hi, per_decade) of |g − 1| in the g sweep (cases.g_offsets)

    @property
    def s(self) -> float:
        return scaling(self.alpha if self.alpha is not None else 2.0 * self.rank, self.rank, self.rslora)

    def validate(self) -> None:
        for name in ("d_out", "d_in", "tokens", "grid_tokens", "rank"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if any(int(r) <= 0 for r in self.ranks):
            raise ValueError(f"ranks must be positive, got {self.ranks}")
        if int(self.seed) != self.seed or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer from 0 to 2**32 - 1, got {self.seed}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            # alpha = 0 switches the adapter off (s = 0, nothing to measure); alpha < 0 only negates B
            raise ValueError(f"alpha must be a positive finite number, got {self.alpha}")
        with warnings.catch_warnings():  # numpy warns when alpha/r overflows fp32: the error below says it
            warnings.simplefilter("ignore")
            s = self.s
        if not (math.isfinite(s) and s > 0):
            raise ValueError(
                f"LoRA scaling s = alpha/{'sqrt(r)' if self.rslora else 'r'} = {s} in fp32: "
                "need a positive finite fp32 value (choose another --alpha)"
            )
        lo, hi, per = self.g_grid
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi <= 1) or int(per) != per or not 1 <= per <= 50:
            raise ValueError(
                f"g grid must be LO:HI:PER_DECADE with 0 < LO < HI ≤ 1 and 1 ≤ PER_DECADE ≤ 50, got {lo}:{hi}:{per}"
            )
        fmt = parse_format(self.dtype)
        if fmt.bits == 64:
            raise ValueError("dtype fp64 is the oracle's own precision: choose bf16, fp16 or fp32")
        bad = [r for r in self.regimes if r not in REGIMES]
        if bad:
            raise ValueError(f"unknown regime(s) {bad}; choose from {', '.join(REGIMES)}")
        if isinstance(self.experiments, str):  # the Python API may pass 'accumulation,scaling'
            self.experiments = parse_experiments(self.experiments)
        bad = [e for e in self.experiments if e not in EXPERIMENTS]
        if bad:
            raise ValueError(f"unknown experiment(s) {', '.join(map(repr, bad))}; choose from {', '.join(EXPERIMENTS)}")
        self.experiments = tuple(dict.fromkeys(self.experiments))


# ----------------------------------------------------------------------------- optional experiments
EXPERIMENTS = {
    "accumulation": "dora_verify.accumulation",
    "scaling": "dora_verify.scaling",
    "layer": "dora_verify.layer_experiment",
}
"""Optional experiments: name -> the module that implements it (imported only when the experiment runs).
Registering one is one line here (e.g. ``"layer": "dora_verify.layer_experiment"``). A module provides:

* ``run(cfg: SweepConfig, device: torch.device, tick) -> dict``: the experiment at ``cfg`` (shape, rank, dtype,
  seed...: the fields above; its own grid sizes are its own constants, stated in its section). Returns the
  report section: JSON-ready (dicts, lists, str, int, float; NaN/inf are mapped by ``nan_to_none``), with a
  ``"seeds"`` entry naming every seed it used; the same ``cfg`` gives the same numbers (no timings in it: the
  sweep records ``timings_s[NAME]``). It calls ``tick(label)`` after each of its steps.
* ``steps(cfg) -> int``: how many times ``run`` calls ``tick`` (the progress bar's total).
* ``markdown(section: dict, plots: list) -> str``: its report.md text (the sweep writes the heading); ``plots``
  holds the file names of the report's plots, among them its own to embed.
* ``plots(section: dict, folder: Path) -> list``: optional; writes its PNGs into ``folder`` and returns their
  paths. Name them ``NAME_*.png``: the report's general plot list leaves those to the section.
"""


def parse_experiments(text: str) -> tuple:
    """'accumulation,scaling' -> ('accumulation', 'scaling'); 'all' -> every registered one; 'none' or '' -> ().
    Unknown names raise ValueError (one line: the CLI exits 2)."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if names == ["none"] or not names:
        return ()
    if names == ["all"]:
        return tuple(EXPERIMENTS)
    bad = [n for n in names if n not in EXPERIMENTS]
    if bad:
        raise ValueError(
            f"unknown experiment(s) {', '.join(map(repr, bad))}; choose from {', '.join(EXPERIMENTS)}, all or none"
        )
    return tuple(dict.fromkeys(names))


def experiment_module(name: str):
    """The module implementing experiment ``name`` (see ``EXPERIMENTS``)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name])


def _slim(m: dict, keys) -> dict:
    return {k: m[k] for k in keys if k in m}


Y_KEYS = (
    "max_abs",
    "rmse",
    "max_ulp",
    "p99_ulp",
    "mean_signed_ulp",
    "frac_correctly_rounded",
    "frac_faithful",
    "floor_max_abs",
    "floor_ratio",
    "bits_lost",
    "cosine",
    "normwise_rel",
    "nonfinite_mismatch",
    "nan",
    "inf",
    "worst_index",
    "oracle_bound_max",
    "max_ulp_terms",
    "ulp_hist",
    "ulp_terms_hist",
    "bound_ratio",
)
D_KEYS = (
    "max_abs",
    "normwise_rel",
    "max_ulp",
    "frac_correctly_rounded",
    "floor_ratio",
    "cosine",
    "nan",
    "inf",
    "worst_index",
    "max_ulp_terms",
    "bound_ratio",
)
N_KEYS = ("max_rel", "normwise_rel", "max_abs", "nonfinite_mismatch", "nan", "inf", "worst_index")
_WORST_KEYS = ("max_abs", "rmse", "max_ulp", "max_rel", "normwise_rel", "bits_lost", "floor_ratio", "max_ulp_terms")


def _measure(approx: torch.Tensor, ref: Reference, bound=None, **kw) -> dict:
    """``compare`` plus NaN/Inf counts of ``approx`` and, given an a-priori ``bound``, ``bound_ratio``
    (:func:`metrics.bound_ratio`: ≤ 1 within it). compare leaves non-finite elements out of its metrics;
    here a non-finite output where the truth is finite makes the error maxima inf, so it never reads as exact."""
    m = compare(approx, ref, **kw)
    m["bound_ratio"] = None if bound is None else bound_ratio(approx, ref, bound)
    m["nan"], m["inf"] = int(torch.isnan(approx).sum()), int(torch.isinf(approx).sum())
    if m.get("nonfinite_mismatch"):
        m.update({k: math.inf for k in _WORST_KEYS if k in m})
        a = approx.to(torch.float64)
        bad = int((torch.isfinite(a) != torch.isfinite(ref.value)).flatten().nonzero()[0])
        m["worst_index"] = list(divmod(bad, approx.shape[-1])) if approx.dim() == 2 else [bad]
    return m


def _impl_rows(impls, kind: str):
    """(label, fn, implementation) of the implementations under test that provide ``kind`` ('compose' or 'norm')."""
    return [(f"impl:{im.name}", getattr(im, kind), im) for im in impls if getattr(im, kind) is not None]


def compose_row_bounds(name: str, impl, base, lora, g, s: float, y_exact, fmt, form_bounds=None):
    """(Δ bound or None, y bound or None) per element that a sweep row is held to: a package form's and the kernels'
    derived bounds (``dora_verify.bounds``), a user implementation's own ``compose_bound(base, lora, g, s)`` where it
    declares one (a y bound, or a pair (Δ bound or None, y bound)), else 1 ulp of the exact y (its 'faithful'
    contract, docs/contract.md); no bound under 'baseline-only'. Raises what a user's ``compose_bound`` raises.
    ``form_bounds``: the package forms' bounds of these inputs, already formed (:func:`bounds.compose_forms_bounds`)."""
    if impl is None:
        return form_bounds[name] if form_bounds is not None else bounds.compose_form_bounds(name, base, lora, g, s)
    if impl.contract == "kernel":
        return bounds.compose_kernel_bounds(base, lora, g, s)
    if impl.contract == "form":
        return bounds.compose_form_bounds(impl.form, base, lora, g, s)
    if impl.compose_bound is not None:
        got = impl.compose_bound(base.clone(), lora.clone(), g.clone(), s)
        pair = tuple(got) if isinstance(got, (tuple, list)) else (None, got)
        if len(pair) != 2:
            raise ValueError(f"compose_bound returned {len(pair)} values, want a y bound or (Δ bound, y bound)")
        out = []
        for what, b in zip(("Δ", "y"), pair):
            if b is not None and (not isinstance(b, torch.Tensor) or tuple(b.shape) != tuple(base.shape)):
                got = (
                    f"{str(b.dtype).replace('torch.', '')} {tuple(b.shape)}"
                    if isinstance(b, torch.Tensor)
                    else type(b).__name__
                )
                raise ValueError(
                    f"compose_bound's {what} bound must be a tensor of shape {tuple(base.shape)}, got {got}"
                )
            out.append(None if b is None else b.detach().to(device=base.device, dtype=torch.float64))
        return tuple(out)
    if impl.contract == "faithful":
        return None, ulp(y_exact, fmt)
    return None, None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def _check_tensor(kind: str, out, shape: tuple, dtype):
    """None if ``out`` is a floating tensor of ``shape`` (and ``dtype``), else the one-line reason."""
    if not isinstance(out, torch.Tensor):
        return f"{kind} returned {type(out).__module__}.{type(out).__qualname__}, want a torch.Tensor"
    if tuple(out.shape) != tuple(shape) or not out.is_floating_point() or (dtype is not None and out.dtype != dtype):
        want = f"{str(dtype).replace('torch.', '') if dtype is not None else 'a float tensor'} {tuple(shape)}"
        return f"{kind} returned {str(out.dtype).replace('torch.', '')} {tuple(out.shape)}, want {want}"
    return None


def call_impl(kind: str, fn, tensors, s: float, shape: tuple, dtype=None, pair: bool = False):
    """Run an implementation under test on its own copies of the inputs (the oracle's stay untouched).
    Returns (output, None), or (None, a one-line reason) when it raised or returned something other than a
    floating tensor of ``shape`` (and ``dtype``): a failed row of the report, not a crash of the sweep. ``pair``
    (compose): a tuple ``(y, Δ)`` is accepted too — the protocol of the package's own forms, Δ = (g − 1)·base +
    g·s·lora rounded to base's dtype, or None — and returned as ``(y, Δ or None)``."""
    try:
        out = fn(*(t.clone() for t in tensors), s)
        parts = tuple(out) if pair and isinstance(out, (tuple, list)) else (out,)
        if pair and len(parts) != (2 if isinstance(out, (tuple, list)) else 1):
            return None, f"{kind} returned a {type(out).__name__} of {len(parts)}, want y or (y, delta)"
        if len(parts) == 2 and parts[1] is None:  # (y, None): y without a Δ
            parts = parts[:1]
        for name, t in zip((kind, f"{kind}'s delta"), parts):
            why = _check_tensor(name, t, shape, dtype)
            if why:
                return None, why
        dev = tensors[0].device
        parts = tuple(t.detach().to(dev) for t in parts)
        return ((parts + (None,))[:2] if pair else parts[0]), None
    except Exception as e:  # noqa: BLE001 - the implementation's failure is a result to report
        return None, f"{kind} raised {_one_line(e)}"


def _failed_compose_row(extra: dict, name: str, reason: str, oracle: dict) -> dict:
    """A compose row whose implementation call (or its compose_bound) failed: the reason, no metrics."""
    return dict(
        extra,
        form=name,
        failed=reason,
        y=None,
        delta=None,
        g_eff_bias=None,
        g_eff_rms=None,
        g_correction_lost=None,
        g_correction_lost_floor=None,
        **oracle,
    )


def _compose_records(base, lora, g, s, extra: dict, impls=()) -> list:
    truth = compose_truth(base, lora, g, s)
    y_ref = Reference(truth.y_hi, truth.y_lo, truth.y_bound, truth.fmt, truth.y_round)
    d_ref = Reference(truth.d_hi, truth.d_lo, truth.d_bound, truth.fmt, truth.d_round)
    inner = base.to(torch.float64) + s * lora.to(torch.float64)  # exact (fp32-exact s, <= 48-bit products)
    gm1 = g.to(torch.float64) - 1
    g64, b_abs, sl_abs = g.to(torch.float64), base.to(torch.float64).abs(), (s * lora.to(torch.float64)).abs()
    y_terms = g64.abs() * (b_abs + sl_abs)  # the summands of g·base + g·s·lora
    d_terms = gm1.abs() * b_abs + g64.abs() * sl_abs  # of (g − 1)·base + g·s·lora
    # The correctly rounded output itself cannot carry a scale change below the format's resolution
    # everywhere (inputs on rounding midpoints always round one way): measure each form beyond that floor.
    beta_floor = effective_scale_error(truth.y_round.nearest, y_ref, inner)
    oracle = {"oracle_tier2_elements": truth.tier2_elements, "oracle_uncertified": truth.uncertified}
    recs = []
    form_bounds = bounds.compose_forms_bounds(list(F.COMPOSE_FORMS), base, lora, g, s)  # shared terms formed once
    for name, fn, impl in [(f.name, f.fn, None) for f in F.COMPOSE_FORMS.values()] + _impl_rows(impls, "compose"):
        if impl is not None:  # y, or (y, Δ): without a Δ its Δ columns stay empty
            out, failed = call_impl("compose", fn, (base, lora, g), s, base.shape, base.dtype, pair=True)
            y, d = out if out is not None else (None, None)
            if failed:
                recs.append(_failed_compose_row(extra, name, failed, oracle))
                continue
        else:
            y, d = fn(base, lora, g, s)
            if tuple(y.shape) != tuple(base.shape) or y.dtype != base.dtype:
                raise ValueError(
                    f"{name}: compose returned {y.dtype} {tuple(y.shape)}, want {base.dtype} {tuple(base.shape)}"
                )
        try:
            d_bound, y_bound = compose_row_bounds(name, impl, base, lora, g, s, y_ref.value, y_ref.fmt, form_bounds)
        except Exception as e:  # noqa: BLE001 - a user's compose_bound failing is that row's result
            recs.append(_failed_compose_row(extra, name, f"compose_bound failed: {_one_line(e)}", oracle))
            continue
        beta = effective_scale_error(y, y_ref, inner)
        hist = "regime" in extra  # the regime grid's records carry the ulp histograms (ulp_histogram.png)
        recs.append(
            dict(
                extra,
                form=name,
                y=_slim(_measure(y, y_ref, y_bound, terms=y_terms, histograms=hist), Y_KEYS),
                delta=None if d is None else _slim(_measure(d, d_ref, d_bound, terms=d_terms), D_KEYS),
                g_eff_bias=float(beta.mean()),
                g_eff_rms=float(beta.square().mean().sqrt()),
                g_correction_lost=correction_lost(beta - beta_floor, gm1),
                g_correction_lost_floor=correction_lost(beta_floor, gm1),
                **oracle,
            )
        )
    return recs


def correction_lost(beta: torch.Tensor, gm1: torch.Tensor):
    """Least-squares slope of −β on (g − 1) across output features: the fraction of the magnitude update
    the output lost (1 = all of it, 0 = none, < 0 = over-applied); None when g = 1 everywhere."""
    den = float((gm1 * gm1).sum())
    return None if den == 0 else float(-(beta * gm1).sum() / den)


def paper_metrics(approx: torch.Tensor, ref: Reference) -> dict:
    """max_abs, max_ulp and frac_correctly_rounded of :func:`metrics.compare` (the same definitions), without its
    other metrics — the paper point's 2048×8192 comparisons were a sixth of the CPU sweep. Non-finite values:
    compare."""
    a = approx.to(torch.float64)
    if not bool(torch.isfinite(a).all()):
        return compare(approx, ref)
    err = ((a - ref.hi) - ref.lo).abs()
    return {
        "max_abs": float(err.max()),
        "max_ulp": float((err / ulp(ref.value, ref.fmt)).max()),
        "frac_correctly_rounded": float((a == ref.rounded.nearest).sum()) / max(1, a.numel()),
    }


def paper_figure1(cfg: SweepConfig, gen_device) -> dict:
    """The paper's stability protocol at g = 1, reproduced, then re-measured against the exact Δ."""
    dt = parse_format(cfg.dtype).torch_dtype
    gen = torch.Generator().manual_seed(cfg.seed)
    lora64 = draw("normal", (cfg.tokens, cfg.d_out), gen).to(gen_device)
    base64 = draw("normal", (cfg.tokens, cfg.d_out), gen).to(gen_device)
    s = PAPER_SCALE
    ref_unrounded = s * lora64  # (g - 1) base + g s lora at g = 1, in float64 of the unrounded inputs
    lora, base = lora64.to(dt), base64.to(dt)
    del lora64, base64
    g = torch.ones(cfg.d_out, dtype=torch.float32, device=base.device)
    # At g = 1, Δ = (g − 1)·base + g·s·lora = s·lora, exact in float64 (an fp32 s times a bf16/fp16/fp32 lora: at
    # most 48 significant bits): what compose_truth's general path returns here (hi = s·lora, lo = 0, bound 0), at
    # a fraction of its CPU time (it was a third of the CPU sweep).
    fmt = parse_format(cfg.dtype)
    d_hi = lora.to(torch.float64) * s
    zero = torch.zeros_like(d_hi)
    d_ref = Reference(d_hi, zero, zero, fmt, certified_round(d_hi, zero, zero, fmt))
    floor_unrounded = float((ref_unrounded.to(dt).double() - ref_unrounded).abs().max())
    out = {"shape": [cfg.tokens, cfg.d_out], "s": s, "g": 1.0, "forms": {}}
    for name in ("naive", "stable_gcast", "naive_fp32", "stable_fp32"):  # the forms that output Δ
        _, d = F.COMPOSE_FORMS[name].fn(base, lora, g, s)
        vs_paper = float((d.double() - ref_unrounded).abs().max())
        exact = paper_metrics(d, d_ref)
        out["forms"][name] = {
            "max_abs_vs_unrounded_fp64": vs_paper,
            "max_abs_vs_exact": exact["max_abs"],
            "max_ulp_vs_exact": exact["max_ulp"],
            "frac_correctly_rounded": exact["frac_correctly_rounded"],
        }
    out["floor_unrounded"] = floor_unrounded
    out["floor_exact"] = float((d_ref.rounded.nearest - d_hi).abs().max())
    nf, sf = out["forms"]["naive"], out["forms"]["stable_gcast"]
    out["ratio_naive_over_stable_paper_protocol"] = ratio(
        nf["max_abs_vs_unrounded_fp64"], sf["max_abs_vs_unrounded_fp64"]
    )
    out["ratio_naive_over_stable_exact"] = ratio(nf["max_abs_vs_exact"], sf["max_abs_vs_exact"])
    return out


def compose_g_sweep(cfg: SweepConfig, device, tick, impls=()) -> list:
    case = make_case(
        "trained", cfg.d_out, cfg.d_in, cfg.rank, cfg.grid_tokens, cfg.dtype, cfg.seed, cfg.s, cfg.adapter_ratio, device
    )
    base, lora = case.compose_inputs()
    recs = []
    for delta in g_offsets(*cfg.g_grid, dtype=cfg.dtype):
        g32 = torch.tensor(1.0 + delta, dtype=torch.float32)
        g = g32.expand(cfg.d_out).contiguous().to(device)
        recs += _compose_records(
            base, lora, g, case.s, {"g_minus_1": float(g32.double() - 1.0), "g_offset_nominal": delta}, impls
        )
        tick(f"g-1={delta:+.1e}")
    return recs


def compose_regimes(cfg: SweepConfig, device, tick, impls=()) -> list:
    recs = []
    for regime in cfg.regimes:
        case = make_case(
            regime,
            cfg.d_out,
            cfg.d_in,
            cfg.rank,
            cfg.grid_tokens,
            cfg.dtype,
            cfg.seed,
            cfg.s,
            cfg.adapter_ratio,
            device,
        )
        base, lora = case.compose_inputs()
        recs += _compose_records(base, lora, case.g, case.s, {"regime": regime}, impls)
        tick(regime)
    return recs


def _norm_records(case, extra: dict, impls=()) -> list:
    truth = row_norm_truth(case.W, case.A, case.B, case.s)
    fp32 = parse_format("fp32")
    ref = Reference(
        truth.nu,
        torch.zeros_like(truth.nu),
        truth.bound,
        fp32,
        certified_round(truth.nu, torch.zeros_like(truth.nu), truth.bound, fp32),
    )
    oracle = dict(
        max_cond=float(truth.cond[torch.isfinite(truth.cond)].max()),
        oracle_tier2_rows=len(truth.tier2_rows),
        oracle_uncertified_rows=len(truth.uncertified_rows),
        oracle_max_rel_bound=float(truth.rel_bound.max()),
    )
    recs = []
    for name, fn, impl in [(f.name, f.fn, None) for f in F.NORM_FORMS.values()] + _impl_rows(impls, "norm"):
        if impl is not None:
            nu, failed = call_impl("norm", fn, (case.W, case.A, case.B), case.s, (case.W.shape[0],))
            if failed:
                recs.append(
                    dict(
                        extra,
                        form=name,
                        failed=failed,
                        nu_dtype=None,
                        **{k: None for k in N_KEYS},
                        p99_rel=None,
                        special_rows_max_rel=None,
                        **oracle,
                    )
                )
                continue
        else:
            nu = fn(case.W, case.A, case.B, case.s).to(case.W.device)
            if tuple(nu.shape) != (case.W.shape[0],):
                raise ValueError(f"{name}: norm returned shape {tuple(nu.shape)}, want ({case.W.shape[0]},)")
        m = _measure(nu, ref, rel_floor=1e-30)
        rel = (nu.double() - truth.nu).abs() / truth.nu.clamp_min(1e-30)
        special = case.special_rows
        recs.append(
            dict(
                extra,
                form=name,
                nu_dtype=str(nu.dtype).replace("torch.", ""),
                **_slim(m, N_KEYS),
                p99_rel=_p99(rel),
                special_rows_max_rel=float(rel[special].max()) if special else None,
                **oracle,
            )
        )
    return recs


def _p99(t: torch.Tensor) -> float:
    from .metrics import quantile

    return quantile(t[torch.isfinite(t)], 0.99)


def norm_regimes(cfg: SweepConfig, device, tick, impls=()) -> list:
    recs = []
    for regime in cfg.regimes:
        case = make_case(
            regime, cfg.d_out, cfg.d_in, cfg.rank, 1, cfg.dtype, cfg.seed, cfg.s, cfg.adapter_ratio, device
        )
        recs += _norm_records(case, {"regime": regime, "rank": cfg.rank}, impls)
        tick(regime)
    return recs


def norm_rank(cfg: SweepConfig, device, tick, impls=()) -> list:
    recs = []
    for r in cfg.ranks:
        s = scaling(2.0 * r, r, cfg.rslora)
        case = make_case("trained", cfg.d_out, cfg.d_in, r, 1, cfg.dtype, cfg.seed, s, cfg.adapter_ratio, device)
        recs += _norm_records(case, {"rank": r, "s": s}, impls)
        tick(f"r={r}")
    return recs


def _max_or_none(xs):
    return _worst(max, xs)


def _worst(fn, xs):
    """fn (min or max) of the values, NaN when any is NaN (min/max would skip it by order), None when empty."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return math.nan if any(x != x for x in xs) else fn(xs)


def _median_or_none(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


BELOW_RESOLUTION_LO = 1e-4  # smallest |g − 1| whose correction the per-row regression resolves above rounding noise


def headline(paper: dict, g_recs: list, dtype: str = "bf16", other_recs: list = ()) -> dict:
    """The numbers the report leads with; ``dtype``: the sweep's (its g resolution picks the sub-resolution points);
    ``other_recs``: the regime grid's records, which join the g sweep's in the bound-ratio summary."""
    h = {
        "paper_figure1": {
            k: paper[k]
            for k in (
                "ratio_naive_over_stable_paper_protocol",
                "ratio_naive_over_stable_exact",
                "floor_unrounded",
                "floor_exact",
            )
        }
    }
    h["paper_figure1"]["naive_max_abs_vs_unrounded"] = paper["forms"]["naive"]["max_abs_vs_unrounded_fp64"]
    h["paper_figure1"]["stable_max_abs_vs_unrounded"] = paper["forms"]["stable_gcast"]["max_abs_vs_unrounded_fp64"]
    # g rounding loss: points with 1e-4 <= |g - 1| < 2^-(p+1): g rounds to exactly 1 in the sweep's dtype, and the
    # correction is large enough for the per-row regression to resolve it above rounding noise
    thr = g_resolution(dtype)
    below = [r for r in g_recs if BELOW_RESOLUTION_LO <= abs(r["g_minus_1"]) < thr and not r.get("failed")]
    by_form = {}
    for r in below:
        by_form.setdefault(r["form"], []).append(r)
    loss = {}
    for form, rs in by_form.items():
        loss[form] = {
            "delta_normwise_rel_max": _max_or_none(x["delta"]["normwise_rel"] for x in rs if x["delta"]),
            "delta_normwise_rel_median": _median_or_none(x["delta"]["normwise_rel"] for x in rs if x["delta"]),
            "y_frac_correctly_rounded_min": _worst(min, (x["y"]["frac_correctly_rounded"] for x in rs)),
            "y_max_ulp_max": _worst(max, (x["y"]["max_ulp"] for x in rs)),
            "y_mean_signed_ulp_maxabs": _worst(max, (abs(x["y"]["mean_signed_ulp"]) for x in rs)),
            "y_nonfinite_max": max(x["y"]["nan"] + x["y"]["inf"] for x in rs),
            "g_correction_lost_min": _worst(min, (x["g_correction_lost"] for x in rs)),
            "g_correction_lost_max": _worst(max, (x["g_correction_lost"] for x in rs)),
        }
    h["below_resolution"] = {
        "dtype": dtype,
        "threshold": thr,
        "lo": BELOW_RESOLUTION_LO,
        "points": len({r["g_minus_1"] for r in below}),
        "by_form": loss,
    }
    h["bound_ratio"] = bound_summary(list(g_recs) + list(other_recs))
    at1 = {r["form"]: r for r in g_recs if r["g_minus_1"] == 0.0 and not r.get("failed")}
    if at1:
        h["g_equals_1"] = {
            f: {
                "y_max_ulp": r["y"]["max_ulp"],
                "y_frac_correctly_rounded": r["y"]["frac_correctly_rounded"],
                "delta_normwise_rel": r["delta"]["normwise_rel"] if r["delta"] else None,
            }
            for f, r in at1.items()
        }
    return h


def held_to(impl) -> str:
    """The bound a sweep row of ``impl`` is held to (:func:`compose_row_bounds`), in words; None: a package form."""
    if impl is None or impl.contract == "form":
        return "its derived bound (proofs/bounds.md)"
    if impl.contract == "kernel":
        return "the kernels' derived bound (proofs/bounds.md)"
    if impl.compose_bound is not None:
        return "its own compose_bound"
    return "1 ulp of the exact y (faithful)" if impl.contract == "faithful" else "no bound (baseline-only)"


def bound_summary(recs: list) -> dict:
    """Per form: the largest y and Δ error/bound ratios over ``recs`` (None where the form has no such bound) and
    how many of its rows exceed 1 — each form against the bound it is held to (:func:`compose_row_bounds`)."""
    out = {}
    for r in recs:
        if r.get("failed"):
            continue
        o = out.setdefault(r["form"], {"y_max": None, "delta_max": None, "rows": 0, "rows_over": 0})
        o["rows"] += 1
        over = False
        for key, m in (("y_max", r["y"]), ("delta_max", r["delta"])):
            v = (m or {}).get("bound_ratio")
            if v is not None:
                o[key] = v if o[key] is None else max(o[key], v)
                over = over or v > 1
        o["rows_over"] += over
    return out


def load_impls(specs, device="cpu") -> list:
    """The implementations named by ``--impl`` specs (one each: kernels, peft or module:callable); the forms are
    always in the sweep. 'kernels' are the production kernels at the tier this device runs in training: the fused
    Triton tier on CUDA (``kernels[fused]``), the float64 eager tier elsewhere (``kernels[eager]``; the CPU's Triton
    interpreter is a logic check, not a tier to measure). Raises ``adapter.ImplError`` (a ValueError) for anything
    else."""
    from .adapter import ImplError, kernels_impl, load_impl

    out = []
    for spec in specs:
        if spec == "kernels":
            out.append(kernels_impl(tier="fused" if torch.device(device).type == "cuda" else "eager"))
            continue
        if spec == "forms" or spec.startswith("form:"):
            raise ImplError(
                f"--impl {spec!r}: every form is in the sweep already; --impl takes kernels, peft or module:callable"
            )
        try:
            out += load_impl(spec)
        except ImplError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever breaks while loading it is the user's to see, in one line
            raise ImplError(f"--impl {spec!r}: cannot load it: {_one_line(e)}") from None
    return out


class SweepMemoryError(ValueError):
    """The sweep would need more memory than the device has available (a usage error: exit 2)."""


def estimate_peak_bytes(cfg: SweepConfig) -> int:
    """Upper estimate of a sweep's peak memory, in bytes, on either device::

        400 · max(tokens, grid_tokens) · d_out      activations: the float64 double-double compose oracle and metrics
      +  96 · d_out · d_in                          W: the float64 row-norm oracle, the dense norm forms
      +  32 · r · (d_out + d_in + r)                A, B, W·Aᵀ, A·Aᵀ at the largest rank r of --rank and --ranks
      + 256 MiB                                     fixed

    independent of --dtype (the oracle works in float64 whatever the inputs). The coefficients are measured
    peaks (CPU, resident set) rounded up: about 1.3-1.5× the peak of the default 8192×2048 sweep and of
    small ones; an --impl's own temporaries are not counted."""
    r = max([int(cfg.rank), *(int(x) for x in cfg.ranks)])
    t = max(int(cfg.tokens), int(cfg.grid_tokens))
    d_out, d_in = int(cfg.d_out), int(cfg.d_in)
    return 400 * t * d_out + 96 * d_out * d_in + 32 * r * (d_out + d_in + r) + 256 * 2**20


def available_bytes(device: torch.device):
    """(bytes available, where) for a new allocation: CUDA's free memory (``torch.cuda.mem_get_info``), else
    /proc/meminfo MemAvailable capped by a cgroup memory limit (``os.sysconf`` where there is no /proc);
    (None, where) when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0]), f"{torch.cuda.get_device_name(device)} ({device})"
    have = None
    try:
        with open("/proc/meminfo") as fh:
            have = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        try:
            have = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            pass
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit) as a, open(usage) as b:
                left = int(a.read().strip()) - int(b.read().strip())  # 'max' (no limit) raises ValueError
        except (OSError, ValueError):
            continue
        have = left if have is None else min(have, left)
        break
    return have, "this machine"


def check_memory(cfg: SweepConfig, device: torch.device) -> int:
    """Raise :class:`SweepMemoryError` (one line) when :func:`estimate_peak_bytes` exceeds what ``device``
    has available; return the estimate."""
    need = estimate_peak_bytes(cfg)
    have, where = available_bytes(device)
    if have is not None and need > have:
        gib = 2.0**30
        raise SweepMemoryError(
            f"a sweep of W {cfg.d_out}x{cfg.d_in} with {max(cfg.tokens, cfg.grid_tokens)} tokens needs about "
            f"{need / gib:.1f} GiB (estimate: sweep.estimate_peak_bytes) but {where} has {have / gib:.1f} GiB "
            "available: choose a smaller --shape, --tokens or --grid-tokens"
        )
    return need


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available else cpu; 'cuda' without a GPU raises ValueError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA device is available")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return torch.device(device)


@dataclass
class _Steps:
    total: int
    callback: object = None
    done: int = 0
    label: str = ""
    t0: float = field(default_factory=time.time)

    def __call__(self, what: str) -> None:
        self.done += 1
        if self.callback:
            self.callback(self.done, self.total, f"{self.label} {what}")


def run_sweep(cfg: SweepConfig, progress=None) -> dict:
    """Run every experiment; return the report dict (schema ``SCHEMA_VERSION``). ``progress`` is an
    optional callable(done, total, message)."""
    cfg.validate()
    dev = resolve_device(cfg.device)
    check_memory(cfg, dev)
    cfg.device = str(dev)
    torch.manual_seed(cfg.seed)
    n_g = len(g_offsets(*cfg.g_grid, dtype=cfg.dtype))
    extra = {name: experiment_module(name) for name in cfg.experiments}
    steps = _Steps(
        1 + n_g + 2 * len(cfg.regimes) + len(cfg.ranks) + sum(int(m.steps(cfg)) for m in extra.values()), progress
    )
    t0 = time.time()
    timings = {}

    def timed(name, fn, *args):
        steps.label = name
        t = time.time()
        out = fn(*args)
        timings[name] = round(time.time() - t, 2)
        return out

    impls = load_impls(cfg.impls, dev)
    paper = timed("paper_figure1", paper_figure1, cfg, dev)
    steps("done")
    g_recs = timed("compose_g_sweep", compose_g_sweep, cfg, dev, steps, impls)
    reg_recs = timed("compose_regimes", compose_regimes, cfg, dev, steps, impls)
    nreg = timed("norm_regimes", norm_regimes, cfg, dev, steps, impls)
    nrank = timed("norm_rank", norm_rank, cfg, dev, steps, impls)
    sections = {name: timed(name, mod.run, cfg, dev, steps) for name, mod in extra.items()}
    from .provenance import provenance

    cfg_dict = asdict(cfg)
    cfg_dict["s"] = cfg.s
    cfg_dict["ranks"] = list(cfg.ranks)
    cfg_dict["regimes"] = list(cfg.regimes)
    cfg_dict["impls"] = list(cfg.impls)
    cfg_dict["experiments"] = list(cfg.experiments)
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "dora-verify",
        "kind": "sweep",
        "provenance": provenance(dev, cfg.impls),
        "config": cfg_dict,
        "headline": headline(paper, g_recs, cfg.dtype, reg_recs),
        "experiments": {
            "paper_figure1": paper,
            "compose_g_sweep": g_recs,
            "compose_regimes": reg_recs,
            "norm_regimes": nreg,
            "norm_rank": nrank,
            **sections,
        },
        "forms": {
            "compose": {k: v.summary for k, v in F.COMPOSE_FORMS.items()},
            "norm": {k: v.summary for k, v in F.NORM_FORMS.items()},
        },
        "implementations": {
            f"impl:{im.name}": {
                "spec": spec,
                "compose": im.compose is not None,
                "norm": im.norm is not None,
                "layer": getattr(im, "layer", None) is not None,
                "held_to": held_to(im),
            }
            for spec, im in zip(cfg.impls, impls)
        },
        "regimes": dict(REGIMES),
        "timings_s": dict(timings, total=round(time.time() - t0, 2)),
    }


def failed_rows(rep: dict) -> list:
    """(experiment, row) of every implementation call that failed (rows with a ``failed`` reason), in the sweep's
    own record lists and in the rows of an experiment section (``{"rows": [...]}``, e.g. the layer experiment)."""
    out = []
    for name, rows in rep["experiments"].items():
        rows = rows.get("rows") if isinstance(rows, dict) else rows
        if isinstance(rows, list):
            out += [(name, r) for r in rows if isinstance(r, dict) and r.get("failed")]
    return out


def nan_to_none(obj):
    """JSON has no NaN/Inf: map them to None / strings so reports stay strict JSON."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [nan_to_none(v) for v in obj]
    return obj
