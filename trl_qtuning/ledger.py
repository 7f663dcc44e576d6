"""Per-sample decision ledger: one row per sample per optimizer step, written as Parquet shards.

Bounded in memory (a shard is written every ``rows_per_shard`` rows and at each flush), readable with
``pandas.read_parquet(dir)`` or :func:`read_ledger`. Tracking integrations upload the folder; the trainer only
appends records.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

__all__ = ["DecisionLedger", "read_ledger", "LEDGER_SCHEMA"]

LEDGER_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("epoch", pa.float64()),
        ("rank", pa.int32()),
        ("micro_batch", pa.int32()),
        ("sample_id", pa.int64()),
        ("quadrant", pa.int8()),
        ("ppl", pa.float64()),
        ("entropy", pa.float64()),
        ("decision", pa.string()),
        ("response_tokens", pa.int32()),
        ("kept_tokens", pa.int32()),
        ("pruned_positions", pa.list_(pa.int32())),
    ]
)
"""``decision`` is one of ``kept`` (Q2/Q4, all tokens), ``token_pruned`` (kept with some labels masked), ``filled``
(kept by the under-fill rule), ``dropped``, ``trimmed`` (a Q2/Q4 sample dropped to enforce the budget) and
``invalid`` (non-finite statistics). ``pruned_positions`` are offsets in the sample's ``input_ids`` whose label was
masked (only with level ``full``)."""


class DecisionLedger:
    """Append records; shards are named ``ledger-rank{R}-{N:06d}.parquet`` so ranks and restarts never collide."""

    def __init__(self, directory: str | os.PathLike, *, level: str = "full", rank: int = 0, rows_per_shard: int = 20_000):
        if level not in ("summary", "full"):
            raise ValueError(f"ledger level must be 'summary' or 'full', got {level!r}")
        self.directory = Path(directory)
        self.level = level
        self.rank = rank
        self.rows_per_shard = rows_per_shard
        self._buffer: dict[str, list[Any]] = {name: [] for name in LEDGER_SCHEMA.names}
        self._buffered = 0
        self._next_shard = self._first_free_shard()

    def _first_free_shard(self) -> int:
        existing = sorted(self.directory.glob(f"ledger-rank{self.rank}-*.parquet")) if self.directory.exists() else []
        return int(existing[-1].stem.rsplit("-", 1)[-1]) + 1 if existing else 0

    def reset(self) -> None:
        """Start a fresh ledger: remove this rank's shards from an earlier run in the same folder."""
        for shard in self.directory.glob(f"ledger-rank{self.rank}-*.parquet"):
            shard.unlink()
        self._buffer = {name: [] for name in LEDGER_SCHEMA.names}
        self._buffered = 0
        self._next_shard = 0

    def truncate_after(self, step: int) -> None:
        """Remove this rank's rows of steps after ``step`` (a run resumed from that checkpoint redoes them)."""
        self._buffer = {name: [] for name in LEDGER_SCHEMA.names}
        self._buffered = 0
        for shard in sorted(self.directory.glob(f"ledger-rank{self.rank}-*.parquet")):
            table = pq.read_table(shard, schema=LEDGER_SCHEMA)
            keep = pc.less_equal(table["step"], step)
            if pc.all(keep).as_py():
                continue
            kept = table.filter(keep)
            if kept.num_rows == 0:
                shard.unlink()
                continue
            tmp = shard.with_suffix(".parquet.tmp")
            pq.write_table(kept, tmp)
            os.replace(tmp, shard)
        self._next_shard = self._first_free_shard()

    def append(self, columns: dict[str, list[Any]]) -> None:
        """Add rows given column-wise (every schema column but ``pruned_positions`` is required)."""
        n = len(columns["sample_id"])
        for name in LEDGER_SCHEMA.names:
            values = columns.get(name)
            if name == "pruned_positions" and (values is None or self.level != "full"):
                values = [None] * n
            if values is None or len(values) != n:
                raise ValueError(f"ledger column {name!r} must have {n} values")
            self._buffer[name].extend(values)
        self._buffered += n
        if self._buffered >= self.rows_per_shard:
            self.flush()

    def flush(self) -> Path | None:
        """Write buffered rows as one shard (atomically: temp file then rename); returns its path."""
        if self._buffered == 0:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        table = pa.table(self._buffer, schema=LEDGER_SCHEMA)
        path = self.directory / f"ledger-rank{self.rank}-{self._next_shard:06d}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        self._next_shard += 1
        self._buffer = {name: [] for name in LEDGER_SCHEMA.names}
        self._buffered = 0
        return path


def read_ledger(directory: str | os.PathLike) -> pa.Table:
    """All shards of a ledger folder as one table, ordered by step, micro-batch and sample id."""
    files = sorted(Path(directory).glob("ledger-rank*-*.parquet"))
    if not files:
        return LEDGER_SCHEMA.empty_table()
    table = pa.concat_tables([pq.read_table(f, schema=LEDGER_SCHEMA) for f in files])
    return table.sort_by([("step", "ascending"), ("rank", "ascending"), ("micro_batch", "ascending"), ("sample_id", "ascending")])
