"""pytest integration: gate a DoRA implementation from your own test suite.

Installed with dora-verify (a ``pytest11`` entry point), it gives every test the ``dora_gate`` fixture:

    def test_my_dora_kernel_numerics(dora_gate):
        dora_gate("mypkg.dora_gate:MyDoRA", baseline="ci/dora-gate.json", dtypes="bf16")

``dora_gate(impl, ...)`` runs ``dora-verify gate`` in-process — the same suite, criteria and baseline comparison
(docs/gate.md) — writes gate.md, gate.json and junit.xml under ``out`` (default: the test's ``tmp_path``), and
fails the test with the hard failures, worst cases (their element, dumped inputs and reproduce command) and baseline
findings unless the gate passes. It returns the report dict. An environment mismatch with the baseline fails the
test too (``allow_env_mismatch=True`` compares anyway, ``{'torch', 'triton'}`` allows those keys only), as does a run
where nothing applied. ``impl`` is an ``--impl`` spec or the object itself (named ``module:qualname`` as the command
line names it, so that one baseline serves both); a spec's module must be importable from the test (``python -m
pytest`` puts the working directory on sys.path, plain ``pytest`` does not). Pass ``out=`` to keep the reports
(and ``cases/``) where CI uploads them. The plugin imports nothing heavy until the fixture is used.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def gate_check(
    impl,
    *,
    baseline=None,
    dtypes="bf16,fp16,fp32",
    ops="compose,backward,norm,layer",
    device="auto",
    seed: int = 0,
    out=None,
    allow_env_mismatch: bool = False,
) -> "tuple[bool, str, dict]":
    """Run the gate on ``impl`` (an ``--impl`` spec such as ``'mypkg:MyDoRA'``, or the object itself);
    (passed, a summary of what failed, the report). Writes the reports into ``out`` when given."""
    from .cli import interpret_without_gpu

    interpret_without_gpu(device)  # as the CLI: the CPU mode runs the fused kernels under the interpreter
    from .adapter import ImplError, from_object, load_impl
    from .gate import GateConfig, GateEnvironmentError, finding_message, load_baseline, run_gate, verdict
    from .gate import write_gate_report
    from .gate_report import reproduce_command, worst_case_text

    try:
        impls = load_impl(impl) if isinstance(impl, str) else [from_object(impl, _spec_of(impl))]
    except ImplError as e:  # one line, as the command line gives it
        return False, f"cannot load the implementation: {e}", {}

    def split(v):  # "a,b" or a sequence
        return tuple(x.strip() for x in v.split(",") if x.strip()) if isinstance(v, str) else tuple(v)

    cfg = GateConfig(impls=impls, dtypes=split(dtypes), ops=split(ops), device=device, seed=seed)
    rep = run_gate(cfg)
    rep["impl_spec"] = impl if isinstance(impl, str) else _spec_of(impl)
    why = []
    try:
        verdict(rep, load_baseline(baseline) if baseline else None, allow_env_mismatch)
    except GateEnvironmentError as e:
        why.append(
            "environment mismatch: "
            f"{str(e).replace('--allow-env-mismatch', 'allow_env_mismatch=True (or a set of keys)')}"
        )
    if out is not None:
        write_gate_report(rep, out)
    v = rep["verdict"]
    for key, msgs in v["hard"].items():
        w = rep["groups"][key].get("worst_case") or {}
        worst = (
            "\n  "
            + worst_case_text(w, format(w["severity"], ".6g"))
            + (f"\n  inputs: {Path(out) / 'cases' / (w['id'] + '.npz')}" if out is not None else "")
            + f"\n  reproduce: {reproduce_command(rep, rep['groups'][key]['failing_cases'][:3], rep.get('impl_spec'))}"
            if w
            else ""
        )
        why.append(f"{key}: {'; '.join(msgs)}{worst}")
    why += [f"{b['group']}: {finding_message(b)}" for b in v["baseline"]]
    if v.get("nothing_ran"):
        why.append("nothing ran: no case of the chosen dtypes and ops applies to the implementation")
    return (v.get("passed", False) and not why), "\n".join(why), rep


def _spec_of(obj) -> str:
    """The ``--impl`` spec naming an object (``module:qualname`` of a function or class, of an instance's class):
    the name a baseline made from the command line has for it."""
    target = obj if callable(obj) and hasattr(obj, "__qualname__") else type(obj)
    return getattr(obj, "name", None) or f"{target.__module__}:{target.__qualname__}"


@pytest.fixture
def dora_gate(tmp_path):
    """``dora_gate(impl, baseline=None, dtypes=..., ops=..., device='auto', seed=0, out=None,
    allow_env_mismatch=False)``: run the numerical gate and fail the test unless it passes (module docstring)."""

    def run(impl, **kwargs):
        out = Path(kwargs.pop("out", None) or tmp_path / "dora-verify-gate")
        passed, why, rep = gate_check(impl, out=out, **kwargs)
        if not passed:
            pytest.fail(f"dora-verify gate FAILED (reports in {out}):\n{why}", pytrace=False)
        return rep

    return run
