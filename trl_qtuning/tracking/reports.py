"""End-of-training outputs: ``qtuning_summary.json``, ``qtuning_report.md``, the pruned-dataset selection (Parquet)
and the HTML page of token-pruned samples."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .outputs import REPORT_FILE, SUMMARY_FILE
from ..vocabulary import DECISIONS, QUADRANT_KEYS
from ..step_metrics import realised_budgets
from .recorder import DecisionAccumulator

__all__ = [
    "build_summary",
    "write_summary",
    "summary_markdown",
    "write_selection",
    "load_selection",
    "kept_sample_ids",
    "samples_html",
]

SELECTION_FILE = "selection.parquet"


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def build_summary(
    acc: DecisionAccumulator,
    *,
    config: dict[str, Any] | None = None,
    train_metrics: dict[str, float] | None = None,
    top_dropped: int = 10,
) -> dict[str, Any]:
    steps = acc.ordered_steps()
    samples = sum(s.samples for s in steps)
    quadrants = {name: sum(s.quadrants.get(name, 0) for s in steps) for name in QUADRANT_KEYS}
    decisions = {name: sum(s.decisions.get(name, 0) for s in steps) for name in DECISIONS}
    kept = sum(s.kept_samples for s in steps)
    response = sum(s.response_tokens for s in steps)
    label_tokens = sum(s.label_tokens for s in steps)
    tp_response = sum(s.token_pruned_response for s in steps)
    tp_kept = sum(s.token_pruned_kept for s in steps)
    timed = [s.scoring_seconds for s in steps if s.scoring_seconds is not None]
    scoring = float(sum(timed)) if timed else None
    train_metrics = dict(train_metrics or {})
    runtime = train_metrics.get("train_runtime")
    per_sample: dict[int, list[int]] = {}
    for (_, sid), counts in acc.per_sample.items():
        total = per_sample.setdefault(sid, [0, 0])
        total[0] += counts[0]
        total[1] += counts[3]
    ranked = sorted(per_sample.items(), key=lambda item: (-item[1][1], -item[1][0], item[0]))
    most_dropped = [
        {"sample_id": sid, "dropped": d, "seen": n, "dropped_share": d / n if n else None}
        for sid, (n, d) in ranked[:top_dropped]
        if d > 0
    ]
    config = dict(config or {})
    budgets = realised_budgets(
        {"samples": samples, "kept": kept, "pruned_response": tp_response, "pruned_kept": tp_kept,
         "response_tokens": response, "kept_tokens": label_tokens}
    )  # fmt: skip
    return {
        "method": config.get("method", "qtuning"),
        "config": config,
        "steps": len(steps),
        "first_step": steps[0].step if steps else None,
        "last_step": steps[-1].step if steps else None,
        "samples_scored": samples,
        "distinct_samples": len(per_sample),
        "quadrants": {name: {"count": c, "share": _ratio(c, samples)} for name, c in quadrants.items()},
        "decisions": decisions,
        "realised": {
            **{name: budgets[name] for name in ("sample_keep_ratio", "token_keep_ratio", "label_token_share")},
            "samples_trained": kept,
            "label_tokens_trained": label_tokens,
            "response_tokens_scored": response,
        },
        "scoring": {
            "total_seconds": scoring,
            "mean_seconds_per_step": scoring / len(timed) if timed else None,
            "share_of_train_runtime": scoring / runtime if scoring is not None and runtime else None,
            "steps_timed": len(timed),
        },
        "train": train_metrics,
        "most_dropped": most_dropped,
    }


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_markdown(summary: dict[str, Any]) -> str:
    cfg = summary.get("config", {})
    real = summary["realised"]
    lines = [
        "# Q-Tuning run summary",
        "",
        f"- method: **{summary['method']}**; budgets: sample_keep_ratio = {_fmt(cfg.get('sample_keep_ratio'))}, "
        f"token_keep_ratio = {_fmt(cfg.get('token_keep_ratio'))}",
        f"- optimizer steps with decisions: {summary['steps']} (steps {summary['first_step']}..{summary['last_step']}); "
        f"samples scored: {summary['samples_scored']} ({summary['distinct_samples']} distinct)",
        f"- final train loss: {_fmt(summary['train'].get('train_loss'), 4)}; "
        f"train runtime: {_fmt(summary['train'].get('train_runtime'), 1)} s",
        "",
        "## Realised budgets",
        "",
        "| | value |",
        "|---|---|",
        f"| sample keep ratio | {_fmt(real['sample_keep_ratio'])} |",
        f"| token keep ratio (token-pruned Q2 samples) | {_fmt(real['token_keep_ratio'])} |",
        f"| label tokens trained / response tokens scored | {_fmt(real['label_token_share'])} |",
        f"| samples trained | {real['samples_trained']} |",
        f"| label tokens trained | {real['label_tokens_trained']} |",
        "",
        "## Quadrants (before pruning)",
        "",
        "| quadrant | samples | share |",
        "|---|---|---|",
    ]
    for name, entry in summary["quadrants"].items():
        lines.append(f"| {name} | {entry['count']} | {_fmt(entry['share'])} |")
    lines += ["", "## Decisions", "", "| decision | samples |", "|---|---|"]
    lines += [f"| {name} | {count} |" for name, count in summary["decisions"].items()]
    sc = summary["scoring"]
    lines += [
        "",
        "## Scoring overhead",
        "",
        f"- scoring forwards: {_fmt(sc['total_seconds'], 2)} s in total, {_fmt(sc['mean_seconds_per_step'], 3)} s per "
        f"step, {_fmt(sc['share_of_train_runtime'])} of the train runtime",
        "",
        "## Most-dropped samples",
        "",
        "| sample_id | dropped | seen |",
        "|---|---|---|",
    ]
    lines += [f"| {d['sample_id']} | {d['dropped']} | {d['seen']} |" for d in summary["most_dropped"]]
    return "\n".join(lines) + "\n"


def write_summary(summary: dict[str, Any], output_dir: str | Path) -> tuple[Path, Path]:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / SUMMARY_FILE
    md_path = output_dir / REPORT_FILE
    json_path.write_text(json.dumps(summary, indent=2, default=str))
    md_path.write_text(summary_markdown(summary))
    return json_path, md_path


# ---------------------------------------------------------------------- pruned-dataset selection
def write_selection(acc: DecisionAccumulator, directory: str | Path) -> Path:
    """One row per (epoch, sample): how often it was scored, trained on (``kept``), token-pruned, dropped."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    keys = sorted(acc.per_sample)
    counts = [acc.per_sample[k] for k in keys]
    table = pa.table(
        {
            "epoch": pa.array([k[0] for k in keys], pa.int32()),
            "sample_id": pa.array([k[1] for k in keys], pa.int64()),
            "times_seen": pa.array([c[0] for c in counts], pa.int32()),
            "times_kept": pa.array([c[1] for c in counts], pa.int32()),
            "times_token_pruned": pa.array([c[2] for c in counts], pa.int32()),
            "times_dropped": pa.array([c[3] for c in counts], pa.int32()),
            "kept": pa.array([c[1] > 0 for c in counts], pa.bool_()),
        }
    )
    path = directory / SELECTION_FILE
    pq.write_table(table, path)
    return path


def load_selection(path: str | Path):
    """The selection as a ``datasets.Dataset`` (a folder or the ``selection.parquet`` file)."""
    from datasets import Dataset

    path = Path(path)
    if path.is_dir():
        path = path / SELECTION_FILE
    return Dataset.from_parquet(str(path))


def kept_sample_ids(path: str | Path, epoch: int | None = None) -> list[int]:
    """Ids (rows of the original ``train_dataset``) trained on at least once (in ``epoch``, or in any epoch)."""
    import pyarrow.parquet as pq

    path = Path(path)
    table = pq.read_table(path / SELECTION_FILE if path.is_dir() else path).to_pydict()
    ids = {
        sid
        for e, sid, kept in zip(table["epoch"], table["sample_id"], table["kept"])
        if kept and (epoch is None or e == epoch)
    }
    return sorted(ids)


# ---------------------------------------------------------------------- token-pruned samples page
_CSS = """
body { font-family: -apple-system, Segoe UI, Helvetica, Arial, sans-serif; margin: 1.5em; color: #222; }
.sample { border: 1px solid #ddd; border-radius: 6px; padding: 0.8em 1em; margin-bottom: 1.2em; }
.meta { color: #555; font-size: 0.9em; margin-bottom: 0.5em; }
.tokens { font-family: ui-monospace, Menlo, Consolas, monospace; line-height: 1.9; white-space: pre-wrap; }
.tok { padding: 1px 2px; border-radius: 3px; }
.prompt { color: #777; }
.kept { background: #e3f2e1; }
.pruned { background: #f8c9c4; text-decoration: line-through; color: #a11; }
.legend span { margin-right: 1em; }
"""


def samples_html(samples: Sequence[dict[str, Any]], tokenizer, *, title: str = "Q-Tuning: token-pruned samples") -> str:
    """Self-contained page (inline CSS, no scripts) for MLflow's artifact viewer.

    ``samples``: dicts with ``sample_id``, ``step``, ``input_ids``, ``response`` (one bool per token: has a label),
    ``pruned_positions`` (offsets in ``input_ids`` whose label was masked), optional ``ppl`` and ``entropy``.
    """
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p class='legend'><span class='tok prompt'>prompt / context</span>"
        "<span class='tok kept'>answer token trained on</span>"
        "<span class='tok pruned'>answer token pruned (label masked, still in the input)</span></p>",
    ]
    if not samples:
        parts.append("<p>No token-pruned sample was recorded.</p>")
    for sample in samples:
        ids = list(sample["input_ids"])
        response = list(sample.get("response") or [False] * len(ids))
        pruned = {int(p) for p in sample["pruned_positions"]}
        tokens = tokenizer.convert_ids_to_tokens(ids)
        spans = []
        for pos, (tok_id, token) in enumerate(zip(ids, tokens)):
            text = tokenizer.convert_tokens_to_string([token]) if token is not None else str(tok_id)
            cls = "pruned" if pos in pruned else ("kept" if response[pos] else "prompt")
            spans.append(f"<span class='tok {cls}' title='position {pos}'>{html.escape(text)}</span>")
        n_resp = sum(bool(r) for r in response)
        meta = (
            f"sample_id {sample['sample_id']}, step {sample['step']}: {len(pruned)} of {n_resp} answer tokens pruned"
        )
        if sample.get("ppl") is not None:
            meta += f"; PPL {sample['ppl']:.3g}, entropy {sample['entropy']:.3g}"
        parts.append(
            f"<div class='sample'><div class='meta'>{html.escape(meta)}</div><div class='tokens'>{' '.join(spans)}</div></div>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)
