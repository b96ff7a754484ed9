"""``dora-verify`` command line. Usage errors exit with code 2 and one line on stderr."""
from __future__ import annotations

import argparse
import re
import sys
import time

EXIT_USAGE = 2


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage block)
        raise UsageError(message)


def parse_shape(text: str):
    """'8192x2048' -> (8192, 2048): d_out × d_in of W, both positive integers."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text or "")
    if not m or int(m.group(1)) == 0 or int(m.group(2)) == 0:
        raise argparse.ArgumentTypeError(f"malformed shape {text!r}: expected D_OUTxD_IN with positive integers, e.g. 8192x2048")
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

    p = _Parser(prog="dora-verify", description="Numerical verification of DoRA: oracles, error sweeps, reports.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    sw = sub.add_parser("sweep", help="error sweep of the DoRA compose and norm forms against the exact oracle")
    sw.add_argument("--shape", type=parse_shape, default=(8192, 2048), help="D_OUTxD_IN of W (default 8192x2048)")
    sw.add_argument("--tokens", type=_positive_int, default=2048, help="activation rows of the paper-protocol headline (default 2048)")
    sw.add_argument("--grid-tokens", type=_positive_int, default=128, help="activation rows per point of the g sweep and regime grid (default 128)")
    sw.add_argument("--rank", type=_positive_int, default=16, help="LoRA rank r (default 16)")
    sw.add_argument("--alpha", type=_finite_float, default=None, help="LoRA alpha (default 2·r, so s = 2)")
    sw.add_argument("--rslora", action="store_true", help="s = alpha/sqrt(r) instead of alpha/r")
    sw.add_argument("--ranks", type=_int_list, default=(8, 32, 128, 384), help="ranks of the norm-vs-rank experiment (default 8,32,128,384)")
    sw.add_argument("--regimes", default=",".join(REGIMES), help=f"comma-separated subset of: {', '.join(REGIMES)}")
    sw.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="model/activation dtype (default bf16)")
    sw.add_argument("--seed", type=int, default=0, help="seed of every generator (default 0)")
    sw.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: the GPU when there is one")
    sw.add_argument("--out", default="dora-verify-report", help="output directory (default ./dora-verify-report)")
    sw.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    sw.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _sweep(args) -> int:
    from .cases import REGIMES
    from .report import check_writable, write_report
    from .sweep import SweepConfig, resolve_device, run_sweep

    regimes = tuple(r.strip() for r in args.regimes.split(",") if r.strip())
    unknown = [r for r in regimes if r not in REGIMES]
    if unknown or not regimes:
        raise UsageError(f"unknown regime(s) {unknown or args.regimes!r}; choose from {', '.join(REGIMES)}")
    resolve_device(args.device)  # raises ValueError for cuda without a GPU
    check_writable(args.out)  # fail before minutes of work
    cfg = SweepConfig(d_out=args.shape[0], d_in=args.shape[1], tokens=args.tokens, grid_tokens=args.grid_tokens,
                      rank=args.rank, alpha=args.alpha, rslora=args.rslora, dtype=args.dtype, seed=args.seed,
                      device=args.device, ranks=args.ranks, regimes=regimes)
    cfg.validate()
    rep = run_sweep(cfg, progress=_Progress(not args.quiet))
    rep["run_id"] = f"{rep['provenance']['time_utc']}-seed{cfg.seed}"
    files = write_report(rep, args.out, plots=not args.no_plots)
    h = rep["headline"]["paper_figure1"]
    print(f"naive/stable at g=1 (paper protocol): {h['ratio_naive_over_stable_paper_protocol']:.2f}x; "
          f"wrote {', '.join(str(f) for f in files)} in {rep['timings_s']['total']:.0f} s")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        if args.command == "sweep":
            return _sweep(args)
    except UsageError as e:
        print(f"dora-verify: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as e:  # bad configuration found past parsing (device, dtype, path, scaling...)
        print(f"dora-verify: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
