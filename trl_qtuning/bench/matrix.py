"""The matrix file: typed specs, validated in one place, every error naming its field.

``load_matrix`` reads the YAML, checks every field (types, ranges, references between methods) and returns a
:class:`Matrix`; ``plan_cells`` turns it into the cells to run, in run order. Nothing here trains or loads a model.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from pathlib import Path
from typing import Any

from ..cli.sft import CliError, one_line

__all__ = [
    "BASE_METHOD",
    "PROG",
    "BenchConfigError",
    "Cell",
    "EqualCompute",
    "EvalSpec",
    "Matrix",
    "Method",
    "TrainData",
    "budget_label",
    "budget_tag",
    "build_config",
    "cell_config_kwargs",
    "field_error",
    "load_matrix",
    "plan_cells",
    "with_defaults",
]

PROG = "trl-qtuning bench"
BASE_METHOD = "base"

TOP_KEYS = (
    "experiment", "output_dir", "report_to", "tracking_uri", "model", "lora", "data", "training", "eval", "methods",
    "budgets", "seeds", "equal_compute", "baselines", "clean_reference",
)  # fmt: skip
SOURCES = ("gsm8k_jsonl", "demo_math", "arithmetic", "local")
NOISE_TYPES = ("swap", "numbers")
"""``data.train.label_noise_type`` (trl_qtuning/bench/data.py applies them)."""
SOURCE_KEYS = {
    "gsm8k_jsonl": ("source", "path", "size", "seed", "strip_calculator", "label_noise", "label_noise_type"),
    "demo_math": ("source", "size", "seed", "subjects", "max_level", "max_chars", "label_noise", "label_noise_type"),
    "arithmetic": ("source", "size", "seed", "noisy_share", "label_noise", "label_noise_type"),
    "local": ("source", "path", "size", "seed", "label_noise", "label_noise_type"),
}
LORA_KEYS = ("r", "alpha", "dropout", "target_modules")
EVAL_KEYS = ("nll", "gsm8k", "arc_easy", "arc_challenge", "seed", "base", "every_steps", "transfer", "contrast")
CONTRAST_KINDS = ("swap", "numbers")
"""``eval.contrast.kinds`` (trl_qtuning/bench/contrast.py)."""
METHOD_BENCH_KEYS = ("budgets", "match_label_tokens")
"""Keys of a method that are the bench's, not QTuningConfig fields."""
CONSTANT_SCHEDULES = ("constant", "constant_with_warmup")
# Set by the bench for every cell; a matrix may not set them in `training:` or a method.
OWNED_FIELDS = {
    "output_dir": "one folder per cell under the matrix's `output_dir`",
    "run_name": "the cell id",
    "report_to": "the matrix's top-level `report_to`",
    "seed": "the matrix's `seeds:` list",
    "sample_keep_ratio": "`budgets:` (top level, or `budgets:` inside the method)",
    "token_keep_ratio": "`budgets:` (top level, or `budgets:` inside the method)",
    "include_num_input_tokens_seen": "the bench (it counts trained tokens for the compute accounting)",
}
_FOLDER_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

Budget = tuple[float, float]


class BenchConfigError(CliError):
    """A mistake in the matrix file (exit code 2)."""


# ----------------------------------------------------------------------------------------------------------------------
# Specs
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainData:
    """``data.train``: where the training pool comes from, and the rows' label noise."""

    source: str
    size: int | None
    seed: int
    path: str | None = None
    label_noise: float = 0.0
    """Share of the training rows whose answers are corrupted (0: clean)."""
    label_noise_type: str = "swap"
    """How: ``swap`` (answers swapped among the chosen rows) or ``numbers`` (one carried arithmetic slip each)."""
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Source-specific keys (``strip_calculator``, ``subjects``, ``max_level``, ``max_chars``, ``noisy_share``)."""

    def as_dict(self) -> dict[str, Any]:
        """The ``data.train`` mapping as written (fingerprints hash it; clean data hashes as before noise existed)."""
        out: dict[str, Any] = {"source": self.source, **self.options, "size": self.size, "seed": self.seed}
        if self.path is not None:
            out["path"] = self.path
        if self.label_noise:
            out["label_noise"] = self.label_noise
            if self.label_noise_type != "swap":  # swap hashes as before the noise type existed
                out["label_noise_type"] = self.label_noise_type
        return out


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """``eval``: the evaluations of every trained model, and the learning curve's cadence."""

    nll: dict[str, int] | None
    gsm8k: dict[str, Any] | None
    arc_easy: dict[str, Any] | None
    arc_challenge: dict[str, Any] | None
    seed: int = 0
    base: bool = True
    every_steps: int | None = None
    """Held-out NLL every N optimizer steps and at the end (the learning curve); None: at the end only."""
    transfer: dict[str, Any] | None = None
    """A second held-out set from another distribution (its NLL is logged with the curve)."""
    contrast: dict[str, Any] | None = None
    """Held-out contrasts of true against wrong answers (``kinds``, ``batch_size``, ``max_length``), at the end."""

    @property
    def enabled(self) -> bool:
        return any((self.nll, self.gsm8k, self.arc_easy, self.arc_challenge, self.transfer, self.contrast))

    def as_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in ("seed", "base", "nll", "gsm8k", "arc_easy", "arc_challenge")}
        if self.every_steps is not None:
            out["every_steps"] = self.every_steps
        if self.transfer is not None:
            out["transfer"] = self.transfer
        if self.contrast is not None:
            out["contrast"] = self.contrast
        return out


@dataclasses.dataclass(frozen=True)
class EqualCompute:
    """``equal_compute``: every other cell trains on until its counted compute reaches the reference's."""

    reference: str
    max_steps: int


@dataclasses.dataclass
class Method:
    name: str
    overrides: dict[str, Any]
    budgets: list[Budget | None]
    """``[None]`` for a method trained without Q-Tuning (one cell per seed, no budget)."""
    qtuning_enabled: bool
    match_label_tokens: str | None = None
    """Another method whose realised label-token share this one trains at (same seed and budget)."""


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
    train: TrainData
    heldout_size: int
    training: dict[str, Any]
    eval: EvalSpec
    methods: list[Method]
    seeds: list[int]
    equal_compute: EqualCompute | None = None
    baselines: list[str] = dataclasses.field(default_factory=list)
    """Methods every other one is compared with by paired per-seed differences."""
    clean_reference: str | None = None
    """Another matrix file (as written) whose cells of the same method and budget this one's are compared with, seed
    by seed: how much the noise moved each metric. Reporting only (not in the fingerprints)."""

    def method(self, name: str) -> Method:
        return next(m for m in self.methods if m.name == name)

    @property
    def max_steps(self) -> int | None:
        """``training.max_steps``: the equal-steps point of every cell."""
        value = self.training.get("max_steps")
        return int(value) if isinstance(value, int) and value > 0 else None


@dataclasses.dataclass(frozen=True)
class Cell:
    method: str
    budget: Budget | None
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
    def row_key(self) -> tuple[str, Budget | None]:
        return (self.method, self.budget)


def _pct(value: float) -> str:
    return f"{value * 100:.4g}"


def budget_tag(budget: Budget) -> str:
    """``(0.25, 0.5)`` -> ``"25x50"``."""
    return f"{_pct(budget[0])}x{_pct(budget[1])}"


def budget_label(budget: Budget | None) -> str:
    """``(0.25, 0.5)`` -> ``"25% x 50%"``; no budget -> ``"-"``."""
    return f"{_pct(budget[0])}% x {_pct(budget[1])}%" if budget else "-"


# ----------------------------------------------------------------------------------------------------------------------
# Field checks
# ----------------------------------------------------------------------------------------------------------------------


def field_error(where: str, problem: str, fix: str | None = None) -> BenchConfigError:
    return BenchConfigError(f"{where}: {problem}" + (f" (fix: {fix})" if fix else ""))


def _mapping(value: Any, where: str, allowed: tuple[str, ...] | None = None, *, null_ok: bool = False) -> dict:
    if value is None and null_ok:
        return {}
    if value is None:
        raise field_error(where, "missing", f"add a `{where.rsplit('.', 1)[-1]}:` mapping (see `{PROG} --help`)")
    if not isinstance(value, dict):
        raise field_error(where, f"must be a mapping, got {type(value).__name__} {value!r}", "write `key: value` pairs")
    for key in value:
        if not isinstance(key, str):
            raise field_error(where, f"keys must be strings, got {key!r}")
    if allowed is not None:
        unknown = [k for k in value if k not in allowed]
        if unknown:
            raise field_error(
                f"{where}.{unknown[0]}" if where else unknown[0], "unknown key",
                f"use one of {', '.join(allowed)}",
            )
    return value


def _int(value: Any, where: str, minimum: int | None = None, *, null_ok: bool = False) -> int | None:
    if value is None and null_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise field_error(where, f"must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise field_error(where, f"must be >= {minimum}, got {value}")
    return value


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise field_error(where, f"must be a number, got {value!r}")
    return float(value)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise field_error(where, f"must be true or false, got {value!r}")
    return value


def _str(value: Any, where: str, *, null_ok: bool = False) -> str | None:
    if value is None and null_ok:
        return None
    if not isinstance(value, str) or not value.strip():
        raise field_error(where, f"must be a non-empty string, got {value!r}")
    return value


def _existing_path(value: Any, where: str, *, check: bool, kind: str = "file") -> str:
    """The path as written (``~`` expanded), checked to exist against the current directory. It is kept as written,
    not resolved, so that the cells' fingerprints are the same on every machine that holds the same layout (a
    clone under another root must not make every committed result stale)."""
    text = _str(value, where)
    path = Path(text).expanduser()
    resolved = (path if path.is_absolute() else Path.cwd() / path).resolve()
    if check and not resolved.exists():
        raise field_error(
            where, f"{kind} not found: {text}",
            f"relative paths resolve against the current directory {Path.cwd()}; give an existing path",
        )
    return str(path)


def _budgets(value: Any, where: str) -> list[Budget]:
    if not isinstance(value, list) or not value:
        raise field_error(where, f"must be a non-empty list of [sample_keep_ratio, token_keep_ratio] pairs, got {value!r}",
                   "e.g. [[0.25, 0.5], [0.5, 0.7]]")
    budgets: list[Budget] = []
    for i, pair in enumerate(value):
        here = f"{where}[{i}]"
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise field_error(here, f"must be a pair [sample_keep_ratio, token_keep_ratio], got {pair!r}", "e.g. [0.25, 0.5]")
        ratios = []
        for j, name in enumerate(("sample_keep_ratio", "token_keep_ratio")):
            ratio = _number(pair[j], f"{here} ({name})")
            if not 0.0 < ratio <= 1.0:
                raise field_error(f"{here} ({name})", f"must be in (0, 1], got {pair[j]!r}", "use a share such as 0.25")
            ratios.append(ratio)
        budget = (ratios[0], ratios[1])
        if budget in budgets:
            raise field_error(here, f"duplicate budget {budget_label(budget)}", "list each budget once")
        budgets.append(budget)
    return budgets


def _qtuning_fields() -> set[str]:
    from ..config import QTuningConfig

    return {f.name for f in dataclasses.fields(QTuningConfig) if f.init}


def _check_fields(settings: dict[str, Any], where: str, fields: set[str]) -> None:
    for key in settings:
        if key in OWNED_FIELDS:
            raise field_error(f"{where}.{key}", "is set by the bench for every cell", f"set it through {OWNED_FIELDS[key]}")
        if key not in fields:
            raise field_error(
                f"{where}.{key}", "unknown QTuningConfig field",
                "check the spelling; valid keys are the fields of QTuningConfig / trl.SFTConfig "
                "(`trl-qtuning sft --help` lists them)",
            )


# ----------------------------------------------------------------------------------------------------------------------
# Cell configs
# ----------------------------------------------------------------------------------------------------------------------


def _default_training() -> dict[str, Any]:
    """Bench defaults for every cell (a matrix's `training:` overrides them): what demo/run.py uses on a CPU."""
    import torch

    from ..demo.run import bf16_is_fast

    use_cuda = torch.cuda.is_available()
    # transformers 5.2x renamed `gradient_checkpointing` to `activation_checkpointing` (the old name warns).
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in _qtuning_fields() else "gradient_checkpointing"
    return {
        "use_cpu": not use_cuda,
        "bf16": bf16_is_fast(use_cuda),  # bf16 autocast only where the hardware makes it fast
        checkpointing: False,
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def with_defaults(*layers: dict[str, Any]) -> dict[str, Any]:
    """The bench defaults under the given settings (a set `gradient_checkpointing` drops the default's alias)."""
    merged = _default_training()
    settings = {k: v for layer in layers for k, v in layer.items()}
    if {"gradient_checkpointing", "activation_checkpointing"} & set(settings):
        merged.pop("gradient_checkpointing", None)
        merged.pop("activation_checkpointing", None)
    return {**merged, **settings}


def cell_config_kwargs(
    matrix: Matrix, cell: Cell, method: Method, *, matched_label_share: float | None = None
) -> dict[str, Any]:
    """The keyword arguments of the cell's ``QTuningConfig``.

    ``matched_label_share``: for a ``match_label_tokens`` method, the label-token share to train at; the token
    budget is then the run's (``token_budget_scope="run"``), so the run keeps that share of all the answer tokens it
    sees, whichever samples were drawn.
    """
    kwargs = with_defaults(matrix.training, method.overrides)
    if cell.budget is not None:
        kwargs["sample_keep_ratio"], kwargs["token_keep_ratio"] = cell.budget
    if method.match_label_tokens is not None:
        kwargs["token_budget_scope"] = "run"
        if matched_label_share is not None:
            kwargs["token_keep_ratio"] = min(1.0, max(matched_label_share, 1e-6))
    if matrix.equal_compute is not None and cell.method != matrix.equal_compute.reference:
        kwargs["max_steps"] = matrix.equal_compute.max_steps  # the compute callback stops it earlier
    kwargs.update(
        seed=int(cell.seed or 0),
        output_dir=str(matrix.output_dir / cell.dirname),
        run_name=cell.id,
        report_to=["mlflow"] if matrix.report_to == "mlflow" else "none",
        include_num_input_tokens_seen="non_padding",
    )
    return kwargs


def build_config(kwargs: dict[str, Any], where: str):
    from ..config import QTuningConfig

    try:
        return QTuningConfig(**kwargs)
    except TypeError as exc:  # an unknown field (a QTuningConfig of an older/newer trl-qtuning)
        match = re.search(r"unexpected keyword argument '([^']+)'", str(exc))
        key = match.group(1) if match else "?"
        raise field_error(f"{where}.{key}", "unknown QTuningConfig field", "check the spelling or update trl-qtuning") from exc
    except ValueError as exc:  # QTuningConfig / SFTConfig / TrainingArguments validation
        raise field_error(where, one_line(exc)) from exc


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


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
        raise BenchConfigError(f"{path}: not valid YAML: {one_line(exc)}") from exc
    raw = _mapping(raw, "", TOP_KEYS) if raw is not None else {}

    experiment = _str(raw.get("experiment", "trl-qtuning-bench"), "experiment")
    if "output_dir" not in raw:
        raise field_error("output_dir", "missing", "add `output_dir: bench_runs/<name>` (one folder per cell goes there)")
    output_dir = Path(_str(raw["output_dir"], "output_dir")).expanduser()
    output_dir = output_dir if output_dir.is_absolute() else Path.cwd() / output_dir

    report_to = raw.get("report_to", "auto")
    if report_to not in ("auto", "mlflow", "none"):
        raise field_error("report_to", f"must be auto, mlflow or none, got {report_to!r}")
    mlflow_installed = importlib.util.find_spec("mlflow") is not None
    if report_to == "auto":
        report_to = "mlflow" if mlflow_installed else "none"
    elif report_to == "mlflow" and not mlflow_installed and check_inputs:
        raise field_error("report_to", "mlflow is not installed", "pip install 'trl-qtuning[mlflow]', or set report_to: none")
    tracking_uri = _str(raw.get("tracking_uri"), "tracking_uri", null_ok=True)

    model = _str(raw.get("model", "demo"), "model")
    if model != "demo":
        model = _existing_path(model, "model", check=check_inputs, kind="model folder")
        if check_inputs and not (Path(model) / "config.json").is_file():
            raise field_error("model", f"not a model folder (no config.json): {model}", "give `demo` or a saved model folder")

    lora = _parse_lora(raw.get("lora", {}))
    data = _mapping(raw.get("data"), "data", ("train", "heldout_size"))
    train = _parse_train(data, check_inputs)
    heldout_size = _int(data.get("heldout_size", 0), "data.heldout_size", 0)

    training = dict(_mapping(raw.get("training"), "training", null_ok=True))
    fields = _qtuning_fields()
    _check_fields(training, "training", fields)
    eval_spec = _parse_eval(raw.get("eval"), heldout_size, check_inputs)
    methods = _parse_methods(raw, training, fields)
    seeds_raw = raw.get("seeds", [0])
    if not isinstance(seeds_raw, list) or not seeds_raw:
        raise field_error("seeds", f"must be a non-empty list of integers, got {seeds_raw!r}", "e.g. [0, 1, 2]")
    seeds = [_int(s, f"seeds[{i}]", 0) for i, s in enumerate(seeds_raw)]
    if len(set(seeds)) != len(seeds):
        raise field_error("seeds", f"duplicate seeds in {seeds}", "list each seed once")
    if train.label_noise:
        for method in methods:
            level = method.overrides.get("qtuning_ledger", training.get("qtuning_ledger", "full"))
            if method.qtuning_enabled and level == "none":
                where = f"methods.{method.name}" if "qtuning_ledger" in method.overrides else "training"
                raise field_error(f"{where}.qtuning_ledger", "label noise is audited from the ledger, which is off",
                                  "use qtuning_ledger: summary (or full)")
    equal_compute = _parse_equal_compute(raw.get("equal_compute"), methods, training)
    baselines = _parse_baselines(raw.get("baselines"), methods, training)
    reference = raw.get("clean_reference")
    if reference is not None:
        if not isinstance(reference, str):
            raise field_error("clean_reference", f"must be the path of another matrix file, got {reference!r}",
                              "e.g. recipes/bench/study_gsm8k_fill_clean.yaml")
        reference = _existing_path(reference, "clean_reference", check=check_inputs)

    matrix = Matrix(
        path=path, text=text, experiment=experiment, output_dir=output_dir, report_to=report_to,
        tracking_uri=tracking_uri, model=model, lora=lora, train=train, heldout_size=heldout_size,
        training=training, eval=eval_spec, methods=methods, seeds=seeds, equal_compute=equal_compute,
        baselines=baselines, clean_reference=reference,
    )  # fmt: skip
    if check_inputs:
        build_config({**with_defaults(training), "output_dir": str(output_dir / "_check")}, "training")
        for method in methods:
            for budget in method.budgets:
                cell = Cell(method.name, budget, seeds[0])
                where = f"methods.{method.name}" + (f" (budget {budget_label(budget)})" if budget else "")
                share = None if method.match_label_tokens is None else (budget[0] * budget[1] if budget else None)
                build_config(cell_config_kwargs(matrix, cell, method, matched_label_share=share), where)
    return matrix


def _parse_lora(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    lora_raw = _mapping(value, "lora", LORA_KEYS)
    lora = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear", **lora_raw}
    _int(lora["r"], "lora.r", 1)
    if _number(lora["alpha"], "lora.alpha") <= 0:
        raise field_error("lora.alpha", f"must be > 0, got {lora['alpha']!r}")
    if not 0.0 <= _number(lora["dropout"], "lora.dropout") < 1.0:
        raise field_error("lora.dropout", f"must be in [0, 1), got {lora['dropout']!r}")
    targets = lora["target_modules"]
    if not (isinstance(targets, str) and targets) and not (
        isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)
    ):
        raise field_error("lora.target_modules", f"must be a string or a list of module names, got {targets!r}",
                   "e.g. all-linear or [q_proj, v_proj]")
    return lora


def _parse_source_options(spec: dict[str, Any], source: str, where: str) -> dict[str, Any]:
    """The source-specific keys of a data mapping (``data.train`` or ``eval.transfer``), checked."""
    options: dict[str, Any] = {}
    if source == "arithmetic" and "noisy_share" in spec:
        if not 0.0 <= _number(spec["noisy_share"], f"{where}.noisy_share") <= 1.0:
            raise field_error(f"{where}.noisy_share", f"must be in [0, 1], got {spec['noisy_share']!r}")
        options["noisy_share"] = spec["noisy_share"]
    if source == "demo_math":
        for key in ("max_level", "max_chars"):
            if key in spec:
                options[key] = _int(spec[key], f"{where}.{key}", 1, null_ok=True)
        if "subjects" in spec:
            options["subjects"] = spec["subjects"]
    if source == "gsm8k_jsonl" and "strip_calculator" in spec:
        options["strip_calculator"] = _bool(spec["strip_calculator"], f"{where}.strip_calculator")
    return options


def _parse_train(data: dict[str, Any], check_inputs: bool) -> TrainData:
    if "train" not in data:
        raise field_error("data.train", "missing", "add `train: {source: gsm8k_jsonl, path: ..., size: 256}`")
    spec = dict(_mapping(data["train"], "data.train"))
    source = spec.get("source")
    if source not in SOURCES:
        raise field_error("data.train.source", f"must be one of {', '.join(SOURCES)}, got {source!r}")
    _mapping(spec, "data.train", SOURCE_KEYS[source])
    path = None
    if source in ("gsm8k_jsonl", "local"):
        if spec.get("path") is None:
            raise field_error("data.train.path", f"missing (source {source} reads a local file)", "give the file's path")
        path = _existing_path(spec["path"], "data.train.path", check=check_inputs)
    noise = 0.0
    if "label_noise" in spec:
        noise = _number(spec["label_noise"], "data.train.label_noise")
        if not 0.0 <= noise <= 1.0:
            raise field_error("data.train.label_noise", f"must be a share in [0, 1], got {spec['label_noise']!r}",
                       "e.g. 0.3 swaps the answers of 30% of the training rows")
    noise_type = spec.get("label_noise_type", "swap")
    if noise_type not in NOISE_TYPES:
        raise field_error("data.train.label_noise_type", f"must be one of {', '.join(NOISE_TYPES)}, got {noise_type!r}",
                          "swap: answers swapped among the corrupted rows; numbers: a carried arithmetic slip")
    if "label_noise_type" in spec and not noise:
        raise field_error("data.train.label_noise_type", "has no effect without label_noise",
                          "set label_noise (e.g. 0.3), or remove label_noise_type")
    return TrainData(
        source=source, size=_int(spec.get("size"), "data.train.size", 1, null_ok=True),
        seed=_int(spec.get("seed", 0), "data.train.seed"), path=path, label_noise=noise, label_noise_type=noise_type,
        options=_parse_source_options(spec, source, "data.train"),
    )  # fmt: skip


def _parse_eval(value: Any, heldout_size: int, check_inputs: bool) -> EvalSpec:
    raw = _mapping(value, "eval", EVAL_KEYS, null_ok=True) if value is not None else {"nll": True}
    nll = raw.get("nll", True)
    if isinstance(nll, bool):
        nll = {} if nll else None
    if nll is not None:
        nll = {"batch_size": 8, "max_length": 1024, **_mapping(nll, "eval.nll", ("batch_size", "max_length"))}
        _int(nll["batch_size"], "eval.nll.batch_size", 1)
        _int(nll["max_length"], "eval.nll.max_length", 1)
        if heldout_size < 1:
            raise field_error("eval.nll", "needs held-out rows, but data.heldout_size is 0",
                       "set data.heldout_size (e.g. 64), or eval.nll: false")
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
            raise field_error("eval.gsm8k.source", f"must be gsm8k_test, gsm8k_jsonl or arithmetic, got {gsm8k['source']!r}")
        if gsm8k["source"] == "gsm8k_jsonl":
            if not gsm8k["path"]:
                raise field_error("eval.gsm8k.path", "missing (source gsm8k_jsonl)", "give the test jsonl's path")
            gsm8k["path"] = _existing_path(gsm8k["path"], "eval.gsm8k.path", check=check_inputs)
    arcs: dict[str, Any] = {}
    for name in ("arc_easy", "arc_challenge"):
        arc = raw.get(name)
        if arc is not None and arc is not False:
            arc = {"size": 100, "batch_size": 16, "max_length": 512, "subset": "test", "source": "arc",
                   **_mapping(arc, f"eval.{name}", ("size", "batch_size", "max_length", "subset", "source"), null_ok=True)}  # fmt: skip
            _int(arc["size"], f"eval.{name}.size", 1)
            _int(arc["batch_size"], f"eval.{name}.batch_size", 1)
            _int(arc["max_length"], f"eval.{name}.max_length", 1)
            if arc["subset"] not in ("test", "validation"):
                raise field_error(f"eval.{name}.subset", f"must be test or validation, got {arc['subset']!r}")
            if arc["source"] not in ("arc", "arithmetic"):
                raise field_error(f"eval.{name}.source", f"must be arc or arithmetic, got {arc['source']!r}")
        arcs[name] = arc or None
    every_steps = _int(raw.get("every_steps"), "eval.every_steps", 1, null_ok=True)
    if every_steps is not None and nll is None:
        raise field_error("eval.every_steps", "the learning curve is the held-out NLL, but eval.nll is off",
                   "set eval.nll: true (and data.heldout_size), or remove every_steps")
    transfer = _parse_transfer(raw.get("transfer"), check_inputs)
    spec = EvalSpec(
        nll=nll, gsm8k=gsm8k or None, arc_easy=arcs["arc_easy"], arc_challenge=arcs["arc_challenge"],
        seed=_int(raw.get("seed", 0), "eval.seed"), base=_bool(raw.get("base", True), "eval.base"),
        every_steps=every_steps, transfer=transfer, contrast=_parse_contrast(raw.get("contrast"), heldout_size),
    )  # fmt: skip
    if check_inputs and spec.enabled and importlib.util.find_spec("trl_qtuning.evaluation") is None:
        raise field_error("eval", "the evaluation module trl_qtuning.evaluation is not available in this installation",
                   "update trl-qtuning, or disable every evaluation (nll: false, no gsm8k/arc_easy/arc_challenge)")
    return spec


def _parse_contrast(value: Any, heldout_size: int) -> dict[str, Any] | None:
    """``eval.contrast``: true, or ``{kinds: [swap, numbers], batch_size: 8, max_length: 1024}``."""
    if value is None or value is False:
        return None
    spec = {"kinds": list(CONTRAST_KINDS), "batch_size": 8, "max_length": 1024,
            **({} if value is True else _mapping(value, "eval.contrast", ("kinds", "batch_size", "max_length")))}  # fmt: skip
    kinds = spec["kinds"]
    if not isinstance(kinds, list) or not kinds or any(k not in CONTRAST_KINDS for k in kinds):
        raise field_error("eval.contrast.kinds", f"must be a non-empty list of {', '.join(CONTRAST_KINDS)}, got {kinds!r}",
                          "e.g. [swap, numbers]")
    _int(spec["batch_size"], "eval.contrast.batch_size", 1)
    _int(spec["max_length"], "eval.contrast.max_length", 1)
    if heldout_size < 2:
        raise field_error("eval.contrast", f"compares held-out rows, but data.heldout_size is {heldout_size}",
                          "set data.heldout_size (e.g. 48), or remove eval.contrast")
    return spec


def _parse_transfer(value: Any, check_inputs: bool) -> dict[str, Any] | None:
    if value is None or value is False:
        return None
    keys = ("source", "size", "seed", "path", "subjects", "max_level", "max_chars", "batch_size", "max_length",
            "strip_calculator", "noisy_share")  # fmt: skip
    spec = dict(_mapping(value, "eval.transfer", keys))
    source = spec.get("source", "demo_math")
    if source not in SOURCES:
        raise field_error("eval.transfer.source", f"must be one of {', '.join(SOURCES)}, got {source!r}")
    out: dict[str, Any] = {
        "source": source, "size": _int(spec.get("size", 64), "eval.transfer.size", 1),
        "seed": _int(spec.get("seed", 0), "eval.transfer.seed"),
        "batch_size": _int(spec.get("batch_size", 8), "eval.transfer.batch_size", 1),
        "max_length": _int(spec.get("max_length", 1024), "eval.transfer.max_length", 1),
        **_parse_source_options(spec, source, "eval.transfer"),
    }  # fmt: skip
    if source in ("gsm8k_jsonl", "local"):
        if spec.get("path") is None:
            raise field_error("eval.transfer.path", f"missing (source {source} reads a local file)", "give the file's path")
        out["path"] = _existing_path(spec["path"], "eval.transfer.path", check=check_inputs)
    return out


def _parse_methods(raw: dict[str, Any], training: dict[str, Any], fields: set[str]) -> list[Method]:
    methods_raw = raw.get("methods")
    if not methods_raw:
        raise field_error("methods", "missing or empty", "add e.g. `methods: {full: {qtuning_enabled: false}, qtuning: {}}`")
    methods_raw = _mapping(methods_raw, "methods")
    top_budgets = _budgets(raw["budgets"], "budgets") if "budgets" in raw else None
    default_enabled = training.get("qtuning_enabled", True)
    methods: list[Method] = []
    for name, overrides in methods_raw.items():
        where = f"methods.{name}"
        if not _FOLDER_SAFE.match(name):
            raise field_error(where, "method names must be folder-safe", "use letters, digits, '-', '_' and '.' only")
        if name == BASE_METHOD:
            raise field_error(where, f"{BASE_METHOD!r} is reserved for the untrained model's row", "rename the method")
        overrides = dict(_mapping(overrides, where, null_ok=True))
        if "max_steps" in overrides:
            raise field_error(f"{where}.max_steps", "every method trains the same steps (the equal-steps point)",
                              "set training.max_steps, and equal_compute to train methods on to equal compute")
        pinned = overrides.pop("budgets", None)
        matched = _str(overrides.pop("match_label_tokens", None), f"{where}.match_label_tokens", null_ok=True)
        _check_fields(overrides, where, fields)
        enabled = overrides.get("qtuning_enabled", default_enabled)
        if not isinstance(enabled, bool):
            raise field_error(f"{where}.qtuning_enabled", f"must be true or false, got {enabled!r}")
        if not enabled:
            if pinned is not None:
                raise field_error(f"{where}.budgets", "a method without Q-Tuning (qtuning_enabled: false) has no budget",
                           "remove `budgets:` from this method")
            if matched is not None:
                raise field_error(f"{where}.match_label_tokens", "a method without Q-Tuning trains every token",
                           "remove match_label_tokens, or give the method a sample and token policy")
            budgets: list[Budget | None] = [None]
        elif pinned is not None:
            budgets = list(_budgets(pinned, f"{where}.budgets"))
        elif top_budgets is not None:
            budgets = list(top_budgets)
        else:
            raise field_error("budgets", f"missing, and method {name!r} uses Q-Tuning",
                       "add `budgets: [[0.25, 0.5]]` at the top level or inside the method")
        methods.append(Method(name, overrides, budgets, enabled, matched))
    by_name = {m.name: m for m in methods}
    for method in methods:
        if method.match_label_tokens is None:
            continue
        where = f"methods.{method.name}.match_label_tokens"
        target = by_name.get(method.match_label_tokens)
        if target is None or target is method:
            raise field_error(where, f"no other method named {method.match_label_tokens!r} in the matrix",
                       f"name one of {', '.join(n for n in by_name if n != method.name)}")
        if not target.qtuning_enabled or target.match_label_tokens is not None:
            raise field_error(where, f"method {target.name!r} has no realised label-token share to match",
                       "name a method that prunes with its own budget (e.g. qtuning)")
        missing = [b for b in method.budgets if b not in target.budgets]
        if missing:
            raise field_error(where, f"method {target.name!r} has no budget {budget_label(missing[0])}",
                       "give both methods the same budgets")
        if {**training, **method.overrides}.get("token_policy", "qtuning") == "none":
            raise field_error(where, "token_policy none keeps every token, so no label-token share can be matched",
                       "use token_policy random (or another pruning token policy)")
    return methods


def _parse_equal_compute(value: Any, methods: list[Method], training: dict[str, Any]) -> EqualCompute | None:
    if value is None:
        return None
    spec = _mapping(value, "equal_compute", ("reference", "max_steps"))
    reference = _str(spec.get("reference"), "equal_compute.reference")
    names = [m.name for m in methods]
    if reference not in names:
        raise field_error("equal_compute.reference", f"{reference!r} is not a method of the matrix",
                   f"name one of {', '.join(names)} (add it to `methods:`)")
    if len(next(m for m in methods if m.name == reference).budgets) != 1:
        raise field_error("equal_compute.reference", f"method {reference!r} has several budgets, so its compute is ambiguous",
                   "use a method with one budget (e.g. full data)")
    steps = training.get("max_steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise field_error("training.max_steps", f"equal_compute needs a fixed number of equal steps, got {steps!r}",
                   "set training.max_steps (the equal-steps point)")
    max_steps = _int(spec.get("max_steps"), "equal_compute.max_steps", 1)
    if max_steps < steps:
        raise field_error("equal_compute.max_steps", f"{max_steps} < training.max_steps {steps}",
                   "allow at least as many steps as the equal-steps point")
    if next(m for m in methods if m.name == reference).match_label_tokens is not None:
        raise field_error("equal_compute.reference", f"method {reference!r} trains at another method's token share, "
                          "which runs after the reference", "use a method with its own budget (e.g. full data)")
    for method in methods:
        settings = {**training, **method.overrides}
        where = "training" if all(k not in method.overrides for k in ("lr_scheduler_type", "warmup_ratio",
                                                                       "warmup_steps")) else f"methods.{method.name}"  # fmt: skip
        schedule = settings.get("lr_scheduler_type", "linear")
        if schedule not in CONSTANT_SCHEDULES:
            raise field_error(f"{where}.lr_scheduler_type", f"{schedule!r} decays with the run's length, so a cell "
                              "trained on to equal compute would follow another schedule",
                              "use constant or constant_with_warmup")  # fmt: skip
        warmup = settings.get("warmup_steps", 0)
        if settings.get("warmup_ratio") or (isinstance(warmup, float) and 0 < warmup < 1):
            raise field_error(f"{where}.warmup_ratio", "a warmup share depends on the run's length",
                              "give warmup_steps as a whole number of steps")
    return EqualCompute(reference, max_steps)


def _parse_baselines(value: Any, methods: list[Method], training: dict[str, Any]) -> list[str]:
    names = [m.name for m in methods]
    if value is None:  # full data, and random samples with random tokens at their own budget
        return [m.name for m in methods if not m.qtuning_enabled] + [
            m.name for m in methods
            if m.qtuning_enabled and m.match_label_tokens is None
            and {**training, **m.overrides}.get("sample_policy") == "random"
            and {**training, **m.overrides}.get("token_policy") == "random"
        ]  # fmt: skip
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise field_error("baselines", f"must be a list of method names, got {value!r}", "e.g. [full, random-random]")
    for i, name in enumerate(value):
        if name not in names:
            raise field_error(f"baselines[{i}]", f"{name!r} is not a method of the matrix", f"name one of {', '.join(names)}")
    return list(value)


def plan_cells(matrix: Matrix, only: list[str] | None = None) -> list[Cell]:
    """Every cell in run order: ``base`` (if ``eval.base`` and an evaluation is enabled), then seed by seed, each
    method's budgets, so a bench stopped early still has every method at the first seeds. Within a seed the
    equal-compute reference runs first and a ``match_label_tokens`` method after the method it matches, since
    their results set the others' targets. ``only``: method names (``base`` included) to keep."""
    cells: list[Cell] = []
    if matrix.eval.base and matrix.eval.enabled:
        cells.append(Cell(BASE_METHOD, None, None))
    reference = matrix.equal_compute.reference if matrix.equal_compute else None
    ordered = sorted(matrix.methods, key=lambda m: (m.name != reference, m.match_label_tokens is not None))
    for seed in matrix.seeds:
        for method in ordered:
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
