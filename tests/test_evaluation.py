"""Offline evaluation functions, checked against straightforward per-row reference computations on tiny models."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from tests.tiny import make_tiny_model, make_tiny_tokenizer
from trl_qtuning.bench.evaluation import (
    _continuation_logprobs,
    answer_nll,
    extract_final_number,
    gsm8k_exact_match,
    multiple_choice_accuracy,
)


def _chat(prompt: str, completion: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "completion": [{"role": "assistant", "content": completion}],
    }


CHAT_ROWS = [
    _chat("what is 3 plus 4 ?", "the answer is 7 ."),
    _chat(
        "what is 10 plus 20 plus 5 ?",
        "first number 10 then add 20 so we get 30 . then add 5 so we get 35 .",
    ),
    _chat("solve 2 times 3", "6"),
]


def _training_flags(model: torch.nn.Module) -> list[bool]:
    return [module.training for module in model.modules()]


class _PlainForward(torch.nn.Module):
    """Wraps a model behind a forward without ``logits_to_keep`` (exercises the full-logits path)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(
            logits=self.inner(input_ids=input_ids, attention_mask=attention_mask).logits
        )


def _reference_answer_nll(
    model, tokenizer, rows, max_length=10**9
) -> tuple[float, int]:
    """One row at a time, no padding: sum of -log p over the tokens after the prompt's."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt_text = tokenizer.apply_chat_template(
                row["prompt"], tokenize=False, add_generation_prompt=True
            )
            full_text = tokenizer.apply_chat_template(
                row["prompt"] + row["completion"], tokenize=False
            )
            prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
            full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"][
                :max_length
            ]
            assert full_ids[: len(prompt_ids)] == prompt_ids[: len(full_ids)]
            logprobs = torch.log_softmax(
                model(input_ids=torch.tensor([full_ids])).logits[0].double(), dim=-1
            )
            for t in range(len(prompt_ids), len(full_ids)):
                total -= logprobs[t - 1, full_ids[t]].item()
                count += 1
    return total / count, count


# ----------------------------------------------------------------------------------------------------------------------
# answer_nll
# ----------------------------------------------------------------------------------------------------------------------


def test_answer_nll_matches_hand_computation_and_restores_training_mode():
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(
        tokenizer, dropout=0.5
    )  # dropout would randomise the result if eval mode were skipped
    model.eval()
    expected, count = _reference_answer_nll(model, tokenizer, CHAT_ROWS[:2])
    model.train()
    model.model.layers[0].eval()  # a deliberately mixed state must come back exactly
    flags = _training_flags(model)

    result = answer_nll(
        model, tokenizer, Dataset.from_list(CHAT_ROWS[:2]), batch_size=2
    )

    assert result["nll"] == pytest.approx(expected, rel=1e-5)
    assert (
        result["tokens"] == count == 6 + 20
    )  # the answers' tokens plus <eos>, never the prompt's
    assert result["samples"] == 2
    assert _training_flags(model) == flags


def test_answer_nll_is_independent_of_batch_size_and_logits_path():
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer)
    data = Dataset.from_list(CHAT_ROWS)
    expected, count = _reference_answer_nll(model, tokenizer, CHAT_ROWS)

    results = [answer_nll(model, tokenizer, data, batch_size=b) for b in (1, 2, 3)]
    results.append(
        answer_nll(_PlainForward(model), tokenizer, data, batch_size=3)
    )  # no logits_to_keep

    for result in results:
        assert result["nll"] == pytest.approx(expected, rel=1e-5)
        assert result["tokens"] == count


def test_answer_nll_plain_string_rows_and_right_truncation():
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer)
    rows = [{"prompt": "what is 3 plus 4 ?", "completion": " the answer is 7 ."}]
    with torch.no_grad():
        ids = tokenizer("what is 3 plus 4 ? the answer is 7 .")["input_ids"]
        logprobs = torch.log_softmax(
            model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1
        )
    # 6 prompt tokens; max_length=8 keeps only "the answer".
    expected = -(logprobs[5, ids[6]] + logprobs[6, ids[7]]).item() / 2

    result = answer_nll(model, tokenizer, rows, max_length=8)
    assert result["tokens"] == 2
    assert result["nll"] == pytest.approx(expected, rel=1e-5)

    cut_away = answer_nll(model, tokenizer, rows, max_length=6)
    assert cut_away["tokens"] == 0 and math.isnan(cut_away["nll"])


def test_answer_nll_peft_wrapped_model():
    peft = pytest.importorskip("peft")
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer)
    expected = answer_nll(model, tokenizer, CHAT_ROWS)["nll"]
    wrapped = peft.get_peft_model(
        model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    wrapped.train()

    result = answer_nll(wrapped, tokenizer, CHAT_ROWS, batch_size=2)

    assert result["nll"] == pytest.approx(
        expected, rel=1e-5
    )  # LoRA starts as the identity
    assert wrapped.training


# ----------------------------------------------------------------------------------------------------------------------
# multiple_choice_accuracy
# ----------------------------------------------------------------------------------------------------------------------


class _UnigramModel(torch.nn.Module):
    """Predicts the same next-token distribution everywhere, so continuation scores are known in closed form."""

    def __init__(self, vocab_size: int, boosts: dict[int, float]):
        super().__init__()
        logits = torch.zeros(vocab_size)
        for token_id, boost in boosts.items():
            logits[token_id] = boost
        self.register_buffer("unigram", logits)
        self.seen_training: list[bool] = []

    @property
    def device(self) -> torch.device:
        return self.unigram.device

    def forward(self, input_ids, attention_mask=None):
        self.seen_training.append(self.training)
        return SimpleNamespace(logits=self.unigram.expand(*input_ids.shape, -1).clone())


def test_multiple_choice_length_normalisation_flips_the_choice():
    tokenizer = make_tiny_tokenizer()
    b, c = tokenizer.convert_tokens_to_ids(["b", "c"])
    model = _UnigramModel(len(tokenizer), {b: -1.0, c: -1.0})
    # log p(a) ~ -4.98 beats log p(b) + log p(c) ~ -11.95, but per character -11.95 / 3 beats -4.98 / 1 (and dividing
    # by the length with the leading space, -11.95 / 4 vs -4.98 / 2, would not: this pins lm-eval's len(choice)).
    question = {"question": "what is the answer ?", "choices": ["a", "b c"]}
    model.train()

    short_label = multiple_choice_accuracy(
        model, tokenizer, [{**question, "label_index": 0}]
    )
    long_label = multiple_choice_accuracy(
        model, tokenizer, [{**question, "label_index": 1}]
    )

    assert short_label == {"accuracy": 1.0, "accuracy_norm": 0.0, "n": 1}
    assert long_label == {"accuracy": 0.0, "accuracy_norm": 1.0, "n": 1}
    assert model.seen_training and not any(model.seen_training) and model.training


ARC_QUESTIONS = [
    ("what is 3 plus 4 ?", ["7", "the answer is 8", "x y z", "so 12"]),
    ("compute the sum of 10 and 5", ["15", "a b", "first number 10 then add 5"]),
    ("solve x times 2", ["x", "y", "2 x", "the result equals 2 x"]),
    ("what is the total ?", ["a", "b", "c"]),
    ("question : 9 minus 4 ?", ["5 .", "the answer is 5", "13"]),
]


def _reference_choice_scores(
    model, tokenizer, question: str, choices: list[str]
) -> list[float]:
    """lm-eval style, one (context, continuation) at a time: continuation ids = whole ids after the context's."""
    context = f"Question: {question}\nAnswer:"
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    scores = []
    with torch.no_grad():
        for choice in choices:
            whole = tokenizer(context + " " + choice, add_special_tokens=False)[
                "input_ids"
            ]
            assert whole[: len(context_ids)] == context_ids
            logprobs = torch.log_softmax(
                model(input_ids=torch.tensor([whole])).logits[0].double(), dim=-1
            )
            scores.append(
                sum(
                    logprobs[t - 1, whole[t]].item()
                    for t in range(len(context_ids), len(whole))
                )
            )
    return scores


def test_choice_scores_match_reference_including_left_truncation():
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer, seed=3)
    pairs, expected = [], []
    for question, choices in ARC_QUESTIONS:
        pairs += [
            (f"Question: {question}\nAnswer:", f" {choice}") for choice in choices
        ]
        expected += _reference_choice_scores(model, tokenizer, question, choices)

    with torch.no_grad():
        scores = _continuation_logprobs(
            model, tokenizer, pairs, batch_size=4, max_length=512
        )
        assert scores == pytest.approx(expected, rel=1e-5)

        # max_length=6 drops tokens from the left; the continuation is still scored, on what is left of the context.
        context, continuation = pairs[1]
        whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
        kept = whole[-6:]
        logprobs = torch.log_softmax(
            model(input_ids=torch.tensor([kept])).logits[0].double(), dim=-1
        )
        start = n_context - (len(whole) - 6)
        truncated = sum(logprobs[t - 1, kept[t]].item() for t in range(start, 6))
        assert _continuation_logprobs(
            model, tokenizer, pairs[:2], batch_size=2, max_length=6
        )[1] == pytest.approx(truncated, rel=1e-5)


def test_multiple_choice_matches_per_choice_reference_loop():
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer, seed=3)
    best, best_norm = [], []
    for question, choices in ARC_QUESTIONS:
        scores = _reference_choice_scores(model, tokenizer, question, choices)
        best.append(max(range(len(choices)), key=scores.__getitem__))
        norm = [s / len(choice) for s, choice in zip(scores, choices)]
        best_norm.append(max(range(len(choices)), key=norm.__getitem__))
    assert best != best_norm  # the data must tell the two metrics apart
    agreement = sum(x == y for x, y in zip(best, best_norm)) / len(best)

    def rows(labels):
        return Dataset.from_list(
            [
                {"question": q, "choices": ch, "label_index": lab}
                for (q, ch), lab in zip(ARC_QUESTIONS, labels)
            ]
        )

    for batch_size in (1, 5, 16):
        by_acc = multiple_choice_accuracy(
            model, tokenizer, rows(best), batch_size=batch_size
        )
        assert by_acc == {
            "accuracy": 1.0,
            "accuracy_norm": pytest.approx(agreement),
            "n": len(ARC_QUESTIONS),
        }
        by_norm = multiple_choice_accuracy(
            model, tokenizer, rows(best_norm), batch_size=batch_size
        )
        assert by_norm["accuracy_norm"] == 1.0
        assert by_norm["accuracy"] == pytest.approx(agreement)
    wrong = [(lab + 1) % len(ch) for lab, (_, ch) in zip(best, ARC_QUESTIONS)]
    assert (
        multiple_choice_accuracy(_PlainForward(model), tokenizer, rows(wrong))[
            "accuracy"
        ]
        == 0.0
    )


# ----------------------------------------------------------------------------------------------------------------------
# gsm8k_exact_match and extract_final_number
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("#### 1,234", "1234"),
        ("so $18.", "18"),
        ("no number here", None),
        ("", None),
        ("the change is -5 dollars", "-5"),
        ("#### -12", "-12"),
        ("It costs 2.50 per kg, so 7.5", "7.5"),
        (
            "first 3 then 4 #### 7 and later 9",
            "7",
        ),  # the number after the last ####, not the last number
        ("#### 5 #### 6", "6"),
        ("#### none here, but 42 earlier", "42"),
        ("4 #### ", "4"),  # a bare #### falls back to the last number
        ("5-3 = 2", "2"),  # a hyphen between numbers is not a minus sign
        ("answer: 1,000,000.", "1000000"),
        ("$1,234.56 total", "1234.56"),
    ],
)
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


class _ScriptedGenerator(torch.nn.Module):
    """``generate`` appends a scripted reply (chosen by the prompt's text) and checks how it was called."""

    def __init__(self, tokenizer, replies: dict[str, str]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer = tokenizer
        self.replies = {
            q: tokenizer(r, add_special_tokens=False)["input_ids"]
            for q, r in replies.items()
        }
        self.batch_sizes: list[int] = []

    def generate(
        self,
        input_ids,
        attention_mask,
        max_new_tokens,
        do_sample,
        pad_token_id,
        **kwargs,
    ):
        assert not self.training and not do_sample and max_new_tokens == 12
        assert pad_token_id == self.tokenizer.pad_token_id
        assert bool(
            (attention_mask[:, -1] == 1).all()
        )  # left padded: every prompt ends in the last column
        assert bool((attention_mask.diff(dim=1) >= 0).all())
        self.batch_sizes.append(input_ids.shape[0])
        eos = self.tokenizer.eos_token_id
        new = []
        for ids, mask in zip(input_ids, attention_mask):
            text = self.tokenizer.decode(ids[mask.bool()])
            reply = next(r for q, r in self.replies.items() if q in text)
            new.append(reply + [eos] * (max_new_tokens - len(reply)))
        return torch.cat([input_ids, torch.tensor(new, dtype=input_ids.dtype)], dim=1)


def test_gsm8k_exact_match_scores_scripted_generations():
    tokenizer = make_tiny_tokenizer()
    tokenizer.add_tokens(["####", "$18.", "18.0"])
    script = {
        "what is 5 plus 7 ?": ("first 5 then add 7 #### 12", "12"),  # right, via ####
        "what is 9 plus 9 plus 0 ?": ("the answer is 18.0", "18"),  # right, numerically
        "what is 1 plus 1 plus 0 plus 0 ?": ("the answer is x", "2"),  # no number
        "what is 3 plus 4 ?": ("#### 7 so 9", "9"),  # #### wins over the last number
        "what is 2 plus 16 plus 0 plus 0 plus 0 ?": (
            "so we get $18.",
            "18",
        ),  # right, "$" and "." stripped
    }
    model = _ScriptedGenerator(
        tokenizer, {q: reply for q, (reply, _) in script.items()}
    )
    rows = [
        {"prompt": [{"role": "user", "content": q}], "answer": gold}
        for q, (_, gold) in script.items()
    ]
    rows[3]["prompt"] = (
        "<|user|> what is 3 plus 4 ? <|assistant|>"  # a plain-string prompt works too
    )
    model.train()

    result = gsm8k_exact_match(model, tokenizer, rows, max_new_tokens=12, batch_size=2)

    assert result == {
        "exact_match": 0.6,
        "n": 5,
        "predictions": ["12", "18.0", None, "7", "18"],
    }
    assert model.batch_sizes == [2, 2, 1]
    assert model.training and tokenizer.padding_side == "right"


def test_gsm8k_exact_match_runs_real_generation_batch_independently():
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer)
    rows = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": "what is 3 plus 4 ?"}],
                "answer": "7",
            },
            {
                "prompt": [
                    {
                        "role": "user",
                        "content": "what is 10 plus 20 plus 5 and then add 1 ?",
                    }
                ],
                "answer": "36",
            },
            {"prompt": [{"role": "user", "content": "solve 2 times 3"}], "answer": "6"},
        ]
    )
    model.train()

    batched = gsm8k_exact_match(model, tokenizer, rows, max_new_tokens=6, batch_size=3)
    single = gsm8k_exact_match(model, tokenizer, rows, max_new_tokens=6, batch_size=1)

    assert batched["n"] == 3 and len(batched["predictions"]) == 3
    assert 0.0 <= batched["exact_match"] <= 1.0
    assert batched == single  # left padding must not change greedy outputs
    assert model.training


def test_trainer_eval_loss_is_not_the_token_weighted_answer_nll(tmp_path):
    """Why the bench's learning curve calls ``answer_nll`` instead of the Trainer's ``eval_loss``: on the same rows
    the Trainer's evaluation loop averages the batch means (weighted by rows, not answer tokens), so its number moves
    with the eval batch size once rows differ in length; and TRL scores the EOS token it appends to completions."""
    from trl_qtuning.testing import make_arithmetic_dataset
    from trl_qtuning.testing import make_tiny_model as make_model
    from trl_qtuning.testing import make_tiny_tokenizer as make_tokenizer

    from .trainer_helpers import tiny_config

    tokenizer = make_tokenizer()
    rows = make_arithmetic_dataset(5, seed=3)
    rows = rows.map(lambda row, i: {"completion": row["completion"] + " ." * i}, with_indices=True)  # uneven lengths
    model = make_model(tokenizer, seed=0)
    reference = answer_nll(model, tokenizer, rows, batch_size=8)

    def eval_loss(batch_size: int) -> float:
        from trl import SFTTrainer

        args = tiny_config(tmp_path / f"b{batch_size}", qtuning_enabled=False, per_device_eval_batch_size=batch_size)
        trainer = SFTTrainer(model=model, args=args, train_dataset=rows, eval_dataset=rows, processing_class=tokenizer)
        return trainer.evaluate()["eval_loss"]

    one_batch, per_row = eval_loss(len(rows)), eval_loss(1)
    # the batch weighting alone moves the Trainer's number ...
    assert abs(one_batch - per_row) > 1e-3
    # ... and even in one batch TRL scores the EOS token it appends to each completion, which answer_nll does not
    assert one_batch != pytest.approx(reference["nll"], abs=1e-4) and abs(one_batch - reference["nll"]) < 0.05
