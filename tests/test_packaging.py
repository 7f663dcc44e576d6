"""What the wheel carries and what CI's floors leg pins agree with the source tree, pyproject.toml and the docs."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def test_package_list_names_every_package():
    found = sorted(".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "trl_qtuning").rglob("__init__.py"))
    assert sorted(SETUPTOOLS["packages"]) == sorted([*found, "trl_qtuning.recipes"])
    assert SETUPTOOLS["package-dir"] == {"trl_qtuning.recipes": "recipes"}


def _shipped(relative: str) -> bool:
    return any(fnmatch.fnmatch(relative, glob) for glob in SETUPTOOLS["package-data"]["trl_qtuning.recipes"])


def test_every_recipe_the_docs_tell_users_to_run_is_shipped():
    docs = [ROOT / "README.md", *(ROOT / "recipes").rglob("README.md"), *(ROOT / "docs").glob("*.md")]
    named = set()
    for doc in docs:
        text = doc.read_text()
        named |= set(re.findall(r"sft --config recipes/(\S+?\.yaml)", text))
        named |= set(re.findall(r"--accelerate_config recipes/(\S+?\.yaml)", text))
    named = {name for name in named if "<" not in name}  # templates such as recipes/<model>/qtuning/...
    assert {"tiny/qtuning/config_cpu.yaml", "llama-3.1-8b/qtuning/config_qlora.yaml"} <= named
    for name in sorted(named):
        assert (ROOT / "recipes" / name).is_file(), name
        assert _shipped(name), f"recipes/{name} is in the docs but not in the wheel (package-data in pyproject.toml)"
    for path in (ROOT / "recipes").rglob("*.yaml"):  # every sft recipe and accelerate config; bench matrices stay
        relative = path.relative_to(ROOT / "recipes").as_posix()
        assert _shipped(relative) != relative.startswith("bench/"), relative


def _floors() -> dict[str, Version]:
    project = PYPROJECT["project"]
    extras = project["optional-dependencies"]
    floors = {}
    for line in [*project["dependencies"], *extras["mlflow"], *extras["bench"], *extras["quantization"], *extras["demo"]]:
        requirement = Requirement(line)
        lower = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        if lower and requirement.name != "torch":  # CI installs torch 2.13.0 (the CPU build) in every leg
            floors[requirement.name.lower()] = Version(lower[0])
    return floors


def test_floors_leg_pins_exactly_the_declared_floors():
    pins = {}
    for line in (ROOT / ".ci" / "floors.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = Version(version)
    assert pins == _floors()


def test_the_version_has_a_dated_changelog_section():
    version = PYPROJECT["project"]["version"]
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(version)}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog, re.MULTILINE), version
    assert changelog.index("## [Unreleased]") < changelog.index(f"## [{version}]")
    import trl_qtuning

    assert trl_qtuning.__version__ == version, "trl_qtuning.__version__ and pyproject.toml disagree"
