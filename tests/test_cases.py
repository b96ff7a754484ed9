"""cases: seeded, reproducible, and each regime has the property it claims."""

import pytest
import torch

from dora_verify.cases import REGIMES, g_offsets, make_case, scaling
from dora_verify.formats import is_representable
from dora_verify.oracles import row_norm_truth


@pytest.mark.parametrize("regime", list(REGIMES))
def test_same_seed_same_tensors(regime):
    a = make_case(regime, 40, 72, 4, 6, "bf16", seed=5, s=2.0)
    b = make_case(regime, 40, 72, 4, 6, "bf16", seed=5, s=2.0)
    c = make_case(regime, 40, 72, 4, 6, "bf16", seed=6, s=2.0)
    for name in ("x", "W", "A", "B", "g"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.W, c.W)
    assert a.W.dtype == torch.bfloat16 and a.g.dtype == torch.float32


def test_regime_properties():
    fresh = make_case("fresh", 32, 64, 4, 8, "bf16", seed=0, s=2.0)
    assert bool((fresh.B == 0).all()) and bool((fresh.g == 1).all())
    big = make_case("large_activations", 32, 64, 4, 8, "bf16", seed=0, s=2.0)
    assert float(big.x.float().abs().max()) > 62
    pos = make_case("all_positive", 32, 64, 4, 8, "bf16", seed=0, s=2.0)
    assert all(bool((t >= 0).all()) for t in (pos.x, pos.W, pos.A, pos.B))
    tr = make_case("trained", 256, 64, 4, 8, "fp32", seed=0, s=2.0)
    assert 1e-3 < float((tr.g - 1).std()) < 2e-3
    near = make_case("near_cancel", 64, 128, 8, 1, "bf16", seed=0, s=2.0)
    truth = row_norm_truth(near.W, near.A, near.B, near.s)
    w = near.W.double().norm(dim=1)
    assert all(truth.nu[i] < 1e-1 * w[i] for i in near.special_rows)
    zero = make_case("zero_rows", 64, 128, 8, 1, "bf16", seed=0, s=2.0)
    assert all(float(zero.W[i].abs().max()) == 0 and float(zero.B[i].abs().max()) == 0 for i in zero.special_rows)


def test_magnitude_gives_the_case_g():
    c = make_case("trained", 16, 32, 4, 2, "bf16", seed=1, s=2.0)
    nu = row_norm_truth(c.W, c.A, c.B, c.s).nu
    assert torch.allclose(c.magnitude().double() / nu, c.g.double(), rtol=2**-23)


def test_g_offsets_cover_both_sides_and_bf16_threshold():
    offs = g_offsets()
    assert 0.0 in offs and 2.0**-9 in offs and -(2.0**-9) in offs
    assert min(offs) == pytest.approx(-0.1) and max(offs) == pytest.approx(0.1)
    assert any(0 < abs(o) < 1e-5 for o in offs)
    assert is_representable(torch.tensor([1 + 2.0**-7, 1 - 2.0**-8], dtype=torch.float64), "bf16").all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown regime"):
        make_case("nope", 4, 4, 1, 1)
    with pytest.raises(ValueError, match="positive"):
        make_case("trained", 0, 4, 1, 1)
    with pytest.raises(ValueError):
        scaling(16, 0)
    assert scaling(16, 4) == 4.0 and scaling(16, 4, rslora=True) == 8.0


def test_draw_is_the_same_numbers_on_any_thread_count(monkeypatch):
    """cases.draw: a chunked (parallel) draw is a function of the generator's seed alone — the same bits with one
    worker thread or several — normal draws look standard normal, uniform ones lie in [0, 1); a bad kind raises."""
    import dora_verify.cases as C

    monkeypatch.setattr(C, "PARALLEL_DRAW_MIN", 1000)
    monkeypatch.setattr(C, "DRAW_CHUNK", 256)  # 5000 elements: 20 chunks
    outs = []
    for cpus in (1, 4):
        monkeypatch.setattr(C.os, "cpu_count", lambda cpus=cpus: cpus)
        outs.append(C.draw("normal", (50, 100), torch.Generator().manual_seed(7)))
    assert torch.equal(outs[0], outs[1]) and outs[0].dtype == torch.float64 and outs[0].shape == (50, 100)
    assert abs(float(outs[0].mean())) < 0.1 and abs(float(outs[0].std()) - 1) < 0.1
    u = C.draw("uniform", (5000,), torch.Generator().manual_seed(7))
    assert (
        float(u.min()) >= 0
        and float(u.max()) < 1
        and not torch.equal(u, C.draw("uniform", (5000,), torch.Generator().manual_seed(8)))
    )
    with pytest.raises(ValueError, match="kind must be"):
        C.draw("gaussian", (3,), torch.Generator())
