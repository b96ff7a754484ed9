"""formats: exact RNE rounding, ulp and ordered bit views, against exact rationals and hand cases."""

import random
from fractions import Fraction

import pytest
import torch

from dora_verify.exact import round_fraction
from dora_verify.formats import BF16, FP16, FP32, bracket, ordered_bits, parse_format, pow2, round_to, ulp, ulp_distance


def test_round_to_avoids_torch_double_rounding():
    # 1 + 2^-8 + 2^-30 lies just above the bf16 midpoint between 1 and 1 + 2^-7: RNE gives 1 + 2^-7.
    # torch's double -> bf16 cast goes through fp32 (which rounds to the midpoint, then ties to even = 1.0).
    v = torch.tensor([1 + 2**-8 + 2**-30], dtype=torch.float64)
    assert round_to(v, BF16).item() == 1 + 2**-7
    assert v.to(torch.bfloat16).item() == 1.0  # documents the pitfall this module exists to avoid


@pytest.mark.parametrize("fmt", [BF16, FP16, FP32])
def test_round_and_bracket_match_exact_rationals(fmt):
    rng = random.Random(7)
    vals = [
        rng.choice([1, -1]) * rng.uniform(0, 4) * 2.0 ** rng.randint(fmt.emin - fmt.p - 4, fmt.emax + 2)
        for _ in range(2000)
    ]
    vals += [
        0.0,
        -0.0,
        fmt.max_finite,
        fmt.max_finite * (1 + 2.0 ** -(fmt.p + 1)),
        fmt.min_normal,
        fmt.min_normal * 2.0 ** -(fmt.p - 1),
        fmt.min_normal * 2.0**-fmt.p,
    ]
    t = torch.tensor(vals, dtype=torch.float64)
    r, (d, u) = round_to(t, fmt), bracket(t, fmt)
    for i, v in enumerate(vals):
        assert (d[i].item(), u[i].item(), r[i].item()) == round_fraction(Fraction(v), fmt), v


def test_round_to_ties_to_even_and_overflow():
    t = torch.tensor(
        [1 + 2**-8, 1 + 3 * 2**-8, 65520.0, 65519.0, float("inf"), float("nan"), -0.0], dtype=torch.float64
    )
    bf = round_to(t[:2], BF16).tolist()
    assert bf == [1.0, 1 + 2**-6]  # ties go to the even significand
    fp = round_to(t[2:], FP16)
    assert fp[0].item() == float("inf") and fp[1].item() == 65504.0  # 65520 = max + ulp/2 overflows
    assert fp[2].item() == float("inf") and torch.isnan(fp[3])
    assert str(fp[4].item()) == "-0.0"


def test_ulp_hand_cases():
    x = torch.tensor([1.0, 1.5, 0.75, 2.0, 0.0, 2.0**-130, -3.0], dtype=torch.float64)
    assert ulp(x, FP32).tolist() == [2.0**-23, 2.0**-23, 2.0**-24, 2.0**-22, 2.0**-149, 2.0**-149, 2.0**-22]
    assert ulp(x[:1], BF16).item() == 2.0**-7
    assert ulp(x[:1], FP16).item() == 2.0**-10
    assert torch.isnan(ulp(torch.tensor([float("inf")]), BF16)).all()


def test_ordered_bits_and_ulp_distance():
    one = torch.tensor([1.0], dtype=torch.bfloat16)
    below = torch.tensor([1 - 2**-8], dtype=torch.bfloat16)  # across a power of two: spacing halves
    above = torch.tensor([1 + 2**-7], dtype=torch.bfloat16)
    assert ulp_distance(one, below).item() == 1 and ulp_distance(one, above).item() == 1
    assert ulp_distance(below, above).item() == 2
    z = torch.tensor([0.0, -0.0], dtype=torch.bfloat16)
    assert ulp_distance(z[:1], z[1:]).item() == 0  # signed zeros are the same point
    tiny = torch.tensor([2.0**-133, -(2.0**-133)], dtype=torch.bfloat16)  # smallest subnormals
    assert ulp_distance(tiny[:1], tiny[1:]).item() == 2
    f32 = torch.tensor([1.0, 1.0 + 2**-23], dtype=torch.float32)
    assert (ordered_bits(f32)[1] - ordered_bits(f32)[0]).item() == 1
    h = torch.tensor([-1.0, 1.0], dtype=torch.float16)
    assert ulp_distance(h[:1], h[1:]).item() == 2 * 15360  # 1.0 is 0x3C00 = 15360 steps from zero
    with pytest.raises(ValueError):
        ulp_distance(one, f32[:1])


def test_pow2_is_exact_over_the_whole_range():
    k = torch.tensor([-1074, -1060, -1023, -1022, -1, 0, 1, 1023])
    assert pow2(k).tolist() == [2.0 ** int(i) for i in k]
    with pytest.raises(ValueError):
        pow2(torch.tensor([1024]))


def test_parse_format():
    assert parse_format("bfloat16") is BF16 and parse_format(torch.float16) is FP16 and parse_format("FP32") is FP32
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_format("fp8")
