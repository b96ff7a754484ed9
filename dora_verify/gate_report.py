"""The gate's outputs: gate.md (what failed, its worst case, the command that reproduces it), junit.xml, the dump of
each failing group's worst case (``cases/``) and the atomic write of the set."""

from __future__ import annotations

from pathlib import Path


from .gate import DTYPES, _op, build_suite


def worst_case_text(w: dict, value: str, quote: str = "") -> str:
    """One line for a group's worst case: its id, what the case is, which ratio, ``value`` (formatted by the
    caller), and the worst element where there is one (gate.md, junit.xml, the pytest plugin)."""
    at = f" at element {w['element']}" if w.get("element") not in (None, []) else ""
    return f"worst case {quote}{w['id']}{quote} ({w['what']}): {w.get('severity_kind', 'ratio')} {value}{at}"


def reproduce_command(rep: dict, case_ids=(), impl_spec: "str | None" = None) -> str:
    """The command that runs these cases again. ``python -m dora_verify``, not the console script: ``-m`` puts the
    working directory on sys.path, so an ``--impl`` module next to the caller imports as it did in the run."""
    cfg = rep["config"]
    dev = "cuda" if rep["environment"]["device_class"].startswith("cuda") else "cpu"
    parts = [
        "python -m dora_verify gate",
        f"--impl {impl_spec or rep.get('impl_spec', 'kernels')}",
        f"--device {dev}",
        f"--dtypes {','.join(cfg['dtypes'])}",
        f"--seed {cfg['seed']}",
    ]
    parts += [f"--case {c}" for c in case_ids]
    return " ".join(parts)


def gate_markdown(rep: dict) -> str:
    from .report import _fmt, _table

    v, env, p = rep["verdict"], rep["environment"], rep["provenance"]
    cpu_tiers = (
        "eager tier and the Triton interpreter"
        if rep.get("triton_installed", True)
        else "eager tier only: Triton is not installed, so the fused kernels are not exercised"
    )
    mode = "GPU" if env["mode"] == "gpu" else f"CPU, **logic-only** ({cpu_tiers}; no GPU evidence)"
    head = (
        "PASSED"
        if v["passed"]
        else ("NOT COMPARED: environment mismatch" if v.get("environment_mismatch") else "FAILED")
    )
    lines = [
        f"# dora-verify gate: {head}",
        "",
        f"Mode: {mode}. Device class {env['device_class']}; torch {env['torch']}, triton {env['triton']}; "
        f"commit {p.get('git', {}).get('commit', '?')}; suite {env['suite']} ({rep['cases']} cases, seed "
        f"{rep['config']['seed']}); {rep['evaluations']} evaluations in {rep['seconds']} s.",
        "",
    ]
    if v.get("nothing_ran"):
        who = f" for {', '.join(f'`{n}`' for n in rep['idle_impls'])}" if rep.get("idle_impls") else ""
        lines += [
            f"**Nothing ran**{who} (no case applies to the implementation): the gate fails rather than pass on "
            "nothing.",
            "",
        ]
    if v["hard"]:
        lines += ["## Hard failures", ""]
        for key, msgs in v["hard"].items():
            g = rep["groups"][key]
            lines.append(f"- `{key}`: " + "; ".join(msgs))
            w = g.get("worst_case")
            if w:
                lines.append("  " + worst_case_text(w, _fmt(w["severity"]), quote="`"))
            lines.append(f"  reproduce (worst first): `{reproduce_command(rep, g['failing_cases'][:3])}`")
            if w:
                lines.append(
                    f"  inputs: `cases/{w['id']}.npz` (+ `.json`; `dora_verify.certify.load_case`, "
                    "`certify.replay` re-runs it)"
                )
        lines.append("")
    nonfinite = [g for g in rep["groups"].values() if g["nonfinite_mismatch"]]
    if nonfinite:
        lines += [
            "## NaN/Inf mismatches",
            "",
            "Elements whose NaN/±Inf pattern differs from the oracle's (the IEEE "
            "evaluation of the rounded inputs, rounded to the output's dtype).",
            "",
        ]
        lines.append(
            _table(
                [
                    "impl",
                    "output",
                    "dtype",
                    "shapes",
                    "NaN/Inf where the oracle is finite",
                    "finite where the oracle is NaN/Inf",
                    "wrong NaN/Inf",
                    "first elements",
                ],
                [
                    [
                        g["impl"],
                        g["output"],
                        g["dtype"],
                        g["shape_class"],
                        g["nonfinite"]["nonfinite_where_finite"],
                        g["nonfinite"]["finite_where_nonfinite"],
                        g["nonfinite"]["wrong_nonfinite"],
                        "; ".join(g["nonfinite"]["examples"]),
                    ]
                    for g in nonfinite
                ],
            )
        )
        lines.append("")
    if v["baseline"]:
        lines += [
            "## Baseline differences (beyond the slack)",
            "",
            "A regression fails; an improvement fails too until the baseline is regenerated with "
            "`--update-baseline` (the ratchet).",
            "",
        ]
        lines.append(
            _table(
                ["group", "metric", "baseline", "now", "finding"],
                [[f"`{b['group']}`", b["metric"], b["old"], b["new"], b["kind"]] for b in v["baseline"]],
            )
        )
        lines.append("")
    if v.get("environment_mismatch"):
        lines += [
            "**The baseline comes from another environment**: " + "; ".join(v["environment"]) + ". Nothing was "
            "compared with it (exit 2): regenerate it here with `--update-baseline`, or pass "
            "`--allow-env-mismatch` to compare anyway. The hard criteria below were evaluated.",
            "",
        ]
    elif v["environment"]:
        lines += [
            "Environment differs from the baseline's (allowed by --allow-env-mismatch): " + "; ".join(v["environment"]),
            "",
        ]
    if not v["baseline_used"]:
        lines += ["No baseline compared (hard criteria only).", ""]
    elif rep.get("baseline_slack"):
        lines += [
            "Baseline tolerances (stored in the baseline; `--update-baseline --slack METRIC=ABS,REL` sets them): "
            + ", ".join(f"{m} |new − old| ≤ {a:g} + {r:g}·|old|" for m, (a, r) in rep["baseline_slack"].items())
            + ".",
            "",
        ]
    if rep["config"].get("subset"):
        lines += [
            f"Subset run: dtypes {', '.join(rep['config']['dtypes'])}; ops {', '.join(rep['config']['ops'])} "
            "(compared with the baseline's groups in that scope only).",
            "",
        ]
    lines += ["## Groups", ""]
    rows = [
        [
            g["impl"],
            g["output"],
            g["dtype"],
            g["shape_class"],
            g["cases"],
            g["max_ratio"],
            g["p99_ratio"],
            _fmt(g["max_ulp"], 5),
            g["frac_correctly_rounded"],
            g["fa_ratio"],
            g["nonfinite_mismatch"],
            g["nondeterministic"],
            "FAIL" if g["hard_failures"] else "ok",
        ]
        for g in rep["groups"].values()
    ]
    lines.append(
        _table(
            [
                "impl",
                "output",
                "dtype",
                "shapes",
                "cases",
                "max ratio",
                "p99 ratio",
                "max ulp",
                "correctly rounded",
                "FA ratio",
                "NaN/Inf mismatch",
                "non-det.",
                "hard",
            ],
            rows,
        )
    )
    limit, enforced = rep["config"].get("case_timeout"), rep["config"].get("case_timeout_enforced", True)
    limit_text = "none" if not limit else f"{limit:g} s" + ("" if enforced else " (not enforced here: no SIGALRM)")
    lines += ["", f"Time limit per case: {limit_text}; every call gets its own copies of the inputs."]
    lines += [
        "",
        "Criteria: docs/gate.md (`dora-verify gate --docs` prints it). "
        "Ratio = (|error| − oracle bound) / a-priori bound of the implementation's "
        "contract; FA ratio = max error / max(plain low-precision baseline's max error, correctly rounded "
        f"result's) with limit {rep['config']['fa_limit']:g}.",
    ]
    return "\n".join(lines) + "\n"


def finding_message(b: dict) -> str:
    """One line for a baseline finding (what a CI summary shows)."""
    if b["kind"] == "missing":
        return "group in the baseline did not run"
    if b["kind"] == "new" and b["metric"] == "-":
        return "group not in the baseline (new): accept it with --update-baseline"
    if b["kind"] == "new":
        return f"{b['metric']}: not in the baseline, now {b['new']}"
    if b["new"] is None:
        return f"{b['metric']}: {b['old']} in the baseline, not measured now"
    return f"{b['metric']}: baseline {b['old']}, now {b['new']} ({b['kind']})"


def junit_xml(rep: dict) -> str:
    """JUnit XML of the verdict: a testsuite per implementation, per group a 'hard' testcase (an ``<error>`` when
    cases crashed, a ``<failure>`` for any other hard failure) and a 'baseline' testcase (``<skipped>`` when no
    baseline was given); one 'gate.suite' testcase when nothing ran and one 'gate.baseline' suite for baseline
    groups that did not run. Suites and the root carry tests, failures, errors, skipped, time and timestamp."""
    import xml.etree.ElementTree as ET

    v = rep["verdict"]
    stamp = str(rep.get("provenance", {}).get("time_utc", "")).replace("+00:00", "")
    elapsed = float(rep.get("seconds") or 0.0)
    base_by_group: dict = {}
    for b in v["baseline"]:
        base_by_group.setdefault(b["group"], []).append(b)
    suites = ET.Element("testsuites", name="dora-verify gate")
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}

    def suite(name: str, share: float):
        return ET.SubElement(suites, "testsuite", name=name, timestamp=stamp, time=f"{share:.3f}")

    def close(ts, c):
        for k, n in c.items():
            ts.set(k, str(n))
            counts[k] += n

    by_impl: dict = {}
    for key, g in rep["groups"].items():
        by_impl.setdefault(g["impl"], []).append((key, g))
    n_groups = max(1, len(rep["groups"]))
    for impl, items in by_impl.items():
        ts = suite(f"gate.{impl}", elapsed * len(items) / n_groups)
        c = dict.fromkeys(counts, 0)
        for key, g in items:
            cls = f"{impl}.{g['output']}.{g['dtype']}"
            name = f"{g['shape_class']}.{g['device_class']}"
            tc = ET.SubElement(ts, "testcase", classname=cls, name=f"{name}.hard", time="0")
            c["tests"] += 1
            hard = g["hard_failures"]
            if hard:
                kind = "error" if g.get("crashes") else "failure"
                c["errors" if kind == "error" else "failures"] += 1
                el = ET.SubElement(tc, kind, message="; ".join(hard)[:500])
                w = g.get("worst_case")
                text = "reproduce (worst first): " + reproduce_command(rep, g["failing_cases"][:3])
                if w:
                    text = (
                        worst_case_text(w, format(w["severity"], ".6g")) + f"\n{text}\n"
                        f"inputs: cases/{w['id']}.npz (+ .json)"
                    )
                el.text = text
            tc = ET.SubElement(ts, "testcase", classname=cls, name=f"{name}.baseline", time="0")
            c["tests"] += 1
            if not v.get("baseline_used"):
                ET.SubElement(tc, "skipped", message="no baseline given (--baseline)")
                c["skipped"] += 1
            elif v.get("environment_mismatch"):  # refused: nothing was compared (the gate.environment <error> says why)
                ET.SubElement(tc, "skipped", message="not compared: the baseline is from another environment")
                c["skipped"] += 1
            elif base_by_group.get(key):
                c["failures"] += 1
                ET.SubElement(tc, "failure", message="; ".join(finding_message(b) for b in base_by_group[key])[:500])
        close(ts, c)
    if v.get("nothing_ran"):
        ts = suite("gate.suite", 0.0)
        tc = ET.SubElement(ts, "testcase", classname="gate", name="suite_ran", time="0")
        who = f" for {', '.join(rep['idle_impls'])}" if rep.get("idle_impls") else ""
        ET.SubElement(tc, "failure", message=f"no case ran{who}: the gate never passes on nothing")
        close(ts, {"tests": 1, "failures": 1, "errors": 0, "skipped": 0})
    if v.get("environment_mismatch"):
        ts = suite("gate.environment", 0.0)
        tc = ET.SubElement(ts, "testcase", classname="baseline", name="environment", time="0")
        ET.SubElement(tc, "error", message=("baseline from another environment: " + "; ".join(v["environment"]))[:500])
        close(ts, {"tests": 1, "failures": 0, "errors": 1, "skipped": 0})
    missing = [b for b in v["baseline"] if b["kind"] == "missing"]
    if missing:
        ts = suite("gate.baseline", 0.0)
        for b in missing:
            tc = ET.SubElement(ts, "testcase", classname="baseline", name=b["group"], time="0")
            ET.SubElement(tc, "failure", message=finding_message(b))
        close(ts, {"tests": len(missing), "failures": len(missing), "errors": 0, "skipped": 0})
    for k, n in counts.items():
        suites.set(k, str(n))
    suites.set("time", f"{elapsed:.3f}")
    suites.set("timestamp", stamp)
    return ET.tostring(suites, encoding="unicode")


_BUILT_IN_TARGETS = {
    "compose": "compose.y",
    "nonfinite": "compose.y",
    "norm": "norm",
    "backward": "compose.backward",
    "layer": "layer",
}


def _case_target(impl_name: str, check: str, impl_spec: "str | None") -> "tuple[str, str | None]":
    """(certify target, --impl spec or None) under which certify.replay re-runs a dumped case."""
    if impl_name.startswith(("kernels", "form")) or impl_spec in (None, "kernels"):
        return _BUILT_IN_TARGETS[check], None
    safe = "".join(c if c.isalnum() or c in "_-" else "_" for c in impl_name)
    return f"{safe}.{_op(check) if check != 'backward' else 'compose'}", impl_spec


def dump_worst_cases(rep: dict, folder) -> list:
    """Write the worst failing case of each failing group as ``cases/<id>.npz`` (its inputs, bit-exact) and
    ``.json`` (certify's corpus format: ``dora_verify.certify.load_case`` reads it, ``certify.replay`` re-runs the
    implementation on it): what a team debugs from. The suite is rebuilt from the report's seed and sizes."""
    from .corpus import write_case

    worst = {}
    for key, g in rep["groups"].items():
        w = g.get("worst_case")
        if g.get("hard_failures") and w and w["id"] not in worst:
            worst[w["id"]] = (key, g, w)
    if not worst:
        return []
    cfg = rep["config"]
    sizes = {k: cfg[k] for k in ("n_compose", "n_norm", "n_backward", "n_layer") if k in cfg}
    by_id = {c.id: c for c in build_suite(DTYPES, cfg["seed"], **sizes)}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for cid, (key, g, w) in worst.items():
        case = by_id[cid]
        target, spec = _case_target(g["impl"], case.check, rep.get("impl_spec"))
        score = {"ratio": w["severity"], "kind": w.get("severity_kind"), "element": w.get("element")}
        meta = {"found_by": "gate", "gate_case": cid, "group": key, "what": w["what"]}
        meta.update({"impl": spec} if spec else {})
        write_case(folder / cid, target, case.example, score, meta)
        written += [folder / f"{cid}.json", folder / f"{cid}.npz"]
    return written


def write_gate_report(rep: dict, out_dir) -> list:
    from .report import write_bundle

    def extra(stage):
        p = Path(stage) / "junit.xml"
        p.write_text(junit_xml(rep), encoding="utf-8")
        return [p] + dump_worst_cases(rep, Path(stage) / "cases")

    return write_bundle(
        rep,
        out_dir,
        lambda files: gate_markdown(rep),
        extra=extra,
        json_name="gate.json",
        md_name="gate.md",
        owned=("cases",),
    )


__all__ = [
    "dump_worst_cases",
    "finding_message",
    "gate_markdown",
    "junit_xml",
    "reproduce_command",
    "worst_case_text",
    "write_gate_report",
]
