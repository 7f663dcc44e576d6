"""Where a result came from: the commit, the library versions, the machine, and a hash of the cell's settings."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from .matrix import Cell, Matrix

__all__ = ["code_state", "fingerprint", "git_state", "library_versions", "machine_summary"]


def fingerprint(matrix: Matrix, cell: Cell) -> str:
    """A hash of every setting the cell's result depends on (to flag results made with other settings)."""
    method = None if cell.is_base else matrix.method(cell.method)
    payload: dict[str, Any] = {
        "model": matrix.model, "eval": matrix.eval.as_dict(), "heldout_size": matrix.heldout_size,
        "train": matrix.train.as_dict(), "lora": None if cell.is_base else matrix.lora,
        "training": None if cell.is_base else matrix.training, "overrides": method.overrides if method else None,
        "budget": cell.budget, "seed": cell.seed,
    }  # fmt: skip
    if method is not None and method.match_label_tokens:
        payload["match_label_tokens"] = method.match_label_tokens
    if not cell.is_base and matrix.equal_compute is not None:
        payload["equal_compute"] = [matrix.equal_compute.reference, matrix.equal_compute.max_steps]
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


PACKAGE_DIR = Path(__file__).resolve().parents[1]


def git_state(where: Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the code: the git checkout holding this package (else the current directory).
    ``dirty`` means uncommitted changes under the package's folder (new files included), the code a result ran;
    edits elsewhere in the checkout (the pages a study renders, docs) do not make a result dirty."""
    for folder in ([where] if where is not None else [PACKAGE_DIR, Path.cwd()]):
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=normal", "--", "."], cwd=folder,
                capture_output=True, text=True, timeout=20, check=True,
            ).stdout
            return {"commit": commit, "dirty": bool(status.strip())}
        except (OSError, subprocess.SubprocessError):
            continue
    return {"commit": None, "dirty": None}


@functools.lru_cache(maxsize=1)
def _first_git_state() -> dict[str, Any]:
    return git_state()


def code_state() -> dict[str, Any]:
    """:func:`git_state` as this process first saw it (a copy). A bench process runs the code it imported when it
    started; the checkout may move on while it trains (a study's results are committed as they land, an edit is
    made), so each result records this, not the checkout's state when the cell finished."""
    return dict(_first_git_state())


def library_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        with contextlib.suppress(PackageNotFoundError):
            return version(name)

    return {"python": platform.python_version(), **{name: installed(name) for name in (
        "trl-qtuning", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "mlflow")}}  # fmt: skip


def machine_summary() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    summary: dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform()}
    with contextlib.suppress(Exception):  # a machine summary never fails the table
        import torch

        summary["torch_threads"] = torch.get_num_threads()
        summary["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return summary
