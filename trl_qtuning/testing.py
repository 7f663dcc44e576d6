"""Tiny, fully offline models and tokenizers for tests and the CPU recipe, built in code in milliseconds (a word-level
tokenizer and a 2-layer Llama), so nothing touches the model hub. ``make_arithmetic_dataset`` (the data they learn)
lives in :mod:`trl_qtuning.demo.assets`, which the bench reads too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .demo.assets import make_arithmetic_dataset

if TYPE_CHECKING:  # transformers loads when a builder runs
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = ["TINY_CHAT_TEMPLATE", "make_tiny_tokenizer", "make_tiny_model", "make_arithmetic_dataset", "save_tiny_model"]

_WORDS = (
    "what is plus minus times the answer sum of and then add to result equals so we get first second number "
    "question solve compute total is: a b c x y z , . ? !"
).split()
_SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>"]

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|> {% generation %}{{ message['content'] }} <eos>{% endgeneration %} "
    "{% else %}<|{{ message['role'] }}|> {{ message['content'] }} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over digits and a few words, with a chat template that marks assistant turns."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(_SPECIAL + [str(d) for d in range(100)] + _WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def make_tiny_model(
    tokenizer: PreTrainedTokenizerFast | None = None, *, seed: int = 0, hidden_size: int = 32, num_layers: int = 2,
    dropout: float = 0.0,
) -> LlamaForCausalLM:
    """A randomly initialised 2-layer Llama sized to the tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or make_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        attention_dropout=dropout, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_tiny_model(directory: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny model and its tokenizer to ``directory`` (for CLI recipes that take a model path)."""
    directory = Path(directory)
    tokenizer = make_tiny_tokenizer()
    make_tiny_model(tokenizer, seed=seed).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
