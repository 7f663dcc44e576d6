"""``QTuningDataCollator``: TRL's collator plus a stable per-sample id, so every decision traces back to a dataset row."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable
from typing import Any

import torch

__all__ = [
    "QTuningDataCollator", "SAMPLE_ID_COLUMN", "check_prepared_dataset", "check_sample_ids", "non_integer_sample_ids",
    "pad_token_id", "sized_length", "with_sample_ids",
]  # fmt: skip

logger = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------------------------- the dataset's ids
def pad_token_id(collator: Any) -> int:
    """The padding id of TRL's collator (through :class:`QTuningDataCollator`), 0 when it has none."""
    pad = getattr(getattr(collator, "collator", collator), "pad_token_id", None)
    return int(pad) if pad is not None else 0


def sized_length(dataset: Any) -> int | None:
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:  # IterableDataset
        return None


def check_sample_ids(dataset: Any) -> None:
    """The user's ``qtuning_sample_id`` column: integers (else a clear error now, not a crash in the collator at the
    first step; a stream of unknown features is checked by the collator), unique in a sized dataset (else a warning
    with the count and an example)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    features = getattr(dataset, "features", None)
    feature = features.get(SAMPLE_ID_COLUMN) if features else None
    if feature is not None:
        pa_type = getattr(feature, "pa_type", None)
        if pa_type is None or not pa.types.is_integer(pa_type):
            raise non_integer_sample_ids(f"has type {feature}")
    if sized_length(dataset) is None or not hasattr(dataset, "with_format"):
        return
    ids = dataset.with_format("arrow")[SAMPLE_ID_COLUMN]
    if ids.null_count:
        raise non_integer_sample_ids(f"has {ids.null_count} missing value(s)")
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated):
        top = repeated[int(pc.index(repeated.field("counts"), pc.max(repeated.field("counts"))).as_py())]
        logger.warning(
            "Q-Tuning: %d value(s) of the `%s` column appear on more than one row (%d rows; e.g. id %s on %d rows): "
            "ledger rows with these ids cannot be traced back to one row. Give each row its own id, or remove the "
            "column and the trainer numbers the rows itself.",
            len(repeated), SAMPLE_ID_COLUMN, pc.sum(repeated.field("counts")).as_py(), top["values"], top["counts"],
        )  # fmt: skip


def with_sample_ids(dataset: Any) -> Any:
    """Add the row index as ``qtuning_sample_id``, or check the ids the user supplies in that column.

    A stream (``IterableDataset``) cannot number its rows: without the user's column its ids are positions in
    the stream, which a warning says.
    """
    columns = getattr(dataset, "column_names", None)
    if columns is not None and SAMPLE_ID_COLUMN in columns:
        check_sample_ids(dataset)
        return dataset
    if hasattr(dataset, "add_column") and hasattr(dataset, "__len__"):
        return dataset.add_column(SAMPLE_ID_COLUMN, list(range(len(dataset))))
    if hasattr(dataset, "map"):
        logger.warning(
            "Q-Tuning: train_dataset is a stream (IterableDataset) %s, so ledger sample ids are stream positions, "
            "not row ids: they repeat with every pass over the stream and, after shuffle(), name different rows "
            "in different passes. To trace decisions back to rows, give each row its own integer `%s` before "
            "shuffling (e.g. `ds.add_column('%s', list(range(len(ds))))` before `to_iterable_dataset()`, or an "
            "integer id your data carries).",
            "whose columns are unknown (rows without a `qtuning_sample_id` column)" if columns is None
            else "without a `qtuning_sample_id` column", SAMPLE_ID_COLUMN, SAMPLE_ID_COLUMN,
        )  # fmt: skip
        if columns is None:  # keep the user's ids where the rows carry them
            keep_or_number = lambda row, idx: {SAMPLE_ID_COLUMN: row.get(SAMPLE_ID_COLUMN, idx)}  # noqa: E731
            return dataset.map(keep_or_number, with_indices=True)
        return dataset.map(lambda _, idx: {SAMPLE_ID_COLUMN: idx}, with_indices=True)
    return dataset


def check_prepared_dataset(given: int | None, dataset: Any, max_length: int | None, truncation_mode: str) -> None:
    """Fail now, not at the first step, when TRL's preparation left no sample of the ``given`` with a trainable
    token; warn when it removed some."""
    prepared = sized_length(dataset)
    if given is None or prepared is None:
        return
    if prepared == 0:
        raise ValueError(
            f"train_dataset has no sample with a trainable (completion/assistant) token left after TRL's "
            f"preparation: all {given} were fully masked (max_length={max_length}, truncation_mode="
            f"{truncation_mode!r}). Raise `max_length`, shorten the prompts, or check that the data "
            "has completions (and, with `assistant_only_loss`, that the chat template marks assistant turns "
            "with {% generation %})."
        )
    if prepared < given:
        logger.warning(
            "Q-Tuning: %d of %d training samples had no trainable token left after truncation to max_length=%s "
            "and were removed by TRL; ledger sample ids still refer to rows of the dataset you passed.",
            given - prepared, given, max_length,
        )
