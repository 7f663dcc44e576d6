"""One vocabulary (issue 26): quadrant names, decision names, the Q-Tuning field list and the ledger's file names are
each defined in one place, and the package reads them from there."""

from __future__ import annotations

import ast
import dataclasses
import fnmatch
from pathlib import Path

import pytest
import torch

from trl_qtuning.core import SelectionParams, assign_quadrants
from trl_qtuning.vocabulary import DECISIONS, QUADRANTS, TRAINED_DECISIONS, Decision

PACKAGE = Path(__file__).resolve().parents[1] / "trl_qtuning"


def _string_constants(path: Path) -> list[str]:
    """The string literals of a module (f-string pieces included), docstrings left out: names, not prose."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }  # fmt: skip
    return [
        node.value for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]  # fmt: skip


def _where(predicate, home: str = "vocabulary.py") -> dict[str, set[str]]:
    """``{module path: the matching literals}`` over the package, outside the module that defines them."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        hits = {s for s in _string_constants(path) if predicate(s)}
        if hits and rel != home:
            found[rel] = hits
    return found


def test_the_names_stay_the_ones_ledgers_and_pages_already_hold():
    """A change here changes written ledgers, metric names and the committed study pages."""
    assert DECISIONS == ("kept", "token_pruned", "filled", "dropped", "trimmed", "invalid")
    assert TRAINED_DECISIONS == ("kept", "token_pruned", "filled")
    assert [(q.code, q.key, q.label, q.short) for q in QUADRANTS] == [
        (0, "mid_band", "mid band", "mid band / none"),
        (1, "q1", "Q1 harmful noise", "Q1 harmful noise"),
        (2, "q2", "Q2 valuable misconception", "Q2 misconception"),
        (3, "q3", "Q3 redundant knowledge", "Q3 redundant"),
        (4, "q4", "Q4 calibration data", "Q4 calibration"),
    ]


def test_quadrant_codes_are_the_cores():
    """Q1 is high PPL and high entropy, Q2 high PPL and low entropy, and so on, as the core assigns them."""
    thresholds = {name: torch.tensor(value) for name, value in
                  {"ppl_lo": 2.0, "ppl_hi": 4.0, "ent_lo": 2.0, "ent_hi": 4.0}.items()}  # fmt: skip
    corners = {"q1": (5.0, 5.0), "q2": (5.0, 1.0), "q3": (1.0, 1.0), "q4": (1.0, 5.0), "mid_band": (3.0, 3.0)}
    ppl, ent = (torch.tensor([corners[q.key][i] for q in QUADRANTS]) for i in (0, 1))
    assert assign_quadrants(ppl, ent, thresholds).tolist() == [q.code for q in QUADRANTS]


def test_quadrant_names_are_written_only_in_the_vocabulary():
    names = {name for q in QUADRANTS for name in (q.key, q.label, q.short)}
    assert _where(names.__contains__) == {}


def test_decision_names_are_written_only_in_the_vocabulary():
    """Other names that happen to be spelt like a decision (a count, a column, a field) are listed with what they
    are; a decision compared or listed anywhere else fails."""
    not_decisions = {
        "step/metrics.py": {"kept", "filled", "trimmed", "invalid"},  # step_sums keys: sample counts
        "tracking/reports.py": {"kept", "dropped"},  # the selection table's column, the summary's count
        "core/triage.py": {"filled", "trimmed", "invalid"},  # TriageResult's mask fields
        "tracking/recorder.py": {"kept"},  # the per-step group-by's boolean column (trained or not)
    }
    found = _where(set(DECISIONS).__contains__)
    assert {path: hits - not_decisions.get(path, set()) for path, hits in found.items()} == {
        path: set() for path in found
    }


def test_the_ledger_folder_and_shard_names_are_written_only_in_the_ledger_module():
    from trl_qtuning.ledger import LEDGER_DIRNAME, SHARD_GLOB, shard_name

    assert fnmatch.fnmatch(shard_name(3, 12), SHARD_GLOB) and shard_name(3, 12) == "ledger-rank3-000012.parquet"
    assert fnmatch.fnmatch(shard_name(3, 12), shard_name(3, "*"))
    assert not fnmatch.fnmatch(shard_name(3, 12), shard_name(1, "*"))
    assert _where(lambda s: "ledger-rank" in s, home="ledger.py") == {}
    # The setting `qtuning_ledger` shares the folder's name: its validation, the bench's matrix and the summary name it.
    setting = {"config.py", "bench/matrix.py", "tracking/reports.py"}
    assert set(_where(LEDGER_DIRNAME.__eq__, home="ledger.py")) <= setting


def test_every_qtuning_field_is_tagged_or_says_why_not():
    from trl import SFTConfig

    from trl_qtuning.config import LABEL_FLAGS, METHOD_FIELDS, QTUNING_FIELDS, UNTAGGED_FIELDS, QTuningConfig

    added = {f.name for f in dataclasses.fields(QTuningConfig)} - {f.name for f in dataclasses.fields(SFTConfig)}
    assert set(QTUNING_FIELDS) == added
    assert sorted([*METHOD_FIELDS, *UNTAGGED_FIELDS]) == sorted(QTUNING_FIELDS)  # each once, in one of the two
    defaults = {f.name: f.default for f in dataclasses.fields(QTuningConfig)}
    for name, value, _ in LABEL_FLAGS:
        assert name in METHOD_FIELDS and value != defaults[name], name
    assert {f.name for f in dataclasses.fields(SelectionParams)} <= set(QTUNING_FIELDS)


@pytest.mark.parametrize("settings", [{}, {"eu_plane": "decorrelated", "fill_rule": "q1_last", "neighbor_lambda": 1}])
def test_tags_and_selection_params_are_read_from_the_field_list(tmp_path, settings):
    from tests.trainer_helpers import tiny_config

    from trl_qtuning.config import METHOD_FIELDS
    from trl_qtuning.tracking.callback import run_tags

    args = tiny_config(tmp_path, **settings)
    tags = run_tags(args)
    assert [t for t in tags if t not in ("qtuning.method", "qtuning.version")] == [f"qtuning.{n}" for n in METHOD_FIELDS]
    assert all(tags[f"qtuning.{name}"] == str(getattr(args, name)) for name in METHOD_FIELDS)
    params = args.selection_params()
    for f in dataclasses.fields(SelectionParams):
        assert getattr(params, f.name) == getattr(args, f.name), f.name
    assert type(params.neighbor_lambda) is float and type(params.triage_max_iter) is int


def test_a_decision_constant_is_a_plain_string():
    """Ledger columns, JSON and f-strings see the same bytes as before (no enum repr)."""
    assert all(type(getattr(Decision, name)) is str for name in vars(Decision) if name.isupper())
