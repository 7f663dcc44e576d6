"""The bench's second label noise (a carried arithmetic slip) and the contrast evaluations that noise can move."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from trl_qtuning.bench.noise import completion_text, perturb_solution, row_rng, with_text

from .test_bench import _run, _tiny_matrix, _write_matrix, model_dir  # noqa: F401  (model_dir is a fixture)

NATALIA = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


class _Last:
    """A stand-in generator that always takes the last choice (+3 units, or x1.3)."""

    def choice(self, options):
        return options[-1]


class _First:
    def choice(self, options):
        return options[0]


def test_slip_in_the_first_step_is_carried_through_the_chain():
    # 24 -> 24 + 3 = 27 (unit 1: a two-digit number moves in ones); 48 + 27 = 75 everywhere after it.
    assert perturb_solution(NATALIA, _Last()) == (
        "Natalia sold 48/2 = <<48/2=27>>27 clips in May.\n"
        "Natalia sold 48+27 = <<48+27=75>>75 clips altogether in April and May.\n#### 75"
    )


def test_decimal_results_scale_and_the_chain_recomputes():
    # 0.2 x 1.3 = 0.26; 0.26 * 50 = 13. The prose "0.2 x 50" follows the changed number.
    weng = "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nShe earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"
    assert perturb_solution(weng, _Last()) == (
        "Weng earns 12/60 = $<<12/60=0.26>>0.26 per minute.\nShe earned 0.26 x 50 = $<<0.26*50=13>>13.\n#### 13"
    )


def test_units_follow_the_size_of_the_number_and_never_go_below_zero():
    # 1500: unit 100, the first choice -3 -> 1200; 1 - 3 units would be negative, so -1 is the first choice -> 0.
    assert perturb_solution("It costs 3*500 = <<3*500=1500>>1500.\n#### 1,500", _First()) == (
        "It costs 3*500 = <<3*500=1200>>1200.\n#### 1200"
    )
    assert perturb_solution("He has <<3-2=1>>1 left.\n#### 1", _First()) == "He has <<3-2=0>>0 left.\n#### 0"


def test_a_step_that_gives_a_moved_value_again_is_not_moved():
    # 24 -> 27 in the first step; the second step computes 24 again from its own numbers, so its printed 24 stays (a
    # value-keyed map printed 27 after <<12*2=24>>, a second error). Which 24 the last step adds is then ambiguous:
    # the slip reaches no new final answer, and the final number moves instead (48 -> 51).
    solution = "He buys <<4*6=24>>24 eggs. She buys <<12*2=24>>24 eggs. Together <<24+24=48>>48.\n#### 48"
    assert perturb_solution(solution, _Last()) == (
        "He buys <<4*6=24>>24 eggs. She buys <<12*2=24>>24 eggs. Together <<24+24=51>>51.\n#### 51"
    )


def test_a_solution_without_annotations_moves_its_final_number_everywhere():
    assert perturb_solution("3 apples and 4 more make 7.\n#### 7", _Last()) == "3 apples and 4 more make 10.\n#### 10"
    assert perturb_solution("no numbers here", _Last()) is None


def test_every_train_row_gets_a_different_final_answer():
    from trl_qtuning.bench.evaluation import extract_final_number

    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"
    if not root.exists():
        pytest.skip("the GSM8K data of ../shared is not beside this checkout")
    lines = root.read_text().splitlines()[:400]
    for i, line in enumerate(lines):
        answer = json.loads(line)["answer"]
        wrong = perturb_solution(answer, row_rng(0, str(i)))
        assert wrong is not None and extract_final_number(wrong) != extract_final_number(answer), answer
        assert wrong.count("<<") == answer.count("<<") and wrong.count("\n") == answer.count("\n")


def test_row_rng_is_seeded_by_seed_and_key():
    draws = [row_rng(0, "a").random(), row_rng(0, "a").random(), row_rng(1, "a").random(), row_rng(0, "b").random()]
    assert draws[0] == draws[1] and len(set(draws)) == 3


def test_numbers_noise_corrupts_the_rows_a_swap_would():
    from trl_qtuning.bench.data import _arithmetic_rows, corrupt_answers, corrupt_numbers
    from trl_qtuning.bench.evaluation import extract_final_number

    train = _arithmetic_rows(20, 0, 0.0)
    swapped, swapped_ids = corrupt_answers(train, 0.3, seed=4)
    altered, altered_ids = corrupt_numbers(train, 0.3, seed=4)
    assert altered_ids == swapped_ids and len(altered_ids) == 6
    for i in range(20):
        before, after = train[i]["completion"][0]["content"], altered[i]["completion"][0]["content"]
        assert (before != after) == (i in altered_ids)
        if i in altered_ids:  # the same words, another final number
            assert extract_final_number(before) != extract_final_number(after)
            assert [w for w in before.split() if not w.isdigit()] == [w for w in after.split() if not w.isdigit()]
    assert corrupt_numbers(train, 0.3, seed=4)[0]["completion"] == altered["completion"]  # deterministic


def test_matrix_noise_type_is_checked_and_swap_hashes_as_before(tmp_path, model_dir):  # noqa: F811
    from trl_qtuning.bench.matrix import load_matrix

    def load(train: dict):
        matrix = _tiny_matrix(tmp_path, model_dir, data={"train": train, "heldout_size": 8})
        return load_matrix(_write_matrix(tmp_path / "m.yaml", matrix))

    base = {"source": "arithmetic", "size": 32, "seed": 0, "label_noise": 0.3}
    assert load(base).train.as_dict() == load({**base, "label_noise_type": "swap"}).train.as_dict()
    assert load({**base, "label_noise_type": "numbers"}).train.as_dict()["label_noise_type"] == "numbers"
    for train, message in [
        ({**base, "label_noise_type": "typos"}, "data.train.label_noise_type: must be one of swap, numbers"),
        ({**base, "label_noise": 0.0, "label_noise_type": "numbers"}, "has no effect without label_noise"),
    ]:
        with pytest.raises(Exception, match=message):
            load(train)


def test_contrasts_are_log_likelihood_ratios_of_true_and_wrong_answers(model_dir):  # noqa: F811
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_qtuning.bench.contrast import answer_contrasts, contrast_rows
    from trl_qtuning.bench.data import _arithmetic_rows
    from trl_qtuning.bench.evaluation import answer_logprob_sums, answer_sequences

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    rows = [dict(r) for r in _arithmetic_rows(6, 3, 0.0)]
    with torch.no_grad():
        got = answer_contrasts(model, tokenizer, rows, kinds=["swap", "numbers"], seed=0, batch_size=4)
        true, counts = answer_logprob_sums(model, tokenizer, rows, batch_size=4)
        # swap: row j's answer under row j+1's question, per answer token
        swapped = [{**rows[j], "prompt": rows[(j + 1) % 6]["prompt"]} for j in range(6)]
        other, _ = answer_logprob_sums(model, tokenizer, swapped, batch_size=4)
        margins = [(t - o) / c for t, o, c in zip(true, other, counts)]
        assert got["eval/contrast_swap"] == pytest.approx(sum(margins) / 6, abs=1e-9)
        assert got["eval/contrast_swap_win"] == pytest.approx(sum(m > 0 for m in margins) / 6)
        # numbers: one forward of each true answer; at the first token where its slip departs, the true token's
        # log-probability minus the slip's (the prefix is the same, so one distribution gives both)
        indices, wrong = contrast_rows(rows, "numbers", 0)
        assert indices == list(range(6))
        assert all(w["prompt"] == r["prompt"] and w["completion"] != r["completion"] for w, r in zip(wrong, rows))
        true_ids, starts = answer_sequences(tokenizer, rows)
        wrong_ids, _ = answer_sequences(tokenizer, wrong)
        margins = []
        for t, w, start in zip(true_ids, wrong_ids, starts):
            d = next(i for i in range(start, min(len(t), len(w))) if t[i] != w[i])
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([t])).logits[0, d - 1].double(), dim=-1)
            margins.append(float(logprobs[t[d]] - logprobs[w[d]]))
        assert got["eval/contrast_numbers"] == pytest.approx(sum(margins) / 6, abs=1e-5)
        assert got["eval/contrast_numbers_win"] == pytest.approx(sum(m > 0 for m in margins) / 6)
        assert got["eval/contrast_numbers_n"] == 6.0


def test_arithmetic_contrast_reads_the_departure_not_what_follows_it(model_dir, monkeypatch):  # noqa: F811
    """What comes after the first departing token (a slip can lengthen every later number) does not move it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_qtuning.bench import contrast
    from trl_qtuning.bench.data import _arithmetic_rows

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    rows = [dict(r) for r in _arithmetic_rows(4, 3, 0.0)]
    with torch.no_grad():
        plain = contrast.answer_contrasts(model, tokenizer, rows, kinds=["numbers"], seed=0, batch_size=4)
        slip = contrast.contrast_rows
        padded = lambda rows, kind, seed: (  # noqa: E731
            slip(rows, kind, seed)[0],
            [{**w, "completion": with_text(w["completion"], completion_text(w["completion"]) + " and 123.45 more")}
             for w in slip(rows, kind, seed)[1]],
        )
        monkeypatch.setattr(contrast, "contrast_rows", padded)
        longer = contrast.answer_contrasts(model, tokenizer, rows, kinds=["numbers"], seed=0, batch_size=4)
    assert longer == pytest.approx(plain, abs=1e-6)


def test_bench_cell_with_numbers_noise_records_its_rows_and_contrasts(tmp_path, model_dir):  # noqa: F811
    matrix = _tiny_matrix(
        tmp_path, model_dir, report_to="none",
        data={"train": {"source": "arithmetic", "size": 32, "seed": 0, "noisy_share": 0.0, "label_noise": 0.25,
                        "label_noise_type": "numbers"}, "heldout_size": 8},
        eval={"nll": {"batch_size": 8, "max_length": 64}, "contrast": {"kinds": ["swap", "numbers"], "max_length": 64}},
        methods={"full": {"qtuning_enabled": False}, "qtuning-least-suspect": {"fill_rule": "least_suspect"}},
        budgets=[[0.25, 0.5]], baselines=["full"],
    )  # fmt: skip
    matrix["training"]["max_steps"] = 1
    config = _write_matrix(tmp_path / "matrix.yaml", matrix)
    code, out, err = _run(["bench", "--config", str(config)])
    assert code == 0, f"{out}\n{err}"
    results = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "out").glob("*/result.json")}
    cell = results["qtuning-least-suspect_r25x50_seed0"]
    assert cell["noise_type"] == "numbers" and len(cell["corrupted_ids"]) == 8
    assert cell["overrides"] == {"fill_rule": "least_suspect"}
    for result in results.values():
        assert {"eval/contrast_swap", "eval/contrast_numbers", "eval/contrast_swap_win"} <= set(result["metrics"])
    page = (tmp_path / "out" / "results.md").read_text()
    assert "Q-A contrast" in page and "arithmetic contrast" in page
    assert "Δ Q-A contrast vs full" in page
    assert yaml.safe_load(config.read_text())["data"]["train"]["label_noise_type"] == "numbers"


def test_noisy_page_compares_its_full_cells_with_the_clean_reference_seed_by_seed(tmp_path, model_dir, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)  # the reference is named relative to the current directory, as in the recipes
    common = {
        "report_to": "none",
        "eval": {"nll": {"batch_size": 8, "max_length": 64}, "contrast": {"kinds": ["swap"], "max_length": 64}},
        "methods": {"full": {"qtuning_enabled": False}}, "seeds": [0, 1],
    }  # fmt: skip
    clean = _tiny_matrix(tmp_path / "clean", model_dir, **common,
                         data={"train": {"source": "arithmetic", "size": 16, "seed": 0, "noisy_share": 0.0},
                               "heldout_size": 6})  # fmt: skip
    clean["training"]["max_steps"] = 1
    _write_matrix(tmp_path / "clean.yaml", clean)
    noisy = {**clean, "output_dir": str(tmp_path / "noisy" / "out"), "clean_reference": "clean.yaml",
             "data": {"train": {**clean["data"]["train"], "label_noise": 0.5}, "heldout_size": 6}}  # fmt: skip
    _write_matrix(tmp_path / "noisy.yaml", noisy)
    for config in ("clean.yaml", "noisy.yaml"):
        code, out, err = _run(["bench", "--config", config])
        assert code == 0, f"{out}\n{err}"
    read = {name: {p.parent.name: json.loads(p.read_text())["metrics"] for p in (tmp_path / name / "out").glob("full_*/result.json")}
            for name in ("clean", "noisy")}  # fmt: skip
    summary = json.loads((tmp_path / "noisy" / "out" / "results.json").read_text())["against_reference"]
    assert summary["matrix"] == "clean.yaml" and [r["method"] for r in summary["rows"]] == ["full"]
    for key in ("eval/nll", "eval/contrast_swap"):
        diff = summary["rows"][0]["paired"][key]
        expected = [read["noisy"][f"full_seed{s}"][key] - read["clean"][f"full_seed{s}"][key] for s in (0, 1)]
        assert diff["seeds"] == [0, 1] and diff["differences"] == pytest.approx(expected)
    page = (tmp_path / "noisy" / "out" / "results.md").read_text()
    section = page.split("## Against the clean reference")[1].split("## ")[0]
    assert "Reference: `clean.yaml`" in section and "Δ Q-A contrast vs clean [95% CI]" in section
    assert "Q-A contrast" in page.split("## Equal steps")[0]  # the contrast note, where contrasts are shown


def test_clean_reference_must_exist(tmp_path, model_dir, monkeypatch):  # noqa: F811
    from trl_qtuning.bench.matrix import load_matrix

    monkeypatch.chdir(tmp_path)
    config = _write_matrix(tmp_path / "m.yaml", _tiny_matrix(tmp_path, model_dir, clean_reference="nope.yaml"))
    with pytest.raises(Exception, match="clean_reference: file not found: nope.yaml"):
        load_matrix(config)
