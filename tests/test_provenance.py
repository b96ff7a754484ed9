"""dora_verify.provenance: what a report records about where its numbers came from — the commit and whether the
tree differs from it (untracked files included), the CPU model and ISA flags, the source hash of an --impl
module, and the PNG text chunks that tie a plot to its report."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from dora_verify import provenance as P
from dora_verify.report import write_bundle


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.delenv("DORA_VERIFY_COMMIT", raising=False)
    r = tmp_path / "repo"
    r.mkdir()
    _git(r, "init", "-q")
    (r / "a.txt").write_text("a\n")
    _git(r, "add", "a.txt")
    _git(r, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "a")
    return r


def test_an_untracked_file_makes_the_tree_dirty(repo):
    clean = P.git_state(repo)
    assert clean["dirty"] is False and clean["untracked"] == 0 and len(clean["commit"]) == 40
    (repo / "new.py").write_text("x = 1\n")
    state = P.git_state(repo)
    assert state["dirty"] is True and state["untracked"] == 1 and state["modified"] == 0
    (repo / "a.txt").write_text("b\n")
    assert P.git_state(repo)["modified"] == 1


def test_impl_sources_hash_the_module_file(tmp_path, monkeypatch):
    src = tmp_path / "dv_prov_impl.py"
    src.write_text("def compose(b, lo, g, s, bias=None):\n    return b\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    __import__("dv_prov_impl")
    try:
        out = P.impl_sources(["dv_prov_impl:compose", "kernels", "form:stable_gcast", "not_imported_mod:x"])
        assert list(out) == ["dv_prov_impl:compose"]
        assert out["dv_prov_impl:compose"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    finally:
        sys.modules.pop("dv_prov_impl", None)


def test_cpu_model_and_isa_flags():
    info = P.cpu_info()
    assert isinstance(info["cpu"], str) and info["cpu"]
    assert set(info["cpu_flags"]) <= set(P.ISA_FLAGS) and info["cpu_count"] >= 1
    prov = P.provenance(torch.device("cpu"))
    assert prov["device"]["cpu"] == info["cpu"] and len(prov["run_id"]) == 12


def test_plots_carry_run_id_commit_and_seed(tmp_path):
    pytest.importorskip("matplotlib")
    PIL = pytest.importorskip("PIL.Image")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = {
        "kind": "sweep",
        "config": {"seed": 7},
        "provenance": {
            "run_id": "abc123def456",
            "git": {"commit": "f" * 40, "dirty": False},
            "time_utc": "t",
            "argv": ["dora-verify", "sweep"],
        },
    }

    def plots(stage):
        fig, ax = plt.subplots()
        ax.plot([0, 1])
        fig.savefig(stage / "p.png")
        plt.close(fig)
        return [stage / "p.png"]

    write_bundle(rep, tmp_path / "out", lambda files: "# r\n", plots)
    with PIL.open(tmp_path / "out" / "p.png") as img:
        text = img.text
    assert text["dora-verify:run_id"] == "abc123def456" and text["dora-verify:commit"] == "f" * 40
    assert text["dora-verify:seed"] == "7" and text["dora-verify:argv"] == "dora-verify sweep"
    assert json.loads((tmp_path / "out" / "report.json").read_text())["provenance"]["run_id"] == "abc123def456"
