"""The ``trl-qtuning`` command line (entry point :func:`trl_qtuning.cli.main.main`).

Subcommands live in their own modules (``trl_qtuning.cli.sft``...) and are imported only when they run. Nothing is
imported here, so ``python -m trl_qtuning.cli.main`` (and ``accelerate launch -m trl_qtuning.cli.main``) run cleanly.
"""
