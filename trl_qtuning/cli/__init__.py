"""The ``trl-qtuning`` command line: ``trl-qtuning sft --config recipe.yaml`` and ``trl-qtuning demo``."""

from .main import main

__all__ = ["main"]
