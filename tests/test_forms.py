"""forms: the eager formulas compute what their docstrings say, op by op, and fail where theory says."""

import pytest
import torch

from dora_verify import forms as F
from dora_verify.forms import COMPOSE_FORMS, NORM_FORMS
from dora_verify.formats import BF16, ulp
from dora_verify.oracles import compose_truth, row_norm_truth
from dora_verify.cases import make_case


def _bf16(*vals):
    return torch.tensor([list(vals)], dtype=torch.bfloat16)


def test_naive_cancels_at_g_1_where_stable_is_exact():
    # base = 1 + 2^-7 and s·lora = 2^-9: in bf16, base + s·lora rounds (half-ulp lost), stable keeps it.
    base, lora, g = _bf16(1 + 2**-7), _bf16(2**-9), torch.ones(1)
    _, d_naive = COMPOSE_FORMS["naive"].fn(base, lora, g, 1.0)
    _, d_stable = COMPOSE_FORMS["stable_gcast"].fn(base, lora, g, 1.0)
    assert d_stable.item() == 2**-9
    assert d_naive.item() == 0.0  # the whole update cancelled away


def test_gcast_drops_g_below_bf16_resolution():
    base, lora = _bf16(1.0), _bf16(0.0)
    g = torch.tensor([1 + 1e-3])
    assert COMPOSE_FORMS["stable_gcast"].fn(base, lora, g, 1.0)[1].item() == 0.0
    d32 = COMPOSE_FORMS["stable_fp32"].fn(base, lora, g, 1.0)[1]
    assert abs(d32.item() - 1e-3) < 1e-3 * 2**-8


def test_forms_are_algebraically_equal():
    c = make_case("trained", 64, 96, 8, 16, "bf16", seed=0, s=2.0)
    base, lora = c.compose_inputs()
    truth = compose_truth(base, lora, c.g, c.s)
    for name in ("naive", "stable_gcast"):  # dtype-generic: in float64 they must agree with the exact value
        y, d = COMPOSE_FORMS[name].fn(base.double(), lora.double(), c.g.double(), c.s)
        assert torch.allclose(y, truth.y, rtol=1e-12, atol=1e-12), name
        assert torch.allclose(d, truth.delta, rtol=1e-9, atol=1e-12), name
    for name in ("naive_fp32", "stable_fp32", "single_rounding"):  # fp32 registers: within fp32 + one rounding
        y, _ = COMPOSE_FORMS[name].fn(base.float(), lora.float(), c.g, c.s)
        assert torch.allclose(y.double(), truth.y, rtol=2**-20, atol=2**-20), name


@pytest.mark.parametrize("regime", ["trained", "large_activations", "heavy_tailed", "all_positive"])
def test_single_rounding_within_its_derived_bound(regime):
    # y32 = fl32(g·fl32(base + fl32(s·lora))): |y32 − y| <= E = γ3(u32)·|g|·(|base| + |s·lora|);
    # one rounding to bf16 adds at most ulp_bf16(|y| + E)/2.
    c = make_case(regime, 128, 96, 8, 32, "bf16", seed=4, s=2.0)
    base, lora = c.compose_inputs()
    truth = compose_truth(base, lora, c.g, c.s)
    y, _ = COMPOSE_FORMS["single_rounding"].fn(base, lora, c.g, c.s)
    u32 = 2.0**-24
    E = 3 * u32 / (1 - 3 * u32) * c.g.double().abs() * (base.double().abs() + c.s * lora.double().abs())
    bound = ulp(truth.y.abs() + E, BF16) / 2 + E
    err = (y.double() - truth.y).abs()
    assert bool((err <= bound).all())
    assert float((err / bound).max()) > 0.4  # the bound is not vacuous


def test_norm_forms_match_oracle_on_well_conditioned_rows():
    c = make_case("trained", 32, 64, 4, 1, "fp32", seed=2, s=2.0)
    truth = row_norm_truth(c.W, c.A, c.B, c.s).nu
    for name in ("dense_fp32", "factored_fp32"):
        nu = NORM_FORMS[name].fn(c.W, c.A, c.B, c.s)
        assert nu.dtype == torch.float32
        assert float(((nu.double() - truth) / truth).abs().max()) < 64 * 2**-24, name
    bf = make_case("trained", 32, 64, 4, 1, "bf16", seed=2, s=2.0)
    assert NORM_FORMS["peft_dense"].fn(bf.W, bf.A, bf.B, bf.s).dtype == torch.bfloat16
    assert NORM_FORMS["factored_fp32_castout"].fn(bf.W, bf.A, bf.B, bf.s).dtype == torch.bfloat16


def test_factored_fp32_loses_accuracy_on_near_cancelling_rows():
    c = make_case("near_cancel", 64, 128, 8, 1, "fp32", seed=0, s=2.0)
    truth = row_norm_truth(c.W, c.A, c.B, c.s).nu
    rel = ((NORM_FORMS["factored_fp32"].fn(c.W, c.A, c.B, c.s).double() - truth) / truth).abs()
    dense = ((NORM_FORMS["dense_fp32"].fn(c.W, c.A, c.B, c.s).double() - truth) / truth).abs()
    special = c.special_rows
    assert float(rel[special].max()) > 1e-3  # cancellation in ‖W‖² + 2s·cross + s²·gram
    assert float(dense[special].max()) < float(rel[special].max())


def test_wdtype_partials_form_rounds_its_partials_but_accumulates_in_fp32():
    """The form once called factored_lowp: bf16 partials, but torch sums them in fp32 — not a bf16 accumulator."""
    from dora_verify.accumulation import seq_sum

    form = NORM_FORMS["factored_wdtype_partials_fp32_accum"].fn
    A, B = torch.zeros(1, 1024, dtype=torch.bfloat16), torch.zeros(1, 1, dtype=torch.bfloat16)
    W = torch.ones(1, 1024, dtype=torch.bfloat16)
    assert form(W, A, B, 2.0).item() == 32.0  # ‖W‖² = 1024 summed in fp32
    assert seq_sum(torch.ones(1024, 1, dtype=torch.float64), "bf16").item() == 256.0  # a bf16 accumulator: ν 16
    nu = form(torch.ones(1, 257, dtype=torch.bfloat16), A[:, :257], B, 2.0)  # 257 stored in bf16 is 256
    assert nu.dtype == torch.bfloat16 and nu.item() == 16.0


def test_old_report_name_maps_to_the_renamed_form():
    assert F.LEGACY_NAMES == {"factored_lowp": "factored_wdtype_partials_fp32_accum"}
    assert all(new in NORM_FORMS for new in F.LEGACY_NAMES.values()) and "factored_lowp" not in NORM_FORMS
    assert F.factored_lowp is F.factored_wdtype_partials_fp32_accum
