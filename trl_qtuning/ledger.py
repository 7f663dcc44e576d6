"""Per-sample decision ledger: one row per sample per optimizer step, written as Parquet shards.

Bounded in memory (a shard is written every ``rows_per_shard`` rows and at each flush), readable with
``pandas.read_parquet(dir)`` or :func:`read_ledger`. Tracking integrations upload the folder; the trainer only
appends records.

A ledger belongs to one training run. Its folder holds ``_ledger.json`` (``run_id``, a uuid4 hex, and ``created``),
and the trainer writes the same id into every checkpoint (``qtuning_ledger_id.json``):

- a fresh run (and every ``train()`` call that does not resume) never deletes an earlier ledger: the folder is moved
  aside whole to ``qtuning_ledger.previous-<its run id[:8]>`` and a new one is started;
- a resume whose checkpoint carries the ledger's run id drops the rows of the steps after the checkpoint (they are
  decided again), so every step is accounted for once;
- a resume whose checkpoint carries another run id is refused (``ValueError``) before anything is touched: the
  message names the ledger of the checkpoint's run where it was moved aside, and how to put it back.

The identity file starts with an underscore so that Parquet readers of the folder (pandas, pyarrow) skip it.

The columns are described under :data:`LEDGER_SCHEMA`.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .files import write_json

__all__ = [
    "DecisionLedger", "LEDGER_DIRNAME", "LEDGER_ID_FILE", "LEDGER_INFO_FILE", "LEDGER_SCHEMA", "SHARD_GLOB", "aside_path",
    "is_fresh_run", "modified_tag", "open_for_run", "read_ledger", "shard_name", "write_checkpoint_id",
]  # fmt: skip

logger = logging.getLogger(__name__)

LEDGER_ID_FILE = "qtuning_ledger_id.json"
"""Written into every checkpoint: the run id of the ledger it belongs to."""

LEDGER_DIRNAME = "qtuning_ledger"
"""The ledger's folder inside a run's ``output_dir``."""
LEDGER_INFO_FILE = "_ledger.json"
"""The ledger's identity inside its folder: ``{"run_id": <uuid4 hex>, "created": <ISO 8601 UTC>}``."""


def shard_name(rank: int | str, index: int | str) -> str:
    """``ledger-rank{R}-{N:06d}.parquet``, so ranks and restarts never collide; ``"*"`` for either globs."""
    return f"ledger-rank{rank}-{index if isinstance(index, str) else format(index, '06d')}.parquet"


SHARD_GLOB = shard_name("*", "*")
"""Every shard of a ledger folder, of any rank."""


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
"""``quadrant`` is 1-4 for Q1-Q4 and 0 for the mid band, for an invalid sample and for every sample of a baseline
policy (baselines place no sample on the EU plane); ``epoch`` is the trainer's fractional epoch (``state.epoch``) at
the step; ``decision`` is one of ``kept`` (Q2/Q4, all tokens), ``token_pruned`` (kept with some labels masked; never
at ``token_keep_ratio=1.0``), ``filled`` (kept by the under-fill rule), ``dropped``, ``trimmed`` (a Q2/Q4 sample
dropped to enforce the budget) and ``invalid`` (non-finite statistics); ``ppl`` and ``entropy`` are NaN where the
policy skipped the scoring pass; ``pruned_positions`` are offsets in the sample's ``input_ids`` whose label was masked
(only with level ``full``)."""


class DecisionLedger:
    """Append records, one Parquet shard (:func:`shard_name`) per ``rows_per_shard`` rows and flush.

    :meth:`start` begins a run's ledger (moving an earlier one aside), :meth:`claim` gives a resumed run's folder its
    identity where it has none; :attr:`run_id` is the folder's run (see the module docstring).
    """

    def __init__(self, directory: str | os.PathLike, *, level: str = "full", rank: int = 0, rows_per_shard: int = 20_000):
        if level not in ("summary", "full"):
            raise ValueError(f"ledger level must be 'summary' or 'full', got {level!r}")
        self.directory = Path(directory)
        self.level = level
        self.rank = rank
        self.rows_per_shard = rows_per_shard
        self._clear_buffer()
        self._next_shard = self._first_free_shard()

    def _first_free_shard(self) -> int:
        existing = sorted(self.directory.glob(shard_name(self.rank, "*"))) if self.directory.exists() else []
        return int(existing[-1].stem.rsplit("-", 1)[-1]) + 1 if existing else 0

    def info(self) -> dict[str, Any] | None:
        """The folder's identity (``run_id``, ``created``), or None where it has none (no folder yet)."""
        try:
            info = json.loads((self.directory / LEDGER_INFO_FILE).read_text())
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) and isinstance(info.get("run_id"), str) else None

    @property
    def run_id(self) -> str | None:
        """The id of the run this ledger belongs to (None where the folder has no identity)."""
        info = self.info()
        return info["run_id"] if info else None

    def start(self, run_id: str) -> Path | None:
        """Start a fresh ledger for run ``run_id``; returns where an earlier ledger was moved (None if there was none).

        An earlier ledger is never deleted: the whole folder goes to ``<folder>.previous-<its run id[:8]>`` (the time
        it was last written, for a folder without an identity; ``-2``, ``-3``... if that name is taken).
        """
        moved = None
        if self.directory.is_dir() and any(self.directory.iterdir()):
            earlier = self.run_id
            moved = aside_path(self.directory, earlier[:8] if earlier else modified_tag(self.directory))
            self.directory.rename(moved)
        self._clear_buffer()
        self._next_shard = 0
        self.claim(run_id)
        return moved

    def claim(self, run_id: str) -> None:
        """Write the folder's identity for run ``run_id`` where it has none (a resumed run keeps an existing one)."""
        if self.info() is not None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        info = {"run_id": run_id, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_json(self.directory / LEDGER_INFO_FILE, info)

    def _clear_buffer(self) -> None:
        self._buffer: dict[str, list[Any]] = {name: [] for name in LEDGER_SCHEMA.names}
        self._buffered = 0

    def truncate_after(self, step: int) -> None:
        """Remove this rank's rows of steps after ``step`` (a run resumed from that checkpoint redoes them)."""
        self._clear_buffer()
        for shard in sorted(self.directory.glob(shard_name(self.rank, "*"))):
            table = ds.dataset(shard, schema=LEDGER_SCHEMA).to_table()
            kept = table.filter(ds.field("step") <= step)
            if kept.num_rows == table.num_rows:
                continue
            if kept.num_rows == 0:
                shard.unlink()
            else:
                _write_atomically(kept, shard)
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
        """Write buffered rows as one shard; returns its path."""
        if self._buffered == 0:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / shard_name(self.rank, self._next_shard)
        _write_atomically(pa.table(self._buffer, schema=LEDGER_SCHEMA), path)
        self._next_shard += 1
        self._clear_buffer()
        return path


def _write_atomically(table: pa.Table, path: Path) -> None:
    """A temporary file renamed over ``path``, so a process killed mid-write leaves no half shard (which is also why
    shards are not written with ``pyarrow.dataset.write_dataset``: it writes in place)."""
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _is_ledger_folder(folder: Path) -> bool:
    return folder.is_dir() and (any(folder.glob(SHARD_GLOB)) or (folder / LEDGER_INFO_FILE).is_file())


def read_ledger(path: str | os.PathLike) -> pa.Table:
    """A ledger as one table, ordered by step, rank, micro-batch and sample id.

    ``path`` is a ledger folder (``output_dir/qtuning_ledger``, or a copy of its shards such as the MLflow artifact),
    a run's ``output_dir`` (its ``qtuning_ledger/`` is read), or a single shard file. A path holding no ledger raises
    ``FileNotFoundError``; a ledger its run started but has not written a row into yet reads as an empty table.
    Ledgers moved aside by later runs (``qtuning_ledger.previous-*``) are read only when named.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no ledger at {path}: the path does not exist")
    if path.is_file():
        if path.suffix != ".parquet":
            raise FileNotFoundError(
                f"{path} is not a ledger shard: give a shard ({shard_name('<R>', '<N>')}), a ledger folder or a run's "
                "output_dir"
            )
        files = [path]
    else:
        inner = path / LEDGER_DIRNAME  # a run's output_dir
        folder = inner if not _is_ledger_folder(path) and _is_ledger_folder(inner) else path
        if not _is_ledger_folder(folder):
            aside = sorted(p.name for p in path.glob(f"{LEDGER_DIRNAME}.previous-*"))
            raise FileNotFoundError(
                f"no ledger in {path}: it holds no ledger shard ({SHARD_GLOB}) and no {LEDGER_DIRNAME}/ folder with "
                "one. Give a run's output_dir, its qtuning_ledger/ folder or a shard file (was the run started with "
                "qtuning_ledger='none'?)" + (f"; earlier ledgers moved aside here: {', '.join(aside)}" if aside else "")
            )
        files = sorted(folder.glob(SHARD_GLOB))
        if not files:
            return LEDGER_SCHEMA.empty_table()
    table = ds.dataset([str(f) for f in files], schema=LEDGER_SCHEMA, format="parquet").to_table()
    return table.sort_by([("step", "ascending"), ("rank", "ascending"), ("micro_batch", "ascending"), ("sample_id", "ascending")])


# ---------------------------------------------------------------------------------------------- runs and checkpoints
def modified_tag(path: Path) -> str:
    """The time ``path`` was last written, as the tag of a moved-aside output whose run is unknown."""
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))


def aside_path(path: Path, tag: str) -> Path:
    """Where an earlier run's output ``path`` is moved aside: ``<name>.previous-<tag>`` for a folder,
    ``<stem>.previous-<tag><suffix>`` for a file (``-2``, ``-3``... if that name is taken)."""
    stem, suffix = (path.name, "") if path.is_dir() or not path.suffix else (path.stem, path.suffix)
    candidate, n = path.with_name(f"{stem}.previous-{tag}{suffix}"), 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{stem}.previous-{tag}-{n}{suffix}")
    return candidate


def is_fresh_run(resume_from_checkpoint: str | bool | None, output_dir: str) -> bool | None:
    """Whether ``train(resume_from_checkpoint)`` starts at step 0 (True) or resumes (False); None where
    ``resume_from_checkpoint=True`` finds no checkpoint (transformers then raises its own error)."""
    checkpoint = resume_from_checkpoint
    if checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint

        checkpoint = get_last_checkpoint(output_dir)
        if checkpoint is None:
            return None
    return not checkpoint or not (Path(checkpoint) / "trainer_state.json").exists()


def write_checkpoint_id(folder: Path, run_id: str, step: int) -> None:
    """Record in a checkpoint folder the run its ledger belongs to, so a resume can tell it from another run's."""
    write_json(folder / LEDGER_ID_FILE, {"run_id": run_id, "step": step}, indent=None)


def open_for_run(ledger: DecisionLedger, resume_from_checkpoint: str | bool | None, output_dir: str) -> Path | None:
    """A fresh ledger for a fresh run (an earlier one is moved aside, never deleted: returns where to); for a resume,
    the ledger of the checkpoint's run, without the rows of the steps after the checkpoint (refused if it is another
    run's)."""
    fresh = is_fresh_run(resume_from_checkpoint, output_dir)
    if fresh is None:
        return None  # transformers raises its own clear error: leave the ledger as it is
    if fresh:  # transformers starts at step 0
        moved = ledger.start(uuid.uuid4().hex)
        if moved is not None:
            logger.warning(
                "Q-Tuning: %s held the ledger of an earlier run; this fresh run starts its own, so the earlier "
                "one was moved to %s (nothing is deleted).", ledger.directory, moved,
            )
        return moved
    from transformers.trainer_utils import get_last_checkpoint

    checkpoint = Path(get_last_checkpoint(output_dir) if resume_from_checkpoint is True else resume_from_checkpoint)
    step = int(json.loads((checkpoint / "trainer_state.json").read_text()).get("global_step", 0))
    try:
        checkpoint_id = json.loads((checkpoint / LEDGER_ID_FILE).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        checkpoint_id = None
    ledger_id, ledger_dir = ledger.run_id, ledger.directory
    if checkpoint_id is not None and ledger_id is not None and checkpoint_id != ledger_id:
        raise ValueError(_mismatched_ledger_message(ledger, checkpoint, checkpoint_id, step))
    if checkpoint_id is None:
        logger.warning(
            "Q-Tuning: checkpoint %s carries no ledger run id (saved without a ledger, or interrupted while saving): "
            "cannot check that %s is the ledger of its run. Continuing it; rows of steps after %d are dropped.",
            checkpoint, ledger_dir, step,
        )  # fmt: skip
    elif ledger_id is None and step > 0:
        logger.warning(
            "Q-Tuning: no ledger in %s: the ledger of this resumed run starts at step %d; the rows of steps 1-%d "
            "are in the ledger of the run that saved %s.", ledger_dir, step + 1, step, checkpoint,
        )  # fmt: skip
    # Steps after the checkpoint will be decided again: drop their old rows so none is counted twice.
    ledger.truncate_after(step)
    ledger.claim(checkpoint_id or ledger_id or uuid.uuid4().hex)
    return None

def _mismatched_ledger_message(ledger: DecisionLedger, checkpoint: Path, checkpoint_id: str, step: int) -> str:
    ledger_dir = ledger.directory
    info = ledger.info() or {}
    other = info.get("run_id", "")
    places = {ledger_dir.parent, checkpoint.parent}
    candidates = sorted(p for place in places for p in place.glob(f"{LEDGER_DIRNAME}*") if p.is_dir())
    own = next((p for p in candidates if DecisionLedger(p).run_id == checkpoint_id), None)
    aside = ledger_dir.with_name(f"{ledger_dir.name}.previous-{other[:8]}")
    if own is not None:
        way_out = (
            f"The ledger of run {checkpoint_id[:8]} is {own}: to resume it, move {ledger_dir} aside (e.g. to "
            f"{aside}) and move {own} to {ledger_dir}."
        )
    else:
        way_out = (
            f"No ledger of run {checkpoint_id[:8]} was found next to it: to resume with a new ledger that starts "
            f"at step {step + 1}, move {ledger_dir} aside (e.g. to {aside})."
        )
    return (
        f"Q-Tuning: checkpoint {checkpoint} belongs to run {checkpoint_id[:8]}, but {ledger_dir} holds the ledger "
        f"of run {other[:8]} (created {info.get('created', '?')}), another run into the same output_dir. Resuming "
        f"would write this run's steps into that run's ledger, so nothing was changed. {way_out}"
    )
