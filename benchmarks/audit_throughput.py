"""Throughput of ``trl-qtuning audit`` against a plain ``model(...)`` loop over the same rows, in the same run.

    python benchmarks/audit_throughput.py                  # demo model, first 96 rows of the demo's MATH pool
    python benchmarks/audit_throughput.py --rows 256 --batch_size 16 --model PATH --dataset PATH

The plain loop is what one writes without the audit: the rows in dataset order, ``batch_size`` at a time, padded,
one ``model(input_ids, attention_mask)`` with the full ``(batch, seq, vocab)`` logits under ``torch.no_grad()``, then
log-softmax, the label log-probs and the entropy at the answer positions. It gets the rows already tokenized by the
same preparation (its tokenization is not timed); the audit is timed whole (model setup excluded: both share the
loaded model), tokenization, batching and the shard writes included. The two run alternately, ``--repeats`` times
each; the medians are compared, and the two's per-row PPL are checked to agree.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def plain_loop(model, rows: list[dict], batch_size: int, pad_id: int, device) -> list[float]:
    """Per-row PPL from full logits, batches in dataset order."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    ppl: list[float] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            ids = pad_sequence([torch.tensor(r["input_ids"]) for r in batch], batch_first=True, padding_value=pad_id)
            labels = pad_sequence([torch.tensor(r["labels"]) for r in batch], batch_first=True, padding_value=-100)
            mask = pad_sequence([torch.ones(len(r["input_ids"]), dtype=torch.long) for r in batch], batch_first=True)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            target = labels[:, 1:].to(device)
            answer = target != -100
            token_logp = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            entropy = -(logp.exp() * logp).sum(-1)
            count = answer.sum(1).clamp(min=1)
            nll = -(token_logp * answer).sum(1) / count
            _ = (entropy * answer).sum(1) / count
            ppl.extend(torch.exp(nll).tolist())
    return ppl


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--dataset", default="demo")
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from trl_qtuning.audit import audit_dataset, load_audit_dataset, load_audit_model
    from trl_qtuning.audit.api import AuditSettings, prepared_rows

    model, tokenizer, description = load_audit_model(args.model)
    dataset = load_audit_dataset(args.dataset)
    dataset = dataset.select(range(min(args.rows, len(dataset))))
    settings = AuditSettings(max_length=args.max_length, batch_size=args.batch_size)
    rows = prepared_rows(model, tokenizer, dataset, settings)  # the plain loop scores exactly the audit's tokens
    device = next(model.parameters()).device
    tokens = sum(len(r["input_ids"]) for r in rows)
    print(f"{description}, {len(rows)} rows ({tokens} tokens), batch {args.batch_size}, device {device}, "
          f"torch threads {torch.get_num_threads()}", flush=True)  # fmt: skip

    plain_times, audit_times, forward_times = [], [], []
    plain_ppl = audit_ppl = None
    for _ in range(args.repeats):
        start = time.perf_counter()
        plain_ppl = plain_loop(model, rows, args.batch_size, tokenizer.pad_token_id, device)
        plain_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        result = audit_dataset(model, dataset, tokenizer=tokenizer, settings=settings, progress=False)
        audit_times.append(time.perf_counter() - start)
        forward_times.append(result.summary["timing"]["forward_seconds"])
        audit_ppl = result.table.sort_values("audit_row_id")["ppl"].to_numpy()
    gap = float(np.nanmax(np.abs(np.asarray(plain_ppl) / audit_ppl - 1)))
    plain, audit, forward = (statistics.median(t) for t in (plain_times, audit_times, forward_times))
    print(f"plain model(...) loop : {len(rows) / plain:7.2f} rows/s  ({plain:.1f} s; runs {plain_times})")
    print(f"audit, whole call     : {len(rows) / audit:7.2f} rows/s  ({audit:.1f} s; runs {audit_times})")
    print(f"audit, scoring forward: {len(rows) / forward:7.2f} rows/s  ({forward:.1f} s)")
    print(f"ratio audit / plain (rows/s): whole call {plain / audit:.2f}, scoring forward {plain / forward:.2f}")
    print(f"largest relative PPL difference between the two: {gap:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
