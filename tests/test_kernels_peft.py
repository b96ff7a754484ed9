"""kernels/peft.py: PEFT's DoRA Linear layers routed through the kernels, against stock PEFT.

Tiny transformers models built from a config (random weights, no downloads), adapters perturbed so that
B ≠ 0 and g ≠ 1 (a fresh adapter would test nothing). fp32: logits and the gradients of A, B and m agree
with stock PEFT to 1e-5 relative (per tensor, max |ours − stock| / max |stock|). bf16: the output of a
layer stays within :func:`dora_verify.bounds.dora_layer_bound` of the exact DoRA of the rounded inputs.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import variants  # noqa: E402

from dora_verify.kernels import peft as dv_peft  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_FORWARD = variants.DoraLinearVariant.__dict__["forward"]


@pytest.fixture(autouse=True)
def _stock_after_each_test():
    yield
    dv_peft.disable()
    assert variants.DoraLinearVariant.__dict__["forward"] is PEFT_FORWARD


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed=0):
    """GPT-2: Conv1D layers with biases and fan_in_fan_out weights."""
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


def perturb(model, seed=1, scale=0.05):
    """B ≠ 0 and m ≠ ν: g ≠ 1 and the LoRA branch live; base-layer biases ≠ 0 (GPT-2 initialises them
    to 0, which would hide a bias handled wrongly)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            elif name.endswith("base_layer.bias"):
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + scale * torch.randn(p.shape, generator=g).to(p.dtype))


def dora_model(make, targets, seed=0, **cfg):
    model = get_peft_model(make(seed), LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=targets, **cfg))
    perturb(model)
    return model


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


def loss_and_grads(model, ids, train=False):
    model.train(train)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


def routed(model) -> int:
    """How many DoRA layers ran through the kernels (their ν cache exists)."""
    return sum("_dora_verify_norm" in m.__dict__ for m in model.modules() if type(m).__name__ == "DoraLinearLayer")


@pytest.mark.parametrize("make,targets", [(tiny_llama, LLAMA_TARGETS), (tiny_gpt2, ["c_attn", "c_proj", "c_fc"])])
def test_fp32_parity_logits_and_grads(make, targets):
    model = dora_model(make, targets)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    logits0, loss0, grads0 = loss_and_grads(model, ids)
    assert routed(model) == 0
    with dv_peft.enabled():
        logits1, loss1, grads1 = loss_and_grads(model, ids)
    n_dora = sum(type(m).__name__ == "DoraLinearLayer" for m in model.modules())
    assert n_dora > 0 and routed(model) == n_dora
    assert rel(logits1, logits0) <= 1e-5 and abs(float(loss1 - loss0)) <= 1e-5 * float(loss0)
    names = [n for n in grads0 if any(k in n for k in ("lora_A", "lora_B", "lora_magnitude_vector"))]
    assert len(names) == 3 * n_dora
    for n in names:
        assert rel(grads1[n], grads0[n]) <= 1e-5, n


def test_dropout_training_parity():
    """PEFT's dropout semantics: the base recomputed on the dropped-out input, same masks (same RNG draws)."""
    model = dora_model(tiny_llama, ["q_proj", "v_proj", "down_proj"], lora_dropout=0.2)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(6))
    torch.manual_seed(11)
    logits0, _, grads0 = loss_and_grads(model, ids, train=True)
    with dv_peft.enabled():
        torch.manual_seed(11)
        logits1, _, grads1 = loss_and_grads(model, ids, train=True)
    assert routed(model) > 0
    assert rel(logits1, logits0) <= 1e-5
    for n in grads0:
        assert rel(grads1[n], grads0[n]) <= 1e-5, n


def test_multiple_active_adapters_and_merge():
    model = dora_model(tiny_gpt2, ["c_attn"])
    model.add_adapter("second", LoraConfig(r=4, lora_alpha=4, use_dora=True, target_modules=["c_attn"]))
    perturb(model, seed=3)
    model.base_model.set_adapter(["default", "second"])
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        stock = model(input_ids=ids).logits
        with dv_peft.enabled():
            ours = model(input_ids=ids).logits
            model.base_model.merge_adapter()
            merged = model(input_ids=ids).logits
            model.base_model.unmerge_adapter()
            again = model(input_ids=ids).logits
    assert rel(ours, stock) <= 1e-5 and rel(merged, ours) <= 1e-5 and rel(again, ours) <= 1e-5


def test_save_with_integration_load_without(tmp_path):
    model = dora_model(tiny_llama, ["q_proj", "v_proj"])
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(8))
    with dv_peft.enabled():
        with torch.no_grad():
            ours = model(input_ids=ids).logits
        model.save_pretrained(tmp_path / "on")
    base = tiny_llama()
    loaded = PeftModel.from_pretrained(base, tmp_path / "on").eval()
    sd0, sd1 = model.state_dict(), loaded.state_dict()
    adapter_keys = [k for k in sd0 if "lora_" in k]
    assert adapter_keys and all(torch.equal(sd0[k], sd1[k]) for k in adapter_keys)
    with torch.no_grad():
        stock = loaded(input_ids=ids).logits
    assert rel(ours, stock) <= 1e-5
    # and the reverse: saved stock, loaded under the integration
    model.save_pretrained(tmp_path / "off")
    with dv_peft.enabled():
        again = PeftModel.from_pretrained(tiny_llama(), tmp_path / "off").eval()
        with torch.no_grad():
            assert rel(again(input_ids=ids).logits, stock) <= 1e-5


def test_training_loop_loss_curves_agree():
    """30 AdamW steps on synthetic data, fp32: the loss curves agree to 1e-4 relative at every step (the
    parity above is ~1e-6 per step; the optimiser amplifies differences only mildly over 30 steps)."""
    ids = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(9))
    curves = []
    for use in (False, True):
        model = dora_model(tiny_llama, ["q_proj", "v_proj", "up_proj"])
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        with dv_peft.enabled() if use else contextlib.nullcontext():
            model.train()
            for _ in range(30):
                opt.zero_grad()
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        curves.append(torch.tensor(losses, dtype=torch.float64))
    assert float(curves[0][-1]) < 0.9 * float(curves[0][0])  # it trained
    assert float(((curves[1] - curves[0]).abs() / curves[0]).max()) <= 1e-4


def test_bf16_layer_within_derived_bound():
    """bf16 base and adapters (autocast off): the integrated layer's output is within the derived bound of
    the exact DoRA output of the rounded inputs; stock PEFT's g, rounded to bf16, typically is not."""
    from dora_verify.bounds import dora_layer_bound
    from dora_verify.oracles import row_norm_truth

    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 80, bias=True).to(torch.bfloat16)
    model = get_peft_model(
        torch.nn.Sequential(lin),
        LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=["0"]),
        autocast_adapter_dtype=False,
    )
    perturb(model, scale=0.1)
    layer = model.base_model.model[0]
    x = torch.randn(32, 96).to(torch.bfloat16)
    with torch.no_grad():
        stock = model(x)
        with dv_peft.enabled():
            ours = model(x)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    s = float(torch.tensor(layer.scaling["default"], dtype=torch.float32))
    nu = row_norm_truth(W, A, B, s).nu
    g = m.double() / nu
    y = g * (x.double() @ W.double().t() + s * (x.double() @ A.double().t()) @ B.double().t()) + b.double()
    bound = dora_layer_bound(x, W, b, A, B, g, s, g_rel=2.0**-22)
    ratio_ours = float(((ours.double() - y).abs() / bound).max())
    ratio_stock = float(((stock.double() - y).abs() / bound).max())
    print(f"bf16 layer: error/bound ours {ratio_ours:.3g}, stock PEFT {ratio_stock:.3g}")
    assert ratio_ours <= 1.0, ratio_ours
    assert ratio_stock > ratio_ours  # the difference is PEFT's bf16 ν and g, and its four roundings


def test_enable_disable_idempotent_and_context_restores():
    assert not dv_peft.is_enabled()
    dv_peft.enable()
    dv_peft.enable()
    assert dv_peft.is_enabled()
    assert variants.DoraLinearVariant.__dict__["forward"] is not PEFT_FORWARD
    dv_peft.disable()
    dv_peft.disable()
    assert variants.DoraLinearVariant.__dict__["forward"] is PEFT_FORWARD
    with dv_peft.enabled():
        assert dv_peft.is_enabled()
    assert not dv_peft.is_enabled()
    dv_peft.enable()
    with dv_peft.enabled():
        pass
    assert dv_peft.is_enabled()  # the context manager restores the state it found


def test_quantized_base_falls_back_to_peft_bitwise():
    """A base weight the kernels cannot take (bitsandbytes marks its 4-bit weights with ``quant_state``)
    runs PEFT's own forward: bitwise the stock output, nothing routed."""
    model = get_peft_model(
        copy.deepcopy(torch.nn.Sequential(torch.nn.Linear(24, 16))),
        LoraConfig(r=4, use_dora=True, target_modules=["0"]),
    )
    perturb(model)
    model.base_model.model[0].base_layer.weight.quant_state = object()
    x = torch.randn(5, 24)
    with torch.no_grad():
        stock = model(x)
        with dv_peft.enabled():
            ours = model(x)
    assert torch.equal(ours, stock) and routed(model) == 0


def _fused_adamw(model):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    opt.step()


def _edit_data(model):
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.mul_(3.0)


def _merge_unmerge(model):  # PEFT writes W through .data (merge) and back (unmerge): W changes by rounding
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(40.0)  # a large delta: unmerge leaves W off by a visible rounding
    model.base_model.merge_adapter()
    model.base_model.unmerge_adapter()


def _load_adapter_state(model):
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    sd = {k: 2.0 * v for k, v in get_peft_model_state_dict(model).items()}
    set_peft_model_state_dict(model, sd)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize(
    "writer",
    [_fused_adamw, _edit_data, _merge_unmerge, _load_adapter_state],
    ids=["fused AdamW", ".data edit", "merge+unmerge", "set_peft_model_state_dict"],
)
def test_integration_reads_the_values_every_writer_left(writer, device):
    """After a forward through the integration, any writer of W, A, B: the next forward's logits equal stock
    PEFT's on the same parameters (fp32, 1e-5 as above). With ν cached on ``_version`` fused AdamW and ``.data``
    edits were missed (6.3% off stock after 6 fused steps)."""
    model = dora_model(tiny_llama, ["q_proj", "v_proj", "down_proj"]).to(device)
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(12)).to(device)
    with dv_peft.enabled():
        with torch.no_grad():
            model(input_ids=ids), model(input_ids=ids)  # on CUDA the second forward captures the norm graphs
        writer(model)
        with torch.no_grad():
            ours = model(input_ids=ids).logits
    with torch.no_grad():
        stock = model(input_ids=ids).logits
    assert rel(ours, stock) <= 1e-5


@pytest.mark.parametrize("reentrant", [True, False])
def test_hf_gradient_checkpointing_is_bitwise(reentrant):
    """Hugging Face ``gradient_checkpointing_enable`` (reentrant and not): loss and gradients bitwise those of the
    same model without checkpointing, through two AdamW steps (stock PEFT: bitwise too); the recomputed forward
    reads its forward's ν: one norm per layer and step either way."""
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(13))
    start = dora_model(tiny_llama, LLAMA_TARGETS)
    runs = []
    for ckpt in (False, True):
        model = copy.deepcopy(start)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
        out = []
        with dv_peft.enabled():
            for _ in range(2):
                _, loss, grads = loss_and_grads(model, ids, train=True)
                out.append((loss, grads))
                opt.step()
        runners = [m.__dict__["_dora_verify_norm"] for m in model.modules() if "_dora_verify_norm" in m.__dict__]
        assert len(runners) == 7 * 2 and all(r.computes == 2 for r in runners)  # 7 projections × 2 layers
        assert all(r.recompute_reuses == 2 * ckpt for r in runners)
        runs.append(out)
    for (l0, g0), (l1, g1) in zip(*runs):
        assert torch.equal(l0, l1) and g0.keys() == g1.keys()
        assert all(torch.equal(g0[k], g1[k]) for k in g0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norm_contract_under_autocast(dtype, monkeypatch):
    """Under CPU autocast the ν the integration uses is still within 1e-6 of float64 ‖W + s·BA‖ of the rounded
    parameters (stock PEFT forms it with an autocast GEMM); the forward otherwise follows autocast."""
    from dora_verify.kernels.norm import RowNormRunner

    seen = []
    get = RowNormRunner.get

    def spy(self, W, A, B, s, *a):
        nu = get(self, W, A, B, s, *a)
        ref = torch.linalg.vector_norm(W.double() + s * (B.double() @ A.double()), dim=1)
        seen.append(float(((nu.double() - ref).abs() / ref).max()))
        return nu

    monkeypatch.setattr(RowNormRunner, "get", spy)
    model = dora_model(tiny_llama, ["q_proj", "v_proj", "down_proj"])
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(14))
    with dv_peft.enabled(), torch.autocast("cpu", dtype=dtype):
        logits, loss, grads = loss_and_grads(model, ids, train=True)
    assert len(seen) == 6 and max(seen) <= 1e-6
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())


def _seen_saved_shapes(fn):
    """The shapes of every tensor autograd saves while ``fn()`` runs (the forward's memory for backward)."""
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        out = fn()
    return out, shapes


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_save_x_keeps_no_base_and_gives_the_same_bits(bias, monkeypatch):
    """enable(save='x') on fp16 layers (the fused tier — on the GPU, else under the interpreter on a CPU): the
    output and every gradient are the default mode's bits, and no [T, d_out] tensor is kept for backward (x is kept,
    as LoRA's own down-projection keeps it; base is formed again in the backward)."""
    monkeypatch.setenv("DORA_VERIFY_TIER", "fused")
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # where the fused tier runs here
    T, d_in, d_out = 37, 48, 80
    torch.manual_seed(3)
    lin = torch.nn.Linear(d_in, d_out, bias=bias).half()
    model = get_peft_model(
        torch.nn.Sequential(lin),
        LoraConfig(r=8, lora_alpha=16, use_dora=True, target_modules=["0"]),
        autocast_adapter_dtype=False,
    )
    perturb(model)
    model.to(dev)
    x0 = torch.randn(T, d_in).half().to(dev)
    dy = torch.randn(T, d_out).half().to(dev)
    params = [p for p in model.parameters() if p.requires_grad]

    def run(save):
        dv_peft.enable(save=save)
        x = x0.clone().requires_grad_()
        y, shapes = _seen_saved_shapes(lambda: model(x))
        return y, torch.autograd.grad(y, [x] + params, dy), shapes

    y1, g1, kept_default = run("recompute")
    y2, g2, kept_x = run("x")
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert (T, d_out) in kept_default and (T, d_out) not in kept_x, (kept_default, kept_x)
    with pytest.raises(ValueError, match="save must be one of"):
        dv_peft.enable(save="everything")
    dv_peft.enable(save="x")
    with dv_peft.enabled():
        assert dv_peft.save_mode() == "recompute"
    assert dv_peft.is_enabled() and dv_peft.save_mode() == "x"  # the block restores the mode it found
    dv_peft.disable()
    with dv_peft.enabled(save="x"):
        assert dv_peft.save_mode() == "x"
    assert not dv_peft.is_enabled() and dv_peft.save_mode() == "recompute"


def test_save_x_applies_only_where_base_is_the_base_layers_gemm():
    """save='x' forms base again as F.linear(x, W, b) − b, so it takes only layers whose ``result`` is exactly that:
    a plain nn.Linear base layer, one active adapter (with two, result holds the first one's output), adapters in the
    input's dtype, no fan_in_fan_out (GPT-2's Conv1D). Everywhere else base is kept."""
    from peft.tuners.lora import LoraLayer

    def decisions(model, x_dtype):
        out = []
        for mod in model.modules():
            if isinstance(mod, LoraLayer) and "default" in mod.lora_A:
                W = dv_peft._kernel_weight(mod)
                x = torch.zeros(2, W.shape[1], dtype=x_dtype)
                out.append(dv_peft._base_from(mod, x, W, mod.get_base_layer().bias, mod.lora_B["default"].weight))
        return out

    dv_peft.enable(save="x")
    llama = dora_model(tiny_llama, LLAMA_TARGETS).half()
    assert all(d is not None for d in decisions(llama, torch.float16))
    assert all(d is None for d in decisions(llama, torch.float32))  # x not in the adapters' dtype
    llama.add_adapter("second", LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=LLAMA_TARGETS))
    llama.base_model.set_adapter(["default", "second"])
    llama.half()  # both adapters fp16: only the count rules the layer out
    assert all(d is None for d in decisions(llama, torch.float16))
    assert all(d is None for d in decisions(dora_model(tiny_gpt2, ["c_attn", "c_proj", "c_fc"]).half(), torch.float16))
    dv_peft.enable()
    assert all(d is None for d in decisions(dora_model(tiny_llama, LLAMA_TARGETS).half(), torch.float16))
