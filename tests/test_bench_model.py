"""dora_verify.bench_model on the CPU, as a logic check (no GPU, so no numbers worth reading): the whole model part
runs at toy widths — every implementation, setting and row — and its targets follow the rows; compiled stock PEFT
holds none of the project's ops and the integration's compiled graphs do."""

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from dora_verify import bench, bench_model  # noqa: E402
from dora_verify.bench_report import model_markdown  # noqa: E402


@pytest.fixture
def toy(monkeypatch):
    m = bench_model
    monkeypatch.setattr(m, "DEVICE", "cpu")
    from torch._dynamo.backends.debugging import aot_eager

    monkeypatch.setattr(m, "COMPILE_INNER", aot_eager)
    monkeypatch.setattr(
        m,
        "WIDTHS",
        {"llama3-8b": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2)},
    )
    monkeypatch.setattr(m, "VOCAB", 64)
    monkeypatch.setattr(m, "BATCH", 2)
    monkeypatch.setattr(m, "SEQ", 8)
    monkeypatch.setattr(m, "MODEL_GRID_QUICK", (("llama3-8b", 1, 16, "bf16", m.SETTINGS),))
    monkeypatch.setattr(m, "LAYER_TOKENS", 16)
    monkeypatch.setattr(m, "LAYER_SHAPES", ((32, 32),))
    monkeypatch.setattr(m, "LAYER_SETTINGS_AT", ((32, 32), 16))
    cfg = bench.BenchConfig(
        quick=True,
        parts=("model",),
        warmup=1,
        model_warmup=1,
        model_rounds=1,
        model_per_round=1,
        layer_rounds=1,
        layer_per_round=1,
    )
    return cfg


def test_the_model_part_runs_every_row_and_its_targets_follow(toy):
    torch.manual_seed(0)
    ticks = []
    part = bench_model.bench_model(toy, ticks.append)
    assert len(ticks) == bench_model.plan_size(toy)
    steps, layers = part["steps"], part["layers_in_model"]
    assert [s["setting"] for s in steps] == list(bench_model.SETTINGS)
    assert [(x["r"], x["setting"]) for x in layers] == [
        (16, "eager"),
        (384, "eager"),
        (16, "checkpointing"),
        (16, "compile"),
    ]
    comp = next(s for s in steps if s["setting"] == "compile")
    assert comp["ours_compile"]["dora_ops"] > 0 and comp["peft_dora_compile"]["dora_ops"] == 0
    assert comp["lora_compile"]["dora_ops"] == 0 and comp["ours_compile"]["graph_breaks"] == 0
    assert all(s[i]["ms"] > 0 for s in steps for i in bench_model.MODEL_IMPLS)
    low = bench_model.LOW_MEMORY_IMPL  # enable(save="x") is timed in the eager rows only
    assert [s["setting"] for s in steps if low in s] == ["eager"] and steps[0][low]["ms"] > 0
    for s in steps:  # the ν runners' counters (CPU: no graphs; HF checkpointing's recompute reuses the forward's ν)
        nr = s["ours"]["norm_runners"]
        assert nr["runners"] == 7 and nr["computes"] > 0 and nr["graph_errors"] == [] and nr["captures"] == 0
        assert (nr["recompute_reuses"] > 0) == (s["setting"] == "checkpointing"), (s["setting"], nr)
    rep = {"model": part}
    out = []
    bench_model.model_targets(rep, lambda name, limit, v, ok: out.append((name, v, ok)))
    assert len(out) == 15
    assert all(v is not None for name, v, _ in out if "save='x'" in name)
    missing = [name for name, v, _ in out if v is None]  # the toy grid has bf16 adapters only
    assert missing and all("fp32 adapters" in name for name in missing), missing
    md = "\n".join(model_markdown(part))
    assert "## DoRA where users train" in md and "| llama3-8b × 1 |" in md


def test_model_targets_read_the_rows():
    def step(setting, adapters, ours, stock, mem=1.0):
        t = lambda ms, mib=100.0: {"ms": ms, "peak_mib": mib}  # noqa: E731
        return {
            "widths": "llama3-8b",
            "layers": 4,
            "r": 16,
            "adapters": adapters,
            "setting": setting,
            "lora": t(1.0),
            "peft_dora": t(stock, 150.0),
            "ours": t(ours, 100.0 * mem),
            "ours_over_lora": ours,
            "peft_dora_over_lora": stock,
            "ours_mem_over_lora": mem,
            "speedup_vs_peft_dora": stock / ours,
        }

    steps = [step(s, a, 1.05, 1.5) for s in ("eager", "checkpointing", "compile") for a in ("bf16", "fp32")]
    steps[2]["ours_over_lora"] = 1.3  # checkpointing, bf16: over the limit
    out = {}
    bench_model.model_targets(
        {"model": {"steps": steps, "layers_in_model": []}}, lambda name, limit, v, ok: out.__setitem__(name, (v, ok))
    )
    assert out["model step / LoRA's, eager, bf16 adapters (Llama-3-8B widths, r = 16)"] == (1.05, True)
    assert out["model step / LoRA's, checkpointing, bf16 adapters (Llama-3-8B widths, r = 16)"] == (1.3, False)
    assert out["model peak memory / LoRA's, eager (worst row)"] == (1.0, True)
    key = "model peak memory / LoRA's, eager, enable(save='x') (worst bf16-adapter row: the mode's scope)"
    assert out[key] == (None, False)  # no such rows
    steps[0].update(ours_x_mem_over_lora=1.0, ours_x_over_lora=1.2)  # eager bf16: in the mode's scope
    steps[1].update(ours_x_mem_over_lora=1.16, ours_x_over_lora=1.1)  # eager fp32: the mode does not apply there
    bench_model.model_targets(
        {"model": {"steps": steps, "layers_in_model": []}}, lambda name, limit, v, ok: out.__setitem__(name, (v, ok))
    )
    assert out[key] == (1.0, True)
    assert out["model step / LoRA's, eager, enable(save='x') (its time cost; worst bf16-adapter row)"] == (1.2, False)
    assert out["layer in a model / LoRA's, PEFT integration (4096², r = 16, 8192 tokens, fwd+bwd)"] == (None, False)
