"""``trl-qtuning sft``: supervised fine-tuning with Q-Tuning, in the style of ``trl sft``.

    trl-qtuning sft --config recipes/tiny/qtuning/config_cpu.yaml --model_name_or_path ./model --dataset_name data.jsonl

Arguments are the fields of ``trl.ScriptArguments``, :class:`~trl_qtuning.QTuningConfig` (``trl.SFTConfig`` plus the
Q-Tuning budgets), ``trl.ModelConfig`` (model, LoRA, quantisation; plus ``quantization_fallback``, see
:mod:`trl_qtuning.integrations.quantization`) and ``trl.DatasetMixtureConfig``, parsed by ``trl.TrlParser``. A YAML recipe
(``--config``) sets their values and may carry an ``env:`` mapping of environment variables; flags on the command
line override the recipe. ``dataset_name`` is a Hub dataset id or a local path (:mod:`trl_qtuning.inputs`).

``--config`` and ``--accelerate_config`` also find the recipes and accelerate configs shipped in the wheel, by
their ``recipes/...`` path or by name (``--accelerate_config ddp``): :mod:`trl_qtuning.cli.recipes`. Where no GPU
runs bf16 (and ``use_cpu`` is not set), TRL's ``bf16=True`` default becomes fp32 with one warning line, and an
explicit ``--bf16 true`` is an error naming ``--bf16 false``.

Mistakes in the arguments or inputs are reported as one line (exit code 2 for arguments and recipes, 1 for inputs
that cannot be loaded): :mod:`trl_qtuning.errors`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import DEBUG_ENV, CliError, OneLineErrors, debug_enabled, one_line, run_reporting_errors
from ..inputs import check_sft_columns, load_datasets, looks_like_path, select_split

__all__ = ["accelerate_command", "main", "make_parser", "parse_args", "run", "summary_lines"]

PROG = "trl-qtuning sft"


# ----------------------------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------------------------


def _pre_parse(argv: list[str], *options: str) -> tuple[argparse.Namespace, list[str]]:
    """The values of ``options`` (``--x v`` or ``--x=v``) and the other arguments, untouched."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    for option in options:
        parser.add_argument(option)
    try:
        return parser.parse_known_args(argv)
    except argparse.ArgumentError as exc:
        raise CliError(f"{exc.argument_name} needs a value") from exc


def device_supports_bf16() -> bool:
    """Whether transformers accepts ``bf16=True`` without ``use_cpu``: a GPU (or XLA device) with bf16."""
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    return bool(is_torch_bf16_gpu_available() or is_torch_xla_available())


def _choose_precision(args: argparse.Namespace) -> None:
    """TRL's ``bf16=True`` default (``bf16`` left None) where the device has no bf16: train in fp32, saying so in one
    line; an explicit ``bf16`` there stops with a message naming ``--bf16 false`` (transformers' own asks to "assign
    use_cpu").

    On the CPU with ``use_cpu`` set, bf16 autocast runs (transformers allows it), so nothing changes then. Under an
    accelerate config asking for bf16 (``ACCELERATE_MIXED_PRECISION=bf16``: the shipped GPU configs), transformers
    would keep bf16 even with ``--bf16 false``, so that is an error too, naming the config's ``mixed_precision``.
    """
    if args.use_cpu or device_supports_bf16():
        return
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower() == "bf16":  # wins over --bf16 false
        raise CliError(
            "the accelerate config asks for bf16 (mixed_precision: bf16) but this machine has no GPU with bf16 "
            "support: use an accelerate config with mixed_precision: 'no' (or fp16), and pass --bf16 false"
        )
    if args.bf16 is False or args.fp16:
        return
    if args.bf16:
        raise CliError(
            "bf16 is set but this machine has no GPU with bf16 support: pass --bf16 false to train in fp32 "
            "(or --use_cpu true to train in bf16 autocast on the CPU)"
        )
    if os.environ.get("RANK", "0") == "0":  # one line, not one per process
        print(f"{PROG}: warning: no GPU with bf16 support here: training in fp32 instead of TRL's default bf16=True "
              "(pass --bf16 false to silence this, or --use_cpu true for bf16 autocast on the CPU)", file=sys.stderr,
              flush=True)  # fmt: skip
    args.bf16 = False


def make_parser(prog: str = PROG):
    """A ``trl.TrlParser`` over (ScriptArguments + ``eu_plane_every``, QTuningConfig, QuantizedModelConfig,
    DatasetMixtureConfig).

    ``QuantizedModelConfig`` is ``trl.ModelConfig`` plus ``quantization_fallback``.
    """
    from trl import DatasetMixtureConfig, ScriptArguments, TrlParser

    from trl_qtuning.config import QTuningConfig
    from trl_qtuning.integrations.quantization import QuantizedModelConfig

    @dataclasses.dataclass
    class SftScriptArguments(ScriptArguments):
        """``trl.ScriptArguments`` plus the MLflow tracking's one setting a recipe may want to change."""

        eu_plane_every: int | None = dataclasses.field(
            default=None,
            metadata={"help": "With report_to mlflow: draw the EU plane every N optimizer steps (and at the first "
                              "and last step); 0 = never. Default: the tracking's own (50)."},
        )  # fmt: skip

    class _Parser(OneLineErrors, TrlParser):
        def parse_known_args(self, args=None, namespace=None):
            """Unknown flags and the precision are settled here, before the dataclasses check their values (an
            unknown flag would otherwise hide behind the first failing check)."""
            namespace, rest = super().parse_known_args(args, namespace)
            if rest:
                flags = [arg.split("=", 1)[0] for arg in rest if arg.startswith("-")]
                raise CliError(f"unknown argument(s): {' '.join(flags or rest)} (see `{prog} --help`)")
            _choose_precision(namespace)
            return namespace, rest

    return _Parser(
        (SftScriptArguments, QTuningConfig, QuantizedModelConfig, DatasetMixtureConfig),
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


def _read_recipe(path: str | None) -> dict[str, Any]:
    """The recipe's mapping (a file, or the name of a shipped recipe: :mod:`trl_qtuning.cli.recipes`), with its
    ``env:`` block applied now.

    ``TrlParser.parse_args_and_config`` applies the block too, but only after TRL is imported: too late for what the
    Hub libraries read at import (``HF_HUB_OFFLINE``, ``HF_HOME``...) when this runs as a fresh process.
    """
    if path is None:
        return {}
    import yaml

    from .recipes import resolve_recipe

    try:
        file = resolve_recipe(path)
        recipe = yaml.safe_load(file.read_text())
    except LookupError as exc:
        raise CliError(str(exc)) from exc
    except yaml.YAMLError as exc:
        raise CliError(f"cannot parse recipe {file}: {one_line(exc)}") from exc
    if not isinstance(recipe, dict):
        raise CliError(f"recipe {file} must be a YAML mapping of option names to values")
    env = recipe.pop("env", None) or {}
    if not isinstance(env, dict):
        raise CliError(f"`env` in recipe {file} must be a mapping of variable names to values")
    os.environ.update({str(key): str(value) for key, value in env.items()})
    return recipe


def parse_args(argv: list[str]):
    """(script_args, training_args, model_args, dataset_args) from a recipe and command-line flags."""
    known, argv = _pre_parse(argv, "--config")
    recipe = _read_recipe(known.config)
    parser = make_parser()
    unknown = parser.set_defaults_with_config(**recipe)  # TrlParser gives them back as ["--key", "value", ...]
    if unknown:
        keys = ", ".join(key.removeprefix("--") for key in unknown[::2])
        raise CliError(f"unknown key(s) in the recipe: {keys} (see `{PROG} --help` for the valid names)")
    # TRL declares bf16 as `bool | None`, for which HfArgumentParser takes no bare flag; `--bf16` alone means true,
    # as for every other boolean.
    following = [*argv[1:], "-"]
    argv = ["--bf16=true" if arg == "--bf16" and then.startswith("-") else arg for arg, then in zip(argv, following)]
    try:
        return parser.parse_args_into_dataclasses(argv)
    except (ValueError, TypeError) as exc:  # dataclass validation (QTuningConfig, SFTConfig, ModelConfig...)
        raise CliError(one_line(exc)) from exc


# ----------------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------------


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
    elif looks_like_path(name):
        raise CliError(f"model path not found: {name}", code=1)


def _resume_value(value: str | bool | None) -> str | bool | None:
    """``resume_from_checkpoint`` for ``Trainer.train``: True (the last checkpoint in output_dir), None, or a folder."""
    word = value.strip().lower() if isinstance(value, str) else None
    if word in ("true", "last", "latest"):
        return True
    if word in ("", "false", "none"):
        return None
    if word is not None and not Path(value).expanduser().is_dir():
        raise CliError(f"checkpoint not found: {value} (resume_from_checkpoint)", code=1)
    return value


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


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
    logged = (float(entry["loss"]) for entry in reversed(trainer.state.log_history) if "loss" in entry)
    loss = next(logged, getattr(train_output, "training_loss", None))
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
    from trl import get_peft_config

    from trl_qtuning.integrations.quantization import QuantizationError, plan_quantization, prepare_quantized_model
    from trl_qtuning.trainer import QTuningSFTTrainer

    _check_model(model_args)
    resume = _resume_value(training_args.resume_from_checkpoint)
    try:
        # Before anything is loaded: bitsandbytes and its backend for the device, a quantisable model, or the
        # opt-in plain-LoRA fallback (whose tags go to the MLflow run).
        quantization = plan_quantization(model_args, training_args)
    except QuantizationError as exc:
        raise CliError(one_line(exc), code=exc.code) from exc

    training_args.model_init_kwargs = {
        "revision": model_args.model_revision, "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation, "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }  # fmt: skip

    dataset = load_datasets(script_args, dataset_args)
    source = "the `datasets` mixture" if dataset_args.datasets else repr(script_args.dataset_name)
    train_dataset = select_split(dataset, script_args.dataset_train_split, "dataset_train_split", source)
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = select_split(dataset, script_args.dataset_test_split, "dataset_test_split", source)
    for split in (train_dataset, eval_dataset):
        if split is not None:
            check_sft_columns(split, training_args.dataset_text_field, source)

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
    tracking = {"tags": quantization.tags} if quantization.tags else {}
    if script_args.eu_plane_every is not None:
        tracking["eu_plane_every"] = script_args.eu_plane_every
    if tracking and "mlflow" in (training_args.report_to or []):
        from trl_qtuning import tracking as mlflow_tracking

        mlflow_tracking.attach_tracking(trainer, **tracking)

    train_output = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    for line in summary_lines(trainer, train_output, quantization):
        trainer.accelerator.print(line)
    if training_args.push_to_hub:
        trainer.accelerator.print(f"Model pushed to the Hub: https://huggingface.co/{trainer.hub_model_id}.")
    trainer.end()  # finish the trackers and destroy the process group
    return 0


def accelerate_command(argv: list[str]) -> list[str] | None:
    """The ``accelerate launch`` command for ``--accelerate_config NAME|FILE [--num_processes N] [--main_process_port P]``.

    ``NAME`` is a config shipped with the package (``ddp``, ``fsdp``, ``zero2``, ``zero3``, ``cpu_2proc``: see
    :mod:`trl_qtuning.cli.recipes`), the way ``trl sft --accelerate_config zero3`` finds TRL's; an existing file
    wins. Returns None when no ``--accelerate_config`` is given.

    Multi-process training goes through accelerate's own launcher, never one of ours: this only spells the command.
    """
    known, rest = _pre_parse(argv, "--accelerate_config", "--num_processes", "--main_process_port")
    if known.accelerate_config is None:
        if known.num_processes or known.main_process_port:
            raise CliError("--num_processes/--main_process_port need --accelerate_config NAME or FILE "
                           "(e.g. --accelerate_config ddp)")  # fmt: skip
        return None
    from .recipes import resolve_accelerate_config

    try:
        launch = ["--config_file", str(resolve_accelerate_config(known.accelerate_config))]
    except LookupError as exc:
        raise CliError(str(exc), code=1) from exc
    for option in ("num_processes", "main_process_port"):
        if getattr(known, option) is not None:
            launch += [f"--{option}", getattr(known, option)]
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
