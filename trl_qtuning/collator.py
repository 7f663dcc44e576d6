"""``QTuningDataCollator``: TRL's collator plus a stable per-sample id, so every decision traces back to a dataset row."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["QTuningDataCollator", "SAMPLE_ID_COLUMN", "non_integer_sample_ids"]

SAMPLE_ID_COLUMN = "qtuning_sample_id"


def non_integer_sample_ids(detail: str) -> ValueError:
    """The error for user-supplied ids that are not integers (raised at construction where the dataset's features
    say so, else by the collator on the first such value)."""
    return ValueError(
        f"the `{SAMPLE_ID_COLUMN}` column of train_dataset {detail}: ledger sample ids must be integers. Map your ids "
        f"to integers (keeping a table of the originals), or remove the column "
        f"(`dataset.remove_columns('{SAMPLE_ID_COLUMN}')`) and the trainer numbers the rows itself."
    )


def _sample_id(value: Any) -> int:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if torch.is_tensor(value) and value.numel() == 1 and not value.is_floating_point() and value.dtype != torch.bool:
        return int(value)
    raise non_integer_sample_ids(f"holds {value!r} ({type(value).__name__})")


class QTuningDataCollator:
    """Wrap any collator (by default TRL's ``DataCollatorForLanguageModeling``) and carry sample ids through it.

    Each example may hold ``qtuning_sample_id`` (the row index in the user's training dataset, added by
    ``QTuningSFTTrainer``). The wrapped collator never sees it; the batch gets it back as a ``(num_samples,)``
    LongTensor in example order, which is also the row order of a padded batch and the segment order of a
    padding-free one. The trainer removes it before any forward.
    """

    def __init__(self, collator: Callable[[list[dict[str, Any]]], dict[str, Any]]):
        if isinstance(collator, QTuningDataCollator):
            collator = collator.collator
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        has_ids = bool(examples) and SAMPLE_ID_COLUMN in examples[0]
        if has_ids:
            ids = [_sample_id(example[SAMPLE_ID_COLUMN]) for example in examples]
            examples = [{k: v for k, v in example.items() if k != SAMPLE_ID_COLUMN} for example in examples]
        batch = self.collator(examples)
        if has_ids:
            batch[SAMPLE_ID_COLUMN] = torch.tensor(ids, dtype=torch.long)
        return batch

    def __getattr__(self, name: str) -> Any:
        # Expose the wrapped collator's settings (``padding_free``, ``pad_token_id``...) to code that reads them.
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)
