"""Implementations for tests/test_gate.py, reached through the adapter protocol (``--impl planted_impls:NAME``):
the real kernel as a user would wrap it, and deliberately broken ones (wrong numbers, and abuses of the
protocol: scribbling on the inputs, exiting, raising, hanging, returning the wrong type)."""

import sys
import time

import torch

from dora_verify.forms import naive as _naive_form
from dora_verify.kernels import compose as _compose
from dora_verify.kernels import factored_row_norm as _norm


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
            bits = flat[i : i + 1].view(torch.int16 if y.element_size() == 2 else torch.int32)
            bits ^= 1
        return y


class Fp32Only:
    """Supports fp32 only: a bf16-only gate run has nothing to run."""

    dtypes = ("fp32",)

    def compose(self, base, lora, g, s, bias=None):
        return _ref(base, lora, g, s, bias)


# ----------------------------------------------------------------------------- planted: abuses of the protocol
class _ZeroInputs:
    """Planted: zeroes every input in place and returns zeros. Graded against the inputs it scribbled on, it
    would be exact; graded against the suite's own inputs, it is wrong everywhere."""

    name = "zero_inputs"

    def compose(self, base, lora, g, s, bias=None):
        for t in (base, lora, g) + (() if bias is None else (bias,)):
            t.zero_()
        return torch.zeros_like(base)

    def norm(self, W, A, B, s):
        for t in (W, A, B):
            t.zero_()
        return torch.zeros(W.shape[0], dtype=torch.float32, device=W.device)


zero_inputs = _ZeroInputs()


def exits(base, lora, g, s, bias=None):
    """Planted: ends the process (sys.exit(0)) instead of returning."""
    sys.exit(0)


def raises(base, lora, g, s, bias=None):
    """Planted: raises, with a message over two lines."""
    raise RuntimeError("planted failure\nsecond line of the message")


def interrupts(base, lora, g, s, bias=None):
    """Planted: raises KeyboardInterrupt itself (no SIGINT): a crash of the case, not a Ctrl-C of the run."""
    raise KeyboardInterrupt


def hangs(base, lora, g, s, bias=None):
    """Planted: never returns."""
    while True:
        time.sleep(0.05)


class _Returns:
    """Planted: compose and norm return the right numbers in the wrong container (None, a numpy array, a
    tuple, an extra leading dimension)."""

    def __init__(self, kind):
        self.name, self.kind = f"returns_{kind}", kind

    def _wrap(self, t):
        return {"none": None, "numpy": t.float().numpy(), "tuple": (t,), "shape": t.unsqueeze(0)}[self.kind]

    def compose(self, base, lora, g, s, bias=None):
        return self._wrap(_ref(base, lora, g, s, bias))

    def norm(self, W, A, B, s):
        return self._wrap(_norm(W, A, B, s, backend="torch"))


returns_none, returns_numpy, returns_tuple, returns_shape = (_Returns(k) for k in ("none", "numpy", "tuple", "shape"))


def nonfinite_swap(base, lora, g, s, bias=None):
    """Planted: NaN/±Inf flushed to finite values (torch.nan_to_num), and +Inf in the last element."""
    y = torch.nan_to_num(_ref(base, lora, g, s, bias))
    y[-1, -1] = float("inf")
    return y


class BadFactory:
    """Planted: the constructor raises (a message over two lines)."""

    def __init__(self):
        raise RuntimeError("no device found\nsecond line of the message")


class ExitingFactory:
    """Planted: the constructor ends the process."""

    def __init__(self):
        sys.exit(3)


# ----------------------------------------------------------------------------- layers (the layer protocol)
from dora_verify.kernels import DoRALinear as _DoRALinear  # noqa: E402


def good_layer(linear, r, alpha, adapter_dtype=None):
    """This project's DoRALinear as a user would hand it over: held to the faithful layer contract."""
    return _DoRALinear(linear, r, alpha, adapter_dtype=adapter_dtype)


good_layer.deterministic = True


class _NuNotDetached(_DoRALinear):
    """Planted: ν = ‖W + s·BA‖ left in the autograd graph (no detach): dA and dB get the extra term
    −(m/ν²)·Σ_T(dy·h)·∂ν/∂(A, B) that DoRA §4.3 drops."""

    def scale(self, g_minus_1: bool = True):
        W, A, B = self.base_layer.weight, self.lora_A, self.lora_B
        nu = torch.linalg.vector_norm(W.float() + self.scaling * (B.float() @ A.float()), dim=1)
        g = self.magnitude.float() / nu.clamp_min(self.eps)
        return g, (g - 1 if g_minus_1 else None)


def nu_not_detached(linear, r, alpha, adapter_dtype=None):
    """Planted: a DoRA layer whose ν is not detached (gradient flows through ν into A and B)."""
    return _NuNotDetached(linear, r, alpha, adapter_dtype=adapter_dtype)


nu_not_detached.deterministic = True


class _GBf16(_DoRALinear):
    """Planted: g = m/ν rounded to bf16 inside the layer (what PEFT's bf16 magnitude / weight norm does)."""

    def scale(self, g_minus_1: bool = True):
        g, gm1 = super().scale(g_minus_1)
        return g.to(torch.bfloat16).to(torch.float32), gm1


def g_bf16(linear, r, alpha, adapter_dtype=None):
    """Planted: a DoRA layer that rounds g to bf16."""
    return _GBf16(linear, r, alpha, adapter_dtype=adapter_dtype)


g_bf16.deterministic = True


def layer_returns_none(linear, r, alpha):
    """Planted: a layer factory that returns None (and takes no adapter_dtype: the toolkit converts adapters)."""
    return None


class _Detached(_DoRALinear):
    def forward(self, x):
        return super().forward(x).detach().requires_grad_()


def layer_detached(linear, r, alpha, adapter_dtype=None):
    """Planted: forward cut from the graph (a fresh leaf): no gradient reaches the parameters."""
    return _Detached(linear, r, alpha, adapter_dtype=adapter_dtype)
