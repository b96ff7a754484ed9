"""``dora-verify bench``: what the kernels gain on this GPU, measured side by side in one run.

Parts (each against its alternatives, same process, same inputs):

* ``compose`` — the fused compose forward (y) and backward (d_base, d_lora, d_g) against eager torch's stable
  form in the activation dtype (``(g−1)·base + g·s·lora``, four elementwise passes, as PEFT computes it) and
  against this project's eager tier (float64), as time and as a fraction of the device's copy bandwidth
  measured in the same run. Shapes: rows × d_out of the paper's microbenchmark range (1×512 … 8192×28672).
  The forward/eager-tier timings give the dispatch crossover (:data:`dora_verify.kernels.dispatch`).
* ``norm`` — ν = ‖W + s·BA‖_row: the factored norm (‖W‖² cached, as a layer does; and cold) against PEFT's
  path (BA through an identity matrix and the two adapter layers, W + s·BA and the norm in the weight dtype)
  and a dense fp32 B@A, time and transient peak memory, bf16 and fp32 weights.
* ``model`` — where users train: a Llama-shaped model's training step (eager, gradient checkpointing, compile) and
  one layer inside a model (its input requires grad), against PEFT LoRA and stock PEFT DoRA (``bench_model.py``).
* ``layer`` — a whole DoRA layer (bf16 ``nn.Linear`` d→d, no bias): ours (:class:`DoRALinear`, ν recomputed
  every training step as A and B change) against PEFT DoRA and PEFT LoRA, with PEFT's default fp32 adapters
  and with bf16 adapters; forward (training mode), forward+backward (gradients of A, B, m) and inference
  forward; time and transient peak memory. Grid: d ∈ {4096, 8192}, r ∈ {64, 384, 768}, tokens ∈ {2048, 4096,
  16384} (``--quick``: the target shape and one small one).

Timing contract: ``warmup`` calls, then CUDA events around each of ``reps`` calls, median (p10, p90 kept).
Inputs rotate through enough copies that one pass over them exceeds twice the L2 cache (at most
:data:`MAX_ROTATE` copies: below ~100 KB per call the numbers are launch-bound and L2-resident either way).
Events time the GPU timeline between the call's first and last launch, so a host-bound call (Python and
launch overhead longer than its GPU work) shows its gaps — eager numbers are what an eager user gets.
Transient peak memory = allocator peak during the call − memory allocated before it (the output included).

No GPU, no numbers: :func:`run_bench` raises ``BenchUnavailable`` (the CLI exits 2).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from .bench_model import bench_model, model_targets, plan_size
from .forms import dense_fp32, peft_dense, stable_gcast
from .sweep import _Steps

SCHEMA_VERSION = "1.0"
MAX_ROTATE = 16
PARTS = ("compose", "norm", "layer", "model")
S = 2.0  # the LoRA scaling of the compose and norm parts (alpha = 2r)

# rows × d_out of the compose microbenchmark: decode (1 row) to long prefill, d_out from 512 to 28672 (Llama MLP)
COMPOSE_SHAPES = (
    (1, 512),
    (1, 4096),
    (16, 4096),
    (128, 4096),
    (512, 4096),
    (2048, 4096),
    (2048, 8192),
    (4096, 8192),
    (8192, 8192),
    (2048, 14336),
    (8192, 14336),
    (4096, 28672),
    (8192, 28672),
)
COMPOSE_SHAPES_QUICK = ((1, 4096), (512, 4096), (4096, 8192), (8192, 8192))
NORM_SHAPES = tuple((d, r) for d in (4096, 8192) for r in (64, 384, 768))
NORM_SHAPES_QUICK = ((4096, 64), (8192, 384))
LAYER_SHAPES = tuple((d, r, t) for d in (4096, 8192) for r in (64, 384, 768) for t in (2048, 4096, 16384))
LAYER_SHAPES_QUICK = ((4096, 64, 2048), (8192, 384, 4096))
TARGET_LAYER = (8192, 384, 4096)  # the kernels issue's layer targets are stated at this shape
TARGET_NORM = (8192, 384)


class BenchUnavailable(ValueError):
    """The benchmark cannot run here (no CUDA device, or PEFT missing for the layer part)."""


@dataclass
class BenchConfig:
    quick: bool = False
    parts: tuple = PARTS
    warmup: int = 10
    reps: int = 50
    seed: int = 0
    model_warmup: int = 3  # the model part (bench_model.py): warm-up steps, then rounds × steps per round
    model_rounds: int = 7
    model_per_round: int = 3
    layer_rounds: int = 9  # ... and its layer-in-a-model rows
    layer_per_round: int = 10

    def validate(self) -> None:
        bad = [p for p in self.parts if p not in PARTS]
        if bad or not self.parts:
            raise ValueError(f"unknown part(s) {bad or list(self.parts)}; choose from {', '.join(PARTS)}")
        if self.warmup < 0 or self.reps < 3:
            raise ValueError(f"need warmup ≥ 0 and reps ≥ 3, got {self.warmup}, {self.reps}")


# ----------------------------------------------------------------------------- measurement
def rotation(nbytes: int) -> int:
    """Copies of a call's inputs so that one pass over them exceeds twice the L2 cache (≤ MAX_ROTATE)."""
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 50 << 20)
    return max(1, min(MAX_ROTATE, math.ceil(2 * l2 / max(1, nbytes))))


def time_ms(call, variants: int, warmup: int, reps: int) -> dict:
    """Median (p10, p90) milliseconds of ``call(i)`` (i: which input copy) by CUDA events, after ``warmup``."""
    for i in range(warmup):
        call(i % variants)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for i, (start, end) in enumerate(events):
        start.record()
        call(i % variants)
        end.record()
    torch.cuda.synchronize()
    t = sorted(a.elapsed_time(b) for a, b in events)
    q = lambda p: t[min(len(t) - 1, int(round(p * (len(t) - 1))))]  # noqa: E731
    return {"ms": q(0.5), "p10": q(0.1), "p90": q(0.9)}


def transient_peak_mib(fn) -> float:
    """Allocator peak during ``fn()`` minus what was allocated before (MiB); the output counts."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak / 2**20


def copy_bandwidth(cfg: BenchConfig) -> dict:
    """Device copy bandwidth: a 1 GiB bf16 copy, (read + write bytes) / median time."""
    a = torch.empty(1 << 29, device="cuda", dtype=torch.bfloat16).normal_()
    b = torch.empty_like(a)
    t = time_ms(lambda i: b.copy_(a), 1, cfg.warmup, cfg.reps)
    nbytes = 2 * a.numel() * a.element_size()
    return {"bytes": nbytes, "ms": t["ms"], "TBps": nbytes / (t["ms"] * 1e-3) / 1e12}


# ----------------------------------------------------------------------------- compose
def _backward_ms(fn, base, lora, g, dy, cfg) -> dict:
    """Time ``torch.autograd.grad`` of ``fn(base, lora, g)`` alone (d_base, d_lora, d_g): one retained forward
    graph per input copy, then the backward over them in rotation."""
    graphs = []
    for b, lo in zip(base, lora):
        inputs = (b.detach().requires_grad_(), lo.detach().requires_grad_(), g.clone().requires_grad_())
        graphs.append((fn(*inputs), inputs))
    return time_ms(
        lambda i: torch.autograd.grad(graphs[i][0], graphs[i][1], dy[i], retain_graph=True),
        len(graphs),
        cfg.warmup,
        cfg.reps,
    )


def compose_row(T: int, N: int, cfg: BenchConfig, bw_TBps: float) -> dict:
    """One shape of the compose part: fused vs eager bf16 vs eager tier, forward and backward."""
    from .kernels import compose

    n = rotation(3 * 2 * T * N)
    gen = torch.Generator(device="cuda").manual_seed(cfg.seed)
    base, lora, dy = (
        [torch.randn(T, N, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(n)] for _ in range(3)
    )
    g = (1 + 1e-3 * torch.randn(N, device="cuda", generator=gen)).float()
    fused = lambda b, lo, gg: compose(b, lo, gg, S, tier="fused")  # noqa: E731
    eager_tier = lambda b, lo, gg: compose(b, lo, gg, S, tier="eager")  # noqa: E731
    stable = lambda b, lo, gg: stable_gcast(b, lo, gg, S)[0]  # noqa: E731 - PEFT's arithmetic, four passes
    rec = {"T": T, "d_out": N, "elements": T * N, "rotation": n}
    for name, fn in (("fused", fused), ("eager", stable), ("eager_tier", eager_tier)):
        rec[f"{name}_fwd"] = time_ms(lambda i: fn(base[i], lora[i], g), n, cfg.warmup, cfg.reps)
        rec[f"{name}_bwd"] = _backward_ms(fn, base, lora, g, dy, cfg)
    elem_bytes = 2 * T * N  # bf16
    rec["fused_fwd_bw_frac"] = 3 * elem_bytes / (rec["fused_fwd"]["ms"] * 1e-3) / 1e12 / bw_TBps  # base, lora → y
    rec["fused_bwd_bw_frac"] = 5 * elem_bytes / (rec["fused_bwd"]["ms"] * 1e-3) / 1e12 / bw_TBps  # dy, base, lora → 2
    rec["fwd_speedup_vs_eager"] = rec["eager_fwd"]["ms"] / rec["fused_fwd"]["ms"]
    rec["bwd_speedup_vs_eager"] = rec["eager_bwd"]["ms"] / rec["fused_bwd"]["ms"]
    return rec


def bench_compose(cfg: BenchConfig, bw_TBps: float, tick) -> list:
    rows = []
    for T, N in COMPOSE_SHAPES_QUICK if cfg.quick else COMPOSE_SHAPES:
        rows.append(compose_row(T, N, cfg, bw_TBps))
        torch.cuda.empty_cache()
        r = rows[-1]
        tick(
            f"compose {T}x{N}: fwd {r['fused_fwd']['ms']:.4f} ms ({r['fused_fwd_bw_frac']:.0%} of copy bw), "
            f"bwd ×{r['bwd_speedup_vs_eager']:.2f} vs eager"
        )
    return rows


def crossover(rows: list) -> dict:
    """The dispatch crossover measured from the compose rows: the smallest T·d_out above every size where the
    fused tier was slower than the eager tier, for inference (forward) and training (forward + backward);
    1 where the fused tier was never slower, None where it was slower at the largest size measured."""
    from .kernels import dispatch

    def threshold(fused, eager):
        pts = sorted((r["elements"], fused(r), eager(r)) for r in rows)
        losing = [e for e, f, x in pts if f > x]
        if not losing:
            return 1
        return next((e for e, _, _ in pts if e > max(losing)), None)

    ms = lambda r, k: r[k]["ms"]  # noqa: E731
    return {
        "infer_min_elements_measured": threshold(lambda r: ms(r, "fused_fwd"), lambda r: ms(r, "eager_tier_fwd")),
        "train_min_elements_measured": threshold(
            lambda r: ms(r, "fused_fwd") + ms(r, "fused_bwd"),
            lambda r: ms(r, "eager_tier_fwd") + ms(r, "eager_tier_bwd"),
        ),
        "infer_min_elements_shipped": dispatch.INFER_MIN_ELEMENTS,
        "train_min_elements_shipped": dispatch.TRAIN_MIN_ELEMENTS,
    }


# ----------------------------------------------------------------------------- norm
def norm_row(d: int, r: int, wdt: torch.dtype, cfg: BenchConfig) -> dict:
    """One (shape, weight dtype) of the norm part: factored (cached ‖W‖², cold) vs PEFT vs dense fp32."""
    from .kernels import factored_row_norm, weight_row_sq

    gen = torch.Generator(device="cuda").manual_seed(cfg.seed)
    n = rotation(d * d * wdt.itemsize)
    Ws = [(torch.randn(d, d, device="cuda", generator=gen) / math.sqrt(d)).to(wdt) for _ in range(n)]
    A = (torch.randn(r, d, device="cuda", generator=gen) / math.sqrt(d)).to(wdt)
    B = (1e-2 * torch.randn(d, r, device="cuda", generator=gen)).to(wdt)
    wsq = [weight_row_sq(W) for W in Ws]
    impls = {
        "factored": lambda i: factored_row_norm(Ws[i], A, B, S, wsq=wsq[i], validate=False),
        "factored_cold": lambda i: factored_row_norm(Ws[i], A, B, S, validate=False),
        "peft": lambda i: peft_dense(Ws[i], A, B, S),
        "dense_fp32": lambda i: dense_fp32(Ws[i], A, B, S),
    }
    rec = {"d": d, "r": r, "W_dtype": str(wdt).removeprefix("torch."), "rotation": n}
    for name, fn in impls.items():
        rec[name] = dict(time_ms(fn, n, cfg.warmup, cfg.reps), peak_mib=transient_peak_mib(lambda: fn(0)))
    rec["speedup_vs_peft"] = rec["peft"]["ms"] / rec["factored"]["ms"]
    rec["memory_vs_peft"] = rec["factored"]["peak_mib"] / rec["peft"]["peak_mib"]
    return rec


def bench_norm(cfg: BenchConfig, tick) -> list:
    rows = []
    for d, r in NORM_SHAPES_QUICK if cfg.quick else NORM_SHAPES:
        for wdt in (torch.bfloat16, torch.float32):
            rows.append(norm_row(d, r, wdt, cfg))
            torch.cuda.empty_cache()
            x = rows[-1]
            tick(
                f"norm d={d} r={r} {x['W_dtype']}: ×{x['speedup_vs_peft']:.2f} vs PEFT, "
                f"{x['memory_vs_peft']:.3f} of its memory"
            )
    return rows


# ----------------------------------------------------------------------------- layer
LAYER_IMPLS = ("peft_lora", "peft_dora", "ours")


def _build_layer(impl: str, d: int, r: int, adapters: str, seed: int):
    """(module, trainable params, per-step hook) of one layer under test, B and m perturbed off the identity."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(d, d, bias=False, device="cuda", dtype=torch.bfloat16)
    if impl == "ours":
        from .kernels import DoRALinear

        layer = DoRALinear(lin, r, 2 * r, adapter_dtype=torch.float32 if adapters == "fp32" else None)
        with torch.no_grad():
            layer.lora_B.normal_(0, 1e-3)
            layer.magnitude.mul_(1.001)

        def step():  # ν is computed on every forward (RowNormRunner): nothing to reset between steps
            pass

        return layer, [layer.lora_A, layer.lora_B, layer.magnitude], step
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], use_dora=impl == "peft_dora")
    model = get_peft_model(torch.nn.Sequential(lin), cfg, autocast_adapter_dtype=adapters == "fp32")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    return model, [p for p in model.parameters() if p.requires_grad], lambda: None


def layer_times(impl: str, d: int, r: int, adapters: str, xs: list, dy, cfg: BenchConfig) -> dict:
    """Forward (training), forward+backward and inference forward of one layer: time and transient peak."""
    layer, params, step = _build_layer(impl, d, r, adapters, cfg.seed)

    def fwd(i):
        step()
        return layer(xs[i])

    def fwd_bwd(i):
        step()
        return torch.autograd.grad(layer(xs[i]), params, dy)

    def infer(i):
        with torch.no_grad():
            return layer(xs[i])

    n = len(xs)
    res = {
        "fwd": time_ms(fwd, n, cfg.warmup, cfg.reps),
        "fwd_bwd": time_ms(fwd_bwd, n, cfg.warmup, cfg.reps),
        "infer": time_ms(infer, n, cfg.warmup, cfg.reps),
    }
    res["fwd"]["peak_mib"] = transient_peak_mib(lambda: fwd(0))
    res["fwd_bwd"]["peak_mib"] = transient_peak_mib(lambda: fwd_bwd(0))
    return res


def layer_rows(d: int, r: int, T: int, cfg: BenchConfig) -> list:
    """Both adapter dtypes of one layer shape, every implementation."""
    n = rotation(T * d * 2)
    gen = torch.Generator(device="cuda").manual_seed(cfg.seed)
    xs = [torch.randn(T, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(n)]
    dy = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    rows = []
    for adapters in ("fp32", "bf16"):
        rec = {"d": d, "r": r, "tokens": T, "adapters": adapters, "rotation": n}
        for impl in LAYER_IMPLS:
            rec[impl] = layer_times(impl, d, r, adapters, xs, dy, cfg)
            torch.cuda.empty_cache()
        for k in ("fwd", "fwd_bwd", "infer"):
            rec[f"ours_over_lora_{k}"] = rec["ours"][k]["ms"] / rec["peft_lora"][k]["ms"]
            rec[f"speedup_vs_peft_dora_{k}"] = rec["peft_dora"][k]["ms"] / rec["ours"][k]["ms"]
        for k in ("fwd", "fwd_bwd"):
            rec[f"ours_mem_over_lora_{k}"] = rec["ours"][k]["peak_mib"] / rec["peft_lora"][k]["peak_mib"]
        rows.append(rec)
    return rows


def bench_layer(cfg: BenchConfig, tick) -> list:
    rows = []
    for d, r, T in LAYER_SHAPES_QUICK if cfg.quick else LAYER_SHAPES:
        for rec in layer_rows(d, r, T, cfg):
            rows.append(rec)
            tick(
                f"layer d={d} r={r} T={T} {rec['adapters']}: ours/LoRA fwd {rec['ours_over_lora_fwd']:.2f} "
                f"fwd+bwd {rec['ours_over_lora_fwd_bwd']:.2f}; ×{rec['speedup_vs_peft_dora_fwd_bwd']:.2f} vs PEFT DoRA"
            )
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- targets
def targets(rep: dict) -> list:
    """The kernels issue's speed and memory targets, each with the value this run measured (None: not run)."""
    out = []

    def add(name, limit, value, ok):
        out.append({"target": name, "limit": limit, "measured": value, "met": None if value is None else bool(ok)})

    comp = {(r["T"], r["d_out"]): r for r in rep.get("compose") or []}
    big = [r for (T, N), r in comp.items() if T * N >= 8192 * 8192]
    v = min((r["fused_fwd_bw_frac"] for r in big), default=None)
    add(
        "compose forward, fraction of copy bandwidth (≥ 8192×8192, worst shape)",
        "≥ 0.90",
        v,
        v is not None and v >= 0.9,
    )
    r88 = comp.get((8192, 8192))
    v = r88["bwd_speedup_vs_eager"] if r88 else None
    add("compose backward incl. d_g, speed-up over eager autograd (8192×8192)", "≥ 2.5", v, v is not None and v >= 2.5)
    nm = next(
        (r for r in rep.get("norm") or [] if (r["d"], r["r"]) == TARGET_NORM and r["W_dtype"] == "bfloat16"), None
    )
    add(
        "factored norm, speed-up over PEFT (8192², r = 384, bf16)",
        "> 1",
        nm and nm["speedup_vs_peft"],
        nm and nm["speedup_vs_peft"] > 1,
    )
    add(
        "factored norm, transient memory / PEFT's (8192², r = 384, bf16)",
        "≤ 0.125",
        nm and nm["memory_vs_peft"],
        nm and nm["memory_vs_peft"] <= 0.125,
    )
    for adapters in ("fp32", "bf16"):
        ly = next(
            (
                r
                for r in rep.get("layer") or []
                if (r["d"], r["r"], r["tokens"]) == TARGET_LAYER and r["adapters"] == adapters
            ),
            None,
        )
        for key, limit in (("fwd", 1.10), ("fwd_bwd", 1.15)):
            v = ly and ly[f"ours_over_lora_{key}"]
            add(
                f"layer {key.replace('_', '+')} time / PEFT LoRA's ({adapters} adapters, 8192², r = 384, 4096 tokens)",
                f"≤ {limit}",
                v,
                v is not None and v <= limit,
            )
        for key in ("fwd", "fwd_bwd"):
            v = ly and ly[f"ours_mem_over_lora_{key}"]
            add(
                f"layer {key.replace('_', '+')} transient memory / PEFT LoRA's ({adapters} adapters)",
                "≤ 1.10",
                v,
                v is not None and v <= 1.10,
            )
    model_targets(rep, add)
    return out


# ----------------------------------------------------------------------------- run
def check_available(cfg: BenchConfig) -> None:
    if not torch.cuda.is_available():
        raise BenchUnavailable("bench needs a CUDA device: it measures GPU kernels and reports no numbers without one")
    import importlib.util

    for part, needs in (("layer", ("peft",)), ("model", ("peft", "transformers"))):
        missing = [m for m in needs if part in cfg.parts and importlib.util.find_spec(m) is None]
        if missing:
            raise BenchUnavailable(
                f"the {part} part compares with PEFT: install {' and '.join(missing)}, or leave "
                f"it out (--parts {','.join(p for p in cfg.parts if p not in ('layer', 'model')) or 'compose,norm'})"
            )
    from .kernels import HAS_TRITON

    if not HAS_TRITON:
        raise BenchUnavailable("bench needs Triton (the fused kernels are what it measures)")


def run_bench(cfg: BenchConfig, progress=None) -> dict:
    """Run the chosen parts on the current CUDA device; the report dict (schema ``SCHEMA_VERSION``)."""
    from .provenance import provenance

    cfg.validate()
    check_available(cfg)
    torch.manual_seed(cfg.seed)
    sizes = {
        "compose": len(COMPOSE_SHAPES_QUICK if cfg.quick else COMPOSE_SHAPES),
        "norm": 2 * len(NORM_SHAPES_QUICK if cfg.quick else NORM_SHAPES),
        "layer": 2 * len(LAYER_SHAPES_QUICK if cfg.quick else LAYER_SHAPES),
        "model": plan_size(cfg),
    }
    tick = _Steps(1 + sum(sizes[p] for p in cfg.parts), progress)
    t0 = time.time()
    dev = torch.device("cuda", torch.cuda.current_device())
    rep = {
        "schema_version": SCHEMA_VERSION,
        "tool": "dora-verify",
        "kind": "bench",
        "provenance": provenance(dev),
        "config": dict(asdict(cfg), parts=list(cfg.parts)),
        "timings_s": {},
    }
    rep["copy_bandwidth"] = copy_bandwidth(cfg)
    tick(f"copy bandwidth {rep['copy_bandwidth']['TBps']:.2f} TB/s")
    for part in cfg.parts:
        t = time.time()
        if part == "compose":
            rep["compose"] = bench_compose(cfg, rep["copy_bandwidth"]["TBps"], tick)
            rep["crossover"] = crossover(rep["compose"])
        elif part == "norm":
            rep["norm"] = bench_norm(cfg, tick)
        elif part == "layer":
            rep["layer"] = bench_layer(cfg, tick)
        else:
            rep["model"] = bench_model(cfg, tick)
        rep["timings_s"][part] = round(time.time() - t, 1)
    rep["targets"] = targets(rep)
    rep["timings_s"]["total"] = round(time.time() - t0, 1)
    return rep


__all__ = ["BenchConfig", "BenchUnavailable", "PARTS", "crossover", "run_bench", "targets", "time_ms"]
