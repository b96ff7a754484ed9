"""metrics: each metric on hand-computed cases."""

import math

import pytest
import torch

from dora_verify.formats import BF16, FP32
from dora_verify.metrics import (
    Reference,
    bits_lost,
    bound_ratio,
    compare,
    cosine,
    effective_scale_error,
    flash_ratio,
    quantile,
    ratio,
    ulp_error,
)
from dora_verify.oracles import certified_round


def _ref(x, fmt=BF16):
    x = torch.as_tensor(x, dtype=torch.float64)
    z = torch.zeros_like(x)
    return Reference(x, z, z, fmt, certified_round(x, z, z, fmt))


def test_ulp_error_across_a_power_of_two():
    exact = torch.tensor([1.0, 1.0], dtype=torch.float64)
    approx = torch.tensor([1 - 2**-8, 1 + 2**-7], dtype=torch.bfloat16)
    # Goldberg ulp at the exact value 1.0 is 2^-7: one step down is half an ulp, one step up is one ulp
    assert ulp_error(approx, exact, BF16).tolist() == [0.5, 1.0]


def test_compare_hand_case():
    x = [1.0, 2.0, -4.0, 0.5]
    a = torch.tensor([1.0, 2.0 + 2**-6, -4.0, 0.5 - 2**-9], dtype=torch.bfloat16)
    m = compare(a, _ref(x))
    assert m["max_abs"] == 2**-6
    assert m["max_ulp"] == 1.0  # 2^-6 at 2.0 (ulp 2^-6)
    # x = 2.0 and 0.5 are representable: only x itself is faithful there
    assert m["frac_correctly_rounded"] == 0.5 and m["frac_faithful"] == 0.5
    assert m["bits_lost"] == 1.0
    assert m["rmse"] == pytest.approx(math.sqrt((2**-12 + 2**-18) / 4))
    assert m["normwise_rel"] == pytest.approx(math.sqrt(2**-12 + 2**-18) / math.sqrt(1 + 4 + 16 + 0.25))
    assert m["floor_max_abs"] == 0.0 and m["floor_ratio"] == float("inf")
    assert m["worst_index"] == [1]
    assert m["mean_signed_ulp"] == pytest.approx((1.0 - 2**-9 / 2**-8) / 4)


def test_floor_ratio_and_bound_ratio():
    x = torch.tensor([1 + 2**-9], dtype=torch.float64)  # floor: RN = 1.0, floor error 2^-9
    a = torch.tensor([1 + 2**-7], dtype=torch.bfloat16)  # error 3·2^-9
    m = compare(a, _ref(x), bound=torch.tensor([2**-7], dtype=torch.float64))
    assert m["floor_ratio"] == 3.0
    assert m["bound_ratio_max"] == 0.75
    assert m["frac_correctly_rounded"] == 0.0 and m["frac_faithful"] == 1.0


def test_signed_zeros_and_nonfinite():
    z = compare(torch.tensor([-0.0], dtype=torch.bfloat16), _ref([0.0]))
    assert z["max_abs"] == 0.0 and z["frac_correctly_rounded"] == 1.0
    nf = compare(torch.tensor([float("inf"), 1.0], dtype=torch.float32), _ref([1e30, 1.0], FP32))
    assert nf["nonfinite_mismatch"] == 1 and nf["max_abs"] == 0.0


def test_small_helpers():
    assert bits_lost(0.5) == 0.0 and bits_lost(4.0) == 3.0 and bits_lost(0.0) == 0.0
    assert ratio(0, 0) == 0.0 and ratio(1, 0) == float("inf") and flash_ratio(3.0, 1.5) == 2.0
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0])) == pytest.approx(1.0)
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == 0.0
    assert quantile(torch.arange(1.0, 101.0), 0.99) == 99.0


def test_effective_scale_error_recovers_a_dropped_correction():
    inner = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = torch.tensor([1.001, 0.999, 1.0], dtype=torch.float64)
    exact = g * inner
    z = torch.zeros_like(exact)
    beta = effective_scale_error(inner, Reference(exact, z, z, FP32), inner)  # output that ignored g
    assert torch.allclose(beta, -(g - 1), atol=1e-15)


def test_nan_output_is_never_counted_correctly_rounded():
    """An all-NaN output against a finite truth (zeros included): 0 correctly rounded, 0 faithful (NaN elements
    were once zeroed before the comparison and counted as correct where the exact value is 0)."""
    import torch

    from dora_verify.metrics import Reference, compare
    from dora_verify.oracles import compose_truth

    base = torch.tensor([[0.0, 1.0, -2.0, 0.0]], dtype=torch.bfloat16)
    lora = torch.zeros_like(base)
    g = torch.ones(4)
    t = compose_truth(base, lora, g, 1.0)
    ref = Reference(t.y_hi, t.y_lo, t.y_bound, t.fmt, t.y_round)
    m = compare(torch.full_like(base, float("nan")), ref)
    assert m["frac_correctly_rounded"] == 0.0 and m["frac_faithful"] == 0.0 and m["nonfinite_mismatch"] == 4
    assert compare(base, ref)["frac_correctly_rounded"] == 1.0


def test_ulp_relative_to_the_terms_does_not_blow_up_where_the_result_cancels():
    """x = a − b with |a|, |b| ≈ 1 and x ≈ 1e-6: an error of one ulp of the terms is ~10⁵ ulps of x. The
    terms-relative ulp error reads ~1 there; the histogram counts every element once."""
    from dora_verify.metrics import ULP_BIN_EDGES, Reference, compare
    from dora_verify.formats import parse_format

    fmt = parse_format("bf16")
    x = torch.tensor([1e-6, 0.5, 0.75], dtype=torch.float64)
    terms = torch.tensor([2.0, 0.5, 0.75], dtype=torch.float64)  # |a| + |b| of the first element
    approx = torch.tensor([1e-6 + 2.0**-7, 0.5, 0.75]).to(torch.bfloat16)  # off by one ulp of the terms (2 → 2⁻⁶)
    ref = Reference(x, torch.zeros_like(x), torch.zeros_like(x), fmt)
    m = compare(approx, ref, terms=terms, histograms=True)
    assert m["max_ulp"] > 1e3 and m["max_ulp_terms"] <= 1.0
    assert len(m["ulp_hist"]) == len(ULP_BIN_EDGES) + 1 and sum(m["ulp_hist"]) == 3 == sum(m["ulp_terms_hist"])
    assert m["ulp_hist"][-1] == 1 and m["ulp_terms_hist"][-1] == 0


def test_bound_ratio_is_the_worst_excess_error_over_its_bound():
    """Error beyond the oracle's uncertainty, over the bound; exact and zero-bound elements read 0; a non-finite
    value for a finite truth reads inf, as does an error above a zero bound; out-of-range truths are left out."""
    x = torch.tensor([1.0, 2.0, 4.0, 1e40], dtype=torch.float64)
    ref = Reference(x, torch.zeros_like(x), torch.full_like(x, 0.25), BF16)
    a = torch.tensor([1.0, 3.0, 4.0, 0.0], dtype=torch.float64)  # errors 0, 1 (0.75 beyond the oracle), 0, -
    assert bound_ratio(a, ref, torch.tensor([0.0, 1.5, 0.0, 1.0], dtype=torch.float64)) == pytest.approx(0.5)
    assert bound_ratio(a, ref, torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)) == math.inf
    a[2] = math.nan
    assert bound_ratio(a, ref, torch.ones(4, dtype=torch.float64)) == math.inf
