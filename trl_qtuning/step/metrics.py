"""What a step's decisions add up to: the ``qtuning/*`` metrics, the realised budgets and, when someone listens, the
ledger's columns.

The metrics are built from named sums (counts, token totals, moments of the EU plane), so several processes add
theirs with one gather, and the metrics describe the step's samples of every rank. Per-sample Python lists (sample
ids, pruned positions) are built only by :func:`ledger_columns`, which the trainer calls only when a ledger or a
tracking listener wants them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .decision import StepSelection
from ..vocabulary import QUADRANTS, Decision

__all__ = [
    "DECISION_NAMES", "StepMetricsLog", "correlation_from_moments", "decision_codes", "gather_ledger_columns",
    "gather_step_sums", "ledger_columns", "plane_moments", "realised_budgets", "step_metrics", "step_sums",
]  # fmt: skip

logger = logging.getLogger("trl_qtuning.trainer")  # the warnings a user of the trainer filters by its name

DECISION_NAMES = (
    Decision.INVALID, Decision.FILLED, Decision.TOKEN_PRUNED, Decision.KEPT, Decision.TRIMMED, Decision.DROPPED,
)  # fmt: skip
"""Ledger ``decision`` values, indexed by :func:`decision_codes` (the first that applies, in this order)."""

_THRESHOLDS = ("q", "ppl_lo", "ppl_hi", "ent_lo", "ent_hi")
_MOMENTS = ("n", "x", "y", "xx", "xy", "yy")


def decision_codes(step: StepSelection) -> torch.Tensor:
    """(n,) index into :data:`DECISION_NAMES` of each sample's decision."""
    keep = step.keep.cpu()
    code = torch.full(keep.shape, DECISION_NAMES.index(Decision.DROPPED), dtype=torch.long)
    for name, where in reversed(
        ((Decision.INVALID, step.invalid), (Decision.FILLED, keep & step.filled.cpu()),
         (Decision.TOKEN_PRUNED, keep & step.token_pruned.cpu()), (Decision.KEPT, keep), (Decision.TRIMMED, step.trimmed))
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


def step_sums(step: StepSelection) -> dict[str, float]:
    """This rank's sums for one step, by name; every rank's are added to the others' (:func:`gather_step_sums`)."""
    keep, invalid, quadrant = step.keep.cpu(), step.invalid.cpu(), step.quadrant.cpu()
    code = decision_codes(step)
    response = step.response.sum(dim=1).cpu().double()
    kept_tokens = step.label_keep.sum(dim=1).cpu().double()
    pruned = (code == DECISION_NAMES.index(Decision.TOKEN_PRUNED)) | (keep & (kept_tokens < response))
    weight = torch.ones(keep.shape, dtype=torch.float64) if step.loss_weight is None else step.loss_weight.cpu().double()
    measured = step.measured & ~invalid
    raw_ppl, raw_entropy = step.ppl.detach().cpu().double(), step.entropy.detach().cpu().double()
    finite_ppl = torch.where(~invalid, raw_ppl, math.nan)
    axis = raw_entropy if step.plane_axis is None else step.plane_axis.cpu().double()
    top1 = [s.top1_hits for s in step.scored]
    threshold = torch.tensor([[t[name] for name in _THRESHOLDS] for t in step.thresholds], dtype=torch.float64)
    finite = torch.isfinite(threshold)
    code_count = lambda name: (code == DECISION_NAMES.index(name)).sum()  # noqa: E731
    sums = {
        "samples": keep.numel(), "kept": keep.sum(), "filled": code_count(Decision.FILLED),
        "trimmed": code_count(Decision.TRIMMED), "invalid": invalid.sum(),
        **{f"quadrant{q}": ((quadrant == q) & ~invalid).sum() for q in range(5)},
        "weight_sum": weight[keep].sum(), "response_tokens": response.sum(), "kept_tokens": kept_tokens.sum(),
        "kept_sample_response": response[keep].sum(), "kept_sample_kept": kept_tokens[keep].sum(),
        "pruned_response": response[pruned].sum(), "pruned_kept": kept_tokens[pruned].sum(),
        "measured": measured.sum(), "ppl_sum": torch.where(measured, raw_ppl, 0.0).sum(),
        "entropy_sum": torch.where(measured, raw_entropy, 0.0).sum(),
        "before_top1": sum(v for v in top1 if math.isfinite(v)), "before_unmeasured": sum(not math.isfinite(v) for v in top1),
        "before_entropy": sum(s.entropy_sum for s in step.scored if math.isfinite(s.entropy_sum)),
        "before_tokens": sum(s.tokens for s in step.scored),
        **{f"{t}_sum": v for t, v in zip(_THRESHOLDS, torch.where(finite, threshold, 0.0).sum(dim=0))},
        **{f"{t}_count": v for t, v in zip(_THRESHOLDS, finite.sum(dim=0))},
        **{f"eu_{m}": v for m, v in zip(_MOMENTS, plane_moments(finite_ppl, raw_entropy))},
        **{f"plane_{m}": v for m, v in zip(_MOMENTS, plane_moments(finite_ppl, axis))},
    }  # fmt: skip
    return {name: float(value) for name, value in sums.items()}


def realised_budgets(sums: Mapping[str, float]) -> dict[str, float | None]:
    """The budgets some samples realised, from their sums (of one step, a run, or a ledger; a sum a source lacks
    counts as 0): ``sample_keep_ratio`` (samples trained / scored), ``kept_sample_token_share`` (answer tokens
    trained / answer tokens of the samples trained), ``token_keep_ratio`` (the same within token-pruned samples) and
    ``label_token_share`` (answer tokens trained / scored). None where nothing was counted."""

    def share(num: str, den: str) -> float | None:
        return sums.get(num, 0) / sums[den] if sums.get(den) else None

    return {
        "sample_keep_ratio": share("kept", "samples"),
        "kept_sample_token_share": share("kept_sample_kept", "kept_sample_response"),
        "token_keep_ratio": share("pruned_kept", "pruned_response"),
        "label_token_share": share("kept_tokens", "response_tokens"),
    }


def step_metrics(s: Mapping[str, float], *, uses_eu_plane: bool, reweights: bool) -> dict[str, float]:
    """The step's ``qtuning/*`` metrics from (every rank's) :func:`step_sums`. The trainer pools the token keep
    ratio and the pre-pruning token count over steps itself."""
    total = max(1.0, s["samples"])
    budgets = realised_budgets(s)
    metrics: dict[str, float] = {}
    if uses_eu_plane:
        for q in range(5):
            metrics[f"qtuning/{QUADRANTS[q].key}_share"] = s[f"quadrant{q}"] / total
    if reweights:
        metrics["qtuning/loss_weight_mean"] = s["weight_sum"] / s["kept"] if s["kept"] else 1.0
    metrics["qtuning/sample_keep_ratio"] = budgets["sample_keep_ratio"] or 0.0
    if s["response_tokens"] and not s["before_unmeasured"]:
        metrics["qtuning/prepruning_mean_token_accuracy"] = s["before_top1"] / s["response_tokens"]
        metrics["qtuning/prepruning_entropy"] = s["before_entropy"] / s["response_tokens"]
    metrics["qtuning/kept_sample_token_share"] = budgets["kept_sample_token_share"] or 0.0
    metrics["qtuning/label_token_share"] = budgets["label_token_share"] or 0.0
    metrics["qtuning/filled_share"] = s["filled"] / total
    metrics["qtuning/trimmed_share"] = s["trimmed"] / total
    metrics["qtuning/invalid_samples"] = s["invalid"]
    if s["measured"]:
        metrics["qtuning/ppl_mean"] = s["ppl_sum"] / s["measured"]
        metrics["qtuning/entropy_mean"] = s["entropy_sum"] / s["measured"]
    if uses_eu_plane:
        for name in _THRESHOLDS:
            metrics[f"qtuning/{name}"] = s[f"{name}_sum"] / s[f"{name}_count"] if s[f"{name}_count"] else math.nan
        for name, prefix in (("eu_correlation", "eu"), ("plane_correlation", "plane")):
            value = correlation_from_moments([s[f"{prefix}_{m}"] for m in _MOMENTS])
            if math.isfinite(value):  # NaN (degenerate step) would poison the logged average
                metrics[f"qtuning/{name}"] = value
    return metrics


def ledger_columns(step: StepSelection, *, number: int, epoch: float, rank: int, reweights: bool) -> dict[str, list[Any]]:
    """One value per sample, keyed like ``trl_qtuning.ledger.LEDGER_SCHEMA`` (this rank's samples)."""
    n, width = step.offsets[-1], step.response.shape[1]
    positions = torch.cat([torch.nn.functional.pad(s.layout.positions.cpu(), (0, width - s.width)) for s in step.scored])
    pruned = (step.response & ~step.label_keep).cpu() & step.keep.cpu()[:, None]
    nan_unless_measured = lambda v: torch.where(step.measured, v.detach().cpu().double(), math.nan).tolist()  # noqa: E731
    columns: dict[str, list[Any]] = {
        "step": [number] * n,
        "epoch": [epoch] * n,
        "rank": [rank] * n,
        "micro_batch": torch.arange(len(step.scored), dtype=torch.int32).repeat_interleave(
            torch.tensor(step.offsets).diff()).tolist(),
        "sample_id": torch.cat([s.sample_ids for s in step.scored]).tolist(),
        "quadrant": step.quadrant.cpu().tolist(),
        "ppl": nan_unless_measured(step.ppl),
        "entropy": nan_unless_measured(step.entropy),
        "decision": [DECISION_NAMES[c] for c in decision_codes(step).tolist()],
        "response_tokens": step.response.sum(dim=1).cpu().tolist(),
        "kept_tokens": step.label_keep.sum(dim=1).cpu().tolist(),
        "pruned_positions": [p.tolist() for p in torch.split(positions[pruned], pruned.sum(dim=1).tolist())],
    }  # fmt: skip
    if reweights:
        weight = torch.ones(n, dtype=torch.float64) if step.loss_weight is None else step.loss_weight.cpu().double()
        columns["loss_weight"] = weight.tolist()
    return columns


def gather_step_sums(
    accelerator: Any, sums: dict[str, float], seconds: float, wants_columns: bool
) -> tuple[dict[str, float], float, bool]:
    """Every rank's sums added, the slowest scoring time, and whether the main process wants ledger columns: one
    gather (with one process, the arguments as given)."""
    if accelerator.num_processes <= 1:
        return sums, seconds, wants_columns
    local = torch.tensor([*sums.values(), seconds, float(wants_columns)], dtype=torch.float64)
    gathered = accelerator.gather(local[None].to(accelerator.device)).cpu()
    added = dict(zip(sums, gathered[:, :-2].sum(dim=0).tolist(), strict=True))
    return added, float(gathered[:, -2].max()), bool(gathered[:, -1].max())


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
    for non-finite statistics, pools the token keep ratio over a logging window and every sum over the run.

    Pooled, because a mean of per-step ratios would count steps without token-pruned samples as 1.0 and weigh a step
    of 2 pruned tokens like one of 2000.
    """

    def __init__(self, *, uses_eu_plane: bool, reweights: bool):
        self.uses_eu_plane, self.reweights = uses_eu_plane, reweights
        self._window = [0.0, 0.0]  # kept / answer tokens of token-pruned samples since the last log
        self._totals: dict[str, float] = {}
        self._steps = 0

    def append(self, metrics: dict[str, list[float]], sums: dict[str, float], seconds: float, step: int) -> None:
        """Add step ``step``'s metrics (``sums``: every rank's :func:`step_sums`) to the trainer's
        ``_metrics["train"]``."""
        for name, value in step_metrics(sums, uses_eu_plane=self.uses_eu_plane, reweights=self.reweights).items():
            metrics[name].append(value)
        metrics["qtuning/scoring_seconds"].append(seconds)
        for name, value in sums.items():
            self._totals[name] = self._totals.get(name, 0.0) + value
        self._steps += 1
        self._window[0] += sums["pruned_kept"]
        self._window[1] += sums["pruned_response"]
        metrics["qtuning/prepruning_num_tokens"] = [float(int(self._totals["before_tokens"]))]
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
        kept, total = self._window
        self._window = [0.0, 0.0]
        return kept / total if total else None

    def realised_budgets(self) -> dict[str, float | int | None]:
        """:func:`realised_budgets` of every step appended so far (every rank's samples), and ``steps``."""
        return {"steps": self._steps, **realised_budgets(self._totals)}
