"""How a response reasons, one definition for evaluation and for the training data: second-guess markers,
loops (text cycling back to back), whether it finished, the answer's form, and outcome efficiency.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.core.prompts import THINK_CLOSE
from stages.scoring.grading import BOXED, boxed_answers

# The phrases that count as second-guessing, matched case-insensitively as whole words. A module constant,
# not a param: it defines the measure, so evaluation and the filter's data rule cannot drift apart, and a
# change is a reviewed code change (both stages list this file in dvc.yaml and re-run).
SECOND_GUESS_MARKERS = ("wait", "hmm", "no, wait", "actually", "let me double-check", "let me check",
                        "let me verify", "on second thought")
# One regex for all markers, longest first so "no, wait" counts once, not also as "wait". It runs in Arrow
# (RE2), whose \b is ASCII: "await" and "factually" hold no marker, "wait," and "Wait:" do.
SECOND_GUESS_REGEX = r"\b(?:" + "|".join(sorted(map(re.escape, SECOND_GUESS_MARKERS), key=len, reverse=True)) + r")\b"
LATEX = re.compile(r"\$[^$]+\$|\\\(|\\\[|\\(?:frac|sqrt|cdot|times|boxed|left|right|sum|int|pi)\b")


def second_guess_counts(texts: Sequence[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Second-guess markers in each text (one vectorized pass; the filter runs it on whole batches)."""
    if not isinstance(texts, pa.Array | pa.ChunkedArray):
        texts = pa.array(texts, pa.large_string())
    counts = pc.count_substring_regex(texts, SECOND_GUESS_REGEX, ignore_case=True)
    return counts.to_numpy(zero_copy_only=False).astype(np.int64)


def second_guesses(text: str) -> int:
    return int(second_guess_counts([text])[0])


def per_1k(markers, tokens):
    """Markers per 1,000 tokens (0 where there are no tokens); for a set, pass the sums: sum(markers) /
    sum(tokens) weighs every token alike, where a mean of per-response rates would let short responses swing it."""
    markers, tokens = np.asarray(markers, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    rate = np.divide(markers * 1000, tokens, out=np.zeros(np.broadcast(markers, tokens).shape), where=tokens > 0)
    return rate if rate.ndim else float(rate)


def loops(text: str, ngram: int, repeats: int) -> bool:
    """True when the text cycles: a stretch of words is written `repeats` times in a row, each copy
    immediately after the last and at least `ngram` words long.

    What a degenerate generation does is repeat itself back to back; quoting the problem again far
    apart, or reusing a formula, is not that and is not flagged (the copies are not adjacent). A cycle
    shorter than `ngram` words counts through its multiples ("1, 1, 1, ..." is a 20-word block repeated).
    How: each `ngram`-word window is compared with its previous occurrence; a run of consecutive windows
    whose previous occurrence lies the same p words back means the text from p words before the run to
    its end repeats with period p. Approximation: a cycle whose copy itself holds the same `ngram` words
    twice breaks its runs and is missed (its copy would have to repeat a whole window within itself).
    """
    words = text.split()
    last_seen: dict[tuple[str, ...], int] = {}
    run_period = run_length = 0
    for i in range(len(words) - ngram + 1):
        window = tuple(words[i:i + ngram])
        period = i - last_seen.get(window, i)  # 0: not seen before
        last_seen[window] = i
        run_length = run_length + 1 if period and period == run_period else 1
        run_period = period
        copy = -(-ngram // period) * period if period else 0  # the shortest multiple of the period >= ngram
        if period and period + run_length + ngram - 1 >= copy * repeats:
            return True
    return False


def finished(response: str, hit_max_tokens: bool) -> bool:
    """Reasoning closed and an answer given: a `</think>`, non-blank text after the last one, and the
    model stopped on its own (a response cut at the token budget may have closed its reasoning but not
    finished its answer)."""
    _, closed, answer = response.rpartition(THINK_CLOSE)
    return bool(closed) and bool(answer.strip()) and not hit_max_tokens


def has_boxed(text: str) -> bool:
    return bool(BOXED.search(text))


def uses_latex(text: str) -> bool:
    return bool(LATEX.search(text))


# A sentence ends at . ! or ? before whitespace (not the point of 3.5), at a line break, or at the end.
SENTENCE = re.compile(r"[^\n]*?(?:[.!?](?=\s|$)|(?=\n)|$)")
# Where a sentence states a result: "=" (not "<=", ">=", "!=" or "==": a bound or a test is not a result),
# "the answer is" or "Answer:", the text after it being the result; or a verb that reports a value ("equals",
# "is", "gives", "totals", "makes", ...), the sentence's final number after it being the result.
STATED = re.compile(r"(?:(?<![<>!=])=(?!=)|\banswers?\s+(?:is|are|was|would be|should be|must be)\b:?|\banswer\s*:)"
                    r"(?P<value>[^=]*)$", re.IGNORECASE)
REPORTED = re.compile(r"\b(?:equals?|equalled|is|are|was|were|gives?|gave|totals?|totalled|makes?|made|becomes?"
                      r"|comes? to)\b(?P<value>.*)$", re.IGNORECASE)
DELIMITERS = re.compile(r"^(?:\s|\$|\\\[|\\\()+|(?:\s|\$|\\\]|\\\)|[.!?,;:])+$")
# The final number, with at most three words of units after it ("7 DVDs", "18 dollars per day"), currency,
# a percent sign or math delimiters around it ("$18", "\$1,200", "25%").
FINAL_NUMBER = re.compile(r"(?<![\w.,\\])(?P<number>-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?)%?"
                          r"(?:\s+[A-Za-z]+){0,3}[\s$.!?,;:)\]\\]*$")
MAX_STATED_CHARS = 40  # longer tails are prose, not a result


def stated_results(text: str) -> list[tuple[str, int]]:
    """(value, end offset) of the results each sentence states: after the sentence's last "=", "the answer is"
    or "Answer:", the text up to the sentence's end, math delimiters and final punctuation stripped ("so 6
    \\times 3 = 18." -> "18"; "\\[ x = \\frac{36}{2} \\]" -> "\\frac{36}{2}"), when short; and, after that or
    after a verb that reports a value ("equals", "is", "gives", "totals", "makes", "becomes", "comes to"), the
    sentence's final number, the units or currency around it dropped ("which equals $18" -> "18", "gives a
    total of 20 eggs." -> "20", "= 7 DVDs" -> "7").

    Still missed: results stated without such a word ("18 eggs in all.", "So, 18."), a value followed by more
    than three words ("is 18, which seems right"), numbers written as words ("eighteen"), and an expression
    (not a number) after a verb ("is \\frac{1}{2}.").
    """
    found = []
    for sentence in SENTENCE.finditer(text):
        stated = STATED.search(sentence.group()) or REPORTED.search(sentence.group())
        if not stated:
            continue
        value = DELIMITERS.sub("", stated.group("value")) if stated.re is STATED else ""
        if value and len(value) <= MAX_STATED_CHARS:
            found.append((value, sentence.end()))
        number = FINAL_NUMBER.search(stated.group("value"))
        if number and number.group("number").replace(",", "") != value:
            found.append((number.group("number").replace(",", ""), sentence.end()))
    return found


def first_correct_position(text: str, is_gold: Callable[[str], bool]) -> int | None:
    """Character offset just past the first candidate answer in `text` that is_gold accepts, or None.

    Candidates (an approximation of "the first solution that reaches the correct answer", which the
    paper finds by splitting the response into solutions and evalscope with an LLM judge): every
    \\boxed{...}, and every result a sentence states ("= X", "the answer is X", "which equals $X", "gives a
    total of X", "Answer: X"; see stated_results, which also lists what it misses). A value that merely
    passes through the gold (a try "x = 5." that is then dropped) counts too, so arrival can be dated early;
    both models are measured the same way. Each distinct value is judged once: is_gold (math-verify) is the
    slow part.
    """
    verdicts: dict[str, bool] = {}
    for value, end in sorted(boxed_answers(text) + stated_results(text), key=lambda candidate: candidate[1]):
        if value not in verdicts:
            verdicts[value] = is_gold(value)
        if verdicts[value]:
            return end
    return None


def outcome_efficiency(response: str, correct: bool, is_gold: Callable[[str], bool],
                       count_tokens: Callable[[str], int]) -> float:
    """One response's term of outcome efficiency (Chen et al. 2024, "Do NOT Think That Much for 2+3=?"):
    sigma * T_hat / T, where T is all the response's tokens, T_hat its tokens up to the end of the first
    candidate answer that equals the gold (first_correct_position), and sigma is 1 for a correct response,
    else 0.

    The paper's metric for a set of N responses is xi_O = (1/N) * sum(sigma_i * T_hat_i / T_i): the plain
    mean of this function over every response, wrong ones counting 0, so it falls with accuracy too; the
    mean over correct responses alone (xi_O / accuracy) isolates how early right answers arrive. evalscope's
    ThinkBench "token efficiency" (third_party/thinkbench/eval.py) is the same mean, over problems, with T
    the reasoning tokens (before `</think>`) and T_hat those of the paragraphs before the one a judge model
    names as first reaching the gold (0 when none does). A correct response in which no candidate is
    recognized (the grader read a form the candidates miss) counts as arriving at its end: 1.
    count_tokens is the caller's tokenizer, used for the prefix and the whole alike.
    """
    if not correct:
        return 0.0
    total = count_tokens(response)
    position = first_correct_position(response, is_gold)
    if position is None or total == 0:
        return 1.0
    return min(count_tokens(response[:position]) / total, 1.0)


# Mathematics written without LaTeX: Unicode superscripts, roots, vulgar fractions, operators and letters.
UNICODE_MATH = re.compile("[\u00b2\u00b3\u00b9\u2070-\u209f\u221a\u221b\u00bc-\u00be\u2150-\u215e\u00d7\u00f7"
                          "\u2212\u2264\u2265\u2260\u2248\u00b1\u221e\u2211\u222b\u03c0\u2202\u2208\u2229\u222a]")
# A step: a line that starts with a number ("1.", "2)"), "Step 3", or a bullet; or a display equation.
STEP_LINE = re.compile(r"^\s*(?:\d+[.)]\s|step\s+\d+\b|[-*\u2022]\s)", re.IGNORECASE | re.MULTILINE)
DISPLAY_EQUATION = re.compile(r"\$\$.+?\$\$|\\\[.+?\\\]|\\begin\{(?:align|equation|gather)\*?\}", re.DOTALL)


def latex_answer(answer: str | None) -> bool:
    """The answer writes its mathematics in LaTeX: some LaTeX ($...$, \\(...\\), \\frac, \\boxed, ...), and no
    mathematics in Unicode symbols instead (x\u00b2, \u221a2, \u00bd, \u00d7, \u2264)."""
    return bool(answer) and uses_latex(answer) and not UNICODE_MATH.search(answer)


def answer_steps(answer: str | None) -> int:
    """Steps the answer is laid out in: its numbered, "Step N" or bulleted lines, or its display equations,
    whichever are more. A proxy for a clear step-by-step answer: it sees layout, not whether the steps are
    right, needed or in a sensible order, and misses steps written as running prose."""
    if not answer:
        return 0
    return max(len(STEP_LINE.findall(answer)), len(DISPLAY_EQUATION.findall(answer)))


def stepwise(answer: str | None) -> bool:
    """Laid out as at least two steps (answer_steps)."""
    return answer_steps(answer) >= 2
