"""End-of-training outputs: ``qtuning_summary.json``, ``qtuning_report.md``, the pruned-dataset selection (Parquet),
the HTML page of token-pruned samples and the training figures, written and queued for MLflow by
:func:`write_run_outputs`."""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..ledger import LEDGER_DIRNAME, SHARD_GLOB
from ..vocabulary import DECISIONS, QUADRANT_KEYS
from .outputs import REPORT_FILE, SELECTION_DIR, SUMMARY_FILE, TRACKING_DIR
from .recorder import DecisionAccumulator, step_budgets

__all__ = [
    "build_summary", "write_summary", "summary_markdown", "write_selection", "load_selection", "kept_sample_ids",
    "samples_html", "queue_ledger", "write_run_outputs",
]  # fmt: skip

logger = logging.getLogger("trl_qtuning.tracking")

SELECTION_FILE = "selection.parquet"


def build_summary(
    acc: DecisionAccumulator,
    *,
    config: dict[str, Any] | None = None,
    train_metrics: dict[str, float] | None = None,
    top_dropped: int = 10,
) -> dict[str, Any]:
    steps = acc.per_step()
    total = {name: int(value) for name, value in steps.drop(columns="scoring_seconds").sum().items()}
    samples, kept = total["samples"], total["kept_samples"]
    response, label_tokens = total["response_tokens"], total["label_tokens"]
    timed = steps["scoring_seconds"].dropna()
    scoring = float(timed.sum()) if len(timed) else None
    train_metrics = dict(train_metrics or {})
    runtime = train_metrics.get("train_runtime")
    per_sample = acc.per_sample().groupby("sample_id")[["times_seen", "times_dropped"]].sum().reset_index()
    ranked = per_sample[per_sample["times_dropped"] > 0].sort_values(
        ["times_dropped", "times_seen", "sample_id"], ascending=[False, False, True]
    )
    most_dropped = [
        {"sample_id": int(sid), "dropped": int(d), "seen": int(n), "dropped_share": d / n if n else None}
        for sid, n, d in ranked.head(top_dropped).itertuples(index=False)
    ]
    config = dict(config or {})
    budgets = step_budgets(total)
    return {
        "method": config.get("method", "qtuning"),
        "config": config,
        "steps": len(steps),
        "first_step": int(steps.index[0]) if len(steps) else None,
        "last_step": int(steps.index[-1]) if len(steps) else None,
        "samples_scored": samples,
        "distinct_samples": len(per_sample),
        "quadrants": {
            name: {"count": total[name], "share": total[name] / samples if samples else None} for name in QUADRANT_KEYS
        },
        "decisions": {name: total[name] for name in DECISIONS},
        "realised": {
            **{name: budgets[name] for name in ("sample_keep_ratio", "token_keep_ratio", "label_token_share")},
            "samples_trained": kept,
            "label_tokens_trained": label_tokens,
            "response_tokens_scored": response,
        },
        "scoring": {
            "total_seconds": scoring,
            "mean_seconds_per_step": scoring / len(timed) if len(timed) else None,
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


def _table(header: str, rows: Iterable[Sequence[Any]]) -> list[str]:
    """A Markdown table: ``header`` as written, its rule, one line per row."""
    return [header, "|" + "---|" * header.count(" |"), *(f"| {' | '.join(map(str, row))} |" for row in rows)]


def summary_markdown(summary: dict[str, Any]) -> str:
    cfg, real, sc = summary.get("config", {}), summary["realised"], summary["scoring"]
    budgets = [
        ("sample keep ratio", _fmt(real["sample_keep_ratio"])),
        ("token keep ratio (token-pruned Q2 samples)", _fmt(real["token_keep_ratio"])),
        ("label tokens trained / response tokens scored", _fmt(real["label_token_share"])),
        ("samples trained", real["samples_trained"]), ("label tokens trained", real["label_tokens_trained"]),
    ]  # fmt: skip
    lines = [
        "# Q-Tuning run summary",
        "",
        f"- method: **{summary['method']}**; budgets: sample_keep_ratio = {_fmt(cfg.get('sample_keep_ratio'))}, "
        f"token_keep_ratio = {_fmt(cfg.get('token_keep_ratio'))}",
        f"- optimizer steps with decisions: {summary['steps']} (steps {summary['first_step']}..{summary['last_step']}); "
        f"samples scored: {summary['samples_scored']} ({summary['distinct_samples']} distinct)",
        f"- final train loss: {_fmt(summary['train'].get('train_loss'), 4)}; "
        f"train runtime: {_fmt(summary['train'].get('train_runtime'), 1)} s",
        "", "## Realised budgets", "", *_table("| | value |", budgets),
        "", "## Quadrants (before pruning)", "",
        *_table("| quadrant | samples | share |",
                [(name, entry["count"], _fmt(entry["share"])) for name, entry in summary["quadrants"].items()]),
        "", "## Decisions", "", *_table("| decision | samples |", summary["decisions"].items()),
        "", "## Scoring overhead", "",
        f"- scoring forwards: {_fmt(sc['total_seconds'], 2)} s in total, {_fmt(sc['mean_seconds_per_step'], 3)} s per "
        f"step, {_fmt(sc['share_of_train_runtime'])} of the train runtime",
        "", "## Most-dropped samples", "",
        *_table("| sample_id | dropped | seen |",
                [(d["sample_id"], d["dropped"], d["seen"]) for d in summary["most_dropped"]]),
    ]  # fmt: skip
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
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / SELECTION_FILE
    acc.per_sample().to_parquet(path, index=False)
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
    import pandas as pd

    path = Path(path)
    selection = pd.read_parquet(path / SELECTION_FILE if path.is_dir() else path)
    if epoch is not None:
        selection = selection[selection["epoch"] == epoch]
    return sorted(int(sid) for sid in selection.loc[selection["kept"], "sample_id"].unique())


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


# ---------------------------------------------------------------------- the end of a tracked run
def queue_ledger(sink: Any, output_dir: Path, uploaded: dict[str, tuple[int, int]]) -> None:
    """Queue the ledger shards written or grown since the last call (``uploaded``: path -> (size, mtime))."""
    for shard in sorted((output_dir / LEDGER_DIRNAME).glob(SHARD_GLOB)):
        stat = shard.stat()
        if uploaded.get(str(shard)) != (stat.st_size, stat.st_mtime_ns):
            uploaded[str(shard)] = (stat.st_size, stat.st_mtime_ns)
            sink.log_artifact(shard, LEDGER_DIRNAME)


def write_run_outputs(
    sink: Any,
    output_dir: Path,
    decisions: DecisionAccumulator,
    *,
    args: Any,
    train_metrics: dict[str, float],
    token_pruned: list[dict[str, Any]],
    dataset: Any,
    tokenizer: Any,
    uploaded: dict[str, tuple[int, int]],
) -> None:
    """Write the run's figures, summary, report, selection and samples page, and queue them with the last ledger
    shards in ``sink``. ``decisions``: what this process saw; the ledger, where there is one, covers the steps of
    earlier processes of a resumed run. One output that fails is logged and the others are still written."""
    ledger_dir = output_dir / LEDGER_DIRNAME
    on_disk = ledger_dir.is_dir() and any(ledger_dir.glob(SHARD_GLOB))
    run = DecisionAccumulator.from_ledger(ledger_dir, live=decisions) if on_disk else decisions
    for part in (
        lambda: _training_figures(sink, output_dir, run, args) if not decisions.empty else None,
        lambda: _summary_and_selection(sink, output_dir, run, args, train_metrics)
        if not decisions.empty or ledger_dir.is_dir() else None,  # plain SFT has no decisions to summarise
        lambda: _samples_page(sink, output_dir, token_pruned, dataset, tokenizer)
        if token_pruned or not decisions.empty else None,
        lambda: queue_ledger(sink, output_dir, uploaded),
    ):
        try:
            part()
        except Exception as exc:
            logger.warning("Q-Tuning MLflow tracking: an end-of-training output failed (%s: %s).", type(exc).__name__, exc)


def _training_figures(sink: Any, output_dir: Path, run: DecisionAccumulator, args: Any) -> None:
    from .figures import budgets_figure, matplotlib_available, quadrant_shares_figure, save_figure

    if not matplotlib_available():
        return
    steps, figures = run.per_step(), output_dir / TRACKING_DIR / "figures"
    targets = getattr(args, "sample_keep_ratio", None), getattr(args, "token_keep_ratio", None)
    sink.log_artifact(save_figure(quadrant_shares_figure(steps), figures / "quadrant_shares.png"), "figures")
    sink.log_artifact(save_figure(budgets_figure(steps, *targets), figures / "realised_budgets.png"), "figures")


def _summary_and_selection(
    sink: Any, output_dir: Path, run: DecisionAccumulator, args: Any, train_metrics: dict[str, float]
) -> None:
    from ..config import METHOD_FIELDS, run_label

    config = {"method": run_label(args)}
    for name in ("sample_keep_ratio", "token_keep_ratio", *METHOD_FIELDS, "qtuning_ledger"):
        if hasattr(args, name):
            config[name] = getattr(args, name)
    summary = build_summary(run, config=config, train_metrics=train_metrics)
    for path in write_summary(summary, output_dir):
        sink.log_artifact(path, None)
    sink.log_artifact(write_selection(run, output_dir / SELECTION_DIR).parent, SELECTION_DIR)
    real = summary["realised"]
    final = {f"qtuning/final/{key}": real[key] for key in
             ("sample_keep_ratio", "token_keep_ratio", "label_token_share", "samples_trained", "label_tokens_trained")}
    final["qtuning/final/scoring_seconds"] = summary["scoring"]["total_seconds"]
    finite = {k: float(v) for k, v in final.items() if v is not None and math.isfinite(v)}
    sink.log_metrics(finite, step=summary["last_step"] or 0)


def _samples_page(sink: Any, output_dir: Path, token_pruned: list[dict[str, Any]], dataset: Any, tokenizer: Any) -> None:
    """The most recent token-pruned samples, read back from ``dataset`` by their sample id."""
    from ..step.collator import SAMPLE_ID_COLUMN

    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap a tokenizer
    if tokenizer is None or dataset is None:
        return
    samples = []
    if token_pruned and SAMPLE_ID_COLUMN in getattr(dataset, "column_names", []):
        row_of = {int(sid): i for i, sid in enumerate(dataset[SAMPLE_ID_COLUMN])}
        for candidate in reversed(token_pruned):
            if candidate["sample_id"] not in row_of:
                continue
            example = dataset[row_of[candidate["sample_id"]]]
            ids = list(example["input_ids"])
            if "labels" in example:
                response = [label != -100 for label in example["labels"]]
            else:
                mask = example.get("completion_mask", example.get("assistant_masks"))
                response = [bool(m) for m in mask] if mask is not None else [True] * len(ids)
            samples.append({**candidate, "input_ids": ids, "response": response})
    path = output_dir / TRACKING_DIR / "qtuning_samples.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(samples_html(samples, tokenizer), encoding="utf-8")
    sink.log_artifact(path, None)
