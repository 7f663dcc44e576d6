"""Contrast evaluations: does the model still tie an answer to its question, and prefer the right arithmetic?

Held-out answer NLL barely sees label noise (30% swapped answers moved it by 0.01, docs/results.md): a model can
learn that answers ignore their questions, or that arithmetic slips are fine, and still predict the style of a
solution as well as before. Each contrast compares, row by row on the held-out set, the log-likelihood of the true
answer with that of a wrong one, per answer token of the true answer:

* ``swap``: ``[log p(a_j | q_j) - log p(a_j | q_k)] / |a_j|``, the same answer under its own question and under the
  next held-out row's question ``k = j + 1 (mod n)``: how much the question matters to the answer (0 for a model
  that ignores questions);
* ``numbers``: ``[log p(a_j | q_j) - log p(a'_j | q_j)] / |a_j|``, the true solution against the same solution with a
  carried arithmetic slip (:func:`trl_qtuning.bench.noise.perturb_solution`, seeded by the row's uid).

Reported as the mean over rows (``eval/contrast_<kind>``, higher is better) and the share of rows where the true
answer is the more likely one (``eval/contrast_<kind>_win``).
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


def answer_contrasts(
    model, tokenizer, dataset, *, kinds: list[str], seed: int, batch_size: int = 8, max_length: int = 1024
) -> dict[str, float]:
    """``eval/contrast_<kind>``, ``eval/contrast_<kind>_win`` and ``eval/contrast_<kind>_n`` for each kind."""
    from .evaluation import answer_logprob_sums

    rows = [dict(row) for row in dataset]
    true_sums, true_counts = answer_logprob_sums(model, tokenizer, rows, batch_size=batch_size, max_length=max_length)
    metrics: dict[str, float] = {}
    for kind in kinds:
        indices, contrasts = contrast_rows(rows, kind, seed)
        sums, _ = answer_logprob_sums(model, tokenizer, contrasts, batch_size=batch_size, max_length=max_length)
        margins = [(true_sums[j] - other) / true_counts[j] for j, other in zip(indices, sums) if true_counts[j] > 0]
        if not margins:
            continue
        metrics[f"eval/contrast_{kind}"] = sum(margins) / len(margins)
        metrics[f"eval/contrast_{kind}_win"] = sum(m > 0 for m in margins) / len(margins)
        metrics[f"eval/contrast_{kind}_n"] = float(len(margins))
    return metrics
