"""One optimizer step's decision: group the scored samples by ``triage_scope``, decide each group with the policy.

``micro_batch`` groups are the micro-batches, ``step`` one group of the step's micro-batches on this process,
``global`` the step's samples of every process: their statistics are gathered (a few floats per sample), every rank
takes the same decision from the same numbers, and keeps its own rows of it. The policy call is
:meth:`Policy.select`, the same one :func:`trl_qtuning.select_qtuning` makes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .core.selection import Selection, share_of_tokens
from .policies import Policy, SampleDecision
from .policies.base import reference_sample_ppl
from .scoring import ScoredMicroBatch

__all__ = ["MicroBatchDecision", "StepDecision", "StepDecider"]


@dataclass(frozen=True)
class MicroBatchDecision:
    """The decisions of one micro-batch's samples (n rows, W scored columns)."""

    keep: torch.Tensor
    label_keep: torch.Tensor
    """(n, W) answer positions that keep their label."""
    token_pruned: torch.Tensor
    quadrant: torch.Tensor
    filled: torch.Tensor
    trimmed: torch.Tensor
    invalid: torch.Tensor
    loss_weight: torch.Tensor | None
    plane_axis: torch.Tensor | None
    """(n,) the entropy axis the triage ran on, where it is not the entropy itself (``eu_plane="decorrelated"``)."""

    @classmethod
    def of(cls, selection: Selection, rows: slice, width: int, plane_axis: torch.Tensor | None) -> MicroBatchDecision:
        triage = selection.triage
        return cls(
            selection.keep[rows], selection.label_keep[rows, :width], selection.token_pruned[rows],
            triage.quadrant[rows], triage.filled[rows], triage.trimmed[rows], triage.invalid[rows],
            None if selection.loss_weight is None else selection.loss_weight[rows],
            None if plane_axis is None else plane_axis[rows],
        )  # fmt: skip


@dataclass(frozen=True)
class StepDecision:
    micro_batches: list[MicroBatchDecision]
    thresholds: list[dict[str, float]]
    """``q`` and the four thresholds of each triage group decided on this process."""


def _pad_columns(tensor: torch.Tensor, width: int, value: float | bool = 0) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)


class StepDecider:
    """Turns a step's scored micro-batches into decisions, with the run-wide state some policies keep.

    ``accelerator`` is needed for ``triage_scope="global"`` with several processes (its gather).
    """

    def __init__(
        self,
        policy: Policy,
        *,
        triage_scope: str,
        seed: int,
        rank: int = 0,
        accelerator: Any = None,
    ):
        self.policy = policy
        self.triage_scope = triage_scope
        self.seed = int(seed)
        self.rank = rank
        self.accelerator = accelerator
        self.step = 0
        self.run_tokens_seen = self.run_tokens_kept = 0
        """``token_budget_scope="run"``: this process's answer tokens seen and kept so far (restart on resume)."""

    def decide(self, scored: list[ScoredMicroBatch], step: int) -> StepDecision:
        """Decisions for optimizer step ``step`` (1-based: it seeds the baselines' random draws)."""
        self.step = step
        single = self.triage_scope == "micro_batch"
        groups = [[i] for i in range(len(scored))] if single else [list(range(len(scored)))]
        decisions: list[MicroBatchDecision | None] = [None] * len(scored)
        thresholds = []
        for index, group in enumerate(groups):
            selection, plane_axis = self._decide_group([scored[i] for i in group], index)
            thresholds.append({"q": selection.triage.q, **selection.triage.thresholds})
            offset = 0
            for i in group:
                rows = slice(offset, offset + scored[i].num_samples)
                decisions[i] = MicroBatchDecision.of(selection, rows, scored[i].width, plane_axis)
                offset += scored[i].num_samples
        return StepDecision(decisions, thresholds)

    def _decide_group(self, group: list[ScoredMicroBatch], index: int) -> tuple[Selection, torch.Tensor | None]:
        width = max(s.width for s in group)
        ppl = torch.cat([s.ppl for s in group])
        entropy = torch.cat([s.entropy for s in group])
        response = torch.cat([_pad_columns(s.response, width, False) for s in group])
        reference = None
        if self.policy.needs_reference:
            reference = torch.cat([_pad_columns(s.reference_logps, width) for s in group])
        cross_rank = self.triage_scope == "global"
        generator = self.generator(index, per_rank=not cross_rank, stream=int(cross_rank))
        reference_ppl = None
        if self.policy.samples.needs_reference:
            reference_ppl = reference_sample_ppl(reference, response)
        if cross_rank:  # the sample draws come from a generator of their own (stream 0)
            extra = {} if reference_ppl is None else {"reference_ppl": reference_ppl}
            decision = self.global_decision(ppl, entropy, response.sum(dim=-1), **extra)
        else:  # one generator for the sample draws, then the token draws
            decision = self.policy.decide_samples(ppl, entropy, response.sum(dim=-1), generator, reference_ppl=reference_ppl)
        budget_tokens = self._run_token_budget(int(response.sum()))
        selection = self.policy.select(
            ppl, entropy, torch.cat([_pad_columns(s.token_logps, width) for s in group]), response,
            generator=generator, reference_logps=reference, decision=decision, token_budget_tokens=budget_tokens,
        )  # fmt: skip
        if budget_tokens is not None:
            self.run_tokens_kept += int(selection.label_keep.sum())
        return selection, decision.plane_axis

    def _run_token_budget(self, group_tokens: int) -> int | None:
        """``token_budget_scope="run"``: the tokens this group keeps so that the run's kept share of every answer
        token seen so far returns to ``token_keep_ratio`` (a short step's shortfall is carried to the next)."""
        params = self.policy.samples.params
        if params.token_budget_scope != "run":
            return None
        self.run_tokens_seen += group_tokens
        return max(0, share_of_tokens(params.token_keep_ratio, self.run_tokens_seen) - self.run_tokens_kept)

    def generator(self, group: int, *, per_rank: bool, stream: int = 0) -> torch.Generator:
        """Randomness of baseline policies: a function of (seed, step, group[, rank], stream), so runs and resumes
        repeat. ``stream`` 1 is the token draws of a cross-rank (``global``) decision, whose sample draws used stream
        0 on a generator of their own: the same seed would replay the sample draws as token draws."""
        rank = self.rank if per_rank else 0
        seed = self.seed * 1_000_003 + self.step * 10_007 + group * 101 + rank
        return torch.Generator().manual_seed((seed + stream * 998_244_353) % 2**63)

    def global_decision(
        self,
        ppl: torch.Tensor,
        entropy: torch.Tensor,
        response_tokens: torch.Tensor,
        reference_ppl: torch.Tensor | None = None,
    ) -> SampleDecision:
        """Decide over the step's samples of every rank together; return this rank's share of the decisions.

        Gathers three floats per sample (four with the reference perplexity of TailSFT-like policies) with
        accelerate's padding and gather. Every rank computes the same decisions from the same gathered statistics,
        in rank order, with the same random stream.
        """
        stats = [ppl.double(), entropy.double(), response_tokens.double()]
        if reference_ppl is not None:
            stats.append(reference_ppl.double().to(ppl.device))
        local = torch.stack(stats, dim=1)
        everyone, own = local, slice(0, local.shape[0])
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            device = self.accelerator.device
            local = local.to(device)
            counts = self.accelerator.gather(torch.tensor([local.shape[0]], device=device)).tolist()
            padded = self.accelerator.pad_across_processes(local, dim=0)
            gathered = self.accelerator.gather(padded).view(len(counts), -1, local.shape[1])
            everyone = torch.cat([gathered[r, :n] for r, n in enumerate(counts)]).cpu()
            start = sum(counts[: self.accelerator.process_index])
            own = slice(start, start + local.shape[0])
        decision = self.policy.decide_samples(
            everyone[:, 0], everyone[:, 1], everyone[:, 2].long(), self.generator(0, per_rank=False),
            reference_ppl=everyone[:, 3] if everyone.shape[1] == 4 else None,
        )  # fmt: skip
        return decision.rows(own)
