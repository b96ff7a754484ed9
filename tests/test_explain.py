"""dora_verify.explain: a committed corpus case's worst element, exactly — the exact result recomputed here from
the stored inputs with rationals, the error and the ratio to the bound consistent with certify's stored score;
exact rounding of rationals (ties, subnormals, overflow); unsupported targets refused in one line."""

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from dora_verify.cli import main
from dora_verify.explain import ExplainError, explain_case, round_exact
from dora_verify.formats import parse_format

CORPUS = Path(__file__).resolve().parent / "corpus"


def case(prefix: str) -> Path:
    return sorted(CORPUS.glob(f"{prefix}-*.json"))[0]


def test_compose_y_worst_element_is_exact_and_matches_the_stored_score():
    path = case("compose.y-bf16")
    rep = explain_case(path)
    el = rep["elements"][0]
    t, i = el["index"]
    doc = json.loads(path.read_text())
    data = np.load(path.with_suffix(".npz"))

    def val(name, *idx):
        a = np.array(data[name])
        v = a[idx]
        if doc["tensors"][name] == "bfloat16":  # stored as raw uint16 bits
            v = (np.array([v]).astype(np.int64) & 0xFFFF).astype(np.uint32) << 16
            v = v.view(np.float32)[0]
        return Fraction(float(v))

    s = Fraction(doc["scalars"]["s"])
    exact = val("g", i) * (val("base", t, i) + s * val("lora", t, i))
    if "bias" in doc["tensors"]:
        exact += val("bias", i)
    n, d = (
        (int(x) for x in el["exact"]["rational"].split(" / "))
        if " / " in el["exact"]["rational"]
        else (int(el["exact"]["rational"]), 1)
    )
    assert Fraction(n, d) == exact
    err = Fraction(el["got"]["value"]) - exact
    assert el["error"]["value"] == pytest.approx(float(err), rel=1e-12)
    assert el["ratio"] == pytest.approx(abs(float(err)) / el["bound"], rel=1e-12) and el["ratio"] <= 1
    assert el["ratio"] == pytest.approx(doc["score"]["ratio"], rel=1e-3)


@pytest.mark.parametrize(
    "prefix", ["compose.delta-fp16", "form.naive-bf16", "lora_compose-fp16", "norm-fp32", "compose.backward-fp16"]
)
def test_every_supported_target_explains_within_its_bound(prefix):
    rep = explain_case(case(prefix))
    assert rep["elements"] and all(el["ratio"] is not None and el["ratio"] <= 1 for el in rep["elements"])
    assert all(el["error"]["ulp"] >= 0 and el["bound"] > 0 for el in rep["elements"])


def test_round_exact_ties_subnormals_and_overflow():
    bf16, fp16 = parse_format("bf16"), parse_format("fp16")
    assert round_exact(Fraction(8224), bf16) == 8192.0  # the tie between 8192 and 8256: to even
    assert round_exact(Fraction(8224) + Fraction(1, 10**6), bf16) == 8256.0  # above the tie (float64 → bf16 via
    # fp32 rounds this to 8192: the double rounding this function avoids)
    assert round_exact(Fraction(-3, 2**26), fp16) == -(2.0**-24)  # fp16 subnormal grid 2⁻²⁴: 0.75 → 1 step
    assert round_exact(Fraction(1, 2**26), fp16) == 0.0  # a quarter step: to zero
    assert round_exact(Fraction(70000), fp16) == float("inf") and round_exact(Fraction(0), bf16) == 0.0


def test_backward_elements_are_exact_per_output_and_save_mode():
    """compose.backward: d_base, d_lora, d_g under both save modes; each worst element's exact value recomputed
    here from the stored inputs (d_g: the exact T-sum), the error in ulps of its own format (d_g: fp32)."""
    path = case("compose.backward-bf16")
    rep = explain_case(path)
    names = [el["output"] for el in rep["elements"]]
    assert names == [f"{o}/{s}" for s in ("inputs", "activation") for o in ("d_base", "d_lora", "d_g")]
    data, doc = np.load(path.with_suffix(".npz")), json.loads(path.read_text())

    def col(name):
        a = np.array(data[name])
        if doc["tensors"][name] == "bfloat16":
            a = ((a.astype(np.int64) & 0xFFFF).astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float64)

    dy, base, lora, g = col("dy"), col("base"), col("lora"), col("g")
    s = Fraction(doc["scalars"]["s"])
    for el in rep["elements"]:
        got, rat = Fraction(el["got"]["value"]), el["exact"]["rational"]
        exact = Fraction(*(int(x) for x in rat.split(" / "))) if " / " in rat else Fraction(int(rat))
        if el["output"].startswith("d_g"):
            (i,) = el["index"]
            want = sum(Fraction(dy[t, i]) * (Fraction(base[t, i]) + s * Fraction(lora[t, i])) for t in range(len(dy)))
        else:
            t, i = el["index"]
            want = Fraction(g[i]) * Fraction(dy[t, i]) * (s if el["output"].startswith("d_lora") else 1)
        assert exact == want, el["output"]
        assert el["error"]["value"] == pytest.approx(float(got - exact), rel=1e-12, abs=1e-300)
        assert el["ratio"] is not None and el["ratio"] <= 1


def test_unsupported_targets_and_bad_paths_exit_2(tmp_path, capsys):
    src = case("compose.y-fp32")  # a layer case has no single-element story: refused in one line
    doc = json.loads(src.read_text())
    doc["target"] = "layer"
    (tmp_path / "layer.json").write_text(json.dumps(doc))
    (tmp_path / "layer.npz").write_bytes(src.with_suffix(".npz").read_bytes())
    with pytest.raises(ExplainError, match="no single-element story"):
        explain_case(tmp_path / "layer.json")
    assert main(["explain", str(tmp_path / "layer.json")]) == 2
    assert main(["explain", str(tmp_path / "missing.json")]) == 2
    assert main(["explain", "case.npz"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and "Traceback" not in err
    doc = json.loads(src.read_text())  # a case of a user's --impl: refused with what to do instead (no import attempt)
    doc["impl"] = "no_such_module:compose"
    (tmp_path / "u.json").write_text(json.dumps(doc))
    (tmp_path / "u.npz").write_bytes(src.with_suffix(".npz").read_bytes())
    assert main(["explain", str(tmp_path / "u.json")]) == 2
    err = capsys.readouterr().err
    assert "is a case of --impl no_such_module:compose" in err and "certify.replay" in err and err.count("\n") == 1


def test_cli_prints_text_and_strict_json(capsys):
    assert main(["explain", str(case("compose.y-fp32"))]) == 0
    out = capsys.readouterr().out
    assert "worst y element" in out and "exact      =" in out and "ratio" in out
    assert main(["explain", "--json", str(case("compose.y-fp32"))]) == 0
    doc = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(c))
    assert doc["target"] == "compose.y" and doc["elements"][0]["output"] == "y"


def test_gate_case_ids_explain_the_kernels_on_that_case(capsys):
    """A gate case id (as gate.md and `gate --list-cases` name them) explains the kernels on that case's inputs:
    compose cases as y, norm cases as ν; the element's exact value is the inputs' exact result."""
    from dora_verify.explain import explain_example, gate_case
    from dora_verify.gate import build_suite

    target, ex = gate_case("compose-bf16-03")
    suite = {c.id: c for c in build_suite(dtypes=("bf16",))}
    assert target == "compose.y" and ex.params == suite["compose-bf16-03"].example.params
    rep = explain_example("compose-bf16-03", target, ex)
    el = rep["elements"][0]
    assert el["output"] == "y" and el["ratio"] <= 1
    assert gate_case("norm-fp16-03")[0] == "norm"
    assert main(["explain", "norm-fp16-03"]) == 0
    out = capsys.readouterr().out
    assert "norm-fp16-03 (the gate's suite, seed 0; this project's kernels" in out and "exact ν" in out
    assert main(["gate", "--list-cases", "--dtypes", "fp16"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == [c.id for c in build_suite(dtypes=("fp16",))]
    assert any("norm, fp16, W 63×513, r 33" in line for line in listed)


def test_gate_case_ids_it_cannot_explain_exit_2(capsys):
    for bad in ("layer-bf16-00", "compose-bf16-99", "nonsense"):
        assert main(["explain", bad]) == 2, bad
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and "Traceback" not in err and "no single-element story" in err
    assert main(["explain", "backward-fp32-01"]) == 0  # the gate's backward cases: the kernels' compose backward
    assert "d_g/activation" in capsys.readouterr().out
