"""Helpers for trainer tests: build tiny trainers, capture gradients, and recompute a step by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from trl_qtuning import QTuningConfig, QTuningSFTTrainer, read_ledger
from trl_qtuning.testing import make_arithmetic_dataset, make_tiny_model, make_tiny_tokenizer

KEPT_DECISIONS = ("kept", "filled", "token_pruned")


class GradCapture(TrainerCallback):
    """Copies the gradients of every trainable parameter just before each optimizer step."""

    def __init__(self):
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append(
            {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        )


def tiny_config(output_dir: Path, **overrides: Any) -> QTuningConfig:
    settings: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=1,
        learning_rate=1e-3,
        max_grad_norm=0.0,
        bf16=False,
        use_cpu=True,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        gradient_checkpointing=False,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return QTuningConfig(**settings)


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def build_trainer(output_dir: Path, *, dataset=None, lora: bool = False, model_seed: int = 0, callbacks=None, **overrides):
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer, seed=model_seed)
    dataset = dataset if dataset is not None else make_arithmetic_dataset(48, seed=1)
    return QTuningSFTTrainer(
        model=model,
        args=tiny_config(output_dir, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config() if lora else None,
        callbacks=callbacks,
    )


def reference_model(trainer: QTuningSFTTrainer, initial_state: dict[str, torch.Tensor], lora: bool):
    """A fresh, unpatched copy of the trainer's model at its initial weights (plain forward with full logits)."""
    model = make_tiny_model(make_tiny_tokenizer(), seed=0)
    if lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config())
    model.load_state_dict(initial_state)
    model.train()
    return model


def reference_step_loss(
    trainer: QTuningSFTTrainer, model, step: int, weights: dict[int, float] | None = None
) -> tuple[torch.Tensor, int, Any]:
    """sum(NLL over kept tokens) / kept-token count for one optimizer step, rebuilt from the ledger and the dataset.

    ``weights`` (sample id -> loss factor) multiplies each sample's NLL sum, as reweighting policies do.

    Uses only the ledger's decisions (sample ids, pruned positions) and the tokenized training rows, with the model's
    ordinary full-logits forward, one sample at a time: independent of how the trainer drops rows and masks labels.
    """
    ledger = read_ledger(Path(trainer.args.output_dir) / "qtuning_ledger").to_pandas()
    rows = ledger[ledger.step == step]
    dataset = trainer.train_dataset
    index_of = {int(sid): i for i, sid in enumerate(dataset["qtuning_sample_id"])}
    nll_sum = torch.zeros(())
    count = 0
    for row in rows.itertuples():
        if row.decision not in KEPT_DECISIONS:
            continue
        example = dataset[index_of[int(row.sample_id)]]
        input_ids = torch.tensor(example["input_ids"])
        labels = torch.tensor(example["labels"])
        pruned = [int(p) for p in row.pruned_positions]
        assert all(labels[p] != -100 for p in pruned), "a pruned position was not a response token"
        labels[pruned] = -100
        logits = model(input_ids=input_ids[None]).logits[0, :-1].float()
        targets = labels[1:]
        mask = targets != -100
        assert int(mask.sum()) == row.kept_tokens
        logp = torch.log_softmax(logits, dim=-1)[mask].gather(-1, targets[mask][:, None]).squeeze(-1)
        factor = 1.0 if weights is None else weights[int(row.sample_id)]
        nll_sum = nll_sum + factor * (-logp).sum()
        count += int(mask.sum())
    return nll_sum / max(count, 1), count, rows
