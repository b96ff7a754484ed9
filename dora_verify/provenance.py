"""Provenance of a report: git commit, package versions, device, time and command line."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("dora-verify", "torch", "triton", "numpy", "mpmath", "scipy", "matplotlib", "peft", "transformers",
            "hypothesis")


def _version(name: str):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_state(path: "Path | None" = None) -> dict:
    """Commit and dirty flag of the checkout holding this package. Outside a git checkout (a copied
    tree on a GPU host, an installed wheel) the commit comes from $DORA_VERIFY_COMMIT, else None."""
    fallback = {"commit": os.environ.get("DORA_VERIFY_COMMIT") or None, "dirty": None,
                "source": "DORA_VERIFY_COMMIT" if os.environ.get("DORA_VERIFY_COMMIT") else None}
    root = Path(path or Path(__file__).resolve().parent.parent)

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)

    if fallback["commit"]:  # explicit wins: a copied tree may carry a stale .git (seen on the GPU host)
        return fallback
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return fallback
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.TimeoutExpired):
        return fallback


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2 ** 30, 1), multiprocessors=props.multi_processor_count,
                    cuda=torch.version.cuda, driver=_driver())
    return info


def _driver():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def provenance(device: torch.device) -> dict:
    return {
        "git": git_state(),
        "versions": {name: _version(name) for name in PACKAGES} | {"python": platform.python_version()},
        "device": device_info(device),
        "platform": platform.platform(),
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": list(sys.argv),
    }
