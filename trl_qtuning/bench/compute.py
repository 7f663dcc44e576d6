"""Compute accounting in forward-token equivalents: counted, not timed, so it reads the same on any machine and load.

The model (one unit = one token through one forward pass of the model):

* scoring pass: 1 per scored token (a gradient-free forward; a reference model's forward costs 1 more);
* training, full fine-tuning: 3 per trained token (forward 1, backward 2: activation and weight gradients);
* training, LoRA / QLoRA: 2 per trained token (forward 1, backward 1: activation gradients flow through the frozen
  weights, whose weight gradients are never formed).

Tokens are the non-padding tokens of the micro-batches that run (transformers' ``num_input_tokens_seen`` with
``include_num_input_tokens_seen="non_padding"`` for training; the trainer's ``qtuning_scored_tokens`` for scoring).
With ``padding_free=True`` transformers counts ``input_ids != pad_token_id``, so a tokenizer whose pad token is its
EOS leaves each sample's EOS out of the trained count (one token a sample) while scoring counts it.
Dropped samples cost nothing to train, but a policy that reads statistics pays the scoring pass for every sample;
a policy that reads none (random samples with random or no token pruning) pays no scoring pass, as the trainer
skips it. Attention's quadratic term, the LM head's share and optimizer work are not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainerCallback

__all__ = ["SCORING_COST", "TRAIN_COST_FULL", "TRAIN_COST_LORA", "ComputeMeter", "StepCost", "train_cost_per_token"]

SCORING_COST = 1
TRAIN_COST_FULL = 3
TRAIN_COST_LORA = 2


def train_cost_per_token(model: Any) -> int:
    """2 when only adapters train (peft: every base weight frozen), 3 for full fine-tuning."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return TRAIN_COST_LORA
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return TRAIN_COST_LORA if trainable * 10 < sum(p.numel() for p in params) else TRAIN_COST_FULL


@dataclass
class StepCost:
    step: int
    trained_tokens: int
    scored_tokens: int
    compute: int
    """This step's forward-token equivalents."""
    cumulative: int


@dataclass
class ComputeMeter(TrainerCallback):
    """Counts every optimizer step's cost and logs ``compute/*`` with the step's other metrics.

    Attach it to a ``QTuningSFTTrainer`` or ``SFTTrainer`` built with ``include_num_input_tokens_seen="non_padding"``;
    ``target`` stops training at the first step whose cumulative compute reaches it (equal-compute comparisons).
    """

    trainer: Any
    target: int | None = None
    min_steps: int = 0
    """Never stop before this step (the equal-steps point must be reached too)."""
    history: list[StepCost] = field(default_factory=list)
    cumulative: int = 0
    _seen_trained: int = 0
    _seen_scored: int = 0

    def __post_init__(self) -> None:
        if self.trainer.args.include_num_input_tokens_seen in ("no", False, None):
            raise ValueError(
                "ComputeMeter counts trained tokens with transformers' token counter: build the trainer's config "
                "with include_num_input_tokens_seen='non_padding'."
            )
        self.per_token = train_cost_per_token(self.trainer.model)

    @property
    def reached_target(self) -> bool:
        return self.target is not None and self.cumulative >= self.target

    @property
    def first_step_reaching_target(self) -> int | None:
        """The first step whose cumulative compute reached ``target`` (the equal-compute point), if any."""
        if self.target is None:
            return None
        return next((c.step for c in self.history if c.cumulative >= self.target), None)

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run restores num_input_tokens_seen: count from there. The cumulative compute starts again at 0:
        # it covers this session of training (the bench never resumes a cell halfway).
        self._seen_trained = int(state.num_input_tokens_seen)
        self._seen_scored = self._scored_so_far()

    def _scored_so_far(self) -> int:
        scored = int(getattr(self.trainer, "qtuning_scored_tokens", 0))
        if self.trainer.args.world_size > 1:
            import torch

            count = torch.tensor([scored], device=self.trainer.args.device)
            scored = int(self.trainer.accelerator.gather(count).sum())
        return scored

    def on_step_end(self, args, state, control, **kwargs):
        trained = int(state.num_input_tokens_seen) - self._seen_trained
        scored = self._scored_so_far() - self._seen_scored
        self._seen_trained += trained
        self._seen_scored += scored
        cost = self.per_token * trained + SCORING_COST * scored
        self.cumulative += cost
        self.history.append(StepCost(state.global_step, trained, scored, cost, self.cumulative))
        if self.reached_target and state.global_step >= self.min_steps:
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not self.history or "loss" not in logs:
            return
        last = self.history[-1]
        counts = {
            "compute/forward_token_equivalents": float(last.cumulative),
            "compute/step_forward_token_equivalents": float(last.compute),  # the logged step's own cost
            "compute/trained_tokens": float(state.num_input_tokens_seen),
            "compute/scored_tokens": float(self._seen_scored),
        }
        logs.update(counts)  # reporters (MLflow) read these logs after this callback
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(counts)  # the Trainer stored its copy before calling back
