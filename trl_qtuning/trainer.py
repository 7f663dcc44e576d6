"""``QTuningSFTTrainer``: TRL's ``SFTTrainer`` that prunes each optimizer step's data before training on it.

Where it hooks in (transformers' training loop): ``get_batch_samples`` fetches the micro-batches of one optimizer step
and counts the loss normaliser. This trainer fetches them, scores every sample with the current model (no grad, eval
mode, TRL's fused LM head: per-token log-probs and entropy without the (batch, seq, vocab) logits), asks the pure core
which samples stay and which labels are kept, physically removes dropped rows, masks pruned labels, and only then
counts the normaliser. The loss of the step is therefore ``sum(NLL over kept tokens) / kept token count``, exactly,
under gradient accumulation. It returns as many micro-batches as it fetched (an emptied one is skipped in
``training_step``).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import DistributedType
from transformers import TrainerCallback
from trl import SFTTrainer

from .collator import SAMPLE_ID_COLUMN, QTuningDataCollator, non_integer_sample_ids
from .config import QTuningConfig
from .core.plane import decorrelated_entropy, plane_correlation
from .core.selection import Selection, share_of_tokens
from .core.stats import eu_plane_stats, flat_to_padded, padded_to_flat, segment_ids_from_position_ids
from .events import DecisionListener, StepDecisions
from .ledger import LEDGER_DIRNAME, TRAINED_DECISIONS, DecisionLedger
from .packing import empty_like, pack_padded, pack_padding_free, refresh_flat_metadata
from .policies import SampleDecision
from .policies.base import reference_sample_ppl

try:  # Internal TRL API (1.15+): checked here so a TRL change fails at import with a clear message.
    from trl.trainer.utils import FusedCausalLMOutput
except ImportError as exc:  # pragma: no cover - depends on the installed TRL
    raise ImportError(
        "trl_qtuning needs TRL's fused LM head (`trl.trainer.utils.FusedCausalLMOutput`, TRL >= 1.15, < 2). "
        "Install a supported version: pip install 'trl>=1.15,<2'."
    ) from exc

__all__ = ["QTuningSFTTrainer"]

logger = logging.getLogger(__name__)

LOSS_WEIGHT_COLUMN = "qtuning_loss_weight"
"""Per-token loss factor added to micro-batches by reweighting policies (InfoBatch); read by ``compute_loss``."""

LEDGER_ID_FILE = "qtuning_ledger_id.json"
"""Written into every checkpoint: the run id of the ledger it belongs to (see :mod:`trl_qtuning.ledger`)."""

_EAGER_DEVICE_TYPES = ("cpu", "cuda", "mps")
_warned_no_compaction = False


@contextlib.contextmanager
def _project_labelled_positions_only() -> Iterator[None]:
    """Make TRL's fused head project only the positions whose label is set, on eager devices too.

    TRL compacts the hidden states to the labelled positions on Triton devices only; elsewhere it projects every
    position (fixed tile shapes for compiled backends such as Neuron). On an eager CPU that spends the LM head and
    entropy on prompt and padding positions, often most of an SFT batch, for numbers the scoring pass never reads.
    Only the scoring forward runs under this: the training forward stays exactly SFTTrainer's. A TRL without the
    switch leaves the scoring as it is (slower on CPU, same result).
    """
    import trl.trainer.utils as trl_utils

    global _warned_no_compaction
    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        if not _warned_no_compaction:
            _warned_no_compaction = True
            logger.warning(
                "Q-Tuning: this TRL has no `trl.trainer.utils._use_triton` (a private name this package relies on), so "
                "the scoring forward cannot project only the answer positions through the LM head on %s: scoring "
                "stays correct but runs slower. Install a TRL version this release is tested with (1.15-1.x).",
                "eager devices",
            )
        yield
        return
    trl_utils._use_triton = lambda device: device.type in _EAGER_DEVICE_TYPES or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original


_PER_TOKEN_FLAT_KEYS = ("input_ids", "labels", "position_ids", "shift_labels", LOSS_WEIGHT_COLUMN)


@dataclass
class _ScoredMicroBatch:
    """One micro-batch's statistics in a per-sample padded layout (row = sample, column = label position - 1)."""

    token_logps: torch.Tensor
    response: torch.Tensor
    positions: torch.Tensor
    """(n, W) offset in the sample's input_ids of the label each column scores."""
    ppl: torch.Tensor
    entropy: torch.Tensor
    sample_ids: torch.Tensor
    reference_logps: torch.Tensor | None = None
    """(n, W) log-probs of the labels under the reference model (policies that need one)."""
    flat_segments: torch.Tensor | None = None
    """Padding-free only: sample index and column of every shifted position of the flat row."""
    flat_columns: torch.Tensor | None = None
    measured: bool = True
    """False when no scoring forward ran (the policy reads no statistics): ``ppl``/``entropy`` are placeholders."""
    top1_hits: float = float("nan")
    """Answer tokens whose label was the model's top-1 prediction, before pruning (NaN when not measured)."""
    entropy_sum: float = float("nan")
    """Sum of the answer tokens' predictive entropy, before pruning (NaN when not measured)."""
    tokens: int = 0
    """Non-padding tokens of the micro-batch as fetched."""

    @property
    def num_samples(self) -> int:
        return self.ppl.numel()


class _WeightedLogProbs:
    """Calls the model and multiplies its fused per-token log-probs by a loss weight, so TRL's own loss (``-sum
    log_probs / num_items``) becomes the weighted sum. Everything else is the wrapped model's."""

    def __init__(self, model: torch.nn.Module, weights: torch.Tensor):
        self._model = model
        self._weights = weights

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self._model(*args, **kwargs)
        if isinstance(out, FusedCausalLMOutput) and out.log_probs is not None:
            out.log_probs = out.log_probs * self._weights[..., 1:].to(out.log_probs.dtype)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def _sized_length(dataset: Any) -> int | None:
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:  # IterableDataset
        return None


def _check_sample_ids(dataset: Any) -> None:
    """The user's ``qtuning_sample_id`` column: integers (else a clear error now, not a crash in the collator at the
    first step; a stream of unknown features is checked by the collator), unique in a sized dataset (else a warning
    with the count and an example)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    features = getattr(dataset, "features", None)
    feature = features.get(SAMPLE_ID_COLUMN) if features else None
    if feature is not None:
        pa_type = getattr(feature, "pa_type", None)
        if pa_type is None or not pa.types.is_integer(pa_type):
            raise non_integer_sample_ids(f"has type {feature}")
    if _sized_length(dataset) is None or not hasattr(dataset, "with_format"):
        return
    ids = dataset.with_format("arrow")[SAMPLE_ID_COLUMN]
    if ids.null_count:
        raise non_integer_sample_ids(f"has {ids.null_count} missing value(s)")
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        top = repeated[int(pc.index(repeated.field("counts"), pc.max(repeated.field("counts"))).as_py())]
        logger.warning(
            "Q-Tuning: %d value(s) of the `%s` column appear on more than one row (%d rows; e.g. id %s on %d rows): "
            "ledger rows with these ids cannot be traced back to one row. Give each row its own id, or remove the "
            "column and the trainer numbers the rows itself.",
            len(repeated), SAMPLE_ID_COLUMN, pc.sum(repeated.field("counts")).as_py(), top["values"], top["counts"],
        )  # fmt: skip


def _is_padding_free(batch: dict[str, Any]) -> bool:
    return "position_ids" in batch and "attention_mask" not in batch


def _non_padding_tokens(batch: dict[str, Any]) -> int:
    """Tokens a forward over ``batch`` processes, padding excluded (what the compute accounting counts)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def _is_peft(model: torch.nn.Module) -> bool:
    """A PEFT (LoRA) model, whose ``disable_adapter()`` gives back the base model."""
    from transformers.utils import is_peft_available

    if not is_peft_available():
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _has_rows(batch: dict[str, Any]) -> bool:
    return batch["input_ids"].numel() > 0


def _pad_columns(tensor: torch.Tensor, width: int, value: float | bool = 0) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)


def _measured(values: torch.Tensor, scored: _ScoredMicroBatch) -> torch.Tensor:
    """A statistic for the ledger and metrics: NaN where no scoring forward measured it."""
    values = values.detach().cpu().double()
    return values if scored.measured else torch.full_like(values, float("nan"))


class _LedgerFlush(TrainerCallback):
    """Writes the buffered ledger rows when training ends, before other callbacks upload or read them."""

    def __init__(self, ledger: DecisionLedger):
        self.ledger = ledger

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
        config = call.get("args")
        if config is None:
            raise ValueError("QTuningSFTTrainer needs `args=QTuningConfig(...)` (the Q-Tuning budgets live there).")
        if not isinstance(config, QTuningConfig):
            raise TypeError(
                f"`args` must be a trl_qtuning.QTuningConfig, got {type(config).__name__}. Replace "
                f"{type(config).__name__}(...) with QTuningConfig(...): it takes SFTConfig's arguments (which include "
                "TrainingArguments') plus the Q-Tuning ones."
            )
        if config.qtuning_enabled and call.get("train_dataset") is not None:
            call["train_dataset"] = self._with_sample_ids(call["train_dataset"])
        given = _sized_length(call.get("train_dataset"))
        wants_mlflow = "mlflow" in (config.report_to or [])
        if wants_mlflow:
            from .tracking import require_mlflow

            require_mlflow()  # before transformers' own MLflowCallback fails with a less helpful message
        super().__init__(**call, **extra)
        from .quantization import keep_4bit_trainable_on_cpu

        # bitsandbytes' CPU backend repacks 4-bit weights for inference on an eval forward (our scoring pass), which
        # silently cuts gradients: keep them trainable (a no-op without bitsandbytes or on CUDA).
        keep_4bit_trainable_on_cpu(self.model)
        if config.qtuning_enabled:
            self._setup_qtuning(config, given)
        if wants_mlflow:
            from .tracking import attach_tracking

            attach_tracking(self)

    def _setup_qtuning(self, config: QTuningConfig, given: int | None) -> None:
        config.check_sample_budget(self.accelerator.num_processes)
        self._check_prepared_dataset(given)
        if self.compute_loss_func is not None:
            raise ValueError(
                "`compute_loss_func` is not supported with Q-Tuning (TRL deprecates it, and it would need an extra "
                "full-logits forward). Remove it, or set `qtuning_enabled=False`."
            )
        self.data_collator = QTuningDataCollator(self.data_collator)
        # The normaliser is counted after pruning and passed to every micro-batch's loss, which divides by it.
        self.loss_is_scaled_for_ga = True
        self._policy = config.build_policy()
        self.qtuning_scored_tokens = 0
        """Tokens processed by scoring forwards so far (reference-model forwards included), on this process."""
        self._run_tokens_seen = self._run_tokens_kept = 0
        self._token_keep_pool = [0.0, 0.0]  # kept / answer tokens of token-pruned samples since the last log
        self._prepruning_tokens = 0
        # TailSFT's reference is the initial model: with LoRA (which starts as the identity) that is the trained model
        # with its adapters disabled, at no memory cost; otherwise a model of its own (loaded, or a frozen copy).
        self._reference_without_adapters = (
            self._policy.needs_reference and config.reference_model_path is None and _is_peft(self.model)
        )
        wants_reference_model = self._policy.needs_reference and not self._reference_without_adapters
        self._reference_model = self._load_reference_model(config) if wants_reference_model else None
        self._decision_listeners: list[DecisionListener] = []
        self._ledger: DecisionLedger | None = None
        if config.qtuning_ledger != "none" and self.is_world_process_zero():
            # One writer: with several processes every rank's rows are gathered to the main process each step.
            self._ledger = DecisionLedger(
                Path(config.output_dir) / "qtuning_ledger",
                level=config.qtuning_ledger,
                rank=self.args.process_index,
                rows_per_shard=config.qtuning_ledger_rows_per_shard,
            )
            self.add_decision_listener(lambda event: self._ledger.append(event.columns))
            # First in line, so listeners that read the ledger at the end of training see every row.
            self.callback_handler.callbacks.insert(0, _LedgerFlush(self._ledger))

    def _load_reference_model(self, config: QTuningConfig) -> torch.nn.Module:
        """The frozen reference model of Rho-1-style token policies, with TRL's fused head, on the training device.

        Without ``reference_model_path`` (TailSFT, full fine-tuning): a frozen copy of the model before any step.
        """
        from transformers import AutoModelForCausalLM
        from trl.trainer.utils import add_fused_lm_head

        if config.reference_model_path is None:
            logger.info(
                "Q-Tuning: sample_policy=%r compares each sample with the initial model; a frozen copy of the model "
                "is kept for it (one extra model in memory; with LoRA the adapters are disabled instead).",
                config.sample_policy,
            )
            reference = copy.deepcopy(self.accelerator.unwrap_model(self.model))
            reference.__dict__.pop("forward", None)  # the copied fused forward: re-added below on the copy itself
            add_fused_lm_head(reference, outputs=("log_probs",))
            reference.requires_grad_(False)
            return reference.to(self.args.device).eval()

        floating = [p.dtype for p in self.model.parameters() if p.is_floating_point()]
        dtype = floating[0] if floating else torch.float32
        try:
            reference = AutoModelForCausalLM.from_pretrained(config.reference_model_path, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"`reference_model_path={config.reference_model_path!r}` could not be loaded as a causal LM "
                f"({type(exc).__name__}: {exc}). Give the folder of a model saved with save_pretrained."
            ) from exc
        ours = self.model.get_output_embeddings().weight.shape[0]
        theirs = reference.get_output_embeddings().weight.shape[0]
        if ours != theirs:
            raise ValueError(
                f"`reference_model_path` model has a vocabulary of {theirs} tokens, the trained model {ours}: the "
                "rho1 token policy compares log-probs of the same tokens, so both must share one tokenizer."
            )
        add_fused_lm_head(reference, outputs=("log_probs",))
        reference.requires_grad_(False)
        return reference.to(self.args.device).eval()

    # ------------------------------------------------------------------ dataset plumbing
    def _check_prepared_dataset(self, given: int | None) -> None:
        """Fail now, not at the first step, when TRL's preparation left no sample with a trainable token."""
        prepared = _sized_length(self.train_dataset)
        if given is None or prepared is None:
            return
        if prepared == 0:
            raise ValueError(
                f"train_dataset has no sample with a trainable (completion/assistant) token left after TRL's "
                f"preparation: all {given} were fully masked (max_length={self.args.max_length}, truncation_mode="
                f"{self.args.truncation_mode!r}). Raise `max_length`, shorten the prompts, or check that the data "
                "has completions (and, with `assistant_only_loss`, that the chat template marks assistant turns "
                "with {% generation %})."
            )
        if prepared < given:
            logger.warning(
                "Q-Tuning: %d of %d training samples had no trainable token left after truncation to max_length=%s "
                "and were removed by TRL; ledger sample ids still refer to rows of the dataset you passed.",
                given - prepared, given, self.args.max_length,
            )

    @staticmethod
    def _with_sample_ids(dataset: Any) -> Any:
        """Add the row index as ``qtuning_sample_id``, or check the ids the user supplies in that column.

        A stream (``IterableDataset``) cannot number its rows: without the user's column its ids are positions in
        the stream, which a warning says.
        """
        columns = getattr(dataset, "column_names", None)
        if columns is not None and SAMPLE_ID_COLUMN in columns:
            _check_sample_ids(dataset)
            return dataset
        if hasattr(dataset, "add_column") and hasattr(dataset, "__len__"):
            return dataset.add_column(SAMPLE_ID_COLUMN, list(range(len(dataset))))
        if hasattr(dataset, "map"):
            logger.warning(
                "Q-Tuning: train_dataset is a stream (IterableDataset) %s, so ledger sample ids are stream positions, "
                "not row ids: they repeat with every pass over the stream and, after shuffle(), name different rows "
                "in different passes. To trace decisions back to rows, give each row its own integer `%s` before "
                "shuffling (e.g. `ds.add_column('%s', list(range(len(ds))))` before `to_iterable_dataset()`, or an "
                "integer id your data carries).",
                "whose columns are unknown (rows without a `qtuning_sample_id` column)" if columns is None
                else "without a `qtuning_sample_id` column", SAMPLE_ID_COLUMN, SAMPLE_ID_COLUMN,
            )  # fmt: skip
            if columns is None:  # keep the user's ids where the rows carry them
                keep_or_number = lambda row, idx: {SAMPLE_ID_COLUMN: row.get(SAMPLE_ID_COLUMN, idx)}  # noqa: E731
                return dataset.map(keep_or_number, with_indices=True)
            return dataset.map(lambda _, idx: {SAMPLE_ID_COLUMN: idx}, with_indices=True)
        return dataset

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self.args.qtuning_enabled and SAMPLE_ID_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, SAMPLE_ID_COLUMN]

    # ------------------------------------------------------------------ the hook
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if not self.args.qtuning_enabled:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        if batch_samples:
            batch_samples = self._prune_step(batch_samples)
        return batch_samples, self._count_label_tokens(batch_samples, device)

    def _count_label_tokens(self, batch_samples: list[dict[str, Any]], device: torch.device) -> torch.Tensor | None:
        """Trainable tokens of the step (labels shifted by one), summed over ranks like transformers does."""
        if not batch_samples:
            return None
        count = sum((mb["labels"][..., 1:] != -100).sum() for mb in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.args.qtuning_enabled and not _has_rows(inputs):
            # Every sample of this micro-batch was dropped: nothing to compute, nothing to add to the loss.
            return torch.zeros((), device=self.args.device)
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        except RuntimeError as error:
            scored_in_inference_mode = self.args.qtuning_enabled and self._scores_in_inference_mode()
            if scored_in_inference_mode and "inference tensor" in str(error).lower():
                raise RuntimeError(
                    "Training used a tensor the model created during Q-Tuning's scoring forward, which runs under "
                    "torch.inference_mode(): the model caches tensors in its forward. Set "
                    "`scoring_inference_mode=False` (scoring then runs under torch.no_grad())."
                ) from error
            raise

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs.pop(SAMPLE_ID_COLUMN, None)
        weights = inputs.pop(LOSS_WEIGHT_COLUMN, None)
        if weights is not None:
            model = _WeightedLogProbs(model, weights)
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    # ------------------------------------------------------------------ scoring
    def _score(self, batch: dict[str, Any], sample_ids: torch.Tensor | None) -> _ScoredMicroBatch:
        """One gradient-free forward in eval mode (no dropout, no gradient checkpointing) -> the EU-plane statistics.

        A policy that reads no statistics gets the batch's layout alone, with no forward (and no compute charged).
        """
        if not self._policy.needs_scoring:
            return self._layout_only(batch, sample_ids)
        forwards = 2 if self._policy.needs_reference else 1
        self.qtuning_scored_tokens += forwards * _non_padding_tokens(batch)
        no_autograd = torch.inference_mode if self._scores_in_inference_mode() else torch.no_grad
        with no_autograd():
            return self._score_without_autograd(batch, sample_ids)

    def _layout_only(self, batch: dict[str, Any], sample_ids: torch.Tensor | None) -> _ScoredMicroBatch:
        """The padded row layout of ``batch`` without a forward: response masks and positions from the labels,
        zero log-probs, and a placeholder statistic (0, NaN for a sample without answer tokens) that only marks which
        samples can be kept. The ledger shows NaN statistics for such steps (``measured=False``)."""
        labels = batch["labels"]
        response = labels[:, 1:] != -100
        segments = columns = None
        if _is_padding_free(batch):
            position_ids = batch["position_ids"]
            n = sample_ids.numel() if sample_ids is not None else int((position_ids == 0).sum())
            segments = segment_ids_from_position_ids(position_ids, n)[0, 1:]
            columns = position_ids[0, 1:] - 1
            response = flat_to_padded(response[0], segments, columns, n, fill=False)
            positions = flat_to_padded(position_ids[0, 1:], segments, columns, n, fill=0)
        else:
            n = labels.shape[0]
            positions = torch.arange(1, labels.shape[1], device=labels.device).expand(n, -1)
        placeholder = torch.where(response.any(dim=1), 0.0, float("nan")).float()
        ids = sample_ids.cpu() if sample_ids is not None else torch.full((n,), -1, dtype=torch.long)
        return _ScoredMicroBatch(
            torch.zeros(response.shape, device=labels.device), response, positions, placeholder, placeholder.clone(), ids,
            flat_segments=segments, flat_columns=columns, measured=False, tokens=_non_padding_tokens(batch),
        )  # fmt: skip

    def _scores_in_inference_mode(self) -> bool:
        """Inference mode unless turned off or the parameters are sharded.

        FSDP and DeepSpeed ZeRO-3 gather parameters into buffers during the forward and reuse them (FSDP's unsharded
        storage, ZeRO-3's persistent small parameters); created in inference mode, training could not use them.
        """
        if not self.args.scoring_inference_mode or self.is_fsdp_enabled:
            return False
        return not (self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3)

    def _score_without_autograd(self, batch: dict[str, Any], sample_ids: torch.Tensor | None) -> _ScoredMicroBatch:
        labels = batch["labels"]
        model_inputs = {k: v for k, v in batch.items() if k != "labels"}
        padding_free = _is_padding_free(batch)
        score_labels = labels
        if self.args.entropy_positions == "all":
            score_labels = batch["input_ids"].clone()
            if padding_free:
                score_labels[batch["position_ids"] == 0] = -100
            else:
                score_labels[batch["attention_mask"] == 0] = -100
        model = self.model_wrapped
        was_training = model.training
        model.eval()
        try:
            with self.compute_loss_context_manager(), _project_labelled_positions_only():
                out = model(**model_inputs, labels=score_labels, fused_lm_head=True, use_cache=False)
                reference_logps = self._reference_log_probs(model, model_inputs, labels)
        finally:
            model.train(was_training)
        if not isinstance(out, FusedCausalLMOutput) or out.entropy is None:
            raise RuntimeError(
                "The scoring forward did not return TRL's fused LM head output with per-token entropy. Q-Tuning needs "
                f"`SFTTrainer`'s fused head (TRL >= 1.15, < 2); got {type(out).__name__}. Is the model's forward "
                "replaced by another library (e.g. Liger's fused cross-entropy)?"
            )
        token_logps, token_entropy = out.log_probs.float(), out.entropy.float()
        response = labels[:, 1:] != -100
        entropy_mask = score_labels[:, 1:] != -100
        # What TRL's mean_token_accuracy and entropy would say of the step before pruning (they see kept tokens only).
        top1_hits = float((out.is_top1.bool() & response).sum()) if out.is_top1 is not None else float("nan")
        entropy_sum = float(token_entropy[response].sum())
        if padding_free:
            position_ids = batch["position_ids"]
            n = sample_ids.numel() if sample_ids is not None else int((position_ids == 0).sum())
            segments = segment_ids_from_position_ids(position_ids, n)[0, 1:]
            columns = position_ids[0, 1:] - 1

            def to_rows(values: torch.Tensor, fill: float | bool = 0) -> torch.Tensor:
                return flat_to_padded(values[0], segments, columns, n, fill=fill)

            token_logps, token_entropy = to_rows(token_logps), to_rows(token_entropy)
            if reference_logps is not None:
                reference_logps = to_rows(reference_logps)
            response, entropy_mask = to_rows(response, False), to_rows(entropy_mask, False)
            positions = to_rows(position_ids[:, 1:])
        else:
            n = labels.shape[0]
            segments = columns = None
            positions = torch.arange(1, labels.shape[1], device=labels.device).expand(n, -1)
        ppl, entropy = eu_plane_stats(token_logps, token_entropy, response)
        if self.args.entropy_positions == "all":
            entropy = eu_plane_stats(token_logps, token_entropy, entropy_mask)[1]
        if sample_ids is None:
            sample_ids = torch.full((n,), -1, dtype=torch.long)
        return _ScoredMicroBatch(
            token_logps, response, positions, ppl, entropy, sample_ids.cpu(), reference_logps, segments, columns,
            top1_hits=top1_hits, entropy_sum=entropy_sum, tokens=_non_padding_tokens(batch),
        )  # fmt: skip

    def _reference_log_probs(
        self, model: torch.nn.Module, model_inputs: dict[str, Any], labels: torch.Tensor
    ) -> torch.Tensor | None:
        """log p(label) under the reference (None when the policy needs none): the reference model, or, for TailSFT
        with LoRA and no ``reference_model_path``, the trained model with its adapters disabled (the initial model)."""
        if self._reference_without_adapters:
            with self.accelerator.unwrap_model(self.model).disable_adapter():
                out = model(**model_inputs, labels=labels, fused_lm_head=True, use_cache=False)
        elif self._reference_model is not None:
            out = self._reference_model(**model_inputs, labels=labels, fused_lm_head=True, use_cache=False)
        else:
            return None
        return out.log_probs.float()

    # ------------------------------------------------------------------ one optimizer step
    def _prune_step(self, batch_samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        start = time.perf_counter()
        sample_ids = [mb.pop(SAMPLE_ID_COLUMN, None) for mb in batch_samples]
        scored = [self._score(mb, ids) for mb, ids in zip(batch_samples, sample_ids, strict=True)]
        scoring_seconds = time.perf_counter() - start
        if self.args.triage_scope == "micro_batch":
            groups = [[i] for i in range(len(scored))]
        else:
            groups = [list(range(len(scored)))]
        selections: list[tuple[int, slice, Selection]] = []
        for index, group in enumerate(groups):
            width = max(scored[i].token_logps.shape[1] for i in group)
            ppl = torch.cat([scored[i].ppl for i in group])
            entropy = torch.cat([scored[i].entropy for i in group])
            response = torch.cat([_pad_columns(scored[i].response, width, False) for i in group])
            reference = None
            if self._policy.needs_reference:
                reference = torch.cat([_pad_columns(scored[i].reference_logps, width) for i in group])
            decision = None
            if self.args.triage_scope == "global":
                extra = {}
                if self._policy.samples.needs_reference:
                    extra["reference_ppl"] = reference_sample_ppl(reference, response)
                decision = self._global_sample_decision(ppl, entropy, response.sum(dim=-1), **extra)
            budget_tokens = self._run_token_budget(int(response.sum()))
            selection = self._policy.select(
                ppl,
                entropy,
                torch.cat([_pad_columns(scored[i].token_logps, width) for i in group]),
                response,
                generator=self._policy_generator(
                    index, per_rank=self.args.triage_scope != "global", stream=int(self.args.triage_scope == "global")
                ),
                reference_logps=reference,
                decision=decision,
                token_budget_tokens=budget_tokens,
            )
            if budget_tokens is not None:
                self._run_tokens_kept += int(selection.label_keep.sum())
            offset = 0
            for i in group:
                rows = slice(offset, offset + scored[i].num_samples)
                selections.append((i, rows, selection))
                offset += scored[i].num_samples
        pruned = list(batch_samples)
        for i, rows, selection in selections:
            width = scored[i].token_logps.shape[1]
            keep_rows = selection.keep[rows]
            label_keep = selection.label_keep[rows, :width]
            weight = None if selection.loss_weight is None else selection.loss_weight[rows]
            pruned[i] = self._apply(batch_samples[i], scored[i], keep_rows, label_keep, weight)
        self._record(scored, selections, scoring_seconds)
        if self.args.pack_kept_rows:
            return self._pack_kept_rows(pruned, batch_samples[0], scored[0])
        if self._must_run_every_micro_batch():
            # Every rank must join the same forwards/backwards (DDP's all-reduce, FSDP's gathers): an emptied
            # micro-batch runs one fully label-masked row, an exact zero, instead of being skipped.
            pruned = [
                mb if _has_rows(mb) else self._placeholder(original, score)
                for mb, original, score in zip(pruned, batch_samples, scored, strict=True)
            ]
        elif self._must_run_last_micro_batch() and not _has_rows(pruned[-1]):
            pruned[-1] = self._placeholder(batch_samples[-1], scored[-1])
        return pruned

    def _run_token_budget(self, group_tokens: int) -> int | None:
        """``token_budget_scope="run"``: the tokens this group keeps so that the run's kept share of every answer
        token seen so far returns to ``token_keep_ratio`` (a short step's shortfall is carried to the next). The
        running totals are this process's own and start again on resume."""
        if self.args.token_budget_scope != "run":
            return None
        self._run_tokens_seen += group_tokens
        target = share_of_tokens(self.args.token_keep_ratio, self._run_tokens_seen)
        return max(0, target - self._run_tokens_kept)

    def _pack_kept_rows(
        self, pruned: list[dict[str, Any]], source: dict[str, Any], source_scored: _ScoredMicroBatch
    ) -> list[dict[str, Any]]:
        """The kept rows in as few full micro-batches as possible, placed last; the freed slots first, empty.

        Packed micro-batches go last because the last micro-batch of a step is the one that synchronises: DDP
        all-reduces in its backward and DeepSpeed steps its optimizer there, so it must always run. With several
        processes every rank runs as many micro-batches as the rank that needs the most (one-row, fully masked
        placeholders fill the gap) and all ranks skip the same freed slots, so collectives stay matched.
        """
        size = self.args.per_device_train_batch_size
        if _is_padding_free(pruned[0]):
            packed = pack_padding_free(pruned, size)
        else:
            packed = pack_padded(pruned, size, self._pad_token_id())
        filled = [mb for mb in packed if _has_rows(mb)]
        needed = len(filled)
        if self._must_run_last_micro_batch():
            needed = max(needed, 1)
        if self._must_run_every_micro_batch():
            needed = int(self.accelerator.gather(torch.tensor([needed], device=self.args.device)).max())
        filled = [self._placeholder(source, source_scored) for _ in range(needed - len(filled))] + filled
        return [empty_like(pruned[0]) for _ in range(len(pruned) - len(filled))] + filled

    def _must_run_every_micro_batch(self) -> bool:
        """Several processes: skipping a micro-batch on one rank only would leave the others waiting in a collective."""
        return self.accelerator.num_processes > 1

    def _must_run_last_micro_batch(self) -> bool:
        """DeepSpeed steps its optimizer in the last micro-batch's backward; DDP all-reduces there."""
        return self._must_run_every_micro_batch() or self.accelerator.distributed_type == DistributedType.DEEPSPEED

    def _placeholder(self, batch: dict[str, Any], scored: _ScoredMicroBatch) -> dict[str, Any]:
        """One row (segment) of ``batch`` with every label masked: a forward and backward that add exactly zero."""
        first = torch.zeros(scored.num_samples, dtype=torch.bool)
        first[0] = True
        out = self._apply(batch, scored, first, torch.zeros_like(scored.response))
        out["labels"] = torch.full_like(out["labels"], -100)
        return out

    def _pad_token_id(self) -> int:
        collator = getattr(self.data_collator, "collator", self.data_collator)
        pad = getattr(collator, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def _policy_generator(self, group: int, *, per_rank: bool, stream: int = 0) -> torch.Generator:
        """Randomness of baseline policies: a function of (seed, step, group[, rank], stream), so runs and resumes
        repeat. ``stream`` 1 is the token draws of a cross-rank (``global``) decision, whose sample draws used stream
        0 on a generator of their own: the same seed would replay the sample draws as token draws."""
        rank = self.args.process_index if per_rank else 0
        seed = int(self.args.seed) * 1_000_003 + (self.state.global_step + 1) * 10_007 + group * 101 + rank
        seed = (seed + stream * 998_244_353) % 2**63
        return torch.Generator().manual_seed(seed)

    def _global_sample_decision(
        self,
        ppl: torch.Tensor,
        entropy: torch.Tensor,
        response_tokens: torch.Tensor,
        reference_ppl: torch.Tensor | None = None,
    ) -> SampleDecision:
        """Decide over the step's samples of every rank together; return this rank's share of the decisions.

        Costs one gather of three floats per sample (four with the reference perplexity of TailSFT-like policies,
        plus one of the per-rank counts). Every rank computes the same decisions from the same gathered statistics, in
        rank order, with the same random stream.
        """
        device = self.accelerator.device
        stats = [ppl.double(), entropy.double(), response_tokens.double()]
        if reference_ppl is not None:
            stats.append(reference_ppl.double().to(ppl.device))
        local = torch.stack(stats, dim=1).to(device)
        width = local.shape[1]
        counts = self.accelerator.gather(torch.tensor([local.shape[0]], device=device)).tolist()
        padded = torch.full((max(counts), width), float("nan"), dtype=torch.float64, device=device)
        padded[: local.shape[0]] = local
        gathered = self.accelerator.gather(padded).view(len(counts), max(counts), width)
        everyone = torch.cat([gathered[r, :n] for r, n in enumerate(counts)])
        decision = self._policy.decide_samples(
            everyone[:, 0], everyone[:, 1], everyone[:, 2].long(), self._policy_generator(0, per_rank=False),
            reference_ppl=everyone[:, 3] if width == 4 else None,
        )
        offset = sum(counts[: self.accelerator.process_index])
        return decision.rows(slice(offset, offset + local.shape[0]))

    def _apply(
        self,
        batch: dict[str, Any],
        scored: _ScoredMicroBatch,
        keep_rows: torch.Tensor,
        label_keep: torch.Tensor,
        loss_weight: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Mask pruned labels, attach loss weights, and physically drop the rows (segments) of dropped samples."""
        device = batch["labels"].device
        keep_rows, label_keep = keep_rows.to(device), label_keep.to(device)
        masked = scored.response.to(device) & ~label_keep
        labels = batch["labels"].clone()
        out = {**batch, "labels": labels}  # labels are masked in place below
        if loss_weight is not None:
            weight = loss_weight.to(device=device, dtype=torch.float32)
            if scored.flat_segments is not None:
                token_segment = segment_ids_from_position_ids(batch["position_ids"], scored.num_samples)[0]
                out[LOSS_WEIGHT_COLUMN] = weight[token_segment.clamp(min=0)][None]
            else:
                out[LOSS_WEIGHT_COLUMN] = weight[:, None].expand_as(labels).contiguous()
        if scored.flat_segments is not None:
            flat_masked = padded_to_flat(masked, scored.flat_segments, scored.flat_columns, fill=False)
            labels[0, 1:][flat_masked] = -100
            token_segment = segment_ids_from_position_ids(batch["position_ids"], scored.num_samples)[0]
            keep_tokens = (token_segment >= 0) & keep_rows[token_segment.clamp(min=0)]
            for key in _PER_TOKEN_FLAT_KEYS:
                if key in out:
                    out[key] = out[key][:, keep_tokens]
            return refresh_flat_metadata(out)
        labels[:, 1:][masked] = -100
        rows = keep_rows.nonzero().squeeze(-1)
        batch_size, seq_len = labels.shape
        width = seq_len
        if "attention_mask" in batch:
            attended = batch["attention_mask"][rows].bool()
            if attended.numel() and bool(attended.any()):
                # Right padding (TRL's collator): drop the columns no kept row attends to.
                width = int(attended.any(dim=0).nonzero().max()) + 1
        for key, value in out.items():
            if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == batch_size:
                value = value.index_select(0, rows)
                if value.dim() >= 2 and value.shape[1] == seq_len:
                    value = value[:, :width]
                out[key] = value
        return out

    # ------------------------------------------------------------------ metrics and ledger
    def _record(
        self, scored: list[_ScoredMicroBatch], selections: list[tuple[int, slice, Selection]], scoring_seconds: float
    ) -> None:
        """Log the step's metrics (over every rank's samples) and hand its decisions to the listeners."""

        def per_sample(get) -> torch.Tensor:
            return torch.cat([get(i, rows, sel).cpu() for i, rows, sel in selections])

        keep = per_sample(lambda i, rows, sel: sel.keep[rows])
        filled = per_sample(lambda i, rows, sel: sel.triage.filled[rows])
        invalid = per_sample(lambda i, rows, sel: sel.triage.invalid[rows])
        token_pruned = per_sample(lambda i, rows, sel: sel.token_pruned[rows])
        trimmed = per_sample(lambda i, rows, sel: sel.triage.trimmed[rows])
        total = keep.numel()
        decision = np.select(
            [invalid.numpy(), (keep & filled).numpy(), (keep & token_pruned).numpy(), keep.numpy(), trimmed.numpy()],
            ["invalid", "filled", "token_pruned", "kept", "trimmed"],
            default="dropped",
        )
        pruned_positions: list[list[int]] = []
        for i, rows, sel in selections:
            width = scored[i].token_logps.shape[1]
            pruned_mask = (scored[i].response.cpu() & ~sel.label_keep[rows, :width].cpu()) & sel.keep[rows].cpu()[:, None]
            values = scored[i].positions.cpu()[pruned_mask]
            pruned_positions.extend(chunk.tolist() for chunk in torch.split(values, pruned_mask.sum(dim=1).tolist()))
        columns: dict[str, list[Any]] = {
            "step": [self.state.global_step + 1] * total,
            "epoch": [float(self.state.epoch or 0.0)] * total,
            "rank": [self.args.process_index] * total,
            "micro_batch": torch.cat(
                [torch.full((s.num_samples,), i, dtype=torch.int32) for i, s in enumerate(scored)]
            ).tolist(),
            "sample_id": torch.cat([s.sample_ids for s in scored]).tolist(),
            "quadrant": per_sample(lambda i, rows, sel: sel.triage.quadrant[rows]).tolist(),
            "ppl": torch.cat([_measured(s.ppl, s) for s in scored]).tolist(),
            "entropy": torch.cat([_measured(s.entropy, s) for s in scored]).tolist(),
            "decision": decision.tolist(),
            "response_tokens": torch.cat([s.response.sum(dim=1).cpu() for s in scored]).tolist(),
            "kept_tokens": per_sample(lambda i, rows, sel: sel.label_keep[rows, : scored[i].token_logps.shape[1]].sum(1)).tolist(),
            "pruned_positions": pruned_positions,
        }
        if self._policy.samples.reweights:
            columns["loss_weight"] = per_sample(
                lambda i, rows, sel: sel.loss_weight[rows] if sel.loss_weight is not None else torch.ones(rows.stop - rows.start)
            ).double().tolist()
        before = {  # the step before pruning, for metrics that compare across methods
            "top1_hits": sum(s.top1_hits for s in scored), "entropy_sum": sum(s.entropy_sum for s in scored),
            "response_tokens": sum(int(s.response.sum()) for s in scored), "tokens": sum(s.tokens for s in scored),
        }  # fmt: skip
        distinct = {id(sel): sel for _, _, sel in selections}.values()
        thresholds = [{"q": sel.triage.q, **sel.triage.thresholds} for sel in distinct]
        if self.accelerator.num_processes > 1:
            # One collective per step: every rank's rows reach every rank, so metrics describe the global batch and
            # the main process writes one ledger for all ranks.
            from accelerate.utils import gather_object

            parts = gather_object([(columns, thresholds, scoring_seconds, before)])
            columns = {name: [v for part in parts for v in part[0][name]] for name in columns}
            if self.args.triage_scope != "global":
                thresholds = [t for part in parts for t in part[1]]
            scoring_seconds = max(part[2] for part in parts)
            before = {key: sum(part[3][key] for part in parts) for key in before}
        self._log_step_metrics(columns, thresholds, scoring_seconds, before)
        if not self._decision_listeners or not self.is_world_process_zero():
            return
        event = StepDecisions(
            step=self.state.global_step + 1,
            epoch=float(self.state.epoch or 0.0),
            rank=self.args.process_index,
            columns=columns,
            thresholds=thresholds,
            scoring_seconds=scoring_seconds,
        )
        for listener in self._decision_listeners:
            listener(event)

    def _log_step_metrics(
        self,
        columns: dict[str, list[Any]],
        thresholds: list[dict[str, float]],
        seconds: float,
        before: dict[str, float],
    ) -> None:
        decision = np.asarray(columns["decision"])
        quadrant = np.asarray(columns["quadrant"])
        response = np.asarray(columns["response_tokens"], dtype=np.float64)
        kept_tokens = np.asarray(columns["kept_tokens"], dtype=np.float64)
        ppl, entropy = np.asarray(columns["ppl"]), np.asarray(columns["entropy"])
        keep = np.isin(decision, TRAINED_DECISIONS)
        invalid = decision == "invalid"
        pruned = (decision == "token_pruned") | (keep & (kept_tokens < response))
        total = max(1, decision.size)

        def ratio(numerator: float, denominator: float, empty: float) -> float:
            return float(numerator / denominator) if denominator else empty

        metrics = self._metrics["train"]
        if self._policy.samples.uses_eu_plane:
            for q in range(5):
                name = f"qtuning/q{q}_share" if q else "qtuning/mid_band_share"
                metrics[name].append(float(((quadrant == q) & ~invalid).sum()) / total)
        if "loss_weight" in columns:
            weights = np.asarray(columns["loss_weight"], dtype=np.float64)
            metrics["qtuning/loss_weight_mean"].append(float(weights[keep].mean()) if keep.any() else 1.0)
        metrics["qtuning/sample_keep_ratio"].append(float(keep.sum()) / total)
        # Pooled over the logging window in `log` (a mean of per-step ratios would count steps without token-pruned
        # samples as 1.0, and weigh a step of 2 pruned tokens like one of 2000).
        self._token_keep_pool[0] += float(kept_tokens[pruned].sum())
        self._token_keep_pool[1] += float(response[pruned].sum())
        if before["response_tokens"] and math.isfinite(before["top1_hits"]):
            metrics["qtuning/prepruning_mean_token_accuracy"].append(before["top1_hits"] / before["response_tokens"])
            metrics["qtuning/prepruning_entropy"].append(before["entropy_sum"] / before["response_tokens"])
        self._prepruning_tokens += int(before["tokens"])
        metrics["qtuning/prepruning_num_tokens"] = [float(self._prepruning_tokens)]
        metrics["qtuning/kept_sample_token_share"].append(ratio(kept_tokens[keep].sum(), response[keep].sum(), 0.0))
        metrics["qtuning/label_token_share"].append(ratio(kept_tokens.sum(), response.sum(), 0.0))
        metrics["qtuning/filled_share"].append(float((decision == "filled").sum()) / total)
        metrics["qtuning/trimmed_share"].append(float((decision == "trimmed").sum()) / total)
        metrics["qtuning/invalid_samples"].append(float(invalid.sum()))
        valid = ~invalid
        measured = valid & np.isfinite(ppl)  # NaN where the policy skipped the scoring forward
        if measured.any():
            metrics["qtuning/ppl_mean"].append(float(ppl[measured].mean()))
            metrics["qtuning/entropy_mean"].append(float(entropy[measured].mean()))
        metrics["qtuning/scoring_seconds"].append(seconds)
        for name in ("q", "ppl_lo", "ppl_hi", "ent_lo", "ent_hi") if self._policy.samples.uses_eu_plane else ():
            values = [t[name] for t in thresholds if np.isfinite(t[name])]
            metrics[f"qtuning/{name}"].append(float(np.mean(values)) if values else float("nan"))
        if self._policy.samples.uses_eu_plane:  # corr(log PPL, entropy axis) over the step's valid samples
            p = torch.as_tensor(np.where(valid, ppl, np.nan), dtype=torch.float64)
            e = torch.as_tensor(entropy, dtype=torch.float64)
            axis = decorrelated_entropy(p, e) if self._policy.samples.params.eu_plane == "decorrelated" else e
            for name, values in (("eu_correlation", e), ("plane_correlation", axis)):
                value = plane_correlation(p, values)
                if np.isfinite(value):  # NaN (degenerate step) would poison the logged average
                    metrics[f"qtuning/{name}"].append(value)
        step = self.state.global_step + 1
        if decision.size and not keep.any():
            logger.warning(
                "Q-Tuning: step %d kept no sample (%d of %d had non-finite statistics); it trains on nothing and "
                "the optimizer step changes no weight.", step, int(invalid.sum()), decision.size,
            )
        elif invalid.any():
            logger.warning(
                "Q-Tuning: %d sample(s) of step %d had no finite statistics (no response token, or NaN/inf "
                "log-probs) and were dropped.", int(invalid.sum()), step,
            )

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds ``qtuning/token_keep_ratio`` pooled over the logging window (absent when no sample was token-pruned)."""
        if self.args.qtuning_enabled and self.model.training and "loss" in logs:
            kept, total = self._token_keep_pool
            if total:
                self._metrics["train"]["qtuning/token_keep_ratio"] = [kept / total]
            self._token_keep_pool = [0.0, 0.0]
        super().log(logs, *args, **kwargs)

    def add_decision_listener(self, listener: DecisionListener) -> None:
        """Call ``listener(StepDecisions)`` after every optimizer step's decisions (tracking integrations use this)."""
        self._decision_listeners.append(listener)

    # ------------------------------------------------------------------ persistence
    def _save_checkpoint(self, model, trial):
        if self.args.qtuning_enabled and self._ledger is not None:
            self._ledger.flush()
        super()._save_checkpoint(model, trial)
        run_id = self._ledger.run_id if self.args.qtuning_enabled and self._ledger is not None else None
        if run_id is not None:
            # The run this checkpoint belongs to, so a resume can tell its ledger from another run's.
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            if folder.is_dir():
                tmp = folder / f"{LEDGER_ID_FILE}.tmp"
                tmp.write_text(json.dumps({"run_id": run_id, "step": self.state.global_step}) + "\n")
                tmp.replace(folder / LEDGER_ID_FILE)

    def _open_ledger(self, resume_from_checkpoint: str | bool | None) -> None:
        """A fresh ledger for a fresh run (an earlier one is moved aside, never deleted); for a resume, the ledger of
        the checkpoint's run, without the rows of the steps after the checkpoint (refused if it is another run's)."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            checkpoint = get_last_checkpoint(self.args.output_dir)
            if checkpoint is None:
                return  # transformers raises its own clear error: leave the ledger as it is
        state_file = Path(checkpoint) / "trainer_state.json" if checkpoint else None
        if state_file is None or not state_file.exists():  # a fresh run (transformers starts at step 0)
            moved = self._ledger.start(uuid.uuid4().hex)
            if moved is not None:
                logger.warning(
                    "Q-Tuning: %s held the ledger of an earlier run; this fresh run starts its own, so the earlier "
                    "one was moved to %s (nothing is deleted).", self._ledger.directory, moved,
                )
            return
        checkpoint = Path(checkpoint)
        step = int(json.loads(state_file.read_text()).get("global_step", 0))
        try:
            checkpoint_id = json.loads((checkpoint / LEDGER_ID_FILE).read_text())["run_id"]
        except (OSError, ValueError, KeyError, TypeError):
            checkpoint_id = None
        ledger_id, ledger_dir = self._ledger.run_id, self._ledger.directory
        if checkpoint_id is not None and ledger_id is not None and checkpoint_id != ledger_id:
            raise ValueError(self._mismatched_ledger_message(checkpoint, checkpoint_id, step))
        if checkpoint_id is None:
            logger.warning(
                "Q-Tuning: checkpoint %s carries no ledger run id (saved by an older trl-qtuning, or interrupted "
                "while saving): cannot check that %s is the ledger of its run. Continuing it; rows of steps after %d "
                "are dropped.", checkpoint, ledger_dir, step,
            )  # fmt: skip
        elif ledger_id is None and self._ledger.has_rows():
            logger.warning(
                "Q-Tuning: %s has no run id (written by an older trl-qtuning): cannot check that it is the ledger of "
                "checkpoint %s's run. Continuing it; rows of steps after %d are dropped.", ledger_dir, checkpoint, step,
            )  # fmt: skip
        elif ledger_id is None and step > 0:
            logger.warning(
                "Q-Tuning: no ledger in %s: the ledger of this resumed run starts at step %d; the rows of steps 1-%d "
                "are in the ledger of the run that saved %s.", ledger_dir, step + 1, step, checkpoint,
            )  # fmt: skip
        # Steps after the checkpoint will be decided again: drop their old rows so none is counted twice.
        self._ledger.truncate_after(step)
        self._ledger.claim(checkpoint_id or ledger_id or uuid.uuid4().hex)

    def _mismatched_ledger_message(self, checkpoint: Path, checkpoint_id: str, step: int) -> str:
        ledger_dir = self._ledger.directory
        info = self._ledger.info() or {}
        other = info.get("run_id", "")
        places = {ledger_dir.parent, checkpoint.parent}
        candidates = sorted(p for place in places for p in place.glob(f"{LEDGER_DIRNAME}*") if p.is_dir())
        own = next((p for p in candidates if DecisionLedger(p).run_id == checkpoint_id), None)
        aside = ledger_dir.with_name(f"{ledger_dir.name}.previous-{other[:8]}")
        if own is not None:
            way_out = (
                f"The ledger of run {checkpoint_id[:8]} is {own}: to resume it, move {ledger_dir} aside (e.g. to "
                f"{aside}) and move {own} to {ledger_dir}."
            )
        else:
            way_out = (
                f"No ledger of run {checkpoint_id[:8]} was found next to it: to resume with a new ledger that starts "
                f"at step {step + 1}, move {ledger_dir} aside (e.g. to {aside})."
            )
        return (
            f"Q-Tuning: checkpoint {checkpoint} belongs to run {checkpoint_id[:8]}, but {ledger_dir} holds the ledger "
            f"of run {other[:8]} (created {info.get('created', '?')}), another run into the same output_dir. Resuming "
            f"would write this run's steps into that run's ledger, so nothing was changed. {way_out}"
        )

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        if self.args.qtuning_enabled and self._ledger is not None:
            self._open_ledger(resume_from_checkpoint)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            if self.args.qtuning_enabled and self._ledger is not None:
                self._ledger.flush()

    def end(self) -> None:
        """Finish the trackers and destroy the process group, letting go of the distributed wrapper first.

        DDP's reducer holds the gloo process group. Were it the group's last holder when the model is freed, the
        group would be destroyed with the GIL held while a gloo worker may still need the GIL to free a gathered
        tensor: the process then hangs at exit (pytorch/pytorch#56297; seen with 2 CPU processes). Freed first, the
        wrapper leaves `torch.distributed`'s registry as the last holder, whose destruction releases the GIL.
        """
        if self.model_wrapped is not self.model:
            self.model_wrapped = self.model
            # accelerate keeps the prepared (wrapped) model, optimizer, scheduler and loaders; training is over.
            self.accelerator.free_memory()
        super().end()
