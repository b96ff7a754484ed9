"""dora_verify.layer_experiment: the whole layer of DoRALinear, PEFT and --impl layer factories against the layer
oracle, on a tiny grid."""

import sys
from pathlib import Path

import pytest
import torch

from dora_verify import layer_experiment as le
from dora_verify.sweep import EXPERIMENTS, SweepConfig, experiment_module

sys.path.insert(0, str(Path(__file__).parent))  # tests/planted_impls.py, as --impl planted_impls:NAME

TINY = le.grid(
    d_out=16,
    d_in=32,
    rank=4,
    tokens=4,
    alpha=8.0,
    mixes=["bf16 W + fp32 adapters", "fp32"],
    regimes=["trained", "zero_rows"],
)


def _run(impls=(), seed=0, gr=TINY):
    cfg = SweepConfig(impls=tuple(impls), seed=seed)
    ticks = []
    sec = le.run(cfg, torch.device("cpu"), ticks.append, gr)
    assert len(ticks) == le.steps(cfg, gr)
    return sec


def test_registered():
    assert EXPERIMENTS["layer"] == "dora_verify.layer_experiment"
    assert experiment_module("layer") is le
    assert le.steps(SweepConfig()) == len(le.MIXES) * len(le.REGIMES)


def test_kernels_and_peft_within_bounds_and_reproducible():
    pytest.importorskip("peft")
    a, b = _run(), _run()
    assert a == b  # reproducible: the same cfg gives the same section
    assert a["seeds"] == {"cases": 0}
    assert {"kernels", "peft"} <= set(a["impls"])
    assert {r["impl"] for r in a["rows"]} >= {"kernels", "peft"}
    assert not [r for r in a["rows"] if r.get("failed")]
    assert le.max_ratio(a, "kernels") <= 1.0  # DoRALinear within the bound of its stated steps
    assert len(a["decomposition"]) == len(TINY["mixes"]) * len(TINY["regimes"])
    for d in a["decomposition"]:
        assert set(d["ulp"]) >= {"base", "xa", "lora", "norm", "scale", "compose", "total"}
    md = le.markdown(a, [])
    for mix in TINY["mixes"]:
        assert f"**{mix}**" in md
    assert "the error of y by step" in md and "seed=0" in md and "d_out = 16" in md


@pytest.mark.parametrize("planted", ["nu_not_detached", "g_bf16"])
def test_planted_layer_outside_bound(planted):
    sec = _run([f"planted_impls:{planted}"], gr=dict(TINY, regimes=["trained"]))
    label = f"impl:planted_impls:{planted}"
    assert label in sec["impls"]
    assert le.max_ratio(sec, label) > 1.0
    assert "**" in le.markdown(sec, [])
    assert le.max_ratio(sec, "kernels") <= 1.0


def test_failed_layer_rows_count_as_failed_calls():
    """A layer that raises on every case: its rows are failed calls (the sweep exits 1, the Markdown lists them);
    they were missed because the layer section keeps its rows under "rows"."""
    from dora_verify.report import _failures_section
    from dora_verify.sweep import failed_rows

    rep = {
        "experiments": {
            "layer": {
                "rows": [{"impl": "impl:x:f", "failed": "RuntimeError: boom"}, {"impl": "kernels", "outputs": {}}]
            },
            "compose_regimes": [{"form": "stable", "y": {}}],
        }
    }
    assert [(e, r["impl"]) for e, r in failed_rows(rep)] == [("layer", "impl:x:f")]
    assert any("impl:x:f" in line for line in _failures_section(rep))
