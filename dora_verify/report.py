"""Reports: strict JSON, Markdown a person reads first, PNG plots; a report set is replaced as a whole.

``write_bundle`` (behind ``write_report`` and every other command's report) never edits ``OUT`` in place:

1. it builds the complete new folder ``.OUT.dv-<pid>-<random>`` beside ``OUT`` (same file system): the new
   set (JSON, Markdown, plots, extra files), every file fsynced, plus hard links (copies where linking
   fails) of whatever else ``OUT`` holds that the new set does not replace: another command's report
   written to the same folder, certify's ``corpus/``, a README, logs;
2. it swaps that folder with ``OUT`` in one step, ``renameat2(RENAME_EXCHANGE)`` on Linux
   (``renamex_np(RENAME_SWAP)`` on macOS), so ``OUT`` stays a plain directory (as committed report
   folders must) and a kill at any moment leaves ``OUT`` entirely old or entirely new;
3. it deletes the staging path, which now holds the previous folder.

Where the file system has no atomic exchange (NFS, Windows), step 2 is two renames, ``OUT`` →
``.OUT.dv-<pid>-<random>.old`` then the new folder → ``OUT``: a kill between them leaves no ``OUT``, and the
next write to it (or ``check_writable``) renames the ``.old`` folder back first. Leftovers of killed runs
(staging folders whose process is gone) are deleted the same way, so a normal run leaves none behind.
An older version's ``OUT`` (a plain folder, perhaps with ``.staging-*`` leftovers inside) needs no
migration; those leftovers are dropped. One writer per ``OUT`` at a time; a symlinked ``OUT`` swaps the
folder it points to. I/O failures (a full disk, permissions) raise :class:`ReportWriteError`, one line.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

from .formats import g_resolution
from .provenance import png_metadata, stamp_png


class ReportPathError(ValueError):
    """The output directory cannot be created or written."""


class ReportWriteError(ReportPathError, OSError):
    """Writing a report failed (a full disk, permissions): both a ReportPathError and an OSError."""


def check_writable(out_dir: "str | Path") -> Path:
    """Create ``out_dir`` if needed and prove it is writable (raises ReportPathError otherwise); first
    clean up after killed writes to it (see the module doc)."""
    if not str(out_dir).strip():
        raise ReportPathError("output path is empty")
    out = Path(out_dir)
    try:
        recover(out)
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".probe-", delete=True):
            pass
    except OSError as e:
        raise ReportPathError(f"cannot write to output directory {str(out)!r}: {e.strerror or e}") from None
    if not out.is_dir():
        raise ReportPathError(f"output path {str(out)!r} is not a directory")
    return out


def _fmt(v, digits=3):
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == 0:
            return "0"
        if 0.999 < abs(v) < 1:  # fractions near 1 (ratios, fraction correctly rounded) must not print as "1"
            k = 6
            while f"{abs(v):.{k}f}" == f"{1:.{k}f}" and k < 17:
                k += 1
            return f"{v:.{k}f}"
        if abs(v) >= 1e4 or abs(v) < 1e-3:
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(v)


def _cell(text: str) -> str:
    """A table cell's text: '|' escaped and line breaks folded, so a value holding them (a group key, an error
    message) stays in its cell on GitHub and in any CommonMark table."""
    return str(text).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _table(headers, rows) -> str:
    out = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(_cell(_fmt(c)) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _nonfinite(m) -> str:
    """'0', '16 NaN', '2 NaN, 3 Inf' of a metrics record; '–' when absent."""
    if not m or "nan" not in m:
        return "–"
    parts = [f"{m[k]} {label}" for k, label in (("nan", "NaN"), ("inf", "Inf")) if m[k]]
    return ", ".join(parts) or "0"


def _failures_section(rep: dict) -> list:
    """Markdown lines listing the implementation calls that failed (one row per implementation and reason)."""
    from .sweep import failed_rows

    groups = {}
    for exp, r in failed_rows(rep):
        g = groups.setdefault((r.get("form") or r.get("impl"), r["failed"]), [0, []])
        g[0] += 1
        if exp not in g[1]:
            g[1].append(exp)
    if not groups:
        return []
    return [
        "",
        "## Failed implementation calls",
        "",
        "These calls raised or returned something other than the tensor the protocol asks for "
        "(`dora_verify.adapter`); their rows in the tables below read **failed** and have no metrics.",
        "",
        _table(
            ["implementation", "calls", "experiments", "error"],
            [[form, n, ", ".join(exps), msg.replace("|", "\\|")] for (form, msg), (n, exps) in groups.items()],
        ),
    ]


def _cells(r: dict, m, keys) -> list:
    """Table cells of ``keys`` of metrics ``m``, or 'failed' then blanks for a failed row."""
    if r.get("failed"):
        return ["**failed**"] + [None] * (len(keys) - 1)
    return [m.get(k) if isinstance(k, str) else k(m) for k in keys]


def sweep_markdown(rep: dict, plots: list) -> str:
    cfg, prov, h, ex = rep["config"], rep["provenance"], rep["headline"], rep["experiments"]
    git = prov["git"]
    dev = prov["device"]
    devname = dev.get("name") or f"CPU ({dev.get('cpu')}, {dev.get('torch_threads')} threads)"
    L = [
        f"# dora-verify sweep — W {cfg['d_out']}×{cfg['d_in']}, {cfg['dtype']}, r = {cfg['rank']}, s = {cfg['s']:g}",
        "",
    ]
    L.append(
        f"Run `{rep['run_id']}` on **{devname}**, commit `{(git.get('commit') or 'unknown')[:12]}`"
        f"{' (dirty)' if git.get('dirty') else ''}, torch {prov['versions'].get('torch')}, seed {cfg['seed']}, "
        f"{rep['timings_s']['total']:.0f} s. All errors are against the exact result of the rounded inputs "
        "(float64 double-double oracle with exact-rational escalation) unless a column says otherwise."
    )
    p = ex["paper_figure1"]
    L += [
        "",
        "## Headline",
        "",
        f"**Naive vs stable at g = 1 (the paper's Figure 1 point).** Protocol of the paper: base, lora ~ N(0,1) of "
        f"{p['shape'][0]}×{p['shape'][1]}, s = {p['s']}, g = 1, error of Δ in {cfg['dtype']}.",
        "",
    ]
    rows = [
        [f, v["max_abs_vs_unrounded_fp64"], v["max_abs_vs_exact"], v["max_ulp_vs_exact"], v["frac_correctly_rounded"]]
        for f, v in p["forms"].items()
    ]
    rows.append(["quantisation floor", p["floor_unrounded"], p["floor_exact"], None, None])
    L.append(
        _table(
            [
                "form",
                "max abs err vs fp64 of unrounded inputs (paper)",
                "max abs err vs exact (rounded inputs)",
                "max ulp vs exact",
                "correctly rounded",
            ],
            rows,
        )
    )
    paper_setting = cfg["dtype"] == "bf16" and list(p["shape"]) == [2048, 8192]
    L += [
        "",
        f"- naive / stable, paper's protocol: **{_fmt(p['ratio_naive_over_stable_paper_protocol'])}×** "
        + (
            "(the paper reports 3.0×: 0.0234 vs 0.0078)."
            if paper_setting
            else f"(the paper's 3.0×, 0.0234 vs 0.0078, is for bf16 at 2048×8192; this run: {cfg['dtype']} at "
            f"{p['shape'][0]}×{p['shape'][1]}: {_fmt(p['forms']['naive']['max_abs_vs_unrounded_fp64'])} vs "
            f"{_fmt(p['forms']['stable_gcast']['max_abs_vs_unrounded_fp64'])})."
        ),
        f"- naive / stable against the exact Δ of the rounded inputs: **{_fmt(p['ratio_naive_over_stable_exact'])}** — "
        + _stable_at_g1_sentence(p, cfg["dtype"]),
        "",
    ]
    b = h.get("below_resolution") or h["below_bf16_resolution"]  # reports before schema 1.1 name it for bf16
    thr, dt = b.get("threshold", 2.0**-9), b.get("dtype", cfg["dtype"])
    L += [
        f"**What rounding g to {dt} loses when {_fmt(b.get('lo', 1e-4))} ≤ |g − 1| < {_pow2(thr)}** "
        f"({b['points']} points of the g sweep; there g rounds to exactly 1 in {dt}). *Correction lost* is the "
        "least-squares slope of −β_i on (g_i − 1) across output "
        "features, where β_i is the error of the scale output feature i effectively applied, measured beyond the "
        "correctly rounded output (which itself cannot carry every sub-resolution scale change): 1 = the whole "
        "magnitude update (g − 1) is lost, 0 = nothing beyond the floor, < 0 = over-applied.",
        "",
    ]
    if not b["points"]:
        L += [
            f"No point of this g grid lies in that range ({dt}'s resolution {_pow2(thr)} is below "
            f"{_fmt(b.get('lo', 1e-4))}, or the grid skips it: `--g-grid`); rounding g to {dt} there is not measured.",
            "",
        ]
    rows = [
        [
            f,
            v["g_correction_lost_min"],
            v["g_correction_lost_max"],
            v["y_frac_correctly_rounded_min"],
            v["y_max_ulp_max"],
            v.get("y_nonfinite_max"),
            v["delta_normwise_rel_max"],
        ]
        for f, v in b["by_form"].items()
    ]
    L.append(
        _table(
            [
                "form",
                "correction lost (min)",
                "correction lost (max)",
                "y correctly rounded (min)",
                "y max ulp",
                "non-finite y (max)",
                "Δ normwise rel. err (max)",
            ],
            rows,
        )
    )
    if "g_equals_1" in h:
        L += ["", "**At g = 1 exactly (fresh adapter scale), trained-like lora:**", ""]
        L.append(
            _table(
                ["form", "y max ulp", "y correctly rounded", "Δ normwise rel. err"],
                [
                    [f, v["y_max_ulp"], v["y_frac_correctly_rounded"], v["delta_normwise_rel"]]
                    for f, v in h["g_equals_1"].items()
                ],
            )
        )
    if h.get("bound_ratio"):
        L += [
            "",
            "**Each form against the bound it is held to.** `bound ratio`: the largest (error − the oracle's own "
            "uncertainty) / a-priori bound over every element of the g sweep and the regime grid; ≤ 1 means every "
            "output is within that bound — a statement about the bound's validity, not about accuracy (a form with a "
            "loose bound reads ≤ 1 with large errors: the ulp columns say how accurate it is). A row is one point "
            "of the g sweep or one regime. The forms and the kernels are held to the bounds derived in "
            "`proofs/bounds.md` (`dora_verify.bounds`); a user's implementation (`--impl`) to 1 ulp of the exact y "
            "(the faithful contract, `docs/contract.md`) or to its own `compose_bound`.",
            "",
        ]
        impls = rep.get("implementations", {})
        L.append(
            _table(
                ["form", "held to", "y bound ratio (max)", "Δ bound ratio (max)", "rows over 1"],
                [
                    [
                        f,
                        (impls.get(f) or {}).get("held_to") or "its derived bound",
                        v["y_max"],
                        v["delta_max"],
                        f"{v['rows_over']} of {v['rows']}",
                    ]
                    for f, v in h["bound_ratio"].items()
                ],
            )
        )
    L += _failures_section(rep)
    L += [
        "",
        "## Compose forms by regime",
        "",
        "Each regime's own per-feature g. `y max ulp` ≤ 0.5 means every output was correctly rounded; a NaN or Inf "
        "output where the exact y is finite makes the error maxima inf and is counted under `non-finite y`.",
        "",
    ]
    L[-2] += (
        " `y max ulp vs terms` is the error in ulps of max(|y|, |g·base| + |g·s·lora|): it stays put where y "
        "cancels to near 0 and the plain ulp error grows with the sample"
        + (" (histograms: `ulp_histogram.png`)." if any(Path(x).name == "ulp_histogram.png" for x in plots) else ".")
    )
    y_keys = (
        "max_ulp",
        "max_ulp_terms",
        "frac_correctly_rounded",
        "max_abs",
        "floor_ratio",
        _nonfinite,
        lambda m: m.get("bound_ratio"),
        lambda m: str(m.get("worst_index")),
    )
    L.append(
        _table(
            [
                "regime",
                "form",
                "y max ulp",
                "y max ulp vs terms",
                "y correctly rounded",
                "y max abs err",
                "floor ratio",
                "non-finite y",
                "correction lost",
                "y bound ratio",
                "worst [t, i]",
            ],
            [
                [r["regime"], r["form"]]
                + _cells(r, r["y"], y_keys[:6])
                + [r["g_correction_lost"]]
                + ([None, None] if r.get("failed") else _cells(r, r["y"], y_keys[6:]))
                for r in ex["compose_regimes"]
            ],
        )
    )
    L += [
        "",
        "## Row norm ν by regime",
        "",
        f"Relative error of ν per row vs the oracle (rank {cfg['rank']}). "
        "`special rows` are the regime's adversarial rows "
        "(near-cancelling or zero); `max κ` is the largest row condition number ‖|W_i| + s|B_i||A|‖/ν_i.",
        "",
    ]
    L.append(
        _table(
            [
                "regime",
                "form",
                "ν dtype",
                "max rel",
                "p99 rel",
                "special rows max rel",
                "non-finite ν",
                "max κ",
                "oracle tier-2 rows",
            ],
            [
                [r["regime"], r["form"]]
                + _cells(r, r, ("nu_dtype", "max_rel", "p99_rel", "special_rows_max_rel", _nonfinite))
                + [r["max_cond"], r["oracle_tier2_rows"]]
                for r in ex["norm_regimes"]
            ],
        )
    )
    L += ["", "## Row norm ν by rank (trained regime, s = 2)", ""]
    L.append(
        _table(
            ["rank", "form", "max rel", "p99 rel", "non-finite ν"],
            [[r["rank"], r["form"]] + _cells(r, r, ("max_rel", "p99_rel", _nonfinite)) for r in ex["norm_rank"]],
        )
    )
    names = list(cfg.get("experiments") or [])
    own = tuple(f"{n}_" for n in names)  # an experiment's plots (NAME_*.png) go in its own section
    main_plots = [f"![{Path(pth).stem}]({Path(pth).name})" for pth in plots if not Path(pth).name.startswith(own)]
    L += ["", "## Plots", ""] + main_plots if main_plots else []  # --no-plots: no empty heading
    L += experiment_sections(rep, plots)
    L += [
        "",
        "## What each experiment means",
        "",
        "- **paper_figure1**: the paper's own stability protocol, re-measured against the exact answer.",
        "- **compose_g_sweep**: every compose form with a constant fp32 g = 1 + δ across 1, including offsets far "
        "below bf16 resolution; `g_correction_lost` shows whether the magnitude update survives.",
        "- **compose_regimes**: fresh adapters, trained-like scales, ×62 activations, all-positive, heavy-tailed, "
        "near-cancelling and zero rows.",
        "- **norm_regimes / norm_rank**: PEFT's dense path, dense fp32, the factored norm in fp32 and in the model "
        "dtype; near-cancelling rows (W_i ≈ −s(BA)_i) are where the factored sum loses relative accuracy.",
        "",
        "Forms:",
        "",
    ]
    L += [f"- `{k}`: {v}" for k, v in {**rep["forms"]["compose"], **rep["forms"]["norm"]}.items()]
    impls = rep.get("implementations", {})
    if impls:
        L += [
            "",
            "Implementations under test (`--impl`; their rows carry the `impl:` prefix; one that returns y alone, "
            "not (y, Δ), has empty Δ columns):",
            "",
        ]

        def provides(v):
            parts = [k for k in ("compose", "norm", "layer") if v.get(k)]
            return "" if parts == ["compose", "norm"] else f" ({', '.join(parts) or 'nothing the sweep measures'})"

        L += [f"- `{k}`: `--impl {v['spec']}`{provides(v)}" for k, v in impls.items()]
    n_compose = max(1, len({r["form"] for r in ex["compose_g_sweep"]}))
    L += [
        "",
        f"Oracle: compose elements settled by exact rationals: "
        f"{sum(r['oracle_tier2_elements'] for r in ex['compose_g_sweep'] + ex['compose_regimes']) // n_compose}; "
        f"uncertified: {sum(r['oracle_uncertified'] for r in ex['compose_g_sweep'] + ex['compose_regimes'])}. "
        "Norm rows settled exactly: "
        f"{sum(r['oracle_tier2_rows'] for r in ex['norm_regimes']) // max(1, len(rep['forms']['norm']))}.",
        "",
        "Reproduce: `" + " ".join(["dora-verify"] + prov["argv"][1:]) + "`",
        "",
    ]
    return "\n".join(L)


def experiment_sections(rep: dict, plots) -> list:
    """report.md lines of the optional experiments (``sweep.EXPERIMENTS``), in the order they ran: a heading,
    the time they took, then the module's own ``markdown``."""
    from .sweep import experiment_module

    names = [Path(p).name for p in plots]
    L = []
    for name in rep["config"].get("experiments") or []:
        t = rep.get("timings_s", {}).get(name)
        seeds = rep["experiments"][name].get("seeds") or {}
        seeds = ", ".join(f"{k} {v}" for k, v in seeds.items() if k != "note") or "none"
        L += [
            "",
            f"## Experiment: {name}",
            "",
            f"_{'' if t is None else f'{t:.0f} s; '}`dora-verify sweep --experiments {name}`; seeds: {seeds}_",
            "",
            experiment_module(name).markdown(rep["experiments"][name], names).rstrip(),
        ]
    return L


def experiment_plots(rep: dict, folder: Path) -> list:
    """The PNGs of the optional experiments that draw any (their module's ``plots``)."""
    from .sweep import experiment_module

    out = []
    for name in rep["config"].get("experiments") or []:
        mod = experiment_module(name)
        if hasattr(mod, "plots"):
            out += list(mod.plots(rep["experiments"][name], folder))
    return out


def _finite(v, floor=None) -> float:
    """A plotted value: NaN (a gap) for None, NaN and Inf (the tables show those); at least ``floor``."""
    if v is None or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
        return float("nan")
    return v if floor is None else max(v, floor)


def sweep_plots(rep: dict, folder: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ex, cfg = rep["experiments"], rep["config"]
    paths = []
    g = [r for r in ex["compose_g_sweep"] if not r.get("failed")]
    forms = list(dict.fromkeys(r["form"] for r in g))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for f in forms:
        rs = sorted((r for r in g if r["form"] == f), key=lambda r: r["g_minus_1"])
        xs = [r["g_minus_1"] for r in rs]
        axes[0].plot(xs, [_finite(r["y"]["max_abs"], 1e-12) for r in rs], marker=".", label=f)
        if all(r["delta"] for r in rs):  # implementations under test return y only
            axes[1].plot(xs, [_finite(r["delta"]["normwise_rel"], 1e-12) for r in rs], marker=".", label=f)
        axes[2].plot(xs, [_finite(r["g_correction_lost"]) for r in rs], marker=".", label=f)
    rs = sorted((r for r in g if r["form"] == forms[0]), key=lambda r: r["g_minus_1"])
    axes[0].plot(
        [r["g_minus_1"] for r in rs], [r["y"]["floor_max_abs"] for r in rs], "k--", label=f"{cfg['dtype']} floor"
    )
    for ax, title, ylog in (
        (axes[0], "max |y − y_exact|", True),
        (axes[1], "‖Δ − Δ_exact‖ / ‖Δ_exact‖", True),
        (axes[2], "fraction of (g − 1) lost", False),
    ):
        ax.set_xscale("symlog", linthresh=1e-6)
        if ylog:
            ax.set_yscale("log")
        thr = g_resolution(cfg["dtype"])
        ax.axvspan(-thr, thr, color="0.9", zorder=0)
        ax.set_xlabel(f"g − 1  (shaded: |g − 1| < {_pow2(thr)}, g rounds to 1 in {cfg['dtype']})")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[2].set_ylim(-0.5, 1.5)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"Compose forms across g = 1 — {cfg['d_out']}×{cfg['d_in']}, {cfg['dtype']}, {cfg['grid_tokens']} tokens"
    )
    fig.tight_layout()
    paths.append(folder / "compose_error_vs_g.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    nreg = [r for r in ex["norm_regimes"] if not r.get("failed")]
    regimes = list(dict.fromkeys(r["regime"] for r in nreg))
    nforms = list(dict.fromkeys(r["form"] for r in nreg))
    w = 0.8 / len(nforms)
    for j, f in enumerate(nforms):
        vals = [
            next((r["max_rel"] for r in nreg if r["regime"] == reg and r["form"] == f), float("nan")) for reg in regimes
        ]
        axes[0].bar([i + j * w for i in range(len(regimes))], [_finite(v, 1e-17) for v in vals], w, label=f)
    axes[0].set_xticks([i + 0.4 - w / 2 for i in range(len(regimes))], regimes, rotation=20)
    axes[0].set_yscale("log")
    axes[0].set_title("max relative error of ν per regime")
    axes[0].legend(fontsize=8)
    nr = [r for r in ex["norm_rank"] if not r.get("failed")]
    for f in nforms:
        rs = [r for r in nr if r["form"] == f]
        axes[1].plot([r["rank"] for r in rs], [_finite(r["max_rel"], 1e-17) for r in rs], marker="o", label=f)
    axes[1].set_xscale("log", base=2)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("rank r")
    axes[1].set_title("max relative error of ν vs rank (trained)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(folder / "norm_error.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    paths += ulp_histogram_plot(ex["compose_regimes"], cfg, folder)
    return paths


def ulp_histogram_plot(records: list, cfg: dict, folder: Path) -> list:
    """ulp_histogram.png: per compose form, the distribution of the y error in ulps (left) and in ulps of the terms
    (right), summed over the regimes' records."""
    import matplotlib.pyplot as plt

    from .metrics import ULP_BIN_EDGES

    recs = [r for r in records if not r.get("failed") and r.get("y") and r["y"].get("ulp_hist")]
    if not recs:
        return []
    forms = list(dict.fromkeys(r["form"] for r in recs))
    labels = ["≤ 0.5"] + [f"≤ {e:g}" for e in ULP_BIN_EDGES[1:]] + [f"> {ULP_BIN_EDGES[-1]:g}"]
    fig, axes = plt.subplots(1, 2, figsize=(15, 4.8), sharey=True)
    w = 0.8 / len(forms)
    for ax, key, title in (
        (axes[0], "ulp_hist", "y error in ulps of y"),
        (axes[1], "ulp_terms_hist", "y error in ulps of the terms"),
    ):
        for j, f in enumerate(forms):
            counts = [sum(c) for c in zip(*(r["y"][key] for r in recs if r["form"] == f and r["y"].get(key)))]
            if not counts:
                continue
            total = max(1, sum(counts))
            ax.bar([i + j * w for i in range(len(counts))], [c / total for c in counts], w, label=f)
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(labels))], labels, rotation=30, fontsize=8)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("fraction of outputs")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Compose y error distribution over the regimes — {cfg['d_out']}×{cfg['d_in']}, {cfg['dtype']}")
    fig.tight_layout()
    path = folder / "ulp_histogram.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def atomic_write(path: Path, write) -> None:
    """Write a file through ``write(binary file handle)`` into a temporary beside it, fsync, then os.replace.
    An OSError (a full disk...) leaves any previous file intact and raises :class:`ReportWriteError`."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=Path(path).parent)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise ReportWriteError(f"cannot write {str(path)!r}: {e.strerror or e}") from None
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


_TRANSIENT = (".tmp-", ".probe-", ".staging-")  # in-progress files of atomic_write, check_writable, old versions


def _stale(folder: Path) -> list:
    """Staging paths of ``folder`` left by writes whose process is gone: (path, is_backup) pairs."""
    pat = re.compile(r"\." + re.escape(folder.name) + r"\.dv-(\d+)-\w+(\.old)?")
    try:
        names = os.listdir(folder.parent)
    except OSError:
        return []
    out = []
    for n in names:
        m = pat.fullmatch(n)
        if m and not _alive(int(m.group(1))):
            out.append((folder.parent / n, bool(m.group(2))))
    return out


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) is no probe there: keep every staging folder
        return True
    if pid == os.getpid():  # an earlier write of this process (or a reused pid): not in progress
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def recover(out_dir: "str | Path") -> None:
    """Undo what a killed write to ``out_dir`` left: put back the previous folder when ``out_dir`` is missing
    (the two-rename fallback was killed between its renames), delete stale staging folders."""
    real = Path(os.path.realpath(out_dir))
    stale = _stale(real)
    for path, backup in stale:
        if backup and not os.path.lexists(real):
            os.rename(path, real)
    for path, _ in stale:
        if os.path.lexists(path):
            shutil.rmtree(path, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` atomically; False where this system or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, TypeError):
        return False
    fa, fb = os.fsencode(str(a)), os.fsencode(str(b))
    if hasattr(libc, "renameat2"):  # Linux (glibc >= 2.28): renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        rc = fn(-100, fa, -100, fb, 2)
    elif hasattr(libc, "renamex_np"):  # macOS: renamex_np(a, b, RENAME_SWAP)
        fn = libc.renamex_np
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        rc = fn(fa, fb, 2)
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync(path: Path, folder: bool = False) -> None:
    """fsync a file (errors raise: a full disk shows here) or a folder (best effort: not every system can)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if folder:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not folder:
            raise
    finally:
        os.close(fd)


def _carry(src: Path, dst: Path, skip=frozenset()) -> None:
    """Hard-link (copy where that fails) the entries of ``src`` that ``dst`` lacks into ``dst``, recursively
    (top-level names in ``skip`` excepted)."""
    for entry in os.scandir(src):
        if entry.name.startswith(_TRANSIENT) or entry.name in skip:
            continue
        target = dst / entry.name
        if os.path.lexists(target):
            if entry.is_dir(follow_symlinks=False) and target.is_dir() and not target.is_symlink():
                _carry(Path(entry.path), target)
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        elif entry.is_dir():
            target.mkdir()
            shutil.copystat(entry.path, target)
            _carry(Path(entry.path), target)
        else:
            try:
                os.link(entry.path, target)
            except OSError:
                shutil.copy2(entry.path, target)


def _swap(stage: Path, real: Path) -> Path:
    """Make ``stage`` the folder at ``real``; return where the previous folder now is (to delete)."""
    if _exchange(stage, real):
        return stage
    backup = stage.with_name(stage.name + ".old")
    os.rename(real, backup)
    try:
        os.rename(stage, real)
    except BaseException:
        os.rename(backup, real)  # never leave OUT missing when we can help it
        raise
    return backup


def _pow2(x: float) -> str:
    """2^-k as '2⁻ᵏ' when x is a power of two, else the plain number."""
    m, e = math.frexp(x)
    if m != 0.5:
        return _fmt(x)
    sup = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")
    return "2" + str(e - 1).translate(sup)


def _stable_at_g1_sentence(p: dict, dtype: str) -> str:
    """What the paper-protocol table shows about the stable form at g = 1, from its own numbers."""
    naive = _fmt(p["forms"]["naive"]["max_abs_vs_exact"])
    err = p["forms"]["stable_gcast"]["max_abs_vs_exact"]
    if err == 0:
        return (
            "at g = 1 the stable form is exact (Δ = s·lora needs no rounding when s is a power of two), so the "
            f"paper-protocol 'floor' ({_fmt(p['forms']['stable_gcast']['max_abs_vs_unrounded_fp64'])} here) is the "
            "quantisation of its *inputs*, not an error of the stable form; the naive "
            f"form's error ({naive}) is all cancellation."
        )
    return (
        f"at g = 1 the stable form's error against the exact Δ is {_fmt(err)} (its own output rounding in {dtype}), "
        "so the paper's 'floor' is mostly the quantisation of its *inputs*, not an error of the stable form; the "
        f"naive form's error ({naive}) is cancellation on top of that."
    )


NONFINITE_KEY = "nonfinite"


def _pointer_token(key) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")  # RFC 6901


def strict_json(obj):
    """``obj`` with every non-finite float replaced by ``null``, and where they were: {JSON Pointer (RFC 6901):
    "inf" | "-inf" | "nan"}. The report's JSON is strict (RFC 8259: every number finite, no strings standing in for
    numbers, so numeric columns stay numeric in pandas/Parquet); :func:`load_report` puts the values back."""
    found = {}

    def walk(o, path):
        if isinstance(o, float) and not math.isfinite(o):
            found[path] = "nan" if o != o else ("inf" if o > 0 else "-inf")
            return None
        if isinstance(o, dict):
            return {k: walk(v, f"{path}/{_pointer_token(k)}") for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(o)]
        return o

    return walk(obj, ""), found


def report_document(rep: dict) -> dict:
    """What ``report.json`` holds: :func:`strict_json` of ``rep``, plus the top-level ``"nonfinite"`` map when any
    value was non-finite."""
    doc, found = strict_json(rep)
    if found:
        doc[NONFINITE_KEY] = found
    return doc


def load_report(path: "str | Path") -> dict:
    """A report.json/bench.json read back with its non-finite values restored (the inverse of
    :func:`report_document`; reports written before it, with "inf" strings, read as they are)."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    for pointer, value in (doc.pop(NONFINITE_KEY, None) or {}).items() if isinstance(doc, dict) else ():
        *parents, last = [t.replace("~1", "/").replace("~0", "~") for t in pointer.split("/")[1:]]
        node = doc
        for t in parents:
            node = node[int(t)] if isinstance(node, list) else node[t]
        if isinstance(node, list):
            node[int(last)] = float(value)
        else:
            node[last] = float(value)
    return doc


CSV_COLUMNS = ("section", "record", "field", "value", "text")


def long_rows(rep: dict) -> list:
    """The report's data in long format: one row per leaf — (section, record, field, value, text). Sections:
    ``headline`` and ``experiments.<name>`` per experiment; a list of records (a table) below them becomes a section
    of its own, each record numbered; ``field`` is the dotted path inside the record;
    numbers go to ``value`` (non-finite ones as inf/-inf/nan), everything else to ``text``."""
    rows = []

    def walk(o, section, record, field):
        if isinstance(o, dict):
            for k, v in o.items():
                walk(v, section, record, f"{field}.{k}" if field else str(k))
        elif isinstance(o, (list, tuple)) and o and all(isinstance(v, dict) for v in o):
            table = f"{section}.{field}" if field else section
            for i, v in enumerate(o):
                walk(v, table, f"{record}/{i}" if record else str(i), "")
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, section, record, f"{field}[{i}]")
        elif isinstance(o, (int, float)) and not isinstance(o, bool):
            rows.append((section, record, field, float(o), ""))
        else:
            rows.append((section, record, field, None, "" if o is None else str(o)))

    walk(rep.get("headline") or {}, "headline", "", "")
    for name, block in (rep.get("experiments") or {}).items():  # one section per experiment, table or not
        walk(block, f"experiments.{name}", "", "")
    return rows


def write_csv(rep: dict, path: "str | Path") -> Path:
    """:func:`long_rows` as CSV (header :data:`CSV_COLUMNS`; pandas reads ``value`` as float, inf/nan included)."""
    import csv

    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for sec, rec, field, value, text in long_rows(rep):
            w.writerow((sec, rec, field, "" if value is None else repr(value), text))
    return Path(path)


def write_bundle(
    rep: dict,
    out_dir: "str | Path",
    markdown,
    extra=None,
    json_name: str = "report.json",
    md_name: str = "report.md",
    owned=(),
) -> list:
    """Write ``json_name`` (strict JSON of ``rep``), ``md_name`` (``markdown(files)`` → text, given the staged
    extra files) and the files ``extra(stage_dir)`` creates (e.g. plots) into ``out_dir``, the whole set in
    one atomic step (module doc). Returns the paths of the set in ``out_dir``. ``owned``: names of entries the
    set owns whole (a folder of this run's files): an old one is dropped, not carried over, even when this run
    writes none."""
    out = check_writable(out_dir)
    real = Path(os.path.realpath(out))
    stage, swapped = None, False
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{real.name}.dv-{os.getpid()}-", dir=real.parent))
        os.chmod(stage, os.stat(real).st_mode & 0o7777)
        files = list(extra(stage)) if extra else []
        for f in files:
            if Path(f).suffix == ".png":
                stamp_png(f, png_metadata(rep))
        (stage / md_name).write_text(markdown(files), encoding="utf-8")
        files.append(stage / md_name)
        with open(stage / json_name, "w", encoding="utf-8") as fh:
            json.dump(report_document(rep), fh, indent=1, allow_nan=False)
        files.append(stage / json_name)
        _carry(real, stage, skip=frozenset(owned))
        for f in files:
            _fsync(f)
        _fsync(stage, folder=True)
        old = _swap(stage, real)
        swapped = True
    except OSError as e:
        raise ReportWriteError(f"cannot write report to {str(out)!r}: {e.strerror or e}") from None
    finally:
        if stage is not None and not swapped:
            shutil.rmtree(stage, ignore_errors=True)
    _fsync(real.parent, folder=True)
    shutil.rmtree(old, ignore_errors=True)
    return [out / Path(f).relative_to(stage) for f in files]  # cases/<id>.json stays under cases/


def write_report(rep: dict, out_dir: "str | Path", plots: bool = True, csv: bool = False) -> list:
    """Write report.json, report.md, the plots and (``csv``) report.csv (:func:`long_rows`) into ``out_dir`` as one
    set (see module doc)."""

    def extra(stage):
        files = (sweep_plots(rep, stage) + experiment_plots(rep, stage)) if plots else []
        return files + ([write_csv(rep, stage / "report.csv")] if csv else [])

    def markdown(files):
        pngs = [f for f in files if Path(f).suffix == ".png"]
        md = sweep_markdown(rep, pngs)
        return md + (
            "\nData in long format: [`report.csv`](report.csv) (section, record, field, value, text).\n" if csv else ""
        )

    return write_bundle(rep, out_dir, markdown, extra if (plots or csv) else None)
