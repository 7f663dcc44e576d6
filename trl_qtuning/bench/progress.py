"""Progress while a cell trains: ``step i/N`` with the cell's ETA and a rough one for the whole bench.

A cell trained on to equal compute does not know its last step in advance: it is estimated from the compute per
step so far (the cell stops at the first step reaching the reference's compute, never before the equal-steps point,
never after ``equal_compute.max_steps``), and marked ``~``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from transformers import TrainerCallback

__all__ = ["CellProgress", "duration"]


def duration(seconds: float) -> str:
    """``75`` -> ``"1m 15s"``, ``4000`` -> ``"1h 07m"``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


@dataclass
class CellProgress(TrainerCallback):
    """Prints progress at most every ``every_seconds`` (and at the last step). Runs after the cell's ComputeMeter."""

    prefix: str
    meter: Any
    cells_after: int = 0
    """Cells still to run after this one."""
    seconds_per_cell: float | None = None
    """Mean wall time of the cells already run by this bench invocation (None: use this cell's own estimate)."""
    every_seconds: float = 30.0
    out: TextIO = field(default_factory=lambda: sys.stdout)
    _start: float = 0.0
    _last: float = -math.inf

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.monotonic()

    def last_step(self, state) -> tuple[int, bool]:
        """The step the cell will stop at, and whether that is an estimate."""
        target = getattr(self.meter, "target", None)
        if target is None or state.global_step == 0 or self.meter.cumulative <= 0:
            return int(state.max_steps), False
        per_step = self.meter.cumulative / state.global_step
        reaching = math.ceil(target / per_step)
        return int(min(state.max_steps, max(self.meter.min_steps, reaching))), True

    def on_step_end(self, args, state, control, **kwargs):
        now = time.monotonic()
        last, estimated = self.last_step(state)
        done = state.global_step >= last or control.should_training_stop
        if now - self._last < self.every_seconds and not done:
            return control
        self._last = now
        elapsed = now - self._start
        step = max(1, state.global_step)
        eta = elapsed / step * max(0, last - state.global_step)
        cell_total = elapsed + eta
        overall = eta + self.cells_after * (self.seconds_per_cell or cell_total)
        tail = f"; bench ETA ~{duration(overall)} with {self.cells_after} more cell(s)" if self.cells_after else ""
        print(f"  {self.prefix}: step {state.global_step}/{'~' if estimated else ''}{last}, {duration(elapsed)} "
              f"elapsed, ETA {duration(eta)}{tail}", file=self.out, flush=True)  # fmt: skip
        return control
