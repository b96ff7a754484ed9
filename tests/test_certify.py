"""dora_verify.certify: the committed corpus replays under its bounds, the derandomized pre-merge search
certifies the kernels, and the search finds planted defects (so it can fail)."""

import json
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings

import dora_verify.kernels as K
from dora_verify import certify
from dora_verify.cli import main
from dora_verify.strategies import compose_examples, norm_examples, value_from_bits

CORPUS = Path(__file__).parent / "corpus"
CASES = sorted(CORPUS.glob("*.json"))


def test_corpus_is_committed():
    assert len(CASES) >= 10, "tests/corpus holds the worst cases found by `dora-verify certify`"


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_corpus_case_replays_under_its_bound(case):
    score = certify.replay(case, "cpu")
    assert score.ratio <= 1.0, (case.name, score.parts)
    assert score.ratio > 0.05, "a kept worst case should come close to its bound"


def _first_example(strategy):
    box = []

    @settings(max_examples=1, database=None, derandomize=True)
    @given(strategy)
    def draw(ex):
        box.append(ex)

    draw()
    return box[0]


def test_corpus_roundtrip_is_bit_exact(tmp_path):
    ex = _first_example(compose_examples("bf16"))
    sc = certify.Score(0.5, 0.5, {"y": 0.5})
    path = certify.save_case("compose.y", ex, sc, tmp_path, {"note": "test"})
    target, back, doc = certify.load_case(path)
    assert target == "compose.y" and doc["note"] == "test" and back.params == json.loads(json.dumps(ex.params))
    for k, v in ex.tensors.items():
        assert back.tensors[k].dtype == v.dtype and torch.equal(back.tensors[k].view(torch.uint8), v.view(torch.uint8))


@pytest.mark.parametrize("target", certify.KERNEL_TARGETS)
def test_premerge_search_certifies_the_kernels(target):
    """Derandomized, fixed budget: the same examples on every run (what CI gates on)."""
    for dtype in certify.TARGETS[target].dtypes:
        res = certify.search(target, dtype, examples=25, device="cpu")
        assert res["examples"] >= 20 and not res["violation"], (target, dtype, res["parts_max"])
        assert 0.3 < res["max_ratio"] <= 1.0  # tight, not vacuous


def test_derandomized_search_is_reproducible():
    a = certify.search("compose.y", "bf16", examples=15, device="cpu")
    b = certify.search("compose.y", "bf16", examples=15, device="cpu")
    assert a["ratio"] == b["ratio"] and a["max_ulp"] == b["max_ulp"]


def _planted_compose(kind):
    real = K.compose

    def broken(base, lora, g, s, bias=None, **kw):
        if kind == "gcast":  # the bug this project exists to catch: g rounded to the activation dtype
            g = g.to(base.dtype).to(torch.float32)
        out = real(base, lora, g, s, bias, **kw)
        if kind == "mask" and out.shape[-1] > 1:  # off-by-one at the tail: the last column left from base
            out = out.clone()
            out[..., -1] = base[..., -1] if kw.get("output", "y") == "y" else 0
        return out

    return broken


@pytest.mark.parametrize("kind,target", [("gcast", "compose.y"), ("gcast", "compose.delta"), ("mask", "compose.y")])
def test_search_finds_planted_defects(monkeypatch, tmp_path, kind, target):
    """Found, shrunk, and the search goes on to its budget: every example budgeted runs, the corpus holds each
    distinct violation (and distinct worst cases) once."""
    monkeypatch.setattr(K, "compose", _planted_compose(kind))
    res = certify.search(target, "bf16", examples=60, device="cpu", corpus=tmp_path, keep=5)
    assert res["violation"] and res["violations"] >= 1, res["parts_max"]
    assert res["examples"] == 60 and res["rounds"][0]["violation"] and res["shrink_evaluations"] > 0  # outside
    doc = json.loads(Path(res["corpus"][0]).read_text())
    assert doc["found_by"] == "violation" and float(doc["score"]["ratio"]) > 1
    found = [json.loads(Path(c).read_text())["found_by"] for c in res["corpus"]]
    assert found.count("violation") == res["violations"] and len(set(res["corpus"])) == len(res["corpus"])
    monkeypatch.undo()  # the shrunk case passes with the real kernel
    assert certify.replay(res["corpus"][0]).ratio <= 1.0


def test_search_goes_on_after_a_violation_to_its_budget(monkeypatch):
    """The first violation ends the derandomized round, not the search: seeded rounds spend the rest of the budget,
    the same ones on every run (a pre-merge search stays a function of the code and the seed)."""
    monkeypatch.setattr(K, "compose", _planted_compose("gcast"))
    runs = [certify.search("compose.y", "bf16", examples=400, device="cpu") for _ in range(2)]
    res = runs[0]
    assert res["examples"] == 400 and len(res["rounds"]) >= 2 and res["rounds"][0]["seed"] is None
    assert [r["seed"] for r in res["rounds"][1:]] == list(range(1, len(res["rounds"])))
    assert res["max_ratio"] > 1 and res["violations"] >= 1
    assert runs[1]["rounds"] == res["rounds"] and runs[1]["max_ratio"] == res["max_ratio"]


def test_naive_form_breaks_the_kernel_bound(monkeypatch):
    """The naive form, certified against the production kernel's bound, is caught."""
    from dora_verify.forms import naive

    monkeypatch.setattr(K, "compose", lambda base, lora, g, s, bias=None, **kw: naive(base, lora, g, s, bias)[0])
    assert certify.search("compose.y", "bf16", examples=60, device="cpu")["violation"]


@settings(max_examples=30, deadline=None, database=None)
@given(compose_examples("fp16"))
def test_compose_examples_are_finite_and_well_formed(ex):
    t = ex.tensors
    assert t["base"].shape == t["lora"].shape == t["dy"].shape == (ex.params["T"], ex.params["N"])
    assert t["g"].dtype == torch.float32 and t["g"].shape == (ex.params["N"],)
    assert all(bool(torch.isfinite(v).all()) for v in t.values())


@settings(max_examples=10, deadline=None, database=None)
@given(norm_examples("bf16"))
def test_norm_examples_are_finite(ex):
    assert all(bool(torch.isfinite(v).all()) for v in ex.tensors.values())


def test_value_from_bits_folds_non_finite():
    assert value_from_bits(0x3F80, "bf16") == 1.0 and value_from_bits(0x3C00, "fp16") == 1.0
    assert value_from_bits(0x7F80, "bf16") == 1.0  # +Inf pattern folded to a finite value
    assert value_from_bits(0x7C00, "fp16") == 1.0
    assert value_from_bits(0x7FC00000, "fp32") == value_from_bits(0x3FC00000, "fp32")
    assert value_from_bits(0x8001, "bf16") < 0


def test_certify_cli(tmp_path, capsys):
    out = tmp_path / "rep"
    assert (
        main(["certify", "--targets", "compose.y", "--dtypes", "fp16", "--examples", "8", "--out", str(out), "--quiet"])
        == 0
    )
    rep = json.loads((out / "certify.json").read_text())
    assert rep["certified"] and rep["results"][0]["examples"] == 8 and (out / "certify.md").exists()
    assert list((out / "corpus").glob("*.npz"))
    for bad in (
        ["certify", "--targets", "nope"],
        ["certify", "--dtypes", "int8"],
        ["certify", "--examples", "0"],
        ["certify", "--seconds", "-1"],
    ):
        assert main(bad + ["--out", str(out)]) == 2
    assert "error" in capsys.readouterr().err


def test_certify_cli_exit_1_on_violation(tmp_path, monkeypatch):
    monkeypatch.setattr(K, "compose", _planted_compose("gcast"))
    assert (
        main(
            [
                "certify",
                "--targets",
                "compose.y",
                "--dtypes",
                "bf16",
                "--examples",
                "60",
                "--out",
                str(tmp_path),
                "--quiet",
            ]
        )
        == 1
    )


def test_a_crash_is_recorded_as_a_finding(monkeypatch, tmp_path):
    def crashing(*a, **kw):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(K, "compose", crashing)
    res = certify.search("compose.y", "fp16", examples=10, device="cpu", corpus=tmp_path)
    assert res["violation"] and "kernel exploded" in res["info"]["error"]


def test_search_rejects_bad_arguments():
    with pytest.raises(ValueError, match="target"):
        certify.search("compose.z", "bf16", examples=1)
    with pytest.raises(ValueError, match="target"):
        certify.search("lora_compose", "fp32", examples=1)
    with pytest.raises(ValueError, match="examples"):
        certify.search("compose.y", "bf16", examples=0)


def test_certify_an_implementation_under_the_faithful_contract(tmp_path):
    """--impl: a faithful wrapper certifies; a planted g-cast is found, and its corpus case replays as a violation."""
    sys.path.insert(0, str(Path(__file__).parent))  # tests/planted_impls.py
    good = certify.search("good.compose", "fp16", examples=30, device="cpu", impl="planted_impls:Good")
    assert not good["violation"] and good["max_ratio"] <= 1 and good["tier"] is None
    bad = certify.search(
        "planted_impls_gcast.compose", "bf16", examples=80, device="cpu", corpus=tmp_path, impl="planted_impls:gcast"
    )
    assert bad["violation"] and bad["max_ratio"] > 1
    assert certify.replay(bad["corpus"][0]).ratio > 1


def test_certify_cli_impl_peft(tmp_path, capsys):
    """Stock PEFT's DoRA under the faithful contract: its bf16 compose (g rounded to bf16), its ν (in the
    weight dtype) and its layer (NaN on zero rows, g in bf16) all violate it; certify exits 1 and names the targets."""
    pytest.importorskip("peft")
    assert (
        main(["certify", "--impl", "peft", "--dtypes", "bf16", "--examples", "40", "--out", str(tmp_path), "--quiet"])
        == 1
    )
    rep = json.loads((tmp_path / "certify.json").read_text())
    assert rep["config"]["impl"] == "peft" and {r["target"] for r in rep["results"]} == {
        "peft.compose",
        "peft.norm",
        "peft.layer",
    }
    assert all(r["violation"] for r in rep["results"])
    assert "--impl peft" in (tmp_path / "certify.md").read_text()
    for bad, msg in (
        (["--impl", "kernels"], "certify's own targets"),
        (["--impl", "peft", "--targets", "compose.y"], "unknown target"),
    ):
        assert main(["certify", *bad, "--out", str(tmp_path)]) == 2
        assert msg in capsys.readouterr().err


# ----------------------------------------------------------------------------- never certified on nothing
def test_zero_examples_is_not_certified(tmp_path, capsys):
    """A budget spent before the first example used to print 'certified: 0 examples' and exit 0."""
    out = tmp_path / "rep"
    rc = main(
        ["certify", "--targets", "compose.y", "--dtypes", "fp16", "--seconds", "1e-9", "--out", str(out), "--quiet"]
    )
    err = capsys.readouterr()
    assert rc == 2 and "nothing certified: 0 examples ran for compose.y/fp16" in err.err and err.err.count("\n") == 1
    assert "certified:" not in err.out and not (out / "certify.json").exists()
    with pytest.raises(certify.CertifyError):
        certify.run_certify(certify.CertifyConfig(targets=("compose.y",), dtypes=("fp16",), seconds=1e-9, device="cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fused tier without a GPU")
def test_fused_tier_without_gpu_or_interpreter_is_an_environment_error(tmp_path, monkeypatch, capsys):
    """It used to run, crash in every example, report 'VIOLATION ... ratio inf' and write a corpus entry."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "rep"
    rc = main(
        [
            "certify",
            "--tier",
            "fused",
            "--device",
            "cpu",
            "--targets",
            "compose.y",
            "--dtypes",
            "fp16",
            "--examples",
            "3",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    err = capsys.readouterr()
    assert rc == 2 and "--tier fused cannot run on cpu" in err.err and "TRITON_INTERPRET=1" in err.err
    assert "VIOLATION" not in err.out and not list(out.rglob("*.json")) and not list(out.rglob("*.npz"))


def _impl_search(name, target, dtype, tmp_path, examples=10):
    sys.path.insert(0, str(Path(__file__).parent))  # tests/planted_impls.py
    return certify.search(target, dtype, examples=examples, device="cpu", corpus=tmp_path, impl=f"planted_impls:{name}")


@pytest.mark.parametrize("target", ["zero_inputs.compose", "zero_inputs.norm"])
def test_an_impl_that_zeroes_its_inputs_is_found_and_its_case_replays(tmp_path, target):
    """--impl calls get their own copies: the corpus keeps the drawn inputs, not the zeros the implementation
    left in them (whose replay would 'pass': zeros are exact for zero inputs)."""
    res = _impl_search("zero_inputs", target, "fp32", tmp_path)
    assert res["violation"] and res["examples"] >= 1
    _, ex, _ = certify.load_case(res["corpus"][0])
    assert any(bool((v != 0).any()) for v in ex.tensors.values())
    assert certify.replay(res["corpus"][0]).ratio > 1


@pytest.mark.parametrize(
    "name,reason",
    [
        ("exits", "SystemExit(0)"),
        ("raises", "RuntimeError: planted failure"),
        ("returns_none", "compose returned None, want a torch.Tensor"),
        ("returns_numpy", "compose returned a numpy.ndarray"),
    ],
)
def test_an_impl_that_exits_raises_or_returns_junk_is_a_crash_finding(tmp_path, name, reason):
    target = f"planted_impls_{name}.compose" if name in ("exits", "raises") else f"{name}.compose"
    res = _impl_search(name, target, "fp32", tmp_path, examples=3)
    assert res["violation"] and reason in res["info"]["error"] and "\n" not in res["info"]["error"]


def test_a_crash_is_named_in_the_summary_and_the_markdown(tmp_path):
    """An implementation that exits: certify's one-line summary and certify.md say it crashed and why (the reason
    was in certify.json only; the summary read just 'ratio inf')."""
    import subprocess
    import sys

    (tmp_path / "exits_impl.py").write_text("import sys\ndef exiter(base, lora, g, s, bias=None):\n    sys.exit(0)\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dora_verify",
            "certify",
            "--impl",
            "exits_impl:exiter",
            "--dtypes",
            "fp32",
            "--examples",
            "3",
            "--out",
            str(tmp_path / "c"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 1 and "crashed" in r.stdout and "SystemExit(0)" in r.stdout
    assert "SystemExit(0)" in (tmp_path / "c" / "certify.md").read_text()


# ----------------------------------------------------------------------------- whole-layer targets
def test_certify_the_doralinear_layer_target():
    """--targets layer: DoRALinear's whole layer (y, dx, dA, dB, dm) within the bound of its stated steps."""
    assert "layer" in certify.TARGETS and "layer" not in certify.KERNEL_TARGETS
    res = certify.search("layer", "bf16", examples=12, device="cpu")
    assert res["examples"] == 12 and not res["violation"] and res["max_ratio"] <= 1
    assert {"y", "dx", "dA", "dB", "dm"} <= {k.split("/")[0] for k in res["parts_max"]}


def test_certify_cli_with_a_layer_factory(tmp_path, capsys):
    """A layer-only factory: its target NAME.layer is the default ('all'), the faithful one certifies."""
    sys.path.insert(0, str(Path(__file__).parent))  # tests/planted_impls.py
    assert list(certify.impl_targets("planted_impls:good_layer")) == ["planted_impls_good_layer.layer"]
    rc = main(
        [
            "certify",
            "--impl",
            "planted_impls:good_layer",
            "--dtypes",
            "fp16",
            "--examples",
            "8",
            "--out",
            str(tmp_path),
            "--quiet",
        ]
    )
    assert rc == 0, capsys.readouterr()
    rep = json.loads((tmp_path / "certify.json").read_text())
    assert [r["target"] for r in rep["results"]] == ["planted_impls_good_layer.layer"] and rep["certified"]
    assert "faithful layer contract" in (tmp_path / "certify.md").read_text()


@pytest.mark.parametrize("planted", ["nu_not_detached", "g_bf16"])
def test_certify_finds_planted_layers(tmp_path, planted):
    """ν left in the graph (dA, dB off) and g rounded to bf16 (y off in fp32): found, and the case replays."""
    sys.path.insert(0, str(Path(__file__).parent))
    res = certify.search(
        f"planted_impls_{planted}.layer",
        "fp32",
        examples=40,
        device="cpu",
        corpus=tmp_path,
        impl=f"planted_impls:{planted}",
    )
    assert res["violation"] and res["max_ratio"] > 1
    assert certify.replay(res["corpus"][0]).ratio > 1


def test_kept_worst_cases_are_shrunk_to_the_sub_problem_that_shows_them(tmp_path):
    """A non-violating worst case is restricted (rows and columns halved) while its ratio holds: the compose is
    elementwise, so the kept case is far smaller than drawn and replays at the ratio the search found."""
    res = certify.search("compose.y", "fp32", examples=12, device="cpu", corpus=tmp_path, keep=2)
    assert not res["violation"] and res["corpus"] and res["shrink_evaluations"] > 0
    for path in res["corpus"]:
        doc = json.loads(Path(path).read_text())
        cut = doc["params"].get("restricted")
        if cut is None:  # nothing smaller kept the ratio (a 1 x 1 draw, or a ratio spread over the case)
            continue
        rows, cols, (T, N) = cut["rows"], cut["cols"], cut["of"]
        assert (rows[1] - rows[0]) * (cols[1] - cols[0]) < T * N
        _, ex, _ = certify.load_case(path)
        assert tuple(ex.tensors["base"].shape) == (rows[1] - rows[0], cols[1] - cols[0])
        assert certify.replay(path).ratio == pytest.approx(float(doc["score"]["ratio"]), rel=1e-12)
    assert any("restricted" in json.loads(Path(p).read_text())["params"] for p in res["corpus"])


def test_restrict_slices_each_kind_along_its_token_and_feature_axes():
    from dora_verify.strategies import Example

    t = {
        "base": torch.ones(6, 4),
        "lora": torch.ones(6, 4),
        "dy": torch.ones(6, 4),
        "g": torch.ones(4),
        "g_minus_1": torch.zeros(4),
    }
    ex = certify.restrict(Example("compose", "fp32", t, {"s": 1.0}), (2, 5), (1, 3))
    assert ex.tensors["base"].shape == (3, 2) and ex.tensors["g"].shape == (2,)
    assert ex.params["restricted"] == {"rows": [2, 5], "cols": [1, 3], "of": [6, 4]}
    n = {"W": torch.ones(5, 7), "B": torch.ones(5, 2), "A": torch.ones(2, 7)}
    ex = certify.restrict(Example("norm", "fp32", n, {"s": 1.0}), (0, 1), (3, 5))
    assert ex.tensors["W"].shape == (2, 7) and ex.tensors["B"].shape == (2, 2) and ex.tensors["A"].shape == (2, 7)
    seen = []

    def evaluate(e):  # the finding lives in column 3 only
        seen.append(e)
        return certify.Score(
            2.0 if e.params["restricted"]["cols"][0] <= 3 < e.params["restricted"]["cols"][1] else 0.5, 0.0
        )

    small, sc, evals = certify.shrink_restriction(
        Example("norm", "fp32", n, {"s": 1.0}), certify.Score(2.0, 0.0), evaluate
    )
    assert small.params["restricted"]["cols"] == [3, 4] and sc.ratio == 2.0 and evals == len(seen)
