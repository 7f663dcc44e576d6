"""``trl-qtuning bench --config matrix.yaml``: methods x budgets x seeds, one MLflow run per cell, one table.

    trl-qtuning bench --config recipes/bench/gsm8k_smollm2_cpu.yaml            # run (resumes), then print the table
    trl-qtuning bench --config recipes/bench/gsm8k_smollm2_cpu.yaml --only qtuning full
    trl-qtuning bench --config recipes/bench/gsm8k_smollm2_cpu.yaml --table-only

Every cell (a method, a budget, a seed) trains a fresh copy of the model with :class:`QTuningSFTTrainer`, counting its
compute (:mod:`trl_qtuning.bench.compute`) and recording a held-out learning curve, and is then evaluated (held-out answer
NLL, GSM8K exact match, ARC accuracy: :mod:`trl_qtuning.bench.evaluation`). Its result is
written to ``<output_dir>/<cell folder>/result.json``; a cell whose ``result.json`` is complete is skipped on the next
run, and a cell folder without one (an interrupted cell) is cleaned and run again. One extra ``base`` cell
evaluates the untrained model once. The evaluation metrics go into the same MLflow run as the cell's training.

The matrix file (all relative paths resolve against the CURRENT directory, not the YAML file's folder)::

    experiment: trl-qtuning-bench          # MLflow experiment name
    output_dir: bench_runs/gsm8k           # one folder per cell, results.md, results.json
    report_to: auto                        # auto (mlflow if installed) | mlflow | none
    tracking_uri: null                     # else MLFLOW_TRACKING_URI / MLflow's default
    model: demo                            # "demo" (embedded SmolLM2-135M-Instruct), a local model folder or a
                                           # LoRA run's output (its adapter merged into the base before training)
    lora: {r: 8, alpha: 16, dropout: 0.05, target_modules: all-linear}   # null: full fine-tuning
    data:
      train: {source: gsm8k_jsonl, path: ../shared/data/gsm8k/train.jsonl, size: 256, seed: 0}
      # train: {..., label_noise: 0.3}     # swap the answers of 30% of the training rows among themselves
      # train: {..., label_noise: 0.3, label_noise_type: numbers}   # or give each one carried arithmetic slip
      heldout_size: 64                     # rows split off the train pool for the held-out answer NLL
    training: {max_steps: 12, ...}         # QTuningConfig / SFTConfig fields shared by every cell
    eval:
      every_steps: 10                      # learning curve: held-out NLL every 10 steps and at the end
      transfer: {source: demo_math, size: 64, max_level: 2}   # a second held-out set from another distribution
      nll: true
      gsm8k: {size: 50, max_new_tokens: 256, path: null}
      arc_easy: {size: 100}
      arc_challenge: {size: 100}
      contrast: {kinds: [swap, numbers]}   # held-out contrasts a label noise moves: the answer under its own question
                                           # against another's; the right token against a carried slip's
    methods:                               # name -> QTuningConfig overrides (+ optional `budgets:`)
      full: {qtuning_enabled: false}
      qtuning: {}
      random-random: {sample_policy: random, token_policy: random}
      random-matched: {sample_policy: random, token_policy: random, match_label_tokens: qtuning}
    budgets: [[0.25, 0.5], [0.5, 0.7]]     # (sample_keep_ratio, token_keep_ratio)
    seeds: [0, 1, 2]
    equal_compute: {reference: full, max_steps: 400}   # train on to the reference's counted compute
    baselines: [full, random-random]       # paired per-seed differences against these (this is the default)
    clean_reference: recipes/bench/clean.yaml   # (a noisy matrix) its cells against this matrix's, seed by seed

Mistakes in the matrix are reported as one line naming the field (exit code 2) before anything is trained; set
``TRL_QTUNING_DEBUG=1`` for tracebacks.

The package, one module per job: ``matrix`` (schema and validation), ``data`` and ``noise`` (training rows and their
label noise), ``evaluation`` (held-out NLL, GSM8K exact match, ARC accuracy), ``contrast`` (contrasts a
noise can move), ``evaluate`` (evaluation glue and the learning curve), ``compute`` (counted compute),
``mlflow_runs`` (the cells' MLflow runs), ``runner`` (orchestration and resume), ``progress``, ``provenance``,
``results`` (cell records on disk), ``tables``, ``paired``, ``audit`` and ``figures`` (the results page) and ``cli``.
"""

from __future__ import annotations

import importlib
from typing import Any

from .cli import build_parser, main
from .matrix import (BASE_METHOD, PROG, BenchConfigError, Cell, EqualCompute, EvalSpec, Matrix, Method, TrainData,
                     budget_label, budget_tag, cell_config_kwargs, load_matrix, plan_cells)
from .results import RESULT_FILE, cell_record, read_result, write_json
from .tables import collect_rows, render_results

__all__ = [
    "BASE_METHOD", "PROG", "RESULT_FILE", "BenchConfigError", "Cell", "EqualCompute", "EvalSpec", "Matrix", "Method",
    "TrainData", "budget_label", "budget_tag", "build_parser", "cell_config_kwargs", "cell_record", "collect_rows",
    "load_matrix", "main", "plan_cells", "read_result", "render_results", "run_bench", "runner", "write_json",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    """``runner`` and ``run_bench`` on first use: they import the trainer (torch, transformers, TRL, peft), which
    ``--help`` and ``--table-only`` do not need."""
    if name in ("runner", "run_bench"):
        runner = importlib.import_module(".runner", __name__)
        return runner if name == "runner" else runner.run_bench
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "runner", "run_bench"})
