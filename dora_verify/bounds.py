"""A-priori error bounds, per element, for each form under study and each production kernel.

Derivations: ``proofs/bounds.md``. Model (Higham, *Accuracy and Stability*, §2.2): every floating-point
operation returns fl(a ∘ b) = (a ∘ b)(1 + δ) + η with |δ| ≤ u of its format and |η| ≤ half the smallest
subnormal (η only matters under gradual underflow; it is carried as an absolute term per rounding).
Round to nearest; no FMA contraction in the forms (eager torch does not contract; the production kernels
launch with ``enable_fp_fusion=False`` and use FMA only where written). An op on bf16/fp16 tensors in
eager torch computes in fp32 and rounds to the tensor dtype: a double rounding, whose error is at most
ũ = u_D + u_32 + u_D·u_32 relative.

All bounds are evaluated in float64 from the (rounded) inputs and the exact result x supplied by the
oracle, and are then inflated by (1 + 2⁻⁴⁰) so their own float64 evaluation error cannot make a true
bound look violated. Each returns a tensor of the broadcast shape: ``|computed − exact| ≤ bound``.
A bound is relative to the *terms* (|base|, |g·s·lora|, …), never to the result alone, so it stays
meaningful where the exact Δ is 0 (g = 1, lora = 0) — a relative tolerance cannot.

Norm bounds come in two kinds (``kind``): 'worst' uses γ_n = n·u/(1 − n·u); 'probabilistic' uses
Higham–Mary's γ̃_n(λ) = exp(λ·√n·u + n·u²/(1 − u)) − 1 with λ = 5 (holds with probability
≥ 1 − 2n·exp(−λ²/2)… per inner product for independent mean-zero rounding errors; a model, not a proof).
"""

from __future__ import annotations

import math

import torch

from .formats import parse_format

F64 = torch.float64
U32 = 2.0**-24
ETA32 = 2.0**-150
SAFETY = 1 + 2.0**-40
LAMBDA = 5.0
FAITHFUL_NORM_REL = 1e-6  # the contract of docs/contract.md for ν (and of a user's 'faithful' norm)


def gamma(n: float, u: float) -> float:
    """γ_n = n u / (1 − n u): the relative error bound of n chained roundings of unit roundoff u."""
    nu = n * u
    if nu >= 1:
        return math.inf
    return nu / (1 - nu)


def gamma_prob(n: float, u: float, lam: float = LAMBDA) -> float:
    """Higham–Mary probabilistic γ̃_n(λ) = exp(λ√n·u + n u²/(1 − u)) − 1."""
    return math.expm1(lam * math.sqrt(n) * u + n * u * u / (1 - u))


def _fmt_params(dtype):
    fmt = parse_format(dtype)
    u = fmt.u
    eta = fmt.min_normal * u  # half the smallest subnormal: (2^emin · 2^(1-p)) / 2
    ut = u if fmt.name == "fp32" else u + U32 + u * U32  # eager op on D tensors: fp32 result, then D
    return u, ut, eta


def _t(*xs):
    return [x.to(F64) if isinstance(x, torch.Tensor) else torch.tensor(float(x), dtype=F64) for x in xs]


# ----------------------------------------------------------------------------- compose forms (Δ and y)
def compose_form_bounds(form: str, base, lora, g, s: float, bias=None, dtype=None):
    """(Δ bound, y bound) per element for ``dora_verify.forms.COMPOSE_FORMS[form]`` computed in ``dtype``
    (default base's dtype). Exact references: Δ = (g−1)·base + g·s·lora, y = base + Δ (+ bias), with the
    fp32 g as given (rounding g to the activation dtype is part of the forms that do it)."""
    return compose_forms_bounds((form,), base, lora, g, s, bias, dtype)[form]


def compose_forms_bounds(forms, base, lora, g, s: float, bias=None, dtype=None) -> dict:
    """{form: :func:`compose_form_bounds` of it} for several forms of the same inputs, their shared terms formed
    once (the sweep bounds every form at every point)."""
    dtype = dtype or base.dtype
    b, l, g64 = _t(base, lora, g)
    g64 = g64.reshape(1, -1)
    sl = s * l
    terms = (
        b,
        l,
        g64,
        sl,
        (g64 * sl).abs(),
        ((g64 - 1) * b).abs(),
        (g64 - 1) * b + g64 * sl,
        g.to(dtype).to(F64).reshape(1, -1) if isinstance(g, torch.Tensor) else g64,
    )
    return {f: _form_bound(f, terms, bias, dtype) for f in forms}


def _form_bound(form: str, terms, bias, dtype):
    uD, ut, etaD = _fmt_params(dtype)
    b, l, g64, sl, gsl, gm1b, delta, gd = terms
    dg = (gd - g64).abs()  # the rounding of g to D, exactly (0 when g is representable, e.g. g = 1)
    # underflow: each rounding adds ≤ η (η_t = η_D + η₃₂ for an eager op on D tensors: fp32, then D);
    # an η made before a multiplication by g is scaled by |g|; (1 + γ₃) covers later relative roundings.
    hD, h32 = (etaD + ETA32) * (1 + gamma(3, ut)), ETA32 * (1 + gamma(3, U32))
    if form == "stable_gcast":
        # Δ̂ = fl(fl(fl(gd − 1)·b) + fl(gd·fl(l·s))), gd = RN_D(g): the g rounding costs |gd − g|·(|b| + |s·l|)
        e = (
            b.abs() * (dg + (gd - 1).abs() * gamma(2, ut))
            + sl.abs() * (dg + gd.abs() * gamma(2, ut))
            + (gd.abs() + 2) * hD
        )
        eD = e * (1 + ut) + ut * delta.abs() + hD
    elif form == "naive":
        # Δ̂ = fl(fl(gd·fl(fl(l·s) + b)) − b): error ∝ |g|·|base + s·lora|, however small Δ is
        inner = (b + sl).abs()
        e = (
            dg * inner
            + gd.abs() * (gamma(2, ut) * inner + (1 + gamma(2, ut)) * ut * sl.abs())
            + (2 * gd.abs() + 1) * hD
        )
        eD = e * (1 + ut) + ut * delta.abs() + hD
    elif form == "naive_fp32":
        inner = (b + sl).abs()
        e = g64.abs() * (gamma(2, U32) * inner + (1 + gamma(2, U32)) * U32 * sl.abs()) + (2 * g64.abs() + 1) * h32
        e = e * (1 + U32) + U32 * delta.abs() + h32
        eD = e * (1 + uD) + uD * delta.abs() + etaD
    elif form == "stable_fp32":
        e = gamma(3, U32) * (gm1b + gsl) + (g64.abs() + 2) * h32
        eD = e * (1 + uD) + uD * delta.abs() + etaD
    elif form == "single_rounding":
        y = b + delta + (_t(bias)[0].reshape(1, -1) if bias is not None else 0)
        inner = (b + sl).abs()
        e = g64.abs() * (gamma(2, U32) * inner + (1 + gamma(2, U32)) * U32 * sl.abs()) + (2 * g64.abs() + 1) * h32
        if bias is not None:
            e = e * (1 + U32) + U32 * y.abs() + h32
        ey = e * (1 + uD) + uD * y.abs() + etaD
        # Δ reported as fl(ŷ − base) [then fl(· − bias)] in eager D arithmetic
        if bias is None:
            eD = ey * (1 + ut) + ut * delta.abs() + hD
        else:
            et = ey * (1 + ut) + ut * (delta + _t(bias)[0].reshape(1, -1)).abs() + hD
            eD = et * (1 + ut) + ut * delta.abs() + hD
        return eD * SAFETY, ey * SAFETY
    else:
        raise ValueError(f"no bound for compose form {form!r}")
    # y = fl(base + Δ̂) (+ fl(… + bias)) in D
    y = b + delta
    ey = eD * (1 + ut) + ut * y.abs() + hD
    if bias is not None:
        yb = y + _t(bias)[0].reshape(1, -1)
        ey = ey * (1 + ut) + ut * yb.abs() + hD
    return eD * SAFETY, ey * SAFETY


# ----------------------------------------------------------------------------- production compose kernel
def compose_epilogue_slack(base, lora, g, s: float, bias=None, g_minus_1=None):
    """(E_Δ, E_y): bounds on |v' − x| for the unrounded fp32 pair v' = hi + tail of kernels.compose, before its one
    final rounding (proofs/bounds.md, "Production compose kernel"). With I = |b + s l|, p = |s l|:
    E_y = u₃₂²|g|(4I + 3p) [+ u₃₂²(|g|(3I + p) + |β|) with bias], E_Δ = u₃₂²(4|(g − 1)b| + 7|g p|), each times
    (1 + 4u₃₂), plus underflow: (4|g| + 8)·η₃₂ for y, (2|g| + 2|g − 1| + 8)·η₃₂ for Δ (the FMA splittings stop
    being exact below the normal range; roundings made before the multiplication by g are scaled by it)."""
    b, l, g64 = _t(base, lora, g)
    g64 = g64.reshape(1, -1)
    gm1 = g64 - 1 if g_minus_1 is None else _t(g_minus_1)[0].reshape(1, -1)
    sl = (s * l).abs()
    inner = (b + s * l).abs()
    u2 = U32 * U32 * (1 + 4 * U32)
    e_y = u2 * g64.abs() * (4 * inner + 3 * sl)
    if bias is not None:
        e_y = e_y + u2 * (g64.abs() * (3 * inner + sl) + _t(bias)[0].reshape(1, -1).abs())
    e_d = u2 * (4 * (gm1 * b).abs() + 7 * g64.abs() * sl)
    return (e_d + (2 * g64.abs() + 2 * gm1.abs() + 8) * ETA32, e_y + (4 * g64.abs() + 8) * ETA32)


def compose_kernel_bounds(base, lora, g, s: float, bias=None, dtype=None, g_minus_1=None):
    """(Δ bound, y bound) of kernels.compose (both tiers), from its contract: the unrounded fp32 pair v' is within
    E (:func:`compose_epilogue_slack`) of the exact x, then one rounding to ``dtype`` (fp32: RN(v'); 16-bit: RN of
    the round-to-odd of v', which equals RN(v')): |x̂ − x| ≤ E(1 + u_D) + u_D|x| + η_D. With ``g_minus_1`` the Δ
    reference is g_minus_1·base + g·s·lora (the kernel's Δ input as given)."""
    dtype = dtype or base.dtype
    uD, _, etaD = _fmt_params(dtype)
    b, l, g64 = _t(base, lora, g)
    g64 = g64.reshape(1, -1)
    gm1 = g64 - 1 if g_minus_1 is None else _t(g_minus_1)[0].reshape(1, -1)
    delta = gm1 * b + g64 * (s * l)
    y = g64 * (b + s * l)
    if bias is not None:
        y = y + _t(bias)[0].reshape(1, -1)
    ev_d, ev_y = compose_epilogue_slack(base, lora, g, s, bias, g_minus_1)
    ey = ev_y * (1 + uD) + uD * y.abs() + etaD
    eD = ev_d * (1 + uD) + uD * delta.abs() + etaD
    return eD * SAFETY, ey * SAFETY


# ----------------------------------------------------------------------------- factored norm
def factored_norm_bound(W, A, B, s: float, nu, kind: str = "worst"):
    """Bound on |ν̂ − ν| per row for ``forms.factored_fp32`` (fp32 everything, eager torch GEMMs with fp32
    accumulation of exact or rounded products), given the exact ν. ``kind``: 'worst' or 'probabilistic'.

    ν² = ‖W‖² + 2s·Σ_j B_ij U_ij + s²·Σ_jk B_ij G_jk B_ik. With n = d_in, r = rank:
    |δ‖W‖²| ≤ γ_{n+1}‖W‖², |δcross| ≤ γ_{n+r+1}·Σ_j|B_ij|(|W_i|·|A_j|), |δgram| ≤ γ_{n+2r+2}·‖|B_i||A|‖²,
    the final two adds and the scalings γ_3 of the magnitudes; then |ν̂ − ν| ≤ E/(ν̂ + ν) + u32·ν̂ ≤
    E/ν (for E ≤ ν²; else √E) plus the square root's rounding."""
    if kind not in ("worst", "probabilistic"):
        raise ValueError(f"kind must be 'worst' or 'probabilistic', got {kind!r}")
    gam = gamma if kind == "worst" else gamma_prob
    n, r = W.shape[1], A.shape[0]
    W64, A64, B64 = (t.to(F64) for t in (W, A, B))
    aW, aA, aB = W64.abs(), A64.abs(), B64.abs()
    w2 = (W64 * W64).sum(1)
    cross_mag = (aB * (aW @ aA.t())).sum(1)
    gram_mag = ((aB @ aA) ** 2).sum(1)
    E = gam(n + 1, U32) * w2 + 2 * abs(s) * gam(n + r + 1, U32) * cross_mag + s * s * gam(n + 2 * r + 2, U32) * gram_mag
    E = E + gamma(3, U32) * (w2 + 2 * abs(s) * cross_mag + s * s * gram_mag)
    nu = nu.to(F64)
    lin = torch.where(nu > 0, E / nu.clamp_min(1e-300), torch.full_like(nu, math.inf))
    err = torch.minimum(lin, E.sqrt())  # |√a − √b| ≤ min(|a − b|/√b, √|a − b|)
    return (err * (1 + U32) + U32 * nu + ETA32) * SAFETY


# ----------------------------------------------------------------------------- production norm kernel
U64 = 2.0**-53


def kernel_norm_bound(W, A, B, s: float, nu, backend: str = "triton", dense_rows=None, chain: "int | None" = None):
    """Bound on |ν̂ − ν| per row for ``kernels.factored_row_norm`` (module contract of kernels/norm.py).

    backend='triton' (CUDA, bf16/fp16 W): U = W Aᵀ, G = A Aᵀ and BG = B·G come from tensor-core chains of at
    most ``chain`` exact products (default ``kernels.norm.U_CHAIN``) accumulated in fp32 — modelled with
    relative error 2u₃₂ per addition (the accumulator may truncate: Fasi et al. 2021), γ_chain(2u₃₂) of the
    magnitudes —, summed across chains in float64, and stored in fp32 (u₃₂ of the value); at r ≤ 64 BG comes from
    IEEE fp32 FMAs over the r terms (γ_r(u₃₂), inside the same model). fp32 operand pairs
    take a cuBLAS fp32 GEMM instead (γ_n(2u₃₂), no chain). backend='torch': U is an fp32 GEMM over all of
    d_in (γ_n(u₃₂)), G and BG are float64. ‖W‖², cross and gram sums and the assembly are float64
    (γ64 of the magnitudes). Rows listed in ``dense_rows`` (``NormInfo.recomputed_rows``: κ̂ > κ_max)
    were recomputed densely in float64: ‖V̂ − V‖ ≤ γ64_{r+2}·‖|W_i| + |s||B_i||A|‖, the float64 norm adds
    γ64_{n+2}ν, and the fp32 store u₃₂ν. (The factored bound also holds for them, but is vacuous there.)"""
    from dora_verify.kernels.norm import U_CHAIN

    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    n, r = W.shape[1], A.shape[0]
    W64, A64, B64 = (t.to(F64) for t in (W, A, B))
    aW, aA, aB = W64.abs(), A64.abs(), B64.abs()
    WA = aW @ aA.t()  # Σ|W||A| per (row, j)
    AA = aA @ aA.t()
    G = A64 @ A64.t()
    U = W64 @ A64.t()
    g64 = gamma(n + 2 * r + 8, U64)
    if backend == "triton":
        c = chain or U_CHAIN
        tc = (W.dtype == A.dtype != torch.float32) or (W.dtype == torch.bfloat16 and A.dtype == torch.float32)
        gU = gamma(min(n, c), 2 * U32) if tc else gamma(n, 2 * U32)
        eU = gU * WA + U32 * U.abs() + g64 * WA
        gG = gamma(min(n, c), 2 * U32) if A.dtype != torch.float32 else gamma(n, 2 * U32)
        eG = gG * AA + U32 * G.abs() + g64 * AA  # G stored fp32
        BG = B64 @ G
        aBG = aB @ G.abs()
        tcb = B.dtype == torch.bfloat16  # bf16 B with the fp32 G: split-exact tensor-core products
        gB = gamma(min(r, c), 2 * U32) if tcb else gamma(r, 2 * U32)
        eBG = aB @ eG + gB * (aB @ (G.abs() + eG)) + U32 * (BG.abs() + aB @ eG) + g64 * aBG
    else:
        eU = gamma(n, U32) * WA + g64 * WA
        eBG = g64 * (aB @ AA)
    w2 = (W64 * W64).sum(1)
    cross_mag = (aB * (WA + eU)).sum(1)
    gram_mag = (aB * (aB @ AA + eBG)).sum(1)
    E = (
        2 * abs(s) * (aB * eU).sum(1)
        + s * s * (aB * eBG).sum(1)
        + g64 * (w2 + 2 * abs(s) * cross_mag + s * s * gram_mag)
    )
    nu = nu.to(F64)
    lin = torch.where(nu > 0, E / nu.clamp_min(1e-300), torch.full_like(nu, math.inf))
    err = torch.minimum(lin, E.sqrt())
    if dense_rows is not None and len(dense_rows):
        idx = torch.as_tensor(list(dense_rows), dtype=torch.long, device=err.device)
        sen = torch.linalg.vector_norm(aW[idx] + abs(s) * (aB[idx] @ aA), dim=1)
        err = err.clone()
        err[idx] = gamma(r + 2, U64) * sen + gamma(n + 2, U64) * nu[idx]
    return (err * (1 + U32) + U32 * nu + ETA32) * SAFETY


# ----------------------------------------------------------------------------- scale g, g − 1 and d_m
def scale_bounds(m, nu_hat, nu, nu_err, eps: float):
    """(bound on |ĝ − g|, bound on |(g−1)^ − (g − 1)|) per row for ``kernels.dora_scale``.

    Exact: g = m/ν_c, g − 1 = (m − ν_c)/ν_c with ν_c = max(ν, ε₃₂) (ε as the fp32 value the kernel clamps
    with). Computed: ĝ = RN(m/ν̂_c), (g−1)^ = RN(RN(m − ν̂_c)/ν̂_c) with |ν̂ − ν| ≤ ``nu_err``. Since
    m/ν̂_c − m/ν_c is the same for both (g − 1 = g − 1 exactly), the norm's error enters both as
    |m|·nu_err/(ν_c·ν̂_c); the roundings add u₃₂|m/ν̂_c| (g) and u₃₂(|m − ν̂_c|/ν̂_c)(2 + u₃₂) (g − 1). The
    g − 1 bound is absolute: it stays meaningful at g = 1 (m = ν̂: computed g − 1 is exactly 0)."""
    eps32 = float(torch.tensor(eps, dtype=torch.float32))
    m64, nh, nx, e = _t(m, nu_hat, nu, nu_err)
    nhc, nxc = nh.clamp_min(eps32), nx.clamp_min(eps32)
    prop = m64.abs() * e / (nhc * nxc)
    bg = prop + U32 * (m64 / nhc).abs() + ETA32
    bgm1 = prop + U32 * ((m64 - nhc).abs() / nhc) * (2 + U32) + 2 * ETA32
    return bg * SAFETY, bgm1 * SAFETY


# ----------------------------------------------------------------------------- compose backward
def compose_backward_bounds(dy, base, lora, g, s: float, g_minus_1=None, save: str = "inputs"):
    """Bounds on (d_base, d_lora, d_g) of ``kernels.compose``'s backward (module contract), per element /
    per column. Exact: d_base = g·dy (Δ output: (g − 1)·dy), d_lora = g·s·dy, d_g = Σ_T dy·(b + s·l).
    d_base = RN_D(RN₃₂(g·dy)); d_lora = RN_D(RN₃₂(RN₃₂(g·s)·dy)); d_g: float64 products and sums
    (γ64_{T+2} of Σ|dy|(|b| + |s l|)) rounded to fp32. save='activation': the saved inner is
    RN_I(b + s l) in ``kernels.compose.inner_dtype`` (bf16 for fp16 activations), evaluated with error ≤ 2u₃₂² of
    the terms first: + u_I·Σ|dy·inner| (+ η_I per term)."""
    uD, _, etaD = _fmt_params(dy.dtype)
    uL, _, etaL = _fmt_params(lora.dtype)
    d, b, l, g64 = _t(dy, base, lora, g)
    g64 = g64.reshape(1, -1)
    gb = g64 if g_minus_1 is None else _t(g_minus_1)[0].reshape(1, -1)
    xb = (gb * d).abs()
    e_base = U32 * xb * (1 + uD) + uD * xb + ETA32 + etaD
    xl = (g64 * s * d).abs()
    e_lora = (2 * U32 + U32 * U32) * xl * (1 + uL) + uL * xl + (d.abs() + 1) * ETA32 * (1 + uL) + etaL
    T = d.shape[0]
    mag = (d.abs() * (b.abs() + abs(s) * l.abs())).sum(0)
    dg = (d * (b + s * l)).sum(0)
    e_g = gamma(T + 2, U64) * mag
    if save == "activation":
        from .kernels.compose import inner_dtype

        uA, _, etaA = _fmt_params(inner_dtype(base.dtype))
        inner = (b + s * l).abs()
        e_g = e_g + (d.abs() * (uA * inner + 2 * U32 * U32 * (b.abs() + abs(s) * l.abs()) + etaA)).sum(0) * (1 + uA)
    elif save != "inputs":
        raise ValueError(f"save must be 'inputs' or 'activation', got {save!r}")
    e_g = e_g * (1 + U32) + U32 * dg.abs() + ETA32
    return e_base * SAFETY, e_lora * SAFETY, e_g * SAFETY


def dm_bound(dg_hat, dg_err, nu_hat, nu, nu_err, eps: float, m_dtype=torch.float32):
    """Bound on |d̂_m − d_m| with d_m = d_g/ν_c (exact d_g, ν), d̂_m = RN_m(RN₃₂(d̂_g/ν̂_c)) as torch's
    autograd of g = m/ν̂_c forms it: |d̂_g − d_g| ≤ dg_err and |ν̂ − ν| ≤ nu_err give
    dg_err/ν̂_c + |d̂_g|·nu_err/(ν_c ν̂_c) before the roundings (u₃₂, then u_m of ``m_dtype``)."""
    um, _, etam = _fmt_params(m_dtype)
    eps32 = float(torch.tensor(eps, dtype=torch.float32))
    dgh, de, nh, nx, ne = _t(dg_hat, dg_err, nu_hat, nu, nu_err)
    nhc, nxc = nh.clamp_min(eps32), nx.clamp_min(eps32)
    x = (dgh / nhc).abs()
    e = de / nhc + dgh.abs() * ne / (nhc * nxc)
    e = e + U32 * x + ETA32
    if um != U32:
        e = e * (1 + um) + um * (x + e) + etam
    return e * SAFETY


# ----------------------------------------------------------------------------- fused LoRA up-projection
def lora_compose_bounds(base, xa, B, g, s: float, lora_hat, bias=None, chain: "int | None" = None):
    """Bound on |ŷ − y| for ``kernels.lora_compose``, y = g·(base + s·xa Bᵀ) + bias exact. The kernel forms
    lora = xa Bᵀ with a tensor-core fp32 accumulation over r (γ_r(2u₃₂) of Σ|xa||B|, the truncation model of
    :func:`kernel_norm_bound`), rounded to ``lora_hat``'s dtype (fp32: no further rounding; a materialised
    F.linear: the adapter dtype), then composes ``lora_hat`` with the compose epilogue:
    |ŷ − y| ≤ compose bound at lora_hat + |g s|·|lora_hat − lora|."""
    uL, _, etaL = _fmt_params(lora_hat.dtype)
    r = xa.shape[1]
    xa64, B64 = _t(xa, B)
    lora = xa64 @ B64.t()
    mag = xa64.abs() @ B64.abs().t()
    e_lora = (gamma(r, 2 * U32) * mag + gamma(r + 2, U64) * mag) * (1 + uL) + uL * lora.abs() + etaL
    _, ey = compose_kernel_bounds(base, lora_hat, g, s, bias, dtype=base.dtype)
    g64 = _t(g)[0].reshape(1, -1)
    return (ey + (g64 * s).abs() * e_lora) * SAFETY


def lora_compose_dg_bound(dy, base, xa, B, s: float, chain: "int | None" = None):
    """Bound on |d̂_g − d_g| for ``kernels.lora_compose``'s backward, d_g = Σ_T dy ⊙ (base + s·xa Bᵀ) exact in the
    rounded dy, base, xa, B. d̂_g = RN₃₂(Σ_T dy·base + s·Σ_r B ⊙ M̂), both sums in float64, with M̂ = dyᵀxa (xa never
    rounded to dy's dtype; products exact for 16-bit operands, rounded once for fp32 ones: inside γ_c(2u₃₂))
    accumulated in fp32 in chains of at most ``chain`` rows whose sums
    are added in float64 (the fused backward's row splits), or in one chain of T (None: one GEMM):

        γ64_{T+1}·Σ_T|dy·base| + |s|·Σ_r |B|·(γ_c(2u₃₂) + γ64_{T/c+1})·(|dy|ᵀ|xa|)
        + γ64_{r+2}·|s|·Σ_r|B||M| + u₃₂|d̂_g| + η₃₂

    (proofs/bounds.md, "lora_compose's d_g"). No lora is rounded on the way: the forward's lora is the fp32 sum, so
    this is also within γ_r(2u₃₂)·|s|·Σ|dy||xa||B| of the gradient of the function the forward evaluated.
    Returns (d_g exact, the bound), float64 [d_out]."""
    T, N = dy.reshape(-1, dy.shape[-1]).shape
    r = xa.shape[-1]
    dy64, b64, xa64, B64 = _t(dy.reshape(T, N), base.reshape(T, N), xa.reshape(T, r), B)
    c = T if chain is None else max(1, min(int(chain), T))
    dg = (dy64 * b64).sum(0) + s * (B64 * (dy64.t() @ xa64)).sum(1)
    P = dy64.abs().t() @ xa64.abs()  # [N, r]
    e_m = (gamma(c, 2 * U32) + gamma(-(-T // c) + 1, U64)) * P
    e = gamma(T + 1, U64) * (dy64 * b64).abs().sum(0) + abs(s) * (B64.abs() * e_m).sum(1)
    e = e + gamma(r + 2, U64) * abs(s) * (B64.abs() * (P + e_m)).sum(1)
    e = e + U32 * (dg.abs() + e) + ETA32
    return dg, e * SAFETY


def dora_layer_bound(x, W, bias, A, B, g, s: float, g_rel: float):
    """Bound on |ŷ − y| for a whole DoRA Linear layer evaluated as the PEFT integration does
    (kernels/peft.py), against y = g·(x Wᵀ + s·(x Aᵀ) Bᵀ) + bias exact in the rounded x, W, bias, A, B
    and the exact g = m/ν of the stored m:

    * result = RN_act(x Wᵀ + bias) from a GEMM with fp32 accumulation — γ_K(2u₃₂) of Σ|x||W| + |bias|
      (the truncating-accumulator model of :func:`kernel_norm_bound`) plus one rounding u_act —, then
      base = RN_act(result − bias): a second u_act;
    * xa = RN_ad(x Aᵀ), lora = RN_ad(xa Bᵀ): each a GEMM with fp32 accumulation and one rounding to the
      adapter dtype (kernels.lora_compose keeps lora in fp32: the rounding charged here only widens the bound);
      the error of xa propagates through |B|;
    * ĝ with relative error ≤ ``g_rel`` (ν's bound plus the fp32 division);
    * the compose's final rounding (u_act of |y|, one more u_act of the propagated error).
    Returns a float64 tensor of the output's shape."""
    u, _, eta = _fmt_params(x.dtype)
    ua, _, etaa = _fmt_params(A.dtype)
    K, r = W.shape[1], A.shape[0]
    x64, W64, A64, B64, g64 = _t(x, W, A, B, g)
    b64 = _t(bias)[0] if bias is not None else torch.zeros((), dtype=F64)
    gK, gr = gamma(K, 2 * U32), gamma(r, 2 * U32)
    base = x64 @ W64.t()
    e_res = gK * (x64.abs() @ W64.abs().t() + b64.abs()) + u * (base + b64).abs() + eta
    e_base = e_res + u * (base.abs() + e_res) + eta
    xa = x64 @ A64.t()
    e_xa = gK * (x64.abs() @ A64.abs().t()) + ua * xa.abs() + etaa
    lora = xa @ B64.t()
    e_lora = (
        e_xa @ B64.abs().t()
        + gr * ((xa.abs() + e_xa) @ B64.abs().t())
        + ua * (lora.abs() + e_xa @ B64.abs().t())
        + etaa
    )
    inner = base + s * lora
    e_inner = e_base + abs(s) * e_lora
    y = g64 * inner + b64
    e = g64.abs() * e_inner + g_rel * g64.abs() * (inner.abs() + e_inner)
    return (e * (1 + u) + u * y.abs() + eta) * SAFETY


__all__ = [
    "compose_backward_bounds",
    "compose_epilogue_slack",
    "compose_form_bounds",
    "compose_kernel_bounds",
    "dm_bound",
    "dora_layer_bound",
    "factored_norm_bound",
    "gamma",
    "gamma_prob",
    "kernel_norm_bound",
    "lora_compose_bounds",
    "lora_compose_dg_bound",
    "scale_bounds",
]
