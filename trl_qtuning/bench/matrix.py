"""The matrix file: typed specs, validated in one place, every error naming its field.

``load_matrix`` reads the YAML, checks every field (types, ranges, references between methods) and returns a
:class:`Matrix`; ``plan_cells`` turns it into the cells to run, in run order. Nothing here trains or loads a model.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError
from pydantic_core import PydanticCustomError

from ..errors import CliError, one_line

__all__ = [
    "BASE_METHOD", "PROG", "BenchConfigError", "Cell", "EqualCompute", "EvalSpec", "Matrix", "Method", "TrainData",
    "budget_label", "budget_tag", "build_config", "cell_config_kwargs", "field_error", "load_matrix", "plan_cells",
    "with_defaults",
]  # fmt: skip

PROG = "trl-qtuning bench"
BASE_METHOD = "base"

NOISE_TYPES = ("swap", "numbers")
"""``data.train.label_noise_type`` (trl_qtuning/bench/data.py applies them)."""
CONTRAST_KINDS = ("swap", "numbers")
"""``eval.contrast.kinds`` (trl_qtuning/bench/contrast.py)."""
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
    """``"demo"``, a local model folder or a LoRA run's output (its adapter merged before training)."""
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

    def _name(self, at: str, seed: str) -> str:
        budget = at + budget_tag(self.budget) if self.budget else ""
        return BASE_METHOD if self.is_base else f"{self.method}{budget}{seed}{self.seed}"

    id = property(lambda self: self._name("@", "/seed"))
    dirname = property(lambda self: self._name("_r", "_seed"))

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



class _Spec(BaseModel):
    """A mapping of the matrix file. Strict: no unknown key, no coercion (``"8"`` or ``8.0`` is not an integer,
    ``1`` is not ``true``), no NaN; so a typo fails before anything trains instead of running with a default."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _within(message: str, test: Callable[[Any], bool]) -> AfterValidator:
    def check(value: Any) -> Any:
        if not test(value):
            raise PydanticCustomError("interval", message)
        return value

    return AfterValidator(check)


def _distinct(what: str, label: Callable[[Any], str] = str) -> AfterValidator:
    def check(values: list[Any]) -> list[Any]:
        twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if twice is not None:
            raise PydanticCustomError("duplicate", f"lists the {what} {{value}} twice", {"value": label(twice)})
        return values

    return AfterValidator(check)


Text = Annotated[str, Field(pattern=r"\S")]
Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
Share = Annotated[float, _within("must be a share in [0, 1]", lambda v: 0.0 <= v <= 1.0)]
Ratio = Annotated[float, _within("must be in (0, 1]", lambda v: 0.0 < v <= 1.0)]
Budgets = Annotated[
    list[Annotated[tuple[Ratio, Ratio], Strict(False)]], Field(min_length=1), _distinct("budget", budget_label)
]
"""``[[0.25, 0.5], ...]`` (YAML lists, read as tuples; strict elements)."""
BUDGET_NAMES = ("sample_keep_ratio", "token_keep_ratio")
"""The names of a budget pair's two positions (error messages name them)."""


class LoraSpec(_Spec):
    r: Positive = 8
    alpha: Annotated[float | int, _within("must be > 0", lambda v: v > 0)] = 16  # as written: the fingerprint hashes it
    dropout: Annotated[float | int, _within("must be in [0, 1)", lambda v: 0 <= v < 1)] = 0.05
    target_modules: Text | Annotated[list[Text], Field(min_length=1)] = "all-linear"


class TrainData(_Spec):
    """``data.train``: where the training pool comes from, and the rows' label noise (a subclass per source)."""

    source: str
    size: Positive | None = None
    seed: int = 0
    label_noise: Share = 0.0
    """Share of the training rows whose answers are corrupted (0: clean)."""
    label_noise_type: Literal[NOISE_TYPES] = "swap"
    """How: ``swap`` (answers swapped among the chosen rows) or ``numbers`` (one carried arithmetic slip each)."""

    @property
    def options(self) -> dict[str, Any]:
        """Source-specific keys (``strip_calculator``, ``subjects``, ``max_level``, ``max_chars``, ``noisy_share``)."""
        return source_options(self, self.source)

    def as_dict(self) -> dict[str, Any]:
        """The ``data.train`` mapping as written, for the fingerprints: default noise settings (none; ``swap``) stay
        out, so the committed cells, which were fingerprinted without them, keep their fingerprints."""
        out: dict[str, Any] = {"source": self.source, **self.options, "size": self.size, "seed": self.seed}
        if getattr(self, "path", None) is not None:  # the sources that read a local file
            out["path"] = self.path
        if self.label_noise:
            out["label_noise"] = self.label_noise
            if self.label_noise_type != "swap":
                out["label_noise_type"] = self.label_noise_type
        return out


class Gsm8kJsonlTrain(TrainData):
    source: Literal["gsm8k_jsonl"]
    path: Text
    strip_calculator: bool = False


class DemoMathTrain(TrainData):
    source: Literal["demo_math"]
    subjects: list[Text] | None = None
    max_level: Positive | None = None
    max_chars: Positive | None = None


class ArithmeticTrain(TrainData):
    source: Literal["arithmetic"]
    noisy_share: Share = 0.2


class LocalTrain(TrainData):
    source: Literal["local"]
    path: Text


TRAIN_SCHEMAS: dict[str, type[TrainData]] = {
    "gsm8k_jsonl": Gsm8kJsonlTrain, "demo_math": DemoMathTrain, "arithmetic": ArithmeticTrain, "local": LocalTrain,
}  # fmt: skip
"""``data.train``: the keys of its source only."""


def source_options(spec: BaseModel, source: str) -> dict[str, Any]:
    """The source's own keys (passed to the data loader, which has their defaults), as far as the file sets them
    (hashed as written: unset keys stay out)."""
    return {k: getattr(spec, k) for k in TRAIN_SCHEMAS[source].model_fields
            if k not in TrainData.model_fields and k != "path" and k in spec.model_fields_set}  # fmt: skip


class DataSpec(_Spec):
    train: dict[str, Any]
    """Checked by ``TRAIN_SCHEMAS[source]``."""
    heldout_size: NonNegative = 0


class TransferSpec(_Spec):
    """``eval.transfer``: every source's keys (its source's are used)."""

    source: Literal[tuple(TRAIN_SCHEMAS)] = "demo_math"
    size: Positive = 64
    seed: int = 0
    batch_size: Positive = 8
    max_length: Positive = 1024
    path: Text | None = None
    subjects: list[Text] | None = None
    max_level: Positive | None = None
    max_chars: Positive | None = None
    strip_calculator: bool = False
    noisy_share: Share = 0.2


class NllSpec(_Spec):
    batch_size: Positive = 8
    max_length: Positive = 1024


class GenerationSpec(_Spec):
    size: Positive = 50
    max_new_tokens: Positive = 256
    batch_size: Positive = 16
    path: Text | None = None
    source: Literal["gsm8k_test", "gsm8k_jsonl", "arithmetic"] | None = None
    """None: gsm8k_jsonl with a path, else gsm8k_test."""


class ChoiceSpec(_Spec):
    size: Positive = 100
    batch_size: Positive = 16
    max_length: Positive = 512
    subset: Literal["test", "validation"] = "test"
    source: Literal["arc", "arithmetic"] = "arc"


class ContrastSpec(_Spec):
    kinds: Annotated[list[Literal[CONTRAST_KINDS]], Field(min_length=1)] = list(CONTRAST_KINDS)
    batch_size: Positive = 8
    max_length: Positive = 1024


Off = BeforeValidator(lambda value: None if value is False else value)
"""An evaluation block: off (false or null) or a mapping."""
OnOff = BeforeValidator(lambda value: None if value is False else {} if value is True else value)
"""An evaluation block that may also be ``true``: on with its defaults."""


class EvalSpec(_Spec):
    """``eval``: the evaluations of every trained model, and the learning curve's cadence."""

    nll: Annotated[NllSpec | None, OnOff] = Field(default_factory=NllSpec)
    gsm8k: Annotated[GenerationSpec | None, Off] = None
    arc_easy: Annotated[ChoiceSpec | None, Off] = None
    arc_challenge: Annotated[ChoiceSpec | None, Off] = None
    seed: int = 0
    base: bool = True
    every_steps: Positive | None = None
    """Held-out NLL every N optimizer steps and at the end (the learning curve); None: at the end only."""
    transfer: Any = None
    """A second held-out set from another distribution (its NLL is logged with the curve): a :class:`TransferSpec`
    mapping, replaced on loading by its source's settings (a dict) or None."""
    contrast: Annotated[ContrastSpec | None, OnOff] = None
    """Held-out contrasts of true against wrong answers (``kinds``, ``batch_size``, ``max_length``), at the end."""

    @property
    def enabled(self) -> bool:
        return any((self.nll, self.gsm8k, self.arc_easy, self.arc_challenge, self.transfer, self.contrast))

    def as_dict(self) -> dict[str, Any]:
        """The settings the fingerprints hash (the optional blocks only where set)."""
        return self.model_dump(exclude={k for k in ("every_steps", "transfer", "contrast") if getattr(self, k) is None})


class EqualCompute(_Spec):
    """``equal_compute``: every other cell trains on until its counted compute reaches the reference's."""

    reference: Text
    max_steps: Positive


class MethodKeys(_Spec):
    """A method's keys that the bench reads itself (the others are QTuningConfig fields)."""

    budgets: Budgets | None = None
    match_label_tokens: Text | None = None
    qtuning_enabled: bool | None = None


class MatrixSpec(_Spec):
    experiment: Text = "trl-qtuning-bench"
    output_dir: Text
    report_to: Literal["auto", "mlflow", "none"] = "auto"
    tracking_uri: Text | None = None
    model: Text = "demo"
    lora: LoraSpec | None = LoraSpec()
    data: DataSpec
    training: dict[str, Any] | None = None
    eval: EvalSpec | None = None
    methods: Annotated[dict[str, dict[str, Any] | None], Field(min_length=1)]
    budgets: Budgets | None = None
    seeds: Annotated[list[NonNegative], Field(min_length=1), _distinct("seed")] = [0]
    equal_compute: EqualCompute | None = None
    baselines: list[Text] | None = None
    clean_reference: Text | None = None


FIXES = {
    "output_dir": "add `output_dir: bench_runs/<name>` (one folder per cell goes there)",
    "data": "add `data: {train: {source: arithmetic, size: 64}, heldout_size: 16}`",
    "train": "add `train: {source: gsm8k_jsonl, path: ..., size: 256}`",
    "path": "give the file's path (sources gsm8k_jsonl and local read a local file)",
    "label_noise": "e.g. 0.3 corrupts the answers of 30% of the training rows",
    "label_noise_type": "swap: answers swapped among the corrupted rows; numbers: a carried arithmetic slip",
    "methods": "add e.g. `methods: {full: {qtuning_enabled: false}, qtuning: {}}`",
    "budgets": "give [sample_keep_ratio, token_keep_ratio] pairs once each, e.g. [[0.25, 0.5], [0.5, 0.7]]",
    "seeds": "list each seed once, e.g. [0, 1, 2]",
    "target_modules": "e.g. all-linear or [q_proj, v_proj]",
    "kinds": f"e.g. [{', '.join(CONTRAST_KINDS)}]",
    "baselines": "e.g. [full, random-random]",
    "clean_reference": "the path of another matrix file, e.g. recipes/bench/study_gsm8k_fill_clean.yaml",
}
"""The fix an error names, by the field's name (a generic one otherwise)."""
_PROBLEMS = {
    "missing": "missing", "extra_forbidden": "unknown key", "int_type": "must be an integer",
    "float_type": "must be a number", "finite_number": "must be a number", "bool_type": "must be true or false",
    "string_type": "must be a non-empty string", "string_pattern_mismatch": "must be a non-empty string",
    "model_type": "must be a mapping", "dict_type": "must be a mapping", "list_type": "must be a list",
    "literal_error": "must be one of {expected}", "greater_than_equal": "must be >= {ge}",
    "too_short": "must be a non-empty {field_type}", "too_long": "must be a pair [sample_keep_ratio, token_keep_ratio]",
    "tuple_type": "must be a pair [sample_keep_ratio, token_keep_ratio]",
}  # fmt: skip


def field_error(where: str, problem: str, fix: str | None = None) -> BenchConfigError:
    return BenchConfigError(f"{where}: {problem}" + (f" (fix: {fix})" if fix else ""))


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _schema_error(error: dict[str, Any], schema: type[BaseModel], value: Any, where: str) -> BenchConfigError:
    """One pydantic error as the bench's: the dotted key (a union member's tag left out), the problem, the fix."""
    names, node, model, loc, kind = [where] if where else [], value, schema, error["loc"], error["type"]
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict) and part in node or kind == "missing" and last and isinstance(part, str):
            names.append(str(part))
            field = model.model_fields.get(part) if model is not None and isinstance(part, str) else None
            model = next(iter(_models_in(field.annotation)), None) if field is not None and not last else model
            node = node.get(part) if isinstance(node, dict) else None
        elif isinstance(part, int):  # a list index; inside a budget pair, the pair's position by name
            names[-1] += f" ({BUDGET_NAMES[part]})" if i > 0 and isinstance(loc[i - 1], int) else f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
        # else: the tag of a union member (`int`, `float`), not a key of the file
    ctx = dict(error.get("ctx") or {})
    ctx["expected"] = str(ctx.get("expected")).replace("'", "").replace(" or ", ", ")  # 'a', 'b' or 'c' -> a, b, c
    ctx["field_type"] = "mapping" if ctx.get("field_type") == "Dictionary" else "list"
    problem = _PROBLEMS[kind].format(**ctx) if kind in _PROBLEMS else error["msg"]
    if kind not in ("missing", "extra_forbidden", "duplicate"):
        problem += f", got {error['input']!r}"
    key = next((n for n in reversed(names) if n[0].isalpha()), "").split(" ")[0].split("[")[0]
    fix = FIXES.get(key) or (f"add `{key}:`" if kind == "missing" else None)
    if kind == "extra_forbidden":
        fix = f"use one of {', '.join(model.model_fields)}" if model is not None else "check the spelling"
    return field_error(".".join(names) or "the matrix", problem, fix)


def _check(schema: type[BaseModel], value: Any, where: str) -> Any:
    """``value`` validated by ``schema``; its first mistake raised as a :class:`BenchConfigError`."""
    try:
        return schema.model_validate(value)
    except ValidationError as exc:
        raise _schema_error(exc.errors()[0], schema, value, where) from None


def _existing_path(text: str, where: str, *, check: bool, kind: str = "file") -> str:
    """The path as written (``~`` expanded), checked to exist against the current directory. It is kept as written,
    not resolved, so that the cells' fingerprints are the same on every machine that holds the same layout (a
    clone under another root must not make every committed result stale)."""
    path = Path(text).expanduser()
    resolved = (path if path.is_absolute() else Path.cwd() / path).resolve()
    if check and not resolved.exists():
        raise field_error(where, f"{kind} not found: {text}",
                          f"relative paths resolve against the current directory {Path.cwd()}; give an existing path")
    return str(path)


@functools.cache
def _qtuning_fields() -> dict[str, Any]:
    """QTuningConfig's fields and their defaults (``dataclasses.MISSING`` where a factory makes it)."""
    from ..config import QTuningConfig

    return {f.name: f.default for f in dataclasses.fields(QTuningConfig) if f.init}


def _setting(name: str, *layers: dict[str, Any]) -> Any:
    """A QTuningConfig field as a cell gets it: the last of ``layers`` that sets it, else QTuningConfig's default
    (None for a field this transformers version lacks)."""
    return next((layer[name] for layer in reversed(layers) if name in layer), _qtuning_fields().get(name))


def _check_fields(settings: dict[str, Any], where: str) -> None:
    for key in settings:
        if key in OWNED_FIELDS:
            raise field_error(f"{where}.{key}", "is set by the bench for every cell", f"set it through {OWNED_FIELDS[key]}")
        if key not in _qtuning_fields():
            raise field_error(
                f"{where}.{key}", "unknown QTuningConfig field",
                "check the spelling; valid keys are the fields of QTuningConfig / trl.SFTConfig "
                "(`trl-qtuning sft --help` lists them)",
            )



def with_defaults(*layers: dict[str, Any]) -> dict[str, Any]:
    """The bench defaults for every cell (what demo/run.py uses on a CPU) under the given settings (a set
    `gradient_checkpointing` drops the default's alias)."""
    import torch

    from ..demo.run import bf16_is_fast

    use_cuda = torch.cuda.is_available()
    # Newer transformers name it `activation_checkpointing` and warn at `gradient_checkpointing`; older ones know
    # only `gradient_checkpointing`.
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in _qtuning_fields() else "gradient_checkpointing"
    merged = {
        "use_cpu": not use_cuda,
        "bf16": bf16_is_fast(use_cuda),  # bf16 autocast only where the hardware makes it fast
        checkpointing: False,
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
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

    _check_fields({k: v for k, v in kwargs.items() if k not in OWNED_FIELDS}, where)
    try:
        return QTuningConfig(**kwargs)
    except ValueError as exc:  # QTuningConfig / SFTConfig / TrainingArguments validation
        raise field_error(where, one_line(exc)) from exc



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
    spec = _check(MatrixSpec, {} if raw is None else raw, "")
    output_dir = Path(spec.output_dir).expanduser()
    output_dir = output_dir if output_dir.is_absolute() else Path.cwd() / output_dir

    report_to = spec.report_to
    mlflow_installed = importlib.util.find_spec("mlflow") is not None
    if report_to == "auto":
        report_to = "mlflow" if mlflow_installed else "none"
    elif report_to == "mlflow" and not mlflow_installed and check_inputs:
        raise field_error("report_to", "mlflow is not installed", "pip install 'trl-qtuning[mlflow]', or set report_to: none")

    model = spec.model
    if model != "demo":
        model = _existing_path(model, "model", check=check_inputs, kind="model folder")
        if check_inputs and not any((Path(model) / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise field_error("model", f"not a model folder (no config.json or adapter_config.json): {model}",
                              "give `demo`, a saved model folder or a LoRA run's output")

    heldout_size = spec.data.heldout_size
    source = spec.data.train.get("source")
    if source not in TRAIN_SCHEMAS:
        raise field_error("data.train.source", f"must be one of {', '.join(TRAIN_SCHEMAS)}, got {source!r}")
    train = _check(TRAIN_SCHEMAS[source], spec.data.train, "data.train")
    if "label_noise_type" in train.model_fields_set and not train.label_noise:
        raise field_error("data.train.label_noise_type", "has no effect without label_noise",
                          "set label_noise (e.g. 0.3), or remove label_noise_type")
    if isinstance(train, (Gsm8kJsonlTrain, LocalTrain)):
        train.path = _existing_path(train.path, "data.train.path", check=check_inputs)
    training = dict(spec.training or {})
    _check_fields(training, "training")
    eval_spec = spec.eval or EvalSpec()
    if eval_spec.nll is not None and heldout_size < 1:
        raise field_error("eval.nll", "needs held-out rows, but data.heldout_size is 0",
                          "set data.heldout_size (e.g. 64), or eval.nll: false")
    gsm8k = eval_spec.gsm8k
    if gsm8k is not None:
        gsm8k.source = gsm8k.source or ("gsm8k_jsonl" if gsm8k.path else "gsm8k_test")
        if gsm8k.source == "gsm8k_jsonl":
            if not gsm8k.path:
                raise field_error("eval.gsm8k.path", "missing (source gsm8k_jsonl)", "give the test jsonl's path")
            gsm8k.path = _existing_path(gsm8k.path, "eval.gsm8k.path", check=check_inputs)
    if eval_spec.every_steps is not None and eval_spec.nll is None:
        raise field_error("eval.every_steps", "the learning curve is the held-out NLL, but eval.nll is off",
                          "set eval.nll: true (and data.heldout_size), or remove every_steps")
    if eval_spec.contrast is not None and heldout_size < 2:
        raise field_error("eval.contrast", f"compares held-out rows, but data.heldout_size is {heldout_size}",
                          "set data.heldout_size (e.g. 48), or remove eval.contrast")
    off = eval_spec.transfer is None or eval_spec.transfer is False
    transfer = None if off else _check(TransferSpec, eval_spec.transfer, "eval.transfer")
    eval_spec.transfer = transfer and {
        **transfer.model_dump(include={"source", "size", "seed", "batch_size", "max_length"}),
        **source_options(transfer, transfer.source)}  # fmt: skip
    if transfer is not None and transfer.source in ("gsm8k_jsonl", "local"):
        if transfer.path is None:
            raise field_error("eval.transfer.path", f"missing (source {transfer.source} reads a local file)", FIXES["path"])
        eval_spec.transfer["path"] = _existing_path(transfer.path, "eval.transfer.path", check=check_inputs)
    methods = _parse_methods(spec, training)
    if train.label_noise:
        for method in methods:
            if method.qtuning_enabled and _setting("qtuning_ledger", training, method.overrides) == "none":
                where = f"methods.{method.name}" if "qtuning_ledger" in method.overrides else "training"
                raise field_error(f"{where}.qtuning_ledger", "label noise is audited from the ledger, which is off",
                                  "use qtuning_ledger: summary (or full)")
    reference = spec.clean_reference
    if reference is not None:
        reference = _existing_path(reference, "clean_reference", check=check_inputs)
    equal_compute = _parse_equal_compute(spec.equal_compute, methods, training)
    names = [m.name for m in methods]
    for i, name in enumerate(spec.baselines or []):
        if name not in names:
            raise field_error(f"baselines[{i}]", f"{name!r} is not a method of the matrix", f"name one of {', '.join(names)}")
    baselines = list(spec.baselines) if spec.baselines is not None else [  # default: full data, and random samples
        m.name for m in methods if not m.qtuning_enabled] + [  # with random tokens at their own budget
        m.name for m in methods if m.qtuning_enabled and m.match_label_tokens is None
        and _setting("sample_policy", training, m.overrides) == "random"
        and _setting("token_policy", training, m.overrides) == "random"]  # fmt: skip
    matrix = Matrix(
        path=path, text=text, experiment=spec.experiment, output_dir=output_dir, report_to=report_to,
        tracking_uri=spec.tracking_uri, model=model, lora=spec.lora and spec.lora.model_dump(), train=train,
        heldout_size=heldout_size, training=training, eval=eval_spec, methods=methods, seeds=list(spec.seeds),
        equal_compute=equal_compute, baselines=baselines, clean_reference=reference,
    )  # fmt: skip
    if check_inputs:
        build_config({**with_defaults(training), "output_dir": str(output_dir / "_check")}, "training")
        for method in methods:
            for budget in method.budgets:
                cell = Cell(method.name, budget, matrix.seeds[0])
                where = f"methods.{method.name}" + (f" (budget {budget_label(budget)})" if budget else "")
                share = None if method.match_label_tokens is None else (budget[0] * budget[1] if budget else None)
                build_config(cell_config_kwargs(matrix, cell, method, matched_label_share=share), where)
    return matrix


def _parse_methods(spec: MatrixSpec, training: dict[str, Any]) -> list[Method]:
    default_enabled = _setting("qtuning_enabled", training)
    methods: list[Method] = []
    for name, overrides in spec.methods.items():
        where = f"methods.{name}"
        if not _FOLDER_SAFE.match(name):
            raise field_error(where, "method names must be folder-safe", "use letters, digits, '-', '_' and '.' only")
        if name == BASE_METHOD:
            raise field_error(where, f"{BASE_METHOD!r} is reserved for the untrained model's row", "rename the method")
        overrides = dict(overrides or {})
        if "max_steps" in overrides:
            raise field_error(f"{where}.max_steps", "every method trains the same steps (the equal-steps point)",
                              "set training.max_steps, and equal_compute to train methods on to equal compute")
        keys = _check(MethodKeys, {k: overrides[k] for k in MethodKeys.model_fields if k in overrides}, where)
        overrides = {k: v for k, v in overrides.items() if k not in ("budgets", "match_label_tokens")}  # the bench's
        _check_fields(overrides, where)
        enabled = default_enabled if keys.qtuning_enabled is None else keys.qtuning_enabled
        if not isinstance(enabled, bool):
            raise field_error("training.qtuning_enabled", f"must be true or false, got {enabled!r}")
        if not enabled:
            if keys.budgets is not None:
                raise field_error(f"{where}.budgets", "a method without Q-Tuning (qtuning_enabled: false) has no budget",
                                  "remove `budgets:` from this method")
            if keys.match_label_tokens is not None:
                raise field_error(f"{where}.match_label_tokens", "a method without Q-Tuning trains every token",
                                  "remove match_label_tokens, or give the method a sample and token policy")
            budgets: list[Budget | None] = [None]
        elif (keys.budgets or spec.budgets) is not None:
            budgets = list(keys.budgets or spec.budgets)
        else:
            raise field_error("budgets", f"missing, and method {name!r} uses Q-Tuning",
                              "add `budgets: [[0.25, 0.5]]` at the top level or inside the method")
        methods.append(Method(name, overrides, budgets, enabled, keys.match_label_tokens))
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
        if _setting("token_policy", training, method.overrides) == "none":
            raise field_error(where, "token_policy none keeps every token, so no label-token share can be matched",
                       "use token_policy random (or another pruning token policy)")
    return methods


def _parse_equal_compute(spec: EqualCompute | None, methods: list[Method], training: dict[str, Any]) -> EqualCompute | None:
    if spec is None:
        return None
    reference, max_steps = spec.reference, spec.max_steps
    by_name = {m.name: m for m in methods}
    if reference not in by_name:
        raise field_error("equal_compute.reference", f"{reference!r} is not a method of the matrix",
                   f"name one of {', '.join(by_name)} (add it to `methods:`)")
    if len(by_name[reference].budgets) != 1:
        raise field_error("equal_compute.reference", f"method {reference!r} has several budgets, so its compute is ambiguous",
                   "use a method with one budget (e.g. full data)")
    steps = training.get("max_steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise field_error("training.max_steps", f"equal_compute needs a fixed number of equal steps, got {steps!r}",
                   "set training.max_steps (the equal-steps point)")
    if max_steps < steps:
        raise field_error("equal_compute.max_steps", f"{max_steps} < training.max_steps {steps}",
                   "allow at least as many steps as the equal-steps point")
    if by_name[reference].match_label_tokens is not None:
        raise field_error("equal_compute.reference", f"method {reference!r} trains at another method's token share, "
                          "which runs after the reference", "use a method with its own budget (e.g. full data)")
    for method in methods:
        where = "training" if all(k not in method.overrides for k in ("lr_scheduler_type", "warmup_ratio",
                                                                       "warmup_steps")) else f"methods.{method.name}"  # fmt: skip
        schedule = _setting("lr_scheduler_type", training, method.overrides)
        if schedule not in CONSTANT_SCHEDULES:
            raise field_error(f"{where}.lr_scheduler_type", f"{schedule!r} decays with the run's length, so a cell "
                              "trained on to equal compute would follow another schedule",
                              "use constant or constant_with_warmup")  # fmt: skip
        warmup = _setting("warmup_steps", training, method.overrides)
        if _setting("warmup_ratio", training, method.overrides) or (isinstance(warmup, float) and 0 < warmup < 1):
            raise field_error(f"{where}.warmup_ratio", "a warmup share depends on the run's length",
                              "give warmup_steps as a whole number of steps")
    return spec


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
        if unknown := [name for name in only if name not in names]:
            raise BenchConfigError(f"--only {unknown[0]}: no such method in the matrix (methods: {', '.join(sorted(names))})")
        cells = [c for c in cells if c.method in only]
    return cells
