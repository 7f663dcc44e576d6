"""Files written whole or not at all: a process killed mid-write leaves the old file (or none), never half a file
that a resume would then read as finished."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["write_json"]


def write_json(path: str | os.PathLike, payload: Any, *, indent: int | None = 2) -> None:
    """``payload`` as JSON in a temporary file beside ``path``, renamed over it (non-JSON values as ``str``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # dot-named: no glob of the folder's files sees it
    tmp.write_text(json.dumps(payload, indent=indent, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
