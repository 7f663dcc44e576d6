"""``trl-qtuning compare --experiment NAME [--tracking-uri URI]``: one table (and one figure) for an experiment's runs.

Works on runs logged by plain ``SFTTrainer`` too (transformers' MLflowCallback): the method is then ``sft``, the
realised sample keep ratio 1, and the columns that only Q-Tuning logs are ``-``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["main", "collect_rows", "format_table", "comparison_figure"]

COMPARISON_TAG = "qtuning.kind"
"""Tag of the runs ``compare`` logs itself (never compared)."""

EVAL_COUNTERS = ("runtime", "per_second", "num_tokens", "_tokens", "_samples", "_n")
"""Endings of eval metrics that count or time rather than measure (``eval_num_tokens`` is a training counter)."""


def _eval_rank(key: str) -> tuple[int, str]:
    """Loss first (``eval_loss``, then NLLs and other losses), then accuracies and the rest, alphabetical within."""
    name = key.lower()
    if name in ("eval_loss", "eval/loss"):
        return (0, name)
    if name.endswith("loss") or "nll" in name:
        return (1, name)
    if "acc" in name or "em" in name.rsplit("/", 1)[-1]:
        return (2, name)
    return (3, name)


def eval_columns(rows: list[dict[str, Any]], limit: int = 4) -> list[str]:
    """The eval metrics worth a column, by meaning: measures (loss first), never counters or timings."""
    keys = {k for row in rows for k in row["eval"] if not any(k.endswith(c) for c in EVAL_COUNTERS)}
    return sorted(keys, key=_eval_rank)[:limit]


def _eval_loss(row: dict[str, Any]) -> float | None:
    """The held-out loss of a run: ``eval_loss`` (Trainer) or ``eval/nll`` (the bench), when it has one."""
    return next((row["eval"][k] for k in ("eval_loss", "eval/nll") if row["eval"].get(k) is not None), None)


def _first(runs: pd.DataFrame, *columns: str) -> pd.Series:
    """Per run, the value of the first of ``columns`` it has (NaN where it has none)."""
    return runs.reindex(columns=list(columns)).bfill(axis=1).iloc[:, 0]


def collect_rows(experiment_id: str, max_runs: int = 200) -> list[dict[str, Any]]:
    """The ``max_runs`` newest runs of the current tracking store (comparison runs excluded), oldest first."""
    import mlflow
    import pandas as pd

    runs = mlflow.search_runs([experiment_id], max_results=max_runs, order_by=["attributes.start_time DESC"])
    if runs.empty:
        return []
    runs = runs.iloc[::-1]
    runs = runs[_first(runs, f"tags.{COMPARISON_TAG}") != "comparison"]
    enabled = _first(runs, "params.qtuning_enabled").eq("True").map({True: "qtuning", False: "sft"})
    method = _first(runs, "tags.qtuning.method").fillna(enabled)
    pruning = method != "sft"  # Q-Tuning or a baseline pruning policy: both have budgets

    def budget(name: str) -> pd.Series:
        return pd.to_numeric(_first(runs, f"params.{name}"), errors="coerce").where(pruning)

    def realised(name: str) -> pd.Series:
        return _first(runs, f"metrics.qtuning/final/{name}", f"metrics.qtuning/{name}").where(pruning, 1.0)

    elapsed = pd.to_datetime(runs["end_time"], utc=True) - pd.to_datetime(runs["start_time"], utc=True)
    table = pd.DataFrame({
        "run_id": runs["run_id"], "run_name": _first(runs, "tags.mlflow.runName").fillna(runs["run_id"].str[:8]),
        "status": runs["status"], "method": method,
        "sample_keep_ratio": budget("sample_keep_ratio"), "token_keep_ratio": budget("token_keep_ratio"),
        "realised_sample_keep": realised("sample_keep_ratio"), "realised_token_keep": realised("token_keep_ratio"),
        "train_loss": _first(runs, "metrics.train_loss", "metrics.loss"),
        "wall_seconds": _first(runs, "metrics.train_runtime").fillna(elapsed.dt.total_seconds()),
        "tokens": _first(runs, "metrics.num_tokens", "metrics.num_input_tokens_seen"),
        "label_tokens": _first(runs, "metrics.qtuning/final/label_tokens_trained"),
    })  # fmt: skip
    rows = table.astype(object).where(table.notna(), None).to_dict("records")
    evals = runs.filter(regex=r"^metrics\.eval[_/]").rename(columns=lambda c: c.removeprefix("metrics."))
    for row, (_, metrics) in zip(rows, evals.iterrows()):
        row["eval"] = {k: float(v) for k, v in sorted(metrics.dropna().items())}
    return rows


def _cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value.is_integer() and abs(value) >= 1000:
            return f"{int(value)}"
        return f"{value:.{digits}f}"
    return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    eval_keys = eval_columns(rows)
    header = [
        "run", "method", "status", "sample_r", "token_r", "real_sample", "real_token", "train_loss",
        *eval_keys, "wall_s", "tokens", "label_tokens",
    ]
    table = [header]
    for row in rows:
        table.append(
            [
                row["run_name"][:28],
                row["method"],
                row["status"],
                _cell(row["sample_keep_ratio"], 3),
                _cell(row["token_keep_ratio"], 3),
                _cell(row["realised_sample_keep"]),
                _cell(row["realised_token_keep"]),
                _cell(row["train_loss"], 4),
                *[_cell(row["eval"].get(k), 4) for k in eval_keys],
                _cell(row["wall_seconds"], 1),
                _cell(row["tokens"], 0),
                _cell(row["label_tokens"], 0),
            ]
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def comparison_figure(client, rows: list[dict[str, Any]], experiment_name: str):
    """Left: training loss per step for every run. Right: held-out loss (``eval_loss`` / ``eval/nll``) against the
    realised sample keep ratio; when no run has one, the final train loss, flagged in the title (a loss over the
    kept tokens only favours pruning by construction)."""
    from .figures import new_figure

    fig = new_figure(12.0, 4.8)
    ax_loss, ax_scatter = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    held_out = any(_eval_loss(row) is not None for row in rows)
    for row in rows:
        history = sorted(client.get_metric_history(row["run_id"], "loss"), key=lambda m: m.step)
        if history:
            ax_loss.plot([m.step for m in history], [m.value for m in history], marker=".", label=f"{row['run_name']} ({row['method']})")
        value = _eval_loss(row) if held_out else row["train_loss"]
        if value is not None and row["realised_sample_keep"] is not None:
            ax_scatter.scatter(row["realised_sample_keep"], value, s=40)
            ax_scatter.annotate(row["run_name"][:20], (row["realised_sample_keep"], value), fontsize=8)
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title(f"{experiment_name}: training loss")
    ax_loss.grid(True, alpha=0.3)
    if ax_loss.get_lines():  # runs without a logged training loss draw nothing to label
        ax_loss.legend(fontsize=7)
    ax_scatter.set_xlabel("realised sample keep ratio")
    if held_out:
        ax_scatter.set_ylabel("held-out loss (eval_loss / eval/nll)")
        ax_scatter.set_title("held-out loss vs data kept")
    else:
        ax_scatter.set_ylabel("final train loss (kept tokens only)")
        ax_scatter.set_title("no run has eval_loss: TRAIN loss vs data kept (favours pruning by construction)", fontsize=9)
    ax_scatter.grid(True, alpha=0.3)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="trl-qtuning compare", description="Compare the runs of an MLflow experiment (Q-Tuning and plain SFT)."
    )
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI, else MLflow's default")
    parser.add_argument("--output", default=None, help="also save the comparison figure to this PNG path")
    parser.add_argument("--no-log", action="store_true", help="do not log the figure to a comparison run")
    parser.add_argument("--max-runs", type=int, default=200, help="compare the newest N runs (default 200)")
    args = parser.parse_args(argv)
    try:
        from . import require_mlflow

        require_mlflow()
    except ImportError as exc:
        print(f"trl-qtuning compare: {exc}", file=sys.stderr)
        return 1
    from .sink import fast_fail_http

    with fast_fail_http():  # a dead server fails in seconds, as for `sync`, not after MLflow's minutes of back-off
        return _compare(args)


def _compare(args: argparse.Namespace) -> int:
    import mlflow

    if args.tracking_uri:
        mlflow.set_tracking_uri(args.tracking_uri)
    client = mlflow.MlflowClient()
    try:
        experiment = client.get_experiment_by_name(args.experiment)
    except Exception as exc:
        print(f"trl-qtuning compare: cannot reach the tracking store ({type(exc).__name__}: {exc}).", file=sys.stderr)
        return 1
    if experiment is None:
        print(f"trl-qtuning compare: no experiment named {args.experiment!r}.", file=sys.stderr)
        return 2
    rows = collect_rows(experiment.experiment_id, args.max_runs)
    if not rows:
        print(f"Experiment {args.experiment!r} has no runs.")
        return 0
    print(format_table(rows))
    if not any(_eval_loss(row) is not None for row in rows):
        print("(no run has eval_loss or eval/nll: the figure plots the training loss, which is computed on the kept "
              "tokens only and so favours pruning by construction; give the trainer an eval_dataset to compare)")  # fmt: skip
    try:
        fig = comparison_figure(client, rows, args.experiment)
    except ImportError:
        print("(no figure: matplotlib is missing)", file=sys.stderr)
        return 0
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.output, bbox_inches="tight")
        print(f"Figure written to {args.output}")
    if not args.no_log:
        run = client.create_run(
            experiment.experiment_id,
            run_name=f"compare-{len(rows)}-runs",
            tags={COMPARISON_TAG: "comparison", "qtuning.compared_runs": ",".join(r["run_id"] for r in rows)[:5000]},
        )
        client.log_figure(run.info.run_id, fig, "figures/comparison.png", save_kwargs={"bbox_inches": "tight"})
        client.log_text(run.info.run_id, format_table(rows) + "\n", "comparison.txt")
        client.set_terminated(run.info.run_id, "FINISHED")
        print(f"Comparison figure logged to run {run.info.run_id} (experiment {args.experiment!r}).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
