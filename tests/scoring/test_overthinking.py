import pytest

from stages.core import params
from stages.scoring import overthinking
from stages.scoring.overthinking import (
    SECOND_GUESS_MARKERS,
    boxed_answers,
    finished,
    first_correct_position,
    has_boxed,
    loops,
    outcome_efficiency,
    per_1k,
    second_guess_counts,
    second_guesses,
    stated_results,
    uses_latex,
)
from tests.conftest import ROOT

EVAL = params.load("eval", ROOT / "params.yaml")


def test_second_guess_markers_are_counted_case_insensitively_at_word_boundaries():
    text = ("Wait, 2+2=5? Hmm. No, wait: it is 4. Actually, let me double-check: 2+2=4. "
            "Awaiting nothing; the waiter is factually right. WAIT.")
    # Wait, Hmm, No wait (once, not also as wait), Actually, let me double-check, WAIT
    assert second_guesses(text) == 6
    assert second_guess_counts([text, "We add 2 and 2 to get 4.", ""]).tolist() == [6, 0, 0]


def test_the_markers_are_defined_once_in_code_not_in_the_eval_params():
    assert "wait" in SECOND_GUESS_MARKERS
    assert "second_guess_markers" not in params.read(ROOT / "params.yaml")["eval"]


def test_markers_per_1k_tokens_divide_by_the_tokens_and_are_zero_without_tokens():
    assert per_1k(3, 1500) == pytest.approx(2.0)
    assert per_1k([1, 4, 2], [500, 2000, 0]).tolist() == [2.0, 2.0, 0.0]


# A paragraph of reasoning that a looping model writes again and again, and text around it.
CYCLE = ("Wait, so the total cost is the price of the apples plus the price of the pears, which is twelve "
         "dollars plus eight dollars, so twenty dollars.")
PROSE = [f"Step {i}: we consider case {i} and compute its contribution {i * 7} to the sum before moving on."
         for i in range(40)]
PROBLEM = ("A farmer has 17 sheep and 23 goats. He sells 5 sheep and buys twice as many goats as he sold "
           "sheep. How many animals does he have now?")


def test_a_passage_repeated_back_to_back_is_a_loop():
    opening = " ".join(PROSE[:5])
    assert loops(f"{opening} {' '.join([CYCLE] * 3)} {PROSE[6]}", EVAL.loop_ngram, EVAL.loop_repeats)
    assert loops(f"{opening} {' '.join([CYCLE] * 40)}", EVAL.loop_ngram, EVAL.loop_repeats)
    assert not loops(f"{opening} {' '.join([CYCLE] * 2)} {PROSE[6]}", EVAL.loop_ngram, EVAL.loop_repeats)


def test_a_short_phrase_cycling_counts_through_its_multiples():
    assert loops("So we get " + "1, " * 70 + "and so on.", ngram=20, repeats=3)
    assert not loops("So we get " + "1, " * 50 + "and so on.", ngram=20, repeats=3)  # 50 < 3 copies of 20


def test_the_problem_quoted_again_far_apart_is_not_a_loop():
    parts = [PROBLEM]
    for k in range(4):
        parts += PROSE[10 * k:10 * k + 10] + [f"Let me re-read the problem: {PROBLEM}"]
    text = " ".join(parts)
    assert not loops(text, EVAL.loop_ngram, EVAL.loop_repeats)
    assert not loops(text, ngram=20, repeats=4)  # the old settings, under which any 20 words seen 4 times looped


def test_a_formula_used_again_and_again_is_not_a_loop():
    formula = "the area is one half times the base times the height which equals one half times b times h here"
    text = " ".join(f"{step} Using {formula}, we get area {i}." for i, step in enumerate(PROSE[:12]))
    assert not loops(text, EVAL.loop_ngram, EVAL.loop_repeats)
    assert not loops(text, ngram=10, repeats=2)


def test_finished_means_reasoning_closed_an_answer_given_and_no_cut():
    assert finished("<think>\nr\n</think>\n\nThe answer is $\\boxed{4}$.", hit_max_tokens=False)
    assert not finished("<think>\nr\n</think>\n\nThe answer is", hit_max_tokens=True)
    assert not finished("<think>\nr, and so on", hit_max_tokens=False)
    assert not finished("<think>\nr\n</think>\n\n  \n", hit_max_tokens=False)


def test_boxed_answers_have_balanced_braces_and_end_offsets():
    text = "so \\boxed{\\frac{1}{2}} or \\fbox{7}, not \\boxed{3"
    assert boxed_answers(text) == [("\\frac{1}{2}", text.index(" or")), ("7", text.index(", not"))]
    assert has_boxed(text) and not has_boxed("the answer is 4")


@pytest.mark.parametrize(("text", "values"), [
    ("So 6 \\times 3 = 18. Then we stop.", ["18"]),
    ("So $6 \\times 3 = 18$.\n", ["18"]),
    ("\\[ x = \\frac{36}{2} \\]\nso", ["\\frac{36}{2}"]),
    ("Thus the answer is 70\\,000! Done", ["70\\,000"]),
    ("We need x >= 5. And x != 3? Also 2.5 + 1 = 3.5 here.", ["3.5 here", "3.5"]),
    ("Here a = b + c, so the sum of the two things we computed earlier in this step is even.", []),
])
def test_stated_results_are_the_tails_of_sentences_after_equals_or_answer_is(text, values):
    assert [value for value, _ in stated_results(text)] == values


def is_gold(gold: str):
    """A math-verify judge of candidates, as evaluation builds it."""
    from math_verify import parse, verify

    expected = parse(f"${gold}$")
    return lambda value: bool(verify(expected, parse(f"$\\boxed{{{value}}}$")))


TRACE = ("Janet has 3 boxes of 6 eggs. 3 + 6 = 9. Wait, that is wrong: we multiply, so 3 \\times 6 = 18.\n\n"
         "Hmm, let me double-check: 6 + 6 + 6 = 18. Yes. Actually, let me verify once more: 18 / 3 = 6.\n"
         "</think>\n\nJanet has $\\boxed{18}$ eggs.")


def test_first_correct_position_is_the_end_of_the_first_candidate_equal_to_the_gold():
    first = TRACE.index("18.") + len("18.")  # the sentence "... 3 \times 6 = 18." ends there, after 9 was wrong
    assert first_correct_position(TRACE, is_gold("18")) == first
    assert first_correct_position(TRACE, is_gold("\\frac{36}{2}")) == first
    assert first_correct_position(TRACE, is_gold("9")) == TRACE.index("9.") + 2
    assert first_correct_position(TRACE, is_gold("12")) is None


# R1-style traces (GSM8K and MATH kinds) whose gold is first stated mid-reasoning, each in a form the
# candidates once missed, then checked again and boxed after </think>.
STATED_FORMS = [
    ("At a dollar an egg, the 3 boxes of 6 eggs cost 3 times 6, which equals $18.", "18", "which equals $18."),
    ("She has 12 red and 8 blue marbles, which gives a total of 20 marbles.", "20", "a total of 20 marbles."),
    ("He bought 10 DVDs and returned 3, so 10 - 3 = 7 DVDs.", "7", "= 7 DVDs."),
    ("She sells 6 cupcakes at 3 dollars each, so she makes 18 dollars.", "18", "makes 18 dollars."),
    ("Adding the two rates, the answer: 17", "17", "17"),
    ("The remaining area totals 45 square feet.", "45", "45 square feet."),
    ("So the slope becomes 3/4 after the shift.", "3/4", "after the shift."),
]


@pytest.mark.parametrize(("sentence", "gold", "ends_with"), STATED_FORMS)
def test_the_gold_stated_mid_reasoning_as_a_sentences_result_is_found_there(sentence, gold, ends_with):
    trace = (f"<think>\nOkay, let me read the problem again. {sentence}\nWait, let me double-check the numbers. "
             f"Hmm, yes, that holds.\n</think>\n\nThe result is $\\boxed{{{gold}}}$.")
    position = first_correct_position(trace, is_gold(gold))
    assert position is not None and trace[:position].rstrip().endswith(ends_with.rstrip())
    assert position < trace.index("Wait")  # found mid-reasoning, not only in the final box


def test_a_reporting_verb_without_a_final_number_states_nothing():
    assert stated_results("This is wrong. The sum is even. It gives us an idea.") == []
    assert [v for v, _ in stated_results("Answer: 17")] == ["17"]
    assert [v for v, _ in stated_results("That makes 1,200 dollars per month.")] == ["1200"]


def test_a_gold_that_appears_only_in_the_final_box_is_found_there():
    trace = "We count the eggs carefully, one box after another.\n</think>\n\nSo: $\\boxed{\\frac{36}{2}}$ eggs."
    assert first_correct_position(trace, is_gold("18")) == trace.index("$ eggs")


def test_each_distinct_candidate_is_judged_once():
    judged = []
    first_correct_position("x = 5. Then y = 5. So z = 5.\n\\boxed{5}", lambda v: judged.append(v) or False)
    assert judged == ["5"]


def words(text: str) -> int:
    return len(text.split())


def test_outcome_efficiency_is_the_share_of_tokens_spent_before_the_first_correct_answer():
    first = first_correct_position(TRACE, is_gold("18"))
    expected = words(TRACE[:first]) / words(TRACE)
    assert outcome_efficiency(TRACE, True, is_gold("18"), words) == pytest.approx(expected)
    assert 0.3 < expected < 0.5


def test_outcome_efficiency_is_zero_when_wrong_and_one_when_no_candidate_is_recognized():
    assert outcome_efficiency(TRACE, False, is_gold("18"), words) == 0.0
    assert outcome_efficiency("We are done.\n</think>\n\nEighteen eggs.", True, is_gold("18"), words) == 1.0


def test_latex_is_detected():
    assert uses_latex("so $x^2 = 4$") and uses_latex("\\frac{1}{2}") and uses_latex("\\[ x \\]")
    assert not uses_latex("the answer is 4 dollars")


@pytest.mark.parametrize(("answer", "latex"), [
    ("$x^2 + 1$", True), ("\\boxed{7}", True), ("so $\\frac{1}{2}$ of them", True),
    ("x² + 1", False), ("The root is √2.", False), ("Half: ½", False), ("3 × 4 = 12", False),
    ("$\\frac{1}{2}$ or ½", False),  # mathematics in Unicode beside the LaTeX
    ("The answer is 4.", False), ("", False), (None, False)])
def test_an_answer_counts_as_latex_only_with_latex_and_no_unicode_mathematics(answer, latex):
    assert overthinking.latex_answer(answer) is latex


@pytest.mark.parametrize(("answer", "steps"), [
    ("1. Add the two.\n2. Multiply by 3.\n3. So 21.", 3), ("Step 1: add\nStep 2: multiply", 2),
    ("- a is 2\n- b is 3", 2), ("$$a = b$$\nand\n$$b = c$$", 2), ("\\[x = 1\\] then \\[y = 2\\]", 2),
    ("\\begin{align} a &= b \\\\ b &= c \\end{align}", 1),
    ("First add, then multiply: 21.", 0), ("1. only one", 1), ("In 2019. it rained", 0), (None, 0)])
def test_answer_steps_count_numbered_or_bulleted_lines_or_display_equations(answer, steps):
    assert overthinking.answer_steps(answer) == steps
    assert overthinking.stepwise(answer) is (steps >= 2)
