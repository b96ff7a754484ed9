"""dora_verify.bench / bench_report: no GPU, no numbers (exit 2); the targets and the crossover are computed from
what was measured; a saved report re-renders (Markdown, plots) and the README's performance section is the one
generated from the committed H100 report."""

import copy
import json
from pathlib import Path

import pytest
import torch

from dora_verify import bench
from dora_verify.bench_report import README_BEGIN, README_END, bench_markdown, readme_section, update_readme
from dora_verify.cli import main

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "reports" / "h200" / "bench" / "bench.json"


def _t(ms, peak=None):
    return {"ms": ms, "p10": ms, "p90": ms, **({"peak_mib": peak} if peak is not None else {})}


def synthetic_report() -> dict:
    """A bench report shaped like run_bench's, with made-up timings (for rendering and target logic only)."""
    compose = []
    for T, N, fused, eager_tier in ((1, 4096, 0.09, 0.05), (512, 4096, 0.1, 0.2), (8192, 8192, 0.144, 5.0)):
        compose.append(
            {
                "T": T,
                "d_out": N,
                "elements": T * N,
                "rotation": 1,
                "fused_fwd": _t(fused),
                "eager_fwd": _t(fused * 3),
                "eager_tier_fwd": _t(eager_tier),
                "fused_bwd": _t(fused * 2),
                "eager_bwd": _t(fused * 6),
                "eager_tier_bwd": _t(eager_tier * 2),
                "fused_fwd_bw_frac": 0.93 if T * N >= 8192 * 8192 else 0.1,
                "fused_bwd_bw_frac": 0.6,
                "fwd_speedup_vs_eager": 3.0,
                "bwd_speedup_vs_eager": 3.0,
            }
        )
    norm = [
        {
            "d": 8192,
            "r": 384,
            "W_dtype": "bfloat16",
            "rotation": 1,
            "factored": _t(0.34, 24.0),
            "factored_cold": _t(0.38, 24.0),
            "peft": _t(0.91, 512.0),
            "dense_fp32": _t(1.9, 768.0),
            "speedup_vs_peft": 0.91 / 0.34,
            "memory_vs_peft": 24 / 512,
        }
    ]
    layer = []
    for adapters, ours_fwd in (("fp32", 2.0), ("bf16", 1.2)):
        rec = {"d": 8192, "r": 384, "tokens": 4096, "adapters": adapters, "rotation": 1}
        for impl, f in (("peft_lora", 1.0), ("peft_dora", 2.5), ("ours", ours_fwd)):
            rec[impl] = {"fwd": _t(f, 100.0), "fwd_bwd": _t(2 * f, 200.0), "infer": _t(f)}
        for k in ("fwd", "fwd_bwd", "infer"):
            rec[f"ours_over_lora_{k}"] = rec["ours"][k]["ms"] / rec["peft_lora"][k]["ms"]
            rec[f"speedup_vs_peft_dora_{k}"] = rec["peft_dora"][k]["ms"] / rec["ours"][k]["ms"]
        for k in ("fwd", "fwd_bwd"):
            rec[f"ours_mem_over_lora_{k}"] = 1.0
        layer.append(rec)
    rep = {
        "schema_version": bench.SCHEMA_VERSION,
        "kind": "bench",
        "config": {"quick": True, "parts": list(bench.PARTS), "warmup": 10, "reps": 50, "seed": 0},
        "provenance": {
            "git": {"commit": "0" * 40},
            "versions": {"torch": "x", "triton": "y", "peft": "z"},
            "device": {"name": "Test GPU", "driver": "1", "cuda": "2"},
            "time_utc": "t",
            "argv": ["dora-verify", "bench"],
        },
        "copy_bandwidth": {"bytes": 1, "ms": 1.0, "TBps": 3.0},
        "compose": compose,
        "norm": norm,
        "layer": layer,
        "timings_s": {"total": 1.0},
    }
    rep["crossover"] = bench.crossover(compose)
    rep["targets"] = bench.targets(rep)
    return rep


def test_targets_follow_the_measurements():
    rep = synthetic_report()
    t = {x["target"]: x for x in rep["targets"]}
    assert len(t) == 12 + 15  # the kernel targets, then the model part's
    assert t["compose forward, fraction of copy bandwidth (≥ 8192×8192, worst shape)"]["met"] is True
    fp32_fwd = next(x for k, x in t.items() if k.startswith("layer fwd time") and "fp32" in k)
    bf16_fwd = next(x for k, x in t.items() if k.startswith("layer fwd time") and "bf16" in k)
    assert fp32_fwd["measured"] == 2.0 and fp32_fwd["met"] is False  # 2.0× LoRA > 1.10
    assert bf16_fwd["measured"] == pytest.approx(1.2) and bf16_fwd["met"] is False
    rep2 = copy.deepcopy(rep)
    rep2["layer"][1]["ours_over_lora_fwd"] = 1.05
    assert next(x for x in bench.targets(rep2) if x["target"] == bf16_fwd["target"])["met"] is True
    del rep2["norm"]  # a part not run: its targets are None, not failed
    assert all(x["met"] is None for x in bench.targets(rep2) if x["target"].startswith("factored norm"))


def test_crossover_is_the_first_size_above_every_loss():
    rows = synthetic_report()["compose"]  # the fused tier loses at 1×4096 only (0.09 vs 0.05 ms)
    c = bench.crossover(rows)
    assert c["infer_min_elements_measured"] == 512 * 4096
    rows[0]["fused_fwd"]["ms"] = 0.01
    rows[0]["fused_bwd"]["ms"] = 0.01
    assert (
        bench.crossover(rows)["infer_min_elements_measured"]
        == 1
        == bench.crossover(rows)["train_min_elements_measured"]
    )
    rows[-1]["fused_fwd"]["ms"] = 99.0  # slower at the largest size: no crossover
    assert bench.crossover(rows)["infer_min_elements_measured"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_no_gpu_no_numbers(tmp_path, capsys):
    assert main(["bench", "--quick", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA device" in err and err.count("\n") == 1
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["bench", "--parts", "compose,bogus"], "unknown part"),
        (["bench", "--reps", "0"], "positive integer"),
        (["bench", "--readme", "README.md"], "--readme needs --render"),
        (["bench", "--render", "/nonexistent/bench.json"], "cannot read bench report"),
    ],
)
def test_bad_bench_arguments_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_render_a_saved_report_and_its_readme_section(tmp_path):
    rep = synthetic_report()
    src = tmp_path / "in.json"
    src.write_text(json.dumps(rep))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{README_BEGIN}\nOLD-SECTION-TEXT\n{README_END}\n\ntail\n")
    out = tmp_path / "out"
    assert main(["bench", "--render", str(src), "--out", str(out), "--readme", str(readme)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "bench.json",
        "bench.md",
        "bench_bandwidth.png",
        "bench_memory.png",
        "bench_speedup.png",
    ]
    md = (out / "bench.md").read_text()
    assert "Test GPU" in md and "| 8192×8192 |" in md and "**no**" in md  # the unmet layer targets show
    text = readme.read_text()
    assert "OLD-SECTION-TEXT" not in text and text.endswith("tail\n") and "out/bench.md" in text
    assert readme_section(rep, "out/bench.md") in text
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"kind": "sweep"}))
    assert main(["bench", "--render", str(bad), "--out", str(out)]) == 2
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    with pytest.raises(ValueError, match="no generated bench section"):
        update_readme(plain, rep, "x")
    assert bench_markdown(rep).count("| target | limit | measured | met |") == 1


@pytest.mark.skipif(not COMMITTED.exists(), reason="no committed bench report yet")
def test_readme_performance_section_is_generated_from_the_committed_report():
    rep = json.loads(COMMITTED.read_text())
    text = (ROOT / "README.md").read_text()
    block = text.split(README_BEGIN, 1)[1].split(README_END, 1)[0]
    assert block.strip() == readme_section(rep, "reports/h200/bench/bench.md").strip(), (
        "regenerate: dora-verify bench --render reports/h200/bench/bench.json --out reports/h200/bench "
        "--readme README.md"
    )
    assert rep["provenance"]["device"]["name"].startswith("NVIDIA") and not rep["config"]["quick"]


@pytest.mark.parametrize("keep", [("compose",), ("norm",), ("layer",)])
def test_render_a_report_of_one_part(tmp_path, keep):
    """--parts runs some parts only: the report, its plots and the targets render from what is there."""
    rep = synthetic_report()
    for part in ("compose", "norm", "layer"):
        if part not in keep:
            rep.pop(part)
    if "compose" not in keep:
        rep.pop("crossover")
    rep["targets"] = bench.targets(rep)
    src = tmp_path / "in.json"
    src.write_text(json.dumps(rep))
    assert main(["bench", "--render", str(src), "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "bench.md").read_text()
    assert ("## Compose" in md) == ("compose" in keep) and ("## Whole layer" in md) == ("layer" in keep)
    assert any(t["met"] is not None for t in rep["targets"]) and any(t["met"] is None for t in rep["targets"])
