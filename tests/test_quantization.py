"""QLoRA: the tiny CPU recipe trains Q-Tuning on 4-bit weights, the adapter reloads, failures are clear, the fallback
is explicit, and the GPU recipes and the memory benchmark hold together (without a GPU)."""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import os
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from trl_qtuning.integrations import quantization
from trl_qtuning.cli import sft as sft_cli
from trl_qtuning.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny" / "qtuning" / "config_qlora_cpu.yaml"
GPU_RECIPES = sorted(ROOT.glob("recipes/*/qtuning/config_qlora.yaml"))
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="session")
def bnb():
    """bitsandbytes (with its CPU backend, >= 0.50), for the tests that quantise for real; the others run without."""
    return pytest.importorskip("bitsandbytes", reason="needs pip install 'trl-qtuning[quantization]'")


@pytest.fixture()
def bitsandbytes_ok(monkeypatch):
    """For tests of the model checks: bitsandbytes counts as installed and working, whether it is or not."""
    monkeypatch.setattr(quantization, "check_bitsandbytes", lambda device, mode="4-bit": "0.0-test")


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory) -> tuple[Path, Path]:
    from trl_qtuning.testing import make_arithmetic_dataset, save_tiny_model

    root = tmp_path_factory.mktemp("qlora_inputs")
    model_dir = save_tiny_model(root / "model")
    data_file = root / "data.jsonl"
    make_arithmetic_dataset(48).to_json(str(data_file))
    return model_dir, data_file


def _sft_args(model_dir: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "sft", "--config", str(RECIPE), "--model_name_or_path", str(model_dir), "--dataset_name", str(data),
        "--output_dir", str(output_dir), *extra,
    ]  # fmt: skip


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected an error message on stderr"
    return err[-1]


def _capture_trainer(monkeypatch, on_train=None) -> dict:
    """Patch ``QTuningSFTTrainer.train`` to keep the trainer the CLI builds (and optionally hook its model)."""
    from trl_qtuning.trainer import QTuningSFTTrainer

    captured: dict = {}
    real_train = QTuningSFTTrainer.train

    def train(self, *args, **kwargs):
        captured["trainer"] = self
        cleanup = on_train(self) if on_train else None
        try:
            return real_train(self, *args, **kwargs)
        finally:
            for handle in cleanup or ():
                handle.remove()

    monkeypatch.setattr(QTuningSFTTrainer, "train", train)
    return captured


def _storage_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def _float_weight_names(model) -> list[str]:
    """Floating-point parameters that are neither LoRA, embeddings, norms nor the LM head (i.e. base weight copies)."""
    allowed = ("lora_", "embed_tokens", "norm", "lm_head")
    return [
        name for name, p in model.named_parameters() if p.is_floating_point() and not any(a in name for a in allowed)
    ]


def _base_layers(model):
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in LORA_TARGETS:
            yield name, getattr(module, "base_layer", module)


# ----------------------------------------------------------------------------------------------------------------------
# End to end: the tiny QLoRA CPU recipe through the CLI
# ----------------------------------------------------------------------------------------------------------------------


def test_qlora_recipe_trains_qtuning_on_4bit_weights_and_adapter_reloads(
    bnb, tiny_inputs, tmp_path, monkeypatch, capsys
):
    from peft import PeftModel
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from trl_qtuning import read_ledger

    model_dir, data = tiny_inputs
    output_dir = tmp_path / "out"
    scoring: list[dict] = []
    weight_shaped: list[weakref.ref] = []  # float tensors shaped like a 4-bit weight, made during scoring

    class ScoringOps(TorchDispatchMode):
        """Sees every tensor operation of a scoring forward (bitsandbytes' fused 4-bit GEMM is one op)."""

        def __init__(self, weight_shapes):
            super().__init__()
            self.weight_shapes, self.gemm_4bit, self.weights = weight_shapes, 0, set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if str(func.overloadpacket) == "bitsandbytes.gemm_4bit":
                self.gemm_4bit += 1
                self.weights.add(args[1].dtype)
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and tuple(t.shape) in self.weight_shapes:
                    weight_shaped.append(weakref.ref(t))
            return out

    def hook_model(trainer):
        model = trainer.model
        start_bytes = _storage_bytes(model)
        shapes = {tuple(s) for _, layer in _base_layers(model) for s in (layer.weight.quant_state.shape,)}
        shapes |= {s[::-1] for s in shapes}
        mode: dict = {}

        def before(module, args, kwargs):
            if torch.is_grad_enabled() or module.training:
                return  # a training forward
            layers = list(_base_layers(model))
            scoring.append({
                "not_4bit": [n for n, layer in layers if not isinstance(layer, bnb.nn.Linear4bit)],
                "not_packed_uint8": [
                    n for n, layer in layers
                    if not (isinstance(layer.weight, bnb.nn.Params4bit) and layer.weight.dtype == torch.uint8)
                ],
                "cpu_repacked": [
                    n for n, layer in layers if getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
                ],
                "layers": len(layers),
                "bytes": _storage_bytes(model),
                "start_bytes": start_bytes,
                "float_weights": _float_weight_names(model),
            })  # fmt: skip
            mode["spy"] = ScoringOps(shapes)
            mode["spy"].__enter__()

        def after(module, args, kwargs, output):
            spy = mode.pop("spy", None)
            if spy is not None:
                spy.__exit__(None, None, None)
                scoring[-1].update(gemm_4bit=spy.gemm_4bit, gemm_weights=spy.weights)

        return [
            model.register_forward_pre_hook(before, with_kwargs=True),
            model.register_forward_hook(after, with_kwargs=True),
        ]

    captured = _capture_trainer(monkeypatch, hook_model)
    assert main(_sft_args(model_dir, data, output_dir)) == 0
    out = capsys.readouterr().out
    assert "3 optimizer steps" in out
    assert "Base weights: 4-bit (NF4, double quantisation, bf16 compute) with bitsandbytes" in out
    trainer = captured["trainer"]

    # The scoring pass ran on the 4-bit model: every targeted linear layer is a bnb Linear4bit holding packed uint8
    # NF4 weights, each ran as one bitsandbytes 4-bit GEMM on those uint8 weights, the model's storage never grew and
    # holds no floating-point copy of a base weight, and no weight-shaped float tensor outlived the pass.
    assert len(scoring) == 3 * 2  # 3 optimizer steps x 2 micro-batches
    for check in scoring:
        assert check["layers"] == 2 * len(LORA_TARGETS)
        assert check["not_4bit"] == [] and check["not_packed_uint8"] == [] and check["cpu_repacked"] == []
        assert check["bytes"] == check["start_bytes"]
        assert check["float_weights"] == []
        assert check["gemm_4bit"] == 2 * len(LORA_TARGETS) and check["gemm_weights"] == {torch.uint8}
    gc.collect()
    assert all(ref() is None for ref in weight_shaped), "a weight-shaped tensor outlived the scoring pass"

    # Training really trained (bitsandbytes' CPU repacking would have zeroed every LoRA gradient, silently).
    grad_norms = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert len(grad_norms) == 3 and all(g > 0 for g in grad_norms)
    lora_b = [p for name, p in trainer.model.named_parameters() if "lora_B" in name]
    assert lora_b and all(bool(p.detach().abs().sum() > 0) for p in lora_b)
    ledger = read_ledger(output_dir / "qtuning_ledger")
    assert sorted(set(ledger.column("step").to_pylist())) == [1, 2, 3]

    # The adapter saves and reloads on a freshly re-quantised base, with the same outputs.
    assert (output_dir / "adapter_config.json").is_file()
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config, dtype=torch.bfloat16)
    assert quantization.prepare_quantized_model(base)["4-bit"] == 2 * len(LORA_TARGETS)
    reloaded = PeftModel.from_pretrained(base, output_dir)
    for name, param in reloaded.named_parameters():
        if "lora_" in name:  # TRL trains QLoRA adapters in bf16; peft upcasts them on load
            param.data = param.data.to(torch.bfloat16)
    trained = trainer.model
    input_ids = torch.tensor([[2, 110, 7, 20, 111, 8, 134, 5, 10, 17]])
    trained.eval()
    reloaded.eval()
    with torch.no_grad():
        expected = trained(input_ids=input_ids).logits
        actual = reloaded(input_ids=input_ids).logits
        with reloaded.disable_adapter():
            without_adapter = reloaded(input_ids=input_ids).logits
    torch.testing.assert_close(actual, expected)
    assert not torch.allclose(without_adapter, expected), "the trained adapter should change the outputs"


def test_fallback_to_plain_lora_is_opt_in_warned_and_tagged(tiny_inputs, tmp_path, monkeypatch, capsys, caplog):
    def missing():
        raise ImportError("No module named 'bitsandbytes'")

    monkeypatch.setattr(quantization, "_import_bitsandbytes", missing)
    monkeypatch.setenv("MLFLOW_TAGS", json.dumps({"team": "nlp"}))
    model_dir, data = tiny_inputs

    # Default: stop, one line, say why and what to do.
    assert main(_sft_args(model_dir, data, tmp_path / "refused")) == 1
    line = _error_line(capsys)
    assert "load_in_4bit needs bitsandbytes, which is not installed" in line
    assert "pip install 'trl-qtuning[quantization]'" in line and "--quantization_fallback lora" in line
    assert json.loads(os.environ["MLFLOW_TAGS"]) == {"team": "nlp"}  # nothing recorded for a refused run

    # Opt in: plain LoRA, a warning, the tags (in the MLflow run too), and a summary line that says so.
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)  # MLflow writes ./mlruns unless told otherwise: keep everything in tmp_path
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "qlora-fallback")
    mlflow.MlflowClient().create_experiment("qlora-fallback", artifact_location=(tmp_path / "artifacts").as_uri())
    captured = _capture_trainer(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="trl_qtuning.integrations.quantization"):
        args = _sft_args(model_dir, data, tmp_path / "out", "--quantization_fallback", "lora", "--report_to", "mlflow")
        assert main(args) == 0
    assert any("PLAIN LoRA" in r.getMessage() and "not installed" in r.getMessage() for r in caplog.records)
    assert any("optim=paged_adamw_8bit needs bitsandbytes too" in r.getMessage() for r in caplog.records)
    expected_tags = {
        "team": "nlp",
        quantization.FALLBACK_TAG: quantization.FALLBACK_TAG_VALUE,
        "qtuning.optimizer_fallback": "adamw_torch",
    }
    assert json.loads(os.environ["MLFLOW_TAGS"]) == {"team": "nlp"}  # the user's variable is left as it was
    out = capsys.readouterr().out
    assert "Quantisation fallback: trained plain LoRA on unquantised weights instead of 4-bit" in out
    trainer = captured["trainer"]
    assert quantization.count_quantized_layers(trainer.model) == {"4-bit": 0, "8-bit": 0}
    assert str(getattr(trainer.args.optim, "value", trainer.args.optim)) == "adamw_torch"
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    mlflow.flush_async_logging()
    client = mlflow.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("qlora-fallback").experiment_id])
    assert expected_tags.items() <= run.data.tags.items()


# ----------------------------------------------------------------------------------------------------------------------
# Failure messages (unit)
# ----------------------------------------------------------------------------------------------------------------------


def test_bitsandbytes_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    with pytest.raises(quantization.BitsAndBytesUnavailable) as err:
        quantization.check_bitsandbytes("cpu")
    message = str(err.value)
    assert "load_in_4bit needs bitsandbytes, which is not installed" in message
    assert "pip install 'trl-qtuning[quantization]'" in message and "--quantization_fallback lora" in message
    assert "\n" not in message


def test_bitsandbytes_without_a_backend_for_the_device(bnb, monkeypatch):
    monkeypatch.setattr(bnb, "supported_torch_devices", {"cuda", "xpu"}, raising=False)
    with pytest.raises(quantization.BitsAndBytesUnavailable) as err:
        quantization.check_bitsandbytes("cpu")
    message = str(err.value)
    assert f"bitsandbytes {bnb.__version__} has no backend for the training device cpu" in message
    assert "it supports: cuda, xpu" in message
    assert "install a bitsandbytes build for cpu" in message and "--quantization_fallback lora" in message


def test_bitsandbytes_kernel_missing_for_the_device(bnb, monkeypatch):
    def no_kernel(*args, **kwargs):
        raise NotImplementedError("Could not run 'bitsandbytes::quantize_4bit' with arguments from the 'CPU' backend.")

    monkeypatch.setattr(bnb.functional, "quantize_4bit", no_kernel)
    with pytest.raises(quantization.BitsAndBytesUnavailable) as err:
        quantization.check_bitsandbytes("cpu")
    message = str(err.value)
    assert f"bitsandbytes {bnb.__version__} has no working 4-bit backend for the training device cpu" in message
    assert "'CPU' backend" in message and "--quantization_fallback lora" in message


def test_bitsandbytes_backend_ok_returns_version(bnb):
    assert quantization.check_bitsandbytes("cpu") == bnb.__version__
    assert quantization.check_bitsandbytes("cpu", "8-bit") == bnb.__version__


def test_cli_reports_a_missing_backend_in_one_line(bnb, tiny_inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bnb, "supported_torch_devices", {"cuda"}, raising=False)
    model_dir, data = tiny_inputs
    assert main(_sft_args(model_dir, data, tmp_path / "out")) == 1
    line = _error_line(capsys)
    assert line.startswith("trl-qtuning sft: error: bitsandbytes") and "training device cpu" in line
    assert "Traceback" not in line


def _args(**overrides):
    """Training arguments as plan_quantization reads them (device, optim, trust_remote_code)."""
    return SimpleNamespace(**{"device": torch.device("cpu"), "optim": "adamw_torch", "trust_remote_code": False,
                              **overrides})  # fmt: skip


@pytest.fixture(scope="module")
def bigram_dir(tmp_path_factory) -> Path:
    """A registered model type with no linear layer but its LM head: nothing bitsandbytes can quantise."""
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

    class QTuningBigramConfig(PretrainedConfig):
        model_type = "qtuning_test_bigram"

        def __init__(self, vocab_size=32, hidden_size=8, **kwargs):
            self.vocab_size, self.hidden_size = vocab_size, hidden_size
            super().__init__(**kwargs)

    class QTuningBigramLM(PreTrainedModel):
        config_class = QTuningBigramConfig

        def __init__(self, config):
            super().__init__(config)
            self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
            self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

        def get_output_embeddings(self):
            return self.lm_head

    AutoConfig.register("qtuning_test_bigram", QTuningBigramConfig, exist_ok=True)
    AutoModelForCausalLM.register(QTuningBigramConfig, QTuningBigramLM, exist_ok=True)
    path = tmp_path_factory.mktemp("bigram")
    QTuningBigramConfig(architectures=["QTuningBigramLM"]).save_pretrained(path)
    return path


def test_model_type_that_cannot_be_quantised(bigram_dir, bitsandbytes_ok, monkeypatch):
    model_args = quantization.qlora_model_config(str(bigram_dir), dtype="float32")
    with pytest.raises(quantization.ModelNotQuantizable) as err:
        quantization.plan_quantization(model_args, _args())
    message = str(err.value)
    assert "model type 'qtuning_test_bigram'" in message and "no nn.Linear/Conv1D layers" in message
    assert "--quantization_fallback lora" in message

    monkeypatch.delenv("MLFLOW_TAGS", raising=False)
    plan = quantization.plan_quantization(model_args, _args(optim="paged_adamw_8bit"), fallback="lora")
    assert plan.fell_back and plan.quantization_config is None and plan.mode is None
    assert "qtuning_test_bigram" in plan.fallback_reason
    assert not model_args.load_in_4bit  # the saved arguments tell the truth
    # bitsandbytes itself works here, so its optimizer is kept; only the quantisation falls back.
    assert plan.tags == {quantization.FALLBACK_TAG: "plain_lora"} and "MLFLOW_TAGS" not in os.environ


def test_already_quantised_checkpoint_is_refused(tmp_path, bitsandbytes_ok):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=64, architectures=["LlamaForCausalLM"])  # fmt: skip
    config.quantization_config = {"quant_method": "gptq", "bits": 4}
    config.save_pretrained(tmp_path)
    with pytest.raises(quantization.ModelNotQuantizable, match="already quantised with 'gptq'"):
        quantization.plan_quantization(quantization.qlora_model_config(str(tmp_path)), _args())


def test_4bit_without_lora_is_an_argument_error(tiny_inputs, tmp_path, capsys):
    model_dir, data = tiny_inputs
    with pytest.raises(quantization.QuantizationConfigError, match="needs LoRA adapters"):
        quantization.plan_quantization(quantization.qlora_model_config(str(model_dir), use_peft=False), _args())
    assert main(_sft_args(model_dir, data, tmp_path / "out", "--use_peft", "false")) == 2
    assert "load_in_4bit needs LoRA adapters" in _error_line(capsys)


def test_bad_fallback_value_names_the_field(tiny_inputs, tmp_path, capsys):
    model_dir, data = tiny_inputs
    assert main(_sft_args(model_dir, data, tmp_path / "out", "--quantization_fallback", "qlora")) == 2
    assert "quantization_fallback" in _error_line(capsys)


def test_prepare_refuses_a_model_that_did_not_quantise(tiny_model):
    plan = quantization.QuantizationPlan(mode="4-bit", requested_mode="4-bit")
    with pytest.raises(quantization.ModelNotQuantizable, match="would train in full precision"):
        quantization.prepare_quantized_model(tiny_model, plan)


def test_large_model_in_4bit_on_cpu_warns(tmp_path, bitsandbytes_ok, caplog):
    from transformers import LlamaConfig

    LlamaConfig(  # SmolLM2-1.7B's shape: only its config is written, nothing is loaded
        vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
        num_key_value_heads=32, tie_word_embeddings=True, architectures=["LlamaForCausalLM"],
    ).save_pretrained(tmp_path)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="trl_qtuning.integrations.quantization"):
        plan = quantization.plan_quantization(quantization.qlora_model_config(str(tmp_path)), _args())
    assert plan.mode == "4-bit" and plan.report.total_params == 1_711_376_384
    assert any("(1.7B parameters) in 4-bit on the CPU" in r.getMessage() for r in caplog.records)
    config = plan.quantization_config
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16


def test_cpu_repacking_guard_keeps_gradients_flowing(bnb, tmp_path):
    """bitsandbytes' CPU backend repacks 4-bit weights on an eval no-grad forward (Q-Tuning's scoring pass); after that
    no gradient crosses a 4-bit layer. The guard undoes the repacking and stops it happening again."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from trl_qtuning.testing import make_tiny_model, make_tiny_tokenizer

    if not bnb.functional.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    tokenizer = make_tiny_tokenizer()
    make_tiny_model(tokenizer, hidden_size=64).save_pretrained(tmp_path)  # repacking needs in_features >= 64
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    input_ids = torch.tensor([[2, 110, 7, 20, 111, 8, 134, 5]])
    layer = model.base_model.model.model.layers[0].self_attn.o_proj
    with torch.no_grad():
        before = model(input_ids=input_ids).logits  # train mode: no repacking
    model.eval()
    with torch.no_grad():
        model(input_ids=input_ids)  # what Q-Tuning's scoring pass does
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this bitsandbytes does not repack on an eval forward")

    assert quantization.keep_4bit_trainable_on_cpu(model) == 2 * len(LORA_TARGETS)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    with torch.no_grad():
        model(input_ids=input_ids)  # a second scoring-like pass no longer repacks
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    model.train()
    with torch.no_grad():
        # The same weights again, up to the bf16 rounding of the block scales that bitsandbytes' repacking applies.
        torch.testing.assert_close(model(input_ids=input_ids).logits, before, rtol=0.02, atol=0.02)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    # q_proj's adapter only reaches the loss through o_proj (4-bit): a gradient here crossed a 4-bit layer.
    q_lora_a = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert q_lora_a.grad is not None and bool(q_lora_a.grad.abs().sum() > 0)


# ----------------------------------------------------------------------------------------------------------------------
# GPU recipes and the memory benchmark (no GPU needed)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", GPU_RECIPES, ids=lambda p: p.parts[-3])
def test_gpu_recipes_parse_with_the_papers_settings(recipe, monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))  # restored after
    _, training_args, model_args, _ = sft_cli.parse_args(["--config", str(recipe), "--use_cpu", "true"])
    assert model_args.load_in_4bit and model_args.bnb_4bit_quant_type == "nf4" and model_args.use_bnb_nested_quant
    assert model_args.dtype == "bfloat16" and model_args.quantization_fallback == "none"
    assert model_args.use_peft and model_args.lora_r == 8 and model_args.lora_alpha == 16
    assert model_args.lora_dropout == 0.0 and model_args.lora_target_modules == "all-linear"
    assert training_args.learning_rate == 1e-4 and training_args.lr_scheduler_type.value == "cosine"
    assert training_args.num_train_epochs == 3 and training_args.max_length == 2048
    assert training_args.per_device_train_batch_size == 8 and training_args.gradient_accumulation_steps == 4
    assert training_args.gradient_checkpointing and training_args.bf16
    assert training_args.optim.value == "paged_adamw_8bit"
    assert (training_args.sample_keep_ratio, training_args.token_keep_ratio) in {(0.25, 0.5), (0.125, 0.5)}
    assert (recipe.parent / "README.md").is_file()
    readme = (recipe.parent / "README.md").read_text()
    assert "not yet measured on a GPU" in readme and "estimate" in readme.lower()
    assert f"trl-qtuning sft --config recipes/{recipe.parts[-3]}/qtuning/config_qlora.yaml" in readme


def _benchmark():
    spec = importlib.util.spec_from_file_location("qlora_memory", ROOT / "benchmarks" / "qlora_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("qlora_memory", module)
    spec.loader.exec_module(module)
    return module


def test_benchmark_dry_run_counts_and_estimates(capsys):
    bench = _benchmark()
    assert {arch.recipe for arch in bench.ARCHITECTURES.values()} == {str(p.relative_to(ROOT)) for p in GPU_RECIPES}
    assert bench.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for arch in bench.ARCHITECTURES.values():
        # The architecture table reproduces each published checkpoint's parameter count.
        assert f"{arch.published_params:,} total (published {arch.published_params:,})" in out
        recipe = bench.load_recipe(arch.recipe)
        estimate = bench.estimate_memory(bench.count_params(arch, recipe), recipe).total
        if arch.published_params > bench.EIGHT_B_CLASS:
            assert estimate < 22 * bench.GIB
    assert out.count("ESTIMATE of peak allocated GPU memory (not a measurement)") == len(bench.ARCHITECTURES)


def test_benchmark_refuses_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    bench = _benchmark()
    assert bench.main(["--recipe", "llama-3.1-8b"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "--dry-run" in err and "Run it on a machine with an NVIDIA GPU" in err


def test_benchmark_measurement_path_runs_on_cpu(bnb):
    """The GPU measurement code (random 4-bit model from a config, both trainers) on a tiny architecture, on CPU."""
    bench = _benchmark()
    arch = bench.Architecture(
        key="tiny", hub_id="tiny", recipe="", config_class="LlamaConfig", published_params=0,
        config=dict(architectures=["LlamaForCausalLM"], vocab_size=128, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    )  # fmt: skip
    recipe = bench.load_recipe("recipes/llama-3.1-8b/qtuning/config_qlora.yaml")
    recipe.pop("env", None)
    recipe.update(per_device_train_batch_size=4, max_length=16, gradient_accumulation_steps=2, lora_r=4)
    plain = bench.measure(arch, recipe, "plain", 1, device="cpu")
    qtuned = bench.measure(arch, recipe, "qtuning", 1, device="cpu")
    assert plain.mode == "plain" and qtuned.mode == "qtuning"
    assert plain.step_seconds > 0 and qtuned.step_seconds > 0
    assert qtuned.kept_sample_ratio == pytest.approx(0.125)  # the recipe's budget, over 4 x 2 samples
