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

from ..core.selection import share_of_tokens
from ..policies import Policy, SampleDecision
from ..policies.base import reference_sample_ppl
from .scoring import ScoredMicroBatch

__all__ = ["StepSelection", "StepDecider"]


def _pad_columns(tensor: torch.Tensor, width: int, value: float | bool = 0) -> torch.Tensor:
    return torch.nn.functional.pad(tensor, (0, width - tensor.shape[1]), value=value)


@dataclass(frozen=True)
class StepSelection:
    """The statistics and decisions of a step's samples on this process, one row per sample in micro-batch order
    (micro-batch ``i`` is rows :meth:`rows` ``(i)``), columns padded to the widest micro-batch. Applying the
    decisions, the metrics and the ledger all read this one shape."""

    scored: list[ScoredMicroBatch]
    offsets: list[int]
    """Row where each micro-batch starts, and the total last."""
    ppl: torch.Tensor
    entropy: torch.Tensor
    response: torch.Tensor
    """(n, W) answer positions."""
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
    thresholds: list[dict[str, float]]
    """``q`` and the four thresholds of each triage group decided on this process."""

    def rows(self, index: int) -> slice:
        return slice(self.offsets[index], self.offsets[index + 1])

    @property
    def measured(self) -> torch.Tensor:
        """(n,) samples whose statistics a scoring forward measured (none when the policy reads no statistics)."""
        counts = torch.tensor(self.offsets).diff()
        return torch.tensor([s.measured for s in self.scored]).repeat_interleave(counts)

    def of_micro_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``keep``, ``label_keep`` and ``loss_weight`` of micro-batch ``index`` in its own layout."""
        rows, width = self.rows(index), self.scored[index].width
        weight = None if self.loss_weight is None else self.loss_weight[rows]
        return self.keep[rows], self.label_keep[rows, :width], weight


class StepDecider:
    """Turns a step's scored micro-batches into decisions, with the run-wide state some policies keep.

    ``accelerator`` is needed for ``triage_scope="global"`` with several processes (its gather).
    """

    def __init__(self, policy: Policy, *, triage_scope: str, seed: int, rank: int = 0, accelerator: Any = None):
        self.policy = policy
        self.triage_scope = triage_scope
        self.seed = int(seed)
        self.rank = rank
        self.accelerator = accelerator
        self.step = 0
        self.run_tokens_seen = self.run_tokens_kept = 0
        """``token_budget_scope="run"``: this process's answer tokens seen and kept so far (restart on resume)."""

    def decide(self, scored: list[ScoredMicroBatch], step: int) -> StepSelection:
        """Decisions for optimizer step ``step`` (1-based: it seeds the baselines' random draws)."""
        self.step = step
        width = max(s.width for s in scored)
        offsets = [0]
        for s in scored:
            offsets.append(offsets[-1] + s.num_samples)
        stats = {
            "ppl": torch.cat([s.ppl for s in scored]),
            "entropy": torch.cat([s.entropy for s in scored]),
            "response": torch.cat([_pad_columns(s.response, width, False) for s in scored]),
            "token_logps": torch.cat([_pad_columns(s.token_logps, width) for s in scored]),
            "reference": torch.cat([_pad_columns(s.reference_logps, width) for s in scored])
            if self.policy.needs_reference else None,
        }  # fmt: skip
        # A group is a range of rows and the columns of its widest micro-batch (what its policy call sees).
        if self.triage_scope == "micro_batch":
            groups = [(slice(offsets[i], offsets[i + 1]), s.width) for i, s in enumerate(scored)]
        else:
            groups = [(slice(0, offsets[-1]), width)]
        parts = [self._decide_group(stats, rows, columns, index) for index, (rows, columns) in enumerate(groups)]
        cat = lambda get: None if get(parts[0]) is None else torch.cat([get(p) for p in parts])  # noqa: E731
        return StepSelection(
            scored, offsets, stats["ppl"], stats["entropy"], stats["response"],
            keep=cat(lambda p: p[0].keep), label_keep=cat(lambda p: _pad_columns(p[0].label_keep, width, False)),
            token_pruned=cat(lambda p: p[0].token_pruned), quadrant=cat(lambda p: p[0].triage.quadrant),
            filled=cat(lambda p: p[0].triage.filled), trimmed=cat(lambda p: p[0].triage.trimmed),
            invalid=cat(lambda p: p[0].triage.invalid), loss_weight=cat(lambda p: p[0].loss_weight),
            plane_axis=cat(lambda p: p[1]), thresholds=[{"q": p[0].triage.q, **p[0].triage.thresholds} for p in parts],
        )  # fmt: skip

    def _decide_group(self, stats: dict[str, torch.Tensor | None], rows: slice, width: int, index: int):
        ppl, entropy = stats["ppl"][rows], stats["entropy"][rows]
        response = stats["response"][rows, :width]
        reference = None if stats["reference"] is None else stats["reference"][rows, :width]
        cross_rank = self.triage_scope == "global"
        generator = self.generator(index, per_rank=not cross_rank, stream=int(cross_rank))
        reference_ppl = reference_sample_ppl(reference, response) if self.policy.samples.needs_reference else None
        if cross_rank:  # the sample draws come from a generator of their own (stream 0)
            extra = {} if reference_ppl is None else {"reference_ppl": reference_ppl}
            decision = self.global_decision(ppl, entropy, response.sum(dim=-1), **extra)
        else:  # one generator for the sample draws, then the token draws
            decision = self.policy.decide_samples(ppl, entropy, response.sum(dim=-1), generator, reference_ppl=reference_ppl)
        budget_tokens = self._run_token_budget(int(response.sum()))
        selection = self.policy.select(
            ppl, entropy, stats["token_logps"][rows, :width], response,
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
