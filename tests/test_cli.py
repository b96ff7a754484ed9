"""CLI: bad arguments exit 2 with one line; a small sweep writes a complete, strict-JSON report."""
import json
import os
import stat

import pytest
import torch

from dora_verify.cli import main

SMALL = ["sweep", "--shape", "64x48", "--tokens", "32", "--grid-tokens", "8", "--rank", "4", "--ranks", "2,4",
         "--quiet"]


@pytest.mark.parametrize("argv,needle", [
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
    (["sweep", "--impl", "no_such_module:fn"], "cannot import"),
    (["nosuchcommand"], "invalid choice"),
])
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
    assert names == ["compose_error_vs_g.png", "norm_error.png", "report.json", "report.md"]
    rep = json.loads((out / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert rep["schema_version"] == "1.0" and rep["config"]["seed"] == 3 and rep["config"]["d_out"] == 64
    assert {"git", "versions", "device", "time_utc"} <= set(rep["provenance"])
    assert set(rep["experiments"]) == {"paper_figure1", "compose_g_sweep", "compose_regimes", "norm_regimes", "norm_rank"}
    forms = {r["form"] for r in rep["experiments"]["compose_g_sweep"]}
    assert forms == {"naive", "stable_gcast", "naive_fp32", "stable_fp32", "single_rounding"}
    assert rep["headline"]["paper_figure1"]["ratio_naive_over_stable_paper_protocol"] > 1
    md = (out / "report.md").read_text()
    assert "## Headline" in md and "paper" in md
    assert not any(p.name.startswith(".staging") for p in out.iterdir())


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
    assert set(rep["implementations"]) == {"impl:kernels", "impl:peft"}
    for exp in ("compose_g_sweep", "compose_regimes", "norm_regimes", "norm_rank"):
        names = {r["form"] for r in rep["experiments"][exp]}
        assert {"impl:kernels", "impl:peft"} <= names, exp
    rows = [r for r in rep["experiments"]["compose_regimes"] if r["form"] == "impl:kernels"]
    assert rows and all(r["y"]["max_ulp"] <= 1 and r["delta"] is None for r in rows)
    peft = [r for r in rep["experiments"]["compose_regimes"] if r["form"] == "impl:peft"]
    assert max(r["y"]["max_ulp"] for r in peft) > 1  # g rounded to bf16 and three roundings: not faithful
    norms = {r["form"]: r for r in rep["experiments"]["norm_regimes"] if r["regime"] == "trained"}
    assert norms["impl:kernels"]["max_rel"] < 1e-6 < norms["impl:peft"]["max_rel"]
    assert "impl:peft" in (out / "report.md").read_text()
