"""The scoring forward: per-sample EU-plane statistics of one micro-batch under the current model.

One gradient-free forward in eval mode (no dropout, no gradient checkpointing) through TRL's fused LM head, which
gives per-token log-probs and entropy without the (batch, seq, vocab) logits, projected on the labelled positions
only. Its output is laid out one row per sample (a padding-free micro-batch is one flat row of segments): the
:class:`RowLayout` maps between the two and is computed once per micro-batch.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..core.stats import eu_plane_stats, flat_to_padded, padded_to_flat, segment_ids_from_position_ids

try:  # Internal TRL API (1.16+): checked here so a TRL change fails at import with a clear message.
    from trl.trainer.utils import FusedCausalLMOutput
except ImportError as exc:  # pragma: no cover - depends on the installed TRL
    raise ImportError(
        "trl_qtuning needs TRL's fused LM head (`trl.trainer.utils.FusedCausalLMOutput`, TRL >= 1.16, < 2). "
        "Install a supported version: pip install 'trl>=1.16,<2'."
    ) from exc

__all__ = [
    "FusedCausalLMOutput", "RowLayout", "ScoredMicroBatch", "Scorer", "as_inference_tensor_error",
    "load_reference_model", "non_padding_tokens", "project_labelled_positions_only", "reference_forward",
]  # fmt: skip

logger = logging.getLogger(__name__)

_EAGER_DEVICE_TYPES = ("cpu", "cuda", "mps")
_warned_no_compaction = False


@contextlib.contextmanager
def project_labelled_positions_only() -> Iterator[None]:
    """Make TRL's fused head project only the positions whose label is set, on eager devices too.

    TRL compacts the hidden states to the labelled positions on Triton devices only; elsewhere it projects every
    position (fixed tile shapes for compiled backends such as Neuron). On an eager CPU that spends the LM head and
    entropy on prompt and padding positions, often most of an SFT batch, for numbers the scoring pass never reads.
    Only the scoring forward runs under this: the training forward stays exactly SFTTrainer's. A TRL without the
    switch leaves the scoring as it is (slower on CPU, same result) and says so once.
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
                "stays correct but runs slower. Install a TRL version this release is tested with (1.16-1.x).",
                "eager devices",
            )
        yield
        return
    trl_utils._use_triton = lambda device: device.type in _EAGER_DEVICE_TYPES or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original


def non_padding_tokens(batch: dict[str, Any]) -> int:
    """Tokens a forward over ``batch`` processes, padding excluded (what the compute accounting counts)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


@dataclass(frozen=True)
class RowLayout:
    """Where each scored position of a micro-batch sits in the per-sample padded layout (row = sample, column =
    label position - 1). Padding-free micro-batches also carry the segment of every flat token."""

    num_samples: int
    positions: torch.Tensor
    """(n, W) offset in the sample's input_ids of the label each column scores, whatever the padding side."""
    token_segments: torch.Tensor | None = None
    """Padding-free only: (T,) sample index of every token of the flat row (-1 before the first segment)."""
    columns: torch.Tensor | None = None
    """Padding-free only: (T - 1,) column of every shifted position of the flat row."""

    @classmethod
    def of(cls, batch: dict[str, Any], padding_free: bool, num_samples: int | None = None) -> RowLayout:
        labels = batch["labels"]
        if not padding_free:
            n = labels.shape[0]
            positions = torch.arange(1, labels.shape[1], device=labels.device).expand(n, -1)
            attention = batch.get("attention_mask")
            if attention is not None:  # left padding: a sample's input_ids start at its first attended position
                positions = positions - attention.to(torch.long).argmax(dim=1, keepdim=True)
            return cls(n, positions)
        position_ids = batch["position_ids"]
        n = num_samples if num_samples is not None else int((position_ids == 0).sum())
        token_segments = segment_ids_from_position_ids(position_ids, n)[0]
        columns = position_ids[0, 1:] - 1
        positions = flat_to_padded(position_ids[0, 1:], token_segments[1:], columns, n, fill=0)
        return cls(n, positions, token_segments, columns)

    @property
    def padding_free(self) -> bool:
        return self.token_segments is not None

    def to_rows(self, values: torch.Tensor, fill: float | bool = 0) -> torch.Tensor:
        """Per-position values of the shifted micro-batch (its ``[:, 1:]``) -> ``(n, W)`` rows."""
        if not self.padding_free:
            return values
        return flat_to_padded(values[0], self.token_segments[1:], self.columns, self.num_samples, fill=fill)

    def to_flat(self, values: torch.Tensor, fill: float | bool = 0) -> torch.Tensor:
        """``(n, W)`` rows -> the shifted flat row's ``(T - 1,)`` positions (padding-free only)."""
        return padded_to_flat(values, self.token_segments[1:], self.columns, fill=fill)


@dataclass
class ScoredMicroBatch:
    """One micro-batch's statistics in the per-sample padded layout."""

    layout: RowLayout
    token_logps: torch.Tensor
    response: torch.Tensor
    ppl: torch.Tensor
    entropy: torch.Tensor
    sample_ids: torch.Tensor
    reference_logps: torch.Tensor | None = None
    """(n, W) log-probs of the labels under the reference model (policies that need one)."""
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

    @property
    def width(self) -> int:
        return self.token_logps.shape[1]


ReferenceForward = Callable[[torch.nn.Module, dict[str, Any]], Any]
"""``reference(model, kwargs)`` -> the reference's fused output for the forward kwargs (labels and
``fused_lm_head=True`` included); ``model`` is the scored model (a LoRA reference disables its adapters)."""


class Scorer:
    """Scores micro-batches for one policy: the statistics it reads, and no forward when it reads none.

    ``forward_context()`` is the trainer's autocast (``compute_loss_context_manager``); ``reference`` gives the
    reference log-probs (None when the policy needs none). ``scored_tokens`` counts the tokens every scoring forward
    processed (reference forwards included), for the compute accounting.
    """

    def __init__(
        self,
        forward_context: Callable[[], contextlib.AbstractContextManager],
        *,
        padding_free: bool,
        needs_statistics: bool,
        reference: ReferenceForward | None = None,
        entropy_positions: str = "response",
    ):
        self.forward_context = forward_context
        self.padding_free = padding_free
        self.needs_statistics = needs_statistics
        self.reference = reference
        self.entropy_positions = entropy_positions
        self.scored_tokens = 0

    def score(
        self, model: torch.nn.Module, batch: dict[str, Any], sample_ids: torch.Tensor | None, *, inference_mode: bool
    ) -> ScoredMicroBatch:
        """Statistics of ``batch`` under ``model``; ``inference_mode`` False scores under ``no_grad`` instead."""
        self._check_layout(batch)
        layout = RowLayout.of(batch, self.padding_free, None if sample_ids is None else sample_ids.numel())
        ids = sample_ids.cpu() if sample_ids is not None else torch.full((layout.num_samples,), -1, dtype=torch.long)
        if not self.needs_statistics:
            return self._layout_only(batch, layout, ids)
        self.scored_tokens += (2 if self.reference is not None else 1) * non_padding_tokens(batch)
        with torch.inference_mode() if inference_mode else torch.no_grad():
            return self._forward(model, batch, layout, ids)

    def _check_layout(self, batch: dict[str, Any]) -> None:
        flat = "attention_mask" not in batch and "position_ids" in batch
        if flat != self.padding_free:
            raise ValueError(
                f"The trainer's `padding_free` is {self.padding_free}, but the data collator returned a "
                f"{'padding-free (position_ids, no attention_mask)' if flat else 'padded'} batch. Set "
                f"`padding_free={flat}` in the config, or pass a collator that matches it."
            )

    def _layout_only(self, batch: dict[str, Any], layout: RowLayout, ids: torch.Tensor) -> ScoredMicroBatch:
        """No forward: response masks from the labels, zero log-probs, and a placeholder statistic (0, NaN for a
        sample without answer tokens) that only marks which samples can be kept (``measured=False``)."""
        response = layout.to_rows(batch["labels"][:, 1:] != -100, False)
        placeholder = torch.where(response.any(dim=1), 0.0, float("nan")).float()
        return ScoredMicroBatch(
            layout, torch.zeros(response.shape, device=response.device), response, placeholder, placeholder.clone(),
            ids, measured=False, tokens=non_padding_tokens(batch),
        )  # fmt: skip

    def _forward(
        self, model: torch.nn.Module, batch: dict[str, Any], layout: RowLayout, ids: torch.Tensor
    ) -> ScoredMicroBatch:
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        score_labels = labels
        if self.entropy_positions == "all":
            score_labels = batch["input_ids"].clone()
            score_labels[(batch["position_ids"] == 0) if self.padding_free else (batch["attention_mask"] == 0)] = -100
        was_training = model.training
        model.eval()
        try:
            with self.forward_context(), project_labelled_positions_only():
                out = model(**inputs, labels=score_labels, fused_lm_head=True, use_cache=False)
                reference = None
                if self.reference is not None:
                    kwargs = {**inputs, "labels": labels, "fused_lm_head": True, "use_cache": False}
                    reference = self.reference(model, kwargs)
        finally:
            model.train(was_training)
        if not isinstance(out, FusedCausalLMOutput) or out.entropy is None:
            raise RuntimeError(
                "The scoring forward did not return TRL's fused LM head output with per-token entropy. Q-Tuning needs "
                f"`SFTTrainer`'s fused head (TRL >= 1.16, < 2); got {type(out).__name__}. Is the model's forward "
                "replaced by another library (e.g. Liger's fused cross-entropy)?"
            )
        token_logps, token_entropy = out.log_probs.float(), out.entropy.float()
        response = labels[:, 1:] != -100
        # What TRL's mean_token_accuracy and entropy would say of the step before pruning (they see kept tokens only).
        top1_hits = float((out.is_top1.bool() & response).sum()) if out.is_top1 is not None else float("nan")
        entropy_sum = float(token_entropy[response].sum())
        token_logps, token_entropy = layout.to_rows(token_logps), layout.to_rows(token_entropy)
        response = layout.to_rows(response, False)
        ppl, entropy = eu_plane_stats(token_logps, token_entropy, response)
        if self.entropy_positions == "all":
            entropy = eu_plane_stats(token_logps, token_entropy, layout.to_rows(score_labels[:, 1:] != -100, False))[1]
        reference_logps = None if reference is None else layout.to_rows(reference.log_probs.float())
        return ScoredMicroBatch(
            layout, token_logps, response, ppl, entropy, ids, reference_logps, top1_hits=top1_hits,
            entropy_sum=entropy_sum, tokens=non_padding_tokens(batch),
        )  # fmt: skip


def as_inference_tensor_error(error: BaseException) -> RuntimeError | None:
    """Where training touched a tensor created under ``torch.inference_mode()`` (by our scoring forward), the error
    to raise instead of torch's: what happened and the setting that fixes it; None for any other error."""
    if "inference tensor" not in str(error).lower():
        return None
    return RuntimeError(
        "Training used a tensor the model created during Q-Tuning's scoring forward, which runs under "
        "torch.inference_mode(): the model caches tensors in its forward. Set `scoring_inference_mode=False` "
        f"(scoring then runs under torch.no_grad()). Original error: {error}"
    )


def reference_forward(
    reference_model: torch.nn.Module | None, adapters_of: Callable[[], torch.nn.Module] | None = None
) -> ReferenceForward | None:
    """How the scorer gets the reference's log-probs: from ``reference_model``, or, given ``adapters_of`` (the
    unwrapped PEFT model; TailSFT with LoRA and no ``reference_model_path``), from the trained model's own forward
    with its adapters disabled, which is the initial model at no memory cost. None without a reference."""
    if adapters_of is not None:

        def without_adapters(model: torch.nn.Module, kwargs: dict[str, Any]) -> Any:
            with adapters_of().disable_adapter():
                return model(**kwargs)

        return without_adapters
    return None if reference_model is None else lambda model, kwargs: reference_model(**kwargs)


def load_reference_model(
    model: torch.nn.Module, path: str | None, device: torch.device, *, sample_policy: str
) -> torch.nn.Module:
    """The frozen reference model of Rho-1-style token policies and TailSFT, with TRL's fused head, on ``device``.

    Without ``path`` (TailSFT, full fine-tuning): a frozen copy of ``model`` (the unwrapped model) before any step.
    """
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    if path is None:
        logger.info(
            "Q-Tuning: sample_policy=%r compares each sample with the initial model; a frozen copy of the model "
            "is kept for it (one extra model in memory; with LoRA the adapters are disabled instead).",
            sample_policy,
        )
        reference = copy.deepcopy(model)
        reference.__dict__.pop("forward", None)  # the copied fused forward: re-added below on the copy itself
    else:
        floating = [p.dtype for p in model.parameters() if p.is_floating_point()]
        try:
            reference = AutoModelForCausalLM.from_pretrained(path, dtype=floating[0] if floating else torch.float32)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"`reference_model_path={path!r}` could not be loaded as a causal LM ({type(exc).__name__}: {exc}). "
                "Give the folder of a model saved with save_pretrained."
            ) from exc
        ours = model.get_output_embeddings().weight.shape[0]
        theirs = reference.get_output_embeddings().weight.shape[0]
        if ours != theirs:
            raise ValueError(
                f"`reference_model_path` model has a vocabulary of {theirs} tokens, the trained model {ours}: the "
                "rho1 token policy compares log-probs of the same tokens, so both must share one tokenizer."
            )
    add_fused_lm_head(reference, outputs=("log_probs",))
    reference.requires_grad_(False)
    return reference.to(device).eval()
