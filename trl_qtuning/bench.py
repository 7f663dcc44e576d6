"""``trl-qtuning bench --config matrix.yaml``: methods x budgets x seeds, one MLflow run per cell, one table.

    trl-qtuning bench --config recipes/bench/gsm8k_smollm2_cpu.yaml            # run (resumes), then print the table
    trl-qtuning bench --config recipes/bench/gsm8k_smollm2_cpu.yaml --only qtuning full
    trl-qtuning bench --config recipes/bench/gsm8k_smollm2_cpu.yaml --table-only

Every cell (a method, a budget, a seed) trains a fresh copy of the model with :class:`QTuningSFTTrainer` and is then
evaluated (held-out answer NLL, GSM8K exact match, ARC accuracy: :mod:`trl_qtuning.evaluation`). Its result is
written to ``<output_dir>/<cell folder>/result.json``; a cell whose ``result.json`` is complete is skipped on the next
run, and a cell folder without one (an interrupted cell) is cleaned and run again. One extra ``base`` cell
evaluates the untrained model once. The evaluation metrics go into the same MLflow run as the cell's training.

The matrix file (all relative paths resolve against the CURRENT directory, not the YAML file's folder)::

    experiment: trl-qtuning-bench          # MLflow experiment name
    output_dir: bench_runs/gsm8k           # one folder per cell, results.md, results.json
    report_to: auto                        # auto (mlflow if installed) | mlflow | none
    tracking_uri: null                     # else MLFLOW_TRACKING_URI / MLflow's default
    model: demo                            # "demo" (embedded SmolLM2-135M-Instruct) or a local model folder
    lora: {r: 8, alpha: 16, dropout: 0.05, target_modules: all-linear}   # null: full fine-tuning
    data:
      train: {source: gsm8k_jsonl, path: ../shared/data/gsm8k/train.jsonl, size: 256, seed: 0}
      heldout_size: 64                     # rows split off the train pool for the held-out answer NLL
    training: {max_steps: 12, ...}         # QTuningConfig / SFTConfig fields shared by every cell
    eval:
      nll: true
      gsm8k: {size: 50, max_new_tokens: 256, path: null}
      arc_easy: {size: 100}
      arc_challenge: {size: 100}
    methods:                               # name -> QTuningConfig overrides (+ optional `budgets:`)
      full: {qtuning_enabled: false}
      qtuning: {}
    budgets: [[0.25, 0.5], [0.5, 0.7]]     # (sample_keep_ratio, token_keep_ratio)
    seeds: [0, 1, 2]

Mistakes in the matrix are reported as one line naming the field (exit code 2) before anything is trained; set
``TRL_QTUNING_DEBUG=1`` for tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .cli.sft import CliError, _debug, _one_line, run_reporting_errors

__all__ = [
    "BenchConfigError",
    "Cell",
    "Matrix",
    "load_matrix",
    "main",
    "plan_cells",
    "render_results",
    "run_bench",
]

PROG = "trl-qtuning bench"
RESULT_FILE = "result.json"
RESULT_FORMAT = 1
BASE_METHOD = "base"
RESULTS_MD = "results.md"
RESULTS_JSON = "results.json"
MATRIX_COPY = "matrix.yaml"

TOP_KEYS = (
    "experiment", "output_dir", "report_to", "tracking_uri", "model", "lora", "data", "training", "eval", "methods",
    "budgets", "seeds",
)  # fmt: skip
SOURCES = ("gsm8k_jsonl", "demo_math", "arithmetic", "local")
SOURCE_KEYS = {
    "gsm8k_jsonl": ("source", "path", "size", "seed", "strip_calculator"),
    "demo_math": ("source", "size", "seed", "subjects", "max_level", "max_chars"),
    "arithmetic": ("source", "size", "seed", "noisy_share"),
    "local": ("source", "path", "size", "seed"),
}
LORA_KEYS = ("r", "alpha", "dropout", "target_modules")
EVAL_KEYS = ("nll", "gsm8k", "arc_easy", "arc_challenge", "seed", "base")
# Set by the bench for every cell; a matrix may not set them in `training:` or a method.
OWNED_FIELDS = {
    "output_dir": "one folder per cell under the matrix's `output_dir`",
    "run_name": "the cell id",
    "report_to": "the matrix's top-level `report_to`",
    "seed": "the matrix's `seeds:` list",
    "sample_keep_ratio": "`budgets:` (top level, or `budgets:` inside the method)",
    "token_keep_ratio": "`budgets:` (top level, or `budgets:` inside the method)",
}
METRIC_COLUMNS = (  # result key, table header, kind
    ("eval/nll", "held-out NLL", "nll"),
    ("eval/gsm8k_em", "GSM8K EM %", "pct"),
    ("eval/arc_easy_acc", "ARC-E acc %", "pct"),
    ("eval/arc_challenge_acc", "ARC-C acc %", "pct"),
)
_FOLDER_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class BenchConfigError(CliError):
    """A mistake in the matrix file (exit code 2)."""


# ----------------------------------------------------------------------------------------------------------------------
# The matrix
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Method:
    name: str
    overrides: dict[str, Any]
    budgets: list[tuple[float, float] | None]
    """``[None]`` for a method trained without Q-Tuning (one cell per seed, no budget)."""
    qtuning_enabled: bool


@dataclasses.dataclass
class Matrix:
    path: Path
    text: str
    experiment: str
    output_dir: Path
    report_to: str
    """``"mlflow"`` or ``"none"`` (``auto`` is resolved when the matrix is loaded)."""
    tracking_uri: str | None
    model: str
    """``"demo"`` or a local model folder (absolute)."""
    lora: dict[str, Any] | None
    train: dict[str, Any]
    heldout_size: int
    training: dict[str, Any]
    eval: dict[str, Any]
    methods: list[Method]
    seeds: list[int]

    def method(self, name: str) -> Method:
        return next(m for m in self.methods if m.name == name)


@dataclasses.dataclass(frozen=True)
class Cell:
    method: str
    budget: tuple[float, float] | None
    seed: int | None
    """``None`` for the base cell."""

    @property
    def is_base(self) -> bool:
        return self.method == BASE_METHOD

    @property
    def id(self) -> str:
        if self.is_base:
            return BASE_METHOD
        return f"{self.method}{'@' + budget_tag(self.budget) if self.budget else ''}/seed{self.seed}"

    @property
    def dirname(self) -> str:
        if self.is_base:
            return BASE_METHOD
        return f"{self.method}{'_r' + budget_tag(self.budget) if self.budget else ''}_seed{self.seed}"

    @property
    def row_key(self) -> tuple[str, tuple[float, float] | None]:
        return (self.method, self.budget)


def _pct(value: float) -> str:
    return f"{value * 100:.4g}"


def budget_tag(budget: tuple[float, float]) -> str:
    """``(0.25, 0.5)`` -> ``"25x50"``."""
    return f"{_pct(budget[0])}x{_pct(budget[1])}"


def budget_label(budget: tuple[float, float] | None) -> str:
    """``(0.25, 0.5)`` -> ``"25% x 50%"``; no budget -> ``"-"``."""
    return f"{_pct(budget[0])}% x {_pct(budget[1])}%" if budget else "-"


def _err(where: str, problem: str, fix: str | None = None) -> BenchConfigError:
    return BenchConfigError(f"{where}: {problem}" + (f" (fix: {fix})" if fix else ""))


def _mapping(value: Any, where: str, allowed: tuple[str, ...] | None = None, *, null_ok: bool = False) -> dict:
    if value is None and null_ok:
        return {}
    if value is None:
        raise _err(where, "missing", f"add a `{where.rsplit('.', 1)[-1]}:` mapping (see `{PROG} --help`)")
    if not isinstance(value, dict):
        raise _err(where, f"must be a mapping, got {type(value).__name__} {value!r}", "write `key: value` pairs")
    for key in value:
        if not isinstance(key, str):
            raise _err(where, f"keys must be strings, got {key!r}")
    if allowed is not None:
        unknown = [k for k in value if k not in allowed]
        if unknown:
            raise _err(
                f"{where}.{unknown[0]}" if where else unknown[0], "unknown key",
                f"use one of {', '.join(allowed)}",
            )
    return value


def _int(value: Any, where: str, minimum: int | None = None, *, null_ok: bool = False) -> int | None:
    if value is None and null_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _err(where, f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise _err(where, f"must be >= {minimum}, got {value}")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _err(where, f"must be a number, got {value!r}")
    return float(value)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise _err(where, f"must be true or false, got {value!r}")
    return value


def _str(value: Any, where: str, *, null_ok: bool = False) -> str | None:
    if value is None and null_ok:
        return None
    if not isinstance(value, str) or not value.strip():
        raise _err(where, f"must be a non-empty string, got {value!r}")
    return value


def _existing_path(value: Any, where: str, *, check: bool, kind: str = "file") -> str:
    text = _str(value, where)
    path = Path(text).expanduser()
    resolved = (path if path.is_absolute() else Path.cwd() / path).resolve()
    if check and not resolved.exists():
        raise _err(
            where, f"{kind} not found: {text}",
            f"relative paths resolve against the current directory {Path.cwd()}; give an existing path",
        )
    return str(resolved)


def _budgets(value: Any, where: str) -> list[tuple[float, float]]:
    if not isinstance(value, list) or not value:
        raise _err(where, f"must be a non-empty list of [sample_keep_ratio, token_keep_ratio] pairs, got {value!r}",
                   "e.g. [[0.25, 0.5], [0.5, 0.7]]")
    budgets: list[tuple[float, float]] = []
    for i, pair in enumerate(value):
        here = f"{where}[{i}]"
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise _err(here, f"must be a pair [sample_keep_ratio, token_keep_ratio], got {pair!r}", "e.g. [0.25, 0.5]")
        ratios = []
        for j, name in enumerate(("sample_keep_ratio", "token_keep_ratio")):
            ratio = _number(pair[j], f"{here} ({name})")
            if not 0.0 < ratio <= 1.0:
                raise _err(f"{here} ({name})", f"must be in (0, 1], got {pair[j]!r}", "use a share such as 0.25")
            ratios.append(ratio)
        budget = (ratios[0], ratios[1])
        if budget in budgets:
            raise _err(here, f"duplicate budget {budget_label(budget)}", "list each budget once")
        budgets.append(budget)
    return budgets


def _qtuning_fields() -> set[str]:
    from .config import QTuningConfig

    return {f.name for f in dataclasses.fields(QTuningConfig) if f.init}


def _check_fields(settings: dict[str, Any], where: str, fields: set[str]) -> None:
    for key in settings:
        if key in OWNED_FIELDS:
            raise _err(f"{where}.{key}", "is set by the bench for every cell", f"set it through {OWNED_FIELDS[key]}")
        if key not in fields:
            raise _err(
                f"{where}.{key}", "unknown QTuningConfig field",
                "check the spelling; valid keys are the fields of QTuningConfig / trl.SFTConfig "
                "(`trl-qtuning sft --help` lists them)",
            )


def _default_training() -> dict[str, Any]:
    """Bench defaults for every cell (a matrix's `training:` overrides them): what demo/run.py uses on a CPU."""
    import torch

    from .demo.run import _bf16_is_fast

    use_cuda = torch.cuda.is_available()
    # transformers 5.2x renamed `gradient_checkpointing` to `activation_checkpointing` (the old name warns).
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in _qtuning_fields() else "gradient_checkpointing"
    return {
        "use_cpu": not use_cuda,
        "bf16": _bf16_is_fast(use_cuda),  # bf16 autocast only where the hardware makes it fast
        checkpointing: False,
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def _with_defaults(*layers: dict[str, Any]) -> dict[str, Any]:
    """The bench defaults under the given settings (a set `gradient_checkpointing` drops the default's alias)."""
    merged = _default_training()
    settings = {k: v for layer in layers for k, v in layer.items()}
    if {"gradient_checkpointing", "activation_checkpointing"} & set(settings):
        merged.pop("gradient_checkpointing", None)
        merged.pop("activation_checkpointing", None)
    return {**merged, **settings}


def cell_config_kwargs(matrix: Matrix, cell: Cell, method: Method) -> dict[str, Any]:
    """The keyword arguments of the cell's ``QTuningConfig``."""
    kwargs = _with_defaults(matrix.training, method.overrides)
    if cell.budget is not None:
        kwargs["sample_keep_ratio"], kwargs["token_keep_ratio"] = cell.budget
    kwargs.update(
        seed=int(cell.seed or 0),
        output_dir=str(matrix.output_dir / cell.dirname),
        run_name=cell.id,
        report_to=["mlflow"] if matrix.report_to == "mlflow" else "none",
    )
    return kwargs


def _build_config(kwargs: dict[str, Any], where: str):
    from .config import QTuningConfig

    try:
        return QTuningConfig(**kwargs)
    except TypeError as exc:  # an unknown field (a QTuningConfig of an older/newer trl-qtuning)
        match = re.search(r"unexpected keyword argument '([^']+)'", str(exc))
        key = match.group(1) if match else "?"
        raise _err(f"{where}.{key}", "unknown QTuningConfig field", "check the spelling or update trl-qtuning") from exc
    except ValueError as exc:  # QTuningConfig / SFTConfig / TrainingArguments validation
        raise _err(where, _one_line(exc)) from exc


def load_matrix(path: str | Path, *, check_inputs: bool = True) -> Matrix:
    """Read and validate a matrix file. ``check_inputs``: also check model and data paths and build every cell's
    ``QTuningConfig`` (so a bad field fails here, before anything trains)."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise BenchConfigError(f"matrix file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BenchConfigError(f"{path}: not valid YAML: {_one_line(exc)}") from exc
    raw = _mapping(raw, "", TOP_KEYS) if raw is not None else {}

    experiment = _str(raw.get("experiment", "trl-qtuning-bench"), "experiment")
    if "output_dir" not in raw:
        raise _err("output_dir", "missing", "add `output_dir: bench_runs/<name>` (one folder per cell goes there)")
    output_dir = Path(_str(raw["output_dir"], "output_dir")).expanduser()
    output_dir = output_dir if output_dir.is_absolute() else Path.cwd() / output_dir

    report_to = raw.get("report_to", "auto")
    if report_to not in ("auto", "mlflow", "none"):
        raise _err("report_to", f"must be auto, mlflow or none, got {report_to!r}")
    mlflow_installed = importlib.util.find_spec("mlflow") is not None
    if report_to == "auto":
        report_to = "mlflow" if mlflow_installed else "none"
    elif report_to == "mlflow" and not mlflow_installed and check_inputs:
        raise _err("report_to", "mlflow is not installed", "pip install 'trl-qtuning[mlflow]', or set report_to: none")
    tracking_uri = _str(raw.get("tracking_uri"), "tracking_uri", null_ok=True)

    model = _str(raw.get("model", "demo"), "model")
    if model != "demo":
        model = _existing_path(model, "model", check=check_inputs, kind="model folder")
        if check_inputs and not (Path(model) / "config.json").is_file():
            raise _err("model", f"not a model folder (no config.json): {model}", "give `demo` or a saved model folder")

    lora_raw = raw.get("lora", {})
    lora = None
    if lora_raw is not None:
        lora_raw = _mapping(lora_raw, "lora", LORA_KEYS)
        lora = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear", **lora_raw}
        _int(lora["r"], "lora.r", 1)
        if _number(lora["alpha"], "lora.alpha") <= 0:
            raise _err("lora.alpha", f"must be > 0, got {lora['alpha']!r}")
        if not 0.0 <= _number(lora["dropout"], "lora.dropout") < 1.0:
            raise _err("lora.dropout", f"must be in [0, 1), got {lora['dropout']!r}")
        targets = lora["target_modules"]
        if not (isinstance(targets, str) and targets) and not (
            isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)
        ):
            raise _err("lora.target_modules", f"must be a string or a list of module names, got {targets!r}",
                       "e.g. all-linear or [q_proj, v_proj]")

    data = _mapping(raw.get("data"), "data", ("train", "heldout_size"))
    if "train" not in data:
        raise _err("data.train", "missing", "add `train: {source: gsm8k_jsonl, path: ..., size: 256}`")
    train = dict(_mapping(data["train"], "data.train"))
    source = train.get("source")
    if source not in SOURCES:
        raise _err("data.train.source", f"must be one of {', '.join(SOURCES)}, got {source!r}")
    _mapping(train, "data.train", SOURCE_KEYS[source])
    if source in ("gsm8k_jsonl", "local"):
        if train.get("path") is None:
            raise _err("data.train.path", f"missing (source {source} reads a local file)", "give the file's path")
        train["path"] = _existing_path(train["path"], "data.train.path", check=check_inputs)
    train["size"] = _int(train.get("size"), "data.train.size", 1, null_ok=True)
    train["seed"] = _int(train.get("seed", 0), "data.train.seed")
    if source == "arithmetic":
        train.setdefault("size", None)
        if "noisy_share" in train and not 0.0 <= _number(train["noisy_share"], "data.train.noisy_share") <= 1.0:
            raise _err("data.train.noisy_share", f"must be in [0, 1], got {train['noisy_share']!r}")
    if source == "demo_math":
        _int(train.get("max_level"), "data.train.max_level", 1, null_ok=True)
        _int(train.get("max_chars"), "data.train.max_chars", 1, null_ok=True)
    if source == "gsm8k_jsonl":
        _bool(train.get("strip_calculator", False), "data.train.strip_calculator")
    heldout_size = _int(data.get("heldout_size", 0), "data.heldout_size", 0)

    training = dict(_mapping(raw.get("training"), "training", null_ok=True))
    fields = _qtuning_fields()
    _check_fields(training, "training", fields)

    eval_spec = _parse_eval(raw.get("eval"), heldout_size, check_inputs)

    methods_raw = raw.get("methods")
    if not methods_raw:
        raise _err("methods", "missing or empty", "add e.g. `methods: {full: {qtuning_enabled: false}, qtuning: {}}`")
    methods_raw = _mapping(methods_raw, "methods")
    top_budgets = _budgets(raw["budgets"], "budgets") if "budgets" in raw else None
    default_enabled = training.get("qtuning_enabled", True)
    methods: list[Method] = []
    for name, overrides in methods_raw.items():
        where = f"methods.{name}"
        if not _FOLDER_SAFE.match(name):
            raise _err(where, "method names must be folder-safe", "use letters, digits, '-', '_' and '.' only")
        if name == BASE_METHOD:
            raise _err(where, f"{BASE_METHOD!r} is reserved for the untrained model's row", "rename the method")
        overrides = dict(_mapping(overrides, where, null_ok=True))
        pinned = overrides.pop("budgets", None)
        _check_fields(overrides, where, fields)
        enabled = overrides.get("qtuning_enabled", default_enabled)
        if not isinstance(enabled, bool):
            raise _err(f"{where}.qtuning_enabled", f"must be true or false, got {enabled!r}")
        if not enabled:
            if pinned is not None:
                raise _err(f"{where}.budgets", "a method without Q-Tuning (qtuning_enabled: false) has no budget",
                           "remove `budgets:` from this method")
            budgets: list[tuple[float, float] | None] = [None]
        elif pinned is not None:
            budgets = list(_budgets(pinned, f"{where}.budgets"))
        elif top_budgets is not None:
            budgets = list(top_budgets)
        else:
            raise _err("budgets", f"missing, and method {name!r} uses Q-Tuning",
                       "add `budgets: [[0.25, 0.5]]` at the top level or inside the method")
        methods.append(Method(name, overrides, budgets, enabled))

    seeds_raw = raw.get("seeds", [0])
    if not isinstance(seeds_raw, list) or not seeds_raw:
        raise _err("seeds", f"must be a non-empty list of integers, got {seeds_raw!r}", "e.g. [0, 1, 2]")
    seeds = [_int(s, f"seeds[{i}]", 0) for i, s in enumerate(seeds_raw)]
    if len(set(seeds)) != len(seeds):
        raise _err("seeds", f"duplicate seeds in {seeds}", "list each seed once")

    matrix = Matrix(
        path=path, text=text, experiment=experiment, output_dir=output_dir, report_to=report_to,
        tracking_uri=tracking_uri, model=model, lora=lora, train=train, heldout_size=heldout_size,
        training=training, eval=eval_spec, methods=methods, seeds=seeds,
    )  # fmt: skip
    if check_inputs:
        _build_config({**_with_defaults(training), "output_dir": str(output_dir / "_check")}, "training")
        for method in methods:
            for budget in method.budgets:
                cell = Cell(method.name, budget, seeds[0])
                where = f"methods.{method.name}" + (f" (budget {budget_label(budget)})" if budget else "")
                _build_config(cell_config_kwargs(matrix, cell, method), where)
    return matrix


def _parse_eval(value: Any, heldout_size: int, check_inputs: bool) -> dict[str, Any]:
    raw = _mapping(value, "eval", EVAL_KEYS, null_ok=True) if value is not None else {"nll": True}
    spec: dict[str, Any] = {"seed": _int(raw.get("seed", 0), "eval.seed"), "base": _bool(raw.get("base", True), "eval.base")}
    nll = raw.get("nll", True)
    if isinstance(nll, bool):
        nll = {} if nll else None
    if nll is not None:
        nll = {"batch_size": 8, "max_length": 1024, **_mapping(nll, "eval.nll", ("batch_size", "max_length"))}
        _int(nll["batch_size"], "eval.nll.batch_size", 1)
        _int(nll["max_length"], "eval.nll.max_length", 1)
        if heldout_size < 1:
            raise _err("eval.nll", "needs held-out rows, but data.heldout_size is 0",
                       "set data.heldout_size (e.g. 64), or eval.nll: false")
    spec["nll"] = nll
    gsm8k = raw.get("gsm8k")
    if gsm8k is not None and gsm8k is not False:
        gsm8k = {"size": 50, "max_new_tokens": 256, "batch_size": 16, "path": None, "source": None,
                 **_mapping(gsm8k, "eval.gsm8k", ("size", "max_new_tokens", "batch_size", "path", "source"), null_ok=True)}  # fmt: skip
        _int(gsm8k["size"], "eval.gsm8k.size", 1)
        _int(gsm8k["max_new_tokens"], "eval.gsm8k.max_new_tokens", 1)
        _int(gsm8k["batch_size"], "eval.gsm8k.batch_size", 1)
        if gsm8k["source"] is None:
            gsm8k["source"] = "gsm8k_jsonl" if gsm8k["path"] else "gsm8k_test"
        if gsm8k["source"] not in ("gsm8k_test", "gsm8k_jsonl", "arithmetic"):
            raise _err("eval.gsm8k.source", f"must be gsm8k_test, gsm8k_jsonl or arithmetic, got {gsm8k['source']!r}")
        if gsm8k["source"] == "gsm8k_jsonl":
            if not gsm8k["path"]:
                raise _err("eval.gsm8k.path", "missing (source gsm8k_jsonl)", "give the test jsonl's path")
            gsm8k["path"] = _existing_path(gsm8k["path"], "eval.gsm8k.path", check=check_inputs)
    spec["gsm8k"] = gsm8k or None
    for name in ("arc_easy", "arc_challenge"):
        arc = raw.get(name)
        if arc is not None and arc is not False:
            arc = {"size": 100, "batch_size": 16, "max_length": 512, "subset": "test", "source": "arc",
                   **_mapping(arc, f"eval.{name}", ("size", "batch_size", "max_length", "subset", "source"), null_ok=True)}  # fmt: skip
            _int(arc["size"], f"eval.{name}.size", 1)
            _int(arc["batch_size"], f"eval.{name}.batch_size", 1)
            _int(arc["max_length"], f"eval.{name}.max_length", 1)
            if arc["subset"] not in ("test", "validation"):
                raise _err(f"eval.{name}.subset", f"must be test or validation, got {arc['subset']!r}")
            if arc["source"] not in ("arc", "arithmetic"):
                raise _err(f"eval.{name}.source", f"must be arc or arithmetic, got {arc['source']!r}")
        spec[name] = arc or None
    if check_inputs and _eval_enabled(spec) and importlib.util.find_spec("trl_qtuning.evaluation") is None:
        raise _err("eval", "the evaluation module trl_qtuning.evaluation is not available in this installation",
                   "update trl-qtuning, or disable every evaluation (nll: false, no gsm8k/arc_easy/arc_challenge)")
    return spec


def _eval_enabled(spec: dict[str, Any]) -> bool:
    return any(spec.get(name) for name in ("nll", "gsm8k", "arc_easy", "arc_challenge"))


def plan_cells(matrix: Matrix, only: list[str] | None = None) -> list[Cell]:
    """Every cell in run order: ``base`` (if ``eval.base`` and an evaluation is enabled), then seed by seed, each
    method's budgets, so a bench stopped early still has every method at the first seeds. ``only``: method names
    (``base`` included) to keep."""
    cells: list[Cell] = []
    if matrix.eval["base"] and _eval_enabled(matrix.eval):
        cells.append(Cell(BASE_METHOD, None, None))
    for seed in matrix.seeds:
        for method in matrix.methods:
            cells.extend(Cell(method.name, budget, seed) for budget in method.budgets)
    if only:
        names = {BASE_METHOD} | {m.name for m in matrix.methods}
        unknown = [name for name in only if name not in names]
        if unknown:
            raise BenchConfigError(
                f"--only {unknown[0]}: no such method in the matrix (methods: {', '.join(sorted(names))})"
            )
        cells = [c for c in cells if c.method in only]
    return cells


# ----------------------------------------------------------------------------------------------------------------------
# Results on disk
# ----------------------------------------------------------------------------------------------------------------------


def read_result(cell_dir: Path, cell: Cell | None = None) -> dict[str, Any] | None:
    """The cell's result if its ``result.json`` is complete (else None)."""
    path = cell_dir / RESULT_FILE
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or result.get("status") != "complete" or not isinstance(result.get("metrics"), dict):
        return None
    if cell is not None and result.get("cell_id") != cell.id:
        return None
    return result


def _write_json(path: Path, payload: Any) -> None:
    """Atomically (a killed process never leaves a half-written result that looks complete)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def fingerprint(matrix: Matrix, cell: Cell) -> str:
    """A hash of every setting the cell's result depends on (to flag results made with other settings)."""
    method = None if cell.is_base else matrix.method(cell.method)
    payload = {
        "model": matrix.model, "eval": matrix.eval, "heldout_size": matrix.heldout_size, "train": matrix.train,
        "lora": None if cell.is_base else matrix.lora, "training": None if cell.is_base else matrix.training,
        "overrides": method.overrides if method else None, "budget": cell.budget, "seed": cell.seed,
    }  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def git_state() -> dict[str, Any]:
    """Commit and dirty flag of the git working tree holding this package (else of the current directory)."""
    for where in (Path(__file__).resolve().parent, Path.cwd()):
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"], cwd=where, capture_output=True, text=True,
                timeout=20, check=True,
            ).stdout
            return {"commit": commit, "dirty": bool(status.strip())}
        except (OSError, subprocess.SubprocessError):
            continue
    return {"commit": None, "dirty": None}


def library_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("trl-qtuning", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "mlflow"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def machine_summary() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    summary: dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform()}
    with contextlib.suppress(Exception):  # a machine summary never fails the table
        import torch

        summary["torch_threads"] = torch.get_num_threads()
        summary["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def _ranked(dataset, seed: int, salt: str):
    """The rows ranked by ``sha256(seed:salt:uid)`` (row index without a uid column): same for every cell and
    library version."""
    keys = list(dataset["uid"]) if "uid" in dataset.column_names else [str(i) for i in range(len(dataset))]
    order = sorted(range(len(dataset)), key=lambda i: hashlib.sha256(f"{seed}:{salt}:{keys[i]}".encode()).digest())
    return dataset.select(order)


def _first(dataset, size: int | None, seed: int, salt: str):
    if size is None or size >= len(dataset):
        return dataset
    return _ranked(dataset, seed, salt).select(range(size))


def _arithmetic_rows(n: int, seed: int, noisy_share: float):
    """Tiny synthetic conversational prompt/completion rows with a uid and the final number as ``answer``."""
    from .testing import make_arithmetic_dataset

    dataset = make_arithmetic_dataset(n, seed=seed, conversational=True, noisy_share=noisy_share)

    def add(row, i):
        return {"uid": f"arithmetic/{seed}/{i}", "answer": row["completion"][0]["content"].split()[-2]}

    return dataset.map(add, with_indices=True)


def _arithmetic_choices(n: int, seed: int):
    """A multiple-choice twin of the arithmetic data (question, 4 choices, label_index) for tests."""
    import random

    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        wrong = rng.sample([v for v in range(99) if v != a + b], 3)
        choices = [str(v) for v in [a + b, *wrong]]
        rng.shuffle(choices)
        rows.append({"question": f"what is {a} plus {b} ?", "choices": choices, "label_index": choices.index(str(a + b)),
                     "uid": f"arithmetic_mc/{seed}/{i}"})  # fmt: skip
    return Dataset.from_list(rows)


def _as_prompt_completion(dataset, where: str):
    columns = set(dataset.column_names)
    if {"prompt", "completion"} <= columns:
        return dataset
    if {"question", "answer"} <= columns:
        return dataset.map(
            lambda row: {
                "prompt": [{"role": "user", "content": row["question"]}],
                "completion": [{"role": "assistant", "content": row["answer"]}],
            },
            remove_columns=sorted(columns),
        )
    raise _err(where, f"needs 'prompt'/'completion' (or 'question'/'answer') columns, found {sorted(columns)}",
               "convert the file to prompt/completion rows", )


def load_train_pool(matrix: Matrix):
    """The training pool of ``data.train`` before the held-out split."""
    spec = matrix.train
    source = spec["source"]
    if source == "gsm8k_jsonl":
        from .demo.assets import load_local_gsm8k_jsonl

        return load_local_gsm8k_jsonl(spec["path"], strip_calculator=bool(spec.get("strip_calculator", False)))
    if source == "demo_math":
        from .demo.assets import load_math_pool

        return load_math_pool(spec.get("subjects"), spec.get("max_level"), spec.get("max_chars"))
    if source == "arithmetic":
        size = spec["size"] or 64
        return _arithmetic_rows(size + matrix.heldout_size, spec["seed"], float(spec.get("noisy_share", 0.2)))
    from .cli.sft import load_local_dataset

    loaded = load_local_dataset(Path(spec["path"]))
    dataset = loaded["train"] if hasattr(loaded, "keys") else loaded
    return _as_prompt_completion(dataset, "data.train.path")


def prepare_data(matrix: Matrix) -> dict[str, Any]:
    """Train subset, held-out rows and evaluation subsets: the same for every cell."""
    from .demo.assets import split_pool

    pool = load_train_pool(matrix)
    spec = matrix.train
    if matrix.heldout_size >= len(pool):
        raise _err("data.heldout_size", f"{matrix.heldout_size} >= the {len(pool)} rows of the training pool",
                   "use a smaller held-out size")
    train, heldout = split_pool(pool, matrix.heldout_size, spec["seed"])
    if spec["size"] is not None and spec["size"] > len(train):
        raise _err("data.train.size", f"{spec['size']} > the {len(train)} rows left after the held-out split",
                   f"use at most {len(train)}, or null for all")
    train = _first(train, spec["size"], spec["seed"], "train")
    keep = [c for c in ("prompt", "completion") if c in train.column_names]
    train = train.select_columns(keep) if len(keep) == 2 else train
    data: dict[str, Any] = {"train": train, "heldout": heldout}
    ev, seed = matrix.eval, matrix.eval["seed"]
    if ev["gsm8k"]:
        g = ev["gsm8k"]
        if g["source"] == "arithmetic":
            pool_g = _arithmetic_rows(g["size"], 10_000 + seed, 0.0)
        elif g["source"] == "gsm8k_jsonl":
            from .demo.assets import load_local_gsm8k_jsonl

            pool_g = load_local_gsm8k_jsonl(g["path"])
        else:
            from .demo.assets import load_gsm8k_test

            pool_g = load_gsm8k_test()
        data["gsm8k"] = _first(pool_g, g["size"], seed, "gsm8k")
    for name in ("arc_easy", "arc_challenge"):
        a = ev[name]
        if a:
            if a["source"] == "arithmetic":
                pool_a = _arithmetic_choices(a["size"], 20_000 + seed + (name == "arc_challenge"))
            else:
                from .demo.assets import load_arc

                pool_a = load_arc(name.removeprefix("arc_"), a["subset"])  # type: ignore[arg-type]
            data[name] = _first(pool_a, a["size"], seed, name)
    return data


# ----------------------------------------------------------------------------------------------------------------------
# Model, evaluation and tracking
# ----------------------------------------------------------------------------------------------------------------------


def _model_path(matrix: Matrix) -> Path:
    if matrix.model == "demo":
        from .demo.assets import demo_model_path

        return demo_model_path()
    return Path(matrix.model)


def load_model_and_tokenizer(matrix: Matrix):
    import torch

    if matrix.model == "demo":
        from .demo.assets import load_demo_model_and_tokenizer

        return load_demo_model_and_tokenizer(_model_path(matrix))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(matrix.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(matrix.model, dtype=torch.float32)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def peft_config(matrix: Matrix):
    if matrix.lora is None:
        return None
    from peft import LoraConfig

    lora = matrix.lora
    return LoraConfig(
        r=int(lora["r"]), lora_alpha=lora["alpha"], lora_dropout=float(lora["dropout"]),
        target_modules=lora["target_modules"], task_type="CAUSAL_LM",
    )  # fmt: skip


def evaluate(model, tokenizer, matrix: Matrix, data: dict[str, Any], *, bf16: bool, cell_dir: Path) -> dict[str, float]:
    """Every enabled evaluation, as ``eval/...`` metrics (GSM8K predictions saved to ``cell_dir``)."""
    if not _eval_enabled(matrix.eval):
        return {}
    import torch

    from . import (
        evaluation,  # written alongside; imported only when something is evaluated
    )

    ev = matrix.eval
    model.eval()
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    metrics: dict[str, float] = {}
    with torch.no_grad(), autocast:
        if ev["nll"]:
            out = evaluation.answer_nll(
                model, tokenizer, data["heldout"], batch_size=ev["nll"]["batch_size"], max_length=ev["nll"]["max_length"]
            )
            metrics["eval/nll"] = float(out["nll"])
            metrics["eval/nll_tokens"] = float(out["tokens"])
            metrics["eval/nll_samples"] = float(out["samples"])
        if ev["gsm8k"]:
            g = ev["gsm8k"]
            out = evaluation.gsm8k_exact_match(
                model, tokenizer, data["gsm8k"], max_new_tokens=g["max_new_tokens"], batch_size=g["batch_size"]
            )
            metrics["eval/gsm8k_em"] = float(out["exact_match"])
            metrics["eval/gsm8k_n"] = float(out["n"])
            with contextlib.suppress(OSError), (cell_dir / "gsm8k_predictions.jsonl").open("w", encoding="utf-8") as fh:
                for row, prediction in zip(data["gsm8k"], out.get("predictions") or []):
                    fh.write(json.dumps({"uid": row.get("uid"), "answer": row.get("answer"),
                                         "prediction": prediction}, default=str) + "\n")  # fmt: skip
        for name in ("arc_easy", "arc_challenge"):
            if ev[name]:
                a = ev[name]
                out = evaluation.multiple_choice_accuracy(
                    model, tokenizer, data[name], batch_size=a["batch_size"], max_length=a["max_length"]
                )
                metrics[f"eval/{name}_acc"] = float(out["accuracy"])
                metrics[f"eval/{name}_acc_norm"] = float(out["accuracy_norm"])
                metrics[f"eval/{name}_n"] = float(out["n"])
    return metrics


def _apply_environ(values: dict[str, str | None]) -> None:
    """Set each variable, or unset it where the value is None."""
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@contextlib.contextmanager
def _environ(updates: dict[str, str | None]):
    saved = {name: os.environ.get(name) for name in updates}
    try:
        _apply_environ(updates)
        yield
    finally:
        _apply_environ(saved)


def _tracking_env(matrix: Matrix, tags: dict[str, str]) -> dict[str, str | None]:
    """What the tracking callback reads: the experiment, the store, extra tags; never an inherited run id."""
    if matrix.report_to != "mlflow":
        return {}
    extra: dict[str, Any] = {}
    with contextlib.suppress(ValueError, TypeError):
        extra = json.loads(os.environ.get("MLFLOW_TAGS") or "{}")
    env: dict[str, str | None] = {
        "MLFLOW_EXPERIMENT_NAME": matrix.experiment,
        "MLFLOW_RUN_ID": None,
        "MLFLOW_NESTED_RUN": None,
        "MLFLOW_TAGS": json.dumps({**extra, **tags}),
    }
    if matrix.tracking_uri:
        env["MLFLOW_TRACKING_URI"] = matrix.tracking_uri
    return env


def _cell_tags(matrix: Matrix, cell: Cell) -> dict[str, str]:
    tags = {"bench.cell": cell.id, "bench.method": cell.method, "bench.experiment": matrix.experiment,
            "bench.matrix": str(matrix.path)}  # fmt: skip
    if cell.budget:
        tags["bench.budget"] = budget_tag(cell.budget)
    if cell.seed is not None:
        tags["bench.seed"] = str(cell.seed)
    return tags


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


def _send(sink, metrics: dict[str, float], step: int, tags: dict[str, str] | None = None) -> str | None:
    """Queue eval metrics in the run's fault-tolerant writer and send; an outage keeps them in pending.jsonl."""
    try:
        if tags:
            sink.set_tags(tags)
        sink.log_metrics(metrics, step=step)
        if not sink.flush(force=True):
            path = sink.persist()
            _warn(f"MLflow is unreachable; the evaluation metrics are kept in {path} (send them later with "
                  f"`python -m trl_qtuning.tracking sync {sink.spool_dir.parent}`)")  # fmt: skip
        return sink.run_id
    except Exception as exc:  # tracking never stops the bench
        _warn(f"logging to MLflow failed ({type(exc).__name__}: {_one_line(exc)}); the result is on disk only")
        return getattr(sink, "run_id", None)


def _run_id_from_disk(cell_dir: Path) -> str | None:
    from .tracking.callback import TRACKING_DIR
    from .tracking.sink import RUN_FILE

    with contextlib.suppress(OSError, ValueError):
        return json.loads((cell_dir / TRACKING_DIR / RUN_FILE).read_text()).get("run_id")
    return None


def _retire_old_run(matrix: Matrix, cell_dir: Path) -> None:
    """An interrupted cell's MLflow run is marked FAILED before the cell is run again (best effort)."""
    if matrix.report_to != "mlflow":
        return
    try:
        from .tracking.callback import TRACKING_DIR
        from .tracking.sink import RUN_FILE

        info = json.loads((cell_dir / TRACKING_DIR / RUN_FILE).read_text())
    except (OSError, ValueError, ImportError):
        return
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=info.get("tracking_uri") or matrix.tracking_uri)
        client.set_tag(info["run_id"], "bench.superseded", "true")
        client.set_terminated(info["run_id"], "FAILED")
    except Exception as exc:  # best effort: the store may be down or the run gone
        _warn(f"could not mark the interrupted cell's MLflow run {info.get('run_id')} as FAILED ({type(exc).__name__})")


def _mean_logged(history: list[dict[str, Any]], key: str) -> float | None:
    values = [float(entry[key]) for entry in history if key in entry and math.isfinite(float(entry[key]))]
    return sum(values) / len(values) if values else None


def _cell_record(matrix: Matrix, cell: Cell, **fields: Any) -> dict[str, Any]:
    return {
        "format": RESULT_FORMAT,
        "status": "complete",
        "cell_id": cell.id,
        "cell_dir": cell.dirname,
        "method": cell.method,
        "budget": None if cell.budget is None else {"sample_keep_ratio": cell.budget[0], "token_keep_ratio": cell.budget[1]},
        "seed": cell.seed,
        "fingerprint": fingerprint(matrix, cell),
        **fields,
        "git": git_state(),
        "versions": library_versions(),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_base_cell(matrix: Matrix, cell: Cell, data: dict[str, Any], cell_dir: Path) -> dict[str, Any]:
    """Evaluate the untrained model once (its own MLflow run, named ``base``)."""
    import torch
    from transformers import set_seed

    set_seed(0)
    settings = _with_defaults(matrix.training)
    bf16 = bool(settings.get("bf16"))
    model, tokenizer = load_model_and_tokenizer(matrix)
    if torch.cuda.is_available() and not settings.get("use_cpu"):
        model = model.to("cuda")
    started = time.perf_counter()
    metrics = evaluate(model, tokenizer, matrix, data, bf16=bf16, cell_dir=cell_dir)
    eval_seconds = time.perf_counter() - started
    del model
    gc.collect()
    run_id = None
    if matrix.report_to == "mlflow":
        try:
            import mlflow

            from .tracking.callback import TRACKING_DIR
            from .tracking.sink import MLflowSink

            with _environ(_tracking_env(matrix, {})):
                sink = MLflowSink(
                    cell_dir / TRACKING_DIR, tracking_uri=os.getenv("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri(),
                    experiment_name=matrix.experiment, run_name=cell.id,
                    tags={"qtuning.method": "base", **_cell_tags(matrix, cell)},
                )  # fmt: skip
                sink.log_params({"model": matrix.model, "trained": "false"})
                sink.end("FINISHED")
                run_id = _send(sink, {**metrics, "eval_seconds": eval_seconds}, step=0)
        except Exception as exc:
            _warn(f"logging the base cell to MLflow failed ({type(exc).__name__}: {_one_line(exc)})")
    return _cell_record(
        matrix, cell, metrics=metrics, train_seconds=None, eval_seconds=eval_seconds, global_step=0,
        realised={"sample_keep_ratio": None, "label_token_share": None},
        mlflow={"run_id": run_id, "experiment": matrix.experiment} if matrix.report_to == "mlflow" else None,
    )  # fmt: skip


def run_train_cell(matrix: Matrix, cell: Cell, data: dict[str, Any], cell_dir: Path) -> dict[str, Any]:
    """Seed, load a fresh model, train with ``QTuningSFTTrainer``, evaluate, log to the training's MLflow run."""
    from transformers import PrinterCallback, set_seed

    from .trainer import QTuningSFTTrainer

    method = matrix.method(cell.method)
    kwargs = cell_config_kwargs(matrix, cell, method)
    with _environ(_tracking_env(matrix, _cell_tags(matrix, cell))):
        set_seed(int(cell.seed or 0))
        config = _build_config(kwargs, f"methods.{cell.method}")
        model, tokenizer = load_model_and_tokenizer(matrix)
        trainer = QTuningSFTTrainer(
            model=model, args=config, train_dataset=data["train"], processing_class=tokenizer,
            peft_config=peft_config(matrix),
        )  # fmt: skip
        trainer.remove_callback(PrinterCallback)
        started = time.perf_counter()
        train_output = trainer.train()
        train_seconds = time.perf_counter() - started
    history = trainer.state.log_history
    if config.qtuning_enabled:
        realised = {
            "sample_keep_ratio": _mean_logged(history, "qtuning/sample_keep_ratio"),
            "label_token_share": _mean_logged(history, "qtuning/label_token_share"),
        }
    else:  # plain SFT trains every sample and every answer token
        realised = {"sample_keep_ratio": 1.0, "label_token_share": 1.0}
    started = time.perf_counter()
    metrics = evaluate(trainer.model, trainer.processing_class, matrix, data, bf16=bool(config.bf16), cell_dir=cell_dir)
    eval_seconds = time.perf_counter() - started

    mlflow_info = None
    if matrix.report_to == "mlflow":
        callback = next((cb for cb in trainer.callback_handler.callbacks if type(cb).__name__ == "QTuningMLflowCallback"), None)
        sink = getattr(callback, "sink", None)
        run_id = None
        if sink is not None:
            extra = {"train_seconds": train_seconds, "eval_seconds": eval_seconds}
            extra.update({f"bench/realised_{k}": v for k, v in realised.items() if v is not None})
            run_id = _send(sink, {**metrics, **extra}, step=trainer.state.global_step)
        mlflow_info = {"run_id": run_id or _run_id_from_disk(cell_dir), "experiment": matrix.experiment}
    record = _cell_record(
        matrix, cell, metrics=metrics, train_seconds=train_seconds, eval_seconds=eval_seconds,
        global_step=trainer.state.global_step, train_loss=getattr(train_output, "training_loss", None),
        qtuning_enabled=bool(config.qtuning_enabled), overrides=method.overrides, realised=realised,
        train_rows=len(data["train"]), mlflow=mlflow_info,
    )  # fmt: skip
    del trainer, model
    return record


def _free_memory() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _quiet_libraries() -> None:
    import warnings

    import datasets
    import transformers

    warnings.filterwarnings("ignore", module=r"(transformers|trl|peft|torch|datasets|mlflow)")
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def _metric_summary(metrics: dict[str, float]) -> str:
    parts = []
    for key, header, kind in METRIC_COLUMNS:
        if key in metrics:
            parts.append(f"{header.removesuffix(' %')} {_fmt(metrics[key], kind)}")
    return ", ".join(parts)


def run_bench(matrix: Matrix, *, only: list[str] | None = None, command: str | None = None) -> int:
    """Run every cell not yet finished, then write and print the table. Returns the exit code (1 if a cell failed)."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cells = plan_cells(matrix, only)
    matrix.output_dir.mkdir(parents=True, exist_ok=True)
    (matrix.output_dir / MATRIX_COPY).write_text(matrix.text, encoding="utf-8")
    _quiet_libraries()
    print(f"== {PROG}: {len(cells)} cell(s), experiment {matrix.experiment!r}, output {matrix.output_dir} ==", flush=True)
    data = None
    failed: list[str] = []
    for i, cell in enumerate(cells, 1):
        cell_dir = matrix.output_dir / cell.dirname
        prefix = f"[{i}/{len(cells)}] {cell.id}"
        done = read_result(cell_dir, cell)
        if done is not None:
            stale = "" if done.get("fingerprint") == fingerprint(matrix, cell) else (
                " -- made with other settings than the matrix's now; delete the folder to rerun"
            )
            print(f"{prefix}: skipped (done){stale}", flush=True)
            continue
        if cell_dir.exists():
            print(f"{prefix}: unfinished folder from an earlier run: cleaning it and running again", flush=True)
            _retire_old_run(matrix, cell_dir)
            shutil.rmtree(cell_dir)
        if data is None:
            print("Preparing data ...", flush=True)
            data = prepare_data(matrix)
            print(f"  {len(data['train'])} training rows, {len(data['heldout'])} held-out rows"
                  + "".join(f", {len(data[k])} {k}" for k in ("gsm8k", "arc_easy", "arc_challenge") if k in data),
                  flush=True)  # fmt: skip
        cell_dir.mkdir(parents=True)
        print(f"{prefix}: {'evaluating the untrained model' if cell.is_base else 'training'} ...", flush=True)
        try:
            if cell.is_base:
                record = run_base_cell(matrix, cell, data, cell_dir)
            else:
                record = run_train_cell(matrix, cell, data, cell_dir)
        except BenchConfigError:
            raise
        except Exception as exc:
            if _debug():
                raise
            failed.append(cell.id)
            _warn(f"cell {cell.id} failed ({type(exc).__name__}: {_one_line(exc)}); it will run again next time")
            _free_memory()
            continue
        _write_json(cell_dir / RESULT_FILE, record)
        _free_memory()
        timing = "" if record["train_seconds"] is None else f"trained {record['train_seconds']:.0f} s, "
        run = (record.get("mlflow") or {}).get("run_id")
        print(f"{prefix}: done ({timing}evaluated {record['eval_seconds']:.0f} s) {_metric_summary(record['metrics'])}"
              + (f" [MLflow run {run}]" if run else ""), flush=True)  # fmt: skip
    print()
    render_results(matrix, command=command)
    if failed:
        _warn(f"{len(failed)} cell(s) failed: {', '.join(failed)}; run the same command again to retry them")
        return 1
    return 0


# ----------------------------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------------------------


def _fmt(value: float | None, kind: str) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if kind == "pct":
        return f"{value * 100:.1f}"
    if kind == "share":
        return f"{value:.0%}"
    if kind == "seconds":
        return f"{value:.0f}"
    return f"{value:.4f}"


def _mean_std(values: list[float], kind: str) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    return f"{_fmt(mean, kind)} ± {_fmt(std, kind) if std is not None else '-'}"


def _stats(values: list[float]) -> dict[str, Any] | None:
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "values": values}  # fmt: skip


def collect_rows(matrix: Matrix) -> tuple[list[dict[str, Any]], list[str], list[dict[str, Any]]]:
    """One row per (method, budget) in matrix order from the cells' result.json files; the missing cell ids; the
    cell results."""
    rows: list[dict[str, Any]] = []
    missing: list[str] = []
    results: list[dict[str, Any]] = []
    by_row: dict[tuple, list[dict[str, Any]]] = {}
    order: list[Cell] = []
    for cell in plan_cells(matrix):
        result = read_result(matrix.output_dir / cell.dirname, cell)
        if cell.row_key not in by_row:
            by_row[cell.row_key] = []
            order.append(cell)
        if result is None:
            missing.append(cell.id)
            continue
        results.append(result)
        by_row[cell.row_key].append(result)
    for first in order:
        found = by_row[first.row_key]
        metrics = {key: _stats([float(r["metrics"][key]) for r in found if r["metrics"].get(key) is not None])
                   for key, _, _ in METRIC_COLUMNS}  # fmt: skip
        row = {
            "method": first.method,
            "budget": None if first.budget is None else list(first.budget),
            "budget_label": "(untrained)" if first.is_base else budget_label(first.budget),
            "n": len(found),
            "seeds": [r.get("seed") for r in found],
            "metrics": {k: v for k, v in metrics.items() if v is not None},
            "realised_sample_keep_ratio": _stats([r["realised"]["sample_keep_ratio"] for r in found
                                                  if (r.get("realised") or {}).get("sample_keep_ratio") is not None]),
            "realised_label_token_share": _stats([r["realised"]["label_token_share"] for r in found
                                                  if (r.get("realised") or {}).get("label_token_share") is not None]),
            "train_seconds": _stats([r["train_seconds"] for r in found if r.get("train_seconds") is not None]),
            "eval_seconds": _stats([r["eval_seconds"] for r in found if r.get("eval_seconds") is not None]),
        }  # fmt: skip
        rows.append(row)
    return rows, missing, results


def format_table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table (columns padded, so it reads as plain text too)."""
    metric_cols = [(key, header, kind) for key, header, kind in METRIC_COLUMNS if any(key in r["metrics"] for r in rows)]
    headers = ["method", "budget (samples x tokens)", "seeds", *[h for _, h, _ in metric_cols],
               "kept samples", "label tokens", "train s"]  # fmt: skip
    body = []
    for row in rows:
        values = [row["method"], row["budget_label"], str(row["n"])]
        for key, _, kind in metric_cols:
            stats = row["metrics"].get(key)
            values.append(_mean_std(stats["values"], kind) if stats else "-")
        for key in ("realised_sample_keep_ratio", "realised_label_token_share"):
            values.append(_fmt(row[key]["mean"], "share") if row[key] else "-")
        values.append(_fmt(row["train_seconds"]["mean"], "seconds") if row["train_seconds"] else "-")
        body.append(values)
    widths = [max(len(str(r[i])) for r in [headers, *body]) for i in range(len(headers))]
    right = set(range(2, len(headers)))

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in body)])


TABLE_NOTE = (
    "Each metric is `mean ± std` over the seeds of the row: std is the sample standard deviation (n - 1), shown as "
    "`± -` when a row has one seed. Held-out NLL: mean answer-token negative log-likelihood on rows split off the "
    "training pool (lower is better). GSM8K EM and ARC accuracy in %. Kept samples / label tokens: realised share "
    "of the step's samples trained on, and of all answer tokens that kept their label (means over logged steps; 100% "
    "for plain fine-tuning by definition). Train s: mean wall-clock training seconds per cell (evaluation excluded)."
)


def render_results(matrix: Matrix, *, command: str | None = None, out=None) -> str:
    """Collect the cells' results, print the table, write ``results.md`` and ``results.json``; returns the table."""
    out = out or sys.stdout
    rows, missing, results = collect_rows(matrix)
    table = format_table(rows)
    git = git_state()
    machine = machine_summary()
    versions = library_versions()
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    command = command or f"{PROG} --config {matrix.path}"
    commits = sorted({f"{r['git']['commit'][:12]}{' (dirty)' if r['git'].get('dirty') else ''}"
                      for r in results if (r.get("git") or {}).get("commit")})  # fmt: skip
    commit = git.get("commit")
    commit_text = f"{commit}{' (dirty working tree)' if git.get('dirty') else ''}" if commit else "unknown (not a git checkout)"
    total = len(plan_cells(matrix))
    status = f"{total - len(missing)} of {total} cells finished"
    if missing:
        status += f"; missing: {', '.join(missing)}"
    gpu = machine.get("gpu") or "none"
    print(f"Results ({status}):", file=out)
    print(table, file=out)
    print("\n" + TABLE_NOTE, file=out)

    lines = [
        f"# Benchmark: {matrix.experiment}",
        "",
        f"- command: `{command}`",
        f"- commit: {commit_text}" + (f"; cells ran at {', '.join(commits)}" if commits else ""),
        f"- date: {now}",
        (f"- machine: {machine.get('cpu')}, {machine.get('cpu_count')} CPU cores, torch threads "
        f"{machine.get('torch_threads', '?')}, GPU {gpu}; {machine.get('platform')}"),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
        f"- cells: {status}",
        "",
        TABLE_NOTE,
        "",
        table,
        "",
        f"## Matrix (`{matrix.path}`)",
        "",
        "```yaml",
        matrix.text.rstrip(),
        "```",
        "",
    ]
    matrix.output_dir.mkdir(parents=True, exist_ok=True)
    (matrix.output_dir / RESULTS_MD).write_text("\n".join(lines), encoding="utf-8")
    _write_json(matrix.output_dir / RESULTS_JSON, {
        "experiment": matrix.experiment, "generated": now, "command": command, "git": git, "machine": machine,
        "versions": versions, "matrix_file": str(matrix.path), "matrix": matrix.text, "note": TABLE_NOTE,
        "rows": rows, "missing": missing, "cells": results,
    })  # fmt: skip
    print(f"\nWritten: {matrix.output_dir / RESULTS_MD} and {matrix.output_dir / RESULTS_JSON}", file=out)
    return table


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    class _Parser(argparse.ArgumentParser):
        def error(self, message: str):
            raise BenchConfigError(f"{message} (see `{PROG} --help`)")

    parser = _Parser(
        prog=PROG,
        description="Run a benchmark matrix (methods x budgets x seeds), one MLflow run per cell, resumable; then "
        "print and write the comparison table. Relative paths in the matrix resolve against the current directory.",
    )
    parser.add_argument("--config", required=True, metavar="MATRIX.yaml", help="The matrix file.")
    parser.add_argument("--table-only", action="store_true",
                        help="Only re-render the table from the cells' result.json files (nothing is run).")
    parser.add_argument("--only", nargs="+", metavar="METHOD",
                        help="Run only these methods ('base' for the untrained model's row); the table shows all.")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``trl-qtuning bench --config MATRIX.yaml [--table-only] [--only METHOD ...]``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        args = build_parser().parse_args(argv)
        command = " ".join([PROG, *argv])
        try:
            matrix = load_matrix(args.config, check_inputs=not args.table_only)
            if args.table_only:
                _, _, results = collect_rows(matrix)
                if not results:
                    raise CliError(f"no finished cells under {matrix.output_dir} (run `{PROG} --config {args.config}`)", 1)
                render_results(matrix, command=command)
                return 0
            return run_bench(matrix, only=args.only, command=command)
        except BenchConfigError as exc:  # a field of the matrix: say which file
            if str(exc).startswith(("matrix file not found", "--only")):
                raise
            raise BenchConfigError(f"{args.config}: {exc}") from exc

    return run_reporting_errors(PROG, body)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
