"""The policy interface: what a selection method sees and what it decides.

A method is a pair: a :class:`SamplePolicy` (which samples of a triage group stay, and which of the kept ones lose
tokens) and a :class:`TokenPolicy` (which response tokens of those samples keep their label). Both are pure tensor
code over per-sample and per-token statistics, so each can be tested on hand-made numbers with no model. The trainer
only ever calls :meth:`Policy.select`. Adding a method is one small class with a ``register_*`` decorator.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch

from ..core.selection import (
    Selection, SelectionParams, assemble_selection, qtuning_token_rows, share_of_tokens, token_budget,
)  # fmt: skip
from ..core.stats import eu_plane_stats
from ..core.tokens import prune_tokens
from ..core.triage import TriageResult, target_keep_count, top_k_mask

__all__ = [
    "SampleBatch", "SampleDecision", "TokenBatch", "SamplePolicy", "TokenPolicy", "Policy", "SAMPLE_POLICIES",
    "TOKEN_POLICIES", "register_sample_policy", "register_token_policy", "build_policy", "method_name", "keep_top",
    "keep_tokens_by_score", "reference_sample_ppl", "select_qtuning",
]  # fmt: skip


@dataclass(frozen=True)
class SampleBatch:
    """Per-sample statistics of one triage group, each of shape ``(B,)``."""

    ppl: torch.Tensor
    entropy: torch.Tensor
    response_tokens: torch.Tensor
    """Trainable (response) tokens of each sample."""
    reference_ppl: torch.Tensor | None = None
    """Perplexity of each sample under the reference model (only for sample policies with ``needs_reference``)."""

    @property
    def size(self) -> int:
        return self.ppl.numel()

    @property
    def valid(self) -> torch.Tensor:
        """Samples with finite statistics; a policy never keeps the others."""
        return torch.isfinite(self.ppl) & torch.isfinite(self.entropy)


@dataclass(frozen=True)
class SampleDecision:
    """A sample policy's answer for a group of B samples."""

    triage: TriageResult
    """``keep`` and, for EU-plane policies, quadrants/thresholds; other policies leave quadrant 0 and NaN thresholds."""
    token_rows: torch.Tensor
    """(B,) kept samples handed to the token policy."""
    loss_weight: torch.Tensor | None = None
    """(B,) factor on each kept sample's token losses, or None (1 everywhere)."""
    plane_axis: torch.Tensor | None = None
    """(B,) the entropy axis the triage ran on, where it is not the entropy itself (``eu_plane="decorrelated"``)."""

    @property
    def keep(self) -> torch.Tensor:
        return self.triage.keep

    def rows(self, index: slice | torch.Tensor) -> SampleDecision:
        """The decisions of some samples of the group (one rank's share of a cross-rank decision)."""
        weight = None if self.loss_weight is None else self.loss_weight[index]
        axis = None if self.plane_axis is None else self.plane_axis[index]
        return SampleDecision(self.triage.rows(index), self.token_rows[index], weight, axis)


@dataclass(frozen=True)
class TokenBatch:
    """Per-token statistics of the rows a token policy prunes, each of shape ``(n, L)``."""

    token_logps: torch.Tensor
    """log p(label) under the current model."""
    response_mask: torch.Tensor
    reference_logps: torch.Tensor | None = None
    """log p(label) under the reference model (only for policies with ``needs_reference``)."""
    budget_tokens: int | None = None
    """With ``token_budget_scope="run"``: how many tokens these rows keep in all (sized by the caller)."""


class SamplePolicy(ABC):
    """Decides which samples of a triage group are trained on."""

    name: ClassVar[str]
    uses_eu_plane: ClassVar[bool] = False
    """True when the decision comes with Q-Tuning's quadrants and thresholds (metrics and figures use them)."""
    reweights: ClassVar[bool] = False
    """True when the policy rescales the losses of the samples it keeps."""
    reads_statistics: ClassVar[bool] = True
    """False when the decision needs no model statistics (only answer-token counts): the scoring forward is skipped."""
    needs_reference: ClassVar[bool] = False
    """True when the policy compares each sample with its perplexity under a reference model (TailSFT)."""

    def __init__(self, params: SelectionParams):
        self.params = params

    def target(self, batch: SampleBatch) -> int:
        """K samples for the budget, never more than the valid ones."""
        return min(target_keep_count(batch.size, self.params.sample_keep_ratio), int(batch.valid.sum()))

    @abstractmethod
    def select_samples(self, batch: SampleBatch, generator: torch.Generator) -> SampleDecision:
        """Which samples stay (and which of them lose tokens). ``generator`` drives any randomness (CPU)."""


class TokenPolicy(ABC):
    """Decides which response tokens of the rows handed to it keep their label."""

    name: ClassVar[str]
    needs_reference: ClassVar[bool] = False
    """True when the policy scores tokens against a reference model's log-probs (Rho-1)."""
    prunes: ClassVar[bool] = True
    reads_statistics: ClassVar[bool] = True
    """False when the decision needs no per-token log-probs (random, none)."""

    def __init__(self, params: SelectionParams):
        self.params = params

    @abstractmethod
    def keep_tokens(self, batch: TokenBatch, generator: torch.Generator) -> torch.Tensor:
        """(n, L) BoolTensor of the response positions that keep their label."""


_S = TypeVar("_S", bound=type[SamplePolicy])
_T = TypeVar("_T", bound=type[TokenPolicy])

SAMPLE_POLICIES: dict[str, type[SamplePolicy]] = {}
TOKEN_POLICIES: dict[str, type[TokenPolicy]] = {}


def register_sample_policy(cls: _S) -> _S:
    """Class decorator: make a sample policy selectable as ``QTuningConfig(sample_policy=cls.name)``."""
    SAMPLE_POLICIES[cls.name] = cls
    return cls


def register_token_policy(cls: _T) -> _T:
    """Class decorator: make a token policy selectable as ``QTuningConfig(token_policy=cls.name)``."""
    TOKEN_POLICIES[cls.name] = cls
    return cls


def method_name(sample_policy: str, token_policy: str) -> str:
    """``"qtuning"`` for the paper's method, else ``"<sample>-<token>"`` (e.g. ``"random-random"``)."""
    return "qtuning" if sample_policy == token_policy == "qtuning" else f"{sample_policy}-{token_policy}"


@dataclass(frozen=True)
class Policy:
    """A sample policy and a token policy, applied one after the other."""

    samples: SamplePolicy
    tokens: TokenPolicy

    @property
    def name(self) -> str:
        return method_name(self.samples.name, self.tokens.name)

    @property
    def needs_reference(self) -> bool:
        """Whether the sample or the token policy reads the reference model (the trainer then scores it too)."""
        return self.samples.needs_reference or self.tokens.needs_reference

    @property
    def needs_scoring(self) -> bool:
        """Whether a step needs the scoring forward at all (random or shortest samples with random or no token
        pruning decide from answer-token counts alone, so they pay no scoring pass)."""
        return self.samples.reads_statistics or self.tokens.reads_statistics or self.needs_reference

    def decide_samples(
        self,
        ppl: torch.Tensor,
        entropy: torch.Tensor,
        response_tokens: torch.Tensor,
        generator: torch.Generator,
        *,
        reference_ppl: torch.Tensor | None = None,
    ) -> SampleDecision:
        if self.samples.needs_reference and reference_ppl is None:
            raise ValueError(f"sample policy {self.samples.name!r} needs each sample's perplexity under the reference")
        return self.samples.select_samples(SampleBatch(ppl, entropy, response_tokens, reference_ppl), generator)

    def select(
        self,
        ppl: torch.Tensor,
        entropy: torch.Tensor,
        token_logps: torch.Tensor,
        response_mask: torch.Tensor,
        *,
        generator: torch.Generator,
        reference_logps: torch.Tensor | None = None,
        decision: SampleDecision | None = None,
        reference_ppl: torch.Tensor | None = None,
        token_budget_tokens: int | None = None,
    ) -> Selection:
        """Decide the samples (unless ``decision`` was already taken over a larger group), then their tokens.

        A sample policy with ``needs_reference`` reads ``reference_ppl``, or, when it is not given, the per-sample
        perplexity of ``reference_logps`` over the response tokens. ``token_budget_tokens``: with
        ``token_budget_scope="run"``, the tokens the kept rows keep in all (default: ``token_keep_ratio`` of this
        group's answer tokens).
        """
        mask = response_mask.to(torch.bool)
        budget_tokens = token_budget_tokens
        if budget_tokens is None and self.samples.params.token_budget_scope == "run":
            budget_tokens = share_of_tokens(self.samples.params.token_keep_ratio, int(mask.sum()))
        if decision is None:
            if self.samples.needs_reference and reference_ppl is None and reference_logps is not None:
                reference_ppl = reference_sample_ppl(reference_logps, mask)
            decision = self.decide_samples(ppl, entropy, mask.sum(dim=-1), generator, reference_ppl=reference_ppl)
        if self.tokens.needs_reference and reference_logps is None:
            raise ValueError(f"token policy {self.tokens.name!r} needs the reference model's log-probs")

        prunes = self.tokens.prunes and self.samples.params.token_keep_ratio < 1.0
        token_rows = decision.token_rows if self.tokens.prunes else torch.zeros_like(decision.token_rows)
        if budget_tokens is not None:  # kept samples trained whole (Q4) count towards the run's share too
            whole = int(mask[decision.keep.to(mask.device) & ~token_rows.to(mask.device)].sum())
            budget_tokens = max(0, budget_tokens - whole)

        def keep_tokens(rows: torch.Tensor) -> torch.Tensor:
            reference = None if reference_logps is None else reference_logps[rows]
            batch = TokenBatch(token_logps[rows], mask[rows], reference, budget_tokens=budget_tokens)
            return self.tokens.keep_tokens(batch, generator)
        return assemble_selection(
            ppl, entropy, mask, decision.triage, token_rows, keep_tokens if prunes else None, decision.loss_weight
        )


def build_policy(sample_policy: str, token_policy: str, params: SelectionParams) -> Policy:
    """The registered policies by name (``QTuningConfig.sample_policy`` / ``token_policy``)."""
    if sample_policy not in SAMPLE_POLICIES:
        raise ValueError(f"`sample_policy` must be one of {', '.join(map(repr, SAMPLE_POLICIES))}; got {sample_policy!r}.")
    if token_policy not in TOKEN_POLICIES:
        raise ValueError(f"`token_policy` must be one of {', '.join(map(repr, TOKEN_POLICIES))}; got {token_policy!r}.")
    return Policy(SAMPLE_POLICIES[sample_policy](params), TOKEN_POLICIES[token_policy](params))


def select_qtuning(
    ppl: torch.Tensor,
    entropy: torch.Tensor,
    token_logps: torch.Tensor,
    response_mask: torch.Tensor,
    params: SelectionParams,
    *,
    triage: TriageResult | None = None,
) -> Selection:
    """Q-Tuning's decision for one triage group, as the trainer takes it: triage on the EU plane (``ppl``, ``entropy``
    of shape ``(B,)``), then token-prune the kept Q2 samples (``token_logps``, ``response_mask`` of shape ``(B, L)``).
    ``triage``: decisions already taken over a larger group (e.g. all ranks); only token pruning is left to do.
    """
    if params.token_budget_scope == "run":
        raise ValueError(
            "token_budget_scope='run' sizes the token budget from the whole run's answer tokens, which one group does "
            "not know: use the trainer (or Policy.select with token_budget_tokens=...), or another scope."
        )
    decision = None if triage is None else SampleDecision(triage, qtuning_token_rows(triage, params))
    policy = build_policy("qtuning", "qtuning", params)
    return policy.select(ppl, entropy, token_logps, response_mask, generator=torch.Generator(), decision=decision)


def reference_sample_ppl(reference_logps: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(B,) perplexity of each sample's response tokens under the reference model (NaN without response tokens)."""
    return eu_plane_stats(reference_logps, torch.zeros_like(reference_logps), response_mask)[0]


def keep_top(scores: torch.Tensor, eligible: torch.Tensor, k: int, *, highest: bool = True) -> torch.Tensor:
    """The ``k`` eligible samples of highest (or lowest) score; ties go to the earlier index."""
    finite = torch.nan_to_num(scores.double(), nan=-math.inf if highest else math.inf)
    return top_k_mask(finite if highest else -finite, eligible, min(k, int(eligible.sum())))


def keep_tokens_by_score(
    scores: torch.Tensor, batch: TokenBatch, params: SelectionParams, *, keep_highest: bool, neighbor_lambda: float = 0.0
) -> torch.Tensor:
    """Each row of ``batch`` keeps ``max(1, floor(r * |T|))`` response tokens (or one batch/run budget) ranked by
    ``scores`` (with ``neighbor_lambda``, each token's score mixed with its neighbours')."""
    return prune_tokens(
        scores, batch.response_mask, params.token_keep_ratio, neighbor_lambda=neighbor_lambda,
        neighbor=params.neighbor_mode, keep_highest=keep_highest, **token_budget(params, batch.budget_tokens),
    )  # fmt: skip
