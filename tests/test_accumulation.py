"""accumulation: the emulated accumulators are exact (step-by-step Fraction arithmetic with one correct rounding
per step), a true bf16 accumulator stalls at 256, and the experiment is complete and reproducible."""

from fractions import Fraction

import pytest
import torch

import dora_verify.accumulation as ACC
from dora_verify.exact import round_fraction
from dora_verify.formats import BF16, FP16, FP32, round_to
from dora_verify.sweep import SweepConfig

F64 = torch.float64


def _values(gen, n, k, fmt, lo, hi):
    """n×k float64 values of ``fmt``: N(0, 1) scaled by 2^U{lo..hi} (wide exponent gaps), rounded to fmt."""
    v = torch.randn(n, k, generator=gen, dtype=F64) * 2.0 ** torch.randint(lo, hi, (n, k), generator=gen)
    return round_to(v, fmt)


# the double-rounding trap: a tiny first partial sum, then a term on a midpoint of the accumulator format
# (fp16's exponent range is too narrow for one: there a plain float64 sum is always exact)
TRAPS = {
    "bf16": (2.0**-60, [(1 + 2**-4) ** 2, -((1 + 2**-4) ** 2), 1 + 2**-8, -3 * (1 + 2**-8)]),
    "fp32": (2.0**-60, [1 + 2**-24, -(1 + 2**-24), 1 + 2**-3 + 2**-24, 3 * (1 + 2**-24)]),
    "fp16": (2.0**-24, [1 + 2**-11, -(1 + 2**-11), 1 + 2**-3 + 2**-11, 3 * (1 + 2**-11)]),
}


def _terms(gen, n, k, in_fmt, acc):
    """Exact products of ``in_fmt`` values, with the ranges chosen so that ``acc`` never overflows; the first
    four columns start with the double-rounding trap."""
    lo, hi = {"bf16": (-40, 4), "fp16": (-14, 3), "fp32": (-40, 4)}[acc]
    t = _values(gen, n, k, in_fmt, lo, hi) * _values(gen, n, k, in_fmt, lo, hi)
    tiny, mids = TRAPS[acc]
    t[0, :4] = tiny
    t[1, :4] = torch.tensor(mids, dtype=F64)
    return t


@pytest.mark.parametrize("acc,in_fmt", [("bf16", BF16), ("fp16", FP16), ("fp32", BF16), ("fp32", FP32)])
def test_sequential_accumulator_is_exact_against_stepwise_fraction_rounding(acc, in_fmt):
    gen = torch.Generator().manual_seed({"bf16": 1, "fp16": 2, "fp32": 3}[acc] + 10 * in_fmt.p)
    terms = _terms(gen, 48, 24, in_fmt, acc)
    got = ACC.seq_sum(terms, acc)
    for j in range(terms.shape[1]):
        assert got[j].item() == ACC.fraction_seq_sum(terms[:, j].tolist(), acc), (acc, j)


def _fraction_tree(vals, fmt):
    vals = [Fraction(v) for v in vals]
    while len(vals) & (len(vals) - 1) or len(vals) < 2:
        vals.append(Fraction(0))
    while len(vals) > 1:
        vals = [Fraction(round_fraction(a + b, fmt)[2]) for a, b in zip(vals[0::2], vals[1::2])]
    return float(vals[0])


@pytest.mark.parametrize("acc", ["bf16", "fp16"])
def test_blocked_and_pairwise_are_exact_too(acc):
    gen = torch.Generator().manual_seed(7)
    terms = _terms(gen, 37, 8, BF16, acc)
    blocked, pairwise = ACC.blocked_sum(terms, acc, 8), ACC.pairwise_sum(terms, acc)
    for j in range(terms.shape[1]):
        col = terms[:, j].tolist()
        sums = [ACC.fraction_seq_sum(col[i : i + 8], acc) for i in range(0, len(col), 8)]
        assert blocked[j].item() == ACC.fraction_seq_sum(sums, "fp32")
        assert pairwise[j].item() == _fraction_tree(col, acc)


def test_the_double_rounding_trap_a_plain_float64_sum_falls_into():
    a, p = torch.tensor([2.0**-100], dtype=F64), torch.tensor([(1 + 2**-4) ** 2], dtype=F64)  # p: a bf16 midpoint
    assert round_to(a + p, BF16).item() == 1 + 2**-3  # fl64(a + p) = p, then the tie goes to even: wrong
    assert ACC.rn_add(a, p, BF16).item() == 1 + 2**-3 + 2**-7  # the correct rounding of a + p
    assert ACC.rn_add(-a, p, BF16).item() == 1 + 2**-3
    a, p = torch.tensor([2.0**-60], dtype=F64), torch.tensor([1 + 2**-24], dtype=F64)  # an fp32 midpoint
    assert round_to(a + p, FP32).item() == 1.0 and ACC.rn_add(a, p, FP32).item() == 1 + 2**-23


def test_fp16_accumulator_overflows_to_inf_as_ieee_says():
    t = torch.full((3, 1), 30000.0, dtype=F64)
    assert ACC.seq_sum(t, FP16).item() == float("inf")
    assert ACC.seq_sum(t[:2], FP16).item() == 60000.0


def test_bf16_accumulator_stalls_at_256_where_torch_accumulates_in_fp32():
    h = ACC.headline(seed=0)
    assert h["forms"]["seq_bf16"] == 256.0  # spacing 2 above 256: every term < 1 rounds away
    assert h["torch_bf16_sum"] == h["RN_bf16_exact"]  # torch: fp32 accumulator, one rounding to bf16
    assert abs(h["forms"]["seq_fp32"] - h["exact"]) < 2e-3 < abs(h["forms"]["blocked_fp32_in_bf16_b64"] - h["exact"])
    ones = torch.ones(1024, 1, dtype=F64)
    assert ACC.seq_sum(ones, BF16).item() == 256.0  # 256 + 1 is a tie: to even, 256


@pytest.mark.parametrize("fmt", [BF16, FP16])
def test_blocked_with_one_block_is_sequential(fmt):
    gen = torch.Generator().manual_seed(5)
    terms = _terms(gen, 40, 16, BF16, fmt.name)
    seq = ACC.seq_sum(terms, fmt)
    for block in (40, 41, 4096):
        assert torch.equal(ACC.blocked_sum(terms, fmt, block), seq)


def test_gemm_helpers_reduce_each_dot_product_in_index_order(monkeypatch):
    monkeypatch.setattr(ACC, "CHUNK_ELEMS", 64)  # several chunks
    gen = torch.Generator().manual_seed(3)
    X, Y = _values(gen, 5, 33, BF16, -3, 3), _values(gen, 4, 33, BF16, -3, 3)
    for meth in (ACC.Method("seq", "bf16"), ACC.Method("blocked", "fp16", 16), ACC.Method("pairwise", "bf16")):
        got = ACC.matmul_t(X, Y, meth)
        want = torch.stack([torch.stack([meth.reduce((X[i] * Y[k])[:, None])[0] for k in range(4)]) for i in range(5)])
        assert torch.equal(got, want), meth.name
        assert torch.equal(
            ACC.rowdot(X, X, meth), torch.stack([meth.reduce((X[i] * X[i])[:, None])[0] for i in range(5)])
        )


def test_experiment_is_complete_and_reproducible(monkeypatch):
    monkeypatch.setattr(ACC, "HEADLINE_N", 300)  # the headline has its own test
    cfg = SweepConfig(d_out=24, d_in=40, rank=4, grid_tokens=8)
    a = ACC.run(cfg, torch.device("cpu"), lambda _: None)
    b = ACC.run(cfg, torch.device("cpu"), lambda _: None)
    assert a == b and a["seeds"]["case"] == 0
    names = [r["form"] for r in a["rows"]]
    assert names == [m.name for m in ACC.methods(40)] and "blocked_fp32_in_bf16_b32" in names
    assert "blocked_fp32_in_bf16_b64" not in names and a["setup"]["blocks_equal_to_seq"][0] == 64
    assert sum(a["oracle"]["uncertified"].values()) == 0
    rows = {r["form"]: r for r in a["rows"]}
    assert rows["sum2_fp64"]["base"]["frac_correctly_rounded"] == 1.0  # the floor: exact sums, one rounding
    assert rows["seq_bf16"]["nu"]["max_rel"] > 100 * rows["seq_fp32"]["nu"]["max_rel"]
    assert "| seq_bf16 |" in ACC.markdown(a, [])
