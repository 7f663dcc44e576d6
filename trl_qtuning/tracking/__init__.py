"""MLflow tracking for Q-Tuning runs (optional: ``pip install 'trl-qtuning[mlflow]'``).

``attach_tracking(trainer)`` swaps transformers' ``MLflowCallback`` for :class:`QTuningMLflowCallback` and registers
its decision listener. Nothing here imports mlflow until it is used, and the trainer never imports this package
unless ``report_to`` asks for mlflow.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "MLFLOW_INSTALL_HINT", "require_mlflow", "attach_tracking", "QTuningMLflowCallback", "sync_pending",
    "load_selection", "kept_sample_ids",
]  # fmt: skip

MLFLOW_INSTALL_HINT = "pip install 'trl-qtuning[mlflow]'"


def require_mlflow(*, integration: bool = False) -> None:
    """Raise a clear error when mlflow is missing (``report_to`` asks for it) or, with ``integration`` (a training
    run, whose callback runs transformers' ``MLflowCallback``), when transformers' MLflow integration is turned off."""
    try:
        import mlflow  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "MLflow tracking was requested (`report_to` includes 'mlflow') but mlflow is not installed. "
            f"Install the extra: {MLFLOW_INSTALL_HINT}"
        ) from exc
    from transformers.integrations import is_mlflow_available

    if integration and not is_mlflow_available():  # installed, but transformers' MLflowCallback (ours runs it) won't
        raise RuntimeError(
            "MLflow tracking was requested (`report_to` includes 'mlflow') but DISABLE_MLFLOW_INTEGRATION is set, "
            "which turns off transformers' MLflow integration: unset it, or drop 'mlflow' from `report_to`."
        )


def attach_tracking(trainer: Any, **options: Any):
    """Log ``trainer``'s run to MLflow with Q-Tuning's extras; returns the callback (idempotent).

    Replaces any ``transformers.integrations.MLflowCallback`` in the trainer at the same position (so metrics are
    logged before user callbacks run), and listens to the trainer's per-step decisions when Q-Tuning is enabled.
    ``options`` are :class:`QTuningMLflowCallback`'s (``tracking_uri``, ``experiment``, ``run_name``, ``tags``,
    ``new_run``, ``eu_plane_every``, ``html_samples``, ``retry_interval``); on a callback already attached (the
    trainer attaches one when ``report_to`` asks for mlflow) they replace its own.
    """
    require_mlflow(integration=True)
    from transformers.integrations import MLflowCallback

    from .callback import QTuningMLflowCallback

    callbacks = trainer.callback_handler.callbacks
    for cb in callbacks:
        if isinstance(cb, QTuningMLflowCallback):
            cb.configure(**options)
            return cb
    callback = QTuningMLflowCallback(trainer, **options)
    positions = [i for i, cb in enumerate(callbacks) if isinstance(cb, MLflowCallback)]
    for i in reversed(positions):
        del callbacks[i]
    callbacks.insert(positions[0] if positions else len(callbacks), callback)
    if getattr(trainer, "_decision_listeners", None) is not None:
        trainer.add_decision_listener(callback.on_decisions)
    return callback


def sync_pending(output_dir: str, tracking_uri: str | None = None) -> bool:
    """Send every queue training processes could not: ``output_dir/qtuning_tracking/pending*.jsonl`` and those of
    earlier runs moved aside (``qtuning_tracking.previous-*/``). True when nothing is left to send."""
    from .outputs import tracking_folders
    from .sink import MLflowSink, queue_files

    sent = True
    for queue in queue_files(tracking_folders(output_dir)):
        sent = MLflowSink.from_pending(queue, tracking_uri=tracking_uri).flush(force=True) and sent
    return sent


def __getattr__(name: str) -> Any:
    if name == "QTuningMLflowCallback":
        require_mlflow()
        from .callback import QTuningMLflowCallback

        return QTuningMLflowCallback
    if name in ("load_selection", "kept_sample_ids"):
        from . import reports

        return getattr(reports, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
