"""The ``trl-qtuning`` console script: dispatch, ``sft`` with the tiny CPU recipe, overrides and one-line errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from trl_qtuning.cli import sft as sft_cli
from trl_qtuning.cli.main import main
from trl_qtuning.errors import CliError

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "qtuning" / "config_cpu.yaml"


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A saved tiny model folder and a prompt-completion JSONL file."""
    from trl_qtuning.testing import make_arithmetic_dataset, save_tiny_model

    root = tmp_path_factory.mktemp("cli_inputs")
    model_dir = save_tiny_model(root / "model")
    data_file = root / "data.jsonl"
    make_arithmetic_dataset(48).to_json(str(data_file))
    return model_dir, data_file


def _sft_args(model_dir: Path, data: Path | str, output_dir: Path, *extra: str) -> list[str]:
    return [
        "sft", "--config", str(RECIPE),
        "--model_name_or_path", str(model_dir),
        "--dataset_name", str(data),
        "--output_dir", str(output_dir),
        *extra,
    ]  # fmt: skip


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected an error message on stderr"
    return err[-1]


# ----------------------------------------------------------------------------------------------------------------------
# Top-level dispatch
# ----------------------------------------------------------------------------------------------------------------------


def test_help_lists_subcommands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "sft" in out and "demo" in out
    assert main([]) == 0  # no command: help, like `trl`


def test_version(capsys):
    import trl_qtuning

    assert main(["--version"]) == 0
    assert trl_qtuning.__version__ in capsys.readouterr().out


def test_sft_help(capsys):
    assert main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--sample_keep_ratio" in out and "--model_name_or_path" in out and "--config" in out


def test_demo_missing_module_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "trl_qtuning.demo.run", None)  # makes the import fail
    assert main(["demo"]) == 1
    assert "trl-qtuning demo" in _error_line(capsys)


def test_every_command_reports_errors_as_one_line(capsys):
    from trl_qtuning.errors import CliError, run_reporting_errors

    def fail(error: BaseException):
        def body():
            raise error

        return body

    assert run_reporting_errors("cmd", fail(CliError("bad --x: pass --x 1", code=1))) == 1
    assert _error_line(capsys) == "cmd: error: bad --x: pass --x 1"
    assert run_reporting_errors("cmd", fail(KeyboardInterrupt())) == 130
    assert run_reporting_errors("cmd", fail(SystemExit(0))) == 0  # --help
    with pytest.raises(SystemExit, match="a message"):  # Python prints it
        run_reporting_errors("cmd", fail(SystemExit("a message")))


def test_library_modules_import_no_command_and_not_testing():
    """Error types and inputs live outside ``cli/``; ``trl_qtuning.testing`` is for tests and recipes only."""
    import ast

    import trl_qtuning

    root = Path(trl_qtuning.__file__).parent
    for path in root.rglob("*.py"):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                package = module.rsplit(".", node.level)[0] if node.level else ""
                name = f"{package}.{node.module or ''}".strip(".")
                assert not name.startswith("trl_qtuning.testing"), path
                if not module.startswith("trl_qtuning.cli"):
                    assert not name.startswith("trl_qtuning.cli"), path


# ----------------------------------------------------------------------------------------------------------------------
# Recipe + overrides (parsing only)
# ----------------------------------------------------------------------------------------------------------------------


def test_recipe_values_env_and_overrides(tmp_path, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    extra_env = 'HF_HUB_OFFLINE: "1"\n  TRL_QTUNING_CLI_TEST: "from-recipe"'
    recipe.write_text(RECIPE.read_text().replace('HF_HUB_OFFLINE: "1"', extra_env))
    monkeypatch.setenv("TRL_QTUNING_CLI_TEST", "unset")
    script_args, training_args, model_args, dataset_args = sft_cli.parse_args(
        ["--config", str(recipe), "--sample_keep_ratio", "0.3", "--output_dir", str(tmp_path / "out")]
    )
    assert training_args.sample_keep_ratio == 0.3  # command line wins over the recipe's 0.5
    assert training_args.token_keep_ratio == 0.7  # recipe value
    assert training_args.triage_scope == "step"
    assert training_args.max_steps == 3 and training_args.per_device_train_batch_size == 4
    assert training_args.gradient_accumulation_steps == 2 and training_args.use_cpu and not training_args.bf16
    assert model_args.use_peft and model_args.lora_r == 4
    assert list(model_args.lora_target_modules) == ["q_proj", "v_proj"]
    assert script_args.dataset_name is None and model_args.model_name_or_path is None  # filled in by the caller
    assert dataset_args.datasets == []
    assert os.environ["TRL_QTUNING_CLI_TEST"] == "from-recipe"  # the env: block was applied


def test_invalid_override_names_the_field(tiny_inputs, tmp_path, capsys):
    model_dir, data = tiny_inputs
    code = main(_sft_args(model_dir, data, tmp_path / "out", "--sample_keep_ratio", "1.5"))
    assert code != 0
    line = _error_line(capsys)
    assert "sample_keep_ratio" in line and "Traceback" not in line


def test_unknown_recipe_key_and_option(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.read_text() + "\nnot_a_field: 3\n")
    assert main(["sft", "--config", str(recipe)]) != 0
    assert "not_a_field" in _error_line(capsys)
    assert main(["sft", "--config", str(RECIPE), "--not_an_option", "1"]) != 0
    assert "--not_an_option" in _error_line(capsys)


def test_unknown_flag_is_named_before_config_checks_run(capsys):
    # A config check (here a ratio out of range; on a CPU without bf16, SFTConfig's bf16 default) would otherwise
    # speak first and hide the typo.
    assert main(["sft", "--token_keep_ratio", "1.5", "--sample_keep_ratoi", "0.3"]) != 0
    assert "unknown argument(s): --sample_keep_ratoi" in _error_line(capsys)
    assert main(["sft", "--sample_keep_ratoi=0.3", "--learning_rate=1e-4"]) != 0
    assert "unknown argument(s): --sample_keep_ratoi (" in _error_line(capsys)


# ----------------------------------------------------------------------------------------------------------------------
# Precision: TRL's bf16=True default on a machine without bf16
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def recipe_without_precision(tmp_path) -> Path:
    """The tiny recipe without its `bf16: false` / `use_cpu: true`: TRL's defaults (bf16=True, use_cpu=False) apply."""
    lines = [line for line in RECIPE.read_text().splitlines() if not line.startswith(("bf16:", "use_cpu:"))]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("\n".join(lines) + "\n")
    return recipe


def test_bf16_default_falls_back_to_fp32_with_one_warning(recipe_without_precision, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sft_cli, "device_supports_bf16", lambda: False)
    _, training_args, _, _ = sft_cli.parse_args(["--config", str(recipe_without_precision), "--output_dir", str(tmp_path)])
    assert training_args.bf16 is False and not training_args.use_cpu
    warnings = [line for line in capsys.readouterr().err.splitlines() if "bf16" in line]
    assert len(warnings) == 1 and "training in fp32" in warnings[0] and "--bf16 false" in warnings[0]


@pytest.mark.parametrize("flag", [["--bf16", "true"], ["--bf16=True"], ["--bf16"], ["recipe"]])
def test_explicit_bf16_without_support_names_the_fix(recipe_without_precision, flag, monkeypatch, capsys):
    monkeypatch.setattr(sft_cli, "device_supports_bf16", lambda: False)
    if flag == ["recipe"]:  # set in the recipe instead of on the command line
        recipe_without_precision.write_text(recipe_without_precision.read_text() + "bf16: true\n")
        flag = []
    assert main(["sft", "--config", str(recipe_without_precision), *flag]) == 2
    line = _error_line(capsys)
    assert "--bf16 false" in line and "use_cpu" in line and "Traceback" not in line


def test_bf16_accelerate_config_without_bf16_support_names_the_config(recipe_without_precision, monkeypatch, capsys):
    monkeypatch.setattr(sft_cli, "device_supports_bf16", lambda: False)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch` with ddp.yaml sets
    for flags in ([], ["--bf16", "false"]):  # transformers keeps the config's bf16 even with --bf16 false
        assert main(["sft", "--config", str(recipe_without_precision), *flags]) == 2
        line = _error_line(capsys)
        assert "mixed_precision: bf16" in line and "--bf16 false" in line


def test_bf16_fallback_warns_once_across_processes(recipe_without_precision, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sft_cli, "device_supports_bf16", lambda: False)
    monkeypatch.setenv("RANK", "1")  # not the main process: it falls back silently
    args = sft_cli.parse_args(["--config", str(recipe_without_precision), "--output_dir", str(tmp_path)])[1]
    assert args.bf16 is False and "bf16" not in capsys.readouterr().err


def test_bf16_choice_left_alone_where_it_runs(recipe_without_precision, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sft_cli, "device_supports_bf16", lambda: False)
    base = ["--config", str(recipe_without_precision), "--output_dir", str(tmp_path)]
    # bf16 autocast on the CPU (use_cpu), and an explicit --bf16 false: as asked, no warning.
    assert sft_cli.parse_args([*base, "--use_cpu", "true"])[1].bf16 is True
    assert sft_cli.parse_args([*base, "--bf16", "false"])[1].bf16 is False
    assert main(["sft", "--help"]) == 0
    assert "bf16" not in capsys.readouterr().err


def test_demo_prints_its_expected_duration(capsys):
    import argparse

    from trl_qtuning.demo.run import build_parser, expected_duration, print_expected_duration

    args = build_parser().parse_args([])  # the defaults: 16 steps of 4 x 4 samples
    print_expected_duration(args, bf16=True, use_cuda=False)
    line = capsys.readouterr().out.strip()
    assert line.startswith("Training 16 steps of 16 samples: about 3 min on 2 CPU cores (bf16 autocast")
    assert "about 6 min on a CPU without them" in line
    fp32 = expected_duration(16, 16, bf16=False)
    assert "about 6 min on 2 CPU cores (fp32" in fp32 and "about 3 min on a CPU with AVX512-BF16" in fp32
    assert "about 11 s" in expected_duration(2, 4, bf16=False)
    for quiet in (argparse.Namespace(**{**vars(args), "model": "org/model"}), args):
        print_expected_duration(quiet, bf16=True, use_cuda=quiet is args)  # another model, or a GPU: no estimate
    assert capsys.readouterr().out == ""


def test_missing_recipe(tmp_path, capsys):
    assert main(["sft", "--config", str(tmp_path / "nope.yaml")]) != 0
    assert "recipe not found" in _error_line(capsys)


# ----------------------------------------------------------------------------------------------------------------------
# Input errors: one line, non-zero exit, no traceback
# ----------------------------------------------------------------------------------------------------------------------


def test_missing_dataset_path(tiny_inputs, tmp_path, capsys):
    model_dir, _ = tiny_inputs
    missing = tmp_path / "missing.jsonl"
    assert main(_sft_args(model_dir, missing, tmp_path / "out")) != 0
    line = _error_line(capsys)
    assert "dataset not found" in line and str(missing) in line


def test_missing_model_path(tiny_inputs, tmp_path, capsys):
    _, data = tiny_inputs
    missing = tmp_path / "no-model"
    assert main(_sft_args(missing, data, tmp_path / "out")) != 0
    line = _error_line(capsys)
    assert "model path not found" in line and str(missing) in line


def test_unknown_split(tiny_inputs, tmp_path, capsys):
    model_dir, data = tiny_inputs
    assert main(_sft_args(model_dir, data, tmp_path / "out", "--dataset_train_split", "nope")) != 0
    line = _error_line(capsys)
    assert "'nope'" in line and "'train'" in line


def test_dataset_without_sft_columns(tiny_inputs, tmp_path, capsys):
    model_dir, _ = tiny_inputs
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": "a"}\n{"foo": "b"}\n')
    assert main(_sft_args(model_dir, bad, tmp_path / "out")) != 0
    line = _error_line(capsys)
    assert "'foo'" in line and "'prompt' + 'completion'" in line


def test_no_dataset(tiny_inputs, tmp_path, capsys):
    model_dir, _ = tiny_inputs
    args = ["sft", "--config", str(RECIPE), "--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path)]
    assert main(args) != 0
    assert "no dataset given" in _error_line(capsys)


# ----------------------------------------------------------------------------------------------------------------------
# Local dataset formats
# ----------------------------------------------------------------------------------------------------------------------


def test_local_dataset_formats(tmp_path):
    from trl import DatasetMixtureConfig, ScriptArguments

    from trl_qtuning.inputs import load_datasets
    from trl_qtuning.testing import make_arithmetic_dataset

    ds = make_arithmetic_dataset(6)
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "data.parquet"))
    for name in ("saved", "data.parquet"):
        loaded = load_datasets(ScriptArguments(dataset_name=str(tmp_path / name)), DatasetMixtureConfig())
        assert list(loaded) == ["train"] and loaded["train"].num_rows == 6
        assert set(loaded["train"].column_names) == {"prompt", "completion"}
    mixture = DatasetMixtureConfig(
        datasets=[{"path": "parquet", "data_files": str(tmp_path / "data.parquet"), "columns": ["prompt"]}],
        test_split_size=2,
    )
    loaded = load_datasets(ScriptArguments(), mixture)
    assert sorted(loaded) == ["test", "train"] and loaded["train"].column_names == ["prompt"]


def test_a_hub_dataset_offline_is_one_line_naming_offline_mode():
    from trl import DatasetMixtureConfig, ScriptArguments

    from trl_qtuning.errors import CliError
    from trl_qtuning.inputs import load_datasets

    with pytest.raises(CliError, match=r"cannot load dataset 'no-org/no-such-dataset' \(offline mode is on") as caught:
        load_datasets(ScriptArguments(dataset_name="no-org/no-such-dataset"), DatasetMixtureConfig())
    assert caught.value.code == 1 and "\n" not in str(caught.value)


# ----------------------------------------------------------------------------------------------------------------------
# End to end: the tiny CPU recipe trains, saves an adapter and writes the ledger
# ----------------------------------------------------------------------------------------------------------------------


def test_sft_end_to_end(tiny_inputs, tmp_path, capsys):
    from trl_qtuning import read_ledger

    model_dir, data = tiny_inputs
    output_dir = tmp_path / "out"
    assert main(_sft_args(model_dir, data, output_dir)) == 0
    out = capsys.readouterr().out
    assert "3 optimizer steps" in out
    assert str(output_dir / "qtuning_ledger") in out
    assert (output_dir / "adapter_config.json").is_file()
    shards = sorted((output_dir / "qtuning_ledger").glob("*.parquet"))
    assert shards
    ledger = read_ledger(output_dir / "qtuning_ledger")
    assert sorted(set(ledger.column("step").to_pylist())) == [1, 2, 3]
    # 3 steps x (batch 4 x grad-acc 2) samples triaged, half of them kept.
    assert ledger.num_rows == 3 * 4 * 2
    kept = sum(d in ("kept", "token_pruned", "filled") for d in ledger.column("decision").to_pylist())
    assert kept == ledger.num_rows // 2


def test_eu_plane_interval_reaches_the_mlflow_tracking(tiny_inputs, tmp_path, monkeypatch, capsys):
    """`--eu_plane_every` is the tracking's argument (no environment variable): it reaches `attach_tracking`."""
    from trl_qtuning import tracking

    seen = []

    def attach(trainer, **options):  # the trainer attaches tracking itself first, without options
        seen.append(options)
        if options:
            raise CliError("stop before training")

    monkeypatch.setattr(tracking, "attach_tracking", attach)
    model_dir, data = tiny_inputs
    args = [*_sft_args(model_dir, data, tmp_path / "out"), "--report_to", "mlflow", "--eu_plane_every", "5"]
    assert main(args) != 0 and "stop before training" in capsys.readouterr().err
    assert seen[-1] == {"eu_plane_every": 5}


def test_accelerate_config_spells_the_accelerate_launch_command(tmp_path, capsys):
    config = Path(__file__).resolve().parents[1] / "recipes" / "accelerate_configs" / "ddp.yaml"
    command = sft_cli.accelerate_command(["--accelerate_config", str(config), "--num_processes=4", "--config", "r.yaml"])
    assert command[1:] == [
        "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "4",
        "-m", "trl_qtuning.cli.main", "sft", "--config", "r.yaml",
    ]  # fmt: skip
    assert sft_cli.accelerate_command(["--config", "r.yaml"]) is None
    assert main(["sft", "--num_processes", "2", "--config", "r.yaml"]) == 2
    assert "need --accelerate_config" in _error_line(capsys)
    assert main(["sft", "--accelerate_config", str(tmp_path / "missing.yaml")]) == 1
    assert "accelerate config not found" in _error_line(capsys)


def test_launcher_exit_code_is_returned():
    assert sft_cli._run_launcher([sys.executable, "-c", "raise SystemExit(3)"]) == 3


@pytest.mark.slow
@pytest.mark.parametrize("child_ignores_sigterm", [False, True])
def test_interrupted_launch_stops_the_launcher(monkeypatch, child_ignores_sigterm):
    """An interrupted `trl-qtuning sft --accelerate_config` never leaves the launch (and its workers) running."""
    ignore = "signal.signal(signal.SIGTERM, signal.SIG_IGN); " if child_ignores_sigterm else ""
    child = [sys.executable, "-c", f"import signal, time; {ignore}time.sleep(60)"]
    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda command: started.append(real_popen(command)) or started[-1])

    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGUSR1, interrupt)
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGUSR1))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            sft_cli._run_launcher(child, grace_seconds=1.0)
    finally:
        timer.cancel()  # never let SIGUSR1 arrive after its handler is gone (its default action ends the process)
        signal.signal(signal.SIGUSR1, previous)
    # Stopped by SIGTERM, or killed after the grace period when it ignores SIGTERM.
    assert started[0].returncode == -(signal.SIGKILL if child_ignores_sigterm else signal.SIGTERM)


@pytest.mark.slow
def test_sft_through_accelerate_with_two_cpu_processes(tiny_inputs, tmp_path):
    """`--accelerate_config` runs the same recipe in 2 processes (gloo on CPU) with cross-rank triage."""
    import socket

    from trl_qtuning import read_ledger

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    model_dir, data = tiny_inputs
    output_dir = tmp_path / "ddp"
    config = Path(__file__).resolve().parents[1] / "recipes" / "accelerate_configs" / "cpu_2proc.yaml"
    code = main(
        ["sft", "--accelerate_config", str(config), "--main_process_port", str(port),
         *_sft_args(model_dir, data, output_dir, "--triage_scope", "global", "--max_steps", "2")[1:]]
    )  # fmt: skip
    assert code == 0
    ledger = read_ledger(output_dir / "qtuning_ledger").to_pandas()
    # 2 steps x 2 ranks x (batch 4 x grad-acc 2) samples, one ledger written by the main process.
    assert len(ledger) == 2 * 2 * 4 * 2 and sorted(ledger["rank"].unique()) == [0, 1]
    kept = ledger.decision.isin(["kept", "token_pruned", "filled"]).groupby(ledger.step).sum()
    assert kept.tolist() == [8, 8]  # half of each step's 16 samples, wherever they sit
