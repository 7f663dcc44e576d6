"""Bad input, numerical faults and a killed run: clear errors or counted skips, never a silent wrong result."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from tests.trainer_helpers import KEPT_DECISIONS, build_trainer
from trl_qtuning import read_ledger

REPO = Path(__file__).resolve().parents[1]


def _ledger(path: Path):
    return read_ledger(path / "qtuning_ledger").to_pandas()


def test_dataset_with_no_trainable_token_after_truncation_fails_at_construction(tmp_path):
    dataset = Dataset.from_list([{"prompt": "what is 1 plus 2 ? " * 10, "completion": " 3"}] * 8)
    with pytest.raises(ValueError, match=r"no sample with a trainable .* all 8 were fully masked .*max_length=8"):
        build_trainer(tmp_path, dataset=dataset, max_length=8)


def test_partly_truncated_dataset_trains_and_warns(tmp_path, caplog):
    rows = [{"prompt": "what is 1 plus 2 ? " * 10, "completion": " 3"}] * 4
    rows += [{"prompt": "what is 1 plus 2 ?", "completion": " 3"}] * 8
    with caplog.at_level(logging.WARNING, logger="trl_qtuning.trainer"):
        trainer = build_trainer(tmp_path, dataset=Dataset.from_list(rows), max_length=12, max_steps=2)
    assert "4 of 12 training samples had no trainable token" in caplog.text
    trainer.train()
    # Ids still point at rows of the dataset as given: the four long prompts (ids 0-3) never appear.
    assert _ledger(tmp_path).sample_id.min() >= 4


def test_empty_completions_train_on_their_single_eos_token(tmp_path):
    dataset = Dataset.from_list([{"prompt": f"what is {i} plus 2 ?", "completion": ""} for i in range(8)])
    trainer = build_trainer(tmp_path, dataset=dataset, max_steps=2, token_keep_ratio=0.5)
    trainer.train()
    ledger = _ledger(tmp_path)
    assert (ledger.response_tokens == 1).all()
    assert (ledger.kept_tokens[ledger.decision.isin(KEPT_DECISIONS)] == 1).all()


def test_batch_of_one_sample(tmp_path):
    # a triage group of one sample can prune nothing (one is always kept) yet pays the scoring pass: refused
    with pytest.raises(ValueError, match="cannot be met: each triage group holds 1 sample"):
        build_trainer(tmp_path, per_device_train_batch_size=1, max_steps=3, sample_keep_ratio=0.125)
    # micro-batches of one, triaged together over 8 accumulation steps: trains, 1 of 8 kept per step
    trainer = build_trainer(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=8, max_steps=2,
                            sample_keep_ratio=0.125)  # fmt: skip
    trainer.train()
    ledger = _ledger(tmp_path)
    assert len(ledger) == 16 and (ledger.groupby("step").decision.apply(lambda d: d.isin(KEPT_DECISIONS).sum()) == 1).all()
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


def test_identical_statistics_keep_exactly_the_budget(tmp_path):
    dataset = Dataset.from_list([{"prompt": "what is 3 plus 4 ?", "completion": " the answer is 7 ."}] * 16)
    trainer = build_trainer(tmp_path, dataset=dataset, per_device_train_batch_size=8, max_steps=2, sample_keep_ratio=0.25)
    trainer.train()
    ledger = _ledger(tmp_path)
    assert (ledger.groupby("step").decision.apply(lambda d: d.isin(KEPT_DECISIONS).sum()) == 2).all()
    assert ledger.ppl.nunique() <= 2  # (equal up to float noise)


def _poison_scoring(trainer, rows: slice | None):
    """Make the scoring forward (eval mode only) produce NaN hidden states for the given rows."""

    def hook(module, args, output):
        if module.training:
            return output
        poisoned = output.clone()
        poisoned[rows if rows is not None else slice(None)] = float("nan")
        return poisoned

    return trainer.model.model.norm.register_forward_hook(hook)


def test_non_finite_statistics_are_dropped_and_counted(tmp_path):
    trainer = build_trainer(
        tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2, sample_keep_ratio=0.5
    )
    _poison_scoring(trainer, slice(0, 1))  # first sample of every micro-batch
    trainer.train()
    ledger = _ledger(tmp_path)
    invalid = ledger[ledger.decision == "invalid"]
    assert len(invalid) == 4 and (invalid.micro_batch.groupby(invalid.step).count() == 2).all()
    assert (ledger.groupby("step").decision.apply(lambda d: d.isin(KEPT_DECISIONS).sum()) == 4).all()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["qtuning/invalid_samples"] for h in logs] == [2.0, 2.0]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)


def test_step_with_nothing_finite_trains_on_nothing_and_says_so(tmp_path, caplog):
    trainer = build_trainer(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    _poison_scoring(trainer, None)
    with caplog.at_level(logging.WARNING, logger="trl_qtuning.trainer"):
        trainer.train()
    assert "kept no sample" in caplog.text and "trains on nothing" in caplog.text
    assert (_ledger(tmp_path).decision == "invalid").all()
    assert trainer.state.global_step == 2
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_model_without_the_fused_head_fails_with_a_clear_message(tmp_path):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    trainer = build_trainer(tmp_path)
    plain = trainer.model.forward

    def forward_without_fused_head(*args, fused_lm_head=False, **kwargs):
        kwargs.pop("labels", None)
        return CausalLMOutputWithPast(logits=plain(*args, **kwargs).logits)

    trainer.model.forward = forward_without_fused_head
    with pytest.raises(RuntimeError, match="fused LM head"):
        trainer.train()


@pytest.mark.parametrize("inference_mode", [True, False])
def test_scoring_runs_without_autograd(tmp_path, inference_mode):
    trainer = build_trainer(tmp_path, sample_keep_ratio=0.5, scoring_inference_mode=inference_mode)
    seen = []
    plain = trainer.model.forward

    def recording(*args, **kwargs):
        seen.append((trainer.model.training, torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return plain(*args, **kwargs)

    trainer.model.forward = recording
    trainer.train()
    scoring = [modes for training, *modes in seen if not training]
    training = [modes for is_training, *modes in seen if is_training]
    assert len(scoring) == 1 and scoring[0] == [inference_mode, False], "eval mode, no autograd"
    assert training == [[False, True]]


def test_sharded_parameters_score_under_no_grad(tmp_path, monkeypatch):
    """FSDP's and ZeRO-3's gathered parameter buffers must not be created in inference mode."""
    from types import SimpleNamespace

    trainer = build_trainer(tmp_path)
    assert trainer._scores_in_inference_mode()
    batch = next(iter(trainer.get_train_dataloader()))
    batch.pop("qtuning_sample_id")
    modes = []
    plain = trainer.model.forward

    def recording(*args, **kwargs):
        modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        return plain(*args, **kwargs)

    monkeypatch.setattr(trainer.model, "forward", recording)
    monkeypatch.setattr(trainer, "is_fsdp_enabled", True)
    trainer._score(dict(batch), None)
    assert modes == [(False, False)]
    monkeypatch.setattr(trainer, "is_fsdp_enabled", False)
    monkeypatch.setattr(trainer, "is_deepspeed_enabled", True)
    for stage, inference in ((2, True), (3, False)):
        plugin = SimpleNamespace(zero_stage=stage)
        monkeypatch.setattr(trainer, "accelerator", SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)))
        assert trainer._scores_in_inference_mode() is inference


def _cache_a_scale_on_first_forward(trainer) -> None:
    """A model that creates a tensor in its first forward (the scoring pass) and multiplies by it in training."""
    embed = trainer.model.get_input_embeddings()
    cache = {}

    def scale(module, inputs, output):
        if "scale" not in cache:
            cache["scale"] = torch.ones(output.shape[-1])
        return output * cache["scale"]

    embed.register_forward_hook(scale)


def test_a_model_caching_tensors_in_the_scoring_forward_gets_a_clear_error_and_a_way_out(tmp_path):
    trainer = build_trainer(tmp_path / "inference", sample_keep_ratio=0.5)
    _cache_a_scale_on_first_forward(trainer)
    with pytest.raises(RuntimeError, match="scoring_inference_mode=False"):
        trainer.train()
    trainer = build_trainer(tmp_path / "no_grad", sample_keep_ratio=0.5, scoring_inference_mode=False)
    _cache_a_scale_on_first_forward(trainer)
    trainer.train()
    assert trainer.state.global_step == 1


def test_end_frees_the_distributed_wrapper_before_destroying_the_process_group(tmp_path, monkeypatch):
    """The DDP wrapper must be gone when the group is destroyed, or the gloo teardown can hang the process at exit."""
    import weakref

    trainer = build_trainer(tmp_path, max_steps=1)
    trainer.train()
    wrapper = torch.nn.ModuleList([trainer.model])  # stands in for DistributedDataParallel(trainer.model)
    trainer.model_wrapped = wrapper
    trainer.accelerator._models.append(wrapper)
    wrapper_alive = weakref.ref(wrapper)
    del wrapper
    alive_at_destroy: list[bool] = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda group=None: alive_at_destroy.append(wrapper_alive() is not None))
    trainer.end()
    assert alive_at_destroy == [False]
    assert trainer.model_wrapped is trainer.model


_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from transformers import TrainerCallback
    from tests.trainer_helpers import build_trainer

    class KillAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == {kill_at}:
                os.kill(os.getpid(), signal.SIGKILL)

    resume = sys.argv[2] == "resume"
    trainer = build_trainer(
        sys.argv[1], callbacks=[] if resume or {kill_at} == 0 else [KillAt()], per_device_train_batch_size=4,
        max_steps=6, save_strategy="steps", save_steps=2, sample_keep_ratio=0.5,
    )
    trainer.train(resume_from_checkpoint=True if resume else None)
    """
)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_accounts_for_every_step_once(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}

    def run(output: Path, mode: str, kill_at: int) -> int:
        script = tmp_path / f"run_{mode}_{kill_at}.py"
        script.write_text(_KILL_SCRIPT.format(repo=str(REPO), kill_at=kill_at))
        return subprocess.run([sys.executable, str(script), str(output), mode], env=env, timeout=300).returncode

    killed = tmp_path / "killed"
    assert run(killed, "fresh", kill_at=5) == -signal.SIGKILL
    assert (killed / "checkpoint-4").exists() and not (killed / "checkpoint-6").exists()
    assert run(killed, "resume", kill_at=5) == 0
    ledger = _ledger(killed)
    assert ledger.groupby("step").size().to_dict() == {step: 4 for step in range(1, 7)}
    assert not ledger.duplicated(["step", "sample_id"]).any()

    clean = tmp_path / "clean"
    assert run(clean, "fresh", kill_at=0) == 0
    columns = ["step", "sample_id", "quadrant", "decision", "kept_tokens"]
    ordered = lambda frame: frame[columns].sort_values(["step", "sample_id"]).reset_index(drop=True)  # noqa: E731
    assert ordered(ledger).equals(ordered(_ledger(clean)))
