"""The evaluate stage on CPU with the tiny random model: generation, grading, metrics and bad input."""

import json
import logging
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from stages import evaluate, generation, params
from stages.overthinking import marker_pattern, second_guesses
from stages.prompts import THINK_CLOSE
from tests import eval_data, magpie_data, tiny_model
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


@pytest.fixture
def generate_calls(monkeypatch) -> list[list[str]]:
    """The prompts of every generation.generate call from now on (the real one still runs)."""
    calls, real = [], generation.generate

    def spy(model, tokenizer, prompt_texts, *args, **kwargs):
        calls.append(prompt_texts)
        return real(model, tokenizer, prompt_texts, *args, **kwargs)

    monkeypatch.setattr(generation, "generate", spy)
    return calls


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


def change_golds(project: Path) -> None:
    """New gold answers in every set, problems untouched: GSM8K's and MATH-500's set files, and the
    reference answers of the test split (where heldout's golds are extracted from)."""
    sets = project / "data" / "eval" / "sets"
    for name in ("gsm8k", "math500"):
        table = pq.read_table(sets / f"{name}.parquet")
        golds = pa.array([f"{gold}0" for gold in table["gold"].to_pylist()])
        pq.write_table(table.set_column(table.schema.get_field_index("gold"), "gold", golds), sets / f"{name}.parquet")
    split = project / "data" / "splits" / "test.parquet"
    table = pq.read_table(split)
    answers = pa.array([f"{answer} So \\boxed{{{i + 1000}}}." for i, answer in enumerate(table["answer"].to_pylist())])
    pq.write_table(table.set_column(table.schema.get_field_index("answer"), "answer", answers), split)


def test_a_change_of_grading_alone_regenerates_nothing_but_updates_the_metrics(project, generate_calls):
    evaluate.main([])
    assert len(generate_calls) == 6
    before = pd.read_parquet(project / "data" / "eval" / "samples.parquet")
    words = re.findall(r"\b[A-Za-z]+\b", " ".join(before["response"]))
    marker = max(set(words), key=words.count)  # a word the responses contain, so the count moves
    change_golds(project)
    set_params(project, "eval", loop_repeats=3, second_guess_markers=[marker])
    generate_calls.clear()
    evaluate.main([])
    assert generate_calls == []
    after = pd.read_parquet(project / "data" / "eval" / "samples.parquet")
    assert after["response"].tolist() == before["response"].tolist()
    assert set(after.loc[after["set"] == "gsm8k", "gold"]) == {"720", "100"}
    assert set(after.loc[after["set"] == "heldout", "gold"]) == {"1000", "1001"}
    assert after["second_guesses"].tolist() == [second_guesses(r, marker_pattern([marker])) for r in after["response"]]
    metrics = json.loads((project / "metrics" / "eval.json").read_text())
    assert sum(metrics[m][s]["second_guesses_per_response"] for m in evaluate.MODELS for s in metrics[m]) > 0


def test_a_change_of_prompt_rendering_regenerates(project, generate_calls, monkeypatch):
    evaluate.main([])
    generate_calls.clear()

    def with_system_prompt(tokenizer, instruction: str) -> str:
        return tokenizer.apply_chat_template([{"role": "system", "content": "Reason step by step."},
                                              {"role": "user", "content": instruction}],
                                             tokenize=False, add_generation_prompt=True)

    monkeypatch.setattr("stages.prompts.prompt_text", with_system_prompt)
    evaluate.main([])
    assert len(generate_calls) == 6
    assert all("Reason step by step." in prompt for call in generate_calls for prompt in call)
    assert len(list((project / "data" / "eval" / "generations").glob("*.parquet"))) == 6


def test_a_change_of_generation_code_regenerates(project, generate_calls, monkeypatch, tmp_path):
    evaluate.main([])
    generate_calls.clear()
    changed = tmp_path / "generation.py"
    shutil.copy(evaluate.GENERATION_CODE, changed)
    changed.write_text(changed.read_text() + "\n# any edit, even one that changes no output, regenerates\n")
    monkeypatch.setattr(evaluate, "GENERATION_CODE", changed)
    evaluate.main([])
    assert len(generate_calls) == 6


def test_a_second_run_reuses_generations_unless_sampling_changes(project, caplog):
    evaluate.main([])
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
        assert output.reasoning_tokens + output.answer_tokens <= output.n_tokens
    assert generation.generate(model, tokenizer, prompts, config, seed=0) == outputs  # greedy: repeatable


def test_every_sample_row_counts_reasoning_and_answer_within_the_response(project):
    evaluate.main([])
    samples = pd.read_parquet(project / "data" / "eval" / "samples.parquet")
    assert (samples["reasoning_tokens"] + samples["answer_tokens"] <= samples["response_tokens"]).all()
    assert (samples["reasoning_tokens"] > 0).all()


class ScriptedModel:
    """Stands in for a causal LM: whatever the prompt, it 'generates' the scripted ids."""

    def __init__(self, new_ids: list[int]):
        self.new_ids = new_ids
        self.device = "cpu"
        self.config = SimpleNamespace(max_position_embeddings=4096)

    def generate(self, input_ids, max_new_tokens, **kwargs):
        import torch

        new = torch.tensor(self.new_ids[:max_new_tokens]).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, new], dim=1)


def test_reasoning_and_answer_tokens_are_counted_on_the_generated_ids(tokenizer):
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    reasoning, answer = encode("Let me add 12 and 13."), encode("\n\nThe answer is \\boxed{25}.")
    close, eos = encode(THINK_CLOSE), tokenizer.eos_token_id
    assert len(close) == 1  # one added token, as in R1's tokenizer
    half_e = encode("é")[:1]  # the first byte of a two-byte character: decodes to U+FFFD, which encodes longer
    r, a = len(reasoning), len(answer)
    # name: (generated ids, max_new_tokens, (reasoning, answer, response tokens, closed_think))
    scripts = {"closed and ended": (reasoning + close + answer + [eos], 100, (r, a, r + 1 + a + 1, True)),
               "cut inside a character": (reasoning + half_e, r + 1, (r + 1, 0, r + 1, False)),
               "answer cut inside a character": (reasoning + close + half_e, r + 2, (r, 1, r + 2, True))}
    config = params.load("eval", ROOT / "params.yaml")
    problems = pa.table({"id": ["p"], "problem": ["What is 12 + 13?"], "gold": ["25"], "level": ["1"],
                         "numeric": [True]})
    for name, (ids, max_new_tokens, expected) in scripts.items():
        config = params.EvalParams(**{**config.__dict__, "max_new_tokens": max_new_tokens})
        outputs = generation.generate(ScriptedModel(ids), tokenizer, ["prompt"], config, seed=0)
        row = evaluate.sample_rows("base", "s", problems, outputs, 1, config).iloc[0]
        assert (row["reasoning_tokens"], row["answer_tokens"], row["response_tokens"], row["closed_think"]) \
            == expected, name


def test_a_think_close_of_several_tokens_splits_the_ids_where_the_text_splits(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_model, "SPECIAL", [t for t in tiny_model.SPECIAL if t != THINK_CLOSE])
    corpus = [*tiny_model.CORPUS, "So it is 25.</think>**25** is it."]  # learns merges across the tag's edges
    tokenizer = tiny_model.build_tokenizer(tmp_path, corpus=corpus)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    reasoning, answer = "Let me add 12 and 13.", "**The answer is 25**"
    assert len(encode(THINK_CLOSE)) > 1
    apart = encode(reasoning) + encode(THINK_CLOSE) + encode(answer)
    assert generation.think_token_counts(tokenizer, apart, decode(apart)) == (len(encode(reasoning)),
                                                                              len(encode(answer)))
    together = encode(reasoning + THINK_CLOSE + answer)
    assert {".</", ">**"} <= set(tokenizer.convert_ids_to_tokens(together))  # tokens across both edges
    n_reasoning, n_answer = generation.think_token_counts(tokenizer, together, decode(together))
    assert decode(together[:n_reasoning]) == "Let me add 12 and 13"
    assert decode(together[n_reasoning:len(together) - n_answer]) == ".</think>**"
    assert decode(together[len(together) - n_answer:]) == "The answer is 25**"


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
