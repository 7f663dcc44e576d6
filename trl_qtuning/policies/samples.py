"""Sample policies: Q-Tuning's EU-plane triage and the baselines it is compared with at equal budget.

Every policy keeps ``K = max(1, round_half_up(r * B))`` samples of a group of B (fewer when fewer have finite
statistics; those are never kept), so methods train on the same number of samples per optimizer step.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..core.selection import qtuning_token_rows, triage_axes
from ..core.triage import TriageResult, triage_samples
from .base import SampleBatch, SampleDecision, SamplePolicy, keep_top, register_sample_policy

__all__ = [
    "QTuningSamples", "AllSamples", "RandomSamples", "ShortestSamples", "InfoBatchSamples", "EntropySamples",
    "HighPPLSamples", "LowPPLSamples", "TailSFTSamples",
]  # fmt: skip


def _baseline_decision(batch: SampleBatch, keep: torch.Tensor, target: int, weight: torch.Tensor | None = None):
    """Every kept sample goes on to the token policy (baselines prune tokens of all kept samples)."""
    return SampleDecision(TriageResult.without_plane(keep, ~batch.valid, target), keep.clone(), weight)


@register_sample_policy
class QTuningSamples(SamplePolicy):
    """The paper's triage: keep Q2 (high PPL, low entropy) and Q4 (low PPL, high entropy); token-prune Q2."""

    name = "qtuning"
    uses_eu_plane = True

    def select_samples(self, batch: SampleBatch, generator: torch.Generator) -> SampleDecision:
        p = self.params
        # eu_plane="decorrelated" triages on (ppl, entropy residual); the Selection keeps the raw entropy.
        ppl, axis = triage_axes(batch.ppl, batch.entropy, p)
        triage = triage_samples(
            ppl, axis, p.sample_keep_ratio, enforce_budget=p.enforce_sample_budget, max_iter=p.triage_max_iter,
            tol=p.triage_tol, fill_rule=p.fill_rule,
        )
        return SampleDecision(triage, qtuning_token_rows(triage, p), plane_axis=None if axis is batch.entropy else axis)


@register_sample_policy
class AllSamples(SamplePolicy):
    """Keep every sample (token-pruning-only baselines; ``sample_keep_ratio`` is ignored)."""

    name = "all"
    reads_statistics = False

    def select_samples(self, batch: SampleBatch, generator: torch.Generator) -> SampleDecision:
        return _baseline_decision(batch, batch.valid.clone(), int(batch.valid.sum()))


@register_sample_policy
class RandomSamples(SamplePolicy):
    """K samples uniformly at random."""

    name = "random"
    reads_statistics = False

    def select_samples(self, batch: SampleBatch, generator: torch.Generator) -> SampleDecision:
        k = self.target(batch)
        draw = torch.rand(batch.size, generator=generator, dtype=torch.float64).to(batch.ppl.device)
        return _baseline_decision(batch, keep_top(draw, batch.valid, k), k)


class _TopSamples(SamplePolicy):
    """Keep the K valid samples of highest (or lowest) ``score``, a ``SampleBatch`` field; ties go to the earlier."""

    score: ClassVar[str]
    highest: ClassVar[bool] = True

    def select_samples(self, batch: SampleBatch, generator: torch.Generator) -> SampleDecision:
        k = self.target(batch)
        return _baseline_decision(batch, keep_top(getattr(batch, self.score), batch.valid, k, highest=self.highest), k)


@register_sample_policy
class ShortestSamples(_TopSamples):
    """Drop the longest samples first: keep the K with the fewest response tokens."""

    name, score, highest, reads_statistics = "longest", "response_tokens", False, False


@register_sample_policy
class InfoBatchSamples(SamplePolicy):
    """InfoBatch (Qin et al., ICLR 2024) at a fixed budget: drop well-learned samples at random, rescale the rest.

    Samples whose loss (mean token NLL, ``log PPL``) is below the group mean are dropped at random until the budget
    is met; the below-mean samples that stay get loss weight ``n_below / n_below_kept`` so the expected gradient of
    that group is unchanged. When the budget asks for more drops than there are below-mean samples, all of them go
    and the rest are drawn at random from the above-mean ones (not rescaled, as InfoBatch never prunes those).
    """

    name = "infobatch"
    reweights = True

    def select_samples(self, batch: SampleBatch, generator: torch.Generator) -> SampleDecision:
        valid = batch.valid
        k = self.target(batch)
        loss = torch.log(batch.ppl.double())
        mean = loss[valid].mean() if bool(valid.any()) else torch.zeros((), dtype=torch.float64)
        below = valid & (loss < mean)
        n_below, to_drop = int(below.sum()), int(valid.sum()) - k
        draw = torch.rand(batch.size, generator=generator, dtype=torch.float64).to(batch.ppl.device)
        if to_drop <= n_below:
            dropped = keep_top(draw, below, to_drop)
        else:
            dropped = below | keep_top(draw, valid & ~below, to_drop - n_below)
        keep = valid & ~dropped
        weight = torch.ones(batch.size, dtype=torch.float64, device=batch.ppl.device)
        kept_below = int((below & keep).sum())
        if kept_below and kept_below < n_below:
            weight[below & keep] = n_below / kept_below
        return _baseline_decision(batch, keep, k, weight)


@register_sample_policy
class EntropySamples(_TopSamples):
    """Keep the K samples of highest mean predictive entropy (most uncertain)."""

    name, score = "entropy", "entropy"


@register_sample_policy
class HighPPLSamples(_TopSamples):
    """Keep the K samples of highest perplexity (hardest)."""

    name, score = "ppl_high", "ppl"


@register_sample_policy
class LowPPLSamples(_TopSamples):
    """Keep the K samples of lowest perplexity (easiest)."""

    name, score, highest = "ppl_low", "ppl", False


@register_sample_policy
class TailSFTSamples(SamplePolicy):
    """TailSFT's filter: drop the samples whose loss fell furthest below the initial model's loss on them.

    Source: TRL's TailSFT example (huggingface/trl #7212, ``examples/tail_sft_gsm8k/tail_sft.py``; paper 2608.25756,
    Algorithm 1 line 6). The "margin" ``log PPL - log PPL_reference`` is the difference of length-normalised losses,
    so it favours neither long nor short answers. The ``K = target(batch)`` samples of highest margin stay (ties to
    the earlier): ``sample_keep_ratio`` plays ``1 - filter_fraction`` (the example's optional ramp is not reproduced).
    The reference is the initial model (LoRA adapters disabled, a frozen copy for full fine-tuning, or
    ``reference_model_path``); a sample without a finite perplexity under both is never kept.
    """

    name = "tailsft"
    needs_reference = True

    def select_samples(self, batch: SampleBatch, generator: torch.Generator) -> SampleDecision:
        if batch.reference_ppl is None:
            raise ValueError("the tailsft sample policy needs each sample's perplexity under the initial model")
        reference = batch.reference_ppl.to(device=batch.ppl.device, dtype=torch.float64)
        eligible = batch.valid & torch.isfinite(reference)
        k = min(self.target(batch), int(eligible.sum()))
        margin = torch.log(batch.ppl.double()) - torch.log(reference)
        keep = keep_top(margin, eligible, k)
        return SampleDecision(TriageResult.without_plane(keep, ~eligible, k), keep.clone())
