"""The adapter protocol: how the toolkit reaches an implementation under test.

An implementation is anything with a ``compose`` and/or a ``norm`` callable::

    compose(base, lora, g, s, bias=None) -> y     base, lora [T, d_out] in the activation dtype (bf16/fp16/fp32),
                                                 g [d_out] fp32 (the DoRA scale m / max(ν, ε)), s a float,
                                                 bias [d_out] or None; returns y = g·(base + s·lora) + bias
                                                 [T, d_out] in the activation dtype.
    norm(W, A, B, s) -> nu                        W [d_out, d_in], A [r, d_in], B [d_out, r] (weight dtype);
                                                 returns ν = ‖W + s·BA‖ per row [d_out] (any float dtype).

Optional attributes: ``name`` (str), ``deterministic`` (bool, default False: when True the gate checks that
repeated calls give identical bits), ``contract`` ('faithful', the default: y within 1 ulp of the exact y of
the rounded inputs and ν within 1e-6 relative — DESIGN.md §2; or 'baseline-only': no a-priori bound, only
the baseline, FlashAttention-style and NaN/Inf criteria). Inputs arrive on the device under test
(contiguous, finite unless a NaN/Inf case says otherwise); outputs may be on any device.

What the toolkit guarantees an implementation, and what it holds it to (:func:`check_output`,
:class:`CaseGuard`): every call gets its own copies of the inputs (it may overwrite them; the oracle never
sees them); an output that is not a tensor of the stated shape and dtype fails that case in one line;
anything the code raises — ``SystemExit`` and ``KeyboardInterrupt`` included — is a crash of that case,
not the end of the run (only a real Ctrl-C, a SIGINT delivered to the process, still stops the run); and a
case past its time limit is stopped by SIGALRM (Unix, main thread) with :class:`CaseTimeout`.

``--impl module:callable`` names it: ``callable`` may be a function (taken as ``compose``), a class (called
with no arguments) or an object/module with the attributes above. Built in: ``kernels`` (this project's
production kernels, held to their derived bounds), ``forms`` (the formulas under study, each held to its
bound), ``form:NAME`` (one of them), ``peft`` (stock Hugging Face PEFT's DoRA numerics, see :func:`peft_impl`).
"""
from __future__ import annotations

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
    to the contract of DESIGN.md §2; 'baseline-only' checks no a-priori bound. ``dtypes``: activation
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

    want = f"a torch.Tensor of {str(dtype).removeprefix('torch.') if dtype else 'a floating dtype'}, shape {tuple(shape)}"
    if not isinstance(out, torch.Tensor):
        kind = type(out)
        got = "None" if out is None else f"a {kind.__qualname__}" if kind.__module__ == "builtins" else \
            f"a {kind.__module__.split('.')[0]}.{kind.__qualname__}"
        raise ImplOutputError(f"{what} returned {got}, want {want}")
    if tuple(out.shape) != tuple(shape) or (out.dtype != dtype if dtype else not out.is_floating_point()):
        raise ImplOutputError(f"{what} returned a torch.Tensor of {str(out.dtype).removeprefix('torch.')}, shape "
                              f"{tuple(out.shape)}; want {want}")
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
        self.enforced = (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
                         and signal.getsignal(signal.SIGINT) is not None)  # None: a handler set outside Python
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


def kernels_impl(tier: "str | None" = None, dtypes=("bf16", "fp16", "fp32")) -> Implementation:
    """This project's production kernels (compose at ``tier``, factored_row_norm, the compose backward)."""
    from .kernels import compose, factored_row_norm

    def comp(base, lora, g, s, bias=None):
        return compose(base, lora, g, s, bias, tier=tier)

    def norm(W, A, B, s):
        backend = "triton" if (W.is_cuda and tier != "eager") else "torch"
        return factored_row_norm(W, A, B, s, backend=backend)

    label = f"kernels[{tier}]" if tier else "kernels"
    return Implementation(label, comp, norm, deterministic=True, contract="kernel", dtypes=tuple(dtypes), tier=tier,
                          backward=True)


def peft_impl() -> Implementation:
    """Stock PEFT's DoRA numerics, held to the faithful contract so a report shows what they cost.

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

    return Implementation("peft", comp, norm, deterministic=True, contract="faithful")


def form_impl(name: str) -> Implementation:
    from .forms import COMPOSE_FORMS

    if name not in COMPOSE_FORMS:
        raise ImplError(f"unknown form {name!r}; choose from {', '.join(COMPOSE_FORMS)}")
    fn = COMPOSE_FORMS[name].fn
    return Implementation(f"form:{name}", lambda b, lo, g, s, bias=None: fn(b, lo, g, s, bias)[0], None,
                          deterministic=True, contract="form", form=name)


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
    """Wrap a function (its ``compose``), a class (instantiated) or an object with ``compose``/``norm``."""
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
        comp, norm = obj, None
    else:
        comp, norm = getattr(obj, "compose", None), getattr(obj, "norm", None)
    if comp is None and norm is None:
        raise ImplError(f"{default_name}: neither callable nor an object with compose/norm (see dora_verify.adapter)")
    for nm, fn in (("compose", comp), ("norm", norm)):
        if fn is not None and not callable(fn):
            raise ImplError(f"{default_name}: {nm} is not callable")
    contract = getattr(obj, "contract", "faithful")
    if contract not in CONTRACTS[:2]:  # the toolkit's own contracts ('kernel', 'form') are not for users
        raise ImplError(f"{default_name}: contract must be 'faithful' or 'baseline-only', got {contract!r}")
    dtypes = tuple(getattr(obj, "dtypes", ("bf16", "fp16", "fp32")))
    return Implementation(str(getattr(obj, "name", default_name)), comp, norm,
                          deterministic=bool(getattr(obj, "deterministic", False)), contract=contract, dtypes=dtypes)


__all__ = ["CONTRACTS", "CaseGuard", "CaseTimeout", "ImplError", "ImplOutputError", "Implementation", "check_output",
           "crash_reason", "form_impl", "from_object", "kernels_impl", "load_impl"]
