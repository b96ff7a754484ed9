"""CLI: every bad input exits 2 with one line (Ctrl-C: 130, one line); a small sweep writes a complete,
strict-JSON report; an --impl's failures are failed rows, its NaNs are visible."""

import csv
import errno
import json
import math
import os
import stat
import time

import pytest
import torch

import dora_verify.sweep as S
from dora_verify.cli import main
from dora_verify.report import load_report

SMALL = [
    "sweep",
    "--shape",
    "64x48",
    "--tokens",
    "32",
    "--grid-tokens",
    "8",
    "--rank",
    "4",
    "--ranks",
    "2,4",
    "--quiet",
]
FAST = SMALL + ["--regimes", "trained", "--no-plots"]
KERNELS = "impl:kernels[fused]" if torch.cuda.is_available() else "impl:kernels[eager]"  # the sweep's default impl


def one_line_error(capsys, needle):
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and err.startswith("dora-verify: error:"), err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["sweep", "--shape", "8192"], "malformed shape"),
        (["sweep", "--shape", "0x5"], "malformed shape"),
        (["sweep", "--shape", "axb"], "malformed shape"),
        (["sweep", "--dtype", "fp8"], "invalid choice"),
        (["sweep", "--rank", "0"], "positive integer"),
        (["sweep", "--tokens", "-3"], "positive integer"),
        (["sweep", "--ranks", "4,x"], "comma-separated"),
        (["sweep", "--alpha", "inf"], "finite"),
        (["sweep", "--regimes", "bogus"], "unknown regime"),
        (["sweep", "--device", "tpu"], "invalid choice"),
        (["sweep", "--impl", "forms"], "every form is in the sweep"),
        (["sweep", "--experiments", "bogus"], "unknown experiment(s) 'bogus'"),
        (["sweep", "--experiments", "accumulation,nope"], "choose from accumulation, scaling"),
        (["sweep", "--impl", "no_such_module:fn"], "cannot import"),
        (["nosuchcommand"], "invalid choice"),
        (["gate", "--seed", "-1"], "2**32"),
        (["certify", "--seed", str(2**63)], "2**32"),
        (["bench", "--seed", "x"], "integer seed"),
        (["bench", "--out", ""], "expected a path"),
        (["certify", "--corpus", " "], "expected a path"),
        (["gate", "--baseline", ""], "expected a path"),
        (["gate", "--case-timeout", "-1"], "number >= 0"),
        (["exhaustive", "--out", ""], "expected a path"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and err.startswith("dora-verify: error:")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_exits_2(capsys, tmp_path):
    assert main(SMALL + ["--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_directory_exits_2(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    assert main(SMALL + ["--out", str(ro / "x")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_out_path_that_is_a_file_exits_2(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(SMALL + ["--out", str(f)]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_small_sweep_writes_complete_report(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(SMALL + ["--out", str(out), "--seed", "3"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["compose_error_vs_g.png", "norm_error.png", "report.json", "report.md", "ulp_histogram.png"]
    rep = json.loads((out / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert rep["schema_version"] == S.SCHEMA_VERSION and rep["config"]["seed"] == 3 and rep["config"]["d_out"] == 64
    assert {"git", "versions", "device", "time_utc"} <= set(rep["provenance"])
    assert set(rep["experiments"]) == {
        "paper_figure1",
        "compose_g_sweep",
        "compose_regimes",
        "norm_regimes",
        "norm_rank",
    }
    forms = {r["form"] for r in rep["experiments"]["compose_g_sweep"]}  # the kernels are in by default (CPU: eager)
    assert forms == {"naive", "stable_gcast", "naive_fp32", "stable_fp32", "single_rounding", KERNELS}
    assert rep["headline"]["paper_figure1"]["ratio_naive_over_stable_paper_protocol"] > 1
    md = (out / "report.md").read_text()
    assert "## Headline" in md and "paper" in md and "y max ulp vs terms" in md and "ulp_histogram.png" in md
    y = rep["experiments"]["compose_regimes"][0]["y"]
    assert y["max_ulp_terms"] <= y["max_ulp"] and sum(y["ulp_hist"]) == sum(y["ulp_terms_hist"]) == 8 * 64
    assert not any(p.name.startswith(".staging") for p in out.iterdir())


def test_experiments_flag_runs_them_and_writes_their_sections(tmp_path):
    out = tmp_path / "rep"
    argv = [a for a in FAST if a != "--no-plots"]
    assert main(argv + ["--experiments", "accumulation", "--out", str(out)]) == 0
    assert {"accumulation_vs_block.png", "compose_error_vs_g.png", "report.json"} <= {p.name for p in out.iterdir()}
    rep = json.loads((out / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert rep["config"]["experiments"] == ["accumulation"] and "accumulation" in rep["timings_s"]
    acc = rep["experiments"]["accumulation"]
    assert acc["seeds"]["case"] == 0 and {r["form"] for r in acc["rows"]} >= {"seq_bf16", "pairwise_fp16", "sum2_fp64"}
    assert acc["headline"]["forms"]["seq_bf16"] == 256.0
    md = (out / "report.md").read_text()
    assert "## Experiment: accumulation" in md and "stalls at **256**" in md and "](accumulation_vs_block.png)" in md
    assert "![accumulation_vs_block]" not in md  # in its own section, not the general plot list


def test_experiment_names_parse_and_register_in_one_place():
    assert S.parse_experiments("none") == () == S.parse_experiments("")
    assert S.parse_experiments("all") == tuple(S.EXPERIMENTS)
    assert S.parse_experiments("scaling, accumulation,scaling") == ("scaling", "accumulation")
    for name in S.EXPERIMENTS:  # the interface sweep.EXPERIMENTS documents
        mod = S.experiment_module(name)
        assert all(callable(getattr(mod, f)) for f in ("run", "steps", "markdown"))
    with pytest.raises(ValueError, match="unknown experiment"):
        S.SweepConfig(experiments=("layer_typo",)).validate()


def test_same_seed_same_numbers(tmp_path):
    for d in ("a", "b"):
        assert main(SMALL + ["--out", str(tmp_path / d), "--no-plots"]) == 0
    a, b = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("a", "b"))
    assert a["experiments"] == b["experiments"] and a["headline"] == b["headline"]


def test_failed_write_leaves_previous_report_intact(tmp_path, monkeypatch):
    out = tmp_path / "rep"
    assert main(SMALL + ["--out", str(out), "--no-plots"]) == 0
    before = (out / "report.json").read_bytes()
    import dora_verify.report as R

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(R, "sweep_markdown", boom)
    with pytest.raises(RuntimeError):
        main(SMALL + ["--out", str(out), "--no-plots", "--seed", "9"])
    assert (out / "report.json").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]


def test_sweep_measures_implementations_beside_the_forms(tmp_path):
    """--impl adds rows for an implementation's y and ν (here this project's kernels and stock PEFT), measured
    against the same oracle as the forms; the kernels' y is faithful (≤ 1 ulp) where PEFT's bf16 arithmetic is not."""
    pytest.importorskip("peft")
    out = tmp_path / "rep"
    assert main(SMALL + ["--out", str(out), "--no-plots", "--impl", "kernels", "--impl", "peft"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["implementations"]) == {KERNELS, "impl:peft"}
    for exp in ("compose_g_sweep", "compose_regimes", "norm_regimes", "norm_rank"):
        names = {r["form"] for r in rep["experiments"][exp]}
        assert {KERNELS, "impl:peft"} <= names, exp
    rows = [r for r in rep["experiments"]["compose_regimes"] if r["form"] == KERNELS]
    assert rows and all(r["y"]["max_ulp"] <= 1 and r["delta"] is None for r in rows)
    peft = [r for r in rep["experiments"]["compose_regimes"] if r["form"] == "impl:peft"]
    assert max(r["y"]["max_ulp"] for r in peft) > 1  # g rounded to bf16 and three roundings: not faithful
    norms = {r["form"]: r for r in rep["experiments"]["norm_regimes"] if r["regime"] == "trained"}
    assert norms[KERNELS]["max_rel"] < 1e-6 < norms["impl:peft"]["max_rel"]
    assert "impl:peft" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--alpha", "0"], "positive number"),  # s = 0: no adapter (a ZeroDivisionError before)
        (["--alpha", "-2"], "positive number"),  # s < 0 only negates B
        (["--alpha", "nan"], "finite"),
        (["--alpha", "1e-300"], "LoRA scaling s"),  # s underflows to 0 in fp32
        (["--alpha", "1e300"], "LoRA scaling s"),  # s overflows fp32 (numpy's warning must not add a line)
        (["--seed", "-1"], "2**32"),
        (["--seed", str(2**32)], "2**32"),
        (["--seed", str(2**63)], "2**32"),
        (["--out", ""], "expected a path"),  # wrote report.json into the working directory before
    ],
)
def test_bad_sweep_values_exit_2_before_any_work(extra, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(FAST + ["--out", str(tmp_path / "rep")] + extra) == 2
    one_line_error(capsys, needle)
    assert os.listdir(tmp_path) == []


def test_sweep_too_large_for_the_machine_is_refused_at_once(tmp_path, capsys):
    t = time.time()
    assert main(FAST + ["--shape", "100000x100000", "--out", str(tmp_path / "rep")]) == 2
    assert time.time() - t < 5
    one_line_error(capsys, "GiB (estimate")
    assert not (tmp_path / "rep").exists()


def test_memory_estimate_accepts_a_small_sweep_and_refuses_past_what_is_available(monkeypatch):
    cfg = S.SweepConfig(d_out=64, d_in=48, tokens=32, grid_tokens=8, rank=4, ranks=(2, 4))
    need = 400 * 32 * 64 + 96 * 64 * 48 + 32 * 4 * (64 + 48 + 4) + 256 * 2**20  # the docstring's formula
    assert S.estimate_peak_bytes(cfg) == need
    assert S.check_memory(cfg, torch.device("cpu")) == need
    have, _ = S.available_bytes(torch.device("cpu"))
    assert have is None or have > need
    monkeypatch.setattr(S, "available_bytes", lambda device: (need - 1, "a tiny machine"))
    with pytest.raises(S.SweepMemoryError, match=r"needs about 0.3 GiB .* a tiny machine has 0.3 GiB available"):
        S.check_memory(cfg, torch.device("cpu"))


def test_full_disk_while_writing_the_report_exits_2_and_keeps_the_old_one(tmp_path, monkeypatch, capsys):
    out = tmp_path / "rep"
    assert main(FAST + ["--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    def enospc(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", enospc)
    assert main(FAST + ["--out", str(out), "--seed", "5"]) == 2
    one_line_error(capsys, "No space left on device")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and os.listdir(tmp_path) == ["rep"]


@pytest.mark.parametrize(
    "content,needle",
    [
        (None, "cannot read bench report"),  # no such file
        ("DIR", "cannot read bench report"),
        ("not json {", "cannot read bench report"),
        ("[1, 2]", "is not a dora-verify bench report"),
        ('{"kind": "sweep"}', "is not a dora-verify bench report"),
        ('{"kind": "bench"}', "is not a complete bench report: KeyError"),
        ('{"kind": "bench", "provenance": {"device": 3}, "config": {}}', "is not a complete bench report"),
    ],
)
def test_bench_render_of_anything_but_a_bench_report_exits_2(content, needle, tmp_path, capsys):
    src = tmp_path / "bench.json"
    if content == "DIR":
        src.mkdir()
    elif content is not None:
        src.write_text(content)
    assert main(["bench", "--render", str(src), "--out", str(tmp_path / "out"), "--no-plots"]) == 2
    one_line_error(capsys, needle)
    assert not (tmp_path / "out").exists()


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "run_sweep", interrupted)
    try:
        rc = main(FAST + ["--out", str(tmp_path / "rep")])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main")
    assert rc == 130 and capsys.readouterr().err == "dora-verify: interrupted\n"


def test_ctrl_c_while_writing_keeps_the_previous_report(tmp_path, monkeypatch, capsys):
    out = tmp_path / "rep"
    assert main(FAST + ["--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import dora_verify.report as R

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(R, "sweep_markdown", interrupted)
    try:
        assert main(FAST + ["--out", str(out), "--seed", "9"]) == 130
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and os.listdir(tmp_path) == ["rep"]


def test_gate_case_timeout_is_passed_through(monkeypatch, tmp_path, capsys):
    import dataclasses

    import dora_verify.gate as G

    seen = {}

    def fake_run_gate(cfg, progress=None):
        seen["case_timeout"] = cfg.case_timeout
        raise KeyboardInterrupt

    monkeypatch.setattr(G, "run_gate", fake_run_gate)
    rc = main(
        [
            "gate",
            "--impl",
            "form:naive",
            "--device",
            "cpu",
            "--case-timeout",
            "12.5",
            "--quiet",
            "--out",
            str(tmp_path / "g"),
        ]
    )
    if "case_timeout" in {f.name for f in dataclasses.fields(G.GateConfig)}:
        assert rc == 130 and seen["case_timeout"] == 12.5
    else:
        assert rc == 2 and "no per-case time limit" in capsys.readouterr().err


IMPLS = """
import numpy as np
import torch
from dora_verify.forms import COMPOSE_FORMS


def good(base, lora, g, s, bias=None):
    return COMPOSE_FORMS["single_rounding"].fn(base, lora, g, s)[0]


def returns_none(base, lora, g, s, bias=None):
    return None


def returns_ndarray(base, lora, g, s, bias=None):
    return np.zeros(tuple(base.shape), dtype=np.float32)


def returns_tuple(base, lora, g, s, bias=None):
    return good(base, lora, g, s), None, None


def returns_pair(base, lora, g, s, bias=None):
    return COMPOSE_FORMS["stable_gcast"].fn(base, lora, g, s)


def raises(base, lora, g, s, bias=None):
    raise RuntimeError("kernel exploded\\n  on a second line")


def off_by_2e6(base, lora, g, s, bias=None):
    return (good(base, lora, g, s).double() * (1 + 2.0**-6)).to(base.dtype)  # >= 2 ulp of bf16 off


def _loose_bound(base, lora, g, s):  # covers the 2^-6 relative error and the final rounding
    return 2.0**-5 * g.double().abs() * (base.double().abs() + abs(s) * lora.double().abs()) + 1e-30


def loose(base, lora, g, s, bias=None):
    return off_by_2e6(base, lora, g, s)


loose.compose_bound = _loose_bound


def bad_bound(base, lora, g, s, bias=None):
    return good(base, lora, g, s)


bad_bound.compose_bound = lambda base, lora, g, s: base[:1].double()


def wrong_dtype(base, lora, g, s, bias=None):
    return good(base, lora, g, s).float()


def all_nan(base, lora, g, s, bias=None):
    return torch.full_like(base, float("nan"))


def vandal(base, lora, g, s, bias=None):
    y = good(base, lora, g, s)
    base.zero_(), lora.fill_(float("nan")), g.zero_()
    return y


class BadNorm:
    compose = staticmethod(good)

    def norm(self, W, A, B, s):
        return None


class NanNorm:
    def norm(self, W, A, B, s):
        return torch.full((W.shape[0],), float("nan"))


class BrokenAttribute:
    @property
    def compose(self):
        raise RuntimeError("lazy init failed")
"""


@pytest.fixture
def impls(tmp_path, monkeypatch):
    (tmp_path / "dv_cli_impls.py").write_text(IMPLS)
    (tmp_path / "dv_cli_broken.py").write_text("raise RuntimeError('broken at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return lambda *names: sum((["--impl", f"dv_cli_impls:{n}"] for n in names), [])


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("dv_cli_impls:BrokenAttribute", "lazy init failed"),
        ("dv_cli_broken:fn", "broken at import"),
        ("dv_cli_impls:nothing", "has no attribute"),
    ],
)
def test_impl_that_cannot_be_loaded_exits_2(spec, needle, impls, tmp_path, capsys):
    assert main(FAST + ["--impl", spec, "--out", str(tmp_path / "rep")]) == 2
    one_line_error(capsys, needle)
    assert not (tmp_path / "rep").exists()


def test_impl_failures_at_run_time_are_failed_rows(impls, tmp_path, capsys):
    out = tmp_path / "rep"
    assert (
        main(
            FAST
            + impls("returns_none", "returns_ndarray", "returns_tuple", "raises", "wrong_dtype", "BadNorm")
            + ["--out", str(out)]
        )
        == 1
    )
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err and "implementation call(s) FAILED" in cap.out
    rep = json.loads((out / "report.json").read_text())
    rows = {}
    for exp in ("compose_g_sweep", "compose_regimes", "norm_regimes", "norm_rank"):
        for r in rep["experiments"][exp]:
            rows.setdefault((exp, r["form"]), set()).add(r.get("failed"))
    want = {
        "returns_none": "compose returned builtins.NoneType, want a torch.Tensor",
        "returns_ndarray": "compose returned numpy.ndarray, want a torch.Tensor",
        "returns_tuple": "compose returned a tuple of 3, want y or (y, delta)",
        "raises": "compose raised RuntimeError: kernel exploded on a second line",
        "wrong_dtype": "compose returned float32 (8, 64), want bfloat16 (8, 64)",
    }
    for name, msg in want.items():
        assert rows[("compose_regimes", f"impl:dv_cli_impls:{name}")] == {msg}
        assert rows[("compose_g_sweep", f"impl:dv_cli_impls:{name}")] == {msg}
    assert rows[("compose_regimes", "impl:dv_cli_impls:BadNorm")] == {None}  # its compose is fine
    assert rows[("norm_rank", "impl:dv_cli_impls:BadNorm")] == {"norm returned builtins.NoneType, want a torch.Tensor"}
    md = (out / "report.md").read_text()
    assert "## Failed implementation calls" in md and "**failed**" in md and "kernel exploded" in md


def test_nonfinite_results_are_visible_not_exact(impls, tmp_path):
    out = tmp_path / "rep"
    assert main(FAST + impls("all_nan", "NanNorm") + ["--out", str(out), "--csv"]) == 0
    text = (out / "report.json").read_text()

    def refuse(token):
        raise AssertionError(f"non-standard JSON token {token}")

    raw = json.loads(text, parse_constant=refuse)  # strict JSON: no NaN/Infinity tokens

    def strings(o):
        if isinstance(o, dict):
            return [x for v in o.values() for x in strings(v)]
        return [x for v in o for x in strings(v)] if isinstance(o, list) else [o] if isinstance(o, str) else []

    nonfinite = raw.pop("nonfinite")
    assert nonfinite and not {"inf", "-inf", "nan"} & set(strings(raw))  # no strings standing in for numbers
    i = next(i for i, r in enumerate(raw["experiments"]["compose_regimes"]) if r["form"] == "impl:dv_cli_impls:all_nan")
    assert raw["experiments"]["compose_regimes"][i]["y"]["max_ulp"] is None
    assert nonfinite[f"/experiments/compose_regimes/{i}/y/max_ulp"] == "inf"
    rep = load_report(out / "report.json")
    y = rep["experiments"]["compose_regimes"][i]["y"]
    assert (
        y["max_ulp"] == math.inf
        and y["max_abs"] == math.inf
        and y["nan"] == 8 * 64
        and y["frac_correctly_rounded"] == 0
    )
    assert rep["headline"]["below_resolution"]["by_form"]["impl:dv_cli_impls:all_nan"]["y_max_ulp_max"] == math.inf
    nu = next(r for r in rep["experiments"]["norm_regimes"] if r["form"] == "impl:dv_cli_impls:NanNorm")
    assert nu["max_rel"] == math.inf and nu["nan"] == 64
    with open(out / "report.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    cell = next(
        r
        for r in rows
        if r["section"] == "experiments.compose_regimes" and r["record"] == str(i) and r["field"] == "y.max_ulp"
    )
    assert float(cell["value"]) == math.inf
    assert any(r["field"] == "form" and r["text"] == "impl:dv_cli_impls:all_nan" for r in rows)
    sections = {r["section"] for r in rows}  # one section per experiment, whether a table or a record
    assert {"headline", "experiments.paper_figure1", "experiments.compose_g_sweep"} <= sections, sections
    assert "experiments" not in sections
    numeric = [float(r["value"]) for r in rows if r["value"]]  # every value column entry parses as a float
    assert len(numeric) > 100 and "report.csv" in (out / "report.md").read_text()
    md = (out / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| trained | impl:dv_cli_impls:all_nan |"))
    assert row.split(" | ")[2] == "inf" and "512 NaN" in row
    _parquet_round_trip(out, i)


def _parquet_round_trip(out, i):
    """What a researcher does with the data: the CSV into pandas (a float64 value column, ±Inf and NaN as floats)
    and the JSON records flattened into a frame, each through Parquet and back unchanged."""
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    frames = {"csv": pd.read_csv(out / "report.csv")}
    assert frames["csv"]["value"].dtype == "float64"
    frames["regimes"] = pd.json_normalize(load_report(out / "report.json")["experiments"]["compose_regimes"])
    assert frames["regimes"].loc[i, "y.max_ulp"] == math.inf
    for name, df in frames.items():
        for c in [
            c for c in df.columns if df[c].dtype == "object"
        ]:  # missing entries of list/str columns: None (Parquet's null)
            df[c] = df[c].astype(object).where(df[c].notna(), None)
        path = out / f"{name}.parquet"
        df.to_parquet(path)
        back = pd.read_parquet(path)
        pd.testing.assert_frame_equal(back, df, check_dtype=True)


def test_impl_gets_its_own_copies_of_the_inputs(impls, tmp_path):
    assert main(FAST + ["--impl", "none", "--out", str(tmp_path / "a")]) == 0
    assert main(FAST + impls("vandal") + ["--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "report.json").read_text())["experiments"] for d in ("a", "b"))
    for exp in a:
        mine = (
            [r for r in b[exp] if not str(r.get("form", "")).startswith("impl:")]
            if isinstance(b[exp], list)
            else b[exp]
        )
        assert mine == a[exp], exp
    rows = b["compose_g_sweep"]

    def values(form):  # the errors (not the bound ratio: the form's derived bound vs the --impl's faithful 1 ulp)
        return [{k: v for k, v in r["y"].items() if k != "bound_ratio"} for r in rows if r["form"] == form]

    vandal = values("impl:dv_cli_impls:vandal")
    assert len(vandal) > 1 and vandal == values("single_rounding")  # it computes that


def test_no_plots_leaves_no_empty_heading_and_layer_impls_are_named(tmp_path, monkeypatch):
    """--no-plots: no empty '## Plots' heading; a layer-only --impl is listed as what it is, not '(norm only)'."""
    (tmp_path / "onlylayer.py").write_text(
        "from dora_verify.kernels import DoRALinear\n"
        "def factory(linear, r, alpha):\n    return DoRALinear(linear, r, alpha)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "s"
    assert (
        main(
            [
                "sweep",
                "--shape",
                "64x32",
                "--tokens",
                "16",
                "--grid-tokens",
                "16",
                "--ranks",
                "4",
                "--impl",
                "onlylayer:factory",
                "--no-plots",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    md = (out / "report.md").read_text()
    assert "## Plots" not in md and "`--impl onlylayer:factory` (layer)" in md


@pytest.mark.parametrize("dtype,thr,points", [("fp16", "2⁻¹²", True), ("fp32", "2⁻²⁵", False)])
def test_report_text_is_true_for_its_dtype(tmp_path, dtype, thr, points):
    """fp16 and fp32 sweeps say what holds in their format: the resolution below which g rounds to 1 is the
    format's own (bf16's 2⁻⁹ appears nowhere), fp32's grid has no sub-resolution point ≥ 1e-4 and says so, and the
    sentence on the stable form at g = 1 follows the measured error."""
    out = tmp_path / dtype
    assert main(SMALL + ["--regimes", "trained", "--dtype", dtype, "--out", str(out)]) == 0
    rep = load_report(out / "report.json")
    b = rep["headline"]["below_resolution"]
    assert b["dtype"] == dtype and b["threshold"] == {"fp16": 2.0**-12, "fp32": 2.0**-25}[dtype]
    assert bool(b["points"]) == points
    md = (out / "report.md").read_text()
    assert f"< {thr}**" in md and f"g rounds to exactly 1 in {dtype}" in md and "2⁻⁹" not in md
    assert ("No point of this g grid" in md) == (not points)
    exact = rep["experiments"]["paper_figure1"]["forms"]["stable_gcast"]["max_abs_vs_exact"] == 0
    assert ("the stable form is exact" in md) == exact


def test_g_grid_sets_the_g_sweep(tmp_path, capsys):
    out = tmp_path / "g"
    assert main(FAST + ["--g-grid", "1e-3:1e-1:2", "--out", str(out)]) == 0
    rep = load_report(out / "report.json")
    gs = sorted({r["g_minus_1"] for r in rep["experiments"]["compose_g_sweep"]})
    mags = [abs(g) for g in gs if g]
    assert rep["config"]["g_grid"] == [1e-3, 1e-1, 2] and min(mags) <= 1e-3 + 1e-12 and max(mags) == pytest.approx(0.1)
    assert len([g for g in gs if g > 0]) == 5 + 3  # 1e-3 … 1e-1 at 2 a decade, and bf16's three positive offsets
    for bad in ("1e-1:1e-3:2", "0:1e-1:2", "1e-3:2:2", "1e-3:1e-1:0", "1e-3:1e-1"):
        assert main(FAST + ["--g-grid", bad, "--out", str(tmp_path / "x")]) == 2
        assert "--g-grid" in capsys.readouterr().err


def test_an_impl_returning_y_and_delta_gets_delta_metrics(impls, tmp_path):
    """--impl forms may return (y, Δ), as the package's own forms do: the report then measures Δ too (the same
    numbers as the form it wraps), and y alone still works (Δ columns empty)."""
    out = tmp_path / "rep"
    assert main(FAST + impls("returns_pair", "good") + ["--out", str(out)]) == 0
    rows = {r["form"]: r for r in load_report(out / "report.json")["experiments"]["compose_regimes"]}
    pair, form = rows["impl:dv_cli_impls:returns_pair"], rows["stable_gcast"]
    same = lambda m: {k: v for k, v in m.items() if k != "bound_ratio"}  # noqa: E731 - the bounds differ (below)
    assert (
        pair["delta"] is not None and same(pair["delta"]) == same(form["delta"]) and same(pair["y"]) == same(form["y"])
    )
    assert rows["impl:dv_cli_impls:good"]["delta"] is None
    # the form is held to its derived bound, the --impl (no compose_bound) to the faithful 1 ulp; no Δ bound for it
    assert form["y"]["bound_ratio"] <= 1 and form["delta"]["bound_ratio"] <= 1
    assert pair["y"]["bound_ratio"] is not None and pair["delta"]["bound_ratio"] is None


def test_the_sweep_holds_every_row_to_its_bound(impls, tmp_path):
    """bound_ratio: the forms and the kernels within their derived bounds (proofs/bounds.md) on every row; an --impl
    two ulps off fails the faithful 1 ulp, the same values pass the implementation's own looser ``compose_bound``,
    and a compose_bound of the wrong shape fails its row in one line."""
    out = tmp_path / "rep"
    assert (
        main(FAST + impls("off_by_2e6", "loose", "bad_bound") + ["--impl", "kernels", "--out", str(out)]) == 1
    )  # bad_bound
    rep = load_report(out / "report.json")
    summary = rep["headline"]["bound_ratio"]
    for form in ("naive", "stable_gcast", "naive_fp32", "stable_fp32", "single_rounding", KERNELS):
        assert summary[form]["rows"] > 0 and summary[form]["rows_over"] == 0 and 0 < summary[form]["y_max"] <= 1, form
    off, loose = summary["impl:dv_cli_impls:off_by_2e6"], summary["impl:dv_cli_impls:loose"]
    assert off["rows_over"] == off["rows"] > 0 and off["y_max"] > 1.5
    assert loose["rows_over"] == 0 and 0 < loose["y_max"] <= 1
    bad = [r for r in rep["experiments"]["compose_regimes"] if r["form"] == "impl:dv_cli_impls:bad_bound"]
    assert bad and all(
        "compose_bound failed: ValueError: compose_bound's y bound must be a tensor of shape (" in r["failed"]
        and "got float64 (1, " in r["failed"]
        for r in bad
    )
    md = (out / "report.md").read_text()
    assert "against the bound it is held to" in md and "y bound ratio" in md


def test_impl_none_leaves_the_kernels_out(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(FAST + ["--impl", "none", "--out", str(out)]) == 0
    forms = {r["form"] for r in load_report(out / "report.json")["experiments"]["compose_g_sweep"]}
    assert not any(f.startswith("impl:") for f in forms) and load_report(out / "report.json")["config"]["impls"] == []
    assert main(FAST + ["--impl", "none", "--impl", "peft", "--out", str(out)]) == 2
    assert "--impl none" in capsys.readouterr().err
