"""QLoRA for Q-Tuning: 4-bit loading checks with clear errors, an opt-in plain-LoRA fallback, and a CPU guard.

The loading itself is TRL's: ``trl.get_quantization_config(model_args)`` builds the ``BitsAndBytesConfig`` (NF4,
double quantisation, compute dtype = ``model_args.dtype``) and ``SFTTrainer`` loads the model with it. This module
adds what TRL leaves to the user:

- :func:`plan_quantization` runs before the trainer is built. It checks that bitsandbytes is installed and has a
  backend for the training device, and that the model has linear layers bitsandbytes can quantise (read from its
  config on the meta device: nothing is loaded). A problem is a :class:`QuantizationError` whose message names the
  device, the installed version and the fix, unless the caller opted in to ``fallback="lora"``: then the run trains
  plain LoRA instead, says so in a warning, and puts ``qtuning.quantization_fallback=plain_lora`` in the plan's
  ``tags`` (``attach_tracking(trainer, tags=plan.tags)`` sets them on the MLflow run). It warns when a model over 1B
  parameters is trained in 4-bit on a CPU (it works, very slowly).
- :func:`prepare_quantized_model` runs after the trainer is built. It checks that the model really is quantised (never
  train full precision while the user asked for 4-bit) and applies :func:`keep_4bit_trainable_on_cpu`.

Why the CPU guard: bitsandbytes' CPU backend (0.4x-0.50, on CPUs with AVX512-BF16) repacks a ``Linear4bit`` weight
in place into an inference-only layout the first time the layer runs in eval mode without gradients. Q-Tuning's
scoring pass is exactly such a forward. After it, ``matmul_4bit`` takes a kernel with no autograd formula, so no
gradient flows back through any 4-bit layer and every LoRA adapter upstream of one silently gets a zero gradient.
The guard turns the repacking off (and undoes any that already happened). The weights stay 4-bit: nothing is copied
or dequantised. CUDA is not affected.

Python API::

    from trl import get_peft_config
    from trl_qtuning import QTuningConfig, QTuningSFTTrainer
    from trl_qtuning.quantization import plan_quantization, prepare_quantized_model, qlora_model_config
    from trl_qtuning.tracking import attach_tracking

    model_args = qlora_model_config("meta-llama/Llama-3.1-8B")          # NF4, double quant, bf16 compute, LoRA r 8
    args = QTuningConfig(output_dir="out", bf16=True, gradient_checkpointing=True, optim="paged_adamw_8bit",
                         model_init_kwargs={"dtype": model_args.dtype})
    plan = plan_quantization(model_args, args)                        # clear errors; fallback="lora" to opt in
    trainer = QTuningSFTTrainer(model=model_args.model_name_or_path, args=args, train_dataset=dataset,
                                quantization_config=plan.quantization_config, peft_config=get_peft_config(model_args))
    prepare_quantized_model(trainer.model, plan)                       # before trainer.train()
    attach_tracking(trainer, tags=plan.tags)                           # with report_to=["mlflow"]: a fallback's tags
    trainer.train()
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from trl import ModelConfig

__all__ = [
    "FALLBACK_CHOICES",
    "FALLBACK_TAG",
    "FALLBACK_TAG_VALUE",
    "BitsAndBytesUnavailable",
    "ModelNotQuantizable",
    "ModelReport",
    "QuantizedModelConfig",
    "QuantizationError",
    "QuantizationPlan",
    "check_bitsandbytes",
    "check_quantizable",
    "count_quantized_layers",
    "inspect_model",
    "keep_4bit_trainable_on_cpu",
    "plan_quantization",
    "prepare_quantized_model",
    "qlora_model_config",
]

logger = logging.getLogger(__name__)

FALLBACK_CHOICES = ("none", "lora")
FALLBACK_TAG = "qtuning.quantization_fallback"
FALLBACK_TAG_VALUE = "plain_lora"
OPTIMIZER_FALLBACK_TAG = "qtuning.optimizer_fallback"
LARGE_CPU_MODEL_PARAMS = 1_000_000_000
INSTALL_HINT = "pip install 'trl-qtuning[quantization]' (or: pip install -U bitsandbytes)"
INSTALL_DOCS = "https://huggingface.co/docs/bitsandbytes/main/en/installation"
FALLBACK_HINT = "or pass --quantization_fallback lora to train plain LoRA without 4-bit weights (recorded in the run)"


class QuantizationError(RuntimeError):
    """Quantised training cannot run as asked. ``code`` is the CLI exit code (2: arguments, 1: environment/model)."""

    code = 1
    fallback_allowed = True


class QuantizationConfigError(QuantizationError):
    """The arguments ask for something that cannot work (e.g. 4-bit without LoRA): fix the recipe."""

    code = 2
    fallback_allowed = False


class BitsAndBytesUnavailable(QuantizationError):
    """bitsandbytes is not installed, fails to import, or has no backend for the training device."""


class ModelNotQuantizable(QuantizationError):
    """The model has no layers bitsandbytes can quantise, or is already quantised with another method."""


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class QuantizedModelConfig(ModelConfig):
    """``trl.ModelConfig`` plus ``quantization_fallback`` (what to do when 4-/8-bit loading cannot run)."""

    quantization_fallback: str = field(
        default="none",
        metadata={
            "help": "What to do when `load_in_4bit`/`load_in_8bit` cannot run (bitsandbytes missing or without a "
            "backend for the device, or a model bitsandbytes cannot quantise): 'none' (default) stops with an error "
            "that says why; 'lora' trains plain LoRA on unquantised weights instead, with a warning and the MLflow "
            f"tag {FALLBACK_TAG}={FALLBACK_TAG_VALUE}.",
            "choices": list(FALLBACK_CHOICES),
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.quantization_fallback not in FALLBACK_CHOICES:
            raise ValueError(
                f"quantization_fallback must be one of {', '.join(map(repr, FALLBACK_CHOICES))}, "
                f"got {self.quantization_fallback!r}"
            )


def qlora_model_config(model_name_or_path: str | None = None, **overrides: Any) -> QuantizedModelConfig:
    """A :class:`QuantizedModelConfig` with the QLoRA settings of the recipes (and the paper's LoRA).

    NF4 4-bit weights with double quantisation and bf16 compute, LoRA rank 8, alpha 16, dropout 0, on all linear
    layers. Feed it to ``trl.get_quantization_config`` / ``trl.get_peft_config`` or :func:`plan_quantization`.
    """
    values: dict[str, Any] = dict(
        model_name_or_path=model_name_or_path,
        dtype="bfloat16",
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        use_bnb_nested_quant=True,
        use_peft=True,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        lora_target_modules=["all-linear"],
    )
    values.update(overrides)
    return QuantizedModelConfig(**values)


# ----------------------------------------------------------------------------------------------------------------------
# bitsandbytes
# ----------------------------------------------------------------------------------------------------------------------


def _import_bitsandbytes():
    import bitsandbytes

    return bitsandbytes


def _loaded_bitsandbytes():
    """bitsandbytes if it is already imported (a model with bitsandbytes layers implies it is), else ``None``."""
    import sys

    module = sys.modules.get("bitsandbytes")
    return module if module is not None and hasattr(module, "nn") else None


def _device_name(device: Any) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        try:
            index = device.index if device.index is not None else torch.cuda.current_device()
            return f"{device} ({torch.cuda.get_device_name(index)})"
        except Exception:  # pragma: no cover - depends on the machine
            return str(device)
    return str(device)


def check_bitsandbytes(device: Any, mode: str = "4-bit") -> str:
    """Return bitsandbytes' version if it can quantise on ``device``; raise :class:`BitsAndBytesUnavailable` if not.

    Runs the real kernel once on a 64-element tensor (a few microseconds), so "installed but no backend for this
    device" is caught here instead of deep inside model loading.
    """
    import torch

    flag = "load_in_4bit" if mode == "4-bit" else "load_in_8bit"
    device = torch.device(device)
    try:
        bnb = _import_bitsandbytes()
    except Exception as exc:  # ImportError, or a broken install (missing native library...)
        reason = "is not installed" if isinstance(exc, ImportError) else "fails to import"
        raise BitsAndBytesUnavailable(
            f"{flag} needs bitsandbytes, which {reason} ({type(exc).__name__}: {' '.join(str(exc).split())}). "
            f"Fix: {INSTALL_HINT}; {FALLBACK_HINT}."
        ) from exc
    version = getattr(bnb, "__version__", "unknown")
    supported = getattr(bnb, "supported_torch_devices", None)
    name = _device_name(device)
    if supported is not None and device.type not in supported:
        raise BitsAndBytesUnavailable(
            f"bitsandbytes {version} has no backend for the training device {name} (it supports: "
            f"{', '.join(sorted(supported)) or 'none'}). Fix: install a bitsandbytes build for {device.type} "
            f"({INSTALL_HINT}; see {INSTALL_DOCS}), train on a device it supports, {FALLBACK_HINT}."
        )
    try:
        probe = torch.linspace(-1.0, 1.0, 64, device=device, dtype=torch.float32)
        if mode == "4-bit":
            packed, state = bnb.functional.quantize_4bit(probe, quant_type="nf4")
            bnb.functional.dequantize_4bit(packed, state)
        else:
            bnb.functional.int8_vectorwise_quant(probe.reshape(2, 32))
    except Exception as exc:  # NotImplementedError "Could not run 'bitsandbytes::...' with ... 'CPU' backend", etc.
        raise BitsAndBytesUnavailable(
            f"bitsandbytes {version} has no working {mode} backend for the training device {name} "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}). Fix: install a bitsandbytes build with "
            f"{device.type} support ({INSTALL_HINT}; see {INSTALL_DOCS}), train on a device it supports, "
            f"{FALLBACK_HINT}."
        ) from exc
    return version


# ----------------------------------------------------------------------------------------------------------------------
# The model, read from its config on the meta device
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelReport:
    """What bitsandbytes would quantise in a model, counted on the meta device (no weights loaded)."""

    name: str
    model_type: str
    architecture: str
    total_params: int
    quantizable_params: int
    """Weights of the ``nn.Linear``/``Conv1D`` layers bitsandbytes replaces (all but the LM head and fp32 modules)."""
    quantizable_layers: int
    existing_quantization: str | None = None
    """``quant_method`` of a checkpoint that is already quantised (``None`` if it is not)."""

    @property
    def quantizable_share(self) -> float:
        return self.quantizable_params / self.total_params if self.total_params else 0.0


def _architecture(config: Any, trust_remote_code: bool):
    import transformers
    from transformers import AutoModelForCausalLM

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls, name
    return AutoModelForCausalLM, "AutoModelForCausalLM"


def _skipped_modules(model: Any) -> list[str]:
    """Modules transformers keeps in full precision when it quantises (LM head, tied and fp32 modules)."""
    skip: list[str] = []
    try:
        from transformers.quantizers.base import get_keys_to_not_convert

        skip.extend(get_keys_to_not_convert(model))
    except Exception:  # internal API moved: at least keep the output embeddings out
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        skip.extend(name for name, module in model.named_modules() if output is not None and module is output)
    skip.extend(getattr(model, "_keep_in_fp32_modules", None) or [])
    return skip


def _should_convert(name: str, skip: list[str]) -> bool:
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module

        return should_convert_module(name, skip)
    except Exception:
        return not any(name == key or name.startswith(key + ".") or name.endswith(key) for key in skip)


def model_report_from_config(config: Any, name: str = "", *, trust_remote_code: bool = False) -> ModelReport:
    """Build the model on the meta device from ``config`` and count what bitsandbytes would quantise."""
    import torch
    from transformers.pytorch_utils import Conv1D

    cls, arch = _architecture(config, trust_remote_code)
    with torch.device("meta"):
        if hasattr(cls, "from_config"):
            model = cls.from_config(config, trust_remote_code=trust_remote_code)
        else:
            model = cls._from_config(config)
    skip = _skipped_modules(model)
    total = sum(p.numel() for p in model.parameters())
    quantizable = layers = 0
    for module_name, module in model.named_modules():
        if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and _should_convert(module_name, skip):
            quantizable += module.weight.numel()
            layers += 1
    existing = getattr(config, "quantization_config", None)
    if existing is not None:
        existing = (
            existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method", None)
        )
        existing = str(getattr(existing, "value", existing)) if existing is not None else "unknown"
    return ModelReport(
        name=name or getattr(config, "_name_or_path", "") or arch,
        model_type=getattr(config, "model_type", "unknown"),
        architecture=arch if arch != "AutoModelForCausalLM" else type(model).__name__,
        total_params=total,
        quantizable_params=quantizable,
        quantizable_layers=layers,
        existing_quantization=existing,
    )


def inspect_model(
    model_name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False
) -> ModelReport | None:
    """:func:`model_report_from_config` for a local folder or Hub id; ``None`` when its config cannot be read here.

    (E.g. a Hub id while offline and not cached: then loading reports its own error later.)
    """
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:
        logger.debug(
            "Cannot read the config of %s before loading (%s); skipping the pre-check.", model_name_or_path, exc
        )
        return None
    try:
        return model_report_from_config(config, model_name_or_path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # a model that cannot be built on the meta device: let loading decide
        logger.debug("Cannot build %s on the meta device (%s); skipping the pre-check.", model_name_or_path, exc)
        return None


def check_quantizable(report: ModelReport, mode: str = "4-bit") -> None:
    """Raise :class:`ModelNotQuantizable` if bitsandbytes cannot quantise this model; warn if it quantises little."""
    flag = "load_in_4bit" if mode == "4-bit" else "load_in_8bit"
    existing = report.existing_quantization
    if existing is not None and not existing.startswith("bitsandbytes"):
        raise ModelNotQuantizable(
            f"{flag} asked for model {report.name!r} (model type {report.model_type!r}), but its checkpoint is already "
            f"quantised with {existing!r}, which bitsandbytes cannot re-quantise. Fix: use the unquantised checkpoint, "
            f"or drop {flag} (and train LoRA on the {existing} weights if PEFT supports them), {FALLBACK_HINT}."
        )
    if report.quantizable_layers == 0:
        raise ModelNotQuantizable(
            f"{flag} asked for model {report.name!r}, but model type {report.model_type!r} "
            f"({report.architecture}) has no nn.Linear/Conv1D layers that bitsandbytes can quantise "
            f"(only its LM head or fp32 modules), so it cannot be trained in {mode}. Fix: drop {flag}, "
            f"{FALLBACK_HINT}."
        )
    if report.quantizable_share < 0.5:
        logger.warning(
            "%s: only %.0f%% of the %s parameters of %s (model type %r) are in layers bitsandbytes quantises; the rest "
            "(e.g. embeddings, fused MoE experts) stays in full precision, so the memory saving will be small.",
            flag, 100 * report.quantizable_share, f"{report.total_params:,}", report.name, report.model_type,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Plan (before the trainer) and checks (after it)
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class QuantizationPlan:
    """What :func:`plan_quantization` decided. Pass ``quantization_config`` to the trainer."""

    quantization_config: Any = None
    mode: str | None = None
    """"4-bit", "8-bit", or ``None`` (no quantisation, including after a fallback)."""
    requested_mode: str | None = None
    device: str = "cpu"
    bitsandbytes_version: str | None = None
    report: ModelReport | None = None
    fallback_reason: str | None = None
    """Set when the run falls back to plain LoRA: why."""
    tags: dict[str, str] = field(default_factory=dict)
    """MLflow run tags recording a fallback (``attach_tracking(trainer, tags=plan.tags)``)."""

    @property
    def fell_back(self) -> bool:
        return self.fallback_reason is not None

    def describe(self) -> str:
        """One line for the end-of-run summary."""
        if self.fell_back:
            return (
                f"Quantisation fallback: trained plain LoRA on unquantised weights instead of {self.requested_mode} "
                f"({FALLBACK_TAG}={FALLBACK_TAG_VALUE}); reason: {self.fallback_reason}"
            )
        if self.mode is None:
            return "Base weights not quantised."
        detail = ""
        config = self.quantization_config
        if self.mode == "4-bit" and config is not None:
            nested = ", double quantisation" if config.bnb_4bit_use_double_quant else ""
            compute = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(
                str(config.bnb_4bit_compute_dtype).removeprefix("torch."), str(config.bnb_4bit_compute_dtype)
            )
            detail = f" ({config.bnb_4bit_quant_type.upper()}{nested}, {compute} compute)"
        return f"Base weights: {self.mode}{detail} with bitsandbytes {self.bitsandbytes_version} on {self.device}."


def _optimizer_name(training_args: Any) -> str:
    optim = getattr(training_args, "optim", "")
    return str(getattr(optim, "value", optim))


def _uses_bitsandbytes_optimizer(name: str) -> bool:
    return "bnb" in name or "8bit" in name or name.startswith("paged_")


def plan_quantization(model_args: Any, training_args: Any, fallback: str | None = None) -> QuantizationPlan:
    """Check that the quantised training ``model_args`` asks for can run, before any weight is loaded.

    ``fallback`` defaults to ``model_args.quantization_fallback`` (``"none"``). With ``"lora"``, a missing or unusable
    bitsandbytes, or a model it cannot quantise, makes the run train plain LoRA instead: a warning says so, the tag
    ``qtuning.quantization_fallback=plain_lora`` goes in ``plan.tags``, ``model_args.load_in_4bit/8bit`` are
    turned off (so the saved arguments tell the truth) and, if bitsandbytes itself is unusable, a bitsandbytes
    optimizer (``paged_adamw_8bit``...) becomes ``adamw_torch`` (tag ``qtuning.optimizer_fallback``).
    """
    import torch
    from trl import get_quantization_config

    fallback = fallback or getattr(model_args, "quantization_fallback", "none") or "none"
    if fallback not in FALLBACK_CHOICES:
        raise QuantizationConfigError(
            f"quantization_fallback must be one of {', '.join(map(repr, FALLBACK_CHOICES))}, got {fallback!r}"
        )
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return QuantizationPlan()
    device = torch.device(getattr(training_args, "device", "cpu"))  # sets up the (distributed) state, as Trainer does
    mode = "4-bit" if model_args.load_in_4bit else "8-bit"
    flag = "load_in_4bit" if model_args.load_in_4bit else "load_in_8bit"
    if not model_args.use_peft:
        raise QuantizationConfigError(
            f"{flag} needs LoRA adapters: quantised weights cannot be trained directly. Set use_peft: true "
            f"(QLoRA), or drop {flag} to train the full model."
        )
    if model_args.load_in_4bit and model_args.bnb_4bit_quant_type not in ("nf4", "fp4"):
        raise QuantizationConfigError(
            f"bnb_4bit_quant_type must be 'nf4' or 'fp4', got {model_args.bnb_4bit_quant_type!r}"
        )
    plan = QuantizationPlan(requested_mode=mode, device=str(device))
    name = model_args.model_name_or_path
    try:
        plan.bitsandbytes_version = check_bitsandbytes(device, mode)
        if name:
            plan.report = inspect_model(
                name,
                revision=getattr(model_args, "model_revision", None),
                trust_remote_code=bool(getattr(training_args, "trust_remote_code", False)),
            )
        if plan.report is not None:
            check_quantizable(plan.report, mode)
    except QuantizationError as exc:
        if fallback != "lora":
            raise
        return _fall_back(plan, exc, model_args, training_args)

    plan.mode = mode
    plan.quantization_config = get_quantization_config(model_args)
    if device.type == "cpu":
        if plan.report is not None and plan.report.total_params > LARGE_CPU_MODEL_PARAMS:
            logger.warning(
                "Training %s (%.1fB parameters) in %s on the CPU: bitsandbytes' CPU backend works but is very slow "
                "(expect minutes per step). Use a GPU for real runs; on CPU, use a model under 1B parameters.",
                name, plan.report.total_params / 1e9, mode,
            )  # fmt: skip
        optim = _optimizer_name(training_args)
        if optim.startswith("paged_"):
            logger.warning(
                "optim=%s: paged optimizer states need CUDA; on the CPU bitsandbytes keeps the same 8-bit states "
                "unpaged (same update, no paging).", optim,
            )  # fmt: skip
    return plan


def _fall_back(plan: QuantizationPlan, exc: QuantizationError, model_args: Any, training_args: Any) -> QuantizationPlan:
    reason = " ".join(str(exc).split()).split(" Fix: ")[0]  # the why, without the fixes (the fallback is one)
    plan.fallback_reason = reason
    plan.tags[FALLBACK_TAG] = FALLBACK_TAG_VALUE
    logger.warning(
        "quantization_fallback=lora: training PLAIN LoRA on unquantised %s weights instead of %s, because: %s "
        "Expect the memory of the unquantised model. Recorded as the MLflow tag %s=%s.",
        getattr(model_args, "dtype", None) or "float32", plan.requested_mode, reason, FALLBACK_TAG, FALLBACK_TAG_VALUE,
    )  # fmt: skip
    optim = _optimizer_name(training_args)
    if isinstance(exc, BitsAndBytesUnavailable) and _uses_bitsandbytes_optimizer(optim):
        from transformers.training_args import OptimizerNames

        training_args.optim = OptimizerNames.ADAMW_TORCH
        plan.tags[OPTIMIZER_FALLBACK_TAG] = "adamw_torch"
        logger.warning(
            "quantization_fallback=lora: optim=%s needs bitsandbytes too; using adamw_torch instead "
            "(recorded as the MLflow tag %s=adamw_torch).", optim, OPTIMIZER_FALLBACK_TAG,
        )  # fmt: skip
    model_args.load_in_4bit = False
    model_args.load_in_8bit = False
    return plan


def count_quantized_layers(model: Any) -> dict[str, int]:
    """Number of bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` layers in ``model`` (0 if bitsandbytes is absent)."""
    counts = {"4-bit": 0, "8-bit": 0}
    bnb = _loaded_bitsandbytes()  # never imported here: a model with bitsandbytes layers has imported it already
    if bnb is None:
        return counts
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            counts["4-bit"] += 1
        elif isinstance(module, bnb.nn.Linear8bitLt):
            counts["8-bit"] += 1
    return counts


def keep_4bit_trainable_on_cpu(model: Any) -> int:
    """Stop bitsandbytes' CPU backend from repacking 4-bit weights into its inference-only layout; undo it if done.

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` in eval mode without gradients (Q-Tuning's scoring pass, or an
    evaluation) converts the weight in place to a layout that ``matmul_4bit`` then always routes to ``gemv_4bit``,
    which has no autograd formula: gradients stop at every 4-bit layer, so LoRA adapters upstream of one get zero
    gradients, silently. Setting ``support_avx512bf16_for_cpu = False`` on each layer keeps the trainable path. No
    weight is copied or dequantised. A layer already repacked (an evaluation before this call) is converted back; that
    round trip is bitsandbytes' and keeps the block scales only in bf16, so call this before any eval forward (the CLI
    does, right after building the trainer). Returns the number of 4-bit layers seen. A no-op on CUDA.
    """
    bnb = _loaded_bitsandbytes()  # cheap enough to call on any model: no import, one pass over the modules
    if bnb is None:
        return 0
    seen = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        seen += 1
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            if hasattr(module, "quant_state"):
                module.quant_state = weight.quant_state
    return seen


def prepare_quantized_model(model: Any, plan: QuantizationPlan | None = None) -> dict[str, int]:
    """After the trainer is built: check the model is quantised as planned, and make 4-bit layers trainable on CPU.

    Raises :class:`ModelNotQuantizable` if 4-/8-bit was planned but no bitsandbytes layer is in the model (training
    it would silently be full precision). Returns :func:`count_quantized_layers`.
    """
    counts = count_quantized_layers(model)
    if plan is not None and plan.mode is not None and counts[plan.mode] == 0:
        raise ModelNotQuantizable(
            f"{plan.mode} loading was asked for, but the loaded model has no bitsandbytes {plan.mode} layer "
            f"(model type {getattr(getattr(model, 'config', None), 'model_type', 'unknown')!r}): it would train in "
            f"full precision. Fix: drop load_in_4bit/load_in_8bit for this model, {FALLBACK_HINT}."
        )
    if counts["4-bit"]:
        keep_4bit_trainable_on_cpu(model)
    return counts
