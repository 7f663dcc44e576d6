"""trl-qtuning: Q-Tuning (joint dynamic sample and token pruning for SFT, arXiv:2509.23873) for Hugging Face TRL.

Change two names in a TRL script: ``SFTConfig`` -> :class:`QTuningConfig`, ``SFTTrainer`` -> :class:`QTuningSFTTrainer`.
The pure tensor core (:func:`eu_plane_stats`, :func:`triage_samples`, :func:`prune_tokens`) is importable on its own.
"""

import importlib

from .core import SelectionParams, TriageResult, eu_plane_stats, prune_tokens, triage_samples
from .policies import select_qtuning

__version__ = "0.1.0"

__all__ = [
    "QTuningConfig",
    "QTuningDataCollator",
    "QTuningSFTTrainer",
    "SelectionParams",
    "TriageResult",
    "__version__",
    "eu_plane_stats",
    "prune_tokens",
    "read_ledger",
    "select_qtuning",
    "triage_samples",
]


_LAZY = {"QTuningConfig": ".config", "QTuningSFTTrainer": ".trainer", "QTuningDataCollator": ".step.collator",
         "read_ledger": ".ledger"}  # fmt: skip
"""Names imported on first use, and their modules."""


def __getattr__(name: str):
    # The trainer side imports TRL/transformers (seconds); the core stays importable without paying for it.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'trl_qtuning' has no attribute {name!r}")
