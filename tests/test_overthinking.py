from stages import params
from stages.overthinking import loops, marker_pattern, second_guesses, uses_latex
from tests.conftest import ROOT

MARKERS = params.load("eval", ROOT / "params.yaml").second_guess_markers


def test_second_guess_markers_are_counted_case_insensitively_at_word_boundaries():
    text = ("Wait, 2+2=5? Hmm. No, wait: it is 4. Actually, let me double-check: 2+2=4. "
            "Awaiting nothing; the waiter is factually right. WAIT.")
    # Wait, Hmm, No wait (once, not also as wait), Actually, let me double-check, WAIT
    assert second_guesses(text, marker_pattern(MARKERS)) == 6


def test_a_response_without_markers_counts_zero():
    assert second_guesses("We add 2 and 2 to get 4.", marker_pattern(MARKERS)) == 0


def test_a_long_repeated_ngram_is_a_loop():
    phrase = "so the total is the sum of the first and the second term which gives us"
    assert loops(" ".join([phrase] * 5), ngram=10, repeats=4)
    assert not loops(" ".join([phrase] * 3), ngram=10, repeats=4)
    assert not loops("a b c d e f g h i j k l m n o p", ngram=10, repeats=2)


def test_latex_is_detected():
    assert uses_latex("so $x^2 = 4$") and uses_latex("\\frac{1}{2}") and uses_latex("\\[ x \\]")
    assert not uses_latex("the answer is 4 dollars")
