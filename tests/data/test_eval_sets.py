import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from stages import fetch_eval
from stages.core import params
from stages.data import sources
from stages.data.contamination import ContaminationIndex
from stages.data.eval_sets import EvalSetError, gsm8k, heldout, math500, numeric, read_files
from tests import eval_data
from tests.conftest import ROOT


def test_gsm8k_gold_is_the_number_after_the_marker_and_numeric(tmp_path):
    table = gsm8k(read_files([eval_data.write_gsm8k(tmp_path)]), "gsm8k", "fixture")
    assert table["gold"].to_pylist() == ["72", "10", "14400"]
    assert all(table["numeric"].to_pylist())


def test_math500_keeps_answer_level_subject_and_id(tmp_path):
    table = math500(read_files([eval_data.write_math500(tmp_path)]), "math500", "fixture")
    assert table["gold"].to_pylist()[1] == "\\frac{5}{6}"
    assert table["level"].to_pylist() == ["level 2", "level 1", "level 3"]
    assert table["subject"].to_pylist() == [subject for _, _, subject, _ in eval_data.MATH500]
    assert len(set(table["subject"].to_pylist())) > 1  # the domain table has groups to compare
    assert table["id"].to_pylist()[0] == "test/Precalculus/0.json"


def test_golds_that_are_plain_numbers_are_marked_numeric(tmp_path):
    golds = ["18", "1,234", "-0.5", "\\$32,\\!348", "\\frac{1}{2}", "(1,2)", "x = 3"]
    assert numeric(golds) == [True] * 4 + [False] * 3
    table = math500(read_files([eval_data.write_math500(tmp_path)]), "math500", "fixture")
    assert table["numeric"].to_pylist() == [False, False, True]
    split = pa.table({"id": ["a", "b"], "instruction": ["q1", "q2"], "reasoning": ["r", "r"],
                      "answer": ["$\\boxed{1,000}$", "$\\boxed{\\sqrt{2}}$"], "difficulty": ["easy", "hard"]})
    assert heldout(split)[0]["numeric"].to_pylist() == [True, False]


def test_an_eval_set_without_its_gold_column_names_it(tmp_path):
    pq.write_table(pa.table({"question": ["q"]}), tmp_path / "bad.parquet")
    with pytest.raises(EvalSetError, match=r"'gsm8k'.*no column\(s\) \['answer'\]"):
        gsm8k(read_files([tmp_path / "bad.parquet"]), "gsm8k", "fixture")


def test_heldout_gold_is_the_last_boxed_answer_and_rows_without_one_are_counted():
    split = pa.table({"id": ["a", "b"], "instruction": ["q1", "q2"], "reasoning": ["r", "r"],
                      "answer": ["so $\\boxed{1}$ or rather $\\boxed{2}$", "no box here"],
                      "difficulty": ["easy", "hard"]})
    table, without_gold = heldout(split)
    assert table["gold"].to_pylist() == ["2"] and without_gold == 1


def test_fetch_eval_writes_every_set_from_local_sources(tmp_path, monkeypatch):
    sources = eval_data.write_all(tmp_path / "src")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, source in sources.items():
        raw["eval_data"][name]["source"] = str(source)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    fetch_eval.main(["--out", "sets"])
    assert sorted(p.name for p in (tmp_path / "sets").iterdir()) == ["gsm8k.parquet", "math500.parquet"]
    assert pq.read_table(tmp_path / "sets" / "math500.parquet").num_rows == 3


def test_unreachable_hub_names_the_eval_set_to_point_elsewhere(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    config = params.load("eval_data", ROOT / "params.yaml")["gsm8k"]
    with pytest.raises(sources.FetchError, match=r"set eval_data\.gsm8k\.source"):
        fetch_eval.fetch_set("gsm8k", config, tmp_path)


def test_unknown_eval_format_is_rejected(tmp_path):
    (tmp_path / "params.yaml").write_text(
        "eval_data: {aime: {source: x/y, revision: main, files: '*.parquet', format: aime}}\n")
    with pytest.raises(params.ParamsError, match="format"):
        params.load("eval_data", tmp_path / "params.yaml")


def test_contamination_catches_normalized_copies_and_long_shared_ngrams():
    index = ContaminationIndex([eval_data.GSM8K[0][0]], ngram=13)
    assert index.contains(eval_data.GSM8K[0][0].upper().replace(" ", "  "))
    assert index.contains("Here is a variant: natalia sold clips to 48 of her friends in April, and then she "
                          "sold half as many clips in June. How many?")
    assert not index.contains("Natalia sold clips to her friends. How many clips were sold in total?")
    words = " ".join(eval_data.GSM8K[0][0].split()[:13])
    assert index.contains(f"Before anything else: {words}")  # the instruction's last n-gram counts
    assert index.contains(words) and not index.contains(words.rsplit(" ", 1)[0])  # n words, then n - 1
