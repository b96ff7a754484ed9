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

``--impl module:callable`` names it: ``callable`` may be a function (taken as ``compose``), a class (called
with no arguments) or an object/module with the attributes above. Built in: ``kernels`` (this project's
production kernels, held to their derived bounds), ``forms`` (the formulas under study, each held to its
bound), ``form:NAME`` (one of them), ``peft`` (stock Hugging Face PEFT's DoRA numerics, see :func:`peft_impl`).
"""
from __future__ import annotations

import importlib
import inspect
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
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's to see, in one line
        raise ImplError(f"--impl {spec!r}: cannot import {mod_name!r}: {type(e).__name__}: {e}") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ImplError(f"--impl {spec!r}: {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return [from_object(obj, default_name=spec)]


def from_object(obj, default_name: str = "impl") -> Implementation:
    """Wrap a function (its ``compose``), a class (instantiated) or an object with ``compose``/``norm``."""
    if inspect.isclass(obj):
        try:
            obj = obj()
        except Exception as e:  # noqa: BLE001
            raise ImplError(f"{default_name}: cannot instantiate {obj.__name__}(): {type(e).__name__}: {e}") from None
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


__all__ = ["CONTRACTS", "ImplError", "Implementation", "form_impl", "from_object", "kernels_impl", "load_impl"]
