"""The bench's data: the training subset (optionally with label noise), held-out rows and evaluation subsets.

Every selection ranks rows by ``sha256(seed:salt:uid)``, so every cell of a matrix sees the same rows on any machine
and library version. Label noise corrupts a seeded share of the *training* rows, either by swapping their answers
among themselves (``label_noise_type: swap``) or by a consistent arithmetic slip in each answer (``numbers``,
:mod:`trl_qtuning.bench.noise`); the same rows are chosen for both. Held-out, transfer and evaluation rows are never
corrupted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..demo.assets import (
    load_arc, load_gsm8k_test, load_local_gsm8k_jsonl, load_math_pool, make_arithmetic_dataset, ranked_rows, row_keys,
    split_pool, to_conversation,
)  # fmt: skip
from .matrix import Matrix, field_error

__all__ = ["corrupt_answers", "corrupt_numbers", "describe", "load_pool", "prepare_data"]


def _first(dataset, size: int | None, seed: int, salt: str):
    if size is None or size >= len(dataset):
        return dataset
    return dataset.select(ranked_rows(dataset, f"{seed}:{salt}")[:size])


def _arithmetic_rows(n: int, seed: int, noisy_share: float):
    """Tiny synthetic conversational prompt/completion rows with a uid and the final number as ``answer``."""
    dataset = make_arithmetic_dataset(n, seed=seed, conversational=True, noisy_share=noisy_share)

    def add(row, i):
        return {"uid": f"arithmetic/{seed}/{i}", "answer": row["completion"][0]["content"].split()[-2]}

    return dataset.map(add, with_indices=True)


def _arithmetic_choices(n: int, seed: int):
    """A multiple-choice twin of the arithmetic data (question, 4 choices, label_index) for tests."""
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        wrong = rng.sample([v for v in range(99) if v != a + b], 3)
        choices = [str(v) for v in [a + b, *wrong]]
        rng.shuffle(choices)
        rows.append({"question": f"what is {a} plus {b} ?", "choices": choices, "label_index": choices.index(str(a + b)),
                     "uid": f"arithmetic_mc/{seed}/{i}"})  # fmt: skip
    return Dataset.from_list(rows)


def _as_prompt_completion(dataset, where: str):
    columns = set(dataset.column_names)
    if {"prompt", "completion"} <= columns:
        return dataset
    if {"question", "answer"} <= columns:
        return dataset.map(lambda row: to_conversation(row["question"], row["answer"]), remove_columns=sorted(columns))
    raise field_error(where, f"needs 'prompt'/'completion' (or 'question'/'answer') columns, found {sorted(columns)}",
               "convert the file to prompt/completion rows", )


def load_pool(source: str, options: dict[str, Any], *, path: str | None, size: int, seed: int, where: str):
    """A pool of prompt-completion rows from one of the bench's sources (``size``/``seed`` feed the synthetic one)."""
    if source == "gsm8k_jsonl":
        return load_local_gsm8k_jsonl(path, strip_calculator=bool(options.get("strip_calculator", False)))
    if source == "demo_math":
        return load_math_pool(options.get("subjects"), options.get("max_level"), options.get("max_chars"))
    if source == "arithmetic":
        return _arithmetic_rows(size, seed, float(options.get("noisy_share", 0.2)))
    from ..inputs import load_local_dataset

    loaded = load_local_dataset(Path(path))
    dataset = loaded["train"] if hasattr(loaded, "keys") else loaded
    return _as_prompt_completion(dataset, where)


def corrupt_answers(train, share: float, seed: int) -> tuple[Any, list[int]]:
    """Swap the completions of ``round(share * n)`` seeded rows among themselves (a cyclic shift in ranked order, so
    every chosen row gets another chosen row's answer). Returns the new dataset and the corrupted row indices."""
    n = len(train)
    count = _noise_count(n, share)
    if count == 0:
        return train, []
    if count < 2:
        raise field_error("data.train.label_noise", f"{share} of {n} rows is {count} row: answers are swapped among the "
                   "corrupted rows, so at least 2 are needed", "raise label_noise or data.train.size")
    chosen = ranked_rows(train, f"{seed}:label_noise")[:count]
    completions = train["completion"]
    donor = {row: chosen[(i + 1) % count] for i, row in enumerate(chosen)}

    def swap(row, index):
        return {"completion": completions[donor[index]]} if index in donor else {"completion": row["completion"]}

    return train.map(swap, with_indices=True), sorted(chosen)


def _noise_count(n: int, share: float) -> int:
    return int(share * n + 0.5)


def corrupt_numbers(train, share: float, seed: int) -> tuple[Any, list[int]]:
    """Give ``round(share * n)`` seeded rows (the rows :func:`corrupt_answers` would swap) a fluent but wrong answer:
    one arithmetic slip carried through the solution (:func:`trl_qtuning.bench.noise.perturb_solution`). A row with
    no number to change is passed over for the next ranked one. Returns the new dataset and the corrupted indices."""
    from .noise import completion_text, perturb_solution, row_rng, with_text

    n = len(train)
    count = _noise_count(n, share)
    if count == 0:
        return train, []
    keys = row_keys(train)
    completions = train["completion"]
    changed: dict[int, Any] = {}
    for row in ranked_rows(train, f"{seed}:label_noise"):
        wrong = perturb_solution(completion_text(completions[row]), row_rng(seed, keys[row]))
        if wrong is not None:
            changed[row] = with_text(completions[row], wrong)
            if len(changed) == count:
                break
    if len(changed) < count:
        raise field_error("data.train.label_noise", f"only {len(changed)} of the {n} rows have a number to change, "
                          f"{count} are needed", "lower label_noise, or use label_noise_type: swap")  # fmt: skip

    def alter(row, index):
        return {"completion": changed.get(index, row["completion"])}

    return train.map(alter, with_indices=True), sorted(changed)


def prepare_data(matrix: Matrix) -> dict[str, Any]:
    """Train subset, held-out rows and evaluation subsets: the same for every cell."""
    spec = matrix.train
    pool = load_pool(spec.source, spec.options, path=getattr(spec, "path", None), seed=spec.seed,
                     size=(spec.size or 64) + matrix.heldout_size, where="data.train.path")  # fmt: skip
    if matrix.heldout_size >= len(pool):
        raise field_error("data.heldout_size", f"{matrix.heldout_size} >= the {len(pool)} rows of the training pool",
                   "use a smaller held-out size")
    train, heldout = split_pool(pool, matrix.heldout_size, spec.seed)
    if spec.size is not None and spec.size > len(train):
        raise field_error("data.train.size", f"{spec.size} > the {len(train)} rows left after the held-out split",
                   f"use at most {len(train)}, or null for all")
    train = _first(train, spec.size, spec.seed, "train")
    corrupted: list[int] = []
    if spec.label_noise:
        corrupt = corrupt_numbers if spec.label_noise_type == "numbers" else corrupt_answers
        train, corrupted = corrupt(train, spec.label_noise, spec.seed)
    keep = [c for c in ("prompt", "completion") if c in train.column_names]
    train = train.select_columns(keep) if len(keep) == 2 else train
    data: dict[str, Any] = {"train": train, "heldout": heldout, "corrupted_ids": corrupted,
                            "noise_type": spec.label_noise_type if spec.label_noise else None}  # fmt: skip
    ev, seed = matrix.eval, matrix.eval.seed
    if ev.gsm8k:
        g = ev.gsm8k
        if g.source == "arithmetic":
            pool_g = _arithmetic_rows(g.size, 10_000 + seed, 0.0)
        elif g.source == "gsm8k_jsonl":
            pool_g = load_local_gsm8k_jsonl(g.path)
        else:
            pool_g = load_gsm8k_test()
        data["gsm8k"] = _first(pool_g, g.size, seed, "gsm8k")
    for name in ("arc_easy", "arc_challenge"):
        a = getattr(ev, name)
        if a:
            if a.source == "arithmetic":
                pool_a = _arithmetic_choices(a.size, 20_000 + seed + (name == "arc_challenge"))
            else:
                pool_a = load_arc(name.removeprefix("arc_"), a.subset)  # type: ignore[arg-type]
            data[name] = _first(pool_a, a.size, seed, name)
    if ev.transfer:
        t = ev.transfer
        pool_t = load_pool(t["source"], t, path=t.get("path"), size=t["size"], seed=30_000 + t["seed"],
                           where="eval.transfer.path")  # fmt: skip
        data["transfer"] = _first(pool_t, t["size"], t["seed"], "transfer")
    return data


def describe(data: dict[str, Any]) -> str:
    parts = [f"{len(data['train'])} training rows", f"{len(data['heldout'])} held-out rows"]
    parts += [f"{len(data[k])} {k}" for k in ("transfer", "gsm8k", "arc_easy", "arc_challenge") if k in data]
    if data.get("corrupted_ids"):
        kind = "answers with a carried arithmetic slip" if data.get("noise_type") == "numbers" else "swapped answers"
        parts.append(f"{len(data['corrupted_ids'])} training rows with {kind}")
    return ", ".join(parts)

