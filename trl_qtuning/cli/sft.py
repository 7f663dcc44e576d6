"""``trl-qtuning sft``: supervised fine-tuning with Q-Tuning, in the style of ``trl sft``.

    trl-qtuning sft --config recipes/tiny/qtuning/config_cpu.yaml --model_name_or_path ./model --dataset_name data.jsonl

Arguments are the fields of ``trl.ScriptArguments``, :class:`~trl_qtuning.QTuningConfig` (``trl.SFTConfig`` plus the
Q-Tuning budgets), ``trl.ModelConfig`` (model, LoRA, quantisation; plus ``quantization_fallback``, see
:mod:`trl_qtuning.quantization`) and ``trl.DatasetMixtureConfig``. A YAML recipe
(``--config``) sets their values and may carry an ``env:`` mapping of environment variables; flags on the command
line override the recipe. ``dataset_name`` is a Hub dataset id or a local path: a folder written by
``Dataset.save_to_disk``, a folder of data files, or a ``.json``/``.jsonl``/``.parquet``/``.csv`` file.

``--config`` and ``--accelerate_config`` also find the recipes and accelerate configs shipped in the wheel, by
their ``recipes/...`` path or by name (``--accelerate_config ddp``): :mod:`trl_qtuning.cli.recipes`. Where no GPU
runs bf16 (and ``use_cpu`` is not set), TRL's ``bf16=True`` default becomes fp32 with one warning line, and an
explicit ``--bf16 true`` is an error naming ``--bf16 false``.

Mistakes in the arguments or inputs are reported as one line (exit code 2 for arguments and recipes, 1 for inputs
that cannot be loaded); set ``TRL_QTUNING_DEBUG=1`` to get the full traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

__all__ = [
    "CliError", "debug_enabled", "load_datasets", "load_local_dataset", "main", "make_parser", "one_line", "run",
    "run_reporting_errors",
]  # fmt: skip

PROG = "trl-qtuning sft"
DEBUG_ENV = "TRL_QTUNING_DEBUG"
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}

logger = logging.getLogger(__name__)


class CliError(Exception):
    """A mistake the user can fix (arguments, recipe, inputs): reported as one line, without a traceback."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def one_line(exc: BaseException | str) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def run_reporting_errors(prog: str, body: Callable[[], int]) -> int:
    """Run a subcommand: a :class:`CliError` becomes one ``prog: error: ...`` line and its exit code (a traceback
    only with ``TRL_QTUNING_DEBUG=1``); argparse's ``--help`` / usage exits become return codes."""
    try:
        return body()
    except CliError as exc:
        if debug_enabled() and exc.__cause__ is not None:
            raise
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.code
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


# ----------------------------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------------------------


def make_parser(prog: str = PROG):
    """A ``trl.TrlParser`` over (ScriptArguments, QTuningConfig, QuantizedModelConfig, DatasetMixtureConfig).

    ``QuantizedModelConfig`` is ``trl.ModelConfig`` plus ``quantization_fallback``.
    """
    from trl import DatasetMixtureConfig, ScriptArguments, TrlParser

    from trl_qtuning.config import QTuningConfig
    from trl_qtuning.quantization import QuantizedModelConfig

    class _Parser(TrlParser):
        def error(self, message: str):  # argparse's: usage of 400 options + exit(2); ours: one line
            raise CliError(f"{message} (see `{prog} --help`)")

    return _Parser(
        (ScriptArguments, QTuningConfig, QuantizedModelConfig, DatasetMixtureConfig),
        prog=prog,
        usage=f"{prog} [--config RECIPE.yaml] [--<field> VALUE ...]",
        description=(
            "Supervised fine-tuning with Q-Tuning (QTuningSFTTrainer). Every option below can be set in the YAML "
            "recipe given with --config (which may also hold an `env:` mapping of environment variables); options "
            "on the command line override the recipe. --dataset_name takes a Hub id or a local path (save_to_disk "
            "folder, data folder, .json/.jsonl/.parquet/.csv file); `datasets:` in the recipe loads a mixture. "
            "--resume_from_checkpoint true resumes from the last checkpoint in output_dir. "
            "--load_in_4bit true trains QLoRA (with --use_peft true); if bitsandbytes cannot run it, the command "
            "stops with the reason unless --quantization_fallback lora asks for plain LoRA instead. "
            "Without a GPU that runs bf16 (and without --use_cpu true), TRL's bf16=True default becomes fp32, with a "
            "warning; --bf16 true there is an error. --config and --accelerate_config also take the name of a recipe "
            "or config shipped with trl-qtuning (e.g. --accelerate_config ddp). "
            f"Set {DEBUG_ENV}=1 to see tracebacks instead of one-line errors."
        ),
    )


def _normalise_argv(argv: list[str]) -> list[str]:
    """Accept ``--config=path`` too (TrlParser only recognises ``--config path``)."""
    out: list[str] = []
    for arg in argv:
        if arg.startswith("--config="):
            out.extend(["--config", arg.split("=", 1)[1]])
        else:
            out.append(arg)
    return out


def _read_recipe(argv: list[str]) -> dict[str, Any]:
    """Check the recipe and apply its ``env:`` block now, before transformers/datasets read their environment.

    A ``--config`` value that is not a file but names a recipe shipped with the package (``recipes/<model>/qtuning/
    config_<name>.yaml``, see :mod:`trl_qtuning.cli.recipes`) is replaced in ``argv`` by that file's path. Returns
    the recipe's mapping (empty without ``--config``).

    ``TrlParser`` applies the block too, but only after TRL is imported, which is too late for settings that the Hub
    libraries read at import (``HF_HUB_OFFLINE``, ``HF_HOME``...) when this runs as a fresh process.
    """
    if "--config" not in argv:
        return {}
    index = argv.index("--config")
    if index + 1 >= len(argv) or argv[index + 1].startswith("--"):
        raise CliError("--config needs the path of a YAML recipe")
    from .recipes import resolve_recipe

    try:
        path = resolve_recipe(argv[index + 1])
    except LookupError as exc:
        raise CliError(str(exc)) from exc
    argv[index + 1] = str(path)
    import yaml

    try:
        recipe = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CliError(f"cannot parse recipe {path}: {one_line(exc)}") from exc
    if not isinstance(recipe, dict):
        raise CliError(f"recipe {path} must be a YAML mapping of option names to values")
    env = recipe.get("env") or {}
    if not isinstance(env, dict):
        raise CliError(f"`env` in recipe {path} must be a mapping of variable names to values")
    for key, value in env.items():
        os.environ[str(key)] = str(value)
    return recipe


def device_supports_bf16() -> bool:
    """Whether transformers accepts ``bf16=True`` without ``use_cpu``: a GPU (or XLA device) with bf16."""
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    return bool(is_torch_bf16_gpu_available() or is_torch_xla_available())


def _given(argv: list[str], recipe: dict[str, Any], name: str) -> bool | None:
    """The boolean field ``name`` as the command line (which wins) or the recipe sets it; None when neither does."""
    value: Any = None
    flag = f"--{name}"
    for i, arg in enumerate(argv):
        if arg == flag:  # `--bf16` alone means true, as for HfArgumentParser's boolean flags
            following = argv[i + 1] if i + 1 < len(argv) else None
            value = True if following is None or following.startswith("--") else following
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    if value is None:
        value = recipe.get(name)
    if value is None or isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("true", "yes", "y", "t", "1")  # HfArgumentParser's true values


def _choose_precision(argv: list[str], recipe: dict[str, Any]) -> list[str]:
    """TRL's ``bf16=True`` default where the device has no bf16: train in fp32, saying so in one line; an explicit
    ``--bf16 true`` there stops with a message naming ``--bf16 false`` (transformers' own asks to "assign use_cpu").

    On the CPU with ``use_cpu`` set, bf16 autocast runs (transformers allows it), so nothing changes then. Under an
    accelerate config asking for bf16 (``ACCELERATE_MIXED_PRECISION=bf16``: the shipped GPU configs), transformers
    would keep bf16 even with ``--bf16 false``, so that is an error too, naming the config's ``mixed_precision``.
    """
    if "-h" in argv or "--help" in argv:
        return argv
    if _given(argv, recipe, "use_cpu") or device_supports_bf16():
        return argv
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower() == "bf16":  # wins over --bf16 false
        raise CliError(
            "the accelerate config asks for bf16 (mixed_precision: bf16) but this machine has no GPU with bf16 "
            "support: use an accelerate config with mixed_precision: 'no' (or fp16), and pass --bf16 false"
        )
    bf16 = _given(argv, recipe, "bf16")
    if bf16 is False or _given(argv, recipe, "fp16"):
        return argv
    if bf16:
        raise CliError(
            "bf16 is set but this machine has no GPU with bf16 support: pass --bf16 false to train in fp32 "
            "(or --use_cpu true to train in bf16 autocast on the CPU)"
        )
    if os.environ.get("RANK", "0") == "0":  # one line, not one per process
        print(
            f"{PROG}: warning: no GPU with bf16 support here: training in fp32 instead of TRL's default bf16=True "
            "(pass --bf16 false to silence this, or --use_cpu true for bf16 autocast on the CPU)",
            file=sys.stderr,
            flush=True,
        )
    return [*argv, "--bf16", "false"]


def _unknown_flags(parser, argv: list[str]) -> list[str]:
    """Flags no option starts with, found before the configs are built (whose checks would otherwise speak first)."""
    known = [option for option in parser._option_string_actions if option.startswith("--")]
    names = [arg.split("=", 1)[0] for arg in argv if arg.startswith("--") and arg != "--"]
    return [name for name in names if name != "--config" and not any(option.startswith(name) for option in known)]


def parse_args(argv: list[str]):
    """(script_args, training_args, model_args, dataset_args) from a recipe and command-line flags."""
    argv = _normalise_argv(argv)
    recipe = _read_recipe(argv)
    parser = make_parser()
    unknown = _unknown_flags(parser, argv)
    if unknown:
        raise CliError(f"unknown argument(s): {' '.join(unknown)} (see `{PROG} --help`)")
    argv = _choose_precision(argv, recipe)
    try:
        *parsed, recipe_rest, cli_rest = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except (ValueError, TypeError) as exc:  # dataclass validation (QTuningConfig, SFTConfig, ModelConfig...)
        raise CliError(one_line(exc)) from exc
    if recipe_rest:  # TrlParser gives them back as ["--key", "value", ...]
        keys = ", ".join(key.removeprefix("--") for key in recipe_rest[::2])
        raise CliError(f"unknown key(s) in the recipe: {keys} (see `{PROG} --help` for the valid names)")
    if cli_rest:
        raise CliError(f"unknown argument(s): {' '.join(cli_rest)} (see `{PROG} --help`)")
    return tuple(parsed)


# ----------------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    """A local path rather than a Hub id (``org/name`` or ``name``)."""
    if name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or name in (".", "..") or "\\" in name:
        return True
    return name.count("/") > 1 or Path(name).suffix.lower() in DATA_FILE_BUILDERS


def _check_model(model_args) -> None:
    name = model_args.model_name_or_path
    if not name:
        raise CliError("no model given: set `model_name_or_path` in the recipe or pass --model_name_or_path")
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CliError(f"model path is not a directory: {name}")
        if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
            raise CliError(f"not a model directory (no config.json or adapter_config.json): {name}")
        model_args.model_name_or_path = str(path)
    elif _looks_like_path(name):
        raise CliError(f"model path not found: {name}", code=1)


def load_local_dataset(path: Path, config_name: str | None = None, streaming: bool = False):
    """A local dataset as a ``DatasetDict``: a ``save_to_disk`` folder, a folder of data files, or one data file."""
    import datasets

    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.Dataset):
                loaded = datasets.DatasetDict({"train": loaded})
            if streaming:
                loaded = datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in loaded.items()})
            return loaded
        return datasets.load_dataset(str(path), name=config_name, streaming=streaming)
    builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise CliError(
            f"unsupported dataset file type {path.suffix or '(none)'!r}: {path} "
            f"(use {', '.join(sorted(DATA_FILE_BUILDERS))}, or a folder written by save_to_disk)"
        )
    return datasets.load_dataset(builder, data_files=str(path), streaming=streaming)


def load_datasets(script_args, dataset_args):
    """The ``DatasetDict`` to train on: the ``datasets:`` mixture if given, else ``dataset_name`` (Hub id or path)."""
    import datasets
    from trl import get_dataset

    if dataset_args.datasets:
        if script_args.dataset_name:
            logger.warning("Both `datasets` and `dataset_name` are given: using the `datasets` mixture.")
        source, load = "the `datasets` mixture", lambda: get_dataset(dataset_args)
    elif script_args.dataset_name:
        name = script_args.dataset_name
        path = Path(name).expanduser()
        source = repr(name)
        if path.exists():
            def load():
                return load_local_dataset(path, script_args.dataset_config, script_args.dataset_streaming)
        elif _looks_like_path(name):
            raise CliError(f"dataset not found: {name} (no such file or folder)", code=1)
        else:
            def load():
                return datasets.load_dataset(
                    name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
                )
    else:
        raise CliError("no dataset given: set `dataset_name` (Hub id or local path) or a `datasets:` mixture")
    try:
        return load()
    except CliError:
        raise
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:
        if debug_enabled():
            raise
        hint = ""
        if not (script_args.dataset_name and Path(script_args.dataset_name).expanduser().exists()):
            if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
                hint = " (HF_HUB_OFFLINE is set: only local or cached datasets can load)"
        detail = one_line(exc)
        if exc.__cause__ is not None:  # e.g. DatasetGenerationError wraps the parse error
            detail = f"{detail}: {one_line(exc.__cause__)}"
        raise CliError(f"cannot load dataset {source}{hint}: {detail}", code=1) from exc


def _split(dataset, split: str, option: str, source: str):
    if split not in dataset:
        available = ", ".join(map(repr, dataset)) or "none"
        raise CliError(f"split {split!r} not found in dataset {source} (available: {available}); set --{option}")
    return dataset[split]


def _check_columns(dataset, training_args, source: str) -> None:
    """SFT needs text, conversations or prompt-completion pairs (or tokenised rows): say so before TRL's KeyError."""
    columns = getattr(dataset, "column_names", None)
    if not columns:  # e.g. a streamed dataset whose features are unknown
        return
    text_field = getattr(training_args, "dataset_text_field", "text")
    if text_field in columns or "messages" in columns or "input_ids" in columns:
        return
    if "prompt" in columns and "completion" in columns:
        return
    raise CliError(
        f"dataset {source} has columns {', '.join(map(repr, columns))}; SFT needs a {text_field!r} column "
        "(--dataset_text_field), 'messages' (conversations), 'prompt' + 'completion', or pre-tokenised 'input_ids'",
        code=1,
    )


def _resume_value(value: str | bool | None) -> str | bool | None:
    if isinstance(value, str):
        if value.strip().lower() in ("true", "last", "latest"):
            return True
        if value.strip().lower() in ("", "false", "none"):
            return None
        if not Path(value).expanduser().is_dir():
            raise CliError(f"checkpoint not found: {value} (resume_from_checkpoint)", code=1)
    return value


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


def _final_loss(log_history: list[dict[str, Any]], fallback: float | None) -> float | None:
    for entry in reversed(log_history):
        if "loss" in entry:
            return float(entry["loss"])
    return fallback


def _realised_lines(realised: dict[str, Any], args) -> list[str]:
    """The budgets the run realised, each named for what it counts (the sums the ``qtuning/*`` metrics use)."""
    samples, kept_tokens = realised["sample_keep_ratio"], realised["kept_sample_token_share"]
    if not realised["steps"] or samples is None:
        return []
    line = f"Q-Tuning trained on {samples:.0%} of the samples it scored (target {args.sample_keep_ratio:.0%})"
    if kept_tokens is not None:
        line += f", and on {kept_tokens:.0%} of those samples' answer tokens"
    pruned = realised["token_keep_ratio"]
    if pruned is None:
        line += "; no sample was token-pruned."
    else:
        line += (
            f"; the token-pruned samples kept {pruned:.0%} of their answer tokens (token_keep_ratio target "
            f"{args.token_keep_ratio:.0%})."
        )
    return [line]


def summary_lines(trainer, train_output, quantization=None) -> list[str]:
    """The few lines printed after training (``quantization``: the run's ``QuantizationPlan``, if any)."""
    args = trainer.args
    history = trainer.state.log_history
    loss = _final_loss(history, getattr(train_output, "training_loss", None))
    loss_text = f"{loss:.4f}" if loss is not None else "n/a"
    lines = [f"Training completed: {trainer.state.global_step} optimizer steps, final loss {loss_text}."]
    if args.qtuning_enabled:
        lines += _realised_lines(trainer.qtuning_realised_budgets, args)
    if quantization is not None and quantization.requested_mode is not None:
        lines.append(quantization.describe())
    kind = "LoRA adapter" if getattr(trainer.model, "peft_config", None) else "model"
    lines.append(f"{kind[0].upper()}{kind[1:]} saved to {args.output_dir}.")
    if args.qtuning_enabled and args.qtuning_ledger != "none":
        from trl_qtuning.ledger import LEDGER_DIRNAME, SHARD_GLOB

        ledger = Path(args.output_dir) / LEDGER_DIRNAME
        shards = len(list(ledger.glob(SHARD_GLOB))) if ledger.is_dir() else 0
        lines.append(
            f"Decision ledger: {ledger} ({shards} Parquet shard{'s' if shards != 1 else ''}; "
            "read it with trl_qtuning.read_ledger(path) or pandas.read_parquet(path))."
        )
    return lines


def run(script_args, training_args, model_args, dataset_args) -> int:
    """Train with the parsed arguments (the body of ``trl sft``'s script, with ``QTuningSFTTrainer``)."""
    import transformers
    from packaging.version import Version
    from trl import get_peft_config

    from trl_qtuning.quantization import QuantizationError, plan_quantization, prepare_quantized_model
    from trl_qtuning.trainer import QTuningSFTTrainer

    _check_model(model_args)
    resume = _resume_value(training_args.resume_from_checkpoint)
    try:
        # Before anything is loaded: bitsandbytes and its backend for the device, a quantisable model, or the
        # opt-in plain-LoRA fallback (whose tags go to the MLflow run).
        quantization = plan_quantization(model_args, training_args)
    except QuantizationError as exc:
        raise CliError(one_line(exc), code=exc.code) from exc

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs

    dataset = load_datasets(script_args, dataset_args)
    source = "the `datasets` mixture" if dataset_args.datasets else repr(script_args.dataset_name)
    train_dataset = _split(dataset, script_args.dataset_train_split, "dataset_train_split", source)
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = _split(dataset, script_args.dataset_test_split, "dataset_test_split", source)
    for split in (train_dataset, eval_dataset):
        if split is not None:
            _check_columns(split, training_args, source)

    try:
        peft_config = get_peft_config(model_args)
        trainer = QTuningSFTTrainer(
            model=model_args.model_name_or_path,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            quantization_config=quantization.quantization_config,
            peft_config=peft_config,
        )
    except (OSError, ImportError) as exc:  # model not found / not downloadable, missing optional package
        if debug_enabled():
            raise
        hint = ""
        if isinstance(exc, ImportError) and (model_args.load_in_4bit or model_args.load_in_8bit):
            hint = " (quantisation needs `pip install 'trl-qtuning[quantization]'`)"
        model = model_args.model_name_or_path
        raise CliError(f"cannot set up training for model {model!r}{hint}: {one_line(exc)}", code=1) from exc
    try:
        # Really quantised as asked (never full precision in silence); 4-bit layers kept trainable on CPU.
        prepare_quantized_model(trainer.model, quantization)
    except QuantizationError as exc:
        raise CliError(one_line(exc), code=exc.code) from exc
    if quantization.tags and "mlflow" in (training_args.report_to or []):
        from trl_qtuning.tracking import attach_tracking

        attach_tracking(trainer, tags=quantization.tags)

    train_output = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    for line in summary_lines(trainer, train_output, quantization):
        trainer.accelerator.print(line)
    if training_args.push_to_hub:
        trainer.accelerator.print(f"Model pushed to the Hub: https://huggingface.co/{trainer.hub_model_id}.")
    if Version(transformers.__version__) >= Version("5.18.0") and hasattr(trainer, "end"):
        trainer.end()  # finish the trackers and destroy the process group
    return 0


def accelerate_command(argv: list[str]) -> list[str] | None:
    """The ``accelerate launch`` command for ``--accelerate_config NAME|FILE [--num_processes N] [--main_process_port P]``.

    ``NAME`` is a config shipped with the package (``ddp``, ``fsdp``, ``zero2``, ``zero3``, ``cpu_2proc``: see
    :mod:`trl_qtuning.cli.recipes`), the way ``trl sft --accelerate_config zero3`` finds TRL's; an existing file
    wins. Returns None when no ``--accelerate_config`` is given.

    Multi-process training goes through accelerate's own launcher, never one of ours: this only spells the command.
    """
    launch: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, has_value, value = arg.partition("=")
        if name in ("--accelerate_config", "--num_processes", "--main_process_port"):
            if not has_value:
                if i + 1 >= len(argv):
                    raise CliError(f"{name} needs a value")
                value = argv[i + 1]
                i += 1
            launch += ["--config_file" if name == "--accelerate_config" else name, value]
        else:
            rest.append(arg)
        i += 1
    if not launch:
        return None
    if "--config_file" not in launch:
        raise CliError(
            "--num_processes/--main_process_port need --accelerate_config NAME or FILE (e.g. --accelerate_config ddp)"
        )
    from .recipes import resolve_accelerate_config

    index = launch.index("--config_file") + 1
    try:
        launch[index] = str(resolve_accelerate_config(launch[index]))
    except LookupError as exc:
        raise CliError(str(exc), code=1) from exc
    return [sys.executable, "-m", "accelerate.commands.launch", *launch, "-m", "trl_qtuning.cli.main", "sft", *rest]


def _run_launcher(command: list[str], grace_seconds: float = 30.0) -> int:
    """Run ``accelerate launch`` and return its exit code; if this process is interrupted, stop the launch too.

    ``subprocess.call`` would SIGKILL the launcher on an interruption (a supervisor's timeout, a signal to this process
    alone), leaving its training processes orphaned and holding the devices. SIGTERM is passed on to the workers by
    the launcher; a launcher still running after ``grace_seconds`` is killed.
    """
    import subprocess

    process = subprocess.Popen(command)
    try:
        return process.wait()
    except BaseException:
        process.terminate()
        try:
            process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise


def main(argv: list[str] | None = None) -> int:
    """``trl-qtuning sft [--config RECIPE.yaml] [--field value ...]``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        command = accelerate_command(argv)
        if command is not None:
            print("launching: " + " ".join(command[1:]), flush=True)
            return _run_launcher(command)
        return run(*parse_args(argv))

    return run_reporting_errors(PROG, body)


if __name__ == "__main__":
    raise SystemExit(main())
