"""DoRALinear: PEFT semantics (float64 reference of the DoRA formulas), ν freshness under every writer, autocast,
compile, checkpointing, validation."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dora_verify.kernels import DoRALinear

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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


def _nu64(layer) -> torch.Tensor:
    """‖W + s·BA‖_row in float64 from the layer's current parameters."""
    W, A, B = (t.detach().double() for t in (layer.base_layer.weight, layer.lora_A, layer.lora_B))
    return torch.linalg.vector_norm(W + layer.scaling * (B @ A), dim=1)


def _rel(a, b) -> float:
    return float(((a.double() - b).abs() / b.abs().clamp_min(1e-30)).max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "opt_kw", [dict(foreach=False), dict(foreach=True), dict(fused=True)], ids=["for-loop", "foreach", "fused"]
)
def test_weight_norm_is_fresh_after_adamw_steps(opt_kw, device):
    """The issue's repro: 5 AdamW steps (the fused kernel writes A and B without bumping ``_version``), then ν
    within 1e-6 of float64 ‖W + s·BA‖ of the current parameters — the norm's contract (was 9.1e-2 with
    fused=True when ν was cached on the version counter)."""
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(512, 256, device=device), r=16, alpha=32)
    nn.init.normal_(layer.lora_B, 0, 0.05)
    x = torch.randn(64, 512, device=device)
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=1e-2, **opt_kw)
    for _ in range(5):
        layer(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert _rel(layer.weight_norm(), _nu64(layer)) <= 1e-6


def _set_b(layer, value):  # load_state_dict: copy_ under no_grad
    sd = layer.state_dict()
    sd["lora_B"] = value
    layer.load_state_dict(sd)


_LAYER_WRITERS = {
    "in-place op": lambda l: torch.no_grad()(l.lora_B.mul_)(3.0),
    ".data edit of B": lambda l: l.lora_B.data.mul_(3.0),
    ".data edit of A": lambda l: l.lora_A.data.mul_(3.0),
    ".data edit of W": lambda l: l.base_layer.weight.data.mul_(3.0),
    "load_state_dict": lambda l: _set_b(l, 3.0 * l.lora_B.detach()),
    "parameter swapped": lambda l: setattr(l, "lora_B", nn.Parameter(3.0 * l.lora_B.detach())),
    ".to() round trip": lambda l: l.to(torch.bfloat16).to(torch.float32),  # values rounded, new storages
    "W swapped": lambda l: setattr(
        l.base_layer, "weight", nn.Parameter(3.0 * l.base_layer.weight.detach(), requires_grad=False)
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("writer", list(_LAYER_WRITERS))
@pytest.mark.parametrize("grad", [True, False])
def test_next_forward_reads_the_values_every_writer_left(writer, grad, device):
    """After a forward, any writer of W, A or B: the next forward equals a fresh layer's with the same parameters
    (a ``.data`` edit of B after a forward made the next output 53% off when ν was cached on ``_version``). On
    CUDA the second and later forwards replay the norm's graph: the replay must read the new values."""
    layer = _layer().to(device)
    x = torch.randn(7, 24, device=device)
    with torch.set_grad_enabled(grad):
        layer(x), layer(x)  # twice: on CUDA the second call captures the norm's graph
    _LAYER_WRITERS[writer](layer)
    with torch.set_grad_enabled(grad):
        y = layer(x)
    ref = _reference(layer, x)
    assert float((y.double() - ref).abs().max() / ref.abs().max()) <= 1e-5
    assert _rel(layer.weight_norm(), _nu64(layer)) <= 1e-6


def test_frozen_norms_reuse_for_inference():
    """Inside frozen_norms() with grad off the layer computes ν once; outside, on every call."""
    from dora_verify.kernels import frozen_norms

    layer = _layer().eval()
    x = torch.randn(3, 24)
    with torch.no_grad():
        n = layer.row_norm.computes
        layer(x), layer(x)
        assert layer.row_norm.computes == n + 2
        with frozen_norms():
            y1, y2 = layer(x), layer(x)
        assert layer.row_norm.computes == n + 3 and torch.equal(y1, y2)


def test_state_dict_round_trip_and_copies():
    """A state_dict loaded into a new layer, a deepcopy and a pickled copy give the same output bits."""
    import copy
    import io

    layer = _layer()
    x = torch.randn(5, 24)
    y = layer(x)
    other = DoRALinear(nn.Linear(24, 20), r=4, alpha=8)
    other.load_state_dict(layer.state_dict())
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    for twin in (other, copy.deepcopy(layer), torch.load(buf, weights_only=False)):
        assert torch.equal(twin(x), y)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adapter_dtype", [None, torch.float32])
def test_autocast_keeps_the_norm_and_scale_contract(dtype, adapter_dtype, device):
    """Under CPU autocast the layer's GEMMs run in the autocast dtype (as PEFT's do) but ν and g stay the fp32
    contract: the same bits as without autocast (a forward under autocast left a bf16-GEMM ν in the cache,
    later fp32 forwards reused it: 9.6e-5 off), and y is the compose of the autocast GEMMs' outputs."""
    from dora_verify.kernels import compose

    layer = _layer().to(device)
    if adapter_dtype is None:
        layer = layer.to(torch.bfloat16)
    else:
        layer.base_layer.to(torch.bfloat16)
    x = torch.randn(6, 24, dtype=torch.bfloat16, device=device)
    nu_plain = layer.weight_norm()
    with torch.autocast(device, dtype=dtype):
        y = layer(x)
        nu_auto = layer.weight_norm()
        g, _ = layer.scale(g_minus_1=False)
        base = nn.functional.linear(x, layer.base_layer.weight)
        lora = nn.functional.linear(nn.functional.linear(x, layer.lora_A), layer.lora_B)
    assert torch.equal(nu_auto, nu_plain) and _rel(nu_plain, _nu64(layer)) <= 1e-6
    assert y.dtype == base.dtype == dtype
    assert torch.equal(y, compose(base, lora, g.detach(), layer.scaling, layer.base_layer.bias.to(dtype)))
    assert torch.equal(layer.weight_norm(), nu_plain)  # and nothing of autocast's is left behind


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("adapter_dtype", [None, torch.float32])
def test_checkpoint_gives_bitwise_the_gradients_of_no_checkpoint(reentrant, adapter_dtype):
    """torch.utils.checkpoint, reentrant and not, over two steps of SGD (the second forward reads parameters the
    optimiser wrote): loss and gradients of x, A, B, m bitwise equal to the run without checkpointing, and the
    recomputation inside the backward reads its forward's ν (one norm per step, not two)."""
    import copy

    base = _layer()
    if adapter_dtype is None:
        base = base.to(torch.bfloat16)
    else:
        base.base_layer.to(torch.bfloat16)
    runs = []
    for ckpt in (False, True):
        layer = copy.deepcopy(base)
        opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
        out = []
        for step in range(2):
            x = torch.randn(6, 24, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16).requires_grad_()
            computes = layer.row_norm.computes
            y = checkpoint(layer, x, use_reentrant=reentrant) if ckpt else layer(x)
            loss = y.float().pow(2).sum()
            loss.backward()
            assert layer.row_norm.computes == computes + 1 and layer.row_norm.recompute_reuses == ckpt * (step + 1)
            out.append(
                [loss.detach(), x.grad] + [p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.magnitude)]
            )
            opt.step()
            opt.zero_grad()
        runs.append(out)
    for a, b in zip(*runs):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_recomputes_the_norm_of_parameters_written_before_the_backward(reentrant):
    """An in-place write of A between a checkpointed forward and its backward (outside autograd's contract) changes
    A's version: the recomputation computes ν afresh from the values it reads rather than reuse the forward's."""
    layer = _layer().to(torch.bfloat16)
    x = torch.randn(6, 24).to(torch.bfloat16).requires_grad_()
    y = checkpoint(layer, x, use_reentrant=reentrant)
    with torch.no_grad():
        layer.lora_A.mul_(2.0)
    computes = layer.row_norm.computes
    y.float().sum().backward()
    assert layer.row_norm.recompute_reuses == 0 and layer.row_norm.computes == computes + 1


def test_merged_linear_matches_eval_output():
    layer = _layer().eval()
    x = torch.randn(5, 24)
    assert float((layer.merged_linear()(x) - layer(x)).abs().max()) <= 1e-5


@pytest.mark.parametrize(
    "dtype,save",
    [
        (torch.float32, "recompute"),
        (torch.float16, "recompute"),
        (torch.float16, "inputs"),
        (torch.float16, "activation"),
    ],
)
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


@pytest.mark.parametrize(
    "bad",
    [
        "kappa_max nan",
        "alpha nan",
        "alpha inf",
        "eps 0",
        "eps -1",
        "eps nan",
        "fp64 weight",
        "fp64 adapters",
        "int bias",
        "bool bias",
        "r 2.5",
        "r True",
    ],
)
def test_construction_refuses_silent_garbage(bad):
    """Each of these used to be accepted: κ_max = NaN turned the recompute of cancelling rows off, fp64 weights
    ran the norm's GEMM in fp32 silently, an integer bias broke the compose late."""
    lin = nn.Linear(8, 6)
    kw = {}
    what, val = bad.split(" ")
    if what == "kappa_max":
        kw["kappa_max"] = float(val)
    elif what == "alpha":
        kw["alpha"] = float(val)
    elif what == "eps":
        kw["eps"] = float(val)
    elif bad == "fp64 weight":
        lin = lin.double()
    elif bad == "fp64 adapters":
        kw["adapter_dtype"] = torch.float64
    elif what in ("int", "bool"):
        lin.bias = nn.Parameter(torch.zeros(6, dtype=torch.int32 if what == "int" else torch.bool), requires_grad=False)
    r = {"r 2.5": 2.5, "r True": True}.get(bad, 2)
    with pytest.raises((TypeError, ValueError)):
        DoRALinear(lin, r=r, **kw)


def test_forward_refuses_an_input_of_another_dtype():
    with pytest.raises(TypeError, match="autocast"):
        _layer()(torch.randn(3, 24, dtype=torch.float64))


def test_forward_refuses_a_layer_moved_to_float64():
    layer = _layer().double()
    with pytest.raises(TypeError, match="float64"):
        layer(torch.randn(3, 24, dtype=torch.float64))


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
    assert a.row_norm.replays >= 2 and b.row_norm.replays == 0 and a.row_norm.graph_error is None


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


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_save_x_forms_base_again_and_keeps_no_activation(bias, monkeypatch):
    """save='x' (fp16: the fused tier — on the GPU, else under the interpreter on a CPU): y and the gradients of x,
    A, B, m are save='recompute''s bits, and nothing [T, d_out] is kept for backward."""
    monkeypatch.setenv("DORA_VERIFY_TIER", "fused")
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # where the fused tier runs here
    T, d_in, d_out = 29, 40, 72
    torch.manual_seed(5)
    lin = nn.Linear(d_in, d_out, bias=bias).half()
    layer = DoRALinear(lin, r=6, alpha=12).to(dev)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
        layer.magnitude.mul_(1.01)
    x0 = torch.randn(T, d_in).half().to(dev)
    dy = torch.randn(T, d_out).half().to(dev)
    params = [layer.lora_A, layer.lora_B, layer.magnitude]

    def run(save):
        layer.save = save
        x = x0.clone().requires_grad_()
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            y = layer(x)
        return y, torch.autograd.grad(y, [x] + params, dy), shapes

    y1, g1, kept_default = run("recompute")
    y2, g2, kept_x = run("x")
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert (T, d_out) in kept_default and (T, d_out) not in kept_x, (kept_default, kept_x)
