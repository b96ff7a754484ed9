"""``dora-verify`` command line. Every usage error (a bad argument, an unreadable input, an output that cannot be
written, a run too large for the machine, an --impl that cannot be loaded) exits with code 2 and one line on
stderr; Ctrl-C exits with 130 and one line. A sweep whose --impl failed at run time writes its report (the failed
rows marked) and exits 1. Genuine internal bugs keep their traceback."""

from __future__ import annotations

import argparse
import math
import re
import sys
import time

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
MAX_SEED = 2**32 - 1  # numpy's legacy limit; torch, hypothesis and numpy all take 0 .. 2**32 - 1


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage block)
        raise UsageError(message)


def parse_shape(text: str):
    """'8192x2048' -> (8192, 2048): d_out × d_in of W, both positive integers."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text or "")
    if not m or int(m.group(1)) == 0 or int(m.group(2)) == 0:
        raise argparse.ArgumentTypeError(
            f"malformed shape {text!r}: expected D_OUTxD_IN with positive integers, e.g. 8192x2048"
        )
    return int(m.group(1)), int(m.group(2))


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _int_list(text: str):
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return tuple(vals)


def _g_grid(text: str):
    """LO:HI:PER_DECADE, 0 < LO < HI ≤ 1, PER_DECADE an integer from 1 to 50 (the g sweep's |g − 1| grid)."""
    parts = text.split(":")
    try:
        lo, hi, per = float(parts[0]), float(parts[1]), int(parts[2])
        if len(parts) != 3:
            raise ValueError
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"expected LO:HI:PER_DECADE such as 1e-6:1e-1:3, got {text!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi <= 1) or not 1 <= per <= 50:
        raise argparse.ArgumentTypeError(f"need 0 < LO < HI ≤ 1 and 1 ≤ PER_DECADE ≤ 50, got {text!r}")
    return lo, hi, per


def _seed(text: str) -> int:
    """A seed: an integer from 0 to 2**32 - 1 (what every generator here accepts)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= v <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"seed must be from 0 to 2**32 - 1 = {MAX_SEED}, got {text!r}")
    return v


def _path(text: str) -> str:
    """A file or folder path: not empty, no NUL byte."""
    if not text.strip() or "\0" in text:
        raise argparse.ArgumentTypeError(f"expected a path, got {text!r}")
    return text


def _positive_float(text: str) -> float:
    v = _finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def _nonnegative_float(text: str) -> float:
    v = _finite_float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return v


def _finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


class _Progress:
    """A one-line progress bar on stderr (a line per step when stderr is not a terminal)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.time()

    def __call__(self, done: int, total: int, msg: str) -> None:
        if not self.enabled:
            return
        width = 28
        fill = int(width * done / max(1, total))
        line = f"[{'#' * fill}{'.' * (width - fill)}] {done}/{total} {time.time() - self.t0:5.0f}s {msg}"
        if self.tty:
            sys.stderr.write("\r" + line[:110].ljust(110) + ("\n" if done >= total else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def build_parser() -> argparse.ArgumentParser:
    from .cases import REGIMES
    from .sweep import EXPERIMENTS

    p = _Parser(prog="dora-verify", description="Numerical verification of DoRA: oracles, error sweeps, reports.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    sw = sub.add_parser("sweep", help="error sweep of the DoRA compose and norm forms against the exact oracle")
    sw.add_argument("--shape", type=parse_shape, default=(8192, 2048), help="D_OUTxD_IN of W (default 8192x2048)")
    sw.add_argument(
        "--tokens",
        type=_positive_int,
        default=2048,
        help="activation rows of the paper-protocol headline (default 2048)",
    )
    sw.add_argument(
        "--grid-tokens",
        type=_positive_int,
        default=128,
        help="activation rows per point of the g sweep and regime grid (default 128)",
    )
    sw.add_argument("--rank", type=_positive_int, default=16, help="LoRA rank r (default 16)")
    sw.add_argument(
        "--alpha",
        type=_positive_float,
        default=None,
        help="LoRA alpha, positive (default 2·r, so s = 2; 0 would switch the adapter off, a negative "
        "alpha only negates B)",
    )
    sw.add_argument("--rslora", action="store_true", help="s = alpha/sqrt(r) instead of alpha/r")
    sw.add_argument(
        "--ranks",
        type=_int_list,
        default=(8, 32, 128, 384),
        help="ranks of the norm-vs-rank experiment (default 8,32,128,384)",
    )
    sw.add_argument("--regimes", default=",".join(REGIMES), help=f"comma-separated subset of: {', '.join(REGIMES)}")
    sw.add_argument(
        "--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="model/activation dtype (default bf16)"
    )
    sw.add_argument("--seed", type=_seed, default=0, help="seed of every generator, 0 .. 2**32-1 (default 0)")
    sw.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: the GPU when there is one")
    sw.add_argument(
        "--out", type=_path, default="dora-verify-report", help="output directory (default ./dora-verify-report)"
    )
    sw.add_argument(
        "--impl",
        action="append",
        default=[],
        help="the implementations measured beside the forms: kernels (the default: fused tier on CUDA, "
        "eager tier on CPU), peft (stock PEFT DoRA), module:callable (dora_verify.adapter), or none; "
        "repeatable; a call that raises or returns no tensor of the right shape is a failed row and "
        "the exit status 1",
    )
    sw.add_argument(
        "--experiments",
        default="none",
        metavar="NAME[,NAME...]",
        help=f"optional experiments run after the standard sweep, each a section of the report: "
        f"{', '.join(EXPERIMENTS)}, all or none (default none)",
    )
    sw.add_argument(
        "--g-grid",
        type=_g_grid,
        default=None,
        metavar="LO:HI:PER_DECADE",
        help="|g − 1| of the g sweep: log-spaced from LO to HI, PER_DECADE points a decade, both signs, "
        "plus 0 and the dtype's resolution offsets (default 1e-6:1e-1:3)",
    )
    sw.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    sw.add_argument(
        "--csv",
        action="store_true",
        help="also write report.csv: every value in long format (section, record, field, value, text)",
    )
    sw.add_argument("--quiet", action="store_true", help="no progress bar")
    ce = sub.add_parser("certify", help="targeted hypothesis search for inputs that break the a-priori error bounds")
    ce.add_argument(
        "--targets",
        default=None,
        help="comma-separated targets, or 'kernels' (default: the production kernels), 'forms', 'all'; "
        "with --impl: its targets NAME.compose / NAME.norm / NAME.layer (default: all it provides); "
        "layer: DoRALinear's whole layer",
    )
    ce.add_argument(
        "--impl",
        default=None,
        help="certify another implementation under the faithful contract: peft (stock PEFT DoRA) or "
        "module:callable (dora_verify.adapter)",
    )
    ce.add_argument(
        "--dtypes", default="bf16,fp16,fp32", help="comma-separated subset of bf16, fp16, fp32 (default all)"
    )
    ce.add_argument("--examples", type=_positive_int, default=200, help="examples per (target, dtype) (default 200)")
    ce.add_argument("--seconds", type=_finite_float, default=None, help="time budget for the whole run (split evenly)")
    ce.add_argument(
        "--nightly",
        action="store_true",
        help="random seeded rounds (seed, seed+1, ...) instead of the derandomized pre-merge search",
    )
    ce.add_argument("--seed", type=_seed, default=0, help="first round's seed with --nightly (default 0)")
    ce.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: the GPU when there is one")
    ce.add_argument(
        "--tier",
        default="auto",
        choices=["auto", "fused", "eager"],
        help="kernel tier (auto: fused on CUDA, eager elsewhere; fused without CUDA is the interpreter)",
    )
    ce.add_argument("--keep", type=_positive_int, default=3, help="worst cases kept per (target, dtype) (default 3)")
    ce.add_argument(
        "--corpus", type=_path, default=None, help="folder for the worst cases (.npz + .json; default OUT/corpus)"
    )
    ce.add_argument(
        "--out", type=_path, default="dora-verify-certify", help="report folder (default ./dora-verify-certify)"
    )
    ce.add_argument(
        "--jobs", type=_positive_int, default=1, help="parallel processes, one per (target, dtype) (default 1)"
    )
    ce.add_argument("--quiet", action="store_true", help="no progress bar")
    ga = sub.add_parser("gate", help="pre-merge numerical CI gate: a fixed seeded suite, hard criteria and a baseline")
    ga.add_argument(
        "--impl",
        default="kernels",
        help="kernels (default), forms, form:NAME, peft (stock PEFT DoRA), or module:callable "
        "(docs/gate.md, dora_verify.adapter)",
    )
    ga.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="auto: the GPU when there is one; cpu: the logic-only mode (eager tier, Triton interpreter)",
    )
    ga.add_argument("--require-gpu", action="store_true", help="fail (exit 2) when no CUDA device is present")
    ga.add_argument(
        "--dtypes", default="bf16,fp16,fp32", help="comma-separated subset of bf16, fp16, fp32 (default all)"
    )
    ga.add_argument("--seed", type=_seed, default=0, help="suite seed (default 0; the baseline records the suite)")
    ga.add_argument(
        "--baseline", type=_path, default=None, help="baseline JSON to compare with (committed in your repository)"
    )
    ga.add_argument(
        "--update-baseline", action="store_true", help="write --baseline from this run (only if the hard criteria pass)"
    )
    ga.add_argument(
        "--allow-env-mismatch",
        nargs="?",
        const="all",
        default=None,
        metavar="KEYS",
        type=_env_keys,
        help="compare with a baseline made in a different environment instead of refusing it: any difference "
        "(no value), or only in these comma-separated keys, e.g. torch,triton (a routine bump)",
    )
    ga.add_argument(
        "--fa-limit",
        type=_finite_float,
        default=None,
        help="limit of the FlashAttention-style ratio to the plain low-precision baseline (default 2)",
    )
    ga.add_argument("--case", action="append", default=[], help="run only this case id (repeatable; to reproduce)")
    ga.add_argument(
        "--ops",
        default="compose,backward,norm,layer",
        help="comma-separated subset of compose, backward, norm, layer (default all); a subset compares "
        "with the baseline's groups it covers",
    )
    ga.add_argument(
        "--slack",
        action="append",
        default=[],
        metavar="METRIC=ABS,REL",
        help="with --update-baseline: the tolerance |new − old| ≤ ABS + REL·|old| of a baseline metric "
        "(max_ulp, p99_ratio, max_ratio, frac_correctly_rounded; repeatable; default: the existing "
        "baseline's, else the gate's)",
    )
    ga.add_argument(
        "--docs", action="store_true", help="print docs/gate.md (the gate's manual, shipped with the package) and exit"
    )
    ga.add_argument(
        "--list-cases",
        action="store_true",
        help="print the suite's case ids (check, dtype, shape, regime, g mode, bias) and exit",
    )
    ga.add_argument(
        "--case-timeout",
        type=_nonnegative_float,
        default=None,
        metavar="SECONDS",
        help="limit per (implementation, case); a case past it fails as a hang (0: no limit; default: the gate's)",
    )
    ga.add_argument(
        "--out",
        type=_path,
        default="dora-verify-gate",
        help="report folder: gate.md, gate.json, junit.xml, cases/ (default ./dora-verify-gate)",
    )
    ga.add_argument("--quiet", action="store_true", help="no progress bar")
    be = sub.add_parser("bench", help="speed and memory of the kernels vs eager torch, PEFT DoRA and PEFT LoRA (CUDA)")
    be.add_argument("--quick", action="store_true", help="a small subset of the shapes (about a minute)")
    be.add_argument(
        "--parts", default="compose,norm,layer,model", help="comma-separated subset of compose, norm, layer, model"
    )
    be.add_argument("--warmup", type=_positive_int, default=10, help="warm-up calls per measurement (default 10)")
    be.add_argument("--reps", type=_positive_int, default=50, help="timed calls per measurement, median (default 50)")
    be.add_argument("--seed", type=_seed, default=0, help="seed of the random inputs (default 0)")
    be.add_argument("--out", type=_path, default="dora-verify-bench", help="report folder: bench.json, bench.md, plots")
    be.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    be.add_argument(
        "--render",
        metavar="BENCH_JSON",
        type=_path,
        default=None,
        help="re-render a saved bench.json into --out instead of measuring (no GPU needed)",
    )
    be.add_argument(
        "--readme",
        metavar="README",
        type=_path,
        default=None,
        help="with --render: rewrite the README's generated performance section from that report",
    )
    be.add_argument("--quiet", action="store_true", help="no progress bar")
    xp = sub.add_parser(
        "explain",
        help="this project's kernels on a certify corpus case or a gate case, worst element "
        "exactly: inputs, exact result as a rational, the value returned, its error in "
        "ulps, the bound and the ratio",
    )
    xp.add_argument(
        "case",
        type=_path,
        help="a certify corpus case (CASE.json, its .npz beside it) or a gate case id "
        "(compose-bf16-03, norm-fp16-03; `dora-verify gate --list-cases`)",
    )
    xp.add_argument("--seed", type=_seed, default=0, help="with a gate case id: the gate's suite seed (default 0)")
    xp.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="where to run the implementation")
    xp.add_argument("--tier", default=None, choices=["fused", "eager"], help="default: fused on CUDA, eager elsewhere")
    xp.add_argument("--json", action="store_true", help="print the explanation as JSON")
    ex = sub.add_parser("exhaustive", help="all 2^32 (base, lora) bf16/fp16 pairs through the compose epilogue (CUDA)")
    ex.add_argument("--dtypes", default="bf16,fp16", help="comma-separated subset of bf16, fp16 (default both)")
    ex.add_argument(
        "--g", default=None, help="comma-separated fp32 g values (default: a grid around 1 and far from it)"
    )
    ex.add_argument("--s", default=None, help="comma-separated LoRA scalings s (default 1, 2, 0.25, 16/sqrt(384))")
    ex.add_argument(
        "--out", type=_path, default="dora-verify-exhaustive", help="report folder (default ./dora-verify-exhaustive)"
    )
    ex.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _float_list(text, name):
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"bad --{name} {text!r}: expected comma-separated numbers") from None
    if not vals or any(not (v == v and abs(v) < float("inf")) for v in vals):
        raise UsageError(f"bad --{name} {text!r}: expected comma-separated finite numbers")
    return tuple(vals)


def _exhaustive(args) -> int:
    import torch

    from .exhaustive import DEFAULT_G, DEFAULT_S, run_exhaustive, write_exhaustive_report
    from .report import check_writable

    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    if not dtypes or any(d not in ("bf16", "fp16") for d in dtypes):
        raise UsageError(f"bad --dtypes {args.dtypes!r}: a comma-separated subset of bf16, fp16")
    gs = _float_list(args.g, "g") if args.g else DEFAULT_G
    ss = _float_list(args.s, "s") if args.s else DEFAULT_S
    if not torch.cuda.is_available():
        raise UsageError(
            "exhaustive needs a CUDA device (2^32 pairs per point); on a CPU the test suite runs the "
            "exhaustive one-operand slices (tests/test_exhaustive.py)"
        )
    check_writable(args.out)
    rep = run_exhaustive(dtypes, gs, ss, progress=_Progress(not args.quiet))
    files = write_exhaustive_report(rep, args.out)
    print(
        f"{'certified' if rep['certified'] else 'VIOLATION'}: {rep['pairs']:.3e} pairs, largest error/bound ratio "
        f"{rep['max_ratio']:.4g}, max {rep['max_ulp']:.4g} ulp; wrote {', '.join(str(f) for f in files)}"
    )
    return 0 if rep["certified"] else 1


def _certify(args) -> int:
    from pathlib import Path

    from .adapter import ImplError
    from .certify import KERNEL_TARGETS, TARGETS, CertifyConfig, impl_targets, run_certify, write_certify_report
    from .report import check_writable

    if args.impl is None:
        table = TARGETS
        groups = {
            "kernels": KERNEL_TARGETS,
            "forms": tuple(t for t in TARGETS if t.startswith("form.")),
            "all": tuple(TARGETS),
        }
        spec = args.targets or "kernels"
    else:
        try:
            table = impl_targets(args.impl)
        except ImplError as e:
            raise UsageError(str(e)) from None
        groups = {"all": tuple(table)}
        spec = args.targets or "all"
    names = []
    for item in (t.strip() for t in spec.split(",") if t.strip()):
        names += list(groups.get(item, (item,)))
    unknown = [t for t in names if t not in table]
    if unknown or not names:
        raise UsageError(f"unknown target(s) {unknown or spec!r}; choose from {', '.join(list(groups) + list(table))}")
    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    if not dtypes or any(d not in ("bf16", "fp16", "fp32") for d in dtypes):
        raise UsageError(f"bad --dtypes {args.dtypes!r}: a comma-separated subset of bf16, fp16, fp32")
    if args.seconds is not None and args.seconds <= 0:
        raise UsageError(f"--seconds must be positive, got {args.seconds}")
    check_writable(args.out)
    corpus = args.corpus or str(Path(args.out) / "corpus")
    check_writable(corpus)
    cfg = CertifyConfig(
        targets=tuple(dict.fromkeys(names)),
        dtypes=dtypes,
        examples=args.examples,
        seconds=args.seconds,
        seed=args.seed,
        derandomize=not args.nightly,
        device=args.device,
        tier=None if args.tier == "auto" else args.tier,
        keep=args.keep,
        corpus=corpus,
        jobs=args.jobs,
        impl=args.impl,
    )
    rep = run_certify(cfg, progress=_Progress(not args.quiet))
    files = write_certify_report(rep, args.out)
    worst = max(rep["results"], key=lambda r: r["max_ratio"])
    crash = next(
        (
            f"; crashed ({r['target']}/{r['dtype']}): {r['info']['error']}"
            for r in rep["results"]
            if isinstance(r.get("info", {}).get("error"), str)
        ),
        "",
    )
    print(
        f"{'certified' if rep['certified'] else 'VIOLATION'}: {sum(r['examples'] for r in rep['results'])} examples, "
        f"largest error/bound ratio {rep['max_ratio']:.4g} ({worst['target']}/{worst['dtype']}){crash}; "
        f"wrote {', '.join(str(f) for f in files)}"
    )
    return 0 if rep["certified"] else 1


def _gate(args) -> int:
    import dataclasses

    if not args.require_gpu:
        interpret_without_gpu(args.device)
    from .adapter import ImplError, load_impl
    from .gate import (
        DEFAULT_FA_LIMIT,
        GateConfig,
        GateEnvironmentError,
        is_subset,
        load_baseline,
        make_baseline,
        run_gate,
        verdict,
        write_baseline,
        write_gate_report,
    )
    from .report import check_writable

    if args.docs:
        print(doc_text("gate.md"), end="")
        return 0
    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    if not dtypes or any(d not in ("bf16", "fp16", "fp32") for d in dtypes):
        raise UsageError(f"bad --dtypes {args.dtypes!r}: a comma-separated subset of bf16, fp16, fp32")
    from .gate import OPS

    ops = tuple(o.strip() for o in args.ops.split(",") if o.strip())
    if not ops or any(o not in OPS for o in ops):
        raise UsageError(f"bad --ops {args.ops!r}: a comma-separated subset of {', '.join(OPS)}")
    if args.list_cases:
        from .gate import _op, build_suite, case_description

        for c in build_suite(dtypes=dtypes, seed=args.seed):
            if _op(c.check) in ops:
                print(f"{c.id:28s} {case_description(c)}")
        return 0
    if args.slack and not args.update_baseline:
        raise UsageError("--slack sets the tolerances of a baseline being written: use it with --update-baseline")
    fa = DEFAULT_FA_LIMIT if args.fa_limit is None else args.fa_limit
    if fa <= 0:
        raise UsageError(f"--fa-limit must be positive, got {fa}")
    if args.update_baseline and not args.baseline:
        raise UsageError("--update-baseline needs --baseline PATH (the file to write)")
    extra = {}
    if args.case_timeout is not None:  # passed through where GateConfig has the field
        if "case_timeout" not in {f.name for f in dataclasses.fields(GateConfig)}:
            raise UsageError("--case-timeout: this version's gate has no per-case time limit")
        extra["case_timeout"] = args.case_timeout or None
    try:
        impls = load_impl(args.impl)
    except ImplError as e:
        raise UsageError(str(e)) from None
    check_writable(args.out)
    baseline = load_baseline(args.baseline) if args.baseline and not args.update_baseline else None
    slack = _slack(args)
    cfg = GateConfig(
        impls=impls,
        dtypes=dtypes,
        device=args.device,
        require_gpu=args.require_gpu,
        seed=args.seed,
        fa_limit=fa,
        case_ids=tuple(args.case),
        ops=ops,
        **extra,
    )
    if args.update_baseline and args.case:
        raise UsageError("--update-baseline records whole groups: drop --case")
    rep = None
    try:
        rep = run_gate(cfg, progress=_Progress(not args.quiet))
        rep["impl_spec"] = args.impl
        verdict(rep, baseline, True if args.allow_env_mismatch == "all" else args.allow_env_mismatch or False)
    except GateEnvironmentError as e:  # a GPU required but absent (no report), or a baseline from elsewhere (reports)
        files = write_gate_report(rep, args.out) if rep is not None and "verdict" in rep else []
        wrote = f"; wrote {', '.join(str(f) for f in files)}" if files else ""
        print(f"dora-verify: gate FAILED: {e}{wrote}", file=sys.stderr)
        return EXIT_USAGE
    files = write_gate_report(rep, args.out)
    v = rep["verdict"]
    if args.update_baseline and not v["hard"] and not v.get("nothing_ran"):
        merge = _mergeable_baseline(args.baseline, rep) if is_subset(cfg) else None
        doc = make_baseline(rep, slack, merge_into=merge)
        write_baseline(doc, args.baseline)
        part = f", {len(rep['groups'])} of them from this subset run" if merge else ""
        print(
            f"gate: hard criteria passed; baseline written to {args.baseline} ({len(doc['groups'])} groups{part}); "
            f"wrote {', '.join(str(f) for f in files)}"
        )
        return 0
    n_hard = sum(len(m) for m in v["hard"].values())
    status = "PASSED" if v["passed"] else "FAILED"
    print(
        f"gate {status}: {rep['evaluations']} evaluations, {len(rep['groups'])} groups, {n_hard} hard failure(s), "
        f"{len(v['baseline'])} baseline finding(s){'' if v['baseline_used'] else ' (no baseline)'}"
        f"{'; nothing ran' if v.get('nothing_ran') else ''}; wrote {', '.join(str(f) for f in files)}"
    )
    return 0 if v["passed"] else 1


def _mergeable_baseline(path, rep) -> "dict | None":
    """The existing baseline at ``path`` if a subset run may update its part of it (same environment), else None."""
    from pathlib import Path

    from .gate import BaselineError, env_mismatch, load_baseline

    if not Path(path).exists():
        return None
    try:
        old = load_baseline(path)
    except BaselineError:
        return None  # unreadable: this run's subset replaces it (load_baseline said why when it was read)
    mism = env_mismatch(old.get("environment", {}), rep["environment"])
    if mism:
        raise UsageError(
            f"a --dtypes/--ops subset updates only its part of a baseline made in this environment; "
            f"{path} is from another ({'; '.join(mism)}): regenerate it with the whole suite"
        )
    return old


def interpret_without_gpu(device: str) -> None:
    """The gate's CPU mode runs the fused kernels under the Triton interpreter: set TRITON_INTERPRET=1 (unless set)
    when no GPU is used — before the kernels are imported, since triton.jit reads it when they are defined."""
    import os

    if device != "cuda" and "dora_verify.kernels.compose" not in sys.modules:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")


def doc_text(name: str) -> str:
    """A page of docs/ as shipped in the package (dora_verify.docs), or from the source tree beside it."""
    from importlib import resources
    from pathlib import Path

    try:
        return resources.files("dora_verify.docs").joinpath(name).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError, OSError):
        return (Path(__file__).resolve().parent.parent / "docs" / name).read_text(encoding="utf-8")


def _env_keys(text: str):
    """--allow-env-mismatch's value: 'all', or comma-separated environment keys."""
    from .gate import ENV_KEYS

    if text == "all":
        return text
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in keys if k not in ENV_KEYS]
    if not keys or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated environment keys of {', '.join(ENV_KEYS)}")
    return keys


def _slack(args) -> "dict | None":
    """The slack of a baseline being written: --slack entries over the existing baseline's (or the gate's
    defaults); None where neither applies (make_baseline's defaults)."""
    import math
    from pathlib import Path

    from .gate import DEFAULT_SLACK, BaselineError, load_baseline

    if not args.update_baseline:
        return None
    slack = dict(DEFAULT_SLACK)
    if args.baseline and Path(args.baseline).exists():
        try:
            slack.update({k: tuple(v) for k, v in load_baseline(args.baseline).get("slack", {}).items()})
        except BaselineError:
            pass  # a broken file is replaced by this run's
    for entry in args.slack:
        metric, _, vals = entry.partition("=")
        try:
            a, r = (float(v) for v in vals.split(","))
        except ValueError:
            raise UsageError(f"bad --slack {entry!r}: want METRIC=ABS,REL, e.g. max_ulp=1e-3,0.01") from None
        if metric not in DEFAULT_SLACK or not all(math.isfinite(v) and v >= 0 for v in (a, r)):
            raise UsageError(
                f"bad --slack {entry!r}: METRIC one of {', '.join(DEFAULT_SLACK)}, ABS and REL finite and ≥ 0"
            )
        slack[metric] = (a, r)
    return slack


def _explain(args) -> int:
    import json

    from .explain import ExplainError, explain_case, explain_example, explain_text, gate_case
    from .report import report_document
    from .sweep import resolve_device

    try:
        if args.case.endswith(".json"):
            rep = explain_case(args.case, resolve_device(args.device), args.tier)
        else:
            target, ex = gate_case(args.case, args.seed)
            rep = explain_example(
                f"{args.case} (the gate's suite, seed {args.seed}; this project's kernels on its inputs)",
                target,
                ex,
                resolve_device(args.device),
                args.tier,
            )
    except ExplainError as e:
        raise UsageError(str(e)) from None
    print(
        json.dumps(report_document(rep), indent=1) if args.json else explain_text(rep),
        end="" if not args.json else "\n",
    )
    return 0


def _bench(args) -> int:
    import os
    from pathlib import Path

    from .bench import BenchConfig, check_available, run_bench
    from .bench_report import check_report, update_readme, write_bench_report
    from .report import ReportPathError, check_writable, load_report

    if args.readme and not args.render:
        raise UsageError("--readme needs --render BENCH_JSON (the README section is generated from a saved report)")
    if args.render:
        try:
            rep = load_report(args.render)
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise UsageError(f"cannot read bench report {args.render!r}: {e}") from None
        if not isinstance(rep, dict) or rep.get("kind") != "bench":
            raise UsageError(f"{args.render!r} is not a dora-verify bench report (no \"kind\": \"bench\")")
        if args.readme and not Path(args.readme).is_file():
            raise UsageError(f"--readme {args.readme!r}: no such file")
        try:  # rendering reads only the report: what breaks it is the file's, not a bug
            check_report(rep)  # before anything is written
            check_writable(args.out)
            files = write_bench_report(rep, args.out, plots=not args.no_plots)
        except ReportPathError:
            raise
        except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
            raise UsageError(f"{args.render!r} is not a complete bench report: {type(e).__name__}: {e}") from None
        if args.readme:
            md = os.path.relpath(Path(args.out) / "bench.md", Path(args.readme).resolve().parent)
            update_readme(args.readme, rep, md)
        print(
            f"rendered {args.render}; wrote {', '.join(str(f) for f in files)}"
            f"{'; updated ' + args.readme if args.readme else ''}"
        )
        return 0
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    cfg = BenchConfig(quick=args.quick, parts=parts, warmup=args.warmup, reps=args.reps, seed=args.seed)
    cfg.validate()
    check_available(cfg)  # no GPU: exit 2 before anything is written
    check_writable(args.out)
    rep = run_bench(cfg, progress=_Progress(not args.quiet))
    files = write_bench_report(rep, args.out, plots=not args.no_plots)
    met = [t for t in rep["targets"] if t["met"] is not None]
    print(
        f"bench: {sum(t['met'] for t in met)}/{len(met)} kernel targets met on "
        f"{rep['provenance']['device'].get('name')}; wrote {', '.join(str(f) for f in files)}"
    )
    return 0


def _sweep(args) -> int:
    from .cases import REGIMES
    from .report import check_writable, write_report
    from .sweep import SweepConfig, check_memory, failed_rows, load_impls, parse_experiments, resolve_device, run_sweep

    experiments = parse_experiments(args.experiments)  # an unknown name: ValueError, exit 2
    regimes = tuple(r.strip() for r in args.regimes.split(",") if r.strip())
    unknown = [r for r in regimes if r not in REGIMES]
    if unknown or not regimes:
        raise UsageError(f"unknown regime(s) {unknown or args.regimes!r}; choose from {', '.join(REGIMES)}")
    impls = tuple(dict.fromkeys(args.impl or ["kernels"]))  # the project's own kernels unless told otherwise
    if "none" in impls:
        if len(impls) > 1:
            raise UsageError(f"--impl none leaves every implementation out; it cannot go with {', '.join(impls)}")
        impls = ()
    cfg = SweepConfig(
        d_out=args.shape[0],
        d_in=args.shape[1],
        tokens=args.tokens,
        grid_tokens=args.grid_tokens,
        rank=args.rank,
        alpha=args.alpha,
        rslora=args.rslora,
        dtype=args.dtype,
        seed=args.seed,
        device=args.device,
        ranks=args.ranks,
        regimes=regimes,
        impls=impls,
        experiments=experiments,
        **({"g_grid": args.g_grid} if args.g_grid else {}),
    )
    cfg.validate()  # everything below fails before minutes of work
    check_memory(cfg, resolve_device(args.device))  # cuda without a GPU, a sweep too large for the machine
    load_impls(impls, resolve_device(args.device))  # an unknown or broken --impl
    check_writable(args.out)
    rep = run_sweep(cfg, progress=_Progress(not args.quiet))
    rep["run_id"] = rep["provenance"]["run_id"]
    files = write_report(rep, args.out, plots=not args.no_plots, csv=args.csv)
    h = rep["headline"]["paper_figure1"]
    failed = failed_rows(rep)
    ran = "".join(f"; {name} {rep['timings_s'][name]:.0f} s" for name in cfg.experiments)
    print(
        f"naive/stable at g=1 (paper protocol): {h['ratio_naive_over_stable_paper_protocol']:.2f}x{ran}; "
        f"wrote {', '.join(str(f) for f in files)} in {rep['timings_s']['total']:.0f} s"
        + (
            f"; {len(failed)} implementation call(s) FAILED "
            f"({failed[0][1].get('form') or failed[0][1].get('impl')}: {failed[0][1]['failed']})"
            if failed
            else ""
        )
    )
    return 1 if failed else 0


def _error(e: BaseException) -> int:
    text = " ".join(str(e).split()) or type(e).__name__
    print(f"dora-verify: error: {text}", file=sys.stderr)
    return EXIT_USAGE


def main(argv=None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        commands = {
            "sweep": _sweep,
            "certify": _certify,
            "exhaustive": _exhaustive,
            "gate": _gate,
            "bench": _bench,
            "explain": _explain,
        }
        return commands[args.command](args)
    except (UsageError, ValueError) as e:  # ValueError: bad configuration past parsing (device, memory, I/O...)
        return _error(e)
    except KeyboardInterrupt:
        print(f"{chr(10) if sys.stderr.isatty() else ''}dora-verify: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
