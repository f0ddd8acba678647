"""The evaluate stage on CPU with the tiny random model: generation, grading, metrics and bad input."""

import json
import logging
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from stages import evaluate
from stages.core import params
from stages.core.base_model import AdapterError
from stages.core.prompts import THINK_CLOSE
from stages.generation import batched as generation
from stages.scoring import overthinking
from tests import eval_data, magpie_data, tiny_model
from tests.conftest import ROOT, set_params, splits_table
from tests.dvc_stages import stage_args

WORKERS_LOG = evaluate.eval_workers.log.name  # the workers' log lines, as they name their logger


def make_adapter(model_dir: Path, out: Path, modules: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A LoRA adapter with random (non-zero) weights on the tiny model, as the train stage saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    lora = LoraConfig(r=8, lora_alpha=8, target_modules=list(modules), init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"))


@pytest.fixture
def project(tmp_path, tiny_model_dir, tiny_adapter, monkeypatch) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"].update(name=str(tiny_model_dir), max_seq_length=1024)
    raw["eval"].update(limit=2, samples={"default": 2, "math500": 3}, max_new_tokens=8)
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


def test_evaluate_writes_every_graded_generation_of_both_models_on_every_set(project):
    evaluate.main(stage_args("evaluate"))
    counts = json.loads((project / "metrics" / "eval_sets.json").read_text())
    assert counts == {"problems": {"heldout": 2, "gsm8k": 2, "math500": 2},
                      "samples_per_problem": {"heldout": 2, "gsm8k": 2, "math500": 3}, "heldout_without_gold": 0}
    samples = pd.read_parquet(project / "data" / "eval" / "samples.parquet")
    assert len(samples) == 2 * 2 * (2 + 2 + 3)  # models x problems x samples of each set
    assert samples.groupby("set")["sample"].nunique().to_dict() == {"heldout": 2, "gsm8k": 2, "math500": 3}
    assert set(samples["model"]) == {"base", "finetuned"} and set(samples["set"]) == {"heldout", "gsm8k", "math500"}
    from stages.scoring.verdict import MEASURES

    measured = {column for m in MEASURES for column in (m.numerator, m.denominator) if column}
    assert measured <= set(samples.columns)  # everything the report stage computes from
    assert {"problem", "gold", "response", "extracted_answer", "level"} <= set(samples.columns)
    assert (samples["response_tokens"] <= 8).all()
    assert set(samples.loc[samples["set"] == "gsm8k", "gold"]) == {"72", "10"}
    assert samples["outcome_efficiency"].between(0, 1).all()
    assert not (samples["finished"] & samples["hit_max_tokens"]).any()


def test_the_adapter_changes_what_the_model_generates(project):
    evaluate.main(stage_args("evaluate"))
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


def test_a_change_of_grading_alone_regenerates_nothing_but_updates_the_samples(project, generate_calls,
                                                                              monkeypatch):
    evaluate.main(stage_args("evaluate"))
    assert len(generate_calls) == 2  # one call per model, every set's prompts
    before = pd.read_parquet(project / "data" / "eval" / "samples.parquet")
    words = re.findall(r"\b[A-Za-z]+\b", " ".join(before["response"]))
    marker = max(sorted(set(words)), key=words.count)  # a word the responses contain, so the count moves
    change_golds(project)
    set_params(project, "eval", loop_repeats=4)
    monkeypatch.setattr(overthinking, "SECOND_GUESS_REGEX", rf"\b{marker}\b")  # markers are code, not params
    generate_calls.clear()
    evaluate.main(stage_args("evaluate"))
    assert generate_calls == []
    after = pd.read_parquet(project / "data" / "eval" / "samples.parquet")
    assert after["response"].tolist() == before["response"].tolist()
    assert set(after.loc[after["set"] == "gsm8k", "gold"]) == {"720", "100"}
    assert set(after.loc[after["set"] == "heldout", "gold"]) == {"1000", "1001"}
    # counted by the product's counter (Arrow's RE2, whose \b and case folding differ from Python's re on some
    # letters: "t" counts in "tä") on each response's reasoning, split here
    reasonings = [r.rpartition("</think>")[0] or r for r in after["response"]]
    assert after["second_guesses"].tolist() == overthinking.second_guess_counts(reasonings).tolist()
    assert after["second_guesses"].sum() > 0


def test_a_change_of_prompt_rendering_regenerates(project, generate_calls, monkeypatch):
    evaluate.main(stage_args("evaluate"))
    generate_calls.clear()

    def with_system_prompt(tokenizer, instruction: str, directive: str) -> str:
        return tokenizer.apply_chat_template([{"role": "system", "content": "Reason step by step."},
                                              {"role": "user", "content": instruction}],
                                             tokenize=False, add_generation_prompt=True)

    monkeypatch.setattr("stages.core.prompts.prompt_text", with_system_prompt)
    evaluate.main(stage_args("evaluate"))
    assert len(generate_calls) == 2  # one call per model, every set's prompts
    assert all("Reason step by step." in prompt for call in generate_calls for prompt in call)
    assert len(list((project / "data" / "eval" / "generations").glob("*.parquet"))) == 6


def test_the_generation_code_in_the_cache_key_is_every_module_of_the_generation_package():
    package = ROOT / "stages" / "generation"
    assert set(evaluate.GENERATION_CODE) == set(package.glob("*.py"))
    assert {"batched.py", "continuous.py", "workers.py"} <= {path.name for path in evaluate.GENERATION_CODE}


def test_a_change_of_generation_code_regenerates(project, generate_calls, monkeypatch, tmp_path):
    edited = "continuous.py"
    evaluate.main(stage_args("evaluate"))
    generate_calls.clear()
    code = list(evaluate.GENERATION_CODE)
    at = [path.name for path in code].index(edited)
    code[at] = Path(shutil.copy(code[at], tmp_path / edited))
    code[at].write_text(code[at].read_text() + "\n# any edit, even one that changes no output, regenerates\n")
    monkeypatch.setattr(evaluate, "GENERATION_CODE", tuple(code))
    evaluate.main(stage_args("evaluate"))
    assert len(generate_calls) == 2  # one call per model, every set's prompts


@pytest.mark.parametrize("change", [{"max_new_tokens": 6}, {"batching": "padded"}, {"kv_cache": "fp8"}])
def test_a_second_run_reuses_generations_unless_sampling_changes(project, caplog, change):
    evaluate.main(stage_args("evaluate"))
    with caplog.at_level(logging.INFO, logger="stages"):
        evaluate.main(stage_args("evaluate"))
    assert sum("reusing" in r.message for r in caplog.records) == 6
    set_params(project, "eval", **change)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="stages"):
        evaluate.main(stage_args("evaluate"))
    assert not any("reusing" in r.message for r in caplog.records)
    assert len(list((project / "data" / "eval" / "generations").glob("*.parquet"))) == 6  # stale ones removed


def test_generate_returns_one_response_per_prompt_and_flags_the_budget(tiny_model_dir, tokenizer):
    model = generation.load_model(params.ModelParams(str(tiny_model_dir), "main", 1024, ""), None)
    config = params.load("eval", ROOT / "params.yaml")
    config = params.EvalParams(**{**config.__dict__, "max_new_tokens": 5, "temperature": 0.0})
    prompts = ["<｜begin▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜><think>\n", "<｜User｜>Hi" * 3]
    outputs = generation.generate(model, tokenizer, prompts, config, seed=0)
    assert len(outputs) == 2
    for output in outputs:
        assert output.n_tokens <= 5 and output.hit_max_tokens == (output.n_tokens == 5)
        assert output.reasoning_tokens + output.answer_tokens <= output.n_tokens
    assert generation.generate(model, tokenizer, prompts, config, seed=0) == outputs  # greedy: repeatable


def test_merging_the_adapter_in_place_reuses_the_compiled_decode_step_with_the_merged_weights(tiny_model_dir,
                                                                                            tiny_adapter):
    import torch

    from tests.generation.test_continuous import COMPILE_BUDGETS, COMPILE_PROMPTS, run_engine

    model_params = params.ModelParams(str(tiny_model_dir), "main", 1024, "")
    model = generation.load_model(model_params, None)
    base, _ = run_engine(model, COMPILE_PROMPTS, COMPILE_BUDGETS, compile=True)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert generation.merge_adapter(model, tiny_adapter) is model
    merged, engine = run_engine(model, COMPILE_PROMPTS, COMPILE_BUDGETS, compile=True)
    assert engine.stats.compiled and torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    fresh, _ = run_engine(generation.load_model(model_params, tiny_adapter), COMPILE_PROMPTS, COMPILE_BUDGETS)
    assert merged == fresh != base  # the reused step decodes with the merged weights


def test_one_process_loads_the_model_once_and_merges_the_adapter_into_it_for_the_finetuned_sets(project,
                                                                                               monkeypatch):
    calls, real = [], generation.generate

    def spy(model, tokenizer, prompt_texts, config, seed, **kwargs):
        outputs = real(model, tokenizer, prompt_texts, config, seed, **kwargs)
        calls.append((model, tokenizer, prompt_texts, config, seed, kwargs["keys"], outputs))
        return outputs

    monkeypatch.setattr(generation, "generate", spy)
    evaluate.main(stage_args("evaluate"))
    (base_model, *_), (tuned_model, tokenizer, prompt_texts, config, seed, keys, outputs) = calls
    assert tuned_model is base_model  # one model: loaded once, the adapter merged into it
    model_params = params.load("model", project / "params.yaml")
    fresh = generation.load_model(model_params, project / "models" / "adapter")
    assert real(fresh, tokenizer, prompt_texts, config, seed, keys=keys) == outputs  # a fresh merged model's


def test_every_sample_row_counts_reasoning_and_answer_within_the_response(project):
    evaluate.main(stage_args("evaluate"))
    samples = pd.read_parquet(project / "data" / "eval" / "samples.parquet")
    assert (samples["reasoning_tokens"] + samples["answer_tokens"] <= samples["response_tokens"]).all()
    # the random model may end at once (response = the end token alone): nothing to count then
    assert ((samples["reasoning_tokens"] > 0) | (samples["response"] == "")).all()
    assert (samples["reasoning_tokens"] > 0).mean() > 0.5


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
                         "subject": ["all"], "numeric": [True]})
    for name, (ids, max_new_tokens, expected) in scripts.items():
        # ScriptedModel stands in for transformers' generate: the padded route's interface
        config = params.EvalParams(**{**config.__dict__, "max_new_tokens": max_new_tokens, "batching": "padded"})
        outputs = generation.generate(ScriptedModel(ids), tokenizer, ["prompt"], config, seed=0)
        row = evaluate.sample_rows("base", "s", problems, outputs, 1, config, tokenizer).iloc[0]
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


def test_a_missing_adapter_is_a_clear_error_and_writes_nothing(project):
    (project / "models" / "adapter").unlink()
    with pytest.raises(AdapterError, match="no LoRA adapter"):
        evaluate.main(stage_args("evaluate"))
    assert not (project / "metrics").exists()


def test_an_adapter_of_another_base_model_is_refused(project, tmp_path):
    other = tmp_path / "other-adapter"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "someone/other-model"}))
    (project / "models" / "adapter").unlink()
    (project / "models" / "adapter").symlink_to(other)
    with pytest.raises(AdapterError, match="trained on 'someone/other-model'"):
        evaluate.main(stage_args("evaluate"))


def test_max_new_tokens_beyond_the_context_is_refused(project):
    set_params(project, "eval", max_new_tokens=5000)
    with pytest.raises(generation.GenerationError, match="exceeds the model's context of 4096"):
        evaluate.main(stage_args("evaluate"))
    assert not (project / "data" / "eval" / "samples.parquet").exists()


def test_an_unknown_eval_set_is_named(project):
    set_params(project, "eval", sets=["heldout", "aime"])
    with pytest.raises(evaluate.cli.StageError, match="'aime'"):
        evaluate.main(stage_args("evaluate"))


def test_grouped_attention_matches_transformers_sdpa_on_padded_batches(tiny_model_dir, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    grouped = generation.load_model(params.ModelParams(str(tiny_model_dir), "main", 1024, ""), None)
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


def test_auto_batch_size_on_a_gpu_carries_twice_the_responses_over_an_eight_bit_cache(monkeypatch):
    monkeypatch.setattr(generation.torch.cuda, "is_available", lambda: True)
    config = params.load("eval", ROOT / "params.yaml")
    assert generation.batch_size(config, model=None, longest_prompt=100, paged=True) == 512
    eight_bit = params.EvalParams(**{**config.__dict__, "kv_cache": "fp8"})
    assert generation.batch_size(eight_bit, model=None, longest_prompt=100, paged=True) == 1024
    fixed = params.EvalParams(**{**eight_bit.__dict__, "batch_size": 256})
    assert generation.batch_size(fixed, model=None, longest_prompt=100, paged=True) == 256


def test_a_change_of_model_directive_regenerates_with_the_new_prompts(project, generate_calls):
    evaluate.main(stage_args("evaluate"))
    assert all(prompt.count("\\boxed{}") == 1 for call in generate_calls for prompt in call)  # the default
    generate_calls.clear()
    set_params(project, "model", directive="Answer with one number.")
    evaluate.main(stage_args("evaluate"))
    assert len(generate_calls) == 2  # one call per model, every set's prompts
    assert all("\nAnswer with one number.<｜Assistant｜>" in prompt for call in generate_calls for prompt in call)
    assert len(list((project / "data" / "eval" / "generations").glob("*.parquet"))) == 6  # stale ones removed


def test_each_sample_row_measures_how_the_response_reasons(tokenizer):
    config = params.load("eval", ROOT / "params.yaml")
    problems = pa.table({"id": ["p"], "problem": ["What is 2+2?"], "gold": ["4"], "level": ["1"], "subject": ["all"],
                         "numeric": [True]})
    early = ("Two and two. So 2+2 = 4. Wait, let me check again: 2+2 is 4, yes, hmm.</think>\n\n"
             "The answer is \\boxed{4}.")
    wrong = "Two and two make 5.</think>\n\n\\boxed{5}"
    cut = "Two and two make"
    outputs = [generation.Generation(text=text, n_tokens=n, hit_max_tokens=hit, reasoning_tokens=r, answer_tokens=a)
               for text, n, hit, r, a in ((early, 40, False, 30, 9), (wrong, 12, False, 8, 3), (cut, 8, True, 8, 0))]
    rows = pd.concat([evaluate.sample_rows("base", "s", problems, [o], 1, config, tokenizer) for o in outputs])
    assert rows["correct"].tolist() == [True, False, False]
    assert rows["finished"].tolist() == [True, True, False]
    assert rows["second_guesses"].tolist() == [3, 0, 0]  # "Wait", "let me check", "hmm": in the reasoning
    first = len(tokenizer("Two and two. So 2+2 = 4.", add_special_tokens=False)["input_ids"])
    total = len(tokenizer(early, add_special_tokens=False)["input_ids"])
    assert rows["outcome_efficiency"].tolist() == pytest.approx([first / total, 0.0, 0.0])
    assert rows["boxed"].tolist() == [True, True, False]


def test_two_workers_start_once_for_both_models_merge_the_adapter_in_place_and_give_one_processs_samples(
        project, monkeypatch, capfd):
    set_params(project, "eval", num_gpus=1)  # the model card's sampling
    evaluate.main(stage_args("evaluate"))
    alone = pd.read_parquet(project / "data" / "eval" / "samples.parquet")
    generations = project / "data" / "eval" / "generations"
    files_alone = {f.name for f in generations.iterdir()}
    starts, start = [], subprocess.Popen

    def counted(args, **kwargs):
        starts.append(args[-1])  # the worker's number
        return start(args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", counted)
    set_params(project, "eval", num_gpus=2)  # on CPU: two CPU processes, each with every other prompt
    capfd.readouterr()
    evaluate.main(stage_args("evaluate"))
    assert starts == ["0", "1"]  # one set of workers for the base and the fine-tuned model
    log = capfd.readouterr().err
    # each worker answered its share of every set, one call per model
    assert "base/heldout + base/gsm8k + base/math500 [worker 1]" in log
    assert "finetuned/heldout + finetuned/gsm8k + finetuned/math500 [worker 0]" in log
    for worker in (0, 1):
        assert log.count(f"worker {worker} {WORKERS_LOG}: finetuned: merging the adapter into the loaded model") == 1
        # each start part timed, the time of day to the millisecond
        for part in ("loaded the base model", "finetuned: merged the adapter"):
            timed = rf"\d\d:\d\d:\d\d\.\d{{3}} worker {worker} {re.escape(WORKERS_LOG)}: {part} in [\d.]+ s"
            assert len(re.findall(timed, log)) == 1
    pd.testing.assert_frame_equal(pd.read_parquet(project / "data" / "eval" / "samples.parquet"), alone)
    files = {f.name for f in generations.iterdir()}
    assert len(files) == 6 and not files & files_alone  # the process count is in the key; one process's files: stale


FAIL_GENERATION = '''  # sitecustomize for worker processes: the one generating $FAIL_GENERATION exits with code 3;
# the one generating $HOLD_GENERATION first waits (a minute at most) until the file $HOLD_UNTIL exists
import os
import sys
import time
from pathlib import Path

if os.environ.get("FAIL_GENERATION"):
    from stages.generation import batched as generation

    real = generation.generate

    def generate(*args, **kwargs):
        if kwargs.get("desc") == os.environ["FAIL_GENERATION"]:
            sys.exit(3)
        if kwargs.get("desc") == os.environ.get("HOLD_GENERATION"):
            deadline = time.monotonic() + 60
            while not Path(os.environ["HOLD_UNTIL"]).exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        return real(*args, **kwargs)

    generation.generate = generate
'''


def test_a_failing_worker_is_one_line_and_keeps_only_the_sets_every_worker_finished(project, tmp_path, monkeypatch,
                                                                                     caplog):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAIL_GENERATION)  # runs first in every worker process
    monkeypatch.setenv("PYTHONPATH", str(hook))
    # worker 1 dies as it starts on the fine-tuned model; worker 0 finishes its share of it
    monkeypatch.setenv("FAIL_GENERATION", "finetuned/heldout + finetuned/gsm8k [worker 1]")
    set_params(project, "eval", sets=["heldout", "gsm8k"], samples=1, num_gpus=2)
    with pytest.raises(evaluate.eval_workers.WorkerError) as error:
        evaluate.main(stage_args("evaluate"))
    assert re.fullmatch(r"evaluate: generation worker 1 of 2 \(CPU\) failed with exit code 3; its log above says "
                        r"why [^\n]*", str(error.value))
    generations = project / "data" / "eval" / "generations"
    kept = sorted(f.name.rsplit("-", 1)[0] for f in generations.iterdir())
    assert kept == ["base-gsm8k", "base-heldout"]  # nothing half-written
    assert not (project / "data" / "eval" / "samples.parquet").exists()
    monkeypatch.delenv("FAIL_GENERATION")
    set_params(project, "eval", sets=["heldout"])  # what the failed run finished is reused
    with caplog.at_level(logging.INFO, logger="stages"):
        evaluate.main(stage_args("evaluate"))
    assert [r.message.split(":")[0] for r in caplog.records if "reusing" in r.message] == ["base / heldout"]
    assert len(pd.read_parquet(project / "data" / "eval" / "samples.parquet")) == 2 * 2


class TouchOnLog(logging.Handler):
    """Creates `path` when a record containing `text` is logged."""

    def __init__(self, text: str, path: Path):
        super().__init__()
        self.text, self.path = text, path

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.path.touch()


def test_a_worker_failing_in_the_finetuned_phase_waits_for_the_base_shares_of_the_others_and_keeps_them(
        project, tmp_path, monkeypatch, caplog):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAIL_GENERATION)
    monkeypatch.setenv("PYTHONPATH", str(hook))
    # worker 1 dies as it starts on the fine-tuned model; worker 0 starts on the base model only once the
    # parent has seen that and said it waits: the two are in different phases when the failure comes
    monkeypatch.setenv("FAIL_GENERATION", "finetuned/heldout + finetuned/gsm8k [worker 1]")
    monkeypatch.setenv("HOLD_GENERATION", "base/heldout + base/gsm8k [worker 0]")
    monkeypatch.setenv("HOLD_UNTIL", str(tmp_path / "parent-waits"))
    waits = TouchOnLog("waiting for", tmp_path / "parent-waits")
    logging.getLogger("stages").addHandler(waits)
    set_params(project, "eval", sets=["heldout", "gsm8k"], samples=1, num_gpus=2)
    try:
        with caplog.at_level(logging.INFO, logger="stages"), \
                pytest.raises(evaluate.eval_workers.WorkerError, match="generation worker 1 of 2"):
            evaluate.main(stage_args("evaluate"))
    finally:
        logging.getLogger("stages").removeHandler(waits)
    assert ("generation worker 1 failed; waiting for worker(s) 0 to write their shares of base/heldout, base/gsm8k "
            "(worker 1 wrote its own), then stopping the others") in caplog.messages
    kept = sorted(f.name.rsplit("-", 1)[0] for f in (project / "data" / "eval" / "generations").iterdir())
    assert kept == ["base-gsm8k", "base-heldout"]
