"""Implementations for tests/test_gate.py, reached through the adapter protocol (``--impl planted_impls:NAME``):
the real kernel as a user would wrap it, and deliberately broken ones."""
import torch

from dora_verify.forms import naive as _naive_form
from dora_verify.kernels import compose as _compose


def _ref(base, lora, g, s, bias=None):
    return _compose(base, lora, g, s, bias, tier="eager")


class Good:
    """The production compose (eager tier), held to the 'faithful' contract of a user's kernel."""
    name = "good"
    deterministic = True

    def compose(self, base, lora, g, s, bias=None):
        return _ref(base, lora, g, s, bias)


def gcast(base, lora, g, s, bias=None):
    """Planted: g rounded to bf16 before an otherwise single-rounding compose (torchtune/axolotl's cast)."""
    return _ref(base, lora, g.to(torch.bfloat16).to(torch.float32), s, bias)


def naive(base, lora, g, s, bias=None):
    """Planted: the naive form g·(s·lora + base) − base in the activation dtype."""
    return _naive_form(base, lora, g, s, bias)[0]


def off_by_one(base, lora, g, s, bias=None):
    """Planted: a column mask of ``cols < N − 1`` — the last output feature keeps base (+ bias)."""
    y = _ref(base, lora, g, s, bias)
    y[:, -1] = base[:, -1] if bias is None else (base[:, -1].to(torch.float32) + bias[-1]).to(base.dtype)
    return y


class Flaky:
    """Planted: claims determinism, but flips the last bit of one random element per call."""
    name = "flaky"
    deterministic = True

    def compose(self, base, lora, g, s, bias=None):
        y = _ref(base, lora, g, s, bias)
        if y.numel() > 1:
            i = int(torch.randint(0, y.numel(), (1,)))
            flat = y.view(-1)
            bits = flat[i:i + 1].view(torch.int16 if y.element_size() == 2 else torch.int32)
            bits ^= 1
        return y


class Fp32Only:
    """Supports fp32 only: a bf16-only gate run has nothing to run."""
    dtypes = ("fp32",)

    def compose(self, base, lora, g, s, bias=None):
        return _ref(base, lora, g, s, bias)
