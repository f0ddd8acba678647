import copy
import os
import pickle
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from stages import filter as filter_stage
from stages.core.cli import usable_cpus
from stages.core.prompts import encode_pairs, example_texts
from stages.data import screening
from stages.data.magpie import SchemaError, split_response
from tests import magpie_data, tiny_model
from tests.conftest import DIRECTIVE, ROOT
from tests.dvc_stages import stage_args

MAX_TOKENS = 1024  # the tiny tokenizer spends ~4 tokens per word: the clean rows fit, the long one does not


def run_filter(source: Path, out: Path, config, tokenizer, max_tokens=MAX_TOKENS) -> dict:
    counter = screening.TokenCounter(tokenizer, DIRECTIVE) if tokenizer is not None else None
    return filter_stage.filter_files(filter_stage.raw_files(source), out, config, max_tokens, lambda: counter)


def test_each_messy_row_is_dropped_by_its_rule_and_counted(messy_source, tmp_path, filter_params, tokenizer):
    source, cases = messy_source
    out = tmp_path / "filtered.parquet"
    funnel = run_filter(source, out, filter_params, tokenizer)

    expected = Counter(rule for _, rule in cases)
    assert funnel["rows_in"] == len(cases)
    assert funnel["rows_out"] == expected.pop("kept")
    assert {rule: n for rule, n in funnel["dropped"].items() if n} == dict(expected)
    assert funnel["rows_in"] == funnel["rows_out"] + sum(funnel["dropped"].values())

    kept = pq.read_table(out)
    assert kept.num_rows == funnel["rows_out"]
    assert kept.schema == filter_stage.OUTPUT_SCHEMA
    kept_ids = set(kept["id"].to_pylist())
    assert kept_ids == {r["uuid"] for r, rule in cases if rule == "kept"}
    assert sum(funnel["difficulty"].values()) == funnel["rows_out"]
    assert Counter(kept["difficulty"].to_pylist()) == Counter(funnel["difficulty"])


def test_kept_rows_hold_reasoning_and_answer(messy_source, tmp_path, filter_params, tokenizer):
    source, _ = messy_source
    out = tmp_path / "filtered.parquet"
    run_filter(source, out, filter_params, tokenizer)
    first = pq.read_table(out).to_pylist()[0]
    assert "<think>" not in first["reasoning"] and "</think>" not in first["reasoning"]
    assert first["reasoning"].startswith("I add")
    assert first["answer"].startswith("The answer is")


def test_an_example_of_exactly_max_tokens_fits_and_one_token_more_does_not(tokenizer):
    example = ("What is 1 + 2?", "I add them. " * 50, "The answer is 3.")
    prompt, completion = encode_pairs(tokenizer, [example_texts(tokenizer, *example, directive=DIRECTIVE)])
    exact = len(prompt[0]) + len(completion[0])
    count = screening.TokenCounter(tokenizer, DIRECTIVE)
    assert count.tokenizer is None  # a worker gets the template and the Rust tokenizer, not transformers
    trimming = copy.copy(tokenizer)  # a template that rewrites the user turn: each prompt rendered by it
    trimming.chat_template = tokenizer.chat_template.replace("message['content']", "message['content'] | trim")
    rendering = screening.TokenCounter(trimming, DIRECTIVE)
    assert rendering.template is None
    reasoning = len(tokenizer.backend_tokenizer.encode(example[1], add_special_tokens=False))
    for counter in (pickle.loads(pickle.dumps(count)), rendering):
        assert counter(*([part] for part in example)) == ([exact], [reasoning])


def test_length_check_can_be_switched_off(messy_source, tmp_path, filter_params):
    source, _ = messy_source
    config = filter_params.__class__(**{**filter_params.__dict__, "check_length": False})
    funnel = run_filter(source, tmp_path / "f.parquet", config, tokenizer=None)
    assert funnel["dropped"]["too_long"] == 0


def test_deduplication_can_be_switched_off(messy_source, tmp_path, filter_params, tokenizer):
    source, _ = messy_source
    config = filter_params.__class__(**{**filter_params.__dict__, "deduplicate": False})
    funnel = run_filter(source, tmp_path / "f.parquet", config, tokenizer)
    assert funnel["dropped"]["duplicate_instruction"] == 0


@pytest.mark.parametrize(("response", "require_open", "expected"), [
    ("<think>\nr\n</think>\n\na", False, ("r", "a")),
    ("r</think>a", False, ("r", "a")),
    ("r</think>a", True, "no_think_open"),
    ("<think>r", False, "no_think_close"),
    ("<think>r</think>a</think>", False, "multiple_think_close"),
    ("<think> </think>a", False, "empty_reasoning"),
    ("<think>r</think>\n ", False, "empty_answer"),
])
def test_split_response(response, require_open, expected):
    assert split_response(response, require_open) == expected


def test_missing_column_names_the_column_and_the_file(tmp_path, filter_params):
    path = tmp_path / "raw" / "train-00000-of-00001.parquet"
    path.parent.mkdir()
    pq.write_table(magpie_data.table(magpie_data.clean_rows(3)).drop_columns(["input_quality"]), path)
    with pytest.raises(SchemaError, match=r"column 'input_quality' missing in .*train-00000-of-00001\.parquet"):
        run_filter(path.parent, tmp_path / "f.parquet", filter_params, None)
    assert not (tmp_path / "f.parquet").exists()


def test_wrong_column_type_names_the_column(tmp_path, filter_params):
    table = magpie_data.table(magpie_data.clean_rows(3))
    table = table.set_column(table.schema.get_field_index("difficulty"), "difficulty", pa.array([1, 2, 3]))
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(SchemaError, match=r"column 'difficulty' in .*bad\.parquet has type int64"):
        run_filter(tmp_path / "bad.parquet", tmp_path / "f.parquet", filter_params, None)


@pytest.mark.parametrize("content", [b"", b"PAR1 this is not parquet at all PAR1"])
def test_corrupt_or_empty_parquet_names_the_file_and_writes_nothing(tmp_path, filter_params, content):
    raw = tmp_path / "raw"
    magpie_data.write_shards(raw, magpie_data.clean_rows(4), shards=1)
    (raw / "train-00001-of-00002.parquet").write_bytes(content)
    out = tmp_path / "f.parquet"
    with pytest.raises(filter_stage.FilterError, match=r"train-00001-of-00002\.parquet"):
        run_filter(raw, out, filter_params, None)
    assert list(tmp_path.glob("*.parquet")) == [] and list(tmp_path.glob(".f.parquet*")) == []


def test_a_filter_that_keeps_nothing_shows_the_funnel_and_writes_nothing(messy_source, tmp_path, filter_params):
    source, _ = messy_source
    config = filter_params.__class__(**{**filter_params.__dict__, "task_categories": ["Planning"]})
    out = tmp_path / "f.parquet"
    with pytest.raises(filter_stage.FilterError, match=r"no row passed.*task_category=\d+"):
        run_filter(source, out, config, None)
    assert not out.exists() and not list(tmp_path.glob(".f.parquet*"))


def test_empty_source_folder_is_an_error(tmp_path):
    with pytest.raises(filter_stage.FilterError, match="no \\*.parquet files"):
        filter_stage.raw_files(tmp_path)


def test_integer_ids_are_kept_as_text(tmp_path, filter_params):
    table = magpie_data.table(magpie_data.clean_rows(3))
    table = table.set_column(0, "uuid", pa.array([7, 8, 9]))
    pq.write_table(table, tmp_path / "ids.parquet")
    run_filter(tmp_path / "ids.parquet", tmp_path / "f.parquet", filter_params, None)
    assert pq.read_table(tmp_path / "f.parquet")["id"].to_pylist() == ["7", "8", "9"]


def test_rows_matching_an_evaluation_problem_are_counted_as_contaminated(tmp_path, filter_params):
    from stages.data.contamination import ContaminationIndex

    rows = magpie_data.clean_rows(5)
    index = ContaminationIndex([rows[1]["instruction"], rows[3]["instruction"]], filter_params.contamination_ngram)
    pq.write_table(magpie_data.table(rows), tmp_path / "raw.parquet")
    funnel = filter_stage.filter_files([tmp_path / "raw.parquet"], tmp_path / "f.parquet", filter_params, 4096,
                                       lambda: None, index)
    assert funnel["dropped"]["contaminated"] == 2 and funnel["rows_out"] == 3


def test_decontamination_without_evaluation_sets_says_to_fetch_them(tmp_path):
    with pytest.raises(filter_stage.FilterError, match="fetch_eval"):
        filter_stage.contamination_index(tmp_path / "missing", 13)


@pytest.fixture(params=["gpt2_split", "qwen2_split"])
def split_tokenizer(request, tmp_path):
    """Tokenizers with GPT-2's and Qwen2's pre-tokenizers whose vocabularies, like real ones, hold
    tokens for runs of spaces and newlines (where a wrong cut would change the count)."""
    corpus = [*tiny_model.CORPUS, "a  b   c    d\n\n e \n f\t g \t\n h  \n\n  i"]
    return tiny_model.build_tokenizer(tmp_path, qwen_split=request.param == "qwen2_split", corpus=corpus)


WORDS = ["wait", "let", "me", "check", "12", "+", "30", "=", "42", "2024", "x_{17}=0.25", "(3)", "1,000",
         "so", "x", "the", "sum,", "hmm.", "actually",
         "it's", "'s", "'ll", "$\\frac{1}{2}$", "\\boxed{7}", "caf\u00e9", "e\u0301t\u00e9", "\u0301", "(a+b)^2",
         "x\u00a0=\u00a01", "3\u20092", "...", "?!", "\u4e2d\u6587", "so.\n\nThen", "line\nbreak"]
# Every way a space can fail to be a lone space between two non-space characters.
GAPS = ["  ", "   ", "\n ", " \n", "\t ", " \t", "\u00a0 ", " \u2009", " \n\n ", "\u3000 "]


def spaced_text(rng, units: int, gap: str | None = None, edge: str = "") -> str:
    """Reasoning-like text whose words are joined by single spaces, except a few joins that are
    `gap`, and with `edge` at either end."""
    joins = [gap if gap and rng.random() < 0.05 else " " for _ in range(units)]
    text = "".join(rng.choice(WORDS) + join for join in joins).rstrip(" ")
    return edge + text if rng.random() < 0.5 else text + edge


def test_chunked_token_counts_equal_full_encodings(split_tokenizer, monkeypatch):
    """Counting distinct chunks once gives each text's exact token count, for both pre-tokenizers,
    for texts of lone spaces and texts with each kind of irregular space, across calls that reuse
    the chunk cache and calls that overflow it."""
    import random

    rng = random.Random(0)
    count = screening.TokenCounter(split_tokenizer, "")
    assert count.by_chunks
    backend = split_tokenizer.backend_tokenizer
    sizes = []
    for cache_size in (2_000_000, 2_000_000, 50):
        monkeypatch.setattr(screening, "CHUNK_CACHE_SIZE", cache_size)
        texts = [spaced_text(rng, rng.randint(0, 300)) for _ in range(10)]
        texts += [spaced_text(rng, rng.randint(20, 300), gap) for gap in GAPS]
        texts += [spaced_text(rng, rng.randint(0, 50), edge=edge) for edge in (" ", "  ", "\n", " \n", "\u00a0")]
        full = [len(e) for e in backend.encode_batch(texts, add_special_tokens=False)]
        assert count.count(texts) == full
        sizes.append(len(count.chunk_tokens))
    assert sizes[0] < sizes[1] and sizes[2] < sizes[1]  # reused and grown, then restarted when full


def test_digits_are_looked_up_as_zeros_only_where_the_tokenizer_makes_each_digit_a_piece(split_tokenizer, request):
    """Qwen2's pre-tokenizer splits every digit off (so 17 and 42 count alike and share a chunk); GPT-2's keeps
    runs of digits together, whose tokens depend on the digits."""
    qwen = request.node.callspec.params["split_tokenizer"] == "qwen2_split"
    count = screening.TokenCounter(split_tokenizer, "")
    assert count.digits_apart == qwen
    texts = ["x = 2024 and 17 + 42 = 59, so 3.14159 or 1,000,000", "a_{12} = 99 and a_{13} = 100"]
    full = [len(e) for e in split_tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    assert count.count(texts) == full


# A generation prompt that does not end in <think>: the completion then opens with it (the other case: R1's)
OPENING_TEMPLATE = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"


@pytest.mark.parametrize("template", ["r1", "opening"])
def test_examples_counted_from_their_reasonings_equal_full_encodings(split_tokenizer, template):
    """A completion's count comes from its reasoning's chunks with the end chunks exchanged: for reasonings
    of one chunk and of many, with irregular spaces, and answers of one chunk and of many, it equals the
    full encoding of prompt and completion."""
    import random

    from stages.core.prompts import completion_text, prompt_text

    if template == "opening":
        split_tokenizer.chat_template = OPENING_TEMPLATE
    rng = random.Random(1)
    reasonings = ["x", "so.\n\nThen", *(spaced_text(rng, rng.randint(2, 60)) for _ in range(12)),
                  *(spaced_text(rng, rng.randint(20, 60), gap) for gap in GAPS)]
    answers = [rng.choice(["42", "The answer is $\\boxed{7}$.", "so  x\n= 3", "\u4e2d\u6587 ok"]) for _ in reasonings]
    problems = [f"Problem {i}: what is {i} + {i}?" for i in range(len(reasonings))]
    count = screening.TokenCounter(split_tokenizer, "Reason.")
    assert count.by_chunks and (count.template is not None)
    backend = split_tokenizer.backend_tokenizer

    def tokens(text: str) -> int:
        return len(backend.encode(text, add_special_tokens=False))

    expected_examples, expected_reasonings = [], []
    for problem, reasoning, answer in zip(problems, reasonings, answers, strict=True):
        prompt = prompt_text(split_tokenizer, problem, directive="Reason.")
        assert prompt.endswith("<think>\n") == (template == "r1")
        expected_examples.append(tokens(prompt) + tokens(completion_text(prompt, reasoning, answer,
                                                                         split_tokenizer.eos_token)))
        expected_reasonings.append(tokens(reasoning))
    assert count(problems, reasonings, answers) == (expected_examples, expected_reasonings)


def test_a_tokenizer_whose_tokens_span_spaces_is_counted_on_whole_texts():
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())  # no pre-tokenizer: merges may cross spaces
    raw.train_from_iterator(["of the of the of the"] * 50, trainers.BpeTrainer(vocab_size=60))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw)
    count = screening.TokenCounter(tokenizer, "")
    assert not count.by_chunks
    texts = ["of the of the", "the of"]
    assert count.count(texts) == [len(tokenizer(t).input_ids) for t in texts]


def reasoning_row(i: int, reasoning: str, instruction: str | None = None, answer: str | None = None) -> dict:
    answer = f"The answer is $\\boxed{{{i}}}$." if answer is None else answer
    return magpie_data.row(i, instruction=instruction, response=f"<think>\n{reasoning}\n</think>\n\n{answer}")


def expected_rate(reasoning: str, tokenizer) -> float:
    from stages.scoring.overthinking import second_guesses

    tokens = tokenizer.backend_tokenizer.encode(reasoning, add_special_tokens=False)
    return second_guesses(reasoning) * 1000 / len(tokens)


CALM = "I add the two numbers and get the sum, which I then halve to reach the result."
DOUBTING = "I add the numbers. Wait, hmm, let me check. Actually, wait, let me verify it once more."


def test_kept_rows_report_their_second_guess_rates_and_boxed_answer_share(tmp_path, filter_params, tokenizer):
    import numpy as np

    rows = [reasoning_row(i, DOUBTING if i % 4 == 0 else CALM + f" Step {i}.") for i in range(20)]
    rows += [reasoning_row(20 + i, CALM, answer="The answer is 7.") for i in range(5)]  # no \boxed{}
    pq.write_table(magpie_data.table(rows), tmp_path / "raw.parquet")
    funnel = run_filter(tmp_path / "raw.parquet", tmp_path / "f.parquet", filter_params, tokenizer)

    assert funnel["rows_out"] == 25
    rates = [expected_rate(split_response(r["response"], False)[0], tokenizer) for r in rows]
    assert funnel["second_guesses_per_1k"] == pytest.approx(
        {"mean": np.mean(rates), "p50": np.percentile(rates, 50), "p90": np.percentile(rates, 90),
         "p99": np.percentile(rates, 99)})
    assert funnel["second_guesses_per_1k"]["p99"] > funnel["second_guesses_per_1k"]["p50"] == 0  # most rows are calm
    assert funnel["boxed_answer_share"] == pytest.approx(20 / 25)


def test_rows_above_the_second_guess_threshold_are_dropped_and_counted(tmp_path, filter_params, tokenizer):
    rows = [reasoning_row(i, DOUBTING if i % 3 == 0 else CALM) for i in range(30)]
    pq.write_table(magpie_data.table(rows), tmp_path / "raw.parquet")
    threshold = (expected_rate(CALM, tokenizer) + expected_rate(DOUBTING, tokenizer)) / 2
    config = filter_params.__class__(**{**filter_params.__dict__, "max_second_guesses_per_1k": threshold})
    funnel = run_filter(tmp_path / "raw.parquet", tmp_path / "f.parquet", config, tokenizer)

    assert funnel["dropped"]["too_many_second_guesses"] == 10
    assert funnel["rows_out"] == 20 and funnel["rows_in"] == funnel["rows_out"] + sum(funnel["dropped"].values())
    assert all(r["reasoning"] == CALM for r in pq.read_table(tmp_path / "f.parquet").to_pylist())
    assert funnel["second_guesses_per_1k"]["p99"] <= threshold


def test_an_instruction_keeps_its_first_response_under_the_threshold(tmp_path, filter_params, tokenizer):
    rows = [reasoning_row(i, reasoning, instruction="What is 1 + 1?") for i, reasoning in enumerate([DOUBTING, CALM])]
    pq.write_table(magpie_data.table(rows), tmp_path / "raw.parquet")
    config = filter_params.__class__(**{**filter_params.__dict__,
                                        "max_second_guesses_per_1k": expected_rate(CALM, tokenizer) + 1})
    funnel = run_filter(tmp_path / "raw.parquet", tmp_path / "f.parquet", config, tokenizer)
    assert funnel["dropped"]["too_many_second_guesses"] == 1 and funnel["dropped"]["duplicate_instruction"] == 0
    assert pq.read_table(tmp_path / "f.parquet")["reasoning"].to_pylist() == [CALM]


def test_the_second_guess_threshold_is_off_by_default(messy_source, tmp_path, filter_params, tokenizer):
    assert filter_params.max_second_guesses_per_1k is None
    funnel = run_filter(messy_source[0], tmp_path / "f.parquet", filter_params, tokenizer)
    assert funnel["dropped"]["too_many_second_guesses"] == 0


def test_without_a_tokenizer_there_is_no_rate_and_no_threshold(messy_source, tmp_path, filter_params):
    from stages.core.params import ParamsError

    config = filter_params.__class__(**{**filter_params.__dict__, "check_length": False})
    funnel = run_filter(messy_source[0], tmp_path / "f.parquet", config, tokenizer=None)
    assert funnel["second_guesses_per_1k"] is None and funnel["boxed_answer_share"] > 0
    with pytest.raises(ParamsError, match="max_second_guesses_per_1k needs check_length: true"):
        filter_params.__class__(**{**filter_params.__dict__, "check_length": False, "max_second_guesses_per_1k": 5.0})


def test_worker_processes_write_the_bytes_and_the_funnel_of_one_process(messy_source, tmp_path, filter_params,
                                                                      tokenizer, monkeypatch):
    _, cases = messy_source
    source = tmp_path / "row-groups-of-4"  # many parts, with duplicates across them
    magpie_data.write_shards(source, [row for row, _ in cases], shards=2, row_group_size=4)
    monkeypatch.setattr(screening, "PART_ROWS", 7)  # parts of two row groups (parts are made in this process)
    monkeypatch.setattr(screening, "BATCH_ROWS", 3)  # read 3 rows at a time here; spawned workers read 2,048
    counter = screening.TokenCounter(tokenizer, DIRECTIVE)
    results = []
    for processes in (1, 3):
        out = tmp_path / f"filtered-{processes}.parquet"
        funnel = filter_stage.filter_files(filter_stage.raw_files(source), out, filter_params, MAX_TOKENS,
                                           lambda: counter, workers=processes)
        results.append((out.read_bytes(), funnel))
    assert results[0] == results[1]
    funnel = results[0][1]
    assert funnel["rows_in"] == len(cases) > 8 * 3 and funnel["dropped"]["duplicate_instruction"] > 0
    assert funnel["second_guesses_per_1k"]["p99"] > 0  # each kept row's rate, in order


def test_a_tokenizer_that_fails_to_load_while_workers_read_stops_them_and_writes_nothing(messy_source, tmp_path,
                                                                                      filter_params):
    """The workers start before the tokenizer loads (it takes seconds): when loading fails, the error is the
    stage's, the workers waiting for a counter stop instead of waiting for ever, and no output is written."""
    import queue
    import threading

    from stages.core.base_model import ModelLoadError

    def fail() -> None:
        raise ModelLoadError("could not load the tokenizer of model.name='x'")

    source, _ = messy_source
    out, raised = tmp_path / "filtered.parquet", queue.Queue()

    def run() -> None:
        try:
            filter_stage.filter_files(filter_stage.raw_files(source), out, filter_params, MAX_TOKENS, fail,
                                      workers=2)
        except BaseException as e:
            raised.put(e)

    threading.Thread(target=run, daemon=True).start()  # daemon: a hang fails the test instead of stalling pytest
    error = raised.get(timeout=120)
    assert isinstance(error, ModelLoadError) and "model.name='x'" in str(error)
    assert not out.exists() and list(tmp_path.glob("*.parquet*")) == []


def test_auto_workers_are_the_cores_this_process_may_use_but_one_for_a_small_input():
    cores = usable_cpus()
    assert screening.worker_count("auto", 1_000 * screening.PART_ROWS) == cores
    assert screening.worker_count("auto", 2 * screening.PART_ROWS) == min(2, cores)
    assert screening.worker_count("auto", screening.PART_ROWS - 1) == 1  # a start would cost more than it saves
    assert screening.worker_count(3, 10) == 3  # a number is taken as given


def test_an_empty_source_is_named_with_what_to_do_not_as_a_funnel(tmp_path, filter_params):
    pq.write_table(magpie_data.table([]), tmp_path / "empty.parquet")
    with pytest.raises(filter_stage.FilterError, match=r"hold no rows; check data\.source .*\(dvc repro fetch\)"):
        filter_stage.filter_files([tmp_path / "empty.parquet"], tmp_path / "f.parquet", filter_params, 4096,
                                  lambda: None)
    assert not (tmp_path / "f.parquet").exists()


def test_the_stage_run_as_main_by_runpy_screens_in_worker_processes(tmp_path, tiny_model_dir):
    """runpy (as bench/filter_speed.py runs a stage) makes the stage __main__ without a spec that spawned
    processes could import: what the workers are given must come from an importable module."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"].update(name=str(tiny_model_dir), max_seq_length=MAX_TOKENS)
    raw["filter"].update(workers=2, decontaminate=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    magpie_data.write_shards(tmp_path / "data" / "raw", magpie_data.clean_rows(30), shards=2)  # a part each
    runner = (f"import runpy, sys; sys.argv = ['filter', *{stage_args('filter')!r}]; "
              "runpy.run_module('stages.filter', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", runner], cwd=tmp_path, capture_output=True,
                            text=True, env=os.environ | {"PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "screened in 2 process(es)" in result.stderr
    assert pq.read_metadata(tmp_path / "data" / "filtered.parquet").num_rows == 30
