"""A fault-tolerant MLflow writer: everything goes through an outbox that is sent when the server answers.

Training must never stall or crash because of tracking. So:

* every parameter, tag, metric, dataset input and artifact is queued first, then sent in order;
* before sending to an HTTP(S) tracking server, ``/health`` is probed with a short timeout, and MLflow's own HTTP
  retries are shortened for our calls (unless the user set ``MLFLOW_HTTP_REQUEST_*`` themselves), so a dead server
  costs about a second, not MLflow's default minutes of back-off;
* on the first failure a warning is printed once (per outage), the queue is kept, and sending is retried at the next
  checkpoint save, at the end of training, or ``retry_interval`` seconds later, whichever comes first;
* whatever is still unsent at the end is written to ``<spool>/pending.jsonl`` and can be sent later with
  ``python -m trl_qtuning.tracking sync OUTPUT_DIR``. Artifacts are files under ``output_dir``, so nothing is lost;
* a sink only ever deletes the queue file it wrote or was loaded from, once everything in it is sent. A queue left
  by an earlier training process is moved aside (:func:`set_aside_queue`), never overwritten, and ``sync`` sends
  every queue of an ``output_dir`` (:func:`queue_files`), those of earlier runs moved aside included.

The run itself is created lazily, so a server that is down when training starts only delays it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "MLflowSink", "PENDING_FILE", "RUN_FILE", "fast_fail_http", "queue_files", "recorded_run_id", "rewrite_queue_paths",
    "set_aside_queue",
]  # fmt: skip

logger = logging.getLogger("trl_qtuning.tracking")

PENDING_FILE = "pending.jsonl"
RUN_FILE = "run.json"
_QUEUE_GLOB = "pending*.jsonl"

_FAST_FAIL_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
_PROBE_TIMEOUT = 2.0
"""Seconds an HTTP(S) server has to answer ``GET /health``."""


@contextlib.contextmanager
def fast_fail_http():
    """Shorten MLflow's HTTP retries for the calls inside (user-set values are left alone)."""
    added = [name for name in _FAST_FAIL_ENV if name not in os.environ]
    for name in added:
        os.environ[name] = _FAST_FAIL_ENV[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


@dataclass
class _RunSpec:
    experiment_name: str | None = None
    experiment_id: str | None = None
    run_name: str | None = None
    run_id: str | None = None
    """An existing run to log into (MLFLOW_RUN_ID, or the caller's active run)."""
    parent_run_id: str | None = None
    end_run: bool = True
    """Terminate the run at the end (False when it belongs to the caller)."""
    tags: dict[str, str] = field(default_factory=dict)
    """Set when the run is created, or, on an existing run, sent first."""


class MLflowSink:
    """Queue MLflow writes for one run and send them whenever the tracking server answers."""

    def __init__(
        self,
        spool_dir: str | os.PathLike,
        *,
        tracking_uri: str | None = None,
        experiment_name: str | None = None,
        experiment_id: str | None = None,
        run_name: str | None = None,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        end_run: bool = True,
        tags: dict[str, str] | None = None,
        retry_interval: float = 30.0,
        queue_file: str | os.PathLike | None = None,
        during_training: bool = True,
    ):
        import mlflow

        self.spool_dir = Path(spool_dir)
        self.queue_file = Path(queue_file) if queue_file is not None else self.spool_dir / PENDING_FILE
        """Where :meth:`persist` writes the unsent queue (``sync`` loads a sink from it)."""
        self.during_training = during_training
        """False for ``sync``: the outage warning then says nothing of training."""
        self._owns_queue_file = queue_file is not None  # deleted once sent only if written or loaded by this sink
        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        self.spec = _RunSpec(experiment_name, experiment_id, run_name, run_id, parent_run_id, end_run, dict(tags or {}))
        self.run_id: str | None = run_id
        self.retry_interval = retry_interval
        self.pending: list[dict[str, Any]] = []
        self.online = True
        self._last_failure = -float("inf")
        self._client = None
        if run_id is not None:  # a run we did not create gets its tags like one we create
            self.set_tags(self.spec.tags)

    # ------------------------------------------------------------------ queueing
    def log_params(self, params: dict[str, Any]) -> None:
        if params:
            self.pending.append({"op": "params", "params": {k: str(v) for k, v in params.items()}})

    def set_tags(self, tags: dict[str, Any]) -> None:
        if tags:
            self.pending.append({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_metrics(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        if metrics:
            ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
            self.pending.append({"op": "metrics", "step": int(step), "ts": ts, "metrics": dict(metrics)})

    def log_input(self, dataset: dict[str, Any], context: str = "train") -> None:
        """``dataset``: the fields of ``mlflow.entities.Dataset`` (name, digest, source_type, source, schema, profile)."""
        self.pending.append({"op": "input", "dataset": dataset, "context": context})

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file or a folder (its content at send time) under ``artifact_path``."""
        self.pending.append({"op": "artifact", "path": str(local_path), "artifact_path": artifact_path})

    def end(self, status: str = "FINISHED") -> None:
        self.pending.append({"op": "end", "status": status})

    # ------------------------------------------------------------------ sending
    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def reachable(self) -> bool:
        """HTTP(S) servers: ``GET /health`` answers 200 in time. Other stores: assumed reachable."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return True
        import requests

        try:
            return requests.get(self.tracking_uri.rstrip("/") + "/health", timeout=_PROBE_TIMEOUT).ok
        except Exception:
            return False

    def flush(self, *, force: bool = False) -> bool:
        """Send what is queued. Returns True when nothing is left. Never raises.

        While offline, only tries again when ``force`` (checkpoint save, end of training) or after ``retry_interval``.
        """
        if not self.pending and self.run_id is not None:
            return True
        if not self.online and not force and time.monotonic() - self._last_failure < self.retry_interval:
            return False
        if not self.reachable():
            self._failed(f"no answer from {self.tracking_uri.rstrip('/')}/health")
            return False
        sent = 0
        try:
            with fast_fail_http():
                self._ensure_run()
                while self.pending:
                    self._send(self.pending[0])
                    self.pending.pop(0)
                    sent += 1
        except Exception as exc:  # anything MLflow or the network raises: keep the queue, carry on training
            self._failed(f"{type(exc).__name__}: {exc}")
            return False
        if not self.online:
            logger.warning(
                "MLflow tracking at %s answers again: sent %d queued item(s) to run %s.", self.tracking_uri, sent,
                self.run_id,
            )
        self.online = True
        if self._owns_queue_file:  # everything in it was sent; a queue another process left is not this sink's
            self.queue_file.unlink(missing_ok=True)
            self._owns_queue_file = False
        return True

    def _failed(self, reason: str) -> None:
        self._last_failure = time.monotonic()
        if self.online and not self.during_training:
            logger.warning(
                "MLflow tracking at %s is unreachable (%s): nothing was sent; the queue stays in %s for the next "
                "`python -m trl_qtuning.tracking sync`.", self.tracking_uri, reason[:300], self.queue_file,
            )
        elif self.online:
            logger.warning(
                "MLflow tracking at %s is unreachable (%s). Training continues; metrics and artifacts are kept "
                "under %s and will be sent when the server answers again (next checkpoint save or end of training). "
                "Anything still unsent at the end can be sent with `python -m trl_qtuning.tracking sync %s`.",
                self.tracking_uri, reason[:300], self.spool_dir, self.spool_dir.parent,
            )
        self.online = False

    def _ensure_run(self) -> None:
        if self.run_id is not None:
            self._write_run_file()
            return
        from mlflow.tracking.context.registry import resolve_tags

        client = self.client
        experiment_id = self.spec.experiment_id
        if experiment_id is None and self.spec.experiment_name:
            experiment = client.get_experiment_by_name(self.spec.experiment_name)
            experiment_id = (
                experiment.experiment_id if experiment is not None else client.create_experiment(self.spec.experiment_name)
            )
        if experiment_id is None:
            from mlflow.tracking.fluent import _get_experiment_id

            experiment_id = _get_experiment_id() or "0"
        tags = dict(self.spec.tags)
        if self.spec.parent_run_id:
            tags["mlflow.parentRunId"] = self.spec.parent_run_id
        run = client.create_run(str(experiment_id), tags=resolve_tags(tags), run_name=self.spec.run_name)
        self.run_id = run.info.run_id
        self.spec.experiment_id = str(experiment_id)
        self._write_run_file()

    def _write_run_file(self) -> None:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        info = {"run_id": self.run_id, "tracking_uri": self.tracking_uri, "experiment_id": self.spec.experiment_id}
        run_file_of(self.queue_file).write_text(json.dumps(info, indent=2))

    def _send(self, op: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client, run_id = self.client, self.run_id
        kind = op["op"]
        if kind == "params":  # MLflow splits a batch into the sizes the store accepts
            client.log_batch(run_id, params=[Param(k, v) for k, v in op["params"].items()], synchronous=True)
        elif kind == "tags":
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in op["tags"].items()], synchronous=True)
        elif kind == "metrics":
            metrics = [Metric(k, float(v), op["ts"], op["step"]) for k, v in op["metrics"].items()]
            client.log_batch(run_id, metrics=metrics, synchronous=True)
        elif kind == "input":
            from mlflow.entities import Dataset, DatasetInput, InputTag

            dataset = Dataset(**op["dataset"])
            client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", op["context"])])])
        elif kind == "artifact":
            path = Path(op["path"])
            if path.is_dir():
                client.log_artifacts(run_id, str(path), op["artifact_path"])
            elif path.exists() and op.get("name", path.name) != path.name:  # a file moved aside: its own name
                import shutil
                import tempfile

                with tempfile.TemporaryDirectory() as tmp:
                    client.log_artifact(run_id, shutil.copy(path, Path(tmp) / op["name"]), op["artifact_path"])
            elif path.exists():
                client.log_artifact(run_id, str(path), op["artifact_path"])
            else:
                logger.warning("Q-Tuning tracking: %s no longer exists; not uploaded.", path)
        elif kind == "end":
            if self.spec.end_run:
                client.set_terminated(run_id, op["status"])
        else:  # pragma: no cover - written by this module only
            raise ValueError(f"unknown outbox operation {kind!r}")

    # ------------------------------------------------------------------ persistence of what could not be sent
    def persist(self) -> Path | None:
        """Write the unsent queue to ``<spool>/pending.jsonl`` (for ``python -m trl_qtuning.tracking sync``)."""
        if not self.pending:
            return None
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        header = {"op": "header", **self.spec.__dict__, "tracking_uri": self.tracking_uri, "run_id": self.run_id}
        _write_queue(self.queue_file, [header, *self.pending])
        self._owns_queue_file = True
        return self.queue_file

    @classmethod
    def from_pending(cls, spool_dir: str | os.PathLike, tracking_uri: str | None = None) -> MLflowSink:
        """Rebuild the sink of an earlier training process from its queue: ``<spool>/pending.jsonl``, or the queue
        file given as ``spool_dir`` (one moved aside, ``pending.previous-<tag>.jsonl``)."""
        queue_file = Path(spool_dir)
        if queue_file.is_dir():
            queue_file = queue_file / PENDING_FILE
        lines = queue_file.read_text().splitlines()
        header = json.loads(lines[0])
        spec = {name: header.get(name) for name in ("experiment_name", "experiment_id", "run_name", "run_id",
                                                    "parent_run_id", "tags")}  # fmt: skip
        sink = cls(
            queue_file.parent, queue_file=queue_file, during_training=False,
            tracking_uri=tracking_uri or header["tracking_uri"], end_run=header.get("end_run", True), **spec,
        )  # fmt: skip
        sink.pending = [json.loads(line) for line in lines[1:] if line.strip()]
        return sink


def _write_queue(path: Path, records: list[dict[str, Any]]) -> None:
    """Write a queue file atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def run_file_of(queue_file: Path) -> Path:
    """The run id's file next to a queue: ``run.json`` for ``pending.jsonl``, ``run.previous-<tag>.json`` for a
    queue moved aside as ``pending.previous-<tag>.jsonl``."""
    return queue_file.with_name("run" + queue_file.name[len("pending") : -len(".jsonl")] + ".json")


def recorded_run_id(path: Path) -> str | None:
    """The MLflow run id a run file (``run*.json``) or a queue's header (the first line of ``pending*.jsonl``)
    records; None where there is none or the file cannot be read."""
    try:
        text = path.read_text()
        run_id = json.loads(text.splitlines()[0] if path.suffix == ".jsonl" else text).get("run_id")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return run_id if isinstance(run_id, str) and run_id else None


def queue_files(folders: list[Path]) -> list[Path]:
    """The unsent queues in ``folders`` (a run's tracking folder and those moved aside): ``pending*.jsonl``."""
    return [path for folder in folders if folder.is_dir() for path in sorted(folder.glob(_QUEUE_GLOB))]


def set_aside_queue(spool_dir: str | os.PathLike) -> Path | None:
    """Move a queue an earlier process left in ``spool_dir`` (and its run file) to ``pending.previous-<tag>.jsonl``
    (tag: its MLflow run id[:8], else the time it was written), so a new sink never overwrites or deletes it."""
    from ..ledger import aside_path, modified_tag

    queue = Path(spool_dir) / PENDING_FILE
    if not queue.is_file():
        return None
    run_id = recorded_run_id(queue)
    target = aside_path(queue, run_id[:8] if run_id else modified_tag(queue))
    queue.rename(target)
    run_file = queue.with_name(RUN_FILE)
    if run_file.is_file():
        run_file.rename(run_file_of(target))  # run.previous-<tag>.json, beside it
    logger.warning(
        "Q-Tuning tracking: %s held the unsent MLflow queue of an earlier process; it was moved to %s (nothing is "
        "deleted). Send it with `python -m trl_qtuning.tracking sync %s`.", queue.parent, target, queue.parent.parent,
    )  # fmt: skip
    return target


def rewrite_queue_paths(queue_file: Path, moves: dict[Path, Path]) -> None:
    """Point the queued artifacts of ``queue_file`` at where ``moves`` (old path -> new path) put their files, so a
    queue moved aside with its run's outputs still uploads that run's own files."""
    resolved = {old.resolve(): new.resolve() for old, new in moves.items()}
    records = [json.loads(line) for line in queue_file.read_text().splitlines() if line.strip()]
    for record in records:
        if record.get("op") != "artifact":
            continue
        path = Path(record["path"]).resolve()
        for old, new in resolved.items():
            if path == old and not new.is_dir():  # a file renamed aside uploads under the name it was queued with
                record.setdefault("name", path.name)
            if path == old or old in path.parents:
                record["path"] = str(new / path.relative_to(old))
                break
    _write_queue(queue_file, records)
