"""The gate's baseline: its format and validation, the comparison of a run with it within its slack, and the
verdict (hard criteria, baseline findings, environment) — :mod:`dora_verify.gate` runs the suite, this judges it."""

from __future__ import annotations

import math
from pathlib import Path

from .gate import (
    BASELINE_FORMAT,
    DEFAULT_SLACK,
    DTYPES,
    ENV_KEYS,
    LOWER_IS_BETTER,
    OPS,
    GateEnvironmentError,
    _in_scope,
)


def _cwd_commit() -> "str | None":
    """The commit of the git checkout the gate runs in (the adopting team's repository), or None outside one."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def make_baseline(rep: dict, slack=None, merge_into: "dict | None" = None) -> dict:
    """The baseline of a run: its environment, the slack, the scope (dtypes and ops the run covered) and each group's
    metrics. ``merge_into``: an existing baseline of the same environment whose groups outside this run's scope are
    kept (a --dtypes/--ops subset updates its part of a baseline and leaves the rest)."""
    slack = slack or DEFAULT_SLACK
    cfg = rep.get("config", {})
    scope = {"dtypes": list(cfg.get("dtypes", DTYPES)), "ops": list(cfg.get("ops", OPS))}
    groups = {k: {m: g[m] for m in LOWER_IS_BETTER} for k, g in rep["groups"].items()}
    if merge_into is not None:
        old = merge_into.get("scope", {"dtypes": list(DTYPES), "ops": list(OPS)})
        groups = {**{k: g for k, g in merge_into["groups"].items() if not _in_scope(k, cfg)}, **groups}
        scope = {
            n: [x for x in (DTYPES if n == "dtypes" else OPS) if x in set(scope[n]) | set(old.get(n, []))]
            for n in ("dtypes", "ops")
        }
    return {
        "format": BASELINE_FORMAT,
        "environment": rep["environment"],
        "slack": {k: list(v) for k, v in slack.items()},
        "scope": scope,
        # no time stamp (it made every regeneration a merge conflict); the commits say what produced it
        "created_by": {"commit": rep["provenance"].get("git", {}).get("commit"), "repository_commit": _cwd_commit()},
        "groups": dict(sorted(groups.items())),
    }


class BaselineError(ValueError):
    """A baseline file that is missing, unreadable or malformed (a usage error: exit 2, before the suite runs)."""


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def baseline_problem(doc) -> "str | None":
    """What is wrong with a parsed baseline document (the schema :func:`make_baseline` writes), or None."""
    if not isinstance(doc, dict):
        return f"is not a JSON object (got {type(doc).__name__})"
    if doc.get("format") != BASELINE_FORMAT:
        return (
            f"has format {_short(doc.get('format'))}; this dora-verify reads {BASELINE_FORMAT!r} "
            "(regenerate it with --update-baseline)"
        )
    for key in ("environment", "slack", "groups"):
        if key not in doc:
            return f"lacks the key {key!r}"
        if not isinstance(doc[key], dict):
            return f"{key!r} must be an object, got {_short(doc[key])}"
    env = doc["environment"]
    for k in ENV_KEYS:
        if k not in env:
            return f"environment lacks {k!r}"
        v = env[k]
        ok = (
            isinstance(v, int) and not isinstance(v, bool)
            if k == "suite_version"
            else isinstance(v, list) and all(isinstance(x, str) for x in v)
            if k == "impls"
            else v is None or isinstance(v, str)
        )
        if not ok:
            return f"environment[{k!r}] has the wrong type: {_short(v)}"
    for m, v in doc["slack"].items():
        if m not in LOWER_IS_BETTER:
            return f"slack names an unknown metric {m!r} (known: {', '.join(LOWER_IS_BETTER)})"
        if not (isinstance(v, list) and len(v) == 2 and all(_number(x) and x >= 0 for x in v)):
            return f"slack[{m!r}] must be [absolute, relative], two non-negative numbers; got {_short(v)}"
    scope = doc.get("scope", {"dtypes": list(DTYPES), "ops": list(OPS)})  # absent in older baselines: the whole suite
    if not (
        isinstance(scope, dict)
        and set(scope) == {"dtypes", "ops"}
        and isinstance(scope["dtypes"], list)
        and set(scope["dtypes"]) <= set(DTYPES)
        and isinstance(scope["ops"], list)
        and set(scope["ops"]) <= set(OPS)
    ):
        return (
            f"scope must be {{'dtypes': [...], 'ops': [...]}} of {', '.join(DTYPES)} and {', '.join(OPS)}; "
            f"got {_short(scope)}"
        )
    for key, g in doc["groups"].items():
        if not isinstance(g, dict):
            return f"groups[{key!r}] must be an object, got {_short(g)}"
        for m in LOWER_IS_BETTER:
            if m not in g:
                return f"groups[{key!r}] lacks {m!r}"
            if g[m] is not None and not _number(g[m]):
                return f"groups[{key!r}][{m!r}] must be a finite number or null, got {_short(g[m])}"
    return None


def load_baseline(path) -> dict:
    """The baseline document at ``path``, validated (:func:`baseline_problem`); :class:`BaselineError`, one line,
    when it is missing, unreadable or malformed — before anything runs."""
    import json

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BaselineError(f"baseline {path} does not exist: create it with --update-baseline") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BaselineError(f"baseline {path} is unreadable: {e}") from None
    problem = baseline_problem(doc)
    if problem:
        raise BaselineError(f"baseline {path} {problem}")
    return doc


def env_mismatch(base_env: dict, env: dict) -> list:
    return [
        f"{k}: baseline {base_env.get(k)!r}, here {env.get(k)!r}" for k in ENV_KEYS if base_env.get(k) != env.get(k)
    ]


def compare_baseline(rep: dict, baseline: dict) -> list:
    """Baseline findings: (group key, metric, old, new, 'regression' | 'improvement' | 'missing' | 'new')."""
    slack = {k: tuple(v) for k, v in baseline.get("slack", DEFAULT_SLACK).items()}
    found = []
    old_groups = baseline.get("groups", {})
    for key, g in rep["groups"].items():
        if key not in old_groups:
            found.append((key, "-", None, None, "new"))
            continue
        for m, lower in LOWER_IS_BETTER.items():
            old, new = old_groups[key].get(m), g.get(m)
            if old is None and new is None:
                continue
            if old is None or new is None:
                found.append((key, m, old, new, "regression" if new is None else "new"))
                continue
            a, r = slack.get(m, DEFAULT_SLACK[m])
            tol = a + r * abs(old)
            if abs(new - old) <= tol:
                continue
            worse = (new > old) if lower else (new < old)
            found.append((key, m, old, new, "regression" if worse else "improvement"))
    found += [
        (key, "-", None, None, "missing")
        for key in old_groups
        if key not in rep["groups"] and _in_scope(key, rep.get("config", {}))
    ]
    return found


def _allowed(mism_keys, allow) -> bool:
    """Whether ``allow`` (True: any; a collection of ENV_KEYS names; False/None: none) covers every mismatched key."""
    if allow is True:
        return True
    return bool(allow) and set(mism_keys) <= set(allow)


def verdict(rep: dict, baseline: "dict | None", allow_env_mismatch=False) -> dict:
    """Adds ``verdict`` to the report: passed, hard failures, baseline findings, environment notes.
    ``allow_env_mismatch``: True compares with a baseline from any environment; a collection of environment keys
    (e.g. ``{'torch', 'triton'}``, a routine version bump) allows differences in those only."""
    hard = {k: g["hard_failures"] for k, g in rep["groups"].items() if g["hard_failures"]}
    v = {"hard": hard, "baseline": [], "environment": [], "baseline_used": baseline is not None}
    if not rep["groups"] or rep["evaluations"] == 0 or rep.get("idle_impls"):
        v["nothing_ran"] = True  # for the whole run, or for an implementation no case applied to
    if baseline is not None:
        mism = env_mismatch(baseline.get("environment", {}), rep["environment"])
        v["environment"] = mism
        keys = [k for k in ENV_KEYS if baseline.get("environment", {}).get(k) != rep["environment"].get(k)]
        if mism and not _allowed(keys, allow_env_mismatch):  # the reports are still written (the CLI exits 2 after)
            v.update(environment_mismatch=True, passed=False)
            rep["verdict"] = v
            raise GateEnvironmentError(
                "baseline from a different environment (" + "; ".join(mism) + "): regenerate "
                "it here with --update-baseline, or pass --allow-env-mismatch"
            )
        v["baseline"] = [
            dict(zip(("group", "metric", "old", "new", "kind"), f)) for f in compare_baseline(rep, baseline)
        ]
        rep["baseline_slack"] = {k: list(x) for k, x in baseline.get("slack", DEFAULT_SLACK).items()}
    v["passed"] = not hard and not v["baseline"] and not v.get("nothing_ran")
    rep["verdict"] = v
    return rep


def write_baseline(doc: dict, path) -> Path:
    """Atomic write of a baseline file (never by hand: ``dora-verify gate --update-baseline``)."""
    import json

    from .report import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: fh.write((json.dumps(doc, indent=1, allow_nan=False) + "\n").encode()))
    return path


__all__ = [
    "BaselineError",
    "baseline_problem",
    "compare_baseline",
    "env_mismatch",
    "load_baseline",
    "make_baseline",
    "verdict",
    "write_baseline",
]
