"""The committed study pages (docs/study/<matrix>/results.md) are what `trl-qtuning bench --table-only` renders from the
committed cell results: no table on them was edited by hand or left stale after a cell landed."""

from __future__ import annotations

import dataclasses
import io
import shutil
from pathlib import Path

import pytest

from trl_qtuning.bench import tables
from trl_qtuning.bench.matrix import load_matrix

ROOT = Path(__file__).resolve().parents[1]
STUDY_MATRICES = sorted((ROOT / "recipes" / "bench").glob("study_*.yaml"))


def _table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


@pytest.mark.parametrize("matrix_file", STUDY_MATRICES, ids=lambda path: path.stem)
def test_committed_study_page_is_the_render_of_the_committed_results(matrix_file, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the matrices name their output folder relative to the repository root
    matrix = load_matrix(matrix_file, check_inputs=False)
    page = matrix.output_dir / tables.RESULTS_MD
    if not page.is_file():
        pytest.skip(f"{matrix.output_dir} has no results page yet (no cell of this matrix has finished)")
    copy = tmp_path / "study"
    shutil.copytree(matrix.output_dir, copy)  # render into a copy: the committed page stays as it is
    rendered = dataclasses.replace(matrix, output_dir=copy, report_to="none")
    from trl_qtuning.bench import figures

    monkeypatch.setattr(figures, "draw_curves", lambda *args, **kwargs: [])  # the tables are the claim here
    tables.render_results(rendered, out=io.StringIO())
    assert _table_lines((copy / tables.RESULTS_MD).read_text()) == _table_lines(page.read_text()), (
        f"{page} is not what the committed results render to: run "
        f"`trl-qtuning bench --config {matrix_file.relative_to(ROOT)} --table-only` and commit the page"
    )
