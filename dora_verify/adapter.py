"""The adapter protocol: how the toolkit reaches an implementation under test.

An implementation is anything with a ``compose`` and/or a ``norm`` callable, and/or a ``layer`` factory::

    compose(base, lora, g, s, bias=None) -> y     base, lora [T, d_out] in the activation dtype (bf16/fp16/fp32),
                                                 g [d_out] fp32 (the DoRA scale m / max(ν, ε)), s a float,
                                                 bias [d_out] or None; returns y = g·(base + s·lora) + bias
                                                 [T, d_out] in the activation dtype — or, for the sweep, the
                                                 pair (y, Δ) with Δ = (g − 1)·base + g·s·lora [T, d_out] in the
                                                 activation dtype (or None), as the package's own forms return.
    norm(W, A, B, s) -> nu                        W [d_out, d_in], A [r, d_in], B [d_out, r] (weight dtype);
                                                 returns ν = ‖W + s·BA‖ per row [d_out] (any float dtype).

    layer(linear, r, alpha[, adapter_dtype=None]) -> module
                                                 linear: a torch.nn.Linear (W [d_out, d_in] and bias in the activation
                                                 dtype, on the device under test); returns a torch.nn.Module with PEFT's
                                                 parameter names lora_A [r, d_in], lora_B [d_out, r], magnitude [d_out]
                                                 whose forward(x) returns y [T, d_out] in x's dtype — the whole DoRA
                                                 layer y = g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + bias, g = m / max(ν, ε), ν =
                                                 ‖W + s·BA‖_row detached, s = alpha / r — differentiable in x,
                                                 lora_A, lora_B and magnitude.

**Layer factories.** The toolkit builds a fresh module per call, then sets ``lora_A``, ``lora_B`` and
``magnitude`` to its case's values (``torch.no_grad()``, ``copy_``), runs ``y = module(x)`` and
``y.backward(dy)``, and grades y and the gradients of x, lora_A, lora_B, magnitude against the exact layer
(:mod:`dora_verify.layer_oracle`, ν detached). A factory that takes an ``adapter_dtype`` keyword is asked for the
case's adapter dtype (torch.float32 for PEFT's default bf16 W with fp32 adapters, else W's dtype); one that does
not gets its lora_A and lora_B converted in place (``param.data = param.data.to(dtype)``, what PEFT's
``autocast_adapter_dtype`` does). ``magnitude`` may have any float dtype that holds the case's m exactly (the cases'
m are values of the adapter dtype). A parameter that is missing, of the wrong shape, not requiring grad, unable to
hold the case's values exactly, or without a gradient after backward fails that case in one line.

**How the loader tells a layer factory from the compose/norm protocol.** A callable — function or class — whose
first parameter (after ``self``) is named ``linear`` (or ``base_layer``, PEFT's and this project's name) *is* a
layer factory; an object (or module) may also carry one as its ``layer`` attribute beside ``compose``/``norm``.
Any other function is taken as ``compose``, any other class is instantiated with no arguments.

Optional attributes: ``name`` (str), ``deterministic`` (bool, default False: when True the gate checks that
repeated calls give identical bits), ``contract`` ('faithful', the default: y within 1 ulp of the exact y of
the rounded inputs and ν within 1e-6 relative — docs/contract.md —, and a layer within the faithful layer contract
of :func:`dora_verify.layer_oracle.faithful_layer_bounds`; or 'baseline-only': no a-priori bound, only the
baseline, FlashAttention-style and NaN/Inf criteria), ``uses_triton`` (bool, default False: set it when the code
runs Triton kernels, so that the gate's environment key — which a baseline must match — holds triton's minor version;
a pure-torch implementation's baseline does not go stale on a triton upgrade), ``compose_bound`` (a callable
``compose_bound(base, lora, g, s)`` returning the implementation's own a-priori bound on |ŷ − y| per element — a
float64 tensor shaped like base — or a pair (bound on |Δ̂ − Δ| or None, that y bound; Δ first, in the order of
``dora_verify.bounds.compose_form_bounds``, not of the (y, Δ) output): the sweep reports the error
against it as ``bound_ratio``, where without one a 'faithful' implementation is held to 1 ulp of the exact y). Inputs
arrive on the device under test (contiguous, finite unless a NaN/Inf case says otherwise); outputs may be on any device.

What the toolkit guarantees an implementation, and what it holds it to (:func:`check_output`,
:class:`CaseGuard`): every call gets its own copies of the inputs (it may overwrite them; the oracle never
sees them); an output that is not a tensor of the stated shape and dtype fails that case in one line;
anything the code raises — ``SystemExit`` and ``KeyboardInterrupt`` included — is a crash of that case,
not the end of the run (only a real Ctrl-C, a SIGINT delivered to the process, still stops the run); and a
case past its time limit is stopped by SIGALRM (Unix, main thread) with :class:`CaseTimeout`.

``--impl module:callable`` names it: ``callable`` may be a layer factory (above), a function (taken as
``compose``), a class (called with no arguments) or an object/module with the attributes above. Built in:
``kernels`` (this project's production kernels and DoRALinear, held to their derived bounds), ``forms`` (the
formulas under study, each held to its bound), ``form:NAME`` (one of them), ``peft`` (stock Hugging Face PEFT's
DoRA numerics and its DoRA layer, see :func:`peft_impl`).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

CONTRACTS = ("faithful", "baseline-only", "kernel", "form")


@dataclass
class Implementation:
    """One implementation under test. ``contract``: 'kernel' and 'form' use the toolkit's derived bounds
    (dora_verify.bounds) for this project's kernels and the forms; 'faithful' holds a user's implementation
    to the contract of docs/contract.md; 'baseline-only' checks no a-priori bound. ``dtypes``: activation
    dtypes it supports (names); ``tier``: the kernels' tier (built-in kernels only)."""

    name: str
    compose: Optional[Callable] = None
    norm: Optional[Callable] = None
    deterministic: bool = False
    contract: str = "faithful"
    dtypes: tuple = ("bf16", "fp16", "fp32")
    tier: Optional[str] = None
    form: Optional[str] = None
    backward: bool = False  # the built-in kernels: also gate the compose backward ...
    saves: tuple = ("inputs", "activation")  # ... in these save modes
    layer: Optional[Callable] = None  # a layer factory (module docstring)
    uses_triton: bool = False  # whether triton's version is part of the gate's environment key
    compose_bound: Optional[Callable] = None  # the implementation's own a-priori bound (the sweep's bound ratio)


class ImplError(ValueError):
    """The implementation cannot be loaded or does not follow the protocol (a usage error: exit 2)."""


class ImplOutputError(TypeError):
    """An output that breaks the protocol (not a tensor, wrong shape or dtype): that case fails, in one line."""


class CaseTimeout(BaseException):
    """Raised inside a case that ran past its time limit. A BaseException, so that ``except Exception`` in
    the implementation does not swallow it."""


def _first_line(e: BaseException) -> str:
    try:
        text = str(e)
    except Exception:  # noqa: BLE001 - a broken __str__ still gets its type named
        text = ""
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), "")


def crash_reason(e: BaseException) -> str:
    """One line (≤ 300 characters, never a traceback) naming what an implementation's call raised."""
    if isinstance(e, (CaseTimeout, ImplOutputError)):
        msg = _first_line(e)
    elif isinstance(e, SystemExit):
        msg = f"SystemExit({e.code!r}): the implementation tried to exit the process"
    elif isinstance(e, KeyboardInterrupt):
        msg = "KeyboardInterrupt raised by the implementation (not a Ctrl-C of the run)"
    else:
        line = _first_line(e)
        msg = f"{type(e).__name__}: {line}" if line else type(e).__name__
    return msg[:300]


def check_output(what: str, out, shape, dtype=None):
    """``out`` if it is a torch.Tensor of ``shape`` and ``dtype`` (None: any floating dtype); else
    :class:`ImplOutputError` with a one-line reason, e.g. 'compose returned None, want ...'."""
    import torch

    want = (
        f"a torch.Tensor of {str(dtype).removeprefix('torch.') if dtype else 'a floating dtype'}, shape {tuple(shape)}"
    )
    if not isinstance(out, torch.Tensor):
        kind = type(out)
        got = (
            "None"
            if out is None
            else f"a {kind.__qualname__}"
            if kind.__module__ == "builtins"
            else f"a {kind.__module__.split('.')[0]}.{kind.__qualname__}"
        )
        raise ImplOutputError(f"{what} returned {got}, want {want}")
    if tuple(out.shape) != tuple(shape) or (out.dtype != dtype if dtype else not out.is_floating_point()):
        raise ImplOutputError(
            f"{what} returned a torch.Tensor of {str(out.dtype).removeprefix('torch.')}, shape "
            f"{tuple(out.shape)}; want {want}"
        )
    return out


class CaseGuard:
    """Context manager around one case of an implementation's code.

    * ``seconds`` (None or ≤ 0: no limit): SIGALRM raises :class:`CaseTimeout` inside the case once that much
      wall time has passed. Only on Unix and on the main thread (``enforced`` says whether it is); a hang
      inside C code (a kernel, a blocking call that retries) is interrupted only when control returns to
      Python. One shot: code that catches BaseException and carries on is not interrupted again. A timer
      already armed by someone else (e.g. pytest-timeout) is re-armed with what it had left.
    * A real Ctrl-C (SIGINT delivered to the process) sets ``interrupted`` before the previous handler runs,
      so the caller can tell it from a ``KeyboardInterrupt`` the code raises itself: the former stops the
      run, the latter is a crash of the case like any other exception.
    """

    def __init__(self, seconds: "float | None" = None):
        self.seconds = seconds if seconds and seconds > 0 else None
        self.interrupted = False
        self.enforced = (
            hasattr(signal, "setitimer")
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is not None
        )  # None: a handler set outside Python
        self._old_int = self._old_alarm = self._old_timer = None

    def _on_alarm(self, signum, frame):
        raise CaseTimeout(f"timed out: still running after the case time limit of {self.seconds:g} s")

    def _on_sigint(self, signum, frame):
        self.interrupted = True
        if callable(self._old_int):
            return self._old_int(signum, frame)
        if self._old_int != signal.SIG_IGN:
            raise KeyboardInterrupt

    def __enter__(self):
        if self.enforced:
            self._t0 = time.monotonic()
            self._old_int = signal.signal(signal.SIGINT, self._on_sigint)
            if self.seconds:
                self._old_alarm = signal.signal(signal.SIGALRM, self._on_alarm)
                self._old_timer = signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *exc):
        if not self.enforced:
            return False
        try:
            if self._old_alarm is not None:
                signal.setitimer(signal.ITIMER_REAL, 0)
        finally:  # restored even if the alarm fires right here
            if self._old_alarm is not None:
                signal.signal(signal.SIGALRM, self._old_alarm)
                left, interval = self._old_timer
                if left > 0:  # someone else's timer: re-armed with what it had left (at least 1 ms)
                    signal.setitimer(signal.ITIMER_REAL, max(left - (time.monotonic() - self._t0), 1e-3), interval)
            signal.signal(signal.SIGINT, self._old_int)
        return False


LAYER_PARAMS = ("lora_A", "lora_B", "magnitude")


def is_layer_factory(obj) -> bool:
    """Whether ``obj`` is a layer factory: a callable whose first parameter (after ``self``) is named ``linear`` or
    ``base_layer``."""
    if not callable(obj):
        return False
    try:
        params = list(inspect.signature(obj).parameters.values())
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0].name in ("linear", "base_layer")


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _dtype_name(dt) -> str:
    return str(dt).removeprefix("torch.")


def build_layer(factory: Callable, W, bias, r: int, alpha: float, adapter_dtype, values: dict):
    """A fresh module from ``factory`` for the case (W, bias [in the activation dtype, on the device under test],
    r, alpha, the adapter dtype), its lora_A, lora_B and magnitude set to ``values`` (name → tensor) under no_grad
    with ``copy_``: (module, {name: parameter}). :class:`ImplOutputError` (one line) for a module that breaks the
    protocol (module docstring)."""
    import torch
    from torch import nn

    d_out, d_in = W.shape
    linear = nn.Linear(d_in, d_out, bias=bias is not None, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        linear.weight.copy_(W)
        if bias is not None:
            linear.bias.copy_(bias)
    kwargs = {"adapter_dtype": adapter_dtype} if _accepts(factory, "adapter_dtype") else {}
    module = factory(linear, r, alpha, **kwargs)
    if not isinstance(module, nn.Module):
        kind = type(module)
        got = "None" if module is None else f"a {kind.__module__.split('.')[0]}.{kind.__qualname__}"
        raise ImplOutputError(f"the layer factory returned {got}, want a torch.nn.Module")
    params = {}
    for name, shape in zip(LAYER_PARAMS, ((r, d_in), (d_out, r), (d_out,))):
        p = getattr(module, name, None)
        if not isinstance(p, torch.Tensor) or tuple(p.shape) != shape or not p.is_floating_point():
            got = (
                "nothing"
                if p is None
                else (
                    f"a tensor of shape {tuple(p.shape)}"
                    if isinstance(p, torch.Tensor)
                    else f"a {type(p).__qualname__}"
                )
            )
            raise ImplOutputError(f"the layer's {name} is {got}; want a floating parameter of shape {shape}")
        if not p.requires_grad:
            raise ImplOutputError(f"the layer's {name} does not require grad")
        if p.dtype != adapter_dtype and not (name == "magnitude" and kwargs):  # a factory told the adapter dtype
            if kwargs:  # may keep m wider (DoRALinear: fp32)
                raise ImplOutputError(
                    f"the layer's {name} is {_dtype_name(p.dtype)} although the factory was asked for "
                    f"adapter_dtype={_dtype_name(adapter_dtype)}"
                )
            p.data = p.data.to(adapter_dtype)  # what PEFT's autocast_adapter_dtype does (A, B and the magnitude)
        with torch.no_grad():
            p.copy_(values[name])
        if not torch.equal(p.detach().to(torch.float64).cpu(), values[name].detach().to(torch.float64).cpu()):
            raise ImplOutputError(
                f"the layer's {name} ({_dtype_name(p.dtype)}) cannot hold the case's "
                f"{_dtype_name(values[name].dtype)} values exactly"
            )
        params[name] = p
    return module, params


def _kernels_layer(tier: "str | None"):
    """DoRALinear as a layer factory (its default save='recompute'); ``tier`` forces the compose tier in forward."""

    def factory(linear, r, alpha, adapter_dtype=None):
        import contextlib
        import os

        from .kernels import DoRALinear

        layer = DoRALinear(linear, r, alpha, adapter_dtype=adapter_dtype)
        if tier is not None:
            forward = layer.forward

            def forced(x):
                with contextlib.ExitStack() as stack:
                    old = os.environ.get("DORA_VERIFY_TIER")
                    os.environ["DORA_VERIFY_TIER"] = tier
                    stack.callback(
                        lambda: (
                            os.environ.pop("DORA_VERIFY_TIER")
                            if old is None
                            else os.environ.__setitem__("DORA_VERIFY_TIER", old)
                        )
                    )
                    return forward(x)

            layer.forward = forced
        return layer

    return factory


def kernels_impl(tier: "str | None" = None, dtypes=("bf16", "fp16", "fp32")) -> Implementation:
    """This project's production kernels (compose at ``tier``, factored_row_norm, the compose backward) and, for
    ``tier`` None or 'eager', its DoRALinear layer (the fused tier under the CPU interpreter has no layer entry)."""
    from .kernels import compose, factored_row_norm

    def comp(base, lora, g, s, bias=None):
        return compose(base, lora, g, s, bias, tier=tier)

    def norm(W, A, B, s):
        backend = "triton" if (W.is_cuda and tier != "eager") else "torch"
        return factored_row_norm(W, A, B, s, backend=backend)

    label = f"kernels[{tier}]" if tier else "kernels"
    return Implementation(
        label,
        comp,
        norm,
        deterministic=True,
        contract="kernel",
        dtypes=tuple(dtypes),
        tier=tier,
        uses_triton=True,
        backward=True,
        layer=_kernels_layer(tier) if tier in (None, "eager") else None,
    )


def _peft_layer(linear, r, alpha, adapter_dtype=None):
    """Stock PEFT DoRA around ``linear``: ``get_peft_model(nn.Sequential(linear), LoraConfig(r, lora_alpha,
    use_dora=True, target_modules=['0']))`` — fp32 adapters (``autocast_adapter_dtype=True``, PEFT's default for a
    bf16/fp16 W) when ``adapter_dtype`` is torch.float32, else adapters in W's dtype — with its
    ``lora_A.default.weight``, ``lora_B.default.weight`` and ``lora_magnitude_vector.default.weight`` under the
    protocol's names."""
    import torch
    from torch import nn
    from peft import LoraConfig, get_peft_model

    wdt = linear.weight.dtype
    if adapter_dtype not in (None, wdt, torch.float32):
        raise ValueError(f"stock PEFT keeps adapters in W's dtype or fp32, not {adapter_dtype}")
    autocast = adapter_dtype == torch.float32 and wdt != torch.float32
    model = get_peft_model(
        nn.Sequential(linear),
        LoraConfig(r=r, lora_alpha=alpha, use_dora=True, target_modules=["0"]),
        autocast_adapter_dtype=autocast,
    )
    return _peft_layer_class()(model)


@functools.lru_cache(maxsize=None)
def _peft_layer_class():
    from torch import nn

    class PeftDoRALayer(nn.Module):
        """A PEFT-wrapped ``nn.Sequential(linear)`` exposing the protocol's parameter names."""

        def __init__(self, model):
            super().__init__()
            self.model = model
            self._layer = model.base_model.model[0]

        @property
        def lora_A(self):
            return self._layer.lora_A["default"].weight

        @property
        def lora_B(self):
            return self._layer.lora_B["default"].weight

        @property
        def magnitude(self):
            return self._layer.lora_magnitude_vector["default"].weight

        def forward(self, x):
            return self.model(x)

    return PeftDoRALayer


def peft_impl() -> Implementation:
    """Stock PEFT's DoRA numerics, held to the faithful contract so a report shows what they cost.

    layer: stock PEFT's DoRA Linear itself (:func:`_peft_layer`), held to the faithful layer contract.

    norm: PEFT's own code — ``DoraLinearLayer.get_lora_weight`` (BA through the identity matrix and the two
    adapter layers) and ``get_weight_norm`` (W + s·BA and the norm in the weight dtype, rounded to it).
    compose: ``DoraLinearLayer.forward``'s arithmetic replayed op for op in the activation dtype (the line
    cannot be called on given base/lora/g): result = base + bias; mag = g rounded to the dtype (PEFT's
    magnitude / weight_norm in the adapter dtype); y = result + ((mag − 1)·(result − bias) + mag·lora·s)."""
    import torch
    from torch import nn

    try:
        from peft.tuners.lora.dora import DoraLinearLayer
    except ImportError as e:
        raise ImplError(f"--impl peft needs PEFT installed: {e}") from None
    dora = DoraLinearLayer(fan_in_fan_out=False)

    def norm(W, A, B, s):
        lora_A = nn.Linear(A.shape[1], A.shape[0], bias=False, device=A.device, dtype=A.dtype)
        lora_B = nn.Linear(B.shape[1], B.shape[0], bias=False, device=B.device, dtype=B.dtype)
        with torch.no_grad():
            lora_A.weight.copy_(A)
            lora_B.weight.copy_(B)
            lora_weight = dora.get_lora_weight(lora_A, lora_B).to(W.dtype)
            return dora.get_weight_norm(W, lora_weight, s)

    def comp(base, lora, g, s, bias=None):
        result = base + bias.to(base.dtype) if bias is not None else base
        base_result = result - bias.to(base.dtype) if bias is not None else result
        mag = g.to(base.dtype).view(1, -1)
        return result + ((mag - 1) * base_result + mag * lora * s)

    return Implementation("peft", comp, norm, deterministic=True, contract="faithful", layer=_peft_layer)


def form_impl(name: str) -> Implementation:
    from .forms import COMPOSE_FORMS

    if name not in COMPOSE_FORMS:
        raise ImplError(f"unknown form {name!r}; choose from {', '.join(COMPOSE_FORMS)}")
    fn = COMPOSE_FORMS[name].fn
    return Implementation(
        f"form:{name}",
        lambda b, lo, g, s, bias=None: fn(b, lo, g, s, bias)[0],
        None,
        deterministic=True,
        contract="form",
        form=name,
    )


def load_impl(spec: str) -> "list[Implementation]":
    """The implementations named by ``spec``: 'kernels', 'forms', 'form:NAME', 'peft' or 'module:callable'."""
    from .forms import COMPOSE_FORMS

    if spec == "kernels":
        return [kernels_impl()]
    if spec == "forms":
        return [form_impl(n) for n in COMPOSE_FORMS]
    if spec == "peft":
        return [peft_impl()]
    if spec.startswith("form:"):
        return [form_impl(spec[5:])]
    if spec.count(":") != 1 or not all(spec.split(":")):
        raise ImplError(f"--impl {spec!r}: expected kernels, forms, form:NAME, peft or module:callable")
    mod_name, attr = spec.split(":")
    guard = CaseGuard()
    try:
        with guard:
            mod = importlib.import_module(mod_name)
    except BaseException as e:  # noqa: BLE001 - any import failure (sys.exit included) is the user's to see, in one line
        if guard.interrupted:
            raise
        raise ImplError(f"--impl {spec!r}: cannot import {mod_name!r}: {crash_reason(e)}") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ImplError(f"--impl {spec!r}: {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return [from_object(obj, default_name=spec)]


def from_object(obj, default_name: str = "impl") -> Implementation:
    """Wrap a layer factory, a function (its ``compose``), a class (instantiated) or an object with
    ``compose``/``norm``/``layer``."""
    if is_layer_factory(obj):
        return Implementation(str(getattr(obj, "name", default_name)), layer=obj, **_options(obj, default_name))
    if inspect.isclass(obj):
        guard = CaseGuard()
        try:
            with guard:
                obj = obj()
        except BaseException as e:  # noqa: BLE001 - sys.exit in a constructor too: one line, exit 2
            if guard.interrupted:
                raise
            raise ImplError(f"{default_name}: cannot instantiate {obj.__name__}(): {crash_reason(e)}") from None
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        comp, norm, layer = obj, None, None
    else:
        comp, norm, layer = getattr(obj, "compose", None), getattr(obj, "norm", None), getattr(obj, "layer", None)
    if comp is None and norm is None and layer is None:
        raise ImplError(
            f"{default_name}: neither callable nor an object with compose/norm/layer (see dora_verify.adapter)"
        )
    for nm, fn in (("compose", comp), ("norm", norm), ("layer", layer)):
        if fn is not None and not callable(fn):
            raise ImplError(f"{default_name}: {nm} is not callable")
    return Implementation(
        str(getattr(obj, "name", default_name)), comp, norm, layer=layer, **_options(obj, default_name)
    )


def _options(obj, default_name: str) -> dict:
    contract = getattr(obj, "contract", "faithful")
    if contract not in CONTRACTS[:2]:  # the toolkit's own contracts ('kernel', 'form') are not for users
        raise ImplError(f"{default_name}: contract must be 'faithful' or 'baseline-only', got {contract!r}")
    raw = getattr(obj, "dtypes", ("bf16", "fp16", "fp32"))
    raw = (raw,) if isinstance(raw, str) else raw
    try:
        dtypes = tuple(raw)
    except TypeError:
        raise ImplError(f"{default_name}: dtypes must be a sequence of bf16, fp16, fp32, got {raw!r}") from None
    bad = [d for d in dtypes if d not in ("bf16", "fp16", "fp32")]
    if bad or not dtypes:  # a misspelt name would otherwise match no case: "nothing ran" instead of this reason
        raise ImplError(f"{default_name}: dtypes must name some of bf16, fp16, fp32, got {list(dtypes)!r}")
    bound = getattr(obj, "compose_bound", None)
    if bound is not None and not callable(bound):
        raise ImplError(f"{default_name}: compose_bound is not callable")
    return {
        "deterministic": bool(getattr(obj, "deterministic", False)),
        "contract": contract,
        "dtypes": dtypes,
        "uses_triton": bool(getattr(obj, "uses_triton", False)),
        "compose_bound": bound,
    }


__all__ = [
    "CONTRACTS",
    "LAYER_PARAMS",
    "CaseGuard",
    "CaseTimeout",
    "ImplError",
    "ImplOutputError",
    "Implementation",
    "build_layer",
    "check_output",
    "crash_reason",
    "form_impl",
    "from_object",
    "is_layer_factory",
    "kernels_impl",
    "load_impl",
]
