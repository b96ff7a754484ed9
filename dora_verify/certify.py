"""Certification: a targeted hypothesis search for inputs that push each kernel's error towards its bound.

A *target* is one implementation with one a-priori bound (``dora_verify.bounds``): the production kernels
(``compose.y``, ``compose.delta``, ``compose.backward``, ``lora_compose``, ``norm`` — ν, then g, g − 1 and d_m
downstream of it) and the compose forms under study (``form.<name>``). For each drawn input
(``dora_verify.strategies``) the target is run, compared with the oracle of the *rounded* inputs, and scored:

* ``ratio`` — the largest (|error| − oracle bound)/bound over every output element checked. ≤ 1 certifies;
  > 1 is a violation: hypothesis shrinks it to a minimal case, and the search goes on to its budget in new
  rounds (seeds ``seed + 1``, …), so that ``max_ratio`` and the corpus cover the whole budget and every distinct
  violation found (``violations`` counts them). Shrinking is outside the budget: its evaluations
  (``shrink_evaluations``) enter neither the example count, the ratios nor the top cases; before the corpus is written every kept case (a worst
  case too) is restricted to the smallest block of its rows and columns that keeps its ratio (:func:`shrink_restriction`). A non-finite output where the truth
  is finite, or two runs of a kernel that claims determinism differing in one bit, score ``inf``;
* ``ulp`` — the largest ULP error of the main output (reported; the bound is the criterion).

``hypothesis.target`` climbs on both. The worst distinct cases found (and every violation) are written to a corpus as
``<target>-<dtype>-<hash>.npz`` (the exact input tensors) + ``.json`` (target, drawn parameters, scores,
provenance); ``tests/test_certify.py`` replays every case committed under ``tests/corpus``.

Budgets: ``examples`` per (target, dtype) and/or ``seconds``. ``derandomize=True`` (pre-merge) makes the
search a fixed function of the code: the same examples every run. Otherwise rounds of examples are run with
seeds ``seed``, ``seed + 1``, … until the budget is spent (nightly-style); each round's seed is recorded.

Never certified on nothing: :func:`run_certify` raises :class:`CertifyError` (a usage error, exit 2) when a
(target, dtype) ran no example, and :class:`CertifyEnvironmentError` (exit 2) before searching when the
requested tier cannot run here (``tier='fused'`` with neither a GPU nor ``TRITON_INTERPRET=1``). Every call
of the code under test gets its own copies of the example's tensors (the oracle, the bounds and the corpus
keep the drawn ones), and anything the call raises (``SystemExit`` included) is a crash finding.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import bounds
from .adapter import CaseGuard, check_output, crash_reason
from .formats import parse_format, ulp
from .metrics import excess_error, same_bits
from .oracles import compose_grad_truth, compose_truth, row_norm_truth
from .report import atomic_write
from .strategies import Example, compose_examples, layer_examples, lora_examples, norm_examples

F64 = torch.float64
HIST_EDGES = (-12, -10, -8, -6, -4, -3, -2, -1, -0.5, 0)  # log10(ratio) bin edges; last bin: ratio > 1


class Reject(Exception):
    """The drawn input is outside the target's domain (e.g. its exact result overflows the format)."""


class CertifyError(ValueError):
    """Nothing was certified (e.g. no example ran within the budget): a usage error, exit 2."""


class CertifyEnvironmentError(ValueError):
    """The search cannot run here (e.g. the fused tier without a GPU or the interpreter): exit 2."""


class BoundViolation(AssertionError):
    def __init__(self, score):
        super().__init__(f"error/bound ratio {score.ratio:.4g} > 1 ({score.parts})")
        self.score = score


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
    y, = _cpu(compose(k["base"], k["lora"], k["g"], s, k.get("bias"), tier=tier))
    _, by = bounds.compose_kernel_bounds(t["base"], t["lora"], t["g"], s, t.get("bias"))
    r = excess_ratio(y, tr.y_hi, tr.y_lo, tr.y_bound, by)
    return Score(r, _max_ulp(y, tr.y, ex.dtype), {"y": r})


def eval_compose_delta(ex: Example, device, tier) -> Score:
    from .kernels import compose

    t, k, s = ex.tensors, _on(ex, device), ex.scalars["s"]
    gm1 = t["g_minus_1"]
    tr = compose_truth(t["base"], t["lora"], t["g"], s, g_minus_1=gm1)
    _check_range(tr.y, ex.dtype)
    d, = _cpu(compose(k["base"], k["lora"], k["g"], s, g_minus_1=k["g_minus_1"], output="delta", tier=tier))
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
    oracle_b = bounds.gamma(xa.shape[1] + 6, 2.0**-53) * (g64.abs() * (b64.abs() + abs(s) * (xa64.abs() @ B64.abs().t()))
                                                           + (bias.to(F64).abs()[None, :] if bias is not None else 0))
    y, = _cpu(lora_compose(*kargs, s, k.get("bias"), tier=tier))
    fused = (select_tier(k["base"], False, tier, op="lora_compose", dtype=k["xa"].dtype) != Tier.EAGER
             and k["xa"].dtype in _FUSED_ADAPTER_DTYPES)  # lora_compose's own choice of launcher
    y2, lora_hat = _cpu(*(lora_compose_forward_fused if fused else lora_compose_forward_eager)(
        *kargs, k.get("bias"), s, write_lora=True))
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
    nu, = _cpu(nu_k)
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
        parts = {"y": excess_ratio(y, tr.y_hi, tr.y_lo, tr.y_bound, by),
                 "delta": excess_ratio(d, tr.d_hi, tr.d_lo, tr.d_bound, bd)}
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
        Target("compose.y", compose_examples, eval_compose_y, ("bf16", "fp16", "fp32"),
               "fused compose, y = g·(base + s·lora) + bias, one rounding"),
        Target("compose.delta", compose_examples, eval_compose_delta, ("bf16", "fp16", "fp32"),
               "fused compose, Δ = (g−1)·base + g·s·lora with fp32 g − 1"),
        Target("compose.backward", compose_examples, eval_compose_backward, ("bf16", "fp16", "fp32"),
               "compose backward: d_base, d_lora, d_g (save inputs/activation), bitwise determinism"),
        Target("lora_compose", lora_examples, eval_lora_compose, ("bf16", "fp16"),
               "compose with the LoRA up-projection fused in"),
        Target("norm", norm_examples, eval_norm, ("bf16", "fp16", "fp32"),
               "factored row norm ν, then g, g − 1 (dora_scale) and d_m"),
        Target("layer", layer_examples, _eval_kernels_layer, ("bf16", "fp16", "fp32"),
               "DoRALinear, the whole layer: y, dx, dA, dB, dm (bf16 W with bf16/fp32 adapters, fp16, fp32), "
               "bound of its stated steps"),
    ]
    ts += [Target(f"form.{n}", compose_examples, _form_evaluator(n), ("bf16", "fp16"), f.summary)
           for n, f in sorted(COMPOSE_FORMS.items())]
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
        raise ImplError(f"--impl {spec!r}: the built-in kernels and forms are certify's own targets "
                        "(--targets kernels / forms); --impl takes peft or module:callable")
    impl, = load_impl(spec)
    if impl.contract != "faithful":
        raise ImplError(f"--impl {spec!r}: contract {impl.contract!r} has no a-priori bound to certify against")
    name = "".join(c if c.isalnum() or c in "_-" else "_" for c in impl.name)
    dtypes = tuple(d for d in ("bf16", "fp16", "fp32") if d in impl.dtypes)
    ts = []
    if impl.compose is not None:
        ts.append(Target(f"{name}.compose", compose_examples, _impl_compose_evaluator(impl), dtypes,
                         f"{impl.name}: compose y, faithful contract (≤ 1 ulp of the exact y)"))
    if impl.norm is not None:
        ts.append(Target(f"{name}.norm", norm_examples, _impl_norm_evaluator(impl), dtypes,
                         f"{impl.name}: row norm ν, faithful contract (≤ 1e-6 relative per row)"))
    if impl.layer is not None:
        ts.append(Target(f"{name}.layer", layer_examples, _layer_evaluator(impl), dtypes,
                         f"{impl.name}: whole layer y, dx, dA, dB, dm, faithful layer contract "
                         "(layer_oracle.faithful_layer_bounds)"))
    if not ts:
        raise ImplError(f"--impl {spec!r}: nothing to certify: certify takes an implementation with a compose, a norm "
                        "or a layer factory (dora_verify.adapter)")
    return {t.name: t for t in ts}


def _target_table(impl: "str | None") -> dict:
    return TARGETS if impl is None else impl_targets(impl)


# ----------------------------------------------------------------------------- corpus
def _tensor_to_np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _case_name(target: str, ex: Example) -> str:
    h = hashlib.sha1()
    h.update(target.encode())
    for k in sorted(ex.tensors):
        h.update(k.encode())
        h.update(_tensor_to_np(ex.tensors[k]).tobytes())
    h.update(json.dumps(ex.scalars, sort_keys=True).encode())
    return f"{target}-{ex.dtype}-{h.hexdigest()[:10]}"


def save_case(target: str, ex: Example, score: Score, corpus: "str | Path", meta: "dict | None" = None) -> Path:
    """Write ``<target>-<dtype>-<hash>.npz`` (the input tensors, bit-exact) and ``.json`` into ``corpus``."""
    folder = Path(corpus)
    folder.mkdir(parents=True, exist_ok=True)
    name = _case_name(target, ex)
    arrays = {k: _tensor_to_np(v) for k, v in ex.tensors.items()}
    doc = {"target": target, "kind": ex.kind, "dtype": ex.dtype, "scalars": ex.scalars, "params": ex.params,
           "tensors": {k: str(v.dtype).removeprefix("torch.") for k, v in ex.tensors.items()},
           "score": {"ratio": score.ratio, "ulp": score.ulp, "parts": score.parts, "info": score.info}, **(meta or {})}
    atomic_write(folder / f"{name}.npz", lambda fh: np.savez(fh, **arrays))
    atomic_write(folder / f"{name}.json",
                  lambda fh: fh.write(json.dumps(_finite_json(doc), indent=1, allow_nan=False).encode()))
    return folder / f"{name}.json"


def _finite_json(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v) for v in obj]
    return obj


def load_case(path: "str | Path"):
    """(target name, Example, document) of a corpus case (``.json`` path; the ``.npz`` sits beside it)."""
    path = Path(path)
    doc = json.loads(path.read_text())
    data = np.load(path.with_suffix(".npz"))
    tensors = {}
    for k, dt in doc["tensors"].items():
        a = torch.from_numpy(np.array(data[k]))
        tensors[k] = a.view(torch.bfloat16) if dt == "bfloat16" else a
    return doc["target"], Example(doc["kind"], doc["dtype"], tensors, doc["scalars"], doc["params"]), doc


def replay(path: "str | Path", device="cpu", tier=None) -> Score:
    """Re-run a corpus case on ``device`` (default tier: fused on CUDA, eager elsewhere)."""
    target, ex, doc = load_case(path)
    return _target_table(doc.get("impl"))[target].evaluate(ex, torch.device(device),
                                                           tier or default_tier(torch.device(device)))


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


# ----------------------------------------------------------------------------- search
def _example_key(ex: Example) -> str:
    """Content hash of an example (tensor bits and scalars): two draws of the same input are one case."""
    return _case_name("", ex)


# Which dimension of each tensor runs over the tokens (rows) and over the output features (columns), per example
# kind: what a restriction slices. A kind not listed (the layer's) is not restricted.
_AXES = {
    "compose": {"base": (0, 1), "lora": (0, 1), "dy": (0, 1), "g": (None, 0), "g_minus_1": (None, 0), "bias": (None, 0)},
    "lora": {"base": (0, 1), "xa": (0, None), "B": (None, 0), "g": (None, 0), "bias": (None, 0)},
    "norm": {"W": (None, 0), "B": (None, 0), "A": (None, None)},
}


def _extent(ex: Example) -> "tuple[int, int] | None":
    """(rows, columns) of an example that :func:`restrict` can slice, or None."""
    axes = _AXES.get(ex.kind)
    if not axes:
        return None
    rows = cols = None
    for name, (ra, ca) in axes.items():
        t = ex.tensors.get(name)
        if t is not None:
            rows = t.shape[ra] if ra is not None else rows
            cols = t.shape[ca] if ca is not None else cols
    return (rows or 1, cols or 1)


def restrict(ex: Example, rows: tuple, cols: tuple) -> Example:
    """The example on rows ``rows`` = (start, stop) of the tokens and columns ``cols`` of the output features: every
    tensor sliced along its token and feature dimensions (``_AXES``), the rest kept. The kernels are elementwise in
    the output (compose), per output row (the norm) or per column reduction over the kept rows (the backward's d_g):
    a restriction evaluates the same function on a sub-problem."""
    tensors = {}
    for name, t in ex.tensors.items():
        ra, ca = _AXES[ex.kind].get(name, (None, None))
        idx = [slice(None)] * t.dim()
        if ra is not None:
            idx[ra] = slice(*rows)
        if ca is not None:
            idx[ca] = slice(*cols)
        tensors[name] = t[tuple(idx)].clone()
    T, N = _extent(ex)
    params = dict(ex.params, restricted={"rows": list(rows), "cols": list(cols), "of": [T, N]})  # drawn, then sliced
    return Example(ex.kind, ex.dtype, tensors, dict(ex.scalars), params)


def shrink_restriction(ex: Example, score: Score, evaluate, tol: float = 1e-3, max_evals: int = 64):
    """Shrink a kept case by halving its rows and columns while its worst error/bound ratio stays within a factor
    (1 − ``tol``) of ``score.ratio`` (an infinite ratio must stay infinite): the smallest sub-problem that still
    shows the finding, for a case hypothesis did not shrink (a non-violating worst case) or shrank only within its
    strategy. ``evaluate(example) -> Score``; a restriction that raises is not taken. Returns (example, score,
    evaluations)."""
    ext = _extent(ex)
    if ext is None:
        return ex, score, 0
    keep = (lambda r: math.isinf(r)) if math.isinf(score.ratio) else (lambda r: r >= score.ratio * (1 - tol))
    rng = [[0, ext[0]], [0, ext[1]]]
    evals = 0
    changed = True
    while changed and evals < max_evals:
        changed = False
        for axis in (0, 1):
            a, b = rng[axis]
            if b - a < 2:
                continue
            mid = (a + b) // 2
            for half in ((a, mid), (mid, b)):
                trial = [list(rng[0]), list(rng[1])]
                trial[axis] = list(half)
                cand = restrict(ex, tuple(trial[0]), tuple(trial[1]))
                evals += 1
                try:
                    sc = evaluate(cand)
                except Exception:  # noqa: BLE001 - e.g. an oracle range check on the sub-problem: not taken
                    continue
                if keep(sc.ratio):
                    rng, score, changed = trial, sc, True
                    break
    if rng == [[0, ext[0]], [0, ext[1]]]:
        return ex, score, evals
    return restrict(ex, tuple(rng[0]), tuple(rng[1])), score, evals


class _Tracker:
    """Everything a search saw: every ratio, the largest parts, the top ``keep`` distinct cases, and the distinct
    violations (each the last — shrunk — violating example of its round)."""

    def __init__(self, keep: int):
        self.keep = keep
        self.ratios: list = []
        self.max_ulp = 0.0
        self.parts: dict = {}
        self.info: dict = {}
        self.top: list = []  # (ratio, key, Example, Score), highest first, distinct keys
        self.violations: list = []  # (key, Example, Score), distinct keys, in the order found
        self.round_violation = None  # the latest violating example of the running round
        self.rejected = 0
        self.shrink_evaluations = 0  # evaluations hypothesis made while shrinking (outside the budget)

    def add(self, ex: Example, score: Score) -> None:
        self.ratios.append(score.ratio)
        self.max_ulp = max(self.max_ulp, score.ulp)
        for k, v in score.parts.items():
            self.parts[k] = max(self.parts.get(k, 0.0), v)
        for k, v in score.info.items():
            if isinstance(v, str):
                self.info[k] = v
            elif isinstance(v, bool):
                self.info[k] = self.info.get(k, True) and v
            else:
                self.info[k] = max(self.info.get(k, v), v)
        if score.ratio > 1:
            self.round_violation = (ex, score)  # hypothesis runs the shrunk case last
        if len(self.top) < self.keep or score.ratio > self.top[-1][0]:
            key = _example_key(ex)
            if all(key != t[1] for t in self.top):
                self.top.append((score.ratio, key, ex, score))
                self.top.sort(key=lambda e: -e[0])
                del self.top[self.keep:]

    def end_round(self) -> bool:
        """Keep the round's (shrunk) violation if it is a new case; whether the round had one."""
        found, self.round_violation = self.round_violation, None
        if found is not None:
            key = _example_key(found[0])
            if all(key != v[0] for v in self.violations):
                self.violations.append((key, *found))
        return found is not None


def ratio_summary(ratios: list) -> dict:
    """Quantiles and a log10 histogram of per-example worst ratios (the report's tightness picture)."""
    if not ratios:
        return {"n": 0}
    a = np.asarray(ratios, dtype=np.float64)
    fin = a[np.isfinite(a)]
    pos = np.log10(np.clip(fin, 1e-300, None))
    hist, labels = [], []
    lo = -math.inf
    for e in HIST_EDGES:
        hist.append(int(((pos > lo) & (pos <= e) & (fin > 0)).sum()) if lo > -math.inf else int(((pos <= e) | (fin == 0)).sum()))
        labels.append(f"≤{10.0**e:.0e}" if lo == -math.inf else f"({10.0**lo:.2g}, {10.0**e:.2g}]")
        lo = e
    hist.append(int((a > 1).sum()))
    labels.append(">1")
    q = lambda p: float(np.quantile(a, p)) if np.isfinite(a).all() else float(np.quantile(fin, p)) if fin.size else math.inf  # noqa: E731
    return {"n": int(a.size), "max": float(a.max()), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99),
            "histogram": dict(zip(labels, hist))}


def _evaluate_guarded(tg, ex: Example, device, tier) -> Score:
    """``tg.evaluate`` for the shrinker: a crash scores inf (as in the search), a rejected input raises."""
    guard = CaseGuard()
    try:
        with guard:
            return tg.evaluate(ex, device, tier)
    except Reject:
        raise
    except BaseException as e:  # noqa: BLE001 - as the search scores a crash
        if guard.interrupted:
            raise
        return Score(math.inf, math.inf, {"error": math.inf}, {"error": crash_reason(e)})


def search(target: str, dtype: str, *, examples: int = 200, seconds: "float | None" = None, seed: int = 0,
           derandomize: bool = True, device="cpu", tier: "str | None" = None, keep: int = 3,
           corpus: "str | Path | None" = None, meta: "dict | None" = None, progress=None,
           impl: "str | None" = None) -> dict:
    """Targeted search on one (target, dtype); returns its result dict (see :func:`run_certify`). ``impl``: the
    ``--impl`` spec whose targets (:func:`impl_targets`) ``target`` names; None for the built-in targets."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, reject, settings
    from hypothesis import seed as hseed
    from hypothesis import target as htarget
    from hypothesis.errors import HypothesisException

    table = _target_table(impl)
    if target not in table or dtype not in table[target].dtypes:
        raise ValueError(f"unknown (target, dtype) {target!r}/{dtype!r}; targets: {', '.join(table)}")
    if examples <= 0:
        raise ValueError(f"examples must be positive, got {examples}")
    tg = table[target]
    device = torch.device(device)
    tier = tier or default_tier(device)
    if impl is None:
        check_tier(device, tier)
    tr = _Tracker(keep)
    t0 = time.monotonic()
    deadline = t0 + seconds if seconds else math.inf
    rounds = []

    def probe(ex):
        if tr.round_violation is None and (time.monotonic() > deadline or len(tr.ratios) >= examples):
            return  # budget spent: hypothesis finishes the round on no-ops (not while it shrinks a violation)
        if not all(bool(torch.isfinite(v).all()) for v in ex.tensors.values()):
            tr.rejected += 1
            reject()  # the oracles are defined on finite inputs; non-finite propagation is tested elsewhere
        guard = CaseGuard()
        try:
            with guard:
                score = tg.evaluate(ex, device, tier)
        except Reject:
            tr.rejected += 1
            reject()
        except BaseException as e:  # noqa: BLE001 - a crash on a valid input (sys.exit too) is a finding: shrink, keep it
            if guard.interrupted:  # a real Ctrl-C of the run stops it
                raise
            score = Score(math.inf, math.inf, {"error": math.inf}, {"error": crash_reason(e)})
        if tr.round_violation is not None:  # hypothesis is shrinking this round's violation: not the search's
            tr.shrink_evaluations += 1      # budget, ratios or top cases (its variants are one case)
            if score.ratio > 1:
                tr.round_violation = (ex, score)  # the last violating variant is the shrunk case
                raise BoundViolation(score)
            return
        tr.add(ex, score)
        if progress and len(tr.ratios) % 50 == 0:
            progress(len(tr.ratios), examples, f"{target}/{dtype} max ratio {max(tr.ratios):.3g}")
        htarget(min(score.ratio, 1e6), label="bound_ratio")
        htarget(min(score.ulp, 1e6), label="ulp")
        if score.ratio > 1:
            raise BoundViolation(score)  # hypothesis shrinks it; the search goes on in the next round

    # A violation ends its round (after hypothesis shrinks it) but not the search: the next rounds, seeded
    # seed + k (a fixed function of the seed, so a pre-merge run stays reproducible), spend the rest of the budget.
    k = 0
    while len(tr.ratios) < examples and time.monotonic() < deadline:
        fixed = derandomize and k == 0  # the derandomized round: the same examples every run
        n = examples - len(tr.ratios) if fixed else min(200, examples - len(tr.ratios))
        st_args = dict(max_examples=max(1, n), derandomize=fixed, database=None, deadline=None,
                       suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet,
                       phases=(Phase.generate, Phase.target, Phase.shrink), report_multiple_bugs=False)
        fn = given(tg.strategy(dtype))(probe)
        fn = settings(**st_args)(fn)
        if not fixed:
            fn = hseed(seed + k)(fn)
        before = len(tr.ratios)
        try:
            fn()
        except BoundViolation:
            pass
        except HypothesisException:  # e.g. a flaky replay of the violation: it is recorded all the same
            if tr.round_violation is None:
                raise
        violated = tr.end_round()
        rounds.append({"seed": None if fixed else seed + k, "examples": len(tr.ratios) - before,
                       "violation": violated})
        k += 1
        if len(tr.ratios) == before or (fixed and not violated):
            break  # nothing new to draw, or the derandomized round ran its whole budget
    summary = ratio_summary(tr.ratios)
    res = {"target": target, "dtype": dtype, "tier": tier if impl is None else None, "device": str(device), "examples": len(tr.ratios),
           "rejected": tr.rejected, "seconds": round(time.monotonic() - t0, 2), "derandomized": derandomize,
           "rounds": rounds, "max_ratio": summary.get("max", 0.0), "ratio": summary, "max_ulp": tr.max_ulp,
           "parts_max": tr.parts, "info": tr.info, "violation": bool(tr.violations),
           "violations": len(tr.violations), "shrink_evaluations": tr.shrink_evaluations, "corpus": []}
    if corpus is not None:
        seen = {key for key, _, _ in tr.violations}
        cases = [(ex, sc, "violation") for _, ex, sc in tr.violations]
        cases += [(ex, sc, "worst") for _, key, ex, sc in tr.top if key not in seen]
        shrunk, keys = [], set()
        for ex, sc, why in cases:  # every kept case shrunk (outside the budget), then de-duplicated again
            ex, sc, n = shrink_restriction(ex, sc, lambda e: _evaluate_guarded(tg, e, device, tier))
            res["shrink_evaluations"] += n
            key = _example_key(ex)
            if key not in keys:
                keys.add(key)
                shrunk.append((ex, sc, why))
        for ex, sc, why in shrunk:
            m = {"found_by": why, "tier": tier, "device": str(device), "derandomized": derandomize,
                 "rounds": rounds, **(meta or {}), **({"impl": impl} if impl else {})}
            res["corpus"].append(str(save_case(target, ex, sc, corpus, m)))
    return res


@dataclass
class CertifyConfig:
    targets: tuple = KERNEL_TARGETS
    dtypes: tuple = ("bf16", "fp16", "fp32")
    examples: int = 200
    seconds: "float | None" = None
    seed: int = 0
    derandomize: bool = True
    device: str = "auto"
    tier: "str | None" = None
    keep: int = 3
    corpus: "str | None" = None
    jobs: int = 1
    impl: "str | None" = None  # an --impl spec: ``targets`` then name its targets (impl_targets)

    def validate(self) -> None:
        table = _target_table(self.impl)
        unknown = [t for t in self.targets if t not in table]
        if unknown or not self.targets:
            raise ValueError(f"unknown target(s) {unknown or list(self.targets)}; choose from {', '.join(table)}")
        for d in self.dtypes:
            if d not in ("bf16", "fp16", "fp32"):
                raise ValueError(f"unknown dtype {d!r}; choose from bf16, fp16, fp32")
        if self.examples <= 0:
            raise ValueError(f"examples must be positive, got {self.examples}")
        if self.seconds is not None and not self.seconds > 0:
            raise ValueError(f"seconds must be positive, got {self.seconds}")
        if self.jobs < 1:
            raise ValueError(f"jobs must be positive, got {self.jobs}")
        if self.tier not in (None, "fused", "eager"):
            raise ValueError(f"tier must be 'fused' or 'eager', got {self.tier!r}")


def run_certify(cfg: CertifyConfig, progress=None) -> dict:
    """Search every (target, dtype) pair the target supports; the report dict (JSON-ready)."""
    from .provenance import provenance
    from .sweep import resolve_device

    cfg.validate()
    device = resolve_device(cfg.device)
    if cfg.impl is None:
        check_tier(device, cfg.tier or default_tier(device))
    prov = provenance(device, [cfg.impl] if cfg.impl else ())
    meta = {"commit": prov.get("git", {}).get("commit"), "versions": prov.get("versions"),
            "device_name": prov.get("device", {}).get("name", prov.get("device", {}).get("cpu"))}
    results = []
    table = _target_table(cfg.impl)
    pairs = [(t, d) for t in cfg.targets for d in cfg.dtypes if d in table[t].dtypes]
    if not pairs:
        raise ValueError("no (target, dtype) pair to run: the chosen targets support none of the chosen dtypes")
    kw = dict(examples=cfg.examples, seed=cfg.seed, derandomize=cfg.derandomize, device=str(device), tier=cfg.tier,
              keep=cfg.keep, corpus=cfg.corpus, meta=meta, impl=cfg.impl)
    if cfg.jobs > 1:  # one process per (target, dtype): spawn, so CUDA initialises cleanly in each
        import concurrent.futures as cf
        import multiprocessing as mp

        secs = cfg.seconds and cfg.seconds * min(cfg.jobs, len(pairs)) / len(pairs)
        threads = max(1, (os.cpu_count() or 1) // min(cfg.jobs, len(pairs)))  # the CPU oracles: no oversubscription
        with cf.ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=mp.get_context("spawn"),
                                    initializer=torch.set_num_threads, initargs=(threads,)) as pool:
            futs = [pool.submit(search, t, d, seconds=secs, **kw) for t, d in pairs]
            for i, f in enumerate(cf.as_completed(futs)):
                if progress:
                    progress(i, len(pairs), f"{f.result()['target']}/{f.result()['dtype']}")
            results = [f.result() for f in futs]
    for i, (t, d) in enumerate(pairs if cfg.jobs <= 1 else ()):
        if progress:
            progress(i, len(pairs), f"{t}/{d}")
        results.append(search(t, d, seconds=cfg.seconds and cfg.seconds / len(pairs), **kw))
    if progress:
        progress(len(pairs), len(pairs), "done")
    empty = [r for r in results if r["examples"] == 0]
    if empty:
        raise CertifyError("nothing certified: 0 examples ran for " + ", ".join(
            f"{r['target']}/{r['dtype']} ({r['rejected']} drawn inputs rejected)" for r in empty)
            + "; raise --seconds (or --examples) so that every target runs an example")
    return {"kind": "certify", "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
            "provenance": prov, "results": results,
            "certified": not any(r["violation"] for r in results),
            "max_ratio": max(r["max_ratio"] for r in results)}


def certify_markdown(rep: dict) -> str:
    from .report import _fmt, _table

    p = rep["provenance"]
    lines = ["# dora-verify certify", "",
             f"Device: {p.get('device', {}).get('name', p.get('device', {}).get('cpu', '?'))}; commit {p.get('git', {}).get('commit', '?')}; "
             f"torch {p.get('versions', {}).get('torch', '?')}, triton {p.get('versions', {}).get('triton', '?')}; "
             f"{'derandomized (pre-merge)' if rep['config']['derandomize'] else 'seeded rounds from ' + str(rep['config']['seed'])}.",
             *(["", f"Implementation under test: `--impl {rep['config']['impl']}`, held to the faithful contract "
                "(docs/gate.md): y within 1 ulp of the exact y of the rounded inputs, ν within 1e-6 relative per row, "
                "a layer within the faithful layer contract (layer_oracle.faithful_layer_bounds)."]
               if rep["config"].get("impl") else []),
             "", f"**{'CERTIFIED' if rep['certified'] else 'VIOLATION FOUND'}**: largest error/bound ratio "
             f"{_fmt(rep['max_ratio'])} (≤ 1 certifies; ratio = (|error| − oracle bound) / a-priori bound, worst element "
             f"of each example).", ""]
    rows = [[r["target"], r["dtype"], r["tier"], r["examples"], r["max_ratio"], r["ratio"].get("p50"),
             r["ratio"].get("p99"), r["max_ulp"], r.get("violations", int(r["violation"])), r["seconds"]]
            for r in rep["results"]]
    lines += [_table(["target", "dtype", "tier", "examples", "max ratio", "p50", "p99", "max ulp / unit",
                      "violations (distinct, shrunk)", "time s"], rows), ""]
    crashed = [r for r in rep["results"] if isinstance(r.get("info", {}).get("error"), str)]
    if crashed:
        lines += ["**Crashes** (anything the implementation raised, `SystemExit` included, or an output that breaks "
                  "the protocol; each is a finding):", ""]
        lines += [f"- {r['target']}/{r['dtype']}: {r['info']['error']}" for r in crashed] + [""]
    lines += ["Per output (max ratio):", ""]
    lines += [f"- {r['target']}/{r['dtype']}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in r["parts_max"].items())
              for r in rep["results"]]
    lines += ["", "Histogram of per-example worst ratios (how tight the bounds are):", ""]
    labels = next((list(r["ratio"]["histogram"]) for r in rep["results"] if "histogram" in r["ratio"]), [])
    lines += [_table(["target", "dtype"] + labels,
                     [[r["target"], r["dtype"]] + list(r["ratio"].get("histogram", {}).values()) for r in rep["results"]])]
    lines += ["", "`max ulp / unit`: max ULP error of the main output (compose, forms), or for `norm` the max relative "
              "error of ν in units of 2⁻²⁴."]
    return "\n".join(lines) + "\n"


def write_certify_report(rep: dict, out_dir) -> list:
    from .report import write_bundle

    return write_bundle(rep, out_dir, lambda files: certify_markdown(rep), json_name="certify.json",
                        md_name="certify.md")


__all__ = ["BoundViolation", "CertifyConfig", "CertifyEnvironmentError", "CertifyError", "check_tier", "KERNEL_TARGETS", "LAYER_TARGETS", "Score", "TARGETS", "impl_targets", "load_case", "replay",
           "run_certify", "save_case", "search", "write_certify_report"]
