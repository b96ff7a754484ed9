"""Route Hugging Face PEFT's DoRA Linear layers through this project's factored norm and fused compose.

    import dora_verify.kernels.peft as dv_peft
    model = get_peft_model(model, LoraConfig(r=16, use_dora=True, target_modules=[...]))
    dv_peft.enable()                 # every PEFT DoRA Linear layer now uses the kernels
    with dv_peft.enabled(): ...      # or only inside a block; dv_peft.disable() restores stock PEFT
    dv_peft.enable(save="x")         # keep x, not base, for backward (LoRA's memory; one more GEMM)

Nothing about building, saving, loading or merging adapters changes: the integration replaces only
``peft.tuners.lora.variants.DoraLinearVariant.forward`` (the per-adapter DoRA forward of a LoRA Linear
layer), so state dicts, ``save_pretrained``/``from_pretrained``, ``merge``/``unmerge`` and multiple adapters are
PEFT's own. Supported: PEFT ≥ 0.16 (``peft.tuners.lora.variants``, from PEFT's LoRA-variant refactor, #2443);
tested with 0.21.0 (GPU report) and 0.21.2 (CI); :func:`enable` raises ImportError on a PEFT without it.
Layers the kernels cannot take fall back to PEFT's own forward, per call: quantized or non-floating base
weights (bitsandbytes, GPTQ, HQQ), a bias on lora_B (``lora_bias=True``), operands on different devices.

Semantics (PEFT's ``DoraLinearLayer.forward``, reproduced):

* ``result`` arrives as the base layer's output (bias included; with several active adapters it also holds
  the adapters before this one, as in PEFT). Without active dropout, base = result − bias (PEFT removes
  the bias before the compose) and the layer returns y = g ⊙ (base + s·lora) + bias in one rounding —
  algebraically PEFT's ``result + (g−1)·base + g·s·lora``. bf16/fp16 adapters take the fused
  :func:`dora_lora_compose` (lora = xa Bᵀ never materialised, g = m/max(ν, ε) formed in the kernels); fp32 adapters
  (PEFT's default autocast) take it too in eager mode (lora formed by the same GEMM as PEFT's ``lora_B(xa)``, composed
  and freed, formed again in the backward: no fp32 activation kept), and :func:`compose` on PEFT's fp32 lora in
  compiled graphs.
* With dropout active (training, p > 0), PEFT recomputes the base on the dropped-out input:
  Δ = (g−1) ⊙ (x_d Wᵀ) + g ⊙ s·lora(x_d) is returned as result + Δ (``compose(output='delta')``).
* ν = ‖W + s·BA‖_row is detached (DoRA §4.3), from :func:`factored_row_norm`, computed from the current W, A, B
  on every call (nothing a fused optimiser, ``.data`` edit, merge/unmerge or re-gather writes can leave stale;
  :func:`frozen_norms` opts into reuse for inference); ``fan_in_fan_out`` weights (GPT-2's Conv1D) are
  transposed.
* Autocast: ν, g and the compose keep their contracts (the norm runs with autocast off); the LoRA GEMMs run in
  the autocast dtype, as PEFT's do, and the compose reads PEFT's materialised lora.
* s is PEFT's ``scaling`` rounded to fp32 (what PEFT's fp32 multiply uses too).

Deliberate differences (more accurate; bounded in tests/test_kernels_peft.py): ν and g = m/ν stay fp32
where PEFT rounds ν and g to the adapter dtype, and the output is rounded once where PEFT rounds each of
its four elementwise steps. With fp32 adapters the two agree to ~1e-6 relative. With bf16 adapters they
differ by up to ~2⁻⁸ relative per layer; in particular PEFT stores the magnitude m = RN_bf16(‖W‖) at
initialisation, so a fresh adapter gives exactly g = 1 in stock PEFT (both sides rounded alike) and
g = RN_bf16(‖W‖)/‖W‖ = 1 ± 2⁻⁹ here — the exact value for the parameters as stored.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .compose import compose
from .dispatch import KERNEL_DTYPES
from .lora_compose import dora_lora_compose_unchecked
from .norm import RowNormRunner, row_norm_op
from .scale import DEFAULT_EPS, dora_scale, round_to_fp32

_ORIGINAL = None  # PEFT's DoraLinearVariant.forward (the staticmethod object) while enabled
SAVE_MODES = ("recompute", "x")
_SAVE = "recompute"  # what the training forward keeps for backward (enable's ``save``)


def _variant_class():
    try:
        from peft.tuners.lora import variants
    except ImportError as e:  # PEFT missing, or older than the variants API
        raise ImportError(
            f"dora_verify.kernels.peft needs PEFT >= 0.16 (peft.tuners.lora.variants); import failed: {e}"
        ) from e
    cls = getattr(variants, "DoraLinearVariant", None)
    if cls is None or "forward" not in cls.__dict__:
        raise ImportError("this PEFT version has no DoraLinearVariant.forward; supported: PEFT >= 0.16")
    return cls


def is_enabled() -> bool:
    """Whether PEFT's DoRA Linear forward is currently routed through the kernels."""
    return _ORIGINAL is not None


def save_mode() -> str:
    """What an enabled integration's training forward keeps for backward: 'recompute' or 'x' (see :func:`enable`)."""
    return _SAVE


def enable(save: str = "recompute") -> None:
    """Route every PEFT DoRA Linear layer (existing and future) through the kernels. Idempotent.

    ``save``: what a training forward keeps for backward. 'recompute' (default): base = x Wᵀ (activation-sized) and
    xa; lora = xa Bᵀ is never formed (d_g's lora term comes from dyᵀxa, :func:`lora_compose`). 'x': the least
    memory — only x (which LoRA's own down-projection keeps anyway) and xa; the backward forms base again with the
    base layer's GEMM (one more GEMM per layer and step). It applies on the fused training path — CUDA, bf16/fp16
    adapters in the input's dtype — to plain ``nn.Linear`` base layers with one active adapter; everywhere else (the
    CPU's eager tier, fp32 adapters, compiled graphs, autocast) the layer runs as under 'recompute'. The same bits
    either way."""
    global _ORIGINAL, _SAVE
    if save not in SAVE_MODES:
        raise ValueError(f"save must be one of {SAVE_MODES}, got {save!r}")
    _SAVE = save
    cls = _variant_class()
    if _ORIGINAL is None:
        _ORIGINAL = cls.__dict__["forward"]
        cls.forward = staticmethod(dora_linear_forward)


def disable() -> None:
    """Restore PEFT's own DoRA forward. Idempotent."""
    global _ORIGINAL, _SAVE
    _SAVE = "recompute"
    if _ORIGINAL is not None:
        _variant_class().forward = _ORIGINAL
        _ORIGINAL = None


@contextlib.contextmanager
def enabled(save: str = "recompute"):
    """Context manager: the kernels inside the block (``save`` as in :func:`enable`), the previous state after it."""
    was, was_save = is_enabled(), _SAVE
    enable(save=save)
    try:
        yield
    finally:
        if was:
            enable(save=was_save)
        else:
            disable()


def _kernel_weight(module):
    """The base weight as [d_out, d_in] if the kernels can take this layer, else None."""
    base = module.get_base_layer()
    W = getattr(base, "weight", None)
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or W.dtype not in KERNEL_DTYPES:
        return None
    if hasattr(W, "quant_state") or type(W.data) is not torch.Tensor:  # quantized or sharded (DTensor) weights
        return None
    return W.t() if getattr(module, "fan_in_fan_out", False) else W


def _norm(dora, W, A, B, s: float) -> torch.Tensor:
    """ν for one adapter from the current W, A, B (the :class:`RowNormRunner` kept on PEFT's DoraLinearLayer
    replays its CUDA graph; ν is reused only inside :func:`frozen_norms`)."""
    if torch.compiler.is_compiling():  # compiled graphs call the op (no runner, no CUDA graph: inductor's own)
        return row_norm_op(W.detach(), A.detach(), B.detach(), s)
    runner = dora.__dict__.get("_dora_verify_norm")
    if runner is None:
        runner = dora.__dict__["_dora_verify_norm"] = RowNormRunner()
    return runner.get(W, A, B, s)


def _base_from(module, x, W, bias, B):
    """(x, W, bias) where ``save='x'`` applies — the base layer is a plain nn.Linear whose output ``result`` is
    exactly F.linear(x, W, bias) (one active adapter: with more, result also holds the earlier ones), x in the
    adapters' dtype (the tensor the base layer read) — else None (base is kept)."""
    if (
        _SAVE != "x"
        or type(module.get_base_layer()) is not nn.Linear
        or len(module.active_adapters) != 1
        or x.dtype != B.dtype
        or x.dtype != W.dtype
        or getattr(module, "fan_in_fan_out", False)
    ):
        return None
    return x, W, bias


def dora_linear_forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs):
    """Drop-in for ``DoraLinearVariant.forward(module, active_adapter, x, result)`` (see the module docstring)."""
    lora_A = module.lora_A[active_adapter]
    lora_B = module.lora_B[active_adapter]
    dora = module.lora_magnitude_vector[active_adapter]
    W = _kernel_weight(module)
    devices = {t.device for t in (x, result, lora_A.weight, lora_B.weight, dora.weight)}
    if (
        W is None
        or getattr(lora_B, "bias", None) is not None
        or getattr(lora_A, "bias", None) is not None
        or lora_A.weight.dtype not in KERNEL_DTYPES
        or len(devices | {W.device}) != 1
    ):
        return _ORIGINAL.__func__(module, active_adapter=active_adapter, x=x, result=result, **kwargs)
    dropout = module.lora_dropout[active_adapter]
    s = round_to_fp32(module.scaling[active_adapter])
    A, B = lora_A.weight, lora_B.weight
    nu = _norm(dora, W, A, B, s)  # the runner reads the parameters' storages (no detach: host time)
    y_path = isinstance(dropout, nn.Identity) or not module.training
    bias = module.get_base_layer().bias
    if y_path:
        base = result - bias if bias is not None else result  # PEFT removes the bias before the compose
        xa = lora_A(x)
        b = bias.to(base.dtype) if bias is not None else None
        if not torch.is_autocast_enabled(x.device.type) and (
            B.dtype != torch.float32 or not torch.compiler.is_compiling()
        ):
            return dora_lora_compose_unchecked(
                base, xa.to(B.dtype), B, dora.weight, nu, s, b, DEFAULT_EPS, base_from=_base_from(module, x, W, bias, B)
            )
        return compose(base, lora_B(xa), dora_scale(dora.weight, nu, g_minus_1=False)[0], s, b)
    g, g_minus_1 = dora_scale(dora.weight, nu)  # g − 1 for the Δ of the dropout path
    xd = dropout(x)
    base_d = F.linear(xd, W.to(xd.dtype))
    return result + compose(base_d, lora_B(lora_A(xd)), g, s, g_minus_1=g_minus_1, output="delta")


__all__ = ["SAVE_MODES", "disable", "dora_linear_forward", "enable", "enabled", "is_enabled", "save_mode"]
