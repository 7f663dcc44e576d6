"""The bench's MLflow side: cell tags, fault-tolerant sends, an interrupted cell's run retired, the results page.

Tracking never stops the bench: an outage keeps metrics in the run's ``pending.jsonl`` and says so on stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import one_line
from .matrix import PROG, Cell, Matrix, budget_tag

__all__ = ["cell_tags", "log_summary", "retire_old_run", "run_id_from_disk", "send", "warn"]


def cell_tags(matrix: Matrix, cell: Cell) -> dict[str, str]:
    tags = {"bench.cell": cell.id, "bench.method": cell.method, "bench.experiment": matrix.experiment,
            "bench.matrix": str(matrix.path)}  # fmt: skip
    if cell.budget:
        tags["bench.budget"] = budget_tag(cell.budget)
    if cell.seed is not None:
        tags["bench.seed"] = str(cell.seed)
    return tags


def warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


def send(sink, metrics: dict[str, float], step: int) -> str | None:
    """Queue eval metrics in the run's fault-tolerant writer and send; an outage keeps them in pending.jsonl."""
    try:
        sink.log_metrics(metrics, step=step)
        if not sink.flush(force=True):
            path = sink.persist()
            warn(f"MLflow is unreachable; the evaluation metrics are kept in {path} (send them later with "
                  f"`python -m trl_qtuning.tracking sync {sink.spool_dir.parent}`)")  # fmt: skip
        return sink.run_id
    except Exception as exc:  # tracking never stops the bench
        warn(f"logging to MLflow failed ({type(exc).__name__}: {one_line(exc)}); the result is on disk only")
        return getattr(sink, "run_id", None)


def _run_file(cell_dir: Path) -> Path:
    """The cell's ``run.json`` (run id and tracking URI), written by its sink once the run exists."""
    from ..tracking.outputs import TRACKING_DIR
    from ..tracking.sink import RUN_FILE

    return cell_dir / TRACKING_DIR / RUN_FILE


def run_id_from_disk(cell_dir: Path) -> str | None:
    from ..tracking.sink import recorded_run_id

    return recorded_run_id(_run_file(cell_dir))


def retire_old_run(matrix: Matrix, cell_dir: Path) -> None:
    """An interrupted cell's MLflow run is marked FAILED before the cell is run again (best effort)."""
    if matrix.report_to != "mlflow":
        return
    try:
        info = json.loads(_run_file(cell_dir).read_text())
    except (OSError, ValueError):
        return
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=info.get("tracking_uri") or matrix.tracking_uri)
        client.set_tag(info["run_id"], "bench.superseded", "true")
        client.set_terminated(info["run_id"], "FAILED")
    except Exception as exc:  # best effort: the store may be down or the run gone
        warn(f"could not mark the interrupted cell's MLflow run {info.get('run_id')} as FAILED ({type(exc).__name__})")


SUMMARY_RUN = "bench-summary"


def log_summary(matrix: Matrix, files: list[Path]) -> str | None:
    """The results page and figures as artifacts of one run named ``bench-summary`` in the matrix's experiment
    (tagged ``bench.summary=true``; reused when it exists). Best effort: an outage only warns."""
    if matrix.report_to != "mlflow" or not files:
        return None
    try:
        from mlflow import MlflowClient

        from ..tracking.sink import fast_fail_http

        with fast_fail_http():  # an outage fails in seconds, not minutes
            client = MlflowClient(tracking_uri=matrix.tracking_uri)
            experiment = client.get_experiment_by_name(matrix.experiment)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(matrix.experiment)
            found = client.search_runs([experiment_id], filter_string="tags.`bench.summary` = 'true'", max_results=1)
            if found:
                run_id = found[0].info.run_id
            else:
                run = client.create_run(experiment_id, run_name=SUMMARY_RUN,
                                        tags={"bench.summary": "true", "bench.matrix": str(matrix.path)})  # fmt: skip
                run_id = run.info.run_id
                client.set_terminated(run_id, "FINISHED")
            for path in files:
                client.log_artifact(run_id, str(path))
            return run_id
    except Exception as exc:  # tracking never stops the bench
        warn(f"logging the results page to MLflow failed ({type(exc).__name__}: {one_line(exc)})")
        return None
