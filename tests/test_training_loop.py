"""Training loops as users run them: stock PEFT DoRA against the integration (kernels/peft.py), both against float64.

Setup. A random tiny Llama (``LlamaConfig(hidden_size=64, intermediate_size=128, 2 layers, 4 heads, 2 KV heads,
vocab 128)``, seed 0, no download) wrapped by ``get_peft_model(LoraConfig(r=8, lora_alpha=16, use_dora=True,
lora_dropout=0, target_modules=<all seven projections>))``; lora_B drawn from N(0, 0.02²) (seed 1), so B ≠ 0 and
g = m/ν ≠ 1 (a fresh adapter, g = 1 and BA = 0, tests nothing); K = 5 steps on random token batches [2, 16]
(seed 2), causal-LM cross-entropy on the shifted logits (computed here in the model's precision; transformers'
own loss upcasts logits to fp32, which would round the float64 reference). Every run starts from a deepcopy of
the same initial model. Configurations: SGD (momentum 0.9), AdamW for-loop, foreach and fused (fused writes
parameters in place without bumping ``_version``), a hand-written SGD on ``p.data``; fp32 model and adapters,
``torch.autocast('cpu', bfloat16)`` around the forward, bf16 base weights with fp32 adapters (PEFT's default
``autocast_adapter_dtype=True``); Hugging Face gradient checkpointing (``use_reentrant`` False and True); one
``torch.compile`` configuration. Plus a ``DoRALinear`` loop (kernels/layer.py).

Reference. Stock PEFT on a float64 copy of the same initial parameters, same batches, same optimiser maths
(the AdamW variants share one float64 for-loop reference). Metrics of a run, against it:

* D_L = max_k |L_k − L⁶⁴_k| / L⁶⁴_k over the K steps (the loss curve);
* D_θ = ‖θ_K − θ⁶⁴_K‖ / ‖θ⁶⁴_K − θ_0‖ over all trainable parameters (A, B, m; 17 408 numbers): the relative
  error of what training changed;
* D_z = ‖z − z⁶⁴‖_F / ‖z⁶⁴‖_F: the logits of a held-out batch at the run's OWN final parameters θ_K, forward
  (eval, no grad) by the implementation under the run's precision, against stock PEFT on a float64 copy of
  those same θ_K. This fixes the parameters, so it isolates the forward from trajectory divergence: it is the
  check that the ν the implementation uses belongs to the CURRENT parameters (a stale ν shows up here
  directly). Stock's D_z is taken on the same θ_K.

Tolerances: D(integration) ≤ F · D(stock PEFT, same configuration) + floor. Why stock is the yardstick: both
compute the same maths; every op outside the DoRA layers is literally the same call, and inside them the
integration is at least as accurate per op (one rounding of the compose where PEFT rounds four times; ν from
float64 sums where PEFT takes an fp32 dense norm; g fp32 in both with fp32 adapters; under autocast PEFT rounds
BA to bf16 before its norm, the integration does not — bounds in tests/test_kernels_peft.py). To first order a
run's deviation is δ = Σ_k J_k ε_k (per-op rounding errors ε propagated by the same Jacobians), so after K
steps the integration's deviation must be of the order of stock's: E‖δ_int‖² ≲ E‖δ_stock‖².

* Vectors (D_θ, D_z; N = 17 408 and 4 096 components): a norm of many small contributions concentrates, the
  ratio of two realisations is 1 ± O(1/√N_eff). F = 2 allows per-op errors up to twice stock's as well as
  that fluctuation where N_eff is large (D_z: measured ratios 0.6 – 1.1). D_θ's N_eff is measured, not assumed:
  the participation ratio (Σδ²)²/Σδ⁴ of stock's deviation vector — ~1 600 under SGD, 140–190 under bf16 AdamW, but
  ~2 under fp32 AdamW, where m̂/(√v̂ + ε) amplifies rounding on the few coordinates whose gradients nearly cancel
  over the steps (two coordinates carry 86% of the norm; the ratio integration / stock read 0.59 on torch 2.13's
  CPU build and 2.72 on torch 2.11's, reports/h200/tests/README.md). Two norms of N_eff Gaussian degrees of freedom
  each have a ratio whose square is F(N_eff, N_eff)-distributed, so D_θ's tolerance is F · q · D(stock) + floor with
  q = √(the F(N_eff, N_eff) distribution's 1 − P quantile), P = 2.6e-4 as for D_L: q ≈ 1.1 under SGD, 1.3 under
  bf16 AdamW, ~48 under fp32 AdamW — there D_θ cannot tell a 2× error from chance, and D_L, D_z carry the check.
* Scalars (D_L): the max of 5 single draws does not concentrate. Modelling each step's deviation as an
  independent N(0, σ²) draw for both sides, P(max₅|Z'| / max₅|Z| > F) is 9 % for F = 2, 0.6 % for F = 4 and
  2.6e-4 for F = 8: F_L = 8.
* Floors (they matter only where stock happens to be almost exact, e.g. a loss computed identically):
  loss 6·u₃₂ — the scalar loss is the mean of N = 30 fp32 token losses; its reduction alone carries up to
  ⌈log₂ N⌉ + 1 = 6 roundings (pairwise/cascade sum, then the division) even from exact activations;
  parameters K·u₃₂·‖θ⁶⁴_K‖/‖θ⁶⁴_K − θ_0‖ — every step stores θ in fp32 (≤ u/2 per component per step);
  logits u_out/2 with u_out the unit roundoff of the logits' dtype (2⁻²⁴ fp32, 2⁻⁸ under bf16 autocast) —
  the rounding of a correctly rounded forward's output.
* Bitwise checks (checkpointing on vs off) need no tolerance: the recomputation runs the same ops on the
  same data, so loss curves and every gradient must be identical (stock PEFT is; asserted first).
* ``DoRALinear``: after 5 steps ``weight_norm()`` must equal ‖W + s·BA‖_row of the CURRENT parameters
  (float64) to 1e-6 relative — the project's ν contract (docs/contract.md); factored_row_norm's own error
  is ½κρ + 2⁻²⁴ ≈ 1e-7 (kernels/norm.py), so 1e-6 leaves ~8×.

The criteria can fail: ``test_criteria_reject_a_stale_nu`` plants a stale ν in STOCK PEFT (its
``get_weight_norm`` frozen at the first value, the failure mode of a cache that misses in-place updates) and
requires all three criteria to reject it. On the code at a54395f (ν cached on ``_version``), fused AdamW and
``p.data`` updates leave ν stale: fused AdamW gives D_θ = 0.13 against stock's 8.4e-6 and D_z = 0.15 against
1.7e-7, DoRALinear's ν is off by 0.14 — those tests fail, as they should.

Compile: one configuration (fp32, AdamW foreach), stock and integration each compiled the same way, so the
yardstick is stock compiled (AOTAutograd's backward does not round like eager's: not bitwise the eager run).
Backend ``aot_eager`` (Dynamo + AOTAutograd: graph capture, functionalisation, the custom ops' fake kernels
and the graph breaks at the ν cache — where an integration breaks under compile); inductor's CPU code
generation costs > 60 s per model on 2 cores and changes only the rounding order of untouched ops
(``DORA_VERIFY_COMPILE_BACKEND=inductor`` selects it; bench/training_gpu.py compiles with inductor on CUDA).
Runtime: ~50 s on 2 shared CPU cores, ~35 s of it the compile configuration (marked slow, still run by CI).
See docs/training.md.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import weakref
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import variants  # noqa: E402
from peft.tuners.lora.dora import DoraLinearLayer  # noqa: E402

from dora_verify.kernels import DoRALinear  # noqa: E402
from dora_verify.kernels import peft as dv_peft  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=64,
)
N_DORA = 7 * LLAMA["num_hidden_layers"]
STEPS, BATCH, SEQ = 5, 2, 16
SEED_MODEL, SEED_B, SEED_DATA, SEED_EVAL = 0, 1, 2, 3
B_STD = 0.02
LR = {"sgd": 0.1, "adamw": 1e-2, "data_sgd": 0.1}
COMPILE_BACKEND = os.environ.get("DORA_VERIFY_COMPILE_BACKEND", "aot_eager")

U32, UBF16 = 2.0**-24, 2.0**-8
F_VEC = 2.0  # D_θ, D_z: per-op errors up to twice stock's (module docstring)
P_VEC = 2.6e-4  # D_θ: the probability that chance alone exceeds its fluctuation factor (as F_LOSS's)
F_LOSS = 8.0  # D_L: max of 5 scalar draws, P(ratio > 8) ≈ 2.6e-4 for equal σ
C_LOSS = math.ceil(math.log2(BATCH * (SEQ - 1))) + 1  # 6: roundings of the loss's own reduction
NU_REL = 1e-6  # DoRALinear ν contract

PEFT_FORWARD = variants.DoraLinearVariant.__dict__["forward"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for this module (restored after): its tensors are tiny, and two OpenMP threads on
    cores shared with other work spin-wait — measured 4x slower for this file (200 s against 50 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _stock_after_each_test():
    yield
    dv_peft.disable()
    assert variants.DoraLinearVariant.__dict__["forward"] is PEFT_FORWARD


# ----------------------------------------------------------------------------- the model, data and loop
def build_model(base: str) -> torch.nn.Module:
    """The initial PEFT model: fp32 throughout (base='fp32') or bf16 base weights with fp32 adapters ('bf16')."""
    torch.manual_seed(SEED_MODEL)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    if base == "bf16":
        model = model.to(torch.bfloat16)
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=TARGETS, lora_dropout=0.0)
    )
    g = torch.Generator().manual_seed(SEED_B)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * B_STD)
    return model


def batches():
    g = torch.Generator().manual_seed(SEED_DATA)
    return [torch.randint(0, LLAMA["vocab_size"], (BATCH, SEQ), generator=g) for _ in range(STEPS)]


EVAL_IDS = torch.randint(0, LLAMA["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(SEED_EVAL))


def causal_lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the next token; fp32 for 16-bit/fp32 logits (as transformers), float64 for float64."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def make_optimizer(name: str, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=LR["sgd"], momentum=0.9)
    if name == "sgd_plain":  # the float64 reference of data_sgd
        return torch.optim.SGD(params, lr=LR["data_sgd"])
    if name == "data_sgd":
        return None
    kind = {"adamw_loop": dict(foreach=False), "adamw_foreach": dict(foreach=True), "adamw_fused": dict(fused=True)}
    return torch.optim.AdamW(params, lr=LR["adamw"], **kind[name])


def reference_optimizer(name: str) -> str:
    return {"sgd": "sgd", "data_sgd": "sgd_plain"}.get(name, "adamw_loop")


_STALE_NU = weakref.WeakKeyDictionary()  # the planted bug's frozen ν, per DoraLinearLayer


class _Counter:
    calls = 0


@contextlib.contextmanager
def implementation(impl: str, counter: "_Counter | None" = None):
    """'stock': PEFT as installed; 'integration': dv_peft.enabled(), every DoRA forward counted (proof it ran);
    'stale': stock PEFT with a planted bug — each layer's ν frozen at its first value (criteria self-test)."""
    if impl == "stock":
        yield
        return
    if impl == "stale":
        orig = DoraLinearLayer.get_weight_norm

        def get_weight_norm(self, weight, lora_weight, scaling, adapter_name=None):
            frozen = _STALE_NU.setdefault(self, {})  # per layer, kept across calls of this context
            if adapter_name not in frozen:
                frozen[adapter_name] = orig(self, weight, lora_weight, scaling, adapter_name=adapter_name).detach()
            return frozen[adapter_name]

        DoraLinearLayer.get_weight_norm = get_weight_norm
        try:
            yield
        finally:
            DoraLinearLayer.get_weight_norm = orig
        return
    assert impl == "integration"
    with dv_peft.enabled():
        ours = variants.DoraLinearVariant.__dict__["forward"]

        def counted(*args, **kwargs):
            if counter is not None:
                counter.calls += 1
            return ours.__func__(*args, **kwargs)

        variants.DoraLinearVariant.forward = staticmethod(counted)
        try:
            yield
        finally:
            variants.DoraLinearVariant.forward = ours


@dataclass(frozen=True)
class Cfg:
    opt: str
    base: str = "fp32"  # 'fp32' or 'bf16' base weights (adapters fp32 either way)
    autocast: bool = False  # torch.autocast('cpu', bfloat16) around the forward
    compile: bool = False
    ckpt: "bool | None" = None  # gradient checkpointing: None off, else use_reentrant

    @property
    def id(self) -> str:
        parts = [self.base + ("-autocast_bf16" if self.autocast else ""), self.opt]
        if self.compile:
            parts.append(f"compile_{COMPILE_BACKEND}")
        if self.ckpt is not None:
            parts.append("ckpt_reentrant" if self.ckpt else "ckpt")
        return "-".join(parts)


@dataclass
class Run:
    losses: torch.Tensor  # float64 [K]
    grads: list  # per step {name: grad}
    params: dict  # final {name: tensor}
    model: torch.nn.Module
    calls: int = 0
    forwards: int = 0  # forward calls of one DoRA layer (checkpointing recomputes)


def autocast_ctx(on: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def train(model, cfg: Cfg, impl: str, opt_name: "str | None" = None) -> Run:
    opt_name = opt_name or cfg.opt
    params = [p for _, p in trainable(model)]
    opt = make_optimizer(opt_name, params)
    if cfg.ckpt is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": cfg.ckpt})
        if cfg.ckpt:
            model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
        assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    probe = model.base_model.model.model.layers[0].self_attn.q_proj
    fwd_count = [0]
    hook = probe.register_forward_hook(lambda *a: fwd_count.__setitem__(0, fwd_count[0] + 1))
    model.train()
    fn = torch.compile(model, backend=COMPILE_BACKEND) if cfg.compile else model
    counter, losses, grads = _Counter(), [], []
    try:
        with implementation(impl, counter):
            for ids in batches():
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
                else:
                    for p in params:
                        p.grad = None
                with autocast_ctx(cfg.autocast):
                    logits = fn(input_ids=ids).logits
                loss = causal_lm_loss(logits, ids)
                loss.backward()
                grads.append({n: p.grad.detach().clone() for n, p in trainable(model)})
                if opt is not None:
                    opt.step()
                else:  # a hand-written loop: the update goes through .data (no autograd, no _version bump)
                    for p in params:
                        p.data.add_(p.grad.data, alpha=-LR["data_sgd"])
                losses.append(loss.detach())
    finally:
        hook.remove()
    return Run(
        torch.stack(losses).double(),
        grads,
        {n: p.detach().clone() for n, p in trainable(model)},
        model,
        counter.calls,
        fwd_count[0],
    )


def logits_at(model, impl: str, autocast: bool) -> torch.Tensor:
    model.eval()
    with torch.no_grad(), implementation(impl), autocast_ctx(autocast):
        z = model(input_ids=EVAL_IDS).logits
    model.train()
    return z


class Lab:
    """Runs cached for the module: initial models, float64 references, trained runs and their metrics."""

    def __init__(self):
        self._init, self._ref, self._runs = {}, {}, {}

    def initial(self, base):
        if base not in self._init:
            self._init[base] = build_model(base)
        return self._init[base]

    def theta0(self, base):
        return {n: p.detach().double() for n, p in trainable(self.initial(base))}

    def reference(self, base, opt_name):
        key = (base, reference_optimizer(opt_name))
        if key not in self._ref:
            model = copy.deepcopy(self.initial(base)).double()
            self._ref[key] = train(model, Cfg(key[1]), "stock")
        return self._ref[key]

    def run(self, cfg: Cfg, impl: str) -> Run:
        key = (cfg, impl)
        if key not in self._runs:
            self._runs[key] = train(copy.deepcopy(self.initial(cfg.base)), cfg, impl)
        return self._runs[key]

    # metrics ------------------------------------------------------------
    def loss_dev(self, cfg, impl):
        ref = self.reference(cfg.base, cfg.opt).losses
        return float(((self.run(cfg, impl).losses - ref).abs() / ref.abs()).max())

    def param_dev(self, cfg, impl):
        ref, got = self.reference(cfg.base, cfg.opt).params, self.run(cfg, impl).params
        num = math.sqrt(sum(float(((got[n].double() - ref[n]) ** 2).sum()) for n in ref))
        return num / self.update_norm(cfg)

    def update_norm(self, cfg):
        ref, t0 = self.reference(cfg.base, cfg.opt).params, self.theta0(cfg.base)
        return math.sqrt(sum(float(((ref[n] - t0[n]) ** 2).sum()) for n in ref))

    def param_fluctuation(self, cfg):
        """q = √(F(N_eff, N_eff) quantile at 1 − P_VEC), N_eff the participation ratio of stock's deviation."""
        from scipy.stats import f

        ref, got = self.reference(cfg.base, cfg.opt).params, self.run(cfg, "stock").params
        d = torch.cat([(got[n].double() - ref[n]).flatten() for n in ref])
        n_eff = float((d**2).sum()) ** 2 / max(float((d**4).sum()), 1e-300)
        n_eff = max(1.0, n_eff)
        return math.sqrt(f.ppf(1 - P_VEC, n_eff, n_eff)), n_eff

    def param_floor(self, cfg):
        ref = self.reference(cfg.base, cfg.opt).params
        return STEPS * U32 * math.sqrt(sum(float((ref[n] ** 2).sum()) for n in ref)) / self.update_norm(cfg)

    def output_devs(self, cfg, impl):
        """(D_z of ``impl``, D_z of stock PEFT, u_out/2), all at ``impl``'s own trained parameters."""
        key = ("z", cfg, impl)
        if key not in self._runs:
            model = self.run(cfg, impl).model
            z = logits_at(model, impl, cfg.autocast)
            z_stock = logits_at(model, "stock", cfg.autocast)
            z64 = logits_at(copy.deepcopy(model).double(), "stock", False)
            rel = lambda a: float((a.double() - z64).norm() / z64.norm())  # noqa: E731
            u_out = U32 if z.dtype == torch.float32 else UBF16
            self._runs[key] = (rel(z), rel(z_stock), u_out / 2)
        return self._runs[key]


@pytest.fixture(scope="module")
def lab():
    yield Lab()
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- the PEFT-level comparisons
CFGS = [
    Cfg("sgd"),
    Cfg("adamw_loop"),
    Cfg("adamw_foreach"),
    Cfg("adamw_fused"),
    Cfg("data_sgd"),
    Cfg("sgd", autocast=True),
    Cfg("adamw_foreach", autocast=True),
    Cfg("adamw_fused", autocast=True),
    Cfg("adamw_foreach", base="bf16"),
    Cfg("adamw_fused", base="bf16"),
]
PARAMS = [pytest.param(c, id=c.id) for c in CFGS] + [
    pytest.param(Cfg("adamw_foreach", compile=True), id=Cfg("adamw_foreach", compile=True).id, marks=pytest.mark.slow)
]


def _ran_integration(run: Run, cfg: Cfg):
    per_step = N_DORA * (2 if cfg.ckpt is not None else 1)
    assert run.calls == STEPS * per_step, f"integration forward ran {run.calls} times, want {STEPS * per_step}"


@pytest.mark.parametrize("cfg", PARAMS)
def test_loss_curve_within_derived_tolerance(lab, cfg):
    ours, stock = lab.loss_dev(cfg, "integration"), lab.loss_dev(cfg, "stock")
    _ran_integration(lab.run(cfg, "integration"), cfg)
    tol = F_LOSS * stock + C_LOSS * U32
    print(f"{cfg.id}: D_L integration {ours:.3g}, stock {stock:.3g}, tol {tol:.3g}")
    assert ours <= tol, f"{cfg.id}: loss-curve deviation from float64 {ours:.3g} > {tol:.3g} (stock {stock:.3g})"


@pytest.mark.parametrize("cfg", PARAMS)
def test_final_parameters_within_derived_tolerance(lab, cfg):
    ours, stock = lab.param_dev(cfg, "integration"), lab.param_dev(cfg, "stock")
    q, n_eff = lab.param_fluctuation(cfg)
    tol = F_VEC * q * stock + lab.param_floor(cfg)
    print(f"{cfg.id}: D_theta integration {ours:.3g}, stock {stock:.3g} (N_eff {n_eff:.1f}, q {q:.2f}), tol {tol:.3g}")
    assert ours <= tol, f"{cfg.id}: final-parameter deviation {ours:.3g} > {tol:.3g} (stock {stock:.3g})"


@pytest.mark.parametrize("cfg", PARAMS)
def test_outputs_at_trained_parameters_use_current_nu(lab, cfg):
    """After K steps, the integration's forward on its own parameters vs the float64 forward of the same
    parameters: a ν left over from earlier parameters (fused AdamW, .data updates) fails here."""
    ours, stock, floor = lab.output_devs(cfg, "integration")
    tol = F_VEC * stock + floor
    print(f"{cfg.id}: D_z integration {ours:.3g}, stock {stock:.3g}, tol {tol:.3g}")
    assert ours <= tol, f"{cfg.id}: logits at the trained parameters off by {ours:.3g} > {tol:.3g} (stock {stock:.3g})"


def test_fluctuation_factor_is_the_f_quantile():
    """q for N_eff = 2 in closed form (F(2, 2) has CDF x/(1 + x)), and q → 1 as N_eff grows (the F = 2 regime)."""
    from scipy.stats import f

    assert math.isclose(math.sqrt(f.ppf(1 - P_VEC, 2, 2)), math.sqrt((1 - P_VEC) / P_VEC), rel_tol=1e-9)
    assert 1 < math.sqrt(f.ppf(1 - P_VEC, 1e5, 1e5)) < 1.05


def test_criteria_reject_a_stale_nu(lab):
    """The three criteria above, applied to stock PEFT with a planted stale ν (frozen at step 0): all reject it."""
    cfg = Cfg("sgd")
    d_l, d_t = lab.loss_dev(cfg, "stale"), lab.param_dev(cfg, "stale")
    d_z, z_stock, floor = lab.output_devs(cfg, "stale")
    tol_l = F_LOSS * lab.loss_dev(cfg, "stock") + C_LOSS * U32
    tol_t = F_VEC * lab.param_fluctuation(cfg)[0] * lab.param_dev(cfg, "stock") + lab.param_floor(cfg)
    tol_z = F_VEC * z_stock + floor
    print(
        f"stale nu: D_L {d_l:.3g} (tol {tol_l:.3g}), D_theta {d_t:.3g} (tol {tol_t:.3g}), "
        f"D_z {d_z:.3g} (tol {tol_z:.3g})"
    )
    assert d_l > tol_l and d_t > tol_t and d_z > tol_z


def test_bf16_base_keeps_fp32_adapters(lab):
    """The 'bf16' configuration is what it claims: bf16 base weights, fp32 A, B and m (PEFT's default)."""
    model = lab.initial("bf16")
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    adapters = {n: p.dtype for n, p in trainable(model)}
    assert frozen == {torch.bfloat16} and len(adapters) == 3 * N_DORA
    assert set(adapters.values()) == {torch.float32}, adapters


CKPT = [
    Cfg("adamw_foreach", ckpt=False),
    Cfg("adamw_foreach", ckpt=True),
    Cfg("adamw_fused", ckpt=False),
    Cfg("adamw_fused", ckpt=True),
    Cfg("sgd", autocast=True, ckpt=False),
    Cfg("sgd", autocast=True, ckpt=True),
]


@pytest.mark.parametrize("cfg", [pytest.param(c, id=c.id) for c in CKPT])
def test_checkpointing_is_bitwise(lab, cfg):
    """Gradient checkpointing recomputes each decoder layer in backward: the same ops on the same data, so the
    loss curve and every gradient at every step are bitwise those without it — stock PEFT's are (asserted
    first, with proof the recomputation happened); the integration's must be too."""
    plain = Cfg(cfg.opt, cfg.base, cfg.autocast)
    for impl in ("stock", "integration"):
        a, b = lab.run(plain, impl), lab.run(cfg, impl)
        assert b.forwards == 2 * a.forwards, "checkpointing did not recompute the forward"
        if impl == "integration":
            _ran_integration(b, cfg)
        assert torch.equal(a.losses, b.losses), f"{impl}: loss curve {a.losses.tolist()} vs {b.losses.tolist()}"
        for k, (ga, gb) in enumerate(zip(a.grads, b.grads)):
            bad = [n for n in ga if not torch.equal(ga[n], gb[n])]
            assert not bad, f"{impl}, step {k}: {len(bad)} gradients differ with checkpointing, e.g. {bad[0]}"


# ----------------------------------------------------------------------------- DoRALinear
def dora_linear(dtype=torch.float32):
    torch.manual_seed(SEED_MODEL)
    layer = DoRALinear(torch.nn.Linear(512, 256).to(dtype), r=16, alpha=32)
    g = torch.Generator().manual_seed(SEED_B)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g).to(layer.lora_B.dtype) * 0.05)
    return layer


def layer_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(SEED_DATA)
    return [torch.randn(32, 512, generator=g).to(dtype) for _ in range(STEPS)]


def nu_error(layer) -> float:
    """max_i |ν̂_i − ν_i| / ν_i, ν = ‖W + s·BA‖_row of the current parameters in float64."""
    W, A, B = (t.detach().double() for t in (layer.base_layer.weight, layer.lora_A, layer.lora_B))
    exact = (W + layer.scaling * (B @ A)).norm(dim=1)
    return float(((layer.weight_norm().double() - exact).abs() / exact).max())


def layer_loop(layer, opt_name, autocast=False, ckpt=None):
    params = [p for p in layer.parameters() if p.requires_grad]
    opt = make_optimizer(opt_name, params)
    grads = []
    for x in layer_inputs(layer.base_layer.weight.dtype):
        x.requires_grad_(bool(ckpt))  # reentrant checkpointing needs an input that requires grad
        opt.zero_grad(set_to_none=True)
        with autocast_ctx(autocast):
            y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=ckpt) if ckpt is not None else layer(x)
        (y.float().square().mean()).backward()
        grads.append([p.grad.clone() for p in params])
        opt.step()
    return grads


@pytest.mark.parametrize(
    "opt_name,autocast", [("sgd", False), ("adamw_foreach", False), ("adamw_fused", False), ("adamw_fused", True)]
)
def test_dora_linear_nu_tracks_parameters(opt_name, autocast):
    layer = dora_linear()
    layer_loop(layer, opt_name, autocast)
    err = nu_error(layer)
    print(f"DoRALinear {opt_name}{' autocast' if autocast else ''}: nu rel err {err:.3g}")
    assert err <= NU_REL, f"{opt_name}: weight_norm() off the current parameters by {err:.3g} (> {NU_REL})"


def test_dora_linear_nu_after_data_edit():
    """A hand-written update through ``.data`` (no autograd, no version bump) must not leave ν stale."""
    layer = dora_linear()
    x = layer_inputs()[0]
    layer(x).square().mean().backward()
    for p in (layer.lora_A, layer.lora_B):
        p.data.add_(p.grad.data, alpha=-1.0)
    with torch.no_grad():
        layer(x)
    err = nu_error(layer)
    assert err <= NU_REL, f"weight_norm() off after a .data update by {err:.3g}"


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dora_linear_checkpoint_bitwise(dtype, use_reentrant):
    """torch.utils.checkpoint around a DoRALinear (bf16: the fused lora_compose, save='recompute'): 5 fused-AdamW
    steps, every gradient bitwise the plain loop's."""
    plain = layer_loop(dora_linear(dtype), "adamw_fused")
    ckpt = layer_loop(dora_linear(dtype), "adamw_fused", ckpt=use_reentrant)
    for k, (a, b) in enumerate(zip(plain, ckpt)):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), f"step {k}: gradients differ under checkpointing"
