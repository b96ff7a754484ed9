"""A/B of two installed trees on three model rows (r 16: fp32 checkpointing, bf16 and fp32 eager), one process per
tree and repetition: python3 ab_model_rows.py LABEL — the tree on sys.path decides which code runs (see
reports/h200/bench/probes/README.md for the command that alternated them)."""

import importlib
import json
import sys
import time

import dora_verify

BM = importlib.import_module("dora_verify.bench_model")
BE = importlib.import_module("dora_verify.bench")
cfg = BE.BenchConfig(parts=("model",))
rows = []
for adapters, setting in (("fp32", "checkpointing"), ("bf16", "eager"), ("fp32", "eager")):
    t = time.time()
    r = BM.model_rows("llama3-8b", 4, 16, adapters, (setting,), cfg, lambda *a, **k: None)[0]
    rows.append(
        {
            "adapters": adapters,
            "setting": setting,
            "lora": r["lora"]["ms"],
            "stock": r["peft_dora"]["ms"],
            "ours": r["ours"]["ms"],
            "ours_over_lora": r["ours_over_lora"],
            "ours_p10_p90": (r["ours"].get("p10"), r["ours"].get("p90")),
            "norm_runners": r["ours"].get("norm_runners"),  # trees from 9980716 on: ν graph captures, replays, errors
            "s": round(time.time() - t, 1),
        }
    )
    print(sys.argv[1], dora_verify.__file__, json.dumps(rows[-1]), flush=True)
