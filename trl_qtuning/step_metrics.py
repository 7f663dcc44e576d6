"""What a step's decisions add up to: the ``qtuning/*`` metrics and, when someone listens, the ledger's columns.

The metrics are built from sums (counts, token totals, moments of the EU plane), so several processes add theirs
with one gather of a fixed-size vector, and the metrics describe the step's samples of every rank. Per-sample
Python lists (sample ids, pruned positions) are built only by :func:`ledger_columns`, which the trainer calls only
when a ledger or a tracking listener wants them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from .decision import MicroBatchDecision
from .scoring import ScoredMicroBatch
from .vocabulary import QUADRANTS, Decision

__all__ = [
    "DECISION_NAMES",
    "METRIC_SUMS",
    "StepMetricsLog",
    "correlation_from_moments",
    "gather_ledger_columns",
    "gather_step_sums",
    "decision_codes",
    "ledger_columns",
    "named_sums",
    "plane_moments",
    "step_metrics",
    "step_sums",
]

logger = logging.getLogger("trl_qtuning.trainer")  # the warnings a user of the trainer filters by its name

DECISION_NAMES = (
    Decision.INVALID, Decision.FILLED, Decision.TOKEN_PRUNED, Decision.KEPT, Decision.TRIMMED, Decision.DROPPED,
)  # fmt: skip
"""Ledger ``decision`` values, indexed by :func:`decision_codes` (the first that applies, in this order)."""

_THRESHOLDS = ("q", "ppl_lo", "ppl_hi", "ent_lo", "ent_hi")
_MOMENTS = ("n", "x", "y", "xx", "xy", "yy")

METRIC_SUMS = (
    "samples", "kept", "filled", "trimmed", "invalid", *(f"quadrant{q}" for q in range(5)), "weight_sum",
    "response_tokens", "kept_tokens", "kept_sample_response", "kept_sample_kept", "pruned_response", "pruned_kept",
    "measured", "ppl_sum", "entropy_sum", "before_top1", "before_entropy", "before_response", "before_tokens",
    "before_unmeasured", *(f"{t}_sum" for t in _THRESHOLDS), *(f"{t}_count" for t in _THRESHOLDS),
    *(f"eu_{m}" for m in _MOMENTS), *(f"plane_{m}" for m in _MOMENTS),
)  # fmt: skip
"""The entries of :func:`step_sums`' vector: each rank's are added to the others'."""


def decision_codes(decision: MicroBatchDecision) -> torch.Tensor:
    """(n,) index into :data:`DECISION_NAMES` of each sample's decision."""
    keep = decision.keep
    code = torch.full(keep.shape, DECISION_NAMES.index(Decision.DROPPED), dtype=torch.long)
    for name, where in reversed(
        ((Decision.INVALID, decision.invalid), (Decision.FILLED, keep & decision.filled),
         (Decision.TOKEN_PRUNED, keep & decision.token_pruned), (Decision.KEPT, keep),
         (Decision.TRIMMED, decision.trimmed))
    ):  # fmt: skip
        code = torch.where(where.cpu(), DECISION_NAMES.index(name), code)
    return code


def plane_moments(ppl: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """``(n, sum x, sum y, sum x^2, sum xy, sum y^2)`` of ``x = log ppl``, ``y = axis`` over the valid samples
    (finite positive PPL, finite axis): enough to add groups and ranks, then take a correlation."""
    p, y = ppl.double(), axis.double()
    valid = torch.isfinite(p) & torch.isfinite(y) & (p > 0)
    x = torch.log(torch.where(valid, p, 1.0))
    y = torch.where(valid, y, 0.0)
    x = torch.where(valid, x, 0.0)
    return torch.stack([valid.sum().double(), x.sum(), y.sum(), (x * x).sum(), (x * y).sum(), (y * y).sum()])


def correlation_from_moments(moments: Sequence[float] | torch.Tensor) -> float:
    """Pearson correlation from :func:`plane_moments`; NaN with fewer than two samples or a constant axis."""
    n, sx, sy, sxx, sxy, syy = (float(v) for v in moments)
    if n < 2:
        return math.nan
    vx, vy = sxx - sx * sx / n, syy - sy * sy / n
    # A constant axis leaves only rounding in its centred sum of squares.
    if vx <= 1e-12 * max(sxx, 1e-300) or vy <= 1e-12 * max(syy, 1e-300):
        return math.nan
    return max(-1.0, min(1.0, (sxy - sx * sy / n) / math.sqrt(vx * vy)))


def step_sums(
    scored: list[ScoredMicroBatch], decisions: list[MicroBatchDecision], thresholds: list[dict[str, float]]
) -> torch.Tensor:
    """This rank's :data:`METRIC_SUMS` for one step, as a float64 vector."""
    cat = lambda get: torch.cat([get(s, d).detach().cpu() for s, d in zip(scored, decisions, strict=True)])  # noqa: E731
    keep = cat(lambda s, d: d.keep)
    invalid = cat(lambda s, d: d.invalid)
    code = cat(lambda s, d: decision_codes(d))
    response = cat(lambda s, d: s.response.sum(dim=1)).double()
    kept_tokens = cat(lambda s, d: d.label_keep.sum(dim=1)).double()
    quadrant = cat(lambda s, d: d.quadrant)
    pruned = (code == DECISION_NAMES.index(Decision.TOKEN_PRUNED)) | (keep & (kept_tokens < response))
    weight = cat(lambda s, d: d.loss_weight.double() if d.loss_weight is not None else torch.ones(s.num_samples))
    measured = torch.cat([torch.full((s.num_samples,), s.measured) for s in scored]) & ~invalid
    ppl = torch.where(measured, cat(lambda s, d: s.ppl).double(), 0.0)
    entropy = torch.where(measured, cat(lambda s, d: s.entropy).double(), 0.0)
    finite_ppl = torch.where(~invalid, cat(lambda s, d: s.ppl).double(), math.nan)
    raw_entropy = cat(lambda s, d: s.entropy).double()
    axis = cat(lambda s, d: d.plane_axis.double() if d.plane_axis is not None else s.entropy.double())
    top1 = [s.top1_hits for s in scored]
    threshold = torch.tensor([[t[name] for name in _THRESHOLDS] for t in thresholds], dtype=torch.float64)
    finite = torch.isfinite(threshold)
    values = [
        keep.numel(), keep.sum(), (code == DECISION_NAMES.index(Decision.FILLED)).sum(),
        (code == DECISION_NAMES.index(Decision.TRIMMED)).sum(), invalid.sum(),
        *(((quadrant == q) & ~invalid).sum() for q in range(5)), weight[keep].sum(), response.sum(),
        kept_tokens.sum(), response[keep].sum(), kept_tokens[keep].sum(), response[pruned].sum(),
        kept_tokens[pruned].sum(), measured.sum(), ppl.sum(), entropy.sum(),
        sum(v for v in top1 if math.isfinite(v)), sum(s.entropy_sum for s in scored if math.isfinite(s.entropy_sum)),
        sum(int(s.response.sum()) for s in scored), sum(s.tokens for s in scored),
        sum(not math.isfinite(v) for v in top1),
        *torch.where(finite, threshold, 0.0).sum(dim=0), *finite.sum(dim=0),
        *plane_moments(finite_ppl, raw_entropy), *plane_moments(finite_ppl, axis),
    ]  # fmt: skip
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


def named_sums(sums: torch.Tensor) -> dict[str, float]:
    """:func:`step_sums`' vector by :data:`METRIC_SUMS` name."""
    return dict(zip(METRIC_SUMS, (float(v) for v in sums), strict=True))


def step_metrics(s: dict[str, float], *, uses_eu_plane: bool, reweights: bool) -> dict[str, float]:
    """The step's ``qtuning/*`` metrics from (every rank's) :func:`named_sums`. The trainer pools the token keep
    ratio (``pruned_kept`` / ``pruned_response``) and the pre-pruning token count over steps itself."""
    total = max(1.0, s["samples"])

    def ratio(numerator: str, denominator: str, empty: float = 0.0) -> float:
        return s[numerator] / s[denominator] if s[denominator] else empty

    metrics: dict[str, float] = {}
    if uses_eu_plane:
        for q in range(5):
            metrics[f"qtuning/{QUADRANTS[q].key}_share"] = s[f"quadrant{q}"] / total
    if reweights:
        metrics["qtuning/loss_weight_mean"] = ratio("weight_sum", "kept", 1.0)
    metrics["qtuning/sample_keep_ratio"] = s["kept"] / total
    if s["before_response"] and not s["before_unmeasured"]:
        metrics["qtuning/prepruning_mean_token_accuracy"] = s["before_top1"] / s["before_response"]
        metrics["qtuning/prepruning_entropy"] = s["before_entropy"] / s["before_response"]
    metrics["qtuning/kept_sample_token_share"] = ratio("kept_sample_kept", "kept_sample_response")
    metrics["qtuning/label_token_share"] = ratio("kept_tokens", "response_tokens")
    metrics["qtuning/filled_share"] = s["filled"] / total
    metrics["qtuning/trimmed_share"] = s["trimmed"] / total
    metrics["qtuning/invalid_samples"] = s["invalid"]
    if s["measured"]:
        metrics["qtuning/ppl_mean"] = s["ppl_sum"] / s["measured"]
        metrics["qtuning/entropy_mean"] = s["entropy_sum"] / s["measured"]
    if uses_eu_plane:
        for name in _THRESHOLDS:
            metrics[f"qtuning/{name}"] = ratio(f"{name}_sum", f"{name}_count", math.nan)
        for name, prefix in (("eu_correlation", "eu"), ("plane_correlation", "plane")):
            value = correlation_from_moments([s[f"{prefix}_{m}"] for m in _MOMENTS])
            if math.isfinite(value):  # NaN (degenerate step) would poison the logged average
                metrics[f"qtuning/{name}"] = value
    return metrics


def ledger_columns(
    scored: list[ScoredMicroBatch],
    decisions: list[MicroBatchDecision],
    *,
    step: int,
    epoch: float,
    rank: int,
    reweights: bool,
) -> dict[str, list[Any]]:
    """One value per sample, keyed like ``trl_qtuning.ledger.LEDGER_SCHEMA`` (this rank's samples)."""
    pairs = list(zip(scored, decisions, strict=True))
    cat = lambda get: torch.cat([get(s, d).detach().cpu() for s, d in pairs])  # noqa: E731
    total = sum(s.num_samples for s in scored)
    nan = lambda s, values: values.double() if s.measured else torch.full((s.num_samples,), math.nan)  # noqa: E731
    pruned_positions: list[list[int]] = []
    for s, d in pairs:
        pruned = (s.response & ~d.label_keep.to(s.response.device)).cpu() & d.keep.cpu()[:, None]
        values = s.layout.positions.cpu()[pruned]
        pruned_positions.extend(chunk.tolist() for chunk in torch.split(values, pruned.sum(dim=1).tolist()))
    columns: dict[str, list[Any]] = {
        "step": [step] * total,
        "epoch": [epoch] * total,
        "rank": [rank] * total,
        "micro_batch": torch.cat([torch.full((s.num_samples,), i, dtype=torch.int32) for i, s in enumerate(scored)]).tolist(),
        "sample_id": torch.cat([s.sample_ids for s in scored]).tolist(),
        "quadrant": cat(lambda s, d: d.quadrant).tolist(),
        "ppl": cat(lambda s, d: nan(s, s.ppl)).tolist(),
        "entropy": cat(lambda s, d: nan(s, s.entropy)).tolist(),
        "decision": [DECISION_NAMES[c] for c in cat(lambda s, d: decision_codes(d)).tolist()],
        "response_tokens": cat(lambda s, d: s.response.sum(dim=1)).tolist(),
        "kept_tokens": cat(lambda s, d: d.label_keep.sum(dim=1)).tolist(),
        "pruned_positions": pruned_positions,
    }
    if reweights:
        columns["loss_weight"] = cat(
            lambda s, d: d.loss_weight if d.loss_weight is not None else torch.ones(s.num_samples)
        ).double().tolist()
    return columns


def gather_step_sums(
    accelerator: Any, sums: torch.Tensor, seconds: float, wants_columns: bool
) -> tuple[torch.Tensor, float, bool]:
    """Every rank's sums added, the slowest scoring time, and whether the main process wants ledger columns: one
    gather of a fixed-size vector (with one process, the arguments as given)."""
    if accelerator.num_processes <= 1:
        return sums, seconds, wants_columns
    local = torch.cat([sums, torch.tensor([seconds, float(wants_columns)], dtype=torch.float64)])
    gathered = accelerator.gather(local[None].to(accelerator.device)).cpu()
    return gathered[:, :-2].sum(dim=0), float(gathered[:, -2].max()), bool(gathered[:, -1].max())


def gather_ledger_columns(
    columns: dict[str, list[Any]], thresholds: list[dict[str, float]], *, several: bool, global_scope: bool
) -> tuple[dict[str, list[Any]], list[dict[str, float]]]:
    """Every rank's ledger rows (and, unless triage was global, its groups' thresholds) on every process, so the main
    process writes one ledger for all ranks. A collective: all ranks call it, or none."""
    if not several:
        return columns, thresholds
    from accelerate.utils import gather_object

    parts = gather_object([(columns, thresholds)])
    columns = {name: [v for part in parts for v in part[0][name]] for name in columns}
    return columns, thresholds if global_scope else [t for part in parts for t in part[1]]


class StepMetricsLog:
    """Appends each step's ``qtuning/*`` metrics to the trainer's metric lists, warns about steps that dropped samples
    for non-finite statistics, and pools the token keep ratio over a logging window.

    Pooled, because a mean of per-step ratios would count steps without token-pruned samples as 1.0 and weigh a step
    of 2 pruned tokens like one of 2000.
    """

    _TOTALS = (
        "samples", "kept", "kept_sample_response", "kept_sample_kept", "pruned_response", "pruned_kept",
        "response_tokens", "kept_tokens",
    )  # fmt: skip

    def __init__(self, *, uses_eu_plane: bool, reweights: bool):
        self.uses_eu_plane, self.reweights = uses_eu_plane, reweights
        self._pool = [0.0, 0.0]  # kept / answer tokens of token-pruned samples since the last log
        self._prepruning_tokens = 0
        self._totals = dict.fromkeys(self._TOTALS, 0.0)
        self._steps = 0

    def append(self, metrics: dict[str, list[float]], sums: dict[str, float], seconds: float, step: int) -> None:
        """Add step ``step``'s metrics (``sums`` from :func:`named_sums`) to the trainer's ``_metrics["train"]``."""
        for name, value in step_metrics(sums, uses_eu_plane=self.uses_eu_plane, reweights=self.reweights).items():
            metrics[name].append(value)
        metrics["qtuning/scoring_seconds"].append(seconds)
        for name in self._TOTALS:
            self._totals[name] += sums[name]
        self._steps += 1
        self._pool[0] += sums["pruned_kept"]
        self._pool[1] += sums["pruned_response"]
        self._prepruning_tokens += int(sums["before_tokens"])
        metrics["qtuning/prepruning_num_tokens"] = [float(self._prepruning_tokens)]
        total, invalid = int(sums["samples"]), int(sums["invalid"])
        if total and not sums["kept"]:
            logger.warning(
                "Q-Tuning: step %d kept no sample (%d of %d had non-finite statistics); it trains on nothing and "
                "the optimizer step changes no weight.", step, invalid, total,
            )  # fmt: skip
        elif invalid:
            logger.warning(
                "Q-Tuning: %d sample(s) of step %d had no finite statistics (no response token, or NaN/inf "
                "log-probs) and were dropped.", invalid, step,
            )  # fmt: skip

    def pop_token_keep_ratio(self) -> float | None:
        """Kept / answer tokens of the token-pruned samples since the last call (None if none was token-pruned)."""
        kept, total = self._pool
        self._pool = [0.0, 0.0]
        return kept / total if total else None

    def realised_budgets(self) -> dict[str, float | int | None]:
        """The budgets the steps appended so far realised, pooled over them (every rank's samples), from the same
        sums as the metrics: ``sample_keep_ratio`` (samples trained / scored), ``kept_sample_token_share`` (answer
        tokens trained / answer tokens of the samples trained), ``token_keep_ratio`` (the same within token-pruned
        samples; None when none was), ``label_token_share`` (answer tokens trained / scored) and ``steps``."""
        t = self._totals
        share = lambda num, den: t[num] / t[den] if t[den] else None  # noqa: E731
        return {
            "steps": self._steps,
            "sample_keep_ratio": share("kept", "samples"),
            "kept_sample_token_share": share("kept_sample_kept", "kept_sample_response"),
            "token_keep_ratio": share("pruned_kept", "pruned_response"),
            "label_token_share": share("kept_tokens", "response_tokens"),
        }
