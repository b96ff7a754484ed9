"""``dora-verify gate``: a pre-merge numerical CI gate for DoRA implementations.

It runs a fixed, seeded suite (:func:`build_suite`: compose cases over every regime, g mode, prime and
block ± 1 shape; factored-norm cases with near-cancelling rows; NaN/Inf and overflow cases; whole-layer cases —
y and the gradients of x, A, B, m of a layer built by the implementation's factory, in the dtype mixes bf16 W with
fp32 adapters, all bf16, fp16, fp32) through one or more implementations (:mod:`dora_verify.adapter`), scores every
output against the exact oracle of the rounded inputs (:mod:`dora_verify.layer_oracle` for the layer, ν detached)
and applies two kinds of criteria:

**Hard** (any one fails the gate): an error/bound ratio above 1 (the implementation's a-priori bound:
``bounds.compose_kernel_bounds``/``kernel_norm_bound``/``compose_backward_bounds`` for this project's kernels and
``layer_oracle.layer_step_bounds`` of DoRALinear's stated steps for its layer, ``compose_form_bounds`` for the forms,
1 ulp of the output dtype (y) or 1e-6 relative (ν) for a user's 'faithful' implementation, and
``layer_oracle.faithful_layer_bounds`` for a user's layer); a NaN/Inf mismatch with the oracle (a non-finite
output where the exact result is finite and in range, or not the IEEE ±Inf/NaN where it is not); different bits on
a repeated call of an implementation that claims determinism; a crash; a FlashAttention-style ratio above
``fa_limit`` — the implementation's max error over the plain low-precision baseline's (``forms.stable_gcast`` for
y: eager DoRA in the activation dtype as PEFT/torchtune compute it; ``forms.peft_dense`` for ν), the denominator
floored at the error of the correctly rounded result (compose and norm outputs only). A suite that could not run
(no cases, an implementation no case applies to, no GPU when one was required) fails too: the gate never passes on
nothing.

**Isolation**: every call of an implementation gets its own copies of the inputs, and its outputs are copied
before they are scored: the oracle, the bounds and the plain baseline only ever see the suite's own tensors.
A crash is anything the call raises (``SystemExit`` and ``KeyboardInterrupt`` included: only a real Ctrl-C of
the process stops the run), an output that is not a tensor of the right shape and dtype, or a case past
``GateConfig.case_timeout`` seconds (SIGALRM; see ``adapter.CaseGuard``).

**Baseline** (per implementation × output × dtype × device class × shape class): max ULP, p99 and max
bound ratio, fraction correctly rounded, compared with a committed baseline file within its stated slack
(|new − old| ≤ abs + rel·|old|). A regression beyond the slack fails; so does an improvement (a ratchet:
regenerate the baseline with ``--update-baseline``, never by hand). A baseline made in a different
environment (device class, torch/triton minor version, suite fingerprint, implementation) is refused
unless explicitly allowed.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import bounds
from .adapter import CaseGuard, Implementation, check_output, crash_reason, kernels_impl
from .formats import parse_format, ulp
from .metrics import excess_error, flash_ratio, quantile, same_bits
from .oracles import compose_grad_truth, compose_truth, row_norm_truth
from .strategies import COMMON_S, COMPOSE_REGIMES, G_MODES, NORM_REGIMES, Example, compose_example, norm_example

F64 = torch.float64
SUITE_VERSION = 3  # 2: norm cases from ordered float64 sums (the same bits on every CPU); 3: whole-layer cases
BASELINE_FORMAT = "dora-verify-gate-baseline/1"
DEFAULT_SLACK = {
    "max_ulp": (1e-3, 1e-2),
    "p99_ratio": (1e-3, 1e-2),
    "max_ratio": (1e-3, 1e-2),
    "frac_correctly_rounded": (1e-4, 0.0),
}  # (absolute, relative)
LOWER_IS_BETTER = {"max_ulp": True, "p99_ratio": True, "max_ratio": True, "frac_correctly_rounded": False}
DTYPES = ("bf16", "fp16", "fp32")
OPS = ("compose", "backward", "norm", "layer")  # --ops: the checks a subset runs (compose includes the NaN/Inf cases)
DEFAULT_FA_LIMIT = 2.0
DEFAULT_CASE_TIMEOUT = 300.0  # seconds per (implementation, case): generous, only a hang reaches it
ENV_KEYS = ("device_class", "torch", "triton", "suite", "suite_version", "impls", "mode")
NONFINITE_KINDS = ("nonfinite_where_finite", "finite_where_nonfinite", "wrong_nonfinite")
NORM_FAITHFUL_REL = bounds.FAITHFUL_NORM_REL
COMPOSE_SHAPES = ((1, 1), (3, 13), (16, 256), (17, 257), (33, 129), (64, 509), (31, 127), (15, 255))
NORM_SHAPES = (
    (7, 31, 4),
    (64, 129, 8),
    (131, 257, 16),
    (63, 513, 33),
    (128, 128, 64),
    (3, 5, 2),
    (129, 255, 17),
    (65, 511, 7),
)
# (T, d_out, d_in, r, alpha) of the layer cases; alpha / r is exact in fp32
LAYER_SHAPES = (
    (7, 33, 65, 4, 8.0),
    (16, 64, 128, 8, 16.0),
    (33, 129, 257, 16, 8.0),
    (5, 17, 31, 3, 0.75),
    (17, 96, 80, 8, 4.0),
    (9, 65, 129, 7, 14.0),
    (32, 48, 64, 4, 8.0),
    (3, 31, 47, 2, 1.0),
    (11, 80, 96, 8, 16.0),
)
LAYER_CASE_REGIMES = (
    "trained",
    "exact_one",
    "cancel",
    "zero_rows",
    "below_bf16",
    "large",
    "positive",
    "fresh",
    "heavy",
)
LAYER_MIXES = {"bf16": ("bf16", "fp32"), "fp16": ("fp16",), "fp32": ("fp32",)}  # adapter dtypes per activation dtype
LAYER_OUTPUTS = ("y", "dx", "dA", "dB", "dm")


# ----------------------------------------------------------------------------- the suite
@dataclass
class Case:
    """One suite entry: ``check`` 'compose' | 'nonfinite' | 'norm' | 'backward' | 'layer', a stable ``id``."""

    id: str
    check: str
    example: Example
    shape_class: str


def _shape_class(*dims) -> str:
    return "aligned" if all(d % 16 == 0 for d in dims) else "ragged"


def _compose_cases(dtype: str, n: int, seed: int):
    out = []
    for i in range(n):
        T, N = COMPOSE_SHAPES[i % len(COMPOSE_SHAPES)]
        regime = COMPOSE_REGIMES[i % len(COMPOSE_REGIMES)]
        g_mode = G_MODES[(i // len(COMPOSE_REGIMES) + i) % len(G_MODES)]
        planted = [(i, 3 * i, 0x0001, 0x8001), (i + 1, i, 0x8000, 0x0003)] if i % 5 == 0 and dtype != "fp32" else []
        ex = compose_example(
            dtype,
            COMMON_S[i % len(COMMON_S)],
            T,
            N,
            regime,
            seed + i,
            (-6, 0, 3, 9)[i % 4],
            (-4, 2, -9, 0)[i % 4],
            g_mode,
            3 * i,
            planted,
            bias=i % 2 == 1,
        )
        out.append(Case(f"compose-{dtype}-{i:02d}", "compose", ex, _shape_class(T, N)))
    return out


def _nonfinite_cases(dtype: str, seed: int):
    """NaN, ±Inf inputs and results beyond the format's range (the exact y overflows: RN gives ±Inf)."""
    fmt = parse_format(dtype)
    ex = compose_example(dtype, 2.0, 5, 17, "normal", seed, 0, 0, "spread", 1, bias=True)
    b, lo, g = ex.tensors["base"], ex.tensors["lora"], ex.tensors["g"]
    b[0, 0], lo[0, 1] = float("nan"), float("nan")
    b[1, 2], lo[1, 3] = float("inf"), float("-inf")
    b[2, 4], lo[2, 4] = float("inf"), float("-inf")  # Inf + (−Inf): NaN
    b[3, 5] = fmt.max_finite  # with g = 2: beyond the range
    g[5] = 2.0
    b[4, 6], lo[4, 6] = -fmt.max_finite, -fmt.max_finite / 4  # s·lora adds half the range again
    return [Case(f"nonfinite-{dtype}-00", "nonfinite", ex, "ragged")]


def _norm_cases(dtype: str, n: int, seed: int):
    out = []
    for i in range(n):
        d_out, d_in, r = NORM_SHAPES[i % len(NORM_SHAPES)]
        regime = NORM_REGIMES[i % len(NORM_REGIMES)]
        cancel = [(j * 5 + i, -(3 * j + i) % 30) for j in range(i % 3)]
        ex = norm_example(dtype, COMMON_S[(i + 2) % len(COMMON_S)], d_out, d_in, r, 3, regime, seed + 100 + i, cancel)
        if ex is not None:
            out.append(Case(f"norm-{dtype}-{i:02d}", "norm", ex, _shape_class(d_out, d_in, r)))
    return out


def _layer_cases(dtype: str, n: int, seed: int):
    """Whole-layer cases (forward and backward) in every dtype mix users run: W, x and bias in ``dtype`` with
    adapters (and m) in ``dtype`` and, for bf16, in fp32 (PEFT's default autocast_adapter_dtype)."""
    from .layer_oracle import layer_example

    out = []
    for adapter in LAYER_MIXES[dtype]:
        tag = "" if adapter == dtype else f"{adapter}ad-"
        for i in range(n):
            T, d_out, d_in, r, alpha = LAYER_SHAPES[i % len(LAYER_SHAPES)]
            regime = LAYER_CASE_REGIMES[i % len(LAYER_CASE_REGIMES)]
            ex = layer_example(dtype, adapter, T, d_out, d_in, r, alpha, regime, seed + 200 + i, bias=i % 3 != 2)
            out.append(Case(f"layer-{dtype}-{tag}{i:02d}", "layer", ex, _shape_class(T, d_out, d_in)))
    return out


def case_description(case: Case) -> str:
    """One line naming what a case is: check, dtype, shape, regime, g mode, adapters, bias, planted specials
    (``gate --list-cases``, gate.md's failures)."""
    p = case.example.params
    if case.check == "layer":
        shape = f"T {p['T']}, {p['d_in']} → {p['d_out']}, r {p['r']}, {p['adapter']} adapters"
    elif case.check == "norm":
        shape = f"W {p['d_out']}×{p['d_in']}, r {p['r']}"
    else:
        shape = f"{p['T']}×{p['N']}"
    bits = [case.check, case.example.dtype, shape, case.shape_class, f"regime {p['regime']}"]
    bits += [f"g {p['g_mode']}"] if "g_mode" in p and case.check != "norm" else []
    bits += ["bias" if p["bias"] else "no bias"] if "bias" in p else []
    for key, what in (("planted", "planted special"), ("cancel_rows", "near-cancelling row")):
        n = len(p.get(key) or ())
        bits += [f"{n} {what}{'s' if n > 1 else ''}"] if n else []
    return ", ".join(bits)


def build_suite(
    dtypes=("bf16", "fp16", "fp32"),
    seed: int = 0,
    n_compose: int = 24,
    n_norm: int = 8,
    n_backward: int = 8,
    n_layer: int = 9,
) -> "list[Case]":
    """The fixed suite: deterministic in (dtypes, seed, sizes) — no hypothesis, only seeded torch generators."""
    cases = []
    for d in dtypes:
        comp = _compose_cases(d, n_compose, seed)
        cases += comp
        cases += [
            Case(c.id.replace("compose", "backward"), "backward", c.example, c.shape_class) for c in comp[:n_backward]
        ]
        cases += _nonfinite_cases(d, seed)
        cases += _norm_cases(d, n_norm, seed)
        cases += _layer_cases(d, n_layer, seed)
    return cases


def suite_fingerprint(cases) -> str:
    """sha256 over every case's id and input bits: two runs compare only if their suites are identical."""
    h = hashlib.sha256(f"suite-v{SUITE_VERSION}".encode())
    for c in cases:
        h.update(c.id.encode())
        for k in sorted(c.example.tensors):
            t = c.example.tensors[k].contiguous()
            h.update(k.encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        h.update(repr(sorted(c.example.scalars.items())).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- scoring
@dataclass
class Outcome:
    """Per (case, output): element ratios (tensor or None), and the case's scalars."""

    output: str
    ratios: "torch.Tensor | None" = None
    max_ulp: float = 0.0
    correctly_rounded: "tuple[int, int] | None" = None  # (count, elements)
    fa_ratio: "float | None" = None
    nonfinite: dict = field(default_factory=dict)  # _nonfinite_mismatch's counts (NONFINITE_KINDS) and 'first'
    nondeterministic: bool = False
    crash: "str | None" = None

    @property
    def nonfinite_mismatch(self) -> int:
        return sum(self.nonfinite.get(k, 0) for k in NONFINITE_KINDS)


def _fresh(t: dict, keys, device) -> list:
    """New copies of the suite's tensors ``keys`` on ``device`` for one call: what the implementation does to
    its inputs never reaches the suite, the oracle or the next call. A missing key gives None."""
    return [t[k].to(device, copy=True) if k in t else None for k in keys]


def _to_cpu(x):
    """A CPU copy (never an alias of an input or of a buffer the implementation reuses on its next call)."""
    return x.detach().to("cpu", copy=True)


def _fa_ratio(err, plain_err, floor) -> float:
    """FlashAttention-style ratio (metrics.flash_ratio) with the baseline's error floored at the correctly rounded
    result's: a correctly rounded implementation scores ≤ 1."""
    mx = lambda t: float(t.max()) if t.numel() else 0.0  # noqa: E731
    return flash_ratio(mx(err), max(mx(plain_err), mx(floor)))


def _nonfinite_mismatch(y: torch.Tensor, expect: torch.Tensor) -> dict:
    """Where y's NaN/±Inf pattern differs from the oracle's ``expect`` (compared as given: callers round it to
    y's dtype where that is the contract). Counts per NONFINITE_KINDS — NaN/Inf where the oracle is finite,
    finite where it is NaN/Inf, the wrong non-finite (NaN for ±Inf or the reverse, a wrong-signed Inf) — and
    'first': the first such element, 'index [i, j]: got G, oracle E' (None when there is none)."""
    e, y = expect.to(F64), y.to(F64)
    yf, ef = torch.isfinite(y), torch.isfinite(e)
    wrong = (torch.isnan(y) != torch.isnan(e)) | (torch.isinf(y) & torch.isinf(e) & (y != e))
    kinds = {
        "nonfinite_where_finite": ~yf & ef,
        "finite_where_nonfinite": yf & ~ef,
        "wrong_nonfinite": ~yf & ~ef & wrong,
    }
    out = {k: int(m.sum()) for k, m in kinds.items()}
    bad = kinds["nonfinite_where_finite"] | kinds["finite_where_nonfinite"] | kinds["wrong_nonfinite"]
    out["first"] = None
    if bool(bad.any()):
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        out["first"] = f"index {list(idx)}: got {float(y[idx])!r}, oracle {float(e[idx])!r}"
    return out


def _score_compose(impl: Implementation, case: Case, device) -> "list[Outcome]":
    from .forms import stable_gcast

    ex = case.example
    t, s = ex.tensors, ex.scalars["s"]

    def call():
        b, lo, g, bias = _fresh(t, ("base", "lora", "g", "bias"), device)
        return _to_cpu(check_output("compose", impl.compose(b, lo, g, s, bias), t["base"].shape, t["base"].dtype))

    y = call()
    fmt = parse_format(ex.dtype)
    out = Outcome("y")
    if impl.deterministic:
        out.nondeterministic = not same_bits(y, call())
    b64, l64, g64 = t["base"].to(F64), t["lora"].to(F64), t["g"].to(F64)[None, :]
    expect = g64 * (b64 + s * l64) + (t["bias"].to(F64)[None, :] if "bias" in t else 0)
    out.nonfinite = _nonfinite_mismatch(y, expect.to(y.dtype))
    if case.check == "nonfinite":
        return [out]
    tr = compose_truth(t["base"], t["lora"], t["g"], s, t.get("bias"))
    in_range = tr.y.abs() <= fmt.max_finite
    y64 = y.to(F64)
    ok = in_range & torch.isfinite(y64)
    err = torch.where(ok, excess_error(y, tr.y_hi, tr.y_lo, tr.y_bound), torch.zeros_like(y64))
    u = ulp(tr.y, fmt)
    out.max_ulp = float((err / u).max()) if err.numel() else 0.0
    cr = ok & (y64 == tr.y_round.nearest)
    out.correctly_rounded = (int(cr.sum()), int(in_range.sum()))
    if impl.contract == "kernel":
        _, bound = bounds.compose_kernel_bounds(t["base"], t["lora"], t["g"], s, t.get("bias"))
    elif impl.contract == "form":
        _, bound = bounds.compose_form_bounds(impl.form, t["base"], t["lora"], t["g"], s, t.get("bias"))
    elif impl.contract == "faithful":
        bound = u
    else:
        bound = None
    if bound is not None:
        out.ratios = torch.where(err == 0, torch.zeros_like(err), err / bound)[in_range]
    plain = stable_gcast(t["base"], t["lora"], t["g"], s, t.get("bias"))[0]
    plain_err = torch.where(
        in_range & torch.isfinite(plain.to(F64)), excess_error(plain, tr.y_hi, tr.y_lo, tr.y_bound), 0
    )
    floor = excess_error(tr.y_round.nearest, tr.y_hi, tr.y_lo, tr.y_bound)[in_range]
    out.fa_ratio = _fa_ratio(err, plain_err, floor)
    return [out]


def _score_norm(impl: Implementation, case: Case, device) -> "list[Outcome]":
    from .forms import peft_dense

    ex = case.example
    t, s = ex.tensors, ex.scalars["s"]

    def call():
        return _to_cpu(check_output("norm", impl.norm(*_fresh(t, ("W", "A", "B"), device), s), (t["W"].shape[0],)))

    nu = call()
    out = Outcome("nu")
    if impl.deterministic:
        out.nondeterministic = not same_bits(nu, call())
    tr = row_norm_truth(t["W"], t["A"], t["B"], s)
    out.nonfinite = _nonfinite_mismatch(nu, tr.nu)  # ν is always finite: any NaN/Inf is a mismatch
    nu64 = nu.to(F64)
    err = torch.where(torch.isfinite(nu64), ((nu64 - tr.nu).abs() - tr.bound).clamp_min(0), torch.zeros_like(nu64))
    u32 = ulp(tr.nu, "fp32")
    out.max_ulp = float((err / u32).max())
    if impl.contract == "kernel":
        from .kernels import factored_row_norm

        backend = "triton" if (device.type == "cuda" and impl.tier != "eager") else "torch"
        _, info = factored_row_norm(*_fresh(t, ("W", "A", "B"), device), s, return_info=True, backend=backend)
        bound = bounds.kernel_norm_bound(t["W"], t["A"], t["B"], s, tr.nu, backend, info.recomputed_rows)
    elif impl.contract == "faithful":
        bound = NORM_FAITHFUL_REL * tr.nu.clamp_min(2.0**-126)
    else:
        bound = None
    if bound is not None:
        out.ratios = torch.where(err == 0, torch.zeros_like(err), err / bound)
    plain = peft_dense(t["W"], t["A"], t["B"], s).to(F64)
    plain_err = ((plain - tr.nu).abs() - tr.bound).clamp_min(0)
    floor = ((tr.nu.to(torch.float32).to(F64) - tr.nu).abs() - tr.bound).clamp_min(0)
    out.fa_ratio = _fa_ratio(err, plain_err, floor)
    return [out]


def _score_backward(impl: Implementation, case: Case, device) -> "list[Outcome]":
    """This project's compose backward (built-in kernels only): d_base, d_lora, d_g for both save modes."""
    from .kernels import compose

    ex = case.example
    t, s = ex.tensors, ex.scalars["s"]
    gt = compose_grad_truth(t["dy"], t["base"], t["lora"], t["g"], s)
    outs = []
    for save in impl.saves:

        def grads():
            b, lo, g, dy = _fresh(t, ("base", "lora", "g", "dy"), device)
            b, lo, g = (x.requires_grad_() for x in (b, lo, g))
            compose(b, lo, g, s, tier=impl.tier, save=save).backward(dy)
            return [_to_cpu(x) for x in (b.grad, lo.grad, g.grad)]

        first, again = grads(), grads()
        eb, el, eg = bounds.compose_backward_bounds(t["dy"], t["base"], t["lora"], t["g"], s, save=save)
        zero = torch.zeros((), dtype=F64)
        refs = {
            "d_base": (first[0], gt.d_base, zero, zero, eb, t["base"].dtype),
            "d_lora": (first[1], gt.d_lora_hi, gt.d_lora_lo, zero, el, t["lora"].dtype),
            "d_g": (first[2], gt.d_g, zero, gt.d_g_bound, eg, torch.float32),
        }
        for i, (name, (got, hi, lo, ob, bound, dt)) in enumerate(refs.items()):
            o = Outcome(f"{name}/{save}")
            o.nondeterministic = not same_bits(first[i], again[i])
            o.nonfinite = _nonfinite_mismatch(got, (hi + lo).to(got.dtype))
            err = excess_error(got, hi, lo, ob)
            err = torch.where(torch.isfinite(err), err, torch.zeros_like(err))
            o.ratios = torch.where(err == 0, torch.zeros_like(err), err / bound).flatten()
            o.max_ulp = float((err / ulp(hi + lo, parse_format(dt))).max()) if err.numel() else 0.0
            outs.append(o)
    return outs


@contextlib.contextmanager
def _fp32_accumulation(device):
    """The stated steps of this project's layer assume fp32 GEMM accumulation: on CUDA, torch's reduced-precision
    (split-K in bf16/fp16) reductions are turned off while a kernel-contract layer case runs, then restored."""
    if device.type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    old = (m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction, m.allow_tf32)
    m.allow_bf16_reduced_precision_reduction = m.allow_fp16_reduced_precision_reduction = m.allow_tf32 = False
    try:
        yield
    finally:
        m.allow_bf16_reduced_precision_reduction, m.allow_fp16_reduced_precision_reduction, m.allow_tf32 = old


def _layer_norm_steps(t: dict, s: float, device):
    """(backend, densely recomputed rows) of kernels.factored_row_norm on these W, A, B — what DoRALinear ran."""
    from .kernels import factored_row_norm
    from .kernels.dispatch import HAS_TRITON, fused_supported

    W, A, B = _fresh(t, ("W", "A", "B"), device)
    ok = HAS_TRITON and fused_supported("row_norm", (W.dtype, A.dtype, B.dtype), W.device)[0]
    backend = "triton" if (W.is_cuda and ok) else "torch"
    _, info = factored_row_norm(W, A, B, s, return_info=True, backend=backend)
    return backend, info.recomputed_rows


def run_layer(impl: Implementation, ex, device):
    """One call of a layer implementation on a layer example: fresh input copies, ``build_layer``, forward,
    ``backward(dy)``, ``check_output`` on y and each gradient (fp32 accumulation forced for the 'kernel' contract).
    Returns (outputs y, dx, dA, dB, dm on the CPU, the module)."""
    from .adapter import ImplOutputError, build_layer

    t, sc = ex.tensors, ex.scalars
    ad = parse_format(ex.params["adapter"]).torch_dtype
    T, N = t["dy"].shape
    guard = _fp32_accumulation if impl.contract == "kernel" else (lambda dev: contextlib.nullcontext())
    x, W, bias, A, B, m, dy = _fresh(t, ("x", "W", "bias", "A", "B", "m", "dy"), device)
    with guard(device):
        module, params = build_layer(
            impl.layer, W, bias, sc["r"], sc["alpha"], ad, {"lora_A": A, "lora_B": B, "magnitude": m}
        )
        x.requires_grad_(True)
        y = check_output("layer", module(x), (T, N), x.dtype)
        y.backward(dy)
    outs = {"y": y}
    for name, leaf, pname in (
        ("dx", x, "x"),
        ("dA", params["lora_A"], "lora_A"),
        ("dB", params["lora_B"], "lora_B"),
        ("dm", params["magnitude"], "magnitude"),
    ):
        if leaf.grad is None:
            raise ImplOutputError(f"the layer's {pname}.grad is None after y.backward(dy): no gradient reached it")
        outs[name] = check_output(f"the layer's {pname}.grad", leaf.grad, leaf.shape, leaf.dtype)
    return {k: _to_cpu(v) for k, v in outs.items()}, module


def _score_layer(impl: Implementation, case: Case, device) -> "list[Outcome]":
    """The whole layer through the implementation's factory: y and the gradients of x, lora_A, lora_B, magnitude
    against the exact layer (ν detached), held to the derived bound of DoRALinear's stated steps ('kernel') or to
    the faithful layer contract ('faithful')."""
    from .layer_oracle import faithful_layer_bounds, kernel_layer_steps, layer_step_bounds, layer_truth

    ex = case.example
    t, sc, adapter = ex.tensors, ex.scalars, ex.params["adapter"]
    s, eps = sc["s"], sc["eps"]
    suffix = "" if adapter == ex.dtype else f"/{adapter}-adapters"

    def run():
        return run_layer(impl, ex, device)[0]

    first = run()
    again = run() if impl.deterministic else None
    tr = layer_truth(t["x"], t["W"], t["A"], t["B"], t["m"], s, t.get("bias"), eps, dy=t["dy"])
    if impl.contract == "kernel":
        backend, dense = _layer_norm_steps(t, s, device)
        steps = kernel_layer_steps(ex.dtype, adapter, backend, dense)
        bnd = layer_step_bounds(steps, t["x"], t["W"], t["A"], t["B"], t["m"], s, t.get("bias"), eps, t["dy"], tr)
    elif impl.contract == "faithful":
        bnd = faithful_layer_bounds(
            tr,
            t["x"],
            t["W"],
            t["A"],
            t["B"],
            s,
            t.get("bias"),
            t["dy"],
            ex.dtype,
            first["dA"].dtype,
            first["dm"].dtype,
        )
    else:
        bnd = None
    outs = []
    zero = torch.zeros((), dtype=F64)
    for name in LAYER_OUTPUTS:
        got = first[name]
        if name == "y":
            hi, lo, ob = tr.y_hi, tr.y_lo, tr.y_bound
        else:
            hi, ob = tr.grads[name]
            lo = zero
        o = Outcome(name + suffix)
        if again is not None:
            o.nondeterministic = not same_bits(got, again[name])
        ref = hi + lo
        fmt = parse_format(got.dtype)
        o.nonfinite = _nonfinite_mismatch(got, ref.to(got.dtype))
        in_range = ref.abs() <= fmt.max_finite
        ok = in_range & torch.isfinite(got.to(F64))
        err = torch.where(ok, excess_error(got, hi, lo, ob), torch.zeros_like(ref))
        o.max_ulp = float((err / ulp(ref, fmt)).max()) if err.numel() else 0.0
        if bnd is not None:
            o.ratios = torch.where(err == 0, torch.zeros_like(err), err / bnd[name])[in_range]
        # no 'correctly rounded' fraction for the layer: no implementation that rounds its GEMM outputs is correctly
        # rounded, and in fp32 the fraction follows the BLAS summation order (threads, CPU), which a baseline must not
        outs.append(o)
    return outs


_SCORERS = {
    "compose": _score_compose,
    "nonfinite": _score_compose,
    "norm": _score_norm,
    "backward": _score_backward,
    "layer": _score_layer,
}
_CRASH_OUTPUT = {"compose": "y", "nonfinite": "y", "norm": "nu", "backward": "all", "layer": "all"}  # a crash's group


def _triton_installed() -> bool:
    from .kernels.dispatch import HAS_TRITON

    return bool(HAS_TRITON)


def _op(check: str) -> str:
    """The --ops name of a case's check (the NaN/Inf cases belong to compose: they score compose outputs)."""
    return "compose" if check == "nonfinite" else check


def is_subset(cfg) -> bool:
    """Whether a run covers only part of the suite (--dtypes, --ops): it compares with the baseline's groups in its
    scope and cannot rewrite the baseline."""
    return set(cfg.dtypes) != set(DTYPES) or set(cfg.ops) != set(OPS)


def _in_scope(key: str, config: dict) -> bool:
    """Whether a baseline group (impl|check.output|dtype|device|shapes) falls in a run's --dtypes/--ops scope."""
    parts = key.split("|")
    return len(parts) < 3 or (
        parts[2] in config.get("dtypes", DTYPES) and parts[1].split(".")[0] in config.get("ops", OPS)
    )


def _applies(impl: Implementation, case: Case) -> bool:
    if case.example.dtype not in impl.dtypes:
        return False
    if case.check in ("compose", "nonfinite"):
        return impl.compose is not None
    if case.check == "norm":
        return impl.norm is not None
    if case.check == "layer":
        return impl.layer is not None
    return impl.backward


# ----------------------------------------------------------------------------- running
@dataclass
class GateConfig:
    impls: list
    dtypes: tuple = DTYPES
    device: str = "auto"
    require_gpu: bool = False
    seed: int = 0
    fa_limit: float = DEFAULT_FA_LIMIT
    ops: tuple = OPS
    case_ids: tuple = ()
    sizes: dict = field(default_factory=lambda: {"n_compose": 24, "n_norm": 8, "n_backward": 8, "n_layer": 9})
    case_timeout: "float | None" = DEFAULT_CASE_TIMEOUT  # seconds per (implementation, case); None: no limit


class GateEnvironmentError(RuntimeError):
    """The gate cannot run here (e.g. a GPU was required): a failure, exit 2."""


def device_class(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda-sm{major}{minor}"
    return "cpu"


def _minor(v: "str | None") -> "str | None":
    return ".".join(v.split("+")[0].split(".")[:2]) if v else None


def environment(device: torch.device, fingerprint: str, impl_names, uses_triton: bool = True) -> dict:
    """What a baseline must match: device class, torch's minor version, triton's where an implementation under
    test runs Triton (``uses_triton``: this project's kernels, or a user's that says so) else 'not used', the suite,
    the implementations and the mode."""
    tv = "not used"
    if uses_triton:
        try:
            import triton

            tv = _minor(triton.__version__)
        except ImportError:
            tv = None
    return {
        "device_class": device_class(device),
        "torch": _minor(torch.__version__),
        "triton": tv,
        "suite": fingerprint,
        "suite_version": SUITE_VERSION,
        "impls": sorted(impl_names),
        "mode": "gpu" if device.type == "cuda" else "cpu-logic-only",
    }


def resolve(cfg: GateConfig) -> torch.device:
    has_cuda = torch.cuda.is_available()
    if cfg.device == "cuda" or cfg.require_gpu:
        if not has_cuda:
            raise GateEnvironmentError(
                "no CUDA device: the gate was asked for a GPU run and cannot run here "
                "(it never passes on nothing; use --device cpu for the logic-only mode)"
            )
        return torch.device("cuda")
    if cfg.device == "cpu":
        return torch.device("cpu")
    return torch.device("cuda" if has_cuda else "cpu")


def cpu_impls(impls) -> list:
    """In the CPU mode the built-in kernels run as two implementations: the eager tier, and the fused tier
    under the Triton interpreter for fp16/fp32 (the interpreter truncates fp32 → bf16: logic only)."""
    from .kernels.dispatch import select_tier

    out = []
    for im in impls:
        if im.contract == "kernel" and im.tier is None:
            out.append(kernels_impl("eager", im.dtypes))
            try:
                select_tier(torch.zeros(1, 1, dtype=torch.float16), False, "fused")
                fused = kernels_impl("fused", tuple(d for d in im.dtypes if d != "bf16"))
                fused.saves = ("inputs",)  # save='activation' stores fp16 runs' inner in bf16: truncated there
                out.append(fused)
            except ValueError:
                pass  # no interpreter in this process: the eager tier alone
        else:
            out.append(im)
    return out


def run_gate(cfg: GateConfig, progress=None) -> dict:
    """Run the suite through every implementation; the report dict (groups with metrics and hard failures)."""
    from .provenance import provenance

    dev = resolve(cfg)
    # each configured implementation with what runs for it (the CPU mode splits the kernels in two tiers)
    expanded = [(im, cpu_impls([im]) if dev.type == "cpu" else [im]) for im in cfg.impls]
    impls = [im for _, ims in expanded for im in ims]
    full = build_suite(DTYPES, cfg.seed, **cfg.sizes)
    fingerprint = suite_fingerprint(full)  # of the whole suite: a --dtypes/--ops subset compares with a full baseline
    suite = [c for c in full if c.example.dtype in cfg.dtypes and _op(c.check) in cfg.ops]
    if cfg.case_ids:
        unknown = sorted(set(cfg.case_ids) - {c.id for c in full})
        if unknown:
            raise ValueError(f"unknown case id(s) {', '.join(unknown)} (dora-verify gate --list-cases lists them)")
        outside = sorted(set(cfg.case_ids) - {c.id for c in suite})
        if outside:
            raise ValueError(
                f"case id(s) {', '.join(outside)} outside this run's --dtypes {','.join(cfg.dtypes)} / "
                f"--ops {','.join(cfg.ops)}"
            )
        suite = [c for c in suite if c.id in cfg.case_ids]
    dclass = device_class(dev)
    groups: dict = {}
    t0 = time.monotonic()
    work = [(im, c) for im in impls for c in suite if _applies(im, c)]
    idle = [orig.name for orig, ims in expanded if not any(_applies(im, c) for im in ims for c in suite)]
    enforced = True
    for i, (im, case) in enumerate(work):
        if progress and i % 10 == 0:
            progress(i, len(work), f"{im.name} {case.id}")
        guard = CaseGuard(cfg.case_timeout)
        enforced &= guard.enforced
        try:
            with guard, np.errstate(all="ignore"):  # the interpreter's numpy warnings on the NaN/Inf cases
                outcomes = _SCORERS[case.check](im, case, dev)
        except BaseException as e:  # noqa: BLE001 - whatever the case raised (sys.exit too) fails it, in one line
            if guard.interrupted:  # a real Ctrl-C of the run, not the implementation's own KeyboardInterrupt
                raise
            outcomes = [Outcome(_CRASH_OUTPUT[case.check], crash=crash_reason(e))]
        for o in outcomes:
            check = "compose" if case.check == "nonfinite" else case.check
            key = "|".join((im.name, f"{check}.{o.output}", case.example.dtype, dclass, case.shape_class))
            g = groups.setdefault(
                key,
                {
                    "impl": im.name,
                    "output": f"{check}.{o.output}",
                    "dtype": case.example.dtype,
                    "device_class": dclass,
                    "shape_class": case.shape_class,
                    "contract": im.contract,
                    "deterministic": im.deterministic,
                    "_ratios": [],
                    "cases": 0,
                    "max_ulp": 0.0,
                    "_cr": [0, 0],
                    "fa_ratio": 0.0,
                    "nonfinite_mismatch": 0,
                    "nonfinite": {**{k: 0 for k in NONFINITE_KINDS}, "examples": []},
                    "nondeterministic": 0,
                    "crashes": 0,
                    "_severity": {},
                },
            )
            g["cases"] += 1
            bad = False
            if o.crash:
                g["crashes"] += 1
                g.setdefault("crash_messages", []).append(f"{case.id}: {o.crash}")
                bad = True
            if o.ratios is not None and o.ratios.numel():
                g["_ratios"].append(o.ratios.flatten().to(F64))
                bad |= bool((o.ratios > 1).any())
            g["max_ulp"] = max(g["max_ulp"], o.max_ulp)
            if o.correctly_rounded:
                g["_cr"][0] += o.correctly_rounded[0]
                g["_cr"][1] += o.correctly_rounded[1]
            if o.fa_ratio is not None:
                g["fa_ratio"] = max(g["fa_ratio"], o.fa_ratio)
                bad |= o.fa_ratio > cfg.fa_limit
            g["nonfinite_mismatch"] += o.nonfinite_mismatch
            for k in NONFINITE_KINDS:
                g["nonfinite"][k] += o.nonfinite.get(k, 0)
            if o.nonfinite.get("first") and len(g["nonfinite"]["examples"]) < 3:
                g["nonfinite"]["examples"].append(f"{case.id} {o.nonfinite['first']}")
            g["nondeterministic"] += int(o.nondeterministic)
            bad |= o.nonfinite_mismatch > 0 or o.nondeterministic
            if bad:
                sev = _severity(o, cfg.fa_limit, [t.shape for t in case.example.tensors.values()])
                old = g["_severity"].get(case.id)
                if old is None or sev[0] > old[0]:
                    g["_severity"][case.id] = sev
    by_id = {c.id: c for c in suite}
    for g in groups.values():
        ranked = sorted(g.pop("_severity").items(), key=lambda kv: -kv[1][0])  # worst first (stable: suite order)
        g["failing_cases"] = [cid for cid, _ in ranked]
        if ranked:
            cid, (sev, element, kind) = ranked[0]
            g["worst_case"] = {
                "id": cid,
                "severity": sev,
                "severity_kind": kind,
                "element": element,
                "what": case_description(by_id[cid]),
            }
        r = torch.cat(g.pop("_ratios")) if g["_ratios"] else None
        g["max_ratio"] = float(r.max()) if r is not None and r.numel() else None
        g["p99_ratio"] = quantile(r, 0.99) if r is not None and r.numel() else None
        cr = g.pop("_cr")
        g["frac_correctly_rounded"] = cr[0] / cr[1] if cr[1] else None
        g["hard_failures"] = _hard_failures(g, cfg.fa_limit)
        if g["crashes"] == g["cases"]:  # nothing was scored: no metric reads as a perfect 0
            g["max_ulp"] = g["fa_ratio"] = g["nonfinite_mismatch"] = g["nondeterministic"] = None
    return {
        "kind": "gate",
        "provenance": provenance(dev, [im.name for im in impls]),
        "environment": environment(dev, fingerprint, [im.name for im in impls], any(im.uses_triton for im in impls)),
        "config": {
            "impls": [im.name for im in impls],
            "dtypes": list(cfg.dtypes),
            "seed": cfg.seed,
            "ops": list(cfg.ops),
            "subset": is_subset(cfg),
            "fa_limit": cfg.fa_limit,
            "case_ids": list(cfg.case_ids),
            "case_timeout": cfg.case_timeout,
            "case_timeout_enforced": bool(cfg.case_timeout) and enforced,
            **cfg.sizes,
        },
        "cases": len(suite),
        "evaluations": len(work),
        "idle_impls": idle,
        "groups": groups,
        "triton_installed": _triton_installed(),
        "seconds": round(time.monotonic() - t0, 2),
    }


def _nonfinite_text(nf: dict) -> str:
    parts = [
        f"{nf['nonfinite_where_finite']} NaN/Inf where the oracle is finite",
        f"{nf['finite_where_nonfinite']} finite where the oracle is NaN/Inf",
        f"{nf['wrong_nonfinite']} the wrong NaN/Inf (NaN for ±Inf or the reverse, or the wrong sign)",
    ]
    return ", ".join(parts) + (f"; first: {nf['examples'][0]}" if nf.get("examples") else "")


def _severity(o, fa_limit: float, shapes=()) -> tuple:
    """(how badly one failing outcome fails, the index of its worst element or None): its largest error / bound
    ratio, or its FA ratio over the limit; ∞ for a crash, a NaN/Inf mismatch or a nondeterministic result. A
    flattened ratio tensor's index is given in the first of ``shapes`` (the case's input shapes) of its size and
    at least two dimensions — the output's own layout ([t, i] for a compose y of [T, d_out])."""
    if o.crash or o.nonfinite_mismatch or o.nondeterministic:
        first = o.nonfinite.get("first") if o.nonfinite_mismatch else None
        return (
            math.inf,
            first,
            ("crash" if o.crash else "NaN/Inf mismatch" if o.nonfinite_mismatch else "nondeterministic"),
        )
    sev, element, kind = 0.0, None, "error/bound ratio"
    if o.ratios is not None and o.ratios.numel():
        r = o.ratios.to(F64)
        k = int(torch.nan_to_num(r, nan=math.inf).flatten().argmax())
        sev = float(r.flatten()[k])
        shape = tuple(r.shape)
        if r.dim() == 1:
            shape = next((tuple(sh) for sh in shapes if len(sh) >= 2 and math.prod(sh) == r.numel()), shape)
        element = [int(i) for i in np.unravel_index(k, shape)] if r.dim() else []
    if o.fa_ratio is not None and o.fa_ratio > fa_limit and float(o.fa_ratio) > sev:
        sev, kind = float(o.fa_ratio), "FlashAttention-style ratio"
    return sev, element, kind


def _hard_failures(g: dict, fa_limit: float) -> list:
    out = []
    if g["crashes"]:
        out.append(f"{g['crashes']} crash(es): {'; '.join(g.get('crash_messages', [])[:2])}")
    if g["max_ratio"] is not None and g["max_ratio"] > 1:
        out.append(f"error/bound ratio {g['max_ratio']:.6g} > 1")
    if g["nonfinite_mismatch"]:
        out.append(
            f"{g['nonfinite_mismatch']} NaN/Inf mismatch(es) with the oracle in {g['output']}: "
            + _nonfinite_text(g["nonfinite"])
        )
    if g["nondeterministic"]:
        out.append(f"{g['nondeterministic']} case(s) with different bits on a repeated call (claims determinism)")
    if g["fa_ratio"] > fa_limit:
        out.append(
            f"FlashAttention-style ratio {g['fa_ratio']:.4g} > limit {fa_limit:g} (error over the plain "
            "low-precision baseline's)"
        )
    return out


# The baseline and the outputs live in their own modules; their names stay importable from here.
from .gate_baseline import (  # noqa: E402
    BaselineError,
    baseline_problem,
    compare_baseline,
    env_mismatch,
    load_baseline,
    make_baseline,
    verdict,
    write_baseline,
)
from .gate_report import (  # noqa: E402
    dump_worst_cases,
    finding_message,
    gate_markdown,
    junit_xml,
    reproduce_command,
    write_gate_report,
)

__all__ = [
    "BASELINE_FORMAT",
    "DEFAULT_CASE_TIMEOUT",
    "DEFAULT_FA_LIMIT",
    "DEFAULT_SLACK",
    "BaselineError",
    "Case",
    "GateConfig",
    "GateEnvironmentError",
    "baseline_problem",
    "build_suite",
    "compare_baseline",
    "dump_worst_cases",
    "env_mismatch",
    "finding_message",
    "gate_markdown",
    "junit_xml",
    "load_baseline",
    "make_baseline",
    "reproduce_command",
    "run_gate",
    "suite_fingerprint",
    "verdict",
    "write_baseline",
    "write_gate_report",
]
