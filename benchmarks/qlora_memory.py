#!/usr/bin/env python
"""Peak GPU memory and step time of QLoRA Q-Tuning vs plain QLoRA SFT, on each recipe's real architecture.

For each QLoRA recipe (``recipes/<model>/qtuning/config_qlora.yaml``) this builds a model with the real architecture
of the recipe's base model from the hyper-parameters in ``ARCHITECTURES`` below (random weights: nothing is
downloaded), loads it in 4-bit exactly as the recipe asks (``trl.get_quantization_config``: NF4, double quantisation,
bf16 compute), adds the recipe's LoRA, and runs ``--steps`` optimizer steps of ``QTuningSFTTrainer`` and the same
number of plain ``trl.SFTTrainer`` steps at the recipe's micro-batch, gradient accumulation and sequence length
(every row exactly ``max_length`` tokens long). It prints the peak GPU memory and the mean step time of both and
their ratio, next to the analytic estimate. An 8B-class recipe must stay under ``--limit-gib`` (22 GiB) peak: the
script exits with code 1 if one does not.

    python benchmarks/qlora_memory.py                          # every recipe, 3 steps each (needs a CUDA GPU)
    python benchmarks/qlora_memory.py --recipe llama-3.1-8b --steps 2 --json out.json
    python benchmarks/qlora_memory.py --dry-run                # any machine: parameter counts + analytic estimate

Without a CUDA GPU the measurement refuses to start (exit code 2) and says what to run where; ``--dry-run`` (alias
``--list``) works everywhere. Needs ``pip install 'trl-qtuning[quantization]'`` on the GPU machine.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
DEFAULT_LIMIT_GIB = 22.0
EIGHT_B_CLASS = 5e9  # recipes with more parameters than this must stay under --limit-gib
TOKEN_TILE = 4096  # TRL's fused LM head: tokens per tile (trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE)
VOCAB_TILE = 32768  # ... and vocabulary entries per tile (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE)


@dataclass(frozen=True)
class Architecture:
    """A recipe's base model: its recipe file and the hyper-parameters of its published ``config.json``."""

    key: str
    hub_id: str
    recipe: str
    config_class: str
    config: dict[str, Any]
    published_params: int
    """Parameter count of the published checkpoint (the meta-device count must reproduce it)."""


# Values of each model's published config.json (the Hub is not reachable from the machines this runs on).
ARCHITECTURES: dict[str, Architecture] = {
    arch.key: arch
    for arch in (
        Architecture(
            key="smollm2-1.7b",
            hub_id="HuggingFaceTB/SmolLM2-1.7B",
            recipe="recipes/smollm2-1.7b/qtuning/config_qlora.yaml",
            config_class="LlamaConfig",
            config=dict(
                architectures=["LlamaForCausalLM"],
                vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 130000.0}, tie_word_embeddings=True,
                attention_bias=False, mlp_bias=False, hidden_act="silu", bos_token_id=1, eos_token_id=2,
                pad_token_id=2,
            ),
            published_params=1_711_376_384,
        ),
        Architecture(
            key="llama-3.1-8b",
            hub_id="meta-llama/Llama-3.1-8B",
            recipe="recipes/llama-3.1-8b/qtuning/config_qlora.yaml",
            config_class="LlamaConfig",
            config=dict(
                architectures=["LlamaForCausalLM"],
                vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5,
                rope_parameters={
                    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                },
                tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu",
                bos_token_id=128000, eos_token_id=128001,
            ),
            published_params=8_030_261_248,
        ),
        Architecture(
            key="mistral-7b",
            hub_id="mistralai/Mistral-7B-v0.3",
            recipe="recipes/mistral-7b/qtuning/config_qlora.yaml",
            config_class="MistralConfig",
            config=dict(
                architectures=["MistralForCausalLM"],
                vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
                rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                sliding_window=None, tie_word_embeddings=False, hidden_act="silu", bos_token_id=1, eos_token_id=2,
            ),
            published_params=7_248_023_552,
        ),
        Architecture(
            key="qwen3-8b",
            hub_id="Qwen/Qwen3-8B-Base",
            recipe="recipes/qwen3-8b/qtuning/config_qlora.yaml",
            config_class="Qwen3Config",
            config=dict(
                architectures=["Qwen3ForCausalLM"],
                vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=32768,
                rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                tie_word_embeddings=False, attention_bias=False, use_sliding_window=False, sliding_window=None,
                max_window_layers=36, hidden_act="silu", bos_token_id=151643, eos_token_id=151643,
            ),
            published_params=8_190_735_360,
        ),
    )
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Recipes and configs
# ----------------------------------------------------------------------------------------------------------------------


def load_recipe(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_absolute():
        path = REPO / path
    recipe = yaml.safe_load(path.read_text())
    if not isinstance(recipe, dict):
        raise SystemExit(f"qlora_memory.py: recipe {path} is not a YAML mapping")
    return recipe


def build_config(arch: Architecture):
    import transformers

    return getattr(transformers, arch.config_class)(**arch.config)


def _meta_model(config):
    """The model of ``config`` on the meta device: every shape, no memory."""
    import torch
    import transformers

    with torch.device("meta"):
        return getattr(transformers, config.architectures[0])._from_config(config)


def _lora_targets(recipe: dict[str, Any]) -> list[str] | str:
    targets = recipe.get("lora_target_modules") or "all-linear"
    if isinstance(targets, list) and len(targets) == 1:
        targets = targets[0]
    return targets


@dataclass
class ParamCounts:
    total: int
    quantized: int
    """Weights of the linear layers bitsandbytes quantises (everything but embeddings, LM head and norms)."""
    lora: int
    largest_linear: int
    hidden: int
    intermediate: int
    layers: int
    vocab: int


def count_params(arch: Architecture, recipe: dict[str, Any]) -> ParamCounts:
    """Counts on the meta device (instant, no memory), with the recipe's LoRA rank and target modules."""
    import torch
    from transformers.pytorch_utils import Conv1D

    from trl_qtuning.integrations.quantization import model_report_from_config

    config = build_config(arch)
    report = model_report_from_config(config, arch.hub_id)
    targets = _lora_targets(recipe)
    rank = int(recipe.get("lora_r", 8))
    model = _meta_model(config)
    output = model.get_output_embeddings()
    lora = largest = 0
    for name, module in model.named_modules():
        if not (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) or module is output:
            continue
        largest = max(largest, module.weight.numel())
        short = name.rsplit(".", 1)[-1]
        if targets == "all-linear" or (isinstance(targets, (list, tuple)) and short in targets) or short == targets:
            out_features, in_features = module.weight.shape
            lora += rank * (in_features + out_features)
    return ParamCounts(
        total=report.total_params,
        quantized=report.quantizable_params,
        lora=lora,
        largest_linear=largest,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        layers=config.num_hidden_layers,
        vocab=config.vocab_size,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Analytic estimate
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Estimate:
    rows: list[tuple[str, str, float]] = field(default_factory=list)
    """(term, arithmetic, bytes)."""

    def add(self, term: str, arithmetic: str, value: float) -> None:
        self.rows.append((term, arithmetic, float(value)))

    @property
    def total(self) -> float:
        return sum(value for _, _, value in self.rows)


def _gib(value: float) -> str:
    if value < 0.01 * GIB:
        return f"{value / 1024**2:.1f} MiB"
    return f"{value / GIB:.2f} GiB"


def estimate_memory(counts: ParamCounts, recipe: dict[str, Any]) -> Estimate:
    """Peak allocated GPU memory of one QLoRA training step (weights + LoRA + optimizer + activations), in bytes.

    An estimate, not a measurement: the activation terms are rough (+-30%) and the CUDA context (~0.5 GiB) and
    allocator fragmentation are not counted (torch's ``max_memory_allocated`` does not count them either).
    """
    batch = int(recipe.get("per_device_train_batch_size", 8))
    length = int(recipe.get("max_length", 2048))
    tokens = batch * length
    nested = bool(recipe.get("use_bnb_nested_quant", False))
    optim = str(recipe.get("optim", "adamw_torch"))
    checkpointing = bool(recipe.get("gradient_checkpointing", recipe.get("activation_checkpointing", False)))
    h, i, n_layers, vocab = counts.hidden, counts.intermediate, counts.layers, counts.vocab
    est = Estimate()
    if nested:
        bits = 4 + 8 / 64 + 32 / (64 * 256)
        est.add(
            "NF4 weights (double quant)",
            f"{counts.quantized / 1e9:.3f}B linear weights x (4 + 8/64 + 32/(64*256)) bits = x {bits / 8:.4f} B",
            counts.quantized * bits / 8,
        )
    else:
        bits = 4 + 32 / 64
        est.add(
            "NF4 weights",
            f"{counts.quantized / 1e9:.3f}B linear weights x (4 + 32/64) bits = x {bits / 8:.4f} B",
            counts.quantized * bits / 8,
        )
    other = counts.total - counts.quantized
    est.add("bf16 weights (embeddings, LM head, norms)", f"{other / 1e9:.3f}B x 2 B", other * 2.0)
    state_bytes = 2 if "8bit" in optim else 8
    per_lora = 2 + 2 + state_bytes
    est.add(
        f"LoRA (r {recipe.get('lora_r', 8)}) + grads + {optim} states",
        f"{counts.lora / 1e6:.1f}M x (2 bf16 weight + 2 grad + {state_bytes} optimizer) B",
        counts.lora * float(per_lora),
    )
    if checkpointing:
        est.add(
            "checkpointed layer inputs",
            f"{n_layers} layers x {batch}x{length} tokens x H {h} x 2 B",
            float(n_layers * tokens * h * 2),
        )
        layer_rows = 1
    else:
        layer_rows = n_layers
    est.add(
        "one layer's activations + grads" + (" (recomputed)" if checkpointing else f" ({n_layers} layers)"),
        f"{layer_rows} x {tokens} tokens x (12*H {h} + 6*I {i}) x 2 B",
        float(layer_rows * tokens * (12 * h + 6 * i) * 2),
    )
    tile = min(vocab, VOCAB_TILE)
    est.add(
        "LM head + loss (TRL fused head, tiled)",
        f"{tokens} tokens x H {h} x 10 B + {TOKEN_TILE} x {tile} logits tile x 6 B",
        float(tokens * h * 10 + TOKEN_TILE * tile * 6),
    )
    est.add(
        "transient dequantised weight (fwd + bwd)",
        f"2 x {counts.largest_linear / 1e6:.1f}M x 2 B",
        float(2 * counts.largest_linear * 2),
    )
    return est


def qtuning_extra(recipe: dict[str, Any]) -> tuple[str, float]:
    """Q-Tuning's own extra memory: per-token statistics of the step's micro-batches (the scoring forward runs
    without gradients before the step's training forwards, when no activation is stored, so it adds no peak)."""
    batch = int(recipe.get("per_device_train_batch_size", 8))
    length = int(recipe.get("max_length", 2048))
    accumulation = int(recipe.get("gradient_accumulation_steps", 1))
    value = float(accumulation * batch * length * 4 * 4)
    return f"{accumulation} micro-batches x {batch}x{length} tokens x 4 fp32 stats x 4 B", value


def describe(arch: Architecture, recipe: dict[str, Any]) -> list[str]:
    counts = count_params(arch, recipe)
    est = estimate_memory(counts, recipe)
    extra_formula, extra = qtuning_extra(recipe)
    lines = [
        f"{arch.key}: {arch.hub_id} ({arch.config_class}), recipe {arch.recipe}",
        (
            f"  parameters: {counts.total:,} total (published {arch.published_params:,}); "
            f"{counts.quantized:,} in 4-bit linear layers; {counts.lora:,} LoRA (r {recipe.get('lora_r')}, "
            f"targets {_lora_targets(recipe)})"
        ),
        (
            f"  micro-batch {recipe.get('per_device_train_batch_size')} x length {recipe.get('max_length')}, "
            f"gradient accumulation {recipe.get('gradient_accumulation_steps')}, "
            f"gradient checkpointing {recipe.get('gradient_checkpointing')}, optim {recipe.get('optim')}"
        ),
        "  ESTIMATE of peak allocated GPU memory (not a measurement):",
    ]
    for term, arithmetic, value in est.rows:
        lines.append(f"    {term:<45} {arithmetic:<76} {_gib(value):>10}")
    lines.append(f"    {'total, plain QLoRA SFT':<45} {'':<76} {_gib(est.total):>10}")
    lines.append(f"    {'+ Q-Tuning per-token statistics':<45} {extra_formula:<76} {_gib(extra):>10}")
    lines.append(f"    {'total, QLoRA Q-Tuning':<45} {'':<76} {_gib(est.total + extra):>10}")
    return lines


# ----------------------------------------------------------------------------------------------------------------------
# Measurement (CUDA)
# ----------------------------------------------------------------------------------------------------------------------


def _random_state_dict(config, seed: int = 0) -> dict[str, Any]:
    """Random bf16 weights for every parameter of ``config``'s model (norms at 1). Tensors of the same shape are
    shared between layers: host memory stays near one layer's worth, and each is quantised on its own at load."""
    import torch

    meta = _meta_model(config)
    generator = torch.Generator().manual_seed(seed)
    by_shape: dict[tuple[tuple[int, ...], str], torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    tied = set(getattr(meta, "all_tied_weights_keys", {}) or {})
    for name, param in meta.state_dict().items():
        if name in tied:
            continue
        kind = "ones" if "norm" in name else ("zeros" if name.endswith("bias") else "normal")
        key = (tuple(param.shape), kind if "embed" not in name and "lm_head" not in name else name)
        if key not in by_shape:
            if kind == "ones":
                tensor = torch.ones(param.shape, dtype=torch.bfloat16)
            elif kind == "zeros":
                tensor = torch.zeros(param.shape, dtype=torch.bfloat16)
            else:
                tensor = (torch.randn(param.shape, generator=generator) * 0.02).to(torch.bfloat16)
            by_shape[key] = tensor
        state[name] = by_shape[key]
    return state


def _split_recipe(recipe: dict[str, Any]):
    """The recipe's keys as (model, SFT/training, Q-Tuning-only) keyword arguments."""
    from trl import SFTConfig

    from trl_qtuning.config import QTuningConfig
    from trl_qtuning.integrations.quantization import QuantizedModelConfig

    model_keys = {f.name for f in fields(QuantizedModelConfig)}
    sft_keys = {f.name for f in fields(SFTConfig) if f.init}
    qtuning_keys = {f.name for f in fields(QTuningConfig) if f.init} - sft_keys
    model_kwargs = {k: v for k, v in recipe.items() if k in model_keys}
    sft_kwargs = {k: v for k, v in recipe.items() if k in sft_keys}
    qtuning_kwargs = {k: v for k, v in recipe.items() if k in qtuning_keys}
    return model_kwargs, sft_kwargs, qtuning_kwargs


def _synthetic_dataset(n: int, length: int, vocab: int, seed: int = 0):
    """Pre-tokenised rows of exactly ``length`` tokens; the first quarter is the prompt (label -100)."""
    import torch
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(16, vocab, (n, length), generator=generator)
    prompt = length // 4
    labels = ids.clone()
    labels[:, :prompt] = -100
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


@dataclass
class Measurement:
    mode: str
    peak_allocated: float | None
    peak_reserved: float | None
    step_seconds: float
    steps: int
    kept_sample_ratio: float | None = None


def measure(
    arch: Architecture,
    recipe: dict[str, Any],
    mode: str,
    steps: int,
    *,
    device: str = "cuda",
    state_dict: dict[str, Any] | None = None,
    config=None,
    output_dir: str | None = None,
) -> Measurement:
    """Train ``steps`` optimizer steps with Q-Tuning (``mode="qtuning"``) or plain ``SFTTrainer`` (``"plain"``)."""
    import torch
    import transformers
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer, get_peft_config, get_quantization_config

    from trl_qtuning.config import QTuningConfig
    from trl_qtuning.integrations.quantization import QuantizedModelConfig, prepare_quantized_model
    from trl_qtuning.testing import make_tiny_tokenizer
    from trl_qtuning.trainer import QTuningSFTTrainer

    config = config if config is not None else build_config(arch)
    state_dict = state_dict if state_dict is not None else _random_state_dict(config)
    model_kwargs, sft_kwargs, qtuning_kwargs = _split_recipe(recipe)
    model_args = QuantizedModelConfig(**model_kwargs)
    cls = getattr(transformers, config.architectures[0])
    model = cls.from_pretrained(
        None,
        config=config,
        state_dict=state_dict,
        quantization_config=get_quantization_config(model_args),
        dtype=getattr(torch, model_args.dtype),
        device_map={"": device},
        attn_implementation=model_args.attn_implementation,
    )
    accumulation = int(sft_kwargs.get("gradient_accumulation_steps", 1))
    batch = int(sft_kwargs.get("per_device_train_batch_size", 8))
    length = int(sft_kwargs.get("max_length", 2048))
    dataset = _synthetic_dataset(steps * accumulation * batch, length, config.vocab_size)
    tmp = output_dir or tempfile.mkdtemp(prefix=f"qlora-memory-{arch.key}-{mode}-")
    overrides = dict(
        output_dir=tmp, max_steps=steps, save_strategy="no", eval_strategy="no", report_to="none", logging_steps=1,
        dataloader_num_workers=0, use_cpu=device == "cpu", push_to_hub=False, model_init_kwargs=None,
    )  # fmt: skip
    if device == "cpu":
        overrides["bf16"] = False
    sft_kwargs = {**sft_kwargs, **overrides}
    if mode == "qtuning":
        args = QTuningConfig(**sft_kwargs, **{**qtuning_kwargs, "qtuning_ledger": "none"})
        trainer_cls = QTuningSFTTrainer
    else:
        args = SFTConfig(**sft_kwargs)
        trainer_cls = SFTTrainer

    marks: list[float] = []

    class _StepTimer(TrainerCallback):
        """Time between consecutive step ends. transformers fetches a step's micro-batches (and Q-Tuning scores them)
        before ``on_step_begin``, so begin-to-end would miss the scoring pass; end-to-end includes it."""

        def _mark(self):
            if device != "cpu":
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

        def on_train_begin(self, args, state, control, **kwargs):
            self._mark()

        def on_step_end(self, args, state, control, **kwargs):
            self._mark()

    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=make_tiny_tokenizer(),
        peft_config=get_peft_config(model_args),
        callbacks=[_StepTimer()],
    )
    prepare_quantized_model(trainer.model)
    if device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # the 4-bit weights stay allocated, so the peak includes them
    trainer.train()
    peak_allocated = peak_reserved = None
    if device != "cpu":
        torch.cuda.synchronize()
        peak_allocated = torch.cuda.max_memory_allocated()
        peak_reserved = torch.cuda.max_memory_reserved()
    kept = None
    history = [h["qtuning/sample_keep_ratio"] for h in trainer.state.log_history if "qtuning/sample_keep_ratio" in h]
    if history:
        kept = sum(history) / len(history)
    durations = [b - a for a, b in itertools.pairwise(marks)]
    timed = durations[1:] if len(durations) > 1 else durations  # the first step is a warm-up (optimizer state...)
    per_step = sum(timed) / len(timed) if timed else float("nan")
    del trainer, model
    gc.collect()
    if device != "cpu":
        torch.cuda.empty_cache()
    return Measurement(mode, peak_allocated, peak_reserved, per_step, steps, kept)


def _refuse_without_cuda() -> int | None:
    try:
        import torch
    except ImportError:  # pragma: no cover
        print("qlora_memory.py: error: torch is not installed.", file=sys.stderr)
        return 2
    if torch.cuda.is_available():
        return None
    print(
        "qlora_memory.py: error: this benchmark measures peak GPU memory and needs a CUDA GPU, but torch "
        f"{torch.__version__} sees none (torch.cuda.is_available() is False; build: "
        f"{'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only'}). Run it on a machine with an NVIDIA "
        "GPU and bitsandbytes installed (pip install 'trl-qtuning[quantization]'): "
        "`python benchmarks/qlora_memory.py [--recipe NAME] [--steps N]`. On this machine, "
        "`python benchmarks/qlora_memory.py --dry-run` prints each recipe's parameter count and the analytic memory "
        "estimate.",
        file=sys.stderr,
    )
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qlora_memory.py",
        description="Peak GPU memory and step time of QLoRA Q-Tuning vs plain QLoRA SFTTrainer per recipe "
        "(random weights, real architecture; needs CUDA). --dry-run works without a GPU.",
    )
    parser.add_argument("--recipe", action="append", choices=[*ARCHITECTURES, "all"], help="repeatable; default all")
    parser.add_argument(
        "--steps",
        type=int,
        default=3,
        help="optimizer steps per trainer (default 3; the first is "
        "a warm-up excluded from the step time when there are several)",
    )
    parser.add_argument(
        "--dry-run",
        "--list",
        dest="dry_run",
        action="store_true",
        help="print each recipe's parameter count and analytic memory estimate, then exit (CPU ok)",
    )
    parser.add_argument(
        "--limit-gib",
        type=float,
        default=DEFAULT_LIMIT_GIB,
        help="peak an 8B-class recipe must stay under (default 22)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    keys = list(ARCHITECTURES) if not args.recipe or "all" in args.recipe else list(dict.fromkeys(args.recipe))
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    if args.dry_run:
        for key in keys:
            arch = ARCHITECTURES[key]
            for line in describe(arch, load_recipe(arch.recipe)):
                print(line)
            print()
        return 0

    refused = _refuse_without_cuda()
    if refused is not None:
        return refused
    import torch

    from trl_qtuning.integrations.quantization import QuantizationError, check_bitsandbytes

    try:
        check_bitsandbytes("cuda")
    except QuantizationError as exc:
        print(f"qlora_memory.py: error: {exc}", file=sys.stderr)
        return 2

    results: list[dict[str, Any]] = []
    failed = False
    print(f"GPU: {torch.cuda.get_device_name(0)}; limit for 8B-class recipes: {args.limit_gib:.1f} GiB peak")
    for key in keys:
        arch = ARCHITECTURES[key]
        recipe = load_recipe(arch.recipe)
        for line in describe(arch, recipe):
            print(line)
        counts = count_params(arch, recipe)
        estimate = estimate_memory(counts, recipe).total
        config = build_config(arch)
        state = _random_state_dict(config)
        runs = {mode: measure(arch, recipe, mode, args.steps, state_dict=state, config=config)
                for mode in ("plain", "qtuning")}  # fmt: skip
        del state
        plain, qtuning = runs["plain"], runs["qtuning"]
        mem_ratio = qtuning.peak_allocated / plain.peak_allocated
        time_ratio = qtuning.step_seconds / plain.step_seconds
        print("  MEASURED (random weights, rows of exactly max_length tokens):")
        for run in (plain, qtuning):
            kept = f", kept {run.kept_sample_ratio:.0%} of samples" if run.kept_sample_ratio is not None else ""
            print(
                f"    {'plain SFTTrainer' if run.mode == 'plain' else 'Q-Tuning':<18} peak allocated "
                f"{_gib(run.peak_allocated)}, reserved {_gib(run.peak_reserved)}, {run.step_seconds:.2f} s/step{kept}"
            )
        print(f"    ratio Q-Tuning / plain: memory {mem_ratio:.3f}, step time {time_ratio:.3f}")
        peak = max(plain.peak_allocated, qtuning.peak_allocated)
        verdict = ""
        if counts.total > EIGHT_B_CLASS:
            ok = peak < args.limit_gib * GIB
            failed |= not ok
            verdict = "PASS" if ok else "FAIL"
            print(f"    8B-class limit {args.limit_gib:.1f} GiB: {verdict} (peak {_gib(peak)})")
        print()
        results.append({
            "recipe": key, "hub_id": arch.hub_id, "params": counts.total, "estimate_bytes": estimate,
            "steps": args.steps, "plain": runs["plain"].__dict__, "qtuning": runs["qtuning"].__dict__,
            "memory_ratio": mem_ratio, "step_time_ratio": time_ratio, "limit_gib": args.limit_gib,
            "verdict": verdict or None, "gpu": torch.cuda.get_device_name(0),
        })  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"Results written to {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
