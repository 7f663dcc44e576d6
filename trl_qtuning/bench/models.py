"""Model loading for the bench's cells: the embedded demo model or a local folder, and the matrix's LoRA."""

from __future__ import annotations

from .matrix import Matrix

__all__ = ["load_model_and_tokenizer", "peft_config"]


def load_model_and_tokenizer(matrix: Matrix):
    import torch

    if matrix.model == "demo":
        from ..demo.assets import load_demo_model_and_tokenizer

        return load_demo_model_and_tokenizer()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(matrix.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(matrix.model, dtype=torch.float32)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def peft_config(matrix: Matrix):
    if matrix.lora is None:
        return None
    from peft import LoraConfig

    lora = matrix.lora
    return LoraConfig(
        r=int(lora["r"]), lora_alpha=lora["alpha"], lora_dropout=float(lora["dropout"]),
        target_modules=lora["target_modules"], task_type="CAUSAL_LM",
    )  # fmt: skip

