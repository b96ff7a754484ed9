#!/usr/bin/env bash
# The GPU certification run behind reports/h100/certify/: a smoke pass, the exhaustive 2^32-pair check of
# the compose epilogue, then the nightly-style targeted search (>= 10,000 examples per kernel and dtype, one
# process per (target, dtype); kernels on the GPU, oracles on the CPU cores).
# Usage: bash bench/certify_gpu.sh OUT_DIR [EXAMPLES] [SECONDS]
set -uo pipefail
OUT=${1:?out dir}; N=${2:-10000}; SECS=${3:-420}
mkdir -p "$OUT"
nvidia-smi -L > "$OUT/gpu.txt" 2>&1
python3 - > "$OUT/smoke.log" 2>&1 <<'PY'
import time, torch
from dora_verify.exhaustive import all_pairs
from dora_verify.certify import search, KERNEL_TARGETS, TARGETS
t = time.time(); print(all_pairs("bf16", 1.0015, 2.0), round(time.time() - t, 2), "s", flush=True)
for t_ in KERNEL_TARGETS:
    for d in TARGETS[t_].dtypes:
        r = search(t_, d, examples=10, device="cuda")
        print(t_, d, r["examples"], r["max_ratio"], r["violation"], r["seconds"], flush=True)
PY
timeout 200 dora-verify exhaustive --out "$OUT/exhaustive" --quiet > "$OUT/exhaustive.log" 2>&1
echo "exhaustive rc=$?" >> "$OUT/exhaustive.log"
timeout $((SECS + 120)) dora-verify certify --targets kernels --examples "$N" --seconds "$SECS" --nightly --seed 1 \
    --keep 2 --jobs "$(nproc)" --corpus "$OUT/corpus" --out "$OUT/certify" --quiet > "$OUT/certify.log" 2>&1
echo "certify rc=$?" >> "$OUT/certify.log"
tail -n 3 "$OUT/smoke.log" "$OUT/exhaustive.log" "$OUT/certify.log"
