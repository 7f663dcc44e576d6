"""Contrast evaluations: does the model still tie an answer to its question, and prefer the right arithmetic?

Held-out answer NLL barely sees label noise (30% swapped answers moved it by 0.01, docs/results.md): a model can
learn that answers ignore their questions, or that arithmetic slips are fine, and still predict the style of a
solution as well as before. Each contrast compares, row by row on the held-out set, the true answer with a wrong one:

* ``swap``: ``[log p(a_j | q_j) - log p(a_j | q_k)] / |a_j|``, the same answer under its own question and under the
  next held-out row's question ``k = j + 1 (mod n)``, per answer token: how much the question matters to the answer
  (0 for a model that ignores questions). Both sides score the same tokens.
* ``numbers``: ``log p(t_d | prefix) - log p(w_d | prefix)`` at the first token ``d`` where the solution with a carried
  arithmetic slip (:func:`trl_qtuning.bench.noise.perturb_solution`, seeded by the row's uid) departs from the true
  one: given the identical question and reasoning so far, how much more likely the right result's token is than the
  slip's. Read at that one token because the two solutions differ in length after it (a slip can add digits or
  decimals to every later number), and a sum over different token counts would move with how well the model fits
  tokens in general, not with its arithmetic. A row whose departure lies beyond ``max_length`` is left out.

Reported as the mean over rows (``eval/contrast_<kind>``, higher is better), the share of rows where the true answer
is the more likely one (``eval/contrast_<kind>_win``) and the number of rows (``eval/contrast_<kind>_n``).
"""

from __future__ import annotations

from typing import Any

from .matrix import CONTRAST_KINDS

__all__ = ["answer_contrasts", "contrast_rows"]


def contrast_rows(rows: list[dict[str, Any]], kind: str, seed: int) -> tuple[list[int], list[dict[str, Any]]]:
    """The rows that have a contrast of ``kind`` (their indices) and the contrast rows themselves."""
    if kind == "swap":
        n = len(rows)
        if n < 2:
            return [], []
        return list(range(n)), [{**rows[j], "prompt": rows[(j + 1) % n]["prompt"]} for j in range(n)]
    if kind == "numbers":
        from .noise import completion_text, perturb_solution, row_rng, with_text

        indices, contrasts = [], []
        for j, row in enumerate(rows):
            wrong = perturb_solution(completion_text(row["completion"]), row_rng(seed, str(row.get("uid", j))))
            if wrong is not None:
                indices.append(j)
                contrasts.append({**row, "completion": with_text(row["completion"], wrong)})
        return indices, contrasts
    raise ValueError(f"contrast kind must be one of {', '.join(CONTRAST_KINDS)}, got {kind!r}")


def _first_departure(true: list[int], wrong: list[int], start: int) -> int | None:
    """The first answer position where the two token sequences differ (None: identical as far as both go)."""
    return next((i for i, (a, b) in enumerate(zip(true, wrong)) if a != b and i >= start), None)


def _swap_margins(model, tokenizer, rows, contrasts, *, batch_size: int, max_length: int) -> list[float]:
    from .evaluation import answer_logprob_sums

    true_sums, counts = answer_logprob_sums(model, tokenizer, rows, batch_size=batch_size, max_length=max_length)
    sums, _ = answer_logprob_sums(model, tokenizer, contrasts, batch_size=batch_size, max_length=max_length)
    return [(t - o) / c for t, o, c in zip(true_sums, sums, counts) if c > 0]


def _slip_margins(model, tokenizer, rows, contrasts, *, batch_size: int, max_length: int) -> list[float]:
    from .evaluation import answer_sequences, token_logprob_sums

    true_ids, starts = answer_sequences(tokenizer, rows, max_length=max_length)
    wrong_ids, _ = answer_sequences(tokenizer, contrasts, max_length=max_length)
    points = [(t, w, d) for t, w, s in zip(true_ids, wrong_ids, starts) if (d := _first_departure(t, w, s)) is not None]
    sequences = [t[: d + 1] for t, _, d in points] + [w[: d + 1] for _, w, d in points]
    sums, _ = token_logprob_sums(model, tokenizer, sequences, [d for *_, d in points] * 2, batch_size=batch_size)
    return [sums[i] - sums[i + len(points)] for i in range(len(points))]


def answer_contrasts(
    model, tokenizer, dataset, *, kinds: list[str], seed: int, batch_size: int = 8, max_length: int = 1024
) -> dict[str, float]:
    """``eval/contrast_<kind>``, ``eval/contrast_<kind>_win`` and ``eval/contrast_<kind>_n`` for each kind."""
    rows = [dict(row) for row in dataset]
    metrics: dict[str, float] = {}
    for kind in kinds:
        indices, contrasts = contrast_rows(rows, kind, seed)
        margins_of = _swap_margins if kind == "swap" else _slip_margins
        margins = margins_of(model, tokenizer, [rows[j] for j in indices], contrasts, batch_size=batch_size,
                             max_length=max_length)  # fmt: skip
        if not margins:
            continue
        metrics[f"eval/contrast_{kind}"] = sum(margins) / len(margins)
        metrics[f"eval/contrast_{kind}_win"] = sum(m > 0 for m in margins) / len(margins)
        metrics[f"eval/contrast_{kind}_n"] = float(len(margins))
    return metrics
