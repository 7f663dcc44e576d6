"""Offline evaluation of (Q-)tuned causal LMs: held-out answer NLL, GSM8K exact match, ARC-style multiple choice.

Small-data evaluation, not a training hot path: plain batched forward passes (or greedy ``generate``) under
:func:`torch.no_grad` with the model temporarily in eval mode, on ``model.device``. Only the logits of the scored
positions go through ``log_softmax`` (and, when the model accepts it, ``logits_to_keep`` stops the LM head from
computing the rest), so memory stays bounded by the scored tokens.

The functions take a model (plain ``transformers`` or PEFT-wrapped), its tokenizer and a ``datasets.Dataset`` (or any
sequence of row dicts) in the formats of :mod:`trl_qtuning.demo.assets`; conversational rows go through TRL's own
``maybe_apply_chat_template``, as TRL formats them for training.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterator, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import torch

__all__ = [
    "answer_logprob_sums", "answer_nll", "answer_sequences", "extract_final_number", "gsm8k_exact_match",
    "multiple_choice_accuracy", "token_logprob_sums",
]  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------------------


def _rows(dataset: Any) -> list[dict[str, Any]]:
    """Materialise rows once: a ``datasets.Dataset`` re-decodes its Arrow columns on every access otherwise."""
    rows = list(dataset)
    if not rows:
        raise ValueError("Cannot evaluate on an empty dataset.")
    return rows


def _model_device(model: Any) -> torch.device:
    """``model.device`` (PEFT wrappers forward it), else the first parameter's device, else the CPU."""
    if getattr(model, "device", None) is not None:
        return torch.device(model.device)
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """Eval mode (no dropout) and no gradients for the duration, then every submodule's own ``training`` flag back:
    ``model.train(was_training)`` would also unfreeze submodules the caller deliberately keeps in eval mode."""
    states = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():  # not inference_mode: lazily built caches must stay usable for later training
            yield
    finally:
        for module, training in states:
            module.training = training


def _pad_id(tokenizer: Any) -> int:
    """Pad id for batching; padded positions are masked, so any valid id works when a tokenizer has no pad token."""
    return int(next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0))


def _encode(tokenizer: Any, text: str, *, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _chat_texts(tokenizer: Any, row: dict[str, Any], keys: tuple[str, ...]) -> tuple[dict[str, str], bool]:
    """The row's ``keys`` as text (TRL's chat template for conversational rows) and whether the tokenizer should add
    special tokens: not after a chat template, which already carries any BOS."""
    from trl import is_conversational, maybe_apply_chat_template

    example = {key: row[key] for key in keys}
    return maybe_apply_chat_template(example, tokenizer), not is_conversational(example)


def _accepts_logits_to_keep(model: Any) -> bool:
    """Whether the underlying HF model takes ``logits_to_keep`` (PEFT forwards unknown kwargs to its base model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (AttributeError, TypeError, ValueError):
        return False


def _batches(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}.")
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _scored_logprob_sums(
    model: Any, sequences: Sequence[Sequence[int]], starts: Sequence[int], *, batch_size: int, pad_id: int
) -> tuple[list[float], list[int]]:
    """Sum of ``log p(ids[t] | ids[:t])`` over ``t in [starts[i], len(ids))`` for every sequence, and the counts.

    Sequences are right-padded (causal attention makes pads invisible to real tokens) and batched longest first, so
    each batch holds similar lengths and an out-of-memory shows up on the first batch. Only the scored positions'
    logits are sliced out (in float32) before ``log_softmax``.
    """
    lengths = [len(seq) for seq in sequences]
    # Position 0 has no prefix to predict it from: it can never be scored.
    starts = [min(max(int(s), 1), length) for s, length in zip(starts, lengths)]
    sums = [0.0] * len(sequences)
    counts = [length - start for start, length in zip(starts, lengths)]
    device = _model_device(model)
    keep_logits = _accepts_logits_to_keep(model)
    order = sorted((i for i in range(len(sequences)) if counts[i] > 0), key=lambda i: -lengths[i])
    for chunk in _batches(order, batch_size):
        width = max(lengths[i] for i in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            input_ids[row, : lengths[i]] = torch.as_tensor(sequences[i], dtype=torch.long)
            attention_mask[row, : lengths[i]] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        chunk_starts = torch.tensor([starts[i] for i in chunk], device=device)
        positions = torch.arange(width, device=device)
        scored = (positions >= chunk_starts[:, None]) & attention_mask.bool()
        rows, targets = scored.nonzero(as_tuple=True)

        # Logits at t-1 predict the token at t; the earliest one needed is min(start) - 1.
        offset = int(chunk_starts.min()) - 1 if keep_logits else 0
        kwargs = {"logits_to_keep": width - offset} if offset > 0 else {}
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits
        offset = width - logits.shape[1]  # 0 where the model ignored logits_to_keep
        picked = logits[rows, targets - 1 - offset].float()
        token_logprobs = torch.log_softmax(picked, dim=-1).gather(-1, input_ids[rows, targets].unsqueeze(-1))
        chunk_sums = torch.zeros(len(chunk), dtype=torch.float64, device=device)
        chunk_sums.index_add_(0, rows, token_logprobs.squeeze(-1).double())
        for row, i in enumerate(chunk):
            sums[i] = float(chunk_sums[row])
    return sums, counts


# ----------------------------------------------------------------------------------------------------------------------
# Held-out answer NLL
# ----------------------------------------------------------------------------------------------------------------------


def answer_sequences(
    tokenizer: Any, rows: Sequence[dict[str, Any]], *, max_length: int = 1024
) -> tuple[list[list[int]], list[int]]:
    """Per row: the prompt and completion's token ids as the held-out NLL scores them (TRL's chat template for
    conversational rows; truncated to ``max_length`` from the right) and the index of the first answer token."""
    sequences, starts = [], []
    for row in rows:
        texts, special = _chat_texts(tokenizer, row, ("prompt", "completion"))
        full = _encode(tokenizer, texts["prompt"] + texts["completion"], add_special_tokens=special)
        sequences.append(full[:max_length])
        starts.append(len(_encode(tokenizer, texts["prompt"], add_special_tokens=special)))
    return sequences, starts


def token_logprob_sums(
    model: Any, tokenizer: Any, sequences: Sequence[Sequence[int]], starts: Sequence[int], *, batch_size: int = 8
) -> tuple[list[float], list[int]]:
    """Per token sequence: the summed log-probability of its tokens from ``starts[i]`` on, and how many were scored."""
    with _eval_mode(model):
        return _scored_logprob_sums(model, sequences, starts, batch_size=batch_size, pad_id=_pad_id(tokenizer))


def answer_logprob_sums(
    model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], *, batch_size: int = 8, max_length: int = 1024
) -> tuple[list[float], list[int]]:
    """Per row: the summed log-probability of the completion's tokens given the prompt, and how many were scored
    (tokenized as :func:`answer_nll` does; truncated to ``max_length`` from the right)."""
    sequences, starts = answer_sequences(tokenizer, rows, max_length=max_length)
    return token_logprob_sums(model, tokenizer, sequences, starts, batch_size=batch_size)


def answer_nll(
    model: Any, tokenizer: Any, dataset: Any, *, batch_size: int = 8, max_length: int = 1024
) -> dict[str, float]:
    """Mean negative log-likelihood per answer token over held-out prompt-completion rows.

    The held-out counterpart of the SFT loss: rows are TRL prompt-completion rows, conversational or plain strings.
    Like TRL's ``completion_only_loss``, the answer tokens are the full text's tokens after the prompt's; sequences
    are truncated to ``max_length`` from the right (an answer cut away entirely contributes nothing).

    Returns:
        ``{"nll": token-weighted mean NLL over all answer tokens (nan if none survive truncation), "tokens": number
        of answer tokens, "samples": number of rows}``.
    """
    rows = _rows(dataset)
    sums, counts = answer_logprob_sums(model, tokenizer, rows, batch_size=batch_size, max_length=max_length)
    tokens = sum(counts)
    return {"nll": float(-sum(sums) / tokens if tokens else float("nan")), "tokens": tokens, "samples": len(rows)}


# ----------------------------------------------------------------------------------------------------------------------
# GSM8K exact match
# ----------------------------------------------------------------------------------------------------------------------

# A number: optional minus (not glued to a preceding word/digit, so "5-3" yields 3), optional "$", then either
# comma-grouped thousands ("1,234") or plain digits, then an optional decimal part. A trailing "." is not a decimal.
_NUMBER = re.compile(r"(?:(?<![\w.])[-\u2212])?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def _clean_number(text: str) -> str:
    return text.replace(",", "").replace("$", "").replace("\u2212", "-").strip().rstrip(".")


def extract_final_number(text: str) -> str | None:
    """The final answer of a GSM8K-style solution: the first number after the last ``####``, else the last number.

    If a ``####`` is followed by no number, the last number in the whole text is used. Commas, ``$`` and a trailing
    ``.`` are stripped (``"#### 1,234"`` -> ``"1234"``, ``"so $18."`` -> ``"18"``); ``None`` when there is no number.
    """
    _, sep, tail = text.rpartition("####")
    match = _NUMBER.search(tail) if sep else None
    if match:
        return _clean_number(match.group())
    matches = _NUMBER.findall(text)
    return _clean_number(matches[-1]) if matches else None


def _answers_match(prediction: str | None, gold: Any) -> bool:
    """Numeric comparison when both parse (``"18" == "18.0"``), else whitespace-stripped string equality."""
    if prediction is None or gold is None:
        return False
    gold_text = _clean_number(str(gold))
    try:
        return Decimal(prediction) == Decimal(gold_text)
    except InvalidOperation:
        return prediction.strip() == gold_text


def gsm8k_exact_match(
    model: Any, tokenizer: Any, dataset: Any, *, max_new_tokens: int = 256, batch_size: int = 16
) -> dict[str, Any]:
    """Greedy-decoding exact match on GSM8K-style rows (``prompt`` conversational or string, ``answer`` gold number).

    Prompts are left-padded by hand (the tokenizer's ``padding_side`` is never touched, and one without a pad token
    pads with EOS) and batched by length to waste little compute on padding; the prediction is
    :func:`extract_final_number` of the generated continuation only.

    Returns:
        ``{"exact_match": share correct in [0, 1], "n": rows, "predictions": extracted numbers in row order}``.
    """
    rows = _rows(dataset)
    encoded = []
    for row in rows:
        texts, special = _chat_texts(tokenizer, row, ("prompt",))
        encoded.append(_encode(tokenizer, texts["prompt"], add_special_tokens=special))
    pad_id = _pad_id(tokenizer)
    device = _model_device(model)
    has_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) is not None
    extra = {} if has_eos or tokenizer.eos_token_id is None else {"eos_token_id": tokenizer.eos_token_id}

    completions: list[str] = [""] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: -len(encoded[i]))
    with _eval_mode(model):
        for chunk in _batches(order, batch_size):
            # Left padding: every row's prompt ends at the same column and generation appends after it.
            width = max(len(encoded[i]) for i in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                input_ids[row, width - len(encoded[i]) :] = torch.as_tensor(encoded[i], dtype=torch.long)
                attention_mask[row, width - len(encoded[i]) :] = 1
            output = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=pad_id, **extra,
            )  # fmt: skip
            sequences = output.sequences if hasattr(output, "sequences") else output
            for i, text in zip(chunk, tokenizer.batch_decode(sequences[:, width:].cpu(), skip_special_tokens=True)):
                completions[i] = text

    predictions = [extract_final_number(text) for text in completions]
    correct = sum(_answers_match(pred, row["answer"]) for pred, row in zip(predictions, rows))
    return {"exact_match": correct / len(rows), "n": len(rows), "predictions": predictions}


# ----------------------------------------------------------------------------------------------------------------------
# ARC-style multiple choice
# ----------------------------------------------------------------------------------------------------------------------


def _encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids, as lm-evaluation-harness splits them.

    Trailing context whitespace moves to the continuation; the continuation ids are those of ``context +
    continuation`` after the context's ids. If the context's ids are not a prefix of the whole (a token merged across
    the boundary), the two halves are tokenised separately and concatenated instead, so the context is always scored
    on exactly its own tokens.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids = _encode(tokenizer, context, add_special_tokens=False)
    whole_ids = _encode(tokenizer, context + continuation, add_special_tokens=False)
    if whole_ids[: len(context_ids)] == context_ids and len(whole_ids) > len(context_ids):
        return context_ids, whole_ids[len(context_ids) :]
    return context_ids, _encode(tokenizer, continuation, add_special_tokens=False)


def _continuation_logprobs(
    model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], *, batch_size: int, max_length: int
) -> list[float]:
    """Sum of continuation-token log-probs for each ``(context, continuation)``; over-long inputs lose their left."""
    sequences, starts = [], []
    for context, continuation in pairs:
        context_ids, continuation_ids = _encode_pair(tokenizer, context, continuation)
        ids = context_ids + continuation_ids
        cut = max(0, len(ids) - max_length)
        sequences.append(ids[cut:])
        starts.append(len(context_ids) - cut)
    return _scored_logprob_sums(model, sequences, starts, batch_size=batch_size, pad_id=_pad_id(tokenizer))[0]


def multiple_choice_accuracy(
    model: Any, tokenizer: Any, dataset: Any, *, batch_size: int = 16, max_length: int = 512
) -> dict[str, float]:
    """ARC-style multiple choice by log-likelihood, as lm-evaluation-harness's ARC task scores it.

    Context ``"Question: {question}\\nAnswer:"``, continuation ``" {choice}"``. ``accuracy`` picks the choice with the
    highest summed continuation log-prob; ``accuracy_norm`` divides that sum by the choice's character length
    (lm-eval's ``acc_norm``, which uses ``len(choice)`` without the leading space). Ties go to the first choice. All
    (question, choice) pairs of the dataset are batched together.

    Returns:
        ``{"accuracy": float, "accuracy_norm": float, "n": questions}``.
    """
    rows = _rows(dataset)
    pairs = [(f"Question: {row['question']}\nAnswer:", f" {choice}") for row in rows for choice in row["choices"]]
    with _eval_mode(model):
        scores = iter(_continuation_logprobs(model, tokenizer, pairs, batch_size=batch_size, max_length=max_length))
    correct = correct_norm = 0
    for row in rows:
        choices = list(row["choices"])
        row_scores = [next(scores) for _ in choices]
        normalised = [score / max(len(choice), 1) for score, choice in zip(row_scores, choices)]
        label = int(row["label_index"])
        correct += max(range(len(choices)), key=row_scores.__getitem__) == label
        correct_norm += max(range(len(choices)), key=normalised.__getitem__) == label
    return {"accuracy": correct / len(rows), "accuracy_norm": correct_norm / len(rows), "n": len(rows)}
