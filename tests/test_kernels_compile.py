"""torch.compile of the kernels as users train with them: no graph breaks, no recompiles after warm-up.

A training loop (forward, backward, fused AdamW step) of the PEFT integration on a tiny Llama and of
``DoRALinear``, compiled through dynamo and AOT autograd (``aot_eager`` on the CPU: the same graphs inductor
receives, without a C compiler; inductor where CUDA is present). After the first step, recompiling is an error
(``error_on_recompile``): parameters the optimiser wrote, new batches of the same shape, and Hugging Face gradient
checkpointing must all run the graph compiled once. The graph must hold the project's ops (else the test would
pass on a fallback to stock PEFT), and the compiled loss must match eager's.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from dora_verify.kernels import DoRALinear

STEPS = 3


def backend() -> str:
    return "inductor" if torch.cuda.is_available() else "aot_eager"


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def graph_ops(compiled: CompileCounterWithBackend) -> str:
    """The code of every compiled graph and of its subgraphs (a checkpointed region is one)."""
    return "\n".join(m.code for g in compiled.graphs for m in g.modules() if isinstance(m, torch.fx.GraphModule))


def run_steps(module, loss_of, inputs, compiled_counter):
    """Fused AdamW steps through ``torch.compile(module)``; recompiling after the first step raises. Returns the
    losses. Counts graph breaks in ``counters['graph_break']``."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
    step_fn = torch.compile(module, backend=compiled_counter)
    losses = []
    for k, x in enumerate(inputs):
        with torch._dynamo.config.patch(error_on_recompile=k > 0):
            opt.zero_grad(set_to_none=True)
            loss = loss_of(step_fn, x)
            loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- the PEFT integration
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_llama(adapter_dtype, use_dora=True):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_cache=False,
    )
    base = transformers.LlamaForCausalLM(cfg)
    if adapter_dtype == "bf16":
        base = base.to(torch.bfloat16)
    model = get_peft_model(
        base,
        LoraConfig(r=8, lora_alpha=16, use_dora=use_dora, target_modules=TARGETS),
        autocast_adapter_dtype=adapter_dtype != "bf16",
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)
    return model.to(device()).train()


def token_batches():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, 96, (2, 12), generator=g).to(device()) for _ in range(STEPS)]


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def compiled_run(model, ids):
    """(losses, graphs compiled, graph breaks by reason, the counter) of STEPS compiled steps from fresh dynamo."""
    torch._dynamo.reset()
    counters.clear()
    compiled = CompileCounterWithBackend(backend())
    losses = run_steps(model, lm_loss, ids, compiled)
    return losses, compiled.frame_count, dict(counters["graph_break"]), compiled


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "hf-checkpointing"])
@pytest.mark.parametrize("adapter_dtype", ["fp32", "bf16"])
def test_peft_integration_compiles_once_without_graph_breaks(adapter_dtype, checkpointing):
    """No graph break and no graph beyond the ones the same model with plain LoRA adapters gets (Hugging Face's
    checkpointing adds its own: ``enable_input_require_grads``'s ``requires_grad_`` hook); none at all without
    checkpointing."""
    import dora_verify.kernels.peft as dv_peft

    if adapter_dtype == "bf16" and not torch.cuda.is_available():
        pytest.skip("bf16 models: the CPU's bf16 GEMMs make the eager comparison meaningless at this size")
    models = {k: peft_llama(adapter_dtype, use_dora=k != "lora") for k in ("lora", "dora")}
    if checkpointing:
        for m in models.values():
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = token_batches()
    _, lora_graphs, lora_breaks, _ = compiled_run(models["lora"], ids)
    with dv_peft.enabled():
        eager = run_steps(copy.deepcopy(models["dora"]), lm_loss, ids, CompileCounterWithBackend("eager"))
        losses, graphs, breaks, compiled = compiled_run(models["dora"], ids)
    assert breaks == lora_breaks, f"graph breaks {breaks}, LoRA's {lora_breaks}"
    assert graphs == lora_graphs, f"{graphs} graphs compiled, LoRA's {lora_graphs}"
    if not checkpointing:
        assert not breaks and graphs == 1
    ops = graph_ops(compiled)
    assert "dora_verify.row_norm" in ops and "dora_verify" in ops.replace("dora_verify.row_norm", ""), (
        "the compiled graph does not run the project's norm and compose ops"
    )
    tol = 1e-5 if adapter_dtype == "fp32" else 2.0**-7
    assert float(((losses - eager).abs() / eager.abs()).max()) <= tol, (losses.tolist(), eager.tolist())


# ----------------------------------------------------------------------------- DoRALinear
def dora_linear(dtype, dropout):
    torch.manual_seed(0)
    layer = DoRALinear(torch.nn.Linear(48, 40).to(dtype), r=8, alpha=16, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
    return layer.to(device()).train()


def layer_loss(layer, x):
    return layer(x).float().square().mean()


@pytest.mark.parametrize(
    "dtype,dropout",
    [(torch.float32, 0.0), (torch.float32, 0.1), (torch.bfloat16, 0.0)],
    ids=["fp32", "fp32-dropout", "bf16"],
)
def test_dora_linear_compiles_once_in_fullgraph(dtype, dropout):
    layer = dora_linear(dtype, dropout)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 6, 48, generator=g).to(dtype).to(device()).requires_grad_() for _ in range(STEPS)]
    compiled = CompileCounterWithBackend(backend())
    params = [p for p in layer.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
    fn = torch.compile(layer, backend=compiled, fullgraph=True)  # fullgraph: a graph break raises
    for k, x in enumerate(xs):
        with torch._dynamo.config.patch(error_on_recompile=k > 0):
            opt.zero_grad(set_to_none=True)
            layer_loss(fn, x).backward()
        opt.step()
    assert compiled.frame_count == 1
    assert "dora_verify.row_norm" in graph_ops(compiled)
    if dropout == 0.0:  # the compiled layer's output is the eager layer's at the trained parameters
        x = xs[0].detach()
        with torch.no_grad():
            y_c, y_e = fn(x), layer(x)
        assert float((y_c - y_e).abs().max()) <= (0.0 if backend() == "aot_eager" else 2.0**-7 * float(y_e.abs().max()))
