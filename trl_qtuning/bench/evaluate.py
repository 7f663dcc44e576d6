"""Evaluation glue: every enabled evaluation of a model, and the learning curve recorded while a cell trains.

The curve is the held-out answer NLL of :func:`trl_qtuning.bench.evaluation.answer_nll` (a token-weighted mean over all
answer tokens), measured by a callback at the steps it is due. The Trainer's own ``eval_loss`` is not used for it:
transformers' evaluation loop averages per-batch means weighted by rows, not by answer tokens, so its number moves with
the eval batch size when rows differ in length, and TRL also scores the EOS token it appends (both tested in
tests/test_evaluation.py). One function for the curve and the table keeps every reading comparable.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .matrix import Matrix

__all__ = ["CurveRecorder", "curve_metrics", "evaluate"]


def _autocast(model, bf16: bool):
    import torch

    device = next(model.parameters()).device
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def curve_metrics(model, tokenizer, matrix: Matrix, data: dict[str, Any], *, bf16: bool) -> dict[str, float]:
    """The learning curve's metrics: held-out NLL (and the transfer set's NLL when configured). Eval mode and no
    gradients come from every evaluation function itself (``evaluation._eval_mode``)."""
    from . import evaluation

    ev = matrix.eval
    metrics: dict[str, float] = {}
    with _autocast(model, bf16):
        if ev.nll:
            out = evaluation.answer_nll(model, tokenizer, data["heldout"], batch_size=ev.nll.batch_size,
                                        max_length=ev.nll.max_length)  # fmt: skip
            metrics["eval/nll"] = float(out["nll"])
            metrics["eval/nll_tokens"] = float(out["tokens"])
            metrics["eval/nll_samples"] = float(out["samples"])
        if ev.transfer and "transfer" in data:
            out = evaluation.answer_nll(model, tokenizer, data["transfer"], batch_size=ev.transfer["batch_size"],
                                        max_length=ev.transfer["max_length"])  # fmt: skip
            metrics["eval/nll_transfer"] = float(out["nll"])
            metrics["eval/nll_transfer_tokens"] = float(out["tokens"])
    return metrics


def evaluate(model, tokenizer, matrix: Matrix, data: dict[str, Any], *, bf16: bool, cell_dir: Path) -> dict[str, float]:
    """Every enabled evaluation, as ``eval/...`` metrics (GSM8K predictions saved to ``cell_dir``)."""
    if not matrix.eval.enabled:
        return {}
    from . import evaluation

    ev = matrix.eval
    metrics = curve_metrics(model, tokenizer, matrix, data, bf16=bf16)
    with _autocast(model, bf16):
        if ev.contrast:
            from .contrast import answer_contrasts

            c = ev.contrast
            metrics.update(answer_contrasts(model, tokenizer, data["heldout"], kinds=c.kinds, seed=ev.seed,
                                            batch_size=c.batch_size, max_length=c.max_length))  # fmt: skip
        if ev.gsm8k:
            out = evaluation.gsm8k_exact_match(model, tokenizer, data["gsm8k"], max_new_tokens=ev.gsm8k.max_new_tokens,
                                               batch_size=ev.gsm8k.batch_size)  # fmt: skip
            metrics["eval/gsm8k_em"] = float(out["exact_match"])
            metrics["eval/gsm8k_n"] = float(out["n"])
            with contextlib.suppress(OSError), (cell_dir / "gsm8k_predictions.jsonl").open("w", encoding="utf-8") as fh:
                for row, prediction in zip(data["gsm8k"], out.get("predictions") or []):
                    fh.write(json.dumps({"uid": row.get("uid"), "answer": row.get("answer"),
                                         "prediction": prediction}, default=str) + "\n")  # fmt: skip
        for name in ("arc_easy", "arc_challenge"):
            if a := getattr(ev, name):
                out = evaluation.multiple_choice_accuracy(model, tokenizer, data[name], batch_size=a.batch_size,
                                                          max_length=a.max_length)  # fmt: skip
                metrics[f"eval/{name}_acc"] = float(out["accuracy"])
                metrics[f"eval/{name}_acc_norm"] = float(out["accuracy_norm"])
                metrics[f"eval/{name}_n"] = float(out["n"])
    return metrics


@dataclass
class CurveRecorder(TrainerCallback):
    """Evaluates the learning curve at the steps it is due and keeps every point (step, compute, metrics).

    Due: every ``every_steps`` steps, at the equal-steps point, at the first step whose compute reaches the
    equal-compute target, and at the last step. Each point also goes to the cell's MLflow run (``log``), so MLflow
    draws the curve over steps. Runs after the :class:`~trl_qtuning.bench.compute.ComputeMeter` of the same trainer.
    """

    measure: Callable[[Any], dict[str, float]]
    """model -> metrics (``curve_metrics`` bound to the cell's data)."""
    meter: Any
    every_steps: int | None
    equal_steps: int | None
    log: Callable[[dict[str, float], int], None] | None = None
    points: list[dict[str, Any]] = field(default_factory=list)

    def _point(self, step: int, model) -> None:
        if self.points and self.points[-1]["step"] == step:
            return
        metrics = self.measure(model)
        compute = self.meter.cumulative
        self.points.append({"step": step, "compute": compute, **metrics})
        if self.log is not None:
            self.log({**metrics, "compute/forward_token_equivalents": float(compute)}, step)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and state.global_step == 0 and not self.points:
            self._point(0, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        crossed = self.meter.first_step_reaching_target == step
        due = (
            (self.every_steps is not None and step % self.every_steps == 0)
            or step == self.equal_steps
            or crossed
            or control.should_training_stop
            or step >= state.max_steps
        )
        if due and model is not None:
            self._point(step, model)
        return control
