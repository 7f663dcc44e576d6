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
    python benchmarks/study/fill_verdict.py --study-dir DIR     # DIR/fill-swap30 and DIR/fill-numbers30
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
    """``{matrix: {method: {seed: metrics}}}`` of the finished cells (the base cell left out)."""
    cells: dict[str, dict[str, dict[int, dict[str, float]]]] = {}
    for matrix in MATRICES:
        for cell_dir in sorted((study_dir / f"fill-{matrix}").glob("*_seed*")):
            result = read_result(cell_dir)
            if result is not None:
                cells.setdefault(matrix, {}).setdefault(result["method"], {})[int(result["seed"])] = result["metrics"]
    return cells


def _per_seed(cells: dict, matrix: str, method: str, baseline: str, metric: str) -> dict[int, float]:
    mine, theirs = cells.get(matrix, {}).get(method, {}), cells.get(matrix, {}).get(baseline, {})
    return {seed: mine[seed][metric] - theirs[seed][metric] for seed in sorted(set(mine) & set(theirs))}


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
                differences = [paired_difference(own, {s: 0.0 for s in own}, lower_is_better=False) if own else None,
                               paired_difference(control, {s: 0.0 for s in control}, lower_is_better=False)
                               if control else None,
                               paired_difference(own, control, lower_is_better=False) if own and control else None]
                rows.append([CONTRAST_NAMES[metric], f"{method} - {baseline}", *(_fmt(d) for d in differences)])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study-dir", type=Path, default=ROOT / "docs" / "study")
    args = parser.parse_args(argv)
    headers = ["contrast", "method - baseline", "on its noise [95% CI]", "on the other noise [95% CI]",
               "protection: its noise - other [95% CI]"]
    body = verdict_rows(read_cells(args.study_dir))
    print("| " + " | ".join(headers) + " |")
    print("|---|---|" + "---:|" * (len(headers) - 2))
    for row in body:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
