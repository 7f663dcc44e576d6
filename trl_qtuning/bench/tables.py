"""The results page: rows per (method, budget) from the cells' ``result.json``, at equal steps and at equal compute,
paired differences against the baselines, the label-noise audit, figures; ``results.md`` and ``results.json``.

Everything here reads finished results only, so ``--table-only`` re-renders the page from committed cell results.
"""

from __future__ import annotations

import datetime
import math
import sys
from collections import Counter
from typing import Any

import pandas as pd

from .matrix import BASE_METHOD, PROG, Cell, Matrix, budget_label, plan_cells
from .paired import paired_difference
from .provenance import git_state, library_versions, machine_summary
from .results import read_result, write_json

__all__ = ["collect_rows", "format_table", "reading", "render_results", "untrained_readings"]

RESULTS_MD = "results.md"
RESULTS_JSON = "results.json"
METRIC_COLUMNS = (  # result key, table header, kind
    ("eval/nll", "held-out NLL", "nll"),
    ("eval/nll_transfer", "transfer NLL", "nll"),
    ("eval/gsm8k_em", "GSM8K EM %", "pct"),
    ("eval/arc_easy_acc", "ARC-E acc %", "pct"),
    ("eval/arc_challenge_acc", "ARC-C acc %", "pct"),
    ("eval/contrast_swap", "Q-A contrast", "nll"),
    ("eval/contrast_numbers", "arithmetic contrast", "nll"),
)
CURVE_KEYS = ("eval/nll", "eval/nll_transfer")
"""Metrics the learning curve measures (readable at any recorded step; the others only at the end)."""
PAIRED_KEYS = ("eval/nll", "eval/nll_transfer", "eval/contrast_swap", "eval/contrast_numbers")
HIGHER_IS_BETTER = frozenset({"eval/contrast_swap", "eval/contrast_numbers"})
"""Paired keys where a method "wins" with a positive difference (the contrasts); lower is better for the rest."""
PAIRED_LABELS = {"eval/nll": "NLL", "eval/nll_transfer": "transfer NLL", "eval/contrast_swap": "Q-A contrast",
                 "eval/contrast_numbers": "arithmetic contrast"}  # fmt: skip



def reading(result: dict[str, Any], kind: str, equal_steps: int | None) -> dict[str, Any]:
    """A cell's metrics at equal steps (``training.max_steps``) or at equal compute (where its counted compute
    reached the reference's, else its last step), with the step and compute they were read at."""
    compute = result.get("compute") or {}
    last = result.get("global_step")
    final = {"step": last, "compute": compute.get("final"), **(result.get("metrics") or {})}
    if kind == "equal_steps":
        step = equal_steps if equal_steps is not None else last
    else:
        step = compute.get("equal_compute_step") or last
    if step == last or last is None:  # (results without a step count: their only reading)
        return final
    point = next((p for p in result.get("curve") or [] if p["step"] == step), None)
    if point is not None:
        return dict(point)
    # Not measured there (no curve): the step and its compute, no metric (the final ones were read elsewhere).
    cost = next((c for c in compute.get("steps") or [] if c["step"] == step), None)
    return {"step": step, "compute": cost["cumulative"] if cost else None}


FORMATS = {"share": ".0%", "seconds": ".0f", "count": ",.0f", "delta": "+.4f", "points": "+.1f", "nll": ".4f"}
"""How each kind of value is written (``pct``: a share as a percentage with one decimal)."""


def _fmt(value: float | None, kind: str) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value * 100:.1f}" if kind == "pct" else format(value, FORMATS[kind])


def _fmt_mean(stats: dict[str, Any] | None, kind: str) -> str:
    return _fmt(stats["mean"], kind) if stats else "-"


COUNTS = ("step", "compute")
"""Columns that are whole numbers (their values stay integers in results.json)."""


def _finite(column: pd.Series) -> list[float]:
    values = column.dropna().tolist()
    return [int(v) for v in values] if column.name in COUNTS else values


def _summaries(frame: pd.DataFrame, by: list[str]) -> dict[Any, dict[str, dict[str, Any] | None]]:
    """Per group of ``by``, every other column's ``{"mean", "std", "values"}`` over its finite values: std is the
    sample standard deviation (n - 1), None for one value; a column without a finite value is None."""
    values = frame.set_index(by).astype(float).replace([math.inf, -math.inf], math.nan)
    table = values.groupby(level=by, sort=False).agg(["mean", "std", "count", _finite])
    return {
        key: {column: {"mean": float(line[column, "mean"]),
                       "std": float(line[column, "std"]) if line[column, "count"] > 1 else None,
                       "values": line[column, "_finite"]}
              if line[column, "count"] else None for column in values.columns}
        for key, line in table.iterrows()
    }  # fmt: skip


REALISED = ("sample_keep_ratio", "label_token_share")
CELL_COLUMNS = ("train_seconds", "eval_seconds", *(f"realised_{n}" for n in REALISED), "token_keep_ratio")
"""What each cell contributes to its row once (the final metrics too); a reading contributes its metrics,
realised shares, step and compute."""
METRIC_KEYS = tuple(key for key, _, _ in METRIC_COLUMNS)


def _records(index: int, result: dict[str, Any], kinds: list[str], equal_steps: int | None) -> list[dict[str, Any]]:
    """The cell's values, one record for the cell (``kind="cell"``) and one per reading."""
    realised = result.get("realised") or {}
    records = [{"row": index, "kind": "cell", **{f"realised_{n}": realised.get(n) for n in REALISED},
                **{k: result.get(k) for k in ("train_seconds", "eval_seconds", "token_keep_ratio")},
                **(result.get("metrics") or {})}]  # fmt: skip
    for kind in kinds:
        point = reading(result, kind, equal_steps)
        shares = result.get("realised" if kind == "equal_steps" else "realised_all_steps") or realised
        records.append({"row": index, "kind": kind, **{f"realised_{n}": shares.get(n) for n in REALISED},
                        **{key: point.get(key) for key in (*METRIC_KEYS, *COUNTS)}})  # fmt: skip
    return records


def collect_rows(matrix: Matrix) -> tuple[list[dict[str, Any]], list[str], list[dict[str, Any]]]:
    """One row per (method, budget) in matrix order from the cells' result.json files; the missing cell ids; the
    cell results. Each row carries its readings at equal steps and (with ``equal_compute``) at equal compute: the
    mean and std over its seeds of each value (pandas' ``groupby().agg``) and each seed's metrics."""
    missing: list[str] = []
    results: list[dict[str, Any]] = []
    by_row: dict[tuple, list[dict[str, Any]]] = {}
    first_cell: dict[tuple, Cell] = {}
    cells = plan_cells(matrix)
    found_results = {cell.id: read_result(matrix.output_dir / cell.dirname, cell) for cell in cells}
    stale = stale_results(matrix, cells, found_results)
    for cell in cells:
        result = found_results[cell.id]
        by_row.setdefault(cell.row_key, [])
        first_cell.setdefault(cell.row_key, cell)
        if result is None or cell.id in stale:
            missing.append(cell.id if result is None else f"{cell.id} (stale: {stale[cell.id]})")
            continue
        results.append(result)
        by_row[cell.row_key].append(result)
    order = [k for k in first_cell if first_cell[k].is_base]
    order += [(m.name, b) for m in matrix.methods for b in m.budgets]
    kinds = ["equal_steps"] + (["equal_compute"] if matrix.equal_compute else [])
    records = [record for i, key in enumerate(order) for r in by_row[key]
               for record in _records(i, r, kinds, matrix.max_steps)]  # fmt: skip
    frame = pd.DataFrame(records, columns=["row", "kind", *CELL_COLUMNS, *METRIC_KEYS, *COUNTS])
    stats = _summaries(frame, ["row", "kind"])
    rows = []
    for i, key in enumerate(order):
        found, first = by_row[key], first_cell[key]
        cell = stats.get((i, "cell"), dict.fromkeys(frame.columns))
        final = {k: cell[k] for k in METRIC_KEYS if cell[k]}
        row: dict[str, Any] = {
            "method": first.method,
            "budget": None if first.budget is None else list(first.budget),
            "budget_label": "(untrained)" if first.is_base else budget_label(first.budget),
            "n": len(found),
            "seeds": [r.get("seed") for r in found],
            "metrics": {},
            **{column: cell[column] for column in CELL_COLUMNS},
        }
        for kind in kinds:
            read = stats.get((i, kind), dict.fromkeys(frame.columns))
            readings = [reading(r, kind, matrix.max_steps) for r in found]
            row[kind] = {
                **{f"realised_{n}": read[f"realised_{n}"] for n in REALISED},
                "short_of_target": [r["cell_id"] for r in found if (r.get("compute") or {}).get("reached_target") is False],
                "metrics": final if first.is_base else {k: read[k] for k in METRIC_KEYS if read[k]},
                "step": read["step"],
                "compute": read["compute"],
                "per_seed": {r.get("seed"): {k: p.get(k) for k in METRIC_KEYS if p.get(k) is not None}
                             for r, p in zip(found, readings)},  # fmt: skip
            }
        row["metrics"] = final if first.is_base else row[kinds[-1]]["metrics"]  # untrained: the same at every reading
        audits = {r.get("seed"): r["noise_audit"] for r in found if r.get("noise_audit")}
        if audits:
            row["noise_audit"] = _pool_audits(audits)
        rows.append(row)
    _add_paired(matrix, rows, kinds)
    return rows, missing, results


def stale_results(matrix: Matrix, cells: list[Cell], results: dict[str, dict[str, Any] | None]) -> dict[str, str]:
    """Finished cells that no longer belong to the matrix, with the reason: made with other settings (their
    fingerprint), or trained against a target (equal-compute reference's compute, matched label-token share) that
    is not the one the finished source cell now gives."""
    from .provenance import fingerprint

    stale: dict[str, str] = {}
    for cell in cells:
        result = results.get(cell.id)
        if result is None:
            continue
        if result.get("fingerprint") != fingerprint(matrix, cell):
            stale[cell.id] = "made with other settings than the matrix's now"
            continue
        if cell.is_base:
            continue
        method = matrix.method(cell.method)
        ec = matrix.equal_compute
        target = (result.get("compute") or {}).get("target")
        if ec is not None and cell.method != ec.reference and target is not None:
            source = results.get(Cell(ec.reference, matrix.method(ec.reference).budgets[0], cell.seed).id) or {}
            if (source.get("compute") or {}).get("final") != target:
                stale[cell.id] = f"trained to a compute target that is not {ec.reference}'s final compute now"
        share = result.get("matched_label_share")
        if method.match_label_tokens is not None and share is not None:
            realised = (results.get(Cell(method.match_label_tokens, cell.budget, cell.seed).id) or {}).get("realised") or {}
            now = realised.get("label_token_share_pooled", realised.get("label_token_share"))
            if now is None or abs(now - share) > 1e-12:
                stale[cell.id] = f"trained at a label-token share that is not {method.match_label_tokens}'s now"
    return stale


def _pool_audits(audits_by_seed: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of the trained shares; counts summed over seeds; and the selectivity: per seed, the share of
    corrupted sample-steps trained on minus the share of clean ones, with its 95% t interval (below 0: the method
    keeps corrupted rows out of training more than clean ones; random selection is 0 in expectation). Cells without
    a ledger (full data trains everything by definition) have no selectivity."""
    shares = pd.DataFrame(list(audits_by_seed.values()), columns=["trained_share_corrupted", "trained_share_clean"])
    pooled: dict[str, Any] = {"seeds": len(audits_by_seed), **_summaries(shares.assign(all=0), ["all"])[0]}
    ledgered = {seed: a for seed, a in audits_by_seed.items() if a.get("sample_steps")
                and a.get("trained_share_corrupted") is not None and a.get("trained_share_clean") is not None}  # fmt: skip
    pooled["selectivity"] = paired_difference(
        {seed: a["trained_share_corrupted"] for seed, a in ledgered.items()},
        {seed: a["trained_share_clean"] for seed, a in ledgered.items()},
    )
    for group in ("by_quadrant", "by_decision"):
        counts = pd.DataFrame([{"name": name, "corrupted": entry["corrupted"], "clean": entry["clean"]}
                               for audit in audits_by_seed.values() for name, entry in (audit.get(group) or {}).items()],
                              columns=["name", "corrupted", "clean"])  # fmt: skip
        pooled[group] = counts.groupby("name", sort=False).sum().to_dict("index")
    return pooled


def _paired(mine: dict[Any, dict[str, float]], theirs: dict[Any, dict[str, float]]) -> dict[str, Any]:
    """Per paired key both sides have: the per-seed differences with their interval (``mine`` and ``theirs`` map
    each seed to its metrics)."""
    paired = {}
    for key in PAIRED_KEYS:
        diff = paired_difference({s: v[key] for s, v in mine.items() if key in v},
                                 {s: v[key] for s, v in theirs.items() if key in v},
                                 lower_is_better=key not in HIGHER_IS_BETTER)  # fmt: skip
        if diff is not None:
            paired[key] = diff
    return paired


def _add_paired(matrix: Matrix, rows: list[dict[str, Any]], kinds: list[str]) -> None:
    for row in rows:
        if row["budget_label"] == "(untrained)":
            continue
        for kind in kinds:
            row[kind]["paired"] = {}
            for baseline in matrix.baselines:  # the same budget, or the baseline's only row without one
                candidates = [r for r in rows if r["method"] == baseline]
                base = next((r for r in candidates if r["budget"] == row["budget"]), None) or (
                    candidates[0] if len(candidates) == 1 and candidates[0]["budget"] is None else None)
                if base is not None and base is not row:
                    if paired := _paired(row[kind]["per_seed"], base[kind]["per_seed"]):
                        row[kind]["paired"][baseline] = paired



def _markdown(headers: list[str], body: list[list[str]], right_from: int = 2) -> str:
    """A Markdown table with padded columns (so it reads as plain text too)."""
    widths = [max(len(str(r[i])) for r in [headers, *body]) for i in range(len(headers))]
    right = set(range(right_from, len(headers)))

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in body)])


def format_table(rows: list[dict[str, Any]], kind: str = "equal_steps", *, final_metrics: bool = True) -> str:
    """The results table at one reading. ``final_metrics``: include the end-of-training evaluations (GSM8K, ARC),
    which exist only where the reading is the cell's last step."""
    keys = [c for c in METRIC_COLUMNS if final_metrics or c[0] in CURVE_KEYS]
    metric_cols = [c for c in keys if any(c[0] in (r.get(kind) or {}).get("metrics", {}) for r in rows)]
    with_compute = any((r.get(kind) or {}).get("compute") for r in rows)
    headers = ["method", "budget (samples x tokens)", "seeds", *[h for _, h, _ in metric_cols], "kept samples",
               "label tokens"] + (["step", "compute (fwd-token eq.)"] if with_compute else []) + ["train s"]  # fmt: skip
    body = []
    for row in rows:
        read = row.get(kind) or {}
        values = [row["method"], row["budget_label"], str(row["n"])]
        for key, _, fmt in metric_cols:
            stats = read.get("metrics", {}).get(key)
            cell = f"{_fmt(stats['mean'], fmt)} ± {_fmt(stats['std'], fmt)}" if stats else "-"
            if stats and len(stats["values"]) < row["n"]:  # not every seed has it (e.g. read past its last step)
                cell += f" (n={len(stats['values'])})"
            values.append(cell)
        values += [_fmt_mean(read.get(k) or row.get(k), "share")
                   for k in ("realised_sample_keep_ratio", "realised_label_token_share")]
        values += [_fmt_mean(read.get("step"), "count"), _fmt_mean(read.get("compute"), "count")] if with_compute else []
        body.append([*values, _fmt_mean(row.get("train_seconds"), "seconds")])
    return _markdown(headers, body)


def against_reference(matrix: Matrix, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's paired differences (equal steps) to the row of the same method and budget in the matrix of
    ``matrix.clean_reference``: ``[{"method", "budget_label", "paired": {key: difference}}]``."""
    from .matrix import load_matrix

    if not matrix.clean_reference:
        return []
    reference_rows, _, _ = collect_rows(load_matrix(matrix.clean_reference, check_inputs=False))
    found = {(r["method"], r["budget_label"]): r for r in reference_rows if r["budget_label"] != "(untrained)"}
    pairs = ((row, found.get((row["method"], row["budget_label"]))) for row in rows)
    return [{"method": row["method"], "budget_label": row["budget_label"], "paired": paired} for row, theirs in pairs
            if theirs and (paired := _paired(row["equal_steps"]["per_seed"], theirs["equal_steps"]["per_seed"]))]


def _format_difference(d: dict[str, Any] | None, scale: float = 1, verdicts: dict[str, str] | None = None) -> str:
    """``mean [low, high] verdict`` of a paired difference (``mean (n=1)`` without an interval)."""
    if not d:
        return "-"
    kind = "delta" if scale == 1 else "points"
    mean, low, high = (_fmt(None if d[k] is None else d[k] * scale, kind) for k in ("mean", "low", "high"))
    if d["low"] is None:
        return f"{mean} (n={len(d['seeds'])})"
    return f"{mean} [{low}, {high}] {(verdicts or {}).get(d['verdict'], d['verdict'])}"


def format_paired(rows: list[dict[str, Any]], kind: str, baselines: list[str]) -> str | None:
    """Per method, the mean per-seed difference to each baseline with its 95% t interval and verdict."""
    cols = [(b, k) for b in baselines for k in PAIRED_KEYS
            if any(k in (r.get(kind, {}).get("paired", {}).get(b) or {}) for r in rows)]  # fmt: skip
    if not cols:
        return None
    headers = ["method", "budget (samples x tokens)", *[f"Δ {PAIRED_LABELS[k]} vs {b} [95% CI]" for b, k in cols]]
    body = [[row["method"], row["budget_label"], *[_format_difference((paired.get(b) or {}).get(k)) for b, k in cols]]
            for row in rows if (paired := row.get(kind, {}).get("paired"))]  # fmt: skip
    return _markdown(headers, body) if body else None


SELECTIVITY_HEADER = "corrupted - clean trained, pp [95% CI]"
_SELECTIVITY_VERDICT = {"better": "fewer corrupted", "worse": "more corrupted", "no difference": "no difference"}


def format_selectivity(selectivity: dict[str, Any] | None) -> str:
    """Trained share of corrupted minus clean sample-steps, in percentage points: mean over seeds, 95% interval and
    what it says ("fewer corrupted" only where the whole interval is below 0)."""
    return _format_difference(selectivity, 100, _SELECTIVITY_VERDICT)


def format_audit(rows: list[dict[str, Any]]) -> str | None:
    """Per method: share of corrupted / clean sample-steps trained on, and the corrupted share of each quadrant and
    decision (pooled over seeds)."""
    audited = [r for r in rows if r.get("noise_audit")]
    if not audited:
        return None
    groups = {g: sorted({n for r in audited for n in r["noise_audit"][g]}) for g in ("by_quadrant", "by_decision")}

    def share(entry: dict[str, int] | None) -> str:
        total = entry["corrupted"] + entry["clean"] if entry else 0
        return f"{entry['corrupted'] / total:.0%} of {total}" if total else "-"

    headers = ["method", "budget (samples x tokens)", "seeds", "corrupted trained", "clean trained",
               SELECTIVITY_HEADER, *[f"corrupted in {n}" for names in groups.values() for n in names]]  # fmt: skip
    body = [[row["method"], row["budget_label"], str(audit["seeds"]),
             *[_fmt_mean(audit.get(k), "share") for k in ("trained_share_corrupted", "trained_share_clean")],
             format_selectivity(audit.get("selectivity")),
             *[share(audit[g].get(n)) for g, names in groups.items() for n in names]]
            for row in audited for audit in [row["noise_audit"]]]  # fmt: skip
    return _markdown(headers, body)


TABLE_NOTE = (
    "Each metric is `mean ± std` over the seeds of the row: std is the sample standard deviation (n - 1), shown as "
    "`± -` when a row has one seed. Held-out NLL: mean answer-token negative log-likelihood on rows split off the "
    "training pool (lower is better); transfer NLL: the same on rows of another distribution. GSM8K EM and ARC "
    "accuracy in %. Kept samples / label tokens: realised share of the step's samples trained on, and of all answer "
    "tokens that kept their label (means over the logged steps up to the equal-steps point; 100% for plain "
    "fine-tuning by definition). Compute: counted forward-token equivalents (scoring 1 per token, training 3 per "
    "token for full fine-tuning, 2 for LoRA; `trl_qtuning.bench.compute`). Train s: mean wall-clock training seconds per "
    "cell (evaluation excluded; machine-dependent, compare compute instead)."
)
PAIRED_NOTE = (
    "Paired differences: per seed, the method's metric minus the baseline's (same data order and initialisation), "
    "then the mean over seeds with a 95% Student t interval. Negative is better for NLL; `better` / `worse` only "
    "where the interval excludes 0."
)
CONTRAST_NOTE = (
    "Q-A contrast: per held-out row, the answer's log-likelihood under its own question minus under the next row's "
    "question, per answer token; arithmetic contrast: at the first token where the same solution with a carried "
    "arithmetic slip departs from the true one, the true token's log-probability minus the slip's "
    "(trl_qtuning/bench/contrast.py). Mean over rows; higher is better, and a paired difference above 0 is `better`."
)
REFERENCE_NOTE = (
    "Against the clean reference: per seed, this matrix's cell minus the reference matrix's cell of the same method "
    "and budget (same data order and initialisation, the noise the only difference), then the mean over seeds with "
    "a 95% Student t interval. `worse` where the interval says the noise hurt (NLL up, a contrast down): the metric "
    "sees this noise."
)
AUDIT_NOTE = (
    "Label noise audit (from each cell's ledger, steps up to the equal-steps point): the share of corrupted and of "
    "clean sample-steps the method trained on (kept, filled or token-pruned; mean over seeds); their difference per "
    "seed in percentage points, with its mean and 95% Student t interval (below 0: corrupted rows are kept out of "
    "training more than clean ones; random selection is 0 in expectation; `fewer corrupted` / `more corrupted` only "
    "where the interval excludes 0); and the corrupted share of the sample-steps in each quadrant and decision, "
    "pooled over seeds (`x% of n`: n sample-steps there)."
)


def _cells(n: int) -> str:
    return f"{n} cell{'s' if n != 1 else ''}"


def _cell_versions_line(results: list[dict[str, Any]]) -> str | None:
    """The library versions the cells trained with (each cell records its own), a count beside each version where
    the cells differ: the versions of the process that renders the page say nothing about how the cells ran."""
    seen: dict[str, Counter[str]] = {}
    for result in results:
        for library, version in (result.get("versions") or {}).items():
            if version:
                seen.setdefault(library, Counter())[version] += 1
    recorded = sum(bool(result.get("versions")) for result in results)
    return ", ".join(
        f"{library} {next(iter(counts))}" if len(counts) == 1 and counts.total() == recorded
        else f"{library} " + " / ".join(f"{v} ({_cells(n)})" for v, n in sorted(counts.items(), key=_version_key))
        for library, counts in seen.items()
    ) or None  # fmt: skip


def _version_key(item: tuple[str, int]) -> tuple:
    """Order versions as versions (1.9 before 1.10); strings that are not versions after those, by text."""
    from packaging.version import InvalidVersion, Version

    try:
        return (0, Version(item[0]), "")
    except InvalidVersion:
        return (1, None, item[0])


UNTRAINED_TOLERANCE = 1e-5
"""Readings of the untrained model closer than this are one group (float noise, not other numerics)."""


def untrained_readings(results: list[dict[str, Any]]) -> dict[float, list[str]]:
    """The untrained model's held-out NLL as each cell measured it (the base cell's reading, each curve's step 0),
    to 6 decimals, with the cells that read it. One value when every cell ran with the same numerics; machines whose
    CPU kernels differ (seen here: 1.3474 against 1.3495) split the cells, and a paired difference across the
    groups then includes that machine difference."""
    readings: list[tuple[float, str]] = []
    for r in results:
        curve = r.get("curve") or []
        if curve and curve[0].get("step") == 0 and "eval/nll" in curve[0]:
            value = curve[0]["eval/nll"]
        elif r.get("method") == BASE_METHOD:
            value = (r.get("metrics") or {}).get("eval/nll")
        else:
            continue
        if value is not None and math.isfinite(float(value)):
            readings.append((float(value), r["cell_id"]))
    group_of: dict[str, float] = {}
    first: float | None = None
    for value, cell_id in sorted(readings, key=lambda item: item[0]):
        if first is None or value - first > UNTRAINED_TOLERANCE:  # a new group: not float noise of the last one
            first = value
        group_of[cell_id] = round(first, 6)
    groups: dict[float, list[str]] = {}
    for _, cell_id in readings:  # each group's cells in the matrix's order
        groups.setdefault(group_of[cell_id], []).append(cell_id)
    return dict(sorted(groups.items()))


def _untrained_line(groups: dict[float, list[str]]) -> str | None:
    if len(groups) < 2:
        return None
    parts = [f"{value:.6f} ({_cells(len(cells))}: {', '.join(cells)})" for value, cells in groups.items()]
    return ("- numerics: the untrained model's held-out NLL differs between cells, " + "; ".join(parts)
            + ". They ran with different numerics (machines whose kernels differ, or another precision): a paired "
              "difference between cells of different groups includes that difference")  # fmt: skip


def render_results(matrix: Matrix, *, command: str | None = None, out=None) -> str:
    """Collect the cells' results, print the tables, write ``results.md``, ``results.json`` and the curve figures;
    returns the equal-steps table."""
    from .figures import draw_curves
    from .mlflow_runs import log_summary

    out = out or sys.stdout
    rows, missing, results = collect_rows(matrix)
    ec = matrix.equal_compute
    steps_table = format_table(rows, "equal_steps", final_metrics=ec is None)
    git, machine, versions = git_state(), machine_summary(), library_versions()
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    command = command or f"{PROG} --config {matrix.path}"
    commits = sorted({f"{r['git']['commit'][:12]}{' (dirty)' if r['git'].get('dirty') else ''}"
                      for r in results if (r.get("git") or {}).get("commit")})  # fmt: skip
    ran_on = Counter(cpu for r in results if (cpu := (r.get("machine") or {}).get("cpu")))
    unrecorded = len(results) - ran_on.total()
    machines = ", ".join(f"{cpu} ({_cells(n)})" for cpu, n in sorted(ran_on.items()))
    if machines and unrecorded:
        machines += f"; {unrecorded} cell(s) from before machines were recorded"
    commit = git.get("commit")
    commit_text = f"{commit}{' (uncommitted changes to the package)' if git.get('dirty') else ''}" if commit else "unknown (not a git checkout)"
    total = len(plan_cells(matrix))
    status = f"{total - len(missing)} of {total} cells finished"
    if missing:
        status += f"; missing: {', '.join(missing)}"
    numerics = untrained_readings(results)
    untrained = _untrained_line(numerics)
    sections: list[tuple[str, list[tuple[str | None, str | None]]]] = [  # title, [(note, table), ...]
        (f"Equal steps ({matrix.max_steps} optimizer steps)" if matrix.max_steps else "Equal steps",
         [(None, steps_table), (PAIRED_NOTE, format_paired(rows, "equal_steps", matrix.baselines))]),
    ]  # fmt: skip
    if ec is not None:
        short = [cell for row in rows for cell in row.get("equal_compute", {}).get("short_of_target", [])]
        table = format_table(rows, "equal_compute")
        if short:
            table += (f"\n\nShort of the target (read at their last step, {ec.max_steps}: raise equal_compute.max_steps): "
                      + ", ".join(short))  # fmt: skip
        sections.append((f"Equal compute (the compute of `{ec.reference}`; at most {ec.max_steps} steps)",
                         [(None, table), (PAIRED_NOTE, format_paired(rows, "equal_compute", matrix.baselines))]))
    compared = against_reference(matrix, rows)
    keys = [k for k in PAIRED_KEYS if any(k in c["paired"] for c in compared)]
    reference_table = (f"Reference: `{matrix.clean_reference}`.\n\n" + _markdown(
        ["method", "budget (samples x tokens)", *[f"Δ {PAIRED_LABELS[k]} vs clean [95% CI]" for k in keys]],
        [[c["method"], c["budget_label"], *[_format_difference(c["paired"].get(k)) for k in keys]] for c in compared],
    )) if keys else None  # fmt: skip
    sections += [("Against the clean reference", [(REFERENCE_NOTE, reference_table)]),
                 ("Label noise audit", [(AUDIT_NOTE, format_audit(rows))])]
    sections = [(title, [(note, table) for note, table in parts if table]) for title, parts in sections]
    sections = [(title, parts) for title, parts in sections if parts]
    with_contrast = any(k.startswith("eval/contrast") for r in rows for k in r.get("metrics", {}))
    print(f"Results ({status}):", file=out)
    if untrained:
        print(untrained[2:], file=out)
    for title, parts in sections:  # the page's sections without their notes
        print(f"\n## {title}\n" + "\n\n".join(table for _, table in parts), file=out)
    print("\n" + TABLE_NOTE, file=out)

    matrix.output_dir.mkdir(parents=True, exist_ok=True)
    figures = draw_curves(matrix, results, matrix.output_dir)
    lines = [
        f"# Benchmark: {matrix.experiment}",
        "",
        f"- command: `{command}`",
        f"- commit: {commit_text}" + (f"; cells ran at {', '.join(commits)}" if commits else ""),
        f"- date: {now}",
        (f"- machine: {machine.get('cpu')}, {machine.get('cpu_count')} CPU cores, torch threads "
         f"{machine.get('torch_threads', '?')}, GPU {machine.get('gpu') or 'none'}; {machine.get('platform')}"),
        *([f"- cells ran on: {machines}"] if machines else []),
        *([untrained] if untrained else []),
        *([f"- cells ran with: {cell_versions}"] if (cell_versions := _cell_versions_line(results)) else []),
        "- rendered with: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v),
        f"- cells: {status}",
        "",
        TABLE_NOTE,
        "",
        *([CONTRAST_NOTE, ""] if with_contrast else []),
    ]  # fmt: skip
    for title, parts in sections:
        lines += [f"## {title}", ""]
        lines += [line for note, table in parts for line in [*([note, ""] if note else []), table, ""]]
    if figures:
        lines += ["## Curves", ""] + [f"![{name}]({name})" for name in figures] + [""]
    lines += [f"## Matrix (`{matrix.path}`)", "", "```yaml", matrix.text.rstrip(), "```", ""]
    (matrix.output_dir / RESULTS_MD).write_text("\n".join(lines), encoding="utf-8")
    write_json(matrix.output_dir / RESULTS_JSON, {
        "experiment": matrix.experiment, "generated": now, "command": command, "git": git, "machine": machine,
        "versions": versions, "untrained_nll": {f"{v:.6f}": cells for v, cells in sorted(numerics.items())},
        "matrix_file": str(matrix.path), "matrix": matrix.text, "note": TABLE_NOTE,
        "rows": rows, "missing": missing, "cells": results, "figures": figures,
        **({"against_reference": {"matrix": matrix.clean_reference, "rows": compared}} if compared else {}),
    })  # fmt: skip
    log_summary(matrix, [matrix.output_dir / name for name in (RESULTS_MD, RESULTS_JSON, *figures)])
    print(f"\nWritten: {matrix.output_dir / RESULTS_MD} and {matrix.output_dir / RESULTS_JSON}", file=out)
    return steps_table
