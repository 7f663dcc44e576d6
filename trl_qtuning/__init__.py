"""trl-qtuning: Q-Tuning (joint dynamic sample and token pruning for SFT, arXiv:2509.23873) for Hugging Face TRL.

Change two names in a TRL script: ``SFTConfig`` -> :class:`QTuningConfig`, ``SFTTrainer`` -> :class:`QTuningSFTTrainer`.
The pure tensor core (:func:`eu_plane_stats`, :func:`triage_samples`, :func:`prune_tokens`) is importable on its own.
"""

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


def __getattr__(name: str):
    # The trainer side imports TRL/transformers (seconds); the core stays importable without paying for it.
    if name == "QTuningConfig":
        from .config import QTuningConfig

        return QTuningConfig
    if name == "QTuningSFTTrainer":
        from .trainer import QTuningSFTTrainer

        return QTuningSFTTrainer
    if name == "QTuningDataCollator":
        from .step.collator import QTuningDataCollator

        return QTuningDataCollator
    if name == "read_ledger":
        from .ledger import read_ledger

        return read_ledger
    raise AttributeError(f"module 'trl_qtuning' has no attribute {name!r}")
