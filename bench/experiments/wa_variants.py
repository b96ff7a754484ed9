"""Experiment (issue 3): where does the time of U = W Aᵀ and of the DoRALinear step go on the GPU?

    python3 bench/experiments/wa_variants.py --out DIR

1. Variants of the chained U kernel (kernels/norm.py `_wa_kernel`) at 8192×8192, r = 384, bf16, all-positive
   data (which exposes accumulation error): loop structure (one loop with a conditional flush vs nested
   chain loops, optionally flattened), accumulator across chains (float64 vs plain fp32), tile shapes.
   Time (CUDA-event median) and max relative error of U against float64.
2. The DoRALinear training step: host (Python/launch) time per iteration vs GPU time, and the time of each
   piece of the backward, to see whether the layer is bound by the GPU or by the host.
Writes DIR/wa_variants.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import triton
import triton.language as tl
import triton.testing

from dora_verify import provenance


@triton.jit
def _flush(acc, comp, part, ACC64: tl.constexpr):
    """End of a chain: part into acc — plain (ACC64 0: fp32, 1: float64) or Kahan-compensated fp32 (2, comp)."""
    if ACC64 == 2:
        y = part - comp
        t = acc + y
        comp = (t - acc) - y
        acc = t
    else:
        acc += part.to(acc.dtype)
    return acc, comp


@triton.jit
def _wa_variant(
    w_ptr,
    a_ptr,
    out_ptr,
    M,
    R,
    K,
    stride_w,
    stride_a,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FLUSH: tl.constexpr,
    NESTED: tl.constexpr,
    FLAT: tl.constexpr,
    ACC64: tl.constexpr,
):
    # ACC64: 1 float64 accumulator across chains, 0 plain fp32, 2 fp32 with Kahan compensation (comp)
    n_r = tl.cdiv(R, BLOCK_R)
    pid = tl.program_id(0)
    pid_m = pid // n_r
    pid_r = pid % n_r
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    ks = tl.arange(0, BLOCK_K)
    if ACC64 == 1:
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    comp = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    wp = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    ap = a_ptr + rr.to(tl.int64)[None, :] * stride_a
    rmask = (rows < M)[:, None]
    amask = (rr < R)[None, :]
    if NESTED:
        n_chain = tl.cdiv(K, BLOCK_K * FLUSH)
        for c in tl.range(0, n_chain, flatten=FLAT):
            part = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            for i in tl.range(0, FLUSH):
                kk = (c * FLUSH + i) * BLOCK_K + ks
                w = tl.load(wp + kk[None, :], mask=rmask & (kk < K)[None, :], other=0.0)
                a = tl.load(ap + kk[:, None], mask=amask & (kk < K)[:, None], other=0.0)
                part = tl.dot(w, a, part, out_dtype=tl.float32)
            acc, comp = _flush(acc, comp, part, ACC64)
    else:
        part = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        for i in range(0, tl.cdiv(K, BLOCK_K)):
            kk = i * BLOCK_K + ks
            w = tl.load(wp + kk[None, :], mask=rmask & (kk < K)[None, :], other=0.0)
            a = tl.load(ap + kk[:, None], mask=amask & (kk < K)[:, None], other=0.0)
            part = tl.dot(w, a, part, out_dtype=tl.float32)
            if i % FLUSH == FLUSH - 1:
                acc, comp = _flush(acc, comp, part, ACC64)
                part = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
        acc += part.to(acc.dtype)
        acc -= comp.to(acc.dtype)
    offs = rows.to(tl.int64)[:, None] * R + rr[None, :]
    tl.store(out_ptr + offs, acc.to(tl.float32), mask=rmask & amask)


@triton.jit
def _wa_tma(
    w_desc,
    a_desc,
    out_ptr,
    M,
    R,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FLUSH: tl.constexpr,
    ACC64: tl.constexpr,
):
    """_wa_variant's flattened loop with TMA loads (host tensor descriptors; out-of-range reads are zeros)."""
    n_r = tl.cdiv(R, BLOCK_R)
    pid = tl.program_id(0)
    pid_m = pid // n_r
    pid_r = pid % n_r
    if ACC64 == 1:
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    part = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for i in range(0, tl.cdiv(K, BLOCK_K)):
        w = w_desc.load([pid_m * BLOCK_M, i * BLOCK_K])
        a = a_desc.load([pid_r * BLOCK_R, i * BLOCK_K])
        part = tl.dot(w, a.T, part, out_dtype=tl.float32)
        if i % FLUSH == FLUSH - 1:
            acc += part.to(acc.dtype)
            part = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    acc += part.to(acc.dtype)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * R + rr[None, :],
        acc.to(tl.float32),
        mask=(rows < M)[:, None] & (rr < R)[None, :],
    )


TMA_CANDIDATES = [
    (bm, br, bk, flush, warps, stages, acc)
    for (bm, br, bk, flush, warps, stages) in (
        (64, 128, 128, 2, 4, 3),
        (64, 128, 64, 4, 4, 4),
        (64, 128, 64, 4, 4, 5),
        (128, 64, 128, 2, 4, 3),
        (128, 64, 64, 4, 4, 4),
        (128, 128, 64, 4, 8, 4),
        (64, 128, 128, 64, 4, 3),
        (128, 64, 64, 128, 4, 4),
    )
    for acc in (0, 1)
]


def _u_problem(d=8192, r=384):
    """All-positive bf16 W [d, d], A [r, d] (exposes accumulation error), float64 U and an fp32 output buffer."""
    torch.manual_seed(0)
    W = (torch.rand(d, d, device="cuda") / math.sqrt(d)).to(torch.bfloat16)
    A = (torch.rand(r, d, device="cuda") / math.sqrt(d)).to(torch.bfloat16)
    return d, r, W, A, W.double() @ A.double().t(), torch.empty(d, r, device="cuda", dtype=torch.float32)


def _measure(run, rec, out, ref, log):
    """Fill ``rec`` with the max relative error of ``run()``'s U (output poisoned first) and its median time."""
    try:
        out.fill_(float("nan"))
        run()
        rec["max_rel"] = float(((out.double() - ref).abs() / ref).max())
        rec["ms"] = bench_ms(run)
    except Exception as e:  # noqa: BLE001
        rec["error"] = repr(e)[:200]
    log(rec)
    return rec


def wa_tma_variants(log):
    from triton.tools.tensor_descriptor import TensorDescriptor

    d, r, W, A, ref, out = _u_problem()
    rows = []
    for bm, br, bk, flush, warps, stages, acc in TMA_CANDIDATES:
        wd = TensorDescriptor.from_tensor(W, [bm, bk])
        ad = TensorDescriptor.from_tensor(A, [br, bk])
        grid = (triton.cdiv(d, bm) * triton.cdiv(r, br),)

        def run():
            _wa_tma[grid](
                wd,
                ad,
                out,
                d,
                r,
                d,
                BLOCK_M=bm,
                BLOCK_R=br,
                BLOCK_K=bk,
                FLUSH=flush,
                ACC64=acc,
                num_warps=warps,
                num_stages=stages,
            )
            return out

        rows.append(
            _measure(
                run,
                {
                    "variant": dict(
                        tma=1, BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, FLUSH=flush, warps=warps, stages=stages, acc64=acc
                    ),
                    "chain": bk * flush,
                },
                out,
                ref,
                log,
            )
        )
    return rows


def bench_ms(fn, rep=100):
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


NEW_CANDIDATES = [  # session 8: the plain GEMM (no flush) as the Triton ceiling, Kahan fp32 across chains,
    # one-dot chains
    (bm, br, bk, flush, warps, stages, nested, 0, acc)
    for (bm, br, bk, flush, warps, stages) in (
        (64, 128, 128, 64, 4, 3),
        (128, 128, 64, 128, 8, 4),
        (128, 128, 128, 64, 8, 3),
        (64, 128, 128, 2, 4, 3),
        (64, 128, 256, 1, 4, 2),
        (128, 128, 256, 1, 8, 2),
        (128, 128, 128, 2, 8, 3),
        (64, 128, 64, 4, 4, 4),
        (128, 64, 256, 1, 4, 3),
    )
    for nested in (0, 1)
    for acc in (0, 1, 2)
]


def wa_variants(log, cands=None):
    d, r, W, A, ref, out = _u_problem()
    rows = [
        {
            "variant": "cublas mm out_dtype=fp32",
            "ms": bench_ms(lambda: torch.mm(W, A.t(), out_dtype=torch.float32)),
            "max_rel": float(((torch.mm(W, A.t(), out_dtype=torch.float32).double() - ref).abs() / ref).max()),
        }
    ]
    log(rows[-1])
    if cands is None:  # the session-6 set
        cands = [
            (bm, br, bk, flush, warps, stages, nested, flat, acc64)
            for bm, br, bk, flush, warps, stages in (
                (64, 128, 128, 2, 4, 3),
                (128, 128, 128, 2, 8, 3),
                (128, 128, 64, 4, 8, 4),
                (128, 64, 128, 2, 4, 3),
                (64, 128, 64, 4, 4, 4),
                (128, 128, 128, 4, 8, 3),
            )
            for nested, flat in ((0, 0), (1, 0), (1, 1))
            for acc64 in (1, 0)
        ]
    for bm, br, bk, flush, warps, stages, nested, flat, acc64 in cands:
        if br & (br - 1):
            continue
        grid = (triton.cdiv(d, bm) * triton.cdiv(r, br),)

        def run():
            _wa_variant[grid](
                W,
                A,
                out,
                d,
                r,
                d,
                W.stride(0),
                A.stride(0),
                BLOCK_M=bm,
                BLOCK_R=br,
                BLOCK_K=bk,
                FLUSH=flush,
                NESTED=nested,
                FLAT=flat,
                ACC64=acc64,
                num_warps=warps,
                num_stages=stages,
            )
            return out

        rows.append(
            _measure(
                run,
                {
                    "variant": dict(
                        BLOCK_M=bm,
                        BLOCK_R=br,
                        BLOCK_K=bk,
                        FLUSH=flush,
                        warps=warps,
                        stages=stages,
                        nested=nested,
                        flatten=flat,
                        acc64=acc64,
                    ),
                    "chain": bk * flush,
                },
                out,
                ref,
                log,
            )
        )
    return rows


def host_ms(fn, n=8):
    """Host (Python + launch) time per call while the GPU is kept busy by a long sleep kernel, so that
    the launch queue never blocks the host."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    return t


def _ours_layer(d, r):
    """DoRALinear on a bf16 d×d Linear with B ≠ 0 and g ≠ 1, and its trainable parameters."""
    from dora_verify.kernels import DoRALinear

    lin = torch.nn.Linear(d, d, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = DoRALinear(lin, r, 2 * r)
    with torch.no_grad():
        layer.lora_B.normal_(0, 1e-3)
        layer.magnitude.mul_(1.001)
    return layer, [layer.lora_A, layer.lora_B, layer.magnitude]


def _peft_lora(d, r):
    from peft import LoraConfig, get_peft_model

    lin = torch.nn.Linear(d, d, bias=False, device="cuda", dtype=torch.bfloat16)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"])
    return get_peft_model(torch.nn.Sequential(lin), cfg, autocast_adapter_dtype=False)


def layer_step(log):
    import importlib

    lc = importlib.import_module("dora_verify.kernels.lora_compose")

    d, r, T = 8192, 384, 4096
    torch.manual_seed(0)
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    layer, params = _ours_layer(d, r)
    lin = layer.base_layer

    def fwd():
        return layer(x)

    def fwd_bwd():
        return torch.autograd.grad(layer(x), params, dy)

    res = {}
    lora = _peft_lora(d, r)
    lparams = [p for p in lora.parameters() if p.requires_grad]
    for name, fn in (
        ("fwd", fwd),
        ("fwd_bwd", fwd_bwd),
        ("lora_fwd", lambda: lora(x)),
        ("lora_fwd_bwd", lambda: torch.autograd.grad(lora(x), lparams, dy)),
    ):
        gpu = bench_ms(fn, rep=50)
        res[name] = {"gpu_ms": gpu, "host_enqueue_ms": host_ms(fn)}
        log(name, res[name])
    import cProfile
    import io
    import pstats

    for name, fn in (("fwd_bwd", fwd_bwd),):
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000_000)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(8):
            fn()
        pr.disable()
        torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(35)
        res["cprofile_" + name] = buf.getvalue()
        log(buf.getvalue())
    # pieces of the backward, each alone
    base = x @ lin.weight.t()
    xa = x @ layer.lora_A.t()
    B = layer.lora_B.detach()
    g = torch.rand(d, device="cuda") + 0.5
    s = layer.scaling
    res["pieces_ms"] = {
        "lora_compose_bwd_kernel": bench_ms(lambda: lc.lora_compose_backward_fused(dy, base, xa, B, g, s, False, True)),
        "adapter_grads": bench_ms(lambda: lc.adapter_grads(dy, xa, B, g, s, True, True)),
        "dyT_xa_fp32": bench_ms(lambda: torch.mm(dy.t(), xa, out_dtype=torch.float32)),
        "xaT_dy_fp32": bench_ms(lambda: torch.mm(xa.t(), dy, out_dtype=torch.float32)),
        "dy_gsB": bench_ms(lambda: dy @ B),
        "dA_xT_dxa": bench_ms(lambda: xa.t() @ x),
        "base_gemm": bench_ms(lambda: x @ lin.weight.t()),
        "norm": bench_ms(lambda: layer.weight_norm()),
    }
    log(res["pieces_ms"])
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--skip-wa", action="store_true")
    ap.add_argument("--compiled", action="store_true")
    ap.add_argument("--only-compiled", action="store_true")
    ap.add_argument("--only-new-wa", action="store_true", help="the session-8 U variants only")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    res = {"provenance": provenance.provenance(torch.device("cuda")), "seed": 0}
    if args.only_new_wa:
        res["wa_variants"] = wa_variants(lambda *a: print(*a, flush=True), NEW_CANDIDATES)
        res["wa_tma_variants"] = wa_tma_variants(lambda *a: print(*a, flush=True))
    elif not (args.skip_wa or args.only_compiled):
        res["wa_variants"] = wa_variants(lambda *a: print(*a, flush=True))
    if not (args.only_compiled or args.only_new_wa):
        res["host_pieces"] = host_pieces(lambda *a: print(*a, flush=True))
        res["layer_step"] = layer_step(lambda *a: print(*a, flush=True))
    if args.compiled or args.only_compiled:
        res["compiled_step"] = compiled_step(lambda *a: print(*a, flush=True))
    with open(os.path.join(args.out, "wa_variants.json"), "w") as f:
        json.dump(res, f, indent=1)


def host_pieces(log):
    """Host time of each piece of the DoRALinear step (GPU kept busy, so nothing waits on the device)."""
    import importlib

    import torch.nn.functional as F

    from dora_verify.kernels import DoRALinear, dora_scale, factored_row_norm

    lc = importlib.import_module("dora_verify.kernels.lora_compose")
    nm = importlib.import_module("dora_verify.kernels.norm")
    d, r, T = 8192, 384, 4096
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    lin = torch.nn.Linear(d, d, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = DoRALinear(lin, r, 2 * r)
    W, A, B = lin.weight.detach(), layer.lora_A.detach(), layer.lora_B.detach()
    wsq = nm.weight_row_sq(W)
    nu = factored_row_norm(W, A, B, 2.0, wsq=wsq, validate=False)
    m = layer.magnitude
    xa = F.linear(x, A)
    base = F.linear(x, W)
    g = torch.ones(d, device="cuda")
    U = torch.empty(d, r, device="cuda")

    @triton.jit
    def _noop(p):
        pass

    pieces = {
        "triton_noop_launch": lambda: _noop[(1,)](U),
        "wa_kernel_launch": lambda: nm._wa_kernel[(384, 1)](
            W,
            A,
            U,
            d,
            r,
            d,
            W.stride(0),
            A.stride(0),
            d,
            MODE=0,
            BLOCK_M=64,
            BLOCK_R=128,
            BLOCK_K=128,
            FLUSH=2,
            SPLIT=1,
            num_warps=4,
            num_stages=3,
        ),
        "F.linear": lambda: F.linear(x, W),
        "torch.mul_small": lambda: g * 2.0,
        "wa_product_U": lambda: nm.wa_product(W, A),
        "factored_row_norm": lambda: factored_row_norm(W, A, B, 2.0, wsq=wsq, validate=False),
        "dora_scale": lambda: dora_scale(m, nu),
        "lora_compose_fwd_fused": lambda: lc.lora_compose_forward_fused(base, xa, B, g, None, 2.0),
        "lora_compose_public_nograd": lambda: lc.lora_compose(base, xa, B, g, 2.0),
        "lora_compose_bwd_fused": lambda: lc.lora_compose_backward_fused(base, base, xa, B, g, 2.0, False, True),
        "adapter_grads": lambda: lc.adapter_grads(base, xa, B, g, 2.0, True, True),
    }
    res = {}
    for name, fn in pieces.items():
        res[name] = host_ms(fn, n=20)
        log(f"host {name}: {res[name]:.4f} ms")
    return res


def compiled_step(log):
    """The same step under torch.compile (default and 'reduce-overhead' = CUDA graphs), ours vs PEFT LoRA."""
    d, r, T = 8192, 384, 4096
    torch.manual_seed(0)
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    res = {}
    for impl in ("ours", "lora"):
        if impl == "ours":
            layer, params = _ours_layer(d, r)
        else:
            layer = _peft_lora(d, r)
            params = [p for p in layer.parameters() if p.requires_grad]
        for mode in ("default", "reduce-overhead"):
            torch._dynamo.reset()
            cl = torch.compile(layer, mode=mode)

            def step():
                y = cl(x)
                y.backward(dy)
                return y

            try:
                t0 = time.perf_counter()
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                rec = {"compile_s": time.perf_counter() - t0, "gpu_ms": bench_ms(step, rep=50)}
                if mode == "default":
                    rec["host_enqueue_ms"] = host_ms(step)
            except Exception as e:  # noqa: BLE001
                rec = {"error": repr(e)[:300]}
            for p in params:
                p.grad = None
            res[f"{impl}_{mode}"] = rec
            log(impl, mode, rec)
    return res


if __name__ == "__main__":
    main()
