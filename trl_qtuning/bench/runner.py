"""Running the cells: resume, train with compute accounting and a learning curve, evaluate, record.

A cell whose ``result.json`` is complete is skipped; a cell folder without one (an interrupted cell) is cleaned and
run again. Within a seed, the equal-compute reference runs first (its final compute is every other cell's target)
and a ``match_label_tokens`` method runs after the method it matches (whose realised label-token share it trains at).
"""

from __future__ import annotations

import contextlib
import gc
import math
import shutil
import time
from pathlib import Path
from typing import Any

from ..audit.api import load_trainable_model
from ..errors import debug_enabled, one_line, quiet_libraries
from ..ledger import LEDGER_DIRNAME
from .data import describe, prepare_data
from .evaluate import CurveRecorder, curve_metrics, evaluate
from .matrix import PROG, BenchConfigError, Cell, Matrix, build_config, cell_config_kwargs, plan_cells, with_defaults
from .mlflow_runs import cell_tags, retire_old_run, run_id_from_disk, send, warn
from .progress import CellProgress, duration
from .provenance import code_state, fingerprint
from .results import RESULT_FILE, cell_record, read_result, write_json

__all__ = ["cell_targets", "run_base_cell", "run_bench", "run_train_cell"]

SUMMARY_METRICS = (("eval/nll", "NLL"), ("eval/nll_transfer", "transfer NLL"), ("eval/gsm8k_em", "GSM8K EM"),
                   ("eval/arc_easy_acc", "ARC-E acc"), ("eval/arc_challenge_acc", "ARC-C acc"))  # fmt: skip


def _lora_config(matrix: Matrix):
    if matrix.lora is None:
        return None
    from peft import LoraConfig

    lora = matrix.lora
    return LoraConfig(r=int(lora["r"]), lora_alpha=lora["alpha"], lora_dropout=float(lora["dropout"]),
                      target_modules=lora["target_modules"], task_type="CAUSAL_LM")  # fmt: skip


def _realised(history: list[dict[str, Any]], qtuning_enabled: bool, max_step: int | None) -> dict[str, float | None]:
    """Mean logged sample keep ratio and label-token share over the steps up to ``max_step`` (the equal-steps
    point; all steps if None). Plain fine-tuning trains every sample and every answer token."""
    if not qtuning_enabled:
        return {"sample_keep_ratio": 1.0, "label_token_share": 1.0}
    within = [e for e in history if max_step is None or int(e.get("step", 0)) <= max_step]

    def mean(key: str) -> float | None:
        values = [float(e[key]) for e in within if key in e and math.isfinite(float(e[key]))]
        return sum(values) / len(values) if values else None

    return {"sample_keep_ratio": mean("qtuning/sample_keep_ratio"), "label_token_share": mean("qtuning/label_token_share")}


def _pooled_label_share(ledger_dir: Path, max_step: int | None) -> float | None:
    """Kept answer tokens over all answer tokens of the steps up to ``max_step``, from the cell's ledger: the share
    a run-wide token budget (``token_budget_scope="run"``) reproduces, unlike the mean of per-step shares."""
    from ..ledger import read_ledger
    from ..step.metrics import realised_budgets

    try:
        table = read_ledger(ledger_dir).select(["step", "response_tokens", "kept_tokens"]).to_pydict()
    except (OSError, ValueError):
        return None
    rows = [i for i, step in enumerate(table["step"]) if max_step is None or step <= max_step]
    sums = {name: sum(table[name][i] for i in rows) for name in ("response_tokens", "kept_tokens")}
    return realised_budgets(sums)["label_token_share"]


def cell_targets(matrix: Matrix, cell: Cell) -> dict[str, Any]:
    """The targets a cell needs from finished cells of the same seed (``compute``: the equal-compute target;
    ``label_share``: the matched label-token share); a missing one is a clear error."""
    targets: dict[str, Any] = {}
    if cell.is_base:
        return targets
    method = matrix.method(cell.method)
    ec = matrix.equal_compute
    if ec is not None and cell.method != ec.reference:
        reference = matrix.method(ec.reference)
        ref_cell = Cell(reference.name, reference.budgets[0], cell.seed)
        done = read_result(matrix.output_dir / ref_cell.dirname, ref_cell)
        if done is None or not (done.get("compute") or {}).get("final"):
            raise RuntimeError(f"equal compute needs the reference cell {ref_cell.id} first (run it, e.g. without "
                               f"--only, or with --only {reference.name})")  # fmt: skip
        targets["compute"] = int(done["compute"]["final"])
    if method.match_label_tokens is not None:
        source = Cell(method.match_label_tokens, cell.budget, cell.seed)
        done = read_result(matrix.output_dir / source.dirname, source)
        realised = (done or {}).get("realised") or {}
        share = realised.get("label_token_share_pooled", realised.get("label_token_share"))
        if share is None:
            raise RuntimeError(f"match_label_tokens needs the cell {source.id} first (run it, e.g. with --only "
                               f"{method.match_label_tokens})")  # fmt: skip
        targets["label_share"] = float(share)
    return targets


def run_base_cell(matrix: Matrix, cell: Cell, data: dict[str, Any], cell_dir: Path) -> dict[str, Any]:
    """Evaluate the untrained model once (its own MLflow run, named ``base``)."""
    import torch
    from transformers import set_seed

    set_seed(0)
    settings = with_defaults(matrix.training)
    bf16 = bool(settings.get("bf16"))
    model, tokenizer, _ = load_trainable_model(matrix.model)  # the demo, a local folder or a LoRA run's output
    if torch.cuda.is_available() and not settings.get("use_cpu"):
        model = model.to("cuda")
    started = time.perf_counter()
    metrics = evaluate(model, tokenizer, matrix, data, bf16=bf16, cell_dir=cell_dir)
    eval_seconds = time.perf_counter() - started
    del model
    gc.collect()
    run_id = None
    if matrix.report_to == "mlflow":
        try:
            import mlflow

            from ..tracking.outputs import TRACKING_DIR
            from ..tracking.sink import MLflowSink

            sink = MLflowSink(
                cell_dir / TRACKING_DIR, tracking_uri=matrix.tracking_uri or mlflow.get_tracking_uri(),
                experiment_name=matrix.experiment, run_name=cell.id,
                tags={"qtuning.method": "base", **cell_tags(matrix, cell)},
            )  # fmt: skip
            sink.log_params({"model": matrix.model, "trained": "false"})
            run_id = send(sink, {**metrics, "eval_seconds": eval_seconds}, step=0)
            sink.end("FINISHED")
            sink.flush(force=True)
        except Exception as exc:
            warn(f"logging the base cell to MLflow failed ({type(exc).__name__}: {one_line(exc)})")
    return cell_record(
        matrix, cell, metrics=metrics, train_seconds=None, eval_seconds=eval_seconds, global_step=0,
        realised={"sample_keep_ratio": None, "label_token_share": None},
        mlflow={"run_id": run_id, "experiment": matrix.experiment} if matrix.report_to == "mlflow" else None,
    )  # fmt: skip


def _noise_audit(matrix: Matrix, data: dict[str, Any], cell_dir: Path, qtuning_enabled: bool) -> dict[str, Any] | None:
    from .audit import audit_ledger, full_data_audit

    corrupted = data.get("corrupted_ids") or []
    if not corrupted:
        return None
    if not qtuning_enabled:
        return full_data_audit(len(data["train"]), corrupted)
    try:  # a finished cell is never thrown away for its audit
        return audit_ledger(cell_dir / LEDGER_DIRNAME, corrupted, max_step=matrix.max_steps)
    except (OSError, ValueError) as exc:
        warn(f"the label noise audit of {cell_dir.name} failed ({type(exc).__name__}: {one_line(exc)})")
        return {"error": one_line(exc), "trained_share_corrupted": None, "by_quadrant": {}, "by_decision": {}}


def run_train_cell(matrix: Matrix, cell: Cell, data: dict[str, Any], cell_dir: Path,
                   targets: dict[str, Any] | None = None, progress: dict[str, Any] | None = None) -> dict[str, Any]:
    """Seed, load a fresh model, train with ``QTuningSFTTrainer`` (counting compute, recording the curve, stopping
    at the equal-compute target), evaluate, log to the training's MLflow run."""
    from transformers import PrinterCallback, set_seed

    from .compute import ComputeMeter
    from ..trainer import QTuningSFTTrainer

    targets = targets if targets is not None else {}
    method = matrix.method(cell.method)
    kwargs = cell_config_kwargs(matrix, cell, method, matched_label_share=targets.get("label_share"))
    set_seed(int(cell.seed or 0))
    config = build_config(kwargs, f"methods.{cell.method}")
    model, tokenizer, _ = load_trainable_model(matrix.model)  # the demo, a local folder or a LoRA run's output
    trainer = QTuningSFTTrainer(
        model=model, args=config, train_dataset=data["train"], processing_class=tokenizer,
        peft_config=_lora_config(matrix),
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)
    tracking = None
    if matrix.report_to == "mlflow":
        from ..tracking import attach_tracking

        tracking = attach_tracking(trainer, tracking_uri=matrix.tracking_uri, experiment=matrix.experiment,
                                   tags=cell_tags(matrix, cell), new_run=True)  # fmt: skip
    meter = ComputeMeter(trainer, target=targets.get("compute"), min_steps=matrix.max_steps or 0)
    bf16 = bool(config.bf16)

    pending: list[tuple[dict[str, float], int]] = []

    def log_point(metrics: dict[str, float], step: int) -> None:
        """To the cell's MLflow run; the step-0 point comes before the run exists and waits for it."""
        pending.append((metrics, step))
        if (sink := getattr(tracking, "sink", None)) is not None:
            with contextlib.suppress(Exception):  # tracking never stops training
                while pending:
                    sink.log_metrics(pending[0][0], step=pending[0][1])
                    pending.pop(0)

    curve = CurveRecorder(
        measure=lambda m: curve_metrics(m, trainer.processing_class, matrix, data, bf16=bf16), meter=meter,
        every_steps=matrix.eval.every_steps, equal_steps=matrix.max_steps,
        log=log_point if matrix.report_to == "mlflow" else None,
    )  # fmt: skip
    if matrix.eval.nll is None or (matrix.eval.every_steps is None and matrix.equal_compute is None):
        curve = None  # with equal compute the curve still records the equal-steps and equal-compute points
    # First in line, so compute/* reach the reporters' on_log and the curve sees this step's compute.
    trainer.callback_handler.callbacks.insert(0, meter)
    if curve is not None:
        trainer.callback_handler.callbacks.insert(1, curve)
    if progress is not None:  # after the meter, so it reads this step's compute
        trainer.callback_handler.callbacks.insert(1, CellProgress(meter=meter, **progress))
    started = time.perf_counter()
    train_output = trainer.train()
    train_seconds = time.perf_counter() - started
    history = trainer.state.log_history
    realised = _realised(history, bool(config.qtuning_enabled), matrix.max_steps)
    realised_all = _realised(history, bool(config.qtuning_enabled), None)
    if config.qtuning_enabled:
        realised["label_token_share_pooled"] = _pooled_label_share(cell_dir / LEDGER_DIRNAME, matrix.max_steps)
    started = time.perf_counter()
    metrics = evaluate(trainer.model, trainer.processing_class, matrix, data, bf16=bf16, cell_dir=cell_dir)
    eval_seconds = time.perf_counter() - started
    final_step = trainer.state.global_step
    at_equal_steps = next((c.cumulative for c in meter.history if c.step == matrix.max_steps), None)
    compute = {
        "final": meter.cumulative, "at_equal_steps": at_equal_steps, "per_trained_token": meter.per_token,
        "target": targets.get("compute"), "reached_target": meter.reached_target if "compute" in targets else None,
        "equal_compute_step": meter.first_step_reaching_target,
        "steps": [vars(c) for c in meter.history],
    }  # fmt: skip
    audit = _noise_audit(matrix, data, cell_dir, bool(config.qtuning_enabled))

    mlflow_info = None
    if matrix.report_to == "mlflow":
        sink = getattr(tracking, "sink", None)
        run_id = None
        if sink is not None:
            extra = {"train_seconds": train_seconds, "eval_seconds": eval_seconds,
                     "compute/forward_token_equivalents": float(meter.cumulative)}  # fmt: skip
            extra.update({f"bench/realised_{k}": v for k, v in realised.items() if v is not None})
            if audit and audit.get("trained_share_corrupted") is not None:
                extra["bench/noise_trained_share_corrupted"] = audit["trained_share_corrupted"]
            run_id = send(sink, {**metrics, **extra}, step=final_step)
        mlflow_info = {"run_id": run_id or run_id_from_disk(cell_dir), "experiment": matrix.experiment}
    return cell_record(
        matrix, cell, metrics=metrics, train_seconds=train_seconds, eval_seconds=eval_seconds,
        global_step=final_step, train_loss=getattr(train_output, "training_loss", None),
        qtuning_enabled=bool(config.qtuning_enabled), overrides=method.overrides, realised=realised,
        realised_all_steps=realised_all, train_rows=len(data["train"]), mlflow=mlflow_info,
        token_keep_ratio=float(config.token_keep_ratio) if config.qtuning_enabled else None,
        matched_label_share=targets.get("label_share"), compute=compute,
        curve=curve.points if curve else None, noise_audit=audit,
        corrupted_ids=data.get("corrupted_ids") or None, noise_type=data.get("noise_type"),
    )  # fmt: skip


def _free_memory() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_bench(matrix: Matrix, *, only: list[str] | None = None, command: str | None = None) -> int:
    """Run every cell not yet finished, then write and print the table. Returns the exit code (1 if a cell failed)."""
    from . import runner  # cells are looked up on the module, so tests can replace them
    from .tables import render_results

    quiet_libraries(warnings_from=r"(transformers|trl|peft|torch|datasets|mlflow)")
    cells = plan_cells(matrix, only)
    code_state()  # the commit of the code this process runs, before any cell trains (results record it)
    matrix.output_dir.mkdir(parents=True, exist_ok=True)
    (matrix.output_dir / "matrix.yaml").write_text(matrix.text, encoding="utf-8")
    print(f"== {PROG}: {len(cells)} cell(s), experiment {matrix.experiment!r}, output {matrix.output_dir} ==", flush=True)
    data = None
    failed: list[str] = []
    durations: list[float] = []  # wall time of the cells this invocation trained, for the overall ETA
    for i, cell in enumerate(cells, 1):
        cell_dir = matrix.output_dir / cell.dirname
        prefix = f"[{i}/{len(cells)}] {cell.id}"
        done = read_result(cell_dir, cell)
        if done is not None:
            stale = "" if done.get("fingerprint") == fingerprint(matrix, cell) else (
                " -- made with other settings than the matrix's now; delete the folder to rerun")
            print(f"{prefix}: skipped (done){stale}", flush=True)
            continue
        try:
            targets = cell_targets(matrix, cell)
        except RuntimeError as exc:
            failed.append(cell.id)
            warn(f"cell {cell.id} cannot run yet: {exc}")
            continue
        if cell_dir.exists():
            print(f"{prefix}: unfinished folder from an earlier run: cleaning it and running again", flush=True)
            retire_old_run(matrix, cell_dir)
            shutil.rmtree(cell_dir)
        if data is None:
            print("Preparing data ...", flush=True)
            data = prepare_data(matrix)
            print(f"  {describe(data)}", flush=True)
        cell_dir.mkdir(parents=True)
        print(f"{prefix}: {'evaluating the untrained model' if cell.is_base else 'training'} ...", flush=True)
        try:
            if cell.is_base:
                record = runner.run_base_cell(matrix, cell, data, cell_dir)
            else:
                started = time.monotonic()
                progress = {"prefix": prefix, "cells_after": sum(not c.is_base for c in cells[i:]),
                            "seconds_per_cell": sum(durations) / len(durations) if durations else None}  # fmt: skip
                record = runner.run_train_cell(matrix, cell, data, cell_dir, targets, progress=progress)
                durations.append(time.monotonic() - started)
        except BenchConfigError:
            raise
        except Exception as exc:
            if debug_enabled():
                raise
            failed.append(cell.id)
            warn(f"cell {cell.id} failed ({type(exc).__name__}: {one_line(exc)}); it will run again next time")
            _free_memory()
            continue
        write_json(cell_dir / RESULT_FILE, record)
        _free_memory()
        timing = "" if record["train_seconds"] is None else f"trained {duration(record['train_seconds'])}, "
        steps = "" if cell.is_base else f"{record['global_step']} steps, "
        run = (record.get("mlflow") or {}).get("run_id")
        print(f"{prefix}: done ({steps}{timing}evaluated {record['eval_seconds']:.0f} s) "
              + ", ".join(f"{label} {record['metrics'][key]:.4g}" for key, label in SUMMARY_METRICS if key in record["metrics"])
              + (f" [MLflow run {run}]" if run else ""), flush=True)  # fmt: skip
    print()
    render_results(matrix, command=command)
    if failed:
        warn(f"{len(failed)} cell(s) failed: {', '.join(failed)}; run the same command again to retry them")
        return 1
    return 0
