"""DoRALinear: a frozen ``nn.Linear`` plus a DoRA adapter (A, B, m, s), with PEFT's semantics.

Forward (PEFT ``LoraConfig(use_dora=True)`` semantics):

    base = x Wᵀ (bias excluded)      lora = (dropout(x) Aᵀ) Bᵀ      ν = ‖W + s·BA‖_row (detached)
    g = m / max(ν, ε)                y = g ⊙ (base + s·lora) + bias

* ν comes from :func:`factored_row_norm` (fp32, ill-conditioned rows recomputed), computed from the current
  W, A, B on every forward (:class:`RowNormRunner`; on CUDA by replaying a CUDA graph of the norm's
  launches), so no writer — fused optimisers, ``.data`` edits, ``load_state_dict``, re-gathered parameters —
  can leave it stale. :func:`frozen_norms` opts into reusing ν for inference (grad mode off).
* Autocast: the norm, g and the compose keep their contracts under ``torch.autocast`` (the norm runs with
  autocast off); the layer's GEMMs (x Wᵀ, x Aᵀ, xa Bᵀ) run in the autocast dtype, as PEFT's do, and the compose
  then reads a materialised lora in that dtype.
* g and g − 1 stay fp32 (:func:`dora_scale`); the compose rounds once. ``save`` picks what the
  training forward keeps for backward (d_m from float64 sums — its lora term from the fp32 GEMM dyᵀxa under
  'recompute' and 'x' — except 'activation'):
  'recompute' (default) fuses the LoRA up-projection into the compose (:func:`lora_compose`): lora = xa Bᵀ
  is never written (nor rounded to the adapter dtype), backward keeps base and xa and takes d_g's lora term from
  M = dyᵀxa, d_B's product (H100, 8192², r = 384, 4096 tokens: 0.82× PEFT LoRA's peak, reports/h100/bench);
  'x' (the fused tier — CUDA — with bf16/fp16 adapters in the input's dtype; otherwise as 'recompute') keeps only
  x and xa — what LoRA's own
  down-projection keeps — and forms base = x Wᵀ again in the backward: the same bits, one more GEMM, no
  activation-sized tensor beyond LoRA's;
  'inputs' materialises lora and keeps base and lora (measured slower and larger there: fwd+bwd 1.69×,
  peak 1.33× LoRA's; reports/h100/kernels); 'activation'
  keeps only base + s·lora in the activation dtype, bf16 for fp16 (d_m to ~2⁻⁸ relative). fp32 adapters (PEFT's default
  autocast) under 'recompute' form lora with torch's GEMM, compose it and free it, and form it again in the backward
  (compiled graphs keep it); PEFT-style dropout always takes :func:`compose` on a materialised lora.
* Dropout: with ``dropout_semantics='peft'`` (default) and dropout active (training, p > 0), the layer
  does what PEFT does: ``y = (x Wᵀ + bias) + (g−1) ⊙ (x_d Wᵀ) + g ⊙ s·lora(x_d)`` with x_d the dropped-out
  input, which costs a second base GEMM. ``'clean_base'`` scales the clean base instead
  (torchtune/axolotl: ``y = g ⊙ (x Wᵀ + s·lora(x_d)) + bias``), one GEMM cheaper; the two agree at
  p = 0 and in eval mode.
* Adapters: ``adapter_dtype`` None keeps A, B in W's dtype; ``torch.float32`` reproduces PEFT's default
  (``autocast_adapter_dtype=True``): the LoRA branch runs in fp32 and the compose reads an fp32 lora.
* Validation: the constructor rejects what would give silent garbage (non-floating or fp64 weights, adapters or
  bias; alpha, eps or kappa_max NaN; eps ≤ 0); the forward checks dtypes and shapes (no host synchronisation).
  Non-finite parameters or inputs propagate (NaN/Inf in the output), as in PEFT: a finiteness check would cost
  a host synchronisation per call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .compose import compose
from .dispatch import KERNEL_DTYPES
from .lora_compose import dora_lora_compose_unchecked, lora_compose
from .norm import DEFAULT_KAPPA_MAX, RowNormRunner, check_kappa_max, row_norm_op
from .scale import DEFAULT_EPS, dora_scale, round_to_fp32


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """s = alpha / r (or alpha / √r with rsLoRA), rounded to fp32 (the kernels hold s in fp32). Raises ValueError
    unless alpha is finite and r positive."""
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha!r}")
    if int(r) <= 0:
        raise ValueError(f"rank r must be positive, got {r}")
    s = alpha / math.sqrt(r) if use_rslora else alpha / r
    return round_to_fp32(s)


def _check_kernel_dtype(name: str, dtype: torch.dtype) -> None:
    if dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"{name} has dtype {dtype}; the DoRA kernels take bfloat16, float16 or float32 "
            "(float64 and integer tensors are not supported)"
        )


class DoRALinear(nn.Module):
    """DoRA adapter around a frozen ``nn.Linear`` (see the module docstring for the semantics)."""

    def __init__(
        self,
        base_layer: nn.Linear,
        r: int,
        alpha: "float | None" = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        dropout_semantics: str = "peft",
        adapter_dtype: "torch.dtype | None" = None,
        eps: float = DEFAULT_EPS,
        save: str = "recompute",
        kappa_max: float = DEFAULT_KAPPA_MAX,
    ):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        if isinstance(r, bool) or int(r) != r or int(r) <= 0:
            raise ValueError(f"rank r must be a positive integer, got {r!r}")
        _check_kernel_dtype("base_layer.weight", base_layer.weight.dtype)
        if base_layer.bias is not None:
            _check_kernel_dtype("base_layer.bias", base_layer.bias.dtype)
        if adapter_dtype is not None:
            _check_kernel_dtype("adapter_dtype", adapter_dtype)
        if not (math.isfinite(float(eps)) and float(eps) > 0):
            raise ValueError(f"eps must be a positive finite number, got {eps!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if save not in ("recompute", "x", "inputs", "activation"):
            raise ValueError(f"save must be 'recompute', 'x', 'inputs' or 'activation', got {save!r}")
        if dropout_semantics not in ("peft", "clean_base"):
            raise ValueError(f"dropout_semantics must be 'peft' or 'clean_base', got {dropout_semantics!r}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        W = base_layer.weight
        d_out, d_in = W.shape
        dt = adapter_dtype or W.dtype
        self.r = int(r)
        self.alpha = float(alpha if alpha is not None else r)
        self.scaling = lora_scaling(self.alpha, self.r, use_rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_semantics = dropout_semantics
        self.eps = float(eps)
        self.save = save
        self.kappa_max = check_kappa_max(kappa_max)
        self.lora_A = nn.Parameter(torch.empty(self.r, d_in, dtype=dt, device=W.device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, self.r, dtype=dt, device=W.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's (and PEFT's) default for A
        self.row_norm = RowNormRunner()
        self.magnitude = nn.Parameter(self.weight_norm().clone())  # m = ν at init: g = 1 exactly

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: "float | None" = None, **kwargs) -> "DoRALinear":
        return cls(linear, r, alpha, **kwargs)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def weight_norm(self) -> torch.Tensor:
        """ν = ‖W + s·BA‖_row, fp32, detached, of the current W, A, B (reused only inside :func:`frozen_norms`)."""
        W, A, B = self.base_layer.weight, self.lora_A, self.lora_B
        if torch.compiler.is_compiling():
            return row_norm_op(W, A, B, self.scaling)
        return self.row_norm.get(W, A, B, self.scaling, self.kappa_max)

    def scale(self, g_minus_1: bool = True):
        """(g, g − 1), fp32, differentiable in the magnitude; (g, None) with ``g_minus_1=False``. The forward forms
        this g inside the fused kernels (:func:`dora_lora_compose`, the same bits); a subclass that overrides
        ``scale`` has its own g composed instead."""
        return dora_scale(self.magnitude, self.weight_norm(), self.eps, g_minus_1=g_minus_1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W, bias = self.base_layer.weight, self.base_layer.bias
        if x.shape[-1] != W.shape[1]:
            raise ValueError(f"input has {x.shape[-1]} features, the layer expects {W.shape[1]}")
        if W.dtype not in KERNEL_DTYPES or self.lora_A.dtype not in KERNEL_DTYPES:  # e.g. after .double()
            _check_kernel_dtype("base_layer.weight", W.dtype)
            _check_kernel_dtype("lora_A", self.lora_A.dtype)
        if x.dtype != W.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"input has dtype {x.dtype} but the weight is {W.dtype}: cast the input, or run the "
                "layer under torch.autocast"
            )
        xd = self.dropout(x)
        xa = F.linear(xd.to(self.lora_A.dtype), self.lora_A)
        peft_dropout = self.training and xd is not x and self.dropout_semantics == "peft"
        base = F.linear(x, W)
        if peft_dropout:  # only PEFT's dropout path composes Δ, which needs g − 1
            g, gm1 = self.scale(g_minus_1=True)
            delta = compose(
                F.linear(xd, W),
                F.linear(xa, self.lora_B),
                g,
                self.scaling,
                g_minus_1=gm1,
                output="delta",
                save=self._compose_save,
            )
            return (base + bias if bias is not None else base) + delta
        if (
            self.save in ("recompute", "x")
            and not torch.is_autocast_enabled(x.device.type)
            and (self.lora_B.dtype != torch.float32 or not torch.compiler.is_compiling())
        ):  # autocast: materialise
            if type(self).scale is not DoRALinear.scale:  # a subclass's own g (the toolkit's planted layers)
                return lora_compose(base, xa, self.lora_B, self.scale(g_minus_1=False)[0], self.scaling, bias)
            keep_x = self.save == "x" and x.dtype == self.lora_B.dtype  # base formed again in the backward
            return dora_lora_compose_unchecked(
                base,
                xa,
                self.lora_B,
                self.magnitude,
                self.weight_norm(),
                self.scaling,
                bias,
                self.eps,
                base_from=(x, W, None) if keep_x else None,
            )  # g formed in the kernels
        g, _ = self.scale(g_minus_1=False)
        return compose(base, F.linear(xa, self.lora_B), g, self.scaling, bias, save=self._compose_save)

    @property
    def _compose_save(self) -> str:
        return "activation" if self.save == "activation" else "inputs"

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W' = (m / ν) ⊙ (W + s·BA) row-wise, formed in float64, rounded once to W's dtype."""
        W, A, B = self.base_layer.weight, self.lora_A, self.lora_B
        g, _ = self.scale(g_minus_1=False)
        V = W.double() + self.scaling * (B.double() @ A.double())
        return (g.double()[:, None] * V).to(W.dtype)

    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing this layer's eval-mode output (up to W's rounding)."""
        lin = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.base_layer.bias is not None,
            device=self.base_layer.weight.device,
            dtype=self.base_layer.weight.dtype,
        )
        with torch.no_grad():
            lin.weight.copy_(self.merged_weight())
            if self.base_layer.bias is not None:
                lin.bias.copy_(self.base_layer.bias)
        return lin

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, "
            f"s={self.scaling}, dropout_semantics={self.dropout_semantics!r}"
        )


__all__ = ["DoRALinear", "lora_scaling"]
