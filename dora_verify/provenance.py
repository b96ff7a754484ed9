"""Provenance of a report: git commit (and whether the tree differs from it), package versions, device (CPU model
and ISA flags, GPU), the source hash of user modules named by ``--impl``, time, run id and command line."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import uuid
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = (
    "dora-verify",
    "torch",
    "triton",
    "numpy",
    "mpmath",
    "scipy",
    "matplotlib",
    "peft",
    "transformers",
    "hypothesis",
)


def _version(name: str):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_state(path: "Path | None" = None) -> dict:
    """Commit of the checkout holding this package; ``dirty`` when any tracked file is modified or any untracked
    (not ignored) file exists, with the two counts. Outside a git checkout (a copied tree on a GPU host, an
    installed wheel) the commit comes from $DORA_VERIFY_COMMIT, else None."""
    fallback = {
        "commit": os.environ.get("DORA_VERIFY_COMMIT") or None,
        "dirty": None,
        "source": "DORA_VERIFY_COMMIT" if os.environ.get("DORA_VERIFY_COMMIT") else None,
    }
    root = Path(path or Path(__file__).resolve().parent.parent)

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)

    if fallback["commit"]:  # explicit wins: a copied tree may carry a stale .git (seen on the GPU host)
        return fallback
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return fallback
        status = git("status", "--porcelain", "--untracked-files=normal").stdout.splitlines()
        untracked = sum(line.startswith("??") for line in status)
        return {
            "commit": head.stdout.strip(),
            "dirty": bool(status),
            "modified": len(status) - untracked,
            "untracked": untracked,
        }
    except (OSError, subprocess.TimeoutExpired):
        return fallback


ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_bf16",
    "avx512_fp16",
    "avx512_vnni",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "sve",
    "sve2",
)


def cpu_info() -> dict:
    """CPU model, the ISA flags among :data:`ISA_FLAGS` that it has (what decides CPU BLAS kernels and so the bits of
    CPU results), and the logical CPU count. Linux reads /proc/cpuinfo; elsewhere the model is platform's guess."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and value.strip():
                    model = value.strip()
                elif key in ("flags", "features"):
                    flags.update(value.split())
                if key == "" and flags:  # the first processor's block is enough
                    break
    except OSError:
        pass
    return {"cpu": model, "cpu_flags": [f for f in ISA_FLAGS if f in flags], "cpu_count": os.cpu_count()}


def impl_sources(specs) -> dict:
    """{spec: {module, file, sha256}} for every ``module:callable`` spec whose module is imported and has a source
    file (the bytes the report's numbers came from); the built-in names (kernels, peft, forms, form:NAME) are part
    of this package's commit."""
    out = {}
    for spec in specs or ():
        spec = str(spec)
        if ":" not in spec or spec.startswith("form:"):
            continue
        mod = sys.modules.get(spec.split(":", 1)[0])
        path = getattr(mod, "__file__", None)
        if not path or not os.path.isfile(path):
            continue
        with open(path, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
        out[spec] = {"module": mod.__name__, "file": os.path.abspath(path), "sha256": digest}
    return out


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, **cpu_info(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            cuda=torch.version.cuda,
            driver=_driver(),
        )
    return info


def _driver():
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def provenance(device: torch.device, impls=()) -> dict:
    """The report's provenance; ``impls``: the ``--impl`` specs (or implementation names) it measured."""
    return {
        "run_id": uuid.uuid4().hex[:12],
        "git": git_state(),
        "impl_sources": impl_sources(impls),
        "versions": {name: _version(name) for name in PACKAGES} | {"python": platform.python_version()},
        "device": device_info(device),
        "platform": platform.platform(),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv),
    }


def png_metadata(rep: dict) -> dict:
    """PNG text chunks that tie a plot to its report: run id, commit, seed, tool and command line."""
    p = rep.get("provenance") or {}
    cfg = rep.get("config") or {}
    git = p.get("git") or {}
    return {
        "Software": f"dora-verify {rep.get('kind', '')}".strip(),
        "Source": str(git.get("commit")),
        "dora-verify:run_id": str(p.get("run_id")),
        "dora-verify:commit": str(git.get("commit")),
        "dora-verify:dirty": str(git.get("dirty")),
        "dora-verify:seed": str(cfg.get("seed")),
        "dora-verify:argv": " ".join(str(a) for a in p.get("argv", [])),
        "Creation Time": str(p.get("time_utc")),
    }


def stamp_png(path, metadata: dict) -> None:
    """Rewrite the PNG at ``path`` with ``metadata`` as text chunks (lossless re-encode); a file that is not a PNG
    (no PNG signature) is left alone."""
    with open(path, "rb") as fh:
        if fh.read(8) != b"\x89PNG\r\n\x1a\n":
            return
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in metadata.items():
        info.add_text(k, v)
    with Image.open(path) as img:
        img.load()
        img.save(path, pnginfo=info)
