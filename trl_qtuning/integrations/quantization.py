"""QLoRA for Q-Tuning: 4-bit loading checks with clear errors, an opt-in plain-LoRA fallback, and a CPU guard.

TRL does the loading: ``trl.get_quantization_config(model_args)`` builds the ``BitsAndBytesConfig`` and
``SFTTrainer`` loads the model with it. This module adds what TRL leaves to the user:

- :func:`plan_quantization` (before the trainer) checks that bitsandbytes has a backend for the training device and
  that the model has layers it can quantise (counted on the meta device). A problem is a :class:`QuantizationError`
  naming the fix, unless ``fallback="lora"``: then the run trains plain LoRA, warns, and records
  ``qtuning.quantization_fallback=plain_lora`` in ``plan.tags`` (``attach_tracking(trainer, tags=plan.tags)``).
- :func:`prepare_quantized_model` (after the trainer) refuses a model that did not quantise and applies
  :func:`keep_4bit_trainable_on_cpu`.

Why the CPU guard: bitsandbytes' CPU backend (0.4x-0.50, AVX512-BF16) repacks a ``Linear4bit`` weight in place into an
inference-only layout on an eval no-grad forward, which is exactly Q-Tuning's scoring pass. After it no gradient
crosses a 4-bit layer, so every LoRA adapter upstream silently gets zero. CUDA is not affected.

Python API::

    model_args = qlora_model_config("meta-llama/Llama-3.1-8B")          # NF4, double quant, bf16 compute, LoRA r 8
    args = QTuningConfig(output_dir="out", bf16=True, optim="paged_adamw_8bit", model_init_kwargs={"dtype": "bfloat16"})
    plan = plan_quantization(model_args, args)
    trainer = QTuningSFTTrainer(model=model_args.model_name_or_path, args=args, train_dataset=dataset,
                                quantization_config=plan.quantization_config, peft_config=get_peft_config(model_args))
    prepare_quantized_model(trainer.model, plan)                       # before trainer.train()
    attach_tracking(trainer, tags=plan.tags)
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Any

from trl import ModelConfig

from ..errors import one_line

__all__ = [
    "FALLBACK_CHOICES",
    "FALLBACK_TAG",
    "FALLBACK_TAG_VALUE",
    "BitsAndBytesUnavailable",
    "ModelNotQuantizable",
    "ModelReport",
    "QuantizationError",
    "QuantizationPlan",
    "QuantizedModelConfig",
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


class QuantizationConfigError(QuantizationError, ValueError):
    """The arguments ask for something that cannot work (e.g. 4-bit without LoRA): fix the recipe."""

    code = 2


class BitsAndBytesUnavailable(QuantizationError):
    """bitsandbytes is not installed, fails to import, or has no backend for the training device."""


class ModelNotQuantizable(QuantizationError):
    """The model has no layers bitsandbytes can quantise, or is already quantised with another method."""


def _check_fallback(value: str) -> str:
    if value not in FALLBACK_CHOICES:
        raise QuantizationConfigError(f"quantization_fallback must be one of {FALLBACK_CHOICES}, got {value!r}")
    return value


@dataclass
class QuantizedModelConfig(ModelConfig):
    """``trl.ModelConfig`` plus ``quantization_fallback`` (what to do when 4-/8-bit loading cannot run)."""

    quantization_fallback: str = field(
        default="none",
        metadata={
            "help": "When `load_in_4bit`/`load_in_8bit` cannot run (no usable bitsandbytes, or a model it cannot "
            "quantise): 'none' stops with an error that says why; 'lora' trains plain LoRA on unquantised weights, "
            f"with a warning and the MLflow tag {FALLBACK_TAG}={FALLBACK_TAG_VALUE}.",
            "choices": list(FALLBACK_CHOICES),
        },
    )

    def __post_init__(self):
        super().__post_init__()
        _check_fallback(self.quantization_fallback)


def qlora_model_config(model_name_or_path: str | None = None, **overrides: Any) -> QuantizedModelConfig:
    """The recipes' QLoRA: NF4 with double quantisation, bf16 compute, LoRA r 8 / alpha 16 / dropout 0, all linear."""
    return QuantizedModelConfig(**{
        "model_name_or_path": model_name_or_path, "dtype": "bfloat16", "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4", "use_bnb_nested_quant": True, "use_peft": True, "lora_r": 8, "lora_alpha": 16,
        "lora_dropout": 0.0, "lora_target_modules": ["all-linear"], **overrides,
    })  # fmt: skip


def _import_bitsandbytes():
    import bitsandbytes

    return bitsandbytes


def _loaded_bitsandbytes():
    """bitsandbytes if it is already imported (a model with bitsandbytes layers implies it is), else ``None``."""
    module = sys.modules.get("bitsandbytes")
    return module if module is not None and hasattr(module, "nn") else None


def check_bitsandbytes(device: Any, mode: str = "4-bit") -> str:
    """bitsandbytes' version if it can quantise on ``device``, else :class:`BitsAndBytesUnavailable`.

    Runs the real kernel once on 64 values, so "installed but no backend for this device" is caught before loading.
    """
    import torch

    device = torch.device(device)
    try:
        bnb = _import_bitsandbytes()
    except Exception as exc:  # ImportError, or a broken install (missing native library...)
        reason = "is not installed" if isinstance(exc, ImportError) else "fails to import"
        raise BitsAndBytesUnavailable(
            f"load_in_{mode[0]}bit needs bitsandbytes, which {reason} ({type(exc).__name__}: "
            f"{one_line(exc)}). Fix: {INSTALL_HINT}; {FALLBACK_HINT}."
        ) from exc
    version = getattr(bnb, "__version__", "unknown")
    name = str(device)
    if device.type == "cuda":
        try:
            name += f" ({torch.cuda.get_device_name(device)})"
        except Exception:  # pragma: no cover - depends on the machine
            pass
    fix = (f"Fix: install a bitsandbytes build for {device.type} ({INSTALL_HINT}; see {INSTALL_DOCS}), train on a "
           f"device it supports, {FALLBACK_HINT}.")  # fmt: skip
    supported = getattr(bnb, "supported_torch_devices", None)
    if supported is not None and device.type not in supported:
        raise BitsAndBytesUnavailable(
            f"bitsandbytes {version} has no backend for the training device {name} (it supports: "
            f"{', '.join(sorted(supported)) or 'none'}). {fix}"
        )
    try:
        probe = torch.linspace(-1.0, 1.0, 64, device=device, dtype=torch.float32)
        if mode == "4-bit":
            bnb.functional.dequantize_4bit(*bnb.functional.quantize_4bit(probe, quant_type="nf4"))
        else:
            bnb.functional.int8_vectorwise_quant(probe.reshape(2, 32))
    except Exception as exc:  # NotImplementedError "Could not run 'bitsandbytes::...' with ... 'CPU' backend", etc.
        raise BitsAndBytesUnavailable(
            f"bitsandbytes {version} has no working {mode} backend for the training device {name} "
            f"({type(exc).__name__}: {one_line(exc)[:300]}). {fix}"
        ) from exc
    return version


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
    """``quant_method`` of a checkpoint that is already quantised."""

    @property
    def quantizable_share(self) -> float:
        return self.quantizable_params / self.total_params if self.total_params else 0.0


def model_report_from_config(config: Any, name: str = "", *, trust_remote_code: bool = False) -> ModelReport:
    """Build the model on the meta device from ``config`` and count what bitsandbytes would quantise, skipping what
    transformers keeps in full precision (LM head, tied and ``_keep_in_fp32_modules``)."""
    import torch
    import transformers
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    archs = [getattr(transformers, a) for a in getattr(config, "architectures", None) or [] if hasattr(transformers, a)]
    cls = archs[0] if archs else transformers.AutoModelForCausalLM
    with torch.device("meta"):
        if hasattr(cls, "from_config"):
            model = cls.from_config(config, trust_remote_code=trust_remote_code)
        else:
            model = cls._from_config(config)
    skip = [*get_keys_to_not_convert(model), *(getattr(model, "_keep_in_fp32_modules", None) or [])]
    linears = [
        module for module_name, module in model.named_modules()
        if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and should_convert_module(module_name, skip)
    ]  # fmt: skip
    existing = getattr(config, "quantization_config", None)
    if existing is not None:
        existing = (
            existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method", None)
        )
        existing = str(getattr(existing, "value", existing)) if existing is not None else "unknown"
    return ModelReport(
        name=name or getattr(config, "_name_or_path", "") or type(model).__name__,
        model_type=getattr(config, "model_type", "unknown"),
        architecture=type(model).__name__,
        total_params=sum(p.numel() for p in model.parameters()),
        quantizable_params=sum(module.weight.numel() for module in linears),
        quantizable_layers=len(linears),
        existing_quantization=existing,
    )


def inspect_model(
    model_name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False
) -> ModelReport | None:
    """:func:`model_report_from_config` for a folder or Hub id; ``None`` when the config cannot be read or built here
    (e.g. offline and not cached): loading then reports its own error."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_name_or_path, revision=revision, trust_remote_code=trust_remote_code)
        return model_report_from_config(config, model_name_or_path, trust_remote_code=trust_remote_code)
    except ImportError as exc:  # transformers moved the helpers the pre-check counts with: worth knowing
        logger.warning("Cannot count %s's quantisable layers before loading (%s); skipping the pre-check.",
                       model_name_or_path, exc)  # fmt: skip
        return None
    except Exception as exc:  # no config to read (a Hub id offline...): loading will say what is wrong
        logger.debug("Cannot inspect %s before loading (%s); skipping the pre-check.", model_name_or_path, exc)
        return None


def check_quantizable(report: ModelReport, mode: str = "4-bit") -> None:
    """Raise :class:`ModelNotQuantizable` if bitsandbytes cannot quantise this model; warn if it quantises little."""
    flag = f"load_in_{mode[0]}bit"
    existing = report.existing_quantization
    if existing is not None and not existing.startswith("bitsandbytes"):
        raise ModelNotQuantizable(
            f"{flag} asked for model {report.name!r} (model type {report.model_type!r}), but its checkpoint is already "
            f"quantised with {existing!r}, which bitsandbytes cannot re-quantise. Fix: use the unquantised checkpoint, "
            f"or drop {flag} (and train LoRA on the {existing} weights if PEFT supports them), {FALLBACK_HINT}."
        )
    if report.quantizable_layers == 0:
        raise ModelNotQuantizable(
            f"{flag} asked for model {report.name!r}, but model type {report.model_type!r} ({report.architecture}) "
            f"has no nn.Linear/Conv1D layers that bitsandbytes can quantise. Fix: drop {flag}, {FALLBACK_HINT}."
        )
    if report.quantizable_share < 0.5:
        logger.warning(
            "%s: only %.0f%% of the %s parameters of %s (model type %r) are in layers bitsandbytes quantises; the rest "
            "(e.g. embeddings, fused MoE experts) stays in full precision, so the memory saving will be small.",
            flag, 100 * report.quantizable_share, f"{report.total_params:,}", report.name, report.model_type,
        )  # fmt: skip


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
            dtype = str(config.bnb_4bit_compute_dtype).removeprefix("torch.")
            compute = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)
            detail = f" ({config.bnb_4bit_quant_type.upper()}{nested}, {compute} compute)"
        return f"Base weights: {self.mode}{detail} with bitsandbytes {self.bitsandbytes_version} on {self.device}."


def plan_quantization(model_args: Any, training_args: Any, fallback: str | None = None) -> QuantizationPlan:
    """Check that the quantised training ``model_args`` asks for can run, before any weight is loaded.

    ``fallback`` defaults to ``model_args.quantization_fallback``. With ``"lora"``, an unusable bitsandbytes or a model
    it cannot quantise makes the run train plain LoRA: a warning, the tag in ``plan.tags``, ``load_in_4bit/8bit``
    turned off (so the saved arguments tell the truth) and, when bitsandbytes itself is unusable, a bitsandbytes
    optimizer replaced by ``adamw_torch`` (tag ``qtuning.optimizer_fallback``).
    """
    import torch
    from transformers.training_args import OptimizerNames
    from trl import get_quantization_config

    fallback = _check_fallback(fallback or getattr(model_args, "quantization_fallback", "none") or "none")
    if not (model_args.load_in_4bit or model_args.load_in_8bit):
        return QuantizationPlan()
    device = torch.device(getattr(training_args, "device", "cpu"))  # sets up the (distributed) state, as Trainer does
    mode = "4-bit" if model_args.load_in_4bit else "8-bit"
    flag = f"load_in_{mode[0]}bit"
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
    optim = getattr(training_args, "optim", "")
    optim = str(getattr(optim, "value", optim))
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
        plan.fallback_reason = one_line(exc).split(" Fix: ")[0]  # the why; the fallback is the fix
        plan.tags[FALLBACK_TAG] = FALLBACK_TAG_VALUE
        logger.warning(
            "quantization_fallback=lora: training PLAIN LoRA on unquantised %s weights instead of %s, because: %s "
            "Expect the memory of the unquantised model. Recorded as the MLflow tag %s=%s.",
            getattr(model_args, "dtype", None) or "float32", mode, plan.fallback_reason, FALLBACK_TAG,
            FALLBACK_TAG_VALUE,
        )  # fmt: skip
        bnb_optim = "bnb" in optim or "8bit" in optim or optim.startswith("paged_")
        if isinstance(exc, BitsAndBytesUnavailable) and bnb_optim:
            training_args.optim = OptimizerNames.ADAMW_TORCH
            plan.tags[OPTIMIZER_FALLBACK_TAG] = "adamw_torch"
            logger.warning(
                "quantization_fallback=lora: optim=%s needs bitsandbytes too; using adamw_torch instead "
                "(recorded as the MLflow tag %s=adamw_torch).", optim, OPTIMIZER_FALLBACK_TAG,
            )  # fmt: skip
        model_args.load_in_4bit = model_args.load_in_8bit = False
        return plan

    plan.mode = mode
    plan.quantization_config = get_quantization_config(model_args)
    if device.type == "cpu":
        if plan.report is not None and plan.report.total_params > LARGE_CPU_MODEL_PARAMS:
            logger.warning(
                "Training %s (%.1fB parameters) in %s on the CPU: bitsandbytes' CPU backend works but is very slow "
                "(expect minutes per step). Use a GPU for real runs; on CPU, use a model under 1B parameters.",
                name, plan.report.total_params / 1e9, mode,
            )  # fmt: skip
        if optim.startswith("paged_"):
            logger.warning(
                "optim=%s: paged optimizer states need CUDA; on the CPU bitsandbytes keeps the same 8-bit states "
                "unpaged (same update, no paging).", optim,
            )  # fmt: skip
    return plan


def count_quantized_layers(model: Any) -> dict[str, int]:
    """Number of bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` layers in ``model`` (0 if bitsandbytes is absent)."""
    bnb = _loaded_bitsandbytes()  # never imported here: a model with bitsandbytes layers has imported it already
    modules = list(model.modules()) if bnb is not None else []
    return {"4-bit": sum(isinstance(m, bnb.nn.Linear4bit) for m in modules),
            "8-bit": sum(isinstance(m, bnb.nn.Linear8bitLt) for m in modules)}  # fmt: skip


def keep_4bit_trainable_on_cpu(model: Any) -> int:
    """Stop bitsandbytes' CPU backend from repacking 4-bit weights into its inference-only layout; undo it if done.

    A repacked weight sends ``matmul_4bit`` to ``gemv_4bit``, which has no autograd formula: gradients stop at every
    4-bit layer. ``support_avx512bf16_for_cpu = False`` keeps the trainable path; nothing is copied or dequantised.
    Undoing a repacking keeps the block scales only in bf16 (bitsandbytes' round trip), so call this before any eval
    forward. Returns the number of 4-bit layers seen; a no-op on CUDA.
    """
    bnb = _loaded_bitsandbytes()
    if bnb is None:
        return 0
    layers = [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]
    for module in layers:
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            if hasattr(module, "quant_state"):
                module.quant_state = weight.quant_state
    return len(layers)


def prepare_quantized_model(model: Any, plan: QuantizationPlan | None = None) -> dict[str, int]:
    """After the trainer is built: refuse a model that did not quantise as planned (:class:`ModelNotQuantizable`: it
    would silently train in full precision) and make 4-bit layers trainable on CPU. Returns the layer counts."""
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
