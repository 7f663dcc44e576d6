"""``trl_qtuning.files.write_json``: a write that fails part way leaves the old file as it was."""

from __future__ import annotations

import json
import os

import pytest

from trl_qtuning.files import write_json


def test_write_json_replaces_whole_and_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    write_json(path, {"step": 1})
    assert json.loads(path.read_text()) == {"step": 1}
    write_json(path, {"step": 2, "when": tmp_path}, indent=None)  # non-JSON values as str
    assert json.loads(path.read_text()) == {"step": 2, "when": str(tmp_path)}

    def killed(*args):
        raise OSError("killed before the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(OSError, match="killed"):
        write_json(path, {"step": 3})
    assert json.loads(path.read_text()) == {"step": 2, "when": str(tmp_path)}  # never half a file
    assert [p.name for p in tmp_path.glob("*.json")] == ["state.json"]  # the leftover is dot-named, out of globs
