"""benchmarks/study/fill_verdict.py: the cross-noise control of the fill-rule study, on hand-made cells."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("scipy")

ROOT = Path(__file__).resolve().parents[1]


def _verdict():
    spec = importlib.util.spec_from_file_location("fill_verdict", ROOT / "benchmarks" / "study" / "fill_verdict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cell(study: Path, matrix: str, method: str, seed: int, swap: float, numbers: float, status: str = "complete"):
    folder = study / f"fill-{matrix}" / f"{method}_r25x50_seed{seed}"
    folder.mkdir(parents=True)
    metrics = {"eval/contrast_swap": swap, "eval/contrast_numbers": numbers}
    (folder / "result.json").write_text(json.dumps({"status": status, "method": method, "seed": seed, "metrics": metrics}))


def test_protection_is_the_difference_on_its_noise_minus_on_the_other(tmp_path, capsys):
    # Q-A contrast (swap, numbers): the fill beats the paper's fill by 0.10 and 0.20 on swap30 (seeds 0, 1) and by
    # 0.01 and 0.03 on numbers30, so its protection is 0.09 and 0.17 (mean 0.13). Arithmetic contrast: +1.0 on both
    # matrices at seed 0 and +2.0 at seed 1, so no protection at all (0, 0).
    for seed, (qa_swap, qa_numbers, ar) in enumerate([(0.10, 0.01, 1.0), (0.20, 0.03, 2.0)]):
        _cell(tmp_path, "swap30", "qtuning", seed, 0.6, 5.0)
        _cell(tmp_path, "swap30", "qtuning-q1-last", seed, 0.6 + qa_swap, 5.0 + ar)
        _cell(tmp_path, "numbers30", "qtuning", seed, 0.7, 4.0)
        _cell(tmp_path, "numbers30", "qtuning-q1-last", seed, 0.7 + qa_numbers, 4.0 + ar)
    _cell(tmp_path, "numbers30", "qtuning-q1-last", 2, 9.0, 9.0, status="running")  # unfinished: not read
    module = _verdict()
    rows = {(r[0], r[1]): r[2:] for r in module.verdict_rows(module.read_cells(tmp_path))}
    own, other, protection = rows[("Q-A contrast", "qtuning-q1-last - qtuning")]
    assert own.startswith("+0.1500 [") and other.startswith("+0.0200 [") and protection.startswith("+0.1300 [")
    # t(0.975, 1) * sem of (0.09, 0.17) = 12.706 * 0.04 = 0.5082: the interval crosses 0 with two seeds
    assert protection == "+0.1300 [-0.3782, +0.6382] no difference"
    assert rows[("arithmetic contrast", "qtuning-q1-last - qtuning")][2].startswith("+0.0000 [+0.0000, +0.0000]")
    assert rows[("Q-A contrast", "qtuning-q1-last - random-random")] == ["-", "-", "-"]  # no random-random cells
    assert module.main(["--study-dir", str(tmp_path)]) == 0
    assert "| Q-A contrast | qtuning-q1-last - qtuning | +0.1500" in capsys.readouterr().out


def test_committed_verdict_page_is_the_render_of_the_committed_cells():
    """docs/study/fill-verdict.md is what the script writes from the committed cells (the commit loop rewrites it
    after each cell that lands): no number on it was edited by hand or left stale."""
    module = _verdict()
    page = ROOT / "docs" / "study" / module.PAGE
    assert page.is_file(), f"{page} is missing: python benchmarks/study/fill_verdict.py --write"
    assert page.read_text() == module.render(ROOT / "docs" / "study")
