"""Tiny, fully offline models, tokenizers and datasets for tests, the CPU recipe and benchmarks.

Built in code in milliseconds (a word-level tokenizer and a 2-layer Llama), so nothing touches the model hub.
"""

from __future__ import annotations

import random
from pathlib import Path

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


def make_tiny_tokenizer():
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


def make_tiny_model(tokenizer=None, *, seed: int = 0, hidden_size: int = 32, num_layers: int = 2, dropout: float = 0.0):
    """A randomly initialised 2-layer Llama sized to the tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or make_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attention_dropout=dropout,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_tiny_model(directory: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny model and its tokenizer to ``directory`` (for CLI recipes that take a model path)."""
    directory = Path(directory)
    tokenizer = make_tiny_tokenizer()
    make_tiny_model(tokenizer, seed=seed).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_arithmetic_dataset(n: int, *, seed: int = 0, conversational: bool = False, noisy_share: float = 0.2):
    """Prompt-completion arithmetic with varied lengths and some wrong answers (noise), as a ``datasets.Dataset``.

    The mix gives the EU plane something to separate: easy and hard sums, short and long worked answers, and a share
    of deliberately wrong labels.
    """
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        answer = a + b
        if rng.random() < noisy_share:
            answer = rng.randint(0, 99)
        prompt = f"what is {a} plus {b} ?"
        if rng.random() < 0.5:
            completion = f"the answer is {answer} ."
        else:
            completion = f"first number {a} then add {b} so we get {answer} . the answer is {answer} ."
        if conversational:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "completion": [{"role": "assistant", "content": completion}],
                }
            )
        else:
            rows.append({"prompt": prompt, "completion": " " + completion})
    return Dataset.from_list(rows)
