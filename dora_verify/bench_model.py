"""``dora-verify bench --parts model``: DoRA where users train it — a whole model's training step, and one layer
inside a model — against PEFT LoRA and stock PEFT DoRA, side by side and interleaved in one process.

* **Model step.** A Llama-shaped decoder built from a config (random bf16 weights, no download): Llama-3-8B
  widths (hidden 4096, MLP 14336, 32 heads, 8 KV heads), a 32000-token vocabulary, 4 layers (2 with ``--quick``),
  adapters on all seven projections (q, k, v, o, gate, up, down), lora_alpha = 2r, B perturbed off zero, 4 × 1024
  tokens, ``labels = input_ids``, one fused-AdamW step (the Hugging Face Trainer's default optimiser) over the
  adapters. Implementations: PEFT LoRA, stock PEFT DoRA, and this project (the same PEFT DoRA model with
  :mod:`dora_verify.kernels.peft` enabled). Settings: eager; Hugging Face gradient checkpointing
  (``gradient_checkpointing_enable()`` with its defaults); ``torch.compile`` (inductor) of the whole model. Adapter
  dtypes: bf16 (``autocast_adapter_dtype=False``) and fp32 (PEFT's default). Ranks 16 and 64, and r = 384 at
  Llama-70B widths (hidden 8192, 2 layers, eager and checkpointing) for the paper's setting.
* **Layer in a model.** One bf16 ``nn.Linear`` d_in → d_out without bias, 8192 tokens whose input *requires grad*
  (as every layer after the first does in a model): forward + backward (gradients of x and the adapters) for PEFT
  LoRA, stock PEFT DoRA, the PEFT integration and :class:`~dora_verify.kernels.DoRALinear`, bf16 adapters, at
  4096², 4096 × 14336, 14336 × 4096 and 8192², ranks 16, 64 and 384; at 4096², r = 16 also under
  ``torch.utils.checkpoint`` and ``torch.compile``.

Timing contract: every implementation of a row warms up (compiling, for compile), then ``rounds`` rounds, each
running every implementation in turn: one untimed lead-in call, then ``per_round`` calls between two CUDA events
(the GPU timeline of back-to-back calls, as a training loop runs them; a host-bound implementation shows its gaps);
medians over the rounds.
Memory of a model step: the allocator's peak during one step minus what was allocated before it (gradients freed
first), plus the model's own parameters, buffers and optimiser state — the peak that model alone would reach.
Compiled rows record the graphs compiled, the graph breaks, recompiles after warm-up, and whether the compiled
graphs hold the project's ops (for stock PEFT they must not). Rows of ours record what the ν runners did
(:func:`norm_runner_stats`: CUDA-graph captures, replays, checkpointing reuses, capture errors).
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WIDTHS = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8),
}
VOCAB, BATCH, SEQ = 32000, 4, 1024
MODEL_IMPLS = ("lora", "peft_dora", "ours")
LOW_MEMORY_IMPL = "ours_x"  # the integration with enable(save="x"), timed in the eager rows
SETTINGS = ("eager", "checkpointing", "compile")
# (widths, layers, r, adapters, settings)
MODEL_GRID = tuple(
    ("llama3-8b", 4, r, ad, SETTINGS if r == 16 else ("eager", "checkpointing"))
    for r in (16, 64)
    for ad in ("bf16", "fp32")
) + (("llama3-70b", 2, 384, "bf16", ("eager", "checkpointing")),)
MODEL_GRID_QUICK = (("llama3-8b", 2, 16, "bf16", SETTINGS),)
LAYER_IMPLS = ("lora", "peft_dora", "ours_peft", "dora_linear")
LAYER_TOKENS = 8192
LAYER_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192))
LAYER_RANKS = (16, 64, 384)
LAYER_SETTINGS_AT = ((4096, 4096), 16)  # the shape and rank also timed under checkpointing and compile
TARGET_RANK = 16
DEVICE = "cuda"  # tests run the whole part on the CPU (wall-clock timing, no memory figures) as a logic check


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


class _WallEvent:
    """CPU stand-in for a CUDA timing event."""

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


COMPILE_INNER = None  # the backend GraphRecorder hands graphs to (None: inductor)


def _empty_cache():
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _event():
    return torch.cuda.Event(enable_timing=True) if DEVICE == "cuda" else _WallEvent()


# ----------------------------------------------------------------------------- timing
def interleaved_ms(calls: dict, warmup: int, rounds: int, per_round: int) -> dict:
    """{name: {ms, p10, p90, n}} per call of ``calls[name]()``, interleaved (module docstring): each round runs every
    implementation in turn — one untimed lead-in call (so the host is as far ahead of the GPU as in a training loop,
    which never waits for the device), then ``per_round`` calls between two CUDA events; a sample is the events'
    interval / ``per_round``. Medians over ``rounds`` samples."""
    for name, call in calls.items():
        for _ in range(warmup):
            call()
    _sync()
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start, end = _event(), _event()
            call()
            start.record()
            for _ in range(per_round):
                call()
            end.record()
            _sync()
            times[name].append(start.elapsed_time(end) / per_round)
    out = {}
    for name, t in times.items():
        t = sorted(t)
        q = lambda p: t[min(len(t) - 1, int(round(p * (len(t) - 1))))]  # noqa: E731
        out[name] = {"ms": statistics.median(t), "p10": q(0.1), "p90": q(0.9), "n": len(t)}
    return out


def use_integration(on: bool, save: str = "recompute") -> None:
    """The PEFT integration on (this project, with ``enable(save=save)``) or off (stock PEFT) from here on, switched
    only if it is not already: each timed call sets what it needs, so the switch (a class attribute write) falls in a
    round's untimed lead-in call, as a user enables the integration once. :func:`bench_model` restores the state it
    found."""
    import dora_verify.kernels.peft as dv_peft

    if dv_peft.is_enabled() != on or (on and dv_peft.save_mode() != save):
        dv_peft.enable(save=save) if on else dv_peft.disable()


class GraphRecorder:
    """A ``torch.compile`` backend: inductor, counting the graphs it is handed and the project's ops in them."""

    def __init__(self, inner=None):
        self.graphs = 0
        self.dora_ops = 0
        self.inner = inner  # None: inductor; tests pass an AOT backend that needs no C compiler

    def __call__(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        self.graphs += 1
        self.dora_ops += sum(
            "dora_verify" in str(n.target)
            for m in gm.modules()
            if isinstance(m, torch.fx.GraphModule)
            for n in m.graph.nodes
        )
        return (self.inner or compile_fx)(gm, example_inputs)


def graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


# ----------------------------------------------------------------------------- model step
def llama_base(widths: str, layers: int, seed: int):
    import transformers

    cfg = transformers.LlamaConfig(
        **WIDTHS[widths], num_hidden_layers=layers, vocab_size=VOCAB, max_position_embeddings=SEQ, use_cache=False
    )
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            return transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)


def peft_model(base, impl: str, r: int, adapters: str, seed: int):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, use_dora=impl != "lora")
    model = get_peft_model(copy.deepcopy(base), cfg, autocast_adapter_dtype=adapters == "fp32")
    gen = torch.Generator(device=DEVICE).manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, device=DEVICE, generator=gen).to(p.dtype) * 1e-3)
    return model.train()


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class ModelUnderTest:
    """One implementation's model, optimiser and step in one setting."""

    def __init__(self, base, impl, r, adapters, setting, ids, seed):
        self.impl, self.setting = impl, setting
        self.model = peft_model(base, impl, r, adapters, seed)
        if setting == "checkpointing":
            self.model.gradient_checkpointing_enable()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
        self.recorder = GraphRecorder(COMPILE_INNER) if setting == "compile" else None
        self.fn = torch.compile(self.model, backend=self.recorder) if self.recorder else self.model
        self.ids = ids

    def step(self):
        use_integration(self.impl in ("ours", LOW_MEMORY_IMPL), "x" if self.impl == LOW_MEMORY_IMPL else "recompute")
        self.opt.zero_grad(set_to_none=True)
        loss = self.fn(input_ids=self.ids, labels=self.ids).loss
        loss.backward()
        self.opt.step()

    def resident_bytes(self) -> int:
        state = [t for s in self.opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return _bytes(self.model.parameters()) + _bytes(self.model.buffers()) + _bytes(state)

    def peak_mib(self) -> dict:
        if DEVICE != "cuda":
            return {"transient_mib": 0.0, "peak_mib": self.resident_bytes() / 2**20}
        self.opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        self.step()
        torch.cuda.synchronize()
        transient = torch.cuda.max_memory_allocated() - before
        return {"transient_mib": transient / 2**20, "peak_mib": (self.resident_bytes() + transient) / 2**20}


def norm_runner_stats(model) -> dict:
    """What the integration's ν runners did in this model (kernels/norm.py ``RowNormRunner``): how many there are and
    their computes, CUDA-graph captures and replays, checkpointing reuses, and the distinct capture errors — a graph
    that failed to capture leaves the norm eager (host-bound) on every call. Eager layers keep their runner on PEFT's
    magnitude layer; compiled graphs take the op's runners, matched by the storage of each layer's A."""
    from .kernels import norm

    runners, a_ptrs = [], set()
    for mod in model.modules():
        for name, dora in getattr(mod, "lora_magnitude_vector", {}).items():
            if dora.__dict__.get("_dora_verify_norm") is not None:
                runners.append(dora.__dict__["_dora_verify_norm"])
            a_ptrs.add(mod.lora_A[name].weight.data_ptr())
    runners += [run for key, run in norm._OP_RUNNERS.items() if key[1][0] in a_ptrs]
    out = {k: sum(getattr(run, k) for run in runners) for k in ("computes", "captures", "replays", "recompute_reuses")}
    return dict(out, runners=len(runners), graph_errors=sorted({run.graph_error for run in runners if run.graph_error}))


def model_rows(widths, layers, r, adapters, settings, cfg, tick) -> list:
    base = llama_base(widths, layers, cfg.seed)
    gen = torch.Generator(device=DEVICE).manual_seed(cfg.seed + 2)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), device=DEVICE, generator=gen)
    rows = []
    for setting in settings:
        torch._dynamo.reset()
        impls = MODEL_IMPLS + ((LOW_MEMORY_IMPL,) if setting == "eager" else ())
        units = {impl: ModelUnderTest(base, impl, r, adapters, setting, ids, cfg.seed) for impl in impls}
        rec = {
            "widths": widths,
            "layers": layers,
            "r": r,
            "adapters": adapters,
            "setting": setting,
            "tokens": BATCH * SEQ,
            "vocab": VOCAB,
        }
        if setting == "compile":
            from torch._dynamo.utils import counters

            for impl, u in units.items():  # compile each in turn: its graphs, breaks and compile time
                counters.clear()
                t = time.time()
                u.step()
                _sync()
                rec[f"{impl}_compile"] = {
                    "first_step_s": round(time.time() - t, 1),
                    "graphs": u.recorder.graphs,
                    "graph_breaks": graph_breaks(),
                    "dora_ops": u.recorder.dora_ops,
                }
        with torch._dynamo.config.patch(cache_size_limit=64):
            warm_graphs = {impl: u.recorder.graphs for impl, u in units.items() if u.recorder}
            times = interleaved_ms(
                {impl: u.step for impl, u in units.items()}, cfg.model_warmup, cfg.model_rounds, cfg.model_per_round
            )
        for impl, u in units.items():
            rec[impl] = dict(times[impl], **u.peak_mib())
            if impl in ("ours", LOW_MEMORY_IMPL):
                rec[impl]["norm_runners"] = norm_runner_stats(u.model)
            if u.recorder:
                rec[f"{impl}_compile"]["recompiles_after_first_step"] = u.recorder.graphs - warm_graphs[impl]
        for impl in impls[1:]:
            rec[f"{impl}_over_lora"] = rec[impl]["ms"] / rec["lora"]["ms"]
            rec[f"{impl}_mem_over_lora"] = rec[impl]["peak_mib"] / rec["lora"]["peak_mib"]
        rec["speedup_vs_peft_dora"] = rec["peft_dora"]["ms"] / rec["ours"]["ms"]
        rows.append(rec)
        low = (
            f", save='x' {rec[LOW_MEMORY_IMPL + '_over_lora']:.3f} "
            f"(memory {rec[LOW_MEMORY_IMPL + '_mem_over_lora']:.3f})"
            if LOW_MEMORY_IMPL in units
            else ""
        )
        nr = rec["ours"]["norm_runners"]
        tick(
            f"model {widths}×{layers} r={r} {adapters} {setting}: ours/LoRA {rec['ours_over_lora']:.3f}, "
            f"stock/LoRA {rec['peft_dora_over_lora']:.3f}, memory ours/LoRA {rec['ours_mem_over_lora']:.3f}{low}; "
            f"ν: {nr['computes']} computes, {nr['replays']} replays, {nr['recompute_reuses']} reuses"
            + (f", graph errors {nr['graph_errors']}" if nr["graph_errors"] else "")
        )
        del units
        _empty_cache()
    del base
    _empty_cache()
    return rows


# ----------------------------------------------------------------------------- layer inside a model
def layer_under_test(impl: str, d_in: int, d_out: int, r: int, seed: int):
    """(module, trainable parameters) of one bf16 layer with bf16 adapters, B perturbed off zero."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(d_in, d_out, bias=False, device=DEVICE, dtype=torch.bfloat16)
    if impl == "dora_linear":
        from .kernels import DoRALinear

        layer = DoRALinear(lin, r, 2 * r)
        with torch.no_grad():
            layer.lora_B.normal_(0, 1e-3)
        return layer, [layer.lora_A, layer.lora_B, layer.magnitude]
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"], use_dora=impl != "lora")
    model = get_peft_model(torch.nn.Sequential(lin), cfg, autocast_adapter_dtype=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)
    return model, [p for p in model.parameters() if p.requires_grad]


def layer_in_model_row(d_in, d_out, r, setting, cfg) -> dict:
    gen = torch.Generator(device=DEVICE).manual_seed(cfg.seed + 3)
    x = torch.randn(LAYER_TOKENS, d_in, device=DEVICE, dtype=torch.bfloat16, generator=gen).requires_grad_()
    dy = torch.randn(LAYER_TOKENS, d_out, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    calls, recorders = {}, {}
    torch._dynamo.reset()
    for impl in LAYER_IMPLS:
        layer, params = layer_under_test(impl, d_in, d_out, r, cfg.seed)
        if setting == "compile":
            recorders[impl] = GraphRecorder(COMPILE_INNER)
        fn = torch.compile(layer, backend=recorders[impl]) if setting == "compile" else layer
        run = (
            lambda f: (
                (lambda x: torch.utils.checkpoint.checkpoint(f, x, use_reentrant=False))
                if setting == "checkpointing"
                else f
            )
        )(fn)

        def call(run=run, params=params, impl=impl):
            use_integration(impl == "ours_peft")
            return torch.autograd.grad(run(x), [x] + params, dy)

        calls[impl] = call
    with torch._dynamo.config.patch(cache_size_limit=64):
        times = interleaved_ms(calls, cfg.warmup, cfg.layer_rounds, cfg.layer_per_round)
    rec = {"d_in": d_in, "d_out": d_out, "r": r, "tokens": LAYER_TOKENS, "setting": setting, "adapters": "bf16"}
    for impl in LAYER_IMPLS:
        rec[impl] = times[impl]
        if impl in recorders:
            rec[impl].update(graphs=recorders[impl].graphs, dora_ops=recorders[impl].dora_ops)
        if impl != "lora":
            rec[f"{impl}_over_lora"] = times[impl]["ms"] / times["lora"]["ms"]
    return rec


def layer_in_model_rows(cfg, tick) -> list:
    rows = []
    shapes = LAYER_SHAPES[:1] if cfg.quick else LAYER_SHAPES
    ranks = (16, 384) if cfg.quick else LAYER_RANKS
    plan = [(d_in, d_out, r, "eager") for d_in, d_out in shapes for r in ranks]
    (shape, rank) = LAYER_SETTINGS_AT
    plan += [(shape[0], shape[1], rank, s) for s in ("checkpointing", "compile")]
    for d_in, d_out, r, setting in plan:
        rec = layer_in_model_row(d_in, d_out, r, setting, cfg)
        rows.append(rec)
        tick(
            f"layer in model {d_in}→{d_out} r={r} {setting}: integration/LoRA {rec['ours_peft_over_lora']:.3f}, "
            f"DoRALinear/LoRA {rec['dora_linear_over_lora']:.3f}, stock/LoRA {rec['peft_dora_over_lora']:.3f}"
        )
        _empty_cache()
    return rows


def plan_size(cfg) -> int:
    grid = MODEL_GRID_QUICK if cfg.quick else MODEL_GRID
    n_layer = (len(LAYER_SHAPES[:1]) * 2 if cfg.quick else len(LAYER_SHAPES) * len(LAYER_RANKS)) + 2
    return sum(len(g[4]) for g in grid) + n_layer


def bench_model(cfg, tick) -> dict:
    """The model part's rows: {'steps': [...], 'layers_in_model': [...]}."""
    import dora_verify.kernels.peft as dv_peft

    was, rows = dv_peft.is_enabled(), []
    try:
        for widths, layers, r, adapters, settings in MODEL_GRID_QUICK if cfg.quick else MODEL_GRID:
            rows += model_rows(widths, layers, r, adapters, settings, cfg, tick)
        return {"steps": rows, "layers_in_model": layer_in_model_rows(cfg, tick)}
    finally:
        use_integration(was)


def model_targets(rep: dict, add) -> None:
    """The "fast where users train" targets, from the model part's rows (``add(name, limit, value, ok)``)."""
    part = rep.get("model") or {}
    steps = part.get("steps") or []
    for setting in SETTINGS:
        for adapters in ("bf16", "fp32"):
            row = next(
                (
                    s
                    for s in steps
                    if s["setting"] == setting
                    and s["adapters"] == adapters
                    and s["r"] == TARGET_RANK
                    and s["widths"] == "llama3-8b"
                ),
                None,
            )
            v = row and row["ours_over_lora"]
            add(
                f"model step / LoRA's, {setting}, {adapters} adapters (Llama-3-8B widths, r = 16)",
                "≤ 1.10",
                v,
                v is not None and v <= 1.10,
            )
    v = min((s["speedup_vs_peft_dora"] for s in steps), default=None)
    add("model step, speed-up over stock PEFT DoRA (every row, worst)", "> 1", v, v is not None and v > 1)
    eager = [s for s in steps if s["setting"] == "eager"]
    v = max((s["ours_mem_over_lora"] for s in eager), default=None)
    add("model peak memory / LoRA's, eager (worst row)", "≤ 1.20", v, v is not None and v <= 1.20)
    v = max((s["ours"]["peak_mib"] / s["peft_dora"]["peak_mib"] for s in steps), default=None)
    add("model peak memory / stock PEFT DoRA's (every row, worst)", "≤ 1", v, v is not None and v <= 1)
    # save='x' acts on the fused path only (bf16/fp16 adapters): on fp32-adapter rows it changes nothing
    low = [s for s in eager if f"{LOW_MEMORY_IMPL}_mem_over_lora" in s and s["adapters"] != "fp32"]
    v = max((s[f"{LOW_MEMORY_IMPL}_mem_over_lora"] for s in low), default=None)
    add(
        "model peak memory / LoRA's, eager, enable(save='x') (worst bf16-adapter row: the mode's scope)",
        "≤ 1.02",
        v,
        v is not None and v <= 1.02,
    )
    v = max((s[f"{LOW_MEMORY_IMPL}_over_lora"] for s in low), default=None)
    add(
        "model step / LoRA's, eager, enable(save='x') (its time cost; worst bf16-adapter row)",
        "≤ 1.15",
        v,
        v is not None and v <= 1.15,
    )
    ck = [s for s in steps if s["setting"] == "checkpointing"]
    v = max((s["ours_mem_over_lora"] for s in ck), default=None)
    add("model peak memory / LoRA's, gradient checkpointing (worst row)", "≤ 1.01", v, v is not None and v <= 1.01)
    comp = {(s["r"], s["adapters"]): s for s in steps if s["setting"] == "compile"}
    worst = None
    for s in eager:
        c = comp.get((s["r"], s["adapters"]))
        if c is not None and s["widths"] == "llama3-8b":
            ratio = c["ours"]["ms"] / s["ours"]["ms"]
            worst = ratio if worst is None else max(worst, ratio)
    add("model step, compiled / eager (ours; worst row)", "≤ 1", worst, worst is not None and worst <= 1)
    v = max(
        (
            c.get("ours_compile", {}).get("graph_breaks", 0)
            + c.get("ours_compile", {}).get("recompiles_after_first_step", 0)
            - c.get("lora_compile", {}).get("graph_breaks", 0)
            for c in comp.values()
        ),
        default=None,
    )
    add("compiled model: graph breaks + recompiles beyond LoRA's", "0", v, v is not None and v <= 0)
    (d_in, d_out), r = LAYER_SETTINGS_AT
    lay = next(
        (
            x
            for x in part.get("layers_in_model") or []
            if (x["d_in"], x["d_out"], x["r"], x["setting"]) == (d_in, d_out, r, "eager")
        ),
        None,
    )
    v = lay and lay["ours_peft_over_lora"]
    add(
        "layer in a model / LoRA's, PEFT integration (4096², r = 16, 8192 tokens, fwd+bwd)",
        "≤ 1.15",
        v,
        v is not None and v <= 1.15,
    )


__all__ = ["bench_model", "interleaved_ms", "model_targets", "plan_size"]
