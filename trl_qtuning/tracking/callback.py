"""``QTuningMLflowCallback``: transformers' ``MLflowCallback`` with every write queued, plus Q-Tuning's tags, dataset
input, EU-plane figures and end-of-run outputs.

MLflowCallback's own ``setup`` (``MLFLOW_*`` variables, params, tags, run start), ``on_log`` and ``on_train_end`` run
unchanged against :class:`_QueuedMlflow`, which stands in for the ``mlflow`` module and puts each call in a
:class:`~.sink.MLflowSink`, so an unreachable tracking server never stops or stalls training. ``attach_tracking``
puts this callback in MLflowCallback's place, so TRL's loss and the ``qtuning/...`` metrics go to one run at
``state.global_step``.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
import weakref
from collections import deque
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from transformers.integrations import MLflowCallback

from ..step.events import StepDecisions
from ..vocabulary import Decision
from .outputs import TRACKING_DIR
from .recorder import DecisionAccumulator
from .reports import queue_ledger, write_run_outputs
from .sink import MLflowSink, set_aside_queue

__all__ = ["QTuningMLflowCallback", "TRACKING_DIR", "run_tags"]

logger = logging.getLogger("trl_qtuning.tracking")

TRAIN_METRICS = ("train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos")
"""The end-of-training metrics the summary repeats."""


def _guarded(method):
    """Tracking must never crash training: log (once per hook) and carry on."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            if method.__name__ not in self._hook_errors:
                self._hook_errors.add(method.__name__)
                logger.warning(
                    "Q-Tuning MLflow tracking: %s failed (%s: %s); training continues.",
                    method.__name__, type(exc).__name__, exc, exc_info=True,
                )  # fmt: skip
            return None

    return wrapper


class _QueuedMlflow:
    """The ``mlflow`` calls MLflowCallback makes, each put in the callback's sink. The sink is made by ``start_run``,
    or at the first write into a run the caller started (``with mlflow.start_run(): trainer.train()``)."""

    def __init__(self, callback: QTuningMLflowCallback):
        import mlflow

        self._mlflow = mlflow
        self._callback = callback
        self.__version__ = mlflow.__version__
        self.ended = False

    def is_tracking_uri_set(self) -> bool:  # a ``tracking_uri`` argument wins over MLFLOW_TRACKING_URI
        return self._callback.tracking_uri is not None

    def set_tracking_uri(self, uri: str) -> None:
        self._callback.tracking_uri = uri

    def get_tracking_uri(self) -> str:
        return self._callback.tracking_uri or self._mlflow.get_tracking_uri()

    def set_experiment(self, name: str) -> None:  # an ``experiment`` argument wins over MLFLOW_EXPERIMENT_NAME
        self._callback.experiment = self._callback.experiment or name

    def active_run(self) -> Any:
        callback = self._callback
        if callback.sink is not None:  # MLflowCallback reads ``active_run().info.run_id``
            return None if self.ended else SimpleNamespace(info=callback.sink)
        return None if callback.new_run else self._mlflow.active_run()

    def start_run(self, run_name: str | None = None, nested: bool = False) -> None:
        callback = self._callback
        run_id = None if callback.new_run else callback._run_id
        parent = None if callback.new_run or run_id or not nested else self._mlflow.active_run()
        callback._open_sink(run_id, parent.info.run_id if parent else None, end_run=True)

    def sink(self) -> MLflowSink:
        if self._callback.sink is None:  # logging into the caller's active run, which stays open
            self._callback._open_sink(self._mlflow.active_run().info.run_id, None, end_run=False)
        return self._callback.sink

    def log_params(self, params: dict[str, Any], synchronous: bool | None = None) -> None:
        self.sink().log_params(params)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.sink().set_tags(tags)

    def log_metrics(self, metrics: dict[str, float], step: int, synchronous: bool | None = None) -> None:
        if self._callback.sink is not None:  # None after a setup that failed: nothing is logged
            self._callback.sink.log_metrics(metrics, step=step)

    def end_run(self) -> None:
        if self._callback.sink is not None and not self.ended:
            self.ended = True
            self._callback.sink.end("FINISHED")


class QTuningMLflowCallback(MLflowCallback):
    """Logs a Q-Tuning (or plain SFT) run to MLflow. Arguments that are set win over transformers' ``MLFLOW_*``
    variables; the others are read as transformers does.

    Args:
        trainer: the trainer (held weakly) whose ``train_dataset`` and ``processing_class`` feed the dataset input
            and the samples page.
        tracking_uri, experiment, run_name: where the run goes and its name (else ``MLFLOW_TRACKING_URI``,
            ``MLFLOW_EXPERIMENT_NAME``, ``args.run_name`` or a name made of the folder and the budgets).
        tags: extra run tags, set after ``MLFLOW_TAGS``'s.
        new_run: always create a run of its own (a bench cell), whatever ``MLFLOW_RUN_ID``, ``MLFLOW_NESTED_RUN``
            or an active run say.
        eu_plane_every: draw the EU plane every this many optimizer steps (also the first and last step); 0 turns it
            off.
        html_samples: how many token-pruned samples the HTML page shows (the most recent ones).
        retry_interval: while the server is unreachable, seconds between retries from ``on_log``.
    """

    def __init__(
        self,
        trainer: Any = None,
        *,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        run_name: str | None = None,
        tags: dict[str, str] | None = None,
        new_run: bool = False,
        eu_plane_every: int = 50,
        html_samples: int = 6,
        retry_interval: float = 30.0,
    ):
        super().__init__()
        self._trainer_ref = weakref.ref(trainer) if trainer is not None else None
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.tags, self.new_run = dict(tags or {}), new_run
        self.eu_plane_every, self.html_samples, self.retry_interval = eu_plane_every, html_samples, retry_interval
        self._start_run_state()

    def _start_run_state(self) -> None:
        """What one training run accumulates (its sink stays readable after the run ends: ``run_id``)."""
        self._initialized = False  # MLflowCallback's flag: the next on_train_begin sets up a run
        self._run_ended = False
        self._ml_flow = _QueuedMlflow(self)
        self.decisions = DecisionAccumulator()
        self.sink: MLflowSink | None = None
        self._args: Any = None
        self._last_event: StepDecisions | None = None
        self._eu_drawn: set[int] = set()
        self._token_pruned: deque[dict[str, Any]] = deque(maxlen=max(0, int(self.html_samples)))
        self._uploaded: dict[str, tuple[int, int]] = {}
        self._train_metrics: dict[str, float] = {}
        self._hook_errors: set[str] = set()

    def configure(self, **options: Any) -> None:
        """Change the options (``__init__``'s keyword arguments) of an attached callback before training starts."""
        allowed = set(inspect.signature(QTuningMLflowCallback.__init__).parameters) - {"self", "trainer"}
        unknown = options.keys() - allowed
        if unknown:
            raise TypeError(f"unknown tracking option(s): {', '.join(sorted(unknown))}")
        vars(self).update(options)
        self.tags = dict(self.tags or {})
        self._token_pruned = deque(self._token_pruned, maxlen=max(0, int(self.html_samples)))

    @property
    def run_id(self) -> str | None:
        return self.sink.run_id if self.sink is not None else None

    @property
    def trainer(self) -> Any:
        return self._trainer_ref() if self._trainer_ref is not None else None

    @_guarded
    def on_decisions(self, event: StepDecisions) -> None:
        """Registered with ``trainer.add_decision_listener``: aggregates each step's decisions."""
        self.decisions(event)
        self._last_event = event
        cols = event.columns
        for i, decision in enumerate(cols["decision"]):
            if decision == Decision.TOKEN_PRUNED and cols["pruned_positions"][i]:
                self._token_pruned.append({
                    "sample_id": int(cols["sample_id"][i]), "step": event.step,
                    "pruned_positions": list(cols["pruned_positions"][i]),
                    "ppl": float(cols["ppl"][i]), "entropy": float(cols["entropy"][i]),
                })  # fmt: skip

    @_guarded
    def setup(self, args, state, model):
        """MLflowCallback's setup (through the queue), then this run's extra tags and dataset input."""
        self._initialized = True  # a setup that failed is not retried at every log
        self._args = args
        super().setup(args, state, model)
        if not state.is_world_process_zero:
            return
        sink = self._ml_flow.sink()
        sink.set_tags(self.tags)
        dataset = self._dataset_input()
        if dataset is not None:
            sink.log_input(dataset, context="train")
        sink.flush(force=True)

    def _open_sink(self, run_id: str | None, parent_run_id: str | None, *, end_run: bool) -> None:
        args = self._args
        spool = Path(args.output_dir) / TRACKING_DIR
        set_aside_queue(spool)  # an earlier process's unsent queue is never this run's
        self.sink = MLflowSink(
            spool, tracking_uri=self.tracking_uri, experiment_name=self.experiment,
            run_name=self.run_name or args.run_name or _default_run_name(args), run_id=run_id,
            parent_run_id=parent_run_id, end_run=end_run, tags=run_tags(args), retry_interval=self.retry_interval,
        )  # fmt: skip

    def _dataset_input(self) -> dict[str, Any] | None:
        """The train dataset as MLflow's dataset entity, without the id column Q-Tuning adds (its digest is then
        the user's data, the same as a plain SFT run of it)."""
        import hashlib
        import json
        import warnings

        import mlflow.data

        from ..step.collator import SAMPLE_ID_COLUMN

        trainer = self.trainer
        dataset = getattr(trainer, "train_dataset", None)
        if dataset is None:
            return None
        name = getattr(getattr(trainer, "args", None), "dataset_name", None) or "train_dataset"
        if SAMPLE_ID_COLUMN in (getattr(dataset, "column_names", None) or []):
            dataset = dataset.remove_columns([SAMPLE_ID_COLUMN])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # schema inference hints about integer columns
                entity = mlflow.data.from_huggingface(dataset, name=name)._to_mlflow_entity()
        except Exception:  # not a datasets.Dataset (or an iterable one): name and size only
            fingerprint = str(getattr(dataset, "_fingerprint", None) or id(dataset))
            return {
                "name": name, "digest": hashlib.sha256(fingerprint.encode()).hexdigest()[:8], "source_type": "code",
                "source": json.dumps({"type": type(dataset).__name__}), "schema": None,
                "profile": json.dumps({"num_rows": len(dataset) if hasattr(dataset, "__len__") else None}),
            }  # fmt: skip
        return {key: getattr(entity, key) for key in ("name", "digest", "source_type", "source", "schema", "profile")}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self._run_ended:  # a second train() on this trainer: a run of its own, not more steps of the finished one
            self._start_run_state()
        super().on_train_begin(args, state, control, model=model, **kwargs)

    @_guarded
    def on_log(self, args, state, control, logs, model=None, **kwargs):
        super().on_log(args, state, control, logs, model=model, **kwargs)
        if self.sink is not None:
            self._train_metrics.update({k: float(v) for k, v in logs.items() if k in TRAIN_METRICS})
            self.sink.flush()

    @_guarded
    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if self.sink is not None and self.eu_plane_every > 0 and (step == 1 or step % self.eu_plane_every == 0):
            self._draw_eu_plane(step)
            self.sink.flush()

    @_guarded
    def on_save(self, args, state, control, **kwargs):
        if self.sink is None:
            return
        queue_ledger(self.sink, Path(args.output_dir), self._uploaded)
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self._log_artifacts and checkpoint.is_dir():  # HF_MLFLOW_LOG_ARTIFACTS, read by MLflowCallback.setup
            self.sink.log_artifact(checkpoint, f"checkpoints/{checkpoint.name}")
        if not self.sink.flush(force=True):
            self.sink.persist()

    @_guarded
    def on_train_end(self, args, state, control, **kwargs):
        self._run_ended = True
        if self.sink is None:
            return
        if self.eu_plane_every > 0:
            self._draw_eu_plane(state.global_step)
        trainer = self.trainer
        write_run_outputs(
            self.sink, Path(args.output_dir), self.decisions, args=args, train_metrics=self._train_metrics,
            token_pruned=list(self._token_pruned), dataset=getattr(trainer, "train_dataset", None),
            tokenizer=kwargs.get("processing_class") or getattr(trainer, "processing_class", None),
            uploaded=self._uploaded,
        )  # fmt: skip
        super().on_train_end(args, state, control, **kwargs)  # ends the run if it started it
        if not self.sink.flush(force=True):
            path = self.sink.persist()
            logger.warning(
                "Q-Tuning MLflow tracking: %d item(s) could not be sent; they are kept in %s. Send them when the server "
                "answers with `python -m trl_qtuning.tracking sync %s`.", len(self.sink.pending), path, args.output_dir,
            )  # fmt: skip

    def _draw_eu_plane(self, step: int) -> None:
        from .figures import eu_plane_figure, matplotlib_available, save_figure

        event = self._last_event
        if event is None or event.step != step or step in self._eu_drawn or not matplotlib_available():
            return
        path = save_figure(
            eu_plane_figure(step, event.columns, event.thresholds),
            self.sink.spool_dir / "figures" / "eu_plane" / f"eu_plane_step_{step:06d}.png",
        )
        self._eu_drawn.add(step)
        self.sink.log_artifact(path, "figures/eu_plane")


def run_tags(args: Any) -> dict[str, str]:
    """``qtuning.method`` (the run label, or ``sft``), each method field of a Q-Tuning run, and the version."""
    from .. import __version__
    from ..config import METHOD_FIELDS, run_label

    if not getattr(args, "qtuning_enabled", False):
        return {"qtuning.method": "sft", "qtuning.version": __version__}
    tags = {"qtuning.method": run_label(args), "qtuning.version": __version__}
    tags.update({f"qtuning.{name}": str(getattr(args, name)) for name in METHOD_FIELDS if hasattr(args, name)})
    return tags


def _default_run_name(args: Any) -> str:
    """A readable, unique run name: MLflow's random names repeat across runs once the trainer seeds ``random``."""
    folder = Path(str(args.output_dir)).name or "run"
    if getattr(args, "qtuning_enabled", False):
        budget = f"qtuning-{getattr(args, 'sample_keep_ratio', 1.0):g}x{getattr(args, 'token_keep_ratio', 1.0):g}"
    else:
        budget = "sft"
    return f"{folder}-{budget}-{time.strftime('%m%d-%H%M%S')}"
