"""The evaluate stage on CPU with the tiny random model: generation, grading, metrics and bad input."""

import json
import logging
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from stages import evaluate, generation, params
from tests import eval_data, magpie_data
from tests.conftest import ROOT, set_params, splits_table


def make_adapter(model_dir: Path, out: Path) -> Path:
    """A LoRA adapter with random (non-zero) weights on the tiny model, as the train stage saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"))


@pytest.fixture
def project(tmp_path, tiny_model_dir, tiny_adapter, monkeypatch) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"].update(name=str(tiny_model_dir), max_seq_length=1024)
    raw["eval"].update(limit=2, samples=2, max_new_tokens=8)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    eval_data.write_sets(tmp_path / "data" / "eval" / "sets", tmp_path / "src")
    (tmp_path / "data" / "splits").mkdir(parents=True)
    pq.write_table(splits_table(magpie_data.clean_rows(3)), tmp_path / "data" / "splits" / "test.parquet")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "adapter").symlink_to(tiny_adapter)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_evaluate_reports_both_models_on_every_set_with_the_delta(project):
    evaluate.main([])
    metrics = json.loads((project / "metrics" / "eval.json").read_text())
    for model in ("base", "finetuned"):
        assert set(metrics[model]) == {"heldout", "gsm8k", "math500"}
        for values in metrics[model].values():
            assert values["problems"] == 2 and values["samples"] == 4
            assert 0 <= values["accuracy"] <= 1
            assert values["response_tokens_mean"] <= 8
    delta = metrics["delta"]["gsm8k"]["response_tokens_mean"]
    assert delta == pytest.approx(metrics["finetuned"]["gsm8k"]["response_tokens_mean"]
                                  - metrics["base"]["gsm8k"]["response_tokens_mean"], abs=1e-3)
    samples = pd.read_parquet(project / "data" / "eval" / "samples.parquet")
    assert len(samples) == 2 * 3 * 2 * 2
    assert {"problem", "gold", "response", "extracted_answer", "correct", "second_guesses"} <= set(samples.columns)
    assert set(samples.loc[samples["set"] == "gsm8k", "gold"]) == {"72", "10"}
    base_plot = json.loads((project / "metrics" / "eval_plot" / "base.json").read_text())
    assert {"metric": "gsm8k accuracy", "value": metrics["base"]["gsm8k"]["accuracy"]} in base_plot


def test_the_adapter_changes_what_the_model_generates(project):
    evaluate.main([])
    samples = pd.read_parquet(project / "data" / "eval" / "samples.parquet")
    base = samples[samples["model"] == "base"]["response"].tolist()
    tuned = samples[samples["model"] == "finetuned"]["response"].tolist()
    assert base != tuned


def test_a_second_run_reuses_generations_when_only_grading_changes(project, caplog):
    evaluate.main([])
    set_params(project, "eval", loop_repeats=3, second_guess_markers=["wait"])
    with caplog.at_level(logging.INFO, logger="stages.evaluate"):
        evaluate.main([])
    assert sum("reusing" in r.message for r in caplog.records) == 6
    set_params(project, "eval", max_new_tokens=6)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="stages.evaluate"):
        evaluate.main([])
    assert not any("reusing" in r.message for r in caplog.records)
    assert len(list((project / "data" / "eval" / "generations").glob("*.parquet"))) == 6  # stale ones removed


def test_generate_returns_one_response_per_prompt_and_flags_the_budget(tiny_model_dir, tokenizer):
    model = generation.load_model(params.ModelParams(str(tiny_model_dir), "main", 1024), None)
    config = params.load("eval", ROOT / "params.yaml")
    config = params.EvalParams(**{**config.__dict__, "max_new_tokens": 5, "temperature": 0.0})
    prompts = ["<｜begin▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜><think>\n", "<｜User｜>Hi" * 3]
    outputs = generation.generate(model, tokenizer, prompts, config, seed=0)
    assert len(outputs) == 2
    for output in outputs:
        assert output.n_tokens <= 5 and output.hit_max_tokens == (output.n_tokens == 5)
    assert generation.generate(model, tokenizer, prompts, config, seed=0) == outputs  # greedy: repeatable


def test_summary_counts_accuracy_shares_and_levels():
    rows = pd.DataFrame({
        "model": ["base"] * 2 + ["finetuned"] * 2, "set": ["s"] * 4, "problem_id": ["a", "b"] * 2,
        "level": ["1", "2"] * 2, "correct": [True, False, True, True], "response_tokens": [10, 30, 10, 10],
        "reasoning_tokens": [5, 25, 5, 5], "answer_tokens": [5, 5, 5, 5], "hit_max_tokens": [False, True, False, False],
        "closed_think": [True, False, True, True], "second_guesses": [2, 6, 0, 1],
        "looped": [False, True, False, False], "boxed": [True, False, True, True], "latex": [True] * 4})
    metrics, plot = evaluate.summarize(rows, without_gold=1)
    assert metrics["base"]["s"]["accuracy"] == 0.5 and metrics["finetuned"]["s"]["accuracy"] == 1.0
    assert metrics["base"]["s"]["accuracy_by_level"] == {"1": 1.0, "2": 0.0}
    assert metrics["base"]["s"]["unclosed_think_share"] == 0.5
    assert metrics["delta"]["s"]["second_guesses_per_response"] == pytest.approx(0.5 - 4.0)
    assert metrics["delta"]["s"]["response_tokens_mean"] == pytest.approx(-10.0)
    assert metrics["heldout_without_gold"] == 1
    assert {"metric": "s accuracy", "value": 1.0} in plot["finetuned"]


def test_a_missing_adapter_is_a_clear_error_and_writes_nothing(project):
    (project / "models" / "adapter").unlink()
    with pytest.raises(generation.GenerationError, match="no LoRA adapter"):
        evaluate.main([])
    assert not (project / "metrics").exists()


def test_an_adapter_of_another_base_model_is_refused(project, tmp_path):
    other = tmp_path / "other-adapter"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "someone/other-model"}))
    (project / "models" / "adapter").unlink()
    (project / "models" / "adapter").symlink_to(other)
    with pytest.raises(generation.GenerationError, match="trained on 'someone/other-model'"):
        evaluate.main([])


def test_max_new_tokens_beyond_the_context_is_refused(project):
    set_params(project, "eval", max_new_tokens=5000)
    with pytest.raises(generation.GenerationError, match="exceeds the model's context of 4096"):
        evaluate.main([])
    assert not (project / "data" / "eval" / "samples.parquet").exists()


def test_an_unknown_eval_set_is_named(project):
    set_params(project, "eval", sets=["heldout", "aime"])
    with pytest.raises(evaluate.cli.StageError, match="'aime'"):
        evaluate.main([])


def test_grouped_attention_matches_transformers_sdpa_on_padded_batches(tiny_model_dir, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    grouped = generation.load_model(params.ModelParams(str(tiny_model_dir), "main", 1024), None)
    assert grouped.config._attn_implementation == generation.ATTENTION
    assert grouped.config.num_attention_heads > grouped.config.num_key_value_heads  # the case that matters
    ids = torch.tensor([[1, 1, 1, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
        actual = grouped(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(actual[0, 3:], expected[0, 3:], atol=1e-5)
        assert torch.allclose(actual[1], expected[1], atol=1e-5)
        greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=1, eos_token_id=-1)
        assert torch.equal(grouped.generate(input_ids=ids, attention_mask=mask, **greedy),
                           reference.generate(input_ids=ids, attention_mask=mask, **greedy))


def test_batch_size_on_cpu_is_at_most_16():
    config = params.load("eval", ROOT / "params.yaml")
    assert config.batch_size == "auto"
    assert generation.batch_size(config, model=None, longest_prompt=100) == 16
    fixed = params.EvalParams(**{**config.__dict__, "batch_size": 4})
    assert generation.batch_size(fixed, model=None, longest_prompt=100) == 4
