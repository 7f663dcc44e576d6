"""The recipes and accelerate configs shipped with trl-qtuning, found by name or by their ``recipes/...`` path.

The repository's ``recipes/`` folder is the one copy: a clone reads it in place, and the wheel carries its training
recipes and accelerate configs as package data under ``trl_qtuning/recipes/`` (``pyproject.toml`` maps the folder).
So, as ``trl sft --accelerate_config zero3`` finds TRL's own configs, after ``pip install trl-qtuning``:

    trl-qtuning sft --accelerate_config ddp ...                                  # recipes/accelerate_configs/ddp.yaml
    trl-qtuning sft --config recipes/llama-3.1-8b/qtuning/config_qlora.yaml      # the shipped recipe, from any folder

An existing file always wins: a path to your own recipe or config is used as given.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "ACCELERATE_CONFIGS", "accelerate_config_names", "recipe_names", "recipes_root", "resolve_accelerate_config",
    "resolve_recipe",
]  # fmt: skip

ACCELERATE_CONFIGS = "accelerate_configs"
_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # trl_qtuning/


def recipes_root() -> Path | None:
    """The shipped recipes: ``trl_qtuning/recipes`` in an installed wheel, else a source tree's ``recipes/``."""
    packaged = _PACKAGE_DIR / "recipes"
    if (packaged / ACCELERATE_CONFIGS).is_dir():
        return packaged
    source = _PACKAGE_DIR.parent / "recipes"  # a clone (editable install or the source tree on sys.path)
    if (source / ACCELERATE_CONFIGS).is_dir() and (_PACKAGE_DIR.parent / "pyproject.toml").is_file():
        return source
    return None


def accelerate_config_names() -> list[str]:
    """The names ``--accelerate_config`` takes: the shipped configs, without ``.yaml``."""
    root = recipes_root()
    return sorted(path.stem for path in (root / ACCELERATE_CONFIGS).glob("*.yaml")) if root else []


def recipe_names() -> list[str]:
    """The shipped training recipes, as ``<model>/qtuning/config_<name>`` (what ``--config`` takes without a file)."""
    root = recipes_root()
    if root is None:
        return []
    return sorted(path.relative_to(root).with_suffix("").as_posix() for path in root.glob("*/qtuning/*.yaml"))


def _resolve(value: str, kind: str, names: list[str], folder: str = "") -> Path:
    """A file path as given, else the shipped file ``value`` names (with or without ``recipes/``, ``folder`` and
    ``.yaml``); ``LookupError`` listing the shipped ``names`` when it is neither."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    name = value.replace("\\", "/").removeprefix("./").removeprefix("recipes/").removeprefix(folder)
    name = name.removesuffix(".yaml")
    root = recipes_root()
    if root is not None and name in names:
        return root / f"{folder}{name}.yaml"
    listing = ", ".join(names) or "none found in this installation"
    raise LookupError(f"{kind} not found: {value} (neither a file nor one shipped with trl-qtuning: {listing})")


def resolve_accelerate_config(value: str) -> Path:
    """The file for ``--accelerate_config VALUE``: a file path as given, else a shipped config by name
    (``ddp``, ``zero3``, ... or ``recipes/accelerate_configs/ddp.yaml`` from outside a clone)."""
    return _resolve(value, "accelerate config", accelerate_config_names(), folder=f"{ACCELERATE_CONFIGS}/")


def resolve_recipe(value: str) -> Path:
    """The file for ``--config VALUE``: a file path as given, else a shipped recipe (``recipes/<model>/qtuning/
    config_<name>.yaml`` from any folder, with or without the ``recipes/`` prefix and the ``.yaml``)."""
    return _resolve(value, "recipe", recipe_names())
