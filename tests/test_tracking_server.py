"""MLflow tracking against a real ``mlflow server`` on 127.0.0.1 (HTTP tracking, artifacts served by the server),
including a server that is down at start, one killed mid-run, and a queue sent after training ended."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("matplotlib")
requests = pytest.importorskip("requests")

from transformers import TrainerCallback  # noqa: E402

from tests.trainer_helpers import build_trainer  # noqa: E402
from trl_qtuning import read_ledger  # noqa: E402
from trl_qtuning.tracking import attach_tracking, sync_pending  # noqa: E402

pytestmark = pytest.mark.slow  # every test here starts a real `mlflow server` process

START_TIMEOUT = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` bound to 127.0.0.1 with a SQLite backend and served artifacts; restartable on one port."""

    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = root / "server.log"

    def healthy(self) -> bool:
        try:
            return requests.get(self.uri + "/health", timeout=1).ok
        except requests.RequestException:
            return False

    def start(self) -> None:
        assert self.proc is None
        exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
        cmd = [
            exe, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            if self.healthy():
                return
            time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"mlflow server not healthy after {START_TIMEOUT}s: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL the server's whole process group (it runs uvicorn and a job runner as children)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.proc = None
        deadline = time.monotonic() + 30
        while self.healthy() and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    try:
        srv.start()
        yield srv
    finally:
        srv.kill()


@pytest.fixture()
def http_tracking(server, monkeypatch):
    if server.proc is None:
        server.start()
    name = f"exp-{uuid.uuid4().hex[:8]}"  # created by the callback on the server (mlflow-artifacts: location)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_NESTED_RUN", "MLFLOW_TAGS", "HF_MLFLOW_LOG_ARTIFACTS"):
        monkeypatch.delenv(var, raising=False)
    return mlflow.MlflowClient(tracking_uri=server.uri), name


class Outage(TrainerCallback):
    """Kills the server after step ``kill_at`` and restarts it after step ``back_at``."""

    def __init__(self, server: MlflowServer, kill_at: int | None, back_at: int):
        self.server, self.kill_at, self.back_at = server, kill_at, back_at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.kill_at:
            self.server.kill()
        if state.global_step == self.back_at:
            self.server.start()


def _tracking_warnings(caplog) -> tuple[list[str], list[str]]:
    messages = [r.getMessage() for r in caplog.records if r.name == "trl_qtuning.tracking"]
    return [m for m in messages if "is unreachable" in m], [m for m in messages if "answers again: sent" in m]


def _check_run_complete(client, run_id: str, out: Path, steps: int, tmp_path: Path) -> None:
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # artifacts went through the server
    for key in ("loss", "qtuning/sample_keep_ratio", "qtuning/q2_share"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(1, steps + 1)), key
    assert run.data.params["sample_keep_ratio"] == "0.25"
    assert run.data.tags["qtuning.method"] == "qtuning"
    assert len(run.inputs.dataset_inputs) == 1
    ledger = read_ledger(out / "qtuning_ledger").to_pandas()
    assert sorted(ledger.step.unique()) == list(range(1, steps + 1))
    assert (ledger.groupby("step").size() == 4).all()
    remote = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="qtuning_ledger", dst_path=str(tmp_path / "dl"), tracking_uri=client.tracking_uri
        )
    )
    local = {p.name: p.read_bytes() for p in (out / "qtuning_ledger").glob("*.parquet")}
    assert {p.name: p.read_bytes() for p in remote.glob("*.parquet")} == local
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"figures", "qtuning_summary.json", "qtuning_report.md", "qtuning_samples.html", "qtuning_selection"} <= names
    summary = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="qtuning_summary.json", dst_path=str(tmp_path / "dl"), tracking_uri=client.tracking_uri
    )
    assert json.loads(Path(summary).read_text())["samples_scored"] == steps * 4
    assert not (out / "qtuning_tracking" / "pending.jsonl").exists()


def test_healthy_server(http_tracking, tmp_path):
    client, _ = http_tracking
    out = tmp_path / "out"
    trainer = build_trainer(out, report_to=["mlflow"], max_steps=3, save_strategy="steps", save_steps=2)
    callback = attach_tracking(trainer, eu_plane_every=1)
    trainer.train()
    _check_run_complete(client, callback.run_id, out, 3, tmp_path)
    eu = [a.path for a in client.list_artifacts(callback.run_id, "figures/eu_plane")]
    assert len(eu) == 3


def test_server_killed_mid_run_then_back(server, http_tracking, tmp_path, caplog):
    client, _ = http_tracking
    caplog.set_level(logging.INFO, logger="trl_qtuning.tracking")
    out = tmp_path / "out"
    steps = 8
    trainer = build_trainer(
        out, report_to=["mlflow"], max_steps=steps, save_strategy="steps", save_steps=3,
        callbacks=[Outage(server, kill_at=2, back_at=4)],
    )
    callback = attach_tracking(trainer, eu_plane_every=2)
    start = time.monotonic()
    trainer.train()  # down during steps 3-4 (and the checkpoint of step 3); back for the checkpoint of step 6
    assert trainer.state.global_step == steps
    assert server.healthy()
    unreachable, back = _tracking_warnings(caplog)
    assert len(unreachable) == 1, unreachable  # warned once
    assert "python -m trl_qtuning.tracking sync" in unreachable[0]
    assert len(back) == 1
    assert time.monotonic() - start < 120
    _check_run_complete(client, callback.run_id, out, steps, tmp_path)


def test_server_down_at_start(server, http_tracking, tmp_path, caplog):
    client, experiment = http_tracking
    caplog.set_level(logging.INFO, logger="trl_qtuning.tracking")
    out = tmp_path / "out"
    steps = 4
    trainer = build_trainer(
        out, report_to=["mlflow"], max_steps=steps, save_strategy="steps", save_steps=3,
        callbacks=[Outage(server, kill_at=None, back_at=1)],
    )
    callback = attach_tracking(trainer, eu_plane_every=2)
    server.kill()
    trainer.train()
    assert trainer.state.global_step == steps
    unreachable, back = _tracking_warnings(caplog)
    assert len(unreachable) == 1 and len(back) == 1
    assert callback.run_id is not None
    assert client.get_run(callback.run_id).info.experiment_id == client.get_experiment_by_name(experiment).experiment_id
    _check_run_complete(client, callback.run_id, out, steps, tmp_path)


def test_unsent_queue_is_kept_and_synced_later(server, http_tracking, tmp_path, monkeypatch, caplog):
    """A server that never answers during training: nothing lost; `python -m trl_qtuning.tracking sync` sends it."""
    client, experiment = http_tracking
    dead = f"http://127.0.0.1:{_free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    out = tmp_path / "out"
    trainer = build_trainer(out, report_to=["mlflow"], max_steps=3, save_strategy="steps", save_steps=2)
    callback = attach_tracking(trainer)
    start = time.monotonic()
    trainer.train()
    assert time.monotonic() - start < 60  # a dead server does not stall training
    assert callback.run_id is None
    pending = out / "qtuning_tracking" / "pending.jsonl"
    assert pending.exists()
    assert len(_tracking_warnings(caplog)[0]) == 1
    assert (out / "qtuning_summary.json").exists() and (out / "qtuning_tracking" / "qtuning_samples.html").exists()
    from trl_qtuning.tracking.__main__ import main as tracking_cli

    assert tracking_cli(["sync", str(out), "--tracking-uri", dead]) == 1  # still down: kept for later
    assert pending.exists()
    assert sync_pending(str(out), tracking_uri=server.uri)
    assert not pending.exists()
    run_id = json.loads((out / "qtuning_tracking" / "run.json").read_text())["run_id"]
    assert client.get_run(run_id).info.experiment_id == client.get_experiment_by_name(experiment).experiment_id
    _check_run_complete(client, run_id, out, 3, tmp_path)
