"""``QTuningConfig``: ``trl.SFTConfig`` plus the Q-Tuning knobs, each documented and validated."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from trl import SFTConfig

from .core.selection import SelectionParams
from .core.triage import FILL_RULES
from .policies import Policy, build_policy, method_name

__all__ = [
    "LABEL_FLAGS", "METHOD_FIELDS", "QTUNING_FIELDS", "UNTAGGED_FIELDS", "QTuningConfig", "require_qtuning_config",
    "run_label",
]  # fmt: skip

_RANGES: dict[str, tuple[str, Callable[[float], bool]]] = {
    "sample_keep_ratio": ("a number in (0, 1]", lambda v: 0.0 < v <= 1.0),
    "token_keep_ratio": ("a number in (0, 1]", lambda v: 0.0 < v <= 1.0),
    "neighbor_lambda": ("a number in [0, 1]", lambda v: 0.0 <= v <= 1.0),
    "triage_max_iter": ("an integer >= 1", lambda v: v >= 1),
    "triage_tol": ("a number in (0, 1)", lambda v: 0.0 < v < 1.0),
    "qtuning_ledger_rows_per_shard": ("an integer >= 1", lambda v: v >= 1),
}
"""Allowed range of each numeric field (int or float by its annotation). A string such as '0.3' is refused."""

_CHOICES: dict[str, tuple[str, ...]] = {
    "triage_scope": ("micro_batch", "step", "global"),
    "neighbor_mode": ("sum", "mean"),
    "token_budget_scope": ("sample", "batch", "run"),
    "entropy_positions": ("response", "all"),
    "qtuning_ledger": ("none", "summary", "full"),
    "eu_plane": ("paper", "decorrelated"),
    "fill_rule": FILL_RULES,
}


@dataclass
class QTuningConfig(SFTConfig):
    r"""
    Configuration for [`QTuningSFTTrainer`]: every field of `trl.SFTConfig`, plus the Q-Tuning settings below
    (Wang et al., "Winning the Pruning Gamble", arXiv:2509.23873).

    Each optimizer step, the trainer scores every sample of the step with the current model, keeps
    `sample_keep_ratio` of them (Q2 "valuable misconception" and Q4 "calibration data" samples on the
    Error-Uncertainty plane), and keeps `token_keep_ratio` of the response tokens of the Q2 samples.
    """

    qtuning_enabled: bool = field(
        default=True,
        metadata={"help": "Turn Q-Tuning on. False trains exactly like `SFTTrainer` (no scoring pass, no pruning)."},
    )
    sample_keep_ratio: float = field(
        default=0.25,
        metadata={"help": "Share of the samples of each triage group that are trained on, in (0, 1]."},
    )
    token_keep_ratio: float = field(
        default=0.5,
        metadata={"help": "Share of the response tokens of each kept Q2 sample that keep their label, in (0, 1]."},
    )
    sample_policy: str = field(
        default="qtuning",
        metadata={
            "help": "Which samples of a triage group stay: 'qtuning' (EU-plane triage, the paper's method) or a "
            "baseline at the same budget: 'random', 'longest' (drop the longest responses first), 'infobatch' (drop "
            "below-mean-loss samples at random, rescale the rest), 'entropy' (keep the highest entropy), 'ppl_high' / "
            "'ppl_low' (keep the highest / lowest perplexity), 'tailsft' (TRL's TailSFT: drop the samples whose loss "
            "fell furthest below the initial model's; the initial model is the LoRA base with adapters disabled, a "
            "frozen copy of the model for full fine-tuning, or `reference_model_path`), 'all' (keep every sample: "
            "token pruning only)."
        },
    )
    token_policy: str = field(
        default="qtuning",
        metadata={
            "help": "Which response tokens of the samples the sample policy hands over keep their label: 'qtuning' "
            "(neighbour-aware PPL, prune the highest), 'reversed' (same score, keep the highest), 'random', 'ppl' "
            "(own PPL, lambda 0, prune the highest), 'rho1' (keep the highest excess loss over "
            "`reference_model_path`), 'none' (keep every token). The 'qtuning' sample policy hands over its Q2 "
            "samples; every other sample policy hands over all the samples it keeps."
        },
    )
    reference_model_path: str | None = field(
        default=None,
        metadata={
            "help": "Local folder (or hub id, when online) of the reference model the 'rho1' token policy scores "
            "excess loss against (required there), or the 'tailsft' sample policy's initial model (optional there: by "
            "default the model being trained, before its first step); it must share the trained model's tokenizer. "
            "Loaded frozen, in the training model's dtype, on the training device."
        },
    )
    token_prune_q4: bool = field(
        default=False,
        metadata={"help": "Ablation: the 'qtuning' sample policy token-prunes its kept Q4 samples too."},
    )
    neighbor_lambda: float = field(
        default=0.5,
        metadata={
            "help": "Weight of the neighbouring tokens' perplexity in the token score, in [0, 1]: "
            "s_i = (1 - lambda) * PPL_i + lambda * (PPL_{i-1} + PPL_{i+1}). 0 scores a token by its own PPL."
        },
    )
    neighbor_mode: str = field(
        default="sum",
        metadata={"help": "How neighbours combine: 'sum' (the paper's equation) or 'mean' (its prose)."},
    )
    triage_scope: str = field(
        default="step",
        metadata={
            "help": "Which samples are triaged together: 'step' (all micro-batches of one optimizer step; larger "
            "triage batches give better quantile thresholds) or 'micro_batch' (each micro-batch alone, as the "
            "paper's code did) or 'global' (the step's samples of every rank together: one gather of three floats per "
            "sample (PPL, entropy, answer tokens; four with TailSFT's reference PPL); the same as 'step' with one "
            "process)."
        },
    )
    enforce_sample_budget: bool = field(
        default=True,
        metadata={
            "help": "Trim an over-full Q2+Q4 set to exactly the sample budget. False is paper-faithful: every Q2 "
            "and Q4 sample stays, so the realised budget can exceed `sample_keep_ratio`."
        },
    )
    prune_filled_q2_like: bool = field(
        default=False,
        metadata={
            "help": "Also token-prune samples added by the under-fill rule that lean towards Q2 "
            "(normalised PPL >= normalised entropy). By default they are kept whole."
        },
    )
    reverse_token_score: bool = field(
        default=False,
        metadata={"help": "Ablation: keep the highest-scoring tokens of Q2 samples instead of the lowest."},
    )
    token_budget_scope: str = field(
        default="sample",
        metadata={
            "help": "'sample': each Q2 sample keeps floor(token_keep_ratio * its response tokens); 'batch': one "
            "budget over all Q2 tokens of the triage group (each sample still keeps its best token); 'run': "
            "one budget over the samples handed to the token policy, sized so that the run keeps token_keep_ratio "
            "of every answer token it has seen, dropped samples included (a step whose kept samples are short "
            "carries its shortfall to the next); the bench's matched-token baselines use it."
        },
    )
    entropy_positions: str = field(
        default="response",
        metadata={
            "help": "Positions the sample entropy averages over: 'response' (trainable tokens, the paper's "
            "definition) or 'all' (every attended position)."
        },
    )
    eu_plane: str = field(
        default="paper",
        metadata={
            "help": "Axes of the Error-Uncertainty plane the triage runs on: 'paper' (PPL, mean token entropy) or "
            "'decorrelated' (beyond the paper: entropy is replaced, within each triage group, by its residual after "
            "a least-squares fit on log PPL over the group's valid samples, so Q2/Q4 are not thinned by the "
            "correlation of the two statistics; thresholds, fill and trim are unchanged). Only affects "
            "`sample_policy='qtuning'`; the ledger and metrics still report the raw entropy."
        },
    )
    fill_rule: str = field(
        default="paper",
        metadata={
            "help": "How an under-full Q2+Q4 (common when PPL and entropy correlate) is topped up to the sample "
            "budget: 'paper' (largest |norm PPL - norm entropy| first), 'q1_last' (the same, but Q1 'harmful noise' "
            "samples only after every other candidate), 'least_suspect' (lowest rank(PPL) + rank(entropy) first, the "
            "candidates farthest from Q1). Only affects `sample_policy='qtuning'`; see docs/policies.md."
        },
    )
    triage_max_iter: int = field(
        default=10, metadata={"help": "Bisection steps at most when searching the quantile level q."}
    )
    triage_tol: float = field(
        default=0.01, metadata={"help": "Bisection stops once |kept share - sample_keep_ratio| < triage_tol."}
    )
    scoring_inference_mode: bool = field(
        default=True,
        metadata={
            "help": "Run the scoring forward under `torch.inference_mode()` (no autograd bookkeeping at all) rather "
            "than `torch.no_grad()`. Turn it off only for a model that caches tensors during its forward and reuses "
            "them in training (training then fails with an error that names this field). FSDP and DeepSpeed ZeRO-3 "
            "always score under `torch.no_grad()`: they gather parameters into buffers that training reuses."
        },
    )
    pack_kept_rows: bool = field(
        default=True,
        metadata={
            "help": "Move the rows kept in an optimizer step into as few micro-batches as possible (a few full "
            "forwards instead of many small ones), placed last; the freed micro-batches are skipped. The loss is "
            "unchanged. With several processes every rank runs as many micro-batches as the rank that needs the most."
        },
    )
    qtuning_ledger: str = field(
        default="full",
        metadata={
            "help": "Per-sample decision ledger written under `output_dir/qtuning_ledger/` as Parquet shards: "
            "'none', 'summary' (one row per sample and step), or 'full' (also the pruned token positions)."
        },
    )
    qtuning_ledger_rows_per_shard: int = field(
        default=20_000, metadata={"help": "Ledger rows buffered in memory before a Parquet shard is written."}
    )

    def __post_init__(self) -> None:
        self._validate_qtuning()
        super().__post_init__()

    def _validate_qtuning(self) -> None:
        # By annotation: "int" here, or the class once HfArgumentParser has resolved the field types in place.
        types = {f.name: str(getattr(f.type, "__name__", f.type)) for f in fields(self)}
        for name, (rule, ok) in _RANGES.items():
            value, integer = getattr(self, name), types[name] == "int"
            kinds = (int,) if integer else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or not ok(value):
                given = f"{value!r} (a {type(value).__name__})" if isinstance(value, (str, type(None))) else repr(value)
                raise ValueError(f"`{name}` must be {rule}, got {given}.")
            setattr(self, name, int(value) if integer else float(value))
        for name in (name for name in QTUNING_FIELDS if types[name] == "bool"):  # 'false' is truthy: refuse it
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(
                    f"`{name}` must be True or False, got {value!r} (a {type(value).__name__}): pass a Python bool, "
                    f"e.g. `{name}=False` (on the command line `--{name} false` is parsed for you)."
                )
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {', '.join(map(repr, allowed))}; got {getattr(self, name)!r}.")
        policy = self.build_policy()  # unknown policy names fail here, with the allowed names
        # Settings the chosen policy never reads are accepted but said, so an ablation that does nothing is not run.
        ignored = [f"`{n}={getattr(self, n)!r}`" for n in ("eu_plane", "fill_rule") if getattr(self, n) != "paper"]
        ignored += [f"`{name}=True`" for name in ("token_prune_q4", "prune_filled_q2_like") if getattr(self, name)]
        if ignored and not policy.samples.uses_eu_plane:
            warnings.warn(
                f"{', '.join(ignored)} has no effect with `sample_policy={self.sample_policy!r}`: only the 'qtuning' "
                "sample policy triages on the EU plane.", UserWarning, stacklevel=3,
            )  # fmt: skip
        if self.reverse_token_score and self.token_policy != "qtuning":
            warnings.warn(
                f"`reverse_token_score=True` has no effect with token_policy={self.token_policy!r}: it only changes "
                "the 'qtuning' token policy.", UserWarning, stacklevel=3,
            )  # fmt: skip
        if not policy.tokens.prunes and self.token_keep_ratio < 1.0:
            warnings.warn(
                f"`token_keep_ratio={self.token_keep_ratio}` has no effect with token_policy='none', which keeps "
                "every answer token of the kept samples (set token_keep_ratio=1.0 to say so).", UserWarning,
                stacklevel=3,
            )  # fmt: skip
        if policy.tokens.needs_reference and not self.reference_model_path:
            raise ValueError(
                f"`token_policy={self.token_policy!r}` scores tokens against a reference model: set "
                "`reference_model_path` to its folder (same tokenizer as the trained model)."
            )
        if policy.samples.reweights and float(self.label_smoothing_factor or 0.0) > 0.0:
            raise ValueError(
                f"`sample_policy={self.sample_policy!r}` rescales sample losses through TRL's fused per-token "
                f"log-probs, but `label_smoothing_factor={self.label_smoothing_factor}` makes transformers compute the "
                "loss from full logits, where the weights would be silently ignored: set label_smoothing_factor=0, or "
                "use another sample policy."
            )
        if policy.samples.reweights and getattr(self, "loss_type", "nll") != "nll":
            raise ValueError(
                f"`sample_policy={self.sample_policy!r}` rescales sample losses, which is defined for "
                f"`loss_type='nll'` only (got loss_type={self.loss_type!r}): use loss_type='nll' or another policy."
            )
        if self.reference_model_path and not policy.needs_reference:
            raise ValueError(
                f"`reference_model_path` is only used by `token_policy='rho1'` and `sample_policy='tailsft'` (got "
                f"sample_policy={self.sample_policy!r}, token_policy={self.token_policy!r}): remove it, or choose "
                "one of those policies."
            )
        if self.qtuning_enabled and self.padding_free and self.max_length is not None:
            raise ValueError(
                f"`padding_free=True` needs `max_length=None` with Q-Tuning (got max_length={self.max_length}): TRL "
                "does not truncate padding-free batches, and the packing it would suggest instead is not supported "
                "with Q-Tuning. Set `max_length=None` (truncate the data beforehand if needed), or padding_free=False."
            )
        if self.qtuning_enabled and self.packing:
            raise ValueError(
                "`packing=True` is not supported with Q-Tuning: packed rows mix samples, so samples cannot be "
                "scored and dropped one by one. Use `padding_free=True` for the same padding savings, or set "
                "`qtuning_enabled=False`."
            )

    def check_sample_budget(self, world_size: int = 1) -> None:
        """Refuse a triage group of one sample (nothing can be pruned) and warn when the group is too small to realise
        ``sample_keep_ratio``: a group of B keeps ``max(1, round(r * B))``, so batch 3 at r = 0.1 trains on a third."""
        if not self.qtuning_enabled or self.sample_policy == "all" or self.sample_keep_ratio >= 1.0:
            return
        from .core.triage import target_keep_count

        group = int(self.per_device_train_batch_size)
        group *= 1 if self.triage_scope == "micro_batch" else int(self.gradient_accumulation_steps)
        group *= int(world_size) if self.triage_scope == "global" else 1
        fix = ("raise gradient_accumulation_steps (a step's micro-batches are triaged together)"
               if self.triage_scope == "step" else "use triage_scope='step' (or 'global') or a larger micro-batch")  # fmt: skip
        if group <= 1:
            raise ValueError(
                f"`sample_keep_ratio={self.sample_keep_ratio}` cannot be met: each triage group holds {group} sample "
                f"(per_device_train_batch_size={self.per_device_train_batch_size}, gradient_accumulation_steps="
                f"{self.gradient_accumulation_steps}, triage_scope={self.triage_scope!r}), and one sample is always "
                f"kept, so nothing would be pruned while every sample still pays the scoring pass. Fix: {fix}."
            )
        realised = target_keep_count(group, self.sample_keep_ratio) / group
        if abs(realised - self.sample_keep_ratio) > 0.15 * self.sample_keep_ratio:
            warnings.warn(
                f"`sample_keep_ratio={self.sample_keep_ratio}` is realised as {realised:.3g}: a triage group of "
                f"{group} samples keeps {target_keep_count(group, self.sample_keep_ratio)}. Fix: {fix}.",
                UserWarning, stacklevel=3,
            )  # fmt: skip

    def build_policy(self) -> Policy:
        """The sample and token policies these settings name."""
        return build_policy(self.sample_policy, self.token_policy, self.selection_params())

    def selection_params(self) -> SelectionParams:
        """The settings of ``SelectionParams``' field names, numbers cast (a sweep may set an int on ``args``)."""
        cast: dict[str, Callable[[Any], Any]] = {"neighbor_lambda": float, "triage_max_iter": int, "triage_tol": float}
        knobs = {f.name: cast.get(f.name, lambda v: v)(getattr(self, f.name)) for f in fields(SelectionParams)}
        return SelectionParams(**knobs)


QTUNING_FIELDS: tuple[str, ...] = tuple(
    f.name for f in fields(QTuningConfig) if f.name not in {g.name for g in fields(SFTConfig)}
)
"""The fields ``QTuningConfig`` adds to ``SFTConfig`` (the trainer rebuilds its machinery when one changes)."""

METHOD_FIELDS: tuple[str, ...] = (
    "sample_policy", "token_policy", "sample_keep_ratio", "token_keep_ratio", "neighbor_lambda", "neighbor_mode",
    "triage_scope", "enforce_sample_budget", "token_budget_scope", "entropy_positions", "reverse_token_score",
    "prune_filled_q2_like", "token_prune_q4", "eu_plane", "fill_rule",
)  # fmt: skip
"""The settings that say which method ran, in the order of the MLflow tags (``qtuning.<name>``) and the summary."""

UNTAGGED_FIELDS: dict[str, str] = {
    "qtuning_enabled": "shown by the method tag itself ('sft' when off)",
    "reference_model_path": "a local path; TailSFT's reference shows in sample_policy",
    "triage_max_iter": "a solver limit of the threshold search",
    "triage_tol": "a solver tolerance of the threshold search",
    "scoring_inference_mode": "how the scoring pass runs, not what it decides",
    "pack_kept_rows": "how kept rows are laid out, not which are kept",
    "qtuning_ledger": "an output setting (the summary's config lists it)",
    "qtuning_ledger_rows_per_shard": "an output setting",
}
"""Q-Tuning settings left out of the MLflow tags (MLflow still records every field as a parameter)."""

LABEL_FLAGS: tuple[tuple[str, Any, str], ...] = (
    ("token_prune_q4", True, "q4-tokens"),
    ("reverse_token_score", True, "reversed-score"),
    ("prune_filled_q2_like", True, "filled-q2"),
    ("eu_plane", "decorrelated", "decorrelated"),
    ("fill_rule", "q1_last", "fill-q1-last"),
    ("fill_rule", "least_suspect", "fill-least-suspect"),
    ("neighbor_mode", "mean", "neighbor-mean"),
    ("token_budget_scope", "batch", "batch-budget"),
    ("token_budget_scope", "run", "run-budget"),
    ("entropy_positions", "all", "entropy-all"),
)
"""``(field, non-default value, label suffix)``: the variants :func:`run_label` names."""


def run_label(args: Any) -> str:
    """``qtuning`` or ``<sample>-<token>``, plus ``+flag`` for each ablation or non-default variant that is on (e.g.
    ``qtuning+decorrelated``), so runs that differ in method never share a label."""
    label = method_name(getattr(args, "sample_policy", "qtuning"), getattr(args, "token_policy", "qtuning"))
    flags = [suffix for name, value, suffix in LABEL_FLAGS if getattr(args, name, None) == value]
    return "+".join([label, *flags])


def require_qtuning_config(config: Any) -> QTuningConfig:
    if config is None:
        raise ValueError("QTuningSFTTrainer needs `args=QTuningConfig(...)` (the Q-Tuning budgets live there).")
    if not isinstance(config, QTuningConfig):
        raise TypeError(
            f"`args` must be a trl_qtuning.QTuningConfig, got {type(config).__name__}. Replace "
            f"{type(config).__name__}(...) with QTuningConfig(...): it takes SFTConfig's arguments (which include "
            "TrainingArguments') plus the Q-Tuning ones."
        )
    return config
