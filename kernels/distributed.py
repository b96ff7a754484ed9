"""The factored row norm on sharded weights (FSDP2, tensor parallelism), without gathering W.

Layouts — what each rank of the process group holds:

* ``'rows'`` (FSDP2's ``Shard(0)`` of W and B; a column-parallel linear): rows R_p of W and of B, and A. ν of the
  local rows is a local factored norm: ‖W_i‖², U_i = W_i Aᵀ and the gram term need only row i and A. A is the
  one thing gathered (FSDP2 shards lora_A along r: an r × d_in, adapter-sized all-gather). No reduction: every
  local row meets the single-process contract of :func:`factored_row_norm` (the same code on the same row).
* ``'cols'`` (``Shard(1)``; a row-parallel linear): columns K_p of W and of A, and all of B. Each rank computes its
  partial terms over K_p — ‖W‖² row partials (float64, exact squares), U_p = W[:, K_p] A[:, K_p]ᵀ (the production
  GEMM: fp32 chains, one fp32 rounding) and G_p = A[:, K_p] A[:, K_p]ᵀ (float64) — and the partials are summed
  across ranks in float64; every rank then assembles ν and κ from the same summed terms (identical bits on every
  rank). Rows with κ > κ_max (W_i ≈ −s(BA)_i) are recomputed from float64 partial squares Σ_{k∈K_p}(W_ik +
  s(B_i A)_{ik})², summed the same way.

Numerical contract (``'cols'``): the single-process bound of the production norm
(``dora_verify.bounds.kernel_norm_bound`` with the backend that computed U) plus, per summed value, the float64
sum of P partials: ≤ (P − 1)·2⁻⁵³·Σ_p|partial_p| — about 1e-16 of the magnitudes the fp32 terms are charged
against; on the Triton backend the fp32 store of each U_p adds u₃₂·Σ_p|U_p| ≤ u₃₂·Σ_k|W_ik A_jk|, charged as one more
product per tensor-core chain (proofs/bounds.md, "Sharded norm").

Determinism: ``all_reduce`` sums in an order its algorithm fixes (NCCL: ring or tree, protocol, topology, world
size; gloo likewise): repeatable on one configuration, not across configurations. ``deterministic=True``
all-gathers the partials instead and sums them in rank order on every rank — the same bits for the same shards
whatever the collective's algorithm, for P times the partials' memory (P·(d_out·r + r² + d_out) float64).
Transient memory per rank: O(d_out·r + r²) float64 (the partials) plus the local norm's own, never a gathered W.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .norm import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_KAPPA_MAX,
    _row_chunks,
    assemble_norm,
    check_norm_inputs,
    factored_row_norm,
    wa_product,
)
from .scale import check_scaling

LAYOUTS = ("rows", "cols")


def _sum_across(t: torch.Tensor, group, deterministic: bool) -> torch.Tensor:
    """Σ over the group's ranks of ``t`` (float64), in place for all_reduce; rank order when deterministic."""
    if not deterministic:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    out = parts[0].clone()
    for p in parts[1:]:
        out += p
    return out


def _cols_norm(W, A, B, s, group, kappa_max, deterministic, chunk_bytes):
    d_out, r = W.shape[0], A.shape[0]
    A64 = A.to(torch.float64)
    U, wsq = wa_product(W, A, chunk_bytes, row_sq=True)  # ‖W‖² from U's pass over W where the kernel runs
    terms = torch.cat([wsq, U.to(torch.float64).flatten(), (A64 @ A64.t()).flatten()])
    terms = _sum_across(terms, group, deterministic)
    wsq, U, G = terms[:d_out], terms[d_out : d_out + d_out * r].view(d_out, r), terms[d_out + d_out * r :].view(r, r)
    nu, kappa = assemble_norm(wsq, U, G, B, s)
    bad = torch.nonzero(kappa > kappa_max).flatten()  # the same rows on every rank: the terms are identical
    if bad.numel():
        sq = torch.empty(bad.numel(), dtype=torch.float64, device=W.device)
        for i0, i1 in _row_chunks(bad.numel(), W.shape[1] * 16, chunk_bytes):
            idx = bad[i0:i1]
            V = W[idx].to(torch.float64) + s * (B[idx].to(torch.float64) @ A64)
            sq[i0:i1] = (V * V).sum(dim=1)
        nu[bad] = _sum_across(sq, group, deterministic).sqrt()
    return nu.to(torch.float32), kappa


def sharded_row_norm(
    W: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    s: float,
    *,
    layout: str,
    group=None,
    kappa_max: float = DEFAULT_KAPPA_MAX,
    deterministic: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    return_kappa: bool = False,
):
    """ν = ‖W + s·BA‖_row from this rank's shards (module docstring), fp32.

    ``layout='rows'``: W [d_out_p, d_in], B [d_out_p, r], A [r, d_in] (whole) → ν of the local rows [d_out_p];
    purely local. ``layout='cols'``: W [d_out, d_in_p], A [r, d_in_p], B [d_out, r] (whole) → ν of every row
    [d_out], the same on every rank; a collective: every rank of ``group`` must call it with the same d_out, r,
    s and flags. Raises ValueError for a bad layout, shapes or NaN/Inf (the local checks of factored_row_norm)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    # A rank may hold no rows ('rows') or no columns ('cols') when a dimension is smaller than the group (FSDP2's
    # uneven shards): it still answers — an empty ν, or zero partials (a zero column adds nothing to any term).
    tensors = all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in (W, A, B))
    if layout == "rows" and tensors and W.shape[0] == 0:
        check_scaling(s)
        nu = torch.empty(0, dtype=torch.float32, device=W.device)
        return (nu, torch.empty(0, dtype=torch.float64, device=W.device)) if return_kappa else nu
    if layout == "cols" and tensors and W.shape[1] == 0 and A.shape[1] == 0:
        W, A = W.new_zeros((W.shape[0], 1)), A.new_zeros((A.shape[0], 1))
    s = check_norm_inputs(W, A, B, s)
    with torch.no_grad():
        W, A, B = W.detach(), A.detach(), B.detach()
        if layout == "rows":
            nu, info = factored_row_norm(
                W, A, B, s, kappa_max=kappa_max, chunk_bytes=chunk_bytes, return_info=True, validate=False
            )
            kappa = info.kappa
        else:
            if not dist.is_initialized():
                raise ValueError("layout='cols' sums partials across ranks: initialise torch.distributed first")
            nu, kappa = _cols_norm(W, A, B, s, group, kappa_max, deterministic, chunk_bytes)
    return (nu, kappa) if return_kappa else nu


def dtensor_row_norm(W, A, B, s: float, *, kappa_max: float = DEFAULT_KAPPA_MAX, deterministic: bool = False):
    """ν from DTensor parameters as FSDP2 (or tensor parallelism) holds them, without gathering W.

    W ``Shard(0)`` (FSDP2's default; B must be sharded the same way): the 'rows' layout; A (an adapter) is
    gathered; returns a DTensor ``Shard(0)`` like FSDP2's magnitude. W ``Shard(1)`` (A ``Shard(1)``, B gathered):
    'cols'; returns a replicated DTensor. W replicated or a plain tensor: the local norm."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    kw = dict(kappa_max=kappa_max, deterministic=deterministic)
    if not isinstance(W, DTensor):
        return factored_row_norm(W, A, B, s, kappa_max=kappa_max)
    if len(W.placements) != 1:
        raise ValueError(f"dtensor_row_norm handles a 1-D mesh, got placements {W.placements}")
    full = lambda t: t.full_tensor() if isinstance(t, DTensor) else t  # noqa: E731
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    pl, mesh = W.placements[0], W.device_mesh
    if isinstance(pl, Shard) and pl.dim == 0:
        if not (isinstance(B, DTensor) and B.placements == W.placements):
            raise ValueError("W is row-sharded (Shard(0)): B must be a DTensor sharded the same way")
        nu = sharded_row_norm(W.to_local(), full(A), B.to_local(), s, layout="rows", **kw)
        return DTensor.from_local(nu, mesh, (Shard(0),), run_check=False, shape=torch.Size([W.shape[0]]), stride=(1,))
    if isinstance(pl, Shard) and pl.dim == 1:
        if not (isinstance(A, DTensor) and A.placements == W.placements):
            raise ValueError("W is column-sharded (Shard(1)): A must be a DTensor sharded the same way")
        nu = sharded_row_norm(W.to_local(), A.to_local(), full(B), s, layout="cols", group=mesh.get_group(), **kw)
        return DTensor.from_local(nu, mesh, (Replicate(),), run_check=False)
    if isinstance(pl, Replicate):
        return DTensor.from_local(
            factored_row_norm(local(W), full(A), full(B), s, kappa_max=kappa_max), mesh, (Replicate(),), run_check=False
        )
    raise ValueError(f"unsupported placement of W: {pl}")


__all__ = ["LAYOUTS", "dtensor_row_norm", "sharded_row_norm"]
