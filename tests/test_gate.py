"""dora_verify.gate: the pre-merge gate passes the real kernels, fails planted defects (through the adapter
protocol), ratchets against a baseline, refuses foreign baselines, never passes on nothing, writes JUnit."""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from dora_verify import gate
from dora_verify.adapter import ImplError, from_object, load_impl
from dora_verify.cli import main

sys.path.insert(0, str(Path(__file__).parent))  # tests/planted_impls.py, as --impl planted_impls:NAME
BASELINE = Path(__file__).parent.parent / ".ci" / "gate-baseline-cpu.json"


def _run(tmp_path, *args):
    out = tmp_path / "gate"
    rc = main(["gate", "--device", "cpu", "--quiet", "--out", str(out), *args])
    doc = json.loads((out / "gate.json").read_text()) if (out / "gate.json").exists() else None
    return rc, doc, out


def test_suite_is_deterministic_and_covers_the_adversarial_inputs():
    a, b = gate.build_suite(), gate.build_suite()
    assert gate.suite_fingerprint(a) == gate.suite_fingerprint(b)
    ids = [c.id for c in a]
    assert len(ids) == len(set(ids))
    checks = {c.check for c in a}
    assert checks == {"compose", "backward", "nonfinite", "norm"}
    regimes = {c.example.params["regime"] for c in a if c.check == "compose"}
    assert {"fresh", "cancel", "heavy", "wide", "tiny"} <= regimes
    assert {c.example.params["g_mode"] for c in a if c.check == "compose"} >= {"one", "below_bf16", "sub_ulp_delta"}
    assert {c.shape_class for c in a} == {"aligned", "ragged"}
    assert gate.suite_fingerprint(gate.build_suite(seed=1)) != gate.suite_fingerprint(a)


def _ci_environment() -> bool:
    """The committed baseline belongs to CI's environment: CPU only, its torch and triton minor versions."""
    import triton

    env = json.loads(BASELINE.read_text())["environment"]
    return (not gate.torch.cuda.is_available() and gate._minor(gate.torch.__version__) == env["torch"]
            and gate._minor(triton.__version__) == env["triton"])


@pytest.mark.skipif(not _ci_environment(), reason="the committed baseline is for CI's CPU environment")
def test_real_kernels_pass_against_the_committed_cpu_baseline(tmp_path):
    rc, doc, out = _run(tmp_path, "--baseline", str(BASELINE))
    assert rc == 0, (out / "gate.md").read_text()
    assert doc["verdict"]["passed"] and doc["environment"]["mode"] == "cpu-logic-only"
    assert "logic-only" in (out / "gate.md").read_text()
    impls = set(doc["environment"]["impls"])
    assert "kernels[eager]" in impls


@pytest.mark.parametrize("planted", ["gcast", "naive", "off_by_one", "Flaky"])
def test_planted_defects_fail(tmp_path, planted):
    rc, doc, out = _run(tmp_path, "--impl", f"planted_impls:{planted}")
    assert rc == 1
    hard = doc["verdict"]["hard"]
    assert hard
    text = " ".join(m for msgs in hard.values() for m in msgs)
    if planted == "Flaky":
        assert "repeated call" in text
    else:
        assert "error/bound ratio" in text
    md = (out / "gate.md").read_text()
    assert "FAILED" in md and "reproduce: `dora-verify gate --impl planted_impls:" in md
    tree = ET.parse(out / "junit.xml").getroot()
    assert int(tree.get("failures")) >= 1 and tree.find(".//failure") is not None


def test_stock_peft_is_gated_and_its_bf16_numerics_fail(tmp_path):
    """--impl peft: PEFT's own norm code and its compose arithmetic under the faithful contract. Its bf16 g
    (magnitude / weight norm in the adapter dtype) and four roundings miss the 1-ulp contract: exit 1."""
    pytest.importorskip("peft")
    rc, doc, out = _run(tmp_path, "--impl", "peft", "--dtypes", "bf16")
    assert rc == 1
    text = " ".join(m for msgs in doc["verdict"]["hard"].values() for m in msgs)
    assert "peft|compose.y|bf16" in " ".join(doc["verdict"]["hard"]) and "error/bound ratio" in text
    assert any(k.startswith("peft|norm") for k in doc["verdict"]["hard"])  # ν in bf16 misses 1e-6


def test_the_good_wrapper_passes_and_a_reproduce_case_runs(tmp_path):
    rc, doc, _ = _run(tmp_path, "--impl", "planted_impls:Good")
    assert rc == 0 and doc["verdict"]["passed"]
    rc, doc, _ = _run(tmp_path, "--impl", "planted_impls:off_by_one", "--case", "compose-fp32-03")
    assert rc == 1 and doc["evaluations"] == 1


def test_ratchet_regression_and_improvement_both_fail(tmp_path):
    base = tmp_path / "baseline.json"
    rc, _, _ = _run(tmp_path, "--impl", "planted_impls:Good", "--dtypes", "fp16", "--baseline", str(base),
                    "--update-baseline")
    assert rc == 0 and base.exists()
    rc, doc, _ = _run(tmp_path, "--impl", "planted_impls:Good", "--dtypes", "fp16", "--baseline", str(base))
    assert rc == 0 and doc["verdict"]["baseline"] == []
    doc0 = json.loads(base.read_text())
    key = next(k for k, g in doc0["groups"].items() if g["max_ratio"] is not None)
    for delta, kind in ((+0.2, "improvement"), (-0.2, "regression")):
        d = json.loads(json.dumps(doc0))
        d["groups"][key]["max_ratio"] += delta
        base.write_text(json.dumps(d))
        rc, doc, out = _run(tmp_path, "--impl", "planted_impls:Good", "--dtypes", "fp16", "--baseline", str(base))
        assert rc == 1
        assert [b["kind"] for b in doc["verdict"]["baseline"]] == [kind]
        assert "--update-baseline" in (out / "gate.md").read_text()
    d = json.loads(json.dumps(doc0))
    d["groups"]["ghost|compose.y|fp16|cpu|ragged"] = d["groups"][key]
    base.write_text(json.dumps(d))
    rc, doc, _ = _run(tmp_path, "--impl", "planted_impls:Good", "--dtypes", "fp16", "--baseline", str(base))
    assert rc == 1 and [b["kind"] for b in doc["verdict"]["baseline"]] == ["missing"]


def test_baseline_from_another_environment_is_refused(tmp_path, capsys):
    base = tmp_path / "baseline.json"
    _run(tmp_path, "--impl", "planted_impls:Good", "--dtypes", "fp32", "--baseline", str(base), "--update-baseline")
    d = json.loads(base.read_text())
    d["environment"]["device_class"] = "cuda-sm90"
    base.write_text(json.dumps(d))
    capsys.readouterr()
    rc, _, _ = _run(tmp_path, "--impl", "planted_impls:Good", "--dtypes", "fp32", "--baseline", str(base))
    assert rc == 2 and "different environment" in capsys.readouterr().err
    rc, doc, _ = _run(tmp_path, "--impl", "planted_impls:Good", "--dtypes", "fp32", "--baseline", str(base),
                      "--allow-env-mismatch")
    assert rc == 0 and doc["verdict"]["environment"]


def test_update_baseline_refused_when_hard_criteria_fail(tmp_path):
    base = tmp_path / "baseline.json"
    rc, _, _ = _run(tmp_path, "--impl", "planted_impls:naive", "--baseline", str(base), "--update-baseline")
    assert rc == 1 and not base.exists()


def test_never_passes_on_nothing(tmp_path):
    rc, doc, out = _run(tmp_path, "--impl", "planted_impls:Fp32Only", "--dtypes", "bf16")
    assert rc == 1 and doc["verdict"].get("nothing_ran")
    assert ET.parse(out / "junit.xml").getroot().get("failures") == "1"


@pytest.mark.skipif(gate.torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_gpu_required_without_a_gpu_exits_2(tmp_path, capsys):
    rc = main(["gate", "--require-gpu", "--quiet", "--out", str(tmp_path / "g")])
    assert rc == 2 and "no CUDA device" in capsys.readouterr().err
    assert main(["gate", "--device", "cuda", "--quiet", "--out", str(tmp_path / "g")]) == 2


@pytest.mark.parametrize("args,msg", [(["--impl", "nope"], "expected kernels"),
                                      (["--impl", "no_such_module_xyz:f"], "cannot import"),
                                      (["--impl", "planted_impls:missing"], "no attribute"),
                                      (["--dtypes", "bf8"], "bad --dtypes"),
                                      (["--fa-limit", "0"], "--fa-limit"),
                                      (["--update-baseline"], "needs --baseline"),
                                      (["--baseline", "/nonexistent/b.json"], "does not exist"),
                                      (["--case", "compose-bf16-99"], "unknown case")])
def test_usage_errors_exit_2_with_one_line(tmp_path, capsys, args, msg):
    rc = main(["gate", "--device", "cpu", "--quiet", "--out", str(tmp_path / "g"), *args])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and err.count("\n") == 1


def test_adapter_protocol():
    im = from_object(lambda base, lora, g, s, bias=None: base, "fn")
    assert im.compose is not None and im.norm is None and im.contract == "faithful"
    with pytest.raises(ImplError):
        from_object(object(), "x")

    class BadContract:
        contract = "anything"

        def compose(self, *a):
            return None
    with pytest.raises(ImplError, match="contract"):
        from_object(BadContract, "x")
    assert [i.name for i in load_impl("forms")][0].startswith("form:")
