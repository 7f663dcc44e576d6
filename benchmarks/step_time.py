"""Step time of QTuningSFTTrainer relative to plain SFTTrainer, measured in the same run.

    python benchmarks/step_time.py                 # CPU: a small random Llama, a few minutes
    python benchmarks/step_time.py --model PATH    # any local causal LM (CUDA is used when available)

For each regime (LoRA without gradient checkpointing; full fine-tuning) and each setting (pruning off; scoring on
but keeping everything; sample keep ratio 0.5 / 0.25 / 0.125 with token ratio 0.5), short runs of SFTTrainer and
QTuningSFTTrainer alternate (A B A B ...) on the same model, data and seed. It prints the median step-time ratio,
the scoring pass's share of a Q-Tuning step, the peak-memory ratio of one step (CUDA: max_memory_allocated; CPU:
the profiler's allocation events over one extra, untimed step), and the floor of the regime:
(1 + 2r) / 2 for LoRA (backward ~ one forward), (1 + 3r) / 3 for full fine-tuning (backward ~ two forwards).
It then compares one scoring forward with one training forward of the same rows, and the triage decisions of fp32
and bf16 scoring.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PrinterCallback, TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from trl_qtuning import QTuningConfig, QTuningSFTTrainer  # noqa: E402
from trl_qtuning.core import eu_plane_stats, triage_samples  # noqa: E402
from trl_qtuning.testing import make_tiny_tokenizer  # noqa: E402

SETTINGS = {"off": None, "r=1": 1.0, "r=0.5": 0.5, "r=0.25": 0.25, "r=0.125": 0.125}


class StepClock(TrainerCallback):
    """Wall time between consecutive optimizer steps (fetch + scoring + training), synchronised on CUDA."""

    def __init__(self):
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._sync()
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()


class CpuStepMemory(TrainerCallback):
    """Peak memory of one optimizer step on CPU, from the profiler's allocation events.

    CPU has no ``max_memory_allocated``; the profiler reports every tensor allocation and free of the step, so the
    step's peak is what was resident when it began (parameters, buffers, optimizer state, leftover gradients) plus
    the highest running sum of its allocations. The profiled step is the last one and is left out of the timing.
    """

    def __init__(self, profiled_step: int):
        self.profiled_step = profiled_step
        self.peak_bytes = float("nan")
        self._profiler = None
        self._resident = 0

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        from torch.profiler import ProfilerActivity, profile

        if state.global_step == self.profiled_step - 1:
            self._resident = _resident_bytes(model, optimizer)
            self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profiler.__enter__()
        elif state.global_step == self.profiled_step and self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            events = [e for e in self._profiler.profiler.kineto_results.events() if e.name() == "[memory]"]
            running = highest = 0
            for event in sorted(events, key=lambda e: e.start_ns()):
                if event.device_type().name == "CPU":
                    running += event.nbytes()
                    highest = max(highest, running)
            self.peak_bytes = self._resident + highest
            self._profiler = None


def _resident_bytes(model: torch.nn.Module, optimizer) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    tensors.update({id(p.grad): p.grad for p in model.parameters() if p.grad is not None})
    if optimizer is not None:
        for state in optimizer.state.values():
            tensors.update({id(v): v for v in state.values() if torch.is_tensor(v)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Local model folder (default: a random Llama built in code).")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="per-device micro-batch")
    parser.add_argument("--grad-acc", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="measured steps per run (after one warm-up step)")
    parser.add_argument("--repeats", type=int, default=2, help="A/B pairs per setting")
    parser.add_argument("--regimes", default="lora,full")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--output", default=None, help="Also write the table as Markdown to this file.")
    parser.add_argument(
        "--scaling", action="store_true",
        help="Instead of the A/B table: time the scoring forward and a training forward over a sweep of sequence "
        "lengths (--scaling-seq) and vocabulary sizes (--scaling-vocab).",
    )
    parser.add_argument("--scaling-seq", default="128,256,512,1024")
    parser.add_argument("--scaling-vocab", default="8192,32768,65536")
    return parser


def make_model(args, vocab: int):
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64), num_key_value_heads=max(1, args.hidden // 128),
        max_position_embeddings=args.seq_len * 2, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def make_dataset(args, vocab: int, n: int) -> Dataset:
    """Pre-tokenized rows of varied length; the last 40-70% of each row is the trainable completion."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        length = int(torch.randint(args.seq_len // 2, args.seq_len + 1, (1,), generator=generator))
        ids = torch.randint(10, vocab, (length,), generator=generator).tolist()
        prompt = int(length * float(torch.empty(1).uniform_(0.3, 0.6, generator=generator)))
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return Dataset.from_list(rows)


def run_once(
    args, tokenizer, dataset, variant: str, regime: str, ratio: float | None, seed: int, measure_memory: bool
) -> dict[str, float]:
    """One short training run of ``variant`` ("sft": plain SFTTrainer; "qtuning": QTuningSFTTrainer, pruning off
    when ``ratio`` is None)."""
    cuda = torch.cuda.is_available()
    gc.collect()  # the previous run's trainer and model, freed now rather than during this run's steps
    if cuda:
        torch.cuda.empty_cache()
    common = dict(
        output_dir=str(Path(args.workdir) / f"{regime}-{ratio}"), per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.grad_acc, max_steps=args.steps + 2, learning_rate=1e-4, report_to="none",
        save_strategy="no", logging_steps=1, gradient_checkpointing=False, bf16=cuda, use_cpu=not cuda, seed=seed,
        disable_tqdm=True, dataloader_num_workers=0, max_length=None,
    )
    peft_config = None
    if regime == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = make_model(args, len(tokenizer) if args.model else args.vocab)
    clock = StepClock()
    memory = CpuStepMemory(profiled_step=args.steps + 2)
    callbacks = [clock, memory] if measure_memory and not cuda else [clock]
    if variant == "sft":
        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=callbacks)
    else:
        config = QTuningConfig(**common, qtuning_enabled=ratio is not None, sample_keep_ratio=ratio or 1.0,
                               token_keep_ratio=1.0 if ratio in (None, 1.0) else 0.5, qtuning_ledger="none")
        trainer = QTuningSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                    peft_config=peft_config, callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # keep the output to the table
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    scoring = [h["qtuning/scoring_seconds"] for h in trainer.state.log_history if "qtuning/scoring_seconds" in h]
    measured = clock.times[1:-1]  # not the warm-up step, not the step profiled for memory
    return {
        "step": statistics.median(measured),
        "scoring": statistics.median(scoring[1:-1]) if len(scoring) > 2 else 0.0,
        "peak": torch.cuda.max_memory_allocated() / 2**30 if cuda else memory.peak_bytes / 2**30,  # nan: not measured
    }


def _highest(values: list[float]) -> float:
    """The largest measured value (runs that did not measure give NaN)."""
    measured = [v for v in values if v == v]
    return max(measured) if measured else float("nan")


def floor(regime: str, ratio: float | None) -> float:
    if ratio is None:
        return 1.0
    return (1 + 2 * ratio) / 2 if regime == "lora" else (1 + 3 * ratio) / 3


def scoring_vs_training_forward(args, tokenizer, dataset) -> tuple[float, float]:
    """Seconds of one scoring forward and of one training forward (+ no backward) on the same micro-batch."""
    config = QTuningConfig(output_dir=str(Path(args.workdir) / "fwd"), per_device_train_batch_size=args.batch,
                           report_to="none", use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(),
                           gradient_checkpointing=False, max_length=None, qtuning_ledger="none")
    trainer = QTuningSFTTrainer(model=make_model(args, len(tokenizer) if args.model else args.vocab), args=config,
                                train_dataset=dataset, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    batch.pop("qtuning_sample_id", None)
    trainer.model.train()

    def timed(fn) -> float:
        fn()
        StepClock._sync()
        start = time.perf_counter()
        for _ in range(3):
            fn()
        StepClock._sync()
        return (time.perf_counter() - start) / 3

    score = timed(lambda: trainer._score(dict(batch), None))

    def train_forward():
        with trainer.compute_loss_context_manager():
            trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=None)

    return score, timed(train_forward)


def precision_agreement(args, tokenizer, dataset, batches: int = 6) -> tuple[float, float]:
    """Share of identical keep decisions and quadrants between fp32 and bf16-autocast scoring."""
    model = make_model(args, len(tokenizer) if args.model else args.vocab).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    keep_same = quadrant_same = total = 0
    group = args.batch * args.grad_acc
    rows = dataset.select(range(min(batches, len(dataset) // group) * group))
    for start in range(0, len(rows), group):
        part = rows.select(range(start, start + group))
        width = max(len(r) for r in part["input_ids"])
        ids = torch.tensor([r + [0] * (width - len(r)) for r in part["input_ids"]], device=device)
        labels = torch.tensor([r + [-100] * (width - len(r)) for r in part["labels"]], device=device)
        mask = (torch.arange(width, device=device)[None] < torch.tensor([len(r) for r in part["input_ids"]], device=device)[:, None]).long()
        decisions = []
        for dtype in (None, torch.bfloat16):
            ctx = torch.autocast(device, dtype=dtype) if dtype else torch.autocast(device, enabled=False)
            with torch.no_grad(), ctx:
                logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1)
            token_logps = logp.gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
            entropy = -(logp.exp() * logp).sum(-1)
            ppl, ent = eu_plane_stats(token_logps, entropy, labels[:, 1:] != -100)
            decisions.append(triage_samples(ppl.cpu(), ent.cpu(), 0.25))
        keep_same += int((decisions[0].keep == decisions[1].keep).sum())
        quadrant_same += int((decisions[0].quadrant == decisions[1].quadrant).sum())
        total += group
    return keep_same / total, quadrant_same / total


def scaling_table(args, tokenizer) -> list[str]:
    """Scoring vs training forward time over sequence length (at the default vocabulary) and vocabulary size (at the
    default sequence length): how the scoring pass grows, and whether it stays below a training forward."""
    lines = ["| sweep | seq len | vocab | tokens/micro-batch | scoring fwd ms | training fwd ms | ratio | scoring us/token |",
             "|---|---|---|---|---|---|---|---|"]
    base_seq, base_vocab = args.seq_len, args.vocab
    points = [("seq", int(n), base_vocab) for n in args.scaling_seq.split(",")]
    points += [("vocab", base_seq, int(v)) for v in args.scaling_vocab.split(",") if int(v) != base_vocab]
    for sweep, seq_len, vocab in points:
        args.seq_len, args.vocab = seq_len, vocab
        dataset = make_dataset(args, vocab, args.batch * 2)
        tokens = sum(len(r) for r in dataset.select(range(args.batch))["input_ids"])
        score, train = scoring_vs_training_forward(args, tokenizer, dataset)
        line = (f"| {sweep} | {seq_len} | {vocab} | {tokens} | {score * 1000:.1f} | {train * 1000:.1f} | "
                f"{score / train:.2f} | {score * 1e6 / tokens:.1f} |")
        lines.append(line)
        print(line, flush=True)
    args.seq_len, args.vocab = base_seq, base_vocab
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = [name for name in args.settings.split(",") if name not in SETTINGS]
    unknown += [name for name in args.regimes.split(",") if name not in ("lora", "full")]
    if unknown:
        parser.error(f"unknown --settings/--regimes value(s) {', '.join(unknown)}; settings: {', '.join(SETTINGS)}; "
                     "regimes: lora, full")
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import datasets
    import tempfile

    datasets.disable_progress_bars()
    args.workdir = tempfile.mkdtemp(prefix="qtuning-bench-")
    if args.model:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        vocab = len(tokenizer)
    else:
        tokenizer = make_tiny_tokenizer()  # only its pad/eos ids are used: the data is pre-tokenized
        vocab = args.vocab
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    if args.scaling:
        print(f"device: {device}; random Llama h{args.hidden} L{args.layers}; micro-batch {args.batch}", flush=True)
        lines = scaling_table(args, tokenizer)
        if args.output:
            Path(args.output).write_text("\n".join([f"device: {device}", "", *lines]) + "\n")
        return 0
    step_rows = (args.steps + 2) * args.batch * args.grad_acc
    dataset = make_dataset(args, vocab, step_rows)
    model_name = args.model or f"random Llama h{args.hidden} L{args.layers} V{args.vocab}"
    print(f"device: {device}; model: {model_name}; micro-batch {args.batch} x grad-acc {args.grad_acc}; "
          f"seq <= {args.seq_len}; {args.steps} measured steps x {args.repeats} A/B pairs per setting", flush=True)
    lines = ["| regime | setting | step ratio (median) | floor | scoring share | peak memory ratio |",
             "|---|---|---|---|---|---|"]
    for regime in args.regimes.split(","):
        for name in args.settings.split(","):
            ratio = SETTINGS[name]
            sft_times, q_times, q_scoring, sft_peak, q_peak = [], [], [], [], []
            for repeat in range(args.repeats):
                # A B, then B A: a drift in machine speed over the pair does not favour either side. The profiler
                # (CPU memory) runs in the last pair only; its step is left out of the timing anyway.
                memory = repeat == args.repeats - 1
                order = ("sft", "qtuning") if repeat % 2 == 0 else ("qtuning", "sft")
                results = {}
                for variant in order:
                    setting = None if variant == "sft" or name == "off" else ratio
                    results[variant] = run_once(args, tokenizer, dataset, variant, regime, setting, repeat, memory)
                base, result = results["sft"], results["qtuning"]
                sft_times.append(base["step"])
                q_times.append(result["step"])
                q_scoring.append(result["scoring"])
                sft_peak.append(base["peak"])
                q_peak.append(result["peak"])
            step_ratio = statistics.median(q_times) / statistics.median(sft_times)
            share = statistics.median(q_scoring) / statistics.median(q_times)
            sft_peak, q_peak = _highest(sft_peak), _highest(q_peak)
            peak_ratio = q_peak / sft_peak
            line = (f"| {regime} | {name} | {step_ratio:.3f} | {floor(regime, ratio):.3f} | {share:.2f} | "
                    f"{peak_ratio:.3f} |")
            lines.append(line)
            print(line, f"(SFT step {statistics.median(sft_times):.3f} s, Q-Tuning {statistics.median(q_times):.3f} s; "
                  f"peak {sft_peak:.3f} vs {q_peak:.3f} GiB)", flush=True)
    score, train = scoring_vs_training_forward(args, tokenizer, dataset)
    keep_agree, quadrant_agree = precision_agreement(args, tokenizer, dataset)
    extra = [
        "",
        f"scoring forward {score * 1000:.1f} ms vs training forward {train * 1000:.1f} ms on the same micro-batch "
        f"(ratio {score / train:.2f})",
        f"fp32 vs bf16 scoring: keep decisions agree on {keep_agree:.1%} of samples, quadrants on {quadrant_agree:.1%}",
    ]
    print("\n".join(lines + extra))
    if args.output:
        Path(args.output).write_text("\n".join([f"device: {device}; model: {model_name}", "", *lines, *extra]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
