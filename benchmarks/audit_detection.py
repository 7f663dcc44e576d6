"""How well ``trl-qtuning audit`` finds injected noise, before training and with a trained checkpoint.

    python benchmarks/audit_detection.py --data ../shared/data/gsm8k/train.jsonl --rows 512 --noise answers \
        --share 0.3 --seed 0 --train_steps 16 --output_dir audit-detection

    python benchmarks/audit_detection.py --matrix recipes/bench/study_gsm8k_fill_numbers30.yaml --output_dir DIR

Picks ``--rows`` GSM8K rows the bench's way (ranked by ``sha256(seed:train:uid)``), corrupts a seeded ``--share`` of
them with the bench's own corruption (``answers``: swapped answers, ``corrupt_answers``; ``numbers``: a carried
arithmetic slip, ``corrupt_numbers``), or with ``--matrix`` takes a bench matrix's own training rows and corrupted
rows (``data.train``), and audits them with the demo model (or ``--model``), then,
with ``--train_steps``, fine-tunes a LoRA (r 8, alpha 16, all linear layers, lr 2e-4: the study's) on the same noisy
rows with plain SFT and audits again with the trained adapter. Prints and writes (``detection.json``) AUROC and
precision in the top 10% of every candidate score for each model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def noisy_rows(data: str, rows: int, noise: str, share: float, seed: int):
    """The bench's training rows with the bench's corruption: (dataset, corrupted row ids)."""
    from trl_qtuning.bench import data as bench_data

    pool = bench_data.load_pool("gsm8k_jsonl", {}, path=data, size=rows, seed=seed, where="--data")
    train = bench_data._first(pool, rows, seed, "train")
    corrupt = bench_data.corrupt_answers if noise == "answers" else bench_data.corrupt_numbers
    train, corrupted = corrupt(train, share, seed)
    return train.select_columns(["prompt", "completion"]), list(corrupted)


def matrix_rows(path: str):
    """A bench matrix's training rows as its cells train on them, and its corrupted row ids."""
    from trl_qtuning.bench.data import prepare_data
    from trl_qtuning.bench.matrix import load_matrix

    data = prepare_data(load_matrix(path, check_inputs=False))
    return data["train"], list(data["corrupted_ids"]), data["noise_type"] or "none"


def train_lora(dataset, model_name: str, steps: int, batch: int, max_length: int, out: Path, seed: int) -> Path:
    """A short plain-SFT LoRA run on the noisy rows; returns the adapter folder."""
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from trl_qtuning.audit import load_audit_model

    model, tokenizer, _ = load_audit_model(model_name)
    args = SFTConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=2e-4,
        lr_scheduler_type="constant", max_length=max_length, bf16=False, use_cpu=not torch.cuda.is_available(),
        report_to="none", save_strategy="no", logging_steps=max(1, steps // 4), seed=seed, disable_tqdm=True,
    )  # fmt: skip
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    trainer.train()
    trainer.save_model(str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/gsm8k/train.jsonl"))
    parser.add_argument("--model", default="demo")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--noise", choices=["answers", "numbers"], default="answers")
    parser.add_argument("--share", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--train_steps", type=int, default=0, help="0: audit the untrained model only.")
    parser.add_argument("--train_batch", type=int, default=8)
    parser.add_argument("--adapter", default=None, help="Also audit with this trained adapter (instead of training).")
    parser.add_argument("--matrix", default=None, help="Audit this bench matrix's own (noisy) training rows instead.")
    parser.add_argument("--output_dir", default="audit-detection")
    args = parser.parse_args(argv)

    from trl_qtuning.audit import audit_dataset

    out = Path(args.output_dir)
    if args.matrix:
        dataset, corrupted, noise = matrix_rows(args.matrix)
    else:
        dataset, corrupted = noisy_rows(args.data, args.rows, args.noise, args.share, args.seed)
        noise = args.noise
    print(f"{len(dataset)} rows, {len(corrupted)} corrupted ({noise})", flush=True)
    results = {"command": " ".join(["python", *sys.argv]), "rows": len(dataset), "corrupted": len(corrupted),
               "noise": noise, "share": len(corrupted) / len(dataset), "seed": args.seed, "matrix": args.matrix,
               "audits": {}}  # fmt: skip
    models = [("untrained", args.model)]
    if args.adapter:
        models.append((f"adapter {args.adapter}", args.adapter))
    for name, model in models:
        start = time.perf_counter()
        result = audit_dataset(model, dataset, output_dir=out / f"audit-{name}", noisy_rows=corrupted,
                               max_length=args.max_length, batch_size=args.batch_size)  # fmt: skip
        results["audits"][name] = {"model": result.summary["model"], "seconds": time.perf_counter() - start,
                                   "detection": result.summary["detection"],
                                   "noisy_by_quadrant": result.summary["noisy_by_quadrant"]}  # fmt: skip
        if args.train_steps and name == "untrained":
            start = time.perf_counter()
            adapter = train_lora(dataset, args.model, args.train_steps, args.train_batch, args.max_length,
                                 out / "lora", args.seed)  # fmt: skip
            results["training"] = {"steps": args.train_steps, "batch": args.train_batch, "lr": 2e-4,
                                   "seconds": time.perf_counter() - start}  # fmt: skip
            models.append((f"lora-{args.train_steps}-steps", str(adapter)))
    (out / "detection.json").write_text(json.dumps(results, indent=2) + "\n")
    for name, audit in results["audits"].items():
        print(f"\n{name} ({audit['model']}):")
        print(f"  {'score':<13} {'AUROC':>6} {'prec@10%':>9} {'base':>6}")
        for row in audit["detection"]:
            print(f"  {row['score']:<13} {row['auroc']:6.3f} {row['precision_top10']:9.3f} {row['base_rate']:6.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
