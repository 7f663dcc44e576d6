"""The committed study pages (docs/study/<matrix>/results.md) are what `trl-qtuning bench --table-only` renders from the
committed cell results: no table on them was edited by hand or left stale after a cell landed."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from trl_qtuning.bench import tables
from trl_qtuning.bench.cli import main as bench_main
from trl_qtuning.bench.matrix import load_matrix

ROOT = Path(__file__).resolve().parents[1]
STUDY_MATRICES = sorted((ROOT / "recipes" / "bench").glob("study_*.yaml"))
IN_PROGRESS: set[str] = set()
"""Studies whose cells are still landing (issue 25): their pages must be the render of the cells committed so far, but
may lack cells. Remove a matrix from here when its last cell is committed."""


CELL_HEADER_LINES = ("- cells ran on:", "- numerics:", "- cells ran with:", "- cells:")
"""Header lines that describe the committed cells (not the process that rendered the page: commit, date, machine)."""


def _rendered_claims(text: str) -> list[str]:
    """What a page says of its cells: every table line and the header lines about the cells."""
    return [line for line in text.splitlines() if line.startswith(("|", *CELL_HEADER_LINES))]


@pytest.mark.parametrize("matrix_file", STUDY_MATRICES, ids=lambda path: path.stem)
def test_committed_study_page_is_the_render_of_the_committed_results(matrix_file, tmp_path, monkeypatch):
    """`trl-qtuning bench --config <the committed matrix> --table-only`, pointed at a copy of the committed cell
    results, writes the committed page's tables and its lines about the cells, line for line."""
    monkeypatch.chdir(ROOT)  # the matrices name their inputs relative to the repository root
    matrix = load_matrix(matrix_file, check_inputs=False)
    page = matrix.output_dir / tables.RESULTS_MD
    in_progress = matrix_file.stem in IN_PROGRESS
    if not page.is_file():
        pytest.fail(f"{page} is missing: every study commits its page (`trl-qtuning bench --config "
                    f"{matrix_file.relative_to(ROOT)} --table-only` renders it from the cells committed so far)")
    copy = tmp_path / "study"
    shutil.copytree(matrix.output_dir, copy)  # render into a copy: the committed page stays as it is
    settings = yaml.safe_load(matrix_file.read_text())
    settings.update(output_dir=str(copy), report_to="none")  # nothing else changes: the cells' fingerprints hold
    config = tmp_path / matrix_file.name
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    from trl_qtuning.bench import figures

    monkeypatch.setattr(figures, "draw_curves", lambda *args, **kwargs: [])  # the tables are the claim here
    assert bench_main(["--config", str(config), "--table-only"]) == 0
    rendered = (copy / tables.RESULTS_MD).read_text()
    finished = re.search(r"^- cells: (\d+) of (\d+) cells finished", rendered, re.M)
    assert finished, "the page does not say how many cells finished"
    assert in_progress or finished.group(1) == finished.group(2), (
        "a planned cell has no committed result, or a committed one no longer belongs to its matrix (stale)"
    )
    assert "stale" not in rendered.split("## ")[0], "a committed cell no longer belongs to its matrix (stale)"
    assert _rendered_claims(rendered) == _rendered_claims(page.read_text()), (
        f"{page} is not what the committed results render to: run "
        f"`trl-qtuning bench --config {matrix_file.relative_to(ROOT)} --table-only` and commit the page"
    )


QUOTE = re.compile(
    r"<!-- quoted from (?P<page>\S+): (?P<section>[^,>]+), table (?P<n>\d+) -->\n(?P<body>.*?)<!-- end of quote -->", re.S
)


def _tables_of_section(page_text: str, section: str) -> list[list[str]]:
    """The tables (runs of consecutive table lines) under the `## <section> ...` heading of a study page."""
    tables_found: list[list[str]] = []
    inside, previous_was_table = False, False
    for line in page_text.splitlines():
        if line.startswith("## "):
            heading = line[3:]
            inside, previous_was_table = heading == section or heading.startswith(f"{section} ("), False
            continue
        is_table = line.startswith("|")
        if inside and is_table:
            if not previous_was_table:
                tables_found.append([])
            tables_found[-1].append(line)
        previous_was_table = is_table
    return tables_found


def current_quote(page: str, section: str, n: int) -> str:
    """Table ``n`` (1-based) of ``section`` on the committed ``page``, as docs/results.md must quote it."""
    found = _tables_of_section((ROOT / page).read_text(), section)
    if not 1 <= n <= len(found):
        raise LookupError(f"{page} has {len(found)} table(s) under a '## {section}' heading, not {n}")
    return "\n".join(found[n - 1])


def test_results_page_quotes_the_study_pages_verbatim():
    """docs/results.md quotes the study's tables between `<!-- quoted from PAGE: SECTION, table N -->` and
    `<!-- end of quote -->`; each quote is that table of the committed page exactly, and every committed study page
    is quoted (a cell that lands and changes a number makes this fail until docs/results.md is updated)."""
    text = (ROOT / "docs" / "results.md").read_text()
    quotes = list(QUOTE.finditer(text))
    assert text.count("<!-- quoted from") == text.count("<!-- end of quote -->") == len(quotes), (
        "docs/results.md has a quote marker this test does not read: write `<!-- quoted from PAGE: SECTION, table N -->`"
        " on its own line, the table, then `<!-- end of quote -->`"
    )
    in_progress = {f"{yaml.safe_load(path.read_text())['output_dir']}/results.md"
                   for path in STUDY_MATRICES if path.stem in IN_PROGRESS}  # linked, not quoted, until they finish
    committed = {path.relative_to(ROOT).as_posix() for path in (ROOT / "docs" / "study").glob("*/results.md")}
    committed -= in_progress
    quoted_pages = {m["page"] for m in quotes}
    assert committed <= quoted_pages, "docs/results.md quotes no table of " + ", ".join(sorted(committed - quoted_pages))
    for m in quotes:
        expected = current_quote(m["page"], m["section"], int(m["n"]))
        assert "\n".join(line for line in m["body"].splitlines() if line.startswith("|")) == expected, (
            f"docs/results.md quotes {m['page']} ({m['section']}, table {m['n']}) as it no longer is; "
            f"the page now has:\n{expected}"
        )


def test_section_tables_are_found_by_heading_and_order():
    page = "# t\n## Equal steps (24)\n| a |\n|---|\n\ntext\n\n| b |\n## Equal compute\n| c |\n"
    assert _tables_of_section(page, "Equal steps") == [["| a |", "|---|"], ["| b |"]]
    assert _tables_of_section(page, "Equal compute") == [["| c |"]]
    assert _tables_of_section(page, "Curves") == []
    assert _tables_of_section(page + "## Equal steps, noisy\n| d |\n", "Equal steps") == [["| a |", "|---|"], ["| b |"]]
