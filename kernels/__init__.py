"""dora_verify.kernels: the production DoRA kernels.

* :func:`factored_row_norm` — ν = ‖W + s·BA‖_row in fp32 without the dense BA (``norm.py``), computed on
  every call of a layer; :func:`frozen_norms` — the opt-in inference reuse of ν;
* :func:`dora_scale` — g and g − 1 in fp32 (``scale.py``);
* :func:`compose` — fused Triton compose forward/backward with autograd and ``torch.library`` ops
  (``compose.py``), routed by the three-tier :func:`select_tier` (``dispatch.py``);
* :func:`lora_compose` — the compose with the LoRA up-projection fused in (``lora_compose.py``), and
  :func:`dora_lora_compose`, the same with the scale g = m / max(ν, ε) formed inside (what the layers call);
* :class:`DoRALinear` — a DoRA layer with PEFT's semantics (``layer.py``).

Ships as ``dora_verify.kernels`` (pyproject maps the top-level ``kernels/`` folder to it); no top-level
module named ``kernels`` is installed. Each module's docstring states its numerical contract.
"""

from .compose import compose
from .dispatch import HAS_TRITON, Tier, select_tier
from .layer import DoRALinear, lora_scaling
from .lora_compose import dora_lora_compose, lora_compose
from .norm import factored_row_norm, frozen_norms, weight_row_sq
from .scale import dora_scale

__all__ = [
    "DoRALinear",
    "HAS_TRITON",
    "Tier",
    "compose",
    "dora_lora_compose",
    "dora_scale",
    "factored_row_norm",
    "frozen_norms",
    "lora_compose",
    "lora_scaling",
    "select_tier",
    "weight_row_sq",
]
