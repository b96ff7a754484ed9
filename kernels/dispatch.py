"""Three-tier dispatch; every tier obeys the same numerical contract (docs/contract.md).

1. ``FUSED_TRAIN``: fused Triton forward (saving ``inner``) and fused backward — CUDA, Triton, gradients
   needed, T·d_out ≥ ``TRAIN_MIN_ELEMENTS``;
2. ``FUSED_INFER``: fused forward only — nothing requires grad, T·d_out ≥ ``INFER_MIN_ELEMENTS``;
3. ``EAGER``: float64 torch — CPU, no Triton, below the crossover, or forced.

The crossovers are measured on the GPU (``bench/kernels_gpu.py``, part "perf", recorded in
``reports/h100/kernels/report.md``), not guessed. ``DORA_VERIFY_TIER=eager|fused`` overrides the choice
globally; a ``tier=`` argument overrides it per call. Under ``TRITON_INTERPRET=1`` the fused kernels
also run on CPU tensors (logic checks only). Cases whose fused kernels are known to
be wrong (:func:`fused_supported`: the interpreter's bf16 ``tl.dot``) take the eager tier, and forcing
the fused tier there raises ValueError. :func:`no_autocast` keeps autocast out of the ops' torch math.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import os

import torch

try:  # Triton is optional: CPU-only installs and non-Linux platforms get the eager tier
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the platform
    HAS_TRITON = False

# Measured on one H100 (reports/h100/kernels/report.md, crossover table): smallest T·d_out where fused is
# not slower than the eager tier. The eager tier computes in float64, so the fused path wins almost
# everywhere on a GPU; below these sizes launch overhead dominates both.
INFER_MIN_ELEMENTS = 1
TRAIN_MIN_ELEMENTS = 1


class Tier(enum.IntEnum):
    FUSED_TRAIN = 1
    FUSED_INFER = 2
    EAGER = 3


_ENV_DATA = getattr(os.environ, "_data", None)  # os.environ's own dictionary, updated by every write through it
_ENV_KEYS: dict = {}


def getenv(name: str, default: "str | None" = None) -> "str | None":
    """``os.environ.get(name, default)`` at the cost of one dictionary lookup: the layers read their switches
    (DORA_VERIFY_TIER, TRITON_INTERPRET, …) on every call, and ``os.environ.get`` encodes the key and decodes the value
    each time (µs a read, ten reads a layer step). Reads ``os.environ``'s own mapping, which ``os.environ[k] = v``,
    ``del``, ``monkeypatch.setenv`` and ``mock.patch.dict`` all update; falls back to ``os.environ.get`` where that
    mapping is not there."""
    if not isinstance(_ENV_DATA, dict):  # pragma: no cover - another os implementation
        return os.environ.get(name, default)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.environ.encodekey(name)
    value = _ENV_DATA.get(key)
    return default if value is None else os.environ.decodevalue(value)


def interpreting() -> bool:
    return getenv("TRITON_INTERPRET", "0") not in ("", "0")


# Ops whose fused kernels multiply with tl.dot (kernels/lora_compose.py: the lora tile; kernels/norm.py: U = W Aᵀ,
# G = A Aᵀ, B G). compose's kernels are elementwise.
DOT_OPS = frozenset({"lora_compose", "row_norm"})
OPS = frozenset({"compose"}) | DOT_OPS
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what every kernel takes


def fused_supported(op: str, dtype, device) -> "tuple[bool, str]":
    """Can ``op``'s fused kernels run correctly on operands of ``dtype`` (a dtype or several) on ``device``?

    Returns (True, '') or (False, a one-line reason). Refused: no Triton; a dtype other than bf16/fp16/fp32; a
    device other than CUDA (CPU only under TRITON_INTERPRET=1); and, under the interpreter (on any device: it copies
    CUDA tensors to the host), a tl.dot op (:data:`DOT_OPS`) with a bf16 operand — numpy has no bf16, the interpreter
    keeps bf16 as its uint16 bits and its tl.dot multiplies those integers (lora_compose off by ~1e10). fp16 tl.dot
    and the elementwise compose run there (but its fp32 → bf16 casts truncate: logic checks only). ``dtype`` for
    the tl.dot ops: lora_compose — the adapter's (xa, B); row_norm — those of W, A and B. dora_verify/gate.py's
    ``cpu_impls`` applies the stricter rule of no bf16 on the interpreter at all (the truncating casts)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {sorted(OPS)}, got {op!r}")
    dtypes = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    if not HAS_TRITON:
        return False, "the fused tier needs Triton, which is not installed"
    bad = [d for d in dtypes if d not in KERNEL_DTYPES]
    if bad:
        return False, f"the fused kernels take bf16, fp16 or fp32, got {bad[0]}"
    interp = interpreting()
    if not (kind == "cuda" or (interp and kind == "cpu")):
        return False, (
            f"the fused tier needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 on CPU), got a {device} tensor"
        )
    if interp and op in DOT_OPS and torch.bfloat16 in dtypes:
        return False, (
            f"{op} uses tl.dot, which the Triton interpreter evaluates on bf16's raw uint16 bits "
            f"(garbage); use the eager tier, fp16, or a GPU without TRITON_INTERPRET"
        )
    return True, ""


def triton_usable(t: torch.Tensor) -> bool:
    """Can the (elementwise) fused compose kernels run on tensors like ``t``?"""
    return fused_supported("compose", t.dtype, t.device)[0]


def select_tier(
    base: torch.Tensor, needs_grad: bool, force: "Tier | str | None" = None, *, op: str = "compose", dtype=None
) -> Tier:
    """Pick the tier for ``op`` on ``base``'s shape and device; ``dtype``: the dtype(s) of the op's tl.dot
    operands (lora_compose: the adapter's; default ``base.dtype``; see :func:`fused_supported`).

    ``force`` ('fused', 'eager' or a Tier; default ``$DORA_VERIFY_TIER``) overrides the choice. Where
    :func:`fused_supported` refuses the case, the automatic choice is the eager tier and a forced fused tier raises
    ValueError with the reason: known-wrong results are never returned. The choice is a function of the arguments'
    kinds and the environment, and is memoised on exactly those (it runs on every layer call)."""
    force = force if force is not None else getenv("DORA_VERIFY_TIER") or None
    if force is not None and not isinstance(force, (str, Tier)):
        raise ValueError(f"tier must be 'fused', 'eager' or a Tier, got {force!r}")
    n = base.numel()
    return _select_tier(
        base.dtype,
        base.device,
        n >= TRAIN_MIN_ELEMENTS,
        n >= INFER_MIN_ELEMENTS,
        bool(needs_grad),
        force,
        op,
        dtype if isinstance(dtype, (torch.dtype, type(None))) else tuple(dtype),
        getenv("TRITON_INTERPRET", "0"),
        HAS_TRITON,
    )


@functools.lru_cache(maxsize=1024)
def _select_tier(base_dtype, device, train_size, infer_size, needs_grad, force, op, dtype, _interp, _has_triton):
    """:func:`select_tier` on the facts it depends on (the last two are in the key only to invalidate it)."""
    want = None
    if isinstance(force, str):
        if force not in ("fused", "eager"):
            raise ValueError(f"tier must be 'fused' or 'eager', got {force!r}")
        if force == "eager":
            return Tier.EAGER
        want = Tier.FUSED_TRAIN if needs_grad else Tier.FUSED_INFER
    elif isinstance(force, Tier):
        if force == Tier.EAGER:
            return force
        want = force
    elif force is not None:
        raise ValueError(f"tier must be 'fused', 'eager' or a Tier, got {force!r}")
    ok, why = fused_supported(op, base_dtype if dtype is None else dtype, device)
    if ok and dtype is not None:  # base itself is read elementwise
        ok, why = fused_supported("compose", base_dtype, device)
    if want is not None:
        if not ok:
            raise ValueError(f"tier {force if isinstance(force, str) else force.name!r} refused: {why}")
        return want
    if not ok or device.type != "cuda":
        return Tier.EAGER
    if needs_grad:
        return Tier.FUSED_TRAIN if train_size else Tier.EAGER
    return Tier.FUSED_INFER if infer_size else Tier.EAGER


_AUTOCAST_TYPES = ("cpu", "cuda")
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (
    lambda: any(torch.is_autocast_enabled(k) for k in _AUTOCAST_TYPES)
)


@contextlib.contextmanager
def autocast_off():
    """A context with CPU and CUDA autocast disabled where enabled: the contracts fix each op's precision, and
    autocast would silently run e.g. the eager tier's F.linear in bf16."""
    with contextlib.ExitStack() as stack:
        for kind in _AUTOCAST_TYPES:
            if torch.is_autocast_enabled(kind):
                stack.enter_context(torch.autocast(kind, enabled=False))
        yield


def no_autocast(fn):
    """Decorator: run ``fn`` under :func:`autocast_off` (costs < 1 µs a call where autocast is off)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not _any_autocast():
            return fn(*args, **kwargs)
        with autocast_off():
            return fn(*args, **kwargs)

    return wrapper


__all__ = [
    "DOT_OPS",
    "HAS_TRITON",
    "INFER_MIN_ELEMENTS",
    "KERNEL_DTYPES",
    "OPS",
    "TRAIN_MIN_ELEMENTS",
    "Tier",
    "autocast_off",
    "fused_supported",
    "getenv",
    "interpreting",
    "no_autocast",
    "select_tier",
    "triton_usable",
]
