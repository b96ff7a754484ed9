"""scaling: the growth fit recovers known exponents; the grid has powers of two and ragged sizes; a small run
measures every form and the kernels, inside the bounds it overlays, reproducibly."""

import math

import pytest
import torch

import dora_verify.scaling as SC
from dora_verify.forms import COMPOSE_FORMS, NORM_FORMS
from dora_verify.sweep import SweepConfig


@pytest.mark.parametrize("k", [0.0, 0.5, 1.0, 2.0])
def test_fit_recovers_a_known_exponent(k):
    gen = torch.Generator().manual_seed(0)
    ns = SC.sizes(16, 4096)
    noise = torch.exp(0.05 * torch.randn(len(ns), generator=gen, dtype=torch.float64)).tolist()
    f = SC.fit_exponent(ns, [3e-7 * n**k * z for n, z in zip(ns, noise)])
    assert abs(f["exponent"] - k) < 0.03 and f["stderr"] < 0.03 and f["points"] == len(ns)
    exact = SC.fit_exponent(ns, [2.0 * n**k for n in ns])
    assert abs(exact["exponent"] - k) < 1e-9 and (k == 0 or exact["r2"] > 1 - 1e-9)


def test_fit_skips_zero_and_nonfinite_errors_and_refuses_too_few_points():
    f = SC.fit_exponent([16, 32, 64, 128, 256], [0.0, 32.0, math.inf, 128.0, 256.0])
    assert f["points"] == 3 and abs(f["exponent"] - 1) < 1e-12
    assert SC.fit_exponent([16, 32], [1.0, 2.0])["exponent"] is None
    assert SC.fit_exponent([8, 8, 8], [1.0, 2.0, 3.0])["exponent"] is None


def test_sizes_are_powers_of_two_and_ragged_up_to_the_sweep_size():
    assert SC.sizes(16, 100) == [16, 25, 32, 49, 64, 97, 100]
    assert SC.sizes(1, 8) == [1, 2, 4, 7, 8]
    g = SC.grid(SweepConfig(d_out=8192, d_in=2048))
    assert g["axes"]["d_in"][-1] == 2048 and 1537 in g["axes"]["d_in"] and g["axes"]["rank"][-1] == 384
    assert g["base"] == {"d_in": 2048, "d_out": 256, "rank": 16, "tokens": 64}


def test_small_run_measures_every_form_within_the_bound_and_is_reproducible(tmp_path):
    cfg = SweepConfig(d_out=32, d_in=40, rank=4, ranks=(2, 4), tokens=16, grid_tokens=8)
    ticks = []
    a = SC.run(cfg, torch.device("cpu"), ticks.append)
    assert len(ticks) == SC.steps(cfg) == len(a["points"])
    assert a == SC.run(cfg, torch.device("cpu"), lambda _: None)
    norm = {f["form"] for f in a["fits"] if f["family"] == "norm"}
    compose = {f["form"] for f in a["fits"] if f["family"] == "compose"}
    assert set(NORM_FORMS) | {"bound:worst", "bound:probabilistic"} <= norm
    assert set(COMPOSE_FORMS) <= compose
    if a["kernels"]:
        assert a["kernels"]["norm"] in norm and a["kernels"]["compose"] in compose
    for p in a["points"]:
        if "norm" in p:  # the worst-case bound of factored_fp32 holds at every point
            assert p["norm"]["forms"]["factored_fp32"]["max"] <= p["norm"]["bounds"]["worst"]
        assert p["compose"]["forms"]["single_rounding"]["max"] <= 0.5 + 2**-20  # one rounding: correctly rounded
    files = [p.name for p in SC.plots(a, tmp_path)]
    assert files == ["scaling_norm.png", "scaling_compose.png"] and all((tmp_path / f).stat().st_size for f in files)
    md = SC.markdown(a, files)
    assert "| norm | d_in | factored_fp32 |" in md and "](scaling_norm.png)" in md
