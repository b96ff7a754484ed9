"""DoRALinear: PEFT semantics (float64 reference of the DoRA formulas), caching, compile, checkpointing."""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dora_verify.kernels import DoRALinear


def _layer(bias=True, dropout=0.0, semantics="peft", seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(24, 20, bias=bias)
    layer = DoRALinear(lin, r=4, alpha=8, dropout=dropout, dropout_semantics=semantics)
    with torch.no_grad():  # a trained adapter: B ≠ 0 and g ≠ 1 (a fresh adapter tests nothing)
        layer.lora_B.normal_(0, 0.2)
        layer.magnitude.mul_(1 + 0.01 * torch.randn(20))
    return layer


def _reference(layer, x, x_drop=None):
    """PEFT's DoRA in float64: result = base_layer(x) + (g−1)·(x_d Wᵀ) + g·s·B A x_d, g = m/‖W + sBA‖."""
    W, b = layer.base_layer.weight.double(), layer.base_layer.bias
    A, B, m, s = layer.lora_A.double(), layer.lora_B.double(), layer.magnitude.double(), layer.scaling
    nu = torch.linalg.vector_norm(W + s * (B @ A), dim=1)
    g = m / nu
    xd = (x if x_drop is None else x_drop).double()
    out = x.double() @ W.t() + (g - 1) * (xd @ W.t()) + g * s * (xd @ A.t() @ B.t())
    return out + (b.double() if b is not None else 0)


@pytest.mark.parametrize("bias", [True, False])
def test_matches_peft_formula_fp32(bias):
    layer = _layer(bias)
    x = torch.randn(7, 24)
    y = layer(x)
    ref = _reference(layer, x)
    assert float(((y.double() - ref).abs().max() / ref.abs().max())) <= 1e-5


def test_fresh_adapter_is_identity():
    torch.manual_seed(0)
    lin = nn.Linear(24, 20)
    layer = DoRALinear(lin, r=4)
    x = torch.randn(5, 24)
    assert torch.equal(layer(x), lin(x).detach()) or float((layer(x) - lin(x)).abs().max()) <= 1e-6


def test_gradients_match_float64_autograd():
    layer = _layer()
    x = torch.randn(9, 24)
    layer(x).pow(2).sum().backward()
    ref_layer = _layer()
    params = [ref_layer.lora_A, ref_layer.lora_B, ref_layer.magnitude]
    W, b, s = ref_layer.base_layer.weight.double(), ref_layer.base_layer.bias.double(), ref_layer.scaling
    A, B, m = (p.detach().double().requires_grad_() for p in params)
    nu = torch.linalg.vector_norm(W + s * (B @ A), dim=1).detach()  # detached norm (DoRA §4.3)
    g = m / nu
    out = g * (x.double() @ W.t() + s * (x.double() @ A.t() @ B.t())) + b
    out.pow(2).sum().backward()
    for p, q in zip((layer.lora_A, layer.lora_B, layer.magnitude), (A, B, m)):
        assert float((p.grad.double() - q.grad).abs().max() / q.grad.abs().max()) <= 1e-5


def test_dropout_semantics():
    for sem in ("peft", "clean_base"):
        layer = _layer(dropout=0.5, semantics=sem)
        layer.train()
        x = torch.randn(6, 24)
        torch.manual_seed(5)
        y = layer(x)
        torch.manual_seed(5)
        x_d = nn.functional.dropout(x, 0.5, training=True)
        if sem == "peft":
            ref = _reference(layer, x, x_d)
        else:
            W, b = layer.base_layer.weight.double(), layer.base_layer.bias.double()
            A, B, s = layer.lora_A.double(), layer.lora_B.double(), layer.scaling
            g = layer.magnitude.double() / torch.linalg.vector_norm(W + s * (B @ A), dim=1)
            ref = g * (x.double() @ W.t() + s * (x_d.double() @ A.t() @ B.t())) + b
        assert float(((y.double() - ref).abs().max() / ref.abs().max())) <= 1e-5
        layer.eval()  # eval: the semantics coincide
        assert float((layer(x).double() - _reference(layer, x)).abs().max()) <= 1e-4


def test_norm_cache_follows_parameter_updates():
    layer = _layer()
    nu0 = layer.weight_norm()
    assert layer.weight_norm() is nu0
    with torch.no_grad():
        layer.lora_B.add_(0.1)
    assert layer.weight_norm() is not nu0


def test_merged_linear_matches_eval_output():
    layer = _layer().eval()
    x = torch.randn(5, 24)
    assert float((layer.merged_linear()(x) - layer(x)).abs().max()) <= 1e-5


@pytest.mark.parametrize("dtype,save", [(torch.float32, "recompute"), (torch.float16, "recompute"),
                                        (torch.float16, "inputs"), (torch.float16, "activation")])
def test_compile_and_checkpoint(dtype, save):  # fp16 + 'recompute': the fused up-projection route
    layer = _layer().to(dtype)
    layer.save = save
    x = torch.randn(5, 24).to(dtype)
    y = layer(x)
    cl = torch.compile(layer, backend="aot_eager", fullgraph=True)
    assert float((cl(x) - y).abs().max()) == 0.0
    grads = []
    for use_ckpt in (False, True):
        layer.zero_grad()
        out = checkpoint(layer, x, use_reentrant=False) if use_ckpt else layer(x)
        out.sum().backward()
        grads.append([p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.magnitude)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.parametrize("save", ["recompute", "inputs"])
def test_half_adapters_match_float64_formulas(save):
    """fp16 weights and adapters (lora never materialised): y and the gradients of A, B, m against the
    float64 DoRA formulas of the rounded parameters, within fp16 GEMM accuracy (a few u_fp16 relative to
    the magnitudes; the layer's intermediates base, xa, lora are fp16 roundings)."""
    layer = _layer().to(torch.float16)
    layer.magnitude.data = layer.magnitude.data.float()
    layer.save = save
    x = torch.randn(9, 24).to(torch.float16)
    y = layer(x)
    ref = _reference(layer, x)
    assert float((y.double() - ref).abs().max() / ref.abs().max()) <= 8 * 2.0**-11
    dy = torch.randn(y.shape).to(torch.float16)
    y.backward(dy)
    W, b, s = layer.base_layer.weight.double(), layer.base_layer.bias.double(), layer.scaling
    A, B, m = (p.detach().double().requires_grad_() for p in (layer.lora_A, layer.lora_B, layer.magnitude))
    nu = torch.linalg.vector_norm(W + s * (B @ A), dim=1).detach()
    out = (m / nu) * (x.double() @ W.t() + s * (x.double() @ A.t() @ B.t())) + b
    out.backward(dy.double())
    for p, q in zip((layer.lora_A, layer.lora_B, layer.magnitude), (A, B, m)):
        assert float((p.grad.double() - q.grad).abs().max() / q.grad.abs().max()) <= 16 * 2.0**-11


def test_bad_construction_and_input():
    with pytest.raises(TypeError):
        DoRALinear(nn.Conv1d(2, 2, 1), r=2)
    with pytest.raises(ValueError):
        DoRALinear(nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError):
        DoRALinear(nn.Linear(4, 4), r=2, dropout=1.5)
    with pytest.raises(ValueError, match="save"):
        DoRALinear(nn.Linear(4, 4), r=2, save="everything")
    with pytest.raises(ValueError, match="features"):
        DoRALinear(nn.Linear(4, 4), r=2)(torch.randn(3, 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("adapter_dtype", [None, torch.float32])
def test_training_with_norm_graph_replay_is_bitwise_the_eager_layer(monkeypatch, adapter_dtype):
    """SGD steps with ν recomputed by graph replay give the bits of the same layer with the norm run eagerly:
    outputs and gradients of A, B, m at every step (the replay reads the updated A, B in place)."""
    import copy

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 192, bias=True, device="cuda", dtype=torch.bfloat16)
    a = DoRALinear(lin, 16, 32, adapter_dtype=adapter_dtype)
    with torch.no_grad():
        a.lora_B.normal_(0, 0.05)
    b = copy.deepcopy(a)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in (a, b)]
    for step in range(4):
        outs = []
        for m, opt, graphs in ((a, opts[0], "1"), (b, opts[1], "0")):
            monkeypatch.setenv("DORA_VERIFY_NORM_GRAPHS", graphs)
            y = m(x)
            (y.float() ** 2).sum().backward()
            outs.append([y.detach().clone()] + [p.grad.clone() for p in (m.lora_A, m.lora_B, m.magnitude)])
            opt.step()
            opt.zero_grad()
        assert all(torch.equal(u, v) for u, v in zip(*outs)), step
    assert a.norm_cache.replays >= 2 and b.norm_cache.replays == 0 and a.norm_cache.graph_error is None


@pytest.mark.parametrize("adapter_dtype", [None, torch.float32])
@pytest.mark.parametrize("grad", [True, False])
def test_output_of_3d_inputs_is_not_a_view(adapter_dtype, grad):
    """[batch, seq, d] in, [batch, seq, d_out] out — a tensor of its own, not a view: FSDP2 warns when a wrapped
    module returns a view (an in-place op on it would skip the pre-backward hook)."""
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(24, 20, dtype=torch.bfloat16), 4, 8, adapter_dtype=adapter_dtype)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(3, 5, 24, dtype=torch.bfloat16)
    with torch.set_grad_enabled(grad):
        y = layer(x)
    flat = layer(x.reshape(15, 24))
    assert y.shape == (3, 5, 20) and y._base is None and torch.equal(y.reshape(15, 20), flat)
