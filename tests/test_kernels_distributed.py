"""kernels.distributed on CPU with the gloo backend (processes spawned by the tests): the sharded factored norm
against the single-process oracle within the production bound, row- and column-sharded, even and uneven shards,
near-cancelling rows; DoRALinear and the PEFT integration under FSDP2 (fully_shard), with gradient checkpointing,
against the unsharded model."""

import copy
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dora_verify.cases import make_case

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _free_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def _spawn(fn, world, tmp_path, *args):
    mp.spawn(fn, args=(world, _free_port(), str(tmp_path), *args), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _finish():
    """End a worker whose results are saved: both ranks past their collectives, the group destroyed, then the process
    ended without the interpreter's teardown — where gloo's and autograd's C++ threads have, now and then, aborted an
    already finished rank ("terminate called without an active exception", SIGABRT). The results are checked in
    the parent from the saved files; a worker that fails before saving them still fails the test."""
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def _init(rank, world, port):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))  # no hung CI


# ----------------------------------------------------------------------------- sharded norm vs the oracle
def _norm_worker(rank, world, port, out):
    from dora_verify.distributed import check_sharded_norm

    _init(rank, world, port)
    res = []
    for layout in ("rows", "cols"):
        for regime in ("trained", "near_cancel", "zero_rows", "all_positive"):
            for dtype in ("bf16", "fp32"):
                c = make_case(regime, 61, 203, 8, 1, dtype=dtype, seed=3, device="cpu")  # uneven shards
                for det in (False, True):
                    res.append(
                        dict(
                            check_sharded_norm(c.W, c.A, c.B, c.s, layout, deterministic=det),
                            regime=regime,
                            dtype=dtype,
                        )
                    )
        # fewer rows / columns than ranks: with 3 ranks one holds an empty shard and must still take part
        g = torch.Generator().manual_seed(5)  # the same full matrices on every rank
        W, A, B = torch.randn(2, 2, generator=g), torch.randn(3, 2, generator=g), torch.randn(2, 3, generator=g)
        res.append(dict(check_sharded_norm(W, A, B, 0.5, layout), regime="tiny", dtype="fp32"))
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    _finish()


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_norm_meets_the_single_process_bound(tmp_path, world):
    results = _spawn(_norm_worker, world, tmp_path)
    for rank_res in results:
        assert len(rank_res) == 34
        for r in rank_res:
            assert r["max_ratio"] <= 1, r
            assert r["identical_across_ranks"], r  # 'cols': every rank assembles the same ν
        assert any(r["dense_rows"] for r in rank_res if r["regime"] == "near_cancel" and r["layout"] == "cols")
    assert results[0] == results[-1]  # every rank saw the same ν errors


def _bad_input_worker(rank, world, port, out):
    from dora_verify.kernels.distributed import sharded_row_norm

    _init(rank, world, port)
    W, A, B = torch.randn(6, 5), torch.randn(2, 5), torch.randn(6, 2)
    errors = []
    for kwargs in ({"layout": "diagonal"},):
        try:
            sharded_row_norm(W, A, B, 1.0, **kwargs)
        except ValueError as e:
            errors.append(str(e))
    W[0, 0] = float("nan")
    try:
        sharded_row_norm(W, A, B, 1.0, layout="cols")
    except ValueError as e:
        errors.append(str(e))
    torch.save(errors, os.path.join(out, f"rank{rank}.pt"))
    _finish()


def test_sharded_norm_bad_input(tmp_path):
    errs = _spawn(_bad_input_worker, 2, tmp_path)[0]
    assert "layout must be" in errs[0] and "NaN/Inf" in errs[1]


def test_cols_layout_needs_a_process_group():
    from dora_verify.kernels.distributed import sharded_row_norm

    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(ValueError, match="initialise torch.distributed"):
        sharded_row_norm(torch.randn(4, 3), torch.randn(2, 3), torch.randn(4, 2), 1.0, layout="cols")


# ----------------------------------------------------------------------------- FSDP2
def _dora_model(seed):
    from dora_verify.kernels import DoRALinear

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        DoRALinear(torch.nn.Linear(24, 21), 4, 8), torch.nn.Tanh(), DoRALinear(torch.nn.Linear(21, 16), 4, 8)
    )
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora_B.normal_(0, 0.3)  # B ≠ 0 and g ≠ 1: a fresh adapter tests nothing
            layer.magnitude.mul_(1 + 0.1 * torch.rand_like(layer.magnitude))
    return model


def _full_grads(model):
    from torch.distributed.tensor import DTensor

    return {
        n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def _run_steps(model, x, checkpoint, steps=2):
    """Loss and gradients of ``steps`` SGD steps (the second forward sees parameters the optimiser changed)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    out = []
    for _ in range(steps):
        h = x
        for m in model:
            h = torch.utils.checkpoint.checkpoint(m, h, use_reentrant=False) if checkpoint else m(h)
        loss = (h * h).sum()
        loss.backward()
        out.append((float(loss), _full_grads(model)))
        opt.step()
        opt.zero_grad()
    return out


def _fsdp_worker(rank, world, port, out, checkpoint):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dora_verify.kernels import factored_row_norm
    from dora_verify.kernels.distributed import dtensor_row_norm

    _init(rank, world, port)
    ref = _dora_model(0)
    model = copy.deepcopy(ref)
    mesh = init_device_mesh("cpu", (world,))
    for m in (model[0], model[2], model):
        fully_shard(m, mesh=mesh)
    x = torch.randn(7, 24, generator=torch.Generator().manual_seed(1))
    res = {"ref": _run_steps(ref, x, checkpoint), "fsdp": _run_steps(model, x, checkpoint)}
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # [batch, seq, d]: no module of ours returns a view
        warnings.simplefilter("always")
        h = x.reshape(7, 1, 24)
        for m in model:  # as _run_steps calls them
            h = m(h)
        h.sum().backward()
    res["view_warnings"] = sum("view tensor" in str(w.message) for w in caught)
    layer = model[0]  # outside forward: sharded DTensor parameters
    nu = dtensor_row_norm(layer.base_layer.weight, layer.lora_A, layer.lora_B, layer.scaling)
    res["dtensor_nu"] = nu.full_tensor()
    res["placements"] = str(layer.base_layer.weight.placements)
    r0 = ref[0]
    res["ref_nu"] = factored_row_norm(r0.base_layer.weight, r0.lora_A, r0.lora_B, r0.scaling)
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    _finish()


def _close(a, b, rtol=1e-5):
    return float((a - b).abs().max()) <= rtol * float(b.abs().max())


@pytest.mark.parametrize("checkpoint", [False, True])
def test_dora_linear_under_fully_shard_matches_the_unsharded_model(tmp_path, checkpoint):
    """Two SGD steps under FSDP2 (gloo, 2 ranks, every rank the same batch) against one process: losses and the
    gradients of A, B and m within 1e-5 (fp32), the second step after the optimiser changed A, B, m (a stale ν
    cache would show there), with and without activation checkpointing; ν from the sharded parameters."""
    for res in _spawn(_fsdp_worker, 2, tmp_path, checkpoint):
        assert res["placements"] == "(Shard(dim=0),)" and res["view_warnings"] == 0
        for (l_ref, g_ref), (l_f, g_f) in zip(res["ref"], res["fsdp"]):
            assert abs(l_ref - l_f) <= 1e-5 * abs(l_ref)
            assert set(g_ref) == set(g_f) and all(_close(g_f[n], g_ref[n]) for n in g_ref), {
                n: float((g_f[n] - g_ref[n]).abs().max()) for n in g_ref
            }
        assert res["ref"][0][0] != res["ref"][1][0]  # the step changed the loss
        assert _close(res["dtensor_nu"], res["ref_nu"], 1e-6)


def _peft_worker(rank, world, port, out):
    from peft import LoraConfig, get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import dora_verify.kernels.peft as dv_peft

    _init(rank, world, port)
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(24, 21), torch.nn.Tanh(), torch.nn.Linear(21, 16))
    ref = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["0", "2"]))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
            if "magnitude" in n:
                p.mul_(1.05)
    model = copy.deepcopy(ref)
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model, mesh=mesh)
    x = torch.randn(7, 24, generator=torch.Generator().manual_seed(1))
    res = {}
    for name, m, on in (("stock", ref, False), ("ours_fsdp", model, True)):
        (dv_peft.enable if on else dv_peft.disable)()
        y = m(x)
        (y * y).sum().backward()
        res[name] = (y.detach().clone(), _full_grads(m))
    dv_peft.disable()
    res["routed"] = sum("_dora_verify_norm" in mod.__dict__ for mod in model.modules())
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    _finish()


def test_peft_integration_under_fully_shard(tmp_path):
    pytest.importorskip("peft")
    for res in _spawn(_peft_worker, 2, tmp_path):
        assert res["routed"] == 2  # both DoRA layers went through the kernels under FSDP2
        (y_s, g_s), (y_o, g_o) = res["stock"], res["ours_fsdp"]
        assert _close(y_o, y_s)
        assert set(g_s) == set(g_o) and all(_close(g_o[n], g_s[n]) for n in g_s)


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_llama_with_dora(seed):
    """A random 2-layer Llama (fp32) with PEFT DoRA r = 4 on all seven projections, B ≠ 0 and m off the norm."""
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    model = get_peft_model(
        transformers.LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=LLAMA_TARGETS)
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.05 * torch.randn(p.shape, generator=g))
    return model


class _OpCounter:
    """A torch.compile backend: aot_eager, recording which modules call this project's compose ops in its graphs
    (the innermost entry of each node's module stack)."""

    def __init__(self):
        self.layers = set()

    def __call__(self, gm, example_inputs):
        for n in gm.graph.nodes:
            if "dora_verify" in str(n.target) and "compose" in str(n.target):
                stack = n.meta.get("nn_module_stack") or {}
                self.layers.add(list(stack.values())[-1][0] if stack else None)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


def _llama_steps(model, ids, setting, counter=None, steps=2):
    """Losses and gradients of ``steps`` AdamW steps of ``model`` in ``setting`` (HF checkpointing, compile)."""
    if setting == "checkpointing":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fn = torch.compile(model, backend=counter) if setting == "compile" else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = []
    for _ in range(steps):
        loss = fn(input_ids=ids, labels=ids).loss
        loss.backward()
        out.append((float(loss), _full_grads(model)))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out


def _llama_worker(rank, world, port, out, setting):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import dora_verify.kernels.peft as dv_peft

    _init(rank, world, port)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))  # the same batch on every rank
    dv_peft.enable()
    ref = _tiny_llama_with_dora(0)
    model = copy.deepcopy(ref)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    counter = _OpCounter()
    res = {"ref": _llama_steps(ref, ids, setting, _OpCounter()), "fsdp": _llama_steps(model, ids, setting, counter)}
    res["routed"] = sum("_dora_verify_norm" in m.__dict__ for m in model.modules())  # eager: layers with a runner
    res["compiled_kinds"] = sorted({str(p).rsplit(".", 1)[-1] for p in counter.layers})  # projections calling the op
    dv_peft.disable()
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    _finish()


@pytest.mark.parametrize("setting", ["checkpointing", "compile"])
def test_peft_llama_under_fully_shard_matches_one_process(tmp_path, setting):
    """A Llama with PEFT DoRA through the integration, every decoder layer and the root under fully_shard (gloo, 2
    ranks, the same batch on each): two AdamW steps with Hugging Face gradient checkpointing or torch.compile
    (aot_eager) against the same model in one process — losses and the gradients of A, B and m within 1e-5 (fp32),
    the second step's after the optimiser changed every adapter (ν from the re-gathered parameters: a stale one
    would show there). All 14 DoRA layers take the kernels under FSDP2 (compiled: every projection kind calls the
    compose op in the graphs, which the two decoder layers share)."""
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    for res in _spawn(_llama_worker, 2, tmp_path, setting):
        if setting == "compile":  # decoder layers of identical code share one compiled graph: count kinds
            assert res["compiled_kinds"] == sorted(LLAMA_TARGETS)
        else:
            assert res["routed"] == 14
        for (l_ref, g_ref), (l_f, g_f) in zip(res["ref"], res["fsdp"]):
            assert abs(l_ref - l_f) <= 1e-5 * abs(l_ref)
            assert set(g_ref) == set(g_f) and len(g_ref) == 14 * 3
            assert all(_close(g_f[n], g_ref[n]) for n in g_ref), {
                n: float((g_f[n] - g_ref[n]).abs().max()) for n in g_ref if not _close(g_f[n], g_ref[n])
            }
        assert res["ref"][0][0] != res["ref"][1][0]  # the step changed the loss
