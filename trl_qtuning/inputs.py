"""The datasets a command names, loaded the way ``trl-qtuning sft`` loads them: a Hub id, a ``save_to_disk`` folder,
a folder of data files, one ``.json``/``.jsonl``/``.parquet``/``.csv``/``.arrow`` file, or TRL's ``datasets:``
mixture. A mistake is a :class:`~trl_qtuning.errors.CliError` naming the input and the fix.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CliError, debug_enabled, one_line

__all__ = ["DATA_FILE_BUILDERS", "check_sft_columns", "load_datasets", "load_local_dataset", "looks_like_path",
           "select_split"]  # fmt: skip

DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # `datasets` and TRL load when a dataset does
    from datasets import DatasetDict
    from trl import DatasetMixtureConfig, ScriptArguments


def looks_like_path(name: str) -> bool:
    """A local path rather than a Hub id (``org/name`` or ``name``), so a missing one is "not found", not a download."""
    if name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or name in (".", "..") or "\\" in name:
        return True
    return name.count("/") > 1 or Path(name).suffix.lower() in DATA_FILE_BUILDERS


def load_local_dataset(path: Path, config_name: str | None = None, streaming: bool = False) -> DatasetDict:
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


def load_datasets(script_args: ScriptArguments, dataset_args: DatasetMixtureConfig) -> DatasetDict:
    """The ``DatasetDict`` to train on: the ``datasets:`` mixture if given, else ``dataset_name`` (Hub id or path)."""
    import datasets
    from trl import get_dataset

    name, config, streaming = script_args.dataset_name, script_args.dataset_config, script_args.dataset_streaming
    path = Path(name).expanduser() if name else None
    if dataset_args.datasets:
        if name:
            logger.warning("Both `datasets` and `dataset_name` are given: using the `datasets` mixture.")
        source, load = "the `datasets` mixture", partial(get_dataset, dataset_args)
    elif not name:
        raise CliError("no dataset given: set `dataset_name` (Hub id or local path) or a `datasets:` mixture")
    elif path.exists():
        source, load = repr(name), partial(load_local_dataset, path, config, streaming)
    elif looks_like_path(name):
        raise CliError(f"dataset not found: {name} (no such file or folder)", code=1)
    else:
        source, load = repr(name), partial(datasets.load_dataset, name, name=config, streaming=streaming)
    try:
        return load()
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:
        if debug_enabled():
            raise
        from huggingface_hub import is_offline_mode

        hint = ""
        if is_offline_mode() and not (path and path.exists()):
            hint = " (offline mode is on, HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE: only local or cached datasets load)"
        detail = one_line(exc)
        if exc.__cause__ is not None:  # e.g. DatasetGenerationError wraps the parse error
            detail = f"{detail}: {one_line(exc.__cause__)}"
        raise CliError(f"cannot load dataset {source}{hint}: {detail}", code=1) from exc


def select_split(dataset, split: str, option: str, source: str):
    """``dataset[split]``, or an error listing the splits there are and naming ``--option``."""
    if split not in dataset:
        available = ", ".join(map(repr, dataset)) or "none"
        raise CliError(f"split {split!r} not found in dataset {source} (available: {available}); set --{option}")
    return dataset[split]


def check_sft_columns(dataset: Any, text_field: str, source: str) -> None:
    """SFT needs text, conversations or prompt-completion pairs (or tokenised rows): say so before TRL's KeyError."""
    columns = getattr(dataset, "column_names", None)
    if not columns:  # e.g. a streamed dataset whose features are unknown
        return
    if {text_field, "messages", "input_ids"} & set(columns) or {"prompt", "completion"} <= set(columns):
        return
    raise CliError(
        f"dataset {source} has columns {', '.join(map(repr, columns))}; SFT needs a {text_field!r} column "
        "(--dataset_text_field), 'messages' (conversations), 'prompt' + 'completion', or pre-tokenised 'input_ids'",
        code=1,
    )
