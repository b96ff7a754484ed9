"""``dora-verify explain CASE``: a corpus case's (or a gate case's) worst element, exactly.

For a case that ``certify`` kept (``CASE.json`` with its ``.npz``) — or a case of the gate's suite named by its id
(``compose-bf16-03``: the kernels' y on its inputs; ``norm-fp16-03``: their ν) — the implementation is run again on the
case's inputs and the element with the largest error-to-bound ratio is shown with everything needed to check it by
hand: the element's inputs as stored (and as exact rationals m / 2^k), the exact result of those rounded inputs as a
rational (compose y and Δ: g·(base + s·lora) + bias and (g − 1)·base + g·s·lora, every input a binary float, so the
result is a finite sum of products of dyadic rationals — exact; the row norm: ν² exact, ν = √ν² to 40 digits by
mpmath), the value the implementation returned, its error exactly and in ulps of the exact value, the a-priori
bound of ``dora_verify.bounds`` at that element and the ratio error / bound (the number certify ranks by; > 1 is a
violation).

Targets: ``compose.y``, ``compose.delta``, ``form.NAME`` (y and Δ), ``lora_compose``, ``norm``, and
``compose.backward``: the kernels' d_base = g·dy, d_lora = g·s·dy (activation dtype) and d_g = Σ_t dy·(base + s·lora)
(fp32; exact as a sum of T dyadic products) under both save modes, each output's worst element. The other targets
(the scale and the layer's) have no single-element story yet and are refused with that reason (exit 2 on the CLI).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from . import bounds
from .certify_targets import _target_table, default_tier
from .corpus import load_case
from .exact import compose_exact, round_fraction
from .formats import parse_format
from .oracles import compose_truth, row_norm_truth

F64 = torch.float64
SUPPORTED = ("compose.y", "compose.delta", "compose.backward", "form.*", "lora_compose", "norm")


class ExplainError(ValueError):
    """The case cannot be explained (unsupported target, unreadable file): a usage error."""


def dyadic(x: float) -> str:
    """An exact binary float as 'n / 2^k' (or 'n · 2^k', or 'n')."""
    f = Fraction(x)
    den = f.denominator
    k = den.bit_length() - 1
    if f.numerator == 0:
        return "0"
    if den == 1:
        n, e = f.numerator, 0
        while n % 2 == 0:
            n //= 2
            e += 1
        return f"{n} · 2^{e}" if e else str(n)
    return f"{f.numerator} / 2^{k}"


def _digits(f: Fraction, n: int = 20) -> str:
    import mpmath

    with mpmath.workdps(n + 10):
        return mpmath.nstr(mpmath.mpf(f.numerator) / f.denominator, n)


def _ulp(value: float, fmt) -> float:
    """Goldberg's ulp of ``value`` in ``fmt`` (the spacing of its grid in value's binade; subnormal spacing below)."""
    from .formats import ulp

    return float(ulp(torch.tensor([value], dtype=F64), fmt)[0])


def _worst(got: torch.Tensor, exact64: torch.Tensor, bound: torch.Tensor) -> tuple:
    err = (got.to(F64) - exact64).abs()
    ratio = torch.where(err == 0, torch.zeros_like(err), err / bound.to(F64))
    k = int(torch.nan_to_num(ratio, nan=math.inf).flatten().argmax())
    return (divmod(k, got.shape[-1]) if got.dim() == 2 else (k,)), float(ratio.flatten()[k])


def _element(name, got, exact: Fraction, bound: float, fmt, where, inputs: dict) -> dict:
    g = float(got)
    err = Fraction(g) - exact if math.isfinite(g) else None
    ex_f = float(exact)
    u = _ulp(ex_f, fmt)
    return {
        "output": name,
        "index": list(where),
        "inputs": inputs,
        "exact": {
            "rational": f"{exact.numerator} / {exact.denominator}" if exact.denominator != 1 else str(exact.numerator),
            "digits": _digits(exact),
        },
        "got": {"value": g, "exact": dyadic(g) if math.isfinite(g) else str(g)},
        "error": None
        if err is None
        else {"exact": f"{err.numerator} / {err.denominator}", "value": float(err), "ulp": abs(float(err)) / u},
        "ulp_of_exact": u,
        "bound": bound,
        "ratio": None if err is None else (0.0 if err == 0 else abs(float(err)) / bound),
        "correctly_rounded_value": round_exact(exact, fmt),
    }


def round_exact(x: Fraction, fmt) -> float:
    """RN_fmt(x) of an exact rational (:func:`dora_verify.exact.round_fraction`: ties to even, subnormals, ±inf on
    overflow) — one rounding, no float64 detour (whose double rounding would get ties like 8224.00003 → bf16 wrong)."""
    return round_fraction(x, fmt)[2]


def _f(t: torch.Tensor, *idx) -> Fraction:
    return Fraction(float(t[idx].to(F64)))


def _input(t: torch.Tensor, *idx) -> dict:
    v = float(t[idx].to(F64))
    return {"value": v, "exact": dyadic(v), "dtype": str(t.dtype).replace("torch.", "")}


def _compose_outputs(target: str, ex, k, device, tier) -> list:
    """(name, got, exact64, bound, exact(t, i) -> Fraction, inputs(t, i) -> dict) per output of a compose target."""
    from .kernels import compose

    t, s = ex.tensors, ex.scalars["s"]
    base, lora, g, bias = t["base"], t["lora"], t["g"], t.get("bias")
    gm1 = t.get("g_minus_1") if target == "compose.delta" else None

    def exact(ti, i):  # (y, Δ) of the element, exactly (dora_verify.exact.compose_exact)
        return compose_exact(
            float(base[ti, i]),
            float(lora[ti, i]),
            float(g[i]),
            s,
            float(bias[i]) if bias is not None else 0.0,
            float(gm1[i]) if gm1 is not None else None,
        )

    def y_exact(ti, i):
        return exact(ti, i)[0]

    def d_exact(ti, i):
        return exact(ti, i)[1]

    def inputs(ti, i):
        out = {"base": _input(base, ti, i), "lora": _input(lora, ti, i), "g": _input(g, i), "s": s}
        if bias is not None:
            out["bias"] = _input(bias, i)
        if gm1 is not None:
            out["g_minus_1"] = _input(gm1, i)
        return out

    tr = compose_truth(base, lora, g, s, bias if target != "compose.delta" else None, g_minus_1=gm1)
    if target == "compose.y":
        y = compose(k["base"], k["lora"], k["g"], s, k.get("bias"), tier=tier).cpu()
        _, by = bounds.compose_kernel_bounds(base, lora, g, s, bias)
        return [("y", y, tr.y_hi + tr.y_lo, by, y_exact, inputs)]
    if target == "compose.delta":
        d = compose(k["base"], k["lora"], k["g"], s, g_minus_1=k["g_minus_1"], output="delta", tier=tier).cpu()
        bd, _ = bounds.compose_kernel_bounds(base, lora, g, s, g_minus_1=gm1)
        return [("delta", d, tr.d_hi + tr.d_lo, bd, d_exact, inputs)]
    from .forms import COMPOSE_FORMS

    name = target.split(".", 1)[1]
    y, d = (x.cpu() for x in COMPOSE_FORMS[name].fn(k["base"], k["lora"], k["g"], s, k.get("bias")))
    bd, by = bounds.compose_form_bounds(name, base, lora, g, s, bias)
    return [("y", y, tr.y_hi + tr.y_lo, by, y_exact, inputs), ("delta", d, tr.d_hi + tr.d_lo, bd, d_exact, inputs)]


def _compose_backward_outputs(ex, k, tier) -> list:
    """The compose backward's outputs (save 'inputs' and 'activation'), as :func:`_compose_outputs` plus each
    output's format: d_base and d_lora in the activation dtype, d_g in fp32."""
    from .certify_targets import _compose_grads
    from .oracles import compose_grad_truth

    t, s = ex.tensors, ex.scalars["s"]
    dy, base, lora, g = t["dy"], t["base"], t["lora"], t["g"]
    gt = compose_grad_truth(dy, base, lora, g, s)
    fs, act, f32 = Fraction(s), parse_format(ex.dtype), parse_format("fp32")

    def d_base(ti, i):
        return _f(g, i) * _f(dy, ti, i)

    def d_lora(ti, i):
        return _f(g, i) * fs * _f(dy, ti, i)

    def d_g(i):
        return sum((_f(dy, ti, i) * (_f(base, ti, i) + fs * _f(lora, ti, i)) for ti in range(dy.shape[0])), Fraction(0))

    def at(ti, i):
        return {"dy": _input(dy, ti, i), "g": _input(g, i), "s": s}

    def column(i):
        return {"g": _input(g, i), "s": s, "T": int(dy.shape[0]), "column": f"dy, base, lora [:, {i}]"}

    outs = []
    for save in ("inputs", "activation"):
        gb, gl, gg = _compose_grads(k, s, tier, save)
        eb, el, eg = bounds.compose_backward_bounds(dy, base, lora, g, s, save=save)
        outs += [
            (f"d_base/{save}", gb, gt.d_base, eb, d_base, at, act),
            (f"d_lora/{save}", gl, gt.d_lora_hi + gt.d_lora_lo, el, d_lora, at, act),
            (f"d_g/{save}", gg, gt.d_g, eg, d_g, column, f32),
        ]
    return outs


def _lora_compose_outputs(ex, k, tier) -> list:
    from .kernels import lora_compose
    from .kernels.lora_compose import lora_compose_forward_eager

    t, s = ex.tensors, ex.scalars["s"]
    base, xa, B, g, bias = t["base"], t["xa"], t["B"], t["g"], t.get("bias")
    y = lora_compose(k["base"], k["xa"], k["B"], k["g"], s, k.get("bias"), tier=tier).cpu()
    _, lora_hat = lora_compose_forward_eager(base, xa, B, g, bias, s, write_lora=True)
    bd = bounds.lora_compose_bounds(base, xa, B, g, s, lora_hat, bias)
    x64 = g.to(F64)[None, :] * (base.to(F64) + s * (xa.to(F64) @ B.to(F64).t()))
    x64 = x64 + (bias.to(F64)[None, :] if bias is not None else 0)
    fs = Fraction(s)

    def exact(ti, i):
        lo = sum(_f(xa, ti, j) * _f(B, i, j) for j in range(xa.shape[1]))
        return _f(g, i) * (_f(base, ti, i) + fs * lo) + (_f(bias, i) if bias is not None else 0)

    def inputs(ti, i):
        out = {"base": _input(base, ti, i), "g": _input(g, i), "s": s, "r": int(xa.shape[1])}
        if bias is not None:
            out["bias"] = _input(bias, i)
        return out

    return [("y", y, x64, bd, exact, inputs)]


def _norm_element(ex, k, tier) -> dict:
    import mpmath

    from .kernels import factored_row_norm
    from .kernels.dispatch import HAS_TRITON

    t, s = ex.tensors, ex.scalars["s"]
    W, A, B = t["W"], t["A"], t["B"]
    backend = "triton" if (HAS_TRITON and k["W"].is_cuda and tier != "eager") else "torch"
    nu_k, info = factored_row_norm(k["W"], k["A"], k["B"], s, return_info=True, backend=backend)
    nu = nu_k.cpu()
    tr = row_norm_truth(W, A, B, s)
    nb = bounds.kernel_norm_bound(W, A, B, s, tr.nu, backend, info.recomputed_rows)
    (i,), ratio = _worst(nu, tr.nu, nb)
    fs = Fraction(s)
    Wi = [_f(W, i, c) for c in range(W.shape[1])]
    Bi = [_f(B, i, j) for j in range(B.shape[1])]
    Aj = [[_f(A, j, c) for c in range(A.shape[1])] for j in range(A.shape[0])]
    nu2 = sum((Wi[c] + fs * sum(Bi[j] * Aj[j][c] for j in range(len(Bi)))) ** 2 for c in range(len(Wi)))
    with mpmath.workdps(60):
        exact = mpmath.sqrt(mpmath.mpf(nu2.numerator) / nu2.denominator)
        got = float(nu[i])
        err = mpmath.mpf(got) - exact
        fmt = parse_format("fp32")
        u = _ulp(float(exact), fmt)
        return {
            "output": "nu",
            "index": [i],
            "inputs": {
                "d_in": int(W.shape[1]),
                "r": int(A.shape[0]),
                "s": s,
                "row_kappa": float(info.kappa[i]),
                "recomputed_densely": i in info.recomputed_rows,
            },
            "exact": {"nu_squared": f"{nu2.numerator} / {nu2.denominator}", "digits": mpmath.nstr(exact, 40)},
            "got": {"value": got, "exact": dyadic(got)},
            "error": {
                "value": float(err),
                "relative": float(abs(err) / exact) if exact else float(abs(err)),
                "ulp": float(abs(err)) / u,
            },
            "ulp_of_exact": u,
            "bound": float(nb[i]),
            "ratio": ratio,
            "correctly_rounded_value": round_exact(Fraction(mpmath.nstr(exact, 50)), fmt),
        }


def explain_case(path, device="cpu", tier: "str | None" = None) -> dict:
    """The worst element of a corpus case (module docstring) as a dict: case, target, dtype, elements (one per
    output), each with index, inputs, exact, got, error (exact, value, ulp), bound and ratio. Raises ExplainError."""
    try:
        target, ex, doc = load_case(path)
    except (OSError, KeyError, ValueError) as e:
        raise ExplainError(f"cannot read corpus case {str(path)!r}: {e}") from None
    if doc.get("impl"):
        raise ExplainError(
            f"{path} is a case of --impl {doc['impl']}: explain shows this project's kernels and forms "
            "element by element; run your implementation on it with "
            "dora_verify.certify.replay(PATH) (its inputs: dora_verify.certify.load_case(PATH))"
        )
    if target not in _target_table(None):
        raise ExplainError(f"{path}: unknown target {target!r}")
    rep = explain_example(str(path), target, ex, device, tier, doc.get("score"))
    rep["stored_on"] = {k: doc.get(k) for k in ("tier", "device", "found_by") if doc.get(k) is not None}
    return rep


GATE_TARGETS = {"compose": "compose.y", "norm": "norm", "backward": "compose.backward"}  # gate check -> target


def gate_case(case_id: str, seed: int = 0):
    """(target, Example) of the gate suite's case ``case_id`` (suite seed ``seed``, the gate's default 0): a
    ``compose-*`` case is explained as the kernels' y on its inputs, a ``backward-*`` case as their compose
    backward, a ``norm-*`` case as their ν."""
    from .gate import build_suite

    parts = case_id.split("-")
    if len(parts) < 3 or parts[1] not in ("bf16", "fp16", "fp32"):
        raise ExplainError(
            f"{case_id!r} is neither a corpus case (.json) nor a gate case id (e.g. compose-bf16-03, "
            "norm-fp16-03; `dora-verify gate --list-cases` lists them)"
        )
    case = next((c for c in build_suite(dtypes=(parts[1],), seed=seed) if c.id == case_id), None)
    if case is None:
        raise ExplainError(f"no gate case {case_id!r} in the suite of seed {seed}")
    if case.check not in GATE_TARGETS:
        raise ExplainError(
            f"gate case {case_id!r} is a {case.check} check, which has no single-element story yet; "
            f"explain takes the {', '.join(GATE_TARGETS)} cases"
        )
    return GATE_TARGETS[case.check], case.example


def explain_example(
    label: str, target: str, ex, device="cpu", tier: "str | None" = None, stored_score: "dict | None" = None
) -> dict:
    """:func:`explain_case` of an Example already in hand (``label`` names it in the report)."""
    dev = torch.device(device)
    tier = tier or default_tier(dev)
    k = {n: v.to(dev) for n, v in ex.tensors.items()}
    fmt = parse_format(ex.dtype)
    if target in ("compose.y", "compose.delta") or target.startswith("form."):
        outs = _compose_outputs(target, ex, k, dev, tier)
    elif target == "lora_compose":
        outs = _lora_compose_outputs(ex, k, tier)
    elif target == "compose.backward":
        outs = _compose_backward_outputs(ex, k, tier)
    elif target == "norm":
        outs = None
    else:
        raise ExplainError(
            f"explain supports {', '.join(SUPPORTED)}; {target!r} has no single-element story yet "
            "(replay it: dora_verify.certify.replay)"
        )
    elements = [_norm_element(ex, k, tier)] if outs is None else []
    for name, got, exact64, bound, exact_fn, inputs_fn, *own_fmt in outs or ():
        where, ratio = _worst(got, exact64, bound)
        el = _element(
            name,
            got[where],
            exact_fn(*where),
            float(bound[where]),
            own_fmt[0] if own_fmt else fmt,
            where,
            inputs_fn(*where),
        )
        el["ratio_float64_oracle"] = ratio
        elements.append(el)
    return {
        "case": label,
        "target": target,
        "dtype": ex.dtype,
        "params": ex.params,
        "tier": tier,
        "device": str(dev),
        "stored_score": stored_score,
        "elements": elements,
    }


def explain_text(rep: dict) -> str:
    """The explanation as text a person reads (the CLI's output)."""
    p = rep["params"]
    L = [
        f"case {rep['case']}",
        f"  target {rep['target']}, {rep['dtype']}, tier {rep['tier']} on {rep['device']}; "
        + ", ".join(
            f"{k} {v}"
            for k, v in p.items()
            if k in ("T", "N", "d_out", "d_in", "r", "regime", "g_mode", "bias", "seed")
        ),
    ]
    cut = p.get("restricted")
    if cut:
        L.append(
            f"  restricted by certify to rows {cut['rows'][0]}:{cut['rows'][1]} and columns "
            f"{cut['cols'][0]}:{cut['cols'][1]} (half-open) of the drawn {cut['of'][0]}×{cut['of'][1]}; "
            "indices below are in the restricted case (add the starts for the drawn one)"
        )
    sc = rep.get("stored_score") or {}
    if sc:
        where = rep.get("stored_on") or {}
        at = f" (found by certify on the {where['tier']} tier, {where['device']})" if where.get("tier") else ""
        L.append(f"  stored score: ratio {sc.get('ratio')}, ulp {sc.get('ulp')}{at}")
        stored = float(sc.get("ratio", 0) or 0)
        now = (
            max((el["ratio"] if el["ratio"] is not None else math.inf) for el in rep["elements"])
            if rep["elements"]
            else 0.0
        )
        if stored > 1 >= now:
            L.append(
                f"  the stored violation does NOT reproduce here (tier {rep['tier']} on {rep['device']}, worst "
                f"ratio {now:.3g}): re-run explain with --device/--tier of the stored run"
            )
    if any("/" in el["output"] for el in rep["elements"]):
        L.append(
            "  outputs named X/inputs and X/activation: the compose backward under save='inputs' (base and "
            "lora kept) and save='activation' (the forward's inner sum kept)"
        )
    for el in rep["elements"]:
        L += ["", f"worst {el['output']} element {el['index']} (largest error / bound):"]
        for name, v in el["inputs"].items():
            L.append(
                f"  {name:10s} = {v['value']!r} = {v['exact']} ({v['dtype']})"
                if isinstance(v, dict)
                else f"  {name:10s} = {v!r}"
            )
        ex = el["exact"]
        if "nu_squared" in ex:
            L.append(f"  exact ν²   = {ex['nu_squared']}")
            L.append(f"  exact ν    = {ex['digits']}")
        else:
            L.append(f"  exact      = {ex['rational']}")
            L.append(f"             ≈ {ex['digits']}")
        L.append(f"  got        = {el['got']['value']!r} = {el['got']['exact']}")
        L.append(f"  RN(exact)  = {el['correctly_rounded_value']!r}")
        e = el["error"]
        if e is None:
            L.append("  error      = non-finite output")
        else:
            L.append(
                f"  error      = {e['value']:.6g} = {e['ulp']:.4g} ulp of the exact value "
                f"(ulp {el['ulp_of_exact']:.6g})"
            )
        L.append(f"  bound      = {el['bound']:.6g} (dora_verify.bounds, a priori at this element)")
        L.append(
            f"  ratio      = {el['ratio'] if el['ratio'] is not None else 'inf'}"
            + ("  — VIOLATION (> 1)" if el["ratio"] is None or el["ratio"] > 1 else "  (≤ 1: within the bound)")
        )
    return "\n".join(L) + "\n"


__all__ = ["ExplainError", "SUPPORTED", "dyadic", "explain_case", "explain_text", "round_exact"]
