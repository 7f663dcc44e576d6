"""``trl-qtuning audit``: detection measures on hand-computed cases, the table against the trainer's own scoring,
resumption, bad inputs, the command end to end on a tiny model (and in two processes)."""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.trainer_helpers import build_trainer
from trl_qtuning.audit import AuditInputError, AuditSettings, audit_dataset, auroc, precision_at
from trl_qtuning.audit.api import prepared_rows
from trl_qtuning.audit import api as audit_api
from trl_qtuning.audit.detection import candidate_scores
from trl_qtuning.testing import make_arithmetic_dataset, make_tiny_model, make_tiny_tokenizer, save_tiny_model

REPO = Path(__file__).resolve().parents[1]
STATS = ["audit_row_id", "ppl", "entropy", "answer_tokens", "tokens", "truncated", "empty_answer"]


# ---------------------------------------------------------------------------------------------------- detection
def test_auroc_hand_computed():
    # bad {0.35, 0.8} vs good {0.1, 0.4}: 0.35 > 0.1, 0.35 < 0.4, 0.8 > both -> 3 of 4 pairs
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    # ties count one half: (0.5 + 0 + 1 + 0.5) / 4
    assert auroc(np.array([1.0, 1.0, 2.0, 2.0]), np.array([0, 1, 0, 1])) == 0.5
    assert auroc(np.array([3.0, 3.0, 3.0]), np.array([1, 0, 0])) == 0.5
    assert auroc(np.array([1.0, 2.0, 3.0]), np.array([0, 0, 1])) == 1.0
    assert auroc(np.array([1.0, 2.0, 3.0]), np.array([1, 0, 0])) == 0.0
    # a NaN score is left out: the same as without the row
    assert auroc(np.array([0.1, np.nan, 0.35, 0.8, 0.4]), np.array([0, 1, 1, 1, 0])) == 0.75
    assert math.isnan(auroc(np.array([1.0, 2.0]), np.array([1, 1])))


def test_auroc_equals_counting_every_pair():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=40).astype(float)  # many ties
    labels = rng.random(40) < 0.3
    pairs = [(1.0 if b > g else 0.5 if b == g else 0.0) for b, g in itertools.product(scores[labels], scores[~labels])]
    assert auroc(scores, labels) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)


def test_precision_at_top_share():
    scores = np.array([0.9, 0.1, 0.8, 0.7, 0.2, 0.3, 0.4, 0.5, 0.6, 0.05])
    labels = np.array([1, 1, 0, 1, 0, 0, 0, 0, 0, 0])
    assert precision_at(scores, labels, 0.2) == 0.5  # top 2: rows 0 (bad) and 2 (good)
    assert precision_at(scores, labels, 0.3) == pytest.approx(2 / 3)  # rows 0, 2, 3
    assert precision_at(scores, labels, 0.01) == 1.0  # at least one row: row 0
    with pytest.raises(ValueError, match="share"):
        precision_at(scores, labels, 0.0)


def test_candidate_scores_rank_sum_and_invalid_rows():
    scores = candidate_scores(np.array([1.0, 4.0, 2.0, np.nan]), np.array([0.5, 0.1, 0.9, 0.3]))
    assert scores["rank_sum"][:3].tolist() == pytest.approx([(1 + 2) / 3, (3 + 1) / 3, (2 + 3) / 3])
    assert all(math.isnan(values[3]) for values in scores.values())
    assert np.array_equal(scores["suspicion"], scores["rank_sum"], equal_nan=True)


# ---------------------------------------------------------------------------------------------- the audit
def _tiny(seed: int = 0):
    tokenizer = make_tiny_tokenizer()
    return make_tiny_model(tokenizer, seed=seed), tokenizer


def test_table_equals_the_trainers_scoring_forward(tmp_path):
    """The ledger of one Q-Tuning step records the trainer's scoring forward over all 24 rows at the initial model."""
    dataset = make_arithmetic_dataset(24, seed=3)
    trainer = build_trainer(tmp_path / "run", dataset=dataset, per_device_train_batch_size=24, max_steps=1,
                            sample_keep_ratio=0.5, token_keep_ratio=0.5, qtuning_ledger="summary")  # fmt: skip
    trainer.train()
    from trl_qtuning import read_ledger

    ledger = read_ledger(tmp_path / "run").to_pandas().sort_values("sample_id")
    model, tokenizer = _tiny(seed=0)  # build_trainer's initial model
    result = audit_dataset(model, dataset, tokenizer=tokenizer, output_dir=tmp_path / "audit", batch_size=5,
                           progress=False)  # fmt: skip
    table = result.table.sort_values("audit_row_id")
    assert table["audit_row_id"].tolist() == ledger["sample_id"].tolist() == list(range(24))
    np.testing.assert_allclose(table["ppl"], ledger["ppl"], rtol=1e-5)
    np.testing.assert_allclose(table["entropy"], ledger["entropy"], rtol=1e-5)
    assert table["answer_tokens"].tolist() == ledger["response_tokens"].tolist()


def test_resumed_audit_equals_uninterrupted(tmp_path, monkeypatch):
    model, tokenizer = _tiny()
    dataset = make_arithmetic_dataset(40, seed=1, conversational=True)
    options = dict(tokenizer=tokenizer, chunk_size=8, batch_size=3, progress=False, noisy_rows=[0, 5, 9, 33])
    whole = audit_dataset(model, dataset, output_dir=tmp_path / "whole", **options)

    write = audit_api._write_shard
    calls = []

    def interrupted(directory, chunk, columns):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(chunk)
        write(directory, chunk, columns)

    monkeypatch.setattr(audit_api, "_write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        audit_dataset(model, dataset, output_dir=tmp_path / "resumed", **options)
    monkeypatch.setattr(audit_api, "_write_shard", write)
    assert len(list((tmp_path / "resumed" / "shards").glob("chunk-*.parquet"))) == 2
    resumed = audit_dataset(model, dataset, output_dir=tmp_path / "resumed", **options)
    assert resumed.summary["timing"]["rows_scored_now"] == 40 - 16  # the two finished chunks were not scored again
    pd.testing.assert_frame_equal(resumed.table, whole.table)
    assert resumed.summary["detection"] == whole.summary["detection"]
    written = pd.read_parquet(tmp_path / "resumed" / "audit.parquet")
    pd.testing.assert_frame_equal(written, whole.table, check_dtype=False)


def test_other_settings_in_the_same_folder_are_refused(tmp_path):
    model, tokenizer = _tiny()
    dataset = make_arithmetic_dataset(8, seed=1)
    audit_dataset(model, dataset, tokenizer=tokenizer, output_dir=tmp_path, progress=False)
    with pytest.raises(AuditInputError, match=r"settings\.max_length"):
        audit_dataset(model, dataset, tokenizer=tokenizer, output_dir=tmp_path, progress=False, max_length=64)
    result = audit_dataset(model, dataset, tokenizer=tokenizer, output_dir=tmp_path, progress=False, max_length=64,
                           overwrite=True)  # fmt: skip
    assert result.summary["settings"]["max_length"] == 64


def test_outputs_and_counts(tmp_path):
    model, tokenizer = _tiny()
    rows = make_arithmetic_dataset(30, seed=2).to_list()
    rows[3]["completion"] = ""  # an empty answer: counted, still scored (TRL's EOS is its one answer token)
    rows[7]["completion"] = "   "
    rows[11]["prompt"] = " ".join(["what is 1 plus 2 ?"] * 20)  # 100 prompt tokens: truncated to no answer token
    from datasets import Dataset

    result = audit_dataset(model, Dataset.from_list(rows), tokenizer=tokenizer, output_dir=tmp_path, max_length=40,
                           top_k=4, progress=False)  # fmt: skip
    s, table = result.summary, result.table
    assert s["empty_answers"] == 2 and table.loc[table.empty_answer, "audit_row_id"].tolist() == [3, 7]
    assert s["truncated_rows"] == int(table["truncated"].sum()) >= 1 and bool(table.loc[11, "truncated"])
    assert s["rows_without_answer_token"] == 1 and math.isnan(table.loc[11, "ppl"])
    assert pd.isna(table.loc[11, "suspicion_rank"]) and table.loc[11, "answer_tokens"] == 0
    assert (table["tokens"] <= 40).all()
    assert sum(s["quadrants"].values()) == s["rows_scored"] == 29
    assert sorted(table["suspicion_rank"].dropna().tolist()) == list(range(1, 30))
    top = table.sort_values("suspicion_rank").iloc[0]
    assert top["suspicion"] == table["suspicion"].max()
    for name in ("audit.parquet", "eu_plane.png", "audit.md", "summary.json"):
        assert (tmp_path / name).is_file(), name
    page = (tmp_path / "audit.md").read_text()
    assert "## The 4 most suspected rows" in page and f"### 1. row {int(top['audit_row_id'])}" in page
    assert "## Q1 harmful noise" in page and "truncated" in page
    assert json.loads((tmp_path / "summary.json").read_text())["rows"] == 30
    # the rows another scorer is handed are the audit's own, truncation included
    prepared = prepared_rows(model, tokenizer, Dataset.from_list(rows), AuditSettings(max_length=40))
    assert [len(r["input_ids"]) for r in prepared] == table["tokens"].tolist()
    assert [sum(label != -100 for label in r["labels"][1:]) for r in prepared] == table["answer_tokens"].tolist()


def test_stream_gives_the_same_table(tmp_path):
    model, tokenizer = _tiny()
    dataset = make_arithmetic_dataset(20, seed=4)
    options = dict(tokenizer=tokenizer, chunk_size=6, progress=False)
    sized = audit_dataset(model, dataset, output_dir=tmp_path / "sized", **options)
    streamed = audit_dataset(model, dataset.to_iterable_dataset(), output_dir=tmp_path / "stream", **options)
    pd.testing.assert_frame_equal(streamed.table[STATS], sized.table[STATS])


def test_bad_inputs_are_named(tmp_path):
    model, tokenizer = _tiny()
    from datasets import Dataset

    with pytest.raises(AuditInputError, match="'question'.*SFT needs"):
        audit_dataset(model, Dataset.from_list([{"question": "a", "answer": "b"}]), tokenizer=tokenizer)
    with pytest.raises(AuditInputError, match="model path not found: ./no/such/model"):
        audit_dataset("./no/such/model", make_arithmetic_dataset(4))
    with pytest.raises(AuditInputError, match="cannot load model 'no-org/no-such-model' \\(offline mode is on"):
        audit_dataset("no-org/no-such-model", make_arithmetic_dataset(4))
    with pytest.raises(AuditInputError, match="needs its tokenizer"):
        audit_dataset(model, make_arithmetic_dataset(4))
    with pytest.raises(AuditInputError, match="keep_ratio"):
        audit_dataset(model, make_arithmetic_dataset(4), tokenizer=tokenizer, keep_ratio=0.0)


def test_adapter_folder_is_scored_with_its_adapter(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    base = save_tiny_model(tmp_path / "base")
    model, tokenizer = _tiny()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft = get_peft_model(model, lora)
    with torch.no_grad():
        for name, parameter in peft.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # LoRA starts as the identity: make it change the model
    peft.save_pretrained(tmp_path / "run")
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (tmp_path / "run" / "adapter_config.json").write_text(json.dumps(config))
    dataset = make_arithmetic_dataset(12, seed=5)
    plain = audit_dataset(str(base), dataset, progress=False)
    adapted = audit_dataset(str(tmp_path / "run"), dataset, progress=False)
    same_as_flag = audit_dataset(str(base), dataset, adapter=str(tmp_path / "run"), progress=False)
    assert "adapter" in adapted.summary["model"]
    assert not np.allclose(adapted.table["ppl"], plain.table["ppl"])
    np.testing.assert_allclose(adapted.table["ppl"], same_as_flag.table["ppl"], rtol=1e-6)


# ---------------------------------------------------------------------------------------------- the command
def _jsonl(path: Path, n: int = 16) -> Path:
    rows = make_arithmetic_dataset(n, seed=6).to_list()
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_command_end_to_end(tmp_path, capsys):
    from trl_qtuning.cli.main import main

    model = save_tiny_model(tmp_path / "model")
    data = _jsonl(tmp_path / "data.jsonl")
    (tmp_path / "noisy.json").write_text(json.dumps([1, 2, 3]))
    code = main(["audit", "--model", str(model), "--dataset", str(data), "--output_dir", str(tmp_path / "out"),
                 "--noisy_rows", str(tmp_path / "noisy.json"), "--batch_size", "4", "--no_progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Audited 16 rows" in out and "AUROC" in out
    table = pd.read_parquet(tmp_path / "out" / "audit.parquet")
    assert len(table) == 16 and {"ppl", "entropy", "quadrant", "suspicion", "suspicion_rank", "noisy"} <= set(table)
    assert main(["audit", "--model", str(tmp_path / "nowhere"), "--dataset", str(data), "--output_dir",
                 str(tmp_path / "o2")]) == 1  # fmt: skip
    assert "model path not found" in capsys.readouterr().err
    assert main(["audit", "--model", str(model), "--dataset", str(tmp_path / "none.jsonl"), "--output_dir",
                 str(tmp_path / "o3")]) == 1  # fmt: skip
    assert "dataset not found" in capsys.readouterr().err
    assert main(["audit", "--model", str(model)]) == 2
    assert "required" in capsys.readouterr().err
    assert main(["audit", "--model", str(model), "--dataset", str(data), "--output_dir", str(tmp_path / "o4"),
                 "--bf16", "ture"]) == 2  # not a silent false
    assert "--bf16: expected true or false, got 'ture'" in capsys.readouterr().err


def test_the_figure_leaves_the_callers_matplotlib_alone(tmp_path):
    """The audit is a Python API: drawing its figure must not switch the caller's backend or start pyplot."""
    code = (
        "import sys, matplotlib, pandas as pd; from pathlib import Path; matplotlib.use('svg');"
        "from trl_qtuning.audit.outputs import plot_plane;"
        "df = pd.DataFrame({'log_ppl': [0.1, 0.5, 0.9], 'entropy': [1.0, 2.0, 3.0], 'suspicion_rank': [1.0, 2.0, 3.0]});"
        f"assert plot_plane(df, None, Path({str(tmp_path / 'plane.png')!r}), 1, 't');"
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend();"
        "assert 'matplotlib.pyplot' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=REPO)
    assert (tmp_path / "plane.png").stat().st_size > 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_score_shards_of_the_same_table(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    data = _jsonl(tmp_path / "data.jsonl", n=22)
    common = ["--model", str(model), "--dataset", str(data), "--chunk_size", "4", "--no_progress"]
    from trl_qtuning.cli.main import main

    assert main(["audit", *common, "--output_dir", str(tmp_path / "one")]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trl_qtuning.cli.main", "audit", *common,
        "--output_dir", str(tmp_path / "two"),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, timeout=300, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    one = pd.read_parquet(tmp_path / "one" / "audit.parquet")
    two = pd.read_parquet(tmp_path / "two" / "audit.parquet")
    pd.testing.assert_frame_equal(two[STATS], one[STATS], rtol=1e-6)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["timing"]["processes"] == 2


def test_mlflow_run_holds_the_outputs(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    model, tokenizer = _tiny()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = audit_dataset(model, make_arithmetic_dataset(12, seed=7), tokenizer=tokenizer, output_dir=tmp_path / "out",
                           progress=False, report_to="mlflow", tracking_uri=uri, experiment_name="audit-test",
                           noisy_rows=[0, 1])  # fmt: skip
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(result.summary["mlflow_run_id"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "audit.parquet", "eu_plane.png", "audit.md", "summary.json"
    }
    assert run.data.metrics["rows"] == 12 and "detection/suspicion/auroc" in run.data.metrics
    assert run.data.params["keep_ratio"] == "0.25"


def test_mlflow_logging_leaves_the_process_tracking_settings_alone_and_an_outage_keeps_the_audit(tmp_path, caplog):
    mlflow = pytest.importorskip("mlflow")
    model, tokenizer = _tiny()
    before = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    audit_dataset(model, make_arithmetic_dataset(8, seed=3), tokenizer=tokenizer, output_dir=tmp_path / "out",
                  progress=False, report_to="mlflow", tracking_uri=uri, experiment_name="audit-global")  # fmt: skip
    assert mlflow.get_tracking_uri() == before, "a later training run must not land in the audit's store"
    assert mlflow.active_run() is None
    # An unreachable store: the audit is still written, with a warning and no run id.
    result = audit_dataset(model, make_arithmetic_dataset(8, seed=3), tokenizer=tokenizer,
                           output_dir=tmp_path / "out-outage", progress=False, report_to="mlflow",
                           tracking_uri="http://127.0.0.1:9", experiment_name="audit-outage")  # fmt: skip
    assert result.summary["mlflow_run_id"] is None and (tmp_path / "out-outage" / "audit.parquet").is_file()
    assert any("logging to MLflow failed" in r.getMessage() for r in caplog.records)
