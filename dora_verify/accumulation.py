"""Accumulator precision, emulated exactly: what fp32, bf16 and fp16 accumulators do to ν, the GEMMs, g and y.

Emulation (every function below is *exact*: it returns the value the named accumulator produces, bit for bit)
-------------------------------------------------------------------------------------------------------------
The terms of a reduction are exact products. Inputs in bf16, fp16 or fp32 have at most 24 significand bits
and exponents in [−149, 127]; a product has at most 48 bits and an exponent in [−298, 255], so it is exact
in float64 (53 bits, normal down to 2⁻¹⁰²²). An accumulation step is ``a ← RN_acc(a + p)``: ``a`` a value of
the accumulator format, ``p`` an exact product (an FMA-style step: the product is not rounded first).

``rn_add`` computes RN_acc(a + p) exactly, in three float64 steps:

1. TwoSum: s = fl64(a + p) and e = (a + p) − s exactly (Knuth; exact in binary64 barring overflow, also
   under gradual underflow).
2. Round to odd: where e ≠ 0 and s has an even significand, s moves to its float64 neighbour toward
   a + p. The result is RO₅₃(a + p), the round-to-odd of the exact sum.
3. RN_acc(RO₅₃(x)) = RN_acc(x) whenever the accumulator has p ≤ 51 bits (Boldo & Melquiond, "Emulation of
   FMA and correctly rounded sums: proved algorithms using rounding to odd", IEEE TC 2008: rounding to odd
   at ≥ p + 2 bits, then to nearest at p bits, is one correct rounding). fp32 (24), fp16 (11) and bf16 (8)
   qualify, in their subnormal ranges too (float64 keeps 53 bits there). The rounding to the accumulator
   is ``formats.round_to``'s grid arithmetic, inlined; overflow goes to ±inf as IEEE says.

Why not simply RN_acc(fl64(a + p)), as if a + p were always exact in float64: it is exact only while the
exponent gap of a and p stays below 53 minus their bit lengths (≈ 45 for two bf16 values, ≈ 37 for a bf16
accumulator and a bf16·bf16 product, ≈ 5 for an fp32 accumulator and an fp32·fp32 product). Beyond it the
float64 sum is rounded, and a double rounding goes wrong when it lands on a midpoint of the accumulator
format: a = 2⁻¹⁰⁰ (bf16), p = (1 + 2⁻⁴)² = 1 + 2⁻³ + 2⁻⁸ (a bf16 midpoint): the exact sum is above the
midpoint, RN_bf16 rounds it up to 1 + 2⁻³ + 2⁻⁷; fl64(a + p) = p, and RN_bf16(p) ties to even, down
(tests/test_accumulation.py checks this case and its fp32 twin 2⁻⁶⁰ + (1 + 2⁻²⁴)). An fp16 accumulator cannot
hit it before it overflows (its smallest nonzero value, 2⁻²⁴, exceeds 2⁻⁵³ times its largest midpoint); bf16 and
fp32 accumulators can. Two *p-bit* operands would be safe (double rounding of a sum through 53 ≥ 2p + 1 bits is
innocuous, Figueroa 1995), but an exact product has up to 2p bits.

Orders (each a function of a terms tensor ``[n, ...]``, reduced along dim 0):

* ``seq_sum(terms, acc)``: a₀ = 0, a_j = RN_acc(a_{j−1} + p_j) for j = 1..n in index order.
* ``blocked_sum(terms, acc, L)``: consecutive blocks of L terms (the last one shorter), each summed by
  ``seq_sum`` in ``acc``; the block sums (acc values) summed by ``seq_sum`` in fp32 (split-K / a tensor-core
  k-loop with fp32 partials). L ≥ n is one block: ``seq_sum`` itself.
* ``pairwise_sum(terms, acc)``: a balanced binary tree over the terms in index order (zero padded to a power
  of two), every node RN_acc(left + right).
* ``sum2_fp64``: float64 compensated summation (Ogita–Rump–Oishi Sum2, ``eft.sum2``): within ~2⁻⁵² of exact —
  the reference whose only error is storing the result (the floor row of the report).

The experiment (``run``; ``dora-verify sweep --experiments accumulation``)
--------------------------------------------------------------------------
One trained-regime layer (``cases.make_case('trained', d_out, d_in, rank, ACC_TOKENS, dtype, seed, s)``) and,
for every form (an order and an accumulator applied to every reduction of the layer):

* ν_i = RN₃₂(√(Σ_j V_ij²)) with V = fl32(W + s·BA) (the dense_fp32 form's matrix: BA and the sum in float64,
  rounded once to fp32; its squares are exact), all d_out rows;
* base = RN_D(Σ x Wᵀ), xa = RN_D(Σ x Aᵀ), lora = RN_D(Σ xa Bᵀ) (each GEMM's result stored in the activation
  dtype D as a GEMM epilogue does), on the first ``ACC_FEATURES`` output features;
* g = RN₃₂(m / ν) (as ``kernels.dora_scale``; m = RN₃₂(g_case·ν_exact)) and y = RN_D(g·(base + s·lora)),
  the contract compose (one correct rounding, ``oracles.compose_truth``) of the form's own g, base and lora.

Each is measured against the oracle of the rounded inputs (x, W, A, B, m): ν from ``oracles.row_norm_truth``;
x Wᵀ and x Aᵀ Bᵀ in float64 with the bound γ_{n+2}·|x||W|ᵀ (resp. the two-GEMM bound), certified rounding;
g = m/ν and y = g·(xWᵀ + s·xAᵀBᵀ) with their propagated bounds. Metrics: ulp error and the fraction
correctly rounded (``metrics.compare``), and for g and y the *correction lost*: per output feature the
relative scale error β_i (ĝ_i/g_i − 1 for g, ``metrics.effective_scale_error`` for y, measured beyond the
correctly rounded value's own β), fitted by least squares as β ≈ bias − lost·(g − 1): ``lost`` is the fraction
of the magnitude update g − 1 the output lost (1 = all of it, < 0 over-applied), ``bias`` a common scale
error. ``update_rel_err`` = ‖ĝ − g‖₂/‖g − 1‖₂: above 1 the error of g is larger than the update itself.
The headline sums ``HEADLINE_N`` bf16 values drawn U(0, 1) with the sweep's seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from .eft import gamma, sum2
from .formats import BF16, FP32, FloatFormat, parse_format, round_to

ACCUMULATORS = ("fp32", "bf16", "fp16")
BLOCKS = tuple(2**k for k in range(4, 13))  # 16 … 4096
ACC_TOKENS = 16  # activation rows of the GEMMs and y
ACC_FEATURES = 1024  # output features of the GEMMs and y (ν and g: every row of W)
HEADLINE_N = 4096
CHUNK_ELEMS = 1 << 24  # terms materialised at a time (128 MiB of float64)
F64 = torch.float64


# ----------------------------------------------------------------------------- exact accumulator steps
def rn_add(a: torch.Tensor, p: torch.Tensor, fmt: "FloatFormat | str") -> torch.Tensor:
    """RN_fmt(a + p) of the exact sum, elementwise, for any float64 ``a``, ``p`` whose sum does not overflow
    float64 (returns float64 tensors holding fmt values; fmt of at most 51 bits). The module docstring derives
    it (TwoSum, round to odd, one rounding). Overflow of fmt gives ±inf; inf and NaN follow IEEE."""
    fmt = parse_format(fmt)
    if fmt.p > 51:
        raise ValueError(f"rn_add emulates accumulators of at most 51 bits, not {fmt.name}")
    a, p = a.to(F64), p.to(F64)
    s = a + p
    bb = s - a
    e = (a - (s - bb)) + (p - bb)  # exact: a + p = s + e
    bits = s.view(torch.int64)
    opp = (e.view(torch.int64) ^ bits) >> 63  # −1 where e and s have opposite signs, else 0
    bits = bits + ((e != 0).to(torch.int64) & ~bits & 1) * (2 * opp + 1)  # round to odd
    k = ((bits >> 52) & 0x7FF).clamp_(min=fmt.emin + 1023, max=fmt.emax + 1024).sub_(fmt.p - 1)
    r = torch.round(bits.view(F64) * ((2046 - k) << 52).view(F64)).mul_((k << 52).view(F64))
    bad = ~(r.abs() <= fmt.max_finite)  # overflow, inf, NaN: the plain path (IEEE inf/NaN rules)
    if bool(bad.any()):
        r = torch.where(bad, round_to(torch.where(torch.isfinite(s), bits.view(F64), s), fmt), r)
    return r


def seq_sum(terms: torch.Tensor, fmt: "FloatFormat | str") -> torch.Tensor:
    """Σ terms along dim 0 by one sequential accumulator of ``fmt`` (a₀ = 0, a_j = RN(a_{j−1} + p_j)): exact
    emulation. terms: float64 [n, ...] (exact products); returns float64 [...] holding fmt values."""
    acc = torch.zeros(terms.shape[1:], dtype=F64, device=terms.device)
    for j in range(terms.shape[0]):
        acc = rn_add(acc, terms[j], fmt)
    return acc


def _pad(terms: torch.Tensor, n: int) -> torch.Tensor:
    if terms.shape[0] == n:
        return terms
    return torch.cat([terms, terms.new_zeros((n - terms.shape[0],) + tuple(terms.shape[1:]))])


def blocked_sum(
    terms: torch.Tensor, fmt: "FloatFormat | str", block: int, outer: "FloatFormat | str" = FP32
) -> torch.Tensor:
    """Σ terms along dim 0 in blocks of ``block`` consecutive terms, each block by ``seq_sum`` in ``fmt``,
    the block sums by ``seq_sum`` in ``outer`` (fp32): exact emulation. ``block`` ≥ n is ``seq_sum`` (then
    rounded to ``outer``, which holds every fmt value unchanged when fmt ⊂ outer)."""
    n = terms.shape[0]
    if block <= 0:
        raise ValueError(f"block must be positive, got {block}")
    nb = max(1, -(-n // block))
    t = _pad(terms, nb * block).reshape((nb, block) + tuple(terms.shape[1:])).transpose(0, 1)
    return seq_sum(seq_sum(t, fmt), outer)


def pairwise_sum(terms: torch.Tensor, fmt: "FloatFormat | str") -> torch.Tensor:
    """Σ terms along dim 0 by a balanced binary tree in index order (zero padded to a power of two), every
    node RN_fmt(left + right): exact emulation."""
    n = terms.shape[0]
    if n == 0:
        return torch.zeros(terms.shape[1:], dtype=F64, device=terms.device)
    x = _pad(terms, max(2, 1 << (n - 1).bit_length()))
    while x.shape[0] > 1:
        x = rn_add(x[0::2], x[1::2], fmt)
    return x[0]


def sum2_fp64(terms: torch.Tensor) -> torch.Tensor:
    """Σ terms along dim 0 by float64 compensated summation (``eft.sum2``): within u₆₄|Σ| + γ²·Σ|p| of exact."""
    return sum2(terms, 0)[0]


def fraction_seq_sum(values, fmt: "FloatFormat | str") -> float:
    """The reference of ``seq_sum`` for one vector, in exact rationals: a ← RN_fmt(a + p) with
    ``exact.round_fraction`` at every step (slow; for tests)."""
    from .exact import round_fraction

    a = Fraction(0)
    for v in values:
        a = Fraction(round_fraction(a + Fraction(float(v)), fmt)[2])
    return float(a)


# ----------------------------------------------------------------------------- forms: an order and an accumulator
@dataclass(frozen=True)
class Method:
    """One accumulation form: ``order`` ('seq', 'blocked', 'pairwise' or 'sum2') in accumulator ``acc``
    (blocked: block length ``block``, fp32 across blocks)."""

    order: str
    acc: str
    block: "int | None" = None

    @property
    def name(self) -> str:
        if self.order == "blocked":
            return f"blocked_fp32_in_{self.acc}_b{self.block}"
        if self.order == "sum2":
            return "sum2_fp64"
        return f"{self.order}_{self.acc}"

    @property
    def summary(self) -> str:
        if self.order == "seq":
            return f"one sequential {self.acc} accumulator, every partial sum rounded to {self.acc}"
        if self.order == "blocked":
            return (
                f"blocks of {self.block} terms summed sequentially in {self.acc}, the block sums sequentially in fp32"
            )
        if self.order == "pairwise":
            return f"pairwise tree, every node rounded to {self.acc}"
        return "float64 compensated sum (Sum2): exact to ~2⁻⁵², the floor (only the storing roundings)"

    def reduce(self, terms: torch.Tensor) -> torch.Tensor:
        """Σ terms along dim 0 as this form computes it (float64 result)."""
        if self.order == "seq":
            return seq_sum(terms, self.acc)
        if self.order == "blocked":
            return blocked_sum(terms, self.acc, self.block)
        if self.order == "pairwise":
            return pairwise_sum(terms, self.acc)
        return sum2_fp64(terms)


def methods(n: int) -> list:
    """The forms of a reduction of length ``n``: per accumulator seq, blocked at every block length < n
    (longer blocks are the sequential sum) and pairwise; then the float64 reference."""
    out = []
    for acc in ACCUMULATORS:
        out.append(Method("seq", acc))
        out += [Method("blocked", acc, L) for L in BLOCKS if L < n]
        out.append(Method("pairwise", acc))
    return out + [Method("sum2", "fp64")]


def rowdot(X: torch.Tensor, Y: torch.Tensor, method: Method) -> torch.Tensor:
    """Σ_j X_ij·Y_ij per row i (float64 [M]) by ``method``; X, Y [M, n] of format values (exact products)."""
    return _chunked(lambda sl: (X[sl].to(F64) * Y[sl].to(F64)).t().contiguous(), X.shape[0], X.shape[1], method)


def matmul_t(X: torch.Tensor, Y: torch.Tensor, method: Method) -> torch.Tensor:
    """X Yᵀ (float64 [M, N]) with every dot product reduced by ``method``; X [M, n], Y [N, n] format values."""
    Yt = Y.to(F64).t()
    N = Y.shape[0]

    def terms(sl):
        return X[sl].to(F64).t()[:, :, None] * Yt[:, None, :]  # [n, rows, N]

    return _chunked(terms, X.shape[0], X.shape[1] * N, method).reshape(X.shape[0], N)


def _chunked(terms, rows: int, per_row: int, method: Method) -> torch.Tensor:
    step = max(1, CHUNK_ELEMS // max(1, per_row))
    return torch.cat([method.reduce(terms(slice(i, min(rows, i + step)))) for i in range(0, rows, step)])


# ----------------------------------------------------------------------------- the experiment
def steps(cfg) -> int:
    """Progress ticks ``run`` makes: the oracle, then one per form."""
    return 1 + len(methods(cfg.d_in))


def _f32(t: torch.Tensor) -> torch.Tensor:
    return round_to(t, FP32)


def fit_update(beta: torch.Tensor, gm1: torch.Tensor):
    """(lost, bias) of the least-squares line β ≈ bias − lost·(g − 1) across features; lost None when g − 1
    is constant."""
    b, x = beta.to(F64), gm1.to(F64)
    xc = x - x.mean()
    den = float((xc * xc).sum())
    if den == 0 or not math.isfinite(den):
        return None, float(b.mean())
    slope = float((xc * (b - b.mean())).sum()) / den
    return -slope, float(b.mean()) - slope * float(x.mean())


def _metrics(
    approx,
    ref,
    keys=(
        "max_rel",
        "max_ulp",
        "p99_ulp",
        "mean_signed_ulp",
        "frac_correctly_rounded",
        "normwise_rel",
        "nonfinite_mismatch",
    ),
    **kw,
) -> dict:
    from .metrics import compare

    m = compare(approx, ref, **kw)
    return {k: m[k] for k in keys if k in m}


def _truths(case, feats: int, m: torch.Tensor):
    """Oracle references of ν, g, base, lora and y (module docstring) and what the metrics need."""
    from .metrics import Reference
    from .oracles import certified_round, row_norm_truth

    D = parse_format(case.dtype)
    s = case.s
    x, W, A, B = (t.to(F64) for t in (case.x, case.W, case.A, case.B))
    n, r = W.shape[1], A.shape[0]
    nu = row_norm_truth(case.W, case.A, case.B, s)
    z = torch.zeros_like(nu.nu)
    nu_ref = Reference(nu.nu, z, nu.bound, FP32, certified_round(nu.nu, z, nu.bound, FP32))
    g = m.to(F64) / nu.nu
    g_bound = g.abs() * (nu.rel_bound * 1.0001 + 4 * 2.0**-53)
    g_ref = Reference(g, z, g_bound, FP32, certified_round(g, z, g_bound, FP32))
    Wf, Bf = W[:feats], B[:feats]
    base = x @ Wf.t()
    base_b = gamma(n + 2) * (x.abs() @ Wf.abs().t())
    xa = x @ A.t()
    xa_b = gamma(n + 2) * (x.abs() @ A.abs().t())
    lora = xa @ Bf.t()
    lora_b = (xa_b + gamma(r + 2) * xa.abs()) @ Bf.abs().t() * (1 + 1e-12)
    gf, gbf = g[:feats], g_bound[:feats]
    inner = base + s * lora
    inner_b = base_b + abs(s) * lora_b + 2.0**-52 * (base.abs() + abs(s) * lora.abs())  # s·lora and + rounded
    y = gf * inner
    y_b = (gf.abs() * inner_b + gbf * (inner.abs() + inner_b) + 2.0**-52 * y.abs()) * (1 + 1e-12)

    def ref(hi, b, fmt):
        zz = torch.zeros_like(hi)
        return Reference(hi, zz, b, fmt, certified_round(hi, zz, b, fmt))

    refs = dict(
        nu=nu_ref, g=g_ref, base=ref(base, base_b, D), xa=ref(xa, xa_b, D), lora=ref(lora, lora_b, D), y=ref(y, y_b, D)
    )
    return dict(
        refs,
        inner=inner,
        gm1=g - 1,
        V=_f32(W + s * (B @ A)),
        uncertified={k: int((~v.rounded.certain).sum()) for k, v in refs.items()},
        nu_tier2_rows=len(nu.tier2_rows),
    )


def _form_record(method: Method, case, feats: int, m: torch.Tensor, T: dict) -> dict:
    """Every quantity of the layer computed by ``method`` and measured against the oracle ``T``."""
    from .metrics import effective_scale_error
    from .oracles import compose_truth

    D = parse_format(case.dtype)
    s = case.s
    nu = _f32(torch.sqrt(rowdot(T["V"], T["V"], method)))
    g = _f32(m.to(F64) / nu)
    base = round_to(matmul_t(case.x, case.W[:feats], method), D)
    xa = round_to(matmul_t(case.x, case.A, method), D)
    lora = round_to(matmul_t(xa, case.B[:feats], method), D)
    dt = D.torch_dtype
    y = compose_truth(base.to(dt), lora.to(dt), g[:feats].to(torch.float32), s).y_round.nearest
    rec = {
        "form": method.name,
        "order": method.order,
        "accumulator": method.acc,
        "block": method.block,
        "nu": _metrics(nu, T["nu"], rel_floor=1e-30),
        "g": _metrics(g, T["g"]),
        "base": _metrics(base, T["base"]),
        "xa": _metrics(xa, T["xa"]),
        "lora": _metrics(lora, T["lora"]),
        "y": _metrics(y, T["y"]),
    }
    gx, gm1 = T["g"].value, T["gm1"]
    beta_g = g / gx - 1
    floor_g = T["g"].rounded.nearest / gx - 1
    lost, bias = fit_update(beta_g - floor_g, gm1)
    rec["g"].update(
        correction_lost=lost,
        scale_bias=bias,
        update_rel_err=float(torch.linalg.vector_norm(g - gx) / torch.linalg.vector_norm(gm1)),
    )
    beta_y = effective_scale_error(y, T["y"], T["inner"])
    floor_y = effective_scale_error(T["y"].rounded.nearest, T["y"], T["inner"])
    lost, bias = fit_update(beta_y - floor_y, gm1[:feats])
    rec["y"].update(correction_lost=lost, scale_bias=bias)
    return rec


def headline(seed: int, n: "int | None" = None) -> dict:
    """The stall: n bf16 values U(0, 1) (generator seeded with ``seed``) summed exactly, by torch (a bf16
    tensor's .sum(): fp32 accumulation, one rounding to bf16) and by the emulated accumulators."""
    n = HEADLINE_N if n is None else int(n)
    gen = torch.Generator().manual_seed(int(seed))
    v = torch.rand(n, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    t = v.to(F64)[:, None]
    exact = math.fsum(v.double().tolist())
    out = {
        "n": n,
        "values": "U(0, 1) rounded to bf16",
        "seed": int(seed),
        "exact": exact,
        "RN_bf16_exact": float(round_to(torch.tensor([exact], dtype=F64), BF16)[0]),
        "torch_bf16_sum": float(v.sum()),
        "forms": {},
    }
    for meth in (
        Method("seq", "bf16"),
        Method("seq", "fp16"),
        Method("pairwise", "bf16"),
        Method("blocked", "bf16", 64),
        Method("seq", "fp32"),
    ):
        out["forms"][meth.name] = float(meth.reduce(t)[0])
    return out


def run(cfg, device, tick) -> dict:
    """The accumulation experiment at cfg's shape, rank, dtype and seed (module docstring); JSON-ready."""
    from .cases import make_case

    feats = min(cfg.d_out, ACC_FEATURES)
    case = make_case(
        "trained", cfg.d_out, cfg.d_in, cfg.rank, ACC_TOKENS, cfg.dtype, cfg.seed, cfg.s, cfg.adapter_ratio, device
    )
    m = case.magnitude()
    T = _truths(case, feats, m)
    tick("oracle")
    forms = methods(cfg.d_in)
    rows = []
    for meth in forms:
        rows.append(_form_record(meth, case, feats, m, T))
        tick(meth.name)
    return {
        "seeds": {
            "case": int(cfg.seed),
            "headline": int(cfg.seed),
            "note": "cases.make_case('trained', ..., seed) and torch.Generator().manual_seed(seed); "
            "nothing else is random",
        },
        "setup": {
            "regime": "trained",
            "d_out": cfg.d_out,
            "d_in": cfg.d_in,
            "rank": cfg.rank,
            "s": cfg.s,
            "dtype": cfg.dtype,
            "tokens": ACC_TOKENS,
            "gemm_features": feats,
            "nu_rows": cfg.d_out,
            "blocks": [L for L in BLOCKS if L < cfg.d_in],
            "blocks_equal_to_seq": [L for L in BLOCKS if L >= cfg.d_in],
        },
        "headline": headline(cfg.seed),
        "forms": {mm.name: mm.summary for mm in forms},
        "oracle": {"uncertified": T["uncertified"], "nu_tier2_rows": T["nu_tier2_rows"]},
        "rows": rows,
    }


# ----------------------------------------------------------------------------- report section
def markdown(section: dict, plots=()) -> str:
    """The report.md section of ``run``'s result."""
    from .report import _table

    st, h = section["setup"], section["headline"]
    L = [
        f"Trained regime, W {st['d_out']}×{st['d_in']}, r = {st['rank']}, s = {st['s']:g}, {st['dtype']} inputs; "
        f"seed {section['seeds']['case']}. ν and g over all {st['nu_rows']} rows; the GEMMs and y over "
        f"{st['tokens']} tokens × the first {st['gemm_features']} output features. Every accumulator is emulated "
        "exactly (`dora_verify.accumulation`: TwoSum, round to odd, one rounding per step); each GEMM result is "
        f"stored in {st['dtype']}, ν and g in fp32, y is the correctly rounded compose of the form's own g, base "
        "and lora. `sum2_fp64` is the floor: exact sums, only the storing roundings.",
        "",
        f"**A true bf16 accumulator stalls.** {h['n']} bf16 values U(0, 1) (seed {h['seed']}): exact sum "
        f"{h['exact']:.6g}, RN_bf16 of it {h['RN_bf16_exact']:g}; torch's `x.sum()` on the bf16 tensor gives "
        f"**{h['torch_bf16_sum']:g}** (it accumulates in fp32 and rounds once); a true bf16 accumulator "
        f"(`seq_bf16`) stalls at **{h['forms']['seq_bf16']:g}** (once the sum reaches 256 the bf16 spacing is 2 "
        "and every term < 1 rounds away). Other accumulators: "
        + ", ".join(f"`{k}` {v:.6g}" for k, v in h["forms"].items() if k != "seq_bf16")
        + ".",
        "",
    ]
    if st["blocks_equal_to_seq"]:
        L += [
            f"Block lengths {', '.join(map(str, st['blocks_equal_to_seq']))} ≥ d_in = {st['d_in']} are one block: "
            "the sequential sum (rows not repeated).",
            "",
        ]
    keys = [
        ("nu", "max_rel"),
        ("nu", "frac_correctly_rounded"),
        ("g", "max_ulp"),
        ("g", "frac_correctly_rounded"),
        ("g", "update_rel_err"),
        ("g", "correction_lost"),
        ("base", "p99_ulp"),
        ("base", "frac_correctly_rounded"),
        ("lora", "p99_ulp"),
        ("lora", "frac_correctly_rounded"),
        ("y", "p99_ulp"),
        ("y", "normwise_rel"),
        ("y", "frac_correctly_rounded"),
        ("y", "correction_lost"),
        ("y", "scale_bias"),
    ]
    heads = [
        "form",
        "ν max rel",
        "ν c.r.",
        "g max ulp",
        "g c.r.",
        "‖ĝ−g‖/‖g−1‖",
        "g corr. lost",
        "base p99 ulp",
        "base c.r.",
        "lora p99 ulp",
        "lora c.r.",
        "y p99 ulp",
        "y normwise rel",
        "y c.r.",
        "y corr. lost",
        "y scale bias",
    ]
    L.append(_table(heads, [[r["form"]] + [r[q].get(k) for q, k in keys] for r in section["rows"]]))
    L += [
        "",
        "c.r.: fraction correctly rounded. ulp: of the exact value, in fp32 (ν, g) or "
        f"{st['dtype']} (base, lora, y); p99 for the GEMMs and y, whose maxima sit on near-cancelling elements "
        "(report.json has every maximum). lora and y include the rounding of x Aᵀ to "
        f"{st['dtype']} before the second GEMM, as a layer stores it: the `sum2_fp64` row is that floor. "
        "corr. lost: least-squares β ≈ bias − lost·(g − 1) of the per-feature "
        "relative scale error β beyond the correctly rounded value's (1 = the whole magnitude update lost, "
        "< 0 over-applied); scale bias: the fit's common scale error. ‖ĝ−g‖/‖g−1‖ > 1: g's error exceeds the "
        "update itself.",
        "",
    ]
    L += [f"- `{k}`: {v}" for k, v in section["forms"].items()]
    unc = section["oracle"]["uncertified"]
    L += [
        "",
        f"Oracle: uncertified roundings {unc} (0 = every correct rounding decided); ν rows settled exactly: "
        f"{section['oracle']['nu_tier2_rows']}.",
    ]
    L += [f"\n![{p}]({p})" for p in plots if p.startswith("accumulation")]
    return "\n".join(L) + "\n"


def plots(section: dict, folder) -> list:
    """accumulation_vs_block.png: ν max relative error and base/y p99 ulp error against the block length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    from .report import _finite

    rows = section["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.4))
    for ax, (q, k, title) in zip(
        axes,
        (
            ("nu", "max_rel", "ν: max relative error"),
            ("base", "p99_ulp", "base = x Wᵀ: p99 ulp error"),
            ("y", "p99_ulp", "y: p99 ulp error"),
        ),
    ):
        for j, acc in enumerate(ACCUMULATORS):
            rs = [r for r in rows if r["accumulator"] == acc]
            bl = sorted((r for r in rs if r["order"] == "blocked"), key=lambda r: r["block"])
            line = (
                ax.plot(
                    [r["block"] for r in bl],
                    [_finite(r[q][k], 1e-17) for r in bl],
                    marker="o",
                    label=f"blocked, {acc} in-block",
                )[0]
                if bl
                else None
            )
            c = line.get_color() if line else f"C{j}"
            for r in rs:
                if r["order"] in ("seq", "pairwise"):
                    ax.axhline(
                        _finite(r[q][k], 1e-17), color=c, ls="--" if r["order"] == "seq" else ":", label=r["form"]
                    )
        ref = next(r for r in rows if r["order"] == "sum2")
        ax.axhline(_finite(ref[q][k], 1e-17), color="k", lw=0.8, label="sum2_fp64 (floor)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("block length (fp32 across blocks)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8)
    st = section["setup"]
    fig.suptitle(f"Accumulators, emulated exactly — W {st['d_out']}×{st['d_in']}, {st['dtype']}, r = {st['rank']}")
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    path = Path(folder) / "accumulation_vs_block.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


__all__ = [
    "ACCUMULATORS",
    "BLOCKS",
    "Method",
    "blocked_sum",
    "fit_update",
    "fraction_seq_sum",
    "headline",
    "markdown",
    "matmul_t",
    "methods",
    "pairwise_sum",
    "plots",
    "rn_add",
    "rowdot",
    "run",
    "seq_sum",
    "steps",
    "sum2_fp64",
]
