"""Certification: a targeted hypothesis search for inputs that push each kernel's error towards its bound.

A *target* is one implementation with one a-priori bound (``dora_verify.bounds``): the production kernels
(``compose.y``, ``compose.delta``, ``compose.backward``, ``lora_compose``, ``norm`` — ν, then g, g − 1 and d_m
downstream of it) and the compose forms under study (``form.<name>``). For each drawn input
(``dora_verify.strategies``) the target is run, compared with the oracle of the *rounded* inputs, and scored:

* ``ratio`` — the largest (|error| − oracle bound)/bound over every output element checked. ≤ 1 certifies;
  > 1 is a violation: hypothesis shrinks it to a minimal case, and the search goes on to its budget in new
  rounds (seeds ``seed + 1``, …), so that ``max_ratio`` and the corpus cover the whole budget and every distinct
  violation found (``violations`` counts them). Shrinking is outside the budget: its evaluations
  (``shrink_evaluations``) enter neither the example count, the ratios nor the top cases; before the corpus is written
  every kept case (a worst case too) is restricted to the smallest block of its rows and columns that keeps its ratio
  (:func:`shrink_restriction`). A non-finite output where the truth is finite, or two runs of a kernel that claims
  determinism differing in one bit, score ``inf``;
* ``ulp`` — the largest ULP error of the main output (reported; the bound is the criterion).

``hypothesis.target`` climbs on both. The worst distinct cases found (and every violation) are written to a corpus as
``<target>-<dtype>-<hash>.npz`` (the exact input tensors) + ``.json`` (target, drawn parameters, scores,
provenance); ``tests/test_certify.py`` replays every case committed under ``tests/corpus``.

Budgets: ``examples`` per (target, dtype) and/or ``seconds``. ``derandomize=True`` (pre-merge) makes the
search a fixed function of the code: the same examples every run. Otherwise rounds of examples are run with
seeds ``seed``, ``seed + 1``, … until the budget is spent (nightly-style); each round's seed is recorded.

The targets and their evaluators live in :mod:`dora_verify.certify_targets`, the corpus files in
:mod:`dora_verify.corpus` (both re-exported here); this module is the search, its report and the run.

Never certified on nothing: :func:`run_certify` raises :class:`CertifyError` (a usage error, exit 2) when a
(target, dtype) ran no example, and :class:`CertifyEnvironmentError` (exit 2) before searching when the
requested tier cannot run here (``tier='fused'`` with neither a GPU nor ``TRITON_INTERPRET=1``). Every call
of the code under test gets its own copies of the example's tensors (the oracle, the bounds and the corpus
keep the drawn ones), and anything the call raises (``SystemExit`` included) is a crash finding.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .adapter import CaseGuard, crash_reason
from .certify_targets import (
    KERNEL_TARGETS,
    LAYER_TARGETS,
    TARGETS,
    CertifyEnvironmentError,
    Reject,
    Score,  # noqa: F401
    Target,
    _compose_grads,
    _target_table,
    check_tier,
    default_tier,
    eval_compose_backward,
    eval_compose_delta,
    eval_compose_y,
    eval_lora_compose,
    eval_norm,
    excess_ratio,
    impl_targets,
)
from .corpus import _case_name, _example_key, _finite_json, _tensor_to_np, load_case, replay, save_case  # noqa: F401
from .strategies import Example

F64 = torch.float64
HIST_EDGES = (-12, -10, -8, -6, -4, -3, -2, -1, -0.5, 0)  # log10(ratio) bin edges; last bin: ratio > 1


class CertifyError(ValueError):
    """Nothing was certified (e.g. no example ran within the budget): a usage error, exit 2."""


class BoundViolation(AssertionError):
    def __init__(self, score):
        super().__init__(f"error/bound ratio {score.ratio:.4g} > 1 ({score.parts})")
        self.score = score


# ----------------------------------------------------------------------------- search
# Which dimension of each tensor runs over the tokens (rows) and over the output features (columns), per example
# kind: what a restriction slices. A kind not listed (the layer's) is not restricted.
_AXES = {
    "compose": {
        "base": (0, 1),
        "lora": (0, 1),
        "dy": (0, 1),
        "g": (None, 0),
        "g_minus_1": (None, 0),
        "bias": (None, 0),
    },
    "lora": {"base": (0, 1), "xa": (0, None), "B": (None, 0), "g": (None, 0), "bias": (None, 0)},
    "norm": {"W": (None, 0), "B": (None, 0), "A": (None, None)},
}


def _extent(ex: Example) -> "tuple[int, int] | None":
    """(rows, columns) of an example that :func:`restrict` can slice, or None."""
    axes = _AXES.get(ex.kind)
    if not axes:
        return None
    rows = cols = None
    for name, (ra, ca) in axes.items():
        t = ex.tensors.get(name)
        if t is not None:
            rows = t.shape[ra] if ra is not None else rows
            cols = t.shape[ca] if ca is not None else cols
    return (rows or 1, cols or 1)


def restrict(ex: Example, rows: tuple, cols: tuple) -> Example:
    """The example on rows ``rows`` = (start, stop) of the tokens and columns ``cols`` of the output features: every
    tensor sliced along its token and feature dimensions (``_AXES``), the rest kept. The kernels are elementwise in
    the output (compose), per output row (the norm) or per column reduction over the kept rows (the backward's d_g):
    a restriction evaluates the same function on a sub-problem."""
    tensors = {}
    for name, t in ex.tensors.items():
        ra, ca = _AXES[ex.kind].get(name, (None, None))
        idx = [slice(None)] * t.dim()
        if ra is not None:
            idx[ra] = slice(*rows)
        if ca is not None:
            idx[ca] = slice(*cols)
        tensors[name] = t[tuple(idx)].clone()
    T, N = _extent(ex)
    params = dict(ex.params, restricted={"rows": list(rows), "cols": list(cols), "of": [T, N]})  # drawn, then sliced
    return Example(ex.kind, ex.dtype, tensors, dict(ex.scalars), params)


def shrink_restriction(ex: Example, score: Score, evaluate, tol: float = 1e-3, max_evals: int = 64):
    """Shrink a kept case by halving its rows and columns while its worst error/bound ratio stays within a factor
    (1 − ``tol``) of ``score.ratio`` (an infinite ratio must stay infinite): the smallest sub-problem that still
    shows the finding, for a case hypothesis did not shrink (a non-violating worst case) or shrank only within its
    strategy. ``evaluate(example) -> Score``; a restriction that raises is not taken. Returns (example, score,
    evaluations)."""
    ext = _extent(ex)
    if ext is None:
        return ex, score, 0
    keep = (lambda r: math.isinf(r)) if math.isinf(score.ratio) else (lambda r: r >= score.ratio * (1 - tol))
    rng = [[0, ext[0]], [0, ext[1]]]
    evals = 0
    changed = True
    while changed and evals < max_evals:
        changed = False
        for axis in (0, 1):
            a, b = rng[axis]
            if b - a < 2:
                continue
            mid = (a + b) // 2
            for half in ((a, mid), (mid, b)):
                trial = [list(rng[0]), list(rng[1])]
                trial[axis] = list(half)
                cand = restrict(ex, tuple(trial[0]), tuple(trial[1]))
                evals += 1
                try:
                    sc = evaluate(cand)
                except Exception:  # noqa: BLE001 - e.g. an oracle range check on the sub-problem: not taken
                    continue
                if keep(sc.ratio):
                    rng, score, changed = trial, sc, True
                    break
    if rng == [[0, ext[0]], [0, ext[1]]]:
        return ex, score, evals
    return restrict(ex, tuple(rng[0]), tuple(rng[1])), score, evals


class _Tracker:
    """Everything a search saw: every ratio, the largest parts, the top ``keep`` distinct cases, and the distinct
    violations (each the last — shrunk — violating example of its round)."""

    def __init__(self, keep: int):
        self.keep = keep
        self.ratios: list = []
        self.max_ulp = 0.0
        self.parts: dict = {}
        self.info: dict = {}
        self.top: list = []  # (ratio, key, Example, Score), highest first, distinct keys
        self.violations: list = []  # (key, Example, Score), distinct keys, in the order found
        self.round_violation = None  # the latest violating example of the running round
        self.rejected = 0
        self.shrink_evaluations = 0  # evaluations hypothesis made while shrinking (outside the budget)

    def add(self, ex: Example, score: Score) -> None:
        self.ratios.append(score.ratio)
        self.max_ulp = max(self.max_ulp, score.ulp)
        for k, v in score.parts.items():
            self.parts[k] = max(self.parts.get(k, 0.0), v)
        for k, v in score.info.items():
            if isinstance(v, str):
                self.info[k] = v
            elif isinstance(v, bool):
                self.info[k] = self.info.get(k, True) and v
            else:
                self.info[k] = max(self.info.get(k, v), v)
        if score.ratio > 1:
            self.round_violation = (ex, score)  # hypothesis runs the shrunk case last
        if len(self.top) < self.keep or score.ratio > self.top[-1][0]:
            key = _example_key(ex)
            if all(key != t[1] for t in self.top):
                self.top.append((score.ratio, key, ex, score))
                self.top.sort(key=lambda e: -e[0])
                del self.top[self.keep :]

    def end_round(self) -> bool:
        """Keep the round's (shrunk) violation if it is a new case; whether the round had one."""
        found, self.round_violation = self.round_violation, None
        if found is not None:
            key = _example_key(found[0])
            if all(key != v[0] for v in self.violations):
                self.violations.append((key, *found))
        return found is not None


def ratio_summary(ratios: list) -> dict:
    """Quantiles and a log10 histogram of per-example worst ratios (the report's tightness picture)."""
    if not ratios:
        return {"n": 0}
    a = np.asarray(ratios, dtype=np.float64)
    fin = a[np.isfinite(a)]
    pos = np.log10(np.clip(fin, 1e-300, None))
    hist, labels = [], []
    lo = -math.inf
    for e in HIST_EDGES:
        hist.append(
            int(((pos > lo) & (pos <= e) & (fin > 0)).sum()) if lo > -math.inf else int(((pos <= e) | (fin == 0)).sum())
        )
        labels.append(f"≤{10.0**e:.0e}" if lo == -math.inf else f"({10.0**lo:.2g}, {10.0**e:.2g}]")
        lo = e
    hist.append(int((a > 1).sum()))
    labels.append(">1")

    def q(p):
        return (
            float(np.quantile(a, p)) if np.isfinite(a).all() else float(np.quantile(fin, p)) if fin.size else math.inf
        )

    return {
        "n": int(a.size),
        "max": float(a.max()),
        "p50": q(0.5),
        "p90": q(0.9),
        "p99": q(0.99),
        "histogram": dict(zip(labels, hist)),
    }


def _evaluate_guarded(tg, ex: Example, device, tier) -> Score:
    """``tg.evaluate`` for the search and the shrinker: a crash (``SystemExit`` included) scores inf, a rejected
    input raises :class:`Reject`, a real Ctrl-C of the run stops it."""
    guard = CaseGuard()
    try:
        with guard:
            return tg.evaluate(ex, device, tier)
    except Reject:
        raise
    except BaseException as e:  # noqa: BLE001 - as the search scores a crash
        if guard.interrupted:
            raise
        return Score(math.inf, math.inf, {"error": math.inf}, {"error": crash_reason(e)})


def search(
    target: str,
    dtype: str,
    *,
    examples: int = 200,
    seconds: "float | None" = None,
    seed: int = 0,
    derandomize: bool = True,
    device="cpu",
    tier: "str | None" = None,
    keep: int = 3,
    corpus: "str | Path | None" = None,
    meta: "dict | None" = None,
    progress=None,
    impl: "str | None" = None,
) -> dict:
    """Targeted search on one (target, dtype); returns its result dict (see :func:`run_certify`). ``impl``: the
    ``--impl`` spec whose targets (:func:`impl_targets`) ``target`` names; None for the built-in targets."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, reject, settings
    from hypothesis import seed as hseed
    from hypothesis import target as htarget
    from hypothesis.errors import HypothesisException

    table = _target_table(impl)
    if target not in table or dtype not in table[target].dtypes:
        raise ValueError(f"unknown (target, dtype) {target!r}/{dtype!r}; targets: {', '.join(table)}")
    if examples <= 0:
        raise ValueError(f"examples must be positive, got {examples}")
    tg = table[target]
    device = torch.device(device)
    tier = tier or default_tier(device)
    if impl is None:
        check_tier(device, tier)
    tr = _Tracker(keep)
    t0 = time.monotonic()
    deadline = t0 + seconds if seconds else math.inf
    rounds = []

    def probe(ex):
        if tr.round_violation is None and (time.monotonic() > deadline or len(tr.ratios) >= examples):
            return  # budget spent: hypothesis finishes the round on no-ops (not while it shrinks a violation)
        if not all(bool(torch.isfinite(v).all()) for v in ex.tensors.values()):
            tr.rejected += 1
            reject()  # the oracles are defined on finite inputs; non-finite propagation is tested elsewhere
        try:  # a crash on a valid input (sys.exit too) scores inf: a finding, shrunk and kept
            score = _evaluate_guarded(tg, ex, device, tier)
        except Reject:
            tr.rejected += 1
            reject()
        if tr.round_violation is not None:  # hypothesis is shrinking this round's violation: not the search's
            tr.shrink_evaluations += 1  # budget, ratios or top cases (its variants are one case)
            if score.ratio > 1:
                tr.round_violation = (ex, score)  # the last violating variant is the shrunk case
                raise BoundViolation(score)
            return
        tr.add(ex, score)
        if progress and len(tr.ratios) % 50 == 0:
            progress(len(tr.ratios), examples, f"{target}/{dtype} max ratio {max(tr.ratios):.3g}")
        htarget(min(score.ratio, 1e6), label="bound_ratio")
        htarget(min(score.ulp, 1e6), label="ulp")
        if score.ratio > 1:
            raise BoundViolation(score)  # hypothesis shrinks it; the search goes on in the next round

    # A violation ends its round (after hypothesis shrinks it) but not the search: the next rounds, seeded
    # seed + k (a fixed function of the seed, so a pre-merge run stays reproducible), spend the rest of the budget.
    k = 0
    while len(tr.ratios) < examples and time.monotonic() < deadline:
        fixed = derandomize and k == 0  # the derandomized round: the same examples every run
        n = examples - len(tr.ratios) if fixed else min(200, examples - len(tr.ratios))
        st_args = dict(
            max_examples=max(1, n),
            derandomize=fixed,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            verbosity=Verbosity.quiet,
            phases=(Phase.generate, Phase.target, Phase.shrink),
            report_multiple_bugs=False,
        )
        fn = given(tg.strategy(dtype))(probe)
        fn = settings(**st_args)(fn)
        if not fixed:
            fn = hseed(seed + k)(fn)
        before = len(tr.ratios)
        try:
            fn()
        except BoundViolation:
            pass
        except HypothesisException:  # e.g. a flaky replay of the violation: it is recorded all the same
            if tr.round_violation is None:
                raise
        violated = tr.end_round()
        rounds.append({"seed": None if fixed else seed + k, "examples": len(tr.ratios) - before, "violation": violated})
        k += 1
        if len(tr.ratios) == before or (fixed and not violated):
            break  # nothing new to draw, or the derandomized round ran its whole budget
    summary = ratio_summary(tr.ratios)
    res = {
        "target": target,
        "dtype": dtype,
        "tier": tier if impl is None else None,
        "device": str(device),
        "examples": len(tr.ratios),
        "rejected": tr.rejected,
        "seconds": round(time.monotonic() - t0, 2),
        "derandomized": derandomize,
        "rounds": rounds,
        "max_ratio": summary.get("max", 0.0),
        "ratio": summary,
        "max_ulp": tr.max_ulp,
        "parts_max": tr.parts,
        "info": tr.info,
        "violation": bool(tr.violations),
        "violations": len(tr.violations),
        "shrink_evaluations": tr.shrink_evaluations,
        "corpus": [],
    }
    if corpus is not None:
        seen = {key for key, _, _ in tr.violations}
        cases = [(ex, sc, "violation") for _, ex, sc in tr.violations]
        cases += [(ex, sc, "worst") for _, key, ex, sc in tr.top if key not in seen]
        shrunk, keys = [], set()
        for ex, sc, why in cases:  # every kept case shrunk (outside the budget), then de-duplicated again
            ex, sc, n = shrink_restriction(ex, sc, lambda e: _evaluate_guarded(tg, e, device, tier))
            res["shrink_evaluations"] += n
            key = _example_key(ex)
            if key not in keys:
                keys.add(key)
                shrunk.append((ex, sc, why))
        for ex, sc, why in shrunk:
            m = {
                "found_by": why,
                "tier": tier,
                "device": str(device),
                "derandomized": derandomize,
                "rounds": rounds,
                **(meta or {}),
                **({"impl": impl} if impl else {}),
            }
            res["corpus"].append(str(save_case(target, ex, sc, corpus, m)))
    return res


@dataclass
class CertifyConfig:
    targets: tuple = KERNEL_TARGETS
    dtypes: tuple = ("bf16", "fp16", "fp32")
    examples: int = 200
    seconds: "float | None" = None
    seed: int = 0
    derandomize: bool = True
    device: str = "auto"
    tier: "str | None" = None
    keep: int = 3
    corpus: "str | None" = None
    jobs: int = 1
    impl: "str | None" = None  # an --impl spec: ``targets`` then name its targets (impl_targets)

    def validate(self) -> None:
        table = _target_table(self.impl)
        unknown = [t for t in self.targets if t not in table]
        if unknown or not self.targets:
            raise ValueError(f"unknown target(s) {unknown or list(self.targets)}; choose from {', '.join(table)}")
        for d in self.dtypes:
            if d not in ("bf16", "fp16", "fp32"):
                raise ValueError(f"unknown dtype {d!r}; choose from bf16, fp16, fp32")
        if self.examples <= 0:
            raise ValueError(f"examples must be positive, got {self.examples}")
        if self.seconds is not None and not self.seconds > 0:
            raise ValueError(f"seconds must be positive, got {self.seconds}")
        if self.jobs < 1:
            raise ValueError(f"jobs must be positive, got {self.jobs}")
        if self.tier not in (None, "fused", "eager"):
            raise ValueError(f"tier must be 'fused' or 'eager', got {self.tier!r}")


def run_certify(cfg: CertifyConfig, progress=None) -> dict:
    """Search every (target, dtype) pair the target supports; the report dict (JSON-ready)."""
    from .provenance import provenance
    from .sweep import resolve_device

    cfg.validate()
    device = resolve_device(cfg.device)
    if cfg.impl is None:
        check_tier(device, cfg.tier or default_tier(device))
    prov = provenance(device, [cfg.impl] if cfg.impl else ())
    meta = {
        "commit": prov.get("git", {}).get("commit"),
        "versions": prov.get("versions"),
        "device_name": prov.get("device", {}).get("name", prov.get("device", {}).get("cpu")),
    }
    results = []
    table = _target_table(cfg.impl)
    pairs = [(t, d) for t in cfg.targets for d in cfg.dtypes if d in table[t].dtypes]
    if not pairs:
        raise ValueError("no (target, dtype) pair to run: the chosen targets support none of the chosen dtypes")
    kw = dict(
        examples=cfg.examples,
        seed=cfg.seed,
        derandomize=cfg.derandomize,
        device=str(device),
        tier=cfg.tier,
        keep=cfg.keep,
        corpus=cfg.corpus,
        meta=meta,
        impl=cfg.impl,
    )
    if cfg.jobs > 1:  # one process per (target, dtype): spawn, so CUDA initialises cleanly in each
        import concurrent.futures as cf
        import multiprocessing as mp

        secs = cfg.seconds and cfg.seconds * min(cfg.jobs, len(pairs)) / len(pairs)
        threads = max(1, (os.cpu_count() or 1) // min(cfg.jobs, len(pairs)))  # the CPU oracles: no oversubscription
        with cf.ProcessPoolExecutor(
            max_workers=cfg.jobs,
            mp_context=mp.get_context("spawn"),
            initializer=torch.set_num_threads,
            initargs=(threads,),
        ) as pool:
            futs = [pool.submit(search, t, d, seconds=secs, **kw) for t, d in pairs]
            for i, f in enumerate(cf.as_completed(futs)):
                if progress:
                    progress(i, len(pairs), f"{f.result()['target']}/{f.result()['dtype']}")
            results = [f.result() for f in futs]
    for i, (t, d) in enumerate(pairs if cfg.jobs <= 1 else ()):
        if progress:
            progress(i, len(pairs), f"{t}/{d}")
        results.append(search(t, d, seconds=cfg.seconds and cfg.seconds / len(pairs), **kw))
    if progress:
        progress(len(pairs), len(pairs), "done")
    empty = [r for r in results if r["examples"] == 0]
    if empty:
        raise CertifyError(
            "nothing certified: 0 examples ran for "
            + ", ".join(f"{r['target']}/{r['dtype']} ({r['rejected']} drawn inputs rejected)" for r in empty)
            + "; raise --seconds (or --examples) so that every target runs an example"
        )
    return {
        "kind": "certify",
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
        "provenance": prov,
        "results": results,
        "certified": not any(r["violation"] for r in results),
        "max_ratio": max(r["max_ratio"] for r in results),
    }


def certify_markdown(rep: dict) -> str:
    from .report import _fmt, _table

    p = rep["provenance"]
    lines = [
        "# dora-verify certify",
        "",
        f"Device: {p.get('device', {}).get('name', p.get('device', {}).get('cpu', '?'))}; "
        f"commit {p.get('git', {}).get('commit', '?')}; "
        f"torch {p.get('versions', {}).get('torch', '?')}, triton {p.get('versions', {}).get('triton', '?')}; "
        + (
            'derandomized (pre-merge)'
            if rep['config']['derandomize']
            else 'seeded rounds from ' + str(rep['config']['seed'])
        )
        + ".",
        *(
            [
                "",
                f"Implementation under test: `--impl {rep['config']['impl']}`, held to the faithful contract "
                "(docs/gate.md): y within 1 ulp of the exact y of the rounded inputs, ν within 1e-6 relative per row, "
                "a layer within the faithful layer contract (layer_oracle.faithful_layer_bounds).",
            ]
            if rep["config"].get("impl")
            else []
        ),
        "",
        f"**{'CERTIFIED' if rep['certified'] else 'VIOLATION FOUND'}**: largest error/bound ratio "
        f"{_fmt(rep['max_ratio'])} (≤ 1 certifies; ratio = (|error| − oracle bound) / a-priori bound, worst element "
        f"of each example).",
        "",
    ]
    rows = [
        [
            r["target"],
            r["dtype"],
            r["tier"],
            r["examples"],
            r["max_ratio"],
            r["ratio"].get("p50"),
            r["ratio"].get("p99"),
            r["max_ulp"],
            r.get("violations", int(r["violation"])),
            r["seconds"],
        ]
        for r in rep["results"]
    ]
    lines += [
        _table(
            [
                "target",
                "dtype",
                "tier",
                "examples",
                "max ratio",
                "p50",
                "p99",
                "max ulp / unit",
                "violations (distinct, shrunk)",
                "time s",
            ],
            rows,
        ),
        "",
    ]
    crashed = [r for r in rep["results"] if isinstance(r.get("info", {}).get("error"), str)]
    if crashed:
        lines += [
            "**Crashes** (anything the implementation raised, `SystemExit` included, or an output that breaks "
            "the protocol; each is a finding):",
            "",
        ]
        lines += [f"- {r['target']}/{r['dtype']}: {r['info']['error']}" for r in crashed] + [""]
    lines += ["Per output (max ratio):", ""]
    lines += [
        f"- {r['target']}/{r['dtype']}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in r["parts_max"].items())
        for r in rep["results"]
    ]
    lines += ["", "Histogram of per-example worst ratios (how tight the bounds are):", ""]
    labels = next((list(r["ratio"]["histogram"]) for r in rep["results"] if "histogram" in r["ratio"]), [])
    lines += [
        _table(
            ["target", "dtype"] + labels,
            [[r["target"], r["dtype"]] + list(r["ratio"].get("histogram", {}).values()) for r in rep["results"]],
        )
    ]
    lines += [
        "",
        "`max ulp / unit`: max ULP error of the main output (compose, forms), or for `norm` the max relative "
        "error of ν in units of 2⁻²⁴.",
    ]
    return "\n".join(lines) + "\n"


def write_certify_report(rep: dict, out_dir) -> list:
    from .report import write_bundle

    return write_bundle(
        rep, out_dir, lambda files: certify_markdown(rep), json_name="certify.json", md_name="certify.md"
    )


__all__ = [  # the search's own names, then what it re-exports from certify_targets and corpus
    "BoundViolation",
    "CertifyConfig",
    "CertifyEnvironmentError",
    "CertifyError",
    "check_tier",
    "KERNEL_TARGETS",
    "LAYER_TARGETS",
    "Score",
    "TARGETS",
    "impl_targets",
    "load_case",
    "replay",
    "run_certify",
    "save_case",
    "search",
    "write_certify_report",
    "Target",
    "eval_compose_backward",
    "eval_compose_delta",
    "eval_compose_y",
    "eval_lora_compose",
    "eval_norm",
    "excess_ratio",
    "_compose_grads",
]
