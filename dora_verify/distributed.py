"""Certify the sharded factored norm (``dora_verify.kernels.distributed``) against the single-process oracle.

:func:`check_sharded_norm` runs on every rank of an initialised process group: it cuts this rank's shards out of
the full (identical on every rank) W, A, B, runs the sharded norm, and compares ν with the exact ν of the full
matrices (``oracles.row_norm_truth``) under the production norm's a-priori bound (``bounds.kernel_norm_bound``),
which covers the sharded path (proofs/bounds.md, "Sharded norm"): the float64 sum of P partials adds ≤ (P − 1)·2⁻⁵³
of the magnitudes, inside the bound's γ64_{n+2r+8} term for any P ≤ n; the P fp32 stores of the partial U_p (Triton
backend) are charged as one more product per tensor-core chain.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import bounds
from .oracles import row_norm_truth


def shard(t: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s piece of ``t`` along ``dim`` (``torch.tensor_split``: uneven sizes allowed, as FSDP2's)."""
    return torch.tensor_split(t, world, dim=dim)[rank].contiguous()


def _gather_rows(nu: torch.Tensor, world: int, group) -> torch.Tensor:
    sizes = torch.tensor([nu.numel()], device=nu.device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes, group=group)
    n_max = int(max(int(x) for x in all_sizes))
    padded = torch.zeros(n_max, dtype=nu.dtype, device=nu.device)
    padded[: nu.numel()] = nu
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[: int(n)] for p, n in zip(parts, all_sizes)])


def check_sharded_norm(W, A, B, s: float, layout: str, group=None, deterministic: bool = False) -> dict:
    """Run the sharded norm of the full ``W``, ``A``, ``B`` (the same on every rank) in ``layout``; return the
    error/bound ratio against the exact ν (≤ 1 certifies), the max relative error, whether every rank holds the
    same ν ('cols') and the rows recomputed densely. A collective: every rank calls it."""
    from .kernels.distributed import sharded_row_norm
    from .kernels.norm import DEFAULT_KAPPA_MAX, U_CHAIN

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if layout == "rows":
        w, a, b = shard(W, 0, rank, world), A, shard(B, 0, rank, world)
    else:
        w, a, b = shard(W, 1, rank, world), shard(A, 1, rank, world), B
    nu_local, kappa = sharded_row_norm(
        w, a, b, s, layout=layout, group=group, deterministic=deterministic, return_kappa=True
    )
    if layout == "rows":
        nu, kappa = _gather_rows(nu_local, world, group), _gather_rows(kappa, world, group)
        same = True
    else:
        nu = nu_local
        ref = nu.clone()
        dist.broadcast(ref, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        same = bool(torch.equal(ref, nu))
    dense = torch.nonzero(kappa > DEFAULT_KAPPA_MAX).flatten().cpu().tolist()
    Wc, Ac, Bc, nuc = (t.detach().cpu() for t in (W, A, B, nu))
    truth = row_norm_truth(Wc, Ac, Bc, s)
    backend = "triton" if (W.is_cuda and W.dtype != torch.float32) else "torch"
    # 'cols' on the Triton backend stores each partial U_p in fp32 (P roundings instead of one): charged as one more
    # product per chain (proofs/bounds.md, "Sharded norm")
    chain = U_CHAIN + 1 if layout == "cols" else None
    bound = bounds.kernel_norm_bound(Wc, Ac, Bc, s, truth.nu, backend, dense, chain=chain)
    err = ((nuc.double() - truth.nu).abs() - truth.bound).clamp_min(0)
    ratio = torch.where(err == 0, torch.zeros_like(err), err / bound)
    rel = (nuc.double() - truth.nu).abs() / truth.nu.clamp_min(1e-300)
    return {
        "layout": layout,
        "world": world,
        "max_ratio": float(ratio.max()),
        "max_rel": float(rel.max()),
        "identical_across_ranks": same,
        "dense_rows": len(dense),
        "backend": backend,
        "deterministic": deterministic,
    }


__all__ = ["check_sharded_norm", "shard"]
