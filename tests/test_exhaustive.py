"""dora_verify.exhaustive: every finite 16-bit value of one compose operand against a grid of the other,
of g and of s (CPU), under the kernel bound; and the all-pairs GPU checker, logic-checked on a slice under
the interpreter against the torch scoring of the same pairs."""

import pytest
import torch

from dora_verify import exhaustive
from dora_verify.exhaustive import PAIRS_BLOCK, all_pairs, all_values, epilogue_slice

GRID = (0.0, -1.5, 3.140625, -1e-3, 2.0**-24, 1023.5)
# the fused checks run on the GPU where there is one, else under the Triton interpreter (conftest)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
G = (1.0, 1 + 2.0**-23, 1 - 2.0**-9, 1.0015, 0.5, 3.7)


def test_all_values_counts():
    v = all_values("fp16")
    assert v.numel() == 65536 - 2 * 1024 and bool(torch.isfinite(v).all())
    assert all_values("bf16").numel() == 65536 - 2 * 128  # 2·(2⁷) patterns have an all-ones exponent
    with pytest.raises(ValueError):
        all_values("fp32")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("sweep", ["base", "lora"])
def test_eager_epilogue_every_value(dtype, sweep):
    r = epilogue_slice(dtype, sweep, grid=GRID, g_values=G, s_values=(2.0,), tier="eager")
    assert r["elements"] > 2_000_000 and r["uncertified"] == 0
    assert r["violations"] == 0 and r["not_faithful"] == 0 and r["max_ratio"] <= 1.0, r
    assert r["not_cr_off_tie"] == 0, r  # correctly rounded (round-to-odd through fp32)
    assert r["max_ratio"] > 0.9  # tight: the final rounding reaches its bound


def test_fused_epilogue_every_fp16_value():
    """The Triton epilogue itself (interpreter: fp16, whose fp32 → fp16 conversion rounds to nearest there)."""
    r = epilogue_slice(
        "fp16",
        "base",
        grid=(0.0, -1.5, 2.0**-24),
        g_values=(1.0, 1.0015, 3.7),
        s_values=(2.0,),
        tier="fused",
        device=DEVICE,
    )
    assert r["violations"] == 0 and r["not_faithful"] == 0 and r["max_ratio"] <= 1.0, r
    assert r["not_cr_off_tie"] == 0, r


def _torch_score(dtype, g, s, start, count):
    fmt = exhaustive.parse_format(dtype)
    idx = torch.arange(start, start + count, dtype=torch.int64)
    hb, lb = (idx >> 16) & 0xFFFF, idx & 0xFFFF
    as16 = lambda b: torch.where(b >= 32768, b - 65536, b).to(torch.int16).view(fmt.torch_dtype)  # noqa: E731
    base, lora = as16(hb), as16(lb)
    keep = torch.isfinite(base) & torch.isfinite(lora)
    base, lora = base[keep][None, :], lora[keep][None, :]
    gg = torch.full((base.shape[1],), exhaustive.f32(g), dtype=torch.float32)
    from dora_verify.kernels import compose

    y = compose(base.to(DEVICE), lora.to(DEVICE), gg.to(DEVICE), exhaustive.f32(s), tier="fused").cpu()
    return exhaustive._score(y, base, lora, gg, exhaustive.f32(s), fmt), int((~keep).sum())


@pytest.mark.parametrize(
    "g,s,start",
    [
        (1.0015, 2.0, 0x3C00 << 16),
        (3.7, 0.25, 0x0400 << 16),
        (1.0, 1.0, 0x7B00 << 16),
        (1.0, 16 / 384**0.5, (0x7BFF << 16) + 0x4000),
    ],
)  # base 65504: overflow edge
def test_all_pairs_checker_agrees_with_torch_scoring(g, s, start):
    """The in-kernel exact value, bound, ulp and counts match the library's oracle on the same pairs."""
    count = PAIRS_BLOCK * 4
    k = all_pairs("fp16", g, s, device=DEVICE, start=start, count=count)
    t, skipped = _torch_score("fp16", g, s, start, count)
    assert k["skipped_nonfinite"] == skipped
    assert k["violations"] == t["violations"] == 0 and k["not_faithful"] == t["not_faithful"] == 0
    assert k["not_correctly_rounded"] == t["not_correctly_rounded"]
    assert k["not_cr_off_tie"] == t["not_cr_off_tie"] == 0 and k["overflow_mismatch"] == 0
    assert k["max_ratio"] == pytest.approx(t["max_ratio"], rel=1e-6, abs=1e-9)
    assert k["max_ulp"] == pytest.approx(t["max_ulp"], rel=1e-6, abs=1e-9)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs the interpreter's truncating fp32 → bf16")
def test_all_pairs_checker_catches_a_wrong_rounding():
    """Under the interpreter fp32 → bf16 truncates instead of rounding: the checker must flag it."""
    k = all_pairs("bf16", 1.0015, 2.0, device="cpu", start=0x3F80 << 16, count=PAIRS_BLOCK * 4)
    assert k["violations"] > 0 and k["max_ratio"] > 1


def test_all_pairs_rejects_bad_ranges():
    with pytest.raises(ValueError):
        all_pairs("fp16", 1.0, 1.0, device="cpu", start=1, count=PAIRS_BLOCK)
    with pytest.raises(ValueError):
        all_pairs("fp32", 1.0, 1.0, device="cpu", count=PAIRS_BLOCK)
