"""Grading a response against a gold answer: the answer after `</think>` (its last `\\boxed{}`, else the
whole answer) decided by math-verify, or compared exactly when both it and the gold are plain numbers.
"""

from __future__ import annotations

import re
from fractions import Fraction
from functools import lru_cache

from stages.core.prompts import THINK_CLOSE

BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")  # Python and RE2 syntax alike: the filter matches it in Arrow
# A number as answers write it: sign, currency, thousands in groups of three (comma, `{,}`, `,\!`, a LaTeX
# or plain space), decimals, then a percent sign or one \text{} unit. math-verify reads `70\,000` as 70*0.
THOUSANDS = r"(?:,\\!|\{,\}|,|\\[,!:; ]|\\thinspace\s*|\s)"
PLAIN_NUMBER = re.compile(
    rf"(?P<sign>-?)\s*(?:\\\$|\$)?\s*(?P<whole>\d{{1,3}}(?:{THOUSANDS}\d{{3}})+|\d*)(?P<decimals>\.\d+)?"
    r"\s*(?:\\?%)?\s*(?:\\(?:text|mbox|mathrm)\s*\{[^{}]*\})?")


def split_reasoning(response: str) -> tuple[str, str | None]:
    """(reasoning, answer) of a generated response; answer is None when `</think>` never came."""
    if THINK_CLOSE not in response:
        return response, None
    reasoning, _, answer = response.rpartition(THINK_CLOSE)
    return reasoning, answer


def boxed_answers(text: str) -> list[tuple[str, int]]:
    """(content, end offset) of every \\boxed{...} (or \\fbox{...}), braces balanced; an unclosed one is skipped."""
    found = []
    for match in BOXED.finditer(text):
        depth = 1
        for i in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                found.append((text[match.end():i].strip(), i + 1))
                break
    return found


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if there is none."""
    found = boxed_answers(text)
    return found[-1][0] if found else None


def plain_number(text: str) -> Fraction | None:
    """The exact value of text when it is one plain number (see PLAIN_NUMBER), else None."""
    match = PLAIN_NUMBER.fullmatch(text.strip())
    if match is None or not (match["whole"] or match["decimals"]):
        return None
    whole = re.sub(r"\D", "", match["whole"]) or "0"
    return Fraction(f"{match['sign']}{whole}{match['decimals'] or ''}")


def gsm8k_gold(answer: str) -> str:
    """GSM8K's gold is the text after `####`, with thousands separators dropped."""
    return answer.rsplit("####", 1)[-1].strip().replace(",", "")


@lru_cache(maxsize=4096)  # a gold is graded once per sample
def _parsed_gold(gold: str) -> tuple:
    from math_verify import parse

    return tuple(parse(f"${gold}$"))


def grade(gold: str, answer: str | None, numeric: bool) -> tuple[bool, str | None]:
    """(correct, extracted answer) of one response's answer part against the gold answer. numeric: the gold
    is a plain number (eval_sets marks them), so a plain-number answer is compared with it exactly (18.0 is
    18; 1450001 is not 1450000); any other answer goes to math-verify, gold first (verify is not symmetric).
    math-verify times out through SIGALRM: call this from the main thread (elsewhere it raises ValueError).
    """
    if not answer:
        return False, None
    boxed = last_boxed(answer)
    candidate = boxed if boxed is not None else answer.strip()
    if numeric:
        expected, value = plain_number(gold), plain_number(candidate)
        if expected is not None and value is not None:
            return value == expected, candidate
    from math_verify import parse, verify

    # Outside a box `\$` is a currency sign, which math-verify's extraction trips on ("\$1,234" gives nothing).
    predicted = parse(f"$\\boxed{{{boxed}}}$" if boxed is not None else answer.replace("\\$", ""))
    extracted = boxed if boxed is not None else (str(predicted[-1]) if predicted else None)
    gold_parsed = list(_parsed_gold(gold))  # verify takes a list, not a tuple
    return bool(gold_parsed and predicted and verify(gold_parsed, predicted)), extracted


def boxed_parses(answer: str | None) -> bool:
    """The answer's last \\boxed{} holds notation math-verify can read (right or wrong): a grader, or a
    reader's tool, gets a value out of it. False without a box."""
    boxed = last_boxed(answer) if answer else None
    if not boxed or not boxed.strip():
        return False
    from math_verify import parse

    # parse also returns the text itself as a string: only a sympy value counts as read. It reads words as
    # products of symbols ("the answer" as t*h*e*...), so prose in a box counts too: a limit of this measure.
    return any(not isinstance(value, str) for value in parse(f"$\\boxed{{{boxed}}}$"))
