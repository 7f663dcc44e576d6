"""Shipped recipes and accelerate configs: found by name (like `trl sft --accelerate_config zero3`) or by their
documented ``recipes/...`` path from any folder; a file path always wins; an unknown name lists what is shipped."""

from __future__ import annotations

from pathlib import Path

import pytest

from trl_qtuning.cli import recipes
from trl_qtuning.cli import sft as sft_cli
from trl_qtuning.cli.main import main

SOURCE = Path(__file__).resolve().parents[1] / "recipes"
CONFIGS = ["cpu_2proc", "ddp", "fsdp", "zero2", "zero3"]


@pytest.fixture()
def installed(tmp_path, monkeypatch) -> Path:
    """The layout of an installed wheel: trl_qtuning/recipes/ holding copies of the shipped files."""
    package = tmp_path / "site-packages" / "trl_qtuning"
    for relative in ("accelerate_configs/ddp.yaml", "accelerate_configs/zero3.yaml", "tiny/qtuning/config_cpu.yaml"):
        target = package / "recipes" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text((SOURCE / relative).read_text())
    monkeypatch.setattr(recipes, "_PACKAGE_DIR", package)
    return package / "recipes"


def _error_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_source_tree_ships_its_recipes_folder():
    assert recipes.recipes_root() == SOURCE
    assert recipes.accelerate_config_names() == CONFIGS
    assert "tiny/qtuning/config_cpu" in recipes.recipe_names()
    assert "llama-3.1-8b/qtuning/config_qlora" in recipes.recipe_names()
    assert not any(name.startswith("bench/") for name in recipes.recipe_names())  # bench matrices need a clone


def test_bare_name_resolves_to_the_packaged_file(installed, monkeypatch):
    monkeypatch.chdir(installed.parents[2])  # outside any clone: no recipes/ folder here
    assert recipes.recipes_root() == installed
    assert recipes.resolve_accelerate_config("ddp") == installed / "accelerate_configs" / "ddp.yaml"
    assert recipes.resolve_accelerate_config("zero3.yaml") == installed / "accelerate_configs" / "zero3.yaml"
    # The documented clone path works after `pip install` too, from any folder.
    assert recipes.resolve_accelerate_config("recipes/accelerate_configs/ddp.yaml") == (
        installed / "accelerate_configs" / "ddp.yaml"
    )
    tiny = installed / "tiny" / "qtuning" / "config_cpu.yaml"
    assert recipes.resolve_recipe("recipes/tiny/qtuning/config_cpu.yaml") == tiny
    assert recipes.resolve_recipe("tiny/qtuning/config_cpu") == tiny


def test_accelerate_command_takes_a_bare_name(installed):
    command = sft_cli.accelerate_command(["--accelerate_config", "ddp", "--config", "r.yaml"])
    assert command[command.index("--config_file") + 1] == str(installed / "accelerate_configs" / "ddp.yaml")


def test_a_path_keeps_working_and_wins_over_a_name(tmp_path, monkeypatch):
    own = tmp_path / "mine.yaml"
    own.write_text("distributed_type: MULTI_GPU\n")
    assert recipes.resolve_accelerate_config(str(own)) == own
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ddp").write_text("distributed_type: NO\n")  # a file called like a shipped config
    assert recipes.resolve_accelerate_config("ddp") == Path("ddp")
    command = sft_cli.accelerate_command(["--accelerate_config", str(own)])
    assert command[command.index("--config_file") + 1] == str(own)


def test_unknown_name_lists_the_shipped_configs(capsys):
    with pytest.raises(LookupError, match="zero4") as error:
        recipes.resolve_accelerate_config("zero4")
    assert ", ".join(CONFIGS) in str(error.value)
    assert main(["sft", "--accelerate_config", "zero4", "--config", "r.yaml"]) == 1
    line = _error_line(capsys)
    assert "accelerate config not found: zero4" in line and "cpu_2proc, ddp, fsdp, zero2, zero3" in line


def test_unknown_recipe_lists_the_shipped_recipes(tmp_path, capsys):
    assert main(["sft", "--config", "recipes/tiny/qtuning/config_gpu.yaml"]) == 2
    line = _error_line(capsys)
    assert "recipe not found: recipes/tiny/qtuning/config_gpu.yaml" in line and "tiny/qtuning/config_cpu" in line


def test_shipped_recipe_by_its_documented_path_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here
    _, training_args, model_args, _ = sft_cli.parse_args(
        ["--config", "recipes/tiny/qtuning/config_cpu.yaml", "--output_dir", str(tmp_path / "out")]
    )
    assert training_args.max_steps == 3 and model_args.lora_r == 4  # the tiny recipe's values
