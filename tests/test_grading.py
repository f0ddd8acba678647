import pytest

from stages.grading import grade, gsm8k_gold, last_boxed, split_reasoning


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
