"""dora_verify.sweep's own shortcuts, each against the general oracle it replaces."""
import importlib

import torch

from dora_verify.oracles import compose_truth

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
