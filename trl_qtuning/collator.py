"""``QTuningDataCollator``: TRL's collator plus a stable per-sample id, so every decision traces back to a dataset row."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["QTuningDataCollator", "SAMPLE_ID_COLUMN"]

SAMPLE_ID_COLUMN = "qtuning_sample_id"


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
            ids = [int(example[SAMPLE_ID_COLUMN]) for example in examples]
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
