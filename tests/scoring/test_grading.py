import json
from fractions import Fraction

import pytest

from stages.data.eval_sets import math500, read_files
from stages.scoring import grading
from stages.scoring.grading import grade, gsm8k_gold, last_boxed, plain_number, split_reasoning
from tests.conftest import ROOT

MATH500_TEST = ROOT / "tests" / "assets" / "math500_test.jsonl"


@pytest.mark.parametrize(("gold", "answer", "numeric", "correct"), [
    ("\\frac{1}{2}", "So the answer is $\\boxed{0.5}$.", False, True),
    ("\\frac{1}{2}", "$\\boxed{\\dfrac{1}{2}}$", False, True),
    ("\\frac{1}{2}", "$\\boxed{\\frac{1}{3}}$", False, False),
    ("5", "The side is $\\boxed{5 \\text{ cm}}$.", False, True),
    ("\\text{(B)}", "\\boxed{B}", False, True),
    ("[1,2)", "The set is $\\boxed{[1, 2)}$", False, True),
    ("[1,2)", "The set is $\\boxed{[1, 2]}$", False, False),
    ("3", "First $\\boxed{2}$, no: the answer is $\\boxed{3}$.", False, True),  # the last box counts
    ("2", "First $\\boxed{2}$, no: the answer is $\\boxed{3}$.", False, False),
    ("7", "x equals 7", False, True),  # no box: math-verify's fallback extraction
    ("1234", "She earns $\\boxed{1,234}$ dollars.", True, True),
    ("1234", "She earns \\$1,234 in total.", True, True),
    ("18", "$\\boxed{18.0}$", True, True),
    ("18", "$\\boxed{19}$", True, False),
    ("18", "$\\boxed{\\frac{36}{2}}$", True, True),  # not a plain number: math-verify decides
    ("70000", "$\\boxed{70\\,000}$", True, True),  # thin-space thousands, which math-verify reads as 70*0
    ("70000", "$\\boxed{70\\,000 \\text{ dollars}}$", True, True),
    ("1450000", "$\\boxed{1450001}$", True, False),  # exact: no relative tolerance
    ("1450000", "$\\boxed{1450000.0000001}$", True, False),
    ("1450000", "$\\boxed{1,450,000}$", True, True),
    ("1234", "$\\boxed{1{,}234}$", True, True),
    ("1234", "$\\boxed{1,\\!234}$", True, True),
    ("1234", "The answer is \\$1,234.", True, True),
    ("1234", "$\\boxed{12,34}$", True, False),  # not groups of three: not a thousands separator
    ("2.5", "$\\boxed{2.50}$", True, True),
    ("2.5", "$\\boxed{\\frac{5}{2}}$", True, True),
    ("2.5", "$\\boxed{2.49}$", True, False),
    ("-3", "$\\boxed{-3}$", True, True),
    ("-3", "$\\boxed{3}$", True, False),
    ("-1234", "$\\boxed{-\\$1,234}$", True, True),
    ("25", "$\\boxed{25\\%}$", True, True),  # GSM8K's percent golds are the number
    ("25", "$\\boxed{26\\%}$", True, False),
    ("58,500", "$\\boxed{58\\,500}$", True, True),  # a MATH-500 gold; eval_sets marks it numeric
    ("58,500", "$\\boxed{58500}$", True, True),
    ("3", "", False, False),
    ("3", None, False, False),
])
def test_grade(gold, answer, numeric, correct):
    assert grade(gold, answer, numeric)[0] is correct


def test_grade_reports_the_extracted_answer():
    assert grade("3", "so $\\boxed{x = 3}$", False)[1] == "x = 3"


def test_last_boxed_balances_braces():
    assert last_boxed("\\boxed{1} and \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert last_boxed("no box") is None


def test_gsm8k_gold_is_the_number_after_the_marker():
    assert gsm8k_gold("She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 1,018") == "1018"


def test_split_reasoning_needs_the_closing_tag():
    assert split_reasoning("think a</think>\n\nanswer") == ("think a", "\n\nanswer")
    assert split_reasoning("still thinking") == ("still thinking", None)


@pytest.mark.parametrize(("text", "value"), [
    ("1,234.50", Fraction(2469, 2)), ("-\\$1{,}000", Fraction(-1000)), ("70\\,000", Fraction(70000)),
    (".5", Fraction(1, 2)), ("25\\%", Fraction(25)), ("18 \\text{ apples}", Fraction(18)),
    ("1,2", None), ("x = 3", None), ("\\frac{1}{2}", None), ("5 \\text{ or } 7", None), ("", None),
])
def test_plain_number_is_exact_and_only_for_one_number(text, value):
    assert plain_number(text) == value


def test_math500_reference_solutions_grade_correct_against_their_answers():
    """Every MATH-500 reference solution's last box against its answer, as evaluate grades them."""
    rows = [json.loads(line) for line in MATH500_TEST.read_text().splitlines()]
    problems = math500(read_files([MATH500_TEST]), "math500", str(MATH500_TEST))
    assert len(rows) == problems.num_rows == 500
    wrong = [(p["id"], p["gold"]) for row, p in zip(rows, problems.to_pylist(), strict=True)
             if not grade(p["gold"], row["solution"], p["numeric"])[0]]
    assert wrong == []
    assert sum(problems["numeric"].to_pylist()) > 300  # most golds are plain numbers and take the exact path


@pytest.mark.parametrize(("answer", "parses"), [
    ("So \\boxed{\\frac{1}{2}}.", True), ("\\boxed{x^2+1}", True), ("\\boxed{7} and then \\boxed{8}", True),
    ("\\boxed{???}", False), ("\\boxed{}", False), ("\\boxed{ }", False), ("The answer is 7.", False), (None, False)])
def test_a_boxed_answer_parses_when_math_verify_reads_a_value_from_its_last_box(answer, parses):
    assert grading.boxed_parses(answer) is parses
