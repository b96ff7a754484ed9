"""dora_verify.sweep's own shortcuts, each against the general oracle it replaces."""

import importlib

import torch

from dora_verify.formats import parse_format
from dora_verify.metrics import compare
from dora_verify.oracles import certified_round, compose_truth

S = importlib.import_module("dora_verify.sweep")


def test_paper_point_reference_is_compose_truth_at_g_1(monkeypatch):
    """paper_figure1 builds its exact Δ as s·lora (g = 1); compose_truth's general path gives the same reference,
    so the numbers it reports are those of the full oracle."""
    seen = {}
    real = S.Reference

    def spy(hi, lo, bound, fmt, rounded=None):
        seen["ref"] = (hi, lo, bound, rounded)
        return real(hi, lo, bound, fmt, rounded)

    monkeypatch.setattr(S, "Reference", spy)
    cfg = S.SweepConfig(d_out=96, d_in=32, tokens=80, dtype="bf16")
    S.paper_figure1(cfg, "cpu")
    hi, lo, bound, rounded = seen["ref"]
    gen = torch.Generator().manual_seed(cfg.seed)  # the protocol's draws, as paper_figure1 makes them
    lora = S.draw("normal", (cfg.tokens, cfg.d_out), gen).to(torch.bfloat16)
    base = S.draw("normal", (cfg.tokens, cfg.d_out), gen).to(torch.bfloat16)
    tr = compose_truth(base, lora, torch.ones(cfg.d_out), S.PAPER_SCALE)
    assert torch.equal(hi, tr.d_hi) and torch.equal(lo, tr.d_lo) and torch.equal(bound, tr.d_bound)
    assert torch.equal(rounded.nearest, tr.d_round.nearest) and bool(rounded.certain.all())


def test_paper_metrics_are_compares():
    """paper_metrics: compare's max_abs, max_ulp and frac_correctly_rounded, the same numbers (finite inputs)."""
    gen = torch.Generator().manual_seed(3)
    lora = (torch.randn(64, 96, generator=gen, dtype=torch.float64) * 3).to(torch.bfloat16)
    hi = lora.double() * 0.5
    zero = torch.zeros_like(hi)
    fmt = parse_format("bf16")
    ref = S.Reference(hi, zero, zero, fmt, certified_round(hi, zero, zero, fmt))
    approx = (lora.double() * 0.5 * (1 + torch.randn(64, 96, generator=gen, dtype=torch.float64) * 1e-2)).to(
        torch.bfloat16
    )
    want, got = compare(approx, ref), S.paper_metrics(approx, ref)
    assert got == {k: want[k] for k in got} and 0 < got["frac_correctly_rounded"] < 1
