"""Does the M-form backward (d_g's lora term as s·Σ_r B ⊙ M, no lora recomputed) with the unrounded-lora forward
speed the lora-compose kernels up, and up to which r should the backward form M = dyᵀxa from its own dots? The
previous kernels (a copy of ``kernels/`` at OLD_COMMIT, custom ops renamed) against this tree's, one process:
forward (y) and backward (d_base, d_m, d_xa, d_B, as the layers call them), interleaved CUDA-graph replays of 20
calls, medians of 9 rounds, beside a device copy; d_m against float64 for both. Run on a GPU from outside the
repository root with the old copy on the path: PYTHONPATH=out/gpu python3 lora_compose_ab.py [OUT_DIR]
(``git archive OLD_COMMIT kernels`` unpacked into out/gpu/old_kernels, ``dora_verify::`` renamed)."""

import importlib
import json
import sys

import torch
from lora_compose_limits import timed  # the same CUDA-graph timing (this folder is on sys.path when run as a script)

new = importlib.import_module("dora_verify.kernels.lora_compose")
old = importlib.import_module("old_kernels.lora_compose")
OLD_COMMIT = "fae7364"
SHAPES = ((4096, 4096, 16), (4096, 14336, 16), (4096, 1024, 16), (4096, 4096, 32), (4096, 4096, 64),
          (4096, 14336, 64), (8192, 8192, 16), (4096, 8192, 384))  # fmt: skip


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else None
    lines, results = [], {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "old": OLD_COMMIT}
    shipped = new.dot_m_applies
    for T, N, R in SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        kw = dict(device="cuda", generator=gen)
        base = torch.randn(T, N, **kw).to(torch.bfloat16)
        dy = torch.randn(T, N, **kw).to(torch.bfloat16)
        xa = torch.randn(T, R, **kw).to(torch.bfloat16)
        B = (torch.randn(N, R, **kw) * 0.05).to(torch.bfloat16)
        nu = torch.rand(N, **kw) + 1
        m = (nu * (1 + 1e-3 * torch.randn(N, **kw))).float()
        s = 2.0
        src, dst = torch.empty_like(base), torch.empty_like(base)

        def bwd(mod, dot=None):
            def call():
                if dot is not None:
                    new.dot_m_applies = lambda r, dtype, device=None: dot and r <= new.LC_BLOCK_R
                try:
                    return mod.lora_compose_backward_fused_all(dy, base, xa, B, nu, s, True, True, True, True, m=m)
                finally:
                    new.dot_m_applies = shipped

            return call

        calls = {
            "copy": lambda: dst.copy_(src),
            "old fwd": lambda: old.lora_compose_forward_fused(base, xa, B, nu, None, s, m=m),
            "new fwd": lambda: new.lora_compose_forward_fused(base, xa, B, nu, None, s, m=m),
            "old bwd": bwd(old),
            "new bwd": bwd(new),
        }
        if R <= new.LC_BLOCK_R:
            calls["new bwd, M from dots"] = bwd(new, True)
            calls["new bwd, M from cuBLAS"] = bwd(new, False)
        us = timed(calls)
        c = us["copy"]
        exact = (dy.double() * (base.double() + s * (xa.double() @ B.double().t()))).sum(0) / nu.double()
        err = {}
        for name, mod in (("old", old), ("new", new)):
            d_m = mod.lora_compose_backward_fused_all(dy, base, xa, B, nu, s, True, True, True, True, m=m)[1]
            err[name] = float(((d_m.double() - exact).abs() / exact.abs().max()).max())
        lines.append(f"## T={T} N={N} r={R} bf16: copy {c:.1f} µs; d_m max error / max|d_m|: old {err['old']:.1e}, "
                     f"new {err['new']:.1e}")  # fmt: skip
        for k, t in us.items():
            passes = 2 if "fwd" in k else 3  # fwd: base in, y out; bwd: dy and base in, d_base out
            lines.append(f"   {k:24s} {t:8.1f} µs  {c * passes / 2 / t:.2f} of copy")
        lines.append(f"   new/old: fwd {us['new fwd'] / us['old fwd']:.3f}, bwd {us['new bwd'] / us['old bwd']:.3f}")
        results[f"{T}x{N}x{R}"] = {"us": us, "d_m_err": err}
        print("\n".join(lines[-len(us) - 2 :]), flush=True)
    if out_dir:
        with open(f"{out_dir}/lora_compose_ab.json", "w") as f:
            json.dump(results, f, indent=1)
        with open(f"{out_dir}/lora_compose_ab.txt", "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
