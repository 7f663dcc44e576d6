"""``QTuningSFTTrainer``: TRL's ``SFTTrainer`` that prunes each optimizer step's data before training on it.

Where it hooks in (transformers' training loop): ``get_batch_samples`` fetches the micro-batches of one optimizer step
and counts the loss normaliser. This trainer fetches them, scores every sample with the current model
(:mod:`~trl_qtuning.step.scoring`), decides which samples stay and which labels are kept (:mod:`~trl_qtuning.step.decision`,
the policies of :mod:`~trl_qtuning.policies`), applies that to the micro-batches (:mod:`~trl_qtuning.step.batch`), and only
then counts the normaliser; :mod:`~trl_qtuning.step.metrics` says what the step did. The loss of the step is therefore
``sum(NLL over kept tokens) / kept token count``, exactly, under gradient accumulation. It returns as many
micro-batches as it fetched (an emptied one is skipped in ``training_step``).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from peft import PeftModel
from transformers import DefaultFlowCallback, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTTrainer

from .config import QTUNING_FIELDS, QTuningConfig, require_qtuning_config
from .integrations.teardown import end_at_exit, release_before_group_ends, unregister
from .ledger import LEDGER_DIRNAME, DecisionLedger, is_fresh_run, open_for_run, write_checkpoint_id
from .step.batch import LOSS_WEIGHT_COLUMN, WeightedLogProbs, apply_decisions, has_rows, runnable_micro_batches
from .step.collator import (
    SAMPLE_ID_COLUMN, QTuningDataCollator, check_prepared_dataset, pad_token_id, sized_length, with_sample_ids,
)  # fmt: skip
from .step.decision import StepDecider, StepSelection
from .step.events import DecisionListener, StepDecisions
from .step.metrics import StepMetricsLog, gather_ledger_columns, gather_step_sums, ledger_columns, step_sums
from .step.scoring import (
    ScoredMicroBatch, Scorer, as_inference_tensor_error, load_reference_model, reference_forward,
)  # fmt: skip

__all__ = ["QTuningSFTTrainer"]

logger = logging.getLogger(__name__)


_BUILT_FROM = (*QTUNING_FIELDS, "output_dir", "seed", "per_device_train_batch_size", "gradient_accumulation_steps")
"""The fields of ``trainer.args`` the Q-Tuning machinery is built from (checked again at every ``train()``)."""


def _warn_if_adapters_are_trained(model: torch.nn.Module) -> None:
    """TailSFT with LoRA takes the model with its adapters disabled as the initial model, which is only true of
    adapters that start as the identity (LoRA's B matrices at zero); say so for an adapter already trained."""
    trained = [name for name, p in model.named_parameters() if "lora_B" in name and bool(p.detach().ne(0).any())]
    if trained:
        logger.warning(
            "Q-Tuning: sample_policy='tailsft' compares each sample with the model at the start of training, taken "
            "as this LoRA model with its adapters disabled; but the adapters are already trained (%d LoRA B matrices "
            "are not zero, e.g. %s), so the reference is the bare base model, not the model training starts from. To "
            "compare with the starting model, save it with the adapter merged (`model.merge_and_unload()."
            "save_pretrained(path)`) and set `reference_model_path=path`.", len(trained), trained[0],
        )  # fmt: skip


class LedgerCallback(TrainerCallback):
    """The decision ledger's life in the training loop: it takes each step's rows (a decision listener), opens the
    run's ledger (:meth:`open`: the resume checks, before anything is touched), writes the buffered rows before each
    checkpoint and records the ledger's run id in it (:meth:`around_checkpoint`, called by the trainer's
    ``_save_checkpoint``: whichever callback asked for the save, a checkpoint never holds steps the ledger has lost),
    and writes the rest at the end, before the reporting callbacks placed after it read the ledger.
    """

    def __init__(self, ledger: DecisionLedger):
        self.ledger = ledger

    def __call__(self, event: StepDecisions) -> None:
        self.ledger.append(event.columns)

    def open(self, resume_from_checkpoint: str | bool | None, output_dir: str) -> Path | None:
        return open_for_run(self.ledger, resume_from_checkpoint, output_dir)

    @contextlib.contextmanager
    def around_checkpoint(self, folder: Path, step: int) -> Iterator[None]:
        self.ledger.flush()
        yield
        if self.ledger.run_id is not None and folder.is_dir():
            write_checkpoint_id(folder, self.ledger.run_id, step)

    def on_train_end(self, args, state, control, **kwargs):
        self.ledger.flush()


class QTuningSFTTrainer(SFTTrainer):
    """Drop-in replacement for ``trl.SFTTrainer`` (same constructor) that trains with Q-Tuning.

    Pass a :class:`QTuningConfig` as ``args``. With ``qtuning_enabled=False`` it behaves exactly like ``SFTTrainer``.
    """

    _tag_names = ["trl", "sft", "qtuning"]

    def __init__(self, *args: Any, **kwargs: Any):
        bound = inspect.signature(SFTTrainer.__init__).bind(None, *args, **kwargs)
        call = dict(bound.arguments)
        call.pop("self")
        extra = call.pop("kwargs", {})
        config = require_qtuning_config(call.get("args"))
        if config.qtuning_enabled and call.get("train_dataset") is not None:
            call["train_dataset"] = with_sample_ids(call["train_dataset"])
        given = sized_length(call.get("train_dataset"))
        wants_mlflow = "mlflow" in (config.report_to or [])
        if wants_mlflow:
            from .tracking import require_mlflow

            require_mlflow(integration=True)  # before transformers' own MLflowCallback fails with a less helpful message
        super().__init__(**call, **extra)
        from .integrations.quantization import keep_4bit_trainable_on_cpu

        # bitsandbytes' CPU backend repacks 4-bit weights for inference on an eval forward (our scoring pass), which
        # silently cuts gradients: keep them trainable (a no-op without bitsandbytes or on CUDA).
        keep_4bit_trainable_on_cpu(self.model)
        if config.qtuning_enabled:
            self._setup_qtuning(config, given)
        self._built_settings = self._qtuning_settings()
        if wants_mlflow:
            from .tracking import attach_tracking

            attach_tracking(self)
        end_at_exit(self)  # several processes must tear down cleanly even if the script never calls end()

    def _setup_qtuning(self, config: QTuningConfig, given: int | None) -> None:
        check_prepared_dataset(given, self.train_dataset, config.max_length, config.truncation_mode)
        if self.compute_loss_func is not None:
            raise ValueError(
                "`compute_loss_func` is not supported with Q-Tuning (TRL deprecates it, and it would need an extra "
                "full-logits forward). Remove it, or set `qtuning_enabled=False`."
            )
        self.data_collator = QTuningDataCollator(self.data_collator)
        # The normaliser is counted after pruning and passed to every micro-batch's loss, which divides by it.
        self.loss_is_scaled_for_ga = True
        self._decision_listeners: list[DecisionListener] = []
        self._ledger: LedgerCallback | None = None
        self._reference_model = None
        self._reference_from: str | None = None
        self._build_qtuning(config)

    def _build_qtuning(self, config: QTuningConfig) -> None:
        """The policy and what depends on it (reference, scorer, decider, metrics, ledger) from ``config``: at
        construction, and again at ``train()`` when Q-Tuning fields of ``trainer.args`` were changed since."""
        config.check_sample_budget(self.accelerator.num_processes)
        self._policy = config.build_policy()
        # TailSFT's reference is the initial model: with LoRA (which starts as the identity) that is the trained model
        # with its adapters disabled, at no memory cost; otherwise a model of its own (loaded, or a frozen copy).
        self._reference_without_adapters = (
            self._policy.needs_reference and config.reference_model_path is None and isinstance(self.model, PeftModel)
        )
        if self._reference_without_adapters:
            _warn_if_adapters_are_trained(self.accelerator.unwrap_model(self.model))
        wants_own_reference = self._policy.needs_reference and not self._reference_without_adapters
        if not wants_own_reference:
            self._reference_model, self._reference_from = None, None
        elif self._reference_model is None or self._reference_from != config.reference_model_path:
            self._reference_model = load_reference_model(
                self.accelerator.unwrap_model(self.model), config.reference_model_path, self.args.device,
                sample_policy=config.sample_policy,
            )  # fmt: skip
            self._reference_from = config.reference_model_path
        adapters_of = (lambda: self.accelerator.unwrap_model(self.model)) if self._reference_without_adapters else None
        self._scorer = Scorer(
            self.compute_loss_context_manager, padding_free=bool(getattr(self, "padding_free", False)),
            needs_statistics=self._policy.needs_scoring, reference=reference_forward(self._reference_model, adapters_of),
            entropy_positions=config.entropy_positions,
        )  # fmt: skip
        self._decider = StepDecider(
            self._policy, triage_scope=config.triage_scope, seed=config.seed, rank=config.process_index,
            accelerator=self.accelerator,
        )  # fmt: skip
        self._metrics_log = StepMetricsLog(
            uses_eu_plane=self._policy.samples.uses_eu_plane, reweights=self._policy.samples.reweights
        )
        if self._ledger is not None:  # a rebuild: the previous ledger goes
            self._decision_listeners.remove(self._ledger)
            self.callback_handler.remove_callback(self._ledger)
            self._ledger = None
        if config.qtuning_ledger != "none" and self.is_world_process_zero():
            # One writer: with several processes every rank's rows are gathered to the main process each step.
            self._ledger = LedgerCallback(DecisionLedger(
                Path(config.output_dir) / LEDGER_DIRNAME, level=config.qtuning_ledger, rank=config.process_index,
                rows_per_shard=config.qtuning_ledger_rows_per_shard,
            ))  # fmt: skip
            self.add_decision_listener(self._ledger)
            callbacks = self.callback_handler.callbacks
            after_flow = next((i + 1 for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)), 0)
            callbacks.insert(after_flow, self._ledger)

    def _qtuning_settings(self) -> dict[str, Any]:
        """The values of ``trainer.args`` the Q-Tuning machinery was built from."""
        return {name: getattr(self.args, name, None) for name in _BUILT_FROM}

    def _apply_changed_settings(self) -> None:
        """Honour Q-Tuning fields changed on ``trainer.args`` since the trainer was built (a budget sweep reusing one
        trainer): rebuild the policy and what depends on it, so the run trains what MLflow and the summary record.
        ``qtuning_enabled`` shaped the dataset, collator and loss at construction: a change of it is refused."""
        now, built = self._qtuning_settings(), self._built_settings
        changed = {name: (built[name], value) for name, value in now.items() if value != built[name]}
        if not changed:
            return
        if "qtuning_enabled" in changed:
            before, after = changed["qtuning_enabled"]
            raise ValueError(
                f"`qtuning_enabled` was changed on trainer.args from {before} to {after} after the trainer was built. "
                "It decides at construction how the dataset, the collator and the loss are prepared, so it cannot "
                f"change at train(): build a new QTuningSFTTrainer with `qtuning_enabled={after}`."
            )
        if self.args.qtuning_enabled:
            self.args._validate_qtuning()
            logger.warning(
                "Q-Tuning: trainer.args changed since the trainer was built (%s): the selection policy and what depends "
                "on it are rebuilt, so this train() trains with the new settings, as MLflow and the summary record.",
                ", ".join(f"{name} {before!r} -> {after!r}" for name, (before, after) in changed.items()),
            )
            self._build_qtuning(self.args)
        self._built_settings = now

    @property
    def qtuning_realised_budgets(self) -> dict[str, float | int | None]:
        """What the steps of this trainer's ``train()`` calls realised so far
        (:func:`~trl_qtuning.step.metrics.realised_budgets` of their sums, every rank's) and ``steps``."""
        return self._metrics_log.realised_budgets()

    @property
    def qtuning_scored_tokens(self) -> int:
        """Tokens processed by scoring forwards so far (reference-model forwards included), on this process."""
        return self._scorer.scored_tokens

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.args.qtuning_enabled and SAMPLE_ID_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, SAMPLE_ID_COLUMN]

    # ------------------------------------------------------------------ the hook
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if not self.args.qtuning_enabled:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        batch_samples = list(itertools.islice(epoch_iterator, num_batches))
        if batch_samples:
            batch_samples = self._prune_step(batch_samples)
        return batch_samples, self._count_label_tokens(batch_samples, device)

    def _prune_step(self, batch_samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """fetch -> score -> decide -> apply -> count, for the micro-batches of one optimizer step."""
        start = time.perf_counter()
        sample_ids = [mb.pop(SAMPLE_ID_COLUMN, None) for mb in batch_samples]
        scored = [self._score(mb, ids) for mb, ids in zip(batch_samples, sample_ids, strict=True)]
        scoring_seconds = time.perf_counter() - start
        step = self._decider.decide(scored, self.state.global_step + 1)
        pruned = [apply_decisions(mb, s, *step.of_micro_batch(i)) for i, (mb, s) in enumerate(zip(batch_samples, scored))]
        self._record(step, scoring_seconds)
        return self._runnable(pruned, batch_samples)

    def _score(self, batch: dict[str, Any], sample_ids: torch.Tensor | None) -> ScoredMicroBatch:
        return self._scorer.score(self.model_wrapped, batch, sample_ids, inference_mode=self._scores_in_inference_mode())

    def _scores_in_inference_mode(self) -> bool:
        """Inference mode unless turned off or the parameters are sharded.

        FSDP and DeepSpeed ZeRO-3 gather parameters into buffers during the forward and reuse them (FSDP's unsharded
        storage, ZeRO-3's persistent small parameters); created in inference mode, training could not use them.
        """
        if not self.args.scoring_inference_mode or self.is_fsdp_enabled:
            return False
        return not (self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3)

    def _runnable(self, pruned: list[dict[str, Any]], fetched: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The micro-batches to run (:func:`~trl_qtuning.step.batch.runnable_micro_batches`)."""

        def most_across_ranks(value: int) -> int:
            return int(self.accelerator.gather(torch.tensor([value], device=self.args.device)).max())

        return runnable_micro_batches(
            pruned, fetched, padding_free=self._scorer.padding_free,
            pack_size=self.args.per_device_train_batch_size if self.args.pack_kept_rows else None,
            pad_token_id=pad_token_id(self.data_collator), run_last=self._must_run_last_micro_batch(),
            most_across_ranks=most_across_ranks if self._must_run_every_micro_batch() else None,
        )  # fmt: skip

    def _must_run_every_micro_batch(self) -> bool:
        """Several processes: skipping a micro-batch on one rank only would leave the others waiting in a collective."""
        return self.accelerator.num_processes > 1

    def _must_run_last_micro_batch(self) -> bool:
        """DeepSpeed steps its optimizer in the last micro-batch's backward; DDP all-reduces there."""
        return self._must_run_every_micro_batch() or self.accelerator.distributed_type == DistributedType.DEEPSPEED

    def _count_label_tokens(self, batch_samples: list[dict[str, Any]], device: torch.device) -> torch.Tensor | None:
        """Trainable tokens of the step (labels shifted by one), summed over ranks like transformers does."""
        if not batch_samples:
            return None
        count = sum((mb["labels"][..., 1:] != -100).sum() for mb in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.args.qtuning_enabled and not has_rows(inputs):
            # Every sample of this micro-batch was dropped: nothing to compute, nothing to add to the loss.
            return torch.zeros((), device=self.args.device)
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        except RuntimeError as error:
            clearer = as_inference_tensor_error(error) if self.args.qtuning_enabled else None
            if clearer is not None and self._scores_in_inference_mode():
                raise clearer from error
            raise

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs.pop(SAMPLE_ID_COLUMN, None)
        weights = inputs.pop(LOSS_WEIGHT_COLUMN, None)
        if weights is not None:
            model = WeightedLogProbs(model, weights)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    # ------------------------------------------------------------------ metrics and ledger
    def _record(self, step: StepSelection, scoring_seconds: float) -> None:
        """Log the step's metrics over every rank's samples; hand its decisions to the listeners, if any."""
        wants_columns = bool(self._decision_listeners) and self.is_world_process_zero()
        sums, scoring_seconds, wants_columns = gather_step_sums(
            self.accelerator, step_sums(step), scoring_seconds, wants_columns
        )
        number, epoch = self.state.global_step + 1, float(self.state.epoch or 0.0)
        self._metrics_log.append(self._metrics["train"], sums, scoring_seconds, number)
        if not wants_columns:  # the same answer on every rank: all or none take part in the gather below
            return
        columns = ledger_columns(
            step, number=number, epoch=epoch, rank=self.args.process_index, reweights=self._policy.samples.reweights
        )
        columns, thresholds = gather_ledger_columns(
            columns, step.thresholds, several=self.accelerator.num_processes > 1,
            global_scope=self.args.triage_scope == "global",
        )  # fmt: skip
        if self.is_world_process_zero():
            event = StepDecisions(number, columns, thresholds, scoring_seconds)
            for listener in self._decision_listeners:
                listener(event)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds ``qtuning/token_keep_ratio`` pooled over the logging window (absent when no sample was token-pruned).

        The end-of-training log (``train_loss``) closes the last window, which is short when ``max_steps`` is not a
        multiple of ``logging_steps``: TRL adds that window's other metrics to it, so this one goes there too.
        """
        if self.args.qtuning_enabled and self.model.training and ("loss" in logs or "train_loss" in logs):
            ratio = self._metrics_log.pop_token_keep_ratio()
            if ratio is not None:
                self._metrics["train"]["qtuning/token_keep_ratio"] = [ratio]
        super().log(logs, *args, **kwargs)

    def add_decision_listener(self, listener: DecisionListener) -> None:
        """Call ``listener(StepDecisions)`` after every optimizer step's decisions (tracking integrations use this)."""
        self._decision_listeners.append(listener)

    # ------------------------------------------------------------------ persistence
    def _save_checkpoint(self, model, trial):
        ledger = self._ledger if self.args.qtuning_enabled else None
        if ledger is None:
            return super()._save_checkpoint(model, trial)
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        with ledger.around_checkpoint(folder, self.state.global_step):
            super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        self._apply_changed_settings()
        ledger = self._ledger if self.args.qtuning_enabled else None
        if self.is_world_process_zero():
            self._open_outputs(ledger, resume_from_checkpoint)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            if ledger is not None:  # what an interrupted train() decided is kept
                ledger.ledger.flush()

    def _open_outputs(self, ledger: LedgerCallback | None, resume_from_checkpoint: str | bool | None) -> None:
        """The ledger of this run (:func:`~trl_qtuning.ledger.open_for_run`); for a fresh run, an earlier run's
        tracking outputs moved aside like its ledger (:mod:`~trl_qtuning.tracking.outputs`)."""
        from .tracking.outputs import TRACKING_DIR, set_aside_earlier_outputs

        output_dir = self.args.output_dir
        try:
            moved = ledger.open(resume_from_checkpoint, output_dir) if ledger is not None else None
            if is_fresh_run(resume_from_checkpoint, output_dir):
                # Tracking that already started (an evaluate() before train()) writes this run's own folder.
                started = any(getattr(cb, "sink", None) is not None for cb in self.callback_handler.callbacks)
                set_aside_earlier_outputs(output_dir, None if moved is None else (ledger.ledger.directory, moved),
                                          keep=(TRACKING_DIR,) if started else ())  # fmt: skip
        except OSError as error:
            ledger_hint = (
                " To train without writing the decision ledger, set `qtuning_ledger=\"none\"`." if ledger is not None else ""
            )
            raise OSError(
                f"Q-Tuning cannot write its outputs in output_dir={output_dir!r} ({type(error).__name__}: {error}): "
                f"the folder must be writable (is it read-only?). Give a writable `output_dir`.{ledger_hint}"
            ) from error

    def end(self) -> None:
        """Finish the trackers and destroy the process group, letting go of the distributed wrapper first.

        Optional: a script that does not call it is ended at exit the same way (:mod:`~trl_qtuning.integrations.teardown`, which
        says why the wrapper must go first).
        """
        release_before_group_ends(self)  # and the wrappers of other trainers, which lose the group too
        super().end()
        unregister(self)
