"""The certify corpus: a kept case as ``<target>-<dtype>-<hash>.npz`` (the exact input tensors, bf16 as raw
bits) + ``.json`` (target, kind, dtype, scalars, drawn parameters, its score and provenance), read back bit-exactly
and replayed; ``tests/test_certify.py`` replays every case committed under ``tests/corpus``.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from .certify_targets import Score, _target_table, default_tier
from .report import atomic_write
from .strategies import Example


def _tensor_to_np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _case_name(target: str, ex: Example) -> str:
    h = hashlib.sha1()
    h.update(target.encode())
    for k in sorted(ex.tensors):
        h.update(k.encode())
        h.update(_tensor_to_np(ex.tensors[k]).tobytes())
    h.update(json.dumps(ex.scalars, sort_keys=True).encode())
    return f"{target}-{ex.dtype}-{h.hexdigest()[:10]}"


def save_case(target: str, ex: Example, score: Score, corpus: "str | Path", meta: "dict | None" = None) -> Path:
    """Write ``<target>-<dtype>-<hash>.npz`` (the input tensors, bit-exact) and ``.json`` into ``corpus``."""
    score_doc = {"ratio": score.ratio, "ulp": score.ulp, "parts": score.parts, "info": score.info}
    return write_case(Path(corpus) / _case_name(target, ex), target, ex, score_doc, meta)


def write_case(stem: "str | Path", target: str, ex: Example, score: dict, meta: "dict | None" = None) -> Path:
    """Write one case as ``stem.npz`` (the input tensors, bit-exact) and ``stem.json`` (target, kind, dtype,
    scalars, params, tensor dtypes, ``score``, then ``meta``), each atomically: the format :func:`load_case` reads
    (certify's corpus and the gate's dumped worst cases). Returns the ``.json`` path."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: _tensor_to_np(v) for k, v in ex.tensors.items()}
    doc = {
        "target": target,
        "kind": ex.kind,
        "dtype": ex.dtype,
        "scalars": ex.scalars,
        "params": ex.params,
        "tensors": {k: str(v.dtype).removeprefix("torch.") for k, v in ex.tensors.items()},
        "score": score,
        **(meta or {}),
    }
    npz, js = stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".json")
    atomic_write(npz, lambda fh: np.savez(fh, **arrays))
    atomic_write(js, lambda fh: fh.write(json.dumps(_finite_json(doc), indent=1, allow_nan=False).encode()))
    return js


def _finite_json(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v) for v in obj]
    return obj


def load_case(path: "str | Path"):
    """(target name, Example, document) of a corpus case (``.json`` path; the ``.npz`` sits beside it)."""
    path = Path(path)
    doc = json.loads(path.read_text())
    data = np.load(path.with_suffix(".npz"))
    tensors = {}
    for k, dt in doc["tensors"].items():
        a = torch.from_numpy(np.array(data[k]))
        tensors[k] = a.view(torch.bfloat16) if dt == "bfloat16" else a
    return doc["target"], Example(doc["kind"], doc["dtype"], tensors, doc["scalars"], doc["params"]), doc


def replay(path: "str | Path", device="cpu", tier=None) -> Score:
    """Re-run a corpus case on ``device`` (default tier: fused on CUDA, eager elsewhere)."""
    target, ex, doc = load_case(path)
    return _target_table(doc.get("impl"))[target].evaluate(
        ex, torch.device(device), tier or default_tier(torch.device(device))
    )


def _example_key(ex: Example) -> str:
    """Content hash of an example (tensor bits and scalars): two draws of the same input are one case."""
    return _case_name("", ex)
