"""Binary floating-point formats: exact rounding, ulp and ordered bit views.

Everything here is exact arithmetic on float64 tensors, on any torch device:

* ``round_to(x, fmt)`` rounds float64 values to ``fmt`` with round-to-nearest-even, *directly*. torch's
  own ``double -> bfloat16/half`` casts go through float32 first (double rounding), which is wrong for
  values that round to an fp32 midpoint of the narrower format; a verification toolkit must not inherit
  that.
* ``ulp(x, fmt)`` is Goldberg's ulp: the spacing of ``fmt``'s grid in the binade of ``|x|``
  (``2**(max(e, emin) - p + 1)`` with ``e = floor(log2 |x|)``); for 0 it is the subnormal spacing.
* ``ordered_bits(t)`` maps values of one format to integers whose difference is the number of
  representable values between them (+0 and -0 map to the same integer). NumPy's ulp helpers reject
  bf16; this works through integer bit views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FloatFormat:
    """An IEEE-style binary format: ``p`` significand bits (implicit bit included), exponents
    ``emin..emax`` of normal numbers."""

    name: str
    torch_dtype: torch.dtype
    p: int
    emin: int
    emax: int
    bits: int

    @property
    def u(self) -> float:
        """Unit roundoff of round-to-nearest: 2**-p."""
        return 2.0**-self.p

    @property
    def max_finite(self) -> float:
        return (2.0 - 2.0 ** (1 - self.p)) * 2.0**self.emax

    @property
    def min_normal(self) -> float:
        return 2.0**self.emin

    def __str__(self) -> str:  # pragma: no cover - cosmetic
        return self.name


BF16 = FloatFormat("bf16", torch.bfloat16, 8, -126, 127, 16)
FP16 = FloatFormat("fp16", torch.float16, 11, -14, 15, 16)
FP32 = FloatFormat("fp32", torch.float32, 24, -126, 127, 32)
FP64 = FloatFormat("fp64", torch.float64, 53, -1022, 1023, 64)

FORMATS = {f.name: f for f in (BF16, FP16, FP32, FP64)}
_ALIASES = {
    "bf16": BF16,
    "bfloat16": BF16,
    "fp16": FP16,
    "float16": FP16,
    "half": FP16,
    "f16": FP16,
    "fp32": FP32,
    "float32": FP32,
    "float": FP32,
    "f32": FP32,
    "fp64": FP64,
    "float64": FP64,
    "double": FP64,
    "f64": FP64,
}
_BY_TORCH = {f.torch_dtype: f for f in FORMATS.values()}


def g_resolution(fmt: "str | torch.dtype | FloatFormat") -> float:
    """2^-(p+1): the largest t with RN_fmt(1 + d) = 1 for every |d| ≤ t (ties to even; above 1 the interval reaches
    2^-p, below 1 only 2^-(p+1)). bf16 2⁻⁹, fp16 2⁻¹², fp32 2⁻²⁵: a DoRA scale g that close to 1 rounds to 1."""
    return 2.0 ** -(parse_format(fmt).p + 1)


def parse_format(name: "str | torch.dtype | FloatFormat") -> FloatFormat:
    """The format for a name (``bf16``, ``bfloat16``, ``fp32``...), a torch dtype or a format.

    Raises ``ValueError`` with the accepted names for anything else."""
    if isinstance(name, FloatFormat):
        return name
    if isinstance(name, torch.dtype):
        if name in _BY_TORCH:
            return _BY_TORCH[name]
        raise ValueError(f"unsupported dtype {name}; supported: bf16, fp16, fp32, fp64")
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in _ALIASES:
        raise ValueError(f"unknown dtype {name!r}; choose one of bf16, fp16, fp32, fp64")
    return _ALIASES[key]


def pow2(k: torch.Tensor) -> torch.Tensor:
    """Exact float64 ``2**k`` for an integer tensor with ``-1074 <= k <= 1023`` (built from bits;
    subnormal powers as an exact product of two normal ones)."""
    k = k.to(torch.int64)
    if k.numel() and (int(k.min()) < -1074 or int(k.max()) > 1023):
        raise ValueError("pow2 exponent out of the float64 range")
    hi = torch.clamp(k, min=-1022)
    lo = torch.clamp(k + 1022, max=0) * (k < -1022)
    return ((hi + 1023) << 52).view(torch.float64) * ((lo + 1023) << 52).view(torch.float64)


def _grid_scale(x: torch.Tensor, fmt: FloatFormat):
    """(scale, inv_scale): fmt's grid spacing in the binade of |x| (Goldberg ulp; subnormal spacing
    below emin; the spacing of binade emax+1 beyond the finite range) and its exact reciprocal.

    Built from float64 exponent bits: exact, and a few integer passes."""
    k = x.view(torch.int64) >> 52  # in place from here: two allocations (the sweep rounds ~10⁸ values)
    k &= 0x7FF  # float64 biased exponent of |x|
    k.clamp_(min=fmt.emin + 1023, max=fmt.emax + 1024)
    k -= fmt.p - 1  # biased exponent of the spacing (>= 1 for bf16/fp16/fp32)
    inv = torch.sub(2046, k)
    inv <<= 52
    k <<= 52
    return k.view(torch.float64), inv.view(torch.float64)


def ulp(x: torch.Tensor, fmt: "FloatFormat | str") -> torch.Tensor:
    """Goldberg ulp of ``fmt`` at each value of ``x`` (float64 result, exact). NaN for non-finite x."""
    fmt = parse_format(fmt)
    x = x.to(torch.float64)
    if fmt is FP64:
        raise ValueError("ulp(.., fp64) is not supported: use math.ulp")
    out, _ = _grid_scale(x, fmt)
    return torch.where(torch.isfinite(x), out, torch.full_like(out, float("nan")))


def _finish(x: torch.Tensor, y: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Overflow to ±inf, and x's NaN/±inf through (``y`` is a fresh tensor: changed in place)."""
    over = y.abs() > fmt.max_finite
    if bool(over.any()):
        y = torch.where(over, torch.sign(y) * float("inf"), y)
    fin = torch.isfinite(x)
    return y if bool(fin.all()) else torch.where(fin, y, x)


def round_to(x: torch.Tensor, fmt: "FloatFormat | str") -> torch.Tensor:
    """Round float64 values to ``fmt`` with round-to-nearest-even, in one step (no double rounding).

    Returns float64 tensors holding exactly representable ``fmt`` values; overflow goes to ±inf by the
    IEEE rule (|x| >= max_finite + ulp/2), NaN and ±inf pass through, signed zeros are kept."""
    fmt = parse_format(fmt)
    x = x.to(torch.float64)
    if fmt is FP64:
        return x.clone()
    scale, inv = _grid_scale(x, fmt)
    inv *= x  # x / spacing, exactly (a power of two)
    torch.round(inv, out=inv)  # half to even
    inv *= scale
    return _finish(x, inv, fmt)


def bracket(x: torch.Tensor, fmt: "FloatFormat | str"):
    """The two ``fmt`` values enclosing each x: (round down, round up), float64. Equal when x is
    representable. A result is *faithful* iff it is one of the two."""
    fmt = parse_format(fmt)
    x = x.to(torch.float64)
    scale, inv = _grid_scale(x, fmt)
    q = x * inv
    return _finish(x, torch.floor(q) * scale, fmt), _finish(x, torch.ceil(q) * scale, fmt)


def is_representable(x: torch.Tensor, fmt: "FloatFormat | str") -> torch.Tensor:
    """True where the float64 value is exactly a value of ``fmt`` (NaN counts as representable)."""
    x = x.to(torch.float64)
    r = round_to(x, fmt)
    return (r == x) | torch.isnan(x)


_INT_VIEW = {16: torch.int16, 32: torch.int32, 64: torch.int64}


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """Integers (int64) ordered like the values of ``t``'s format: consecutive representable values
    differ by 1, and +0 / -0 both map to 0. NaN maps to an unspecified integer: mask it first."""
    fmt = parse_format(t.dtype)
    v = t.contiguous().view(_INT_VIEW[fmt.bits]).to(torch.int64)
    if fmt.bits < 64:
        v = v & ((1 << fmt.bits) - 1)  # unsigned pattern
        sign = v >> (fmt.bits - 1)
        mag = v & ((1 << (fmt.bits - 1)) - 1)
        return torch.where(sign == 1, -mag, mag)
    mag = v & 0x7FFFFFFFFFFFFFFF
    return torch.where(v < 0, -mag, mag)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Number of ``fmt`` values between ``a`` and ``b`` (same dtype): |ordered(a) - ordered(b)|."""
    if a.dtype != b.dtype:
        raise ValueError(f"ulp_distance needs one dtype, got {a.dtype} and {b.dtype}")
    return (ordered_bits(a) - ordered_bits(b)).abs()
