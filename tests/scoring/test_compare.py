"""compare (stages.scoring.compare): one run's samples against another's, paired, on CPU without DVC (the
experiments test in test_pipeline.py runs it on two real experiments through DVC)."""

import pandas as pd
import pytest

from stages.scoring import compare, verdict
from tests.scoring.test_verdict import response


def run(correct_finetuned, problems: int = 60, sets: tuple[str, ...] = ("gsm8k",), samples: int = 2) -> pd.DataFrame:
    """A samples table: the base model right on even problems; the fine-tuned right where correct_finetuned(p)."""
    rows = []
    for set_name in sets:
        for p in range(problems):
            for s in range(samples):
                text = {"problem": f"problem {p}"}  # the problem's text, beside its id
                rows.append(response("base", p, set=set_name, sample=s, correct=p % 2 == 0) | text)
                rows.append(response("finetuned", p, set=set_name, sample=s, correct=correct_finetuned(p)) | text)
    return pd.DataFrame(rows)


def test_b_against_a_pairs_the_fine_tuned_models_and_the_bases_are_a_control_that_shows_nothing():
    a, b = run(lambda p: p % 3 == 0), run(lambda p: p % 3 != 2)  # B's fine-tuned: 2/3 right, A's: 1/3
    result = compare.comparison(a, b, ("main", "rank16"), seed=0)
    accuracy = next(r for r in result["finetuned"]["verdict"] if r["measure"] == "accuracy")
    assert accuracy["base"] == pytest.approx(1 / 3) and accuracy["finetuned"] == pytest.approx(2 / 3)
    assert accuracy["verdict"] == verdict.BETTER and accuracy["detectable"] > 0
    control = next(r for r in result["base"]["verdict"] if r["measure"] == "accuracy")
    assert control["delta"] == 0 and control["low"] == control["high"] == 0
    assert control["verdict"] == verdict.NO_DIFFERENCE
    assert result["notes"] == []
    page = compare.markdown(result)
    assert page.startswith("# rank16 against main\n")
    assert "| set | claim | measure | main | rank16 | delta [95% interval] | detectable | verdict |" in page
    assert "- stays accurate (`accuracy`): better on gsm8k" in page
    assert "On gsm8k this evaluation separates accuracy differences of" in page
    assert "## Control: base models" in page


def test_only_the_sets_and_samples_both_runs_answered_are_compared_and_the_rest_is_said():
    a = run(lambda p: True, sets=("gsm8k", "math500"), samples=4)
    b = run(lambda p: True, sets=("gsm8k", "heldout"), samples=2)
    result = compare.comparison(a, b, ("A", "B"), seed=0)
    assert {r["set"] for r in result["finetuned"]["verdict"]} == {"gsm8k"}
    assert result["notes"][0] == "Compared on the sets both evaluated (gsm8k); A only: math500; B only: heldout."
    assert result["notes"][1] == ("360 (set, problem, sample) response(s) of A have no counterpart in the other run "
                                  "and are left out.")  # math500's 60 x 4 and gsm8k's samples 2 and 3: 240 + 120
    assert len(result["notes"]) == 3


def test_runs_with_different_problems_under_one_id_or_no_problem_in_common_are_refused_in_one_line():
    a, b = run(lambda p: True), run(lambda p: True)
    b.loc[b["problem_id"] == "p3", "problem"] = "another problem"
    with pytest.raises(compare.CompareError, match=r"^compare: A and B give 1 problem id\(s\) different problems "
                                                   r"\(e\.g\. gsm8k / p3\)"):
        compare.comparison(a, b, ("A", "B"), seed=0)
    with pytest.raises(compare.CompareError, match="answered no problem in common"):
        compare.comparison(a, run(lambda p: True, sets=("math500",)), ("A", "B"), seed=0)


def test_a_missing_workspace_samples_file_is_named(tmp_path):
    with pytest.raises(compare.CompareError, match=r"samples\.parquet does not exist; run `dvc repro`"):
        compare.read_samples(tmp_path, "workspace")
