"""What ``dora-verify certify`` checks: each target's evaluator, scored against the oracle of the rounded inputs.

A target is a (name, example strategy, evaluator, dtypes) row of :data:`TARGETS` — this project's kernels
(``compose.y``, ``compose.delta``, ``compose.backward``, ``lora_compose``, ``norm``, ``layer``), the forms under
study (``form.<name>``), or an ``--impl``'s compose and norm (:func:`impl_targets`). An evaluator runs the code
under test on its own copies of an example's tensors and returns a :class:`Score`: the largest
(|error| − oracle bound) / a-priori bound over the outputs it checks (≤ 1 certifies), the main output's ULP
error, the per-output parts and facts such as determinism. The search over examples is :mod:`dora_verify.certify`;
the corpus files are :mod:`dora_verify.corpus`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import bounds
from .adapter import check_output
from .formats import parse_format, ulp
from .metrics import excess_error, same_bits
from .oracles import compose_grad_truth, compose_truth, row_norm_truth
from .strategies import Example, compose_examples, layer_examples, lora_examples, norm_examples

F64 = torch.float64


class Reject(Exception):
    """The drawn input is outside the target's domain (e.g. its exact result overflows the format)."""


class CertifyEnvironmentError(ValueError):
    """The search cannot run here (e.g. the fused tier without a GPU or the interpreter): exit 2."""


@dataclass
class Score:
    ratio: float
    ulp: float
    parts: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def excess_ratio(got, hi, lo, oracle_bound, bound) -> float:
    """max over elements of (|got − (hi + lo)| − oracle_bound)⁺ / bound; inf where got is not finite."""
    got = got.detach().to(F64)
    if not bool(torch.isfinite(got).all()):
        return math.inf
    err = excess_error(got, hi, lo, oracle_bound)
    r = torch.where(err == 0, torch.zeros_like(err), err / bound.to(F64))
    return float(r.max()) if r.numel() else 0.0


def _max_ulp(got, exact, fmt) -> float:
    if got.numel() == 0:
        return 0.0
    got = got.detach().to(F64)
    return float(((got - exact).abs() / ulp(exact, parse_format(fmt))).max())


def _on(ex: Example, device) -> dict:
    """New copies of the example's tensors on the kernel's device, for one call (on the CPU too: what the code
    under test does to its inputs never reaches ``ex``, the oracle or the corpus). Oracles and bounds run on
    the CPU originals (``ex.tensors``): the GPU only runs the kernel under test, so many searches can share
    one GPU without queueing the oracles' many small launches behind each other."""
    return {k: v.to(device, copy=True) for k, v in ex.tensors.items()}


def _cpu(*xs):
    """CPU copies (never aliases of an input or of a buffer the code reuses on its next call)."""
    return tuple(x.detach().to("cpu", copy=True) for x in xs)


def _check_range(x: torch.Tensor, fmt) -> None:
    if bool((x.abs() > parse_format(fmt).max_finite / 2).any()):
        raise Reject("exact result beyond half the format's largest value")


# ----------------------------------------------------------------------------- targets: production kernels
def eval_compose_y(ex: Example, device, tier) -> Score:
    from .kernels import compose

    t, k, s = ex.tensors, _on(ex, device), ex.scalars["s"]
    tr = compose_truth(t["base"], t["lora"], t["g"], s, t.get("bias"))
    _check_range(tr.y, ex.dtype)
    (y,) = _cpu(compose(k["base"], k["lora"], k["g"], s, k.get("bias"), tier=tier))
    _, by = bounds.compose_kernel_bounds(t["base"], t["lora"], t["g"], s, t.get("bias"))
    r = excess_ratio(y, tr.y_hi, tr.y_lo, tr.y_bound, by)
    return Score(r, _max_ulp(y, tr.y, ex.dtype), {"y": r})


def eval_compose_delta(ex: Example, device, tier) -> Score:
    from .kernels import compose

    t, k, s = ex.tensors, _on(ex, device), ex.scalars["s"]
    gm1 = t["g_minus_1"]
    tr = compose_truth(t["base"], t["lora"], t["g"], s, g_minus_1=gm1)
    _check_range(tr.y, ex.dtype)
    (d,) = _cpu(compose(k["base"], k["lora"], k["g"], s, g_minus_1=k["g_minus_1"], output="delta", tier=tier))
    bd, _ = bounds.compose_kernel_bounds(t["base"], t["lora"], t["g"], s, g_minus_1=gm1)
    r = excess_ratio(d, tr.d_hi, tr.d_lo, tr.d_bound, bd)
    return Score(r, _max_ulp(d, tr.delta, ex.dtype), {"delta": r})


def _compose_grads(t, s, tier, save):
    from .kernels import compose

    b, l, g = (t[k].clone().requires_grad_() for k in ("base", "lora", "g"))
    compose(b, l, g, s, tier=tier, save=save).backward(t["dy"])
    return _cpu(b.grad, l.grad, g.grad)


def eval_compose_backward(ex: Example, device, tier) -> Score:
    """d_base, d_lora, d_g for save='inputs' and 'activation'; each run twice (bitwise determinism)."""
    t, k, s = ex.tensors, _on(ex, device), ex.scalars["s"]
    _check_range(t["g"].to(F64)[None, :] * (t["base"].to(F64).abs() + abs(s) * t["lora"].to(F64).abs()), ex.dtype)
    gt = compose_grad_truth(t["dy"], t["base"], t["lora"], t["g"], s)
    _check_range(gt.d_lora_hi, ex.dtype)
    _check_range((t["dy"].to(F64).abs() * (t["base"].to(F64).abs() + abs(s) * t["lora"].to(F64).abs())).sum(0), "fp32")
    parts, info, worst_ulp = {}, {}, 0.0
    for save in ("inputs", "activation"):
        grads = _compose_grads(k, s, tier, save)
        again = _compose_grads(k, s, tier, save)
        same = all(same_bits(a, b) for a, b in zip(grads, again))
        eb, el, eg = bounds.compose_backward_bounds(t["dy"], t["base"], t["lora"], t["g"], s, save=save)
        zero = torch.zeros((), dtype=F64, device=eb.device)
        parts[f"d_base/{save}"] = excess_ratio(grads[0], gt.d_base, zero, zero, eb)
        parts[f"d_lora/{save}"] = excess_ratio(grads[1], gt.d_lora_hi, gt.d_lora_lo, zero, el)
        parts[f"d_g/{save}"] = excess_ratio(grads[2], gt.d_g, zero, gt.d_g_bound, eg)
        info[f"deterministic/{save}"] = same
        if not same:
            parts[f"determinism/{save}"] = math.inf
        worst_ulp = max(worst_ulp, _max_ulp(grads[0], gt.d_base, ex.dtype))
    return Score(max(parts.values()), worst_ulp, parts, info)


def eval_lora_compose(ex: Example, device, tier) -> Score:
    from .kernels import lora_compose
    from .kernels.dispatch import Tier, select_tier
    from .kernels.lora_compose import _FUSED_ADAPTER_DTYPES, lora_compose_forward_eager, lora_compose_forward_fused

    t, k, s = ex.tensors, _on(ex, device), ex.scalars["s"]
    base, xa, B, g, bias = t["base"], t["xa"], t["B"], t["g"], t.get("bias")
    kargs = (k["base"], k["xa"], k["B"], k["g"])
    xa64, B64, b64, g64 = xa.to(F64), B.to(F64), base.to(F64), g.to(F64)[None, :]
    lora = xa64 @ B64.t()
    y_true = g64 * (b64 + s * lora) + (bias.to(F64)[None, :] if bias is not None else 0)
    _check_range(y_true, ex.dtype)
    oracle_b = bounds.gamma(xa.shape[1] + 6, 2.0**-53) * (
        g64.abs() * (b64.abs() + abs(s) * (xa64.abs() @ B64.abs().t()))
        + (bias.to(F64).abs()[None, :] if bias is not None else 0)
    )
    (y,) = _cpu(lora_compose(*kargs, s, k.get("bias"), tier=tier))
    fused = (
        select_tier(k["base"], False, tier, op="lora_compose", dtype=k["xa"].dtype) != Tier.EAGER
        and k["xa"].dtype in _FUSED_ADAPTER_DTYPES
    )  # lora_compose's own choice of launcher
    y2, lora_hat = _cpu(
        *(lora_compose_forward_fused if fused else lora_compose_forward_eager)(
            *kargs, k.get("bias"), s, write_lora=True
        )
    )
    bd = bounds.lora_compose_bounds(base, xa, B, g, s, lora_hat, bias)
    zero = torch.zeros((), dtype=F64, device=bd.device)
    parts = {"y": excess_ratio(y, y_true, zero, oracle_b, bd)}
    if not torch.equal(y, y2):
        parts["launcher_parity"] = math.inf
    return Score(max(parts.values()), _max_ulp(y, y_true, ex.dtype), parts)


def _magnitude(ex: Example, nu_hat, nu_true) -> torch.Tensor:
    mode, k = ex.params.get("m_mode", "spread"), int(ex.params.get("k", 0))
    if mode == "fresh":  # PEFT/DoRA initialise m to the norm the layer computes: g = 1 exactly
        return nu_hat.clone()
    if mode == "ulp":
        return (nu_true * (1 + k * 2.0**-24)).to(torch.float32)
    return (nu_true * ex.tensors["g_case"].to(nu_true.device, F64)).to(torch.float32)


def eval_norm(ex: Example, device, tier) -> Score:
    """ν (kernel norm bound), then g and g − 1 (scale bounds from ν's bound) and d_m through the compose
    backward (d_m bound)."""
    from .kernels import compose, dora_scale, factored_row_norm
    from .kernels.dispatch import HAS_TRITON

    t, k, s, eps = ex.tensors, _on(ex, device), ex.scalars["s"], ex.scalars.get("eps", 1e-12)
    W, A, B = t["W"], t["A"], t["B"]
    backend = "triton" if (HAS_TRITON and k["W"].is_cuda and tier != "eager") else "torch"
    nu_k, info = factored_row_norm(k["W"], k["A"], k["B"], s, return_info=True, backend=backend)
    (nu,) = _cpu(nu_k)
    tr = row_norm_truth(W, A, B, s)
    if tr.uncertified_rows:
        raise Reject("oracle could not certify every row")
    nb = bounds.kernel_norm_bound(W, A, B, s, tr.nu, backend, info.recomputed_rows)
    zero = torch.zeros((), dtype=F64, device=nb.device)
    parts = {"nu": excess_ratio(nu, tr.nu, zero, tr.bound, nb)}
    rel = torch.where(tr.nu > 0, (nu.to(F64) - tr.nu).abs() / tr.nu.clamp_min(1e-300), torch.zeros_like(tr.nu))
    m = _magnitude(ex, nu, tr.nu)
    eps32 = float(torch.tensor(eps, dtype=torch.float32))
    nuc = tr.nu.clamp_min(eps32)
    g, gm1 = _cpu(*dora_scale(m.to(device), nu_k, eps))
    bg, bgm1 = bounds.scale_bounds(m, nu, tr.nu, nb + tr.bound, eps)
    m64 = m.to(F64)
    ob = 2.0**-52 * (m64 / nuc).abs()  # float64 evaluation of the exact g (one division)
    parts["g"] = excess_ratio(g, m64 / nuc, zero, ob, bg)
    parts["g_minus_1"] = excess_ratio(gm1, (m64 - nuc) / nuc, zero, ob, bgm1)
    mm = m.to(device).requires_grad_()
    gg, _ = dora_scale(mm, nu_k, eps)
    gg.retain_grad()
    compose(k["base"], k["lora"], gg, s, tier=tier).backward(k["dy"])
    d_g, d_m = _cpu(gg.grad, mm.grad)
    gt = compose_grad_truth(t["dy"], t["base"], t["lora"], g, s)
    _, _, eg = bounds.compose_backward_bounds(t["dy"], t["base"], t["lora"], g, s)
    bdm = bounds.dm_bound(d_g, eg + gt.d_g_bound, nu, tr.nu, nb + tr.bound, eps)
    dm = gt.d_g / nuc
    parts["d_m"] = excess_ratio(d_m, dm, zero, (gt.d_g_bound / nuc) * (1 + 2.0**-50) + 2.0**-52 * dm.abs(), bdm)
    info_ = {"max_rel_nu": float(rel.max()), "recomputed_rows": len(info.recomputed_rows)}
    return Score(max(parts.values()), float(rel.max()) / 2.0**-24, parts, info_)


# ----------------------------------------------------------------------------- targets: a whole layer
def _layer_evaluator(impl) -> Callable:
    """A whole layer built by ``impl.layer`` (``layer_oracle.layer_example`` cases drawn by hypothesis), scored by the
    gate's own layer scorer (``gate._score_layer``: fresh input copies, ``build_layer``, ``check_output`` on y and
    every gradient): y, dx, dA, dB, dm against ``layer_oracle.layer_truth`` (ν detached), held to the bound of
    DoRALinear's stated steps (contract 'kernel') or to the faithful layer contract — the gate's layer bounds. A
    non-finite output where the truth is finite, or a bit difference between two runs of a layer that claims
    determinism, scores inf."""

    def evaluate(ex: Example, device, tier) -> Score:
        from .gate import Case, _score_layer

        outs = _score_layer(impl, Case(f"certify-layer-{ex.dtype}", "layer", ex, ""), device)
        parts, ulp_y = {}, 0.0
        for o in outs:
            r = float(o.ratios.max()) if o.ratios is not None and o.ratios.numel() else 0.0
            if o.nonfinite_mismatch or o.nondeterministic:
                r = math.inf
            parts[o.output] = r
            if o.output.split("/")[0] == "y":
                ulp_y = o.max_ulp
        return Score(max(parts.values()), ulp_y, parts)

    return evaluate


def _kernels_layer_impl(tier: "str | None"):
    """DoRALinear (the project's layer) as the gate runs it: the eager tier, or its default path on CUDA."""
    from .adapter import kernels_impl

    return kernels_impl(None if tier == "fused" else "eager")


def _eval_kernels_layer(ex: Example, device, tier) -> Score:
    return _layer_evaluator(_kernels_layer_impl(tier))(ex, device, tier)


# ----------------------------------------------------------------------------- targets: forms under study
def _form_evaluator(name: str) -> Callable:
    def evaluate(ex: Example, device, tier) -> Score:
        from .forms import COMPOSE_FORMS

        t, k, s = ex.tensors, _on(ex, device), ex.scalars["s"]
        tr = compose_truth(t["base"], t["lora"], t["g"], s, t.get("bias"))
        _check_range(tr.y, ex.dtype)
        y, d = _cpu(*COMPOSE_FORMS[name].fn(k["base"], k["lora"], k["g"], s, k.get("bias")))
        bd, by = bounds.compose_form_bounds(name, t["base"], t["lora"], t["g"], s, t.get("bias"))
        parts = {
            "y": excess_ratio(y, tr.y_hi, tr.y_lo, tr.y_bound, by),
            "delta": excess_ratio(d, tr.d_hi, tr.d_lo, tr.d_bound, bd),
        }
        return Score(max(parts.values()), _max_ulp(y, tr.y, ex.dtype), parts)

    return evaluate


# ----------------------------------------------------------------------------- targets: an implementation under test
def _impl_compose_evaluator(impl) -> Callable:
    """A user's (or PEFT's) compose under the faithful contract: y within 1 ulp of the exact y (beyond the
    oracle's own bound); repeated calls bit-identical when it claims determinism."""

    def call(ex, device):
        k, t, s = _on(ex, device), ex.tensors, ex.scalars["s"]
        y = impl.compose(k["base"], k["lora"], k["g"], s, k.get("bias"))
        return _cpu(check_output("compose", y, t["base"].shape, t["base"].dtype))[0]

    def evaluate(ex: Example, device, tier) -> Score:
        t, s = ex.tensors, ex.scalars["s"]
        tr = compose_truth(t["base"], t["lora"], t["g"], s, t.get("bias"))
        _check_range(tr.y, ex.dtype)
        y = call(ex, device)
        parts = {"y": excess_ratio(y, tr.y_hi, tr.y_lo, tr.y_bound, ulp(tr.y, parse_format(ex.dtype)))}
        if impl.deterministic and not same_bits(y, call(ex, device)):
            parts["determinism"] = math.inf
        return Score(max(parts.values()), _max_ulp(y, tr.y, ex.dtype), parts)

    return evaluate


def _impl_norm_evaluator(impl) -> Callable:
    """A user's (or PEFT's) row norm under the faithful contract: ν within 1e-6 relative on every row."""

    def call(ex, device):
        k = _on(ex, device)
        nu = impl.norm(k["W"], k["A"], k["B"], ex.scalars["s"])
        return _cpu(check_output("norm", nu, (ex.tensors["W"].shape[0],)))[0]

    def evaluate(ex: Example, device, tier) -> Score:
        t, s = ex.tensors, ex.scalars["s"]
        tr = row_norm_truth(t["W"], t["A"], t["B"], s)
        if tr.uncertified_rows:
            raise Reject("oracle could not certify every row")
        nu = call(ex, device)
        zero = torch.zeros((), dtype=F64)
        parts = {"nu": excess_ratio(nu, tr.nu, zero, tr.bound, bounds.FAITHFUL_NORM_REL * tr.nu.clamp_min(2.0**-126))}
        if impl.deterministic and not same_bits(nu, call(ex, device)):
            parts["determinism"] = math.inf
        rel = (nu.to(F64) - tr.nu).abs() / tr.nu.clamp_min(2.0**-126)
        return Score(max(parts.values()), float(rel.max()) / 2.0**-24, parts, {"max_rel_nu": float(rel.max())})

    return evaluate


@dataclass(frozen=True)
class Target:
    name: str
    strategy: Callable  # dtype -> hypothesis strategy of Example
    evaluate: Callable  # (Example, device, tier) -> Score
    dtypes: tuple
    summary: str


def _targets() -> dict:
    from .forms import COMPOSE_FORMS

    ts = [
        Target(
            "compose.y",
            compose_examples,
            eval_compose_y,
            ("bf16", "fp16", "fp32"),
            "fused compose, y = g·(base + s·lora) + bias, one rounding",
        ),
        Target(
            "compose.delta",
            compose_examples,
            eval_compose_delta,
            ("bf16", "fp16", "fp32"),
            "fused compose, Δ = (g−1)·base + g·s·lora with fp32 g − 1",
        ),
        Target(
            "compose.backward",
            compose_examples,
            eval_compose_backward,
            ("bf16", "fp16", "fp32"),
            "compose backward: d_base, d_lora, d_g (save inputs/activation), bitwise determinism",
        ),
        Target(
            "lora_compose",
            lora_examples,
            eval_lora_compose,
            ("bf16", "fp16"),
            "compose with the LoRA up-projection fused in",
        ),
        Target(
            "norm",
            norm_examples,
            eval_norm,
            ("bf16", "fp16", "fp32"),
            "factored row norm ν, then g, g − 1 (dora_scale) and d_m",
        ),
        Target(
            "layer",
            layer_examples,
            _eval_kernels_layer,
            ("bf16", "fp16", "fp32"),
            "DoRALinear, the whole layer: y, dx, dA, dB, dm (bf16 W with bf16/fp32 adapters, fp16, fp32), "
            "bound of its stated steps",
        ),
    ]
    ts += [
        Target(f"form.{n}", compose_examples, _form_evaluator(n), ("bf16", "fp16"), f.summary)
        for n, f in sorted(COMPOSE_FORMS.items())
    ]
    return {t.name: t for t in ts}


TARGETS = _targets()
LAYER_TARGETS = ("layer",)  # the whole DoRALinear: --targets layer (or all); not in the default 'kernels' set
KERNEL_TARGETS = tuple(n for n in TARGETS if not n.startswith("form.") and n not in LAYER_TARGETS)


def impl_targets(spec: str) -> dict:
    """The targets of an implementation named as ``--impl`` names it (``peft`` or ``module:callable``; see
    dora_verify.adapter): ``<name>.compose``, ``<name>.norm`` and/or ``<name>.layer`` (a layer factory: the whole
    layer, y and its gradients, under the faithful layer contract of the gate's layer cases). The built-in
    kernels and forms have their own targets (with their derived bounds); an implementation with the
    'baseline-only' contract has no a-priori bound to certify against. Raises ``adapter.ImplError``."""
    from .adapter import ImplError, load_impl

    if spec in ("kernels", "forms") or spec.startswith("form:"):
        raise ImplError(
            f"--impl {spec!r}: the built-in kernels and forms are certify's own targets "
            "(--targets kernels / forms); --impl takes peft or module:callable"
        )
    (impl,) = load_impl(spec)
    if impl.contract != "faithful":
        raise ImplError(f"--impl {spec!r}: contract {impl.contract!r} has no a-priori bound to certify against")
    name = "".join(c if c.isalnum() or c in "_-" else "_" for c in impl.name)
    dtypes = tuple(d for d in ("bf16", "fp16", "fp32") if d in impl.dtypes)
    ts = []
    if impl.compose is not None:
        ts.append(
            Target(
                f"{name}.compose",
                compose_examples,
                _impl_compose_evaluator(impl),
                dtypes,
                f"{impl.name}: compose y, faithful contract (≤ 1 ulp of the exact y)",
            )
        )
    if impl.norm is not None:
        ts.append(
            Target(
                f"{name}.norm",
                norm_examples,
                _impl_norm_evaluator(impl),
                dtypes,
                f"{impl.name}: row norm ν, faithful contract (≤ 1e-6 relative per row)",
            )
        )
    if impl.layer is not None:
        ts.append(
            Target(
                f"{name}.layer",
                layer_examples,
                _layer_evaluator(impl),
                dtypes,
                f"{impl.name}: whole layer y, dx, dA, dB, dm, faithful layer contract "
                "(layer_oracle.faithful_layer_bounds)",
            )
        )
    if not ts:
        raise ImplError(
            f"--impl {spec!r}: nothing to certify: certify takes an implementation with a compose, a norm "
            "or a layer factory (dora_verify.adapter)"
        )
    return {t.name: t for t in ts}


def _target_table(impl: "str | None") -> dict:
    return TARGETS if impl is None else impl_targets(impl)


def check_tier(device: torch.device, tier: "str | None") -> None:
    """:class:`CertifyEnvironmentError` when the kernels' ``tier`` cannot run on ``device`` (the fused tier on a
    CPU without ``TRITON_INTERPRET=1``, or without Triton): an environment error, not a finding."""
    if tier != "fused":
        return
    from .kernels.dispatch import select_tier

    try:
        select_tier(torch.zeros(1, 1, dtype=torch.float16, device=device), False, "fused")
    except ValueError as e:
        raise CertifyEnvironmentError(f"--tier fused cannot run on {device}: {e}") from None


def default_tier(device: torch.device) -> str:
    """The production path on CUDA; the eager tier elsewhere (the interpreter's fused path is logic-only:
    it truncates fp32 → bf16, so its bf16 results are not held to the bound)."""
    return "fused" if device.type == "cuda" else "eager"
