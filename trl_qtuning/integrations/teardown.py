"""Several processes torn down cleanly at the end of a script, whether or not it calls ``trainer.end()``.

Scripts written for ``SFTTrainer`` end with ``trainer.train()`` (and maybe a save). Left to the interpreter's
shutdown, the distributed process group outlives the script and is destroyed, if at all, from DDP's reducer while
the model is freed: with gloo that happens with the GIL held while a gloo worker may still need the GIL to free a
gathered tensor, and the process hangs at exit (pytorch/pytorch#56297; seen with 2 CPU processes).

So every trainer running in several processes is ended at interpreter exit (``atexit``) if the script did not end
it: the distributed wrapper is let go of first (:func:`release_distributed_wrapper`), then transformers'
``Trainer.end()`` finishes the trackers and destroys the group. ``trainer.end()`` does the same, earlier.

This covers scripts started by ``accelerate launch`` or ``torchrun``. Processes forked by ``notebook_launcher`` leave
through ``os._exit``, which runs no exit hook (and accelerate does not destroy a forked group either).
"""

from __future__ import annotations

import atexit
import gc
import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["end_at_exit", "release_before_group_ends", "release_distributed_wrapper", "unregister"]

logger = logging.getLogger(__name__)

_unended: weakref.WeakSet = weakref.WeakSet()
_hook_registered = False


def release_distributed_wrapper(trainer: Any) -> None:
    """Drop the trainer's distributed wrapper (DDP's reducer holds the process group) and accelerate's references to
    the prepared model, optimizer, scheduler and loaders: the training they served is over."""
    if trainer.model_wrapped is not trainer.model:
        trainer.model_wrapped = trainer.model
        trainer.accelerator.free_memory()


def release_before_group_ends(trainer: Any | None = None) -> None:
    """Let go of the wrappers of ``trainer`` and of every other trainer not yet ended, before the group is destroyed:
    the first ``end()`` destroys it for all of them, and a wrapper still alive then would be its last holder."""
    for each in ([trainer] if trainer is not None else []) + [t for t in list(_unended) if t is not trainer]:
        _logged(lambda t=each: release_distributed_wrapper(t), "letting go of the distributed wrapper")
    gc.collect()  # the released wrappers' reducers, now, while the group is still registered


def end_at_exit(trainer: Any) -> None:
    """End ``trainer`` at interpreter exit unless the script ends it first (only when it runs in several processes)."""
    global _hook_registered
    if trainer.accelerator.num_processes <= 1:
        return
    _unended.add(trainer)
    if not _hook_registered:
        atexit.register(_end_unended_trainers)
        _hook_registered = True


def unregister(trainer: Any) -> None:
    """``trainer`` was ended by the script: nothing to do for it at exit."""
    _unended.discard(trainer)


def _end_unended_trainers() -> None:
    """The exit hook: let go of every unended trainer's wrapper, then end them, then destroy a group nothing ended.

    Never raises: a failure here is logged, since the script itself has already finished.
    """
    release_before_group_ends()
    trainers = list(_unended)
    _unended.clear()
    for trainer in trainers:
        _logged(trainer.end, "ending the trainer at exit")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        _logged(torch.distributed.destroy_process_group, "destroying the process group at exit")


def _logged(action: Callable[[], Any], what: str) -> None:
    """Run ``action``; log (never raise) what failed."""
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - at exit, a warning is all that can help
        logger.warning("trl-qtuning: %s failed: %s", what, exc)
