"""``trl-qtuning bench``: a tiny matrix end to end (MLflow on a temporary SQLite store), resuming, the table,
``--table-only``, and one-line errors for bad matrices."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trl_qtuning import bench
from trl_qtuning.cli.main import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "bench"
HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
CELL_IDS = ["base", "full/seed0", "qtuning@50x70/seed0"]


def _write_matrix(path: Path, matrix: dict) -> Path:
    path.write_text(yaml.safe_dump(matrix, sort_keys=False))
    return path


def _tiny_matrix(root: Path, model_dir: Path, **changes) -> dict:
    """recipes/bench/tiny.yaml pointed at a saved tiny model and a temporary output folder."""
    matrix = yaml.safe_load((RECIPES / "tiny.yaml").read_text())
    matrix.update(model=str(model_dir), output_dir=str(root / "out"), report_to="mlflow" if HAS_MLFLOW else "none")
    matrix.update(changes)
    return matrix


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from trl_qtuning.testing import save_tiny_model

    with contextlib.redirect_stderr(io.StringIO()):
        return save_tiny_model(tmp_path_factory.mktemp("bench_model") / "tiny")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, model_dir):
    """The tiny recipe run once: base + full + qtuning (2 steps each), evaluated, logged to a SQLite MLflow store."""
    root = tmp_path_factory.mktemp("bench")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    matrix = _tiny_matrix(root, model_dir, tracking_uri=uri, experiment="bench-test")
    config = _write_matrix(root / "matrix.yaml", matrix)
    env_before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TAGS")}
    code, out, err = _run(["bench", "--config", str(config)])
    env_after = {k: os.environ.get(k) for k in env_before}
    assert code == 0, f"bench failed:\n{out}\n{err}"
    return {"root": root, "config": config, "out_dir": root / "out", "uri": uri, "stdout": out,
            "env": (env_before, env_after)}  # fmt: skip


def _first_table(text: str) -> list[str]:
    """The rows of the first Markdown table in ``text`` (the equal-steps table; paired tables follow it)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return [line for line in lines[start:end] if line.startswith("| ")]


def _cell_results(out_dir: Path) -> dict[str, dict]:
    results = {}
    for path in sorted(out_dir.glob("*/result.json")):
        result = json.loads(path.read_text())
        results[result["cell_id"]] = result
    return results


# ----------------------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------------------


def test_tiny_matrix_end_to_end(first_run):
    out_dir = first_run["out_dir"]
    results = _cell_results(out_dir)
    assert sorted(results) == sorted(CELL_IDS)
    assert (out_dir / "qtuning_r50x70_seed0" / "result.json").is_file() and (out_dir / "full_seed0").is_dir()
    for cell_id, result in results.items():
        assert result["status"] == "complete"
        for key in ("eval/nll", "eval/gsm8k_em", "eval/arc_easy_acc", "eval/arc_easy_acc_norm"):
            assert key in result["metrics"], (cell_id, key)
        assert result["metrics"]["eval/gsm8k_n"] == 4 and result["metrics"]["eval/arc_easy_n"] == 6
        assert result["eval_seconds"] > 0
        assert set(result["versions"]) >= {"torch", "transformers", "trl"} and "commit" in result["git"]
        assert result["machine"]["cpu"] and result["machine"]["cpu_count"] >= 1
    assert f"- cells ran on: {results['base']['machine']['cpu']} ({len(results)} cells)" in (out_dir / "results.md").read_text()
    assert results["base"]["train_seconds"] is None and results["base"]["global_step"] == 0
    qt, full = results["qtuning@50x70/seed0"], results["full/seed0"]
    assert qt["global_step"] == 2 and full["global_step"] == 2 and qt["train_seconds"] > 0
    assert qt["budget"] == {"sample_keep_ratio": 0.5, "token_keep_ratio": 0.7} and full["budget"] is None
    assert qt["realised"]["sample_keep_ratio"] == pytest.approx(0.5)
    assert 0 < qt["realised"]["label_token_share"] < 1
    assert full["realised"] == {"sample_keep_ratio": 1.0, "label_token_share": 1.0}
    assert qt["metrics"]["eval/nll"] != results["base"]["metrics"]["eval/nll"]  # training changed the model

    # the table: stdout, results.md (with its header) and results.json; rows in config order, base first
    table_md = (out_dir / "results.md").read_text()
    for text in (first_run["stdout"], table_md):
        rows = [line for line in _first_table(text) if "method" not in line]
        assert [row.split("|")[1].strip() for row in rows] == ["base", "full", "qtuning"]
        assert all("±" in row for row in rows)
        assert "50% x 70%" in text and "(untrained)" in text
    assert "commit:" in table_md and "machine:" in table_md and "torch threads" in table_md
    assert "source: arithmetic" in table_md  # the matrix file's content
    summary = json.loads((out_dir / "results.json").read_text())
    assert [row["method"] for row in summary["rows"]] == ["base", "full", "qtuning"]
    assert summary["missing"] == [] and len(summary["cells"]) == 3
    assert first_run["env"][0] == first_run["env"][1]  # the bench restores the MLflow environment variables


@pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow is not installed")
def test_one_mlflow_run_per_cell_with_eval_metrics(first_run):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=first_run["uri"])
    experiment = client.get_experiment_by_name("bench-test")
    assert experiment is not None
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])
            if run.data.tags.get("bench.summary") != "true"}  # the results page's run is checked elsewhere
    assert sorted(runs) == sorted(CELL_IDS)
    results = _cell_results(first_run["out_dir"])
    for cell_id, run in runs.items():
        assert run.info.run_id == results[cell_id]["mlflow"]["run_id"]
        assert run.info.status == "FINISHED"
        assert run.data.metrics["eval/nll"] == pytest.approx(results[cell_id]["metrics"]["eval/nll"])
        assert "eval/arc_easy_acc" in run.data.metrics and "eval/gsm8k_em" in run.data.metrics
        assert run.data.tags["bench.cell"] == cell_id
    for cell_id in ("full/seed0", "qtuning@50x70/seed0"):  # eval metrics went into the training's own run
        metrics = runs[cell_id].data.metrics
        assert "train_seconds" in metrics and "loss" in metrics
    assert "qtuning/sample_keep_ratio" in runs["qtuning@50x70/seed0"].data.metrics
    assert runs["qtuning@50x70/seed0"].data.tags["bench.budget"] == "50x70"


# ----------------------------------------------------------------------------------------------------------------------
# Resuming, --only, --table-only
# ----------------------------------------------------------------------------------------------------------------------


def _forbid_running(monkeypatch):
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args[1].id)
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(bench.runner, "run_train_cell", refuse)
    monkeypatch.setattr(bench.runner, "run_base_cell", refuse)
    return calls


def test_rerun_skips_finished_cells(first_run, monkeypatch):
    out_dir = first_run["out_dir"]
    stamps = {p: p.stat().st_mtime_ns for p in out_dir.glob("*/result.json")}
    calls = _forbid_running(monkeypatch)
    code, out, err = _run(["bench", "--config", str(first_run["config"])])
    assert code == 0, err
    assert calls == []
    assert out.count("skipped (done)") == 3
    assert {p: p.stat().st_mtime_ns for p in out_dir.glob("*/result.json")} == stamps

    code, out, err = _run(["bench", "--config", str(first_run["config"]), "--only", "full"])
    assert code == 0 and out.count("skipped (done)") == 1 and calls == []
    code, out, err = _run(["bench", "--config", str(first_run["config"]), "--only", "nosuch"])
    assert code == 2 and "--only nosuch" in err and calls == []


def test_unfinished_cell_is_cleaned_and_rerun(first_run, tmp_path, monkeypatch):
    """A cell folder without result.json (an interrupted cell) is emptied and run again; finished ones are not."""
    import shutil

    out_dir = tmp_path / "out"
    shutil.copytree(first_run["out_dir"], out_dir)
    (out_dir / "full_seed0" / "result.json").unlink()
    (out_dir / "full_seed0" / "partial.bin").write_text("left by a killed run")
    matrix = yaml.safe_load(first_run["config"].read_text())
    config = _write_matrix(tmp_path / "matrix.yaml", {**matrix, "output_dir": str(out_dir)})

    ran = []

    def fake_train_cell(matrix, cell, data, cell_dir, targets=None, progress=None):
        assert not (cell_dir / "partial.bin").exists() and not any(cell_dir.iterdir())
        ran.append(cell.id)
        return bench.cell_record(matrix, cell, metrics={"eval/nll": 1.0}, train_seconds=1.0, eval_seconds=1.0,
                                  global_step=2, realised={"sample_keep_ratio": 1.0, "label_token_share": 1.0})  # fmt: skip

    monkeypatch.setattr(bench.runner, "run_train_cell", fake_train_cell)
    monkeypatch.setattr(bench.runner, "run_base_cell", lambda *a: pytest.fail("base was finished"))
    code, out, err = _run(["bench", "--config", str(config)])
    assert code == 0, err
    assert ran == ["full/seed0"]
    assert out.count("skipped (done)") == 2 and "cleaning it and running again" in out
    assert json.loads((out_dir / "full_seed0" / "result.json").read_text())["metrics"] == {"eval/nll": 1.0}


def test_table_only_rerenders_without_running(first_run, monkeypatch):
    out_dir = first_run["out_dir"]
    (out_dir / "results.md").unlink()
    calls = _forbid_running(monkeypatch)
    code, out, err = _run(["bench", "--config", str(first_run["config"]), "--table-only"])
    assert code == 0, err
    assert calls == [] and "skipped" not in out
    assert "| qtuning" in out and "| full" in out and "| base" in out
    assert "| qtuning" in (out_dir / "results.md").read_text()


def test_table_mean_and_std_over_seeds(tmp_path, model_dir):
    """Rows aggregate seeds: mean ± sample std; a missing cell is reported, not fatal."""
    matrix = _tiny_matrix(tmp_path, model_dir, seeds=[0, 1, 2], report_to="none")
    config = _write_matrix(tmp_path / "matrix.yaml", matrix)
    loaded = bench.load_matrix(config, check_inputs=False)
    values = {0: (1.0, 0.25), 1: (2.0, 0.75)}  # seed 2 of each row is missing
    for cell in bench.plan_cells(loaded):
        if cell.seed not in values and not cell.is_base:
            continue
        nll, em = values.get(cell.seed, (3.0, 0.5))
        cell_dir = loaded.output_dir / cell.dirname
        cell_dir.mkdir(parents=True)
        record = bench.cell_record(loaded, cell, metrics={"eval/nll": nll, "eval/gsm8k_em": em},
                                    train_seconds=None if cell.is_base else 10.0 + (cell.seed or 0), eval_seconds=1.0,
                                    realised={"sample_keep_ratio": 0.5, "label_token_share": 0.4})  # fmt: skip
        bench.write_json(cell_dir / bench.RESULT_FILE, record)
    (loaded.output_dir / "qtuning_r50x70_seed2").mkdir()  # an unfinished cell: no result.json
    code, out, err = _run(["bench", "--config", str(config), "--table-only"])
    assert code == 0, err
    rows = {line.split("|")[1].strip(): line for line in _first_table(out)}
    assert "1.5000 ± 0.7071" in rows["full"] and "50.0 ± 35.4" in rows["qtuning"]
    assert "3.0000 ± -" in rows["base"]
    assert rows["full"].split("|")[3].strip() == "2" and rows["base"].split("|")[3].strip() == "1"
    assert "missing: full/seed2, qtuning@50x70/seed2" in out
    summary = json.loads((loaded.output_dir / "results.json").read_text())
    full = next(row for row in summary["rows"] if row["method"] == "full")
    assert full["n"] == 2 and full["metrics"]["eval/nll"]["std"] == pytest.approx(0.70710678)
    assert full["train_seconds"]["mean"] == pytest.approx(10.5)


def test_row_statistics_read_finite_values_only():
    """A row's mean and sample std (n - 1) read the finite values of its cells: a missing or infinite value is left
    out, one value has no std, none is no statistic; steps and compute stay whole numbers."""
    import pandas as pd

    from trl_qtuning.bench.tables import _summaries

    frame = pd.DataFrame({"row": [0, 0, 0, 1], "kind": ["cell"] * 4, "train_seconds": [1.0, None, float("inf"), 2.0],
                          "step": [4, 6, None, None]})  # fmt: skip
    stats = _summaries(frame, ["row", "kind"])
    assert stats[0, "cell"]["train_seconds"] == {"mean": 1.0, "std": None, "values": [1.0]}
    assert stats[0, "cell"]["step"] == {"mean": 5.0, "std": pytest.approx(2**0.5), "values": [4, 6]}
    assert all(isinstance(v, int) for v in stats[0, "cell"]["step"]["values"]) and stats[1, "cell"]["step"] is None


def test_cell_names():
    cell = bench.Cell("qtuning", (0.25, 0.5), 0)
    assert cell.id == "qtuning@25x50/seed0" and cell.dirname == "qtuning_r25x50_seed0"
    assert bench.Cell("qtuning", (0.125, 0.7), 2).dirname == "qtuning_r12.5x70_seed2"
    assert bench.Cell("full", None, 1).id == "full/seed1" and bench.Cell("full", None, 1).dirname == "full_seed1"
    assert bench.budget_label((0.25, 0.5)) == "25% x 50%" and bench.budget_label(None) == "-"


@pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow is not installed")
def test_mlflow_outage_does_not_stop_the_bench(tmp_path, model_dir):
    """Nothing listens on the tracking URI: the cell still trains, evaluates and writes its result."""
    matrix = _tiny_matrix(
        tmp_path, model_dir, tracking_uri="http://127.0.0.1:9", methods={"full": {"qtuning_enabled": False}},
        eval={"nll": True, "base": False},
    )  # fmt: skip
    config = _write_matrix(tmp_path / "matrix.yaml", matrix)
    code, _out, err = _run(["bench", "--config", str(config)])
    assert code == 0, err
    result = json.loads((tmp_path / "out" / "full_seed0" / "result.json").read_text())
    assert "eval/nll" in result["metrics"] and result["mlflow"]["run_id"] is None
    assert "pending" in err or "unreachable" in err


# ----------------------------------------------------------------------------------------------------------------------
# A study: learning curves, equal compute, matched token budgets, label noise with its audit, paired intervals
# ----------------------------------------------------------------------------------------------------------------------

STUDY_METHODS = {
    "full": {"qtuning_enabled": False},
    "qtuning": {"eu_plane": "decorrelated"},
    "random-matched": {"sample_policy": "random", "token_policy": "random", "match_label_tokens": "qtuning"},
}


def _study_matrix(root: Path, model_dir: Path, **changes) -> dict:
    matrix = _tiny_matrix(
        root, model_dir, experiment="bench-study",
        data={"train": {"source": "arithmetic", "size": 32, "seed": 0, "label_noise": 0.5}, "heldout_size": 8},
        training={"max_steps": 4, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                  "learning_rate": 1.0e-3, "lr_scheduler_type": "constant", "max_length": 64, "bf16": False,
                  "qtuning_ledger": "summary"},
        eval={"nll": {"batch_size": 8, "max_length": 64}, "every_steps": 2,
              "transfer": {"source": "arithmetic", "size": 8, "noisy_share": 0.0, "max_length": 64}},
        methods=STUDY_METHODS, budgets=[[0.25, 0.5]], seeds=[0, 1],
        equal_compute={"reference": "full", "max_steps": 40},
    )  # fmt: skip
    matrix.update(changes)
    return matrix


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, model_dir):
    root = tmp_path_factory.mktemp("study")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    config = _write_matrix(root / "study.yaml", _study_matrix(root, model_dir, tracking_uri=uri))
    code, out, err = _run(["bench", "--config", str(config)])
    assert code == 0, f"bench failed:\n{out}\n{err}"
    return {"root": root, "config": config, "out_dir": root / "out", "uri": uri, "stdout": out}


def test_study_prints_progress_with_an_eta_while_a_cell_trains(study_run):
    """Every trained cell says step i/N with its ETA (and the bench's) while it trains, not only when it is done;
    a cell trained on to equal compute estimates its last step (~)."""
    lines = [line for line in study_run["stdout"].splitlines() if ": step " in line]
    assert any(line.startswith("  [2/7] full/seed0: step ") and "/4, " in line and "ETA" in line for line in lines)
    assert any("qtuning@25x50/seed0: step " in line and "/~" in line for line in lines)
    assert any("bench ETA ~" in line and "more cell(s)" in line for line in lines)


def test_study_page_has_the_three_sections_and_paired_intervals(study_run):
    page = (study_run["out_dir"] / "results.md").read_text()
    for section in ("## Equal steps (4 optimizer steps)", "## Equal compute (the compute of `full`", "## Label noise audit"):
        assert section in page
    assert page.count("Δ NLL vs full [95% CI]") == 2  # equal steps and equal compute
    assert "curves_nll_by_step.png" in page and (study_run["out_dir"] / "curves_nll_by_compute.png").is_file()
    summary = json.loads((study_run["out_dir"] / "results.json").read_text())
    qtuning = next(r for r in summary["rows"] if r["method"] == "qtuning")
    paired = qtuning["equal_steps"]["paired"]["full"]["eval/nll"]
    assert paired["seeds"] == [0, 1] and paired["low"] <= paired["mean"] <= paired["high"]
    assert paired["verdict"] in ("better", "worse", "no difference")


def test_study_curves_have_a_point_every_two_steps_and_compute_grows(study_run):
    results = _cell_results(study_run["out_dir"])
    for cell_id, result in results.items():
        if cell_id == "base":
            continue
        steps = [p["step"] for p in result["curve"]]
        last = result["global_step"]
        assert set(range(0, last + 1, 2)) <= set(steps) and steps[-1] == last, cell_id
        assert all(p["eval/nll"] > 0 and p["eval/nll_transfer"] > 0 for p in result["curve"])
        cumulative = [s["cumulative"] for s in result["compute"]["steps"]]
        assert len(cumulative) == last and all(b > a for a, b in zip(cumulative, cumulative[1:])), cell_id
        assert [p["compute"] for p in result["curve"]] == sorted(p["compute"] for p in result["curve"])


def test_study_equal_compute_stops_within_one_step_of_the_reference(study_run):
    results = _cell_results(study_run["out_dir"])
    for seed in (0, 1):
        reference = results[f"full/seed{seed}"]["compute"]["final"]
        for method in ("qtuning", "random-matched"):
            result = results[f"{method}@25x50/seed{seed}"]
            compute = result["compute"]
            last_step = compute["steps"][-1]["compute"]
            assert compute["target"] == reference and compute["reached_target"]
            assert reference <= compute["final"] < reference + last_step, (method, seed)
            assert result["global_step"] > 4  # cheaper per step than full data: trained on past the equal steps
            assert compute["at_equal_steps"] == compute["steps"][3]["cumulative"]
    # random samples pay no scoring pass: at equal compute they get more steps than Q-Tuning
    assert results["random-matched@25x50/seed0"]["global_step"] > results["qtuning@25x50/seed0"]["global_step"]


def test_study_matched_baseline_trains_at_qtunings_label_token_share(study_run):
    results = _cell_results(study_run["out_dir"])
    for seed in (0, 1):
        qtuning = results[f"qtuning@25x50/seed{seed}"]
        matched = results[f"random-matched@25x50/seed{seed}"]
        share = qtuning["realised"]["label_token_share_pooled"]  # kept / all answer tokens of steps 1-4, from the ledger
        assert matched["matched_label_share"] == pytest.approx(share)
        assert matched["token_keep_ratio"] == pytest.approx(share)
        assert abs(matched["realised"]["label_token_share_pooled"] - share) <= 0.02, (seed, matched["realised"], share)
        mean_share = qtuning["realised"]["label_token_share"]  # the table's column: mean of per-step shares
        assert abs(matched["realised"]["label_token_share"] - mean_share) <= 0.02, (seed, matched["realised"], mean_share)
        assert matched["realised"]["sample_keep_ratio"] == pytest.approx(0.25)


def test_study_noise_audit_counts_match_the_ledger(study_run):
    from trl_qtuning import read_ledger

    results = _cell_results(study_run["out_dir"])
    for seed in (0, 1):
        result = results[f"qtuning@25x50/seed{seed}"]
        corrupted = set(result["corrupted_ids"])
        assert len(corrupted) == 16  # 50% of 32 rows
        ledger = read_ledger(study_run["out_dir"] / f"qtuning_r25x50_seed{seed}" / "qtuning_ledger").to_pandas()
        ledger = ledger[ledger.step <= 4]
        audit = result["noise_audit"]
        is_corrupted = ledger.sample_id.isin(corrupted)
        assert audit["sample_steps"] == {"corrupted": int(is_corrupted.sum()), "clean": int((~is_corrupted).sum())}
        for decision, entry in audit["by_decision"].items():
            rows = ledger[ledger.decision == decision]
            assert entry["corrupted"] == int(rows.sample_id.isin(corrupted).sum()), decision
            assert entry["clean"] == int((~rows.sample_id.isin(corrupted)).sum()), decision
        trained = ledger.decision.isin(["kept", "filled", "token_pruned"])
        assert audit["trained_share_corrupted"] == pytest.approx((trained & is_corrupted).sum() / is_corrupted.sum())
        quadrants = {name: entry["corrupted"] + entry["clean"] for name, entry in audit["by_quadrant"].items()}
        assert sum(quadrants.values()) == len(ledger)
        assert results[f"full/seed{seed}"]["noise_audit"]["trained_share_corrupted"] == 1.0
    page = (study_run["out_dir"] / "results.md").read_text()
    assert "corrupted trained" in page and "100%" in page


@pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow is not installed")
def test_study_curve_lands_in_each_cells_mlflow_run(study_run):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=study_run["uri"])
    experiment = client.get_experiment_by_name("bench-study")
    results = _cell_results(study_run["out_dir"])
    for cell_id in ("full/seed0", "qtuning@25x50/seed1"):
        run_id = results[cell_id]["mlflow"]["run_id"]
        history = client.get_metric_history(run_id, "eval/nll")
        assert sorted({m.step for m in history}) == [p["step"] for p in results[cell_id]["curve"]]
        compute = client.get_metric_history(run_id, "compute/forward_token_equivalents")
        assert max(m.value for m in compute) == results[cell_id]["compute"]["final"]
    summary = client.search_runs([experiment.experiment_id], filter_string="tags.`bench.summary` = 'true'")
    assert len(summary) == 1
    artifacts = {a.path for a in client.list_artifacts(summary[0].info.run_id)}
    assert {"results.md", "results.json", "curves_nll_by_step.png"} <= artifacts


def test_study_table_only_reproduces_the_page(study_run, monkeypatch):
    before = (study_run["out_dir"] / "results.md").read_text()
    calls = _forbid_running(monkeypatch)
    code, out, err = _run(["bench", "--config", str(study_run["config"]), "--table-only"])
    assert code == 0 and calls == [], err
    after = (study_run["out_dir"] / "results.md").read_text()

    def tables(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("|")]

    assert tables(after) == tables(before)


def test_study_stale_results_are_listed_not_tabulated(study_run, tmp_path, monkeypatch):
    """A finished cell made with other settings, or trained against a target its source no longer gives, is left
    out of the tables and named as stale (it used to be averaged in silently)."""
    import shutil

    out_dir = tmp_path / "out"
    shutil.copytree(study_run["out_dir"], out_dir)
    matrix = yaml.safe_load(study_run["config"].read_text())
    config = _write_matrix(tmp_path / "study.yaml", {**matrix, "output_dir": str(out_dir)})
    reference = out_dir / "full_seed1" / "result.json"
    record = json.loads(reference.read_text())
    record["compute"]["final"] += 1  # as if the reference cell had been rerun since
    reference.write_text(json.dumps(record))
    _forbid_running(monkeypatch)
    code, out, err = _run(["bench", "--config", str(config), "--table-only"])
    assert code == 0, err
    assert "qtuning@25x50/seed1 (stale: trained to a compute target that is not full's final compute now)" in out
    assert "random-matched@25x50/seed1 (stale: " in out and "qtuning@25x50/seed0 (stale" not in out
    rows = {line.split("|")[1].strip(): line for line in _first_table(out)}
    assert rows["qtuning"].split("|")[3].strip() == "1"  # one seed left in the row
    changed = {**matrix, "output_dir": str(out_dir), "training": {**matrix["training"], "learning_rate": 5.0e-4}}
    code, out, err = _run(["bench", "--config", str(_write_matrix(tmp_path / "b.yaml", changed)), "--table-only"])
    assert code == 0, err  # every trained cell is stale (the untrained base row does not depend on training)
    assert out.count("(stale: made with other settings than the matrix's now)") == 6


def test_fingerprint_does_not_depend_on_where_the_clone_lives(tmp_path, monkeypatch):
    """The same matrix with the same relative data paths gives the same fingerprints under any root (a clean clone
    elsewhere found every committed study cell stale while data paths were hashed resolved), and another file does
    not."""
    from trl_qtuning.bench.provenance import fingerprint

    def fingerprints(root: Path, data_name: str = "train.jsonl") -> list[str]:
        (root / "shared").mkdir(parents=True)
        (root / "shared" / data_name).write_text('{"question": "1+1?", "answer": "2\\n#### 2"}\n')
        (root / "main").mkdir()
        spec = yaml.safe_load((RECIPES / "study_gsm8k_clean.yaml").read_text())
        spec["data"]["train"]["path"] = f"../shared/{data_name}"
        config = _write_matrix(root / "main" / "study.yaml", spec)
        monkeypatch.chdir(root / "main")
        matrix = bench.load_matrix(config)
        assert matrix.train.path == f"../shared/{data_name}"  # kept as written, read against the directory it ran in
        return [fingerprint(matrix, cell) for cell in bench.plan_cells(matrix)]

    here = fingerprints(tmp_path / "one")
    assert here == fingerprints(tmp_path / "elsewhere" / "deeper")
    other = fingerprints(tmp_path / "other", "other.jsonl")
    assert all(a != b for a, b in zip(here, other))  # every cell, base included (its held-out rows come from it)


def test_dirty_means_the_package_code_changed_not_the_pages(tmp_path):
    """A study renders its pages into the checkout it runs from: that must not mark its results dirty; an edited or
    new module of the package must."""
    import subprocess

    from trl_qtuning.bench.provenance import git_state

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "pkg").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text("x = 1\n")
    (tmp_path / "docs" / "results.md").write_text("page\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    (tmp_path / "docs" / "results.md").write_text("re-rendered\n")
    (tmp_path / "docs" / "new.md").write_text("new\n")
    state = git_state(tmp_path / "pkg")
    assert len(state["commit"]) == 40 and state["dirty"] is False
    (tmp_path / "pkg" / "new.py").write_text("y = 2\n")
    assert git_state(tmp_path / "pkg")["dirty"] is True
    (tmp_path / "pkg" / "new.py").unlink()
    (tmp_path / "pkg" / "mod.py").write_text("x = 2\n")
    assert git_state(tmp_path / "pkg")["dirty"] is True
    assert git_state(tmp_path / "nowhere") == {"commit": None, "dirty": None}


def test_a_result_records_the_code_its_process_started_with(monkeypatch):
    """A long bench process runs the code it imported; when the checkout moves on meanwhile (a study commits its
    results as they land), the result names the commit it started at, and the checkout's commit beside it."""
    from trl_qtuning.bench import provenance, results

    started, moved = {"commit": "a" * 40, "dirty": False}, {"commit": "b" * 40, "dirty": True}
    matrix = bench.load_matrix(RECIPES / "tiny.yaml", check_inputs=False)
    cell = bench.plan_cells(matrix)[1]
    provenance._first_git_state.cache_clear()
    try:
        monkeypatch.setattr(provenance, "git_state", lambda: started)
        monkeypatch.setattr(results, "git_state", lambda: started)
        assert "git_at_finish" not in results.cell_record(matrix, cell) and provenance.code_state() == started
        monkeypatch.setattr(provenance, "git_state", lambda: moved)
        monkeypatch.setattr(results, "git_state", lambda: moved)
        record = results.cell_record(matrix, cell)
        assert record["git"] == started and record["git_at_finish"] == moved
    finally:
        provenance._first_git_state.cache_clear()


def test_cells_that_read_the_untrained_model_differently_are_named():
    """The untrained model's NLL (the base cell, each curve's step 0) is a canary for numerics: cells from machines
    whose kernels differ read it differently, and the page names the groups (one value: no line)."""
    from trl_qtuning.bench.tables import _untrained_line, untrained_readings

    def cell(cell_id, nll, method="full"):
        return {"cell_id": cell_id, "method": method, "curve": [{"step": 0, "eval/nll": nll}, {"step": 6, "eval/nll": 1.0}]}

    results = [{"cell_id": "base", "method": "base", "metrics": {"eval/nll": 1.3495073}},
               cell("full/seed0", 1.34950731), cell("full/seed1", 1.3473912), cell("qtuning@25x50/seed1", 1.3473912),
               {"cell_id": "old/seed0", "method": "full", "metrics": {"eval/nll": 0.9}}]  # fmt: skip
    results.append(cell("full/seed2", 1.34739120000001))  # float noise of the same numerics: the same group
    results.append(cell("full/seed3", float("nan")))  # a broken reading is no group
    groups = untrained_readings(results)
    assert groups == {1.347391: ["full/seed1", "qtuning@25x50/seed1", "full/seed2"], 1.349507: ["base", "full/seed0"]}
    line = _untrained_line(groups)
    assert "1.347391 (3 cells: full/seed1, qtuning@25x50/seed1, full/seed2); 1.349507 (2 cells: base, full/seed0)" in line
    assert _untrained_line(untrained_readings(results[:2])) is None


def test_reading_without_a_curve_never_passes_off_final_metrics_as_equal_steps():
    from trl_qtuning.bench.tables import reading

    result = {"global_step": 9, "metrics": {"eval/nll": 1.0, "eval/gsm8k_em": 0.5},
              "compute": {"final": 90, "equal_compute_step": 6, "steps": [{"step": s, "cumulative": 10 * s} for s in range(1, 10)]}}  # fmt: skip
    assert reading(result, "equal_steps", 4) == {"step": 4, "compute": 40}
    assert reading(result, "equal_compute", 4) == {"step": 6, "compute": 60}
    assert reading({**result, "global_step": 4}, "equal_steps", 4)["eval/gsm8k_em"] == 0.5


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"data": {"train": {"source": "arithmetic", "size": 32, "label_noise": -0.1}, "heldout_size": 8}},
         "data.train.label_noise: must be a share in [0, 1]"),
        ({"equal_compute": {"reference": "nosuch", "max_steps": 40}}, "equal_compute.reference: 'nosuch' is not a method"),
        ({"eval": {"nll": True, "every_steps": 0}}, "eval.every_steps: must be >= 1"),
        ({"equal_compute": {"reference": "full", "max_steps": 2}}, "equal_compute.max_steps: 2 < training.max_steps 4"),
        ({"training": {"max_steps": 4, "lr_scheduler_type": "linear"}}, "training.lr_scheduler_type: 'linear' decays"),
        ({"methods": {"full": {"qtuning_enabled": False}, "m": {"sample_policy": "random", "match_label_tokens": "x"}}},
         "methods.m.match_label_tokens: no other method named 'x'"),
        ({"methods": {"full": {"qtuning_enabled": False},
                      "m": {"sample_policy": "random", "match_label_tokens": "full"}}},
         "methods.m.match_label_tokens: method 'full' has no realised label-token share"),
        ({"baselines": ["nosuch"]}, "baselines[0]: 'nosuch' is not a method"),
        ({"methods": {**STUDY_METHODS, "qtuning": {"lr_scheduler_type": "cosine"}}},
         "methods.qtuning.lr_scheduler_type: 'cosine' decays"),
        ({"methods": {**STUDY_METHODS, "qtuning": {"max_steps": 8}}}, "methods.qtuning.max_steps: every method trains"),
        ({"equal_compute": {"reference": "random-matched", "max_steps": 40}},
         "equal_compute.reference: method 'random-matched' trains at another method's token share"),
        ({"training": {"max_steps": 4, "lr_scheduler_type": "constant", "qtuning_ledger": "none"}},
         "training.qtuning_ledger: label noise is audited from the ledger"),
    ],
)
def test_bad_study_values_name_the_field(tmp_path, model_dir, monkeypatch, change, expected):
    calls = _forbid_running(monkeypatch)
    config = _write_matrix(tmp_path / "bad.yaml", _study_matrix(tmp_path, model_dir, report_to="none", **change))
    code, _out, err = _run(["bench", "--config", str(config)])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
    assert calls == [] and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------------
# Bad matrices: one line naming the field, exit code 2, nothing trained
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"methods": {"qtuning": {"no_such_knob": 1}}}, "methods.qtuning.no_such_knob: unknown QTuningConfig field"),
        ({"methods": {"qtuning": {"neighbor_mode": "max"}}}, "methods.qtuning (budget 50% x 70%): `neighbor_mode`"),
        ({"budgets": [[0.5, 0.7], [1.5, 0.5]]}, "budgets[1] (sample_keep_ratio): must be in (0, 1]"),
        ({"budgets": [[0.5, 0.0]]}, "budgets[0] (token_keep_ratio): must be in (0, 1]"),
        ({"data": {"train": {"source": "gsm8k_jsonl"}, "heldout_size": 8}}, "data.train.path: missing"),
        ({"data": {"train": {"source": "gsm8k_jsonl", "path": "no/such/train.jsonl"}, "heldout_size": 8}},
         "data.train.path: file not found: no/such/train.jsonl"),
        ({"data": {"train": {"source": "hub"}}}, "data.train.source: must be one of"),
        ({"training": {"max_steps": 2, "seed": 3}}, "training.seed: is set by the bench"),
        ({"methods": {"qtuning": {"sample_keep_ratio": 0.3}}}, "methods.qtuning.sample_keep_ratio: is set by the bench"),
        ({"methods": {"full": {"qtuning_enabled": False, "budgets": [[0.5, 0.5]]}}}, "methods.full.budgets:"),
        ({"methods": {"base": {}}}, "methods.base:"),
        ({"seeds": []}, "seeds: must be a non-empty list"),
        ({"sedes": [0]}, "sedes: unknown key"),
        ({"eval": {"nll": True, "gsm8k": {"size": 0}}}, "eval.gsm8k.size: must be >= 1"),
        ({"lora": {"r": 8, "alpah": 16}}, "lora.alpah: unknown key"),
        ({"report_to": "wandb"}, "report_to: must be one of auto, mlflow, none"),
    ],
)
def test_bad_matrix_names_the_field(tmp_path, model_dir, monkeypatch, change, expected):
    calls = _forbid_running(monkeypatch)
    config = _write_matrix(tmp_path / "bad.yaml", _tiny_matrix(tmp_path, model_dir, **change))
    code, _out, err = _run(["bench", "--config", str(config)])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"trl-qtuning bench: error: {config}: "), err
    assert expected in lines[0], lines[0]
    assert "(fix:" in lines[0] or "must be" in lines[0] or "neighbor_mode" in lines[0]
    assert calls == [] and not (tmp_path / "out").exists()


def test_bench_trains_on_from_a_lora_runs_output(tmp_path, model_dir):
    """``model:`` may be a LoRA run's output, as for the demo: its adapter is merged into the base model, whose weights
    the cells then train (the adapter alone loads frozen, for scoring, and a cell could not train it)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from trl_qtuning.audit.api import load_audit_model, load_trainable_model
    from trl_qtuning.testing import make_tiny_model

    run = tmp_path / "lora_run"
    lora = get_peft_model(make_tiny_model(), LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM",
                                                         init_lora_weights=False))  # fmt: skip
    lora.save_pretrained(run)
    config = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(model_dir)}))

    frozen, _, _ = load_audit_model(str(run))
    merged, _, description = load_trainable_model(str(run))
    assert isinstance(frozen, PeftModel) and not isinstance(merged, PeftModel)
    assert description.endswith(" + adapter " + str(run) + " (adapter merged)")
    assert all(p.requires_grad for p in merged.parameters())
    ids = torch.tensor([[3, 5, 7, 11]])
    torch.testing.assert_close(merged(ids).logits, frozen(ids).logits)  # the adapter's (non-zero) update is kept
    base, _, _ = load_trainable_model(str(model_dir))
    assert not torch.allclose(base(ids).logits, merged(ids).logits)

    matrix = _write_matrix(tmp_path / "m.yaml", _tiny_matrix(tmp_path, run, report_to="none"))
    code, out, err = _run(["bench", "--config", str(matrix), "--only", "full"])
    assert code == 0, f"{out}\n{err}"
    assert json.loads((tmp_path / "out" / "full_seed0" / "result.json").read_text())["status"] == "complete"
    (tmp_path / "empty").mkdir()
    matrix = _write_matrix(tmp_path / "bad.yaml", _tiny_matrix(tmp_path, tmp_path / "empty", report_to="none"))
    code, _, err = _run(["bench", "--config", str(matrix)])
    assert code == 2 and "model: not a model folder (no config.json or adapter_config.json)" in err


def test_missing_matrix_and_bad_arguments():
    code, _, err = _run(["bench", "--config", "/no/such/matrix.yaml"])
    assert code == 2 and "matrix file not found" in err
    code, _, err = _run(["bench"])
    assert code == 2 and "--config" in err


def test_recipes_are_valid_matrices():
    """The shipped matrices parse (paths not checked: the data and model live elsewhere)."""
    real = bench.load_matrix(RECIPES / "gsm8k_smollm2_cpu.yaml", check_inputs=False)
    assert real.model == "demo" and real.seeds == [0, 1, 2] and real.lora["r"] == 8 and real.lora["alpha"] == 16
    assert [m.name for m in real.methods][:3] == ["full", "random-random", "qtuning"]
    assert real.method("full").budgets == [None]
    assert real.method("qtuning").budgets == [(0.25, 0.5), (0.5, 0.7)]
    assert real.method("entropy-ppl").overrides == {"sample_policy": "entropy", "token_policy": "ppl"}
    tiny = bench.load_matrix(RECIPES / "tiny.yaml", check_inputs=False)
    assert [c.id for c in bench.plan_cells(tiny)] == CELL_IDS


def test_paired_t_interval_and_the_error_without_scipy(monkeypatch):
    import builtins

    from trl_qtuning.bench import paired

    diff = paired.paired_difference({0: 1.0, 1: 2.0, 2: 4.0}, {0: 1.5, 1: 1.5, 2: 1.5})
    # differences -0.5, 0.5, 2.5: mean 0.8333, sd 1.5275, t(0.975, 2) = 4.303 -> half width 3.7947
    assert diff["mean"] == pytest.approx(0.8333, abs=1e-4) and diff["verdict"] == "no difference"
    assert diff["high"] - diff["mean"] == pytest.approx(4.303 * 1.527525 / 3**0.5, rel=1e-3)
    assert paired.paired_difference({0: 1.0}, {0: 2.0})["verdict"] == "n < 2"
    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError("no scipy")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    with pytest.raises(ImportError, match=r"pip install 'trl-qtuning\[bench\]'"):
        paired.paired_difference({0: 1.0, 1: 2.0}, {0: 1.5, 1: 1.5})


def test_noise_audit_selectivity_is_a_per_seed_difference_with_its_interval():
    """Per seed, the corrupted rows' trained share minus the clean rows'; mean and 95% t interval over seeds, in
    percentage points; full data (no ledger) has none, and one seed shows no interval."""
    from trl_qtuning.bench.audit import full_data_audit
    from trl_qtuning.bench.tables import SELECTIVITY_HEADER, _pool_audits, format_audit, format_selectivity

    def audit(corrupted_share, clean_share):
        return {"sample_steps": {"corrupted": 10, "clean": 30}, "by_quadrant": {}, "by_decision": {},
                "trained_share_corrupted": corrupted_share, "trained_share_clean": clean_share}  # fmt: skip

    # differences -0.10, -0.20, -0.30: mean -0.20, sd 0.10, t(0.975, 2) = 4.303 -> half width 0.2484
    pooled = _pool_audits({0: audit(0.15, 0.25), 1: audit(0.05, 0.25), 2: audit(0.0, 0.30)})
    selectivity = pooled["selectivity"]
    assert selectivity["differences"] == pytest.approx([-0.10, -0.20, -0.30]) and selectivity["seeds"] == [0, 1, 2]
    assert selectivity["mean"] == pytest.approx(-0.20)
    assert selectivity["high"] - selectivity["mean"] == pytest.approx(4.303 * 0.10 / 3**0.5, rel=1e-3)
    assert format_selectivity(selectivity) == "-20.0 [-44.8, +4.8] no difference"
    # a consistent gap excludes 0
    clear = _pool_audits({0: audit(0.10, 0.30), 3: audit(0.11, 0.30), 7: audit(0.12, 0.30)})["selectivity"]
    assert clear["seeds"] == [0, 3, 7]  # the cells' own seeds
    assert format_selectivity(clear) == "-19.0 [-21.5, -16.5] fewer corrupted"
    more = _pool_audits({0: audit(0.40, 0.20), 1: audit(0.41, 0.20), 2: audit(0.42, 0.20)})["selectivity"]
    assert format_selectivity(more).endswith("more corrupted")
    assert format_selectivity(_pool_audits({0: audit(0.2, 0.3)})["selectivity"]) == "-10.0 (n=1)"
    assert format_selectivity(_pool_audits({0: audit(0.2, 0.3), 1: audit(None, 0.3)})["selectivity"]) == "-10.0 (n=1)"
    full = _pool_audits({0: full_data_audit(32, [1, 2]), 1: full_data_audit(32, [1, 2])})
    assert full["selectivity"] is None and format_selectivity(full["selectivity"]) == "-"
    rows = [{"method": "full", "budget_label": "-", "noise_audit": full},
            {"method": "qtuning", "budget_label": "25% x 50%", "noise_audit": pooled}]
    table = format_audit(rows).splitlines()
    column = table[0].split("|").index(f" {SELECTIVITY_HEADER} ")
    assert table[2].split("|")[column].strip() == "-"
    assert table[3].split("|")[column].strip() == "-20.0 [-44.8, +4.8] no difference"


def test_page_lists_the_versions_the_cells_ran_with_not_only_the_renderers():
    from trl_qtuning.bench.tables import _cell_versions_line

    results = [{"versions": {"torch": "2.13.0", "accelerate": "1.10.0"}},
               {"versions": {"torch": "2.13.0", "accelerate": "1.9.0", "mlflow": "3.1"}},
               {"versions": {"torch": "2.13.0", "accelerate": "1.10.0", "mlflow": None}}, {}]  # fmt: skip
    assert _cell_versions_line(results) == (
        "torch 2.13.0, accelerate 1.9.0 (1 cell) / 1.10.0 (2 cells), mlflow 3.1 (1 cell)"  # versions in version order;
    )  # a library only some cells recorded says how many
    assert _cell_versions_line([{}]) is None


def test_help_and_table_only_do_not_import_the_trainer(tmp_path):
    """`bench --help` reads no library; `--table-only` reads files and checks the matrix against QTuningConfig (TRL's
    SFTConfig), but must not pay for the trainers (transformers' Trainer, TRL's SFTTrainer, ours)."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    matrix = yaml.safe_load((root / "recipes/bench/study_gsm8k_fill_clean.yaml").read_text())
    shutil.copytree(root / matrix["output_dir"], tmp_path / "study")
    matrix.update(output_dir=str(tmp_path / "study"), report_to="none")
    (tmp_path / "matrix.yaml").write_text(yaml.safe_dump(matrix))
    trainers = "{'trl_qtuning.trainer', 'transformers.trainer', 'trl.trainer.sft_trainer', 'trl_qtuning.bench.runner'}"
    code = (
        "import sys, trl_qtuning.bench as b; from trl_qtuning.bench.cli import main; "
        "assert not {'trl', 'peft', 'transformers'} & set(sys.modules), 'imported for --help'; "
        f"assert main(['--config', {str(tmp_path / 'matrix.yaml')!r}, '--table-only']) == 0; "
        f"assert not {trainers} & set(sys.modules), 'a trainer was imported for --table-only'; "
        "assert b.run_bench is b.runner.run_bench  # still there, on first use"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, cwd=root)
