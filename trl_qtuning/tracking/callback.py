"""``QTuningMLflowCallback``: transformers' ``MLflowCallback``, fault tolerant, plus Q-Tuning's params, tags,
dataset input, ledger upload, figures, token-pruned samples page, summary and pruned-dataset export.

It takes the place of transformers' ``MLflowCallback`` in the trainer (``attach_tracking`` swaps them), so TRL's
loss and the ``qtuning/...`` metrics go to the same run at ``state.global_step``, through one writer that never lets
an unreachable tracking server stop training (see :mod:`trl_qtuning.tracking.sink`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import weakref
from collections import deque
from pathlib import Path
from typing import Any

from transformers.integrations import MLflowCallback

from ..events import StepDecisions
from ..ledger import LEDGER_DIRNAME, SHARD_GLOB
from ..vocabulary import Decision
from .outputs import SELECTION_DIR, TRACKING_DIR
from .recorder import DecisionAccumulator
from .sink import MLflowSink, set_aside_queue

__all__ = ["QTuningMLflowCallback", "TRACKING_DIR"]

logger = logging.getLogger("trl_qtuning.tracking")

_TRUE = {"1", "TRUE", "YES", "ON"}


def _env_true(name: str) -> bool:
    return os.getenv(name, "FALSE").upper() in _TRUE


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
                )
            return None

    return wrapper


class QTuningMLflowCallback(MLflowCallback):
    """Logs a Q-Tuning (or plain SFT) run to MLflow; honours transformers' ``MLFLOW_*`` environment variables.

    Args:
        trainer: the trainer (held weakly) whose ``train_dataset`` and ``processing_class`` feed the dataset input
            and the samples page.
        eu_plane_every: draw the EU plane every this many optimizer steps (also the first and last step);
            default ``QTUNING_MLFLOW_EU_PLANE_EVERY`` or 50; 0 turns it off.
        html_samples: how many token-pruned samples the HTML page shows (the most recent ones).
        retry_interval: while the server is unreachable, seconds between retries from ``on_log``.
    """

    def __init__(
        self,
        trainer: Any = None,
        *,
        eu_plane_every: int | None = None,
        html_samples: int = 6,
        retry_interval: float = 30.0,
    ):
        import mlflow

        # MLflowCallback.__init__ is not called: it refuses when DISABLE_MLFLOW_INTEGRATION is set, and its
        # attributes below are all this class uses of it.
        self._ml_flow = mlflow
        self._MAX_PARAM_VAL_LENGTH = mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
        self._initialized = False
        self._auto_end_run = False
        self._log_artifacts = False
        self._trainer_ref = weakref.ref(trainer) if trainer is not None else None
        if eu_plane_every is None:
            eu_plane_every = int(os.getenv("QTUNING_MLFLOW_EU_PLANE_EVERY", "50"))
        self.eu_plane_every = int(eu_plane_every)
        self.retry_interval = retry_interval
        self.decisions = DecisionAccumulator()
        self.sink: MLflowSink | None = None
        self.output_dir: Path | None = None
        self._events: dict[int, StepDecisions] = {}
        self._eu_drawn: set[int] = set()
        self._token_pruned: deque[dict[str, Any]] = deque(maxlen=max(0, int(html_samples)))
        self._queued_files: dict[str, tuple[int, int]] = {}
        self._train_metrics: dict[str, float] = {}
        self._hook_errors: set[str] = set()
        self._figures_ok = True


    def configure(
        self, *, eu_plane_every: int | None = None, html_samples: int | None = None, retry_interval: float | None = None
    ) -> None:
        """Change the options of an attached callback (before training starts)."""
        if eu_plane_every is not None:
            self.eu_plane_every = int(eu_plane_every)
        if html_samples is not None:
            self._token_pruned = deque(self._token_pruned, maxlen=max(0, int(html_samples)))
        if retry_interval is not None:
            self.retry_interval = retry_interval
    def __del__(self):  # MLflowCallback.__del__ ends the fluent run; this class never starts one
        pass

    @property
    def run_id(self) -> str | None:
        return self.sink.run_id if self.sink is not None else None

    @property
    def trainer(self):
        return self._trainer_ref() if self._trainer_ref is not None else None

    # ------------------------------------------------------------------ the decision listener
    def on_decisions(self, event: StepDecisions) -> None:
        """Registered with ``trainer.add_decision_listener``: aggregates each step's decisions."""
        try:
            self.decisions(event)
            self._events = {event.step: event}  # the latest step only (for its EU plane)
            cols = event.columns
            for i, decision in enumerate(cols["decision"]):
                if decision == Decision.TOKEN_PRUNED and cols["pruned_positions"][i]:
                    self._token_pruned.append(
                        {
                            "sample_id": int(cols["sample_id"][i]),
                            "step": event.step,
                            "pruned_positions": list(cols["pruned_positions"][i]),
                            "ppl": float(cols["ppl"][i]),
                            "entropy": float(cols["entropy"][i]),
                        }
                    )
        except Exception as exc:  # never break the training step
            if "on_decisions" not in self._hook_errors:
                self._hook_errors.add("on_decisions")
                logger.warning("Q-Tuning MLflow tracking: recording decisions failed (%s); training continues.", exc)

    # ------------------------------------------------------------------ setup
    def setup(self, args, state, model):
        self._initialized = True
        if not state.is_world_process_zero:
            return
        mlflow = self._ml_flow
        self.output_dir = Path(args.output_dir)
        self._log_artifacts = _env_true("HF_MLFLOW_LOG_ARTIFACTS")
        tracking_uri = os.getenv("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
        run_id = os.getenv("MLFLOW_RUN_ID") or None
        nested = _env_true("MLFLOW_NESTED_RUN")
        parent_run_id = None
        end_run = True
        active = None
        try:
            active = mlflow.active_run()
        except Exception:
            active = None
        if run_id is None and active is not None:
            if nested:
                parent_run_id = active.info.run_id
            else:  # log into the caller's run, and leave it open
                run_id, end_run = active.info.run_id, False
        set_aside_queue(self.output_dir / TRACKING_DIR)  # an earlier process's unsent queue is never this run's
        self.sink = MLflowSink(
            self.output_dir / TRACKING_DIR,
            tracking_uri=tracking_uri,
            experiment_name=os.getenv("MLFLOW_EXPERIMENT_NAME") or None,
            run_name=args.run_name or _default_run_name(args),
            run_id=run_id,
            parent_run_id=parent_run_id,
            end_run=end_run,
            tags=self._tags(args),
            retry_interval=self.retry_interval,
        )
        self.sink.log_params(self._params(args, model))
        extra_tags = os.getenv("MLFLOW_TAGS")
        if extra_tags:
            self.sink.set_tags(json.loads(extra_tags))
        dataset = self._dataset_input()
        if dataset is not None:
            self.sink.log_input(dataset, context="train")
        self.sink.flush(force=True)

    def _tags(self, args) -> dict[str, str]:
        enabled = bool(getattr(args, "qtuning_enabled", False))
        from ..config import METHOD_FIELDS, run_label

        tags = {"qtuning.method": run_label(args) if enabled else "sft"}
        if enabled:
            for name in METHOD_FIELDS:
                if hasattr(args, name):
                    tags[f"qtuning.{name}"] = str(getattr(args, name))
        try:
            from trl_qtuning import __version__

            tags["qtuning.version"] = __version__
        except Exception:
            pass
        return tags

    def _params(self, args, model) -> dict[str, Any]:
        """As transformers' MLflowCallback: model config then training args (Q-Tuning fields included)."""
        from transformers.utils import flatten_dict

        combined = args.to_dict()
        if getattr(model, "config", None) is not None:
            combined = {**model.config.to_dict(), **combined}
        if _env_true("MLFLOW_FLATTEN_PARAMS"):
            combined = flatten_dict(combined)
        combined = {k: v for k, v in combined.items() if len(str(v)) <= self._MAX_PARAM_VAL_LENGTH}
        max_params = os.getenv("MLFLOW_MAX_LOG_PARAMS")
        if max_params and max_params.isdigit():
            combined = dict(list(combined.items())[: int(max_params)])
        return combined

    def _dataset_input(self) -> dict[str, Any] | None:
        trainer = self.trainer
        dataset = getattr(trainer, "train_dataset", None) if trainer is not None else None
        if dataset is None:
            return None
        name = getattr(getattr(trainer, "args", None), "dataset_name", None) or "train_dataset"
        from ..collator import SAMPLE_ID_COLUMN

        if SAMPLE_ID_COLUMN in (getattr(dataset, "column_names", None) or []):
            # the user's data as SFTTrainer prepares it: the id column Q-Tuning adds must not change the digest
            dataset = dataset.remove_columns([SAMPLE_ID_COLUMN])
        try:
            import warnings

            import mlflow.data

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # schema inference hints about integer columns
                entity = mlflow.data.from_huggingface(dataset, name=name)._to_mlflow_entity()
        except Exception:  # not a datasets.Dataset (or an iterable one): name and size only
            import hashlib

            size = len(dataset) if hasattr(dataset, "__len__") else None
            fingerprint = str(getattr(dataset, "_fingerprint", None) or id(dataset))
            return {
                "name": name,
                "digest": hashlib.sha256(fingerprint.encode()).hexdigest()[:8],
                "source_type": "code",
                "source": json.dumps({"type": type(dataset).__name__}),
                "schema": None,
                "profile": json.dumps({"num_rows": size}),
            }
        return {
            "name": entity.name,
            "digest": entity.digest,
            "source_type": entity.source_type,
            "source": entity.source,
            "schema": entity.schema,
            "profile": entity.profile,
        }

    # ------------------------------------------------------------------ training events
    @_guarded
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self._initialized:
            self.setup(args, state, model)

    @_guarded
    def on_log(self, args, state, control, logs, model=None, **kwargs):
        if not self._initialized:
            self.setup(args, state, model)
        if self.sink is None:
            return
        metrics = {}
        for key, value in logs.items():
            if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
                value = value.item()
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[re.sub(r"[^0-9A-Za-z_\-\.\ :/]", "_", key)] = float(value)
        for key in ("train_loss", "train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos"):
            if key in metrics:
                self._train_metrics[key] = metrics[key]
        self.sink.log_metrics(metrics, step=state.global_step)
        self.sink.flush()

    @_guarded
    def on_step_end(self, args, state, control, **kwargs):
        if self.sink is None:
            return
        step = state.global_step
        if self.eu_plane_every > 0 and (step == 1 or step % self.eu_plane_every == 0):
            self._draw_eu_plane(step)
            self.sink.flush()

    @_guarded
    def on_save(self, args, state, control, **kwargs):
        if self.sink is None:
            return
        self._queue_ledger()
        if self._log_artifacts:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                self.sink.log_artifact(checkpoint, f"checkpoints/{checkpoint.name}")
        if not self.sink.flush(force=True):
            self.sink.persist()

    @_guarded
    def on_train_end(self, args, state, control, **kwargs):
        if self.sink is None:
            return
        processing_class = kwargs.get("processing_class")
        for part in (
            lambda: self._draw_eu_plane(state.global_step, last=True),
            self._draw_training_figures,
            self._write_summary_and_selection,
            lambda: self._write_samples_page(processing_class),
            self._queue_ledger,
        ):
            try:
                part()
            except Exception as exc:
                logger.warning("Q-Tuning MLflow tracking: an end-of-training output failed (%s: %s).", type(exc).__name__, exc)
        self.sink.end("FINISHED")
        if not self.sink.flush(force=True):
            path = self.sink.persist()
            logger.warning(
                "Q-Tuning MLflow tracking: %d item(s) could not be sent; they are kept in %s. Send them when the server "
                "answers with `python -m trl_qtuning.tracking sync %s`.", len(self.sink.pending), path, args.output_dir,
            )

    # ------------------------------------------------------------------ outputs
    def _tracking_dir(self) -> Path:
        return self.output_dir / TRACKING_DIR

    def _queue_ledger(self) -> None:
        ledger_dir = self.output_dir / LEDGER_DIRNAME
        if not ledger_dir.is_dir():
            return
        for shard in sorted(ledger_dir.glob(SHARD_GLOB)):
            stat = shard.stat()
            key = (stat.st_size, stat.st_mtime_ns)
            if self._queued_files.get(str(shard)) != key:
                self._queued_files[str(shard)] = key
                self.sink.log_artifact(shard, LEDGER_DIRNAME)

    def _figures_available(self) -> bool:
        if self._figures_ok:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                self._figures_ok = False
                logger.warning("Q-Tuning MLflow tracking: matplotlib is missing, no figures (pip install 'trl-qtuning[mlflow]').")
        return self._figures_ok

    def _draw_eu_plane(self, step: int, last: bool = False) -> None:
        event = self._events.get(step)
        if event is None or step in self._eu_drawn or not self._figures_available():
            return
        if last and self.eu_plane_every <= 0:
            return
        from .figures import eu_plane_figure, save_figure

        path = save_figure(
            eu_plane_figure(step, event.columns, event.thresholds),
            self._tracking_dir() / "figures" / "eu_plane" / f"eu_plane_step_{step:06d}.png",
        )
        self._eu_drawn.add(step)
        self.sink.log_artifact(path, "figures/eu_plane")

    def _summary_source(self) -> DecisionAccumulator:
        ledger_dir = self.output_dir / LEDGER_DIRNAME
        if any(ledger_dir.glob(SHARD_GLOB)) if ledger_dir.is_dir() else False:
            return DecisionAccumulator.from_ledger(ledger_dir, live=self.decisions)
        return self.decisions

    def _draw_training_figures(self) -> None:
        if not self.decisions.steps or not self._figures_available():
            return
        from .figures import budgets_figure, quadrant_shares_figure, save_figure

        trainer = self.trainer
        args = getattr(trainer, "args", None)
        steps = self._summary_source().ordered_steps()
        figures = self._tracking_dir() / "figures"
        p1 = save_figure(quadrant_shares_figure(steps), figures / "quadrant_shares.png")
        p2 = save_figure(
            budgets_figure(steps, getattr(args, "sample_keep_ratio", None), getattr(args, "token_keep_ratio", None)),
            figures / "realised_budgets.png",
        )
        self.sink.log_artifact(p1, "figures")
        self.sink.log_artifact(p2, "figures")

    def _write_summary_and_selection(self) -> None:
        if not self.decisions.steps and not (self.output_dir / LEDGER_DIRNAME).is_dir():
            return  # no Q-Tuning decisions (plain SFT): nothing to summarise
        from .reports import build_summary, write_selection, write_summary

        trainer = self.trainer
        args = getattr(trainer, "args", None)
        from ..config import METHOD_FIELDS, run_label

        config = {"method": run_label(args) if args is not None else "qtuning"}
        if args is not None:
            for name in ("sample_keep_ratio", "token_keep_ratio", *METHOD_FIELDS, "qtuning_ledger"):
                if hasattr(args, name):
                    config[name] = getattr(args, name)
        acc = self._summary_source()
        summary = build_summary(acc, config=config, train_metrics=self._train_metrics)
        json_path, md_path = write_summary(summary, self.output_dir)
        self.sink.log_artifact(json_path, None)
        self.sink.log_artifact(md_path, None)
        selection = write_selection(acc, self.output_dir / SELECTION_DIR)
        self.sink.log_artifact(selection.parent, "qtuning_selection")
        real, scoring = summary["realised"], summary["scoring"]
        final = {
            "qtuning/final/sample_keep_ratio": real["sample_keep_ratio"],
            "qtuning/final/token_keep_ratio": real["token_keep_ratio"],
            "qtuning/final/label_token_share": real["label_token_share"],
            "qtuning/final/samples_trained": real["samples_trained"],
            "qtuning/final/label_tokens_trained": real["label_tokens_trained"],
            "qtuning/final/scoring_seconds": scoring["total_seconds"],
        }
        step = summary["last_step"] or 0
        self.sink.log_metrics({k: float(v) for k, v in final.items() if v is not None and math.isfinite(v)}, step=step)

    def _write_samples_page(self, processing_class) -> None:
        trainer = self.trainer
        if not self._token_pruned and not self.decisions.steps:
            return
        tokenizer = processing_class or getattr(trainer, "processing_class", None)
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap a tokenizer
        dataset = getattr(trainer, "train_dataset", None)
        if tokenizer is None or dataset is None:
            return
        from ..collator import SAMPLE_ID_COLUMN
        from .reports import samples_html

        samples = []
        candidates = list(self._token_pruned)
        if candidates and SAMPLE_ID_COLUMN in getattr(dataset, "column_names", []):
            index_of = {int(sid): i for i, sid in enumerate(dataset[SAMPLE_ID_COLUMN])}
            for cand in reversed(candidates):
                row = index_of.get(cand["sample_id"])
                if row is None:
                    continue
                example = dataset[row]
                ids = list(example["input_ids"])
                if "labels" in example:
                    response = [label != -100 for label in example["labels"]]
                elif "completion_mask" in example:
                    response = [bool(m) for m in example["completion_mask"]]
                elif "assistant_masks" in example:
                    response = [bool(m) for m in example["assistant_masks"]]
                else:
                    response = [True] * len(ids)
                samples.append({**cand, "input_ids": ids, "response": response})
        path = self._tracking_dir() / "qtuning_samples.html"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(samples_html(samples, tokenizer), encoding="utf-8")
        self.sink.log_artifact(path, None)


def _default_run_name(args: Any) -> str:
    """A readable, unique run name: MLflow's random names repeat across runs once the trainer seeds ``random``."""
    import time as _time

    folder = Path(str(args.output_dir)).name or "run"
    if getattr(args, "qtuning_enabled", False):
        budget = f"qtuning-{getattr(args, 'sample_keep_ratio', 1.0):g}x{getattr(args, 'token_keep_ratio', 1.0):g}"
    else:
        budget = "sft"
    return f"{folder}-{budget}-{_time.strftime('%m%d-%H%M%S')}"
