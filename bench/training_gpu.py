"""Training loops on CUDA: stock PEFT DoRA against the integration (kernels/peft.py), both against float64.

    python3 bench/training_gpu.py --out $OUT/training.json            # one GPU, well under 5 minutes, no network
    python3 bench/training_gpu.py --out /tmp/t.json --device cpu --quick --no-compile   # logic check without a GPU

The GPU counterpart of tests/test_training_loop.py (same metrics, same derived tolerances; docs/training.md):
a random Llama-style model built from a config (no download), PEFT DoRA on all seven projections, lora_B ≠ 0
(so g ≠ 1), K steps on random token batches; every run starts from a copy of the same initial model, the
reference is stock PEFT on a float64 copy with the same optimiser maths. Per configuration and implementation:

* D_L = max_k |L_k − L⁶⁴_k| / L⁶⁴_k (loss curve), tolerance 8·D_L(stock) + 6·u₃₂;
* D_θ = ‖θ_K − θ⁶⁴_K‖ / ‖θ⁶⁴_K − θ_0‖ (trainable parameters), tolerance 2·D_θ(stock) + K·u_θ·‖θ⁶⁴_K‖/‖θ⁶⁴_K − θ_0‖;
* D_z = ‖z − z⁶⁴‖ / ‖z⁶⁴‖, logits of a held-out batch at the run's own θ_K against float64 on the same θ_K
  (catches a ν that belongs to earlier parameters), tolerance 2·D_z(stock on the same θ_K) + u_out/2.

Configurations: precision fp32 (TF32 off), bf16 autocast, fp16 autocast (with GradScaler, as users run it), bf16 base
weights + fp32 adapters (PEFT's default), bf16 base + bf16 adapters (``autocast_adapter_dtype=False``: the fused
lora_compose path); optimisers SGD (momentum 0.9), AdamW for-loop / foreach / fused, a hand-written SGD on ``p.data``;
Hugging Face gradient checkpointing (use_reentrant False/True) checked BITWISE against no checkpointing, for stock
and the integration (the integration must be bitwise wherever stock is); ``torch.compile`` (inductor) of the
model for one configuration. Attention is transformers' 'eager' implementation (deterministic backward, so the
bitwise checks are meaningful).

Writes one JSON file (``--out``): loss curves, deviations, tolerances and verdicts per configuration, the bitwise
checkpointing checks, seeds, sizes, versions of torch / peft / transformers / triton, GPU name and git commit
(``DORA_VERIFY_COMMIT`` overrides it on a copied tree), and prints a table. Exit status 0 when every check passes,
1 otherwise (the JSON is written either way), 2 when the device is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time
import traceback
from importlib import metadata

import torch
import torch.nn.functional as F

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIZES = {
    "full": dict(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=2048,
        max_position_embeddings=256,
        r=16,
        batch=4,
        seq=128,
    ),
    "quick": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        r=8,
        batch=2,
        seq=16,
    ),
}
SEEDS = {"model": 0, "lora_B": 1, "data": 2, "eval": 3}
B_STD = 0.02
LR = {"sgd": 0.1, "adamw": 1e-2, "data_sgd": 0.1}
U = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 2.0**-53}
F_VEC, F_LOSS = 2.0, 8.0
PRECISIONS = {  # name: (model kind, autocast dtype or None)
    "fp32": ("fp32", None),
    "autocast_bf16": ("fp32", torch.bfloat16),
    "autocast_fp16": ("fp32", torch.float16),
    "bf16_base": ("bf16_base", None),
    "bf16_all": ("bf16_all", None),
}


def grid():
    """(precision, optimiser) pairs compared; checkpointing configurations; the compiled configuration."""
    cfgs = [("fp32", o) for o in ("sgd", "adamw_loop", "adamw_foreach", "adamw_fused", "data_sgd")]
    cfgs += [("autocast_bf16", o) for o in ("sgd", "adamw_foreach", "adamw_fused")]
    cfgs += [(p, o) for p in ("autocast_fp16", "bf16_base", "bf16_all") for o in ("adamw_foreach", "adamw_fused")]
    ckpt = [(p, "adamw_fused", r) for p in ("fp32", "autocast_bf16", "bf16_all") for r in (False, True)]
    return cfgs, ckpt, ("autocast_bf16", "adamw_fused")


# ----------------------------------------------------------------------------- model, data, loop
def build(kind: str, size: dict, device):
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(SEEDS["model"])
    cfg = transformers.LlamaConfig(
        **{k: v for k, v in size.items() if k not in ("r", "batch", "seq")}, attn_implementation="eager"
    )
    model = transformers.LlamaForCausalLM(cfg)
    assert model.config._attn_implementation == "eager"
    if kind != "fp32":
        model = model.to(torch.bfloat16)
    model = get_peft_model(
        model,
        LoraConfig(r=size["r"], lora_alpha=2 * size["r"], use_dora=True, target_modules=TARGETS, lora_dropout=0.0),
        autocast_adapter_dtype=kind != "bf16_all",
    )
    g = torch.Generator().manual_seed(SEEDS["lora_B"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * B_STD).to(p.dtype))
    return model.to(device)


def data(size, steps, device):
    g = torch.Generator().manual_seed(SEEDS["data"])
    ids = [torch.randint(0, size["vocab_size"], (size["batch"], size["seq"]), generator=g) for _ in range(steps)]
    ev = torch.randint(
        0, size["vocab_size"], (size["batch"], size["seq"]), generator=torch.Generator().manual_seed(SEEDS["eval"])
    )
    return [t.to(device) for t in ids], ev.to(device)


def loss_fn(logits, ids):
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def make_opt(name, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=LR["sgd"], momentum=0.9)
    if name == "sgd_plain":
        return torch.optim.SGD(params, lr=LR["data_sgd"])
    if name == "data_sgd":
        return None
    kind = {"adamw_loop": dict(foreach=False), "adamw_foreach": dict(foreach=True), "adamw_fused": dict(fused=True)}
    return torch.optim.AdamW(params, lr=LR["adamw"], **kind[name])


def ref_opt(name):
    return {"sgd": "sgd", "data_sgd": "sgd_plain"}.get(name, "adamw_loop")


@contextlib.contextmanager
def implementation(impl):
    if impl == "integration":
        from dora_verify.kernels import peft as dv_peft

        with dv_peft.enabled():
            yield
    else:
        yield


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def train(model, opt_name, impl, batches, device, amp=None, ckpt=None, compile_backend=None):
    """K steps; returns losses (float64 list), per-step gradients, final parameters, recompute count, skipped steps."""
    params = [p for _, p in trainable(model)]
    opt = make_opt(opt_name, params)
    scaler = (
        torch.amp.GradScaler(device.type, init_scale=2.0**12, growth_interval=10**6) if amp == torch.float16 else None
    )
    if ckpt is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": ckpt})
        if ckpt:
            model.enable_input_require_grads()
    probe = model.base_model.model.model.layers[0].self_attn.q_proj
    count = [0]
    # no forward counter under compile: dynamo guards on it and recompiles (the compiled runs never read it)
    hook = probe.register_forward_hook(lambda *a: count.__setitem__(0, count[0] + 1)) if not compile_backend else None
    model.train()
    fn = torch.compile(model, backend=compile_backend) if compile_backend else model
    losses, grads, skipped = [], [], 0
    try:
        with implementation(impl):
            for ids in batches:
                for p in params:
                    p.grad = None
                with autocast(device, amp):
                    logits = fn(input_ids=ids).logits
                loss = loss_fn(logits, ids)
                (scaler.scale(loss) if scaler else loss).backward()
                grads.append({n: p.grad.detach().clone() for n, p in trainable(model)})
                if scaler is not None:
                    before = scaler.get_scale()
                    scaler.step(opt)
                    scaler.update()
                    skipped += int(scaler.get_scale() < before)
                elif opt is not None:
                    opt.step()
                else:
                    for p in params:
                        p.data.add_(p.grad.data, alpha=-LR["data_sgd"])
                losses.append(loss.detach())
    finally:
        if hook is not None:
            hook.remove()
    return {
        "losses": [float(x) for x in torch.stack(losses).double().cpu()],
        "grads": grads,
        "params": {n: p.detach().clone() for n, p in trainable(model)},
        "forwards": count[0],
        "skipped_steps": skipped,
        "model": model,
    }


def logits_at(model, impl, ev, device, amp):
    model.eval()
    with torch.no_grad(), implementation(impl), autocast(device, amp):
        z = model(input_ids=ev).logits
    model.train()
    return z


def sq(d, e=None):
    return math.sqrt(sum(float(((d[n].double() - (e[n].double() if e is not None else 0)) ** 2).sum()) for n in d))


# ----------------------------------------------------------------------------- the comparisons
class Bench:
    def __init__(self, size, steps, device):
        self.size, self.steps, self.device = size, steps, device
        self.batches, self.ev = data(size, steps, device)
        self.initial, self.refs = {}, {}

    def init(self, kind):
        if kind not in self.initial:
            self.initial[kind] = build(kind, self.size, self.device)
        return self.initial[kind]

    def reference(self, kind, opt):
        key = (kind, ref_opt(opt))
        if key not in self.refs:
            self.refs[key] = train(copy.deepcopy(self.init(kind)).double(), key[1], "stock", self.batches, self.device)
        return self.refs[key]

    def compare(self, precision, opt, compile_backend=None):
        kind, amp = PRECISIONS[precision]
        ref = self.reference(kind, opt)
        theta0 = {n: p.detach() for n, p in trainable(self.init(kind))}
        upd = sq(ref["params"], theta0)
        u_theta = U[next(iter(theta0.values())).dtype]
        out = {"precision": precision, "optimizer": opt, "compile": compile_backend, "float64_losses": ref["losses"]}
        runs = {}
        for impl in ("stock", "integration"):
            t = time.time()
            try:
                runs[impl] = self._one(kind, amp, opt, impl, ref, upd, compile_backend)
            except Exception:  # noqa: BLE001 - keep the other side's numbers; the verdict fails below
                runs[impl] = {"error": traceback.format_exc()[-3000:]}
            runs[impl]["seconds"] = round(time.time() - t, 2)
        st, ours = runs["stock"], runs["integration"]
        out.update(stock=st, integration=ours)
        if "error" in st or "error" in ours:
            out["error"] = (ours if "error" in ours else st)["error"]
            out["error_in"] = "integration" if "error" in ours else "stock"
            out["passed"] = {"runs": False}
            return out
        tol = {
            "D_L": F_LOSS * st["D_L"] + 6 * U[torch.float32],
            "D_theta": F_VEC * st["D_theta"] + self.steps * u_theta * sq(ref["params"]) / upd,
            "D_z": F_VEC * ours["D_z_stock_same_params"] + ours["u_out"] / 2,
        }
        out.update(tolerance=tol, passed={k: ours[k] <= tol[k] for k in tol})
        return out

    def _one(self, kind, amp, opt, impl, ref, upd, compile_backend):
        r = train(
            copy.deepcopy(self.init(kind)), opt, impl, self.batches, self.device, amp, compile_backend=compile_backend
        )
        z = logits_at(r["model"], impl, self.ev, self.device, amp)
        z_stock = logits_at(r["model"], "stock", self.ev, self.device, amp)
        z64 = logits_at(copy.deepcopy(r["model"]).double(), "stock", self.ev, self.device, None).double()
        rel = lambda a: float((a.double() - z64).norm() / z64.norm())  # noqa: E731
        l64 = torch.tensor(ref["losses"], dtype=torch.float64)
        return {
            "losses": r["losses"],
            "skipped_steps": r["skipped_steps"],
            "D_L": float(((torch.tensor(r["losses"], dtype=torch.float64) - l64).abs() / l64.abs()).max()),
            "D_theta": sq(r["params"], ref["params"]) / upd,
            "D_z": rel(z),
            "D_z_stock_same_params": rel(z_stock),
            "u_out": U[z.dtype],
        }

    def checkpointing(self, precision, opt, reentrant):
        kind, amp = PRECISIONS[precision]
        res = {"precision": precision, "optimizer": opt, "use_reentrant": reentrant}
        for impl in ("stock", "integration"):
            a = train(copy.deepcopy(self.init(kind)), opt, impl, self.batches, self.device, amp)
            b = train(copy.deepcopy(self.init(kind)), opt, impl, self.batches, self.device, amp, ckpt=reentrant)
            res[impl] = {
                "recomputed": b["forwards"] == 2 * a["forwards"],
                "bitwise_losses": a["losses"] == b["losses"],
                "bitwise_grads": all(torch.equal(ga[n], gb[n]) for ga, gb in zip(a["grads"], b["grads"]) for n in ga),
                "losses": a["losses"],
                "losses_ckpt": b["losses"],
            }
        st, ours = res["stock"], res["integration"]
        stock_bitwise = st["bitwise_losses"] and st["bitwise_grads"]
        res["stock_bitwise"] = stock_bitwise
        ours_bitwise = ours["bitwise_losses"] and ours["bitwise_grads"]
        res["passed"] = bool(ours["recomputed"] and (ours_bitwise or not stock_bitwise))
        return res


def versions():
    out = {}
    for name in ("torch", "peft", "transformers", "triton", "dora-verify"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["cuda"] = torch.version.cuda
    return out


def _last_line(text: str) -> str:
    """The exception line of a traceback (the last line naming an error), shortened."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errs = [ln for ln in lines if "Error" in ln.split(":")[0] or "Exception" in ln.split(":")[0]]
    return (errs[-1] if errs else lines[-1] if lines else "?")[:160]


def table(res) -> str:
    lines = [f"{'configuration':44} {'impl':11} {'D_L':>9} {'D_theta':>9} {'D_z':>9}  verdict"]
    for c in res["configs"]:
        name = f"{c['precision']}/{c['optimizer']}" + (f"/compile:{c['compile']}" if c.get("compile") else "")
        if "error" in c:
            for impl in ("stock", "integration"):
                r = c.get(impl, {})
                if "error" in r:
                    lines.append(f"{name:44} {impl:11} ERROR {_last_line(r['error'])}")
                elif r:
                    lines.append(f"{name:44} {impl:11} {r['D_L']:9.2e} {r['D_theta']:9.2e} {r['D_z']:9.2e}")
            if not any("error" in c.get(i, {}) for i in ("stock", "integration")):
                lines.append(f"{name:44} ERROR {_last_line(c['error'])}")
            continue
        for impl in ("stock", "integration"):
            r = c[impl]
            v = "" if impl == "stock" else " ".join(f"{k}:{'ok' if c['passed'][k] else 'FAIL'}" for k in c["passed"])
            lines.append(f"{name:44} {impl:11} {r['D_L']:9.2e} {r['D_theta']:9.2e} {r['D_z']:9.2e}  {v}")
        t = c["tolerance"]
        lines.append(f"{'':44} {'tolerance':11} {t['D_L']:9.2e} {t['D_theta']:9.2e} {t['D_z']:9.2e}")
    lines.append("")
    lines.append(f"{'checkpointing (bitwise vs off)':44} {'stock':>12} {'integration':>12}  verdict")
    for c in res["checkpointing"]:
        name = f"{c['precision']}/{c['optimizer']}/{'reentrant' if c.get('use_reentrant') else 'non-reentrant'}"
        if "error" in c:
            lines.append(f"{name:44} ERROR {_last_line(c['error'])}")
            continue
        bw = lambda r: "bitwise" if r["bitwise_losses"] and r["bitwise_grads"] else "differs"  # noqa: E731
        lines.append(f"{name:44} {bw(c['stock']):>12} {bw(c['integration']):>12}  {'ok' if c['passed'] else 'FAIL'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="path of the JSON file to write")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="the test suite's tiny model (logic check)")
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps per run (default 6; 4 with --quick)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--budget-s", type=float, default=240.0, help="skip remaining configurations past this time")
    ap.add_argument(
        "--compile-reserve-s",
        type=float,
        default=120.0,
        help="start the compiled configuration only with this much of the budget left",
    )
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device (use --device cpu for a logic check)", file=sys.stderr)
        return 2
    if device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before dora_verify.kernels is imported (tests/conftest.py)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from dora_verify import provenance

    t0 = time.time()
    size = SIZES["quick" if args.quick else "full"]
    steps = args.steps or (4 if args.quick else 6)
    bench = Bench(size, steps, device)
    cfgs, ckpts, compiled = grid()
    res = {
        "format": "dora-verify-training/1",
        "provenance": provenance.provenance(device),
        "versions": versions(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "commit": provenance.git_state().get("commit"),
        "seeds": SEEDS,
        "size": size,
        "steps": steps,
        "lr": LR,
        "b_std": B_STD,
        "attention": "eager",
        "tf32": False,
        "factors": {"F_vec": F_VEC, "F_loss": F_LOSS, "loss_floor_u32": 6},
        "configs": [],
        "checkpointing": [],
        "skipped": [],
    }

    def guarded(fn, label, *a, _reserve=0.0, **k):
        if time.time() - t0 > args.budget_s - _reserve:
            res["skipped"].append(label)
            return None
        try:
            return fn(*a, **k)
        except Exception:  # noqa: BLE001 - record and go on: one broken configuration must not hide the others
            return {"error": traceback.format_exc()[-2000:]}

    for prec, opt in cfgs:
        r = guarded(bench.compare, f"{prec}/{opt}", prec, opt)
        if r is not None:
            res["configs"].append({"precision": prec, "optimizer": opt, **r})
            print(f"[{time.time() - t0:6.1f}s] {prec}/{opt}", flush=True)
    for prec, opt, reentrant in ckpts:
        r = guarded(bench.checkpointing, f"ckpt {prec}/{opt}/{reentrant}", prec, opt, reentrant)
        if r is not None:
            res["checkpointing"].append({"precision": prec, "optimizer": opt, "use_reentrant": reentrant, **r})
            print(f"[{time.time() - t0:6.1f}s] checkpointing {prec}/{opt}/reentrant={reentrant}", flush=True)
    if not args.no_compile:  # last, and only with time left for two compilations (stock and integration)
        r = guarded(
            bench.compare, "compile", *compiled, compile_backend=args.compile_backend, _reserve=args.compile_reserve_s
        )
        if r is not None:
            res["configs"].append(
                {"precision": compiled[0], "optimizer": compiled[1], "compile": args.compile_backend, **r}
            )
            print(f"[{time.time() - t0:6.1f}s] compile {compiled}", flush=True)
    res["ok"] = (
        all("error" not in c and all(c["passed"].values()) for c in res["configs"])
        and all("error" not in c and c["passed"] for c in res["checkpointing"])
        and not res["skipped"]
    )
    res["seconds"] = round(time.time() - t0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(table(res))
    print(f"\n{'all checks passed' if res['ok'] else 'SOME CHECKS FAILED'} in {res['seconds']} s; wrote {args.out}")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
