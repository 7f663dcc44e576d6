"""The fill-rule study's cross-noise control (issue 25; docs/results.md#noise-aware-fill-rules).

Each noise moves only its own contrast (validated on the full-data cells): swapped answers move the Q-A contrast,
carried slips the arithmetic contrast. A fill rule also changes *which* samples train, and that can move a contrast
whatever the noise (at seed 0, q1_last raised the arithmetic contrast over the paper's fill on the swap matrix too,
where the swap does not move it). So, per seed, for a method M against a baseline B and a contrast C:

* ``on its noise``: M - B on the matrix whose noise moves C;
* ``on the other noise``: M - B on the other matrix (the noise-independent part of M's effect on C);
* ``protection``: the first minus the second, seed by seed. M keeps the noise out of C only where this interval
  excludes 0.

All three come with the bench's paired 95% t interval (``trl_qtuning.bench.paired.paired_difference``; higher is
better for a contrast). Prints one Markdown table; reads only committed ``result.json`` files.

    python benchmarks/study/fill_verdict.py                     # docs/study/fill-swap30 and fill-numbers30
    python benchmarks/study/fill_verdict.py --write             # and writes docs/study/fill-verdict.md
    python benchmarks/study/fill_verdict.py --study-dir DIR     # DIR/fill-swap30 and DIR/fill-numbers30

The study's commit loop (benchmarks/study/commit_results.sh) rewrites the page after every cell that lands;
tests/test_fill_verdict.py checks that the committed page is the render of the committed cells.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trl_qtuning.bench.paired import paired_difference
from trl_qtuning.bench.results import read_result

ROOT = Path(__file__).resolve().parents[2]
MATRICES = {"swap30": "eval/contrast_swap", "numbers30": "eval/contrast_numbers"}
"""Each noisy matrix and the contrast its noise moves."""
CONTRAST_NAMES = {"eval/contrast_swap": "Q-A contrast", "eval/contrast_numbers": "arithmetic contrast"}
METHODS = ("qtuning", "qtuning-q1-last", "qtuning-least-suspect")
BASELINES = ("random-random", "qtuning")


def read_cells(study_dir: Path) -> dict[str, dict[str, dict[int, dict[str, float]]]]:
    """``{matrix: {method: {seed: metrics}}}`` of the finished cells of the methods and baselines compared."""
    cells: dict[str, dict[str, dict[int, dict[str, float]]]] = {}
    for matrix in MATRICES:
        for cell_dir in sorted((study_dir / f"fill-{matrix}").glob("*_seed*")):
            result = read_result(cell_dir)
            if result is not None and result["method"] in (*METHODS, *BASELINES):
                cells.setdefault(matrix, {}).setdefault(result["method"], {})[int(result["seed"])] = result["metrics"]
    return cells


def _per_seed(cells: dict, matrix: str, method: str, baseline: str, metric: str) -> dict[int, float]:
    mine, theirs = cells.get(matrix, {}).get(method, {}), cells.get(matrix, {}).get(baseline, {})
    return {seed: mine[seed][metric] - theirs[seed][metric] for seed in sorted(set(mine) & set(theirs))}


def _interval(differences: dict[int, float]) -> dict | None:
    """The per-seed differences' own mean and t interval (paired against 0)."""
    return paired_difference(differences, dict.fromkeys(differences, 0.0), lower_is_better=False) if differences else None


def _fmt(d: dict | None) -> str:
    if d is None:
        return "-"
    if d["low"] is None:
        return f"{d['mean']:+.4f} (n={len(d['seeds'])})"
    return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] {d['verdict']}"


def verdict_rows(cells: dict) -> list[list[str]]:
    """One row per (contrast, method, baseline): on its noise, on the other noise, protection."""
    rows = []
    for matrix, metric in MATRICES.items():
        other = next(m for m in MATRICES if m != matrix)
        for method in METHODS:
            for baseline in BASELINES:
                if baseline == method:
                    continue
                own = _per_seed(cells, matrix, method, baseline, metric)
                control = _per_seed(cells, other, method, baseline, metric)
                protection = paired_difference(own, control, lower_is_better=False) if own and control else None
                rows.append([CONTRAST_NAMES[metric], f"{method} - {baseline}",
                             *(_fmt(d) for d in (_interval(own), _interval(control), protection))])
    return rows


PAGE = "fill-verdict.md"
"""The page ``--write`` writes in the study folder (docs/results.md quotes its table)."""
SECTION = "Cross-noise control"
"""The heading of the page's table: docs/results.md quotes it as `fill-verdict.md: Cross-noise control, table 1`."""


def render(study_dir: Path) -> str:
    """The page: what the table is, and the table of the cells committed so far."""
    headers = ["contrast", "method - baseline", "on its noise [95% CI]", "on the other noise [95% CI]",
               "protection: its noise - other [95% CI]"]
    cells = read_cells(study_dir)
    seeds = {matrix: sorted({s for runs in methods.values() for s in runs}) for matrix, methods in cells.items()}
    lines = [
        "# Fill-rule study: the cross-noise control",
        "",
        "Written by `python benchmarks/study/fill_verdict.py --write` from the committed cells of "
        "[fill-swap30](fill-swap30/results.md) and [fill-numbers30](fill-numbers30/results.md) (seeds with cells: "
        + ", ".join(f"{m} {seeds.get(m, [])}" for m in MATRICES) + "). Each noise moves only its own contrast, so "
        "each noisy matrix is the other's control. Per seed: a method's contrast minus the baseline's on the matrix "
        "whose noise moves that contrast (on its noise), the same on the other matrix (on the other noise), and the "
        "first minus the second (protection: what the method keeps the noise out of the contrast, apart from the "
        "samples it picks). Mean over seeds and paired 95% Student t interval; higher is better; `better` / `worse` "
        "only where the interval excludes 0.",
        "",
        f"## {SECTION}",
        "",
        "| " + " | ".join(headers) + " |",
        "|---|---|" + "---:|" * (len(headers) - 2),
        *("| " + " | ".join(row) + " |" for row in verdict_rows(cells)),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study-dir", type=Path, default=ROOT / "docs" / "study")
    parser.add_argument("--write", action="store_true", help=f"also write STUDY_DIR/{PAGE}")
    args = parser.parse_args(argv)
    page = render(args.study_dir)
    print(page, end="")
    if args.write:
        (args.study_dir / PAGE).write_text(page, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
