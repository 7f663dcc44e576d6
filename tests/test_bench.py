"""``trl-qtuning bench``: a tiny matrix end to end (MLflow on a temporary SQLite store), resuming, the table,
``--table-only``, and one-line errors for bad matrices."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
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

    def fake_train_cell(matrix, cell, data, cell_dir, targets=None):
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
        ({"report_to": "wandb"}, "report_to: must be auto, mlflow or none"),
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
