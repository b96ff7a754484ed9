"""The whole DoRA layer against the exact layer oracle: ``dora-verify sweep --experiments layer``.

Each implementation's layer is built by its factory (:func:`dora_verify.adapter.build_layer`, the protocol the gate
uses): this project's ``DoRALinear`` (``kernels``; the eager compose tier on CPU), stock PEFT's DoRA Linear
(``peft``) and every ``--impl`` that carries a layer factory. Every layer runs ``y = layer(x)``, ``y.backward(dy)``
on its own copies of the case's tensors, and y, dx, dA, dB, dm are graded against
:func:`dora_verify.layer_oracle.layer_truth` (ν detached) exactly as the gate grades its layer cases:

* **max ulp**: max over elements of (|computed − exact| − oracle bound)⁺ / ulp(exact) in the output's format;
* **max rel**: the same error over |exact|, max over the elements with |exact| ≥ ``REL_FLOOR``·max|exact| (the
  near-zero elements of a sum with random signs say nothing about the layer);
* **bound ratio**: max of error / bound, where the bound is that of DoRALinear's stated steps
  (:func:`layer_oracle.layer_step_bounds` of :func:`layer_oracle.kernel_layer_steps`) for ``kernels`` and the
  faithful layer contract (:func:`layer_oracle.faithful_layer_bounds`) for the others: ≤ 1 is within the bound.

Grid (its own constants, independent of ``--shape``): d_out ``D_OUT``, d_in ``D_IN``, rank ``RANK``, ``TOKENS``
tokens, alpha ``ALPHA`` (s = alpha/r); the dtype mixes of ``MIXES`` (bf16 W with fp32 adapters — PEFT's default
autocast_adapter_dtype —, all bf16, fp16, fp32) and the regimes of ``REGIMES`` (layer_oracle.LAYER_REGIMES); the
cases are :func:`layer_oracle.layer_example` at seed = the sweep's ``--seed`` (bias on). For DoRALinear, the
error of y is also decomposed by step (:func:`layer_oracle.error_decomposition` of
:func:`layer_oracle.doralinear_parts`): the max |share| in ulp of y that each of base, xa, lora, norm, scale and
compose adds, beside the total.
"""

from __future__ import annotations

import math

import numpy as np
import torch

D_OUT, D_IN, RANK, TOKENS, ALPHA = 256, 512, 16, 32, 32.0
MIXES = {
    "bf16 W + fp32 adapters": ("bf16", "fp32"),
    "bf16": ("bf16", "bf16"),
    "fp16": ("fp16", "fp16"),
    "fp32": ("fp32", "fp32"),
}
REGIMES = ("exact_one", "trained", "cancel", "zero_rows", "large")
REGIME_LABELS = {
    "exact_one": "g = 1",
    "trained": "trained",
    "cancel": "near-cancelling rows",
    "zero_rows": "zero rows",
    "large": "large activations",
}
OUTPUTS = ("y", "dx", "dA", "dB", "dm")
DECOMP_STEPS = ("base", "xa", "lora", "norm", "scale", "compose")
REL_FLOOR = 1e-3
F64 = torch.float64


def grid(cfg=None, **over) -> dict:
    """The experiment's grid (``over`` replaces entries: tests use a tiny one)."""
    g = {
        "d_out": D_OUT,
        "d_in": D_IN,
        "rank": RANK,
        "tokens": TOKENS,
        "alpha": ALPHA,
        "mixes": list(MIXES),
        "regimes": list(REGIMES),
    }
    g.update(over)
    return g


def layer_impls(cfg, device) -> list:
    """(label, Implementation) of every layer under test: kernels (DoRALinear), peft, and the ``--impl`` specs of
    ``cfg.impls`` that carry a layer factory (a spec without one is left out)."""
    from .adapter import kernels_impl, load_impl

    out = [("kernels", kernels_impl(None if device.type == "cuda" else "eager"))]
    try:
        out.append(("peft", load_impl("peft")[0]))
    except Exception:  # noqa: BLE001 - no peft installed: the section says so (its rows are absent)
        pass
    for spec in getattr(cfg, "impls", ()) or ():
        if spec in ("kernels", "peft") or spec == "forms" or spec.startswith("form:"):
            continue
        for im in load_impl(spec):
            if im.layer is not None:
                out.append((f"impl:{im.name}", im))
    return out


def _examples(gr: dict, seed: int) -> list:
    from .layer_oracle import layer_example

    out = []
    for mix in gr["mixes"]:
        act, adapter = MIXES[mix]
        for regime in gr["regimes"]:
            out.append(
                (
                    mix,
                    regime,
                    layer_example(
                        act,
                        adapter,
                        gr["tokens"],
                        gr["d_out"],
                        gr["d_in"],
                        gr["rank"],
                        gr["alpha"],
                        regime,
                        seed,
                        bias=True,
                    ),
                )
            )
    return out


def _metrics(got, hi, lo, ob, bnd) -> dict:
    from .formats import parse_format, ulp
    from .metrics import excess_error

    ref = hi + lo
    fmt = parse_format(got.dtype)
    in_range = ref.abs() <= fmt.max_finite
    ok = in_range & torch.isfinite(got.to(F64))
    err = torch.where(ok, excess_error(got, hi, lo, ob), torch.zeros_like(ref))
    nonfinite = int((~torch.isfinite(got.to(F64)) & in_range).sum())
    out = {"max_ulp": float((err / ulp(ref, fmt)).max()) if err.numel() else 0.0}
    mag = ref.abs()
    sel = mag >= REL_FLOOR * float(mag.max()) if mag.numel() and float(mag.max()) > 0 else mag > 0
    out["max_rel"] = float((err[sel] / mag[sel]).max()) if bool(sel.any()) else 0.0
    if bnd is not None:
        ratios = torch.where(err == 0, torch.zeros_like(err), err / bnd)[in_range]
        out["max_ratio"] = float(ratios.max()) if ratios.numel() else 0.0
    else:
        out["max_ratio"] = None
    out["nonfinite"] = nonfinite
    return out


def _score(impl, ex, tr, device) -> "tuple[dict, object]":
    """{output: metrics} of one layer on one case (module docstring), and the module (for the decomposition)."""
    from .gate import _layer_norm_steps
    from .layer_oracle import faithful_layer_bounds, kernel_layer_steps, layer_step_bounds

    t, sc = ex.tensors, ex.scalars
    from .gate import run_layer

    got, module = run_layer(impl, ex, device)
    if impl.contract == "kernel":
        backend, dense = _layer_norm_steps(t, sc["s"], device)
        steps = kernel_layer_steps(ex.dtype, ex.params["adapter"], backend, dense)
        bnd = layer_step_bounds(
            steps, t["x"], t["W"], t["A"], t["B"], t["m"], sc["s"], t.get("bias"), sc["eps"], t["dy"], tr
        )
    elif impl.contract == "faithful":
        bnd = faithful_layer_bounds(
            tr,
            t["x"],
            t["W"],
            t["A"],
            t["B"],
            sc["s"],
            t.get("bias"),
            t["dy"],
            ex.dtype,
            got["dA"].dtype,
            got["dm"].dtype,
        )
    else:
        bnd = None
    zero = torch.zeros((), dtype=F64)
    out = {}
    for name in OUTPUTS:
        if name == "y":
            hi, lo, ob = tr.y_hi, tr.y_lo, tr.y_bound
        else:
            (hi, ob), lo = tr.grads[name], zero
        out[name] = _metrics(got[name], hi, lo, ob, None if bnd is None else bnd[name])
    return out, module


def steps(cfg, gr: "dict | None" = None) -> int:
    """Progress ticks of ``run``: one per (mix, regime) case."""
    gr = gr or grid(cfg)
    return len(gr["mixes"]) * len(gr["regimes"])


def run(cfg, device, tick, gr: "dict | None" = None) -> dict:
    """The layer experiment (module docstring); JSON-ready. ``gr``: another grid (:func:`grid`), for tests."""
    from .adapter import CaseGuard, crash_reason
    from .layer_oracle import doralinear_parts, error_decomposition, layer_truth

    gr = gr or grid(cfg)
    impls = layer_impls(cfg, device)
    rows, decomp = [], []
    for mix, regime, ex in _examples(gr, int(cfg.seed)):
        t, sc = ex.tensors, ex.scalars
        tr = layer_truth(t["x"], t["W"], t["A"], t["B"], t["m"], sc["s"], t.get("bias"), sc["eps"], dy=t["dy"])
        for label, im in impls:
            if ex.dtype not in im.dtypes:
                continue
            row = {
                "impl": label,
                "mix": mix,
                "regime": regime,
                "contract": im.contract,
                "bound": {"kernel": "stated steps", "faithful": "faithful layer"}.get(im.contract, "none"),
            }
            guard = CaseGuard()
            try:
                with guard, np.errstate(all="ignore"):
                    metrics, module = _score(im, ex, tr, device)
                row["outputs"] = metrics
            except BaseException as e:  # noqa: BLE001 - a failing layer is a row of the report, in one line
                if guard.interrupted:
                    raise
                row["failed"] = crash_reason(e)
                module = None
            rows.append(row)
            if label == "kernels" and module is not None:
                x = t["x"].to(device, copy=True)
                parts = doralinear_parts(module, x)
                d = error_decomposition(tr, parts, t["m"], sc["s"], t["B"], t.get("bias"))
                decomp.append(
                    {
                        "mix": mix,
                        "regime": regime,
                        "ulp": {k: d["ulp"][k] for k in (*DECOMP_STEPS, "total", "cross")},
                        "residual_ulp": float((d["residual"].abs() / _ulp_y(tr)).max()),
                    }
                )
        tick(f"{mix} {regime}")
    return {
        "grid": gr,
        "seeds": {"cases": int(cfg.seed)},
        "device": str(device),
        "impls": [label for label, _ in impls],
        "rows": rows,
        "decomposition": decomp,
        "regime_notes": {k: REGIME_LABELS[k] for k in gr["regimes"]},
    }


def _ulp_y(tr):
    from .formats import ulp

    return ulp(tr.y, tr.fmt)


def max_ratio(section: dict, impl: str) -> float:
    """The largest bound ratio of ``impl`` over every row and output (inf for a failed row or a NaN/Inf where the
    exact value is finite)."""
    worst = 0.0
    for r in section["rows"]:
        if r["impl"] != impl:
            continue
        if r.get("failed"):
            return math.inf
        for m in r["outputs"].values():
            v = math.inf if m.get("nonfinite") else m["max_ratio"]
            worst = max(worst, math.inf if v is None or (isinstance(v, float) and math.isnan(v)) else v)
    return worst


def _num(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if v == 0:
        return "0"
    if not math.isfinite(v):
        return str(v)
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"


def _ratio(v) -> str:
    s = _num(v)
    return f"**{s}**" if isinstance(v, (int, float)) and v is not None and v > 1 else s


def markdown(section: dict, plots=()) -> str:
    """The report.md section: one table per dtype mix (every layer × regime; y and each gradient's max ulp, max
    relative error and bound ratio), then DoRALinear's decomposition of y's error by step."""
    from .report import _table

    gr = section["grid"]
    L = [
        f"Whole layer y = g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + bias and its gradients dx, dA, dB, dm (ν detached) against the "
        f"exact layer oracle (`layer_oracle.layer_truth`). Grid: d_out = {gr['d_out']}, d_in = {gr['d_in']}, "
        f"rank = {gr['rank']}, tokens = {gr['tokens']}, alpha = {gr['alpha']:g} (s = {gr['alpha'] / gr['rank']:g}), "
        f"bias on; cases `layer_oracle.layer_example(..., seed={section['seeds']['cases']})`; device "
        f"{section['device']}. Layers: {', '.join(f'`{i}`' for i in section['impls'])}.",
        "",
        "Each cell: max ulp / max rel / bound ratio. max ulp: max (|computed − exact| − oracle bound)⁺ / ulp(exact); "
        f"max rel: the same error / |exact| over elements with |exact| ≥ {REL_FLOOR:g}·max|exact|; bound ratio: "
        "max error / bound — the bound of DoRALinear's stated steps for `kernels`, the faithful layer contract "
        "(`faithful_layer_bounds`) for the others; **bold** above 1 (outside the bound). NaN/Inf: elements the layer "
        "returned non-finite where the exact value is finite (left out of the three numbers).",
        "",
    ]
    for mix in gr["mixes"]:
        L += [f"**{mix}**", ""]
        rows = []
        for r in section["rows"]:
            if r["mix"] != mix:
                continue
            head = [r["impl"], REGIME_LABELS.get(r["regime"], r["regime"])]
            if r.get("failed"):
                rows.append(head + [f"failed: {r['failed']}"] + [""] * (len(OUTPUTS) - 1))
                continue
            rows.append(
                head
                + [
                    " / ".join((_num(m["max_ulp"]), _num(m["max_rel"]), _ratio(m["max_ratio"])))
                    + (f" **({m['nonfinite']} NaN/Inf)**" if m.get("nonfinite") else "")
                    for m in (r["outputs"][o] for o in OUTPUTS)
                ]
            )
        L += [_table(["layer", "regime", *OUTPUTS], rows), ""]
    if section["decomposition"]:
        L += [
            "**DoRALinear: the error of y by step** (`layer_oracle.error_decomposition`): max |share| in ulp of y "
            "each step adds with every other step exact — base = x Wᵀ, xa = x Aᵀ, lora = xa Bᵀ (their roundings), "
            "norm = ν̂, scale = g = RN₃₂(m / ν̂), compose = the epilogue's rounding of y; total = the measured "
            "error; cross = the second-order (ĝ − g)(ĥ − h).",
            "",
        ]
        rows = [
            [
                d["mix"],
                REGIME_LABELS.get(d["regime"], d["regime"]),
                *(_num(d["ulp"][k]) for k in (*DECOMP_STEPS, "total", "cross")),
            ]
            for d in section["decomposition"]
        ]
        L += [_table(["mix", "regime", *DECOMP_STEPS, "total", "cross"], rows), ""]
    return "\n".join(L)


__all__ = [
    "D_IN",
    "D_OUT",
    "MIXES",
    "RANK",
    "REGIMES",
    "TOKENS",
    "grid",
    "layer_impls",
    "markdown",
    "max_ratio",
    "run",
    "steps",
]
