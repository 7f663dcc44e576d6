"""Token policies: which response tokens of the samples handed over keep their label.

Each row keeps ``max(1, floor(r * |T|))`` of its response tokens (or, with ``token_budget_scope="batch"``, one budget
over all rows); pruned tokens stay in the input as context and only lose their label.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import TokenBatch, TokenPolicy, keep_tokens_by_score, register_token_policy

__all__ = ["QTuningTokens", "ReversedQTuningTokens", "RandomTokens", "PPLTokens", "Rho1Tokens", "AllTokens"]


def _token_ppl(batch: TokenBatch) -> torch.Tensor:
    return torch.exp(-batch.token_logps.double())


@register_token_policy
class QTuningTokens(TokenPolicy):
    """The paper's neighbour-aware score ``(1 - lambda) PPL_i + lambda (PPL_{i-1} + PPL_{i+1})``; prune the highest."""

    name = "qtuning"
    keep_highest: ClassVar[bool | None] = None
    """None: as ``reverse_token_score`` says."""

    def keep_tokens(self, batch: TokenBatch, generator: torch.Generator) -> torch.Tensor:
        p = self.params
        highest = p.reverse_token_score if self.keep_highest is None else self.keep_highest
        return keep_tokens_by_score(_token_ppl(batch), batch, p, keep_highest=highest,
                                    neighbor_lambda=p.neighbor_lambda)


@register_token_policy
class ReversedQTuningTokens(QTuningTokens):
    """Ablation: the same neighbour-aware score, but the highest-scoring tokens stay."""

    name = "reversed"
    keep_highest = True


@register_token_policy
class RandomTokens(TokenPolicy):
    """Tokens kept uniformly at random."""

    name = "random"
    reads_statistics = False

    def keep_tokens(self, batch: TokenBatch, generator: torch.Generator) -> torch.Tensor:
        draw = torch.rand(batch.token_logps.shape, generator=generator, dtype=torch.float64)
        return keep_tokens_by_score(draw.to(batch.token_logps.device), batch, self.params, keep_highest=False)


@register_token_policy
class PPLTokens(TokenPolicy):
    """Each token's own perplexity (lambda = 0): the highest-PPL tokens are pruned."""

    name = "ppl"

    def keep_tokens(self, batch: TokenBatch, generator: torch.Generator) -> torch.Tensor:
        return keep_tokens_by_score(_token_ppl(batch), batch, self.params, keep_highest=False)


@register_token_policy
class Rho1Tokens(TokenPolicy):
    """Rho-1 (Lin et al., 2024): keep the tokens of highest excess loss ``NLL_model - NLL_reference`` against
    ``QTuningConfig.reference_model_path`` (scored with the same fused head)."""

    name = "rho1"
    needs_reference = True

    def keep_tokens(self, batch: TokenBatch, generator: torch.Generator) -> torch.Tensor:
        if batch.reference_logps is None:
            raise ValueError("the rho1 token policy needs the reference model's log-probs")
        excess = batch.reference_logps.double() - batch.token_logps.double()
        return keep_tokens_by_score(excess, batch, self.params, keep_highest=True)


@register_token_policy
class AllTokens(TokenPolicy):
    """Keep every token (sample-pruning-only baselines)."""

    name = "none"
    prunes = False
    reads_statistics = False

    def keep_tokens(self, batch: TokenBatch, generator: torch.Generator) -> torch.Tensor:
        return batch.response_mask.to(torch.bool).clone()
