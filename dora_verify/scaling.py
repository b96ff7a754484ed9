"""Scaling: how each form's error grows with d_in, d_out, rank and tokens, against the bounds' growth.

``dora-verify sweep --experiments scaling``. One axis at a time is varied over powers of two and ragged sizes
(3·2^(k−1) + 1, between them) from ``AXIS_MIN`` up to the sweep's own size on that axis (d_in, d_out of
``--shape``; the largest of ``--rank``/``--ranks``; ``--tokens``); the other axes stay at the base point
(d_out = min(d_out, ``BASE_D_OUT``), d_in, rank = ``--rank``, tokens = min(--grid-tokens, ``BASE_TOKENS``)).
Every point is a trained-regime case (``cases.make_case('trained', ..., seed)``, the sweep's seed); along the
rank axis s = alpha/r with the sweep's alpha (default alpha = 2r: s = 2, as ``norm_rank``).

* **norm** (axes d_in, d_out, rank): every norm form of ``dora_verify.forms`` and the production
  ``kernels.factored_row_norm`` (the torch backend on CPU, the default on CUDA), relative error of ν per row
  against ``oracles.row_norm_truth``: max and rms over the rows. Overlaid: ``bounds.factored_norm_bound`` of the
  factored fp32 form relative to ν, max over the rows, worst case (γ_n·condition) and probabilistic
  (λ√n·u·condition).
* **compose** (every axis): every compose form and ``kernels.compose`` (the eager tier on CPU, the default on
  CUDA), ulp error of y against ``oracles.compose_truth`` of the same rounded base and lora: max and rms.

Growth exponents: ``fit_exponent`` fits log(error) = a + k·log(n) by least squares (``scipy.stats.linregress``)
over an axis' points; the worst-case bound grows like n (k = 1), the probabilistic one like √n (k = ½); an
elementwise op (the compose) has no n in its bound (k = 0; its maximum over more elements still creeps up).
"""

from __future__ import annotations

import math

import torch

from .formats import parse_format, ulp

AXES = ("d_in", "d_out", "rank", "tokens")
NORM_AXES = ("d_in", "d_out", "rank")
AXIS_MIN = {"d_in": 16, "d_out": 16, "rank": 1, "tokens": 1}
BASE_D_OUT = 256
BASE_TOKENS = 64
F64 = torch.float64


def sizes(lo: int, hi: int) -> list:
    """Powers of two from ``lo`` to ``hi``, the ragged sizes 3·2^(k−1) + 1 between them, and ``hi``; sorted."""
    out, p = set(), 1
    while p <= hi:
        if p >= lo:
            out.add(p)
        q = 3 * p // 2 + 1  # ragged: halfway between p and 2p, plus one
        if p >= 2 and lo <= q <= hi:
            out.add(q)
        p *= 2
    out.add(hi)
    return sorted(x for x in out if lo <= x <= hi) or [hi]


def grid(cfg) -> dict:
    """axis -> its sizes, and the base point, for a SweepConfig."""
    top = {"d_in": cfg.d_in, "d_out": cfg.d_out, "rank": max([cfg.rank, *cfg.ranks]), "tokens": cfg.tokens}
    base = {
        "d_in": cfg.d_in,
        "d_out": min(cfg.d_out, BASE_D_OUT),
        "rank": cfg.rank,
        "tokens": min(cfg.grid_tokens, BASE_TOKENS),
    }
    return {"axes": {a: sizes(min(AXIS_MIN[a], top[a]), top[a]) for a in AXES}, "base": base}


def steps(cfg) -> int:
    """Progress ticks of ``run``: one per point."""
    return sum(len(v) for v in grid(cfg)["axes"].values())


def fit_exponent(ns, errs) -> dict:
    """Least-squares k of log(err) = a + k·log(n) over the points with a finite positive error (scipy's
    ``linregress``): {'exponent', 'stderr', 'r2', 'points'}; exponent None with fewer than 3 points or a single n."""
    from scipy.stats import linregress

    pts = [
        (float(n), float(e))
        for n, e in zip(ns, errs)
        if e is not None and isinstance(e, (int, float)) and math.isfinite(e) and e > 0
    ]
    if len(pts) < 3 or len({n for n, _ in pts}) < 2:
        return {"exponent": None, "stderr": None, "r2": None, "points": len(pts)}
    fit = linregress([math.log(n) for n, _ in pts], [math.log(e) for _, e in pts])
    return {"exponent": float(fit.slope), "stderr": float(fit.stderr), "r2": float(fit.rvalue**2), "points": len(pts)}


def _kernels(device):
    """(norm, compose, labels, note) of the production kernels, or Nones and the reason they cannot run."""
    try:
        from .kernels import compose, factored_row_norm
    except Exception as e:  # noqa: BLE001 - a missing or broken kernels package is a line of the report
        return None, None, {}, f"kernels unavailable: {type(e).__name__}: {e}"
    cuda = device.type == "cuda"
    backend, tier = (None, None) if cuda else ("torch", "eager")

    def norm(W, A, B, s):
        return factored_row_norm(W, A, B, s, backend=backend)

    def comp(base, lora, g, s):
        return compose(base, lora, g, s, tier=tier)

    labels = {
        "norm": f"kernel:factored_row_norm[{backend or 'default'}]",
        "compose": f"kernel:compose[{tier or 'default'}]",
    }
    return norm, comp, labels, None


def _stats(err: torch.Tensor) -> dict:
    """max and rms of an error tensor; a NaN/Inf error (a non-finite output) makes both inf, never hidden."""
    if err.numel() == 0:
        return {"max": None, "rms": None}
    if not bool(torch.isfinite(err).all()):
        return {"max": math.inf, "rms": math.inf}
    return {"max": float(err.max()), "rms": float(err.square().mean().sqrt())}


def _norm_point(case, kernel_norm, label) -> dict:
    """Relative error of ν per row (max, rms) of every norm form and the kernel; the two bounds, max over rows."""
    from . import forms as F
    from .bounds import factored_norm_bound
    from .oracles import row_norm_truth

    truth = row_norm_truth(case.W, case.A, case.B, case.s)
    nu = truth.nu
    ok = nu > 0
    fns = [(f.name, f.fn) for f in F.NORM_FORMS.values()] + ([(label, kernel_norm)] if kernel_norm else [])
    out = {}
    for name, fn in fns:
        est = fn(case.W, case.A, case.B, case.s).to(F64).to(nu.device)
        out[name] = _stats(((est - nu).abs() / nu)[ok])
    bounds = {}
    for kind in ("worst", "probabilistic"):
        b = factored_norm_bound(case.W, case.A, case.B, case.s, nu, kind=kind)
        bounds[kind] = float((b / nu)[ok].max()) if bool(ok.any()) else None
    return {"forms": out, "bounds": bounds, "max_cond": float(truth.cond[torch.isfinite(truth.cond)].max())}


def _compose_point(case, kernel_compose, label) -> dict:
    """ulp error of y (max, rms) of every compose form and the kernel against the exact y of the same inputs."""
    from . import forms as F
    from .oracles import compose_truth

    base, lora = case.compose_inputs()
    truth = compose_truth(base, lora, case.g, case.s)
    fmt = parse_format(base.dtype)
    u = ulp(truth.y_hi + truth.y_lo, fmt)
    fns = [(f.name, lambda b, l_, g, s, fn=f.fn: fn(b, l_, g, s)[0]) for f in F.COMPOSE_FORMS.values()]
    fns += [(label, kernel_compose)] if kernel_compose else []
    out = {}
    for name, fn in fns:
        y = fn(base, lora, case.g, case.s).to(F64)
        out[name] = _stats(((y - truth.y_hi) - truth.y_lo).abs() / u)
    return {"forms": out}


def run(cfg, device, tick) -> dict:
    """The scaling experiment on ``grid(cfg)`` (module docstring); JSON-ready."""
    from .cases import make_case

    gr = grid(cfg)
    kn, kc, labels, note = _kernels(device)
    points = []
    for axis in AXES:
        for n in gr["axes"][axis]:
            shape = dict(gr["base"], **{axis: n})
            case = make_case(
                "trained",
                shape["d_out"],
                shape["d_in"],
                shape["rank"],
                shape["tokens"],
                cfg.dtype,
                cfg.seed,
                cfg.s if axis != "rank" else _s_for(cfg, n),
                cfg.adapter_ratio,
                device,
            )
            pt = {"axis": axis, "n": n, "shape": shape, "s": case.s}
            if axis in NORM_AXES:
                pt["norm"] = _norm_point(case, kn, labels.get("norm"))
            pt["compose"] = _compose_point(case, kc, labels.get("compose"))
            points.append(pt)
            tick(f"{axis}={n}")
    return {
        "seeds": {"cases": int(cfg.seed), "note": "every point: cases.make_case('trained', ..., seed)"},
        "grid": gr,
        "dtype": cfg.dtype,
        "kernels": labels or None,
        "kernels_note": note,
        "points": points,
        "fits": fits(points),
    }


def _s_for(cfg, rank: int) -> float:
    """s at another rank: the sweep's alpha (default 2·rank: s = 2) over that rank (√rank with rsLoRA)."""
    from .cases import scaling as lora_scaling

    alpha = cfg.alpha if cfg.alpha is not None else 2.0 * cfg.rank
    return lora_scaling(alpha * (rank / cfg.rank if cfg.alpha is None else 1.0), rank, cfg.rslora)


def fits(points: list) -> list:
    """Growth exponents of every (family, axis, form) and of the two norm bounds."""
    out = []
    for family in ("norm", "compose"):
        for axis in AXES:
            pts = [p for p in points if p["axis"] == axis and family in p]
            if not pts:
                continue
            ns = [p["n"] for p in pts]
            for form in pts[0][family]["forms"]:
                mx = [p[family]["forms"][form]["max"] for p in pts]
                rms = [p[family]["forms"][form]["rms"] for p in pts]
                out.append(
                    {
                        "family": family,
                        "axis": axis,
                        "form": form,
                        "n": [ns[0], ns[-1]],
                        "first": mx[0],
                        "last": mx[-1],
                        "max": fit_exponent(ns, mx),
                        "rms": fit_exponent(ns, rms),
                    }
                )
            if family == "norm":
                for kind in ("worst", "probabilistic"):
                    b = [p["norm"]["bounds"][kind] for p in pts]
                    out.append(
                        {
                            "family": family,
                            "axis": axis,
                            "form": f"bound:{kind}",
                            "n": [ns[0], ns[-1]],
                            "first": b[0],
                            "last": b[-1],
                            "max": fit_exponent(ns, b),
                            "rms": None,
                        }
                    )
    return out


# ----------------------------------------------------------------------------- report section
def _exp(f):
    if not f or f.get("exponent") is None:
        return "–"
    return f"{f['exponent']:.2f} ± {f['stderr']:.2f}"


def markdown(section: dict, plots=()) -> str:
    """The report.md section of ``run``'s result."""
    from .report import _table

    gr = section["grid"]
    b = gr["base"]
    L = [
        f"Trained regime, {section['dtype']}, seed {section['seeds']['cases']}. Base point d_out = {b['d_out']}, "
        f"d_in = {b['d_in']}, rank = {b['rank']}, tokens = {b['tokens']}; each axis varied alone: "
        + "; ".join(f"{a} ∈ {{{', '.join(map(str, v))}}}" for a, v in gr["axes"].items())
        + ".",
        "",
        "Norm: relative error of ν per row (max over rows); bounds: `bounds.factored_norm_bound` of factored_fp32 "
        "relative to ν, max over rows (worst case γ_n·condition; probabilistic λ√n·u·condition). Compose: ulp "
        "error of y (max over elements). Exponent k of error ∝ n^k, least squares on log–log over the axis' "
        "points (± standard error); rms: the same fit of the rms error.",
        "",
    ]
    if section.get("kernels_note"):
        L += [section["kernels_note"], ""]
    rows = [
        [
            f["family"],
            f["axis"],
            f["form"],
            f"{f['n'][0]}–{f['n'][1]}",
            f["first"],
            f["last"],
            _exp(f["max"]),
            _exp(f["rms"]),
        ]
        for f in section["fits"]
    ]
    L.append(
        _table(
            ["family", "axis", "form", "n", "error at min n", "error at max n", "exponent (max)", "exponent (rms)"],
            rows,
        )
    )
    L += [f"\n![{p}]({p})" for p in plots if p.startswith("scaling")]
    return "\n".join(L) + "\n"


def plots(section: dict, folder) -> list:
    """scaling_norm.png (ν error vs d_in, d_out, rank, bounds dashed) and scaling_compose.png (y ulp error)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    from .report import _finite

    pts = section["points"]
    paths = []
    for family, axes, ylabel in (
        ("norm", NORM_AXES, "max relative error of ν"),
        ("compose", AXES, "max ulp error of y"),
    ):
        fig, axs = plt.subplots(1, len(axes), figsize=(5.2 * len(axes), 4.4))
        for ax, axis in zip(axs, axes):
            ps = [p for p in pts if p["axis"] == axis and family in p]
            if not ps:
                continue
            ns = [p["n"] for p in ps]
            for form in ps[0][family]["forms"]:
                ax.plot(ns, [_finite(p[family]["forms"][form]["max"], 1e-17) for p in ps], marker=".", label=form)
            if family == "norm":
                for kind, ls in (("worst", "--"), ("probabilistic", ":")):
                    ax.plot(
                        ns,
                        [_finite(p["norm"]["bounds"][kind], 1e-17) for p in ps],
                        "k" + ls,
                        label=f"bound of factored_fp32: {kind}",
                    )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(axis)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        axs[0].legend(fontsize=7)
        fig.suptitle(f"Error scaling — {family}, {section['dtype']}")
        fig.tight_layout()
        paths.append(Path(folder) / f"scaling_{family}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
