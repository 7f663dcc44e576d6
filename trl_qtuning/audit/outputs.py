"""What an audit writes: the table (Parquet), the EU plane figure, the Markdown page and the summary (JSON).

Built once every chunk is scored, from the shards: the quadrants, ranks and suspicion score depend on the whole
dataset. The quadrants are the trainer's own triage (:func:`trl_qtuning.core.triage_samples`) at the audit's
``keep_ratio`` with the whole dataset as one triage group, so "Q1" here is what Q-Tuning would call harmful noise
if it saw every row at once.
"""

from __future__ import annotations

import json
import logging
import math
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..files import write_json
from ..vocabulary import QUADRANT_LABELS
from .api import ROW_ID, SHARD_DIR, AuditResult, AuditSettings, _is_sized, read_shards, row_text
from .detection import RECOMMENDED_SCORE, candidate_scores, detection_table

__all__ = [
    "FILES", "build_table", "describe", "finalize", "log_to_mlflow", "plot_plane", "read_outputs",
    "summarise", "write_page",
]  # fmt: skip

logger = logging.getLogger(__name__)

FILES = {"table": "audit.parquet", "figure": "eu_plane.png", "page": "audit.md", "summary": "summary.json"}
SUSPICION_DEFINITION = (
    "suspicion = (rank(PPL) + rank(entropy)) / n over the rows with an answer token (average ranks, 1 = lowest; in "
    "(0, 2]): high for rows the model finds both improbable and uncertain, the paper's Q1 ('harmful noise') read as "
    "a ranking instead of a quadrant. suspicion_rank 1 is the most suspect row."
)
QUANTILES = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
EXCERPT_CHARS = 400


def build_table(shards: Any, keep_ratio: float, noisy_rows: Any = None) -> tuple[Any, Any]:
    """The final table (pandas, sorted by row id) and the triage that gave its quadrants."""
    import torch

    from ..core.triage import triage_samples

    df = shards.to_pandas()
    ppl, entropy = df["ppl"].to_numpy(np.float64), df["entropy"].to_numpy(np.float64)
    scores = candidate_scores(ppl, entropy)
    valid = np.isfinite(scores["suspicion"])
    triage = None
    if len(df):
        triage = triage_samples(torch.from_numpy(ppl.copy()), torch.from_numpy(entropy.copy()), keep_ratio)
    df["log_ppl"] = np.log(np.where(valid, ppl, np.nan))
    df["quadrant"] = triage.quadrant.numpy().astype(np.int8) if triage is not None else np.zeros(0, np.int8)
    df["kept_at_budget"] = triage.keep.numpy() if triage is not None else np.zeros(0, bool)
    df["entropy_residual"] = scores["decorrelated"]
    df["rank_sum"] = scores["rank_sum"]
    df["suspicion"] = scores["suspicion"]
    df["suspicion_rank"] = df["suspicion"].rank(ascending=False, method="first").astype("Int64")  # ties: earlier row
    if noisy_rows is not None:
        df["noisy"] = np.isin(df[ROW_ID].to_numpy(), np.asarray(noisy_rows, dtype=np.int64))
    return df, triage


def _quantiles(values: np.ndarray) -> dict[str, float]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {}
    return {f"q{round(q * 100):02d}": float(v) for q, v in zip(QUANTILES, np.quantile(values, QUANTILES), strict=True)}


def summarise(df: Any, triage: Any, settings: AuditSettings, noisy_rows: Any = None) -> dict[str, Any]:
    """Counts per quadrant, the axes' correlation, quantiles, the input problems found, and detection when the bad
    rows are known."""
    import torch

    from ..core.plane import plane_correlation

    ppl, entropy = df["ppl"].to_numpy(np.float64), df["entropy"].to_numpy(np.float64)
    valid = np.isfinite(ppl) & np.isfinite(entropy)
    in_quadrant = {name: (df["quadrant"] == q).to_numpy() & valid for q, name in QUADRANT_LABELS.items()}
    spearman = math.nan
    rp, re = (pd.Series(values[valid]).rank().to_numpy() for values in (ppl, entropy))
    if valid.sum() >= 2 and rp.std() > 0 and re.std() > 0:
        spearman = float(np.corrcoef(rp, re)[0, 1])
    summary: dict[str, Any] = {
        "rows": int(len(df)),
        "rows_scored": int(valid.sum()),
        "rows_without_answer_token": int((~valid).sum()),
        "empty_answers": int(df["empty_answer"].sum()),
        "truncated_rows": int(df["truncated"].sum()),
        "max_length": settings.max_length,
        "truncation_mode": settings.truncation_mode,
        "quadrants": {name: int(mask.sum()) for name, mask in in_quadrant.items()},
        "quadrant_rule": (
            f"the trainer's triage (sample_keep_ratio={settings.keep_ratio}) over the whole dataset as one group; "
            "mid band: between the thresholds on either axis"
        ),
        "triage": None if triage is None else {
            "keep_ratio": settings.keep_ratio, "q": triage.q, **triage.thresholds,
            "kept_rows": int(triage.keep.sum()),
        },
        "correlation": {
            "pearson_log_ppl_entropy": plane_correlation(torch.tensor(ppl), torch.tensor(entropy)),
            "spearman_ppl_entropy": spearman,
        },
        "quantiles": {
            "ppl": _quantiles(ppl), "entropy": _quantiles(entropy),
            "answer_tokens": _quantiles(df["answer_tokens"].to_numpy(np.float64)),
            "tokens": _quantiles(df["tokens"].to_numpy(np.float64)),
        },
        "suspicion": {"recommended": RECOMMENDED_SCORE, "definition": SUSPICION_DEFINITION},
    }
    if noisy_rows is not None:
        bad = df["noisy"].to_numpy()
        columns = {"ppl": "ppl", "entropy": "entropy", "rank_sum": "rank_sum", "decorrelated": "entropy_residual",
                   "suspicion": "suspicion"}  # fmt: skip
        summary["detection"] = detection_table(
            {name: np.where(valid, df[column].to_numpy(np.float64), np.nan) for name, column in columns.items()}, bad
        )
        summary["noisy_by_quadrant"] = {
            name: {"rows": int(mask.sum()), "noisy": int((mask & bad).sum())} for name, mask in in_quadrant.items()
        }
    return summary


def plot_plane(df: Any, triage: Any, path: Path, top_k: int, title: str) -> bool:
    """Density of (log PPL, entropy), the triage's threshold lines, the ``top_k`` suspected rows circled (and the
    known noisy rows as dots when given). False (and nothing written) without matplotlib."""
    from ..tracking.figures import matplotlib_available, new_figure

    if not matplotlib_available():
        return False
    from matplotlib.ticker import FuncFormatter

    valid = df["suspicion_rank"].notna().to_numpy()
    x, y = df["log_ppl"].to_numpy(np.float64)[valid], df["entropy"].to_numpy(np.float64)[valid]
    fig = new_figure(6.4, 4.8)
    ax = fig.add_subplot()
    if x.size:
        hb = ax.hexbin(x, y, gridsize=30, mincnt=1, cmap="Blues", bins="log")
        counts = fig.colorbar(hb, ax=ax, label="rows (log scale)").ax.yaxis
        # plain row counts (1, 2, 5, 10, ...) rather than matplotlib's "4x10^0" on the log scale's minor ticks
        counts.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        counts.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}" if f"{value:g}"[0] in "25" else ""))
    if triage is not None and all(math.isfinite(v) for v in triage.thresholds.values()):
        for value in (triage.thresholds["ppl_lo"], triage.thresholds["ppl_hi"]):
            ax.axvline(math.log(value), color="0.3", lw=0.8, ls="--")
        for value in (triage.thresholds["ent_lo"], triage.thresholds["ent_hi"]):
            ax.axhline(value, color="0.3", lw=0.8, ls="--")
    if "noisy" in df.columns:
        noisy = df["noisy"].to_numpy()[valid]
        ax.scatter(x[noisy], y[noisy], s=6, c="tab:orange", lw=0, label="known noisy rows")
    ranks = df["suspicion_rank"].to_numpy(dtype=np.float64, na_value=np.nan)[valid]
    top = ranks <= top_k
    ax.scatter(x[top], y[top], s=40, facecolors="none", edgecolors="tab:red", lw=1.0, label=f"top {top_k} suspected")
    ax.set_xlabel("log PPL (error)")
    ax.set_ylabel("mean token entropy (uncertainty)")
    ax.set_title(textwrap.fill(title, 70), fontsize=8)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return True


def _excerpt(text: str, chars: int = EXCERPT_CHARS) -> str:
    text = text.strip()
    if len(text) > chars:
        text = text[: chars // 2].rstrip() + " […] " + text[-chars // 2 :].lstrip()
    return "\n".join("> " + line if line.strip() else ">" for line in text.splitlines()) or "> (empty)"


def _fetch_rows(raw: Any, ids: list[int]) -> dict[int, dict[str, Any]]:
    """The raw rows with these ids: by index in a sized dataset, by one pass that stops early over a stream."""
    if not ids:
        return {}
    if _is_sized(raw):
        return {int(row[ROW_ID]): row for row in raw.select(sorted(ids))}
    wanted, found = set(ids), {}
    for row in raw:
        if int(row[ROW_ID]) in wanted:
            found[int(row[ROW_ID])] = row
            if len(found) == len(wanted):
                break
    return found


def _typical(df: Any, count: int) -> dict[int, list[int]]:
    """Per quadrant, the rows nearest its median point, in percentile ranks of the two axes."""
    valid = df[df["suspicion_rank"].notna()]
    ranks = valid[["ppl", "entropy"]].rank().to_numpy() / max(1, len(valid))
    typical = {}
    for q in QUADRANT_LABELS:
        mine = (valid["quadrant"] == q).to_numpy()
        p, e = ranks[mine, 0], ranks[mine, 1]
        distance = (p - np.median(p)) ** 2 + (e - np.median(e)) ** 2 if mine.any() else p
        typical[q] = [int(i) for i in valid[ROW_ID].to_numpy()[mine][np.argsort(distance, kind="stable")[:count]]]
    return typical


def write_page(df: Any, summary: dict[str, Any], raw: Any, settings: AuditSettings, path: Path, figure: bool) -> None:
    top = df[df["suspicion_rank"].notna()].sort_values("suspicion_rank").head(settings.top_k)
    typical = _typical(df, 3)
    ids = set(int(i) for i in top[ROW_ID]) | {i for rows in typical.values() for i in rows}
    rows = _fetch_rows(raw, sorted(ids))
    by_id = df.set_index(ROW_ID)

    def block(row_id: int, heading: str) -> list[str]:
        stats = by_id.loc[row_id]
        prompt, answer = row_text(rows.get(row_id, {}), settings.dataset_text_field)
        flags = [f for f, on in (("truncated", stats["truncated"]), ("empty answer", stats["empty_answer"]),
                                 ("known noisy", bool(stats.get("noisy", False)))) if on]  # fmt: skip
        return [
            f"### {heading}", "",
            f"PPL {stats['ppl']:.3g}, entropy {stats['entropy']:.3f}, {int(stats['answer_tokens'])} answer tokens, "
            f"{QUADRANT_LABELS[int(stats['quadrant'])]}, suspicion {stats['suspicion']:.3f} "
            f"(rank {stats['suspicion_rank']}){'; ' + ', '.join(flags) if flags else ''}", "",
            "Prompt:", "", _excerpt(prompt) if prompt else "> (none: plain-text row)", "", "Answer:", "",
            _excerpt(answer), "",
        ]  # fmt: skip

    lines = [
        "# Dataset audit", "",
        f"Model: {summary['model']}. Dataset: {summary['dataset']}. {summary['rows']} rows, {summary['rows_scored']} "
        f"with an answer token; {summary['empty_answers']} empty answers, {summary['truncated_rows']} truncated to "
        f"{settings.max_length} tokens ({settings.truncation_mode}), {summary['rows_without_answer_token']} without "
        "an answer token (no statistics).", "",
        f"Quadrants: {summary['quadrant_rule']}.", "",
        "| quadrant | rows |", "|---|---:|",
        *[f"| {name} | {count} |" for name, count in summary["quadrants"].items()], "",
        f"Correlation of log PPL and entropy: {summary['correlation']['pearson_log_ppl_entropy']:.3f} (Pearson), "
        f"{summary['correlation']['spearman_ppl_entropy']:.3f} (Spearman).", "",
        f"Suspicion: {SUSPICION_DEFINITION}", "",
    ]  # fmt: skip
    if figure:
        lines += [f"![EU plane]({FILES['figure']})", ""]
    if "detection" in summary:
        lines += ["## Detection of the known noisy rows", "",
                  "| score | AUROC | precision in top 10% | base rate |", "|---|---:|---:|---:|",
                  *[f"| {r['score']} | {r['auroc']:.3f} | {r['precision_top10']:.3f} | {r['base_rate']:.3f} |"
                    for r in summary["detection"]], ""]  # fmt: skip
    lines += [f"## The {len(top)} most suspected rows", ""]
    for position, row_id in enumerate(top[ROW_ID], start=1):
        lines += block(int(row_id), f"{position}. row {int(row_id)}")
    lines += ["## Typical rows of each quadrant", "",
              "The rows nearest each quadrant's median (percentile ranks of PPL and entropy).", ""]  # fmt: skip
    for q, name in QUADRANT_LABELS.items():
        lines += [f"## {name}", ""]
        if not typical[q]:
            lines += ["(no row)", ""]
        for row_id in typical[q]:
            lines += block(row_id, f"row {row_id}")
    path.write_text("\n".join(lines))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def finalize(
    out: Path, raw: Any, settings: AuditSettings, *, model_description: str, dataset_description: str,
    noisy_rows: Any, timing: dict[str, Any], write_files: bool, report_to: str, tracking_uri: str | None,
    experiment_name: str,
) -> AuditResult:
    """Table, summary, figure and page from the shards (main process only)."""
    noisy = None if noisy_rows is None else sorted({int(r) for r in noisy_rows})
    df, triage = build_table(read_shards(out / SHARD_DIR), settings.keep_ratio, noisy)
    summary = summarise(df, triage, settings, noisy)
    summary = {"model": model_description, "dataset": dataset_description, **summary, "timing": timing,
               "settings": json.loads(json.dumps(settings.__dict__))}  # fmt: skip
    files: dict[str, Path] = {}
    if write_files:
        files["table"] = out / FILES["table"]
        tmp = files["table"].with_name(".audit.parquet.tmp")
        df.to_parquet(tmp, index=False)
        tmp.replace(files["table"])
        figure = plot_plane(df, triage, out / FILES["figure"], settings.top_k,
                            f"{model_description} on {dataset_description}: {len(df)} rows")  # fmt: skip
        if figure:
            files["figure"] = out / FILES["figure"]
        files["page"] = out / FILES["page"]
        write_page(df, summary, raw, settings, files["page"], figure)
        files["summary"] = out / FILES["summary"]
        write_json(files["summary"], _json_safe(summary))
        if report_to == "mlflow":
            try:  # the audit is written already: a tracking outage costs the MLflow copy, not the audit
                summary["mlflow_run_id"] = log_to_mlflow(files, summary, tracking_uri, experiment_name)
            except Exception as exc:  # noqa: BLE001 (any store or network failure)
                logger.warning("audit: logging to MLflow failed (%s: %s); the outputs are in %s", type(exc).__name__,
                               exc, out)  # fmt: skip
                summary["mlflow_run_id"] = None
            write_json(files["summary"], _json_safe(summary))
    return AuditResult(df, summary, out if write_files else None, files)


def read_outputs(out: Path) -> AuditResult:
    """An audit's written outputs (what the other processes return once the main one has finalized)."""
    summary = json.loads((out / FILES["summary"]).read_text())
    files = {k: out / name for k, name in FILES.items() if (out / name).is_file()}
    return AuditResult(pd.read_parquet(out / FILES["table"]), summary, out, files)


def log_to_mlflow(files: dict[str, Path], summary: dict[str, Any], tracking_uri: str | None, experiment: str) -> str:
    """One MLflow run: the settings as parameters, the counts and detection numbers as metrics, the files as
    artifacts. Returns the run id. Through a client of its own: the process's MLflow tracking URI and active
    experiment stay what they were (a training run started after the audit must not land in the audit's store)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from ..tracking.sink import fast_fail_http

    metrics = {"rows": summary["rows"], "rows_scored": summary["rows_scored"],
               "empty_answers": summary["empty_answers"], "truncated_rows": summary["truncated_rows"]}  # fmt: skip
    metrics.update({f"quadrant/{name.split()[0]}": count for name, count in summary["quadrants"].items()})
    for key, value in summary["correlation"].items():
        if value is not None and math.isfinite(value):
            metrics[f"correlation/{key}"] = value
    for row in summary.get("detection", []):
        for key in ("auroc", "precision_top10"):
            if math.isfinite(row[key]):
                metrics[f"detection/{row['score']}/{key}"] = row[key]
    params = {"model": summary["model"][:500], "dataset": summary["dataset"][:500],
              **{k: str(v) for k, v in summary["settings"].items()}}  # fmt: skip
    with fast_fail_http():  # an unreachable server fails in seconds, not after MLflow's minutes of retries
        client = MlflowClient(tracking_uri=tracking_uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
        run_id = client.create_run(experiment_id, run_name="trl-qtuning audit").info.run_id
        try:
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                             params=[Param(k, v) for k, v in params.items()])  # fmt: skip
            for path in files.values():
                client.log_artifact(run_id, str(path))
        except Exception:
            client.set_terminated(run_id, status="FAILED")
            raise
        client.set_terminated(run_id)
    return run_id


def describe(summary: dict[str, Any], files: dict[str, Path]) -> list[str]:
    """The few lines the command prints at the end."""
    timing = summary.get("timing", {})
    rate = ""
    if timing.get("rows_scored_now") and timing.get("wall_seconds"):
        now = timing["rows_scored_now"]
        rate = f" ({now} scored now, {now / timing['wall_seconds']:.1f} rows/s)"
    lines = [
        f"Audited {summary['rows']} rows{rate}: {summary['rows_scored']} scored, {summary['empty_answers']} empty "
        f"answers, {summary['truncated_rows']} truncated, {summary['rows_without_answer_token']} without an answer "
        "token.",
        "Quadrants: " + ", ".join(f"{name} {count}" for name, count in summary["quadrants"].items()) + ".",
    ]
    for row in summary.get("detection", []):
        lines.append(f"  {row['score']:<13} AUROC {row['auroc']:.3f}  precision@10% {row['precision_top10']:.3f}"
                     f"  (base rate {row['base_rate']:.3f})")  # fmt: skip
    if files:
        lines.append("Wrote " + ", ".join(str(p) for p in files.values()) + ".")
    return lines

