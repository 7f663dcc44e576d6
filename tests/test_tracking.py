"""MLflow tracking against MLflow's default store kind (SQLite), one store shared by the module's tests."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("matplotlib")

from tests.trainer_helpers import build_trainer, tiny_config  # noqa: E402
from trl_qtuning import QTuningSFTTrainer, read_ledger  # noqa: E402
from trl_qtuning.testing import make_arithmetic_dataset, make_tiny_model, make_tiny_tokenizer  # noqa: E402
from trl_qtuning.tracking import attach_tracking, kept_sample_ids, load_selection, require_mlflow  # noqa: E402

BATCH, GA, STEPS = 4, 2, 6  # 48 samples / (4 x 2) = 6 steps: one epoch, every sample scored once


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_sqlite")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.MlflowClient(tracking_uri=uri).search_experiments()  # creates the schema once (takes seconds)
    return uri, root


@pytest.fixture()
def tracking(sqlite_store, monkeypatch):
    """A fresh experiment (artifacts under the store's tmp dir) selected through transformers' env variables."""
    uri, root = sqlite_store
    name = f"exp-{uuid.uuid4().hex[:8]}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    client.create_experiment(name, artifact_location=str(root / "artifacts" / name))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_NESTED_RUN", "MLFLOW_TAGS", "HF_MLFLOW_LOG_ARTIFACTS"):
        monkeypatch.delenv(var, raising=False)
    return client, name


@pytest.fixture(scope="module")
def qtuning_run(sqlite_store, tmp_path_factory):
    """One Q-Tuning run (6 steps, gradient accumulation 2, checkpoints at steps 3 and 6), shared by several tests."""
    uri, root = sqlite_store
    name = "qtuning-main"
    client = mlflow.MlflowClient(tracking_uri=uri)
    client.create_experiment(name, artifact_location=str(root / "artifacts" / name))
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.setenv("MLFLOW_EXPERIMENT_NAME", name)
    out = tmp_path_factory.mktemp("qtuning_run")
    try:
        trainer = build_trainer(
            out, report_to=["mlflow"], max_steps=STEPS, per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=GA, save_strategy="steps", save_steps=3, run_name="qtuning-r0.25",
        )
        callback = attach_tracking(trainer, eu_plane_every=2)
        trainer.train()
    finally:
        mp.undo()
    return trainer, callback, client, out


def test_missing_mlflow_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'trl-qtuning\[mlflow\]'"):
        require_mlflow()
    with pytest.raises(ImportError, match=r"trl-qtuning\[mlflow\]"):
        attach_tracking(object())


def test_core_and_trainer_do_not_import_mlflow():
    code = (
        "import sys, trl_qtuning, trl_qtuning.trainer, trl_qtuning.ledger, trl_qtuning.tracking; "
        "assert 'mlflow' not in sys.modules, 'mlflow imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_trainer_attaches_tracking_in_place_of_transformers_callback(tmp_path, tracking):
    from transformers.integrations import MLflowCallback

    from tests.trainer_helpers import GradCapture
    from trl_qtuning.tracking.callback import QTuningMLflowCallback

    user_callback = GradCapture()
    trainer = build_trainer(tmp_path, report_to=["mlflow"], callbacks=[user_callback])
    callbacks = trainer.callback_handler.callbacks
    mlflow_callbacks = [cb for cb in callbacks if isinstance(cb, MLflowCallback)]
    assert len(mlflow_callbacks) == 1 and isinstance(mlflow_callbacks[0], QTuningMLflowCallback)
    callback = mlflow_callbacks[0]
    assert attach_tracking(trainer, eu_plane_every=3) is callback  # idempotent; options still apply
    assert callback.eu_plane_every == 3
    assert callbacks.index(callback) < callbacks.index(user_callback)  # logged before user callbacks run
    assert callback.on_decisions in trainer._decision_listeners


def test_a_failing_decision_hook_warns_once_and_does_not_raise(tmp_path, tracking, caplog):
    from trl_qtuning.tracking.callback import QTuningMLflowCallback

    trainer = build_trainer(tmp_path, report_to=["mlflow"])
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, QTuningMLflowCallback))
    callback.decisions = lambda event: 1 / 0  # any error inside the hook
    with caplog.at_level("WARNING", logger="trl_qtuning.tracking"):
        assert callback.on_decisions(object()) is None and callback.on_decisions(object()) is None
    warnings = [r for r in caplog.records if "on_decisions failed (ZeroDivisionError" in r.getMessage()]
    assert len(warnings) == 1 and "training continues" in warnings[0].getMessage()


def test_metrics_params_tags_and_dataset_in_one_run(qtuning_run):
    trainer, callback, client, _ = qtuning_run
    run = client.get_run(callback.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "qtuning-r0.25"
    metrics = run.data.metrics
    qtuning_metrics = [k for k in metrics if k.startswith("qtuning/") and not k.startswith("qtuning/final/")]
    assert len(qtuning_metrics) >= 15
    loss_steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert loss_steps == list(range(1, STEPS + 1))
    ledger = read_ledger(Path(trainer.args.output_dir) / "qtuning_ledger").to_pandas()
    for key in qtuning_metrics:
        history = client.get_metric_history(run.info.run_id, key)
        if key == "qtuning/token_keep_ratio":  # logged only for steps with a token-pruned sample
            pruned_steps = sorted(set(ledger.step[ledger.decision == "token_pruned"]))
            assert [m.step for m in history] == pruned_steps, key
            continue
        assert [m.step for m in history] == loss_steps, key  # same run, same steps as TRL's loss
    for m in client.get_metric_history(run.info.run_id, "qtuning/sample_keep_ratio"):
        rows = ledger[ledger.step == m.step]
        assert m.value == pytest.approx(rows.decision.isin(["kept", "token_pruned", "filled"]).mean())
    assert "train_loss" in metrics and "train_runtime" in metrics
    assert metrics["qtuning/final/sample_keep_ratio"] == pytest.approx(0.25)
    params = run.data.params
    for name in ("sample_keep_ratio", "token_keep_ratio", "neighbor_lambda", "triage_scope", "qtuning_ledger"):
        assert params[name] == str(getattr(trainer.args, name))
    tags = run.data.tags
    assert tags["qtuning.method"] == "qtuning"
    assert tags["qtuning.sample_keep_ratio"] == "0.25" and tags["qtuning.token_keep_ratio"] == "0.5"
    found = client.search_runs(
        [run.info.experiment_id], "tags.`qtuning.method` = 'qtuning' and tags.`qtuning.sample_keep_ratio` = '0.25'"
    )
    assert [r.info.run_id for r in found] == [run.info.run_id]
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "train_dataset"
    assert json.loads(dataset_input.dataset.profile)["num_rows"] == len(trainer.train_dataset)
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "train"


def test_ledger_accounts_for_every_sample_and_is_uploaded(qtuning_run, tmp_path):
    trainer, callback, client, out = qtuning_run
    ledger = read_ledger(out / "qtuning_ledger").to_pandas()
    assert sorted(ledger.step.unique()) == list(range(1, STEPS + 1))
    assert (ledger.groupby("step").size() == BATCH * GA).all()
    assert sorted(ledger.sample_id) == list(range(len(trainer.train_dataset)))  # one epoch: each sample once
    local = {p.name: p.read_bytes() for p in (out / "qtuning_ledger").glob("*.parquet")}
    assert len(local) >= 2  # flushed at the checkpoint of step 3 and at the end
    remote = Path(
        mlflow.artifacts.download_artifacts(
            run_id=callback.run_id, artifact_path="qtuning_ledger", dst_path=str(tmp_path), tracking_uri=client.tracking_uri
        )
    )
    assert {p.name: p.read_bytes() for p in remote.glob("*.parquet")} == local
    assert len(read_ledger(remote)) == STEPS * BATCH * GA


def test_figures_page_summary_and_selection(qtuning_run, tmp_path):
    trainer, callback, client, out = qtuning_run
    run_id = callback.run_id
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"figures", "qtuning_ledger", "qtuning_selection", "qtuning_summary.json", "qtuning_report.md",
            "qtuning_samples.html"} <= names
    eu = sorted(a.path for a in client.list_artifacts(run_id, "figures/eu_plane"))
    assert eu == [f"figures/eu_plane/eu_plane_step_{s:06d}.png" for s in (1, 2, 4, 6)]
    figures = {a.path for a in client.list_artifacts(run_id, "figures")}
    assert {"figures/quadrant_shares.png", "figures/realised_budgets.png"} <= figures
    assert (out / "qtuning_tracking" / "figures" / "quadrant_shares.png").read_bytes()[:4] == b"\x89PNG"

    ledger = read_ledger(out / "qtuning_ledger").to_pandas()
    summary = json.loads((out / "qtuning_summary.json").read_text())
    assert summary["samples_scored"] == len(ledger) == STEPS * BATCH * GA
    assert sum(q["count"] for q in summary["quadrants"].values()) == len(ledger)
    assert summary["quadrants"]["q2"]["count"] == int((ledger.quadrant == 2).sum())
    assert sum(summary["decisions"].values()) == len(ledger)
    kept = ledger.decision.isin(["kept", "token_pruned", "filled"])
    assert summary["realised"]["sample_keep_ratio"] == pytest.approx(kept.mean())
    assert summary["realised"]["label_tokens_trained"] == int(ledger.kept_tokens[kept].sum())
    assert summary["scoring"]["steps_timed"] == STEPS and summary["scoring"]["total_seconds"] > 0
    assert summary["train"]["train_loss"] > 0
    assert summary["most_dropped"] and summary["most_dropped"][0]["dropped"] >= 1
    report = (out / "qtuning_report.md").read_text()
    assert "## Quadrants" in report and "Most-dropped samples" in report
    downloaded = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="qtuning_summary.json", dst_path=str(tmp_path), tracking_uri=client.tracking_uri
        )
    )
    assert json.loads(downloaded.read_text()) == summary

    selection = load_selection(out / "qtuning_selection").to_pandas()
    assert len(selection) == len(trainer.train_dataset) and (selection.epoch == 0).all()
    assert selection.kept.sum() == kept.sum()
    assert kept_sample_ids(out / "qtuning_selection", epoch=0) == sorted(ledger.sample_id[kept].tolist())

    page = (out / "qtuning_tracking" / "qtuning_samples.html").read_text()
    assert page.startswith("<!DOCTYPE html>")
    pruned_rows = ledger[ledger.decision == "token_pruned"]
    if len(pruned_rows):
        assert "class='tok pruned'" in page
        assert page.count("class='tok pruned'") >= len(pruned_rows.iloc[-1].pruned_positions)


def test_plain_sft_run_and_compare(tracking, tmp_path, capsys):
    """A run with Q-Tuning off (plain SFT path, transformers' MLflowCallback) and one with it on; compare both."""
    client, experiment = tracking
    tokenizer = make_tiny_tokenizer()
    data = make_arithmetic_dataset(24, seed=1)
    eval_data = make_arithmetic_dataset(8, seed=2)
    for name, enabled in (("plain-sft", False), ("qtuning", True)):
        trainer = QTuningSFTTrainer(
            model=make_tiny_model(tokenizer),
            args=tiny_config(
                tmp_path / name, report_to=["mlflow"], max_steps=3, qtuning_enabled=enabled, run_name=name,
                eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=4,
            ),
            train_dataset=data,
            eval_dataset=eval_data,
            processing_class=tokenizer,
        )
        if enabled:
            attach_tracking(trainer)  # the plain run keeps transformers' own MLflowCallback
        trainer.train()
    mlflow.flush_async_logging()
    from trl_qtuning.cli.main import main

    figure = tmp_path / "compare.png"
    assert main(["compare", "--experiment", experiment, "--output", str(figure)]) == 0
    printed = capsys.readouterr().out
    lines = {line.split()[0]: line for line in printed.splitlines() if line.startswith(("plain-sft", "qtuning"))}
    assert " sft " in lines["plain-sft"] and " qtuning " in lines["qtuning"]
    assert "eval_loss" in printed
    assert figure.read_bytes()[:4] == b"\x89PNG"
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    comparison = [r for r in runs if r.data.tags.get("qtuning.kind") == "comparison"]
    assert len(comparison) == 1
    assert [a.path for a in client.list_artifacts(comparison[0].info.run_id, "figures")] == ["figures/comparison.png"]
    assert main(["compare", "--experiment", "no-such-experiment", "--no-log"]) == 2


def test_user_active_run_is_used_and_left_open(tracking, tmp_path):
    client, experiment = tracking
    with mlflow.start_run(experiment_id=client.get_experiment_by_name(experiment).experiment_id) as active:
        trainer = build_trainer(tmp_path, report_to=["mlflow"], max_steps=1)
        callback = attach_tracking(trainer)
        trainer.train()
        assert callback.run_id == active.info.run_id
        assert client.get_run(active.info.run_id).info.status == "RUNNING"
    assert "qtuning/q2_share" in client.get_run(active.info.run_id).data.metrics


@pytest.mark.parametrize("how", ["active_run", "MLFLOW_RUN_ID"])
def test_a_run_we_did_not_create_gets_the_qtuning_tags(tracking, tmp_path, monkeypatch, how):
    """Issue 27: inside ``with mlflow.start_run()`` (or with MLFLOW_RUN_ID) the run got params and metrics but no
    ``qtuning.*`` tags, so the docs' filter found nothing."""
    client, experiment = tracking
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    trainer = build_trainer(tmp_path, report_to=["mlflow"], max_steps=1, sample_keep_ratio=0.5)
    if how == "active_run":
        with mlflow.start_run(experiment_id=experiment_id) as run:
            trainer.train()
    else:
        run = client.create_run(experiment_id)
        monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
        trainer.train()
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["qtuning.method"] == "qtuning" and tags["qtuning.sample_keep_ratio"] == "0.5"
    found = client.search_runs([experiment_id], filter_string="tags.`qtuning.method` = 'qtuning'")
    assert [r.info.run_id for r in found] == [run.info.run_id]


def test_arguments_win_over_the_mlflow_variables_and_leave_them_alone(tracking, tmp_path, monkeypatch):
    """What the bench and the quantisation fallback pass: tags set after MLFLOW_TAGS's, an experiment and a run name
    of their own, and a new run whatever MLFLOW_RUN_ID says; no variable is read back or rewritten."""
    import os

    client, experiment = tracking
    existing = client.create_run(client.get_experiment_by_name(experiment).experiment_id)
    monkeypatch.setenv("MLFLOW_RUN_ID", existing.info.run_id)
    monkeypatch.setenv("MLFLOW_TAGS", json.dumps({"team": "nlp", "stage": "env"}))
    other = f"{experiment}-other"
    client.create_experiment(other, artifact_location=str(tmp_path / "artifacts"))
    before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    trainer = build_trainer(tmp_path, report_to=["mlflow"], max_steps=1, run_name="from-args")
    callback = attach_tracking(
        trainer, tracking_uri=client.tracking_uri, experiment=other, tags={"stage": "arg"}, new_run=True
    )
    with pytest.raises(TypeError, match="unknown tracking option"):
        attach_tracking(trainer, experiment_name="typo")
    trainer.train()
    run = client.get_run(callback.run_id)
    assert run.info.run_id != existing.info.run_id and run.info.run_name == "from-args"
    assert run.info.experiment_id == client.get_experiment_by_name(other).experiment_id
    assert run.data.tags["team"] == "nlp" and run.data.tags["stage"] == "arg"
    assert run.data.tags["qtuning.method"] == "qtuning"
    assert run.data.params["sample_keep_ratio"] == str(trainer.args.sample_keep_ratio)
    assert {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")} == before


def _dead_uri() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_an_earlier_runs_unsent_queue_and_files_survive_a_fresh_run_and_sync_sends_them(tracking, tmp_path, monkeypatch):
    """Issue 27: run A queues everything (server unreachable); a fresh run B into the same output_dir used to delete
    A's queue after its first flush and overwrite A's summary, report and selection. They are moved aside, named by
    A's run, and `sync` sends A's own files to A's run."""
    from trl_qtuning.tracking import sync_pending

    client, experiment = tracking
    uri = client.tracking_uri
    out = tmp_path / "out"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _dead_uri())
    build_trainer(out, report_to=["mlflow"], max_steps=2, run_name="run-a").train()
    assert (out / "qtuning_tracking" / "pending.jsonl").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    b = build_trainer(out, report_to=["mlflow"], max_steps=1, run_name="run-b")
    callback_b = attach_tracking(b)
    b.train()
    [ledger_a] = sorted(out.glob("qtuning_ledger.previous-*"))
    tag = ledger_a.name.split(".previous-")[1]  # A's files are named after A's ledger run
    aside = out / f"qtuning_tracking.previous-{tag}"
    assert (aside / "pending.jsonl").exists()
    assert json.loads((out / f"qtuning_summary.previous-{tag}.json").read_text())["steps"] == 2
    assert (out / f"qtuning_report.previous-{tag}.md").exists() and (out / f"qtuning_selection.previous-{tag}").is_dir()
    assert json.loads((out / "qtuning_summary.json").read_text())["steps"] == 1  # B's own
    assert client.get_run(callback_b.run_id).info.run_name == "run-b"
    assert sync_pending(str(out), tracking_uri=uri)
    assert not (aside / "pending.jsonl").exists()
    run_a = client.get_run(json.loads((aside / "run.json").read_text())["run_id"])
    assert run_a.info.run_name == "run-a" and run_a.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_a.info.run_id, "loss")] == [1, 2]
    summary = mlflow.artifacts.download_artifacts(
        run_id=run_a.info.run_id, artifact_path="qtuning_summary.json", dst_path=str(tmp_path / "dl"), tracking_uri=uri
    )
    assert json.loads(Path(summary).read_text())["steps"] == 2
    remote = Path(mlflow.artifacts.download_artifacts(
        run_id=run_a.info.run_id, artifact_path="qtuning_ledger", dst_path=str(tmp_path / "dl"), tracking_uri=uri
    ))  # fmt: skip
    assert {p.name: p.read_bytes() for p in remote.glob("*.parquet")} == {
        p.name: p.read_bytes() for p in ledger_a.glob("*.parquet")
    }


def test_a_resumed_run_keeps_the_unsent_queue_of_the_process_before_it(tracking, tmp_path, monkeypatch):
    """The process before a resume left its queue; the resumed process's sink neither overwrites nor deletes it."""
    from trl_qtuning.tracking import sync_pending

    client, _ = tracking
    out = tmp_path / "out"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _dead_uri())
    build_trainer(out, report_to=["mlflow"], max_steps=2, save_strategy="steps", save_steps=1).train()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
    resumed = build_trainer(out, report_to=["mlflow"], max_steps=2, save_strategy="steps", save_steps=1)
    callback = attach_tracking(resumed)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    [earlier] = sorted((out / "qtuning_tracking").glob("pending.previous-*.jsonl"))
    assert callback.run_id is not None and not (out / "qtuning_tracking" / "pending.jsonl").exists()
    assert sync_pending(str(out), tracking_uri=client.tracking_uri)
    assert not earlier.exists()
    from trl_qtuning.tracking.sink import run_file_of

    run_id = json.loads(run_file_of(earlier).read_text())["run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2]
    assert [m.step for m in client.get_metric_history(callback.run_id, "loss")] == [2]


def test_default_store_when_no_uri_is_set(monkeypatch, tmp_path):
    """No MLFLOW_TRACKING_URI: the callback uses MLflow's own default (a local SQLite database)."""
    from mlflow.tracking._tracking_service import utils

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(utils, "_tracking_uri", None)
    monkeypatch.chdir(tmp_path)
    from trl_qtuning.tracking.sink import MLflowSink

    sink = MLflowSink(tmp_path / "spool")
    assert sink.tracking_uri.startswith("sqlite:")
    assert sink.tracking_uri == mlflow.get_tracking_uri()


def test_default_run_name_is_readable_and_not_seeded():
    """MLflow's random run names repeat once the trainer seeds `random`; ours name the folder and budgets."""
    import random
    from types import SimpleNamespace

    from trl_qtuning.tracking.callback import _default_run_name

    random.seed(0)
    qtuning = SimpleNamespace(output_dir="/x/my-run", qtuning_enabled=True, sample_keep_ratio=0.25, token_keep_ratio=0.5)
    assert _default_run_name(qtuning).startswith("my-run-qtuning-0.25x0.5-")
    plain = SimpleNamespace(output_dir="/x/base", qtuning_enabled=False)
    assert _default_run_name(plain).startswith("base-sft-")


def test_dataset_digest_is_the_users_data_not_the_added_id_column(tmp_path):
    """A Q-Tuning run and an SFT run of the same data log the same MLflow dataset digest (the sample-id column
    Q-Tuning adds is left out), so MLflow shows them as trained on one dataset."""
    from trl import SFTTrainer

    from trl_qtuning.tracking.callback import QTuningMLflowCallback

    data = make_arithmetic_dataset(16, seed=1)
    qtuning = build_trainer(tmp_path / "q", dataset=data)
    tokenizer = make_tiny_tokenizer()
    sft = SFTTrainer(model=make_tiny_model(tokenizer), args=tiny_config(tmp_path / "s", qtuning_enabled=False),
                     train_dataset=data, processing_class=tokenizer)  # fmt: skip
    assert "qtuning_sample_id" in qtuning.train_dataset.column_names
    digests = [QTuningMLflowCallback(trainer=t)._dataset_input()["digest"] for t in (qtuning, sft)]
    assert digests[0] == digests[1]


def test_eu_plane_figure_of_a_baseline_step_warns_nothing():
    """Baseline policies have no quantile level (NaN thresholds): the figure says nothing of q, and numpy's
    'Mean of empty slice' RuntimeWarning no longer leaks."""
    import warnings

    from trl_qtuning.tracking.figures import eu_plane_figure

    nan = float("nan")
    columns = {"ppl": [2.0, 3.0, 4.0], "entropy": [1.0, 2.0, 1.5], "quadrant": [0, 0, 0],
               "decision": ["kept", "dropped", "dropped"]}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fig = eu_plane_figure(3, columns, [{"q": nan, "ppl_lo": nan, "ppl_hi": nan, "ent_lo": nan, "ent_hi": nan}])
    assert "q =" not in fig.axes[0].get_title()


def test_compare_picks_eval_columns_by_meaning_and_the_newest_runs(tracking):
    from trl_qtuning.tracking.compare import collect_rows, eval_columns

    client, experiment = tracking
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    for i in range(5):
        run = client.create_run(experiment_id, start_time=1000 * (i + 1), run_name=f"r{i}")
        for key, value in {"eval_num_tokens": 5.0, "eval_accuracy": 0.5, "eval_loss": 1.0 + i, "eval_runtime": 3.0,
                           "eval/nll": 2.0, "eval_samples_per_second": 9.0}.items():  # fmt: skip
            client.log_metric(run.info.run_id, key, value)
    client.create_run(experiment_id, start_time=9000, tags={"qtuning.kind": "comparison"})  # never compared

    rows = collect_rows(experiment_id, max_runs=3)
    assert [r["run_name"] for r in rows] == ["r3", "r4"]  # the newest, oldest first, the comparison run left out
    assert [r["eval"]["eval_loss"] for r in rows] == [4.0, 5.0] and rows[0]["method"] == "sft"
    assert rows[0]["realised_sample_keep"] == 1.0 and rows[0]["sample_keep_ratio"] is None
    assert eval_columns(rows) == ["eval_loss", "eval/nll", "eval_accuracy"]  # loss first; counters and timings out


def test_compare_figure_plots_held_out_loss_when_runs_have_it(tmp_path):
    pytest.importorskip("matplotlib")
    from trl_qtuning.tracking.compare import comparison_figure

    class Client:
        def get_metric_history(self, run_id, key):
            return []

    base = {"run_id": "a", "run_name": "a", "method": "sft", "realised_sample_keep": 1.0, "train_loss": 0.5}
    with_eval = [{**base, "eval": {"eval_loss": 1.25}}, {**base, "run_id": "b", "realised_sample_keep": 0.25,
                                                          "train_loss": 0.2, "eval": {"eval_loss": 1.5}}]  # fmt: skip
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no history to plot: no empty legend ("No artists with labels")
        axis = comparison_figure(Client(), with_eval, "x").axes[1]
    assert "held-out" in axis.get_ylabel() and sorted(axis.collections[1].get_offsets()[:, 1]) == [1.5]
    without = [{**row, "eval": {}} for row in with_eval]
    assert "TRAIN loss" in comparison_figure(Client(), without, "x").axes[1].get_title()


@pytest.mark.parametrize(
    ("settings", "label"),
    [
        ({}, "qtuning"),
        ({"sample_policy": "random", "token_policy": "random"}, "random-random"),
        ({"token_prune_q4": True}, "qtuning+q4-tokens"),
        ({"eu_plane": "decorrelated", "neighbor_mode": "mean"}, "qtuning+decorrelated+neighbor-mean"),
        ({"token_policy": "random", "sample_policy": "infobatch"}, "infobatch-random"),
    ],
)
def test_method_labels_show_the_pair_and_every_ablation(tmp_path, settings, label):
    from trl_qtuning.config import run_label
    from trl_qtuning.tracking.callback import run_tags

    args = tiny_config(tmp_path, **settings)
    assert run_label(args) == label
    tags = run_tags(args)
    assert tags["qtuning.method"] == label and "qtuning.eu_plane" in tags and "qtuning.token_prune_q4" in tags


def test_compare_against_an_unreachable_server_fails_in_seconds(tmp_path):
    """Issue 27: `trl-qtuning compare` waited about 4 minutes (MLflow's default HTTP retries) before failing."""
    import os
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    cmd = [sys.executable, "-m", "trl_qtuning.tracking.compare", "--experiment", "x", "--no-log"]
    cmd += ["--tracking-uri", _dead_uri()]
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and "cannot reach the tracking store" in done.stderr
    assert time.monotonic() - start < 60


def test_sync_failure_says_nothing_was_sent_not_that_training_continues(tmp_path, caplog):
    from trl_qtuning.tracking.__main__ import main as tracking_cli
    from trl_qtuning.tracking.sink import MLflowSink

    sink = MLflowSink(tmp_path / "qtuning_tracking", tracking_uri=_dead_uri())
    sink.log_metrics({"loss": 1.0}, step=1)
    queue = sink.persist()
    caplog.set_level("WARNING", logger="trl_qtuning.tracking")
    assert tracking_cli(["sync", str(tmp_path)]) == 1
    [message] = [r.getMessage() for r in caplog.records if r.name == "trl_qtuning.tracking"]
    assert "Training continues" not in message and "nothing was sent" in message and str(queue) in message
    assert queue.exists()


def test_evaluate_before_train_keeps_the_runs_own_tracking_folder(tracking, tmp_path, caplog):
    """`trainer.evaluate()` before `train()` starts MLflow tracking (TRL's usual before/after pattern); the fresh run's
    set-aside at `train()` must not take that folder, which is this run's, for an earlier run's."""
    client, _ = tracking
    out = tmp_path / "out"
    tokenizer = make_tiny_tokenizer()
    trainer = QTuningSFTTrainer(
        model=make_tiny_model(tokenizer), args=tiny_config(out, report_to=["mlflow"], max_steps=1),
        train_dataset=make_arithmetic_dataset(48, seed=1), eval_dataset=make_arithmetic_dataset(8, seed=2),
        processing_class=tokenizer,
    )  # fmt: skip
    callback = attach_tracking(trainer)
    trainer.evaluate()
    with caplog.at_level("WARNING", logger="trl_qtuning.tracking"):
        trainer.train()
    assert not list(out.glob("qtuning_tracking.previous-*"))
    assert not any("held the tracking outputs of an earlier run" in r.getMessage() for r in caplog.records)
    run = client.get_run(callback.run_id)
    assert "eval_loss" in run.data.metrics and "train_loss" in run.data.metrics  # one run holds both


def test_mlflow_integration_turned_off_is_named_for_training_only(monkeypatch):
    """transformers' DISABLE_MLFLOW_INTEGRATION stops the MLflowCallback our tracking runs: a training run says so;
    the audit and compare, which log through their own client, are not affected."""
    from trl_qtuning.tracking import require_mlflow

    monkeypatch.setenv("DISABLE_MLFLOW_INTEGRATION", "TRUE")
    require_mlflow()
    with pytest.raises(RuntimeError, match="DISABLE_MLFLOW_INTEGRATION"):
        require_mlflow(integration=True)
    monkeypatch.delenv("DISABLE_MLFLOW_INTEGRATION")
    require_mlflow(integration=True)


def test_decision_rows_of_a_long_run_are_compacted_once_and_kept_in_order():
    """Every 256 steps become one frame (a long run's rows are copied once); the rows and per-step counts stay."""
    from trl_qtuning.step.events import StepDecisions
    from trl_qtuning.tracking.recorder import DecisionAccumulator

    acc = DecisionAccumulator()
    for step in range(1, 601):
        columns = {"step": [step, step], "epoch": [0, 0], "sample_id": [2 * step, 2 * step + 1], "quadrant": [1, 3],
                   "decision": ["dropped", "kept"], "response_tokens": [4, 5], "kept_tokens": [0, 5]}  # fmt: skip
        acc(StepDecisions(step=step, columns=columns, thresholds=[], scoring_seconds=0.5))
    assert len(acc._frames) == 2 + (600 - 512)
    rows = acc.rows()
    assert rows["step"].tolist() == [s for step in range(1, 601) for s in (step, step)]
    assert rows["sample_id"].tolist() == list(range(2, 1202))
    per_step = acc.per_step()
    assert len(per_step) == 600 and int(per_step["kept_samples"].sum()) == 600


def test_a_second_train_is_a_run_of_its_own(tracking, tmp_path):
    """``trainer.train()`` twice (a notebook): the second training gets its own run, with its own step-1 metrics and
    outputs, instead of appending to the first, finished one."""
    client, _ = tracking
    trainer = build_trainer(tmp_path, report_to=["mlflow"], max_steps=1)
    callback = attach_tracking(trainer)
    run_ids = []
    for _ in range(2):
        trainer.train()
        run_ids.append(callback.run_id)
    assert run_ids[0] != run_ids[1]
    for run_id in run_ids:
        assert client.get_run(run_id).info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run_id, "qtuning/q2_share")] == [1]
        assert "qtuning_summary.json" in {a.path for a in client.list_artifacts(run_id)}


@pytest.mark.parametrize("recorded", ['{"run_id": 123}', '{"run_id": ""}', "[]", "not json"])
def test_a_damaged_run_id_on_disk_is_no_run_id(tmp_path, recorded):
    """A queue header or run.json whose run id is not a non-empty string (a damaged file) reads as no run: the queue is
    set aside under the time it was written, and the bench records no run for the cell."""
    from trl_qtuning.bench.mlflow_runs import run_id_from_disk
    from trl_qtuning.ledger import modified_tag
    from trl_qtuning.tracking.outputs import TRACKING_DIR
    from trl_qtuning.tracking.sink import PENDING_FILE, RUN_FILE, set_aside_queue

    spool = tmp_path / TRACKING_DIR
    spool.mkdir()
    (spool / RUN_FILE).write_text(recorded)
    (spool / PENDING_FILE).write_text(recorded + "\n")
    assert run_id_from_disk(tmp_path) is None
    tag = modified_tag(spool / PENDING_FILE)
    moved = set_aside_queue(spool)
    assert moved == spool / f"pending.previous-{tag}.jsonl" and moved.read_text() == recorded + "\n"
