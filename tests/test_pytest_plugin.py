"""dora_verify.pytest_plugin: a team gates its DoRA kernel from its own test suite with the ``dora_gate`` fixture."""

import sys
from pathlib import Path

from dora_verify.pytest_plugin import gate_check

pytest_plugins = ["pytester"]
TESTS = Path(__file__).parent


def test_gate_check_passes_a_good_kernel_and_explains_a_bad_one(tmp_path):
    sys.path.insert(0, str(TESTS))  # tests/planted_impls.py
    ok, why, rep = gate_check("planted_impls:Good", dtypes="fp32", ops="compose", device="cpu", out=tmp_path / "g")
    assert ok and why == "" and (tmp_path / "g" / "gate.md").exists() and rep["verdict"]["passed"]
    ok, why, rep = gate_check("planted_impls:gcast", dtypes="fp32", ops="compose", device="cpu")
    assert not ok and "error/bound ratio" in why and "worst case compose-fp32-" in why
    ok, why, _ = gate_check("planted_impls:Fp32Only", dtypes="bf16", device="cpu")
    assert not ok and "nothing ran" in why
    import planted_impls  # the object itself is named as the command line names it: one baseline serves both

    ok, why, rep = gate_check(planted_impls.gcast, dtypes="fp32", ops="compose", device="cpu", out=tmp_path / "o")
    assert rep["config"]["impls"] == ["planted_impls:gcast"] and "reproduce: python -m dora_verify gate" in why
    assert f"inputs: {tmp_path / 'o' / 'cases'}" in why and " at element [" in why
    ok, why, rep = gate_check("no_such_module_xyz:f", device="cpu")
    assert not ok and why.startswith("cannot load the implementation") and "\n" not in why


def test_the_fixture_fails_the_users_test_with_the_findings(pytester):
    """The plugin is registered by the package (pytest11 entry point): a user's test file only asks for dora_gate."""
    pytester.syspathinsert(str(TESTS))
    pytester.makepyfile(
        test_numerics="""
        def test_good(dora_gate):
            rep = dora_gate("planted_impls:Good", dtypes="fp32", ops="compose", device="cpu")
            assert rep["verdict"]["passed"]

        def test_bad(dora_gate):
            dora_gate("planted_impls:gcast", dtypes="fp32", ops="compose", device="cpu")
    """
    )
    res = pytester.runpytest_inprocess("-q")
    res.assert_outcomes(passed=1, failed=1)
    res.stdout.fnmatch_lines(["*dora-verify gate FAILED*", "*worst case compose-fp32-*"])
