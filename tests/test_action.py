"""action.yml (the composite GitHub Action) and docs/gate.md's workflow, checked for what actionlint would reject in
them: YAML that parses, a composite action whose run steps name their shell, every ``${{ inputs.* }}`` declared,
workflow steps that either use an action or run a command. (actionlint itself cannot be installed without network
access, which CI does not have: these are the checks it would make on these two files.)"""

import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
ROOT = Path(__file__).resolve().parent.parent
EXPR = re.compile(r"\$\{\{\s*([^}]*?)\s*\}\}")


def test_composite_action():
    doc = yaml.safe_load((ROOT / "action.yml").read_text())
    assert {"name", "description", "inputs", "runs"} <= set(doc)
    inputs = doc["inputs"]
    assert all("description" in v for v in inputs.values()) and inputs["impl"]["required"] is True
    assert doc["runs"]["using"] == "composite"
    steps = doc["runs"]["steps"]
    assert steps and all(("run" in s) != ("uses" in s) for s in steps)
    assert all(s.get("shell") in ("bash", "sh", "python", "pwsh") for s in steps if "run" in s)
    text = (ROOT / "action.yml").read_text()
    for expr in EXPR.findall(text):
        ctx, _, name = expr.partition(".")
        assert ctx in ("inputs", "github", "runner", "env", "steps"), expr
        if ctx == "inputs":
            assert name in inputs, f"undeclared input {name!r}"
    run = next(s["run"] for s in steps if "dora_verify gate" in s["run"])
    assert "--impl" in run and "--baseline" in run and "--ops" in run  # options the gate has (tests/test_gate.py)


def test_the_documented_workflow():
    text = (ROOT / "docs" / "gate.md").read_text()
    block = text.split("# .github/workflows/dora-gate.yml", 1)[1].split("```", 1)[0]
    doc = yaml.safe_load(block)
    assert doc["name"] and doc.get(True, doc.get("on")) == ["pull_request"]  # YAML 1.1 reads the key on as True
    for job in doc["jobs"].values():
        assert job["runs-on"] and job["steps"]
        for s in job["steps"]:
            assert ("run" in s) != ("uses" in s), s
    for expr in EXPR.findall(block):
        assert expr.split(".")[0] in ("env", "github", "inputs", "steps", "secrets"), expr
